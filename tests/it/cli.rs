//! The `ft` binary: help, version, and bad input giving one clear error, a non-zero exit and
//! no panic.

use std::path::{Path, PathBuf};

use super::common::*;


/// A copy of the llama fixture to break.
fn llama_copy(name: &str) -> PathBuf {
    let d = scratch(name);
    for e in std::fs::read_dir(model_dir("llama")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
    }
    d
}

fn assert_clean_error(args: &[&str], code: i32, needles: &[&str]) {
    let (c, _out, err) = ft(args);
    assert_eq!(c, code, "{args:?}: exit {c}, stderr: {err}");
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: stderr lacks {n:?}: {err}");
    }
}

fn chat() -> String {
    fixtures().join("chat.jsonl").display().to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn help_and_version() {
    let (c, out, _) = ft(&["--help"]);
    assert_eq!(c, 0);
    for sub in ["train", "merge", "generate", "eval", "import-gguf", "quantize", "data"] {
        assert!(out.contains(sub), "{out}");
        let (c, out, _) = ft(&[sub, "--help"]);
        assert_eq!(c, 0);
        assert!(out.len() > 200, "{sub} --help is too thin: {out}");
    }
    for sub in [["data", "check"], ["data", "show"], ["recipe", "check"]] {
        let (c, out, _) = ft(&[sub[0], sub[1], "--help"]);
        assert_eq!(c, 0);
        assert!(out.len() > 200, "{sub:?} --help is too thin: {out}");
    }
    let (c, out, _) = ft(&["--version"]);
    assert_eq!(c, 0);
    assert!(out.contains(env!("CARGO_PKG_VERSION")) && out.contains("backends: cpu"), "{out}");
}

#[test]
fn eval_and_generate_work_from_the_command_line() {
    let m = model_dir("llama");
    let (c, out, err) = ft(&["eval", "--model", s(&m), "--data", &chat(), "--template", "chatml", "--json"]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let exp = json(&fixtures().join("expected_chat_loss.json"));
    assert!((v["loss"].as_f64().unwrap() - exp["models/llama"]["chat_loss_mean"].as_f64().unwrap()).abs() <= 1e-4);
    assert_eq!(v["tokens"], 44);
    assert_eq!(v["samples"], 3);
    assert!((v["perplexity"].as_f64().unwrap() - v["loss"].as_f64().unwrap().exp()).abs() < 1e-6);

    let exp = json(&m.join("expected_generate.json"));
    let (c, out, err) = ft(&[
        "generate", "--model", s(&m), "--system", "You are terse.", "--prompt", "What is the capital of France?",
        "--max-new-tokens", "12", "--ignore-eos", "--json",
    ]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["prompt_ids"], exp["prompt_ids"]);
    assert_eq!(v["ids"], exp["greedy_ids"]);
    assert_eq!(v["tokens"], 12);
    assert!(v["text"].is_string() && v["tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_models_give_located_errors() {
    let gen = |m: &Path| vec!["generate".to_string(), "--model".into(), s(m).into(), "--prompt".into(), "hi".into()];
    let run = |args: Vec<String>, code: i32, needles: &[&str]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_clean_error(&a, code, needles);
    };

    let d = llama_copy("noconfig");
    std::fs::remove_file(d.join("config.json")).unwrap();
    run(gen(&d), 1, &["config.json"]);

    let d = llama_copy("badconfig");
    std::fs::write(d.join("config.json"), "{\"model_type\": \"llama\", \"hidden_size\": ").unwrap();
    run(gen(&d), 1, &["config.json", "not a valid model config"]);

    let d = llama_copy("arch");
    let cfg = std::fs::read_to_string(d.join("config.json")).unwrap().replace("\"llama\"", "\"gpt_neox\"");
    std::fs::write(d.join("config.json"), cfg).unwrap();
    run(gen(&d), 1, &["unknown architecture \"gpt_neox\""]);

    let d = llama_copy("rope");
    let mut cfg = json(&d.join("config.json"));
    cfg["rope_parameters"] = serde_json::json!({"rope_type": "mrope", "rope_theta": 10000.0, "factor": 2.0});
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    run(gen(&d), 1, &["unsupported rope_scaling \"mrope\""]);

    let d = llama_copy("truncated");
    let st = d.join("model.safetensors");
    let len = std::fs::metadata(&st).unwrap().len();
    std::fs::File::options().write(true).open(&st).unwrap().set_len(len / 2).unwrap();
    run(gen(&d), 1, &["model.safetensors", "truncated or corrupt"]);

    let d = scratch("cli-shard");
    for e in std::fs::read_dir(model_dir("qwen2")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::remove_file(d.join("model-00003-of-00004.safetensors")).unwrap();
    run(gen(&d), 1, &["model-00003-of-00004.safetensors", "missing"]);

    let d = scratch("cli-empty");
    run(gen(&d), 1, &["config.json"]);
}

#[test]
fn bad_data_gives_file_and_line() {
    let m = model_dir("llama");
    let d = scratch("cli-data");
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n{\"messages\": [{\"role\": \"user\"\n").unwrap();
    assert_clean_error(&["eval", "--model", s(&m), "--data", s(&bad)], 3, &[&format!("{}:2", bad.display()), "invalid JSON"]);
    let noasst = d.join("noasst.jsonl");
    std::fs::write(&noasst, "{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n").unwrap();
    assert_clean_error(&["eval", "--model", s(&m), "--data", s(&noasst)], 3, &[&format!("{}:1", noasst.display()), "no assistant turn"]);
    // A data file that cannot be read is a file problem (1); what a file holds is data (3).
    assert_clean_error(&["eval", "--model", s(&m), "--data", s(&d.join("missing.jsonl"))], 1, &["missing.jsonl"]);
    let empty = d.join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    assert_clean_error(&["eval", "--model", s(&m), "--data", s(&empty)], 3, &["empty.jsonl", "no records"]);
    assert_clean_error(&["data", "check", s(&empty), "--model", s(&m)], 3, &["empty.jsonl", "no records"]);
    // A UTF-8 byte-order mark before the first record is accepted.
    let bom = d.join("bom.jsonl");
    std::fs::write(&bom, "\u{feff}{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}, {\"role\": \"assistant\", \"content\": \"b\"}]}\n").unwrap();
    let (c, _, err) = ft(&["eval", "--model", s(&m), "--data", s(&bom), "--template", "chatml"]);
    assert_eq!(c, 0, "{err}");
}

#[test]
fn import_rejects_non_gguf() {
    let d = scratch("cli-gguf");
    let f = d.join("x.gguf");
    std::fs::write(&f, b"not a gguf at all").unwrap();
    assert_clean_error(&["import-gguf", s(&f), "--out", s(&d.join("out"))], 1, &["x.gguf", "not a GGUF file"]);
    assert!(!d.join("out").exists(), "nothing half-written");
}

#[test]
fn data_check_reports_every_bad_line() {
    let d = scratch("datacheck");
    let f = d.join("d.jsonl");
    let good = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
    let mut bytes = format!("{good}\n{{\"messages\": [\n{good}\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"a\"}}]}}\n").into_bytes();
    bytes.extend_from_slice(b"\xff\xfe\n");
    std::fs::write(&f, bytes).unwrap();
    let (c, out, err) = ft(&["data", "check", s(&f), "--model", s(&model_dir("llama")), "--template", "chatml", "--max-len", "10", "--json"]);
    assert_eq!(c, 3, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["samples"], 2);
    let at: Vec<String> = v["errors"].as_array().unwrap().iter().map(|e| e["at"].as_str().unwrap().to_string()).collect();
    let file = f.display().to_string();
    assert_eq!(at, vec![format!("{file}:2"), format!("{file}:4"), format!("{file}:5")]);
    let warnings: Vec<(String, String)> = v["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["at"].as_str().unwrap().to_string(), w["message"].as_str().unwrap().to_string()))
        .collect();
    assert!(warnings.iter().any(|(at, m)| at == &format!("{file}:3") && m.contains("duplicate")), "{warnings:?}");
    assert!(warnings.iter().any(|(at, m)| at == &format!("{file}:1") && m.contains("longer than --max-len 10")), "{warnings:?}");
    assert_eq!(v["too_long"], 2);
    assert!(v["trainable_tokens"].as_u64().unwrap() > 0);
}

/// `adapters/lora-r4` with one value of one `lora_B` set to NaN.
fn nan_adapter(name: &str) -> (PathBuf, String) {
    let d = scratch(name);
    let src = fixtures().join("adapters/lora-r4");
    std::fs::copy(src.join("adapter_config.json"), d.join("adapter_config.json")).unwrap();
    let bytes = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let target = tensors.iter_mut().find(|t| t.0.contains("q_proj.lora_B")).unwrap();
    assert_eq!(target.1, safetensors::Dtype::F32);
    target.3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let name = target.0.clone();
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &d.join("adapter_model.safetensors")).unwrap();
    (d, name)
}

#[test]
fn nan_weights_never_become_numbers() {
    let (adapter, tensor) = nan_adapter("cli-nan-adapter");
    let m = model_dir("llama");
    // The CPU attention propagates the NaN (its softmax once skipped NaN scores and returned zeros),
    // so the loss is NaN, which `ft eval` reports as an error, not a number.
    assert_clean_error(&["eval", "--model", s(&m), "--adapter", s(&adapter), "--data", &chat(), "--template", "chatml"], 1, &["non-finite", "NaN"]);
    // `ft merge` refuses to write non-finite weights, naming the tensor, and writes nothing.
    let out = scratch("cli-nan-merge").join("merged");
    let module = tensor.trim_start_matches("base_model.model.").trim_end_matches(".lora_B.weight");
    assert_clean_error(&["merge", "--model", s(&m), "--adapter", s(&adapter), "--out", s(&out)], 1, &[module, "non-finite"]);
    assert!(!out.exists(), "nothing written");
}

/// `models/<name>` laid out in a Hugging Face hub cache under `root` as huggingface_hub writes it:
/// `models--<org>--<repo>/blobs/<hash>` and `snapshots/<commit>/<file>` symlinks to them, with
/// `refs/<rev>` naming the commit.
fn hub_cache(root: &std::path::Path, name: &str, repo: &str, commit: &str, refs: &[&str]) {
    let repo_dir = root.join(format!("models--{}", repo.replace('/', "--")));
    let (blobs, snap) = (repo_dir.join("blobs"), repo_dir.join("snapshots").join(commit));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for (i, f) in std::fs::read_dir(model_dir(name)).unwrap().flatten().enumerate() {
        let blob = blobs.join(format!("{i:040x}"));
        std::fs::copy(f.path(), &blob).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{i:040x}"), snap.join(f.file_name())).unwrap();
    }
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    for r in refs {
        std::fs::write(repo_dir.join("refs").join(r), commit).unwrap();
    }
}

/// A minimal Hugging Face hub over HTTP (the two endpoints hf-hub's sync API uses: the repo
/// listing `/api/models/<id>/revision/<rev>` and `/<id>/resolve/<rev>/<file>` with ranges),
/// serving `dir`'s files as repo `id` at commit `sha`. Returns the endpoint URL and a counter of
/// file downloads.
fn fake_hub(id: &'static str, dir: std::path::PathBuf, sha: &'static str) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use sha2::Digest;
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let downloads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = downloads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            // `Range: bytes=S-E` (E absent: to the end).
            let mut range: Option<(usize, Option<usize>)> = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                if let Some(r) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = r.trim().split_once('-').unwrap_or((r.trim(), ""));
                    range = a.parse().ok().map(|a| (a, b.parse().ok()));
                }
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut out = stream;
            let respond = |out: &mut std::net::TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
                let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                let _ = out.write_all(head.as_bytes());
                let _ = out.write_all(body);
            };
            if path == format!("/api/models/{id}/revision/main") {
                let siblings: Vec<serde_json::Value> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| serde_json::json!({"rfilename": e.file_name().to_string_lossy()})).collect();
                let body = serde_json::json!({"sha": sha, "siblings": siblings}).to_string();
                respond(&mut out, "200 OK", &[("Content-Type".into(), "application/json".into())], body.as_bytes());
            } else if let Some(file) = path.strip_prefix(&format!("/{id}/resolve/main/")) {
                let Ok(bytes) = std::fs::read(dir.join(file)) else {
                    respond(&mut out, "404 Not Found", &[], b"");
                    continue;
                };
                let (start, end) = range.unwrap_or((0, None));
                let start = start.min(bytes.len());
                let end = end.map_or(bytes.len(), |e| (e + 1).min(bytes.len()));
                let body = &bytes[start..end.max(start)];
                if range.is_none_or(|(_, e)| e.is_none()) {
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst); // a download, not the metadata probe
                }
                let etag = format!("\"{:x}\"", sha2::Sha256::digest(&bytes));
                let headers = [
                    ("x-repo-commit".to_string(), sha.to_string()),
                    ("etag".to_string(), etag),
                    ("content-range".to_string(), format!("bytes {start}-{}/{}", (start + body.len()).max(1) - 1, bytes.len())),
                ];
                respond(&mut out, "206 Partial Content", &headers, body);
            } else {
                respond(&mut out, "404 Not Found", &[], b"");
            }
        }
    });
    (url, downloads)
}

#[test]
fn a_model_id_that_is_not_cached_is_downloaded_into_the_hub_cache() {
    // hf-hub against a local stand-in for the hub: the model files land in HF_HUB_CACHE as
    // huggingface_hub lays them out, the command runs on them, and a second run reads the cache.
    let d = scratch("hub-download");
    let sha = "89abcdef0123456789abcdef0123456789abcdef";
    let (endpoint, downloads) = fake_hub("tiny-org/tiny-qwen3", model_dir("qwen3"), sha);
    let hub = d.join("hub");
    let data = fixtures().join("chat.jsonl");
    let eval = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ft"))
            .args(["eval", "--json", "--template", "chatml", "--model", "tiny-org/tiny-qwen3", "--data", data.to_str().unwrap()])
            .env("HF_HUB_CACHE", &hub)
            .env("HF_ENDPOINT", &endpoint)
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (c, out, err) = eval();
    assert_eq!(c, Some(0), "{err}");
    let want = json(&fixtures().join("expected_chat_loss.json"))["models/qwen3"]["chat_loss_mean"].as_f64().unwrap();
    let loss = serde_json::from_str::<serde_json::Value>(&out).unwrap()["loss"].as_f64().unwrap();
    assert!((loss - want).abs() <= 1e-4, "{loss} vs {want}");
    let repo = hub.join("models--tiny-org--tiny-qwen3");
    assert_eq!(std::fs::read_to_string(repo.join("refs/main")).unwrap().trim(), sha);
    let snapshot = repo.join("snapshots").join(sha);
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(std::fs::symlink_metadata(snapshot.join(f)).unwrap().file_type().is_symlink(), "{f} links into blobs/");
    }
    // Only model files: the oracle's expected_* outputs in the served directory are not fetched.
    assert!(!snapshot.join("expected_logits.safetensors").exists() && !snapshot.join("expected_generate.json").exists());
    let first = downloads.load(std::sync::atomic::Ordering::SeqCst);
    assert!(first >= 4, "{first} files downloaded");
    let (c, _, err) = eval();
    assert_eq!(c, Some(0), "{err}");
    assert_eq!(downloads.load(std::sync::atomic::Ordering::SeqCst), first, "the second run reads the cache");
}

#[test]
fn hugging_face_model_ids_resolve_from_the_local_cache() {
    // `--model org/name[@rev]` and a recipe's `model.path` read the snapshot huggingface_hub
    // cached (HF_HUB_CACHE, or HF_HOME/hub): refs/main by default, a named ref, or a commit.
    let d = scratch("hub");
    let hub = d.join("hf/hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    hub_cache(&hub, "llama", "tiny-org/tiny-llama", commit, &["main", "v1"]);
    let data = fixtures().join("chat.jsonl");
    let eval = |model: &str, env: &[(&str, &std::path::Path)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ft"));
        cmd.args(["eval", "--json", "--template", "chatml", "--model", model, "--data", data.to_str().unwrap()]);
        cmd.env_remove("HF_HUB_CACHE").env_remove("HF_HOME").env_remove("HF_HUB_OFFLINE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let want = json(&fixtures().join("expected_chat_loss.json"))["models/llama"]["chat_loss_mean"].as_f64().unwrap();
    for (model, env) in [
        ("tiny-org/tiny-llama", ("HF_HUB_CACHE", hub.clone())),
        ("tiny-org/tiny-llama@v1", ("HF_HOME", d.join("hf"))),
        (&format!("tiny-org/tiny-llama@{commit}") as &str, ("HF_HUB_CACHE", hub.clone())),
    ] {
        let (c, out, err) = eval(model, &[(env.0, &env.1)]);
        assert_eq!(c, 0, "{model}: {err}");
        let loss = serde_json::from_str::<serde_json::Value>(&out).unwrap()["loss"].as_f64().unwrap();
        assert!((loss - want).abs() <= 1e-4, "{model}: {loss} vs {want}");
    }
    // Not cached: downloaded from HF_ENDPOINT (here nothing listens: the error says where ft
    // looked in the cache, what it tried, and how to fetch it); HF_HUB_OFFLINE said when set.
    let nowhere = std::path::Path::new("http://127.0.0.1:9");
    let (c, _, err) = eval("tiny-org/other", &[("HF_HUB_CACHE", &hub), ("HF_ENDPOINT", nowhere)]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("downloading it from http://127.0.0.1:9 failed") && err.contains("nor a model in the Hugging Face cache") && err.contains(hub.to_str().unwrap()) && err.contains("hf download tiny-org/other"), "{err}");
    let (c, _, err) = eval("tiny-org/tiny-llama@v2", &[("HF_HUB_CACHE", &hub), ("HF_HUB_OFFLINE", std::path::Path::new("1"))]);
    assert_eq!(c, 2, "{err}");
    assert!(err.contains("no revision \"v2\"") && err.contains("HF_HUB_OFFLINE"), "{err}");
    // A recipe's model.path: the same resolution; an id that is not cached (or a directory a
    // pipeline has not made yet) fails when the model loads, saying both.
    let recipe = |model: &str, run: &str| {
        let r = d.join(format!("{run}.toml"));
        std::fs::write(&r, format!("[model]\npath = \"{model}\"\n[data]\ntrain = \"{}\"\ntemplate = \"chatml\"\n[train]\nmax_steps = 1\n[output]\ndir = \"{}\"\n", data.display(), d.join(run).display())).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ft"))
            .args(["train", r.to_str().unwrap(), "--quiet"])
            .env("HF_HUB_CACHE", &hub)
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (c, err) = recipe("tiny-org/tiny-llama@v1", "run-cached");
    assert_eq!(c, Some(0), "{err}");
    let (c, err) = recipe("tiny-org/missing", "run-missing");
    assert_ne!(c, Some(0), "{err}");
    assert!(err.contains("tiny-org/missing") && err.contains("downloading it") && err.contains("nor a model in the Hugging Face cache"), "{err}");
}
