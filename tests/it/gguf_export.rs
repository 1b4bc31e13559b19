//! `ft export gguf` against llama.cpp: the header and every tensor's bytes as llama.cpp's own
//! converter writes them (tests/fixtures/gguf/converter, by scripts/make-gguf-fixtures.py), the
//! quantizers byte for byte against gguf-py and ggml (tests/fixtures/gguf/quants.safetensors),
//! and the round trip through `ft import-gguf` for every model family.

use std::path::{Path, PathBuf};

use ft::formats::gguf::reader::{GgufFile, Value};
use serde_json::Value as Json;
use sha2::Digest;

use super::common::*;

/// A copy of a fixture model in `dir`/tiny (the converter's fixtures were made from a directory
/// of that name); SmolLM3 with its no-RoPE layers where llama.cpp has them (every 4th).
fn model_copy(name: &str, dir: &Path) -> PathBuf {
    let dst = dir.join("tiny");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(model_dir(name)).unwrap() {
        let e = e.unwrap();
        if !e.file_name().to_string_lossy().starts_with("expected") {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    if name == "smollm3" {
        let mut cfg = json(&dst.join("config.json"));
        let n = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
        cfg["no_rope_layers"] = (0..n).map(|i| u8::from((i + 1) % 4 != 0)).collect::<Vec<_>>().into();
        std::fs::write(dst.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    }
    dst
}

fn export(model: &Path, out: &Path, ty: &str) {
    let (code, _, err) = ft(&["export", "gguf", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap(), "--type", ty]);
    assert_eq!(code, 0, "{err}");
}

/// `ft export gguf-lora` of `adapter` on `model` to `out`: (exit code, stderr).
fn export_lora(adapter: &Path, model: &Path, out: &Path) -> (i32, String) {
    let (code, _, err) = ft(&["export", "gguf-lora", "--adapter", adapter.to_str().unwrap(), "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    (code, err)
}

fn type_name(t: u32) -> &'static str {
    match t {
        0 => "UINT8",
        1 => "INT8",
        2 => "UINT16",
        3 => "INT16",
        4 => "UINT32",
        5 => "INT32",
        6 => "FLOAT32",
        7 => "BOOL",
        8 => "STRING",
        9 => "ARRAY",
        10 => "UINT64",
        11 => "INT64",
        12 => "FLOAT64",
        _ => "?",
    }
}

/// A metadata value the way the fixture records it (long or string arrays as count + SHA-256).
fn recorded(v: &Value) -> Json {
    let scalar = |v: &Value| match v {
        Value::U64(x) => Json::from(*x),
        Value::I64(x) => Json::from(*x),
        Value::F64(x) => Json::from(*x),
        Value::Bool(b) => Json::from(*b),
        Value::Str(s) => Json::from(s.clone()),
        Value::Array(_) => unreachable!("nested"),
    };
    match v {
        Value::Array(a) if a.first().and_then(Value::as_str).is_some() => {
            let joined = a.iter().map(|s| s.as_str().unwrap()).collect::<Vec<_>>().join("\n");
            serde_json::json!({"count": a.len(), "sha256": hex(&sha2::Sha256::digest(joined.as_bytes()))})
        }
        Value::Array(a) if a.len() > 64 => {
            // json.dumps of gguf-py's parts: one-element lists.
            let listed = format!("[{}]", a.iter().map(|x| format!("[{}]", scalar(x))).collect::<Vec<_>>().join(", "));
            serde_json::json!({"count": a.len(), "sha256": hex(&sha2::Sha256::digest(listed.as_bytes()))})
        }
        Value::Array(a) => Json::Array(a.iter().map(|x| Json::Array(vec![scalar(x)])).collect()),
        // gguf-py reads a scalar as a one-element array; strings as text.
        Value::Str(s) => Json::from(s.clone()),
        v => Json::Array(vec![scalar(v)]),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn values_equal(a: &Json, b: &Json) -> bool {
    match (a, b) {
        (Json::Number(x), Json::Number(y)) => (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() <= 1e-6 * y.as_f64().unwrap().abs().max(1.0),
        (Json::Array(x), Json::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| values_equal(p, q)),
        _ => a == b,
    }
}

/// Where ft's file differs from llama.cpp's converter on purpose: keys it adds, tensors whose
/// values it changes (Gemma's query scale folded in, because llama.cpp ignores
/// query_pre_attn_scalar).
fn expected_differences(name: &str) -> (&'static [&'static str], &'static [&'static str]) {
    match name {
        // llama.cpp's llama architecture ignores the window; ft records it for its importer.
        "mistral-swa" => (&["llama.attention.sliding_window"], &[]),
        "gemma2" => (&["gemma2.rope.freq_base"], &["blk.0.attn_q.weight", "blk.1.attn_q.weight"]),
        "gemma3" => (&["gemma3.attention.sliding_window_pattern"], &["blk.0.attn_q_norm.weight", "blk.1.attn_q_norm.weight"]),
        _ => (&[], &[]),
    }
}

/// Asserts that the GGUF at `out` is what llama.cpp's converter wrote for fixture `reference`
/// (tests/fixtures/gguf/converter), apart from `extra_keys` and the tensors in `changed`.
fn assert_matches_converter(out: &Path, reference: &str, extra_keys: &[&str], changed: &[&str]) {
    let g = GgufFile::open(out).unwrap();
    let reference_json = json(&fixtures().join(format!("gguf/converter/{reference}.json")));
    let name = reference;
    let meta = reference_json["metadata"].as_object().unwrap();
    for (key, want) in meta {
        if key == "general.name" {
            continue;
        }
        let got = g.get(key).unwrap_or_else(|| panic!("{name}: key {key} missing"));
        let types: Vec<&str> = g.value_types[key].iter().map(|&t| type_name(t)).collect();
        let want_types: Vec<&str> = want["types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(types, want_types, "{name}: {key} type");
        assert!(values_equal(&recorded(got), &want["value"]), "{name}: {key}: {:?} vs {}", recorded(got), want["value"]);
    }
    for key in g.metadata.keys() {
        assert!(meta.contains_key(key) || extra_keys.contains(&key.as_str()), "{name}: unexpected key {key}");
    }
    let want: Vec<&Json> = reference_json["tensors"].as_array().unwrap().iter().collect();
    assert_eq!(g.tensors.len(), want.len(), "{name}");
    for (t, w) in g.tensors.iter().zip(want) {
        assert_eq!(t.name, w["name"].as_str().unwrap(), "{name}: tensor order");
        assert_eq!(t.shape(), w["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect::<Vec<_>>(), "{name}: {}", t.name);
        assert_eq!(ft::formats::gguf::dequant::type_name(t.ggml_type), w["type"].as_str().unwrap(), "{name}: {}", t.name);
        let same = hex(&sha2::Sha256::digest(g.tensor_bytes(t).unwrap())) == w["sha256"].as_str().unwrap();
        assert_eq!(same, !changed.contains(&t.name.as_str()), "{name}: {} bytes {}", t.name, if same { "unchanged" } else { "differ" });
    }
}

#[test]
fn f32_export_is_what_llama_cpps_converter_writes() {
    for name in MODELS {
        let dir = scratch(&format!("gguf-conv-{name}"));
        let model = model_copy(name, &dir);
        let out = dir.join("m.gguf");
        export(&model, &out, "f32");
        let (extra_keys, changed) = expected_differences(name);
        assert_matches_converter(&out, name, extra_keys, changed);
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn gguf_lora_is_what_llama_cpps_lora_converter_writes() {
    for name in ["lora-r4", "embed-lora-r4"] {
        let dir = scratch(&format!("gguf-lora-conv-{name}"));
        let out = dir.join("a.gguf");
        let adapter = fixtures().join("adapters").join(name);
        let (code, err) = export_lora(&adapter, &model_dir("llama"), &out);
        assert_eq!(code, 0, "{err}");
        assert_matches_converter(&out, &format!("adapter-{name}"), &[], &[]);
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// Logits of every oracle chat case under `model`.
fn chat_logits(model: &ft::model::Decoder<ft::backend::Cpu>) -> Vec<f32> {
    let cases = json(&fixtures().join("chat_tokens.json"));
    cases.as_array().unwrap().iter().flat_map(|c| logits(model, &ids(&c["input_ids"]))).collect()
}

fn load_dir(dir: &Path) -> ft::model::Decoder<ft::backend::Cpu> {
    ft::model::load::<ft::backend::Cpu>(dir, &Default::default(), Default::default()).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
}

#[test]
fn every_family_round_trips_through_gguf_f32_within_1e_5() {
    for name in MODELS {
        let dir = scratch(&format!("gguf-rt-{name}"));
        let model = model_copy(name, &dir);
        let gguf = dir.join("m.gguf");
        export(&model, &gguf, "f32");
        let back = dir.join("back");
        let (code, _, err) = ft(&["import-gguf", gguf.to_str().unwrap(), "--out", back.to_str().unwrap()]);
        assert_eq!(code, 0, "{name}: {err}");
        let (a, b) = (chat_logits(&load_dir(&model)), chat_logits(&load_dir(&back)));
        let d = max_abs_diff(&a, &b);
        assert!(d <= 1e-5, "{name}: logits after export + import differ by {d}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// Imports `base` with the GGUF adapter `lora` merged in.
fn import_with_lora(base: &Path, lora: &Path, out: &Path) -> ft::model::Decoder<ft::backend::Cpu> {
    let (code, _, err) = ft(&["import-gguf", base.to_str().unwrap(), "--lora", lora.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    load_dir(out)
}

#[test]
fn gguf_lora_applied_to_the_base_gives_pefts_logits() {
    // The oracle adapters (PEFT's own files), exported as llama.cpp adapters and applied the way
    // llama.cpp applies them (alpha/r · B A on the permuted base), reproduce PEFT's logits.
    let dir = scratch("gguf-lora-peft");
    let base = dir.join("base.gguf");
    export(&model_dir("llama"), &base, "f32");
    let cases = json(&fixtures().join("chat_tokens.json"));
    for name in ["lora-r4", "rslora-r8-attn", "embed-lora-r4", "pissa-r4-converted"] {
        let adapter = fixtures().join("adapters").join(name);
        let lora = dir.join(format!("{name}.gguf"));
        let (code, err) = export_lora(&adapter, &model_dir("llama"), &lora);
        assert_eq!(code, 0, "{name}: {err}");
        let model = import_with_lora(&base, &lora, &dir.join(name));
        for (i, c) in cases.as_array().unwrap().iter().enumerate() {
            let (want, _) = read_f32(&adapter.join("expected_logits.safetensors"), &format!("logits_{i}"));
            let d = max_abs_diff(&logits(&model, &ids(&c["input_ids"])), &want);
            assert!(d <= 1e-4, "{name} case {i}: {d}");
        }
    }
    // What llama.cpp's adapters cannot hold is refused (exit 2), pointing at the merged export.
    for name in ["dora-r4", "modules-to-save-r4", "qwen3-moe-experts-r4"] {
        let model = if name.starts_with("qwen3") { "qwen3-moe" } else { "llama" };
        let adapter = fixtures().join("adapters").join(name);
        let (code, err) = export_lora(&adapter, &model_dir(model), &dir.join("x.gguf"));
        assert_eq!(code, 2, "{name}: {err}");
        assert!(err.contains("ft export gguf --model"), "{name}: {err}");
    }
    assert!(!dir.join("x.gguf").exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// A PEFT adapter with noise in A and B on every linear of `name` (rank 4; rsLoRA, or a rank
/// pattern, to exercise llama.cpp's single alpha).
fn random_adapter(name: &str, out: &Path, rslora: bool) {
    let c = ft::model::ModelConfig::from_dir(&model_dir(name)).unwrap();
    let (h, qd, kvd, i) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let mods: Vec<(&str, usize, usize)> = if c.fused_projections {
        vec![("self_attn.qkv_proj", h, qd + 2 * kvd), ("self_attn.o_proj", qd, h), ("mlp.gate_up_proj", h, 2 * i), ("mlp.down_proj", i, h)]
    } else {
        vec![("self_attn.q_proj", h, qd), ("self_attn.k_proj", h, kvd), ("self_attn.v_proj", h, kvd), ("self_attn.o_proj", qd, h), ("mlp.gate_proj", h, i), ("mlp.up_proj", h, i), ("mlp.down_proj", i, h)]
    };
    let mut seed = 12345u64;
    let mut noise = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * s
            })
            .collect()
    };
    let mut tensors: ft::formats::safetensors::RawTensors = Vec::new();
    for l in 0..c.num_layers {
        for (m, din, dout) in &mods {
            // Layer 1's v_proj gets rank 8 through rank_pattern (when not rsLoRA).
            let r = if !rslora && l == 1 && *m == "self_attn.v_proj" { 8 } else { 4 };
            let p = format!("base_model.model.model.layers.{l}.{m}");
            let enc = |v: &[f32]| ft::formats::safetensors::encode(v, safetensors::Dtype::F32);
            tensors.push((format!("{p}.lora_A.weight"), safetensors::Dtype::F32, vec![r, *din], enc(&noise(r * din, 0.5))));
            tensors.push((format!("{p}.lora_B.weight"), safetensors::Dtype::F32, vec![*dout, r], enc(&noise(dout * r, 0.5))));
        }
    }
    let targets: Vec<&str> = mods.iter().map(|(m, _, _)| m.rsplit('.').next().unwrap()).collect();
    let mut config = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": targets,
        "use_rslora": rslora, "lora_dropout": 0.0, "bias": "none", "base_model_name_or_path": name,
    });
    if !rslora {
        config["rank_pattern"] = serde_json::json!({"model.layers.1.self_attn.v_proj": 8});
        config["alpha_pattern"] = serde_json::json!({"model.layers.0.mlp.down_proj": 3});
    }
    ft::formats::peft::write(out, &tensors, &config, None).unwrap();
}

#[test]
fn gguf_lora_round_trips_on_every_dense_family() {
    // ft applying the PEFT adapter = the base GGUF with the exported GGUF adapter merged as
    // llama.cpp merges it: q/k permutation of B, rsLoRA and per-module scales folded into
    // llama.cpp's one alpha, Gemma 2's query scale, Phi-3's fused projections.
    for (name, rslora) in [("llama", true), ("qwen2", false), ("qwen3", true), ("gemma2", false), ("gemma3", true), ("phi3", false), ("mistral", false)] {
        let dir = scratch(&format!("gguf-lora-rt-{name}"));
        let adapter = dir.join("adapter");
        random_adapter(name, &adapter, rslora);
        let mut with_adapter = load(name);
        ft::adapters::peft::PeftAdapter::open(&adapter).unwrap().attach(&mut with_adapter).unwrap();
        let (base, lora) = (dir.join("base.gguf"), dir.join("lora.gguf"));
        export(&model_dir(name), &base, "f32");
        let (code, err) = export_lora(&adapter, &model_dir(name), &lora);
        assert_eq!(code, 0, "{name}: {err}");
        let merged = import_with_lora(&base, &lora, &dir.join("merged"));
        let d = max_abs_diff(&chat_logits(&with_adapter), &chat_logits(&merged));
        assert!(d <= 1e-4, "{name}: {d}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn half_precision_exports_round_each_weight_once() {
    // f16/bf16: every 2-D weight rounded to nearest-even once, norms kept f32; import reads them back exactly.
    for (name, ty) in [("llama", "f16"), ("qwen3-moe", "bf16"), ("gemma2", "bf16")] {
        let dir = scratch(&format!("gguf-half-{name}"));
        let model = model_copy(name, &dir);
        let (f32_path, half_path) = (dir.join("f.gguf"), dir.join("h.gguf"));
        export(&model, &f32_path, "f32");
        export(&model, &half_path, ty);
        let (f, h) = (GgufFile::open(&f32_path).unwrap(), GgufFile::open(&half_path).unwrap());
        for t in &h.tensors {
            let reference = f.tensor(&t.name).unwrap();
            let full = ft::formats::gguf::dequant::dequantize(0, f.tensor_bytes(reference).unwrap(), reference.numel()).unwrap();
            let got = ft::formats::gguf::dequant::dequantize(t.ggml_type, h.tensor_bytes(t).unwrap(), t.numel()).unwrap();
            let rounded: Vec<f32> = match (t.dims.len(), ty) {
                (1, _) => full.clone(),
                (_, "f16") => full.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
                _ => full.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
            };
            assert_eq!(got, rounded, "{name} {ty}: {}", t.name);
        }
        // And the model still computes what the original does, within the rounding.
        let back = dir.join("back");
        let (code, _, err) = ft(&["import-gguf", half_path.to_str().unwrap(), "--out", back.to_str().unwrap()]);
        assert_eq!(code, 0, "{err}");
        let d = max_abs_diff(&chat_logits(&load_dir(&model)), &chat_logits(&load_dir(&back)));
        // Tiny random models: 2-D weights move by 2^-9 (f16) / 2^-8 (bf16) relative; logits of
        // magnitude ~1 move by a few 1e-3 at most.
        assert!(d < 2e-2, "{name} {ty}: {d}");
        std::fs::remove_dir_all(&dir).ok();
    }
}

#[test]
fn quantizers_are_byte_identical_to_gguf_py_and_ggml() {
    let path = fixtures().join("gguf/quants.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut checked = 0;
    for i in 0.. {
        let Ok(input) = st.tensor(&format!("input_{i}")) else { break };
        let x = ft::formats::safetensors::to_f32(input.data(), input.dtype()).unwrap();
        use ft::formats::gguf::dequant::*;
        for (label, t) in [("q8_0", Q8_0), ("q4_0", Q4_0), ("q4_1", Q4_1), ("q5_0", Q5_0), ("q5_1", Q5_1), ("q4_k", Q4_K), ("q5_k", Q5_K), ("q6_k", Q6_K)] {
            let Ok(want) = st.tensor(&format!("{label}_{i}")) else { continue };
            let mut got = Vec::new();
            ft::formats::gguf::quant::quantize_into(t, &x, &mut got).unwrap();
            assert!(got == want.data(), "{label} of input {i}: bytes differ");
            // And dequantization reads them as gguf-py does (round trip within the type's step).
            assert_eq!(dequantize(t, &got, x.len()).unwrap().len(), x.len());
            checked += 1;
        }
    }
    assert_eq!(checked, 29, "every fixture tensor compared");
}

#[test]
fn export_refusals_and_a_full_disk_leave_no_file() {
    let dir = scratch("gguf-refuse");
    let out = dir.join("m.gguf");
    let o = out.to_str().unwrap();
    // SmolLM3 whose no-RoPE layers llama.cpp cannot express.
    let (code, _, err) = ft(&["export", "gguf", "--model", model_dir("smollm3").to_str().unwrap(), "--out", o]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no_rope_layers") && err.contains("layer 1"), "{err}");
    // A bitsandbytes 4-bit checkpoint.
    let (code, _, err) = ft(&["export", "gguf", "--model", model_dir("llama-bnb4").to_str().unwrap(), "--out", o]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("4-bit"), "{err}");
    // A family ft does not know.
    let neox = dir.join("neox");
    std::fs::create_dir_all(&neox).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model_dir("llama").join(f), neox.join(f)).unwrap();
    }
    let mut cfg = json(&model_dir("llama").join("config.json"));
    cfg["model_type"] = "gpt_neox".into();
    cfg["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]);
    std::fs::write(neox.join("config.json"), cfg.to_string()).unwrap();
    let (code, _, err) = ft(&["export", "gguf", "--model", neox.to_str().unwrap(), "--out", o]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("gpt_neox"), "{err}");
    std::fs::remove_dir_all(&neox).unwrap();
    // An unknown type is a usage error from the parser.
    let (code, _, err) = ft(&["export", "gguf", "--model", model_dir("llama").to_str().unwrap(), "--out", o, "--type", "q3_k"]);
    assert_eq!(code, 2, "{err}");
    // A disk that fills up mid-file: exit 1, nothing left behind (no .gguf, no temporary).
    let bin = env!("CARGO_BIN_EXE_ft");
    let run = std::process::Command::new(bin)
        .args(["export", "gguf", "--model", model_dir("llama").to_str().unwrap(), "--out", o, "--type", "q8_0"])
        .env("FT_FULL_DISK_GGUF", "100000")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    if cfg!(feature = "fault-injection") {
        assert_eq!(run.status.code(), Some(1), "{err}");
        assert!(err.contains("No space left"), "{err}");
    }
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), usize::from(!cfg!(feature = "fault-injection")), "{:?}", std::fs::read_dir(&dir).unwrap().collect::<Vec<_>>());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn ollama_export_writes_the_model_the_adapter_and_a_modelfile() {
    let dir = scratch("gguf-ollama");
    let (model, adapter) = (model_dir("llama"), fixtures().join("adapters/lora-r4"));
    let out = dir.join("ol");
    let (code, stdout, err) = ft(&["export", "ollama", "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", out.to_str().unwrap(), "--type", "f16"]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("ollama create"), "{stdout}");
    let mf = std::fs::read_to_string(out.join("Modelfile")).unwrap();
    let lines: Vec<&str> = mf.lines().collect();
    assert_eq!(lines[0], "FROM ./model.gguf");
    assert_eq!(lines[1], "ADAPTER ./adapter.gguf");
    // The tiny models speak ChatML: the template is written in Ollama's syntax, and the turn
    // tokens stop generation.
    assert!(mf.contains("TEMPLATE \"\"\"") && mf.contains("<|im_start|>{{ .Role }}"), "{mf}");
    assert!(mf.contains("PARAMETER stop \"<|im_end|>\""), "{mf}");
    // The files are the exports ft writes on their own.
    let (alone, alone_lora) = (dir.join("alone.gguf"), dir.join("alone-lora.gguf"));
    export(&model, &alone, "f16");
    let (code, err) = export_lora(&adapter, &model, &alone_lora);
    assert_eq!(code, 0, "{err}");
    let tensors = |p: &Path| {
        let g = GgufFile::open(p).unwrap();
        g.tensors.iter().map(|t| g.tensor_bytes(t).unwrap().to_vec()).collect::<Vec<_>>()
    };
    assert!(tensors(&out.join("model.gguf")) == tensors(&alone));
    assert!(tensors(&out.join("adapter.gguf")) == tensors(&alone_lora));
    // A DoRA adapter cannot be an ADAPTER: refused, naming --merge; with --merge it is baked in.
    let dora = fixtures().join("adapters/dora-r4");
    let out2 = dir.join("ol2");
    let (code, _, err) = ft(&["export", "ollama", "--model", model.to_str().unwrap(), "--adapter", dora.to_str().unwrap(), "--out", out2.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--merge") && !out2.exists(), "{err}");
    let (code, _, err) = ft(&["export", "ollama", "--model", model.to_str().unwrap(), "--adapter", dora.to_str().unwrap(), "--merge", "--out", out2.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(!std::fs::read_to_string(out2.join("Modelfile")).unwrap().contains("ADAPTER"));
    // An existing output directory is left alone.
    let (code, _, err) = ft(&["export", "ollama", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("already exists"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn shell_completions_cover_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = ft(&["completions", shell]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("gguf-lora") && out.contains("import-gguf"), "{shell}");
    }
    // bash completes `ft export g` to the two GGUF exports.
    let script = "source <(\"$FT\" completions bash); COMP_WORDS=(ft export g); COMP_CWORD=2; _ft ft g export; echo \"${COMPREPLY[@]}\"";
    let out = std::process::Command::new("bash").args(["-c", script]).env("FT", env!("CARGO_BIN_EXE_ft")).output().unwrap();
    let words = String::from_utf8_lossy(&out.stdout);
    assert_eq!(words.split_whitespace().collect::<Vec<_>>(), ["gguf", "gguf-lora"], "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ft(&["completions", "powershell-9"]).0, 2);
}
