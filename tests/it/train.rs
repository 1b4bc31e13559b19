//! `ft train` (SFT with LoRA) on the tiny llama oracle: the loss falls, the written adapter is a
//! PEFT adapter that reproduces the run's eval loss, gradient accumulation equals one big batch,
//! and the same seed gives the same bytes.

use std::path::{Path, PathBuf};

use super::common::*;


/// Eight conversations: chat.jsonl's three plus variants.
fn eight(dir: &Path) -> PathBuf {
    let base = std::fs::read_to_string(fixtures().join("chat.jsonl")).unwrap();
    let mut lines: Vec<String> = base.lines().map(String::from).collect();
    for i in 0..5 {
        lines.push(format!(
            r#"{{"messages": [{{"role": "user", "content": "Count to {i}."}}, {{"role": "assistant", "content": "{}"}}]}}"#,
            (0..=i).map(|k| k.to_string()).collect::<Vec<_>>().join(", ")
        ));
    }
    let p = dir.join("eight.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn recipe(dir: &Path, data: &Path, train: &str) -> PathBuf {
    let p = dir.join("recipe.toml");
    std::fs::write(
        &p,
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\neval = \"{}\"\ntemplate = \"chatml\"\n[lora]\nr = 4\nalpha = 8\n[train]\n{train}\n[output]\ndir = \"{}\"\n",
            model_dir("llama").display(),
            data.display(),
            data.display(),
            dir.join("run").display()
        ),
    )
    .unwrap();
    p
}

/// Trains in a fresh scratch directory with `train` as the [train] section plus extra CLI args;
/// asserts success and returns the directory (the run is in `DIR/run`).
fn train_ok(name: &str, train: &str, extra: &[&str]) -> PathBuf {
    let d = scratch(name);
    let data = eight(&d);
    let r = recipe(&d, &data, train);
    let mut args = vec!["train", r.to_str().unwrap(), "--quiet"];
    args.extend_from_slice(extra);
    let (c, _, err) = ft(&args);
    assert_eq!(c, 0, "{err}");
    d
}

fn adapter_tensors(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("run/adapter/adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> =
        st.tensors().into_iter().map(|(n, t)| (n, ft::formats::safetensors::to_f32(t.data(), t.dtype()).unwrap())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn sft_lowers_the_loss_and_writes_a_peft_adapter() {
    let d = scratch("train-sft");
    let data = eight(&d);
    let r = recipe(&d, &data, "max_steps = 12\nmicro_batch_size = 4\nlr = 1e-2\nseed = 1");
    let (c, out, err) = ft(&["train", r.to_str().unwrap(), "--json", "--quiet"]);
    assert_eq!(c, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    let m = metrics(&d);
    let losses: Vec<f64> = m.iter().filter_map(|l| l["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 12);
    for key in ["loss", "grad_norm", "learning_rate", "num_tokens", "mean_token_accuracy", "epoch", "step", "tokens_per_s"] {
        assert!(m[0].get(key).is_some(), "metrics lack {key}");
    }
    // The first step's loss is the base model's (B = 0), the last is lower.
    assert!(losses[11] < losses[0] - 0.3, "{losses:?}");
    let eval_loss = summary["eval_loss"].as_f64().unwrap();
    let svg = std::fs::read_to_string(d.join("run/loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("eval loss"));
    for f in ["recipe.resolved.toml", "summary.json", "metrics.jsonl"] {
        assert!(d.join("run").join(f).exists(), "{f}");
    }
    let cfg = json(&d.join("run/adapter/adapter_config.json"));
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    // The adapter, loaded back as a PEFT adapter, gives the loss the run reported.
    let (c, out, err) = ft(&["eval", "--model", model_dir("llama").to_str().unwrap(), "--adapter",
        d.join("run/adapter").to_str().unwrap(), "--data", data.to_str().unwrap(), "--template", "chatml", "--json"]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!((v["loss"].as_f64().unwrap() - eval_loss).abs() < 1e-5, "{} vs {eval_loss}", v["loss"]);
    // Training's eval and `ft eval` are one code path (`loss::nll::evaluate`): the same number.
    assert_eq!(v["loss"].as_f64().unwrap(), eval_loss, "training's eval loss vs ft eval's");
    assert!(eval_loss < 6.8, "eval loss did not fall: {eval_loss}");
}

#[test]
fn gradient_accumulation_equals_one_big_batch() {
    let runs = [
        train_ok("acc", "max_steps = 2\nmicro_batch_size = 4\ngrad_accum = 2\nlr = 1e-2", &[]),
        train_ok("big", "max_steps = 2\nmicro_batch_size = 8\ngrad_accum = 1\nlr = 1e-2", &[]),
    ];
    let (a, b) = (adapter_tensors(&runs[0]), adapter_tensors(&runs[1]));
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let d = max_abs_diff(va, vb);
        assert!(d <= 1e-5, "{na}: {d}");
    }
    let steps = |d: &PathBuf| metrics(d).into_iter().filter(|l| l.get("loss").is_some()).collect::<Vec<_>>();
    let (ma, mb) = (steps(&runs[0]), steps(&runs[1]));
    assert_eq!(ma.len(), 2);
    for (x, y) in ma.iter().zip(&mb) {
        assert!((x["loss"].as_f64().unwrap() - y["loss"].as_f64().unwrap()).abs() < 1e-5);
        assert!((x["grad_norm"].as_f64().unwrap() - y["grad_norm"].as_f64().unwrap()).abs() < 1e-5);
    }
}

#[test]
fn same_seed_same_bytes_and_dropout_is_seeded() {
    let mut bytes = Vec::new();
    for (name, dropout) in [("s1", "0.1"), ("s2", "0.1"), ("s3", "0.0")] {
        let set = format!("lora.dropout={dropout}");
        let d = train_ok(name, "max_steps = 3\nmicro_batch_size = 2\nlr = 1e-3\nseed = 7", &["--set", &set]);
        bytes.push(std::fs::read(d.join("run/adapter/adapter_model.safetensors")).unwrap());
    }
    assert_eq!(bytes[0], bytes[1], "same seed, same bytes");
    assert_ne!(bytes[0], bytes[2], "dropout changes the update");
}

#[test]
fn lora_init_kinds_follow_peft() {
    // One step at learning rate 0 (warm-up step 0) saves the adapters as initialised.
    for (init, peft) in [("default", serde_json::json!(true)), ("gaussian", serde_json::json!("gaussian")), ("random", serde_json::json!(false))] {
        let set = format!("lora.init=\"{init}\"");
        let d = train_ok(&format!("init-{init}"), "max_steps = 1\nwarmup_steps = 1\nmicro_batch_size = 2\nlr = 1e-3", &["--set", &set]);
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("run/adapter/adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg["init_lora_weights"], peft, "{init}");
        let tensors = adapter_tensors(&d);
        let (a, b): (Vec<f32>, Vec<f32>) = (
            tensors.iter().filter(|(n, _)| n.contains("lora_A")).flat_map(|(_, v)| v.clone()).collect(),
            tensors.iter().filter(|(n, _)| n.contains("lora_B")).flat_map(|(_, v)| v.clone()).collect(),
        );
        let std = |v: &[f32]| (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        match init {
            // r = 4: A ~ N(0, 1/4²)
            "gaussian" => assert!((std(&a) - 0.25).abs() < 0.02, "gaussian A std {}", std(&a)),
            _ => assert!(a.iter().all(|x| x.abs() <= 1.0 / 8.0) && std(&a) > 0.02, "uniform A within 1/sqrt(in)"),
        }
        if init == "random" {
            assert!(b.iter().all(|x| x.abs() <= 0.5) && std(&b) > 0.1, "random B ~ U(±1/sqrt(r))");
        } else {
            assert!(b.iter().all(|x| *x == 0.0), "{init}: B starts at zero");
        }
    }
}

#[test]
fn bad_recipes_exit_2_naming_the_key() {
    let d = scratch("train-bad");
    let data = eight(&d);
    let r = recipe(&d, &data, "learning_rate = 1e-4");
    let (c, _, err) = ft(&["recipe", "check", r.to_str().unwrap()]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("learning_rate"), "{err}");
    let (c, _, err) = ft(&["train", r.to_str().unwrap()]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("learning_rate") && err.contains("line"), "{err}");
    let (c, _, err) = ft(&["train", recipe(&d, &data, "lr = -1.0").to_str().unwrap()]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("train.lr"), "{err}");
    assert!(!d.join("run").exists(), "nothing written for a bad recipe");
}

#[test]
fn sigkill_and_resume_gives_identical_bytes() {
    sigkill_resume("train", &["--set", "lora.dropout=0.1"]);
}

#[test]
fn dora_and_modules_to_save_resume_identically_after_sigkill() {
    sigkill_resume("dora-mts", &["--set", "lora.use_dora=true", "--set", "lora.modules_to_save=[\"lm_head\"]", "--set", "lora.dropout=0.1"]);
}

/// A 300-step run killed with SIGKILL once a checkpoint is complete, then resumed, ends with the
/// uninterrupted run's adapter bytes and losses.
fn sigkill_resume(name: &str, set: &[&str]) {
    let train = "max_steps = 300\nmicro_batch_size = 2\nlr = 1e-3\nseed = 3\nsave_every = 5\nkeep_last = 2";
    // Uninterrupted reference.
    let d1 = scratch(&format!("{name}-ref"));
    let data1 = eight(&d1);
    let (c, _, err) = ft(&[&["train", recipe(&d1, &data1, train).to_str().unwrap(), "--quiet"][..], set].concat());
    assert_eq!(c, 0, "{err}");
    // Killed with SIGKILL once a checkpoint is complete, then resumed.
    let d2 = scratch(&format!("{name}-killed"));
    let data2 = d2.join("eight.jsonl");
    std::fs::copy(&data1, &data2).unwrap();
    let r2 = recipe(&d2, &data2, train);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ft"))
        .args(["train", r2.to_str().unwrap(), "--quiet"])
        .args(set)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    loop {
        let done = std::fs::read_dir(d2.join("run")).map(|rd| rd.flatten().any(|e| e.path().join("COMPLETE").exists())).unwrap_or(false);
        if done || start.elapsed().as_secs() > 60 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!d2.join("run/adapter").exists(), "the run finished before it could be killed; the test needs a longer run");
    let (c, _, err) = ft(&[&["train", r2.to_str().unwrap(), "--quiet", "--resume"][..], set].concat());
    assert_eq!(c, 0, "{err}");
    let a = std::fs::read(d1.join("run/adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(d2.join("run/adapter/adapter_model.safetensors")).unwrap();
    assert!(a == b, "{name}: resumed adapter differs from the uninterrupted one");
    let losses = |d: &Path| metrics(d).iter().filter_map(|l| l["loss"].as_f64()).collect::<Vec<_>>();
    assert_eq!(losses(&d1), losses(&d2));
    assert!(ft::train::checkpoint::complete_checkpoints(&d2.join("run")).len() <= 2, "keep_last");
}

#[test]
fn resume_refuses_a_changed_recipe() {
    let d = scratch("train-changed");
    let data = eight(&d);
    let r = recipe(&d, &data, "max_steps = 4\nmicro_batch_size = 2\nsave_every = 2");
    assert_eq!(ft(&["train", r.to_str().unwrap(), "--quiet"]).0, 0);
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--resume", "--set", "train.lr=1e-3"]);
    assert_ne!(c, 0);
    assert!(err.contains("recipe differs"), "{err}");
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet"]);
    assert_ne!(c, 0);
    assert!(err.contains("--resume"), "{err}");
}

#[test]
fn io_errors_name_their_file() {
    let d = scratch("train-io-errors");
    let data = eight(&d);
    let r = recipe(&d, &data, "max_steps = 4\nmicro_batch_size = 2\nsave_every = 2\nseed = 5");
    // A full disk while appending metrics.jsonl (the appends go to /dev/full): exit 1, naming the
    // file and the cause, and the run is not taken as finished.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ft"))
        .args(["train", r.to_str().unwrap(), "--quiet"])
        .env("FT_FULL_DISK_METRICS", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&d.join("run/metrics.jsonl").display().to_string()) && err.contains("No space left"), "{err}");
    assert!(!d.join("run/summary.json").exists() && !d.join("run/adapter").exists());
    // A checkpoint whose manifest is missing or broken: exit 1 naming the manifest.
    std::fs::remove_dir_all(d.join("run")).unwrap();
    assert_eq!(ft(&["train", r.to_str().unwrap(), "--quiet"]).0, 0);
    std::fs::remove_dir_all(d.join("run/adapter")).unwrap();
    std::fs::remove_file(d.join("run/summary.json")).unwrap();
    let (_, last) = ft::train::checkpoint::complete_checkpoints(&d.join("run")).pop().unwrap();
    let manifest = last.join("manifest.json");
    for (broken, want) in [(Some("{"), "not valid JSON"), (None, "cannot read")] {
        match broken {
            Some(text) => std::fs::write(&manifest, text).unwrap(),
            None => std::fs::remove_file(&manifest).unwrap(),
        }
        let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--resume"]);
        assert_eq!(c, 1, "{err}");
        assert!(err.contains(&manifest.display().to_string()) && err.contains(want), "{err}");
    }
}

#[test]
fn resume_refuses_changed_data_and_finishes_what_it_can() {
    let d = scratch("train-resume-data");
    let data = eight(&d);
    let r = recipe(&d, &data, "max_steps = 4\nmicro_batch_size = 2\nsave_every = 2\nseed = 5");
    assert_eq!(ft(&["train", r.to_str().unwrap(), "--quiet"]).0, 0);
    let adapter = std::fs::read(d.join("run/adapter/adapter_model.safetensors")).unwrap();
    // `--resume` on a finished run says so and retrains nothing.
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--resume"]);
    assert_eq!(c, 0, "{err}");
    assert!(err.contains("already finished"), "{err}");
    // Killed after the final adapter, before summary.json: `--resume` finishes with the same bytes.
    std::fs::remove_file(d.join("run/summary.json")).unwrap();
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--resume"]);
    assert_eq!(c, 0, "{err}");
    assert!(d.join("run/summary.json").exists());
    assert_eq!(std::fs::read(d.join("run/adapter/adapter_model.safetensors")).unwrap(), adapter);
    // Changed data (here: shortened) is refused with exit 3, naming the file, before any step.
    std::fs::remove_file(d.join("run/summary.json")).unwrap();
    let text = std::fs::read_to_string(&data).unwrap();
    std::fs::write(&data, text.lines().take(3).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    let metrics_before = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap();
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--resume"]);
    assert_eq!(c, 3, "{err}");
    assert!(err.contains("data changed") && err.contains("eight.jsonl") && !err.contains("panicked"), "{err}");
    assert_eq!(std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap(), metrics_before, "nothing trained");
}

#[test]
fn a_run_directory_has_one_trainer_at_a_time() {
    let d = scratch("train-lock");
    let data = eight(&d);
    let r = recipe(&d, &data, "max_steps = 2\nmicro_batch_size = 2\nsave_every = 1");
    assert_eq!(ft(&["train", r.to_str().unwrap(), "--quiet"]).0, 0);
    assert!(!d.join("run/.lock").exists(), "the lock goes with the run");
    std::fs::remove_file(d.join("run/summary.json")).unwrap();
    // A live process holds the run (this test's pid stands in for another ft): refused.
    std::fs::write(d.join("run/.lock"), std::process::id().to_string()).unwrap();
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--resume"]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains(&format!("pid {}", std::process::id())) && err.contains(".lock"), "{err}");
    // A dead process's lock (a killed run) is taken over.
    std::fs::write(d.join("run/.lock"), "4194303").unwrap();
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--resume"]);
    assert_eq!(c, 0, "{err}");
    assert!(!d.join("run/.lock").exists());
}

#[test]
fn a_run_that_fails_while_loading_leaves_nothing_behind() {
    let d = scratch("train-fails-loading");
    let data = d.join("bad.jsonl");
    std::fs::write(&data, "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n").unwrap();
    let r = recipe(&d, &data, "max_steps = 1\nmicro_batch_size = 2");
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet"]);
    assert_eq!(c, 3, "{err}");
    assert!(!d.join("run").exists(), "a failed data preparation leaves no run directory");
    // Fixed, the same command runs.
    std::fs::copy(eight(&d), &data).unwrap();
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet"]);
    assert_eq!(c, 0, "{err}");
}

#[test]
fn an_interrupt_while_preparing_data_stops_at_once() {
    use std::io::BufRead;
    let d = scratch("train-interrupt-prep");
    let data = eight(&d);
    // A record of its own, so that no tokenized-data cache of another run applies.
    let unique = format!("{{\"messages\": [{{\"role\": \"user\", \"content\": \"{:?}\"}}, {{\"role\": \"assistant\", \"content\": \"ok\"}}]}}\n", std::time::SystemTime::now());
    std::fs::write(&data, std::fs::read_to_string(&data).unwrap() + &unique).unwrap();
    let r = recipe(&d, &data, "max_steps = 2\nmicro_batch_size = 2");
    // Each record takes 20 s to encode (fault-injection hook): preparing takes ≥ 20 s anywhere.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ft"))
        .args(["train", r.to_str().unwrap()])
        .env("FT_SLOW_PREPARE_MS", "20000")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains("reading and tokenizing") {
            break;
        }
    }
    assert!(seen.last().is_some_and(|l| l.contains("reading and tokenizing")), "{seen:?}");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let sent = std::time::Instant::now();
    std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let code = child.wait().unwrap().code();
    let waited = sent.elapsed();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert_eq!(code, Some(130), "{rest:?}");
    // Well under the 20 s one record takes: the interrupt did not wait for the preparation.
    assert!(waited.as_secs_f64() < 10.0, "exited {waited:?} after the interrupt");
    assert!(rest.iter().any(|l| l.contains("nothing was written")), "{rest:?}");
    assert!(!d.join("run").exists(), "nothing written");
    // Nothing blocks the same command afterwards.
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet"]);
    assert_eq!(c, 0, "{err}");
}

/// Starts a long run, sends `signal` once two steps are logged; the scratch dir, exit code and stderr.
fn signal_mid_run(name: &str, signal: &str) -> (PathBuf, Option<i32>, String) {
    let d = scratch(name);
    let data = eight(&d);
    // A run too long to plan (the audit's example: it panicked "capacity overflow") starts at once.
    let r = recipe(&d, &data, "max_steps = 9223372036854775807\nmicro_batch_size = 2\nlr = 1e-3");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_ft"))
        .args(["train", r.to_str().unwrap(), "--quiet"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::fs::read_to_string(d.join("run/metrics.jsonl")).map(|m| m.lines().count() < 2).unwrap_or(true) {
        assert!(start.elapsed().as_secs() < 60, "no training step within 60 s");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::process::Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    (d, out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn sigint_saves_a_checkpoint_and_exits_130() {
    let (d, code, err) = signal_mid_run("train-sigint", "-INT");
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("--resume"), "{err}");
    let cks = ft::train::checkpoint::complete_checkpoints(&d.join("run"));
    assert_eq!(cks.len(), 1, "one complete checkpoint");
    assert!(!d.join("run/adapter").exists());
}

#[test]
fn sigterm_is_handled_like_sigint() {
    // Schedulers and CI runners send SIGTERM before SIGKILL: the run saves a checkpoint and
    // exits 130, as for Ctrl-C.
    let (d, code, err) = signal_mid_run("train-sigterm", "-TERM");
    assert_eq!(code, Some(130), "{err}");
    assert!(err.contains("--resume"), "{err}");
    assert_eq!(ft::train::checkpoint::complete_checkpoints(&d.join("run")).len(), 1, "one complete checkpoint");
}

#[test]
fn target_modules_matching_nothing_is_a_recipe_error() {
    let d = scratch("train-notargets");
    let data = eight(&d);
    let r = recipe(&d, &data, "max_steps = 1\nmicro_batch_size = 2");
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--set", "lora.target_modules=[\"nope_proj\"]"]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("target_modules") && err.contains("nope_proj"), "{err}");
}

#[test]
fn unwritable_output_dir_is_a_clear_error() {
    let d = scratch("unwritable");
    let data = eight(&d);
    // A regular file where the output directory's parent should be: creation must fail.
    std::fs::write(d.join("blocker"), "not a directory").unwrap();
    let r = recipe(&d, &data, "max_steps = 1\nmicro_batch_size = 2");
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--output", d.join("blocker/run").to_str().unwrap()]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("cannot create output directory") && err.contains("blocker"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn a_failed_checkpoint_is_never_taken_as_complete() {
    let train = "max_steps = 6\nmicro_batch_size = 2\nlr = 1e-3\nsave_every = 2\nkeep_last = 5";
    let d1 = train_ok("diskref", train, &[]);
    let d2 = scratch("diskfull");
    let data2 = eight(&d2);
    let r2 = recipe(&d2, &data2, train);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ft"))
        .args(["train", r2.to_str().unwrap(), "--quiet"])
        .env("FT_FAIL_CHECKPOINT_AT", "4")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device") && err.contains("checkpoint-4"), "{err}");
    let run = d2.join("run");
    let complete: Vec<usize> = ft::train::checkpoint::complete_checkpoints(&run).into_iter().map(|c| c.0).collect();
    assert_eq!(complete, vec![2]);
    let leftovers: Vec<String> = std::fs::read_dir(&run).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.contains("checkpoint-4")).collect();
    assert!(leftovers.is_empty(), "half-written checkpoint left: {leftovers:?}");
    // Resuming uses checkpoint-2 and ends where an uninterrupted run ends.
    assert_eq!(ft(&["train", r2.to_str().unwrap(), "--quiet", "--resume"]).0, 0);
    let a = std::fs::read(d1.join("run/adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(a == b);
}

#[test]
fn gradient_checkpointing_changes_memory_not_results() {
    // Per-block recomputation gives the run without it: plain and packed batches, with LoRA
    // dropout (the recomputed blocks must draw the forward's masks), gradient accumulation, and
    // over an NF4 base.
    for (tag, sets) in [("plain0", vec!["lora.dropout=0.0"]), ("plain", vec!["lora.dropout=0.1"]), ("packed", vec!["data.packing=true", "data.max_len=64", "lora.dropout=0.1"]), ("qlora", vec!["model.quantize=\"nf4\""])] {
        let mut runs = Vec::new();
        for gc in ["false", "true"] {
            let mut args = vec!["--set".to_string(), format!("train.gradient_checkpointing={gc}")];
            for s in &sets {
                args.extend(["--set".to_string(), s.to_string()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let d = train_ok(&format!("gc-{tag}-{gc}"), "max_steps = 3\nmicro_batch_size = 2\ngrad_accum = 2\nlr = 1e-2\nseed = 5", &args);
            runs.push((adapter_tensors(&d), metrics(&d)));
        }
        let ((a, ma), (b, mb)) = (&runs[0], &runs[1]);
        assert!(a.iter().any(|(_, v)| v.iter().any(|x| *x != 0.0)));
        for ((n, x), (_, y)) in a.iter().zip(b) {
            assert!(max_abs_diff(x, y) <= 1e-6, "{tag} {n}: {}", max_abs_diff(x, y));
        }
        let losses = |m: &Vec<serde_json::Value>| m.iter().filter_map(|l| l.get("loss").and_then(|v| v.as_f64())).collect::<Vec<_>>();
        let (la, lb) = (losses(ma), losses(mb));
        assert_eq!(la.len(), 3);
        for (x, y) in la.iter().zip(&lb) {
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1.0), "{tag}: loss {x} vs {y}");
        }
    }
}

#[test]
fn overlong_samples_are_dropped_or_truncated_and_never_silently_empty() {
    // chat.jsonl's third conversation has a long first turn; at max_len 24 its assistant reply
    // is cut away entirely.
    let run = |name: &str, data: &str| {
        let d = scratch(name);
        let train = eight(&d);
        let r = recipe(&d, &train, "max_steps = 2\nmicro_batch_size = 2");
        ft(&["train", r.to_str().unwrap(), "--quiet", "--json", "--set", "data.max_len=24", "--set", data])
    };
    let (c, out, err) = run("overlong-drop", "data.overlong=\"drop\"");
    assert_eq!(c, 0, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(s["dropped_too_long"].as_u64().unwrap() >= 3 && s["truncated"] == 0, "{s}");
    let (c, _, err) = run("overlong-truncate", "data.overlong=\"truncate\"");
    assert_eq!(c, 3, "{err}");
    assert!(err.contains("eight.jsonl:") && err.contains("no trainable") && err.contains("drop_untrainable"), "{err}");
    let d = scratch("overlong-both");
    let train = eight(&d);
    let r = recipe(&d, &train, "max_steps = 2\nmicro_batch_size = 2");
    let (c, out, err) = ft(&[
        "train", r.to_str().unwrap(), "--quiet", "--json", "--set", "data.max_len=24", "--set", "data.overlong=\"truncate\"", "--set",
        "data.drop_untrainable=true",
    ]);
    assert_eq!(c, 0, "{err}");
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(s["truncated"].as_u64().unwrap() >= 1 && s["dropped_untrainable"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(s["dropped_too_long"], 0);
}

#[test]
fn tokenized_data_is_cached_beside_the_run() {
    let d = train_ok("token-cache", "max_steps = 3\nmicro_batch_size = 4\nseed = 2", &[]);
    let cache: Vec<_> = std::fs::read_dir(d.join(".ft-cache")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(cache.len(), 1, "{cache:?}");
    let before = std::fs::read(&cache[0]).unwrap();
    // A second run beside it reads the entry (unchanged) and trains the same.
    let r = d.join("recipe.toml");
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--output", d.join("run2").to_str().unwrap()]);
    assert_eq!(c, 0, "{err}");
    assert_eq!(std::fs::read(&cache[0]).unwrap(), before);
    let losses = |run: &str| {
        std::fs::read_to_string(d.join(run).join("metrics.jsonl")).unwrap().lines().map(String::from).filter(|l| l.contains("\"loss\"")).map(|l| serde_json::from_str::<serde_json::Value>(&l).unwrap()["loss"].as_f64().unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(losses("run"), losses("run2"));
    // Changed data is a different key.
    let data = d.join("eight.jsonl");
    let text = std::fs::read_to_string(&data).unwrap();
    std::fs::write(&data, text.replace("Count to 4.", "Count to four.")).unwrap();
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--output", d.join("run3").to_str().unwrap()]);
    assert_eq!(c, 0, "{err}");
    assert_eq!(std::fs::read_dir(d.join(".ft-cache")).unwrap().count(), 2);
}

#[test]
fn random_init_trains_a_model_of_the_configured_shape() {
    let d = train_ok("random-init", "max_steps = 2\nmicro_batch_size = 2\nseed = 4", &["--set", "model.random_init=true"]);
    let m = metrics(&d);
    // Weights of std 0.02 give near-uniform predictions over the 1024-token vocabulary.
    let first = m[0]["loss"].as_f64().unwrap();
    assert!((first - 1024f64.ln()).abs() < 0.15, "{first}");
    let a = ft::model::random::<ft::backend::Cpu>(&model_dir("llama"), &Default::default(), Default::default(), 4).unwrap();
    let b = ft::model::random::<ft::backend::Cpu>(&model_dir("llama"), &Default::default(), Default::default(), 4).unwrap();
    assert_eq!(logits(&a, &[1, 2, 3]), logits(&b, &[1, 2, 3]));
}

/// Trains 8 steps with `set` (recipe overrides), checks the eval loss falls and that `ft eval
/// --adapter` reproduces the run's eval loss, then stops a second run at its second checkpoint
/// (a simulated full disk) and resumes it to the same adapter bytes. Returns the first run's dir.
fn trains_and_resumes(name: &str, set: &[&str]) -> PathBuf {
    let train = "max_steps = 8\nmicro_batch_size = 2\nlr = 1e-2\nseed = 3\nsave_every = 3\neval_on_start = true";
    let d1 = train_ok(&format!("{name}-ref"), train, set);
    let evals: Vec<f64> = metrics(&d1).iter().filter_map(|l| l["eval_loss"].as_f64()).collect();
    assert_eq!(evals.len(), 2, "{name}: before and after");
    let eval_loss = evals[1];
    assert!(eval_loss < evals[0] - 0.1, "{name}: eval loss {} → {eval_loss}", evals[0]);
    let quantized = set.iter().any(|s| s.contains("quantize"));
    if !quantized {
        let v = eval_llama_json(&d1.join("eight.jsonl"), Some(&d1.join("run/adapter")), &[]);
        assert!((v["loss"].as_f64().unwrap() - eval_loss).abs() <= 1e-5, "{name}: {v} vs {eval_loss}");
    }
    let d2 = scratch(&format!("{name}-resumed"));
    let data = eight(&d2);
    let r2 = recipe(&d2, &data, train);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ft")).args(["train", r2.to_str().unwrap(), "--quiet"]).args(set).env("FT_FAIL_CHECKPOINT_AT", "6").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let (c, _, err) = ft(&[&["train", r2.to_str().unwrap(), "--quiet", "--resume"][..], set].concat());
    assert_eq!(c, 0, "{err}");
    let a = std::fs::read(d1.join("run/adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(d2.join("run/adapter/adapter_model.safetensors")).unwrap();
    assert!(a == b, "{name}: the resumed run differs");
    d1
}

#[test]
fn modules_to_save_trains_the_head_in_full_and_resumes_bit_identically() {
    // lora.modules_to_save = ["lm_head"]: a trainable copy of the output head beside the LoRA
    // adapters, saved as PEFT does (`base_model.model.lm_head.weight`, modules_to_save in the
    // config).
    let d1 = trains_and_resumes("mts", &["--set", "lora.modules_to_save=[\"lm_head\"]"]);
    let cfg = json(&d1.join("run/adapter/adapter_config.json"));
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["lm_head"]));
    let tensors = adapter_tensors(&d1);
    let head = &tensors.iter().find(|(n, _)| n == "base_model.model.lm_head.weight").expect("the head copy").1;
    let (base, _) = read_f32(&model_dir("llama").join("model.safetensors"), "lm_head.weight");
    assert!(max_abs_diff(head, &base) > 1e-4, "the head copy was trained");
}

#[test]
fn dora_trains_and_resumes_bit_identically_also_over_nf4() {
    // lora.use_dora: PEFT's keys (a magnitude vector per adapted module, `use_dora` in the
    // config); the magnitudes start at the base's row norms and move.
    let d1 = trains_and_resumes("dora", &["--set", "lora.use_dora=true", "--set", "lora.dropout=0.1"]);
    assert_eq!(json(&d1.join("run/adapter/adapter_config.json"))["use_dora"], true);
    // The run says before deployment that vLLM will refuse it.
    let serving = json(&d1.join("run/summary.json"))["serving"].clone();
    assert!(serving.as_array().unwrap().iter().any(|f| f["engine"] == "vllm" && f["severity"] == "refused"), "{serving}");
    let tensors = adapter_tensors(&d1);
    let m = &tensors.iter().find(|(n, _)| n == "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector").expect("a magnitude").1;
    let (w, shape) = read_f32(&model_dir("llama").join("model.safetensors"), "model.layers.0.self_attn.q_proj.weight");
    let norms = ft::model::projection::row_norms(&w, shape[1]);
    assert_eq!(m.len(), norms.len());
    assert!(max_abs_diff(m, &norms) > 1e-5 && max_abs_diff(m, &norms) < 0.5, "trained away from the row norms");
    // QLoRA + DoRA: the norm from the dequantized weight.
    trains_and_resumes("dora-nf4", &["--set", "lora.use_dora=true", "--set", "model.quantize=\"nf4\""]);
}

#[test]
fn modules_to_save_refuses_a_tied_head() {
    let d = scratch("mts-tied");
    let data = eight(&d);
    let r = recipe(&d, &data, "max_steps = 1");
    let text = std::fs::read_to_string(&r).unwrap().replace(&model_dir("llama").display().to_string(), &model_dir("qwen3").display().to_string());
    std::fs::write(&r, text).unwrap();
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--set", "lora.modules_to_save=[\"lm_head\"]"]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("lm_head") && err.contains("ties"), "{err}");
    assert!(!d.join("run").exists(), "nothing written");
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--set", "lora.modules_to_save=[\"embed_tokens\"]"]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("embed_tokens") && err.contains("ties"), "{err}");
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--set", "lora.modules_to_save=[\"norm\"]"]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("lora.modules_to_save"), "{err}");
}

#[test]
fn rank_pattern_gives_modules_their_own_rank() {
    let d = train_ok("rank-pattern", "max_steps = 3\nmicro_batch_size = 2\nlr = 1e-2", &["--set", "lora.rank_pattern={q_proj = 2}", "--set", "lora.alpha_pattern={v_proj = 32}"]);
    let cfg = json(&d.join("run/adapter/adapter_config.json"));
    assert_eq!(cfg["rank_pattern"], serde_json::json!({"q_proj": 2}));
    assert_eq!(cfg["alpha_pattern"], serde_json::json!({"v_proj": 32.0}));
    let (_, q) = read_f32(&d.join("run/adapter/adapter_model.safetensors"), "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight");
    let (_, v) = read_f32(&d.join("run/adapter/adapter_model.safetensors"), "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight");
    assert_eq!((q[0], v[0]), (2, 4));
    let eval_loss = metrics(&d).iter().rev().find_map(|l| l["eval_loss"].as_f64()).unwrap();
    let v = eval_llama_json(&d.join("eight.jsonl"), Some(&d.join("run/adapter")), &[]);
    assert!((v["loss"].as_f64().unwrap() - eval_loss).abs() <= 1e-5, "{v} vs {eval_loss}");
}

#[test]
fn embedding_lora_trains_resumes_and_checkpoints_its_gradient() {
    // embed_tokens among the targets: PEFT's embedding LoRA (A zero, B N(0, 1), keys
    // lora_embedding_A/B); gradient checkpointing gives the embedding adapter the same gradient.
    let set = ["--set", "lora.target_modules=[\"q_proj\", \"v_proj\", \"embed_tokens\"]"];
    let d1 = trains_and_resumes("embed-lora", &set);
    let tensors = adapter_tensors(&d1);
    let a = &tensors.iter().find(|(n, _)| n == "base_model.model.model.embed_tokens.lora_embedding_A").expect("embedding A").1;
    assert_eq!(a.len(), 4 * 1024);
    assert!(a.iter().any(|&x| x != 0.0), "A starts at zero and is trained");
    let d2 = train_ok("embed-lora-ckpt", "max_steps = 3\nmicro_batch_size = 2\nlr = 1e-2\nseed = 3\ngradient_checkpointing = true", &set);
    let d3 = train_ok("embed-lora-plain", "max_steps = 3\nmicro_batch_size = 2\nlr = 1e-2\nseed = 3", &set);
    for ((n2, t2), (n3, t3)) in adapter_tensors(&d2).iter().zip(adapter_tensors(&d3).iter()) {
        assert_eq!(n2, n3);
        assert!(max_abs_diff(t2, t3) <= 1e-5, "{n2}: {}", max_abs_diff(t2, t3));
    }
}

#[test]
fn modules_to_save_embed_tokens_trains_the_embeddings_and_merges_them() {
    // A full copy of the token embeddings (for a chat format's new tokens), saved [vocab, hidden]
    // as PEFT stores an nn.Embedding, used by ft merge.
    let d = trains_and_resumes("mts-embed", &["--set", "lora.modules_to_save=[\"embed_tokens\"]"]);
    let tensors = adapter_tensors(&d);
    let e = &tensors.iter().find(|(n, _)| n == "base_model.model.model.embed_tokens.weight").expect("the embedding copy").1;
    let (base, shape) = read_f32(&model_dir("llama").join("model.safetensors"), "model.embed_tokens.weight");
    assert_eq!((e.len(), shape), (base.len(), vec![1024, 64]));
    assert!(max_abs_diff(e, &base) > 1e-4, "trained");
    let out = d.join("merged");
    let (c, _, err) = ft(&["merge", "--model", model_dir("llama").to_str().unwrap(), "--adapter", d.join("run/adapter").to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_eq!(c, 0, "{err}");
    let (merged, _) = read_f32(&out.join("model.safetensors"), "model.embed_tokens.weight");
    assert_eq!(max_abs_diff(&merged, e), 0.0);
}

#[test]
fn pissa_trains_resumes_and_saves_an_adapter_for_the_original_base() {
    // The run trains A, B on the residual base and saves them converted (A' = [A; A₀], B' =
    // [B, −B₀], rank 8, α 16): `ft eval --adapter` on the original llama gives the run's eval loss
    // (checked by the helper), and a resumed run recomputes the residual and takes A, B back.
    let d = trains_and_resumes("pissa", &["--set", "lora.init=\"pissa\""]);
    let cfg = json(&d.join("run/adapter/adapter_config.json"));
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(8), Some(16.0)));
    // PiSSA starts as the original model: the eval before the first step is the base's.
    let first = metrics(&d).iter().find_map(|l| l["eval_loss"].as_f64()).unwrap();
    let base = eval_llama_json(&d.join("eight.jsonl"), None, &[])["loss"].as_f64().unwrap();
    assert!((first - base).abs() <= 1e-4, "{first} vs {base}");
    // The randomized variant (seeded: resumes exactly) and OLoRA train the same way.
    for init in ["pissa_niter_2", "olora"] {
        let d = trains_and_resumes(init, &["--set", &format!("lora.init=\"{init}\"")]);
        assert_eq!(json(&d.join("run/adapter/adapter_config.json"))["r"], 8, "{init}: converted");
    }
}

#[test]
fn pissa_saved_with_its_residual_base_computes_the_converted_model() {
    // lora.pissa_save = "residual": the rank-r adapter and RUN/residual_model/ (f32), as PEFT
    // saves PiSSA without conversion; the residual + adapter compute what the converted adapter
    // computes on the original llama (the same run, seed and data).
    let steps = "max_steps = 3\nmicro_batch_size = 2\nlr = 1e-2\nseed = 3";
    let conv = train_ok("pissa-converted", steps, &["--set", "lora.init=\"pissa\""]);
    let res = train_ok("pissa-residual", steps, &["--set", "lora.init=\"pissa\"", "--set", "lora.pissa_save=\"residual\""]);
    let cfg = json(&res.join("run/adapter/adapter_config.json"));
    assert_eq!((cfg["r"].as_u64(), cfg["lora_alpha"].as_f64()), (Some(4), Some(8.0)));
    let residual = res.join("run/residual_model");
    assert_eq!(cfg["base_model_name_or_path"].as_str(), Some(residual.to_str().unwrap()));
    assert_eq!(json(&residual.join("config.json"))["dtype"], "float32");
    let summary = json(&res.join("run/summary.json"));
    assert!(summary["notes"].to_string().contains("residual_model"), "{summary}");
    let load_with = |base: &Path, adapter: &Path| {
        let mut m = ft::model::load::<ft::backend::Cpu>(base, &Default::default(), Default::default()).unwrap();
        ft::adapters::peft::PeftAdapter::open(adapter).unwrap().attach(&mut m).unwrap();
        m
    };
    let (a, b) = (load_with(&residual, &res.join("run/adapter")), load_with(&model_dir("llama"), &conv.join("run/adapter")));
    let ids = ids(&json(&fixtures().join("chat_tokens.json"))[1]["input_ids"]);
    let input = burn::tensor::Tensor::<ft::backend::Cpu, 2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, ids.len()]), &Default::default());
    let (la, lb): (Vec<f32>, Vec<f32>) = (a.forward(input.clone(), None).into_data().to_vec().unwrap(), b.forward(input, None).into_data().to_vec().unwrap());
    let d = max_abs_diff(&la, &lb);
    assert!(d <= 1e-5, "residual + adapter vs original + converted: {d}");
    // Without a PiSSA init there is no residual to save.
    let (c, _, err) = ft(&["train", conv.join("recipe.toml").to_str().unwrap(), "--quiet", "--set", "lora.pissa_save=\"residual\""]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("lora.pissa_save"), "{err}");
}

#[test]
fn target_regex_exclusions_and_layers_round_trip_as_peft() {
    // target_modules as a regex, or as names with exclude_modules and layers_to_transform: the
    // adapted modules are the ones PEFT picks, and the adapter's config says so (and loads back
    // the same). PEFT refuses layers_to_transform with a regex; so does ft.
    let cases: [(&str, &[&str], &str, &[&str]); 2] = [
        ("targets-regex", &["--set", r"lora.target_modules='.*\.1\..*(q_proj|v_proj)'"], "target_modules", &["1.self_attn.q_proj", "1.self_attn.v_proj"]),
        (
            "targets-names",
            &["--set", "lora.target_modules=[\"q_proj\", \"v_proj\", \"down_proj\"]", "--set", "lora.exclude_modules=[\"down_proj\"]", "--set", "lora.layers_to_transform=[1]"],
            "layers_to_transform",
            &["1.self_attn.q_proj", "1.self_attn.v_proj"],
        ),
    ];
    for (name, set, key, want) in cases {
        let d = train_ok(name, "max_steps = 2\nmicro_batch_size = 2\nlr = 1e-2", set);
        let cfg = json(&d.join("run/adapter/adapter_config.json"));
        assert!(!cfg[key].is_null(), "{name}: {cfg}");
        let names: Vec<String> = adapter_tensors(&d).into_iter().map(|(n, _)| n).filter(|n| n.ends_with("lora_A.weight")).collect();
        let want: Vec<String> = want.iter().map(|m| format!("base_model.model.model.layers.{m}.lora_A.weight")).collect();
        assert_eq!(names, want, "{name}");
        let eval_loss = metrics(&d).iter().rev().find_map(|l| l["eval_loss"].as_f64()).unwrap();
        let v = eval_llama_json(&d.join("eight.jsonl"), Some(&d.join("run/adapter")), &[]);
        assert!((v["loss"].as_f64().unwrap() - eval_loss).abs() <= 1e-5, "{name}: {v} vs {eval_loss}");
    }
    let d = scratch("targets-refused");
    let r = recipe(&d, &eight(&d), "max_steps = 1");
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet", "--set", "lora.target_modules='.*q_proj'", "--set", "lora.layers_to_transform=[1]"]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("lora.layers_to_transform"), "{err}");
}

#[test]
fn ensure_weight_tying_trains_one_copy_for_the_tied_embeddings_and_head() {
    // PEFT's ensure_weight_tying on a tied model: modules_to_save = ["lm_head"] trains one copy
    // of the embeddings that is also the output head; saved as PEFT saves it (the copy under
    // both names, `ensure_weight_tying: true`), loaded back to the same logits, merged into a
    // tied checkpoint with them.
    let d = scratch("tie");
    let data = eight(&d);
    let r = d.join("recipe.toml");
    std::fs::write(
        &r,
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\ntemplate = \"chatml\"\n[lora]\nr = 4\nalpha = 8\ntarget_modules = [\"q_proj\"]\nmodules_to_save = [\"lm_head\"]\nensure_weight_tying = true\n[train]\nmax_steps = 4\nmicro_batch_size = 2\nlr = 1e-2\nseed = 3\n[output]\ndir = \"{}\"\n",
            model_dir("llama3-rope-tied-bf16").display(),
            data.display(),
            d.join("run").display()
        ),
    )
    .unwrap();
    let (c, _, err) = ft(&["train", r.to_str().unwrap(), "--quiet"]);
    assert_eq!(c, 0, "{err}");
    let l: Vec<f64> = metrics(&d).iter().filter_map(|m| m["loss"].as_f64()).collect();
    assert!(l[3] < l[0], "{l:?}");
    let cfg = json(&d.join("run/adapter/adapter_config.json"));
    assert_eq!(cfg["ensure_weight_tying"], true);
    let t = adapter_tensors(&d);
    let get = |n: &str| t.iter().find(|(k, _)| k == n).unwrap_or_else(|| panic!("{n}")).1.clone();
    let (e, h) = (get("base_model.model.model.embed_tokens.weight"), get("base_model.model.lm_head.weight"));
    assert_eq!(e, h, "one copy under both names");
    let (base, _) = read_f32(&model_dir("llama3-rope-tied-bf16").join("model.safetensors"), "model.embed_tokens.weight");
    assert!(max_abs_diff(&e, &base) > 1e-4, "trained");
    // The copy is the head: logits with the adapter use it on both sides.
    let mut model = load("llama3-rope-tied-bf16");
    ft::adapters::peft::PeftAdapter::open(&d.join("run/adapter")).unwrap().attach(&mut model).unwrap();
    assert!(model.tie_head_to_adapted_embeddings);
    let ids = ids(&json(&fixtures().join("chat_tokens.json"))[1]["input_ids"]);
    let logits = |m: &ft::model::Decoder<ft::backend::Cpu>| -> Vec<f32> {
        let input = burn::tensor::Tensor::<ft::backend::Cpu, 2, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, ids.len()]), &Default::default());
        m.forward(input, None).into_data().to_vec().unwrap()
    };
    let with_adapter = logits(&model);
    let out = d.join("merged");
    let (c, _, err) = ft(&["merge", "--model", model_dir("llama3-rope-tied-bf16").to_str().unwrap(), "--adapter", d.join("run/adapter").to_str().unwrap(), "--out", out.to_str().unwrap(), "--dtype", "f32"]);
    assert_eq!(c, 0, "{err}");
    let merged = ft::model::load::<ft::backend::Cpu>(&out, &Default::default(), Default::default()).unwrap();
    let dm = max_abs_diff(&logits(&merged), &with_adapter);
    assert!(dm <= 1e-4, "merged vs adapter: {dm}");
}

/// The scalars of a TensorBoard event file: (step, tag, value) of every event after the
/// file-version one, each record's framing CRCs checked.
fn tb_scalars(path: &Path) -> Vec<(i64, String, f32)> {
    use ft::formats::tfevents::masked_crc;
    let bytes = std::fs::read(path).unwrap();
    let varint = |b: &[u8], at: &mut usize| -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let x = b[*at];
            *at += 1;
            v |= ((x & 0x7f) as u64) << shift;
            if x < 0x80 {
                return v;
            }
            shift += 7;
        }
    };
    // Fields of one message: (field, wire type, payload).
    let fields = |b: &[u8]| -> Vec<(u64, u64, Vec<u8>)> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < b.len() {
            let key = varint(b, &mut at);
            let (field, wire) = (key >> 3, key & 7);
            let payload = match wire {
                0 => varint(b, &mut at).to_le_bytes().to_vec(),
                1 => { at += 8; b[at - 8..at].to_vec() }
                5 => { at += 4; b[at - 4..at].to_vec() }
                2 => { let n = varint(b, &mut at) as usize; at += n; b[at - n..at].to_vec() }
                w => panic!("wire type {w}"),
            };
            out.push((field, wire, payload));
        }
        out
    };
    let (mut at, mut out, mut first) = (0, Vec::new(), true);
    while at < bytes.len() {
        let len = &bytes[at..at + 8];
        assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc(len), "length CRC");
        let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
        let data = &bytes[at + 12..at + 12 + n];
        assert_eq!(u32::from_le_bytes(bytes[at + 12 + n..at + 16 + n].try_into().unwrap()), masked_crc(data), "data CRC");
        at += 16 + n;
        let ev = fields(data);
        if first {
            assert!(ev.iter().any(|(f, _, p)| *f == 3 && p == b"brain.Event:2"), "file version first");
            first = false;
            continue;
        }
        let step = ev.iter().find(|(f, _, _)| *f == 2).map(|(_, _, p)| i64::from_le_bytes(p[..8].try_into().unwrap())).unwrap_or(0);
        for (_, _, summary) in ev.iter().filter(|(f, _, _)| *f == 5) {
            for (_, _, value) in fields(summary) {
                let v = fields(&value);
                let tag = String::from_utf8(v.iter().find(|(f, _, _)| *f == 1).unwrap().2.clone()).unwrap();
                let x = f32::from_le_bytes(v.iter().find(|(f, _, _)| *f == 2).unwrap().2[..4].try_into().unwrap());
                out.push((step, tag, x));
            }
        }
    }
    out
}

#[test]
fn tensorboard_gets_every_metric_and_a_failing_writer_only_warns() {
    // output.report_to = ["tensorboard"]: RUN/tb/events.out.tfevents.* holds every number of
    // metrics.jsonl (train/<key>, eval/<key> for eval_<key>) at its step; when the file cannot be
    // written mid-run the run warns once and finishes with its metrics.jsonl complete.
    let d = train_ok("tensorboard", "max_steps = 4\nmicro_batch_size = 2\nlr = 1e-2\neval_every = 2", &["--set", "output.report_to=[\"tensorboard\"]"]);
    let files: Vec<PathBuf> = std::fs::read_dir(d.join("run/tb")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(files.len(), 1);
    assert!(files[0].file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."));
    let got = tb_scalars(&files[0]);
    let mut want = Vec::new();
    for m in metrics(&d) {
        let step = m["step"].as_i64().unwrap();
        for (k, v) in m.as_object().unwrap() {
            if let (true, Some(x)) = (k != "step", v.as_f64()) {
                let tag = k.strip_prefix("eval_").map_or_else(|| format!("train/{k}"), |r| format!("eval/{r}"));
                want.push((step, tag, x as f32));
            }
        }
    }
    assert!(want.iter().any(|w| w.1 == "train/loss") && want.iter().any(|w| w.1 == "eval/loss"));
    assert_eq!(got, want);
    // A writer that fails at its second event.
    let d2 = scratch("tensorboard-fail");
    let data = eight(&d2);
    let r = recipe(&d2, &data, "max_steps = 4\nmicro_batch_size = 2\nlr = 1e-2");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ft"))
        .args(["train", r.to_str().unwrap(), "--set", "output.report_to=[\"tensorboard\"]"])
        .env("FT_FAIL_TB_AT", "2")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(err.matches("TensorBoard: cannot write").count(), 1, "{err}");
    assert_eq!(metrics(&d2).iter().filter(|m| m["loss"].is_f64()).count(), 4, "metrics.jsonl stays complete");
    let files: Vec<PathBuf> = std::fs::read_dir(d2.join("run/tb")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(tb_scalars(&files[0]).iter().filter(|s| s.1 == "train/loss").count(), 1, "only the first event was written");
}
