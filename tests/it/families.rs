//! The 2026 families (Gemma 2/3, Phi-3, SmolLM3, sliding-window Mistral, Qwen3-MoE, Mixtral):
//! LoRA training on each, PEFT's expert adapters (`target_parameters`) read and written, merging
//! expert LoRA, QLoRA on experts, router load balance, and configs ft refuses by key. (Logits,
//! generation, chat loss and packing of these models: `oracle_models.rs`, `packing.rs`.)

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::{Int, TensorData};
use ft::adapters::peft::PeftAdapter;
use ft::backend::Cpu;
use ft::model::Decoder;

use super::common::*;

const NEW_FAMILIES: [&str; 7] = ["gemma2", "gemma3", "phi3", "smollm3", "mistral-swa", "qwen3-moe", "mixtral"];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn logits(model: &Decoder<Cpu>, ids: &[u32]) -> Vec<f32> {
    let input = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, ids.len()]), &Default::default());
    model.forward(input, None).into_data().to_vec().unwrap()
}

fn assert_logits(model: &Decoder<Cpu>, expected: &Path, what: &str) {
    let cases = json(&fixtures().join("chat_tokens.json"));
    for (i, case) in cases.as_array().unwrap().iter().enumerate() {
        let (want, _) = read_f32(expected, &format!("logits_{i}"));
        let d = max_abs_diff(&logits(model, &ids(&case["input_ids"])), &want);
        assert!(d <= 1e-4, "{what} case {i}: max abs diff {d}");
    }
}

fn experts_adapter(model: &str) -> PathBuf {
    fixtures().join("adapters").join(format!("{model}-experts-r4"))
}

fn recipe(dir: &Path, model: &str, extra_lora: &str, extra_model: &str) -> PathBuf {
    let p = dir.join("recipe.toml");
    let data = fixtures().join("chat.jsonl");
    std::fs::write(
        &p,
        format!(
            "[model]\npath = \"{}\"\n{extra_model}\n[data]\ntrain = \"{}\"\ntemplate = \"chatml\"\n[lora]\nr = 4\nalpha = 8\n{extra_lora}\n\
             [train]\nlr = 2e-2\nmax_steps = 6\nmicro_batch_size = 3\nseed = 3\n[output]\ndir = \"{}\"\n",
            model_dir(model).display(),
            data.display(),
            dir.join("run").display()
        ),
    )
    .unwrap();
    p
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64()).collect()
}

#[test]
fn peft_expert_adapters_load_and_match_peft_logits() {
    // PEFT 0.21 `target_parameters` on the fused expert stacks (`scripts/make-moe-adapters.py`):
    // the attention LoRA and every expert's gate_up and down LoRA, read from the stacked tensors.
    for name in ["qwen3-moe", "mixtral"] {
        let mut model = load(name);
        let n = PeftAdapter::open(&experts_adapter(name)).unwrap().attach(&mut model).unwrap();
        let experts = model.config.moe.as_ref().unwrap().num_experts;
        assert_eq!(n, model.config.num_layers * (4 + 2 * experts), "{name}: attention and every expert projection");
        assert_logits(&model, &experts_adapter(name).join("expected_logits.safetensors"), name);
        model.set_adapters_enabled(false);
        assert_logits(&model, &model_dir(name).join("expected_logits.safetensors"), "adapters off");
    }
}

#[test]
fn ft_writes_expert_adapters_as_peft_does() {
    // Loaded and written back: the same tensor names, shapes and values as PEFT's file, and the
    // same target_parameters (PEFT's nesting: the first listed stack under `base_layer`).
    for name in ["qwen3-moe", "mixtral"] {
        let d = scratch(&format!("moe-save-{name}"));
        let mut model = load(name);
        let adapter = PeftAdapter::open(&experts_adapter(name)).unwrap();
        adapter.attach(&mut model).unwrap();
        ft::adapters::peft::save(&mut model, &adapter.config, "base", &d.join("out")).unwrap();
        let read = |p: &Path| std::fs::read(p.join("adapter_model.safetensors")).unwrap();
        let (want_bytes, got_bytes) = (read(&experts_adapter(name)), read(&d.join("out")));
        let (want, got) = (safetensors::SafeTensors::deserialize(&want_bytes).unwrap(), safetensors::SafeTensors::deserialize(&got_bytes).unwrap());
        let mut names: Vec<String> = want.names().into_iter().map(String::from).collect();
        names.sort();
        let mut got_names: Vec<String> = got.names().into_iter().map(String::from).collect();
        got_names.sort();
        assert_eq!(got_names, names, "{name}");
        for n in names {
            let (w, g) = (want.tensor(&n).unwrap(), got.tensor(&n).unwrap());
            assert_eq!(w.shape(), g.shape(), "{n}");
            assert_eq!(w.data(), g.data(), "{name} {n}: values");
        }
        let cfg = json(&d.join("out/adapter_config.json"));
        assert_eq!(cfg["target_parameters"], serde_json::json!(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]));
        let mut tm: Vec<&str> = cfg["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        tm.sort();
        assert_eq!(tm, ["k_proj", "o_proj", "q_proj", "v_proj"]);
    }
}

#[test]
fn merging_an_expert_adapter_gives_the_base_plus_adapter_logits() {
    // The checkpoints store experts per module (Qwen3-MoE's gate/up/down_proj, Mixtral's
    // w1/w3/w2); each gets its rows of the expert's fused gate_up LoRA. Merged in f32: the
    // bf16 files would round the merged weights (1e-2 in the logits), as a bf16 PEFT merge does.
    for name in ["qwen3-moe", "mixtral"] {
        let out = scratch(&format!("moe-merge-{name}")).join("merged");
        let (c, _, err) = ft(&["merge", "--model", s(&model_dir(name)), "--adapter", s(&experts_adapter(name)), "--out", s(&out), "--dtype", "f32"]);
        assert_eq!(c, 0, "{err}");
        let merged = ft::model::load::<Cpu>(&out, &Default::default(), Default::default()).unwrap();
        assert_logits(&merged, &experts_adapter(name).join("expected_logits.safetensors"), &format!("{name} merged"));
    }
}

#[test]
fn lora_sft_lowers_the_loss_on_every_new_family() {
    for name in NEW_FAMILIES {
        let d = scratch(&format!("family-sft-{name}"));
        let (c, _, err) = ft(&["train", s(&recipe(&d, name, "", "")), "--quiet"]);
        assert_eq!(c, 0, "{name}: {err}");
        let l = losses(&d.join("run"));
        assert_eq!(l.len(), 6, "{name}");
        assert!(l[5] < l[0] * 0.9, "{name}: loss {l:?}");
        let cfg = json(&d.join("run/adapter/adapter_config.json"));
        let bytes = std::fs::read(d.join("run/adapter/adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let config = ft::model::ModelConfig::from_dir(&model_dir(name)).unwrap();
        if let Some(moe) = &config.moe {
            // all-linear reaches every expert: one stack per layer and parameter, E·r rows.
            assert_eq!(cfg["target_parameters"], serde_json::json!(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]), "{name}");
            for l in 0..config.num_layers {
                for (key, rows) in [("base_layer.lora_A", moe.num_experts * 4), ("lora_A", moe.num_experts * 4)] {
                    let t = st.tensor(&format!("base_model.model.model.layers.{l}.mlp.experts.{key}.weight")).unwrap_or_else(|_| panic!("{name}: layer {l} {key}"));
                    assert_eq!(t.shape()[0], rows);
                }
            }
            assert!(!st.names().iter().any(|n| n.contains("mlp.gate.")), "{name}: the router stays frozen");
        }
        if config.fused_projections {
            assert!(st.names().iter().any(|n| n.contains("qkv_proj.lora_A")) && st.names().iter().any(|n| n.contains("gate_up_proj.lora_B")), "{name}");
        }
        // The trained adapter loads back and merges into a checkpoint with its logits (in f32:
        // these checkpoints are bf16, which would round the merge).
        let out = d.join("merged");
        let (c, _, err) = ft(&["merge", "--model", s(&model_dir(name)), "--adapter", s(&d.join("run/adapter")), "--out", s(&out), "--dtype", "f32"]);
        assert_eq!(c, 0, "{name}: {err}");
        let mut with_adapter = load(name);
        PeftAdapter::open(&d.join("run/adapter")).unwrap().attach(&mut with_adapter).unwrap();
        let merged = ft::model::load::<Cpu>(&out, &Default::default(), Default::default()).unwrap();
        let case = ids(&json(&fixtures().join("chat_tokens.json"))[1]["input_ids"]);
        let dmax = max_abs_diff(&logits(&merged, &case), &logits(&with_adapter, &case));
        assert!(dmax <= 1e-4, "{name}: merged vs adapter {dmax}");
    }
}

#[test]
fn qlora_on_qwen3_moe_quantizes_the_experts_and_trains() {
    let d = scratch("moe-qlora");
    let (c, _, err) = ft(&["train", s(&recipe(&d, "qwen3-moe", "", "quantize = \"nf4\"")), "--quiet"]);
    assert_eq!(c, 0, "{err}");
    let l = losses(&d.join("run"));
    assert!(l[5] < l[0] * 0.9, "{l:?}");
    // Every expert matrix is held in NF4 (per expert, bitsandbytes' blocks).
    let mut model = ft::model::load::<Cpu>(&model_dir("qwen3-moe"), &Default::default(), ft::model::LoadOptions { base: ft::model::BaseFormat::Nf4 }).unwrap();
    let experts: Vec<bool> = model.projections_mut().into_iter().filter(|(n, _)| n.contains(".experts.")).map(|(_, p)| p.base.is_nf4()).collect();
    assert_eq!(experts.len(), 2 * 2 * 4);
    assert!(experts.iter().all(|&q| q));
    assert!(std::path::Path::new(&d.join("run/adapter/ft_quantized_base.json")).exists());
}

#[test]
fn router_load_balance_is_reported() {
    let (c, out, err) = ft(&["eval", "--json", "--template", "chatml", "--model", s(&model_dir("qwen3-moe")), "--data", s(&fixtures().join("chat.jsonl"))]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let layers = v["router_load"].as_array().expect("router_load");
    assert_eq!(layers.len(), 2);
    for l in layers {
        let f: Vec<f64> = l.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(f.len(), 4);
        assert!((f.iter().sum::<f64>() - 1.0).abs() < 1e-9 && f.iter().all(|&x| x > 0.0), "{f:?}");
    }
    let d = scratch("moe-balance-train");
    let (c, _, err) = ft(&["train", s(&recipe(&d, "mixtral", "", "")), "--quiet"]);
    assert_eq!(c, 0, "{err}");
    let m: Vec<serde_json::Value> = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let step = m.iter().find(|l| l["loss"].is_f64()).unwrap();
    let load = step["router_load"].as_array().expect("router_load in training metrics");
    assert_eq!(load.len(), 2);
}

#[test]
fn configs_ft_cannot_compute_are_refused_by_key() {
    let d = scratch("family-refusals");
    for (model, key, value, want) in [
        ("phi3", "rope_parameters", serde_json::json!({"rope_type": "mrope", "rope_theta": 10000.0}), "unsupported rope_scaling \"mrope\""),
        ("phi3", "rope_parameters", serde_json::json!({"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75, "short_factor": [1.0], "long_factor": [1.0]}), "need 6 entries"),
        ("qwen3-moe", "shared_expert_intermediate_size", serde_json::json!(64), "shared_expert_intermediate_size"),
        ("mixtral", "router_jitter_noise", serde_json::json!(0.1), "router_jitter_noise"),
        ("qwen3-moe", "scoring_func", serde_json::json!("sigmoid"), "scoring_func"),
        ("qwen3-moe", "n_group", serde_json::json!(4), "n_group"),
        ("gemma2", "layer_types", serde_json::json!(["sliding_attention", "chunked_attention"]), "layer_types"),
        ("gemma2", "hidden_activation", serde_json::json!("relu2"), "hidden_activation"),
    ] {
        let dir = d.join(format!("{model}-{key}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in std::fs::read_dir(model_dir(model)).unwrap().flatten() {
            std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
        }
        let mut cfg = json(&dir.join("config.json"));
        cfg[key] = value;
        std::fs::write(dir.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
        let (c, _, err) = ft(&["eval", "--model", s(&dir), "--data", s(&fixtures().join("chat.jsonl")), "--template", "chatml"]);
        assert_ne!(c, 0, "{model} {key}");
        assert!(err.contains(want) && err.contains("config.json"), "{model} {key}: {err}");
    }
}

/// `model` rewritten with its experts fused as transformers 5 holds them in memory:
/// `mlp.experts.gate_up_proj` `[E, 2I, H]` (each expert [gate; up]), `mlp.experts.down_proj`
/// `[E, H, I]`, the router as `mlp.gate.weight`.
fn fused_copy(model: &str, dir: &Path) -> PathBuf {
    let out = dir.join(format!("{model}-fused"));
    std::fs::create_dir_all(&out).unwrap();
    for f in std::fs::read_dir(model_dir(model)).unwrap().flatten() {
        if f.file_name() != "model.safetensors" {
            std::fs::copy(f.path(), out.join(f.file_name())).unwrap();
        }
    }
    let cfg = ft::model::ModelConfig::from_dir(&model_dir(model)).unwrap();
    let moe = cfg.moe.clone().unwrap();
    let bytes = std::fs::read(model_dir(model).join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (block, g, u, dn) = if moe.mixtral_names { ("block_sparse_moe", "w1", "w3", "w2") } else { ("mlp", "gate_proj", "up_proj", "down_proj") };
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in st.tensors() {
        if name.contains(".experts.") {
            continue;
        }
        tensors.push((name.replace(".block_sparse_moe.gate.", ".mlp.gate."), t.dtype(), t.shape().to_vec(), t.data().to_vec()));
    }
    let (h, i, e) = (cfg.hidden_size, moe.intermediate_size, moe.num_experts);
    for l in 0..cfg.num_layers {
        let at = |x: usize, n: &str| st.tensor(&format!("model.layers.{l}.{block}.experts.{x}.{n}.weight")).unwrap();
        let dtype = at(0, g).dtype();
        let gate_up: Vec<u8> = (0..e).flat_map(|x| [at(x, g).data().to_vec(), at(x, u).data().to_vec()].concat()).collect();
        let down: Vec<u8> = (0..e).flat_map(|x| at(x, dn).data().to_vec()).collect();
        tensors.push((format!("model.layers.{l}.mlp.experts.gate_up_proj"), dtype, vec![e, 2 * i, h], gate_up));
        tensors.push((format!("model.layers.{l}.mlp.experts.down_proj"), dtype, vec![e, h, i], down));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &out.join("model.safetensors")).unwrap();
    out
}

#[test]
fn fused_expert_checkpoints_load_and_merge_like_per_expert_ones() {
    let d = scratch("moe-fused");
    for name in ["qwen3-moe", "mixtral"] {
        let fused = fused_copy(name, &d);
        let model = ft::model::load::<Cpu>(&fused, &Default::default(), Default::default()).unwrap();
        assert_logits(&model, &model_dir(name).join("expected_logits.safetensors"), &format!("{name} fused"));
        let out = d.join(format!("{name}-merged"));
        let (c, _, err) = ft(&["merge", "--model", s(&fused), "--adapter", s(&experts_adapter(name)), "--out", s(&out), "--dtype", "f32"]);
        assert_eq!(c, 0, "{err}");
        let merged = ft::model::load::<Cpu>(&out, &Default::default(), Default::default()).unwrap();
        assert_logits(&merged, &experts_adapter(name).join("expected_logits.safetensors"), &format!("{name} fused, merged"));
    }
}

/// `model`'s tokenizer with Gemma's special tokens added and `template` as its chat template.
fn gemma_tokenizer_dir(template: &str, dir: &Path) -> PathBuf {
    let out = dir.join(template);
    std::fs::create_dir_all(&out).unwrap();
    let mut tok = json(&model_dir("gemma2").join("tokenizer.json"));
    let added = tok["added_tokens"].as_array_mut().unwrap();
    for (i, t) in ["<bos>", "<start_of_turn>", "<end_of_turn>"].iter().enumerate() {
        added.push(serde_json::json!({"id": 1024 + i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
    }
    std::fs::write(out.join("tokenizer.json"), serde_json::to_string(&tok).unwrap()).unwrap();
    let source = std::fs::read_to_string(fixtures().join("templates").join(format!("{template}.jinja"))).unwrap();
    let cfg = serde_json::json!({"bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<|endoftext|>", "chat_template": source});
    std::fs::write(out.join("tokenizer_config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    out
}

#[test]
fn gemma_chat_templates_render_as_transformers_and_mask_exactly_the_replies() {
    // Gemma 3 merges a system message into the first user turn; Gemma 2 refuses it (its
    // template raises); both render the assistant as "model" and trim contents. The rendered
    // text equals transformers' (`templates/expected.json`), and the mask covers each reply's
    // tokens and its `<end_of_turn>`, nothing else.
    use ft::data::conversation::read_jsonl;
    use ft::data::encode::encode_conversation;
    use ft::data::tokenizer::{TemplateChoice, TextTokenizer};
    let expected = json(&fixtures().join("templates/expected.json"));
    let convs = read_jsonl(&fixtures().join("chat.jsonl")).unwrap();
    let d = scratch("gemma-templates");
    for name in ["gemma2", "gemma3"] {
        let tok = TextTokenizer::from_dir(&gemma_tokenizer_dir(name, &d)).unwrap();
        let template = tok.template(TemplateChoice::Model).unwrap();
        for (conv, want) in convs.iter().zip(expected[name].as_array().unwrap()) {
            let got = encode_conversation(&tok, &template, &conv.messages);
            if let Some(err) = want["error"].as_str() {
                let e = got.expect_err("the template refuses this conversation").to_string();
                assert!(e.contains(err), "{name}: {e}");
                continue;
            }
            let enc = got.unwrap();
            assert_eq!(enc.text, want["text"].as_str().unwrap(), "{name}");
            let end = tok.token_id("<end_of_turn>").unwrap();
            let replies: Vec<&str> = conv.messages.iter().filter(|m| m.role == ft::data::conversation::Role::Assistant).map(|m| m.content.as_str()).collect();
            // The masked tokens decode to the replies, each followed by its <end_of_turn>.
            let masked: Vec<u32> = enc.ids.iter().zip(&enc.mask).filter(|(_, &m)| m == 1).map(|(&i, _)| i).collect();
            let mut pieces = Vec::new();
            let mut cur = Vec::new();
            for id in masked {
                if id == end {
                    pieces.push(tok.decode(&cur).unwrap());
                    cur.clear();
                } else {
                    cur.push(id);
                }
            }
            assert!(cur.is_empty(), "{name}: every masked run ends with <end_of_turn>");
            assert_eq!(pieces, replies, "{name}");
        }
    }
}

#[test]
fn longrope_follows_transformers_on_both_sides_of_the_original_context() {
    // Phi-3.5 / Phi-4-mini's LongRoPE on the phi3 weights (`fixtures/longrope`, made by
    // `scripts/make-longrope-oracle.py`): original context 32, so cases of 45 and 87 tokens use
    // the long factors and the 23-token case the short ones; cos/sin scaled by √(1 + ln 8 / ln 32).
    let d = scratch("longrope").join("phi3-longrope");
    std::fs::create_dir_all(&d).unwrap();
    for f in std::fs::read_dir(model_dir("phi3")).unwrap().flatten() {
        std::fs::copy(f.path(), d.join(f.file_name())).unwrap();
    }
    std::fs::copy(fixtures().join("longrope/config.json"), d.join("config.json")).unwrap();
    let model = ft::model::load::<Cpu>(&d, &Default::default(), Default::default()).unwrap();
    assert_logits(&model, &fixtures().join("longrope/expected_logits.safetensors"), "phi3 longrope");
}

#[test]
fn dpo_generate_and_data_commands_work_on_the_new_families() {
    // DPO from the base (reference = adapters off) raises the reward margin; `ft generate`
    // and `ft data check` take the models as they are.
    let prefs = fixtures().join("dpo/prefs.jsonl");
    for name in ["gemma2", "phi3", "qwen3-moe"] {
        let d = scratch(&format!("family-dpo-{name}"));
        let r = d.join("recipe.toml");
        std::fs::write(
            &r,
            format!(
                "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\ntemplate = \"chatml\"\n[lora]\nr = 4\nalpha = 8\n\
                 [train]\nmethod = \"dpo\"\nmax_steps = 6\nmicro_batch_size = 3\nlr = 2e-2\nseed = 5\n[dpo]\nbeta = 0.1\n[output]\ndir = \"{}\"\n",
                model_dir(name).display(),
                prefs.display(),
                d.join("run").display()
            ),
        )
        .unwrap();
        let (c, _, err) = ft(&["train", s(&r), "--quiet"]);
        assert_eq!(c, 0, "{name}: {err}");
        let m: Vec<serde_json::Value> = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let margins: Vec<f64> = m.iter().filter_map(|l| l["rewards/margins"].as_f64()).collect();
        assert!((m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4, "{name}: DPO starts at ln 2");
        assert!(margins.last().unwrap() > &0.0, "{name}: margins {margins:?}");
        let (c, out, err) = ft(&["generate", "--model", s(&model_dir(name)), "--template", "chatml", "--prompt", "Hello", "--max-new-tokens", "5", "--ignore-eos"]);
        assert_eq!(c, 0, "{name}: {err}");
        assert!(!out.trim().is_empty(), "{name}");
        let (c, out, err) = ft(&["data", "check", s(&fixtures().join("chat.jsonl")), "--model", s(&model_dir(name)), "--template", "chatml", "--json"]);
        assert_eq!(c, 0, "{name}: {err}");
        assert!(out.contains("trainable"), "{name}: {out}");
    }
}

#[test]
fn ft_quantize_writes_moe_experts_in_4_bit_that_load_as_quantized_at_load() {
    // Each expert matrix quantized on its own (bitsandbytes' layout per module); the 4-bit
    // checkpoint computes exactly what quantizing the dense model at load computes.
    let d = scratch("moe-quantize");
    let out = d.join("q");
    let (c, stdout, err) = ft(&["quantize", "--model", s(&model_dir("qwen3-moe")), "--out", s(&out), "--json"]);
    assert_eq!(c, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    // 2 layers × (4 attention + 4 experts × 3).
    assert_eq!(report["quantized"], 2 * (4 + 4 * 3), "{stdout}");
    let stored = ft::model::load::<Cpu>(&out, &Default::default(), Default::default()).unwrap();
    let at_load = ft::model::load::<Cpu>(&model_dir("qwen3-moe"), &Default::default(), ft::model::LoadOptions { base: ft::model::BaseFormat::Nf4 }).unwrap();
    let case = ids(&json(&fixtures().join("chat_tokens.json"))[1]["input_ids"]);
    let (a, b) = (logits(&stored, &case), logits(&at_load, &case));
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let dense = logits(&load("qwen3-moe"), &case);
    assert!(max_abs_diff(&a, &dense) > 1e-3, "the experts are quantized");
}

/// A copy of oracle model `model` with its config edited by `edit`.
fn edited_model(model: &str, dir: &Path, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let out = dir.join(model);
    std::fs::create_dir_all(&out).unwrap();
    for f in std::fs::read_dir(model_dir(model)).unwrap().flatten() {
        std::fs::copy(f.path(), out.join(f.file_name())).unwrap();
    }
    let mut cfg = json(&out.join("config.json"));
    edit(&mut cfg);
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    out
}

#[test]
fn published_config_spellings_compute_the_same_models() {
    // Gemma 3 as google/gemma-3-* configs spell it (rope_theta, rope_local_base_freq,
    // rope_scaling for the global layers, sliding_window_pattern; no layer_types), Qwen3-MoE's
    // published `num_experts`, Gemma 2 without layer_types (alternating from layer 0).
    let d = scratch("published-spellings");
    let gemma3 = edited_model("gemma3", &d, |c| {
        let o = c.as_object_mut().unwrap();
        for k in ["rope_parameters", "layer_types", "_sliding_window_pattern"] {
            o.remove(k);
        }
        o.insert("rope_theta".into(), 1_000_000.0.into());
        o.insert("rope_local_base_freq".into(), 10_000.0.into());
        o.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "factor": 8.0}));
        o.insert("sliding_window_pattern".into(), 2.into());
    });
    let qwen = edited_model("qwen3-moe", &d, |c| {
        let n = c.as_object_mut().unwrap().remove("num_local_experts").unwrap();
        c["num_experts"] = n;
    });
    let gemma2 = edited_model("gemma2", &d, |c| {
        c.as_object_mut().unwrap().remove("layer_types");
    });
    for (dir, name) in [(gemma3, "gemma3"), (qwen, "qwen3-moe"), (gemma2, "gemma2")] {
        let model = ft::model::load::<Cpu>(&dir, &Default::default(), Default::default()).unwrap();
        assert_logits(&model, &model_dir(name).join("expected_logits.safetensors"), &format!("{name}, published spelling"));
    }
}

#[test]
fn adapter_info_and_check_describe_expert_adapters() {
    let a = experts_adapter("qwen3-moe");
    let (c, out, err) = ft(&["adapter", "info", s(&a), "--model", s(&model_dir("qwen3-moe")), "--json"]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kinds: Vec<&str> = v["target_kinds"].as_array().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
    assert_eq!(kinds, ["experts.down_proj", "experts.gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]);
    assert_eq!(v["target_parameters"], serde_json::json!(["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]));
    // 2 layers × (4 attention (A + B) + 2 stacks of 4 experts): PEFT's parameter count.
    assert_eq!(v["parameters"], 12288);
    let (c, out, err) = ft(&["adapter", "check", s(&a), "--model", s(&model_dir("qwen3-moe")), "--json"]);
    assert_eq!(c, 0, "{err}");
    assert!(out.contains("is_3d_moe_weight"), "{out}");
}

#[test]
fn the_router_trains_only_when_targeted() {
    // `target_parameters = ["mlp.gate.weight"]` adds a LoRA on each router (PEFT's spelling for
    // it), saved under the router's module name and listed in target_parameters; the adapter
    // loads back to the same logits.
    let d = scratch("moe-router");
    let (c, _, err) = ft(&["train", s(&recipe(&d, "qwen3-moe", "target_parameters = [\"mlp.gate.weight\"]", "")), "--quiet"]);
    assert_eq!(c, 0, "{err}");
    let cfg = json(&d.join("run/adapter/adapter_config.json"));
    assert_eq!(cfg["target_parameters"], serde_json::json!(["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]));
    let bytes = std::fs::read(d.join("run/adapter/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for l in 0..2 {
        let a = st.tensor(&format!("base_model.model.model.layers.{l}.mlp.gate.lora_A.weight")).unwrap();
        assert_eq!(a.shape(), &[4, 64]);
        let b = st.tensor(&format!("base_model.model.model.layers.{l}.mlp.gate.lora_B.weight")).unwrap();
        assert_eq!(b.shape(), &[4, 4]);
        assert!(ft::formats::safetensors::to_f32(b.data(), b.dtype()).unwrap().iter().any(|&x| x != 0.0), "the router's LoRA trained");
    }
    let mut model = load("qwen3-moe");
    let n = PeftAdapter::open(&d.join("run/adapter")).unwrap().attach(&mut model).unwrap();
    assert_eq!(n, 2 * (4 + 1 + 2 * 4));
}

#[test]
fn gradient_checkpointing_and_packing_give_the_same_runs_on_moe_and_gemma() {
    // Recomputed blocks route the same tokens and cap the same scores: a run with gradient
    // checkpointing (plain, and packed past Gemma 2's window) has the losses and gradient norms of
    // the run without, step by step (a token routed to another expert would move them by far
    // more). The adapters agree to 1e-3, not 1e-6 as on llama: the gradients differ in the last
    // bits (the recomputation sums them in another order), and Adam's first update
    // `lr · g / (|g| + eps)` turns that into ~4e-5 for elements whose gradient is near eps (an
    // expert's LoRA that only padding reached).
    let metric = |run: &Path, key: &str| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()[key].as_f64()).collect()
    };
    for name in ["qwen3-moe", "gemma2"] {
        let mut runs = Vec::new();
        for (tag, sets) in [
            ("plain", vec![]),
            ("gc", vec!["train.gradient_checkpointing=true"]),
            ("packed", vec!["data.packing=true", "data.max_len=128"]),
            ("gc-packed", vec!["train.gradient_checkpointing=true", "data.packing=true", "data.max_len=128"]),
        ] {
            let d = scratch(&format!("family-gc-{name}-{tag}"));
            let r = recipe(&d, name, "", "");
            let mut args = vec!["train", s(&r), "--quiet"];
            for x in &sets {
                args.extend(["--set", x]);
            }
            let (c, _, err) = ft(&args);
            assert_eq!(c, 0, "{name} {tag}: {err}");
            let bytes = std::fs::read(d.join("run/adapter/adapter_model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut tensors: Vec<(String, Vec<f32>)> = st.tensors().into_iter().map(|(n, t)| (n, ft::formats::safetensors::to_f32(t.data(), t.dtype()).unwrap())).collect();
            tensors.sort_by(|a, b| a.0.cmp(&b.0));
            runs.push((tag, tensors, metric(&d.join("run"), "loss"), metric(&d.join("run"), "grad_norm")));
        }
        for pair in [[0, 1], [2, 3]] {
            let (_, base, base_losses, base_norms) = &runs[pair[0]];
            let (tag, tensors, l, g) = &runs[pair[1]];
            assert_eq!((base_losses.len(), l.len()), (6, 6));
            for (x, y) in base_losses.iter().zip(l).chain(base_norms.iter().zip(g)) {
                assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{name} {tag}: {x} vs {y}");
            }
            for ((n, x), (_, y)) in base.iter().zip(tensors) {
                let d = max_abs_diff(x, y);
                assert!(d <= 1e-3, "{name} {tag} {n}: {d}");
            }
        }
    }
}
