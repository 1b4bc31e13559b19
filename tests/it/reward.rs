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
    assert!(err.contains("no score head"), "{err}");
}
