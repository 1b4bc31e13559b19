//! ft's GPU code paths, run without a GPU: burn's wgpu backend on a Vulkan driver (in CI, Mesa's
//! lavapipe on the CPU) goes through the same generic CubeCL code as CUDA. Here: the NF4 kernel's
//! glue (ft-kernels launched on an `Nf4Weight`'s buffers) against bitsandbytes' oracle values and
//! the CPU path; the QLoRA linear map's forward and input gradient; every oracle architecture's
//! logits against transformers; the decoder's operations as single autodiff nodes, with the
//! chunked attention against the plain composition; and LoRA / QLoRA training steps (with and without gradient
//! checkpointing) against the same steps on the CPU; DPO log-probs (adapters off as the reference),
//! loss and metrics against TRL.
//!
//! `cargo test --features wgpu --test gpu_paths` (`.ci/run` runs it). Built with `--features cuda`
//! instead, the same tests run on CUDA, plus the bf16 kernel output (WGSL has no bf16):
//! `scripts/gpu-check.sh` runs that binary on the GPU machine.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::{FloatDType, TensorData};
use ft::adapters::peft::PeftAdapter;
use ft::backend::{Cpu, Kernels, Nf4Linear, TrainBackend};
use ft::data::conversation::read_jsonl;
use ft::data::encode::encode_conversation;
use ft::model::Decoder;
use ft::tokenizer::{TemplateChoice, TextTokenizer};
use ft::train::optim::AdamW;
use ft::train::sft::{sft_loss_with, MicroBatch};
use ft::train::step::{train_step, trainable_params};
use ft::quant::nf4::{Nf4, BLOCKSIZE};
use ft::quant::tensor::Nf4Weight;

/// The GPU backend under test (f32 compute).
#[cfg(feature = "wgpu")]
type Gpu = burn::backend::Wgpu;
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
type Gpu = ft::backend::CudaF32;

/// The shared test helpers (`tests/it/common.rs`); not every one is used here.
#[path = "it/common.rs"]
#[allow(dead_code)]
mod common;

use common::{ids, json, logits, max_abs_diff, read_f32};

/// The fixtures, after setting up the CUDA runtime where it is the backend under test.
fn fixtures() -> std::path::PathBuf {
    #[cfg(feature = "cuda")]
    ft::backend::init_cuda_runtime();
    common::fixtures()
}

fn load<B: Kernels>(name: &str) -> Decoder<B> {
    fixtures();
    common::load_on(name)
}

fn nf4_oracle() -> std::path::PathBuf {
    fixtures().join("nf4/bnb_nf4.safetensors")
}

fn bits<B: Backend>(t: Tensor<B, 2>) -> Vec<u32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn chat_ids() -> Vec<Vec<u32>> {
    json(&fixtures().join("chat_tokens.json")).as_array().unwrap().iter().map(|c| ids(&c["input_ids"])).collect()
}

#[test]
fn nf4_kernel_gives_bitsandbytes_values_bit_for_bit() {
    let gpu = Default::default();
    for i in 0..3 {
        let (x, shape) = read_f32(&nf4_oracle(), &format!("input_{i}"));
        let (rows, cols) = (shape[0], shape[1]);
        for double in [false, true] {
            let q = Nf4::quantize(&x, BLOCKSIZE, double);
            let got = bits(Gpu::nf4_dequantize(&Nf4Weight::<Gpu>::new(&q, rows, cols, &gpu), FloatDType::F32));
            let cpu = bits(Cpu::nf4_dequantize(&Nf4Weight::<Cpu>::new(&q, rows, cols, &Default::default()), FloatDType::F32));
            assert_eq!(got, cpu, "input_{i}, double quant {double}: kernel vs CPU");
            if cols % BLOCKSIZE == 0 {
                // bitsandbytes' own dequantized values (its CPU kernel indexes blocks by row when
                // cols is not a multiple of 64: tests/it/quant.rs).
                let (want, _) = read_f32(&nf4_oracle(), &format!("{}dequant_{i}", if double { "dq_" } else { "" }));
                assert_eq!(got, want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "input_{i}, double quant {double}: kernel vs bitsandbytes");
            }
        }
    }
}

#[test]
fn qlora_linear_forward_and_input_gradient_match_the_cpu() {
    type GpuAd = Autodiff<Gpu>;
    type Host = Autodiff<Cpu>;
    let (out, inp, rows) = (96, 320, 5);
    let w: Vec<f32> = (0..out * inp).map(|i| ((i * 7919 % 257) as f32 - 128.0) / 300.0).collect();
    let q = Nf4::quantize(&w, BLOCKSIZE, true);
    let x: Vec<f32> = (0..rows * inp).map(|i| ((i * 31 % 17) as f32 - 8.0) / 10.0).collect();
    let c: Vec<f32> = (0..rows * out).map(|i| (i % 7) as f32 - 3.0).collect();

    fn run<B: burn::tensor::backend::AutodiffBackend + Nf4Linear>(q: &Nf4, x: &[f32], c: &[f32], rows: usize, out: usize, inp: usize) -> (Vec<f32>, Vec<f32>) {
        let dev = Default::default();
        let x = Tensor::<B, 2>::from_data(TensorData::new(x.to_vec(), [rows, inp]), &dev).require_grad();
        let c = Tensor::<B, 2>::from_data(TensorData::new(c.to_vec(), [rows, out]), &dev);
        let y = B::nf4_linear(x.clone(), &Nf4Weight::new(q, out, inp, &dev));
        let g = (y.clone() * c).sum().backward();
        let gx = x.grad(&g).unwrap().into_data().to_vec().unwrap();
        (y.into_data().to_vec().unwrap(), gx)
    }
    let (y_gpu, g_gpu) = run::<GpuAd>(&q, &x, &c, rows, out, inp);
    let (y_cpu, g_cpu) = run::<Host>(&q, &x, &c, rows, out, inp);
    for (name, a, b) in [("y", &y_gpu, &y_cpu), ("dx", &g_gpu, &g_cpu)] {
        let worst = a.iter().zip(b.iter()).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0f32, f32::max);
        assert!(worst <= 1e-5, "{name}: GPU path differs from the CPU by {worst}");
    }
}

#[test]
fn the_decoder_operations_run_as_single_nodes_with_chunked_attention() {
    use burn::tensor::{Bool, Distribution};
    use ft::backend::FusedOps;
    use ft::ops::{composed, reference};
    type GpuAd = Autodiff<Gpu>;
    let dev = Default::default();
    // Each operation is one node with its own backward (not burn's chain of tensor ops, which
    // keeps the [B, H, T, S] scores for the backward).
    let t2 = |m: usize, n: usize| Tensor::<GpuAd, 2>::random([m, n], Distribution::Normal(0.0, 1.0), &dev);
    let t4 = |s: [usize; 4]| Tensor::<GpuAd, 4>::random(s, Distribution::Normal(0.0, 1.0), &dev);
    let causal = |t: usize| Tensor::<GpuAd, 2, Bool>::tril_mask([t, t], 0, &dev).reshape([1, t, t]);
    let (cos, sin) = (Tensor::<GpuAd, 3>::ones([1, 2, 4], &dev), Tensor::<GpuAd, 3>::zeros([1, 2, 4], &dev));
    assert!(GpuAd::rms_norm_fused(t2(2, 4), Tensor::ones([4], &dev), 1e-5).is_some());
    assert!(GpuAd::rope_fused(t4([1, 2, 1, 4]), cos, sin, false).is_some());
    assert!(GpuAd::swiglu_fused(t2(2, 4), t2(2, 4)).is_some());
    assert!(GpuAd::attention_fused(t4([1, 2, 2, 4]), t4([1, 2, 1, 4]), t4([1, 2, 1, 4]), causal(2), 0.5).is_some());

    // The chunked attention on this backend, three query rows per chunk (so chunks see different
    // numbers of keys), against the plain composition's values and autodiff gradients.
    let (b, t, h, kv, hd) = (2, 11, 6, 2, 16);
    let (q, k, v) = (t4([b, t, h, hd]).inner(), t4([b, t, kv, hd]).inner(), t4([b, t, kv, hd]).inner());
    let c = t4([b, t, h, hd]).inner();
    let leaf = |x: &Tensor<Gpu, 4>| Tensor::<GpuAd, 4>::from_inner(x.clone()).require_grad();
    let (ql, kl, vl) = (leaf(&q), leaf(&k), leaf(&v));
    let y = reference::attention(ql.clone(), kl.clone(), vl.clone(), causal(t), 0.25);
    let g = (y.clone() * Tensor::from_inner(c.clone())).sum().backward();
    let want = [y.inner(), ql.grad(&g).unwrap(), kl.grad(&g).unwrap(), vl.grad(&g).unwrap()];
    let budget = 3 * b * h * t;
    let (o, lse) = composed::attention(q.clone(), k.clone(), v.clone(), causal(t).inner(), 0.25, budget);
    let (dq, dk, dv) = composed::attention_backward(q, k, v, o.clone(), lse, causal(t).inner(), 0.25, c, budget);
    for (name, got, want) in [("output", o, &want[0]), ("dq", dq, &want[1]), ("dk", dk, &want[2]), ("dv", dv, &want[3])] {
        let (got, want): (Vec<f32>, Vec<f32>) = (got.into_data().to_vec().unwrap(), want.clone().into_data().to_vec().unwrap());
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0f32, f32::max);
        assert!(worst <= 2e-5, "chunked attention {name}: differs by {worst}");
    }
}

#[test]
fn decoder_logits_match_transformers() {
    for name in ["llama", "llama3-rope-tied-bf16", "qwen2", "qwen3", "mistral"] {
        let model = load::<Gpu>(name);
        let expected = fixtures().join("models").join(name).join("expected_logits.safetensors");
        for (i, ids) in chat_ids().iter().enumerate() {
            let (want, _) = read_f32(&expected, &format!("logits_{i}"));
            let d = max_abs_diff(&logits(&model, ids), &want);
            assert!(d <= 1e-4, "{name} case {i}: max abs diff {d}");
        }
    }
    // The NF4 base (bitsandbytes checkpoint) through the kernel: the CPU path's logits.
    let (gpu, cpu) = (load::<Gpu>("llama-bnb4"), load::<Cpu>("llama-bnb4"));
    for ids in chat_ids() {
        let d = max_abs_diff(&logits(&gpu, &ids), &logits(&cpu, &ids));
        assert!(d <= 1e-5, "llama-bnb4: max abs diff {d}");
    }
}

/// Losses, gradient norms and final adapter values of three LoRA SFT steps (PEFT's lora-r4 adapter as the
/// start, so both A and B get gradients) over the chat fixture in two micro-batches.
fn lora_steps<B: TrainBackend>(model: &str, recompute: bool) -> (Vec<f64>, Vec<f64>, Vec<Vec<f32>>) {
    let mut m = load::<B>(model);
    PeftAdapter::open(&fixtures().join("adapters/lora-r4")).unwrap().attach(&mut m).unwrap();
    let tok = TextTokenizer::from_dir(&fixtures().join("models").join(model)).unwrap();
    let template = tok.template(TemplateChoice::Chatml).unwrap();
    let enc: Vec<_> = read_jsonl(&fixtures().join("chat.jsonl")).unwrap().iter().map(|c| encode_conversation(&tok, &template, &c.messages).unwrap()).collect();
    let half = enc.len() / 2;
    let batches = [MicroBatch::new(&enc[..half].iter().collect::<Vec<_>>()), MicroBatch::new(&enc[half..].iter().collect::<Vec<_>>())];
    let norm: usize = batches.iter().map(|b| b.trainable()).sum();
    let mut opt = AdamW::new(&trainable_params(&mut m), 0.01);
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (loss, norm) = train_step(
            &mut m,
            &mut opt,
            batches.len(),
            |m, fwd, k| sft_loss_with(m, &batches[k], norm as f64, &mut |ids, seg| fwd.hidden(m, ids, seg)).0,
            1e-3,
            1.0,
            recompute,
        );
        losses.push(loss);
        norms.push(norm);
    }
    let params = trainable_params(&mut m);
    assert!(params.iter().all(|t| t.dtype() == burn::tensor::DType::F32), "LoRA master weights stay f32 whatever the compute dtype");
    let params = params.into_iter().map(|t| t.into_data().convert::<f32>().to_vec().unwrap()).collect();
    (losses, norms, params)
}

#[test]
fn lora_and_qlora_training_steps_match_the_cpu() {
    for (model, recompute) in [("llama", false), ("llama", true), ("llama-bnb4", false)] {
        let (gpu_losses, gpu_norms, gpu) = lora_steps::<Autodiff<Gpu>>(model, recompute);
        let (cpu_losses, cpu_norms, cpu) = lora_steps::<Autodiff<Cpu>>(model, recompute);
        for (a, b) in gpu_losses.iter().zip(&cpu_losses) {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{model} (recompute {recompute}): losses {gpu_losses:?} vs {cpu_losses:?}");
        }
        // The global gradient norm (before clipping) of each step.
        for (a, b) in gpu_norms.iter().zip(&cpu_norms) {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{model} (recompute {recompute}): grad norms {gpu_norms:?} vs {cpu_norms:?}");
        }
        assert!(cpu_losses[2] < cpu_losses[0], "{model}: the loss falls: {cpu_losses:?}");
        let worst = gpu.iter().flatten().zip(cpu.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        // AdamW's first steps move each value by about lr = 1e-3 whatever its gradient's size, so
        // a small gradient's rounding shows at lr scale: 5% of one step.
        eprintln!("{model} (recompute {recompute}): losses {gpu_losses:?}, grad norms {gpu_norms:?} vs {cpu_norms:?}, adapter values within {worst}");
        assert!(worst <= 5e-5, "{model} (recompute {recompute}): adapter values differ by {worst}");
    }
}

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
    assert_eq!(ft::train::scalar(t), x as f64);
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

/// bf16 output (CUDA only): each value is the f32 product rounded once to bf16 (what
/// bitsandbytes' bf16 dequantization writes).
#[cfg(feature = "cuda")]
#[test]
fn nf4_kernel_bf16_output_is_the_rounded_f32_product() {
    type Bf16 = ft::backend::CudaBf16;
    for i in 0..3 {
        let (x, shape) = read_f32(&nf4_oracle(), &format!("input_{i}"));
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

/// DPO scoring on the GPU path: PEFT's lora-r4 over the llama oracle as the policy, the same model
/// with adapters off as the reference; TRL's per-pair log-probs (≤ 1e-4), sigmoid loss and metrics.
#[test]
fn dpo_scores_match_trl() {
    use ft::train::dpo::{prepare_pairs, score_pairs, DpoConfig};
    let want = json(&fixtures().join("dpo/expected.json"));
    let mut m = load::<Gpu>("llama");
    PeftAdapter::open(&fixtures().join("adapters/lora-r4")).unwrap().attach(&mut m).unwrap();
    let tok = TextTokenizer::from_dir(&fixtures().join("models/llama")).unwrap();
    let template = tok.template(TemplateChoice::Chatml).unwrap();
    let (pairs, dropped, _) = prepare_pairs(&tok, &template, &fixtures().join("dpo/prefs.jsonl"), 4096, None, None).unwrap();
    assert_eq!(dropped, 0);
    let scores = score_pairs(&mut m, &pairs, None);
    let expected = want["pairs"].as_array().unwrap();
    assert_eq!(scores.len(), expected.len());
    for (i, (s, w)) in scores.iter().zip(expected).enumerate() {
        for (side, got) in [("chosen", s.chosen), ("rejected", s.rejected)] {
            assert_eq!(got.tokens as u64, w[side]["tokens"].as_u64().unwrap(), "pair {i} {side} tokens");
            for (k, g) in [("logp_policy", got.policy), ("logp_ref", got.reference)] {
                let e = w[side][k].as_f64().unwrap();
                assert!((g - e).abs() <= 1e-4, "pair {i} {side} {k}: {g} vs {e}");
            }
        }
    }
    let cfg = DpoConfig { beta: want["beta"].as_f64().unwrap(), ..DpoConfig::default() };
    let loss = scores.iter().map(|p| cfg.pair_loss(p)).sum::<f64>() / scores.len() as f64;
    let w = want["loss"]["sigmoid"].as_f64().unwrap();
    assert!((loss - w).abs() <= 1e-5 * w, "sigmoid loss {loss} vs {w}");
    let metrics = cfg.metrics(&scores, "");
    for (k, w) in want["metrics"].as_object().unwrap() {
        let (g, w) = (metrics[k].as_f64().unwrap_or_else(|| panic!("no {k}")), w.as_f64().unwrap());
        // As in tests/it/dpo.rs: rewards are β × differences of log-prob sums held to 1e-4.
        let tol = (1e-5 * w.abs()).max(if k.starts_with("rewards/") { cfg.beta * 1e-4 } else { 1e-5 * w.abs() });
        assert!((g - w).abs() <= tol, "{k}: {g} vs {w}");
    }
}

#[test]
fn half_precision_dpo_scores_and_gradients() {
    // DPO's completion log-probs are f32 sums of f32 token log-probs beside half-precision
    // activations; the loss is differentiable through them into the f32 adapter weights.
    use ft::train::dpo::{policy_logps, prepare_pairs, score_pairs, DpoConfig};
    let want = json(&fixtures().join("dpo/expected.json"));
    let mut m = load::<Autodiff<Half>>("llama");
    assert!(matches!(m.embed_tokens.val().dtype(), burn::tensor::DType::F16 | burn::tensor::DType::BF16), "the model computes in half precision");
    PeftAdapter::open(&fixtures().join("adapters/lora-r4")).unwrap().attach(&mut m).unwrap();
    let tok = TextTokenizer::from_dir(&fixtures().join("models/llama")).unwrap();
    let template = tok.template(TemplateChoice::Chatml).unwrap();
    let (pairs, _, _) = prepare_pairs(&tok, &template, &fixtures().join("dpo/prefs.jsonl"), 4096, None, None).unwrap();
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
        if let Some(l) = &p.lora {
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
        let summary = ft::train::run::run::<Autodiff<Half>>(&recipe, Default::default(), true, false).unwrap();
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
        // The adapter loads back as a PEFT adapter.
        let mut m = load::<Cpu>("llama");
        PeftAdapter::open(&d.join("run/adapter")).unwrap().attach(&mut m).unwrap();
        std::fs::remove_dir_all(&d).ok();
    }
}
