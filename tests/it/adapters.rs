//! PEFT adapters on the llama oracle: logits and loss with the adapter attached, adapters off =
//! the base, and `ft merge` reproducing PEFT's `merge_and_unload()`.

use std::path::PathBuf;

use burn::prelude::*;
use burn::tensor::{Int, TensorData};
use ft::adapters::peft::PeftAdapter;
use ft::backend::Cpu;
use ft::data::conversation::read_jsonl;
use ft::model::Decoder;
use ft::data::tokenizer::{TemplateChoice, TextTokenizer};

use super::common::*;

/// Oracle adapters: (name, its base model, the merged model it must merge into).
const ADAPTERS: [(&str, &str, &str); 7] = [
    ("lora-r4", "llama", "lora-r4"),
    ("rslora-r8-attn", "llama", "rslora-r8-attn"),
    ("modules-to-save-r4", "llama", "modules-to-save-r4"),
    ("dora-r4", "llama", "dora-r4"),
    ("embed-lora-r4", "llama", "embed-lora-r4"),
    // PiSSA: the adapter on the residual base, and converted (rank 2r) for the original base:
    // both merge into the same model.
    ("pissa-r4", "llama-pissa-residual", "pissa-r4"),
    ("pissa-r4-converted", "llama", "pissa-r4"),
];

fn logits(model: &Decoder<Cpu>, ids: &[u32]) -> Vec<f32> {
    let input = Tensor::<Cpu, 2, Int>::from_data(
        TensorData::new(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, ids.len()]),
        &Default::default(),
    );
    model.forward(input, None).into_data().to_vec().unwrap()
}

fn assert_logits(model: &Decoder<Cpu>, expected: &std::path::Path, what: &str) {
    let cases = json(&fixtures().join("chat_tokens.json"));
    for (i, case) in cases.as_array().unwrap().iter().enumerate() {
        let (want, _) = read_f32(expected, &format!("logits_{i}"));
        let d = max_abs_diff(&logits(model, &ids(&case["input_ids"])), &want);
        assert!(d <= 1e-4, "{what} case {i}: max abs diff {d}");
    }
}

fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join("adapters").join(name)
}

#[test]
fn peft_adapters_match_peft_logits_and_switch_off() {
    for (name, base, _) in ADAPTERS {
        let mut model = load(base);
        let n = PeftAdapter::open(&adapter_dir(name)).unwrap().attach(&mut model).unwrap();
        assert!(n > 0);
        assert_logits(&model, &adapter_dir(name).join("expected_logits.safetensors"), name);
        model.set_adapters_enabled(false);
        assert_logits(&model, &model_dir(base).join("expected_logits.safetensors"), "adapters off");
    }
}

#[test]
fn eval_with_adapter_matches_expected_loss() {
    let expected = json(&fixtures().join("expected_chat_loss.json"));
    let data = read_jsonl(&fixtures().join("chat.jsonl")).unwrap();
    let tok = TextTokenizer::from_dir(&model_dir("llama")).unwrap();
    let template = tok.template(TemplateChoice::Chatml).unwrap();
    for (name, base, _) in ADAPTERS {
        let m = model_dir(base);
        let a = adapter_dir(name);
        let (c, out, err) = ft(&["eval", "--model", m.to_str().unwrap(), "--adapter", a.to_str().unwrap(), "--data",
            fixtures().join("chat.jsonl").to_str().unwrap(), "--template", "chatml", "--json"]);
        assert_eq!(c, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let want = expected[format!("adapters/{name}")]["chat_loss_mean"].as_f64().unwrap();
        assert!((v["loss"].as_f64().unwrap() - want).abs() <= 1e-4, "{name}: {} vs {want}", v["loss"]);
        let mut model = load(base);
        PeftAdapter::open(&a).unwrap().attach(&mut model).unwrap();
        let r = ft::eval::evaluate(&model, &tok, &template, &data, None).unwrap();
        assert!((r.loss - want).abs() <= 1e-4);
    }
}

#[test]
fn merge_reproduces_peft_merge_and_unload() {
    for (name, base, merged_name) in ADAPTERS {
        let out = std::env::temp_dir().join(format!("ft-merge-{}-{name}", std::process::id()));
        std::fs::remove_dir_all(&out).ok();
        let (c, _, err) = ft(&["merge", "--model", model_dir(base).to_str().unwrap(), "--adapter",
            adapter_dir(name).to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert_eq!(c, 0, "{err}");
        let want_file = fixtures().join("merged").join(merged_name).join("model.safetensors");
        let bytes = std::fs::read(&want_file).unwrap();
        let want = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let got_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let got = safetensors::SafeTensors::deserialize(&got_bytes).unwrap();
        assert_eq!(got.len(), want.len(), "{name}: tensor count");
        for (tname, t) in want.tensors() {
            let g = got.tensor(&tname).unwrap_or_else(|_| panic!("{name}: {tname} missing"));
            assert_eq!(g.shape(), t.shape(), "{tname}");
            let (a, b) = (ft::formats::safetensors::to_f32(g.data(), g.dtype()).unwrap(), ft::formats::safetensors::to_f32(t.data(), t.dtype()).unwrap());
            let d = max_abs_diff(&a, &b);
            assert!(d <= 1e-6, "{name} {tname}: max abs diff {d}");
        }
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
            assert!(out.join(f).exists(), "{f} not copied");
        }
        let merged = ft::model::load::<Cpu>(&out, &Default::default(), Default::default()).unwrap();
        assert_logits(&merged, &fixtures().join("merged").join(merged_name).join("expected_logits.safetensors"), name);
        std::fs::remove_dir_all(&out).ok();
    }
}

#[test]
fn adapter_for_another_model_is_refused() {
    // lora-r4 targets llama's 64-wide layers; qwen3 has head_dim 32 × 4 heads = 128-wide q_proj.
    let mut model = load("qwen3");
    let e = PeftAdapter::open(&adapter_dir("lora-r4")).unwrap().attach(&mut model).unwrap_err();
    assert!(format!("{e:#}").contains("shape"), "{e:#}");
}

/// `adapters/lora-r4` with its adapter_config.json changed by `edit`.
fn edited_adapter(name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let d = scratch(name);
    std::fs::copy(adapter_dir("lora-r4").join("adapter_model.safetensors"), d.join("adapter_model.safetensors")).unwrap();
    let mut cfg = json(&adapter_dir("lora-r4").join("adapter_config.json"));
    edit(&mut cfg);
    std::fs::write(d.join("adapter_config.json"), cfg.to_string()).unwrap();
    d
}

#[test]
fn adapter_configs_mean_what_they_say() {
    let load = |dir: &std::path::Path| {
        let mut m = ft::model::load::<Cpu>(&model_dir("llama"), &Default::default(), Default::default()).unwrap();
        PeftAdapter::open(dir).and_then(|a| a.attach(&mut m)).map(|_| m)
    };
    let expected = adapter_dir("lora-r4").join("expected_logits.safetensors");
    // Honoured settings that still cover every tensor load as before.
    let all_layers = edited_adapter("peft-layers-all", |c| c["layers_to_transform"] = serde_json::json!([0, 1]));
    assert_logits(&load(&all_layers).unwrap(), &expected, "layers_to_transform [0, 1]");
    let unmatched_exclude = edited_adapter("peft-exclude-none", |c| c["exclude_modules"] = serde_json::json!(["lm_head"]));
    assert_logits(&load(&unmatched_exclude).unwrap(), &expected, "exclude_modules [lm_head]");
    // Tensors the config leaves out, modules the model lacks, fields ft cannot run: errors naming them.
    for (name, edit, want) in [
        ("peft-layers-0", serde_json::json!({"layers_to_transform": [0]}), "leaves out"),
        ("peft-exclude-k", serde_json::json!({"exclude_modules": ["k_proj"]}), "k_proj, which the config leaves out"),
        ("peft-missing-module", serde_json::json!({"target_modules": ["q_proj", "nope_proj"]}), "nope_proj"),
        ("peft-replication", serde_json::json!({"layer_replication": [[0, 2]]}), "layer_replication"),
        ("peft-qalora", serde_json::json!({"use_qalora": true}), "use_qalora"),
        ("peft-layers-pattern", serde_json::json!({"layers_pattern": "h"}), "layers_pattern"),
    ] {
        let dir = edited_adapter(name, |c| {
            for (k, v) in edit.as_object().unwrap() {
                c[k] = v.clone();
            }
        });
        let e = load(&dir).err().unwrap_or_else(|| panic!("{name}: loaded")).to_string();
        assert!(e.contains(want), "{name}: {e}");
        // `ft merge` refuses the same adapter and writes nothing.
        let out = scratch(&format!("{name}-merge")).join("merged");
        let (c, _, err) = ft(&["merge", "--model", model_dir("llama").to_str().unwrap(), "--adapter", dir.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert_eq!(c, 1, "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
        assert!(!out.exists(), "{name}: nothing written");
    }
}

/// lora-r4 rewritten with `rank_pattern` {"q_proj": 8} and `alpha_pattern` {"q_proj": 16}: q_proj's
/// A and B zero-padded to rank 8, so that with PEFT's per-module scale (16 / 8 = 8 / 4) the
/// adapter computes exactly what lora-r4 does.
fn padded_rank_pattern_adapter() -> PathBuf {
    let src = adapter_dir("lora-r4");
    let out = scratch("rank-pattern-adapter");
    let mut cfg = json(&src.join("adapter_config.json"));
    cfg["rank_pattern"] = serde_json::json!({"q_proj": 8});
    cfg["alpha_pattern"] = serde_json::json!({"q_proj": 16});
    std::fs::write(out.join("adapter_config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in st.tensors() {
        let (shape, data) = (t.shape().to_vec(), t.data().to_vec());
        let padded = if name.contains("q_proj.lora_A") {
            // [4, in] → [8, in]: four zero rows.
            let mut d = data.clone();
            d.extend(vec![0u8; data.len()]);
            (vec![8, shape[1]], d)
        } else if name.contains("q_proj.lora_B") {
            // [out, 4] → [out, 8]: four zero columns per row.
            let d: Vec<u8> = data.chunks(16).flat_map(|row| [row.to_vec(), vec![0u8; 16]].concat()).collect();
            (vec![shape[0], 8], d)
        } else {
            (shape, data)
        };
        owned.push((name, padded.0, padded.1));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        owned.iter().map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap())).collect();
    std::fs::write(out.join("adapter_model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    out
}

#[test]
fn rank_and_alpha_patterns_follow_peft() {
    let dir = padded_rank_pattern_adapter();
    let mut model = load("llama");
    PeftAdapter::open(&dir).unwrap().attach(&mut model).unwrap();
    assert_logits(&model, &adapter_dir("lora-r4").join("expected_logits.safetensors"), "rank_pattern");
    // The merge scales each module by its own alpha / r.
    let out = scratch("rank-pattern-merged").join("m");
    let (c, _, err) = ft(&["merge", "--model", model_dir("llama").to_str().unwrap(), "--adapter", dir.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(c, 0, "{err}");
    let merged = ft::model::load::<Cpu>(&out, &Default::default(), Default::default()).unwrap();
    assert_logits(&merged, &fixtures().join("merged/lora-r4/expected_logits.safetensors"), "rank_pattern merged");
    // Without the alpha pattern q_proj's scale halves: other logits.
    let mut cfg = json(&dir.join("adapter_config.json"));
    cfg["alpha_pattern"] = serde_json::json!({});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let mut model = load("llama");
    PeftAdapter::open(&dir).unwrap().attach(&mut model).unwrap();
    let case = &json(&fixtures().join("chat_tokens.json"))[0];
    let (want, _) = read_f32(&adapter_dir("lora-r4").join("expected_logits.safetensors"), "logits_0");
    assert!(max_abs_diff(&logits(&model, &ids(&case["input_ids"])), &want) > 1e-3);
}

/// `ft adapter check --json` findings as (engine, severity, what).
fn serving_findings(name: &str, extra: &[&str]) -> (i32, Vec<(String, String, String)>) {
    let dir = adapter_dir(name);
    let mut args = vec!["adapter", "check", dir.to_str().unwrap(), "--json"];
    args.extend(extra);
    let (c, out, err) = ft(&args);
    assert!(c == 0 || c == 5, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let f = v["findings"].as_array().unwrap().iter().map(|f| (f["engine"].as_str().unwrap().to_string(), f["severity"].as_str().unwrap().to_string(), f["what"].as_str().unwrap().to_string())).collect();
    (c, f)
}

#[test]
fn adapter_check_names_the_engines_that_refuse_each_kind() {
    let llama = model_dir("llama");
    let base = ["--model", llama.to_str().unwrap()];
    // Plain LoRA r4 on a Llama: every engine takes it.
    let (c, f) = serving_findings("lora-r4", &base);
    assert_eq!((c, f.len()), (0, 0), "{f:?}");
    // DoRA: refused by all five; with --for vllm the check exits 5.
    let (_, f) = serving_findings("dora-r4", &base);
    assert_eq!(f.iter().filter(|x| x.1 == "refused" && x.2.contains("DoRA")).count(), 5, "{f:?}");
    let (c, _) = serving_findings("dora-r4", &["--for", "vllm"]);
    assert_eq!(c, 5);
    // modules_to_save: vLLM's own words.
    let (_, f) = serving_findings("modules-to-save-r4", &base);
    assert!(f.iter().any(|x| x.0 == "vllm" && x.1 == "refused" && x.2.contains("modules_to_save being None")), "{f:?}");
    // rsLoRA r8: llama.cpp loads it at 1/√8 of its strength.
    let (c, f) = serving_findings("rslora-r8-attn", &["--for", "llama.cpp,vllm"]);
    assert_eq!(c, 0, "changed, not refused");
    assert!(f.iter().any(|x| x.0 == "llama.cpp" && x.1 == "changed" && x.2.contains("0.354")), "{f:?}");
    // vLLM's rank limit: the fix names the smallest allowed --max-lora-rank.
    let dir = adapter_dir("lora-r4");
    let (c, out, _) = ft(&["adapter", "check", dir.to_str().unwrap(), "--for", "vllm", "--max-lora-rank", "1"]);
    assert_eq!(c, 5);
    assert!(out.contains("rank 4 is greater than max_lora_rank 1") && out.contains("--max-lora-rank 8"), "{out}");
    // Embedding LoRA: Ollama's safetensors import and mistral.rs refuse it; vLLM warns; llama.cpp
    // applies it from a GGUF adapter (it_gguf_export checks the logits).
    let (_, f) = serving_findings("embed-lora-r4", &base);
    for e in ["ollama", "mistral.rs"] {
        assert!(f.iter().any(|x| x.0 == e && x.1 == "refused" && x.2.contains("embed_tokens")), "{e}: {f:?}");
    }
    assert!(!f.iter().any(|x| x.0 == "llama.cpp"), "{f:?}");
    assert!(f.iter().all(|x| x.0 != "vllm" || x.1 == "warning"), "{f:?}");
    // PiSSA converted for the original base is a plain LoRA r8: every engine takes it.
    let (c, f) = serving_findings("pissa-r4-converted", &base);
    assert_eq!((c, f.len()), (0, 0), "{f:?}");
    // Ollama takes safetensors adapters of Llama, Mistral and Gemma only.
    let qwen = model_dir("qwen3");
    let (_, f) = serving_findings("lora-r4", &["--model", qwen.to_str().unwrap(), "--for", "ollama"]);
    assert!(f.iter().any(|x| x.1 == "refused" && x.2.contains("qwen3")), "{f:?}");
}

#[test]
fn adapter_info_describes_the_directory() {
    let dir = adapter_dir("dora-r4");
    let (c, out, err) = ft(&["adapter", "info", dir.to_str().unwrap(), "--json", "--model", model_dir("llama").to_str().unwrap()]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["kind"].as_str(), v["ranks"].clone(), v["adapted_modules"].as_u64(), v["base_model_type"].as_str()), (Some("dora"), serde_json::json!([4]), Some(14), Some("llama")));
    // Every tensor's elements: A [4, in], B [out, 4] and the magnitude [out] of 14 modules.
    let st_bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    let n: usize = st.tensors().iter().map(|(_, t)| t.shape().iter().product::<usize>()).sum();
    assert_eq!(v["parameters"].as_u64(), Some(n as u64));
    let v: serde_json::Value = serde_json::from_str(&ft(&["adapter", "info", adapter_dir("modules-to-save-r4").to_str().unwrap(), "--json"]).1).unwrap();
    assert_eq!(v["modules_to_save"], serde_json::json!(["lm_head"]));
}

#[test]
fn pissa_init_gives_peft_s_adapter_and_residual() {
    // lora.init = "pissa" on models/llama (r 4, α 8, every linear): the residual of every block
    // linear is models/llama-pissa-residual's and B₀A₀ is adapters/pissa-r4-init's (singular
    // vectors' signs are arbitrary: products compared), to 1e-5.
    type A = burn::backend::Autodiff<Cpu>;
    let mut model = ft::model::load::<A>(&model_dir("llama"), &Default::default(), Default::default()).unwrap();
    let mut config = PeftAdapter::open(&adapter_dir("lora-r4")).unwrap().config;
    config.init = ft::adapters::config::LoraInit::Pissa;
    ft::adapters::attach::attach_new(&mut model, &config, 0).unwrap();
    let residual = model_dir("llama-pissa-residual").join("model.safetensors");
    let init = adapter_dir("pissa-r4-init").join("adapter_model.safetensors");
    let mut checked = 0;
    for (name, proj) in model.projections_mut() {
        let Some(l) = proj.lora() else { continue };
        let (d_in, d_out) = proj.dims();
        let (want, _) = read_f32(&residual, &format!("{name}.weight"));
        let got = proj.base_weight_peft();
        assert!(max_abs_diff(&got, &want) <= 1e-5, "{name} residual: {}", max_abs_diff(&got, &want));
        let product = |a: &[f32], b: &[f32], r: usize| -> Vec<f32> {
            (0..d_out).flat_map(|o| (0..d_in).map(move |i| (0..r).map(|k| b[o * r + k] * a[k * d_in + i]).sum::<f32>())).collect()
        };
        let (a, b) = l.to_peft();
        let (an, bn) = ft::formats::peft::tensor_names(&name);
        let ((wa, _), (wb, _)) = (read_f32(&init, &an), read_f32(&init, &bn));
        let d = max_abs_diff(&product(&a, &b, 4), &product(&wa, &wb, 4));
        assert!(d <= 1e-5, "{name} B₀A₀: {d}");
        checked += 1;
    }
    assert_eq!(checked, 14);
}

#[test]
fn olora_init_gives_peft_s_adapter() {
    // lora.init = "olora" (W = QR, A₀ = R_r, B₀ = Q_r) against PEFT 0.21's own init
    // (scripts/make-olora-oracle.py): the products B₀A₀ to 1e-5 and the residual W − s·B₀A₀.
    type A = burn::backend::Autodiff<Cpu>;
    let mut model = ft::model::load::<A>(&model_dir("llama"), &Default::default(), Default::default()).unwrap();
    let mut config = PeftAdapter::open(&adapter_dir("lora-r4")).unwrap().config;
    config.init = ft::adapters::config::LoraInit::Olora;
    ft::adapters::attach::attach_new(&mut model, &config, 0).unwrap();
    let oracle = fixtures().join("olora/initial.safetensors");
    let original = model_dir("llama").join("model.safetensors");
    let mut checked = 0;
    for (name, proj) in model.projections_mut() {
        let Some(l) = proj.lora() else { continue };
        let (d_in, d_out) = proj.dims();
        let product = |a: &[f32], b: &[f32]| -> Vec<f32> {
            (0..d_out).flat_map(|o| (0..d_in).map(move |i| (0..4).map(|k| b[o * 4 + k] * a[k * d_in + i]).sum::<f32>())).collect()
        };
        let (a, b) = l.to_peft();
        let (an, bn) = ft::formats::peft::tensor_names(&name);
        let ((wa, _), (wb, _)) = (read_f32(&oracle, &an), read_f32(&oracle, &bn));
        let (got, want) = (product(&a, &b), product(&wa, &wb));
        assert!(max_abs_diff(&got, &want) <= 1e-5, "{name}: {}", max_abs_diff(&got, &want));
        let (w, _) = read_f32(&original, &format!("{name}.weight"));
        let rebuilt: Vec<f32> = proj.base_weight_peft().iter().zip(&got).map(|(r, p)| r + 2.0 * p).collect();
        assert!(max_abs_diff(&rebuilt, &w) <= 1e-5, "{name}: residual");
        checked += 1;
    }
    assert_eq!(checked, 14);
}
