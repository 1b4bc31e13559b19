//! GRPO end to end on the tiny llama: the reward of a learnable rule rises, completions are
//! logged, SIGKILL + `--resume` gives the same adapter bytes, and a broken reward command is a
//! clear error that leaves no finished run behind.

use std::path::{Path, PathBuf};

use super::common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The tiny llama with its output head scaled by 15. The oracle model's head is initialised
/// with std 0.02, so its logits span about ±0.3: every token is near 1/1024 and no adapter on
/// the blocks can move the mass of a set of tokens (the final norm fixes the hidden state's
/// length). Scaled, its outputs are peaked enough for a LoRA to steer, as a trained model's are.
fn steerable_model(dir: &Path) -> PathBuf {
    let out = dir.join("model");
    std::fs::create_dir_all(&out).unwrap();
    let src = model_dir("llama");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"] {
        std::fs::copy(src.join(f), out.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let mut data = view.data().to_vec();
        if name == "lm_head.weight" {
            let scaled: Vec<f32> = data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) * 15.0).collect();
            data = scaled.iter().flat_map(|x| x.to_le_bytes()).collect();
        }
        tensors.push((name, view.shape().to_vec(), data));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        tensors.iter().map(|(n, shape, d)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), d).unwrap())).collect();
    std::fs::write(out.join("model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
    out
}

/// Prompts and a GRPO recipe in `dir`; `rewards` is the `[[grpo.rewards]]` TOML.
fn setup(dir: &Path, train: &str, rewards: &str) -> PathBuf {
    let prompts: Vec<String> = ["Say something.", "Write a word.", "Go on.", "Another one."]
        .iter()
        .map(|p| format!(r#"{{"prompt": [{{"role": "user", "content": "{p}"}}], "answer": "e"}}"#))
        .collect();
    let data = dir.join("prompts.jsonl");
    std::fs::write(&data, prompts.join("\n") + "\n").unwrap();
    let r = dir.join("recipe.toml");
    std::fs::write(
        &r,
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\neval = \"{}\"\ntemplate = \"chatml\"\n[lora]\nr = 8\nalpha = 16\n\
             [train]\nmethod = \"grpo\"\nlr = 1e-2\nseed = 3\nmicro_batch_size = 2\n{train}\n\
             [grpo]\nnum_generations = 8\nmax_completion_length = 6\n{rewards}\n[output]\ndir = \"{}\"\n",
            steerable_model(dir).display(),
            data.display(),
            data.display(),
            dir.join("run").display()
        ),
    )
    .unwrap();
    r
}

/// A rule the untrained tiny model meets about a quarter of the time: the reply starts with a
/// space.
const STARTS_WITH_SPACE: &str = "[[grpo.rewards]]\nname = \"space\"\nkind = \"regex\"\npattern = \"^ \"\n";

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn grpo_raises_the_reward_of_a_learnable_rule() {
    let d = scratch("grpo-learn");
    let r = setup(&d, "max_steps = 16", STARTS_WITH_SPACE);
    let (c, _, err) = ft(&["train", s(&r), "--quiet"]);
    assert_eq!(c, 0, "{err}");
    let m = metrics(&d);
    let rewards: Vec<f64> = m.iter().filter_map(|l| l["reward"].as_f64()).collect();
    assert_eq!(rewards.len(), 16);
    let (first, last) = (rewards[..4].iter().sum::<f64>() / 4.0, rewards[12..].iter().sum::<f64>() / 4.0);
    assert!(last > first + 0.2 && last > 0.8, "mean reward {first:.3} → {last:.3}: {rewards:?}");
    for k in ["reward_std", "rewards/space/mean", "rewards/space/std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio", "grad_norm", "clip_ratio/region_mean", "time/sample_s", "time/update_s"] {
        assert!(m[0].get(k).is_some(), "metrics lack {k}");
    }
    // Every sampled completion is logged with its reward and advantage.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(d.join("run/completions.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 16 * 2 * 8);
    assert!(lines.iter().all(|l| l["step"].is_u64() && l["reward"].is_f64() && l["advantage"].is_f64() && l["completion"].is_string()));
    let space = |l: &serde_json::Value| l["completion"].as_str().unwrap().starts_with(' ');
    assert!(lines.iter().all(|l| l["reward"].as_f64().unwrap() == f64::from(u8::from(space(l)))), "rewards follow the rule");
}

#[test]
fn grpo_resumes_to_the_same_bytes() {
    let train = "max_steps = 12\nsave_every = 2";
    let d1 = scratch("grpo-ref");
    let r1 = setup(&d1, train, STARTS_WITH_SPACE);
    assert_eq!(ft(&["train", s(&r1), "--quiet"]).0, 0);
    // Killed with SIGKILL once a checkpoint is complete, then resumed.
    let d2 = scratch("grpo-resumed");
    let r2 = setup(&d2, train, STARTS_WITH_SPACE);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ft")).args(["train", s(&r2), "--quiet"]).spawn().unwrap();
    let start = std::time::Instant::now();
    while !ft::train::checkpoint::complete_checkpoints(&d2.join("run")).iter().any(|(step, _)| *step >= 2) {
        assert!(start.elapsed().as_secs() < 120, "no checkpoint");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!d2.join("run/adapter").exists(), "the run finished before it could be killed; the test needs a longer run");
    let (c, _, err) = ft(&["train", s(&r2), "--quiet", "--resume"]);
    assert_eq!(c, 0, "{err}");
    let a = std::fs::read(d1.join("run/adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(d2.join("run/adapter/adapter_model.safetensors")).unwrap();
    assert!(a == b, "the resumed GRPO run differs from the uninterrupted one");
    let rewards = |d: &Path| metrics(d).iter().filter_map(|l| l["reward"].as_f64()).collect::<Vec<_>>();
    assert_eq!(rewards(&d1), rewards(&d2));
    let completions = |d: &Path| std::fs::read_to_string(d.join("run/completions.jsonl")).unwrap();
    assert_eq!(completions(&d1), completions(&d2), "the same completions, logged once each");
}

#[test]
fn grpo_reuses_each_generation_num_iterations_times_and_resumes_between() {
    // num_iterations 2: steps 1, 3, 5, … sample; 2, 4, … train again on the same completions with
    // importance ratios. A run that stops at a checkpoint between the two steps of a generation
    // (step 3 here: the disk "fills" at step 6's) resumes from the saved generation batch to the
    // same adapter bytes as an uninterrupted run.
    let train = "max_steps = 8\nsave_every = 3";
    let grpo = format!("num_iterations = 2\n{STARTS_WITH_SPACE}");
    let d1 = scratch("grpo-mu2");
    let r1 = setup(&d1, train, &grpo);
    let (c, _, err) = ft(&["train", s(&r1), "--quiet"]);
    assert_eq!(c, 0, "{err}");
    let m = metrics(&d1);
    let steps: Vec<&serde_json::Value> = m.iter().filter(|l| l.get("reward").is_some()).collect();
    assert_eq!(steps.len(), 8);
    for (i, l) in steps.iter().enumerate() {
        let sampled = l["time/sample_s"].as_f64().unwrap() > 0.0;
        assert_eq!(sampled, i % 2 == 0, "step {}: sampled {sampled}", i + 1);
        // The reused step reports the same rewards as the step that sampled them.
        if i % 2 == 1 {
            assert_eq!(l["reward"], steps[i - 1]["reward"]);
        }
        let entropy = l["entropy"].as_f64().unwrap();
        assert!(entropy > 0.0 && entropy < (1024f64).ln(), "entropy {entropy}");
        for k in ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"] {
            assert!((0.0..=1.0).contains(&l[k].as_f64().unwrap()), "{k}");
        }
    }
    let logged: Vec<u64> = std::fs::read_to_string(d1.join("run/completions.jsonl")).unwrap().lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!(logged.len(), 4 * 2 * 8, "one log line per sampled completion");
    assert!(logged.iter().all(|s| s % 2 == 1));
    let d2 = scratch("grpo-mu2-resumed");
    let r2 = setup(&d2, train, &grpo);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ft")).args(["train", s(&r2), "--quiet"]).env("FT_FAIL_CHECKPOINT_AT", "6").output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d2.join("run/checkpoint-3/objective_state.json").exists(), "the generation batch is saved");
    let (c, _, err) = ft(&["train", s(&r2), "--quiet", "--resume"]);
    assert_eq!(c, 0, "{err}");
    let a = std::fs::read(d1.join("run/adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(d2.join("run/adapter/adapter_model.safetensors")).unwrap();
    assert!(a == b, "the run resumed between the steps of a generation differs from the uninterrupted one");
}

#[test]
fn a_broken_reward_command_is_a_clear_error() {
    for (name, script, want) in [
        ("crash", "import sys; sys.exit(3)", "exited with"),
        ("garbage", "import sys\nfor _ in sys.stdin: print('yes')", "is not a finite number"),
        ("short", "print(1)", "printed 1 numbers for 16 completions"),
    ] {
        let d = scratch(&format!("grpo-command-{name}"));
        let prog = d.join("reward.py");
        std::fs::write(&prog, script).unwrap();
        let rewards = format!("[[grpo.rewards]]\nname = \"{name}\"\nkind = \"command\"\ncommand = [\"python3\", \"{}\"]\n", prog.display());
        let r = setup(&d, "max_steps = 2", &rewards);
        let (c, _, err) = ft(&["train", s(&r), "--quiet"]);
        assert_eq!(c, 1, "{name}: {err}");
        assert!(err.contains("reward command") && err.contains("reward.py") && err.contains(want), "{name}: {err}");
        assert!(!d.join("run/summary.json").exists() && !d.join("run/adapter").exists(), "{name}: nothing finished");
    }
}

#[test]
fn a_reward_model_is_a_grpo_reward() {
    // `kind = "model"`: a reward model scores each completion in-process; the logged reward is
    // what `ft score` gives the prompt and completion.
    let d = scratch("grpo-reward-model");
    let rm = fixtures().join("reward/model");
    let rewards = format!("[[grpo.rewards]]\nname = \"rm\"\nkind = \"model\"\nmodel = \"{}\"\n", rm.display());
    let r = setup(&d, "max_steps = 1\neval_every = 0", &rewards);
    let (c, _, err) = ft(&["train", s(&r), "--quiet"]);
    assert_eq!(c, 0, "{err}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(d.join("run/completions.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 16);
    let prompts = ["Say something.", "Write a word.", "Go on.", "Another one."];
    let records: Vec<String> = lines
        .iter()
        .map(|l| {
            let p = prompts.iter().find(|p| l["prompt"].as_str().unwrap().contains(*p)).unwrap();
            serde_json::json!({"prompt": [{"role": "user", "content": p}], "completion": l["completion"]}).to_string()
        })
        .collect();
    let f = d.join("records.jsonl");
    std::fs::write(&f, records.join("\n") + "\n").unwrap();
    let (c, scored, err) = ft(&["score", "--model", s(&rm), "--data", s(&f)]);
    assert_eq!(c, 0, "{err}");
    for (l, line) in lines.iter().zip(scored.lines()) {
        let want = serde_json::from_str::<serde_json::Value>(line).unwrap()["reward"].as_f64().unwrap();
        let got = l["rewards"]["rm"].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-5, "{got} vs ft score's {want}");
    }
    let m = metrics(&d);
    assert!(m[0]["rewards/rm/std"].as_f64().unwrap() > 1e-3, "{}", m[0]);
}
