//! The sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral) as transformers 5 computes it: the
//! router's softmax in f32 over all experts, the top-k per token (renormalised with
//! `norm_topk_prob`), and `out = Σ p_e · down_e(act(gate_e x) · up_e x)` over the chosen experts.
//!
//! Tokens are grouped by expert and each expert runs one GEMM pair over its own tokens: the work
//! scales with the routed tokens (top-k of E), never with E. Each expert is two [`Projection`]s,
//! `gate_up_proj` (rows [gate; up], as transformers 5 holds the experts: `mlp.experts.gate_up_proj`
//! `[E, 2I, H]`) and `down_proj`, so LoRA, QLoRA and training reach every expert through the one
//! projection seam; PEFT 0.21 writes those adapters with `target_parameters` (`adapters::peft`).
//! The router (`mlp.gate`) is a frozen projection.
//!
//! Checkpoints store experts per module as published (`mlp.experts.<e>.{gate,up,down}_proj`,
//! Mixtral's `block_sparse_moe.experts.<e>.{w1,w3,w2}`) or fused 3-D as transformers 5 holds them
//! in memory; both load.

use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::{FloatDType, TensorData};

use super::config::{Activation, ModelConfig, MoeSpec};
use super::projection::{BaseFormat, Projection, WeightSource};
use crate::formats::bnb;
use crate::formats::safetensors::WeightsError;
use crate::ops::Kernels;
use crate::quant::nf4::{Absmax, Nf4, BLOCKSIZE};
use crate::quant::nf4_weight::Nf4Weight;

/// One expert: `down(act(gate x) · up x)` with gate and up fused.
#[derive(Module, Debug)]
pub struct Expert<B: Backend> {
    /// `[H → 2I]`, output columns [gate; up].
    pub gate_up_proj: Projection<B>,
    /// `[I → H]`
    pub down_proj: Projection<B>,
}

/// Tokens routed to each expert since the counter was last read, per layer.
pub type RouterCounts = Arc<Mutex<Vec<u64>>>;

#[derive(Module, Debug)]
pub struct SparseMoe<B: Backend> {
    /// The router `[H → E]` (`mlp.gate.weight` `[E, H]`), frozen.
    pub gate: Projection<B>,
    pub experts: Vec<Expert<B>>,
    #[module(skip)]
    pub top_k: usize,
    #[module(skip)]
    pub norm_topk_prob: bool,
    #[module(skip)]
    pub activation: Activation,
    /// Tokens per expert routed so far (load balance), shared with clones of the model.
    #[module(skip)]
    pub counts: RouterCounts,
}

/// One expert matrix `[out, in]` as stored: dense, or bitsandbytes 4-bit.
pub enum Stored {
    Dense(Vec<f32>),
    Nf4(Nf4),
}

/// A layer's experts as stored: `(gate, up, down)` each `[out, in]`.
type ExpertParts = Vec<(Stored, Stored, Stored)>;

/// Reads a layer's expert weights: per expert module as published (dense or 4-bit), or fused 3-D
/// as transformers 5 holds them.
fn expert_weights(src: &WeightSource, p: &str, m: &MoeSpec, h: usize) -> Result<ExpertParts, WeightsError> {
    let ck = src.files;
    let (e, i) = (m.num_experts, m.intermediate_size);
    // transformers 5's in-memory layout (fused 3-D), under `mlp.experts`.
    let fused = format!("{p}.mlp.experts.gate_up_proj");
    if ck.contains(&fused) {
        let gu = ck.f32(&fused, &[e, 2 * i, h])?;
        let down = ck.f32(&format!("{p}.mlp.experts.down_proj"), &[e, h, i])?;
        let slice = |v: &[f32], x: usize, n: usize| v[x * n..(x + 1) * n].to_vec();
        return Ok((0..e)
            .map(|x| {
                let g = slice(&gu, x, 2 * i * h);
                (Stored::Dense(g[..i * h].to_vec()), Stored::Dense(g[i * h..].to_vec()), Stored::Dense(slice(&down, x, h * i)))
            })
            .collect());
    }
    let (block, g, u, d) = if m.mixtral_names { ("block_sparse_moe", "w1", "w3", "w2") } else { ("mlp", "gate_proj", "up_proj", "down_proj") };
    let read = |name: String, shape: [usize; 2]| -> Result<Stored, WeightsError> {
        if bnb::is_quantized(ck, &name) {
            Ok(Stored::Nf4(bnb::read(ck, &name, &shape)?))
        } else {
            Ok(Stored::Dense(ck.f32(&name, &shape)?))
        }
    };
    (0..e)
        .map(|x| {
            let at = |n: &str| format!("{p}.{block}.experts.{x}.{n}.weight");
            Ok((read(at(g), [i, h])?, read(at(u), [i, h])?, read(at(d), [h, i])?))
        })
        .collect()
}

/// A frozen expert projection `[in → out]` from its stored row blocks (gate and up, or one): NF4
/// when the source is 4-bit or the load quantizes (each block quantized on its own, as
/// bitsandbytes quantizes each expert module; blocks then concatenate exactly), else dense.
fn expert_projection<B: Kernels>(src: &WeightSource, parts: Vec<Stored>, d_in: usize, d_out: usize, device: &B::Device) -> Projection<B> {
    let nf4 = src.format == BaseFormat::Nf4 || parts.iter().any(|p| matches!(p, Stored::Nf4(_)));
    let aligned = parts.iter().all(|p| match p {
        Stored::Dense(w) => w.len().is_multiple_of(BLOCKSIZE),
        Stored::Nf4(q) => q.numel.is_multiple_of(BLOCKSIZE),
    });
    if nf4 && aligned {
        let quantized: Vec<Nf4> = parts
            .into_iter()
            .map(|p| match p {
                Stored::Dense(w) => Nf4::quantize(&w, BLOCKSIZE, true),
                Stored::Nf4(q) => q,
            })
            .collect();
        let joined = Nf4 {
            packed: quantized.iter().flat_map(|q| q.packed.iter().copied()).collect(),
            absmax: Absmax::Plain(quantized.iter().flat_map(|q| q.absmax_f32()).collect()),
            numel: quantized.iter().map(|q| q.numel).sum(),
            blocksize: BLOCKSIZE,
        };
        return Projection::nf4(Nf4Weight::new(&joined, d_out, d_in, device), d_in, d_out);
    }
    let w: Vec<f32> = parts
        .into_iter()
        .flat_map(|p| match p {
            Stored::Dense(w) => w,
            Stored::Nf4(q) => q.dequantize(),
        })
        .collect();
    if nf4 {
        Projection::nf4(Nf4Weight::new(&Nf4::quantize(&w, BLOCKSIZE, true), d_out, d_in, device), d_in, d_out)
    } else {
        Projection::dense(&w, d_in, d_out, device)
    }
}

impl<B: Kernels> SparseMoe<B> {
    /// The router and experts of layer prefix `p` (`model.layers.<l>`).
    pub fn load(src: &WeightSource, p: &str, c: &ModelConfig, device: &B::Device) -> Result<Self, WeightsError> {
        let m = c.moe.as_ref().expect("an MoE config");
        let (h, i) = (c.hidden_size, m.intermediate_size);
        let router = if m.mixtral_names && src.files.contains(&format!("{p}.block_sparse_moe.gate.weight")) {
            format!("{p}.block_sparse_moe.gate")
        } else {
            format!("{p}.mlp.gate")
        };
        let gate = src.projection(&router, h, m.num_experts, false, device)?;
        let experts = expert_weights(src, p, m, h)?
            .into_iter()
            .map(|(g, u, d)| Expert { gate_up_proj: expert_projection(src, vec![g, u], h, 2 * i, device), down_proj: expert_projection(src, vec![d], i, h, device) })
            .collect();
        Ok(SparseMoe { gate, experts, top_k: m.top_k, norm_topk_prob: m.norm_topk_prob, activation: c.activation, counts: Arc::new(Mutex::new(vec![0; m.num_experts])) })
    }

    /// # Shapes
    /// `x: [B, T, H]` → `[B, T, H]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, h] = x.dims();
        let (n, k, e) = (b * t, self.top_k, self.experts.len());
        let device = x.device();
        let x2 = x.reshape([n, h]);
        // Router probabilities in f32 (the routing weights keep their graph: the gradient reaches
        // the hidden states through them, as in transformers).
        let probs = softmax(self.gate.forward(x2.clone()).cast(FloatDType::F32), 1);
        let host: Vec<f32> = probs.clone().into_data().convert::<f32>().to_vec().expect("router probabilities");
        let mut chosen = Vec::with_capacity(n * k);
        let mut order: Vec<usize> = (0..e).collect();
        for row in host.chunks(e) {
            // Descending, ties to the lower index (stable sort), as torch.topk on these sizes.
            order.sort_by(|&a, &c| row[c].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&c)));
            order.iter().take(k).for_each(|&x| chosen.push(x as i64));
            order.sort_unstable();
        }
        let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(chosen.clone(), [n, k]), &device);
        let mut w = probs.gather(1, idx);
        if self.norm_topk_prob {
            w = w.clone() / w.sum_dim(1);
        }
        let w = w.cast(x2.dtype());
        // Group the (token, slot) pairs by expert; run each expert once over its tokens.
        let mut per_expert: Vec<Vec<usize>> = vec![Vec::new(); e];
        for (slot, &x) in chosen.iter().enumerate() {
            per_expert[x as usize].push(slot);
        }
        if let Ok(mut c) = self.counts.lock() {
            c.iter_mut().zip(&per_expert).for_each(|(c, s)| *c += s.len() as u64);
        }
        let mut outputs = Vec::new();
        let mut row_of_slot = vec![0i64; n * k];
        let mut next = 0;
        for (expert, slots) in self.experts.iter().zip(&per_expert) {
            if slots.is_empty() {
                continue;
            }
            let tokens: Vec<i64> = slots.iter().map(|&s| (s / k) as i64).collect();
            let xe = x2.clone().select(0, Tensor::<B, 1, Int>::from_data(TensorData::new(tokens, [slots.len()]), &device));
            outputs.push(expert.forward(xe, self.activation));
            for &s in slots {
                row_of_slot[s] = next;
                next += 1;
            }
        }
        // Back to (token, slot) order, weighted, summed over the slots.
        let y = Tensor::cat(outputs, 0).select(0, Tensor::<B, 1, Int>::from_data(TensorData::new(row_of_slot, [n * k]), &device));
        let y = y.reshape([n, k, h]) * w.reshape([n, k, 1]);
        y.sum_dim(1).reshape([b, t, h])
    }
}

impl<B: Kernels> Expert<B> {
    /// `x: [N, H]` → `[N, H]`
    pub fn forward(&self, x: Tensor<B, 2>, activation: Activation) -> Tensor<B, 2> {
        let y = self.gate_up_proj.forward(x);
        let i = y.dims()[1] / 2;
        let (gate, up) = (y.clone().narrow(1, 0, i), y.narrow(1, i, i));
        self.down_proj.forward(activation.gated(gate, up))
    }
}

impl<B: Backend> SparseMoe<B> {
    /// Takes (and resets) the tokens routed to each expert.
    pub fn take_counts(&self) -> Vec<u64> {
        self.counts.lock().map(|mut c| std::mem::replace(&mut *c, vec![0; self.experts.len()])).unwrap_or_default()
    }
}
