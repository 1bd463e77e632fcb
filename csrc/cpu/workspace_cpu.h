// Scratch buffers that a CPU op uses only within one call (the backward's gate gradients and
// weight-gradient operands), kept per calling thread from one call to the next.
//
// A buffer of several MiB allocated afresh at every call is new memory to the kernel each
// time (glibc hands large freed blocks back to the system), and its first write costs a page
// fault per 4 KiB page: at (T, B, I, H) = (50, 64, 512, 512) a GRU training step took 17,000
// faults, 5-10% of the step (docs/cpu.md, "Memory"). A workspace keeps the largest buffer a
// slot has needed, up to kWorkspaceMaxBytes, and hands out its leading elements. What it hands
// out must not outlive the op call: never an op's result or part of one.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>

namespace rnntl {
namespace cpu {

// One buffer per slot; the uses of one op call that are alive at the same time take
// different slots.
enum class WorkspaceSlot : int { gate_gradients, hidden_gate_gradients, weight_operand, hidden_weight_operand, count };

// Buffers larger than this are allocated per call and not kept.
constexpr int64_t kWorkspaceMaxBytes = int64_t(256) << 20;

// An uninitialised tensor of `sizes` for use within the current op call.
inline at::Tensor workspace(WorkspaceSlot slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  thread_local std::array<at::Tensor, static_cast<size_t>(WorkspaceSlot::count)> buffers;
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (bytes > kWorkspaceMaxBytes || options.device().type() != at::kCPU) return at::empty(sizes, options);
  at::Tensor& buffer = buffers[static_cast<size_t>(slot)];
  if (!buffer.defined() || buffer.scalar_type() != c10::typeMetaToScalarType(options.dtype()) || buffer.numel() < numel)
    buffer = at::empty({numel}, options);
  return buffer.narrow(0, 0, numel).view(sizes);
}

}  // namespace cpu
}  // namespace rnntl
