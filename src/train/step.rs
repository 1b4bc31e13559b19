//! The one place where forward, backward and the update happen.

use burn::module::Param;
use burn::prelude::*;

use super::objective::StepSettings;
use super::optim::{clip_global_norm, flatten, unflatten, AdamW};
use super::recompute::{Forward, Recompute};
use crate::model::projection::Adapter;
use crate::model::Decoder;
use crate::ops::TrainBackend;

/// The trainable tensors (LoRA A and B of every adapted projection), in a fixed order.
pub fn trainable_params<B: TrainBackend>(model: &mut Decoder<B>) -> Vec<Tensor<B::InnerBackend, 2>> {
    let mut out = Vec::new();
    for (_, p) in model.projections_mut() {
        if let Some(l) = p.lora() {
            out.push(l.a.val().inner());
            out.push(l.b.val().inner());
        }
    }
    out
}

fn set_params<B: TrainBackend>(model: &mut Decoder<B>, params: Vec<Tensor<B::InnerBackend, 2>>) {
    let mut it = params.into_iter();
    for (_, p) in model.projections_mut() {
        if let Some(Adapter::Lora(l)) = &mut p.adapter {
            l.a = Param::from_tensor(Tensor::from_inner(it.next().expect("param count")).require_grad());
            l.b = Param::from_tensor(Tensor::from_inner(it.next().expect("param count")).require_grad());
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
            if let Some(lo) = p.lora() {
                let (a, b) = (lo.a.val(), lo.b.val());
                let (ga, gb) = match (a.grad(&g), b.grad(&g), from_blocks.remove(&name)) {
                    (Some(ga), Some(gb), Some((ra, rb))) => (ga + ra, gb + rb),
                    (Some(ga), Some(gb), None) => (ga, gb),
                    (_, _, Some((ra, rb))) => (ra, rb),
                    _ => (a.inner().zeros_like(), b.inner().zeros_like()),
                };
                this.push(ga);
                this.push(gb);
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
