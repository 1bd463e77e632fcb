// Blocks of the CPU kernels' large tensors, kept for reuse (reusable_buffers_cpu.h).
#include "reusable_buffers_cpu.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#if defined(__SANITIZE_ADDRESS__)  // (gcc's -fsanitize=address: scripts/sanitize.sh)
#include <sanitizer/asan_interface.h>
// Idle blocks, and a block's bytes past the tensor using it, are poisoned: a kernel that
// touches a tensor's memory after its storage was freed, or past its end, is reported.
#define RNNTL_POISON(data, bytes) ASAN_POISON_MEMORY_REGION(data, bytes)
#define RNNTL_UNPOISON(data, bytes) ASAN_UNPOISON_MEMORY_REGION(data, bytes)
#else
#define RNNTL_POISON(data, bytes) ((void)(data), (void)(bytes))
#define RNNTL_UNPOISON(data, bytes) ((void)(data), (void)(bytes))
#endif

#include <cerrno>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace rnntl {
namespace cpu {
namespace {

// RNNTL_CPU_BUFFER_CACHE_MB, read once: the most bytes kept in idle blocks (docs/ENVIRONMENT.md).
int64_t idle_limit_bytes() {
  static const int64_t limit = [] {
    const char* value = std::getenv("RNNTL_CPU_BUFFER_CACHE_MB");
    if (value == nullptr || *value == '\0') return int64_t(1024) << 20;
    char* end = nullptr;
    errno = 0;
    const long long megabytes = std::strtoll(value, &end, 10);
    TORCH_CHECK(*end == '\0' && errno == 0 && megabytes >= 0 && megabytes <= (int64_t(1) << 40),
                "rnntl_fast: the environment variable RNNTL_CPU_BUFFER_CACHE_MB must be a whole number of MiB >= 0 ",
                "(0 turns the reuse of CPU buffers off), got '", value, "'");
    return static_cast<int64_t>(megabytes) << 20;
  }();
  return limit;
}

struct Block {
  void* data;
  size_t capacity;  // bytes allocated
  size_t bytes;     // bytes of the tensor storage now using it (what the profiler is told)
};

// A block is reused for a request of `bytes` if it wastes at most a quarter of them: a step
// of another length (bucketed batches of sequences) still finds the blocks of a longer one.
bool fits(size_t capacity, size_t bytes) { return capacity >= bytes && capacity - bytes <= bytes / 4; }

class ReusableBufferAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    const c10::Device device(c10::DeviceType::CPU);
    if (bytes == 0) return {nullptr, nullptr, &release, device};
    Block* block = take(bytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      account(*block, static_cast<int64_t>(bytes));
    }
    return {block->data, block, &release, device};
  }

  void copy_data(void* destination, const void* source, std::size_t count) const override {
    default_copy_data(destination, source, count);
  }

  int64_t release_idle() {
    std::vector<Block*> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      freed.swap(idle_);
      idle_bytes_ = 0;
    }
    return free_blocks(freed);
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(idle_bytes_);
  }

  static ReusableBufferAllocator& get() {
    // Never destroyed: tensors freed at interpreter exit still hand their blocks back.
    static ReusableBufferAllocator* allocator = new ReusableBufferAllocator();
    return *allocator;
  }

 private:
  // The smallest idle block that fits, else a new one.
  Block* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = idle_.end();
      for (auto it = idle_.begin(); it != idle_.end(); ++it)
        if (fits((*it)->capacity, bytes) && (best == idle_.end() || (*it)->capacity < (*best)->capacity)) best = it;
      if (best != idle_.end()) {
        Block* block = *best;
        idle_.erase(best);
        idle_bytes_ -= block->capacity;
        block->bytes = bytes;
        RNNTL_UNPOISON(block->data, bytes);
        return block;
      }
    }
    void* data = nullptr;
    try {
      data = c10::alloc_cpu(bytes);
    } catch (const c10::Error&) {
      release_idle();  // out of memory with idle blocks held: give them back and try once more
      data = c10::alloc_cpu(bytes);
    }
    return new Block{data, bytes, bytes};  // (fresh memory: nothing poisoned)
  }

  // The deleter of every storage this allocator made: the block goes back to the idle list,
  // the oldest idle blocks leaving it while it holds more than the limit.
  static void release(void* context) {
    if (context == nullptr) return;
    ReusableBufferAllocator& self = get();
    Block* block = static_cast<Block*>(context);
    std::vector<Block*> freed;
    {
      std::lock_guard<std::mutex> lock(self.mutex_);
      // Before the block is idle: once it is, another thread may take it and report it.
      self.account(*block, -static_cast<int64_t>(block->bytes));
      const size_t limit = static_cast<size_t>(idle_limit_bytes());
      if (block->capacity > limit) {
        freed.push_back(block);
      } else {
        size_t evicted = 0;
        while (self.idle_bytes_ + block->capacity > limit) {
          self.idle_bytes_ -= self.idle_[evicted]->capacity;
          freed.push_back(self.idle_[evicted++]);
        }
        self.idle_.erase(self.idle_.begin(), self.idle_.begin() + static_cast<std::ptrdiff_t>(evicted));
        RNNTL_POISON(block->data, block->capacity);
        self.idle_.push_back(block);
        self.idle_bytes_ += block->capacity;
      }
    }
    free_blocks(freed);
  }

  // With mutex_ held: the bytes of live tensors change by `delta` (a storage made or freed
  // on `block`), and torch's profiler is told, as torch's own CPU allocator tells it.
  void account(const Block& block, int64_t delta) {
    live_bytes_ = static_cast<size_t>(static_cast<int64_t>(live_bytes_) + delta);
    c10::reportMemoryUsageToProfiler(block.data, delta, live_bytes_, live_bytes_ + idle_bytes_,
                                     c10::Device(c10::DeviceType::CPU));
  }

  static int64_t free_blocks(const std::vector<Block*>& blocks) {
    int64_t bytes = 0;
    for (Block* block : blocks) {
      bytes += static_cast<int64_t>(block->capacity);
      RNNTL_UNPOISON(block->data, block->capacity);
      c10::free_cpu(block->data);
      delete block;
    }
    return bytes;
  }

  std::mutex mutex_;
  std::vector<Block*> idle_;  // oldest first
  size_t idle_bytes_ = 0, live_bytes_ = 0;
};

}  // namespace

at::Tensor reusable_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes < kReusableBufferMinBytes || options.device().type() != c10::DeviceType::CPU || idle_limit_bytes() == 0)
    return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &ReusableBufferAllocator::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::nullopt);
}

int64_t release_reusable_buffers() { return ReusableBufferAllocator::get().release_idle(); }

int64_t idle_reusable_buffer_bytes() { return ReusableBufferAllocator::get().idle_bytes(); }

}  // namespace cpu
}  // namespace rnntl
