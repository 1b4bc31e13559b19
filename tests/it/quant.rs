//! NF4: bit-exact with bitsandbytes on the oracle vectors (packed bytes, absmax, double
//! quantization, dequantized values); bitsandbytes 4-bit checkpoints load and give transformers'
//! logits; `ft quantize` writes that checkpoint's tensors byte for byte.

use ft::quant::dynamic::dynamic_map;
use ft::quant::nf4::{Absmax, Nf4, BLOCKSIZE, NF4_CODE};

use super::common::*;

fn raw(path: &std::path::Path, name: &str) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name).unwrap_or_else(|_| panic!("{name}")).data().to_vec()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn f32s(b: &[u8]) -> Vec<u32> {
    b.chunks(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn nf4_matches_bitsandbytes_bit_for_bit() {
    let f = fixtures().join("nf4/bnb_nf4.safetensors");
    assert_eq!(bits(&NF4_CODE), f32s(&raw(&f, "nf4_code")));
    for i in 0..3 {
        let (x, _) = read_f32(&f, &format!("input_{i}"));
        let plain = Nf4::quantize(&x, BLOCKSIZE, false);
        assert_eq!(plain.packed, raw(&f, &format!("packed_{i}")), "packed_{i}");
        let Absmax::Plain(a) = &plain.absmax else { panic!() };
        assert_eq!(bits(a), f32s(&raw(&f, &format!("absmax_{i}"))), "absmax_{i}");
        // bitsandbytes' CUDA semantics (flat absmax indexing) for every shape, including the
        // 96×160 and 7×352 inputs whose rows are not a multiple of 64 wide (oracle README, "NF4 fix").
        assert_eq!(bits(&plain.dequantize()), f32s(&raw(&f, &format!("dequant_{i}"))), "dequant_{i}");

        let dq = Nf4::quantize(&x, BLOCKSIZE, true);
        assert_eq!(dq.packed, raw(&f, &format!("dq_packed_{i}")), "dq_packed_{i}");
        let Absmax::Double(d) = &dq.absmax else { panic!() };
        assert_eq!(bits(&[d.offset]), f32s(&raw(&f, &format!("dq_offset_{i}"))), "dq_offset_{i}");
        assert_eq!(d.codes, raw(&f, &format!("dq_absmax_u8_{i}")), "dq_absmax_u8_{i}");
        assert_eq!(bits(&d.nested_absmax), f32s(&raw(&f, &format!("dq_nested_absmax_{i}"))), "dq_nested_absmax_{i}");
        assert_eq!(bits(&dynamic_map()), f32s(&raw(&f, &format!("dq_nested_code_{i}"))), "dq_nested_code_{i}");
        assert_eq!(bits(&dq.dequantize()), f32s(&raw(&f, &format!("dq_dequant_{i}"))), "dq_dequant_{i}");
    }
}

/// `dir` with every 4-bit weight replaced by f32 values from `dequant(nf4, rows, cols)`.
fn dense_copy(dir: &std::path::Path, out: &std::path::Path, dequant: impl Fn(&Nf4, usize, usize) -> Vec<f32>) {
    use ft::formats::bnb;
    std::fs::create_dir_all(out).unwrap();
    let ck = ft::formats::safetensors::TensorFiles::open(dir).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for name in ck.names().map(String::from).collect::<Vec<_>>() {
        if bnb::is_quantized(&ck, &name) {
            let state: serde_json::Value = serde_json::from_slice(ck.raw(&format!("{name}.quant_state.bitsandbytes__nf4")).unwrap().0).unwrap();
            let shape: Vec<usize> = state["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let q = bnb::read(&ck, &name, &shape).unwrap();
            let w = dequant(&q, shape[0], shape[1]);
            tensors.push((name, shape, bytemuck::cast_slice(&w).to_vec()));
        } else if !name.contains(".weight.") {
            let (bytes, _, shape, _) = ck.raw(&name).unwrap();
            tensors.push((name, shape, bytes.to_vec()));
        }
    }
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    let mut cfg = json(&dir.join("config.json"));
    cfg.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.join(f), out.join(f)).unwrap();
    }
}

#[test]
fn bitsandbytes_checkpoint_loads_and_matches_transformers() {
    let dir = model_dir("llama-bnb4");
    let cases = json(&fixtures().join("chat_tokens.json"));
    let expected = dir.join("expected_logits.safetensors");
    // ft's loader gives transformers' logits (bitsandbytes' CUDA semantics: flat absmax blocks,
    // also for the tiny model's 96-wide down_proj).
    let model = load("llama-bnb4");
    for (i, case) in cases.as_array().unwrap().iter().enumerate() {
        let ids = ids(&case["input_ids"]);
        let (want, _) = read_f32(&expected, &format!("logits_{i}"));
        let diff = max_abs_diff(&logits(&model, &ids), &want);
        assert!(diff <= 1e-4, "case {i}: max abs diff {diff}");
    }
    // And exactly the logits of a dense copy of its dequantized weights.
    let d = scratch("bnb4-flat");
    dense_copy(&dir, &d, |q, _, _| q.dequantize());
    let flat = ft::model::load::<ft::backend::Cpu>(&d, &Default::default(), Default::default()).unwrap();
    let ids = ids(&cases[0]["input_ids"]);
    assert_eq!(logits(&model, &ids), logits(&flat, &ids));
}

#[test]
fn ft_quantize_writes_the_bitsandbytes_checkpoint_byte_for_byte() {
    let d = scratch("quantize");
    let out = d.join("llama-nf4");
    let (c, stdout, err) = ft(&["quantize", "--model", model_dir("llama").to_str().unwrap(), "--out", out.to_str().unwrap(), "--json"]);
    assert_eq!(c, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["quantized"], 14);
    let want_bytes = std::fs::read(model_dir("llama-bnb4").join("model.safetensors")).unwrap();
    let want = safetensors::SafeTensors::deserialize(&want_bytes).unwrap();
    let got_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let got = safetensors::SafeTensors::deserialize(&got_bytes).unwrap();
    let mut names: Vec<String> = want.names().into_iter().map(String::from).collect();
    names.sort();
    let mut got_names: Vec<String> = got.names().into_iter().map(String::from).collect();
    got_names.sort();
    assert_eq!(got_names, names);
    for n in &names {
        let (g, w) = (got.tensor(n).unwrap(), want.tensor(n).unwrap());
        assert_eq!((g.dtype(), g.shape()), (w.dtype(), w.shape()), "{n}");
        assert!(g.data() == w.data(), "{n}: bytes differ");
    }
    let cfg = json(&out.join("config.json"));
    let want_cfg = json(&model_dir("llama-bnb4").join("config.json"));
    assert_eq!(cfg["quantization_config"], want_cfg["quantization_config"]);
    // The result loads (dequantized) like the transformers-written one.
    let a = ft::model::load::<ft::backend::Cpu>(&out, &Default::default(), Default::default()).unwrap();
    let b = load("llama-bnb4");
    let ids = [1u32, 5, 9, 200, 31];
    assert_eq!(logits(&a, &ids), logits(&b, &ids));
    // Quantizing twice is refused.
    let (c, _, err) = ft(&["quantize", "--model", out.to_str().unwrap(), "--out", d.join("again").to_str().unwrap()]);
    assert_ne!(c, 0);
    assert!(err.contains("already quantized"), "{err}");
}

fn train_losses(name: &str, model: &std::path::Path, quantize: bool) -> (Vec<f64>, serde_json::Value) {
    let d = scratch(name);
    let r = d.join("recipe.toml");
    std::fs::write(
        &r,
        format!(
            "[model]\npath = \"{}\"\n{}\n[data]\ntrain = \"{}\"\ntemplate = \"chatml\"\n[lora]\nr = 4\nalpha = 8\n[train]\nmax_steps = 10\nmicro_batch_size = 3\nlr = 1e-2\nseed = 9\n[output]\ndir = \"{}\"\n",
            model.display(),
            if quantize { "quantize = \"nf4\"" } else { "" },
            fixtures().join("chat.jsonl").display(),
            d.join("run").display()
        ),
    )
    .unwrap();
    let (c, out, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--json"]);
    assert_eq!(c, 0, "{err}");
    let losses = std::fs::read_to_string(d.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect();
    (losses, serde_json::from_str(&out).unwrap())
}

#[test]
fn qlora_trains_through_the_4bit_base() {
    // A 4-bit checkpoint trains with its weights held as NF4 codes ...
    let (q, summary) = train_losses("qlora-bnb4", &model_dir("llama-bnb4"), false);
    assert!(q.last().unwrap() < &(q[0] - 0.2), "QLoRA lowers the loss: {q:?}");
    let bpp = summary["base_bytes_per_parameter"].as_f64().unwrap();
    assert!(bpp > 0.5 && bpp < 0.57, "NF4 codes + f32 absmax: {bpp} bytes/parameter");
    // ... computing what LoRA computes on the same values held dense ...
    let dense = scratch("qlora-dense-copy").join("model");
    dense_copy(&model_dir("llama-bnb4"), &dense, |q, _, _| q.dequantize());
    let (l, summary) = train_losses("qlora-dense", &dense, false);
    assert_eq!(summary["base_bytes_per_parameter"].as_f64(), Some(4.0));
    for (a, b) in q.iter().zip(&l) {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "{q:?} vs {l:?}");
    }
    // ... and quantizing the f32 model while loading (`model.quantize = "nf4"`) is that checkpoint.
    let (on_the_fly, _) = train_losses("qlora-quantize", &model_dir("llama"), true);
    assert_eq!(on_the_fly, q);
}

#[test]
fn qlora_merges_into_what_training_saw() {
    let (_, bnb_run) = train_losses("qlora-merge-bnb4", &model_dir("llama-bnb4"), false);
    let (_, fly_run) = train_losses("qlora-merge-fly", &model_dir("llama"), true);
    let adapter = |s: &serde_json::Value| std::path::PathBuf::from(s["output_dir"].as_str().unwrap()).join("adapter");
    assert!(adapter(&fly_run).join("ft_quantized_base.json").exists());
    let d = scratch("qlora-merge-out");
    let merge = |model: &std::path::Path, adapter: &std::path::Path, out: &str, extra: &[&str]| {
        let out = d.join(out);
        let mut args = vec!["merge", "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (c, _, err) = ft(&args);
        assert_eq!(c, 0, "{err}");
        out
    };
    // Into the 4-bit checkpoint's dequantized weights: a plain f32 checkpoint whose logits are
    // those of the 4-bit base with the adapter.
    let m1 = merge(&model_dir("llama-bnb4"), &adapter(&bnb_run), "m1", &["--dtype", "f32"]);
    let cfg = json(&m1.join("config.json"));
    assert!(cfg.get("quantization_config").is_none());
    let merged = ft::model::load::<ft::backend::Cpu>(&m1, &Default::default(), Default::default()).unwrap();
    let mut with_adapter = load("llama-bnb4");
    ft::adapters::peft::PeftAdapter::open(&adapter(&bnb_run)).unwrap().attach(&mut with_adapter).unwrap();
    let ids = [1u32, 87, 491, 201, 57, 9, 300];
    let diff = max_abs_diff(&logits(&merged, &ids), &logits(&with_adapter, &ids));
    assert!(diff <= 1e-4, "merged vs base + adapter: {diff}");
    // A run that quantized the f32 model on load merges into the same NF4 values by default ...
    let m2 = merge(&model_dir("llama"), &adapter(&fly_run), "m2", &["--dtype", "f32"]);
    assert!(std::fs::read(m1.join("model.safetensors")).unwrap() == std::fs::read(m2.join("model.safetensors")).unwrap());
    // ... into the full-precision base with --base, and writes bf16 when not told otherwise.
    let m3 = merge(&model_dir("llama"), &adapter(&fly_run), "m3", &["--base", model_dir("llama").to_str().unwrap(), "--dtype", "f32"]);
    assert!(std::fs::read(m3.join("model.safetensors")).unwrap() != std::fs::read(m2.join("model.safetensors")).unwrap());
    let m4 = merge(&model_dir("llama-bnb4"), &adapter(&bnb_run), "m4", &[]);
    let (w, _) = read_f32(&m4.join("model.safetensors"), "model.layers.0.mlp.down_proj.weight");
    let bytes = std::fs::read(m4.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("model.layers.0.mlp.down_proj.weight").unwrap().dtype(), safetensors::Dtype::BF16);
    assert_eq!(w.len(), 64 * 96);
}

#[test]
fn ft_quantize_handles_sharded_checkpoints() {
    // qwen2: 4 shards, q/k/v biases, tied embeddings.
    let d = scratch("quantize-sharded");
    let out = d.join("qwen2-nf4");
    let (c, _, err) = ft(&["quantize", "--model", model_dir("qwen2").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(c, 0, "{err}");
    let index = json(&out.join("model.safetensors.index.json"));
    let map = index["weight_map"].as_object().unwrap();
    for (name, file) in map {
        let path = out.join(file.as_str().unwrap());
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.tensor(name).is_ok(), "{name} not in {}", path.display());
    }
    assert!(map.contains_key("model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"));
    assert!(map.contains_key("model.layers.0.self_attn.q_proj.bias"), "biases stay as they are");
    // It loads 4-bit, and scores the chat data about as the f32 model does.
    let dense = load("qwen2");
    let q = ft::model::load::<ft::backend::Cpu>(&out, &Default::default(), Default::default()).unwrap();
    let tok = ft::data::tokenizer::TextTokenizer::from_dir(&out).unwrap();
    let template = tok.template(ft::data::tokenizer::TemplateChoice::Chatml).unwrap();
    let data = ft::data::conversation::read_jsonl(&fixtures().join("chat.jsonl")).unwrap();
    let a = ft::eval::evaluate(&dense, &tok, &template, &data, None).unwrap().loss;
    let b = ft::eval::evaluate(&q, &tok, &template, &data, None).unwrap().loss;
    assert!((a - b).abs() < 0.05 && a != b, "f32 {a} vs NF4 {b}");
}
