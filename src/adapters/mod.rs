//! Adapters: activation-path LoRA layers, PEFT's on-disk format, and merging into the base.

pub mod lora;
pub mod merge;
pub mod peft;
