//! The one place where forward, backward and the update happen.

use burn::module::Param;
use burn::prelude::*;

use super::objective::StepSettings;
use super::optim::{clip_global_norm, flatten, unflatten, AdamW};
use super::recompute::{Forward, Recompute};
use crate::model::Decoder;
use crate::ops::TrainBackend;

/// The trainable tensors (LoRA A and B of every adapted projection, the weight of a module
/// trained in full), in a fixed order.
pub fn trainable_params<B: TrainBackend>(model: &mut Decoder<B>) -> Vec<Tensor<B::InnerBackend, 2>> {
    let mut out = Vec::new();
    for (_, p) in model.projections_mut() {
        if let Some(a) = &p.adapter {
            out.extend(a.tensors().into_iter().map(|t| t.val().inner()));
        }
    }
    out
}

fn set_params<B: TrainBackend>(model: &mut Decoder<B>, params: Vec<Tensor<B::InnerBackend, 2>>) {
    let mut it = params.into_iter();
    for (_, p) in model.projections_mut() {
        if let Some(a) = &mut p.adapter {
            for t in a.tensors_mut() {
                *t = Param::from_tensor(Tensor::from_inner(it.next().expect("param count")).require_grad());
            }
        }
    }
}

/// One optimizer step over `n_micro` micro-batches (gradient accumulation): `loss(model, k)` is
/// micro-batch `k`'s loss, already divided by the normaliser of the whole step, so the sum of
/// their gradients is the gradient of one big batch. Returns (the summed loss, the global grad
/// norm before clipping). With [`Recompute::PerBlock`] (gradient checkpointing, see [`Forward`])
/// the blocks are recomputed in the backward; the closures take their hidden states from the [`Forward`].
pub fn train_step<B: TrainBackend>(
    model: &mut Decoder<B>,
    opt: &mut AdamW<B::InnerBackend>,
    n_micro: usize,
    mut loss: impl FnMut(&mut Decoder<B>, &mut Forward<B>, usize) -> Tensor<B, 1>,
    settings: StepSettings,
    recompute: Recompute,
) -> (f64, f64) {
    // Gradients accumulate flat (see `optim::flatten`): one addition per micro-batch.
    let mut grads: Option<Tensor<B::InnerBackend, 1>> = None;
    let mut total = 0.0;
    let mut forward = Forward::new(recompute);
    for k in 0..n_micro {
        let l = loss(model, &mut forward, k);
        total += crate::loss::scalar(l.clone());
        let g = l.backward();
        let mut from_blocks = forward.backward_blocks(model, &g);
        let mut this = Vec::new();
        for (name, p) in model.projections_mut() {
            let Some(adapter) = &p.adapter else { continue };
            let recomputed = from_blocks.remove(&name);
            for (i, t) in adapter.tensors().into_iter().enumerate() {
                let t = t.val();
                this.push(match (t.grad(&g), recomputed.as_ref().map(|r| r[i].clone())) {
                    (Some(d), Some(r)) => d + r,
                    (Some(d), None) => d,
                    (None, Some(r)) => r,
                    (None, None) => t.inner().zeros_like(),
                });
            }
        }
        let this = flatten(&this);
        grads = Some(match grads {
            None => this,
            Some(acc) => acc + this,
        });
    }
    let params = trainable_params(model);
    let Some(mut grads) = grads else { return (total, 0.0) };
    let grad_norm = clip_global_norm(&mut grads, settings.max_grad_norm);
    let new = opt.step_flat(flatten(&params), grads, settings.lr);
    set_params(model, unflatten(new, opt.shapes()));
    (total, grad_norm)
}
