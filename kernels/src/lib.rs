//! GPU kernels for ft. Each kernel is paired with a tensor-op reference that CPU CI runs.
