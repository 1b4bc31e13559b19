//! ft's kernels as CUDA C++ and PTX, without a GPU: each definition
//! ([`crate::kernel_definitions`]) through cubecl's CUDA C++ compiler with the options cubecl-cuda
//! sets for a device of the given architecture, then NVRTC with the options cubecl-cuda passes it
//! (`--gpu-architecture=sm_XXa` from 9.0 on, the toolkit's include directory, `-lineinfo`). NVRTC
//! needs no device: CI loads `libnvrtc.so` from the `nvidia-cuda-nvrtc` wheel and the headers from
//! `nvidia-cuda-runtime` / `nvidia-cuda-cccl` (`CUDA_PATH`), so a kernel that would not compile on
//! the GPU machine fails there instead.

use std::ffi::{CStr, CString};
use std::path::Path;

use cubecl::cuda::CudaCompiler;
use cubecl::prelude::{AddressType, ExecutionMode, KernelDefinition};
use cubecl::Compiler;
use cubecl_cpp::shared::{CompilationOptions, CppSupportedFeatures};

/// One kernel compiled: its entry point, CUDA C++ source and PTX.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub entry: String,
    pub source: String,
    pub ptx: String,
}

/// cubecl-cuda's compiler options for a device of compute capability `arch` (90 = sm_90) under
/// CUDA 12.8 or later (`cubecl-cuda`'s `runtime.rs`).
fn options(arch: u32) -> CompilationOptions {
    CompilationOptions {
        warp_size: 32,
        supports_features: CppSupportedFeatures { fast_math: true, grid_constants: arch >= 70, fast_tanh: arch >= 75, clusters: arch >= 90, elect_sync: arch >= 90 },
    }
}

/// `def` as CUDA C++ (checked mode, 32-bit addressing: how ft launches its kernels) and its entry
/// point's name.
pub fn cuda_cpp(def: KernelDefinition, arch: u32) -> Result<(String, String), String> {
    let entry = def.options.kernel_name.clone();
    let mut compiler = CudaCompiler::default();
    let addr = AddressType::U32.unsigned_type();
    let kernel = compiler.compile(def, &options(arch), ExecutionMode::Checked, addr).map_err(|e| format!("{entry}: {e:?}"))?;
    Ok((entry, kernel.to_string()))
}

/// PTX for `source`, compiled by NVRTC for `arch` with the CUDA headers under `cuda_path`
/// (`include/`, and `include/cccl` when present).
pub fn ptx(source: &str, arch: u32, cuda_path: &Path) -> Result<String, String> {
    let target = if arch >= 90 { format!("--gpu-architecture=sm_{arch}a") } else { format!("--gpu-architecture=sm_{arch}") };
    let include = cuda_path.join("include");
    let mut opts = vec![target, format!("--include-path={}", include.display()), "-lineinfo".to_string()];
    if include.join("cccl").exists() {
        opts.push(format!("--include-path={}", include.join("cccl").display()));
    }
    let src = CString::new(source).map_err(|e| e.to_string())?;
    // SAFETY: NVRTC's C API on a NUL-terminated source that outlives the program, as cubecl-cuda
    // calls it (`compute/context.rs`).
    unsafe {
        let program = cudarc::nvrtc::result::create_program(src.as_c_str(), None).map_err(|e| format!("nvrtcCreateProgram: {e:?}"))?;
        let out = if cudarc::nvrtc::result::compile_program(program, &opts).is_err() {
            let log = cudarc::nvrtc::result::get_program_log(program).map_err(|e| format!("{e:?}"))?;
            Err(CStr::from_ptr(log.as_ptr()).to_string_lossy().into_owned())
        } else {
            let ptx = cudarc::nvrtc::result::get_ptx(program).map_err(|e| format!("{e:?}"))?;
            Ok(CStr::from_ptr(ptx.as_ptr()).to_string_lossy().into_owned())
        };
        let _ = cudarc::nvrtc::result::destroy_program(program);
        out
    }
}

/// What the CUDA driver says, probed without creating a context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Driver {
    /// `libcuda.so` cannot be loaded: no NVIDIA driver.
    Missing,
    /// `cuInit` failed with this `CUresult` (100: no CUDA device; 35: the driver is older than
    /// the runtime asks).
    InitFailed(i32),
    /// Initialized; the newest CUDA version it supports (`cuDriverGetVersion`: 1000·major +
    /// 10·minor).
    Ready { cuda_version: i32 },
}

/// Loads the driver and initializes it (what cubecl-cuda does first, where it panics).
pub fn driver() -> Driver {
    // SAFETY: only loads the library and calls `cuInit(0)` / `cuDriverGetVersion`, which write
    // into the integer passed.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Driver::Missing;
        }
        if let Err(e) = cudarc::driver::result::init() {
            return Driver::InitFailed(e.0 as i32);
        }
        let mut v = 0;
        let _ = cudarc::driver::sys::cuDriverGetVersion(&mut v);
        Driver::Ready { cuda_version: v }
    }
}

/// Whether NVRTC's library can be loaded (`libnvrtc.so` on the loader's path).
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Every definition compiled to CUDA C++ and PTX for `arch`.
pub fn compile_all(defs: Vec<KernelDefinition>, arch: u32, cuda_path: &Path) -> Result<Vec<Compiled>, String> {
    defs.into_iter()
        .map(|def| {
            let (entry, source) = cuda_cpp(def, arch)?;
            let ptx = ptx(&source, arch, cuda_path).map_err(|log| format!("NVRTC could not compile {entry}:\n{log}\n--- source ---\n{source}"))?;
            Ok(Compiled { entry, source, ptx })
        })
        .collect()
}
