//! Gradient checkpointing (`train.gradient_checkpointing = true`): the decoder blocks run
//! without recording a graph and keep only each block's input; the backward then recomputes one
//! block at a time from its saved input, with a graph, and backpropagates through it. Activation
//! memory drops from every block's intermediates to one block's plus a `[B, T, hidden]` tensor
//! per block, for one extra forward of the blocks (what transformers' `gradient_checkpointing_enable`
//! does per decoder layer).
//!
//! LoRA dropout draws the same masks in the forward and the recomputation: the backend's RNG is
//! re-seeded before each block with a seed drawn from the step's RNG stream (in both modes, so
//! switching checkpointing on changes memory and time, not the numbers).

use std::collections::HashMap;

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::Distribution;

use crate::model::decoder::Positions;
use crate::model::{BlockInputs, Decoder};
use crate::ops::TrainBackend;

/// Whether a training forward keeps every block's graph or recomputes blocks in the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recompute {
    /// The whole graph is recorded.
    #[default]
    Off,
    /// Gradient checkpointing: each block keeps only its input and is recomputed in the backward.
    PerBlock,
}

/// One forward whose blocks still owe their backward.
struct Pending<B: TrainBackend> {
    /// The last block's output as a graph leaf: where the loss's gradient arrives.
    top: Tensor<B, 3>,
    /// Each block's input.
    inputs: Vec<Tensor<B::InnerBackend, 3>>,
    /// The token embeddings with their graph, when they have a trained adapter.
    embedded: Option<Tensor<B, 3>>,
    pos: Positions<B>,
    seeds: Vec<u64>,
}

/// How a training step's forwards produce hidden states.
pub struct Forward<B: TrainBackend> {
    recompute: bool,
    pending: Vec<Pending<B>>,
    /// Seed material for dropout, drawn at the first forward.
    base: Option<u64>,
    /// Forwards so far in this step.
    forwards: usize,
}

/// 48 random bits from the backend's (seeded) RNG stream: two uniform draws of 24 bits, made in
/// f32 whatever the compute dtype (in bf16 each draw kept 8 bits; in f16 it overflowed to inf, so
/// every seed gave the same dropout masks).
pub fn dropout_seed<B: burn::tensor::backend::Backend>(device: &B::Device) -> u64 {
    let r = Tensor::<B, 1>::random([2], Distribution::Uniform(0.0, 16_777_216.0), (device, burn::tensor::DType::F32));
    let r: Vec<f32> = r.into_data().convert::<f32>().to_vec().expect("seed");
    (r[0] as u64) << 24 | r[1] as u64
}

/// Adapter gradients by projection path (in `Adapter::tensors` order), from the recomputed blocks.
pub type BlockGrads<B> = HashMap<String, Vec<Tensor<<B as burn::tensor::backend::AutodiffBackend>::InnerBackend, 2>>>;

impl<B: TrainBackend> Forward<B> {
    pub fn new(recompute: Recompute) -> Self {
        Forward { recompute: recompute == Recompute::PerBlock, pending: Vec::new(), base: None, forwards: 0 }
    }

    /// Hidden states after the final norm, as [`Decoder::hidden`] (`segments`: packed rows, as
    /// [`Decoder::hidden_packed`]).
    pub fn hidden(&mut self, model: &Decoder<B>, ids: Tensor<B, 2, Int>, segments: Option<&[Vec<usize>]>) -> Tensor<B, 3> {
        let device = ids.device();
        let BlockInputs { x, pos } = model.block_inputs(ids, segments, 0);
        // Each block's dropout masks come from its own seed: a function of one number drawn from
        // the step's (seeded) RNG stream at the step's first forward, of the forward's index and
        // of the block's, so they do not depend on what the backward's recomputation draws.
        let base = *self.base.get_or_insert_with(|| dropout_seed::<B::InnerBackend>(&device));
        let forward = self.forwards as u64;
        self.forwards += 1;
        let seeds: Vec<u64> = (0..model.layers.len() as u64)
            .map(|i| (base ^ (forward << 40 | i << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        if !self.recompute {
            let mut x = x;
            for (layer, &seed) in model.layers.iter().zip(&seeds) {
                B::seed(&device, seed);
                x = layer.forward(x, &pos, None);
            }
            return model.norm.forward(x);
        }
        let pos_inner = pos.inner();
        let embedded = model.embed_tokens.adapter.is_some().then(|| x.clone());
        let mut x = x.inner();
        let mut inputs = Vec::with_capacity(model.layers.len());
        for (layer, &seed) in model.layers.iter().zip(&seeds) {
            inputs.push(x.clone());
            B::InnerBackend::seed(&device, seed);
            // `valid()` is burn's evaluation copy: dropout must stay as in training.
            let mut inner = layer.valid();
            inner.set_training(layer.training());
            x = inner.forward(x, &pos_inner, None);
        }
        let top = Tensor::<B, 3>::from_inner(x).require_grad();
        self.pending.push(Pending { top: top.clone(), inputs, embedded, pos, seeds });
        model.norm.forward(top)
    }

    /// After `loss.backward()` gave `grads`: backpropagates through the blocks of every pending
    /// forward, recomputing each, and returns the LoRA gradients found there (empty without
    /// gradient checkpointing, where `grads` already holds them).
    pub fn backward_blocks(&mut self, model: &Decoder<B>, grads: &B::Gradients) -> BlockGrads<B> {
        let mut out: BlockGrads<B> = HashMap::new();
        for p in self.pending.drain(..) {
            let Some(mut grad) = p.top.grad(grads) else { continue };
            let device = grad.device();
            for (i, layer) in model.layers.iter().enumerate().rev() {
                B::seed(&device, p.seeds[i]);
                let x = Tensor::<B, 3>::from_inner(p.inputs[i].clone()).require_grad();
                let y = layer.forward(x.clone(), &p.pos, None);
                let g = (y * Tensor::from_inner(grad)).sum().backward();
                for (name, proj) in layer.projections() {
                    let Some(adapter) = &proj.adapter else { continue };
                    let Some(d) = adapter.tensors().into_iter().map(|t| t.val().grad(&g)).collect::<Option<Vec<_>>>() else { continue };
                    match out.entry(format!("model.layers.{i}.{name}")) {
                        std::collections::hash_map::Entry::Occupied(mut e) => {
                            let sum = e.get().iter().zip(d).map(|(a, b)| a.clone() + b).collect();
                            e.insert(sum);
                        }
                        std::collections::hash_map::Entry::Vacant(e) => {
                            e.insert(d);
                        }
                    }
                }
                grad = x.grad(&g).expect("block input gradient");
            }
            // The embeddings' adapter: from the gradient at the first block's input.
            if let (Some(e), Some(adapter)) = (p.embedded, &model.embed_tokens.adapter) {
                let g = (e * Tensor::from_inner(grad)).sum().backward();
                let Some(d) = adapter.tensors().into_iter().map(|t| t.val().grad(&g)).collect::<Option<Vec<_>>>() else { continue };
                match out.entry("model.embed_tokens".to_string()) {
                    std::collections::hash_map::Entry::Occupied(mut e) => {
                        let sum = e.get().iter().zip(d).map(|(a, b)| a.clone() + b).collect();
                        e.insert(sum);
                    }
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(d);
                    }
                }
            }
        }
        out
    }
}
