//! The data layer end to end: malformed lines are located errors (never panics), `.jsonl.gz`,
//! directories and globs read like plain files, `ft data show` marks exactly the trained tokens,
//! and `ft data check` understands preference pairs and reports packing.

use std::io::Write;
use std::path::Path;

use rand::{Rng, SeedableRng};

use super::common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Malformed variants of valid lines: every truncation, wrong types, unknown roles, invalid
/// UTF-8, control bytes, deep nesting. Each is a bad line.
fn malformed(rng: &mut rand::rngs::StdRng) -> Vec<Vec<u8>> {
    let good = [
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#,
        r#"{"prompt": "q", "chosen": "a", "rejected": "b"}"#,
        r#"{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}"#,
    ];
    let mut out: Vec<Vec<u8>> = Vec::new();
    for g in good {
        for cut in 1..g.len() {
            out.push(g.as_bytes()[..cut].to_vec());
        }
        for _ in 0..20 {
            // Invalid UTF-8 at a random place.
            let mut b = g.as_bytes().to_vec();
            let at = rng.random_range(0..b.len());
            b.insert(at, [0xff, 0xc3, 0x80 | 0x40, 0xed][rng.random_range(0..4)]);
            if std::str::from_utf8(&b).is_err() {
                out.push(b);
            }
        }
    }
    for wrong in ["3", "null", "[]", "{}", "true", "[1, 2]"] {
        out.push(format!(r#"{{"messages": [{{"role": "user", "content": {wrong}}}, {{"role": "assistant", "content": "a"}}]}}"#).into_bytes());
        out.push(format!(r#"{{"messages": {wrong}}}"#).into_bytes());
        out.push(format!(r#"{{"prompt": "q", "chosen": {wrong}, "rejected": "b"}}"#).into_bytes());
    }
    out.push(r#"{"messages": [{"role": "robot", "content": "a"}]}"#.into());
    out.push(r#"{"messages": [{"role": "user", "content": "a\u0000b"}]}"#.into());
    out.push(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes());
    out.push(format!(r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#, "x".repeat(3 << 20)).into_bytes());
    out.push(b"\x00\x01\x02".to_vec());
    out
}

#[test]
fn malformed_lines_are_located_errors_and_never_panic() {
    let d = scratch("data-fuzz");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let bad = malformed(&mut rng);
    // The parsers themselves: an error, no panic, for every variant.
    for b in &bad {
        let text = String::from_utf8_lossy(b);
        let r = std::panic::catch_unwind(|| {
            let _ = ft::data::preference::parse_pair(&text, ft::data::conversation::Location { file: "x.jsonl".into(), line: 1 });
            ft::data::conversation::parse_line(&text).is_err()
        });
        let rejected = r.unwrap_or_else(|_| panic!("a parser panicked on {text:.80}"));
        // Invalid UTF-8 is caught before parsing (the lossy text here may be a valid line).
        assert!(rejected || std::str::from_utf8(b).is_err(), "accepted {text:.80}");
    }
    // `ft data check`: one good line, then every bad one; each error names its own line.
    let f = d.join("bad.jsonl");
    let good = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;
    let mut bytes = format!("{good}\n").into_bytes();
    for b in &bad {
        bytes.extend_from_slice(b);
        bytes.push(b'\n');
    }
    std::fs::write(&f, bytes).unwrap();
    let (c, out, err) = ft(&["data", "check", s(&f), "--model", s(&model_dir("llama")), "--template", "chatml", "--json"]);
    assert_eq!(c, 3, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["samples"], 1);
    let at: Vec<String> = v["errors"].as_array().unwrap().iter().map(|e| e["at"].as_str().unwrap().to_string()).collect();
    let want: Vec<String> = (0..bad.len()).map(|i| format!("{}:{}", f.display(), i + 2)).collect();
    assert_eq!(at, want);
    // Training and eval stop at the first bad line, naming it.
    let (c, _, err) = ft(&["eval", "--model", s(&model_dir("llama")), "--template", "chatml", "--data", s(&f)]);
    assert_eq!(c, 3, "{err}");
    assert!(err.contains(&format!("{}:2", f.display())), "{err}");
}

#[test]
fn gzip_directories_and_globs_read_like_the_plain_file() {
    let d = scratch("data-inputs");
    let plain = std::fs::read(fixtures().join("chat.jsonl")).unwrap();
    let lines: Vec<&[u8]> = plain.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
    let parts = d.join("parts");
    std::fs::create_dir_all(&parts).unwrap();
    // Line 1 plain, lines 2-3 gzip-compressed, plus a file the directory reader must skip.
    std::fs::write(parts.join("a.jsonl"), [lines[0], b"\n"].concat()).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&[lines[1], b"\n", lines[2], b"\n"].concat()).unwrap();
    std::fs::write(parts.join("b.jsonl.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(parts.join("notes.txt"), "not data").unwrap();
    let eval = |data: &str| {
        let (c, out, err) = ft(&["eval", "--model", s(&model_dir("llama")), "--template", "chatml", "--json", "--data", data]);
        assert_eq!(c, 0, "{data}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        (v["loss"].as_f64().unwrap(), v["samples"].as_u64().unwrap())
    };
    let want = eval(s(&fixtures().join("chat.jsonl")));
    assert_eq!(want.1, 3);
    assert_eq!(eval(s(&parts)), want);
    assert_eq!(eval(&format!("{}/*.jsonl*", parts.display())), want);
    let (c, _, err) = ft(&["eval", "--model", s(&model_dir("llama")), "--data", &format!("{}/*.none", parts.display())]);
    assert_ne!(c, 0);
    assert!(err.contains("no .jsonl"), "{err}");
}

#[test]
fn data_show_marks_exactly_the_trained_tokens() {
    let cases = json(&fixtures().join("chat_tokens.json"));
    for (i, case) in cases.as_array().unwrap().iter().enumerate() {
        let (c, out, err) = ft(&[
            "data", "show", s(&fixtures().join("chat.jsonl")), "--model", s(&model_dir("llama")), "--template", "chatml",
            "--index", &i.to_string(), "--json",
        ]);
        assert_eq!(c, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(ids(&v["ids"]), ids(&case["input_ids"]));
        assert_eq!(ids(&v["mask"]), ids(&case["assistant_mask"]));
        // The marked spans, with the markers removed, are the text; inside them is what is trained.
        let marked = v["marked"].as_str().unwrap();
        assert_eq!(marked.replace("[[", "").replace("]]", ""), case["text"].as_str().unwrap());
        assert!(marked.contains("[[") && marked.matches("[[").count() == marked.matches("]]").count());
    }
    let (c, out, _) = ft(&["data", "show", s(&fixtures().join("dpo/prefs.jsonl")), "--model", s(&model_dir("llama")), "--template", "chatml", "--index", "1"]);
    assert_eq!(c, 0);
    assert!(out.contains("── chosen") && out.contains("[[4<|im_end|>]]") && out.contains("[[5<|im_end|>]]"), "{out}");
    let (c, _, err) = ft(&["data", "show", s(&fixtures().join("chat.jsonl")), "--model", s(&model_dir("llama")), "--index", "9"]);
    assert_eq!(c, 2);
    assert!(err.contains("only 3 records"), "{err}");
    // A bad record is a data error naming file:line.
    let d = scratch("data-show-bad");
    let bad = d.join("bad.jsonl");
    std::fs::write(&bad, "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n").unwrap();
    let (c, _, err) = ft(&["data", "show", s(&bad), "--model", s(&model_dir("llama")), "--template", "chatml"]);
    assert_eq!(c, 3, "{err}");
    assert!(err.contains("bad.jsonl:1") && err.contains("no assistant turn"), "{err}");
}

#[test]
fn data_check_reads_preference_pairs_and_reports_packing() {
    let d = scratch("data-check-prefs");
    let f = d.join("p.jsonl");
    let pairs = std::fs::read_to_string(fixtures().join("dpo/prefs.jsonl")).unwrap();
    std::fs::write(&f, format!("{pairs}{}\n", r#"{"prompt": "q", "chosen": "same", "rejected": "same"}"#)).unwrap();
    let (c, out, err) = ft(&["data", "check", s(&f), "--model", s(&model_dir("llama")), "--template", "chatml", "--max-len", "64", "--json"]);
    assert_eq!(c, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["samples"].as_u64(), v["pairs"].as_u64()), (Some(4), Some(4)));
    let oracle = json(&fixtures().join("dpo/expected.json"));
    let trained: u64 = oracle["pairs"].as_array().unwrap().iter().map(|p| p["chosen"]["tokens"].as_u64().unwrap() + p["rejected"]["tokens"].as_u64().unwrap()).sum();
    assert!(v["trainable_tokens"].as_u64().unwrap() > trained, "the oracle pairs' completions plus the extra pair's");
    assert!(v["warnings"].as_array().unwrap().iter().any(|w| w["message"].as_str().unwrap().contains("identical") && w["at"].as_str().unwrap().ends_with(":4")));
    let eff = v["packing_efficiency"].as_f64().unwrap();
    assert!(eff > 0.5 && eff <= 1.0, "{eff}");
}

/// A copy of the llama fixture whose chat template renders tools (`tests/fixtures/tools`).
fn tool_model(name: &str) -> std::path::PathBuf {
    let d = scratch(name).join("model");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(model_dir("llama").join(f), d.join(f)).unwrap();
    }
    std::fs::copy(fixtures().join("tools/chat_template.jinja"), d.join("chat_template.jinja")).unwrap();
    d
}

#[test]
fn tool_calls_and_tools_render_as_transformers_does() {
    use ft::data::conversation::{parse_line, Role};
    use ft::data::encode::encode_chat;
    use ft::data::template::ChatTemplate;
    use ft::data::tokenizer::TextTokenizer;
    let exp = json(&fixtures().join("tools/expected.json"));
    let source = std::fs::read_to_string(fixtures().join("tools/chat_template.jinja")).unwrap();
    let template = ChatTemplate::new(&source, "<|im_start|>", "<|im_end|>").unwrap();
    let tok = TextTokenizer::from_dir(&model_dir("llama")).unwrap();
    let lines = std::fs::read_to_string(fixtures().join("tools/tools.jsonl")).unwrap();
    for (line, want) in lines.lines().zip(exp["records"].as_array().unwrap()) {
        let chat = parse_line(line).unwrap();
        // Byte for byte what transformers renders: tools and tool calls through tojson (Python's
        // separators, float repr, no HTML escaping, the record's key order), reasoning fields.
        let text = template.render_with_tools(&chat.messages, chat.tools.as_ref(), false).unwrap();
        assert_eq!(text, want["text"].as_str().unwrap());
        let enc = encode_chat(&tok, &template, &chat.messages, chat.tools.as_ref()).unwrap();
        // Trained: each trainable assistant turn from its generation prompt through its closing
        // <|im_end|> (tool calls and reasoning included), nothing else.
        let mut expected = String::new();
        let turns = chat.messages.iter().filter(|m| m.role == Role::Assistant);
        for (m, prefix) in turns.zip(want["assistant_prefixes"].as_array().unwrap()) {
            let p = prefix.as_str().unwrap().len();
            let end = p + text[p..].find("<|im_end|>").unwrap() + "<|im_end|>".len();
            if m.train {
                expected.push_str(&text[p..end]);
            }
        }
        let offsets = tok.inner.encode(text.as_str(), false).unwrap().get_offsets().to_vec();
        assert_eq!(offsets.len(), enc.ids.len());
        // The bytes under trained tokens (byte-level BPE splits a character over two tokens with
        // the same offsets, so cover bytes rather than concatenating token texts).
        let mut covered = vec![false; text.len()];
        for (&(a, b), _) in offsets.iter().zip(&enc.mask).filter(|(_, &m)| m == 1) {
            covered[a..b].iter_mut().for_each(|c| *c = true);
        }
        let trained: String = text.char_indices().filter(|&(i, _)| covered[i]).map(|(_, c)| c).collect();
        assert_eq!(trained, expected);
    }
    // A template that cannot render them is an error, never a silent drop: with ChatML, the
    // tool calls and the tools vanish from the text.
    let chatml = ChatTemplate::chatml("<|im_start|>", "<|im_end|>");
    let calls = r#"{"messages": [{"role": "user", "content": "w?"}, {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {}}}]}, {"role": "tool", "content": "3"}, {"role": "assistant", "content": "3"}]}"#;
    let chat = parse_line(calls).unwrap();
    let e = encode_chat(&tok, &chatml, &chat.messages, None).unwrap_err().to_string();
    assert!(e.contains("message 1 has tool_calls, but the chat template does not render them") && e.contains("get_weather"), "{e}");
    let second = lines.lines().nth(1).unwrap();
    let chat = parse_line(second).unwrap();
    let e = encode_chat(&tok, &chatml, &chat.messages, chat.tools.as_ref()).unwrap_err().to_string();
    assert!(e.contains("the record has tools, but the chat template does not render them"), "{e}");
    // Malformed tool data is a schema error naming the place.
    for (line, want) in [
        (r#"{"messages": [{"role": "user", "content": "a", "tool_calls": [{"function": {"name": "f"}}]}, {"role": "assistant", "content": "b"}]}"#, "only an assistant message can call tools"),
        (r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]}"#, "messages[1].tool_calls[0] must be an object naming its function"),
        (r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": null}]}"#, "messages[1].content must be a string"),
        (r#"{"tools": {"name": "f"}, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#, "tools must be a list"),
    ] {
        let e = parse_line(line).unwrap_err().to_string();
        assert!(e.contains(want), "{line}: {e}");
    }
    // From the command line: the model's own template renders tools; ChatML is refused naming
    // file:line, exit 3.
    let model = tool_model("data-tools");
    let data = fixtures().join("tools/tools.jsonl");
    let (c, out, err) = ft(&["data", "check", s(&data), "--model", s(&model), "--json"]);
    assert_eq!(c, 0, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["samples"], 3);
    let (c, _, err) = ft(&["eval", "--model", s(&model), "--template", "chatml", "--data", s(&data)]);
    assert_eq!(c, 3, "{err}");
    assert!(err.contains(&format!("{}:1", data.display())) && err.contains("chat template"), "{err}");
}

#[test]
fn a_line_over_the_record_limit_is_refused_with_its_location() {
    let d = scratch("data-huge-line");
    let f = d.join("huge.jsonl");
    let good = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;
    let huge = format!(r#"{{"messages": [{{"role": "user", "content": "{}"}}, {{"role": "assistant", "content": "a"}}]}}"#, "x".repeat(ft::data::conversation::MAX_RECORD_BYTES));
    std::fs::write(&f, format!("{good}\n{huge}\n{good}\n")).unwrap();
    for args in [&["data", "check", s(&f)][..], &["eval", "--data", s(&f)][..]] {
        let (c, _, err) = ft(&[args, &["--model", s(&model_dir("llama")), "--template", "chatml"]].concat());
        assert_eq!(c, 3, "{args:?}: {err}");
        assert!(err.contains(&format!("{}:2", f.display())) && err.contains("longer than 4 MiB"), "{err}");
    }
}
