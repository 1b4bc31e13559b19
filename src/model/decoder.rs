//! The one decoder: Llama / Mistral / Qwen2 / Qwen3 / SmolLM2, as transformers' `modeling_llama.py`
//! (and `modeling_qwen3.py` for the per-head q/k norm) compute it. Its linear maps are
//! [`Projection`]s (`projection.rs`: the seam where adapters and quantized bases attach). Differences between families
//! are fields of [`ModelConfig`]; module paths are HF's, so checkpoints load without a rename table.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::{Bool, Int, TensorData};

use super::config::{Activation, ModelConfig};
use super::moe::SparseMoe;
use super::projection::{dense_weight, tensor1, Adapter, Projection, WeightSource};
use super::rope::Rope;
use crate::formats::safetensors::{TensorFiles, WeightsError};
use crate::ops::{self, Kernels};

/// RMSNorm as HF computes it: `w * x / sqrt(mean(x²) + eps)` over the last dimension (Gemma's
/// `(1 + w)` norms hold `1 + w`, computed in f32 at load as transformers computes it).
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[dim]`
    pub weight: Param<Tensor<B, 1>>,
    #[module(skip)]
    pub eps: f64,
}

impl<B: Kernels> RmsNorm<B> {
    pub fn load(ck: &TensorFiles, name: &str, dim: usize, c: &ModelConfig, device: &B::Device) -> Result<Self, WeightsError> {
        let mut w = ck.f32(name, &[dim])?;
        if c.gemma_norms {
            w.iter_mut().for_each(|x| *x += 1.0);
        }
        Ok(RmsNorm { weight: Param::from_tensor(tensor1(w, device)).set_require_grad(false), eps: c.rms_norm_eps })
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

/// What every block of one forward shares: rotary tables per rope of the model
/// ([`ModelConfig::ropes`]) and attention masks `[1 | B, T, S]` (true = not attended) per
/// distinct window of the layers ([`Decoder::windows`]); each block picks its own.
#[derive(Debug, Clone)]
pub struct Positions<B: Backend> {
    pub ropes: Vec<RopeTables<B>>,
    pub masks: Vec<Tensor<B, 3, Bool>>,
}

impl<B: burn::tensor::backend::AutodiffBackend> Positions<B> {
    /// The same on the inner (non-autodiff) backend.
    pub fn inner(&self) -> Positions<B::InnerBackend> {
        Positions { ropes: self.ropes.iter().map(RopeTables::inner).collect(), masks: self.masks.iter().map(|m| m.clone().inner()).collect() }
    }
}

/// The first block's input and what every block shares.
#[derive(Debug, Clone)]
pub struct BlockInputs<B: Backend> {
    pub x: Tensor<B, 3>,
    pub pos: Positions<B>,
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Separate q, k, v projections, or (Phi-3) `qkv_proj` with rows [q; k; v].
    pub q_proj: Option<Projection<B>>,
    pub k_proj: Option<Projection<B>>,
    pub v_proj: Option<Projection<B>>,
    pub qkv_proj: Option<Projection<B>>,
    pub o_proj: Projection<B>,
    pub q_norm: Option<RmsNorm<B>>,
    pub k_norm: Option<RmsNorm<B>>,
    #[module(skip)]
    pub num_heads: usize,
    #[module(skip)]
    pub num_kv_heads: usize,
    #[module(skip)]
    pub head_dim: usize,
    /// The leading dimensions of each head that rotate (the rest pass: partial rotary).
    #[module(skip)]
    pub rotary_dim: usize,
    #[module(skip)]
    pub scale: f64,
    #[module(skip)]
    pub softcap: Option<f64>,
    /// This layer's sliding window (also in its mask; lets kernels skip the keys outside it).
    #[module(skip)]
    pub window: Option<usize>,
}

impl<B: Kernels> Attention<B> {
    pub fn load(src: &WeightSource, p: &str, c: &ModelConfig, window: Option<usize>, device: &B::Device) -> Result<Self, WeightsError> {
        let ck = src.files;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q, kv) = (c.num_heads * hd, c.num_kv_heads * hd);
        let norm = |n: &str| -> Result<Option<RmsNorm<B>>, WeightsError> {
            if c.qk_norm {
                Ok(Some(RmsNorm::load(ck, &format!("{p}.{n}.weight"), hd, c, device)?))
            } else {
                Ok(None)
            }
        };
        let proj = |n: &str, d_out: usize| src.projection(&format!("{p}.{n}"), h, d_out, c.qkv_bias, device).map(Some);
        let (q_proj, k_proj, v_proj, qkv_proj) = if c.fused_projections {
            (None, None, None, proj("qkv_proj", q + 2 * kv)?)
        } else {
            (proj("q_proj", q)?, proj("k_proj", kv)?, proj("v_proj", kv)?, None)
        };
        Ok(Attention {
            q_proj,
            k_proj,
            v_proj,
            qkv_proj,
            o_proj: src.projection(&format!("{p}.o_proj"), q, h, c.o_bias, device)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            num_heads: c.num_heads,
            num_kv_heads: c.num_kv_heads,
            head_dim: hd,
            rotary_dim: c.rotary_dim,
            scale: c.attn_scale,
            softcap: c.attn_softcap,
            window,
        })
    }

    /// Rotary embedding of the first `rotary_dim` dimensions of each head.
    fn rotate(&self, x: Tensor<B, 4>, rope: &RopeTables<B>) -> Tensor<B, 4> {
        if self.rotary_dim == self.head_dim {
            return ops::rope(x, rope.cos.clone(), rope.sin.clone());
        }
        let rd = self.rotary_dim;
        let rot = ops::rope(x.clone().narrow(3, 0, rd), rope.cos.clone(), rope.sin.clone());
        Tensor::cat(vec![rot, x.narrow(3, rd, self.head_dim - rd)], 3)
    }

    /// # Shapes
    /// `x: [B, T, hidden]`, `mask: [1 | B, T, S]` (true = masked, S = cached + T) → `[B, T, hidden]`;
    /// `rope`: `None` in a layer without position encoding.
    pub fn forward(&self, x: Tensor<B, 3>, rope: Option<&RopeTables<B>>, mask: Tensor<B, 3, Bool>, cache: Option<&mut Option<LayerCache<B>>>) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (nh, kvh, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // Heads stay in the projections' layout [B, T, heads, hd]: no transposes.
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, t, n, hd]);
        let (mut q, mut k, mut v) = match (&self.qkv_proj, &self.q_proj, &self.k_proj, &self.v_proj) {
            (Some(qkv), ..) => {
                let y = qkv.forward(x);
                let (nq, nkv) = (nh * hd, kvh * hd);
                (heads(y.clone().narrow(2, 0, nq), nh), heads(y.clone().narrow(2, nq, nkv), kvh), heads(y.narrow(2, nq + nkv, nkv), kvh))
            }
            (None, Some(qp), Some(kp), Some(vp)) => (heads(qp.forward(x.clone()), nh), heads(kp.forward(x.clone()), kvh), heads(vp.forward(x), kvh)),
            _ => unreachable!("an attention has q, k, v or qkv projections"),
        };
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        if let Some(rope) = rope {
            q = self.rotate(q, rope);
            k = self.rotate(k, rope);
        }
        if let Some(slot) = cache {
            if let Some(prev) = slot.take() {
                k = Tensor::cat(vec![prev.k, k], 1);
                v = Tensor::cat(vec![prev.v, v], 1);
            }
            *slot = Some(LayerCache { k: k.clone(), v: v.clone() });
        }
        let out = ops::attention(q, k, v, mask, ops::Scores { scale: self.scale, softcap: self.softcap, window: self.window });
        self.o_proj.forward(out.reshape([b, t, nh * hd]))
    }
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Separate gate and up projections, or (Phi-3) `gate_up_proj` with rows [gate; up].
    pub gate_proj: Option<Projection<B>>,
    pub up_proj: Option<Projection<B>>,
    pub gate_up_proj: Option<Projection<B>>,
    pub down_proj: Projection<B>,
    #[module(skip)]
    pub activation: Activation,
}

impl<B: Kernels> Mlp<B> {
    pub fn load(src: &WeightSource, p: &str, c: &ModelConfig, device: &B::Device) -> Result<Self, WeightsError> {
        let (h, i, bias) = (c.hidden_size, c.intermediate_size, c.mlp_bias);
        let proj = |n: &str, d_out: usize| src.projection(&format!("{p}.{n}"), h, d_out, bias, device).map(Some);
        let (gate_proj, up_proj, gate_up_proj) =
            if c.fused_projections { (None, None, proj("gate_up_proj", 2 * i)?) } else { (proj("gate_proj", i)?, proj("up_proj", i)?, None) };
        Ok(Mlp { gate_proj, up_proj, gate_up_proj, down_proj: src.projection(&format!("{p}.down_proj"), i, h, bias, device)?, activation: c.activation })
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (gate, up) = match (&self.gate_up_proj, &self.gate_proj, &self.up_proj) {
            (Some(gu), ..) => {
                let y = gu.forward(x);
                let i = y.dims()[2] / 2;
                (y.clone().narrow(2, 0, i), y.narrow(2, i, i))
            }
            (None, Some(g), Some(u)) => (g.forward(x.clone()), u.forward(x)),
            _ => unreachable!("an MLP has gate and up or gate_up projections"),
        };
        self.down_proj.forward(self.activation.gated(gate, up))
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    /// On the attention's output with Gemma's four norms; else before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
    /// Gemma: before the MLP.
    pub pre_feedforward_layernorm: Option<RmsNorm<B>>,
    /// Gemma: on the MLP's output.
    pub post_feedforward_layernorm: Option<RmsNorm<B>>,
    /// The dense MLP, or (a sparse layer) `moe`.
    pub mlp: Option<Mlp<B>>,
    pub moe: Option<SparseMoe<B>>,
    /// Which of [`Positions`]' rotary tables this layer uses (`None`: no position encoding).
    #[module(skip)]
    pub rope: Option<usize>,
    /// Which of [`Positions`]' masks this layer uses.
    #[module(skip)]
    pub mask: usize,
}

impl<B: Backend> Block<B> {
    /// The block's projections with their paths inside the block (`self_attn.q_proj`, ...,
    /// `mlp.experts.<e>.gate_up_proj`, the router `mlp.gate`), attention first, in the order of
    /// `projection::BLOCK_LINEARS`.
    pub fn projections(&self) -> Vec<(String, &Projection<B>)> {
        let a = &self.self_attn;
        let named = [
            ("self_attn.q_proj", &a.q_proj),
            ("self_attn.k_proj", &a.k_proj),
            ("self_attn.v_proj", &a.v_proj),
            ("self_attn.qkv_proj", &a.qkv_proj),
        ];
        let mut out: Vec<(String, &Projection<B>)> = named.into_iter().filter_map(|(n, p)| p.as_ref().map(|p| (n.to_string(), p))).collect();
        out.push(("self_attn.o_proj".into(), &a.o_proj));
        if let Some(m) = &self.mlp {
            let mlp = [("mlp.gate_proj", &m.gate_proj), ("mlp.up_proj", &m.up_proj), ("mlp.gate_up_proj", &m.gate_up_proj)];
            out.extend(mlp.into_iter().filter_map(|(n, p)| p.as_ref().map(|p| (n.to_string(), p))));
            out.push(("mlp.down_proj".into(), &m.down_proj));
        }
        if let Some(moe) = &self.moe {
            out.push(("mlp.gate".into(), &moe.gate));
            for (e, x) in moe.experts.iter().enumerate() {
                out.push((format!("mlp.experts.{e}.gate_up_proj"), &x.gate_up_proj));
                out.push((format!("mlp.experts.{e}.down_proj"), &x.down_proj));
            }
        }
        out
    }

    /// The same, mutable.
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Projection<B>)> {
        let a = &mut self.self_attn;
        let named = [
            ("self_attn.q_proj", &mut a.q_proj),
            ("self_attn.k_proj", &mut a.k_proj),
            ("self_attn.v_proj", &mut a.v_proj),
            ("self_attn.qkv_proj", &mut a.qkv_proj),
        ];
        let mut out: Vec<(String, &mut Projection<B>)> = named.into_iter().filter_map(|(n, p)| p.as_mut().map(|p| (n.to_string(), p))).collect();
        out.push(("self_attn.o_proj".into(), &mut a.o_proj));
        if let Some(m) = &mut self.mlp {
            let mlp = [("mlp.gate_proj", &mut m.gate_proj), ("mlp.up_proj", &mut m.up_proj), ("mlp.gate_up_proj", &mut m.gate_up_proj)];
            out.extend(mlp.into_iter().filter_map(|(n, p)| p.as_mut().map(|p| (n.to_string(), p))));
            out.push(("mlp.down_proj".into(), &mut m.down_proj));
        }
        if let Some(moe) = &mut self.moe {
            out.push(("mlp.gate".into(), &mut moe.gate));
            for (e, x) in moe.experts.iter_mut().enumerate() {
                out.push((format!("mlp.experts.{e}.gate_up_proj"), &mut x.gate_up_proj));
                out.push((format!("mlp.experts.{e}.down_proj"), &mut x.down_proj));
            }
        }
        out
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
    pub fn load(src: &WeightSource, i: usize, c: &ModelConfig, mask: usize, device: &B::Device) -> Result<Self, WeightsError> {
        let (ck, p) = (src.files, format!("model.layers.{i}"));
        let norm = |n: &str| RmsNorm::load(ck, &format!("{p}.{n}.weight"), c.hidden_size, c, device);
        let gemma = |n: &str| if c.gemma_norms { norm(n).map(Some) } else { Ok(None) };
        let block = Block {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(src, &format!("{p}.self_attn"), c, c.layers[i].sliding_window, device)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            pre_feedforward_layernorm: gemma("pre_feedforward_layernorm")?,
            post_feedforward_layernorm: gemma("post_feedforward_layernorm")?,
            mlp: if c.layers[i].moe { None } else { Some(Mlp::load(src, &format!("{p}.mlp"), c, device)?) },
            moe: if c.layers[i].moe { Some(SparseMoe::load(src, &p, c, device)?) } else { None },
            rope: c.layers[i].rope,
            mask,
        };
        // The small tensors' (norms, biases, NF4 codes, experts) host copies too.
        B::release_uploads(device);
        Ok(block)
    }

    fn mlp_forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match (&self.mlp, &self.moe) {
            (Some(m), _) => m.forward(x),
            (None, Some(moe)) => moe.forward(x),
            (None, None) => unreachable!("a block has a dense or a sparse MLP"),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>, pos: &Positions<B>, cache: Option<&mut Option<LayerCache<B>>>) -> Tensor<B, 3> {
        let rope = self.rope.map(|r| &pos.ropes[r]);
        let attn = self.self_attn.forward(self.input_layernorm.forward(x.clone()), rope, pos.masks[self.mask].clone(), cache);
        match (&self.pre_feedforward_layernorm, &self.post_feedforward_layernorm) {
            (Some(pre), Some(post)) => {
                let h = x + self.post_attention_layernorm.forward(attn);
                h.clone() + post.forward(self.mlp_forward(pre.forward(h)))
            }
            _ => {
                let h = x + attn;
                h.clone() + self.mlp_forward(self.post_attention_layernorm.forward(h))
            }
        }
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
    /// One per [`ModelConfig::ropes`].
    #[module(skip)]
    pub ropes: Vec<Rope>,
    /// The distinct attention windows of the layers (`None`: full causal), one mask each.
    #[module(skip)]
    pub windows: Vec<Option<usize>>,
    /// With tied embeddings: the head reads the embeddings' trained copy (`modules_to_save`), as
    /// PEFT's `ensure_weight_tying` ties them; otherwise the base embedding (PEFT's default,
    /// where the copy is the input side only).
    #[module(skip)]
    pub tie_head_to_adapted_embeddings: bool,
    #[module(skip)]
    pub config: ModelConfig,
}

impl<B: Kernels> Decoder<B> {
    /// Builds the decoder from a checkpoint, checking every name and shape and that no tensor
    /// is left unused.
    pub fn load(src: &WeightSource, c: &ModelConfig, device: &B::Device) -> Result<Self, WeightsError> {
        let ck = src.files;
        let (v, h) = (c.vocab_size, c.hidden_size);
        let embed_tokens = Projection::embedding(dense_weight(ck, "model.embed_tokens.weight", v, h, false, device)?);
        let mut windows: Vec<Option<usize>> = Vec::new();
        for l in &c.layers {
            if !windows.contains(&l.sliding_window) {
                windows.push(l.sliding_window);
            }
        }
        let layers = (0..c.num_layers)
            .map(|i| Block::load(src, i, c, windows.iter().position(|w| *w == c.layers[i].sliding_window).expect("listed"), device))
            .collect::<Result<Vec<_>, _>>()?;
        let norm = RmsNorm::load(ck, "model.norm.weight", h, c, device)?;
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
            ropes: c.ropes.iter().map(|r| Rope::new(c.rotary_dim, r.theta, r.scaling.clone())).collect(),
            windows,
            tie_head_to_adapted_embeddings: false,
            config: c.clone(),
        })
    }

    /// Resident bytes of the frozen linear weights of the decoder blocks (dense in their dtype, or
    /// NF4), and their parameter count.
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
            out.extend(l.projections_mut().into_iter().map(|(name, p)| (format!("model.layers.{i}.{name}"), p)));
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

    /// The tied output head's weight `[vocab, hidden]`: the embeddings' trained copy when
    /// [`Self::tie_head_to_adapted_embeddings`] and the adapter is on, else the base embeddings.
    fn tied_head_weight(&self) -> Tensor<B, 2> {
        let e = &self.embed_tokens;
        match e.adapter.as_ref().filter(|_| e.adapter_on && self.tie_head_to_adapted_embeddings) {
            Some(Adapter::Full(f)) => f.weight.val().cast(e.base_tensor().dtype()),
            _ => self.embed_weight(),
        }
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

    /// The fraction of routed (token, expert) choices each expert of each sparse layer got since
    /// the last call (every position run through the model, padding included), and resets the
    /// counts; `None` for a dense model or when nothing was routed.
    pub fn take_router_load(&self) -> Option<Vec<Vec<f64>>> {
        let counts: Vec<Vec<u64>> = self.layers.iter().filter_map(|l| l.moe.as_ref()).map(|m| m.take_counts()).collect();
        if counts.is_empty() || counts.iter().all(|c| c.iter().all(|&x| x == 0)) {
            return None;
        }
        Some(counts.into_iter().map(|c| {
            let total = c.iter().sum::<u64>().max(1) as f64;
            c.into_iter().map(|x| x as f64 / total).collect()
        }).collect())
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

    /// Token embeddings `[B, T, hidden]` (× √hidden for Gemma, the scale rounded to f32 as
    /// transformers' `normalizer`).
    fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let [b, t] = ids.dims();
        let x = self.embed_tokens.embed(ids.reshape([b * t])).reshape([b, t, self.config.hidden_size]);
        if self.config.gemma_norms {
            x * ((self.config.hidden_size as f64).sqrt() as f32)
        } else {
            x
        }
    }

    /// Rotary tables of every rope for rows whose positions are `positions[row][i]`
    /// (`[B, T, rotary_dim]`), or for positions `start..start+t` shared by every row
    /// (`[1, T, rotary_dim]`) when `positions` is `None`.
    fn rope_tables(&self, positions: Option<&[usize]>, b: usize, t: usize, start: usize, device: &B::Device) -> Vec<RopeTables<B>> {
        let rd = self.config.rotary_dim;
        self.ropes
            .iter()
            .map(|rope| match positions {
                None => {
                    let (cos, sin) = rope.tables(start, t, start + t);
                    let table = |d: Vec<f32>| Tensor::<B, 3>::from_data(TensorData::new(d, [1, t, rd]), device);
                    RopeTables { cos: table(cos), sin: table(sin) }
                }
                Some(pos) => {
                    // Dynamic scalings see the longest position of the batch (transformers: max(position_ids) + 1).
                    let longest = pos.iter().max().map_or(1, |&p| p + 1);
                    let (cos, sin) = rope.tables(0, longest, longest);
                    let (mut pc, mut ps) = (vec![0f32; b * t * rd], vec![0f32; b * t * rd]);
                    for (at, &p) in pos.iter().enumerate() {
                        pc[at * rd..(at + 1) * rd].copy_from_slice(&cos[p * rd..(p + 1) * rd]);
                        ps[at * rd..(at + 1) * rd].copy_from_slice(&sin[p * rd..(p + 1) * rd]);
                    }
                    let table = |d: Vec<f32>| Tensor::<B, 3>::from_data(TensorData::new(d, [b, t, rd]), device);
                    RopeTables { cos: table(pc), sin: table(ps) }
                }
            })
            .collect()
    }

    /// One mask `[rows, T, S]` per window of [`Self::windows`], from what each query position
    /// attends to without a window: `keys(row, q)` gives the range of keys (a sliding window
    /// then keeps the last W of them, which are the last W positions of the same sample).
    fn masks(&self, rows: usize, t: usize, s: usize, keys: impl Fn(usize, usize) -> std::ops::Range<usize>, device: &B::Device) -> Vec<Tensor<B, 3, Bool>> {
        self.windows
            .iter()
            .map(|w| {
                let mut masked = vec![true; rows * t * s];
                for row in 0..rows {
                    for q in 0..t {
                        let r = keys(row, q);
                        let from = match w {
                            Some(w) => r.start.max(r.end.saturating_sub(*w)),
                            None => r.start,
                        };
                        masked[(row * t + q) * s..][from..r.end].fill(false);
                    }
                }
                Tensor::<B, 3, Bool>::from_data(TensorData::new(masked, [rows, t, s]), device)
            })
            .collect()
    }

    /// Hidden states after the final norm.
    ///
    /// # Shapes
    /// `ids: [B, T]` → `[B, T, hidden]`. With a cache, positions continue after the cached ones.
    pub fn hidden(&self, ids: Tensor<B, 2, Int>, mut cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let start = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let BlockInputs { mut x, pos } = self.block_inputs(ids, None, start);
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(x, &pos, slot);
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
        let BlockInputs { mut x, pos } = self.padded_inputs(ids, start, pads);
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x, &pos, Some(&mut cache.layers[i]));
        }
        self.norm.forward(x)
    }

    /// [`BlockInputs`] of left-padded rows continuing `start` cached positions.
    fn padded_inputs(&self, ids: Tensor<B, 2, Int>, start: usize, pads: &[usize]) -> BlockInputs<B> {
        let device = ids.device();
        let [b, t] = ids.dims();
        let x = self.embed(ids);
        let s = start + t;
        let positions: Vec<usize> = (0..b * t).map(|at| (start + at % t).saturating_sub(pads[at / t])).collect();
        let ropes = self.rope_tables(Some(&positions), b, t, start, &device);
        // A padding query sees only itself (a row with every key masked is NaN).
        let masks = self.masks(
            b,
            t,
            s,
            |row, q| {
                let abs = start + q;
                if abs < pads[row] {
                    abs..abs + 1
                } else {
                    pads[row]..abs + 1
                }
            },
            &device,
        );
        BlockInputs { x, pos: Positions { ropes, masks } }
    }

    /// Hidden states of packed rows: `segments[b]` lists the lengths of the samples laid end to
    /// end in row `b` (the rest of the row is padding). Positions restart at 0 for each sample
    /// and a sample attends only to its own earlier tokens, so each sample's hidden states equal
    /// those of the sample alone.
    ///
    /// # Shapes
    /// `ids: [B, T]` → `[B, T, hidden]`
    pub fn hidden_packed(&self, ids: Tensor<B, 2, Int>, segments: &[Vec<usize>]) -> Tensor<B, 3> {
        let BlockInputs { mut x, pos } = self.block_inputs(ids, Some(segments), 0);
        for layer in &self.layers {
            x = layer.forward(x, &pos, None);
        }
        self.norm.forward(x)
    }

    /// What the first block gets: token embeddings, rotary tables and attention masks, for plain
    /// rows (positions from `start`, causal) or packed rows (`segments`, see [`Self::hidden_packed`]).
    pub fn block_inputs(&self, ids: Tensor<B, 2, Int>, segments: Option<&[Vec<usize>]>, start: usize) -> BlockInputs<B> {
        let device = ids.device();
        let [b, t] = ids.dims();
        let x = self.embed(ids);
        let Some(segments) = segments else {
            let ropes = self.rope_tables(None, 1, t, start, &device);
            let masks = (0..self.windows.len())
                .map(|i| match self.windows[i] {
                    // Query i (absolute position start+i) may see keys 0..=start+i.
                    None => Tensor::<B, 2, Bool>::tril_mask([t, start + t], start as i64, &device).reshape([1, t, start + t]),
                    Some(_) => self.window_mask(i, t, start, &device),
                })
                .collect();
            return BlockInputs { x, pos: Positions { ropes, masks } };
        };
        // Each position's sample and its position inside it; the padding after the last sample
        // is a run of one-token samples at position 0.
        let mut positions = vec![0usize; b * t];
        let mut sample_start = vec![0usize; b * t];
        for (row, segs) in segments.iter().enumerate() {
            let mut s0 = 0;
            for &len in segs {
                for q in 0..len {
                    positions[row * t + s0 + q] = q;
                    sample_start[row * t + s0 + q] = s0;
                }
                s0 += len;
            }
            for q in s0..t {
                sample_start[row * t + q] = q;
            }
        }
        let ropes = self.rope_tables(Some(&positions), b, t, 0, &device);
        let masks = self.masks(b, t, t, |row, q| sample_start[row * t + q]..q + 1, &device);
        BlockInputs { x, pos: Positions { ropes, masks } }
    }

    /// The plain causal mask `[1, T, start + T]` of window `self.windows[i]`.
    fn window_mask(&self, i: usize, t: usize, start: usize, device: &B::Device) -> Tensor<B, 3, Bool> {
        let w = self.windows[i].expect("a window");
        let s = start + t;
        let mut masked = vec![true; t * s];
        for q in 0..t {
            let end = start + q + 1;
            masked[q * s..][end.saturating_sub(w)..end].fill(false);
        }
        Tensor::<B, 3, Bool>::from_data(TensorData::new(masked, [1, t, s]), device)
    }

    /// Projects hidden states to vocabulary logits (softcapped to `c · tanh(l / c)` when the
    /// model says so: Gemma 2).
    pub fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let logits = self.head_linear(x);
        match self.config.final_softcap {
            Some(c) => (logits / c).tanh() * c,
            None => logits,
        }
    }

    fn head_linear(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(p) => p.forward(x),
            None => {
                let [b, t, h] = x.dims();
                let x = x.reshape([b * t, h]);
                let e = self.tied_head_weight();
                if b * t >= HEAD_ROWS_FOR_TRANSPOSED_E {
                    // x · Eᵀ: logits come out row-major, so the softmax over the vocabulary reads
                    // contiguous rows; packing Eᵀ is paid once for many rows.
                    x.matmul(e.transpose()).reshape([b, t, self.config.vocab_size])
                } else {
                    // Few rows (generation): E [V, H] · xᵀ [H, rows], then a transposed view; a
                    // transposed view of E would be packed/copied by the GEMM on every token.
                    e.matmul(x.transpose()).transpose().reshape([b, t, self.config.vocab_size])
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
