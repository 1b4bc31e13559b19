//! `ft eval --generate` against transformers' greedy completions (`fixtures/geneval`): the
//! same tokens, texts and log-probabilities, scored; the stop rule; the `--fail-under` gate;
//! `--baseline` comparison; bad scorers.

use std::path::{Path, PathBuf};

use super::common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The oracle's four prompts as a prompts file; prompt `i` expects `want(i)` in field "want".
fn prompts(dir: &Path, want: impl Fn(usize, &serde_json::Value) -> String) -> PathBuf {
    let o = json(&fixtures().join("geneval/expected.json"));
    let lines: Vec<String> = o["prompts"].as_array().unwrap().iter().enumerate().map(|(i, p)| serde_json::json!({"prompt": p["messages"], "want": want(i, p)}).to_string()).collect();
    let f = dir.join("prompts.jsonl");
    std::fs::write(&f, lines.join("\n") + "\n").unwrap();
    f
}

fn generate_eval(data: &Path, adapter: bool, extra: &[&str]) -> (i32, String, String) {
    let (model, lora) = (model_dir("llama"), fixtures().join("adapters/lora-r4"));
    let mut args = vec!["eval", "--generate", "--model", s(&model), "--template", "chatml", "--max-new-tokens", "16", "--data", s(data)];
    if adapter {
        args.extend(["--adapter", s(&lora)]);
    }
    args.extend(extra);
    ft(&args)
}

fn answers(f: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(f).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn greedy_answers_match_transformers_and_are_scored() {
    let d = scratch("geneval-oracle");
    let o = json(&fixtures().join("geneval/expected.json"));
    // Prompts 0 and 2 expect exactly what the model says; 1 and 3 something else.
    let data = prompts(&d, |i, p| if i % 2 == 0 { p["text"].as_str().unwrap().to_string() } else { "something else".into() });
    let out = d.join("answers.jsonl");
    let (c, stdout, err) = generate_eval(&data, true, &["--scorer", "answer:want", "--out", s(&out), "--json", "--batch-size", "3"]);
    assert_eq!(c, 0, "{err}");
    let got = answers(&out);
    for (a, want) in got.iter().zip(o["prompts"].as_array().unwrap()) {
        assert_eq!(a["prompt"], want["prompt_text"], "the prompt as rendered");
        assert_eq!(a["ids"], want["completion_ids"], "{}: the greedy tokens", want["kind"]);
        assert_eq!(a["completion"], want["text"], "{}: the text", want["kind"]);
        let (x, y) = (a["sum_logprob"].as_f64().unwrap(), want["sum_logprob"].as_f64().unwrap());
        assert!((x - y).abs() < 1e-4, "{}: Σ log p {x} vs {y}", want["kind"]);
        assert_eq!(a["truncated"], true, "none of the oracle's completions stops");
    }
    let scores: Vec<f64> = got.iter().map(|a| a["score"].as_f64().unwrap()).collect();
    assert_eq!(scores, [1.0, 0.0, 1.0, 0.0]);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((v["answers"].as_u64(), v["mean_score"].as_f64(), v["pass_rate"].as_f64()), (Some(4), Some(0.5), Some(0.5)));
    let ci = v["pass_ci95"].as_array().unwrap();
    assert!((ci[0].as_f64().unwrap() - 0.150_036).abs() < 1e-5 && (ci[1].as_f64().unwrap() - 0.849_964).abs() < 1e-5, "Wilson interval of 2/4: {ci:?}");
}

#[test]
fn a_stop_id_ends_the_answer_after_it() {
    // As the oracle's README says: with one of the generated ids as a stop id, the completion is
    // the prefix through its first occurrence, and the text leaves the stop token out.
    let d = scratch("geneval-stop");
    let o = json(&fixtures().join("geneval/expected.json"));
    let data = prompts(&d, |_, _| String::new());
    let full: Vec<u64> = o["prompts"][0]["completion_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    let stop = full[3];
    let first = full.iter().position(|&x| x == stop).unwrap();
    let out = d.join("answers.jsonl");
    let (c, _, err) = generate_eval(&data, true, &["--scorer", "regex:.", "--stop-id", &stop.to_string(), "--out", s(&out)]);
    assert_eq!(c, 0, "{err}");
    let a = &answers(&out)[0];
    let ids: Vec<u64> = a["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert_eq!(ids, full[..=first]);
    assert_eq!(a["truncated"], false);
    let tok = ft::data::tokenizer::TextTokenizer::from_dir(&model_dir("llama")).unwrap();
    let want = tok.decode(&full[..first].iter().map(|&x| x as u32).collect::<Vec<_>>()).unwrap();
    assert_eq!(a["completion"].as_str().unwrap(), want);
}

#[test]
fn fail_under_gates_and_baseline_compares() {
    let d = scratch("geneval-gate");
    // The adapter's answer to every prompt, expected: the adapter scores 1 each, the base 0.
    let data = prompts(&d, |_, p| p["text"].as_str().unwrap().to_string());
    let (adapter_out, base_out) = (d.join("adapter.jsonl"), d.join("base.jsonl"));
    let (c, _, err) = generate_eval(&data, false, &["--scorer", "answer:want", "--out", s(&base_out), "--fail-under", "0.5"]);
    assert_eq!(c, 5, "the base model fails the gate: {err}");
    assert!(err.contains("below --fail-under 0.5"), "{err}");
    assert_eq!(answers(&base_out).len(), 4, "the answers are written before the gate fails");
    let (c, stdout, err) = generate_eval(&data, true, &["--scorer", "answer:want", "--out", s(&adapter_out), "--fail-under", "1", "--baseline", s(&base_out), "--json"]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let b = &v["baseline"];
    assert_eq!((b["paired"].as_u64(), b["wins"].as_u64(), b["losses"].as_u64(), b["ties"].as_u64()), (Some(4), Some(4), Some(0), Some(0)), "{b}");
    assert_eq!(b["mean_difference"].as_f64(), Some(1.0));
    assert!((b["sign_test_p"].as_f64().unwrap() - 0.125).abs() < 1e-12, "4 wins of 4: p = 2/16");
    // A baseline on other prompts is refused, naming it.
    let other = d.join("other.jsonl");
    std::fs::write(&other, std::fs::read_to_string(&base_out).unwrap().replace("Say hello", "Say goodbye")).unwrap();
    let (c, _, err) = generate_eval(&data, true, &["--scorer", "answer:want", "--baseline", s(&other)]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("other.jsonl") && err.contains("differs"), "{err}");
}

#[test]
fn bad_scorers_are_clear_errors_and_write_nothing() {
    let d = scratch("geneval-bad");
    let data = prompts(&d, |_, _| "x".into());
    let out = d.join("answers.jsonl");
    for (scorer, code, want) in [
        ("regex:(", 2, "pattern"),
        ("length:3", 2, "unknown scorer kind"),
        ("{kind = \"answer\"}", 2, "needs field"),
        ("{kind = \"regex\", pattern = \"a\", colour = 1}", 2, "colour"),
    ] {
        let (c, _, err) = generate_eval(&data, true, &["--scorer", scorer, "--out", s(&out)]);
        assert_eq!(c, code, "{scorer}: {err}");
        assert!(err.contains("--scorer") && err.contains(want), "{scorer}: {err}");
    }
    let prog = d.join("scorer.py");
    std::fs::write(&prog, "import sys; sys.exit(3)").unwrap();
    let (c, _, err) = generate_eval(&data, true, &["--scorer", &format!("command:python3 {}", prog.display()), "--out", s(&out)]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("scorer.py") && err.contains("exited with"), "{err}");
    assert!(!out.exists(), "nothing written");
    let (c, _, err) = generate_eval(&data, true, &[]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("--scorer"), "{err}");
}

#[test]
fn a_reward_model_scores_the_answers_as_ft_score_does() {
    // `--scorer model:DIR`: each answer's score is the reward model's reward of the prompt's
    // messages plus the answer as the assistant's reply — what `ft score` gives that record.
    let d = scratch("geneval-reward-model");
    let o = json(&fixtures().join("geneval/expected.json"));
    let data = prompts(&d, |_, _| "x".into());
    let (out, rm) = (d.join("answers.jsonl"), fixtures().join("reward/model"));
    let (c, stdout, err) = generate_eval(&data, true, &["--scorer", &format!("model:{}", rm.display()), "--pass-threshold", "0", "--out", s(&out), "--json"]);
    assert_eq!(c, 0, "{err}");
    let got = answers(&out);
    let records: Vec<String> = got
        .iter()
        .zip(o["prompts"].as_array().unwrap())
        .map(|(a, p)| serde_json::json!({"prompt": p["messages"], "completion": a["completion"]}).to_string())
        .collect();
    let f = d.join("records.jsonl");
    std::fs::write(&f, records.join("\n") + "\n").unwrap();
    let (c, scored, err) = ft(&["score", "--model", s(&rm), "--data", s(&f)]);
    assert_eq!(c, 0, "{err}");
    let mut rewards = Vec::new();
    for (a, line) in got.iter().zip(scored.lines()) {
        let want = serde_json::from_str::<serde_json::Value>(line).unwrap()["reward"].as_f64().unwrap();
        let score = a["scores"]["model"].as_f64().unwrap();
        assert!((score - want).abs() <= 1e-5, "{score} vs ft score's {want}");
        assert_eq!(a["passed"].as_bool().unwrap(), score >= 0.0);
        rewards.push(score);
    }
    assert!(rewards.iter().any(|r| (r - rewards[0]).abs() > 1e-3), "distinct answers, distinct rewards: {rewards:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let mean = rewards.iter().sum::<f64>() / rewards.len() as f64;
    assert!((v["mean_score"].as_f64().unwrap() - mean).abs() < 1e-9);
    // A directory that is not a reward model: a clear error naming it, nothing written.
    std::fs::remove_file(&out).unwrap();
    let (c, _, err) = generate_eval(&data, true, &["--scorer", &format!("model:{}", model_dir("llama").display()), "--out", s(&out)]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("not a reward model") && err.contains("llama"), "{err}");
    assert!(!out.exists());
}
