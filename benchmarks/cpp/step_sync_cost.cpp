// What one step's synchronisation costs on this machine (docs/cpu.md, "Multi-core engine"):
// a fork/join of torch's intra-op team (an empty at::parallel_for over one chunk per
// thread, what the step-at-a-time loop pays two or three times per step) against one
// crossing of the multi-core loop's step barrier (what it pays once per step, twice with
// a projection). Prints ns per operation at each thread count from 2 to the cores torch uses.
//
//   cmake --build build/cmake --target bench_step_sync_cost && build/cmake/bench_step_sync_cost
#include <ATen/Parallel.h>

#include "sequence_cpu.h"

#include <chrono>
#include <cstdio>

using namespace rnntl::cpu;

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double fork_join_ns(int threads, int rounds) {
  std::atomic<int64_t> sink{0};
  const auto start = std::chrono::steady_clock::now();
  for (int r = 0; r < rounds; ++r)
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) { sink.fetch_add(end - begin); });
  return seconds_since(start) / rounds * 1e9;
}

double barrier_ns(int threads, int rounds) {
  double elapsed = 0;
  run_persistent(threads, [&](const StepWorker& worker) {
    worker.barrier();
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < rounds; ++r) worker.barrier();
    if (worker.first_slice() == 0) elapsed = seconds_since(start);
  });
  return elapsed / rounds * 1e9;
}

}  // namespace

int main() {
  const int cores = at::get_num_threads();
  std::printf("| threads | fork/join of torch's team, ns | step barrier, ns |\n|---:|---:|---:|\n");
  for (int threads = 2; threads <= std::max(2, cores); ++threads) {
    at::set_num_threads(threads);
    fork_join_ns(threads, 2000);  // warm-up: the team is created
    barrier_ns(threads, 2000);
    std::printf("| %d | %.0f | %.0f |\n", threads, fork_join_ns(threads, 200000), barrier_ns(threads, 200000));
  }
  return 0;
}
