//! The one decoder: Llama / Mistral / Qwen2 / Qwen3 / SmolLM2, as transformers' `modeling_llama.py`
//! (and `modeling_qwen3.py` for the per-head q/k norm) compute it. Its linear maps are
//! [`Projection`]s (`projection.rs`: the seam where adapters and quantized bases attach). Differences between families
//! are fields of [`ModelConfig`]; module paths are HF's, so checkpoints load without a rename table.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::{Bool, Int, TensorData};

use super::config::ModelConfig;
use super::projection::{tensor1, tensor2, Projection, WeightSource, BLOCK_LINEARS};
use super::rope::Rope;
use crate::formats::safetensors::{TensorFiles, WeightsError};
use crate::ops::{self, Kernels};

/// RMSNorm as HF computes it: `w * x / sqrt(mean(x²) + eps)` over the last dimension.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[dim]`
    pub weight: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub eps: f64,
}

impl<B: Kernels> RmsNorm<B> {
    pub fn load(ck: &TensorFiles, name: &str, dim: usize, eps: f64, device: &B::Device) -> Result<Self, WeightsError> {
        let w = ck.f32(name, &[dim])?;
        Ok(RmsNorm { weight: Param::from_tensor(tensor1(w, device)).set_require_grad(false), eps })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        ops::rms_norm(x, self.weight.val(), self.eps)
    }
}

/// Cached keys and values of one layer, `[batch, seen, kv_heads, head_dim]`.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    pub k: Tensor<B, 4>,
    pub v: Tensor<B, 4>,
}

/// Key/value cache for incremental decoding.
#[derive(Debug, Clone, Default)]
pub struct KvCache<B: Backend> {
    pub layers: Vec<Option<LayerCache<B>>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(num_layers: usize) -> Self {
        KvCache { layers: vec![None; num_layers] }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|l| l.k.dims()[1]).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the batch rows `rows`, in that order (sequences that stopped leave the batch).
    pub fn retain_rows(&mut self, rows: &[usize]) {
        for l in self.layers.iter_mut().flatten() {
            let device = l.k.device();
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(rows.iter().map(|&r| r as i64).collect::<Vec<_>>(), [rows.len()]), &device);
            l.k = l.k.clone().select(0, idx.clone());
            l.v = l.v.clone().select(0, idx);
        }
    }
}

/// Rotary cos/sin for the positions of one forward pass, `[1 | B, T, head_dim]` each.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    cos: Tensor<B, 3>,
    sin: Tensor<B, 3>,
}

impl<B: burn::tensor::backend::AutodiffBackend> RopeTables<B> {
    /// The same tables on the inner (non-autodiff) backend.
    pub fn inner(&self) -> RopeTables<B::InnerBackend> {
        RopeTables { cos: self.cos.clone().inner(), sin: self.sin.clone().inner() }
    }
}

/// The first block's input and what every block shares: rotary tables and the attention mask
/// `[1 | B, T, S]` (true = not attended).
#[derive(Debug, Clone)]
pub struct BlockInputs<B: Backend> {
    pub x: Tensor<B, 3>,
    pub rope: RopeTables<B>,
    pub mask: Tensor<B, 3, Bool>,
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Projection<B>,
    pub k_proj: Projection<B>,
    pub v_proj: Projection<B>,
    pub o_proj: Projection<B>,
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
}

impl<B: Kernels> Attention<B> {
    pub fn load(src: &WeightSource, p: &str, c: &ModelConfig, device: &B::Device) -> Result<Self, WeightsError> {
        let ck = src.files;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q, kv) = (c.num_heads * hd, c.num_kv_heads * hd);
        let norm = |n: &str| -> Result<Option<RmsNorm<B>>, WeightsError> {
            if c.qk_norm {
                Ok(Some(RmsNorm::load(ck, &format!("{p}.{n}.weight"), hd, c.rms_norm_eps, device)?))
            } else {
                Ok(None)
            }
        };
        Ok(Attention {
            q_proj: src.projection(&format!("{p}.q_proj"), h, q, c.qkv_bias, device)?,
            k_proj: src.projection(&format!("{p}.k_proj"), h, kv, c.qkv_bias, device)?,
            v_proj: src.projection(&format!("{p}.v_proj"), h, kv, c.qkv_bias, device)?,
            o_proj: src.projection(&format!("{p}.o_proj"), q, h, c.o_bias, device)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: hd,
        })
    }

    /// # Shapes
    /// `x: [B, T, hidden]`, `mask: [1 | B, T, S]` (true = masked, S = cached + T) → `[B, T, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, rope: &RopeTables<B>, mask: Tensor<B, 3, Bool>, cache: Option<&mut Option<LayerCache<B>>>) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (nh, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // Heads stay in the projections' layout [B, T, heads, hd]: no transposes.
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, hd]);
        let mut q = heads(self.q_proj.forward(x.clone()), nh);
        let mut k = heads(self.k_proj.forward(x.clone()), kvh);
        let mut v = heads(self.v_proj.forward(x), kvh);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        q = ops::rope(q, rope.cos.clone(), rope.sin.clone());
        k = ops::rope(k, rope.cos.clone(), rope.sin.clone());
        if let Some(slot) = cache {
            if let Some(prev) = slot.take() {
                k = Tensor::cat(vec![prev.k, k], 1);
                v = Tensor::cat(vec![prev.v, v], 1);
            }
            *slot = Some(LayerCache { k: k.clone(), v: v.clone() });
        }
        let out = ops::attention(q, k, v, mask, (hd as f64).powf(-0.5));
        self.o_proj.forward(out.reshape([b, t, nh * hd]))
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Projection<B>,
    pub up_proj: Projection<B>,
    pub down_proj: Projection<B>,
}

impl<B: Kernels> Mlp<B> {
    pub fn load(src: &WeightSource, p: &str, c: &ModelConfig, device: &B::Device) -> Result<Self, WeightsError> {
        let (h, i, bias) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
        Ok(Mlp {
            gate_proj: src.projection(&format!("{p}.gate_proj"), h, i, bias, device)?,
            up_proj: src.projection(&format!("{p}.up_proj"), h, i, bias, device)?,
            down_proj: src.projection(&format!("{p}.down_proj"), i, h, bias, device)?,
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down_proj.forward(ops::swiglu(self.gate_proj.forward(x.clone()), self.up_proj.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> Block<B> {
    /// The block's projections with their paths inside the block ([`BLOCK_LINEARS`]).
    pub fn projections(&self) -> [(&'static str, &Projection<B>); 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        let p = [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj];
        std::array::from_fn(|i| (BLOCK_LINEARS[i], p[i]))
    }

    /// The same, mutable.
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Projection<B>); 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        let p = [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut m.gate_proj, &mut m.up_proj, &mut m.down_proj];
        let mut p = p.map(Some);
        std::array::from_fn(|i| (BLOCK_LINEARS[i], p[i].take().expect("each projection once")))
    }

    /// Training mode for the block's adapters (LoRA dropout on or off).
    pub fn set_training(&mut self, training: bool) {
        for (_, p) in self.projections_mut() {
            p.set_training(training);
        }
    }

    /// Whether any adapter of the block is in training mode.
    pub fn training(&self) -> bool {
        self.projections().iter().any(|(_, p)| p.lora().is_some_and(|l| l.training))
    }
}

impl<B: Kernels> Block<B> {
    pub fn load(src: &WeightSource, i: usize, c: &ModelConfig, device: &B::Device) -> Result<Self, WeightsError> {
        let (ck, p) = (src.files, format!("model.layers.{i}"));
        Ok(Block {
            input_layernorm: RmsNorm::load(ck, &format!("{p}.input_layernorm.weight"), c.hidden_size, c.rms_norm_eps, device)?,
            self_attn: Attention::load(src, &format!("{p}.self_attn"), c, device)?,
            post_attention_layernorm: RmsNorm::load(ck, &format!("{p}.post_attention_layernorm.weight"), c.hidden_size, c.rms_norm_eps, device)?,
            mlp: Mlp::load(src, &format!("{p}.mlp"), c, device)?,
        })
    }

    pub fn forward(&self, x: Tensor<B, 3>, rope: &RopeTables<B>, mask: Tensor<B, 3, Bool>, cache: Option<&mut Option<LayerCache<B>>>) -> Tensor<B, 3> {
        let h = x.clone() + self.self_attn.forward(self.input_layernorm.forward(x), rope, mask, cache);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// From this many rows on, the tied head multiplies by a transposed view of the embedding (see
/// [`Decoder::head`]).
const HEAD_ROWS_FOR_TRANSPOSED_E: usize = 32;

/// The causal language model: embeddings, blocks, final norm and head (`lm_head`, or the
/// embedding matrix when tied).
#[derive(Module, Debug)]
pub struct Decoder<B: Backend> {
    /// `[vocab, hidden]`
    /// The token embeddings as a projection from one-hot rows (`[vocab, hidden]`, read by row):
    /// an adapter on it is PEFT's embedding LoRA.
    pub embed_tokens: Projection<B>,
    pub layers: Vec<Block<B>>,
    pub norm: RmsNorm<B>,
    /// `None` when tied to `embed_tokens` (or for a sequence-classification checkpoint).
    pub lm_head: Option<Projection<B>>,
    /// A sequence-classification checkpoint's head (`score.weight` `[num_labels, hidden]`, no
    /// bias): a reward model's.
    pub score: Option<Projection<B>>,
    #[module(skip)]
    pub rope: Rope,
    #[module(skip)]
    pub config: ModelConfig,
}

impl<B: Kernels> Decoder<B> {
    /// Builds the decoder from a checkpoint, checking every name and shape and that no tensor
    /// is left unused.
    pub fn load(src: &WeightSource, c: &ModelConfig, device: &B::Device) -> Result<Self, WeightsError> {
        let ck = src.files;
        let (v, h) = (c.vocab_size, c.hidden_size);
        let embed = ck.f32("model.embed_tokens.weight", &[v, h])?;
        let embed_tokens = Projection::embedding(tensor2(embed, [v, h], device));
        let layers = (0..c.num_layers).map(|i| Block::load(src, i, c, device)).collect::<Result<Vec<_>, _>>()?;
        let norm = RmsNorm::load(ck, "model.norm.weight", h, c.rms_norm_eps, device)?;
        let (lm_head, score) = match c.num_labels {
            // transformers' `*ForSequenceClassification`: `score` instead of `lm_head`.
            Some(labels) => (None, Some(src.projection("score", h, labels, false, device)?)),
            None if c.tie_word_embeddings => {
                ck.skip("lm_head.weight");
                (None, None)
            }
            None => (Some(src.projection("lm_head", h, v, false, device)?), None),
        };
        ck.check_all_used()?;
        Ok(Decoder {
            embed_tokens,
            layers,
            norm,
            lm_head,
            score,
            rope: Rope::new(c.head_dim, c.rope_theta, c.rope_scaling.clone()),
            config: c.clone(),
        })
    }

    /// Resident bytes of the frozen linear weights of the decoder blocks (f32 dense, or NF4), and
    /// their parameter count.
    pub fn block_weight_bytes(&mut self) -> (usize, usize) {
        self.projections_mut()
            .into_iter()
            .filter(|(n, _)| n.starts_with("model.layers."))
            .fold((0, 0), |(b, n), (_, p)| (b + p.base_bytes(), n + p.shape.0 * p.shape.1))
    }

    pub fn device(&self) -> B::Device {
        self.embed_weight().device()
    }

    /// Every projection with its HF module path (`model.layers.0.self_attn.q_proj`, ...).
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Projection<B>)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            out.extend(l.projections_mut().map(|(name, p)| (format!("model.layers.{i}.{name}"), p)));
        }
        if let Some(h) = &mut self.lm_head {
            out.push(("lm_head".to_string(), h));
        }
        if let Some(h) = &mut self.score {
            out.push(("score".to_string(), h));
        }
        out.push(("model.embed_tokens".to_string(), &mut self.embed_tokens));
        out
    }

    /// The base token embeddings `[vocab, hidden]` (the tied output head's weight).
    pub fn embed_weight(&self) -> Tensor<B, 2> {
        self.embed_tokens.base_tensor()
    }

    /// Turns a causal LM into a sequence classifier as transformers' `*ForSequenceClassification`
    /// builds one from a causal checkpoint: no `lm_head`, a new `score` head `[labels, hidden]`
    /// without bias drawn N(0, `std`²) (transformers' `initializer_range`, 0.02) from `seed`, and
    /// `pad_token_id` (where the config has none) the id scores are read before. A model that
    /// already has a score head is left as it is.
    pub fn make_sequence_classifier(&mut self, labels: usize, pad_token_id: Option<u32>, std: f64, seed: u64) {
        if self.score.is_some() {
            return;
        }
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let h = self.config.hidden_size;
        let w: Vec<f32> = (0..h * labels).map(|_| crate::model::projection::normal(&mut rng, std) as f32).collect();
        self.score = Some(Projection::dense(&w, h, labels, &self.device()));
        self.lm_head = None;
        self.config.num_labels = Some(labels);
        if self.config.pad_token_id.is_none() {
            self.config.pad_token_id = pad_token_id;
        }
    }

    /// Whether any projection has an adapter.
    pub fn has_adapters(&mut self) -> bool {
        self.projections_mut().iter().any(|(_, p)| p.adapter.is_some())
    }

    /// Training mode for adapters (enables LoRA dropout).
    pub fn set_training(&mut self, training: bool) {
        for (_, p) in self.projections_mut() {
            p.set_training(training);
        }
    }

    /// Switches all adapters on or off (off = the base model).
    /// Switches to the reference model (`true`) and back: where a projection holds a frozen
    /// reference adapter, that adapter; elsewhere the base (adapters off).
    pub fn set_reference(&mut self, on: bool) {
        for (_, p) in self.projections_mut() {
            // Swapped in, `reference` holds the policy's adapter, which may be none.
            if p.reference.is_some() || p.on_reference {
                if p.on_reference != on {
                    std::mem::swap(&mut p.adapter, &mut p.reference);
                    p.on_reference = on;
                }
            } else {
                p.adapter_on = !on;
            }
        }
    }

    /// Whether the reference model is its own adapter (not the base).
    pub fn has_reference_adapter(&mut self) -> bool {
        self.projections_mut().iter().any(|(_, p)| p.reference.is_some() || p.on_reference)
    }

    pub fn set_adapters_enabled(&mut self, enabled: bool) {
        for (_, p) in self.projections_mut() {
            p.adapter_on = enabled;
        }
    }

    fn rope_tables(&self, start: usize, len: usize, device: &B::Device) -> RopeTables<B> {
        let hd = self.config.head_dim;
        let (cos, sin) = self.rope.tables(start, len, start + len);
        let t = |d: Vec<f32>| Tensor::<B, 3>::from_data(TensorData::new(d, [1, len, hd]), device);
        RopeTables { cos: t(cos), sin: t(sin) }
    }

    /// Hidden states after the final norm.
    ///
    /// # Shapes
    /// `ids: [B, T]` → `[B, T, hidden]`. With a cache, positions continue after the cached ones.
    pub fn hidden(&self, ids: Tensor<B, 2, Int>, mut cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let start = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let BlockInputs { mut x, rope, mask } = self.block_inputs(ids, None, start);
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, &rope, mask.clone(), slot);
        }
        self.norm.forward(x)
    }

    /// Hidden states of left-padded rows with a cache (batched generation over prompts of
    /// different lengths): row `b`'s first `pads[b]` positions of the whole sequence (cached ones
    /// included) are padding, which no other position attends to, and its positions count from
    /// its first real token, as transformers' `position_ids = cumsum(attention_mask) − 1`.
    ///
    /// # Shapes
    /// `ids: [B, T]`, `pads: B` → `[B, T, hidden]`
    pub fn hidden_left_padded(&self, ids: Tensor<B, 2, Int>, cache: &mut KvCache<B>, pads: &[usize]) -> Tensor<B, 3> {
        let start = cache.len();
        let BlockInputs { mut x, rope, mask } = self.padded_inputs(ids, start, pads);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x, &rope, mask.clone(), Some(&mut cache.layers[i]));
        }
        self.norm.forward(x)
    }

    /// [`BlockInputs`] of left-padded rows continuing `start` cached positions.
    fn padded_inputs(&self, ids: Tensor<B, 2, Int>, start: usize, pads: &[usize]) -> BlockInputs<B> {
        let device = ids.device();
        let [b, t] = ids.dims();
        let (h, hd) = (self.config.hidden_size, self.config.head_dim);
        let x = self.embed_tokens.embed(ids.reshape([b * t])).reshape([b, t, h]);
        let s = start + t;
        let (cos, sin) = self.rope.tables(0, s, s);
        let (mut pc, mut ps) = (vec![0f32; b * t * hd], vec![0f32; b * t * hd]);
        let mut masked = vec![true; b * t * s];
        for (row, &pad) in pads.iter().enumerate() {
            for q in 0..t {
                let (at, abs) = (row * t + q, start + q);
                let pos = abs.saturating_sub(pad);
                pc[at * hd..(at + 1) * hd].copy_from_slice(&cos[pos * hd..(pos + 1) * hd]);
                ps[at * hd..(at + 1) * hd].copy_from_slice(&sin[pos * hd..(pos + 1) * hd]);
                // A padding query sees only itself (a row with every key masked is NaN).
                let keys = if abs < pad { abs..abs + 1 } else { pad..abs + 1 };
                for k in keys {
                    masked[at * s + k] = false;
                }
            }
        }
        let table = |d: Vec<f32>| Tensor::<B, 3>::from_data(TensorData::new(d, [b, t, hd]), &device);
        let rope = RopeTables { cos: table(pc), sin: table(ps) };
        let mask = Tensor::<B, 3, Bool>::from_data(TensorData::new(masked, [b, t, s]), &device);
        BlockInputs { x, rope, mask }
    }

    /// Hidden states of packed rows: `segments[b]` lists the lengths of the samples laid end to
    /// end in row `b` (the rest of the row is padding). Positions restart at 0 for each sample
    /// and a sample attends only to its own earlier tokens, so each sample's hidden states equal
    /// those of the sample alone.
    ///
    /// # Shapes
    /// `ids: [B, T]` → `[B, T, hidden]`
    pub fn hidden_packed(&self, ids: Tensor<B, 2, Int>, segments: &[Vec<usize>]) -> Tensor<B, 3> {
        let BlockInputs { mut x, rope, mask } = self.block_inputs(ids, Some(segments), 0);
        for layer in &self.layers {
            x = layer.forward(x, &rope, mask.clone(), None);
        }
        self.norm.forward(x)
    }

    /// What the first block gets: token embeddings, rotary tables and attention mask, for plain
    /// rows (positions from `start`, causal) or packed rows (`segments`, see [`Self::hidden_packed`]).
    pub fn block_inputs(&self, ids: Tensor<B, 2, Int>, segments: Option<&[Vec<usize>]>, start: usize) -> BlockInputs<B> {
        let device = ids.device();
        let [b, t] = ids.dims();
        let (h, hd) = (self.config.hidden_size, self.config.head_dim);
        let x = self.embed_tokens.embed(ids.reshape([b * t])).reshape([b, t, h]);
        let Some(segments) = segments else {
            let rope = self.rope_tables(start, t, &device);
            // Query i (absolute position start+i) may see keys 0..=start+i.
            let mask = Tensor::<B, 2, Bool>::tril_mask([t, start + t], start as i64, &device).reshape([1, t, start + t]);
            return BlockInputs { x, rope, mask };
        };
        let (cos, sin) = self.rope.tables(0, t, t);
        let (mut pc, mut ps) = (vec![0f32; b * t * hd], vec![0f32; b * t * hd]);
        let mut masked = vec![true; b * t * t];
        for (row, segs) in segments.iter().enumerate() {
            let mut start = 0;
            for &len in segs.iter().chain(std::iter::once(&0)) {
                // A trailing zero-length segment stands for the padding: one position each.
                let (len, pad) = if len == 0 { (t - start, true) } else { (len, false) };
                for q in 0..len {
                    let at = row * t + start + q;
                    let pos = if pad { 0 } else { q };
                    pc[at * hd..(at + 1) * hd].copy_from_slice(&cos[pos * hd..(pos + 1) * hd]);
                    ps[at * hd..(at + 1) * hd].copy_from_slice(&sin[pos * hd..(pos + 1) * hd]);
                    let keys = if pad { q..q + 1 } else { 0..q + 1 };
                    for k in keys {
                        masked[at * t + start + k] = false;
                    }
                }
                start += len;
            }
        }
        let table = |d: Vec<f32>| Tensor::<B, 3>::from_data(TensorData::new(d, [b, t, hd]), &device);
        let rope = RopeTables { cos: table(pc), sin: table(ps) };
        let mask = Tensor::<B, 3, Bool>::from_data(TensorData::new(masked, [b, t, t]), &device);
        BlockInputs { x, rope, mask }
    }

    /// Projects hidden states to vocabulary logits.
    pub fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(p) => p.forward(x),
            None => {
                let [b, t, h] = x.dims();
                let x = x.reshape([b * t, h]);
                if b * t >= HEAD_ROWS_FOR_TRANSPOSED_E {
                    // x · Eᵀ: logits come out row-major, so the softmax over the vocabulary reads
                    // contiguous rows; packing Eᵀ is paid once for many rows.
                    x.matmul(self.embed_weight().transpose()).reshape([b, t, self.config.vocab_size])
                } else {
                    // Few rows (generation): E [V, H] · xᵀ [H, rows], then a transposed view; a
                    // transposed view of E would be packed/copied by the GEMM on every token.
                    self.embed_weight().matmul(x.transpose()).transpose().reshape([b, t, self.config.vocab_size])
                }
            }
        }
    }

    /// The head applied to `hidden` at the given flat positions (`batch_index * T + t`).
    ///
    /// # Shapes
    /// `hidden: [B, T, hidden]`, `positions: n` → `[1, n, vocab]`
    pub fn head_at(&self, hidden: Tensor<B, 3>, positions: Vec<i64>) -> Tensor<B, 3> {
        let device = hidden.device();
        let [b, t, h] = hidden.dims();
        let n = positions.len();
        let picked = hidden.reshape([b * t, h]).select(0, Tensor::<B, 1, Int>::from_data(TensorData::new(positions, [n]), &device));
        self.head(picked.reshape([1, n, h]))
    }

    /// A sequence-classification model's scores `[B, num_labels]` of right-padded rows `ids`,
    /// read as transformers reads them: at each row's rightmost token that is not
    /// `pad_token_id` (by id, not by length; position 0 when every token is padding).
    ///
    /// # Panics
    /// On a model without a `score` head.
    pub fn sequence_scores(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, t] = ids.dims();
        let values: Vec<i64> = ids.clone().into_data().convert::<i64>().to_vec().expect("ids");
        let positions: Vec<i64> = (0..b).map(|r| (r * t + self.scored_position(&values[r * t..(r + 1) * t])) as i64).collect();
        let hidden = self.hidden(ids, None);
        self.scores_at(hidden, positions)
    }

    /// Where transformers reads a sequence's score: its rightmost token that is not
    /// `pad_token_id` (the last token when there is no pad id; 0 when all are padding).
    pub fn scored_position(&self, row: &[i64]) -> usize {
        let pad = self.config.pad_token_id.map(i64::from);
        row.iter().rposition(|&x| Some(x) != pad).unwrap_or(0)
    }

    /// The score head applied to `hidden` at flat positions (`batch_index * T + t`).
    ///
    /// # Shapes
    /// `hidden: [B, T, hidden]`, `positions: n` → `[n, num_labels]`
    ///
    /// # Panics
    /// On a model without a `score` head.
    pub fn scores_at(&self, hidden: Tensor<B, 3>, positions: Vec<i64>) -> Tensor<B, 2> {
        let score = self.score.as_ref().expect("a sequence-classification model (score head)");
        let [b, t, h] = hidden.dims();
        let n = positions.len();
        let picked = hidden.reshape([b * t, h]).select(0, Tensor::<B, 1, Int>::from_data(TensorData::new(positions, [n]), &self.device()));
        score.forward(picked.reshape([1, n, h])).reshape([n, score.dims().1])
    }

    /// Logits for every position.
    ///
    /// # Shapes
    /// `ids: [B, T]` → `[B, T, vocab]`
    pub fn forward(&self, ids: Tensor<B, 2, Int>, cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let x = self.hidden(ids, cache);
        self.head(x)
    }
}
