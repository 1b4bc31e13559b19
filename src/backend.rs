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
    #[error("CUDA headers not found: ft compiles its GPU kernels at run time with NVRTC, which needs the toolkit's include/ (cuda_fp16.h); looked in {}. Set CUDA_PATH to a CUDA toolkit (e.g. CUDA_PATH=/usr/local/cuda-13.0; pip's nvidia-cuda-runtime/-nvrtc wheels ship headers under site-packages/nvidia/cu13)", looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    CudaHeaders { looked: Vec<std::path::PathBuf> },
    #[error("--device cuda: no NVIDIA driver here (libcuda.so cannot be loaded); install the driver, or use --device cpu")]
    NoDriver,
    #[error("--device cuda: the NVIDIA driver sees no CUDA device (cuInit: CUDA_ERROR_NO_DEVICE); check nvidia-smi and CUDA_VISIBLE_DEVICES")]
    NoDevice,
    #[error("--device cuda: the NVIDIA driver failed to initialize (cuInit error {code}{})", if *code == 35 { ": CUDA_ERROR_INSUFFICIENT_DRIVER, the driver is older than this ft's CUDA" } else { "" })]
    DriverInit { code: i32 },
    #[error("this ft was built for CUDA {} (CUDARC_CUDA_VERSION={built}) but the NVIDIA driver supports CUDA {} at most: update the driver, or rebuild ft with CUDARC_CUDA_VERSION={driver}", cuda_version(*built), cuda_version(*driver))]
    DriverTooOld { driver: i32, built: i32 },
    #[error("NVRTC (libnvrtc.so) cannot be loaded: ft compiles its GPU kernels at run time with it; install the CUDA toolkit, or `pip install nvidia-cuda-nvrtc` and put its nvidia/cu13/lib on LD_LIBRARY_PATH")]
    NoNvrtc,
}

/// The error to print for a panic whose message is cubecl's failed device allocation ("can't
/// allocate buffer of size: N", what burn unwraps when the GPU is out of memory), or `None` for
/// any other panic. `held` is `(bytes in use, bytes reserved)` by ft's allocator, when known.
pub fn out_of_memory_message(panic: &str, held: Option<(u64, u64)>) -> Option<String> {
    let rest = panic.split("can't allocate buffer of size: ").nth(1)?;
    let size: u64 = rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let held = held.map_or(String::new(), |(used, reserved)| format!(" with {:.2} GiB in use ({:.2} GiB reserved)", gib(used), gib(reserved)));
    Some(format!(
        "out of GPU memory: ft asked the device for {size} bytes ({:.2} GiB) more{held}; lower train.micro_batch_size or data.max_len, set train.gradient_checkpointing = true, or load the base in 4 bits (model.quantize = \"nf4\")",
        gib(size)
    ))
}

/// Prints [`out_of_memory_message`]'s error and exits 1 when a panic is a failed GPU allocation
/// (from whichever thread: cubecl allocates on its device thread); other panics keep the default
/// report.
pub fn install_out_of_memory_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied()).unwrap_or("");
        match out_of_memory_message(msg, gpu_memory()) {
            Some(m) => {
                eprintln!("error: {m}");
                std::process::exit(1);
            }
            None => default(info),
        }
    }));
}

/// `13000` → `13.0` (the CUDA version encoding of the driver API and CUDARC_CUDA_VERSION).
fn cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, v % 1000 / 10)
}

/// What the CUDA driver said when probed (`ft_kernels::cuda_source::driver`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaDriver {
    Missing,
    InitFailed(i32),
    Ready { cuda_version: i32 },
}

/// The CUDA environment a run needs, checked in the order cubecl would trip over it (where it
/// panics): a driver, that sees a device, new enough for the CUDA this ft was built for (`built`,
/// from CUDARC_CUDA_VERSION at build time), and NVRTC.
pub fn diagnose_cuda(driver: CudaDriver, built: Option<i32>, nvrtc: bool) -> Result<(), BackendError> {
    match driver {
        CudaDriver::Missing => return Err(BackendError::NoDriver),
        CudaDriver::InitFailed(100) => return Err(BackendError::NoDevice),
        CudaDriver::InitFailed(code) => return Err(BackendError::DriverInit { code }),
        CudaDriver::Ready { cuda_version } => {
            if let Some(built) = built.filter(|&b| cuda_version < b) {
                return Err(BackendError::DriverTooOld { driver: cuda_version, built });
            }
        }
    }
    if !nvrtc {
        return Err(BackendError::NoNvrtc);
    }
    Ok(())
}

/// Everything [`diagnose_cuda`] and [`cuda_toolkit`] check, for this process: a clear error
/// instead of cubecl's panic at the first kernel.
#[cfg(feature = "cuda")]
pub fn check_cuda() -> Result<std::path::PathBuf, BackendError> {
    use ft_kernels::cuda_source::{driver, nvrtc_available, Driver};
    let d = match driver() {
        Driver::Missing => CudaDriver::Missing,
        Driver::InitFailed(c) => CudaDriver::InitFailed(c),
        Driver::Ready { cuda_version } => CudaDriver::Ready { cuda_version },
    };
    let built = option_env!("CUDARC_CUDA_VERSION").and_then(|v| v.parse().ok());
    diagnose_cuda(d, built, nvrtc_available())?;
    check_cuda_toolkit()
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
                $crate::backend::check_cuda()?;
                $crate::backend::init_cuda_runtime();
                $f::<$crate::backend::CudaF32>($arg, Default::default())
            }
            #[cfg(feature = "cuda")]
            (DeviceChoice::Cuda, ComputeDtype::Bf16) => {
                $crate::backend::check_cuda()?;
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
    fn a_failed_gpu_allocation_becomes_an_out_of_memory_error_with_the_size() {
        // cubecl's IoError::BufferTooBig as burn's unwrap prints it.
        let panic = "called `Result::unwrap()` on an `Err` value: can't allocate buffer of size: 21474836480\n   0: backtrace";
        let m = out_of_memory_message(panic, Some((70 << 30, 72 << 30))).unwrap();
        assert!(m.contains("21474836480 bytes (20.00 GiB)") && m.contains("70.00 GiB in use") && m.contains("micro_batch_size"), "{m}");
        assert!(out_of_memory_message(panic, None).unwrap().contains("(20.00 GiB) more;"));
        assert_eq!(out_of_memory_message("index out of bounds", None), None);
    }

    #[test]
    fn an_unusable_cuda_environment_is_an_error_saying_what_is_missing() {
        let ready = |v| CudaDriver::Ready { cuda_version: v };
        let err = |d, built, nvrtc| diagnose_cuda(d, built, nvrtc).unwrap_err().to_string();
        assert!(diagnose_cuda(ready(13020), Some(13000), true).is_ok());
        assert!(diagnose_cuda(ready(12080), None, true).is_ok(), "no recorded build version: not compared");
        assert!(err(CudaDriver::Missing, Some(13000), true).contains("no NVIDIA driver"));
        assert!(err(CudaDriver::InitFailed(100), Some(13000), true).contains("no CUDA device"));
        assert!(err(CudaDriver::InitFailed(35), None, true).contains("CUDA_ERROR_INSUFFICIENT_DRIVER"));
        let e = err(ready(12040), Some(13000), true);
        assert!(e.contains("built for CUDA 13.0") && e.contains("supports CUDA 12.4") && e.contains("CUDARC_CUDA_VERSION=12040"), "{e}");
        // The driver is checked before NVRTC; NVRTC's absence names where to get it.
        assert!(err(CudaDriver::Missing, None, false).contains("no NVIDIA driver"));
        let e = err(ready(13000), Some(13000), false);
        assert!(e.contains("libnvrtc.so") && e.contains("LD_LIBRARY_PATH"), "{e}");
    }

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
