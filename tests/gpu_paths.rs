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
use ft::backend::Cpu;
use ft::ops::Nf4Linear;
use ft::data::tokenizer::{TemplateChoice, TextTokenizer};
use ft::quant::nf4::{Nf4, BLOCKSIZE};
use ft::quant::nf4_weight::Nf4Weight;

/// The GPU backend under test (f32 compute).
#[cfg(feature = "wgpu")]
type Gpu = burn::backend::Wgpu;
#[cfg(all(feature = "cuda", not(feature = "wgpu")))]
type Gpu = ft::backend::CudaF32;

/// The shared test helpers (`tests/it/common.rs`); not every one is used here.
#[path = "it/common.rs"]
#[allow(dead_code)]
mod common;

#[path = "gpu/shared.rs"]
mod shared;

use common::{ids, json, logits, max_abs_diff, prepare_options, read_f32};
use shared::{fixtures, load, lora_steps, nf4_oracle};

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
            // bitsandbytes' own dequantized values (CUDA semantics: flat absmax blocks, every shape).
            let (want, _) = read_f32(&nf4_oracle(), &format!("{}dequant_{i}", if double { "dq_" } else { "" }));
            assert_eq!(got, want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "input_{i}, double quant {double}: kernel vs bitsandbytes");
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
    use ft::ops::FusedOps;
    use ft::ops::{chunked, reference};
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
    assert!(GpuAd::attention_fused(t4([1, 2, 2, 4]), t4([1, 2, 1, 4]), t4([1, 2, 1, 4]), causal(2), ft::ops::Scores::scaled(0.5)).is_some());

    // The chunked attention on this backend (its row kernels), three query rows per chunk (so
    // chunks see different numbers of keys), against the plain composition's values and autodiff
    // gradients: a causal mask shared by the batch, and per-row packing masks.
    let (b, t, h, kv, hd) = (2, 11, 6, 2, 16);
    let mut packed = vec![true; b * t * t];
    for (row, segs) in [vec![4, 5, 2], vec![11]].iter().enumerate() {
        let mut start = 0;
        for &len in segs {
            for q in 0..len {
                for k in 0..=q {
                    packed[row * t * t + (start + q) * t + start + k] = false;
                }
            }
            start += len;
        }
    }
    let packed = Tensor::<GpuAd, 3, Bool>::from_data(TensorData::new(packed, [b, t, t]), &dev);
    for (what, mask) in [("causal", causal(t)), ("packed", packed)] {
        let (q, k, v) = (t4([b, t, h, hd]).inner(), t4([b, t, kv, hd]).inner(), t4([b, t, kv, hd]).inner());
        let c = t4([b, t, h, hd]).inner();
        let leaf = |x: &Tensor<Gpu, 4>| Tensor::<GpuAd, 4>::from_inner(x.clone()).require_grad();
        let (ql, kl, vl) = (leaf(&q), leaf(&k), leaf(&v));
        let y = reference::attention(ql.clone(), kl.clone(), vl.clone(), mask.clone(), 0.25);
        let g = (y.clone() * Tensor::from_inner(c.clone())).sum().backward();
        let want = [y.inner(), ql.grad(&g).unwrap(), kl.grad(&g).unwrap(), vl.grad(&g).unwrap()];
        let budget = 3 * b * h * t;
        let (o, lse) = chunked::attention(q.clone(), k.clone(), v.clone(), mask.clone().inner(), ft::ops::Scores::scaled(0.25), budget);
        let (dq, dk, dv) = chunked::attention_backward(q, k, v, o.clone(), lse, mask.inner(), ft::ops::Scores::scaled(0.25), c, budget);
        for (name, got, want) in [("output", o, &want[0]), ("dq", dq, &want[1]), ("dk", dk, &want[2]), ("dv", dv, &want[3])] {
            let (got, want): (Vec<f32>, Vec<f32>) = (got.into_data().to_vec().unwrap(), want.clone().into_data().to_vec().unwrap());
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0f32, f32::max);
            assert!(worst <= 2e-5, "chunked attention, {what} mask, {name}: differs by {worst}");
        }
    }
}

/// The attention row kernels' uses so far: (kernel, fallback) for the forward and the backward.
fn row_kernel_uses() -> [(u64, u64); 2] {
    let uses = ft::ops::kernel_use::snapshot();
    let get = |name: &str| uses.iter().find(|u| u.name == name).map_or((0, 0), |u| (u.kernel, u.fallback));
    [get("masked_softmax"), get("softmax_grad")]
}

#[test]
fn attention_row_kernels_read_pitched_and_sliced_scores() {
    use burn::tensor::{Bool, Distribution};
    use ft::ops::{chunked, Geometry, ScoreRows};
    let dev = Default::default();
    // The buffer alignment a slice must keep to stay a view (burn copies otherwise).
    let wide0 = Tensor::<Gpu, 1>::zeros([1], &dev).into_primitive().tensor();
    let align = (wide0.client.properties().memory.alignment as usize / 4).max(1);
    let before = row_kernel_uses();
    // T = 511, 512, 2048 keys; the scores a column window of wider rows (a pitch, and an offset),
    // as cubecl-cuda's 512-byte row pitch and a narrowed view lay them out; the mask per batch
    // element and pitched too; lse / delta narrowed views of longer rows.
    let (b, kv, rep, hd) = (2, 2, 3, 16);
    for (keys, chunk, t0, off) in [(511, 5, 300, 0), (512, 4, 508, align), (2048, 2, 2040, align)] {
        let g = Geometry { b, t: keys, s: keys, h: kv * rep, kv, hd, chunk };
        let rows = t0..t0 + chunk;
        let n = rep * chunk;
        // Rows of `off + keys + align` elements: the window ends a whole alignment before the row.
        let pad = off + align;
        let window = |x: Tensor<Gpu, 4>| x.slice([0..b, 0..kv, 0..n, off..off + keys]);
        let wide = |seed: f64| Tensor::<Gpu, 4>::random([b, kv, n, keys + pad], Distribution::Normal(seed, 2.0), &dev);
        let (raw, dp) = (window(wide(0.0)), window(wide(0.5)));
        let mask_wide = Tensor::<Gpu, 3>::random([b, keys, keys + 4 * align], Distribution::Uniform(0.0, 1.0), &dev).lower_elem(0.3);
        let mask: Tensor<Gpu, 3, Bool> = mask_wide.slice([0..b, 0..keys, 0..keys]);
        #[cfg(feature = "wgpu")]
        {
            let p = raw.clone().into_primitive().tensor();
            assert!(!p.is_contiguous(), "T = {keys}: the test's scores must be a strided view (strides {:?})", p.meta.strides());
        }
        let (p_kernel, lse_kernel) = Gpu::masked_softmax(&g, raw.clone(), &mask, &rows, 0.25);
        let (p_ops, lse_ops) = chunked::masked_softmax_ops(&g, raw.clone(), &mask, &rows, 0.25);
        let stats = |x: Tensor<Gpu, 3>| Tensor::cat(vec![x, Tensor::zeros([b, kv, 2 * align], &dev)], 2).slice([0..b, 0..kv, 0..n]);
        let delta = stats(Tensor::random([b, kv, n], Distribution::Normal(0.0, 1.0), &dev));
        let (gp_kernel, ds_kernel) = Gpu::softmax_grad(&g, raw.clone(), dp.clone(), &mask, &rows, stats(lse_ops.clone()), delta.clone(), 0.25);
        let (gp_ops, ds_ops) = chunked::softmax_grad_ops(&g, raw, dp, &mask, &rows, lse_ops.clone(), delta, 0.25);
        // (A NaN anywhere counts as an infinite difference.)
        let diff = |a: Tensor<Gpu, 3>, b: Tensor<Gpu, 3>| {
            let (a, b) = (a.into_data().to_vec::<f32>().unwrap(), b.into_data().to_vec::<f32>().unwrap());
            a.iter().zip(&b).map(|(x, y)| if x.is_nan() || y.is_nan() { f32::INFINITY } else { (x - y).abs() }).fold(0.0, f32::max)
        };
        let flat = |x: Tensor<Gpu, 4>| x.reshape([b, kv * n, keys]);
        for (name, got, want) in [("probs", p_kernel, p_ops), ("backward probs", gp_kernel, gp_ops), ("score grads", ds_kernel, ds_ops)] {
            let d = diff(flat(got), flat(want));
            assert!(d <= 1e-6, "T = {keys}: {name} differ from the tensor ops by {d}");
        }
        let d = diff(lse_kernel, lse_ops.clamp_min(-3.0e38));
        assert!(d <= 1e-5, "T = {keys}: log-sum-exp differs from the tensor ops by {d}");
    }
    // Every call above ran the kernels: none fell back (other tests running at the same time
    // only add kernel runs: every chunk they make is readable too).
    let after = row_kernel_uses();
    for (i, name) in ["masked_softmax", "softmax_grad"].iter().enumerate() {
        assert!(after[i].0 >= before[i].0 + 3, "{name}: {} kernel runs before, {} after", before[i].0, after[i].0);
        assert_eq!(after[i].1, 0, "{name} fell back to tensor ops");
    }
}

/// Runs the test `name` of this binary alone in a child process with `key=value` set (tests that
/// need the process to themselves: its peak memory, the device's random generator, a device
/// thread that does not survive), and returns its output.
fn in_child(name: &str, key: &str, value: &std::ffi::OsStr) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(key, value)
        .output()
        .unwrap()
}

/// `VmRSS` and `VmHWM` (peak) of this process, bytes.
fn rss_and_peak() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = |key: &str| status.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse::<u64>().unwrap() * 1024;
    (kib("VmRSS:"), kib("VmHWM:"))
}

/// The child of [`loading_holds_about_one_tensor_of_host_memory`]: loads the bf16 checkpoint in
/// `dir` onto the GPU backend and prints its resident memory before, at the peak and after.
fn load_memory_child(dir: &std::path::Path) {
    let dev = Default::default();
    // The device and its runtime first (their own memory is not the loader's).
    let _ = Tensor::<Gpu, 1>::ones([4], &dev).sum().into_data();
    // Restart the peak (Linux: "5" to clear_refs resets VmHWM). Where that is not allowed the
    // peak also covers start-up, which is below what the loaded model keeps resident.
    if std::fs::write("/proc/self/clear_refs", "5").is_err() {
        eprintln!("cannot reset the peak RSS (/proc/self/clear_refs): measuring from start-up");
    }
    let (before, _) = rss_and_peak();
    let model = ft::model::load::<Gpu>(dir, &dev, Default::default()).unwrap();
    Gpu::sync(&dev).unwrap();
    let (after, peak) = rss_and_peak();
    drop(model);
    println!("LOAD_MEMORY {}", serde_json::json!({"before": before, "peak": peak, "after": after}));
}

#[test]
fn loading_holds_about_one_tensor_of_host_memory() {
    // A bf16 checkpoint of 50M parameters whose largest tensor (the embeddings) is an eighth of
    // it, loaded in a child process (this one runs other tests at the same time) onto the GPU
    // backend. Loading must hold about one tensor at a time on the host beyond what stays
    // resident (on lavapipe the device memory is host memory too): not the copy of every weight
    // that burn's CubeCL runtimes keep until a flush.
    if let Some(dir) = std::env::var_os("FT_LOAD_MEMORY_CHILD") {
        return load_memory_child(std::path::Path::new(&dir));
    }
    let dir = common::scratch("load-memory");
    let (h, inter, layers, heads, kv, hd, vocab) = (768usize, 2048usize, 6usize, 12usize, 4usize, 64usize, 8000usize);
    let mut config = json(&common::model_dir("llama").join("config.json"));
    for (k, v) in [("hidden_size", h), ("intermediate_size", inter), ("num_hidden_layers", layers), ("num_attention_heads", heads), ("num_key_value_heads", kv), ("head_dim", hd), ("vocab_size", vocab)] {
        config[k] = v.into();
    }
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![vocab, h]), ("lm_head.weight".into(), vec![vocab, h]), ("model.norm.weight".into(), vec![h])];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (n, s) in [
            ("self_attn.q_proj", vec![heads * hd, h]),
            ("self_attn.k_proj", vec![kv * hd, h]),
            ("self_attn.v_proj", vec![kv * hd, h]),
            ("self_attn.o_proj", vec![h, heads * hd]),
            ("mlp.gate_proj", vec![inter, h]),
            ("mlp.up_proj", vec![inter, h]),
            ("mlp.down_proj", vec![h, inter]),
            ("input_layernorm", vec![h]),
            ("post_attention_layernorm", vec![h]),
        ] {
            shapes.push((format!("{p}.{n}.weight"), s));
        }
    }
    let mut seed = 7u32;
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(n, s)| {
            let data = (0..s.iter().product::<usize>())
                .flat_map(|_| {
                    seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    half::bf16::from_f32(((seed >> 8) as f32 / (1 << 24) as f32 - 0.5) * 0.04).to_le_bytes()
                })
                .collect();
            (n, s, data)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        bytes.iter().map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, s.clone(), d).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let params: usize = bytes.iter().map(|(_, s, _)| s.iter().product::<usize>()).sum();
    let largest = 4 * vocab * h;
    drop(bytes);

    let out = in_child("loading_holds_about_one_tensor_of_host_memory", "FT_LOAD_MEMORY_CHILD", dir.as_os_str());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.split_once("LOAD_MEMORY ").map(|(_, j)| j)).unwrap_or_else(|| panic!("child: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    let m: serde_json::Value = serde_json::from_str(line).unwrap();
    let (before, peak, after) = (m["before"].as_u64().unwrap(), m["peak"].as_u64().unwrap(), m["after"].as_u64().unwrap());
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let transient = peak - after;
    eprintln!(
        "loading {params} parameters ({:.0} MiB in f32, largest tensor {:.0} MiB): RSS {:.0} → {:.0} MiB, peak {:.0} MiB: {:.0} MiB above what stays",
        mib(4 * params as u64),
        mib(largest as u64),
        mib(before),
        mib(after),
        mib(peak),
        mib(transient)
    );
    // Measured on lavapipe: 25 MiB with the flushes, 124 MiB without (wgpu submits its staged
    // writes every 64 tensors; cubecl-cuda holds them until a kernel launch: all of them).
    assert!(transient <= 2 * largest as u64 + (16 << 20), "loading held {:.0} MiB beyond what stays resident; the largest tensor is {:.0} MiB", mib(transient), mib(largest as u64));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn gpu_training_is_reproducible_and_resumes_bit_identically() {
    // Two runs of one recipe on the GPU backend give the same adapter bytes, and a run resumed
    // from its step-3 checkpoint ends on them too: every reduction that steers the updates (the
    // gradient norm and clipping) adds in a fixed order (`ops::SumAll`; on CUDA burn's `sum`
    // adds with atomics), dropout seeds and data order come from the seed. In a process of its
    // own: the device's random generator is one per process, and tests running beside this one
    // draw from it too (a training process is alone with it).
    if std::env::var_os("FT_REPRO_CHILD").is_none() {
        let out = in_child("gpu_training_is_reproducible_and_resumes_bit_identically", "FT_REPRO_CHILD", "1".as_ref());
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && stdout.contains("1 passed"), "the child run failed:\n{stdout}\n{stderr}");
        return;
    }
    use ft::train::recipe::Recipe;
    let write = |name: &str| {
        let d = common::scratch(&format!("gpu-repro-{name}"));
        let data = fixtures().join("chat.jsonl");
        let r = d.join("recipe.toml");
        std::fs::write(
            &r,
            format!(
                "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\ntemplate = \"chatml\"\n[lora]\nr = 4\nalpha = 8\ndropout = 0.1\n\
                 [train]\nmax_steps = 6\nmicro_batch_size = 2\nlr = 1e-2\nmax_grad_norm = 0.05\nseed = 5\nsave_every = 3\n[output]\ndir = \"{}\"\n",
                common::model_dir("llama").display(),
                data.display(),
                d.join("run").display()
            ),
        )
        .unwrap();
        (d, Recipe::load(&r, &[]).unwrap())
    };
    let train = |recipe: &Recipe, resume: bool| ft::train::run::run::<Autodiff<Gpu>>(recipe, Default::default(), &ft::progress::Silent, resume).unwrap();
    let bytes = |d: &std::path::Path| std::fs::read(d.join("run/adapter/adapter_model.safetensors")).unwrap();
    let ((a, ra), (b, rb)) = (write("a"), write("b"));
    let sa = train(&ra, false);
    train(&rb, false);
    assert!(bytes(&a) == bytes(&b), "two runs of one recipe differ");
    // Back to the step-3 checkpoint: the finished run's adapter and summary removed, resumed.
    let finished = bytes(&a);
    std::fs::remove_dir_all(a.join("run/adapter")).unwrap();
    std::fs::remove_file(a.join("run/summary.json")).unwrap();
    assert!(a.join("run/checkpoint-3").is_dir());
    train(&ra, true);
    assert!(bytes(&a) == finished, "the run resumed from step 3 differs");
    // Clipping was active (so the norm's last bits mattered).
    let norms: Vec<f64> = std::fs::read_to_string(a.join("run/metrics.jsonl")).unwrap().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["grad_norm"].as_f64()).collect();
    assert!(norms.iter().all(|n| *n > 0.05), "max_grad_norm 0.05 clips every step: {norms:?} ({})", sa.final_loss);
    for d in [a, b] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn decoder_logits_match_transformers() {
    // The 2026 families too: Gemma 2's softcapped scores and sliding windows through the chunked
    // composition (which skips keys outside the window), Gemma 3's two ropes, Phi-3's partial
    // rotary, SmolLM3's layers without RoPE, and the experts of Qwen3-MoE and Mixtral.
    for name in ["llama", "llama3-rope-tied-bf16", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "smollm3", "mistral-swa", "qwen3-moe", "mixtral"] {
        let model = load::<Gpu>(name);
        assert_eq!(model.embed_weight().dtype(), burn::tensor::DType::F32, "this process computes in f32 (see gpu/shared.rs)");
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

/// DPO scoring on the GPU path: PEFT's lora-r4 over the llama oracle as the policy, the same model
/// with adapters off as the reference; TRL's per-pair log-probs (≤ 1e-4), sigmoid loss and metrics.
#[test]
fn dpo_scores_match_trl() {
    use ft::loss::dpo::{score_pairs, DpoConfig};
    let want = json(&fixtures().join("dpo/expected.json"));
    let mut m = load::<Gpu>("llama");
    PeftAdapter::open(&fixtures().join("adapters/lora-r4")).unwrap().attach(&mut m).unwrap();
    let tok = TextTokenizer::from_dir(&fixtures().join("models/llama")).unwrap();
    let template = tok.template(TemplateChoice::Chatml).unwrap();
    let (pairs, dropped, _) = ft::data::prepare::pairs(&tok, &template, &fixtures().join("dpo/prefs.jsonl"), &prepare_options(4096)).unwrap();
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


#[cfg(feature = "wgpu")]
#[test]
fn a_failed_gpu_allocation_is_an_out_of_memory_error_naming_the_size() {
    // cubecl refuses a 12 GiB buffer on its device thread (a panic there: "can't allocate buffer
    // of size: N"); ft's hook turns it into its error and exit 1 from whichever thread. In a child
    // process: the device thread does not survive it.
    if std::env::var_os("FT_OOM_CHILD").is_some() {
        ft::backend::install_out_of_memory_hook();
        let t = Tensor::<Gpu, 1>::zeros([3usize << 30], &Default::default());
        let _ = t.try_into_data();
        std::thread::sleep(std::time::Duration::from_secs(10));
        panic!("the allocation did not fail");
    }
    let out = in_child("a_failed_gpu_allocation_is_an_out_of_memory_error_naming_the_size", "FT_OOM_CHILD", "1".as_ref());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error: out of GPU memory: ft asked the device for 12884901888 bytes (12.00 GiB) more"), "{stderr}");
    assert!(stderr.contains("micro_batch_size") && !stderr.contains("panicked"), "{stderr}");
}
