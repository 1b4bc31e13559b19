//! NF4 4-bit quantization on the host, bit-exact with bitsandbytes: the 4-bit codes and
//! blockwise absmax ([`nf4`]), the 8-bit dynamic map that double quantization stores the absmax
//! in ([`dynamic`]), and NF4 weights laid out as device tensors with the tensor-op
//! dequantization every faster path is tested against ([`nf4_weight`]).
//!
//! Where each NF4 dequantization lives: [`nf4::Nf4::dequantize`] (host reference),
//! [`nf4_weight::Nf4Weight::dequantize`] (tensor-op reference), `ops::cpu` (the CPU kernel
//! training runs on CPU), `ops::cubecl` + `kernels/src/nf4.rs` (the CubeCL kernel training runs
//! on CUDA). The file format is `formats::bnb`.

pub mod dynamic;
pub mod nf4;
pub mod nf4_weight;
