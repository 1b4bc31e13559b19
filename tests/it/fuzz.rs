//! Property tests over what ft reads from users: recipes, `config.json`, `adapter_config.json` and
//! GGUF headers. Each case starts from a valid input and plants hostile values (NaN, ±inf, 0,
//! negatives, numbers too large to plan, wrong types, missing keys, unknown keys, truncation). The
//! property: the loader never panics, and a refusal is ft's typed error with a message. Cases are
//! seeded and bounded (`FT_FUZZ_CASES` per input kind, default 150; `FT_FUZZ_SEED` picks other
//! cases), so `cargo test` stays quick and a failure reproduces.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use ft::backend::Cpu;
use ft::formats::gguf::reader::{GgufFile, Value as G};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use super::common::*;

fn cases() -> usize {
    std::env::var("FT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(150)
}

fn rng(kind: u64) -> StdRng {
    let seed: u64 = std::env::var("FT_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    StdRng::seed_from_u64(seed.wrapping_mul(1000) + kind)
}

/// Runs `f`, failing the test (with the case) on a panic.
fn no_panic<T>(what: &str, case: &str, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| panic!("{what} panicked on case: {case}"))
}

/// Hostile JSON values: numbers at and past every limit, wrong types, empty and huge containers.
fn hostile_json(rng: &mut StdRng) -> Value {
    let pick = [
        json!(0),
        json!(-1),
        json!(1),
        json!(3),
        json!(7),
        json!(-0.5),
        json!(1e-300),
        json!(1e300),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(4294967296u64),
        json!(1e12),
        json!(0.0),
        json!(2.5),
        json!("1000000.0"),
        json!(""),
        json!("model.layers.0.self_attn.q_proj"),
        json!(".*"),
        json!("("),
        json!(true),
        json!(null),
        json!([]),
        json!([1, -2, 99999]),
        json!(["q_proj", 3]),
        json!({}),
        json!({"rope_type": "yarn", "factor": -2.0}),
        json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0.0, "high_freq_factor": 0.0, "original_max_position_embeddings": 0}),
        json!({"type": "linear", "factor": 0.0}),
    ];
    pick.choose(rng).unwrap().clone()
}

/// Hostile TOML values for `--set key=value` (as the user types them).
fn hostile_toml(rng: &mut StdRng) -> String {
    let pick = [
        "nan", "inf", "-inf", "0", "-1", "1", "0.0", "-0.0", "1e300", "1e-300", "9223372036854775807", "-9223372036854775808", "4294967297", "1e11",
        "\"\"", "\"x\"", "\"cuda\"", "true", "[]", "[1, 2]", "{}", "\"all-linear\"", "\"../../etc\"", "0.999999", "65537",
    ];
    pick.choose(rng).unwrap().to_string()
}

/// The leaf keys of a JSON object or TOML table, dotted.
fn leaves(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                leaves(v, &if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn recipes_with_hostile_values_are_typed_errors() {
    let d = scratch("fuzz-recipes");
    let data = d.join("chat.jsonl");
    std::fs::copy(fixtures().join("chat.jsonl"), &data).unwrap();
    let path = d.join("recipe.toml");
    std::fs::write(
        &path,
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\n[lora]\nr = 4\nalpha = 8\n[train]\nmax_steps = 3\n[output]\ndir = \"{}\"\n",
            model_dir("llama").display(),
            data.display(),
            d.join("run").display()
        ),
    )
    .unwrap();
    let base = ft::train::recipe::Recipe::load(&path, &[]).unwrap();
    // Every key the schema has (the resolved recipe lists them all, defaults included), plus
    // keys it does not have.
    let mut keys = Vec::new();
    leaves(&toml::Value::Table(base.resolved_toml().parse().unwrap()), "", &mut keys);
    keys.extend(["train.nonsense", "lora.rank", "dpo.beta", "nosection.x"].map(String::from));
    let mut rng = rng(1);
    let (mut refused, mut accepted) = (0, 0);
    for _ in 0..cases() {
        let sets: Vec<String> = (0..rng.random_range(1..=3)).map(|_| format!("{}={}", keys.choose(&mut rng).unwrap(), hostile_toml(&mut rng))).collect();
        let case = sets.join(" ");
        let r = no_panic("Recipe::load", &case, || ft::train::recipe::Recipe::load(&path, &sets));
        match r {
            Ok(recipe) => {
                accepted += 1;
                // What the trainer derives from an accepted recipe must not panic either.
                no_panic("settings of an accepted recipe", &case, || {
                    let _ = (recipe.sft_settings(), recipe.dpo_settings(), recipe.prepare_options(), recipe.lora.config(), recipe.model.load_options());
                    recipe.resolved_toml()
                });
                // The last `--set` of a key is the one that holds.
                let last: std::collections::HashMap<&str, &str> = sets.iter().filter_map(|s| s.split_once('=')).collect();
                for (k, v) in last {
                    let f: Option<f64> = v.parse().ok();
                    if f.is_some_and(|f| !f.is_finite()) && !k.contains("nonsense") {
                        panic!("accepted a non-finite number: {case}");
                    }
                }
            }
            Err(e) => {
                refused += 1;
                // Typed by the signature (RecipeError); its message names the file or the key.
                let msg = e.to_string();
                assert!(msg.contains("recipe.toml") || msg.contains("--set"), "{case}: the error names neither the file nor the key: {msg}");
            }
        }
    }
    assert!(refused > 0 && accepted > 0, "{refused} refused, {accepted} accepted: the generator does not reach both sides");
}

/// Sets `path` (dotted) in a JSON object to `v`, or removes it when `v` is None.
fn set_json(root: &mut Value, path: &str, v: Option<Value>) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap();
    let mut cur = root;
    for p in parts {
        if !cur[p].is_object() {
            cur[p] = json!({});
        }
        cur = cur.get_mut(p).unwrap();
    }
    match v {
        Some(v) => cur[last] = v,
        None => {
            cur.as_object_mut().unwrap().remove(last);
        }
    }
}

/// `base` with one to three of `keys` set to hostile values (or removed, one time in ten), and
/// the case described.
fn mutated(base: &Value, keys: &[String], rng: &mut StdRng) -> (Value, String) {
    let mut cfg = base.clone();
    let mut case = Vec::new();
    for _ in 0..rng.random_range(1..=3) {
        let k = keys.choose(rng).unwrap().clone();
        let v = (!rng.random_bool(0.1)).then(|| hostile_json(rng));
        case.push(format!("{k}={}", v.as_ref().map_or("<removed>".into(), |v| v.to_string())));
        set_json(&mut cfg, &k, v);
    }
    (cfg, case.join(" "))
}

/// Counts an accepted or refused case; a refusal must say something.
fn tally<T, E: std::fmt::Display>(r: Result<T, E>, case: &str, accepted: &mut usize, refused: &mut usize) {
    match r {
        Ok(_) => *accepted += 1,
        Err(e) => {
            *refused += 1;
            assert!(!e.to_string().is_empty(), "{case}");
        }
    }
}

fn json_leaves(v: &Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(o) if !o.is_empty() => {
            for (k, v) in o {
                json_leaves(v, &if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn config_json_with_hostile_values_is_a_typed_error() {
    let d = scratch("fuzz-config");
    for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model_dir("llama").join(f), d.join(f)).unwrap();
    }
    let base = json(&model_dir("llama").join("config.json"));
    let mut keys = Vec::new();
    json_leaves(&base, "", &mut keys);
    keys.extend(
        ["rope_scaling", "sliding_window", "partial_rotary_factor", "layer_types", "quantization_config", "head_dim", "num_key_value_heads", "rope_theta", "model_type"]
            .map(String::from),
    );
    let mut rng = rng(2);
    let (mut refused, mut accepted) = (0, 0);
    for _ in 0..cases() {
        let (cfg, case) = mutated(&base, &keys, &mut rng);
        std::fs::write(d.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
        let r = no_panic("model::load", &case, || ft::model::load::<Cpu>(&d, &Default::default(), Default::default()));
        // An accepted config computes; its logits are whatever the config says (NaN included),
        // but computing them does not panic.
        let r = r.map(|model| no_panic("forward of an accepted config", &case, || logits(&model, &[1, 2, 3])));
        tally(r, &case, &mut accepted, &mut refused);
    }
    assert!(refused > 0 && accepted > 0, "{refused} refused, {accepted} accepted");
}

#[test]
fn adapter_configs_with_hostile_values_are_typed_errors() {
    let d = scratch("fuzz-adapter");
    let src = fixtures().join("adapters/lora-r4");
    std::fs::copy(src.join("adapter_model.safetensors"), d.join("adapter_model.safetensors")).unwrap();
    let base = json(&src.join("adapter_config.json"));
    let mut keys: Vec<String> = base.as_object().unwrap().keys().cloned().collect();
    keys.push("unknown_field".into());
    let clean = load("llama");
    let mut rng = rng(3);
    let (mut refused, mut accepted) = (0, 0);
    for _ in 0..cases() {
        let (cfg, case) = mutated(&base, &keys, &mut rng);
        std::fs::write(d.join("adapter_config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
        let mut model = clean.clone();
        let r = no_panic("PeftAdapter::open/attach", &case, || ft::adapters::peft::PeftAdapter::open(&d).and_then(|a| a.attach(&mut model)));
        let r = r.map(|_| no_panic("forward with an accepted adapter", &case, || logits(&model, &[1, 2, 3])));
        tally(r, &case, &mut accepted, &mut refused);
    }
    assert!(refused > 0 && accepted > 0, "{refused} refused, {accepted} accepted");
}

/// A tensor of a GGUF file: name, GGUF dims, ggml type, offset, bytes.
type Tensor = (String, Vec<u64>, u32, u64, Vec<u8>);

/// A GGUF file held as parts, written back with [`write_gguf`].
struct Gguf {
    metadata: Vec<(String, G)>,
    tensors: Vec<Tensor>,
}

fn read_gguf(path: &Path) -> Gguf {
    let g = GgufFile::open(path).unwrap();
    let tensors = g.tensors.iter().map(|t| (t.name.clone(), t.dims.clone(), t.ggml_type, t.offset, g.tensor_bytes(t).unwrap().to_vec())).collect();
    Gguf { metadata: g.metadata.clone().into_iter().collect(), tensors }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn type_of(v: &G) -> u32 {
    match v {
        G::U64(_) => 10,
        G::I64(_) => 11,
        G::F64(_) => 12,
        G::Bool(_) => 7,
        G::Str(_) => 8,
        G::Array(_) => 9,
    }
}

fn put_value(out: &mut Vec<u8>, v: &G) {
    match v {
        G::U64(x) => out.extend(x.to_le_bytes()),
        G::I64(x) => out.extend(x.to_le_bytes()),
        G::F64(x) => out.extend(x.to_le_bytes()),
        G::Bool(b) => out.push(*b as u8),
        G::Str(s) => put_str(out, s),
        G::Array(items) => {
            out.extend(items.first().map_or(4, type_of).to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
    }
}

/// GGUF v3 bytes: header, metadata, tensor infos, the data section at 32-byte alignment with
/// each tensor at its recorded offset.
fn write_gguf(g: &Gguf) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((g.tensors.len() as u64).to_le_bytes());
    out.extend((g.metadata.len() as u64).to_le_bytes());
    for (k, v) in &g.metadata {
        put_str(&mut out, k);
        out.extend(type_of(v).to_le_bytes());
        put_value(&mut out, v);
    }
    for (name, dims, ty, offset, _) in &g.tensors {
        put_str(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
    }
    let start = out.len().div_ceil(32) * 32;
    out.resize(start, 0);
    for (_, _, _, offset, bytes) in &g.tensors {
        let at = start + (*offset).min(1 << 24) as usize;
        if out.len() < at + bytes.len() {
            out.resize(at + bytes.len(), 0);
        }
        out[at..at + bytes.len()].copy_from_slice(bytes);
    }
    out
}

fn hostile_gguf_value(rng: &mut StdRng) -> G {
    let pick = [
        G::U64(0),
        G::U64(1),
        G::U64(3),
        G::U64(7),
        G::U64(u64::MAX),
        G::U64(1 << 40),
        G::I64(-1),
        G::I64(i64::MIN),
        G::F64(f64::NAN),
        G::F64(f64::INFINITY),
        G::F64(-1.0),
        G::F64(0.0),
        G::F64(1e300),
        G::Bool(true),
        G::Str(String::new()),
        G::Str("llama".into()),
        G::Str("gpt2".into()),
        G::Str("qwen2".into()),
        G::Array(vec![]),
        G::Array(vec![G::Str("a b".into())]),
        G::Array(vec![G::U64(5); 3]),
    ];
    pick.choose(rng).unwrap().clone()
}

#[test]
fn gguf_files_with_hostile_headers_are_typed_errors_and_write_nothing() {
    let d = scratch("fuzz-gguf");
    let base = read_gguf(&fixtures().join("gguf/tiny-llama.gguf"));
    // The writer reproduces a file ft imports (else the cases below test nothing).
    let file = d.join("case.gguf");
    std::fs::write(&file, write_gguf(&base)).unwrap();
    ft::convert::import_gguf::import(&file, &d.join("valid"), ft::formats::safetensors::OutDtype::F32).unwrap();
    let mut rng = rng(4);
    let (mut refused, mut accepted) = (0, 0);
    for i in 0..cases() {
        let mut g = Gguf { metadata: base.metadata.clone(), tensors: base.tensors.clone() };
        let mut case = Vec::new();
        for _ in 0..rng.random_range(1..=2) {
            match rng.random_range(0..5) {
                0 | 1 => {
                    let k = rng.random_range(0..g.metadata.len() + 1);
                    let v = hostile_gguf_value(&mut rng);
                    if k == g.metadata.len() {
                        g.metadata.push(("general.alignment".into(), v.clone()));
                        case.push(format!("general.alignment={v:?}"));
                    } else {
                        case.push(format!("{}={v:?}", g.metadata[k].0));
                        g.metadata[k].1 = v;
                    }
                }
                2 => {
                    let k = rng.random_range(0..g.metadata.len());
                    case.push(format!("removed {}", g.metadata[k].0));
                    g.metadata.remove(k);
                }
                3 => {
                    let t = rng.random_range(0..g.tensors.len());
                    let dims = [vec![0], vec![u64::MAX, 2], vec![8, 1 << 40], vec![3], vec![1, 1, 1, 1], vec![16, 8]];
                    g.tensors[t].1 = dims.choose(&mut rng).unwrap().clone();
                    case.push(format!("tensor {} dims {:?}", g.tensors[t].0, g.tensors[t].1));
                }
                _ => {
                    let t = rng.random_range(0..g.tensors.len());
                    let (ty, off) = ([0u32, 1, 2, 8, 9, 12, 30, 99, u32::MAX].choose(&mut rng).copied().unwrap(), [0u64, 7, 1 << 50, u64::MAX].choose(&mut rng).copied().unwrap());
                    if rng.random_bool(0.5) {
                        g.tensors[t].2 = ty;
                    } else {
                        g.tensors[t].3 = off;
                    }
                    case.push(format!("tensor {} type {} offset {}", g.tensors[t].0, g.tensors[t].2, g.tensors[t].3));
                }
            }
        }
        let mut bytes = write_gguf(&g);
        if i % 7 == 0 {
            let cut = rng.random_range(0..bytes.len());
            bytes.truncate(cut);
            case.push(format!("truncated at {cut}"));
        }
        let case = case.join("; ");
        std::fs::write(&file, &bytes).unwrap();
        let out = d.join(format!("out-{i}"));
        let r = no_panic("import_gguf", &case, || ft::convert::import_gguf::import(&file, &out, ft::formats::safetensors::OutDtype::F32));
        match r {
            Ok(_) => {
                accepted += 1;
                // What import commits loads.
                no_panic("loading an imported GGUF", &case, || ft::model::load::<Cpu>(&out, &Default::default(), Default::default()))
                    .unwrap_or_else(|e| panic!("{case}: the imported directory does not load: {e}"));
            }
            Err(e) => {
                refused += 1;
                assert!(!format!("{e:#}").is_empty(), "{case}");
                assert!(!out.exists(), "{case}: a refused import left {}", out.display());
            }
        }
        std::fs::remove_dir_all(&out).ok();
    }
    assert!(refused > 0 && accepted > 0, "{refused} refused, {accepted} accepted");
}
