//! Every ft kernel, in every instantiation ft launches (f32, f16, bf16), compiled for CUDA
//! without a GPU: defined on the wgpu client (ft's kernels read no device property), turned into
//! CUDA C++ by cubecl's CUDA compiler with cubecl-cuda's options for an sm_90 device, and compiled
//! to PTX by NVRTC with cubecl-cuda's NVRTC options. Needs `libnvrtc.so` on the loader's path and
//! the CUDA headers under `CUDA_PATH`; `.ci/run` installs both from PyPI wheels. With
//! `FT_PTX_OUT=DIR` the sources and PTX are written there.
//! `cargo test -p ft-kernels --features wgpu,cuda --test cuda_ptx`.
#![cfg(all(feature = "wgpu", feature = "cuda"))]

use std::path::PathBuf;

use cubecl::prelude::*;
use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
use ft_kernels::cuda_source::{compile_all, nvrtc_available};

#[test]
fn every_kernel_compiles_to_ptx_for_sm_90() {
    let client = WgpuRuntime::client(&WgpuDevice::default());
    let defs = ft_kernels::kernel_definitions(&client);
    let cuda = std::env::var_os("CUDA_PATH").map(PathBuf::from).expect(
        "CUDA_PATH must name a directory with the CUDA headers in include/ (.ci/run installs them from the nvidia-cuda-runtime and nvidia-cuda-cccl wheels)",
    );
    assert!(cuda.join("include/cuda_bf16.h").exists(), "no include/cuda_bf16.h under CUDA_PATH={}", cuda.display());
    assert!(nvrtc_available(), "NVRTC (libnvrtc.so) cannot be loaded: put the nvidia-cuda-nvrtc wheel's lib/ on LD_LIBRARY_PATH");
    let compiled = compile_all(defs, 90, &cuda).unwrap_or_else(|e| panic!("{e}"));
    // Two attention kernels × three float types × two mask storages, the NF4 kernel × three, each
    // its own source (cubecl names the half types' instantiations alike; the source tells them
    // apart).
    let count = |prefix: &str, ty: &str| compiled.iter().filter(|c| c.entry.starts_with(prefix) && c.source.contains(ty)).count();
    for (prefix, per_type) in [("masked_softmax_kernel_", 2), ("softmax_grad_kernel_", 2), ("dequantize_kernel_", 1)] {
        assert_eq!(compiled.iter().filter(|c| c.entry.starts_with(prefix)).count(), 3 * per_type, "{prefix}");
        assert_eq!(count(prefix, "__nv_bfloat16"), per_type, "{prefix}: bf16 instantiations");
        assert_eq!(count(prefix, "__half"), per_type, "{prefix}: f16 instantiations");
    }
    let mut sources: Vec<&str> = compiled.iter().map(|c| c.source.as_str()).collect();
    sources.sort();
    sources.dedup();
    assert_eq!(sources.len(), 15, "every instantiation compiles to its own source");
    for c in &compiled {
        assert!(c.ptx.contains(".target sm_90a"), "{}: PTX for another target", c.entry);
        assert!(c.ptx.contains(&format!(".entry {}(", c.entry)), "{}: no entry point in its PTX", c.entry);
    }
    if let Some(dir) = std::env::var_os("FT_PTX_OUT").map(PathBuf::from) {
        std::fs::create_dir_all(&dir).unwrap();
        for c in &compiled {
            let ty = if c.source.contains("__nv_bfloat16") { "bf16" } else if c.source.contains("__half") { "f16" } else { "f32" };
            let name = format!("{}-{ty}", c.entry);
            std::fs::write(dir.join(format!("{name}.cu")), &c.source).unwrap();
            std::fs::write(dir.join(format!("{name}.ptx")), &c.ptx).unwrap();
        }
    }
}
