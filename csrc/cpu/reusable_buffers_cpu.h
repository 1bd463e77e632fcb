// The CPU kernels' large tensors (saved reserves, outputs, whole-sequence gradient buffers)
// come from blocks kept for reuse once they are freed, so that a training step does not map
// and fault in fresh pages for what the previous step just gave back (docs/cpu.md, "Memory":
// glibc maps blocks above its mmap threshold afresh and trims its heap once a step frees more
// than twice that threshold; each fresh 4 KiB page then costs a fault and a zero fill on its
// first write, 14,000 faults and 17 ms of a layer-norm LSTM step at (100, 32, 256, 256)).
//
// The tensors are ordinary CPU tensors (resizable, any dtype); only where their memory comes
// from differs, and torch's profiler sees their allocations and frees as it sees at::empty's.
// Blocks kept idle are bounded by RNNTL_CPU_BUFFER_CACHE_MB (docs/ENVIRONMENT.md; 0 turns
// the reuse off); release_reusable_buffers() frees them (rnntl_fast.empty_cpu_cache()).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace rnntl {
namespace cpu {

// Smaller tensors come from torch's CPU allocator: glibc's heap serves them without faults.
constexpr int64_t kReusableBufferMinBytes = int64_t(256) << 10;

// As at::empty(sizes, options) for a CPU tensor (contiguous, uninitialised).
at::Tensor reusable_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// As at::zeros(sizes, options).
inline at::Tensor reusable_zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return reusable_empty(sizes, options).zero_();
}

// Frees every idle block; returns the bytes freed.
int64_t release_reusable_buffers();

// Bytes in idle blocks now (for tests and diagnostics).
int64_t idle_reusable_buffer_bytes();

}  // namespace cpu
}  // namespace rnntl
