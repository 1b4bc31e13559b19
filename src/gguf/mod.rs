//! GGUF: reading llama.cpp's format, dequantizing its tensor types, importing to HF format.

pub mod dequant;
pub mod import;
pub mod reader;
