//! 4-bit NF4 quantization, bit-exact with bitsandbytes: the 4-bit codes and blockwise absmax
//! ([`nf4`]), the 8-bit dynamic map that double quantization stores the absmax in ([`dynamic`]),
//! NF4 weights as device tensors dequantized by tensor ops for QLoRA ([`tensor`]), and
//! the NF4 kernel launched on burn's GPU tensors ([`gpu`], CUDA builds),
//! bitsandbytes' checkpoint format (`weight` u8 + `absmax`, `quant_map`, `nested_*` and the
//! `quant_state` JSON, as transformers writes `*-bnb-4bit` models) ([`bnb`]).

pub mod bnb;
pub mod dynamic;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub mod gpu;
pub mod linear;
pub mod nf4;
pub mod tensor;
