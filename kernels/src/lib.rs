//! GPU kernels for ft, written in CubeCL so one source runs on CUDA (NVRTC) and, for CI without
//! a GPU, on a Vulkan driver through wgpu. Each kernel has a host reference it is tested against
//! (in `tests/`, and against bitsandbytes' own vectors through ft on the GPU machine).
//!
//! - [`nf4`]: NF4 dequantization (QLoRA's frozen base, bit-exact with bitsandbytes).
//! - [`attention`]: the masked softmax of chunked attention and its backward, row-wise.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda_source;
pub mod nf4;

use cubecl::prelude::{ComputeClient, KernelDefinition, Runtime};

/// Every instantiation of every ft kernel that ft launches, defined for `client`'s runtime
/// without launching it (for compiling them elsewhere: [`cuda_source`]). ft's kernels read no
/// device property, so the definitions do not depend on the device.
pub fn kernel_definitions<R: Runtime>(client: &ComputeClient<R>) -> Vec<KernelDefinition> {
    let mut all = attention::definitions(client);
    all.extend(nf4::definitions(client));
    all
}

/// FNV-1a (64-bit) of this crate's kernel sources, computed at compile time. ft names its
/// persistent compiled-kernel cache with it (with its version): cubecl keys cached PTX by a
/// kernel's name and compile-time arguments, not its body, so a build whose kernels changed must
/// not read another build's cache.
pub const SOURCE_HASH: u64 = fnv1a(&[include_str!("lib.rs"), include_str!("attention.rs"), include_str!("cuda_source.rs"), include_str!("nf4.rs")]);

/// FNV-1a over the bytes of `parts`, in order (a `const fn`, for [`SOURCE_HASH`]).
pub const fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut p = 0;
    while p < parts.len() {
        let b = parts[p].as_bytes();
        let mut i = 0;
        while i < b.len() {
            h ^= b[i] as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
            i += 1;
        }
        p += 1;
    }
    h
}

pub use cubecl;
