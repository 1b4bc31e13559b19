use std::path::{Path, PathBuf};

use ft::backend::Cpu;
use ft::ops::Kernels;
use ft::model::Decoder;

/// The repository's fixtures: `CARGO_MANIFEST_DIR` when set at run time (cargo sets it; so does
/// `scripts/gpu-check.sh` for a test binary carried to the GPU machine), else where it was built.
pub fn fixtures() -> PathBuf {
    let root = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string());
    Path::new(&root).join("tests/fixtures")
}

pub const MODELS: [&str; 12] = ["llama", "llama3-rope-tied-bf16", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "smollm3", "mistral-swa", "qwen3-moe", "mixtral"];

/// A fresh, empty temporary directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ft-test-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn load(name: &str) -> Decoder<Cpu> {
    load_on::<Cpu>(name)
}

/// An oracle model on backend `B`.
pub fn load_on<B: Kernels>(name: &str) -> Decoder<B> {
    ft::model::load::<B>(&model_dir(name), &Default::default(), Default::default()).unwrap_or_else(|e| panic!("{name}: {e:#}"))
}

pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Reads an f32 tensor from a safetensors file: (values, shape).
pub fn read_f32(path: &Path, name: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    (ft::formats::safetensors::to_f32(t.data(), t.dtype()).unwrap(), t.shape().to_vec())
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Runs the ft binary; returns (exit code, stdout, stderr).
/// `ft eval` of the tiny llama (+ `adapter`) on `data` with the chat template ChatML and `args`:
/// its `--json` output (asserting exit 0).
pub fn eval_llama_json(data: &Path, adapter: Option<&Path>, args: &[&str]) -> serde_json::Value {
    let model = model_dir("llama");
    let mut all = vec!["eval", "--json", "--template", "chatml", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()];
    if let Some(a) = adapter {
        all.extend(["--adapter", a.to_str().unwrap()]);
    }
    all.extend(args);
    let (c, out, err) = ft(&all);
    assert_eq!(c, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// ‖∂loss/∂θ‖₂ over every LoRA A and B of `model`, from the gradients of a backward.
pub fn lora_grad_norm<B: burn::tensor::backend::AutodiffBackend + Kernels>(model: &mut Decoder<B>, grads: &B::Gradients) -> f64 {
    let mut sq = 0.0f64;
    for (_, p) in model.projections_mut() {
        if let Some(l) = p.lora() {
            for t in [l.a.val(), l.b.val()] {
                let g: Vec<f64> = t.grad(grads).unwrap().into_data().convert::<f64>().to_vec().unwrap();
                sq += g.iter().map(|x| x * x).sum::<f64>();
            }
        }
    }
    sq.sqrt()
}

pub fn ft(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ft")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Logits `[T, vocab]` (flattened) of one sequence.
pub fn logits<B: Kernels>(model: &Decoder<B>, ids: &[u32]) -> Vec<f32> {
    use burn::prelude::*;
    let t = ids.len();
    let input = Tensor::<B, 2, burn::tensor::Int>::from_data(
        burn::tensor::TensorData::new(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, t]),
        &Default::default(),
    );
    model.forward(input, None).into_data().convert::<f32>().to_vec().unwrap()
}

/// Per-token log-probabilities of whole sequences scored in one right-padded batch through the
/// library's scoring path (`loss::nll`): `out[i][j-1] = log p(seqs[i][j] | seqs[i][..j])`.
pub fn all_token_logprobs<B: Kernels>(model: &Decoder<B>, seqs: &[&[u32]]) -> Vec<Vec<f32>> {
    let encs: Vec<ft::data::encode::Encoded> =
        seqs.iter().map(|s| ft::data::encode::Encoded { text: String::new(), ids: s.to_vec(), mask: vec![1; s.len()] }).collect();
    let batch = ft::data::batch::Batch::padded(&encs.iter().collect::<Vec<_>>());
    let lp: Vec<f32> = ft::loss::nll::scored_logprobs(model, &batch, &mut ft::loss::nll::plain_hidden(model))
        .map(|t| t.into_data().convert::<f32>().to_vec().unwrap())
        .unwrap_or_default();
    let mut out = vec![Vec::new(); seqs.len()];
    for (&i, v) in batch.owner.iter().zip(lp) {
        out[i].push(v);
    }
    out
}

/// How tests prepare preference pairs: drop pairs over `max_len`, no cache.
pub fn prepare_options(max_len: usize) -> ft::data::prepare::PrepareOptions {
    ft::data::prepare::PrepareOptions { max_len, overlong: ft::data::prepare::Overlong::Drop, drop_untrainable: false, max_prompt_len: None, cache: None }
}
