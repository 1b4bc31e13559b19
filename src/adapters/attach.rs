//! New adapters on a model, initialised as PEFT does, and loaded adapters made trainable.

use burn::module::Param;
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::{LoraConfig, LoraInit, Targets};
use crate::model::projection::{normal, row_norms, Adapter, Dora, Full, Lora};
use crate::model::Decoder;
use crate::ops::TrainBackend;

/// New adapters that cannot be attached as configured.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("lora.target_modules {targets} matches no module of the model")]
    NoTargets { targets: String },
    #[error("lora: {0}")]
    Unsupported(String),
}

/// A new LoRA adapter `[d_in → r → d_out]` with PEFT's init (`kind`; by default A
/// kaiming-uniform with a = √5, i.e. U(±1/√in), and B zero, so the adapted model starts equal to
/// the base), trainable.
pub fn new_lora<B: Backend>(d_in: usize, d_out: usize, r: usize, scale: f64, kind: LoraInit, rng: &mut impl Rng, device: &B::Device) -> Lora<B> {
    let uniform = |n: usize, fan_in: usize, rng: &mut dyn rand::RngCore| -> Vec<f32> {
        let bound = 1.0 / (fan_in as f64).sqrt();
        (0..n).map(|_| rand::Rng::random_range(rng, -bound..bound) as f32).collect()
    };
    let a_peft: Vec<f32> = match kind {
        LoraInit::Default | LoraInit::Random | LoraInit::Pissa | LoraInit::PissaNiter(_) | LoraInit::Olora => uniform(r * d_in, d_in, rng),
        LoraInit::Gaussian => (0..r * d_in).map(|_| normal(rng, 1.0 / r as f64) as f32).collect(),
    };
    let b_peft = match kind {
        LoraInit::Random => uniform(d_out * r, r, rng),
        _ => vec![0f32; d_out * r],
    };
    let mut l = Lora::from_peft(&a_peft, &b_peft, r, d_in, d_out, scale, device);
    l.a = Param::from_tensor(l.a.val().require_grad());
    l.b = Param::from_tensor(l.b.val().require_grad());
    l
}

/// Attaches freshly initialised adapters to the projections `config` targets, in module order
/// from an RNG seeded with `seed` (the same seed gives the same adapters). Returns how many.
pub fn attach_new<B: TrainBackend>(model: &mut Decoder<B>, config: &LoraConfig, seed: u64) -> Result<usize, AttachError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let device = model.device();
    let mut n = 0;
    for (name, proj) in model.projections_mut() {
        if config.covers(&name) {
            let (d_in, d_out) = proj.dims();
            if crate::formats::peft::parameter_path(&name).is_some() && (config.use_dora || config.init.split().is_some() || config.dropout > 0.0) {
                // PEFT's ParamWrapper (how experts and routers are saved) refuses these too.
                return Err(AttachError::Unsupported(format!(
                    "{name} is an MoE expert or router, adapted as PEFT's target_parameters, which take neither use_dora, PiSSA/OLoRA init nor dropout > 0"
                )));
            }
            let (r, scale) = (config.rank_for(&name), config.scale_for(&name));
            if crate::formats::peft::is_embedding(&name) {
                // PEFT's embedding LoRA: A zero, B N(0, 1) (`lora_embedding_A/B`).
                let a = vec![0f32; r * d_in];
                let b: Vec<f32> = (0..d_out * r).map(|_| normal(&mut rng, 1.0) as f32).collect();
                let mut l = Lora::from_peft(&a, &b, r, d_in, d_out, scale, &device);
                l.a = Param::from_tensor(l.a.val().require_grad());
                l.b = Param::from_tensor(l.b.val().require_grad());
                proj.adapter = Some(Adapter::Lora(l));
                n += 1;
                continue;
            }
            let mut lora = if let Some(split) = config.init.split() {
                // PiSSA / OLoRA: a rank-r part of the base becomes the adapter, the base the residual.
                let (a0, b0, residual) = super::pissa::init(split, &proj.base_weight_peft(), d_out, d_in, r, scale, seed ^ hash(&name));
                proj.replace_base(&residual);
                let mut l = Lora::from_peft(&a0, &b0, r, d_in, d_out, scale, &device);
                l.a = Param::from_tensor(l.a.val().require_grad());
                l.b = Param::from_tensor(l.b.val().require_grad());
                l.initial = Some((a0, b0));
                l
            } else {
                new_lora(d_in, d_out, r, scale, config.init, &mut rng, &device)
            };
            lora.dropout = config.dropout;
            proj.adapter = Some(if config.use_dora {
                // PEFT: the magnitude starts as ‖W + s·B A‖ per row (B is zero: ‖W‖), so the
                // adapted model starts as the base.
                let (a, b) = lora.to_peft();
                let mut w = proj.base_weight_peft();
                crate::model::projection::add_lora_delta(&mut w, &a, &b, r, d_in, scale as f32);
                let mut d = Dora::new(lora, &row_norms(&w, d_in), &device);
                d.magnitude = Param::from_tensor(d.magnitude.val().require_grad());
                Adapter::Dora(d)
            } else {
                Adapter::Lora(lora)
            });
            n += 1;
        }
    }
    save_modules(model, config);
    if n == 0 {
        let targets = match &config.targets {
            Targets::Names(names) => format!("{names:?}"),
            Targets::Regex(re) => format!("{re:?}"),
            Targets::AllLinear => "[\"all-linear\"]".into(),
        };
        return Err(AttachError::NoTargets { targets });
    }
    Ok(n)
}

/// A stable hash of a module path (seeds per-module randomness independently of visiting order).
fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Gives each module `config` trains in full (`modules_to_save`) and that has no adapter yet a
/// trainable copy of its weight (a reward model's `score` head).
pub fn save_modules<B: TrainBackend>(model: &mut Decoder<B>, config: &LoraConfig) {
    for (name, proj) in model.projections_mut() {
        if config.saves(&name) && proj.adapter.is_none() {
            let mut full = Full { weight: Param::from_tensor(proj.base_tensor_f32()) };
            full.weight = Param::from_tensor(full.weight.val().require_grad());
            proj.adapter = Some(Adapter::Full(full));
        }
    }
}

/// Makes loaded adapters trainable (gradients on, dropout `dropout`).
pub fn make_trainable<B: TrainBackend>(model: &mut Decoder<B>, dropout: f64) {
    for (_, p) in model.projections_mut() {
        if let Some(a) = &mut p.adapter {
            for t in a.tensors_mut() {
                *t = Param::from_tensor(t.val().require_grad());
            }
        }
        if let Some(l) = p.adapter.as_mut().and_then(Adapter::lora_mut) {
            l.dropout = dropout;
        }
    }
}
