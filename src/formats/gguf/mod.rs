//! GGUF, llama.cpp's format: the reader, the writer, and the (de)quantization of its tensor
//! types (`ft import-gguf` and `ft export gguf` are in `convert`).

pub mod dequant;
pub mod quant;
pub mod reader;
pub mod writer;
