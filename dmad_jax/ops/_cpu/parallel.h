// A parallel loop on XLA's intra-op thread pool, shared by the FFI kernels in this directory.

#ifndef DMAD_JAX_OPS_CPU_PARALLEL_H_
#define DMAD_JAX_OPS_CPU_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace dmad_cpu {

struct ForState {
  std::atomic<int64_t> next{0};
  int64_t done = 0;
  std::mutex mu;
  std::condition_variable cv;
};

// Runs fn(0) .. fn(n - 1) on the caller and the pool's threads, each index exactly once. A task
// that starts after all indices are claimed returns at once without touching fn, so fn may live
// on the caller's stack; the caller waits only for the indices that were claimed.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const F& fn) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto state = std::make_shared<ForState>();
  auto work = [state, n, &fn]() {
    int64_t mine = 0;
    for (int64_t i = state->next++; i < n; i = state->next++) {
      fn(i);
      ++mine;
    }
    if (mine > 0) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->done += mine;
      if (state->done == n) state->cv.notify_all();
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&]() { return state->done == n; });
}

}  // namespace dmad_cpu

#endif  // DMAD_JAX_OPS_CPU_PARALLEL_H_
