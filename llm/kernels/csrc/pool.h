// A small persistent thread pool for the decode kernels.
//
// A decode step calls ~200 matmuls of ~0.1 ms each, so creating threads (or waking sleeping ones through the
// kernel) per call would cost a large fraction of the work. The pool keeps `threads - 1` workers; the calling
// thread is worker 0. After a job a worker spins (with `pause`) for `spin_us` microseconds waiting for the
// next one, then sleeps on a condition variable. A job is `nchunks` chunk indices handed out through an
// atomic counter, so a slow (descheduled) worker delays a call by at most its current chunk... plus its
// acknowledgement (the caller waits until every worker has seen the job before returning).
//
// The pool is process-wide, re-created lazily after fork() (threads do not survive it), and serialises
// concurrent callers: a call that finds the pool busy runs on its own thread.
#pragma once

#include <cstdint>

namespace llm_kernels {

using ChunkFn = void (*)(void* ctx, int64_t chunk);

// Run fn(ctx, c) for c in [0, nchunks) on up to threads() threads; returns when all are done.
void parallel_run(int64_t nchunks, ChunkFn fn, void* ctx);

// Number of threads (including the caller) used by parallel_run; set_threads(<= 0) keeps the current value.
int pool_threads();
void set_pool_threads(int n);
// Microseconds a worker spins for the next job before sleeping.
void set_pool_spin_us(int us);
int pool_spin_us();

}  // namespace llm_kernels
