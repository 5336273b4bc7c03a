// The CPU shim's runtime (see fa_cuda_shim.h): block scheduling, barriers, warp shuffles, access checks, racecheck,
// and the C interface the tests drive (fa_shim_*).
#include "fa_cuda_shim.h"
#include "multi_tensor.h"

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace fa_shim {

thread_local Block* g_block = nullptr;

namespace {

constexpr size_t kStack = 64 * 1024;  // per CUDA thread; the kernels' frames are small
enum State { kReady, kBarrier, kShuffle, kDone };

struct Range {
  uintptr_t begin, end;
};

struct Access {
  uintptr_t addr;
  uint32_t size;
  bool write;
  uint64_t gid;  // block * threads + thread
};

struct Thread {
  ucontext_t ctx;
  dim3 idx;
  State state = kReady;
  unsigned int mask = 0, delta = 0;
  float value = 0.f, result = 0.f;
};

struct Worker {
  Block block;
  std::vector<Thread> threads;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t sched;
  Thread* cur = nullptr;
  const std::function<void()>* body = nullptr;
  std::mt19937_64 rng;
  std::vector<Access> log;
};

thread_local Worker* g_worker = nullptr;

// configuration and per-launch state (launches are sequential; the blocks of one launch run concurrently)
uint64_t g_seed = 0;
int g_workers = 3;
bool g_racecheck = false;
std::vector<Range> g_ranges;
long long g_threads_per_block = 0;
std::mutex g_fail_mutex;
cudaError_t g_fail = cudaSuccess;
std::string g_message;
thread_local cudaError_t g_last_error = cudaSuccess;
std::vector<std::unique_ptr<Worker>> g_pool;
uint64_t g_launches = 0;

void fail(cudaError_t code, const std::string& what) {
  std::lock_guard<std::mutex> lock(g_fail_mutex);
  if (g_fail != cudaSuccess) return;  // the first violation is the one to report
  g_fail = code;
  g_message = what;
}

std::string where() {
  if (g_block == nullptr) return "outside a kernel";
  return "block " + std::to_string(g_block->idx.x) + ", thread " + std::to_string(g_block->tid.x);
}

std::string hex(uintptr_t a) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(a));
  return buf;
}

void yield_to_scheduler() {
  Worker* w = g_worker;
  swapcontext(&w->cur->ctx, &w->sched);
}

void entry() {
  Worker* w = g_worker;
  (*w->body)();
  w->cur->state = kDone;
  // returning resumes uc_link: the scheduler
}

void resume(Worker* w, Thread& t) {
  w->cur = &t;
  w->block.tid = t.idx;
  t.state = kReady;
  swapcontext(&w->sched, &t.ctx);
}

// one block, to completion or to the first divergence
void run_block(Worker* w, unsigned int b, unsigned int n) {
  w->block.idx = dim3{b, 0, 0};
  w->block.dim = dim3{n, 1, 1};
  g_block = &w->block;
  if (w->threads.size() != n) {
    w->threads = std::vector<Thread>(n);
    w->stacks.resize(n);
    for (auto& s : w->stacks)
      if (!s) s = std::make_unique<char[]>(kStack);
  }
  for (unsigned int t = 0; t < n; ++t) {
    Thread& th = w->threads[t];
    th.idx = dim3{t, 0, 0};
    th.state = kReady;
    getcontext(&th.ctx);
    th.ctx.uc_stack.ss_sp = w->stacks[t].get();
    th.ctx.uc_stack.ss_size = kStack;
    th.ctx.uc_link = &w->sched;
    makecontext(&th.ctx, entry, 0);
  }
  std::vector<unsigned int> runnable(n);
  std::iota(runnable.begin(), runnable.end(), 0u);
  for (;;) {
    std::shuffle(runnable.begin(), runnable.end(), w->rng);  // any order the hardware might pick
    for (unsigned int t : runnable) resume(w, w->threads[t]);
    runnable.clear();
    unsigned int done = 0, at_barrier = 0;
    for (const Thread& t : w->threads) {
      done += t.state == kDone;
      at_barrier += t.state == kBarrier;
    }
    if (done == n) break;
    // warps whose 32 lanes all wait at a shuffle exchange their values
    for (unsigned int base = 0; base < n; base += 32) {
      bool all = true;
      for (unsigned int l = 0; l < 32; ++l) all = all && w->threads[base + l].state == kShuffle;
      if (!all) continue;
      Thread* lanes = &w->threads[base];
      for (unsigned int l = 0; l < 32; ++l) {
        if (lanes[l].mask != 0xffffffffu || lanes[l].delta != lanes[0].delta) {
          fail(cudaErrorLaunchFailure, "block " + std::to_string(b) + ", warp " + std::to_string(base / 32) +
                                           ": lanes disagree on a shuffle's mask or offset");
          return;
        }
      }
      for (unsigned int l = 0; l < 32; ++l) {
        const unsigned int src = l + lanes[l].delta;
        lanes[l].result = src < 32 ? lanes[src].value : lanes[l].value;
        runnable.push_back(base + l);
      }
    }
    if (!runnable.empty()) continue;
    if (at_barrier == n) {
      for (unsigned int t = 0; t < n; ++t) runnable.push_back(t);
      continue;
    }
    // nothing can move: some threads wait for others that exited or wait elsewhere (a hang on a GPU)
    unsigned int at_shuffle = n - done - at_barrier;
    fail(cudaErrorLaunchFailure, "block " + std::to_string(b) + " diverged: " + std::to_string(at_barrier) +
                                     " threads wait at __syncthreads(), " + std::to_string(at_shuffle) +
                                     " at a warp shuffle missing lanes, " + std::to_string(done) + " exited");
    return;  // the block's contexts are abandoned; the next block re-creates them
  }
}

void run_worker(Worker* w, const std::vector<unsigned int>* order, std::atomic<size_t>* next, unsigned int n) {
  g_worker = w;
  for (size_t k; (k = next->fetch_add(1)) < order->size();) run_block(w, (*order)[k], n);
  g_block = nullptr;
  g_worker = nullptr;
}

void check_races(unsigned int n) {
  struct Granule {
    uintptr_t key;  // 2-byte granule
    uint64_t gid;
    bool write;
  };
  std::vector<Granule> all;
  for (auto& w : g_pool) {
    for (const Access& a : w->log)
      for (uintptr_t k = a.addr / 2; k < (a.addr + a.size) / 2; ++k) all.push_back({k, a.gid, a.write});
    w->log.clear();
  }
  std::sort(all.begin(), all.end(), [](const Granule& x, const Granule& y) {
    return x.key != y.key ? x.key < y.key : x.gid < y.gid;
  });
  for (size_t i = 0; i < all.size();) {
    size_t j = i;
    bool write = false;
    for (; j < all.size() && all[j].key == all[i].key; ++j) write = write || all[j].write;
    if (write && all[j - 1].gid != all[i].gid) {
      const Granule *x = &all[i], *y = &all[j - 1];
      for (size_t k = i; k < j; ++k)
        if (all[k].write) x = &all[k];
      if (y->gid == x->gid) y = &all[i];
      fail(cudaErrorLaunchFailure, "race at " + hex(x->key * 2) + ": thread " + std::to_string(x->gid % n) +
                                       " of block " + std::to_string(x->gid / n) + " writes bytes that thread " +
                                       std::to_string(y->gid % n) + " of block " + std::to_string(y->gid / n) +
                                       (y->write ? " also writes" : " reads") + " in the same launch");
      return;
    }
    i = j;
  }
}

}  // namespace

void syncthreads() {
  g_worker->cur->state = kBarrier;
  yield_to_scheduler();
}

float shfl_down(unsigned int mask, float value, unsigned int delta) {
  Thread* t = g_worker->cur;
  t->state = kShuffle;
  t->mask = mask;
  t->delta = delta;
  t->value = value;
  yield_to_scheduler();
  return t->result;
}

bool ok_to_access(const void* p, size_t size, bool write) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const char* what = write ? "store" : "load";
  if (a % size != 0) {
    fail(cudaErrorMisalignedAddress, "misaligned " + std::to_string(size) + "-byte " + what + " at " + hex(a) +
                                         " (" + where() + ")");
    return false;
  }
  auto it = std::upper_bound(g_ranges.begin(), g_ranges.end(), a,
                             [](uintptr_t x, const Range& r) { return x < r.begin; });
  if (it == g_ranges.begin() || a + size > (it - 1)->end) {
    fail(cudaErrorIllegalAddress, "out-of-bounds " + std::to_string(size) + "-byte " + what + " at " + hex(a) +
                                      ", outside every tensor of the launch (" + where() + ")");
    return false;
  }
  if (g_racecheck && g_worker != nullptr) {
    const uint64_t gid = static_cast<uint64_t>(g_block->idx.x) * g_threads_per_block + g_block->tid.x;
    g_worker->log.push_back({a, static_cast<uint32_t>(size), write, gid});
  }
  return true;
}

cudaError_t launch(long long blocks, long long threads, cudaStream_t, const std::function<void()>& body) {
  ++g_launches;
  g_fail = cudaSuccess;
  g_message.clear();
  if (blocks <= 0 || blocks > 0x7fffffffLL || threads <= 0 || threads > 1024 || threads % 32 != 0) {
    fail(cudaErrorInvalidValue, "invalid launch configuration: " + std::to_string(blocks) + " blocks of " +
                                    std::to_string(threads) + " threads");
    return g_fail;
  }
  const unsigned int n = static_cast<unsigned int>(threads);
  g_threads_per_block = threads;
  std::mt19937_64 rng(g_seed ^ (g_launches * 0x9e3779b97f4a7c15ULL));
  std::vector<unsigned int> order(static_cast<size_t>(blocks));
  std::iota(order.begin(), order.end(), 0u);
  std::shuffle(order.begin(), order.end(), rng);
  const size_t nw = std::min<size_t>(std::max(g_workers, 1), order.size());
  while (g_pool.size() < nw) g_pool.push_back(std::make_unique<Worker>());
  std::atomic<size_t> next{0};
  std::vector<std::thread> pool;
  for (size_t i = 0; i < nw; ++i) {
    g_pool[i]->body = &body;
    g_pool[i]->rng.seed(rng());
    if (i + 1 < nw) pool.emplace_back(run_worker, g_pool[i].get(), &order, &next, n);
  }
  run_worker(g_pool[nw - 1].get(), &order, &next, n);
  for (auto& t : pool) t.join();
  if (g_racecheck && g_fail == cudaSuccess) check_races(n);
  for (auto& w : g_pool) w->log.clear();
  return g_fail;
}

void record_launch(cudaError_t err) { g_last_error = err; }

}  // namespace fa_shim

extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t err = fa_shim::g_last_error;
  fa_shim::g_last_error = cudaSuccess;
  return err;
}

const char* cudaGetErrorString(cudaError_t err) {
  if (err != cudaSuccess && err == fa_shim::g_fail && !fa_shim::g_message.empty()) return fa_shim::g_message.c_str();
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

// seed: the block order and each round's thread order; workers: blocks run at once; racecheck: 0/1
void fa_shim_configure(uint64_t seed, int workers, int racecheck) {
  fa_shim::g_seed = seed;
  fa_shim::g_workers = workers;
  fa_shim::g_racecheck = racecheck != 0;
}

// the memory the next launches may touch: n [begin, end) byte ranges
void fa_shim_set_ranges(const int64_t* pairs, int64_t n) {
  std::vector<fa_shim::Range> r;
  for (int64_t i = 0; i < n; ++i)
    if (pairs[2 * i + 1] > pairs[2 * i])
      r.push_back({static_cast<uintptr_t>(pairs[2 * i]), static_cast<uintptr_t>(pairs[2 * i + 1])});
  std::sort(r.begin(), r.end(), [](const fa_shim::Range& x, const fa_shim::Range& y) { return x.begin < y.begin; });
  std::vector<fa_shim::Range> merged;  // overlapping ranges (one tensor in two columns) become one
  for (const auto& x : r) {
    if (!merged.empty() && x.begin <= merged.back().end)
      merged.back().end = std::max(merged.back().end, x.end);
    else
      merged.push_back(x);
  }
  fa_shim::g_ranges = std::move(merged);
}

// the ranges of a rows table (multi_tensor.h): each tensor column's address, numel * elsize bytes
void fa_shim_ranges_from_rows(const int64_t* rows, int64_t n_rows, int64_t elsize) {
  std::vector<int64_t> pairs;
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t* row = rows + r * FA_NCOL;
    for (int c = FA_COL_W; c <= FA_COL_K; ++c) {
      if (c == FA_COL_NUMEL || c == FA_COL_FLAGS || row[c] == 0) continue;
      pairs.push_back(row[c]);
      pairs.push_back(row[c] + row[FA_COL_NUMEL] * elsize);
    }
  }
  fa_shim_set_ranges(pairs.data(), static_cast<int64_t>(pairs.size() / 2));
}

// the last launch's first violation ("" when none); fa_shim_clear() forgets it before the next call
const char* fa_shim_message(void) { return fa_shim::g_message.c_str(); }
void fa_shim_clear(void) {
  fa_shim::g_fail = cudaSuccess;
  fa_shim::g_message.clear();
}
uint64_t fa_shim_launches(void) { return fa_shim::g_launches; }

// the storage conversions, for tests against PyTorch's
uint16_t fa_shim_float_to_half(float f) { return fa_shim::float_to_half_rn(f); }
float fa_shim_half_to_float(uint16_t h) { return fa_shim::half_to_float(h); }
uint16_t fa_shim_float_to_bf16(float f) { return fa_shim::float_to_bf16_rn(f); }

}  // extern "C"
