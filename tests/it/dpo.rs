//! DPO: `ft eval --dpo` reproduces TRL's numbers on the oracle pairs (positions, log-probs, every
//! loss type and metric); `ft train` with `method = "dpo"` starts at ln 2 with zero rewards and
//! raises the reward margin; bad pairs are located errors or warnings.

use std::path::{Path, PathBuf};

use super::common::*;

fn oracle() -> serde_json::Value {
    json(&fixtures().join("dpo/expected.json"))
}

fn eval_dpo(extra: &[&str]) -> serde_json::Value {
    let model = model_dir("llama");
    let adapter = fixtures().join("adapters/lora-r4");
    let data = fixtures().join("dpo/prefs.jsonl");
    let mut args = vec![
        "eval", "--dpo", "--json", "--per-pair", "--template", "chatml", "--model", model.to_str().unwrap(), "--adapter",
        adapter.to_str().unwrap(), "--data", data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (c, out, err) = ft(&args);
    assert_eq!(c, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn close(got: f64, want: f64, rel: f64, what: &str) {
    assert!((got - want).abs() <= rel * want.abs().max(1e-12), "{what}: {got} vs {want} (rel {:.2e})", (got - want).abs() / want.abs());
}

#[test]
fn eval_dpo_matches_trl_on_the_oracle_pairs() {
    let want = oracle();
    let got = eval_dpo(&[]);
    let pairs = want["pairs"].as_array().unwrap();
    assert_eq!(got["pairs"].as_u64().unwrap() as usize, pairs.len());
    for (i, (g, w)) in got["per_pair"].as_array().unwrap().iter().zip(pairs).enumerate() {
        for side in ["chosen", "rejected"] {
            let (g, w) = (&g[side], &w[side]);
            assert_eq!(ids(&g["input_ids"]), ids(&w["input_ids"]), "pair {i} {side} ids");
            assert_eq!(g["completion_positions"], w["completion_positions"], "pair {i} {side} positions");
            assert_eq!(g["tokens"], w["tokens"], "pair {i} {side} tokens");
            for k in ["logp_policy", "logp_ref"] {
                let (a, b) = (g[k].as_f64().unwrap(), w[k].as_f64().unwrap());
                assert!((a - b).abs() <= 1e-4, "pair {i} {side} {k}: {a} vs {b}");
            }
        }
    }
    for loss in ["sigmoid", "hinge", "ipo"] {
        close(got["losses"][loss].as_f64().unwrap(), want["loss"][loss].as_f64().unwrap(), 1e-5, loss);
    }
    close(got["loss"].as_f64().unwrap(), want["loss"]["sigmoid"].as_f64().unwrap(), 1e-5, "loss");
    let smoothed = eval_dpo(&["--label-smoothing", &want["robust_label_smoothing"].to_string()]);
    close(smoothed["losses"]["robust"].as_f64().unwrap(), want["loss"]["robust"].as_f64().unwrap(), 1e-5, "robust");
    // Metrics: the log-probs agree to f32 rounding (≤ 1e-4 absolute on sums of ~-180), so the
    // rewards, β × differences of those sums, are held to 1e-5 relative or β·1e-4 absolute.
    let beta = want["beta"].as_f64().unwrap();
    for (k, w) in want["metrics"].as_object().unwrap() {
        let (g, w) = (got[k].as_f64().unwrap_or_else(|| panic!("no {k}")), w.as_f64().unwrap());
        let tol = (1e-5 * w.abs()).max(if k.starts_with("rewards/") { beta * 1e-4 } else { 1e-5 * w.abs() });
        assert!((g - w).abs() <= tol, "{k}: {g} vs {w}");
    }
}

/// The oracle pairs plus five "count to N" pairs (chosen right, rejected wrong).
fn prefs(dir: &Path) -> PathBuf {
    let mut lines: Vec<String> =
        std::fs::read_to_string(fixtures().join("dpo/prefs.jsonl")).unwrap().lines().map(String::from).collect();
    for i in 1..6 {
        let right = (1..=i).map(|k| k.to_string()).collect::<Vec<_>>().join(", ");
        lines.push(format!(r#"{{"prompt": "Count to {i}.", "chosen": "{right}", "rejected": "{}"}}"#, i + 7));
    }
    let p = dir.join("prefs.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn dpo_run(name: &str, dpo: &str) -> (PathBuf, Vec<serde_json::Value>) {
    dpo_run_with(name, dpo, "", "")
}

/// A DPO run of the tiny llama on [`prefs`]; `model` and `train` add keys to the `[model]` and
/// `[train]` sections.
fn dpo_run_with(name: &str, dpo: &str, model: &str, train: &str) -> (PathBuf, Vec<serde_json::Value>) {
    let d = scratch(name);
    let data = prefs(&d);
    let r = d.join("recipe.toml");
    std::fs::write(
        &r,
        format!(
            "[model]\npath = \"{}\"\n{model}\n[data]\ntrain = \"{}\"\neval = \"{}\"\ntemplate = \"chatml\"\n[lora]\nr = 4\nalpha = 8\n\
             [train]\nmethod = \"dpo\"\nmax_steps = 8\nmicro_batch_size = 4\ngrad_accum = 2\nlr = 1e-2\nseed = 5\n{train}\n[dpo]\n{dpo}\n[output]\ndir = \"{}\"\n",
            model_dir("llama").display(),
            data.display(),
            data.display(),
            d.join("run").display()
        ),
    )
    .unwrap();
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet"]);
    assert_eq!(c, 0, "{err}");
    let m = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (d, m)
}

#[test]
fn dpo_training_starts_at_ln2_and_raises_the_margin() {
    let (d, m) = dpo_run("dpo-train", "beta = 0.1");
    let first = &m[0];
    assert!((first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{first}");
    for k in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"] {
        assert_eq!(first[k].as_f64(), Some(0.0), "step 0 {k}: B = 0 makes the policy the reference");
    }
    for k in ["logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "num_tokens", "epoch"] {
        assert!(first.get(k).is_some(), "metrics lack {k}");
    }
    let eval = m.iter().rfind(|l| l.get("eval_loss").is_some()).expect("an eval line");
    for k in ["eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies", "eval_logps/chosen", "eval_logps/rejected"] {
        assert!(eval.get(k).is_some(), "eval metrics lack {k}");
    }
    assert!(eval["eval_loss"].as_f64().unwrap() < 0.6, "{eval}");
    assert!(eval["eval_rewards/margins"].as_f64().unwrap() > 0.05, "{eval}");
    assert!(eval["eval_rewards/accuracies"].as_f64().unwrap() >= 0.75, "{eval}");
    // The written adapter, evaluated by `ft eval --dpo`, gives the run's final eval metrics.
    let model = model_dir("llama");
    let (c, out, err) = ft(&[
        "eval", "--dpo", "--json", "--template", "chatml", "--model", model.to_str().unwrap(), "--adapter",
        d.join("run/adapter").to_str().unwrap(), "--data", d.join("prefs.jsonl").to_str().unwrap(),
    ]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    close(v["loss"].as_f64().unwrap(), eval["eval_loss"].as_f64().unwrap(), 1e-5, "eval loss of the saved adapter");
}

#[test]
fn precomputed_reference_gives_the_same_run() {
    let (_, a) = dpo_run("dpo-live-ref", "beta = 0.2\nloss_type = \"ipo\"");
    let (d, b) = dpo_run("dpo-cached-ref", "beta = 0.2\nloss_type = \"ipo\"\nprecompute_ref = true");
    let cache = json(&d.join("run/reference_logps.json"));
    let bits = cache["bits"].as_array().unwrap();
    assert_eq!(bits.len(), 8);
    assert!(bits.iter().all(|b| b.as_array().is_some_and(|v| v.len() == 2)), "both sides of every pair");
    same_falling_losses(&a, &b);
}

/// Both runs logged 8 step losses, equal to 1e-5 relative, and falling.
fn same_falling_losses(a: &[serde_json::Value], b: &[serde_json::Value]) {
    let losses = |m: &[serde_json::Value]| m.iter().filter_map(|l| l["loss"].as_f64()).collect::<Vec<_>>();
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), 8);
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-5 * x.abs().max(1.0), "{la:?} vs {lb:?}");
    }
    assert!(la.last() < la.first(), "the loss falls: {la:?}");
}

#[test]
fn gradient_checkpointing_gives_the_same_dpo_run() {
    let (a, ma) = dpo_run_with("dpo-gc-off", "beta = 0.1", "", "");
    let (b, mb) = dpo_run_with("dpo-gc-on", "beta = 0.1", "", "gradient_checkpointing = true");
    same_falling_losses(&ma, &mb);
    let tensors = |d: &Path| {
        let bytes = std::fs::read(d.join("run/adapter/adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut v: Vec<(String, Vec<f32>)> = st.tensors().into_iter().map(|(n, t)| (n, ft::formats::safetensors::to_f32(t.data(), t.dtype()).unwrap())).collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    for ((n, x), (_, y)) in tensors(&a).iter().zip(&tensors(&b)) {
        assert!(max_abs_diff(x, y) <= 1e-5, "{n}: {}", max_abs_diff(x, y));
    }
}

#[test]
fn bad_pairs_are_located_errors_or_warnings() {
    let d = scratch("dpo-bad");
    let model = model_dir("llama");
    let run = |lines: &str| {
        let p = d.join("p.jsonl");
        std::fs::write(&p, lines).unwrap();
        ft(&["eval", "--dpo", "--template", "chatml", "--model", model.to_str().unwrap(), "--data", p.to_str().unwrap()])
    };
    let ok = r#"{"prompt": "q", "chosen": "a", "rejected": "b"}"#;
    let (c, _, err) = run(&format!("{ok}\n{}\n", r#"{"prompt": "q", "chosen": "", "rejected": "b"}"#));
    assert_eq!(c, 3, "{err}");
    assert!(err.contains("p.jsonl:2") && err.contains("empty completion"), "{err}");
    let (c, _, err) = run(&format!("{ok}\n{}\n", r#"{"prompt": "q", "chosen": "same", "rejected": "same"}"#));
    assert_eq!(c, 0, "{err}");
    assert!(err.contains("p.jsonl:2") && err.contains("identical"), "{err}");
    let (c, _, err) = run(&format!("{ok}\n{}\n", r#"{"prompt": "q", "chosen": "a"}"#));
    assert_eq!(c, 3, "{err}");
    assert!(err.contains("p.jsonl:2") && err.contains("\"rejected\" is missing"), "{err}");
}

#[test]
fn dpo_runs_on_a_quantized_base() {
    // QLoRA + DPO: the reference is the NF4 base with the adapter off.
    let (_, m) = dpo_run_with("dpo-qlora", "beta = 0.1", "quantize = \"nf4\"", "");
    assert!((m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6);
    let eval = m.iter().rfind(|l| l.get("eval_loss").is_some()).unwrap();
    assert!(eval["eval_loss"].as_f64().unwrap() < 0.6 && eval["eval_rewards/margins"].as_f64().unwrap() > 0.05, "{eval}");
}

#[test]
fn dpo_resumes_to_the_same_bytes() {
    // A run that fails writing checkpoint-4 resumes from checkpoint-2 (with its cached reference
    // log-probs) and ends where an uninterrupted run ends.
    let dpo = "beta = 0.1\nprecompute_ref = true";
    let (a, _) = dpo_run("dpo-resume-ref", dpo);
    let d = scratch("dpo-resume");
    let data = prefs(&d);
    let r = d.join("recipe.toml");
    std::fs::write(
        &r,
        std::fs::read_to_string(a.join("recipe.toml"))
            .unwrap()
            .replace(&a.join("prefs.jsonl").display().to_string(), &data.display().to_string())
            .replace(&a.join("run").display().to_string(), &d.join("run").display().to_string())
            .replace("[dpo]", "save_every = 2\n[dpo]"),
    )
    .unwrap();
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet"]);
    assert_eq!(c, 0, "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ft"))
        .args(["train", r.to_str().unwrap(), "--quiet", "--output", d.join("run2").to_str().unwrap()])
        .env("FT_FAIL_CHECKPOINT_AT", "4")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--resume", "--output", d.join("run2").to_str().unwrap()]);
    assert_eq!(c, 0, "{err}");
    let bytes = |p: PathBuf| std::fs::read(p.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(bytes(d.join("run")) == bytes(d.join("run2")), "resumed DPO adapter differs");
    assert!(bytes(a.join("run")) == bytes(d.join("run")), "save_every changed the result");
    // The second and third runs read the pairs' tokens from the cache the first one wrote.
    assert_eq!(std::fs::read_dir(d.join(".ft-cache")).unwrap().count(), 1);
}

#[test]
fn eval_objective_dpo_is_the_dpo_alias_and_dpo_flags_need_it() {
    let model = model_dir("llama");
    let adapter = fixtures().join("adapters/lora-r4");
    let data = fixtures().join("dpo/prefs.jsonl");
    let base = ["eval", "--json", "--template", "chatml", "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap()];
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = base.to_vec();
        args.extend_from_slice(extra);
        ft(&args)
    };
    let (c, by_value, err) = run(&["--objective", "dpo", "--data", data.to_str().unwrap()]);
    assert_eq!(c, 0, "{err}");
    let (c, by_alias, err) = run(&["--dpo", "--data", data.to_str().unwrap()]);
    assert_eq!(c, 0, "{err}");
    let strip = |s: &str| {
        let mut v: serde_json::Value = serde_json::from_str(s).unwrap();
        v.as_object_mut().unwrap().remove("seconds");
        v
    };
    assert_eq!(strip(&by_value), strip(&by_alias));
    assert!(strip(&by_value)["rewards/accuracies"].is_number());
    // A DPO setting without the DPO objective is a usage error naming the flag.
    let chat = fixtures().join("chat.jsonl");
    let (c, _, err) = run(&["--beta", "0.2", "--data", chat.to_str().unwrap()]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("--beta") && err.contains("--objective dpo"), "{err}");
}

#[test]
fn dpo_from_an_adapter_uses_it_frozen_as_the_reference() {
    // Start from a PEFT adapter (the SFT → DPO pipeline): with the default reference, the
    // frozen starting adapter, the policy equals the reference at step 0: loss ln 2, rewards 0.
    let start = fixtures().join("adapters/lora-r4");
    let before = std::fs::read(start.join("adapter_model.safetensors")).unwrap();
    let model = format!("adapter = \"{}\"", start.display());
    let (d, m) = dpo_run_with("dpo-from-adapter", "beta = 0.1", &model, "");
    assert!((m[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{}", m[0]);
    assert_eq!(m[0]["rewards/margins"].as_f64(), Some(0.0));
    let last = m.iter().rfind(|l| l.get("loss").is_some()).unwrap();
    assert!(last["loss"].as_f64().unwrap() < std::f64::consts::LN_2 - 0.05, "{last}");
    // With the base as the reference the same policy is already far from it.
    let (_, base) = dpo_run_with("dpo-from-adapter-base", "beta = 0.1\nreference = \"base\"", &model, "");
    assert!((base[0]["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() > 1e-3, "{}", base[0]);
    assert!(base[0]["rewards/margins"].as_f64().unwrap().abs() > 1e-3, "{}", base[0]);
    // The run continued the adapter (its rank and alpha) and left the starting one untouched.
    let cfg = json(&d.join("run/adapter/adapter_config.json"));
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(4), Some(8.0)));
    assert_eq!(std::fs::read(start.join("adapter_model.safetensors")).unwrap(), before);
    // The frozen reference records no autodiff graph: its forwards (every precomputed pair, every
    // step's reference) hold no activations for a backward that never comes (one SmolLM2 run
    // precomputing 240 pairs grew to 23 GB before this).
    type Ad = burn::backend::Autodiff<ft::backend::Cpu>;
    let mut model = load_on::<Ad>("llama");
    let peft = ft::adapters::peft::PeftAdapter::open(&start).unwrap();
    peft.attach(&mut model).unwrap();
    ft::adapters::attach::make_trainable(&mut model, 0.0);
    assert!(peft.attach_reference(&mut model).unwrap() > 0);
    let ids = burn::tensor::Tensor::<Ad, 2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(vec![1i64, 2, 3], [1, 3]), &Default::default());
    let tracked = |model: &mut ft::model::Decoder<Ad>| {
        let grads = model.forward(ids.clone(), None).sum().backward();
        let mut n = 0;
        for (_, p) in model.projections_mut() {
            if let Some(l) = p.lora() {
                n += usize::from(l.a.val().grad(&grads).is_some()) + usize::from(l.b.val().grad(&grads).is_some());
            }
        }
        n
    };
    assert!(tracked(&mut model) > 0, "the policy is tracked");
    model.set_reference(true);
    assert_eq!(tracked(&mut model), 0, "the reference is not");
    model.set_reference(false);
    // `reference = "adapter"` without a starting adapter is a recipe error naming the key.
    let d = scratch("dpo-reference-without-adapter");
    let r = d.join("recipe.toml");
    std::fs::write(
        &r,
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"x.jsonl\"\n[train]\nmethod = \"dpo\"\n[dpo]\nreference = \"adapter\"\n[output]\ndir = \"{}\"\n",
            model_dir("llama").display(),
            d.join("run").display()
        ),
    )
    .unwrap();
    let (c, _, err) = ft(&["train", r.to_str().unwrap()]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("dpo.reference"), "{err}");
}
