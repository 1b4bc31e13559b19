//! What the GPU-path test binaries (`gpu_paths.rs`, f32; `gpu_half.rs`, half precision) share.
//! Each binary is its own process: burn keeps one default dtype per device for the whole
//! process (`burn::backend::get_device_settings`), so an f32 and a half-precision backend on the
//! same device cannot be tested side by side in one.

use ft::adapters::peft::PeftAdapter;
use ft::ops::{Kernels, TrainBackend};
use ft::data::conversation::read_jsonl;
use ft::data::encode::encode_conversation;
use ft::model::Decoder;
use ft::data::tokenizer::{TemplateChoice, TextTokenizer};
use ft::train::optim::AdamW;
use ft::data::batch::Batch;
use ft::loss::nll::sft_loss;
use ft::train::objective::StepSettings;
use ft::train::recompute::Recompute;
use ft::train::step::{train_step, trainable_params};

use crate::common;

/// The fixtures, after setting up the CUDA runtime where it is the backend under test.
pub fn fixtures() -> std::path::PathBuf {
    #[cfg(feature = "cuda")]
    ft::backend::init_cuda_runtime();
    common::fixtures()
}

pub fn load<B: Kernels>(name: &str) -> Decoder<B> {
    fixtures();
    common::load_on(name)
}

pub fn nf4_oracle() -> std::path::PathBuf {
    fixtures().join("nf4/bnb_nf4.safetensors")
}

/// Losses, gradient norms and final adapter values of three LoRA SFT steps (PEFT's lora-r4 adapter as the
/// start, so both A and B get gradients) over the chat fixture in two micro-batches.
pub fn lora_steps<B: TrainBackend>(model: &str, recompute: bool) -> (Vec<f64>, Vec<f64>, Vec<Vec<f32>>) {
    let mut m = load::<B>(model);
    PeftAdapter::open(&fixtures().join("adapters/lora-r4")).unwrap().attach(&mut m).unwrap();
    let tok = TextTokenizer::from_dir(&fixtures().join("models").join(model)).unwrap();
    let template = tok.template(TemplateChoice::Chatml).unwrap();
    let enc: Vec<_> = read_jsonl(&fixtures().join("chat.jsonl")).unwrap().iter().map(|c| encode_conversation(&tok, &template, &c.messages).unwrap()).collect();
    let half = enc.len() / 2;
    let batches = [Batch::padded(&enc[..half].iter().collect::<Vec<_>>()), Batch::padded(&enc[half..].iter().collect::<Vec<_>>())];
    let norm: usize = batches.iter().map(|b| b.scored()).sum();
    let mut opt = AdamW::new(&trainable_params(&mut m), 0.01);
    let (mut losses, mut norms) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (loss, norm) = train_step(
            &mut m,
            &mut opt,
            batches.len(),
            |m, fwd, k| sft_loss(m, &batches[k], norm as f64, &mut |ids, seg| fwd.hidden(m, ids, seg)).0,
            StepSettings { step: 0, lr: 1e-3, max_grad_norm: 1.0 },
            if recompute { Recompute::PerBlock } else { Recompute::Off },
        );
        losses.push(loss);
        norms.push(norm);
    }
    let params = trainable_params(&mut m);
    assert!(params.iter().all(|t| t.dtype() == burn::tensor::DType::F32), "LoRA master weights stay f32 whatever the compute dtype");
    let params = params.into_iter().map(|t| t.into_data().convert::<f32>().to_vec().unwrap()).collect();
    (losses, norms, params)
}

