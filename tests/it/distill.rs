//! Distillation against TRL 1.16's GKD (`fixtures/distill`: teacher `models/qwen3`, student
//! `models/llama` + `adapters/lora-r4`, the three `chat.jsonl` conversations): forward and
//! reverse KL and the generalized JSD at β 0, 0.25, 0.5, 1 and T 1, 2 through `ft eval
//! --objective distill`; the gradient of JSD(0.5); training lowers the divergence; a teacher
//! with another tokenizer is refused.

use std::path::{Path, PathBuf};

use super::common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn close(got: f64, want: f64, what: &str) {
    // 1e-5 relative, or 2e-6 absolute for the smallest divergences (the oracle README's advice).
    assert!((got - want).abs() <= (1e-5 * want.abs()).max(2e-6), "{what}: {got} vs {want}");
}

fn eval(teacher: &Path, extra: &[&str]) -> (i32, String, String) {
    let (model, lora, data) = (model_dir("llama"), fixtures().join("adapters/lora-r4"), fixtures().join("chat.jsonl"));
    let mut args = vec!["eval", "--objective", "distill", "--teacher", s(teacher), "--model", s(&model), "--adapter", s(&lora), "--data", s(&data), "--template", "chatml", "--json"];
    args.extend(extra);
    ft(&args)
}

#[test]
fn divergences_match_trl() {
    let o = json(&fixtures().join("distill/expected.json"));
    let teacher = model_dir("qwen3");
    let mut checked = 0;
    for t in ["1.0", "2.0"] {
        for (key, loss, beta) in [
            ("forward_kl", "forward_kl", None),
            ("reverse_kl", "reverse_kl", None),
            ("gjsd_beta=0.0", "jsd", Some("0")),
            ("gjsd_beta=0.25", "jsd", Some("0.25")),
            ("gjsd_beta=0.5", "jsd", Some("0.5")),
            ("gjsd_beta=1.0", "jsd", Some("1")),
        ] {
            let want = &o["divergences"][format!("T={t}")][key];
            let mut extra = vec!["--loss-type", loss, "--temperature", t];
            if let Some(b) = beta {
                extra.extend(["--beta", b]);
            }
            let (c, out, err) = eval(&teacher, &extra);
            assert_eq!(c, 0, "{err}");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let what = format!("{key} T={t}");
            close(v["loss"].as_f64().unwrap(), want["token_mean"].as_f64().unwrap(), &what);
            assert_eq!(v["tokens"].as_u64(), o["tokens_total"].as_u64());
            for (g, w) in v["per_sample"].as_array().unwrap().iter().zip(want["mean_per_case"].as_array().unwrap()) {
                close(g.as_f64().unwrap(), w.as_f64().unwrap(), &format!("{what} per case"));
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
}

#[test]
fn jsd_gradient_matches_trl() {
    // GKD's compute_loss (β 0.5, T 1) on the three cases as one padded batch: the loss and
    // ‖∂loss/∂θ‖ over the student's LoRA tensors (the teacher frozen).
    type Ad = burn::backend::Autodiff<ft::backend::Cpu>;
    use ft::loss::distill::{chunk_rows, chunks, hidden, logits_at, DistillConfig};
    let o = json(&fixtures().join("distill/expected.json"));
    let tok = ft::data::tokenizer::TextTokenizer::from_dir(&model_dir("llama")).unwrap();
    let template = tok.template(ft::data::tokenizer::TemplateChoice::Chatml).unwrap();
    let samples: Vec<ft::data::encode::Encoded> = ft::data::conversation::read_jsonl(&fixtures().join("chat.jsonl"))
        .unwrap()
        .iter()
        .map(|c| ft::data::encode::encode_chat(&tok, &template, &c.messages, None).unwrap())
        .collect();
    let mut student = load_on::<Ad>("llama");
    ft::adapters::peft::PeftAdapter::open(&fixtures().join("adapters/lora-r4")).unwrap().attach(&mut student).unwrap();
    ft::adapters::attach::make_trainable(&mut student, 0.0);
    let teacher = ft::loss::distill::load_teacher::<ft::backend::Cpu>(&model_dir("qwen3"), &model_dir("llama"), &Default::default(), Default::default()).unwrap();
    let batch = ft::data::batch::Batch::padded(&samples.iter().collect::<Vec<_>>());
    let (hs, ht) = (hidden(&student, &batch), hidden(&teacher, &batch));
    let cfg = DistillConfig::default();
    assert_eq!((cfg.beta, cfg.temperature), (0.5, 1.0), "GKD's defaults");
    let mut loss = None;
    // Chunks of 7 positions: the sum over chunks is the loss of the whole batch.
    for positions in chunks(&batch, 7) {
        let t = burn::tensor::Tensor::<Ad, 2>::from_inner(logits_at(&teacher, ht.clone(), positions.clone()));
        let part = cfg.loss_tensor(logits_at(&student, hs.clone(), positions), t);
        loss = Some(match loss {
            None => part,
            Some(l) => l + part,
        });
    }
    assert!(chunk_rows(1024) >= 7);
    let loss = loss.unwrap() / batch.positions.len() as f64;
    close(ft::loss::scalar(loss.clone().detach()), o["grad"]["loss_value"].as_f64().unwrap(), "loss");
    let grads = loss.backward();
    let norm = lora_grad_norm(&mut student, &grads);
    let want = o["grad"]["grad_norm"].as_f64().unwrap();
    assert!((norm - want).abs() <= 1e-4 * want, "gradient norm {} vs {want}", norm);
}

fn recipe(dir: &Path, teacher: &Path, extra: &str) -> PathBuf {
    let r = dir.join("recipe.toml");
    let data = fixtures().join("chat.jsonl");
    std::fs::write(
        &r,
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\neval = \"{}\"\ntemplate = \"chatml\"\n[lora]\nr = 8\nalpha = 16\n\
             [train]\nmethod = \"distill\"\nlr = 5e-2\nmax_steps = 20\nmicro_batch_size = 3\nseed = 1\neval_every = 20\n\
             [distill]\nteacher = \"{}\"\n{extra}\n[output]\ndir = \"{}\"\n",
            model_dir("llama").display(),
            data.display(),
            data.display(),
            teacher.display(),
            dir.join("run").display()
        ),
    )
    .unwrap();
    r
}

#[test]
fn distillation_moves_the_student_toward_the_teacher() {
    let d = scratch("distill-train");
    let teacher = model_dir("qwen3");
    let r = recipe(&d, &teacher, "loss = \"forward_kl\"");
    let (c, _, err) = ft(&["train", s(&r), "--quiet"]);
    assert_eq!(c, 0, "{err}");
    let m: Vec<serde_json::Value> = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let divergence: Vec<f64> = m.iter().filter_map(|l| l["distill_loss"].as_f64()).collect();
    assert_eq!(divergence.len(), 20);
    assert!(m[0].get("nll_loss").is_none(), "no SFT term unless asked");
    // The eval divergence of the trained student, through `ft eval`, is the run's last eval.
    let data = fixtures().join("chat.jsonl");
    let eval = |adapter: Option<&Path>| eval_llama_json(&data, adapter, &["--objective", "distill", "--loss-type", "forward_kl", "--teacher", s(&teacher)])["loss"].as_f64().unwrap();
    let (before, after) = (eval(None), eval(Some(&d.join("run/adapter"))));
    // The tiny random models are near uniform (logit std 0.17) and a LoRA on the blocks cannot
    // scale the student's logits (the final norm fixes the hidden state's length): the KL falls
    // about 22% and levels off (0.0273 → 0.0211 in 30 steps).
    assert!(after < 0.85 * before, "KL(teacher ‖ student) {before} → {after}");
    let last = m.iter().rfind(|l| l.get("eval_loss").is_some()).unwrap();
    assert!((last["eval_loss"].as_f64().unwrap() - after).abs() <= 1e-5 * after.max(1e-3), "{last} vs {after}");
}

#[test]
fn the_sft_term_adds_to_the_divergence() {
    let d = scratch("distill-sft-mix");
    let r = recipe(&d, &model_dir("qwen3"), "sft_weight = 0.5");
    let (c, _, err) = ft(&["train", s(&r), "--quiet", "--set", "train.max_steps=2"]);
    assert_eq!(c, 0, "{err}");
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    let (loss, div, nll) = (first["loss"].as_f64().unwrap(), first["distill_loss"].as_f64().unwrap(), first["nll_loss"].as_f64().unwrap());
    assert!((loss - (div + 0.5 * nll)).abs() < 1e-5 * loss, "{first}");
    // The untrained student's NLL on the chat data: the SFT eval loss of the base model (the
    // adapter starts at zero), about ln 1024.
    assert!((nll - 6.93).abs() < 0.05, "{nll}");
}

#[test]
fn on_policy_steps_train_on_the_students_own_completions() {
    // GKD's lmbda: a share of the steps samples completions to the data's prompts from the
    // student and distils on those; seq_kd takes the teacher's completions on the other steps.
    let d = scratch("distill-on-policy");
    let r = recipe(&d, &model_dir("qwen3"), "lmbda = 0.5\nmax_new_tokens = 6");
    let (c, _, err) = ft(&["train", s(&r), "--quiet", "--set", "train.max_steps=8", "--set", "train.eval_every=0"]);
    assert_eq!(c, 0, "{err}");
    let m: Vec<serde_json::Value> = std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).filter(|l: &serde_json::Value| l.get("on_policy").is_some()).collect();
    assert_eq!(m.len(), 8);
    let on: Vec<bool> = m.iter().map(|l| l["on_policy"].as_f64().unwrap() == 1.0).collect();
    assert!(on.contains(&true) && on.contains(&false), "lmbda 0.5 mixes both kinds of step: {on:?}");
    for (l, &on) in m.iter().zip(&on) {
        let len = l["completions/mean_length"].as_f64().unwrap();
        // Sampled completions have at most max_new_tokens scored tokens; the data's replies more.
        assert_eq!(on, len <= 6.0, "{l}");
        assert!(l["distill_loss"].as_f64().unwrap() > 0.0);
        assert_eq!(on, l["time/sample_s"].as_f64().unwrap() > 0.0);
    }
    // seq_kd: every off-policy step trains on the teacher's completions.
    let d = scratch("distill-seq-kd");
    let r = recipe(&d, &model_dir("qwen3"), "seq_kd = true\nmax_new_tokens = 5");
    let (c, _, err) = ft(&["train", s(&r), "--quiet", "--set", "train.max_steps=2", "--set", "train.eval_every=0"]);
    assert_eq!(c, 0, "{err}");
    let first: serde_json::Value = serde_json::from_str(std::fs::read_to_string(d.join("run/metrics.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first["on_policy"].as_f64(), Some(0.0));
    assert!(first["completions/mean_length"].as_f64().unwrap() <= 5.0, "{first}");
}

#[test]
fn a_4_bit_teacher_teaches_as_its_logits_say() {
    // The bitsandbytes 4-bit llama as the teacher (loaded in NF4, as every bnb checkpoint): the
    // divergence `ft eval` reports equals the one computed here in f64 from the two models'
    // expected logits (transformers' float32 logits of `llama-bnb4` and of `llama` + `lora-r4`)
    // at the scored positions of `chat_tokens.json`.
    use ft::loss::distill::{DistillConfig, Divergence};
    let cases = json(&fixtures().join("chat_tokens.json"));
    let (teacher_logits, student_logits) = (model_dir("llama-bnb4").join("expected_logits.safetensors"), fixtures().join("adapters/lora-r4/expected_logits.safetensors"));
    let cfg = DistillConfig { divergence: Divergence::ForwardKl, ..Default::default() };
    let (mut sum, mut n) = (0.0, 0usize);
    for (i, case) in cases.as_array().unwrap().iter().enumerate() {
        let mask = ids(&case["assistant_mask"]);
        let (t, shape) = read_f32(&teacher_logits, &format!("logits_{i}"));
        let (s, _) = read_f32(&student_logits, &format!("logits_{i}"));
        let v = shape[1];
        for row in 0..mask.len() - 1 {
            if mask[row + 1] == 1 {
                sum += cfg.token(&s[row * v..(row + 1) * v], &t[row * v..(row + 1) * v]);
                n += 1;
            }
        }
    }
    let want = sum / n as f64;
    let (c, out, err) = eval(&model_dir("llama-bnb4"), &["--loss-type", "forward_kl"]);
    assert_eq!(c, 0, "{err}");
    let got = serde_json::from_str::<serde_json::Value>(&out).unwrap()["loss"].as_f64().unwrap();
    // The logits agree with transformers' to 1e-4; the KL of near-uniform distributions to ~1e-5.
    assert!((got - want).abs() <= 1e-4 * want, "KL from the 4-bit teacher {got} vs {want} from the expected logits");
}

#[test]
fn a_teacher_with_another_tokenizer_is_refused() {
    let d = scratch("distill-bad-teacher");
    let teacher = d.join("teacher");
    std::fs::create_dir_all(&teacher).unwrap();
    for f in std::fs::read_dir(model_dir("qwen3")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, teacher.join(f.file_name().unwrap())).unwrap();
    }
    // Two tokens swap ids.
    let mut tj = json(&teacher.join("tokenizer.json"));
    let vocab = tj["model"]["vocab"].as_object_mut().unwrap();
    let (a, b) = (vocab.keys().nth(300).unwrap().clone(), vocab.keys().nth(301).unwrap().clone());
    let (ia, ib) = (vocab[&a].clone(), vocab[&b].clone());
    vocab.insert(a, ib);
    vocab.insert(b, ia);
    std::fs::write(teacher.join("tokenizer.json"), tj.to_string()).unwrap();
    let r = recipe(&d, &teacher, "");
    let (c, _, err) = ft(&["train", s(&r), "--quiet"]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("teacher/tokenizer.json") && err.contains("share the student's tokenizer"), "{err}");
    assert!(!d.join("run").exists(), "nothing written");
    let (c, _, err) = eval(&teacher, &[]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("share the student's tokenizer"), "{err}");
}

#[test]
fn chunking_the_logits_changes_no_number() {
    // distill.chunk_positions = 2: the logits formed two positions at a time; the same losses and
    // gradient norms as the default (one chunk on these short conversations), to float rounding.
    let run = |name: &str, extra: &str| {
        let d = scratch(name);
        let r = recipe(&d, &model_dir("qwen3"), extra);
        let (c, _, err) = ft(&["train", s(&r), "--quiet", "--set", "train.max_steps=3", "--set", "train.eval_every=0"]);
        assert_eq!(c, 0, "{err}");
        std::fs::read_to_string(d.join("run/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l.get("grad_norm").is_some())
            .map(|l| (l["loss"].as_f64().unwrap(), l["grad_norm"].as_f64().unwrap()))
            .collect::<Vec<_>>()
    };
    let (whole, chunked) = (run("distill-unchunked", "sft_weight = 0.5"), run("distill-chunked", "sft_weight = 0.5\nchunk_positions = 2"));
    assert_eq!(whole.len(), 3);
    for ((l1, g1), (l2, g2)) in whole.iter().zip(&chunked) {
        close(*l2, *l1, "loss");
        assert!((g1 - g2).abs() <= 1e-4 * g1, "grad_norm {g1} vs {g2}");
    }
}
