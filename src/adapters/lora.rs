//! Activation-path LoRA: `y = x W + s · (x A) B` with `W` frozen, so no weight gradient of the
//! base is ever formed (burn's built-in LoRA materialises `W + BA`).

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::{DType, TensorData};

/// How new adapters are initialised, as PEFT's `init_lora_weights`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraInit {
    /// PEFT's `True`: A kaiming-uniform (U(±1/√in)), B zero: the adapted model starts as the base.
    #[default]
    Default,
    /// PEFT's `"gaussian"`: A ~ N(0, 1/r²) (std 1/r), B zero.
    Gaussian,
    /// PEFT's `False`: A and B both as `nn.Linear` initialises them (U(±1/√in), U(±1/√r)), so
    /// the adapter is not the identity from the start (for tests and experiments).
    Random,
}

impl LoraInit {
    /// The value of `init_lora_weights` in PEFT's adapter_config.json.
    pub fn peft_value(self) -> serde_json::Value {
        match self {
            LoraInit::Default => serde_json::Value::Bool(true),
            LoraInit::Gaussian => serde_json::Value::String("gaussian".into()),
            LoraInit::Random => serde_json::Value::Bool(false),
        }
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
}

impl<B: Backend> Lora<B> {
    /// Builds from PEFT-layout matrices (`a_peft: [r, in]`, `b_peft: [out, r]`, row-major).
    pub fn from_peft(a_peft: &[f32], b_peft: &[f32], r: usize, d_in: usize, d_out: usize, scale: f64, device: &B::Device) -> Self {
        let a = crate::model::weights::transpose(a_peft, r, d_in);
        let b = crate::model::weights::transpose(b_peft, d_out, r);
        // f32 whatever the compute dtype: the master weights the optimizer updates.
        Lora {
            a: Param::from_tensor(Tensor::from_data(TensorData::new(a, [d_in, r]), (device, DType::F32))),
            b: Param::from_tensor(Tensor::from_data(TensorData::new(b, [r, d_out]), (device, DType::F32))),
            scale,
            dropout: 0.0,
            training: false,
        }
    }

    /// PEFT's init (`kind`; by default A kaiming-uniform with a = √5, i.e. U(±1/√in), and B
    /// zero, so the adapted model starts equal to the base). `rng` is seeded before any adapter
    /// is created.
    pub fn init(d_in: usize, d_out: usize, r: usize, scale: f64, kind: LoraInit, rng: &mut impl rand::Rng, device: &B::Device) -> Self {
        let uniform = |n: usize, fan_in: usize, rng: &mut dyn rand::RngCore| -> Vec<f32> {
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n).map(|_| rand::Rng::random_range(rng, -bound..bound) as f32).collect()
        };
        let a_peft: Vec<f32> = match kind {
            LoraInit::Default | LoraInit::Random => uniform(r * d_in, d_in, rng),
            LoraInit::Gaussian => {
                // Box-Muller, std 1/r.
                let std = 1.0 / r as f64;
                (0..r * d_in)
                    .map(|_| {
                        let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random_range(0.0..1.0));
                        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
                    })
                    .collect()
            }
        };
        let b_peft = match kind {
            LoraInit::Random => uniform(d_out * r, r, rng),
            _ => vec![0f32; d_out * r],
        };
        let mut l = Self::from_peft(&a_peft, &b_peft, r, d_in, d_out, scale, device);
        l.a = Param::from_tensor(l.a.val().require_grad());
        l.b = Param::from_tensor(l.b.val().require_grad());
        l
    }

    /// A and B in PEFT's layout (`[r, in]`, `[out, r]`), row-major f32.
    pub fn to_peft(&self) -> (Vec<f32>, Vec<f32>) {
        let [d_in, r] = self.a.dims();
        let [_, d_out] = self.b.dims();
        let a: Vec<f32> = self.a.val().into_data().convert::<f32>().to_vec().expect("f32");
        let b: Vec<f32> = self.b.val().into_data().convert::<f32>().to_vec().expect("f32");
        (crate::model::weights::transpose(&a, d_in, r), crate::model::weights::transpose(&b, r, d_out))
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

    /// The adapter's input: `x` after dropout while training, `None` when that is `x` itself.
    /// Inverted dropout from the backend's seeded RNG (as torch.nn.Dropout).
    pub fn dropped_input<const D: usize>(&self, x: &Tensor<B, D>) -> Option<Tensor<B, D>> {
        (self.training && self.dropout > 0.0).then(|| {
            let keep = x.random_like(burn::tensor::Distribution::Bernoulli(1.0 - self.dropout));
            x.clone() * keep / (1.0 - self.dropout)
        })
    }

    /// The adapter's contribution `s · (x A) B`.
    ///
    /// # Shapes
    /// `x: [..., in]` → `[..., out]`
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = self.dropped_input(&x).unwrap_or(x);
        let (a, b) = self.weights_in(x.dtype());
        // The scale multiplies the rank-r intermediate, not the [.., out] result: the same
        // product (PEFT scales after B), one r/out-th of the element-wise work.
        (x.matmul(a.unsqueeze()) * self.scale).matmul(b.unsqueeze())
    }
}
