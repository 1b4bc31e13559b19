//! GPU kernels for ft, written in CubeCL so one source runs on CUDA (NVRTC) and, for CI without
//! a GPU, on a Vulkan driver through wgpu. Each kernel has a host reference it is tested against
//! (in `tests/`, and against bitsandbytes' own vectors through ft on the GPU machine).
//!
//! - [`nf4`]: NF4 dequantization (QLoRA's frozen base, bit-exact with bitsandbytes).
//! - [`attention`]: the masked softmax of chunked attention and its backward, row-wise.

pub mod attention;
pub mod nf4;

pub use cubecl;
