//! ft's GPU code paths in half precision (f16 on wgpu, whose WGSL has no bf16; bf16 on CUDA),
//! run without a GPU like `gpu_paths.rs` (its own process: burn keeps one default dtype per
//! device per process). The f32 pieces (softmax and norm statistics, token log-probs, NF4
//! absmax, LoRA master weights and AdamW state, losses read back) sit beside half-precision
//! tensors: LoRA, QLoRA and gradient-checkpointed SFT steps against the f32 CPU run, DPO scores and
//! gradients, `ft train`'s whole loop, and (CUDA) the NF4 kernel's bf16 output.
//!
//! `cargo test --features wgpu --test gpu_half`; `scripts/gpu-check.sh` runs the CUDA build.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::TensorData;
use ft::adapters::peft::PeftAdapter;
use ft::backend::Cpu;
use ft::data::tokenizer::{TemplateChoice, TextTokenizer};

#[path = "it/common.rs"]
#[allow(dead_code)]
mod common;

#[path = "gpu/shared.rs"]
#[allow(dead_code)]
mod shared;

use common::{json, prepare_options};
use shared::{fixtures, load, lora_steps};
#[cfg(feature = "cuda")]
use shared::nf4_oracle;

/// The GPU backend computing in half precision: f16 on wgpu (WGSL has no bf16), bf16 on CUDA.
#[cfg(feature = "wgpu")]
type Half = burn::backend::Wgpu<half::f16, i32, u32>;
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
type Half = ft::backend::CudaBf16;

#[test]
fn half_precision_training_steps_track_the_cpu() {
    // The half-precision backend runs the f32 pieces (softmax and RMSNorm statistics, token
    // log-probs, NF4 absmax, LoRA master weights) beside half-precision tensors: every cast
    // between them must be in place, or the backend mixes dtypes in one operation.
    // Losses and norms are read back in f32 (burn's `into_scalar` would round them to f16/bf16).
    let x = 1.0001f32;
    let t = Tensor::<Half, 1>::from_data(TensorData::new(vec![x], [1]), (&Default::default(), burn::tensor::DType::F32));
    assert_eq!(ft::loss::scalar(t), x as f64);
    for (model, recompute) in [("llama", false), ("llama", true), ("llama-bnb4", false)] {
        let (half_losses, half_norms, _) = lora_steps::<Autodiff<Half>>(model, recompute);
        let (cpu_losses, cpu_norms, _) = lora_steps::<Autodiff<Cpu>>(model, recompute);
        // NaN counts as infinitely far (f64::max would drop it).
        let rel = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs()).map(|d| if d.is_nan() { f64::INFINITY } else { d }).fold(0f64, f64::max);
        let (dl, dn) = (rel(&half_losses, &cpu_losses), rel(&half_norms, &cpu_norms));
        eprintln!("{model} (recompute {recompute}): half-precision losses {half_losses:?} vs {cpu_losses:?} ({dl:.2e}), grad norms ({dn:.2e})");
        // Seen on lavapipe in f16: losses 3e-6, grad norms 4e-4. bf16 keeps 3 fewer mantissa bits.
        let (tl, tn) = if cfg!(feature = "wgpu") { (1e-4, 5e-3) } else { (1e-2, 5e-2) };
        assert!(dl <= tl && dn <= tn, "{model} (recompute {recompute}): losses differ by {dl:.2e}, grad norms by {dn:.2e}");
    }
}

#[test]
fn dropout_seeds_keep_48_bits_in_half_precision() {
    // Drawn in f32 whatever the compute dtype: distinct per RNG seed, spread over 48 bits (an f16
    // draw of up to 2^24 overflowed to inf: the same seed, the same masks, for every run).
    let device = Default::default();
    let seeds: Vec<u64> = (0..4)
        .map(|s| {
            <Half as burn::tensor::backend::Backend>::seed(&device, 1000 + s);
            ft::train::recompute::dropout_seed::<Half>(&device)
        })
        .collect();
    assert!(seeds.iter().all(|&s| s < 1 << 48 && s >> 24 > 0), "{seeds:x?}");
    let mut distinct = seeds.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), seeds.len(), "{seeds:x?}");
    // Low bits carry entropy too (bf16 kept 8 of each draw's 24).
    assert!(seeds.iter().any(|s| s & 0xffff != 0), "{seeds:x?}");
}

/// bf16 output (CUDA only): each value is the f32 product rounded once to bf16 (what
/// bitsandbytes' bf16 dequantization writes).
#[cfg(feature = "cuda")]
#[test]
fn nf4_kernel_bf16_output_is_the_rounded_f32_product() {
    use burn::tensor::FloatDType;
    use ft::ops::Nf4Linear;
    use ft::quant::nf4::{Nf4, BLOCKSIZE};
    use ft::quant::nf4_weight::Nf4Weight;
    type Bf16 = ft::backend::CudaBf16;
    for i in 0..3 {
        let (x, shape) = common::read_f32(&nf4_oracle(), &format!("input_{i}"));
        let (rows, cols) = (shape[0], shape[1]);
        let q = Nf4::quantize(&x, BLOCKSIZE, true);
        let got: Vec<u16> = Bf16::nf4_dequantize(&Nf4Weight::<Bf16>::new(&q, rows, cols, &Default::default()), FloatDType::BF16)
            .into_data()
            .to_vec::<half::bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let want: Vec<u16> = q.dequantize().iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        assert_eq!(got, want, "input_{i}");
    }
}

#[test]
fn half_precision_dpo_scores_and_gradients() {
    // DPO's completion log-probs are f32 sums of f32 token log-probs beside half-precision
    // activations; the loss is differentiable through them into the f32 adapter weights.
    use ft::loss::dpo::{policy_logps, score_pairs, DpoConfig};
    let want = json(&fixtures().join("dpo/expected.json"));
    let mut m = load::<Autodiff<Half>>("llama");
    assert!(matches!(m.embed_weight().dtype(), burn::tensor::DType::F16 | burn::tensor::DType::BF16), "the model computes in half precision");
    PeftAdapter::open(&fixtures().join("adapters/lora-r4")).unwrap().attach(&mut m).unwrap();
    let tok = TextTokenizer::from_dir(&fixtures().join("models/llama")).unwrap();
    let template = tok.template(TemplateChoice::Chatml).unwrap();
    let (pairs, _, _) = ft::data::prepare::pairs(&tok, &template, &fixtures().join("dpo/prefs.jsonl"), &prepare_options(4096)).unwrap();
    let scores = score_pairs(&mut m, &pairs, None);
    let expected = want["pairs"].as_array().unwrap();
    let mut worst = 0f64;
    for (s, w) in scores.iter().zip(expected) {
        for (side, got) in [("chosen", s.chosen), ("rejected", s.rejected)] {
            for (k, g) in [("logp_policy", got.policy), ("logp_ref", got.reference)] {
                let e = w[side][k].as_f64().unwrap();
                worst = worst.max((g - e).abs() / e.abs().max(1.0));
            }
        }
    }
    eprintln!("half-precision DPO log-probs within {worst:.2e} (relative) of TRL's f32 ones");
    // Seen on lavapipe in f16: 2e-5. bf16 keeps 3 fewer mantissa bits.
    let tol = if cfg!(feature = "wgpu") { 1e-3 } else { 1e-2 };
    assert!(worst <= tol, "half-precision DPO log-probs differ from TRL's by {worst}");
    let refs: Vec<&_> = pairs.iter().collect();
    let ((chosen, _), (rejected, _)) = policy_logps(&m, &refs);
    assert_eq!(chosen.dtype(), burn::tensor::DType::F32);
    let loss = DpoConfig::default().loss_tensor(chosen, rejected, &scores).sum();
    let grads = loss.backward();
    for (name, p) in m.projections_mut() {
        if let Some(l) = p.lora() {
            let g = l.a.val().grad(&grads).unwrap_or_else(|| panic!("{name}: no gradient for A"));
            assert_eq!(g.dtype(), burn::tensor::DType::F32, "{name}");
            let v: Vec<f32> = g.into_data().to_vec().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{name}: non-finite gradient");
        }
    }
}

/// `ft train`'s whole loop (`train::run::run`: data, adapters, steps, eval, checkpoints, the
/// written adapter) on the half-precision backend, for SFT with LoRA and with QLoRA and for DPO.
#[test]
fn half_precision_sft_and_dpo_runs_end_to_end() {
    use ft::train::recipe::Recipe;
    fixtures();
    for (name, method, data, extra) in [
        ("sft", "sft", "chat.jsonl", ""),
        ("qlora", "sft", "chat.jsonl", "quantize = \"nf4\"\n"),
        ("dpo", "dpo", "dpo/prefs.jsonl", ""),
    ] {
        let d = common::scratch(&format!("gpu-half-{name}"));
        let data = fixtures().join(data);
        let r = d.join("recipe.toml");
        std::fs::write(
            &r,
            format!(
                "[model]\npath = \"{}\"\n{extra}[data]\ntrain = \"{}\"\neval = \"{}\"\ntemplate = \"chatml\"\n[lora]\nr = 4\nalpha = 8\n\
                 [train]\nmethod = \"{method}\"\nmax_steps = 6\nmicro_batch_size = 2\nlr = 1e-2\nseed = 3\nsave_every = 3\n[output]\ndir = \"{}\"\n",
                common::model_dir("llama").display(),
                data.display(),
                data.display(),
                d.join("run").display()
            ),
        )
        .unwrap();
        let recipe = Recipe::load(&r, &[]).unwrap();
        let summary = ft::train::run::run::<Autodiff<Half>>(&recipe, Default::default(), &ft::progress::Silent, false).unwrap();
        let losses: Vec<f64> = std::fs::read_to_string(d.join("run/metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
            .collect();
        eprintln!("{name}: half-precision losses {losses:?}, eval loss {:?}", summary.eval_loss);
        assert_eq!(losses.len(), 6, "{name}");
        assert!(losses.iter().all(|l| l.is_finite()), "{name}: {losses:?}");
        assert!(losses[5] < losses[0], "{name}: the loss falls: {losses:?}");
        if method == "dpo" {
            assert!((losses[0] - std::f64::consts::LN_2).abs() < 1e-3, "DPO starts at ln 2: {}", losses[0]);
        }
        assert!(summary.eval_loss.is_some_and(f64::is_finite), "{name}: eval loss {:?}", summary.eval_loss);
        // The frozen base as it sits in memory: 2 bytes per weight in half precision (it was
        // reported as 4 whatever the dtype), NF4's 4 bits plus block statistics.
        let per = summary.base_bytes_per_parameter;
        if name == "qlora" {
            assert!(per > 0.5 && per < 0.6, "{name}: {per} bytes per parameter");
        } else {
            assert_eq!(per, 2.0, "{name}");
        }
        // The kernels ran, and never their fallback (counts for the whole process so far).
        let used = |k: &str| summary.gpu_kernels.iter().find(|u| u.name == k).cloned();
        for k in ["masked_softmax", "softmax_grad"].into_iter().chain((name == "qlora").then_some("nf4_dequantize")) {
            let u = used(k).unwrap_or_else(|| panic!("{name}: no {k} in the summary's gpu_kernels {:?}", summary.gpu_kernels));
            assert!(u.kernel > 0 && u.fallback == 0, "{name}: {u:?}");
        }
        // The adapter loads back as a PEFT adapter.
        let mut m = load::<Cpu>("llama");
        PeftAdapter::open(&d.join("run/adapter")).unwrap().attach(&mut m).unwrap();
        std::fs::remove_dir_all(&d).ok();
    }
}

/// Gradients of a projection's adapter tensors (A, B, and DoRA's magnitude) after
/// `sum(forward(x) · c)`, with a dense or an NF4 base of `w` (PyTorch layout).
#[allow(clippy::too_many_arguments)]
fn adapter_grads<B: burn::tensor::backend::AutodiffBackend + ft::ops::Kernels>(
    w: &[f32],
    x: &[f32],
    c: &[f32],
    (a, b, magnitude): (&[f32], &[f32], Option<&[f32]>),
    (n, d_in, d_out, r): (usize, usize, usize, usize),
    nf4: bool,
) -> Vec<Vec<f32>> {
    use ft::model::projection::{Adapter, Base, Dora, Lora, Projection};
    let dev = Default::default();
    let mut p = Projection::<B>::dense(w, d_in, d_out, &dev);
    if nf4 {
        let q = ft::quant::nf4::Nf4::quantize(w, ft::quant::nf4::BLOCKSIZE, true);
        p.base = Base::Nf4(ft::quant::nf4_weight::Nf4Weight::new(&q, d_out, d_in, &dev));
    }
    let lora = Lora::from_peft(a, b, r, d_in, d_out, 2.0, &dev);
    p.adapter = Some(match magnitude {
        Some(m) => Adapter::Dora(Dora::new(lora, m, &dev)),
        None => Adapter::Lora(lora),
    });
    let x = Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), [n, d_in]), &dev);
    let c = Tensor::<B, 2>::from_data(TensorData::new(c.to_vec(), [n, d_out]), &dev);
    let g = (p.forward(x) * c).cast(burn::tensor::DType::F32).sum().backward();
    p.adapter.as_ref().unwrap().tensors().iter().map(|t| t.val().grad(&g).unwrap().into_data().convert::<f32>().to_vec::<f32>().unwrap()).collect()
}

#[test]
fn adapter_gradients_are_f32_products_of_the_half_precision_activations() {
    // PEFT without autocast: the LoRA / DoRA branch computes in its f32 master weights' dtype on
    // the activations cast up, so A's and B's gradients are f32 GEMMs of f32 operands, never
    // rounded to the compute dtype. The CPU reference computes in f32 from the same (half-rounded)
    // inputs; these gradients do not depend on the rounded base output, so only f32 summation
    // order separates them (~1e-6; rounding them to f16 would give ~5e-4, to bf16 ~4e-3).
    let (n, d_in, d_out, r) = (64, 48, 40, 4);
    let vals = |k: usize, seed: u64| -> Vec<f32> {
        let mut s = seed;
        (0..k)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    };
    #[cfg(feature = "wgpu")]
    let round = |v: Vec<f32>| v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect::<Vec<_>>();
    #[cfg(not(feature = "wgpu"))]
    let round = |v: Vec<f32>| v.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect::<Vec<_>>();
    let (w, x, c) = (round(vals(d_out * d_in, 1)), round(vals(n * d_in, 2)), round(vals(n * d_out, 3)));
    let (a, b) = (vals(r * d_in, 4), vals(d_out * r, 5));
    let magnitude: Vec<f32> = vals(d_out, 6).iter().map(|m| m.abs() + 0.5).collect();
    let dims = (n, d_in, d_out, r);
    for (what, m, nf4) in [("LoRA", None, false), ("LoRA over NF4", None, true), ("DoRA", Some(magnitude.as_slice()), false)] {
        let half = adapter_grads::<Autodiff<Half>>(&w, &x, &c, (&a, &b, m), dims, nf4);
        let cpu = adapter_grads::<Autodiff<Cpu>>(&w, &x, &c, (&a, &b, m), dims, nf4);
        for (i, name) in ["A", "B"].iter().enumerate() {
            let scale = cpu[i].iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = half[i].iter().zip(&cpu[i]).map(|(h, c)| if h.is_nan() { f32::INFINITY } else { (h - c).abs() / scale }).fold(0f32, f32::max);
            eprintln!("{what}: d{name} within {worst:.1e} of the f32 CPU (relative to its largest)");
            assert!(worst <= 1e-5, "{what}: d{name} differs by {worst:.2e} relative: not an f32 product");
        }
    }
}
