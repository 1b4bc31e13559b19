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

const ADAPTERS: [&str; 2] = ["lora-r4", "rslora-r8-attn"];

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
    for name in ADAPTERS {
        let mut model = load("llama");
        let n = PeftAdapter::open(&adapter_dir(name)).unwrap().attach(&mut model).unwrap();
        assert!(n > 0);
        assert_logits(&model, &adapter_dir(name).join("expected_logits.safetensors"), name);
        model.set_adapters_enabled(false);
        assert_logits(&model, &model_dir("llama").join("expected_logits.safetensors"), "adapters off");
    }
}

#[test]
fn eval_with_adapter_matches_expected_loss() {
    let expected = json(&fixtures().join("expected_chat_loss.json"));
    let data = read_jsonl(&fixtures().join("chat.jsonl")).unwrap();
    let tok = TextTokenizer::from_dir(&model_dir("llama")).unwrap();
    let template = tok.template(TemplateChoice::Chatml).unwrap();
    for name in ADAPTERS {
        let m = model_dir("llama");
        let a = adapter_dir(name);
        let (c, out, err) = ft(&["eval", "--model", m.to_str().unwrap(), "--adapter", a.to_str().unwrap(), "--data",
            fixtures().join("chat.jsonl").to_str().unwrap(), "--template", "chatml", "--json"]);
        assert_eq!(c, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let want = expected[format!("adapters/{name}")]["chat_loss_mean"].as_f64().unwrap();
        assert!((v["loss"].as_f64().unwrap() - want).abs() <= 1e-4, "{name}: {} vs {want}", v["loss"]);
        let mut model = load("llama");
        PeftAdapter::open(&a).unwrap().attach(&mut model).unwrap();
        let r = ft::eval::evaluate(&model, &tok, &template, &data, None).unwrap();
        assert!((r.loss - want).abs() <= 1e-4);
    }
}

#[test]
fn merge_reproduces_peft_merge_and_unload() {
    for name in ADAPTERS {
        let out = std::env::temp_dir().join(format!("ft-merge-{}-{name}", std::process::id()));
        std::fs::remove_dir_all(&out).ok();
        let (c, _, err) = ft(&["merge", "--model", model_dir("llama").to_str().unwrap(), "--adapter",
            adapter_dir(name).to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert_eq!(c, 0, "{err}");
        let want_file = fixtures().join("merged").join(name).join("model.safetensors");
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
        assert_logits(&merged, &fixtures().join("merged").join(name).join("expected_logits.safetensors"), name);
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
