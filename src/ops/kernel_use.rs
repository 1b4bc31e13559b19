//! How often each of ft's GPU kernels ran, and how often the tensor-op fallback ran in its place
//! (an input it cannot read: an unexpected dtype or shape; every call under burn's fusion,
//! `cuda-tuned`), counted for the whole process. `ft train` writes the counts into
//! `summary.json` and warns when a fallback ran, `ft eval --json` prints them: a GPU run shows
//! whether its kernels ran.

use std::sync::atomic::{AtomicU64, Ordering};

/// One kernel's counters.
pub struct Counter {
    name: &'static str,
    kernel: AtomicU64,
    fallback: AtomicU64,
}

impl Counter {
    const fn new(name: &'static str) -> Counter {
        Counter { name, kernel: AtomicU64::new(0), fallback: AtomicU64::new(0) }
    }

    /// The kernel ran.
    pub fn kernel(&self) {
        self.kernel.fetch_add(1, Ordering::Relaxed);
    }

    /// The fallback ran in the kernel's place.
    pub fn fallback(&self) {
        self.fallback.fetch_add(1, Ordering::Relaxed);
    }
}

/// The chunked attention's forward row kernel (`kernels/src/attention.rs`).
pub static MASKED_SOFTMAX: Counter = Counter::new("masked_softmax");
/// The chunked attention's backward row kernel.
pub static SOFTMAX_GRAD: Counter = Counter::new("softmax_grad");
/// NF4 dequantization (`kernels/src/nf4.rs`).
pub static NF4_DEQUANTIZE: Counter = Counter::new("nf4_dequantize");

const ALL: [&Counter; 3] = [&MASKED_SOFTMAX, &SOFTMAX_GRAD, &NF4_DEQUANTIZE];

/// A kernel's calls so far: as the kernel, and as the fallback.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Use {
    pub name: String,
    pub kernel: u64,
    pub fallback: u64,
}

/// Every kernel called so far (none on the CPU backend, whose kernels are its own).
pub fn snapshot() -> Vec<Use> {
    ALL.iter()
        .map(|c| Use { name: c.name.into(), kernel: c.kernel.load(Ordering::Relaxed), fallback: c.fallback.load(Ordering::Relaxed) })
        .filter(|u| u.kernel + u.fallback > 0)
        .collect()
}

/// A warning naming each kernel whose fallback ran, or `None`.
pub fn fallback_warning(uses: &[Use]) -> Option<String> {
    let fell: Vec<String> = uses.iter().filter(|u| u.fallback > 0).map(|u| format!("{} {} of {} calls", u.name, u.fallback, u.kernel + u.fallback)).collect();
    (!fell.is_empty()).then(|| format!("GPU kernels fell back to tensor ops (slower): {}", fell.join(", ")))
}
