//! Reward models (`fixtures/reward`, transformers 5.24's `LlamaForSequenceClassification` with
//! TRL 1.16's RewardTrainer): the checkpoint loads with its `score` head, and each sequence's
//! reward is read at its rightmost non-pad token, as transformers does.

use burn::tensor::{Int, Tensor, TensorData};

use super::common::*;

#[test]
fn a_sequence_classification_checkpoint_scores_as_transformers() {
    let dir = fixtures().join("reward/model");
    let o = json(&fixtures().join("reward/expected.json"));
    let model = ft::model::load::<ft::backend::Cpu>(&dir, &Default::default(), Default::default()).unwrap();
    assert_eq!((model.config.num_labels, model.config.pad_token_id), (Some(1), Some(0)));
    assert!(model.lm_head.is_none() && model.score.is_some());
    // TRL's batch: every chosen then every rejected sequence, right-padded with the pad id 0.
    let mut rows: Vec<(Vec<u32>, f64)> = Vec::new();
    for side in ["chosen", "rejected"] {
        for p in o["pairs"].as_array().unwrap() {
            rows.push((ids(&p[side]["input_ids"]), p[side]["reward"].as_f64().unwrap()));
        }
    }
    let t = rows.iter().map(|r| r.0.len()).max().unwrap();
    let mut flat = vec![0i64; rows.len() * t];
    for (i, (r, _)) in rows.iter().enumerate() {
        for (j, &x) in r.iter().enumerate() {
            flat[i * t + j] = x as i64;
        }
    }
    let input = Tensor::<ft::backend::Cpu, 2, Int>::from_data(TensorData::new(flat, [rows.len(), t]), &Default::default());
    let got: Vec<f64> = model.sequence_scores(input).into_data().convert::<f64>().to_vec().unwrap();
    assert_eq!(got.len(), rows.len());
    for (g, (_, want)) in got.iter().zip(&rows) {
        assert!((g - want).abs() <= 1e-4, "reward {g} vs transformers' {want}");
    }
    // Read at the trailing "\\n" after <|im_end|>, not at <|im_end|>: the cut sequence scores
    // another number.
    let p = &o["pairs"][0]["chosen"];
    let cut: Vec<i64> = ids(&p["input_ids"])[..=p["cut_scored_position"].as_u64().unwrap() as usize].iter().map(|&x| x as i64).collect();
    let n = cut.len();
    let r = model.sequence_scores(Tensor::from_data(TensorData::new(cut, [1, n]), &Default::default()));
    let r: f64 = r.into_data().convert::<f64>().to_vec::<f64>().unwrap()[0];
    assert!((r - p["reward_cut_after_im_end"].as_f64().unwrap()).abs() <= 1e-4, "{r} vs {}", p["reward_cut_after_im_end"]);
    assert!((r - p["reward"].as_f64().unwrap()).abs() > 1e-2, "the two read-outs differ");
}

#[test]
fn reward_loss_and_metrics_match_trl() {
    // `ft eval --objective reward` on the DPO test pairs: TRL's loss with and without the
    // centering term, and its metrics (float32 in TRL: 1e-5 relative).
    let o = json(&fixtures().join("reward/expected.json"));
    let (model, data) = (fixtures().join("reward/model"), fixtures().join("dpo/prefs.jsonl"));
    for (variant, extra) in [("center_none", vec![]), ("center_0.01", vec!["--center-rewards-coefficient", "0.01"])] {
        let mut args = vec!["eval", "--objective", "reward", "--template", "chatml", "--json", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()];
        args.extend(extra);
        let (c, out, err) = ft(&args);
        assert_eq!(c, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let want = &o["loss_variants"][variant];
        let close = |got: f64, w: f64, what: &str| assert!((got - w).abs() <= 1e-5 * w.abs().max(1e-3), "{variant} {what}: {got} vs {w}");
        close(v["loss"].as_f64().unwrap(), want["loss"].as_f64().unwrap(), "loss");
        for (k, w) in want["metrics"].as_object().unwrap() {
            close(v[k].as_f64().unwrap(), w.as_f64().unwrap(), k);
        }
    }
    // A causal LM has no score head: a clear error, exit 1.
    let (c, _, err) = ft(&["eval", "--objective", "reward", "--template", "chatml", "--model", model_dir("llama").to_str().unwrap(), "--data", data.to_str().unwrap()]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("no score head") && err.contains("llama"), "{err}");
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

fn close(got: f64, want: f64, rel: f64, what: &str) {
    assert!((got - want).abs() <= rel * want.abs().max(1e-3), "{what}: {got} vs {want}");
}

/// `dpo/prefs.jsonl` with the oracle's `margin` column added.
fn prefs_with_margins(dir: &std::path::Path, margins: &[f64]) -> std::path::PathBuf {
    let text = std::fs::read_to_string(fixtures().join("dpo/prefs.jsonl")).unwrap();
    let lines: Vec<String> = text
        .lines()
        .zip(margins)
        .map(|(l, m)| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["margin"] = (*m).into();
            v.to_string()
        })
        .collect();
    let p = dir.join("prefs-margin.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

#[test]
fn the_margin_column_enters_the_loss_not_the_metrics() {
    let o = json(&fixtures().join("reward/expected.json"));
    let want = &o["loss_variants"]["margin"];
    let margins: Vec<f64> = want["margins"].as_array().unwrap().iter().map(|m| m.as_f64().unwrap()).collect();
    let data = prefs_with_margins(&scratch("reward-margin"), &margins);
    let model = fixtures().join("reward/model");
    let (c, out, err) = ft(&["eval", "--objective", "reward", "--template", "chatml", "--json", "--model", s(&model), "--data", s(&data)]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    close(v["loss"].as_f64().unwrap(), want["loss"].as_f64().unwrap(), 1e-5, "loss with margins");
    for (k, w) in want["metrics"].as_object().unwrap() {
        close(v[k].as_f64().unwrap(), w.as_f64().unwrap(), 1e-5, k);
    }
}

#[test]
fn a_seq_cls_lora_adapter_scores_as_peft() {
    // PEFT's SEQ_CLS adapter: LoRA on every linear of the blocks and a trained copy of the
    // `score` head (`modules_to_save`, written ["score", "classifier", "score"]).
    let o = json(&fixtures().join("reward/expected.json"));
    let (model_path, adapter) = (fixtures().join("reward/model"), fixtures().join("reward/adapter"));
    let mut model = ft::model::load::<ft::backend::Cpu>(&model_path, &Default::default(), Default::default()).unwrap();
    let a = ft::adapters::peft::PeftAdapter::open(&adapter).unwrap();
    assert_eq!(a.attach(&mut model).unwrap(), 15, "14 LoRA projections and the score head");
    let tok = ft::data::tokenizer::TextTokenizer::from_dir(&model_path).unwrap();
    let template = tok.template(ft::data::tokenizer::TemplateChoice::Chatml).unwrap();
    let (pairs, _, _) = ft::data::prepare::pairs(&tok, &template, &fixtures().join("dpo/prefs.jsonl"), &prepare_options(4096)).unwrap();
    let got = ft::loss::reward::score_pairs(&model, &pairs);
    for (g, w) in got.iter().zip(o["adapter"]["pairs"].as_array().unwrap()) {
        for (side, r) in [("chosen", g.chosen), ("rejected", g.rejected)] {
            let want = w[side]["reward"].as_f64().unwrap();
            assert!((r - want).abs() <= 1e-4, "{side} reward {r} vs PEFT's {want}");
        }
    }
    // The same through `ft eval --adapter`: TRL's loss and metrics on the PeftModel.
    let data = fixtures().join("dpo/prefs.jsonl");
    let (c, out, err) = ft(&["eval", "--objective", "reward", "--template", "chatml", "--json", "--model", s(&model_path), "--adapter", s(&adapter), "--data", s(&data)]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    close(v["loss"].as_f64().unwrap(), o["adapter"]["loss_center_none"].as_f64().unwrap(), 1e-5, "adapter loss");
    for (k, w) in o["adapter"]["metrics_center_none"].as_object().unwrap() {
        close(v[k].as_f64().unwrap(), w.as_f64().unwrap(), 1e-5, k);
    }
}

#[test]
fn reward_gradient_matches_trl_per_tensor() {
    // ∂loss/∂θ for every trainable tensor of the PeftModel (LoRA A/B and the score copy) against
    // `reward/grad_adapter.safetensors`, through the functions training uses.
    use burn::tensor::Tensor;
    type B = burn::backend::Autodiff<ft::backend::Cpu>;
    let o = json(&fixtures().join("reward/expected.json"));
    let model_path = fixtures().join("reward/model");
    let mut model = ft::model::load::<B>(&model_path, &Default::default(), Default::default()).unwrap();
    let a = ft::adapters::peft::PeftAdapter::open(&fixtures().join("reward/adapter")).unwrap();
    a.attach(&mut model).unwrap();
    ft::adapters::attach::make_trainable(&mut model, 0.0);
    let tok = ft::data::tokenizer::TextTokenizer::from_dir(&model_path).unwrap();
    let template = tok.template(ft::data::tokenizer::TemplateChoice::Chatml).unwrap();
    let (pairs, _, _) = ft::data::prepare::pairs(&tok, &template, &fixtures().join("dpo/prefs.jsonl"), &prepare_options(4096)).unwrap();
    let n = pairs.len();
    let sides: Vec<&[u32]> = pairs.iter().map(|p| p.chosen.ids.as_slice()).chain(pairs.iter().map(|p| p.rejected.ids.as_slice())).collect();
    let (ids, positions) = ft::loss::reward::score_batch(&model, &sides, &Default::default());
    let r: Tensor<B, 1> = model.scores_at(model.hidden(ids, None), positions).reshape([2 * n]);
    let cfg = ft::loss::reward::RewardConfig::default();
    let loss = cfg.loss_tensor(r.clone().narrow(0, 0, n), r.narrow(0, n, n), &vec![0.0; n]) / n as f64;
    let grads = loss.backward();
    let (mut sq, mut checked) = (0.0f64, 0);
    let file = fixtures().join("reward/grad_adapter.safetensors");
    for (name, p) in model.projections_mut() {
        let Some(adapter) = &p.adapter else { continue };
        let names: Vec<String> = match adapter {
            ft::model::projection::Adapter::Lora(_) | ft::model::projection::Adapter::Dora(_) => {
                let (an, bn) = ft::formats::peft::tensor_names(&name);
                vec![an, bn]
            }
            ft::model::projection::Adapter::Full(_) => vec![ft::formats::peft::saved_module_name(&name)],
        };
        for (t, key) in adapter.tensors().into_iter().zip(names) {
            // ft holds [in, out] (A, B, the head); PEFT's files [out, in].
            let g = t.val().grad(&grads).unwrap();
            let [rows, cols] = g.dims();
            let g: Vec<f32> = g.into_data().convert::<f32>().to_vec().unwrap();
            let g = ft::model::projection::transpose(&g, rows, cols);
            let (want, _) = read_f32(&file, &key);
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            assert!(max_abs_diff(&g, &want) <= 1e-4 * scale.max(1.0), "{key}: max diff {} (largest {scale})", max_abs_diff(&g, &want));
            sq += g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>();
            checked += 1;
        }
    }
    assert_eq!(checked, 29, "all LoRA tensors and the score copy");
    let want = o["adapter"]["grad_norm"]["value"].as_f64().unwrap();
    close(sq.sqrt(), want, 1e-4, "grad norm");
}

fn reward_recipe(dir: &std::path::Path, model: &std::path::Path, adapter: Option<&std::path::Path>, train: &str) -> std::path::PathBuf {
    let r = dir.join("recipe.toml");
    let data = fixtures().join("dpo/prefs.jsonl");
    let adapter = adapter.map(|a| format!("adapter = \"{}\"\n", a.display())).unwrap_or_default();
    std::fs::write(
        &r,
        format!(
            "[model]\npath = \"{}\"\n{adapter}[data]\ntrain = \"{}\"\neval = \"{}\"\ntemplate = \"chatml\"\n[lora]\nr = 4\nalpha = 8\ntarget_modules = [\"all-linear\"]\n\
             [train]\nmethod = \"reward\"\nmicro_batch_size = 3\nseed = 1\n{train}\n[output]\ndir = \"{}\"\n",
            model.display(),
            data.display(),
            data.display(),
            dir.join("run").display()
        ),
    )
    .unwrap();
    r
}

fn metrics(run: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_reward_training_step_has_trls_loss_and_gradient() {
    // `ft train` from PEFT's SEQ_CLS adapter: the first step's loss, metrics and gradient norm
    // (all 29 trainable tensors, before clipping) are TRL's on that PeftModel.
    let d = scratch("reward-step");
    let o = json(&fixtures().join("reward/expected.json"));
    let r = reward_recipe(&d, &fixtures().join("reward/model"), Some(&fixtures().join("reward/adapter")), "max_steps = 1\nlr = 1e-6");
    let (c, _, err) = ft(&["train", s(&r), "--quiet"]);
    assert_eq!(c, 0, "{err}");
    let first = &metrics(&d.join("run"))[0];
    close(first["loss"].as_f64().unwrap(), o["adapter"]["loss_center_none"].as_f64().unwrap(), 1e-5, "loss");
    close(first["grad_norm"].as_f64().unwrap(), o["adapter"]["grad_norm"]["value"].as_f64().unwrap(), 1e-4, "grad_norm");
    for k in ["accuracy", "margin", "min_reward", "mean_reward", "max_reward"] {
        close(first[k].as_f64().unwrap(), o["adapter"]["metrics_center_none"][k].as_f64().unwrap(), 1e-5, k);
    }
}

#[test]
fn a_reward_model_trained_from_a_causal_lm_ranks_the_pairs_and_merges() {
    // From the causal `models/llama`: a fresh score head (N(0, 0.02²), trained in full) and LoRA
    // on the blocks learn to rank the three training pairs.
    let d = scratch("reward-train");
    let r = reward_recipe(&d, &model_dir("llama"), None, "max_steps = 30\nlr = 2e-2\neval_every = 30\neval_on_start = true");
    let (c, _, err) = ft(&["train", s(&r), "--quiet"]);
    assert_eq!(c, 0, "{err}");
    let m = metrics(&d.join("run"));
    // eval_on_start: the untrained model's eval, logged as step 0.
    assert_eq!(m[0]["step"], 0, "{}", m[0]);
    assert!((m[0]["eval_loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 0.02, "{}", m[0]);
    let m = &m[1..];
    let first_loss = m[0]["loss"].as_f64().unwrap();
    // The fresh head scores everything near 0: the loss starts at about ln 2.
    assert!((first_loss - std::f64::consts::LN_2).abs() < 0.02, "{first_loss}");
    let last = m.iter().rfind(|l| l.get("eval_loss").is_some()).unwrap();
    assert_eq!(last["eval_accuracy"].as_f64().unwrap(), 1.0, "{last}");
    let eval_loss = last["eval_loss"].as_f64().unwrap();
    assert!(eval_loss < 0.2, "{last}");
    // The adapter is PEFT's SEQ_CLS layout: the head saved whole under its module name.
    let adapter = d.join("run/adapter");
    let cfg = json(&adapter.join("adapter_config.json"));
    assert_eq!(cfg["task_type"], "SEQ_CLS");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier", "score"]));
    let (_, shape) = read_f32(&adapter.join("adapter_model.safetensors"), "base_model.model.score.weight");
    assert_eq!(shape, vec![1, 64]);
    // Loaded back onto the causal base (as PEFT onto AutoModelForSequenceClassification), it
    // scores what training's last eval measured.
    let data = fixtures().join("dpo/prefs.jsonl");
    let eval = |model: &std::path::Path, adapter: Option<&std::path::Path>| {
        let mut args = vec!["eval", "--objective", "reward", "--template", "chatml", "--json", "--model", s(model), "--data", s(&data)];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        let (c, out, err) = ft(&args);
        assert_eq!(c, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let v = eval(&model_dir("llama"), Some(&adapter));
    close(v["loss"].as_f64().unwrap(), eval_loss, 1e-5, "ft eval --adapter vs the run's eval");
    // Merged: a checkpoint transformers loads as LlamaForSequenceClassification.
    let merged = d.join("merged");
    let (c, _, err) = ft(&["merge", "--model", s(&model_dir("llama")), "--adapter", s(&adapter), "--out", s(&merged)]);
    assert_eq!(c, 0, "{err}");
    let config = json(&merged.join("config.json"));
    assert_eq!(config["architectures"], serde_json::json!(["LlamaForSequenceClassification"]));
    assert_eq!((config["id2label"]["0"].as_str(), config["pad_token_id"].as_u64()), (Some("LABEL_0"), Some(0)));
    let names: Vec<String> = ft::formats::safetensors::TensorFiles::open(&merged).unwrap().names().map(String::from).collect();
    assert!(names.contains(&"score.weight".to_string()) && !names.contains(&"lm_head.weight".to_string()), "{names:?}");
    let v = eval(&merged, None);
    close(v["loss"].as_f64().unwrap(), eval_loss, 1e-4, "the merged model's loss");
    assert_eq!(v["accuracy"].as_f64().unwrap(), 1.0);
}

/// `ft score` on a JSONL file; returns its records.
fn score(args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["score"];
    all.extend(args);
    let (c, out, err) = ft(&all);
    assert_eq!(c, 0, "{err}");
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn ft_score_gives_transformers_rewards_in_every_record_format() {
    let o = json(&fixtures().join("reward/expected.json"));
    let (model, adapter) = (fixtures().join("reward/model"), fixtures().join("reward/adapter"));
    let prefs = fixtures().join("dpo/prefs.jsonl");
    // Preference pairs: both sides, with the model's own chat template.
    let pairs = score(&["--model", s(&model), "--data", s(&prefs)]);
    let want = o["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), want.len());
    for (g, w) in pairs.iter().zip(want) {
        for side in ["chosen", "rejected"] {
            let (got, want) = (g[format!("reward_{side}")].as_f64().unwrap(), w[side]["reward"].as_f64().unwrap());
            assert!((got - want).abs() <= 1e-4, "{side}: {got} vs {want}");
        }
    }
    // With the SEQ_CLS adapter: PEFT's rewards.
    let with_adapter = score(&["--model", s(&model), "--adapter", s(&adapter), "--data", s(&prefs)]);
    for (g, w) in with_adapter.iter().zip(o["adapter"]["pairs"].as_array().unwrap()) {
        let (got, want) = (g["reward_chosen"].as_f64().unwrap(), w["chosen"]["reward"].as_f64().unwrap());
        assert!((got - want).abs() <= 1e-4, "adapter: {got} vs {want}");
    }
    // The first pair's chosen side as a conversation, as prompt + completion, and as raw text:
    // the same reward.
    let d = scratch("score-formats");
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&prefs).unwrap().lines().next().unwrap()).unwrap();
    let conversation = [first["prompt"].as_array().unwrap().clone(), first["chosen"].as_array().unwrap().clone()].concat();
    let tok = ft::data::tokenizer::TextTokenizer::from_dir(&model).unwrap();
    let text = tok.decode(&ids(&want[0]["chosen"]["input_ids"])).unwrap();
    let lines = [
        serde_json::json!({"messages": conversation, "id": "a"}),
        serde_json::json!({"prompt": first["prompt"], "completion": first["chosen"]}),
        serde_json::json!({"text": text}),
    ];
    let data = d.join("records.jsonl");
    std::fs::write(&data, lines.iter().map(|l| l.to_string()).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    let out = d.join("out.jsonl");
    let (c, summary, err) = ft(&["score", "--model", s(&model), "--data", s(&data), "--out", s(&out), "--json"]);
    assert_eq!(c, 0, "{err}");
    let got: Vec<serde_json::Value> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(got[0]["id"], "a", "records come back with their fields");
    let want = want[0]["chosen"]["reward"].as_f64().unwrap();
    for g in &got {
        assert!((g["reward"].as_f64().unwrap() - want).abs() <= 1e-4, "{g} vs {want}");
    }
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(summary["records"], 3);
}

#[test]
fn ft_score_refuses_a_model_without_a_score_head_and_a_bad_line() {
    let d = scratch("score-bad");
    let out = d.join("out.jsonl");
    let prefs = fixtures().join("dpo/prefs.jsonl");
    let (c, _, err) = ft(&["score", "--model", s(&model_dir("llama")), "--data", s(&prefs), "--out", s(&out)]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("not a reward model") && err.contains("llama"), "{err}");
    let data = d.join("bad.jsonl");
    std::fs::write(&data, "{\"text\": \"fine\"}\n{\"prompt\": \"no completion\"}\n").unwrap();
    let (c, _, err) = ft(&["score", "--model", s(&fixtures().join("reward/model")), "--data", s(&data), "--out", s(&out)]);
    assert_eq!(c, 3, "{err}");
    assert!(err.contains("bad.jsonl:2"), "{err}");
    assert!(!out.exists(), "nothing written");
}

/// `name`'s checkpoint rewritten as a `*ForSequenceClassification` whose two labels are rows `rows`
/// of its output head (`lm_head`, or the embeddings when tied).
fn classifier_from(name: &str, rows: [usize; 2]) -> std::path::PathBuf {
    let src = model_dir(name);
    let out = scratch(&format!("seqcls-{name}"));
    for f in std::fs::read_dir(&src).unwrap() {
        let p = f.unwrap().path();
        let n = p.file_name().unwrap().to_str().unwrap().to_string();
        if !n.ends_with(".safetensors") {
            std::fs::copy(&p, out.join(&n)).unwrap();
        }
    }
    let mut config = json(&src.join("config.json"));
    let arch = config["architectures"][0].as_str().unwrap().replace("ForCausalLM", "ForSequenceClassification");
    config["architectures"] = serde_json::json!([arch]);
    config["id2label"] = serde_json::json!({"0": "LABEL_0", "1": "LABEL_1"});
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let head = if st.names().contains(&"lm_head.weight") { "lm_head.weight" } else { "model.embed_tokens.weight" };
    let view = st.tensor(head).unwrap();
    let h = view.shape()[1];
    let score: Vec<u8> = rows.iter().flat_map(|&r| view.data()[r * h * 4..(r + 1) * h * 4].to_vec()).collect();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView)> =
        st.tensors().into_iter().filter(|(n, _)| n != "lm_head.weight").collect();
    tensors.push(("score.weight".into(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, h], &score).unwrap()));
    std::fs::write(out.join("model.safetensors"), safetensors::serialize(tensors, None).unwrap()).unwrap();
    out
}

#[test]
fn qwen_and_mistral_sequence_classifiers_score_as_their_heads() {
    // A classifier whose labels are two rows of the causal head scores each sequence with those
    // two logits at its last token: transformers' expected logits of the causal model.
    let cases = json(&fixtures().join("chat_tokens.json"));
    let rows = [17, 900];
    for name in ["qwen3", "mistral"] {
        let dir = classifier_from(name, rows);
        let model = ft::model::load::<ft::backend::Cpu>(&dir, &Default::default(), Default::default()).unwrap();
        assert_eq!(model.config.num_labels, Some(2), "{name}");
        let expected = model_dir(name).join("expected_logits.safetensors");
        for (i, case) in cases.as_array().unwrap().iter().enumerate() {
            let ids = ids(&case["input_ids"]);
            let t = ids.len();
            let input = Tensor::<ft::backend::Cpu, 2, Int>::from_data(TensorData::new(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, t]), &Default::default());
            let got: Vec<f32> = model.sequence_scores(input).into_data().convert::<f32>().to_vec().unwrap();
            let (want, shape) = read_f32(&expected, &format!("logits_{i}"));
            let last = &want[(t - 1) * shape[1]..t * shape[1]];
            for (k, &r) in rows.iter().enumerate() {
                assert!((got[k] - last[r]).abs() <= 1e-4, "{name} case {i} label {k}: {} vs {}", got[k], last[r]);
            }
        }
    }
}
