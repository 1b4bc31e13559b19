//! The one place where ft chooses its burn backends.
//!
//! CPU: burn's `flex` backend (pure Rust, SIMD + rayon). CUDA (feature `cuda`): burn's CUDA
//! backend, kernels compiled by NVRTC at run time.

/// The CPU backend, f32.
pub type Cpu = burn::backend::Flex;

/// Backends compiled into this binary, for `ft --version`.
pub fn enabled() -> &'static str {
    if cfg!(feature = "cuda") {
        "cpu (flex), cuda"
    } else {
        "cpu (flex)"
    }
}

#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda<f32, i32>;
