//! The tiny oracle checkpoints (transformers 5.23, float32): logits, greedy generation, masks
//! and assistant-only loss.

use ft::data::conversation::read_jsonl;
use ft::data::encode::encode_conversation;
use ft::generate::{generate, GenerateOptions};
use ft::data::tokenizer::{TemplateChoice, TextTokenizer};

use super::common::*;

#[test]
fn logits_match_transformers() {
    let cases = json(&fixtures().join("chat_tokens.json"));
    for name in MODELS {
        let model = load(name);
        let expected = model_dir(name).join("expected_logits.safetensors");
        for (i, case) in cases.as_array().unwrap().iter().enumerate() {
            let ids = ids(&case["input_ids"]);
            let t = ids.len();
            let got = logits(&model, &ids);
            let (want, shape) = read_f32(&expected, &format!("logits_{i}"));
            assert_eq!(shape, vec![t, model.config.vocab_size]);
            let d = max_abs_diff(&got, &want);
            assert!(d <= 1e-4, "{name} case {i}: max abs diff {d}");
        }
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for name in MODELS {
        let model = load(name);
        let exp = json(&model_dir(name).join("expected_generate.json"));
        let opts = GenerateOptions {
            max_new_tokens: 12,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            ignore_eos: true,
            stop_ids: vec![2],
        };
        let out = generate(&model, &ids(&exp["prompt_ids"]), &opts);
        assert_eq!(out.ids, ids(&exp["greedy_ids"]), "{name}");
    }
}

#[test]
fn batched_generation_over_prompts_of_different_lengths_matches_one_at_a_time() {
    // Left padding: each row of a batch of prompts of different lengths generates what it
    // generates alone (greedy: transformers' tokens for the oracle prompt), and sampled rows what
    // the same seeds give per prompt; rows that stop leave the batch without disturbing the rest.
    use ft::generate::{generate_batch, generate_group};
    for name in MODELS {
        let model = load(name);
        let exp = json(&model_dir(name).join("expected_generate.json"));
        let oracle = ids(&exp["prompt_ids"]);
        let cases = json(&fixtures().join("chat_tokens.json"));
        let long = ids(&cases[1]["input_ids"]);
        let prompts: Vec<&[u32]> = vec![&oracle[..3], &oracle, &long, &oracle[..1]];
        let greedy = GenerateOptions { max_new_tokens: 12, temperature: 0.0, top_p: 1.0, seed: 0, ignore_eos: true, stop_ids: vec![2] };
        let rows: Vec<(usize, u64)> = (0..prompts.len()).map(|p| (p, 0)).collect();
        let batch = generate_batch(&model, &prompts, &rows, &greedy);
        assert_eq!(batch[1].ids, ids(&exp["greedy_ids"]), "{name}: the oracle prompt in a padded batch");
        for (p, out) in prompts.iter().zip(&batch) {
            assert_eq!(out.ids, generate(&model, p, &greedy).ids, "{name}: prompt of {} tokens", p.len());
        }
        // Sampling, with stop ids that end some rows early.
        let stop: Vec<u32> = (0..model.config.vocab_size as u32).filter(|i| i % 7 == 0).collect();
        let sampled = GenerateOptions { temperature: 1.0, ignore_eos: false, stop_ids: stop, ..greedy };
        let seeds = [11u64, 12, 13];
        let rows: Vec<(usize, u64)> = (0..prompts.len()).flat_map(|p| seeds.iter().map(move |&s| (p, s + p as u64))).collect();
        let batch = generate_batch(&model, &prompts, &rows, &sampled);
        assert!(batch.iter().any(|c| !c.truncated) && batch.iter().any(|c| c.truncated), "{name}: some rows stop early, some run to the limit");
        for (p, prompt) in prompts.iter().enumerate() {
            let alone = generate_group(&model, prompt, &seeds.map(|s| s + p as u64), &sampled);
            for (b, a) in batch[p * 3..p * 3 + 3].iter().zip(&alone) {
                assert_eq!((&b.ids, b.truncated), (&a.ids, a.truncated), "{name}: prompt {p}");
                assert!(b.logprobs.iter().zip(&a.logprobs).all(|(x, y)| (x - y).abs() < 1e-4), "{name}: prompt {p}");
            }
        }
    }
}

#[test]
fn chatml_ids_and_assistant_masks_match() {
    let cases = json(&fixtures().join("chat_tokens.json"));
    let tok = TextTokenizer::from_dir(&model_dir("llama")).unwrap();
    let template = tok.template(TemplateChoice::Chatml).unwrap();
    let data = read_jsonl(&fixtures().join("chat.jsonl")).unwrap();
    for (conv, case) in data.iter().zip(cases.as_array().unwrap()) {
        let enc = encode_conversation(&tok, &template, &conv.messages).unwrap();
        assert_eq!(enc.text, case["text"].as_str().unwrap());
        assert_eq!(enc.ids, ids(&case["input_ids"]));
        let mask: Vec<u8> = ids(&case["assistant_mask"]).into_iter().map(|x| x as u8).collect();
        assert_eq!(enc.mask, mask, "{}", conv.at);
    }
}

#[test]
fn eval_loss_matches_expected_logits() {
    let expected = json(&fixtures().join("expected_chat_loss.json"));
    let data = read_jsonl(&fixtures().join("chat.jsonl")).unwrap();
    for name in MODELS {
        let model = load(name);
        let tok = TextTokenizer::from_dir(&model_dir(name)).unwrap();
        let template = tok.template(TemplateChoice::Chatml).unwrap();
        let r = ft::eval::evaluate(&model, &tok, &template, &data, None).unwrap();
        let e = &expected[format!("models/{name}")];
        assert_eq!(r.tokens as u64, e["chat_tokens"].as_u64().unwrap(), "{name}");
        let want = e["chat_loss_mean"].as_f64().unwrap();
        assert!((r.loss - want).abs() <= 1e-4, "{name}: loss {} vs {want}", r.loss);
        for (got, want) in r.per_sample.iter().zip(e["per_conversation"].as_array().unwrap()) {
            assert_eq!(got.1 as u64, want["tokens"].as_u64().unwrap());
            assert!((got.0 - want["nll_sum"].as_f64().unwrap()).abs() <= 1e-3, "{name}: {got:?} vs {want}");
        }
    }
}

#[test]
fn batched_logprobs_equal_unbatched() {
    let cases = json(&fixtures().join("chat_tokens.json"));
    let seqs: Vec<Vec<u32>> = cases.as_array().unwrap().iter().map(|c| ids(&c["input_ids"])).collect();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    for name in ["llama", "qwen2"] {
        let model = load(name);
        let batched = all_token_logprobs(&model, &refs);
        for (s, b) in seqs.iter().zip(&batched) {
            let single = all_token_logprobs(&model, &[s]).pop().unwrap();
            assert_eq!(single.len(), s.len() - 1);
            assert!(max_abs_diff(&single, b) <= 1e-5, "{name}");
        }
    }
}
