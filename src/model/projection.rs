//! The projection seam: every linear map of the decoder is a [`Projection`] — a frozen [`Base`]
//! (dense, or NF4 codes dequantized just in time: QLoRA) plus an optional [`Adapter`] (LoRA;
//! other adapter kinds are further variants). The base kind is chosen once, when the weight is
//! read ([`WeightSource`]: stored 4-bit stays 4-bit; a load option quantizes dense weights), so
//! no flag travels through the layers.
//!
//! Also here: the one place where PyTorch's `[out, in]` layout meets burn's `[in, out]`
//! ([`transpose`]), and the table of the decoder block's linear modules ([`BLOCK_LINEARS`]).

use burn::module::{Module, Param};
use rayon::prelude::*;
use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use crate::formats::bnb;
use crate::formats::safetensors::{TensorFiles, WeightsError};
use crate::ops::chunked::cast_to;
use crate::ops::{self, Kernels};
use crate::quant::nf4::{Nf4, BLOCKSIZE};
use crate::quant::nf4_weight::Nf4Weight;

/// The linear modules of a decoder block, by their path inside the block, in the order every
/// listing of a model's projections follows.
/// `qkv_proj` and `gate_up_proj` are Phi-3's fused forms.
pub const BLOCK_LINEARS: [&str; 9] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.qkv_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.gate_up_proj",
    "mlp.down_proj",
];

/// Whether a checkpoint tensor is one QLoRA quantizes: the weight of a linear module inside a
/// decoder block (embeddings, norms and `lm_head` stay as they are, as transformers does).
pub fn quantizable(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && name.strip_prefix("model.layers.").and_then(|rest| rest.split_once('.')).is_some_and(|(layer, module)| {
            layer.parse::<usize>().is_ok() && module.strip_suffix(".weight").is_some_and(|m| BLOCK_LINEARS.contains(&m) || is_expert_module(m))
        })
}

/// An expert's linear module inside a block, as checkpoints store them: `mlp.experts.<e>.`
/// `gate_proj`/`up_proj`/`down_proj` (Qwen3-MoE) or `block_sparse_moe.experts.<e>.w1`/`w3`/`w2`
/// (Mixtral). (The router is not one: it stays in full precision, as bitsandbytes leaves it.)
pub fn is_expert_module(m: &str) -> bool {
    let parts: Vec<&str> = m.split('.').collect();
    match parts.as_slice() {
        ["mlp", "experts", e, p] => e.parse::<usize>().is_ok() && matches!(*p, "gate_proj" | "up_proj" | "down_proj"),
        ["block_sparse_moe", "experts", e, p] => e.parse::<usize>().is_ok() && matches!(*p, "w1" | "w2" | "w3"),
        _ => false,
    }
}

/// Transposes a row-major `[rows, cols]` matrix (PyTorch's `[out, in]` → burn's `[in, out]`).
/// This is the one place where the layouts meet.
pub fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    crate::formats::safetensors::arrange(rows, cols, true, |i| data[i])
}

/// The dense frozen weight `name` (PyTorch's `[rows, cols]`) on `device` in the device's float
/// dtype, transposed to burn's `[cols, rows]` when `transpose`. Built on the host in one pass from
/// the checkpoint's bytes (no f32 copy: a bf16 checkpoint on a bf16 device is copied as is), the
/// checkpoint's pages released once read, and the upload's host copy freed before the next weight
/// ([`ops::Uploads`]): loading holds about one tensor in host memory, not the model.
pub(crate) fn dense_weight<B: Kernels>(ck: &TensorFiles, name: &str, rows: usize, cols: usize, transpose: bool, device: &B::Device) -> Result<Tensor<B, 2>, WeightsError> {
    let values = ck.values(name, &[rows, cols])?;
    let shape = if transpose { [cols, rows] } else { [rows, cols] };
    let data = match <B::FloatElem as burn::tensor::Element>::dtype() {
        DType::BF16 => TensorData::new(values.arrange(rows, cols, transpose, half::bf16::from_f32), shape),
        DType::F16 => TensorData::new(values.arrange(rows, cols, transpose, half::f16::from_f32), shape),
        _ => TensorData::new(values.arrange(rows, cols, transpose, |v| v), shape),
    };
    drop(values);
    ck.release(name);
    let t = Tensor::from_data(data, device);
    B::release_uploads(device);
    Ok(t)
}

pub(crate) fn tensor1<B: Backend>(data: Vec<f32>, device: &B::Device) -> Tensor<B, 1> {
    let n = data.len();
    Tensor::from_data(TensorData::new(data, [n]), device)
}

pub(crate) fn tensor2<B: Backend>(data: Vec<f32>, shape: [usize; 2], device: &B::Device) -> Tensor<B, 2> {
    Tensor::from_data(TensorData::new(data, shape), device)
}

/// How the frozen base weights of the decoder blocks are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseFormat {
    /// As stored: dense weights dense, bitsandbytes 4-bit weights in NF4.
    #[default]
    AsStored,
    /// Dense block weights quantized to NF4 as they are read (QLoRA: blocksize 64, double
    /// quantization, bit-exact with bitsandbytes).
    Nf4,
}

/// Where projections read their weights from, and in which form their bases are kept.
pub struct WeightSource<'a> {
    pub files: &'a TensorFiles,
    pub format: BaseFormat,
}

impl WeightSource<'_> {
    /// The projection `{path}.weight` (PyTorch `[out, in]`, plus `{path}.bias` `[out]` when
    /// `bias`). A 4-bit stored weight stays 4-bit; with [`BaseFormat::Nf4`] a dense block weight
    /// is quantized as it is read.
    pub fn projection<B: Kernels>(&self, path: &str, d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Result<Projection<B>, WeightsError> {
        let ck = self.files;
        let name = format!("{path}.weight");
        let base = if bnb::is_quantized(ck, &name) {
            Base::Nf4(Nf4Weight::new(&bnb::read(ck, &name, &[d_out, d_in])?, d_out, d_in, device))
        } else if self.format == BaseFormat::Nf4 && quantizable(&name, &[d_out, d_in]) {
            let q = Nf4::quantize(&ck.f32(&name, &[d_out, d_in])?, BLOCKSIZE, true);
            Base::Nf4(Nf4Weight::new(&q, d_out, d_in, device))
        } else {
            Base::Dense(Param::from_tensor(dense_weight(ck, &name, d_out, d_in, true, device)?).set_require_grad(false))
        };
        let bias = if bias {
            Some(Param::from_tensor(tensor1(ck.f32(&format!("{path}.bias"), &[d_out])?, device)).set_require_grad(false))
        } else {
            None
        };
        Ok(Projection { base, bias, adapter: None, reference: None, adapter_on: true, on_reference: false, shape: (d_in, d_out) })
    }
}

/// A projection's frozen base weight. (The NF4 variant is larger; one per projection, and burn's
/// module derive takes no boxed field.)
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Base<B: Backend> {
    /// `[in, out]` (burn's layout; PyTorch's `[out, in]` is transposed at load).
    Dense(Param<Tensor<B, 2>>),
    /// NF4 codes of the PyTorch-layout `[out, in]` matrix, dequantized for each forward (and
    /// again in the backward): only the input gradient flows through it.
    Nf4(Nf4Weight<B>),
}

impl<B: Backend> Base<B> {
    pub fn is_nf4(&self) -> bool {
        matches!(self, Base::Nf4(_))
    }
}

/// What a projection adds to its base.
#[derive(Module, Debug)]
pub enum Adapter<B: Backend> {
    Lora(Lora<B>),
    /// Weight-decomposed LoRA (PEFT's `use_dora`): LoRA plus a learned magnitude per output.
    Dora(Dora<B>),
    /// A trained copy of the whole weight that replaces the base while the adapter is on
    /// (PEFT's `modules_to_save`: a reward model's `score` head).
    Full(Full<B>),
}

impl<B: Backend> Adapter<B> {
    /// The trained tensors, in a fixed order (LoRA: A then B; a full copy: its weight).
    pub fn tensors(&self) -> Vec<&Param<Tensor<B, 2>>> {
        match self {
            Adapter::Lora(l) => vec![&l.a, &l.b],
            Adapter::Dora(d) => vec![&d.lora.a, &d.lora.b, &d.magnitude],
            Adapter::Full(f) => vec![&f.weight],
        }
    }

    /// The LoRA matrices (of LoRA and DoRA).
    pub fn lora(&self) -> Option<&Lora<B>> {
        match self {
            Adapter::Lora(l) => Some(l),
            Adapter::Dora(d) => Some(&d.lora),
            Adapter::Full(_) => None,
        }
    }

    pub fn lora_mut(&mut self) -> Option<&mut Lora<B>> {
        match self {
            Adapter::Lora(l) => Some(l),
            Adapter::Dora(d) => Some(&mut d.lora),
            Adapter::Full(_) => None,
        }
    }

    /// The trained tensors, mutably, in the order of [`Adapter::tensors`].
    pub fn tensors_mut(&mut self) -> Vec<&mut Param<Tensor<B, 2>>> {
        match self {
            Adapter::Lora(l) => vec![&mut l.a, &mut l.b],
            Adapter::Dora(d) => vec![&mut d.lora.a, &mut d.lora.b, &mut d.magnitude],
            Adapter::Full(f) => vec![&mut f.weight],
        }
    }

    /// The same adapter outside autodiff (a frozen reference).
    pub fn frozen(self) -> Self {
        match self {
            Adapter::Lora(l) => Adapter::Lora(l.frozen()),
            Adapter::Dora(d) => Adapter::Dora(Dora { lora: d.lora.frozen(), magnitude: d.magnitude.set_require_grad(false) }),
            Adapter::Full(f) => Adapter::Full(Full { weight: f.weight.set_require_grad(false) }),
        }
    }
}

/// DoRA: `y = (m / n) ⊙ (W x + s · B A x)` with `n = ‖W + s · B A‖` per output row (over the
/// input dimension), detached in training as PEFT does: only `m`, A and B learn, and no gradient
/// flows through the norm.
#[derive(Module, Debug)]
pub struct Dora<B: Backend> {
    pub lora: Lora<B>,
    /// `[1, out]` (PEFT's `lora_magnitude_vector` is `[out]`).
    pub magnitude: Param<Tensor<B, 2>>,
}

impl<B: Backend> Dora<B> {
    /// From PEFT's magnitude vector `[out]` (f32, the master weight).
    pub fn new(lora: Lora<B>, magnitude: &[f32], device: &B::Device) -> Self {
        let n = magnitude.len();
        Dora { lora, magnitude: Param::from_tensor(Tensor::from_data(TensorData::new(magnitude.to_vec(), [1, n]), (device, DType::F32))) }
    }

    /// The magnitude vector `[out]` as PEFT stores it.
    pub fn magnitude_peft(&self) -> Vec<f32> {
        self.magnitude.val().into_data().convert::<f32>().to_vec().expect("f32")
    }
}

/// `w [out, in] += scale · (b [out, r] · a [r, in])`, rows in parallel.
pub fn add_lora_delta(w: &mut [f32], a: &[f32], b: &[f32], r: usize, d_in: usize, scale: f32) {
    w.par_chunks_mut(d_in).enumerate().for_each(|(o, row)| {
        let mut delta = vec![0f32; d_in];
        for k in 0..r {
            let c = b[o * r + k];
            for (d, &x) in delta.iter_mut().zip(&a[k * d_in..(k + 1) * d_in]) {
                *d += c * x;
            }
        }
        for (x, d) in row.iter_mut().zip(delta) {
            *x += d * scale;
        }
    });
}

/// A draw from N(0, std²) by Box-Muller (one cosine per pair of uniforms): the one normal sampler
/// of new weights (a classifier head, Gaussian and embedding LoRA inits, PiSSA's random range).
pub fn normal(rng: &mut impl rand::Rng, std: f64) -> f64 {
    let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random_range(0.0..1.0));
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std
}

/// `‖w_o‖₂` of every output row `o` of a PyTorch-layout `[out, in]` matrix (DoRA's norm and
/// its magnitude's initial value).
pub fn row_norms(w: &[f32], d_in: usize) -> Vec<f32> {
    w.chunks(d_in).map(|r| r.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt() as f32).collect()
}

/// A full trained copy of a projection's weight (PEFT's `modules_to_save`).
#[derive(Module, Debug)]
pub struct Full<B: Backend> {
    /// `[in, out]` (PEFT stores `[out, in]` as `base_model.model.<module>.weight`).
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> Full<B> {
    /// From a PyTorch-layout `[out, in]` matrix, in f32 (the optimizer's master weight).
    pub fn from_peft(w: &[f32], d_in: usize, d_out: usize, device: &B::Device) -> Self {
        Full { weight: Param::from_tensor(Tensor::from_data(TensorData::new(transpose(w, d_out, d_in), [d_in, d_out]), (device, DType::F32))) }
    }

    /// From a `[in, out]` matrix as stored (an embedding's `[vocab, hidden]`), in f32.
    pub fn from_rows(w: &[f32], d_in: usize, d_out: usize, device: &B::Device) -> Self {
        Full { weight: Param::from_tensor(Tensor::from_data(TensorData::new(w.to_vec(), [d_in, d_out]), (device, DType::F32))) }
    }

    /// The weight `[in, out]` as held (an embedding's layout on disk), row-major f32.
    pub fn to_rows(&self) -> Vec<f32> {
        self.weight.val().into_data().convert::<f32>().to_vec().expect("f32")
    }

    /// The weight in PyTorch's `[out, in]` layout, row-major f32.
    pub fn to_peft(&self) -> Vec<f32> {
        let [d_in, d_out] = self.weight.dims();
        let w: Vec<f32> = self.weight.val().into_data().convert::<f32>().to_vec().expect("f32");
        transpose(&w, d_in, d_out)
    }
}

/// A linear layer with a frozen base and an optional adapter: `y = x W (+ b) (+ s · (x A) B)`.
#[derive(Module, Debug)]
pub struct Projection<B: Backend> {
    pub base: Base<B>,
    /// `[out]`
    pub bias: Option<Param<Tensor<B, 1>>>,
    pub adapter: Option<Adapter<B>>,
    /// A frozen adapter standing for the reference model (DPO from a starting adapter: that
    /// adapter, never trained): swapped with `adapter` while the reference is scored.
    pub reference: Option<Adapter<B>>,
    /// `false` switches the adapter off (the base model, e.g. DPO's reference).
    #[module(skip)]
    pub adapter_on: bool,
    /// Whether `adapter` and `reference` are swapped (the reference is being scored).
    #[module(skip)]
    pub on_reference: bool,
    /// `(in, out)`
    #[module(skip)]
    pub shape: (usize, usize),
}

impl<B: Backend> Projection<B> {
    /// A frozen dense projection from a PyTorch-layout `[out, in]` matrix, without bias.
    pub fn dense(w: &[f32], d_in: usize, d_out: usize, device: &B::Device) -> Self {
        let base = Base::Dense(Param::from_tensor(tensor2(transpose(w, d_out, d_in), [d_in, d_out], device)).set_require_grad(false));
        Projection { base, bias: None, adapter: None, reference: None, adapter_on: true, on_reference: false, shape: (d_in, d_out) }
    }

    /// A frozen NF4 projection without bias.
    pub fn nf4(w: Nf4Weight<B>, d_in: usize, d_out: usize) -> Self {
        Projection { base: Base::Nf4(w), bias: None, adapter: None, reference: None, adapter_on: true, on_reference: false, shape: (d_in, d_out) }
    }

    /// Token embeddings `[vocab, hidden]` as a frozen projection from one-hot rows (read with
    /// [`Projection::embed`]).
    pub fn embedding(e: Tensor<B, 2>) -> Self {
        let [v, h] = e.dims();
        Projection { base: Base::Dense(Param::from_tensor(e).set_require_grad(false)), bias: None, adapter: None, reference: None, adapter_on: true, on_reference: false, shape: (v, h) }
    }

    /// The dense base weight `[in, out]`.
    ///
    /// # Panics
    /// On an NF4 base.
    pub fn base_tensor(&self) -> Tensor<B, 2> {
        match &self.base {
            Base::Dense(w) => w.val(),
            Base::Nf4(_) => panic!("an NF4 projection has no dense weight"),
        }
    }

    /// A copy of the base weight `[in, out]` in f32, outside autodiff (NF4 dequantized): the
    /// start of a module trained in full.
    pub fn base_tensor_f32(&self) -> Tensor<B, 2> {
        let w = match &self.base {
            Base::Dense(w) => w.val(),
            Base::Nf4(q) => q.dequantize().transpose(),
        };
        let w = w.detach();
        if w.dtype() == DType::F32 { w } else { w.cast(DType::F32) }
    }

    /// Rows `ids` of the weight, as a product with one-hot rows: `W[ids] (+ s · A[ids] B)` (PEFT's
    /// embedding LoRA: no dropout).
    ///
    /// # Shapes
    /// `ids: [n]` → `[n, out]`
    pub fn embed(&self, ids: Tensor<B, 1, Int>) -> Tensor<B, 2> {
        let y = self.base_tensor().select(0, ids.clone());
        match self.adapter.as_ref().filter(|_| self.adapter_on) {
            // PEFT's `Embedding`: the adapter's rows in its (f32) dtype, summed with the base
            // rows in f32 and rounded once.
            Some(Adapter::Lora(l)) => {
                let dtype = y.dtype();
                let lora = l.a.val().select(0, ids).matmul(l.b.val()) * l.scale;
                cast_to(cast_to(y, lora.dtype()) + lora, dtype)
            }
            Some(Adapter::Full(f)) => f.weight.val().cast(y.dtype()).select(0, ids),
            Some(Adapter::Dora(_)) => panic!("DoRA on embeddings is refused when the adapter is made"),
            None => y,
        }
    }

    /// The LoRA adapter, if the projection has one.
    pub fn lora(&self) -> Option<&Lora<B>> {
        self.adapter.as_ref().and_then(Adapter::lora)
    }

    /// `(in, out)`
    pub fn dims(&self) -> (usize, usize) {
        self.shape
    }

    /// Bytes the base weight occupies: dense in its dtype (4 for f32, 2 for bf16/f16), or NF4's
    /// codes and statistics.
    pub fn base_bytes(&self) -> usize {
        match &self.base {
            Base::Nf4(q) => q.bytes(),
            Base::Dense(p) => p.val().dtype().size() * self.shape.0 * self.shape.1,
        }
    }

    /// Replaces the base weight by `w` (PyTorch `[out, in]`), in the base's form: an NF4 base is
    /// quantized again (PiSSA's residual).
    pub fn replace_base(&mut self, w: &[f32]) {
        let (d_in, d_out) = self.shape;
        let device = match &self.base {
            Base::Dense(p) => p.val().device(),
            Base::Nf4(q) => q.dequantize().device(),
        };
        self.base = match &self.base {
            Base::Nf4(_) => Base::Nf4(Nf4Weight::new(&Nf4::quantize(w, BLOCKSIZE, true), d_out, d_in, &device)),
            Base::Dense(_) => Base::Dense(Param::from_tensor(tensor2(transpose(w, d_out, d_in), [d_in, d_out], &device)).set_require_grad(false)),
        };
    }

    /// A dense copy of the base weight in PyTorch's `[out, in]` layout (NF4 dequantized).
    pub fn base_weight_peft(&self) -> Vec<f32> {
        let (d_in, d_out) = self.shape;
        match &self.base {
            Base::Dense(w) => transpose(&w.val().into_data().convert::<f32>().to_vec::<f32>().expect("f32"), d_in, d_out),
            Base::Nf4(q) => q.dequantize().into_data().convert::<f32>().to_vec().expect("f32"),
        }
    }

    /// Training mode of the adapter (dropout on or off).
    pub fn set_training(&mut self, training: bool) {
        if let Some(l) = self.adapter.as_mut().and_then(Adapter::lora_mut) {
            l.training = training;
        }
    }
}

impl<B: Kernels> Projection<B> {
    /// # Shapes
    /// `x: [..., in]` → `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        // One 2-D GEMM over all rows: the CPU backend parallelises a single large matmul far
        // better than a batch of small ones.
        let dims = x.dims();
        let (d_in, d_out) = self.shape;
        let rows = dims[..D - 1].iter().product();
        let x: Tensor<B, 2> = x.reshape([rows, d_in]);
        let adapter = self.adapter.as_ref().filter(|_| self.adapter_on);
        if let Some(Adapter::Dora(d)) = adapter {
            let mut y = self.dora_forward(x, d);
            if let Some(b) = &self.bias {
                y = y + b.val().unsqueeze();
            }
            let mut out = dims;
            out[D - 1] = d_out;
            return y.reshape(out);
        }
        let mut y = match (&self.base, adapter) {
            (_, Some(Adapter::Dora(_))) => unreachable!("DoRA returned above"),
            // Base and adapter as one operation (one backward step, no separate sum).
            // The adapter in its f32 masters' dtype (PEFT without autocast): dropout on the input
            // cast up.
            (Base::Dense(w), Some(Adapter::Lora(l))) => ops::lora_linear(x.clone(), l.dropped_input(&x), w.val(), l.a.val(), l.b.val(), l.scale),
            // A trained copy replaces the base weight.
            (_, Some(Adapter::Full(f))) => x.clone().matmul(f.weight.val().cast(x.dtype())),
            (Base::Dense(w), None) => x.clone().matmul(w.val()),
            // Dequantized for this forward (and again in the backward): never kept.
            (Base::Nf4(q), adapter) => {
                let y = B::nf4_linear(x.clone(), q);
                match adapter {
                    Some(Adapter::Lora(l)) => y + l.forward(x),
                    _ => y,
                }
            }
        };
        if let Some(b) = &self.bias {
            y = y + b.val().unsqueeze();
        }
        let mut out = dims;
        out[D - 1] = d_out;
        y.reshape(out)
    }
}

impl<B: Kernels> Projection<B> {
    /// The frozen base alone: `x W` (no bias).
    fn base_forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        match &self.base {
            Base::Dense(w) => x.matmul(w.val()),
            Base::Nf4(q) => B::nf4_linear(x, q),
        }
    }

    /// The base weight `[in, out]` as the forward sees it (NF4 dequantized), outside autodiff.
    fn base_weight(&self) -> Tensor<B, 2> {
        match &self.base {
            Base::Dense(w) => w.val().detach(),
            Base::Nf4(q) => q.dequantize().transpose().detach(),
        }
    }

    /// DoRA as PEFT computes it (bias excluded): with `x_d` the adapter's input (after dropout),
    /// `y = W x + (m/n − 1) ⊙ W x_d + (m/n) ⊙ s B A x_d`; without dropout that is
    /// `(m/n) ⊙ (W x + s B A x)`. `n` is recomputed from the current A and B at every forward and
    /// detached.
    fn dora_forward(&self, x: Tensor<B, 2>, d: &Dora<B>) -> Tensor<B, 2> {
        // In the adapter's f32 (PEFT's DoRA on a half-precision base: the base output cast up,
        // the LoRA branch and the magnitude scaling in f32, the result rounded once).
        let l = &d.lora;
        let (dtype, ad) = (x.dtype(), l.a.val().dtype());
        let (a, b) = (l.a.val().detach(), l.b.val().detach());
        let w = self.base_weight().cast(ad) + a.matmul(b) * l.scale;
        let norm = w.powi_scalar(2).sum_dim(0).sqrt();
        let scale = d.magnitude.val() / norm;
        let base = cast_to(self.base_forward(x.clone()), ad);
        let xa = cast_to(x, ad);
        let y = match l.dropped_input(&xa) {
            None => (base + l.forward_dropped(xa)) * scale,
            Some(xd) => {
                let based = cast_to(self.base_forward(cast_to(xd.clone(), dtype)), ad);
                base + based * (scale.clone() - 1.0) + l.forward_dropped(xd) * scale
            }
        };
        cast_to(y, dtype)
    }
}

/// One LoRA adapter on a projection.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[in, r]` (PEFT's `lora_A.weight` is `[r, in]`).
    pub a: Param<Tensor<B, 2>>,
    /// `[r, out]` (PEFT's `lora_B.weight` is `[out, r]`).
    pub b: Param<Tensor<B, 2>>,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    #[module(skip)]
    pub scale: f64,
    /// Dropout probability on the adapter input, applied while `training`.
    #[module(skip)]
    pub dropout: f64,
    #[module(skip)]
    pub training: bool,
    /// PiSSA's initial `(A₀ [r, in], B₀ [out, r])` (PEFT layout), kept to save the adapter
    /// converted for the original base.
    #[module(skip)]
    pub initial: Option<(Vec<f32>, Vec<f32>)>,
}

impl<B: Backend> Lora<B> {
    /// Builds from PEFT-layout matrices (`a_peft: [r, in]`, `b_peft: [out, r]`, row-major).
    pub fn from_peft(a_peft: &[f32], b_peft: &[f32], r: usize, d_in: usize, d_out: usize, scale: f64, device: &B::Device) -> Self {
        let a = transpose(a_peft, r, d_in);
        let b = transpose(b_peft, d_out, r);
        // f32 whatever the compute dtype: the master weights the optimizer updates.
        Lora {
            a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [d_in, r]), (device, DType::F32))),
            b: Param::from_tensor(Tensor::from_data(TensorData::new(b, [r, d_out]), (device, DType::F32))),
            scale,
            dropout: 0.0,
            training: false,
            initial: None,
        }
    }

    /// The same adapter with its A and B outside autodiff (a frozen reference): a forward
    /// through it records no graph.
    pub fn frozen(self) -> Self {
        Lora { a: self.a.set_require_grad(false), b: self.b.set_require_grad(false), ..self }
    }

    /// A and B in PEFT's layout (`[r, in]`, `[out, r]`), row-major f32.
    pub fn to_peft(&self) -> (Vec<f32>, Vec<f32>) {
        let [d_in, r] = self.a.dims();
        let [_, d_out] = self.b.dims();
        let a: Vec<f32> = self.a.val().into_data().convert::<f32>().to_vec().expect("f32");
        let b: Vec<f32> = self.b.val().into_data().convert::<f32>().to_vec().expect("f32");
        (transpose(&a, d_in, r), transpose(&b, r, d_out))
    }

    /// A and B in `dtype`, the compute dtype of the activations they multiply: the f32 master
    /// weights rounded for the forward (a differentiable cast: their gradients come back in f32).
    pub fn weights_in(&self, dtype: DType) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let cast = |t: Tensor<B, 2>| if t.dtype() == dtype { t } else { t.cast(dtype) };
        (cast(self.a.val()), cast(self.b.val()))
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[1]
    }

    /// The adapter's input: `x` after dropout while training, in the adapter's (f32 masters')
    /// dtype as PEFT casts it before its dropout; `None` when that is `x` itself (no copy made).
    /// Inverted dropout from the backend's seeded RNG (as torch.nn.Dropout).
    pub fn dropped_input<const D: usize>(&self, x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
        (self.training && self.dropout > 0.0).then(|| {
            let x = cast_to(x.clone(), self.a.val().dtype());
            let keep = x.random_like(burn::tensor::Distribution::Bernoulli(1.0 - self.dropout));
            x * keep / (1.0 - self.dropout)
        })
    }

    /// `s · (x A) B` of an input already dropped out (or not to be).
    pub fn forward_dropped<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let (a, b) = self.weights_in(x.dtype());
        (x.matmul(a.unsqueeze()) * self.scale).matmul(b.unsqueeze())
    }

    /// The adapter's contribution `s · (x A) B`.
    ///
    /// # Shapes
    /// `x: [..., in]` → `[..., out]`
    /// Computed in the adapter's dtype (f32 masters: the input cast up, dropout on it, the result
    /// cast down to the input's dtype, as PEFT's 4-bit `Linear4bit` adds it).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = cast_to(x, self.a.val().dtype());
        let x = self.dropped_input(&x).unwrap_or(x);
        // The scale multiplies the rank-r intermediate, not the [.., out] result: the same
        // product (PEFT scales after B), one r/out-th of the element-wise work.
        cast_to((x.matmul(self.a.val().unsqueeze()) * self.scale).matmul(self.b.val().unsqueeze()), dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_is_exact() {
        let d: Vec<f32> = (0..35 * 70).map(|x| x as f32).collect();
        let t = transpose(&d, 35, 70);
        for r in 0..35 {
            for c in 0..70 {
                assert_eq!(t[c * 35 + r], d[r * 70 + c]);
            }
        }
    }

    #[test]
    fn quantizable_means_a_block_linear_weight() {
        assert!(quantizable("model.layers.3.self_attn.q_proj.weight", &[8, 8]));
        assert!(quantizable("model.layers.0.mlp.down_proj.weight", &[8, 8]));
        assert!(!quantizable("model.layers.0.mlp.down_proj.bias", &[8]));
        assert!(!quantizable("model.layers.0.input_layernorm.weight", &[8]));
        assert!(!quantizable("lm_head.weight", &[8, 8]));
        assert!(!quantizable("model.embed_tokens.weight", &[8, 8]));
        assert!(quantizable("model.layers.0.mlp.experts.3.up_proj.weight", &[8, 8]));
        assert!(quantizable("model.layers.1.block_sparse_moe.experts.0.w2.weight", &[8, 8]));
        assert!(!quantizable("model.layers.0.mlp.gate.weight", &[4, 8]));
        assert!(!quantizable("model.layers.0.block_sparse_moe.gate.weight", &[4, 8]));
    }
}
