// Thread pool of the decode kernels (see pool.h).
#include "pool.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace llm_kernels {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

int default_threads() {
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set) > 0 ? CPU_COUNT(&set) : 1;
  const unsigned n = std::thread::hardware_concurrency();
  return n ? int(n) : 1;
}

int default_spin_us() {
  if (const char* env = std::getenv("LLM_KERNELS_SPIN_US")) return std::atoi(env);
  return 500;
}

class Pool {
 public:
  Pool() : threads_(default_threads()), spin_us_(default_spin_us()) {}

  int threads() const { return threads_; }
  int spin_us() const { return spin_us_.load(std::memory_order_relaxed); }
  void set_spin_us(int us) { spin_us_.store(us < 0 ? 0 : us, std::memory_order_relaxed); }

  void set_threads(int n) {
    std::lock_guard<std::mutex> run_lock(run_mu_);
    if (n <= 0 || n == threads_) return;
    stop_workers();
    threads_ = n;
  }

  void run(int64_t nchunks, ChunkFn fn, void* ctx) {
    std::unique_lock<std::mutex> run_lock(run_mu_, std::try_to_lock);
    if (nchunks <= 1 || threads_ <= 1 || !run_lock.owns_lock()) {  // serial (or another caller has the pool)
      for (int64_t c = 0; c < nchunks; ++c) fn(ctx, c);
      return;
    }
    if (workers_.empty()) start_workers();
    fn_ = fn;
    ctx_ = ctx;
    nchunks_ = nchunks;
    next_.store(0, std::memory_order_relaxed);
    pending_.store(int(workers_.size()), std::memory_order_relaxed);
    gen_.fetch_add(1, std::memory_order_seq_cst);  // publishes the job
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lock(mu_); }
      cv_.notify_all();
    }
    work();
    while (pending_.load(std::memory_order_acquire) != 0) cpu_relax();
  }

 private:
  void work() {
    for (int64_t c; (c = next_.fetch_add(1, std::memory_order_relaxed)) < nchunks_;) fn_(ctx_, c);
  }

  // `seen`: the generation current when the worker was created (read by the creating thread: a worker that
  // read it itself could start after the first job was published and wait for the next one forever)
  void worker_loop(uint64_t seen) {
    for (;;) {
      // spin for the next job, then sleep
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us());
      for (int i = 0; gen_.load(std::memory_order_acquire) == seen; ++i) {
        cpu_relax();
        if ((i & 255) == 255 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(mu_);
          sleeping_.fetch_add(1, std::memory_order_seq_cst);
          cv_.wait(lock, [&] { return gen_.load(std::memory_order_seq_cst) != seen; });
          sleeping_.fetch_sub(1, std::memory_order_relaxed);
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_acquire)) return;
      work();
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  void start_workers() {
    stop_.store(false);
    const uint64_t now = gen_.load(std::memory_order_acquire);
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this, now] { worker_loop(now); });
  }

  void stop_workers() {
    if (workers_.empty()) return;
    stop_.store(true, std::memory_order_release);
    gen_.fetch_add(1, std::memory_order_seq_cst);
    { std::lock_guard<std::mutex> lock(mu_); }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  int threads_;
  std::atomic<int> spin_us_;
  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // one caller at a time
  std::mutex mu_;      // sleeping workers
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int64_t> next_{0};
  ChunkFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t nchunks_ = 0;
};

// Never destroyed (worker threads may still run at exit); replaced in a forked child, where the parent's
// workers do not exist (the old object is leaked on purpose: its threads and locks are unusable there).
Pool* g_pool = nullptr;
std::once_flag g_once;

void after_fork_in_child() {
  const int threads = g_pool ? g_pool->threads() : 0;
  const int spin = g_pool ? g_pool->spin_us() : 0;
  g_pool = new Pool();
  if (threads > 0) {
    g_pool->set_threads(threads);
    g_pool->set_spin_us(spin);
  }
}

Pool& pool() {
  std::call_once(g_once, [] {
    g_pool = new Pool();
    pthread_atfork(nullptr, nullptr, after_fork_in_child);
  });
  return *g_pool;
}

}  // namespace

void parallel_run(int64_t nchunks, ChunkFn fn, void* ctx) { pool().run(nchunks, fn, ctx); }
int pool_threads() { return pool().threads(); }
void set_pool_threads(int n) { pool().set_threads(n); }
void set_pool_spin_us(int us) { pool().set_spin_us(us); }
int pool_spin_us() { return pool().spin_us(); }

}  // namespace llm_kernels
