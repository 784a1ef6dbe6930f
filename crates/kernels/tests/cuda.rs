//! The CUDA backend: its CUDA C compiles under NVRTC (wherever libnvrtc loads, no GPU needed),
//! and on a GPU the conformance suite passes against the CPU backend. Without the `cuda` feature,
//! a GPU, or the libraries, each test says why it skipped.

use kernels::conformance::{run_all, Tolerance};
use kernels::{CudaBackend, GemmPrecision, KernelError};

#[test]
fn without_a_gpu_opening_the_backend_is_a_clear_error() {
    match CudaBackend::new(0, GemmPrecision::Bf16) {
        Ok(_) => eprintln!("a GPU is present: nothing to check here"),
        Err(e) => {
            assert!(matches!(e, KernelError::Unavailable(_)), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("cuda") || msg.contains("CUDA") || msg.contains("driver"),
                "{msg}"
            );
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
fn nvrtc_compiles_every_kernel_without_local_memory() {
    // SAFETY: probes dlopen only.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        eprintln!("SKIPPED: libnvrtc.so.13 not found (pip install nvidia-cuda-nvrtc and add its lib folder to LD_LIBRARY_PATH)");
        return;
    }
    let ops =
        kernels::cuda::compile("ops", kernels::cuda::OPS_SRC, &[], "compute_90", false).unwrap();
    assert!(ops.to_src().contains(".entry adamw"));
    for d in [8usize, 24, 64, 128, 256] {
        let ptx = kernels::cuda::compile(
            "attention",
            kernels::cuda::ATTENTION_SRC,
            &[format!("HEAD_DIM={d}")],
            "compute_90",
            true,
        )
        .unwrap();
        let src = ptx.to_src();
        for entry in ["attn_fwd", "attn_bwd_delta", "attn_bwd_dq", "attn_bwd_dkv"] {
            assert!(
                src.contains(&format!(".entry {entry}")),
                "{entry} missing for d={d}"
            );
        }
        assert!(
            !src.contains(".local"),
            "d={d}: a register array went to local memory"
        );
    }
}

#[test]
fn conformance_against_the_cpu_backend() {
    for (precision, tol) in [
        (GemmPrecision::Bf16, Tolerance::BF16),
        (GemmPrecision::F32, Tolerance::F32),
    ] {
        let dev = match CudaBackend::new(0, precision) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("SKIPPED: {e}");
                return;
            }
        };
        let checks = run_all(&dev, tol, 11).unwrap();
        let failed: Vec<_> = checks.iter().filter(|c| !c.passed()).collect();
        assert!(failed.is_empty(), "{precision}: {failed:#?}");
    }
}
