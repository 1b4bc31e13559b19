//! On-disk formats, knowing no model: safetensors tensor files, bitsandbytes' NF4 tensors, PEFT
//! adapter files, GGUF, and the Hugging Face model directory (the one reader of its sidecar files
//! and the one writer used by `ft merge`, `ft quantize` and `ft import-gguf`).

pub mod bnb;
pub mod gguf;
pub mod hf_cache;
pub mod model_dir;
pub mod peft;
pub mod safetensors;
pub mod tfevents;
