//! The one place where ft chooses its burn backends.
//!
//! CPU: burn's `flex` backend (pure Rust, SIMD + rayon), f32. CUDA (feature `cuda`): burn's CUDA
//! backend, kernels compiled by NVRTC at run time, in f32 or bf16. Code elsewhere is generic over
//! `B: Backend`; [`dispatch_backend!`](crate::dispatch_backend) instantiates it for the choice made
//! on the command line.

/// The CPU backend, f32.
pub type Cpu = burn::backend::Flex;

/// CUDA backend computing in f32.
#[cfg(feature = "cuda")]
pub type CudaF32 = burn::backend::Cuda<f32, i32>;

/// CUDA backend computing in bf16.
#[cfg(feature = "cuda")]
pub type CudaBf16 = burn::backend::Cuda<half::bf16, i32>;

/// Where computation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Cpu,
    Cuda,
}

/// Compute dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    F32,
    Bf16,
}

/// Backends compiled into this binary, for `ft --version`.
#[cfg(feature = "cuda")]
pub const ENABLED: &str = "cpu (flex, f32), cuda (f32, bf16)";
/// Backends compiled into this binary, for `ft --version`.
#[cfg(not(feature = "cuda"))]
pub const ENABLED: &str = "cpu (flex, f32)";

/// The compiled-kernel cache of this ft build under `base`: `ft/kernels/<ft version>-<hash of
/// the kernel sources>`. cubecl keys its cache by kernel name and arguments, not by source, so a
/// shared cache would let an upgraded ft run PTX compiled from an older kernel body.
pub fn kernel_cache_dir(base: &std::path::Path) -> std::path::PathBuf {
    base.join("ft").join("kernels").join(format!("{}-{:016x}", env!("CARGO_PKG_VERSION"), ft_kernels::SOURCE_HASH))
}

/// Configures burn's GPU runtime once, before the first CUDA device is created: compiled kernels
/// are cached per ft build ([`kernel_cache_dir`] under the user's config directory) and autotune
/// results in the user's global cache directory, so only the first run of a given model shape
/// pays for NVRTC compilation (about 90 s cold vs 0.7 s warm for a tiny model on an H100). A
/// `cubecl.toml` in the working directory and `CUBECL_*` variables still take precedence.
#[cfg(feature = "cuda")]
pub fn init_cuda_runtime() {
    use cubecl_runtime::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        CUDA_IN_USE.store(true, std::sync::atomic::Ordering::SeqCst);
        let mut c = CubeClRuntimeConfig::from_current_dir().override_from_env();
        if c.compilation.cache.is_none() {
            c.compilation.cache = Some(CacheConfig::File(kernel_cache_dir(&CacheConfig::Global.root())));
        }
        if !std::path::Path::new("cubecl.toml").exists() {
            c.autotune.cache = CacheConfig::Global;
        }
        CubeClRuntimeConfig::set(c);
    });
}

/// Set once this process computes on CUDA (by [`init_cuda_runtime`]); read by [`gpu_memory`].
static CUDA_IN_USE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `(bytes in use, bytes reserved)` on the default CUDA device by ft's allocator, when this
/// process computes on CUDA; `None` otherwise.
pub fn gpu_memory() -> Option<(u64, u64)> {
    if !CUDA_IN_USE.load(std::sync::atomic::Ordering::SeqCst) {
        return None;
    }
    #[cfg(feature = "cuda")]
    {
        use cubecl_runtime::runtime::Runtime;
        let client = <cubecl_cuda::CudaRuntime as Runtime>::client(&Default::default());
        client.memory_usage().ok().map(|m| (m.bytes_in_use, m.bytes_reserved))
    }
    #[cfg(not(feature = "cuda"))]
    None
}

/// A device and dtype this build or backend cannot run.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("--dtype bf16 is supported on --device cuda; the CPU backend computes in f32")]
    CpuBf16,
    #[error("this ft was built without CUDA; rebuild with `cargo build --release --features cuda`")]
    NoCuda,
    #[error("CUDA headers not found: ft compiles its GPU kernels at run time with NVRTC, which needs the toolkit's include/ (cuda_fp16.h); looked in {}. Set CUDA_PATH to a CUDA toolkit (e.g. CUDA_PATH=/usr/local/cuda-13.0; pip's nvidia-cuda-runtime/-nvrtc wheels ship headers under site-packages/nvidia/cuda_runtime)", looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    CudaHeaders { looked: Vec<std::path::PathBuf> },
}

/// The CUDA toolkit NVRTC will compile against, found as cubecl finds it (`CUDA_PATH`, else
/// /usr/local/cuda, /opt/cuda, or /usr when /usr/bin/nvcc exists), checked to hold
/// `include/cuda_fp16.h` — an error naming `CUDA_PATH` instead of cubecl's panic at the first
/// kernel. `exists` is the file-system probe (a parameter for tests).
pub fn cuda_toolkit(cuda_path: Option<std::ffi::OsString>, exists: impl Fn(&std::path::Path) -> bool) -> Result<std::path::PathBuf, BackendError> {
    use std::path::PathBuf;
    let root = match cuda_path {
        Some(p) => Some(PathBuf::from(p)),
        None => [("/usr/local/cuda", "/usr/local/cuda"), ("/opt/cuda", "/opt/cuda"), ("/usr/bin/nvcc", "/usr")]
            .into_iter()
            .find(|(probe, _)| exists(std::path::Path::new(probe)))
            .map(|(_, root)| PathBuf::from(root)),
    };
    let looked = match root {
        Some(r) if exists(&r.join("include/cuda_fp16.h")) => return Ok(r),
        Some(r) => vec![r.join("include")],
        None => vec![PathBuf::from("$CUDA_PATH (unset)"), PathBuf::from("/usr/local/cuda"), PathBuf::from("/opt/cuda"), PathBuf::from("/usr/bin/nvcc")],
    };
    Err(BackendError::CudaHeaders { looked })
}

/// [`cuda_toolkit`] of this process's environment.
pub fn check_cuda_toolkit() -> Result<std::path::PathBuf, BackendError> {
    cuda_toolkit(std::env::var_os("CUDA_PATH"), |p| p.exists())
}

/// Calls `$f::<Backend>($arg, device)` for the chosen device and dtype, or returns a
/// [`BackendError`] naming what this build lacks.
#[macro_export]
macro_rules! dispatch_backend {
    ($device:expr, $dtype:expr, $f:ident, $arg:expr) => {{
        use $crate::backend::{ComputeDtype, DeviceChoice};
        match ($device, $dtype) {
            (DeviceChoice::Cpu, ComputeDtype::F32) => $f::<$crate::backend::Cpu>($arg, Default::default()),
            (DeviceChoice::Cpu, ComputeDtype::Bf16) => Err($crate::backend::BackendError::CpuBf16.into()),
            #[cfg(feature = "cuda")]
            (DeviceChoice::Cuda, ComputeDtype::F32) => {
                $crate::backend::check_cuda_toolkit()?;
                $crate::backend::init_cuda_runtime();
                $f::<$crate::backend::CudaF32>($arg, Default::default())
            }
            #[cfg(feature = "cuda")]
            (DeviceChoice::Cuda, ComputeDtype::Bf16) => {
                $crate::backend::check_cuda_toolkit()?;
                $crate::backend::init_cuda_runtime();
                $f::<$crate::backend::CudaBf16>($arg, Default::default())
            }
            #[cfg(not(feature = "cuda"))]
            (DeviceChoice::Cuda, _) => Err($crate::backend::BackendError::NoCuda.into()),
        }
    }};
}

#[cfg(test)]
mod cuda_toolkit_tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn missing_cuda_headers_are_an_error_naming_cuda_path() {
        let with = |files: &'static [&'static str]| move |p: &Path| files.iter().any(|f| Path::new(f) == p);
        // CUDA_PATH wins, and must hold the headers.
        assert_eq!(cuda_toolkit(Some("/opt/cu13".into()), with(&["/opt/cu13/include/cuda_fp16.h"])).unwrap(), Path::new("/opt/cu13"));
        let e = cuda_toolkit(Some("/opt/cu13".into()), with(&["/usr/local/cuda", "/usr/local/cuda/include/cuda_fp16.h"])).unwrap_err().to_string();
        assert!(e.contains("CUDA_PATH") && e.contains("/opt/cu13/include"), "{e}");
        // Else cubecl's defaults, in its order.
        assert_eq!(cuda_toolkit(None, with(&["/usr/local/cuda", "/usr/local/cuda/include/cuda_fp16.h"])).unwrap(), Path::new("/usr/local/cuda"));
        assert_eq!(cuda_toolkit(None, with(&["/usr/bin/nvcc", "/usr/include/cuda_fp16.h"])).unwrap(), Path::new("/usr"));
        // A driver-only machine: no toolkit anywhere.
        let e = cuda_toolkit(None, with(&[])).unwrap_err().to_string();
        assert!(e.contains("Set CUDA_PATH") && e.contains("/usr/local/cuda") && e.contains("NVRTC"), "{e}");
    }
}

#[cfg(test)]
mod kernel_cache_tests {
    #[test]
    fn the_kernel_cache_is_named_by_version_and_the_current_kernel_sources() {
        // The compile-time hash covers the kernel files as they are on disk now: editing a kernel
        // renames the cache.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/src");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let (lib, attention, cuda_source, nf4) = (read("lib.rs"), read("attention.rs"), read("cuda_source.rs"), read("nf4.rs"));
        assert_eq!(ft_kernels::SOURCE_HASH, ft_kernels::fnv1a(&[&lib, &attention, &cuda_source, &nf4]));
        assert_ne!(ft_kernels::SOURCE_HASH, ft_kernels::fnv1a(&[&lib, &attention, &cuda_source, &format!("{nf4} ")]));
        let files: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(files.len(), 4, "a new kernel file must join SOURCE_HASH: {files:?}");
        let d = super::kernel_cache_dir(std::path::Path::new("/cfg"));
        assert_eq!(d, std::path::Path::new("/cfg/ft/kernels").join(format!("{}-{:016x}", env!("CARGO_PKG_VERSION"), ft_kernels::SOURCE_HASH)));
    }
}
