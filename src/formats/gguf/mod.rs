//! GGUF, llama.cpp's format: the reader and the dequantization of its tensor types
//! (`ft import-gguf` is in `convert::import_gguf`).

pub mod dequant;
pub mod reader;
