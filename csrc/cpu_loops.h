// fastasam._cpu's loops (included by cpu_kernels.cpp once per instruction set, inside namespace FA_CPU_NS): the walk
// over the chunks and the per-element loops of every kernel, written so that the compiler vectorises them for the
// instruction set the includer selects. No include guard: it is meant to be compiled more than once.
#ifndef FA_CPU_NS
#error "cpu_loops.h is included by cpu_kernels.cpp with FA_CPU_NS set"
#endif

namespace FA_CPU_NS {

// elements per parallel task at least: smaller launches run on the calling thread
constexpr int64_t kGrain = 1 << 15;
// interleaved partial sums of the reductions: enough independent fp64 additions in flight to hide their latency
// (the norm's one sum), fewer where each lane holds three sums (the dots)
constexpr int kNormLanes = 32;
constexpr int kDotLanes = 8;

template <typename T> FA_INLINE float ld(const T* p, int64_t i) { return fa::Storage<T>::load(p[i]); }
template <typename T> FA_INLINE void st(T* p, int64_t i, float x) { p[i] = fa::Storage<T>::store(x); }
// x a value of T already (loaded from T, or rounded to T by the formula): stored without rounding it again
template <typename T> FA_INLINE void st_exact(T* p, int64_t i, float x) { p[i] = fa::Storage<T>::exact(x); }

struct Chunk {
  const int64_t* row;  // the tensor's row of the rows table
  int64_t start, length, flags;
  template <typename T> T* col(int k) const {
    return reinterpret_cast<T*>(static_cast<uintptr_t>(row[k])) + start;  // the chunk's first element
  }
};

FA_INLINE Chunk chunk_of(const int64_t* tab, const int32_t* chunks, int64_t c, int64_t size) {
  const int64_t start = static_cast<int64_t>(chunks[2 * c + 1]) * size;
  const int64_t* row = tab + static_cast<int64_t>(chunks[2 * c]) * FA_NCOL;
  const int64_t left = row[FA_COL_NUMEL] - start;
  return {row, start, left < size ? left : size, row[FA_COL_FLAGS]};
}

FA_INLINE int64_t slot(int64_t flags, int shift) { return (flags >> shift) & FA_SLOT_MASK; }

// The launch's tables and its sizes.
struct Launch {
  const int64_t* rows;
  const int32_t* chunks;
  int64_t count, size;
  Chunk chunk(int64_t c) const { return chunk_of(rows, chunks, c, size); }
};

// f(c, chunk) for each of the launch's chunks, spread over the intra-op threads: each thread takes a contiguous run
// of chunks holding about an equal share of the elements (a chunk belongs to the share in which it starts).
template <typename F> void for_each_chunk(const Launch& L, const F& f) {
  std::vector<int64_t> first(L.count + 1);  // elements before each chunk
  first[0] = 0;
  for (int64_t c = 0; c < L.count; ++c) first[c + 1] = first[c] + L.chunk(c).length;
  at::parallel_for(0, first[L.count], kGrain, [&](int64_t lo, int64_t hi) {
    int64_t c = std::lower_bound(first.begin(), first.end() - 1, lo) - first.begin();
    for (; c < L.count && first[c] < hi; ++c) f(c, L.chunk(c));
  });
}

// call f(std::integral_constant<bool, b>) with b = value
template <typename F> FA_INLINE void with_bool(bool value, const F& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// call f(T{}) with T the storage type of the dtype code (FA_FLOAT32, FA_FLOAT16, FA_BFLOAT16)
template <typename F> void with_dtype(int dtype, const F& f) {
  switch (dtype) {
    case FA_FLOAT32: f(float{}); break;
    case FA_FLOAT16: f(c10::Half{}); break;
    case FA_BFLOAT16: f(c10::BFloat16{}); break;
    default: throw std::invalid_argument("fastasam: unknown storage dtype code " + std::to_string(dtype) +
                                         " (FA_FLOAT32, FA_FLOAT16 or FA_BFLOAT16)");
  }
}

Launch launch_of(int64_t rows, int64_t chunks, int64_t count, int64_t size) {
  if (count <= 0) throw std::invalid_argument("fastasam: a launch needs at least one chunk, got count=" +
                                              std::to_string(count));
  if (size <= 0) throw std::invalid_argument("fastasam: chunk_size must be positive, got " + std::to_string(size));
  return {reinterpret_cast<const int64_t*>(rows), reinterpret_cast<const int32_t*>(chunks), count, size};
}

template <typename P> P* ptr(int64_t address) { return reinterpret_cast<P*>(static_cast<uintptr_t>(address)); }

// the lanes of a reduction added in a fixed tree: neighbours in pairs, then the pairs in pairs, ...
template <int N> FA_INLINE double lane_sum(const double (&s)[N]) {
  static_assert(N > 0 && (N & (N - 1)) == 0, "a power of two of lanes");
  double t[N];
  for (int k = 0; k < N; ++k) t[k] = s[k];
  for (int width = N; width > 1; width /= 2)
    for (int k = 0; k < width / 2; ++k) t[k] = t[2 * k] + t[2 * k + 1];
  return t[0];
}

// --- phase 1: the squared norm ------------------------------------------------------------------------------------

template <typename T, bool ADAPTIVE>
double sqnorm_chunk(const T* __restrict__ w, const T* __restrict__ g, int64_t n, float eta) {
  double s[kNormLanes] = {};
  const int64_t body = n - n % kNormLanes;
  for (int64_t i = 0; i < body; i += kNormLanes) {
    for (int k = 0; k < kNormLanes; ++k) {
      const float x = fa::scaled_grad(ld(g, i + k), ADAPTIVE ? ld(w, i + k) : 0.f, ADAPTIVE, eta);
      s[k] += static_cast<double>(x * x);
    }
  }
  for (int64_t i = body; i < n; ++i) {
    const float x = fa::scaled_grad(ld(g, i), ADAPTIVE ? ld(w, i) : 0.f, ADAPTIVE, eta);
    s[i - body] += static_cast<double>(x * x);
  }
  return lane_sum(s);
}

// out[0] = sum of (T_w * g)^2 over the launch's chunks, rounded once to fp32
void sqnorm(int dtype, int64_t rows, int64_t chunks, int64_t opts, int64_t count, int64_t chunk_size, int64_t out) {
  const Launch L = launch_of(rows, chunks, count, chunk_size);
  const float* opt_tab = ptr<const float>(opts);
  std::vector<double> partials(count);
  py::gil_scoped_release release;
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_chunk(L, [&](int64_t c, const Chunk& ch) {
      const float* opt = opt_tab + slot(ch.flags, FA_OPT_SHIFT) * FA_NOPT;
      const bool adaptive = opt[FA_OPT_ADAPTIVE] != 0.f;
      const float eta = adaptive ? opt[FA_OPT_ETA] : 0.f;
      const T* w = ch.col<const T>(FA_COL_W);
      const T* g = ch.col<const T>(FA_COL_G);
      partials[c] = adaptive ? sqnorm_chunk<T, true>(w, g, ch.length, eta)
                             : sqnorm_chunk<T, false>(w, g, ch.length, eta);
    });
  });
  double total = 0.0;
  for (double p : partials) total += p;
  *ptr<float>(out) = static_cast<float>(total);
}

// --- phase 2: the perturbation --------------------------------------------------------------------------------------

// FINITE a template parameter: a loop-invariant bool inside the loop keeps GCC 12 from vectorising it for fp16
template <typename T, bool ADAPTIVE, bool COPY, bool FINITE>
void perturb_chunk(T* __restrict__ w, const T* __restrict__ g, T* __restrict__ b, int64_t n, float eta, float scale) {
  for (int64_t i = 0; i < n; ++i) {
    const float wv = ld(w, i);
    const float e = fa::perturbation<T>(wv, ld(g, i), ADAPTIVE, eta, scale, FINITE, COPY);
    st_exact(b, i, COPY ? wv : e);  // w as loaded, or e rounded to T
    st(w, i, wv + e);
  }
}

// w <- w + e; the buffer gets w (copy) or e
void perturb(int dtype, int64_t rows, int64_t chunks, int64_t opts, int64_t sqnorm, int64_t count, int64_t chunk_size,
             bool copy) {
  const Launch L = launch_of(rows, chunks, count, chunk_size);
  const float* opt_tab = ptr<const float>(opts);
  const float sq = *ptr<const float>(sqnorm);
  py::gil_scoped_release release;
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_bool(copy, [&](auto copy_c) {
      constexpr bool COPY = decltype(copy_c)::value;
      for_each_chunk(L, [&](int64_t, const Chunk& ch) {
        const float* opt = opt_tab + slot(ch.flags, FA_OPT_SHIFT) * FA_NOPT;
        const bool adaptive = opt[FA_OPT_ADAPTIVE] != 0.f;
        const float eta = adaptive ? opt[FA_OPT_ETA] : 0.f;
        const fa::PerturbScale s = fa::perturb_scale(sq, opt[FA_OPT_RHO], opt[FA_OPT_EPS]);
        T* w = ch.col<T>(FA_COL_W);
        const T* g = ch.col<const T>(FA_COL_G);
        T* b = ch.col<T>(FA_COL_B);
        if (!s.finite) {  // e is 0: only the buffer's copy and w + 0 remain
          perturb_chunk<T, false, COPY, false>(w, g, b, ch.length, eta, s.scale);
        } else if (adaptive) {
          perturb_chunk<T, true, COPY, true>(w, g, b, ch.length, eta, s.scale);
        } else {
          perturb_chunk<T, false, COPY, true>(w, g, b, ch.length, eta, s.scale);
        }
      });
    });
  });
}

// --- phase 3: restore, alone or fused with the base optimizer's update -------------------------------------------

template <typename T, bool COPY> void restore_chunk(T* __restrict__ w, const T* __restrict__ b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) st_exact(w, i, fa::restored<T>(COPY ? 0.f : ld(w, i), ld(b, i), COPY));
}

// w <- buffer (copy) or w - buffer
void restore(int dtype, int64_t rows, int64_t chunks, int64_t count, int64_t chunk_size, bool copy) {
  const Launch L = launch_of(rows, chunks, count, chunk_size);
  py::gil_scoped_release release;
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_bool(copy, [&](auto copy_c) {
      constexpr bool COPY = decltype(copy_c)::value;
      for_each_chunk(L, [&](int64_t, const Chunk& ch) {
        restore_chunk<T, COPY>(ch.col<T>(FA_COL_W), ch.col<const T>(FA_COL_B), ch.length);
      });
    });
  });
}

// the update's gradient at element i: G, or x * G + y * K along a direction
template <typename T, bool DIR>
FA_INLINE float gradient(const T* __restrict__ g, const T* __restrict__ k, int64_t i, const fa::Direction& dir) {
  return DIR ? fa::combined(dir.x, ld(g, i), dir.y, ld(k, i)) : ld(g, i);
}

// PLAIN: neither nesterov nor maximize, as compile-time constants (the common case: no selects in the loop)
template <typename T, bool COPY, bool DIR, bool MOMENTUM, bool FRESH, bool PLAIN>
void restore_sgd_chunk(T* __restrict__ w, const T* __restrict__ g, const T* __restrict__ b, T* __restrict__ mom,
                       const T* __restrict__ k, int64_t n, fa::SgdHyper h, fa::Direction dir) {
  h.has_momentum = MOMENTUM;
  if (PLAIN) h.nesterov = h.maximize = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float p = fa::restored<T>(COPY ? 0.f : ld(w, i), ld(b, i), COPY);
    float m = MOMENTUM && !FRESH ? ld(mom, i) : 0.f;
    st(w, i, fa::sgd_update<T>(h, FRESH, p, gradient<T, DIR>(g, k, i, dir), m));
    if (MOMENTUM) st_exact(mom, i, m);  // rounded to T by the formula
  }
}

// The fused updates' walk: the mode checked, the direction read, then for each chunk f(T{}, COPY, DIR, chunk, its
// row of the hyper table, direction) with the storage type, the restore mode and whether there is a direction as
// compile-time constants.
template <typename F>
void for_each_update_chunk(int dtype, int64_t rows, int64_t chunks, int64_t hyper, int64_t sums, int64_t alpha,
                           int64_t count, int64_t chunk_size, bool copy, int mode, const F& f) {
  const Launch L = launch_of(rows, chunks, count, chunk_size);
  if (mode != 0 && mode != FA_COMBINE_GSAM) throw std::invalid_argument("fastasam: unknown direction mode " +
                                                                        std::to_string(mode));
  const float* hyper_tab = ptr<const float>(hyper);
  const fa::Direction dir = fa::direction_of(ptr<const double>(sums), ptr<const double>(alpha), mode);
  py::gil_scoped_release release;
  with_dtype(dtype, [&](auto tag) {
    with_bool(copy, [&](auto copy_c) {
      with_bool(dir.on, [&](auto dir_c) {
        for_each_chunk(L, [&](int64_t, const Chunk& ch) {
          f(tag, copy_c, dir_c, ch, hyper_tab + slot(ch.flags, FA_HYPER_SHIFT) * FA_NHYPER, dir);
        });
      });
    });
  });
}

// restore, then torch.optim.SGD's update (S1: the momentum buffer; flag FA_FLAG_FRESH_STATE: it is new)
void restore_sgd(int dtype, int64_t rows, int64_t chunks, int64_t hyper, int64_t sums, int64_t alpha, int64_t count,
                 int64_t chunk_size, bool copy, int mode) {
  for_each_update_chunk(dtype, rows, chunks, hyper, sums, alpha, count, chunk_size, copy, mode,
                        [](auto tag, auto copy_c, auto dir_c, const Chunk& ch, const float* row,
                           const fa::Direction& dir) {
    using T = decltype(tag);
    constexpr bool COPY = decltype(copy_c)::value, DIR = decltype(dir_c)::value;
    const fa::SgdHyper h = fa::sgd_hyper(row);
    const bool fresh = (ch.flags & FA_FLAG_FRESH_STATE) != 0;
    T* w = ch.col<T>(FA_COL_W);
    const T* g = ch.col<const T>(FA_COL_G);
    const T* b = ch.col<const T>(FA_COL_B);
    T* mom = ch.col<T>(FA_COL_S1);
    const T* k = ch.col<const T>(FA_COL_K);
    with_bool(h.nesterov == 0.f && h.maximize == 0.f, [&](auto plain_c) {
      constexpr bool PLAIN = decltype(plain_c)::value;
      if (!h.has_momentum) {
        restore_sgd_chunk<T, COPY, DIR, false, false, PLAIN>(w, g, b, mom, k, ch.length, h, dir);
      } else if (fresh) {
        restore_sgd_chunk<T, COPY, DIR, true, true, PLAIN>(w, g, b, mom, k, ch.length, h, dir);
      } else {
        restore_sgd_chunk<T, COPY, DIR, true, false, PLAIN>(w, g, b, mom, k, ch.length, h, dir);
      }
    });
  });
}

template <typename T, bool COPY, bool DIR, bool AMSGRAD>
void restore_adam_chunk(T* __restrict__ w, const T* __restrict__ g, const T* __restrict__ b, T* __restrict__ m1,
                        T* __restrict__ m2, T* __restrict__ vmax, const T* __restrict__ k, int64_t n, fa::AdamHyper h,
                        fa::Direction dir) {
  h.amsgrad = AMSGRAD;
  for (int64_t i = 0; i < n; ++i) {
    const float p = fa::restored<T>(COPY ? 0.f : ld(w, i), ld(b, i), COPY);
    float m = ld(m1, i), v = ld(m2, i), vm = AMSGRAD ? ld(vmax, i) : 0.f;
    st(w, i, fa::adam_update(h, p, gradient<T, DIR>(g, k, i, dir), m, v, vm));
    st(m1, i, m);
    st(m2, i, v);
    if (AMSGRAD) st(vmax, i, vm);
  }
}

// restore, then torch.optim.Adam/AdamW's update (S1 exp_avg, S2 exp_avg_sq, S3 max_exp_avg_sq with amsgrad)
void restore_adam(int dtype, int64_t rows, int64_t chunks, int64_t hyper, int64_t sums, int64_t alpha, int64_t count,
                  int64_t chunk_size, bool copy, int mode) {
  for_each_update_chunk(dtype, rows, chunks, hyper, sums, alpha, count, chunk_size, copy, mode,
                        [](auto tag, auto copy_c, auto dir_c, const Chunk& ch, const float* row,
                           const fa::Direction& dir) {
    using T = decltype(tag);
    constexpr bool COPY = decltype(copy_c)::value, DIR = decltype(dir_c)::value;
    const fa::AdamHyper h = fa::adam_hyper(row);
    T* w = ch.col<T>(FA_COL_W);
    const T* g = ch.col<const T>(FA_COL_G);
    const T* b = ch.col<const T>(FA_COL_B);
    T* m1 = ch.col<T>(FA_COL_S1);
    T* m2 = ch.col<T>(FA_COL_S2);
    T* vmax = ch.col<T>(FA_COL_S3);
    const T* k = ch.col<const T>(FA_COL_K);
    if (h.amsgrad) {
      restore_adam_chunk<T, COPY, DIR, true>(w, g, b, m1, m2, vmax, k, ch.length, h, dir);
    } else {
      restore_adam_chunk<T, COPY, DIR, false>(w, g, b, m1, m2, vmax, k, ch.length, h, dir);
    }
  });
}

// --- Momentum-SAM (fastasam.MSAM): W at w~, G, B (the kept copy of w, with copy), S1 the momentum / exp_avg, S2
// exp_avg_sq, S3 max_exp_avg_sq; factors: the factor a of each param group's perturbation in place ---------------

// one element of the fused step, returning its (T * m)^2: the SGD update
template <typename T, bool COPY, bool ADAPTIVE>
FA_INLINE float msam_sgd_one(T* __restrict__ w, const T* __restrict__ g, const T* __restrict__ b, T* __restrict__ mom,
                             int64_t i, const fa::SgdHyper& h, float a, float eta) {
  const float wt = ld(w, i);
  float m = ld(mom, i);
  const float p = fa::msam_moved_back<T>(wt, COPY ? ld(b, i) : 0.f, a, m, COPY);
  const float wn = fa::rounded<T>(fa::msam_sgd_update<T>(h, p, wt, ld(g, i), m));
  st_exact(w, i, wn);
  st_exact(mom, i, m);  // rounded to T by the formula
  const float x = ADAPTIVE ? (fabsf(wn) + eta) * m : m;
  return x * x;
}

template <typename T, bool COPY, bool ADAPTIVE>
double msam_sgd_chunk(T* __restrict__ w, const T* __restrict__ g, const T* __restrict__ b, T* __restrict__ mom,
                      int64_t n, fa::SgdHyper h, float a, float eta) {
  double s[kNormLanes] = {};
  const int64_t body = n - n % kNormLanes;
  for (int64_t i = 0; i < body; i += kNormLanes)
    for (int k = 0; k < kNormLanes; ++k) s[k] += msam_sgd_one<T, COPY, ADAPTIVE>(w, g, b, mom, i + k, h, a, eta);
  for (int64_t i = body; i < n; ++i) s[i - body] += msam_sgd_one<T, COPY, ADAPTIVE>(w, g, b, mom, i, h, a, eta);
  return lane_sum(s);
}

// the Adam / AdamW update
template <typename T, bool COPY, bool ADAPTIVE, bool AMSGRAD>
FA_INLINE float msam_adam_one(T* __restrict__ w, const T* __restrict__ g, const T* __restrict__ b, T* __restrict__ m1,
                              T* __restrict__ m2, T* __restrict__ vmax, int64_t i, const fa::AdamHyper& h, float a,
                              float eta) {
  const float wt = ld(w, i);
  float m = ld(m1, i), v = ld(m2, i), vm = AMSGRAD ? ld(vmax, i) : 0.f;
  const float p = fa::msam_moved_back<T>(wt, COPY ? ld(b, i) : 0.f, a, m, COPY);
  const float wn = fa::rounded<T>(fa::msam_adam_update(h, p, wt, ld(g, i), m, v, vm));
  st_exact(w, i, wn);
  const float ms = fa::rounded<T>(m);
  st_exact(m1, i, ms);
  st(m2, i, v);
  if (AMSGRAD) st(vmax, i, vm);
  const float x = ADAPTIVE ? (fabsf(wn) + eta) * ms : ms;
  return x * x;
}

template <typename T, bool COPY, bool ADAPTIVE, bool AMSGRAD>
double msam_adam_chunk(T* __restrict__ w, const T* __restrict__ g, const T* __restrict__ b, T* __restrict__ m1,
                       T* __restrict__ m2, T* __restrict__ vmax, int64_t n, fa::AdamHyper h, float a, float eta) {
  h.amsgrad = AMSGRAD;
  double s[kNormLanes] = {};
  const int64_t body = n - n % kNormLanes;
  for (int64_t i = 0; i < body; i += kNormLanes)
    for (int k = 0; k < kNormLanes; ++k)
      s[k] += msam_adam_one<T, COPY, ADAPTIVE, AMSGRAD>(w, g, b, m1, m2, vmax, i + k, h, a, eta);
  for (int64_t i = body; i < n; ++i)
    s[i - body] += msam_adam_one<T, COPY, ADAPTIVE, AMSGRAD>(w, g, b, m1, m2, vmax, i, h, a, eta);
  return lane_sum(s);
}

// The fused step's walk: f(T{}, COPY, ADAPTIVE, chunk, its hyper row, its factor, its eta) returns the chunk's partial
// sum; out[0] = their sum in chunk order, rounded once to fp32.
template <typename F>
void for_each_msam_chunk(int dtype, int64_t rows, int64_t chunks, int64_t hyper, int64_t opts, int64_t factors,
                         int64_t count, int64_t chunk_size, int64_t out, bool copy, const F& f) {
  const Launch L = launch_of(rows, chunks, count, chunk_size);
  const float* hyper_tab = ptr<const float>(hyper);
  const float* opt_tab = ptr<const float>(opts);
  const float* a_tab = ptr<const float>(factors);
  std::vector<double> partials(count);
  {
    py::gil_scoped_release release;
    with_dtype(dtype, [&](auto tag) {
      with_bool(copy, [&](auto copy_c) {
        for_each_chunk(L, [&](int64_t c, const Chunk& ch) {
          const int64_t s = slot(ch.flags, FA_OPT_SHIFT);
          const float* opt = opt_tab + s * FA_NOPT;
          const bool adaptive = opt[FA_OPT_ADAPTIVE] != 0.f;
          const float* row = hyper_tab + slot(ch.flags, FA_HYPER_SHIFT) * FA_NHYPER;
          with_bool(adaptive, [&](auto adaptive_c) {
            partials[c] = f(tag, copy_c, adaptive_c, ch, row, a_tab[s], adaptive ? opt[FA_OPT_ETA] : 0.f);
          });
        });
      });
    });
  }
  double total = 0.0;
  for (double p : partials) total += p;
  *ptr<float>(out) = static_cast<float>(total);
}

// move back, then the authors' SGD step; out[0] = the new sum of (T * m)^2
void msam_sgd(int dtype, int64_t rows, int64_t chunks, int64_t hyper, int64_t opts, int64_t factors, int64_t count,
              int64_t chunk_size, int64_t out, bool copy) {
  for_each_msam_chunk(dtype, rows, chunks, hyper, opts, factors, count, chunk_size, out, copy,
                      [](auto tag, auto copy_c, auto adaptive_c, const Chunk& ch, const float* row, float a,
                         float eta) -> double {
    using T = decltype(tag);
    constexpr bool COPY = decltype(copy_c)::value, ADAPTIVE = decltype(adaptive_c)::value;
    return msam_sgd_chunk<T, COPY, ADAPTIVE>(ch.col<T>(FA_COL_W), ch.col<const T>(FA_COL_G),
                                             ch.col<const T>(FA_COL_B), ch.col<T>(FA_COL_S1), ch.length,
                                             fa::sgd_hyper(row), a, eta);
  });
}

// move back, then the authors' AdamW step (Adam's with L2 weight decay); out[0] = the new sum of (T * m)^2
void msam_adam(int dtype, int64_t rows, int64_t chunks, int64_t hyper, int64_t opts, int64_t factors, int64_t count,
               int64_t chunk_size, int64_t out, bool copy) {
  for_each_msam_chunk(dtype, rows, chunks, hyper, opts, factors, count, chunk_size, out, copy,
                      [](auto tag, auto copy_c, auto adaptive_c, const Chunk& ch, const float* row, float a,
                         float eta) -> double {
    using T = decltype(tag);
    constexpr bool COPY = decltype(copy_c)::value, ADAPTIVE = decltype(adaptive_c)::value;
    const fa::AdamHyper h = fa::adam_hyper(row);
    T* w = ch.col<T>(FA_COL_W);
    const T* g = ch.col<const T>(FA_COL_G);
    const T* b = ch.col<const T>(FA_COL_B);
    T* m1 = ch.col<T>(FA_COL_S1);
    T* m2 = ch.col<T>(FA_COL_S2);
    T* vmax = ch.col<T>(FA_COL_S3);
    return h.amsgrad ? msam_adam_chunk<T, COPY, ADAPTIVE, true>(w, g, b, m1, m2, vmax, ch.length, h, a, eta)
                     : msam_adam_chunk<T, COPY, ADAPTIVE, false>(w, g, b, m1, m2, vmax, ch.length, h, a, eta);
  });
}

template <typename T, bool COPY, bool ADAPTIVE>
void msam_perturb_chunk(T* __restrict__ w, const T* __restrict__ mom, T* __restrict__ b, int64_t n, float eta,
                        float a) {
  for (int64_t i = 0; i < n; ++i) {
    const float wv = ld(w, i);
    if (COPY) st_exact(b, i, wv);
    st(w, i, wv - fa::msam_perturbation(wv, ld(mom, i), ADAPTIVE, eta, a));
  }
}

// the new perturbation w~ = w - a * T^2 * m, a = rho * (1 / (sqrt(*sqnorm) + eps)) (perturb_scale; 0 when the norm is
// 0 or not finite), written into factors[group] for the next step; with copy the kept copy gets w first
void msam_perturb(int dtype, int64_t rows, int64_t chunks, int64_t opts, int64_t sqnorm, int64_t count,
                  int64_t chunk_size, int64_t factors, bool copy) {
  const Launch L = launch_of(rows, chunks, count, chunk_size);
  const float* opt_tab = ptr<const float>(opts);
  float* a_tab = ptr<float>(factors);
  const float sq = *ptr<const float>(sqnorm);
  for (int64_t c = 0; c < count; ++c) {  // each group's factor, once, before the walk reads it
    const float* opt = opt_tab + slot(L.chunk(c).flags, FA_OPT_SHIFT) * FA_NOPT;
    a_tab[slot(L.chunk(c).flags, FA_OPT_SHIFT)] = fa::perturb_scale(sq, opt[FA_OPT_RHO], opt[FA_OPT_EPS]).scale;
  }
  py::gil_scoped_release release;
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_bool(copy, [&](auto copy_c) {
      constexpr bool COPY = decltype(copy_c)::value;
      for_each_chunk(L, [&](int64_t, const Chunk& ch) {
        const int64_t s = slot(ch.flags, FA_OPT_SHIFT);
        const float* opt = opt_tab + s * FA_NOPT;
        T* w = ch.col<T>(FA_COL_W);
        const T* mom = ch.col<const T>(FA_COL_S1);
        T* b = ch.col<T>(FA_COL_B);
        if (opt[FA_OPT_ADAPTIVE] != 0.f) {
          msam_perturb_chunk<T, COPY, true>(w, mom, b, ch.length, opt[FA_OPT_ETA], a_tab[s]);
        } else {
          msam_perturb_chunk<T, COPY, false>(w, mom, b, ch.length, 0.f, a_tab[s]);
        }
      });
    });
  });
}

// --- LookSAM / GSAM (fastasam/_decompose.py): rows hold a gradient in G and the kept buffer in K -------------------

template <typename T> void dots_chunk(const T* __restrict__ g, const T* __restrict__ b, int64_t n, double* out) {
  double gg[kDotLanes] = {}, gb[kDotLanes] = {}, bb[kDotLanes] = {};
  const int64_t body = n - n % kDotLanes;
  for (int64_t i = 0; i < body; i += kDotLanes) {
    for (int k = 0; k < kDotLanes; ++k) {  // products rounded in fp32, summed in fp64
      const float x = ld(g, i + k), y = ld(b, i + k);
      gg[k] += static_cast<double>(fa::mul_rn(x, x));
      gb[k] += static_cast<double>(fa::mul_rn(x, y));
      bb[k] += static_cast<double>(fa::mul_rn(y, y));
    }
  }
  for (int64_t i = body; i < n; ++i) {
    const float x = ld(g, i), y = ld(b, i);
    gg[i - body] += static_cast<double>(fa::mul_rn(x, x));
    gb[i - body] += static_cast<double>(fa::mul_rn(x, y));
    bb[i - body] += static_cast<double>(fa::mul_rn(y, y));
  }
  out[0] = lane_sum(gg);
  out[1] = lane_sum(gb);
  out[2] = lane_sum(bb);
}

// out[0..2] = sums of (G*G, G*K, K*K) over the launch's chunks (fp64)
void dots(int dtype, int64_t rows, int64_t chunks, int64_t count, int64_t chunk_size, int64_t out) {
  const Launch L = launch_of(rows, chunks, count, chunk_size);
  std::vector<double> partials(3 * count);
  py::gil_scoped_release release;
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_chunk(L, [&](int64_t c, const Chunk& ch) {
      dots_chunk<T>(ch.col<const T>(FA_COL_G), ch.col<const T>(FA_COL_K), ch.length, &partials[3 * c]);
    });
  });
  double total[3] = {0.0, 0.0, 0.0};
  for (int64_t c = 0; c < count; ++c)
    for (int j = 0; j < 3; ++j) total[j] += partials[3 * c + j];
  double* o = ptr<double>(out);
  for (int j = 0; j < 3; ++j) o[j] = total[j];
}

template <typename T, bool KEEP>
void combine_chunk(T* __restrict__ t, const T* __restrict__ o, int64_t n, fa::Coefficients x) {
  for (int64_t i = 0; i < n; ++i) st(t, i, KEEP ? ld(o, i) : fa::combined(x.x, ld(t, i), x.y, ld(o, i)));
}

template <int MODE> void combine_mode(int dtype, const Launch& L, const double* sums, const double* alpha) {
  const fa::Coefficients x = fa::combine_coefficients<MODE>(sums, alpha);
  constexpr bool into_g = MODE == FA_COMBINE_LOOK_ONE || MODE == FA_COMBINE_GSAM;
  with_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    for_each_chunk(L, [&](int64_t, const Chunk& ch) {
      combine_chunk<T, MODE == FA_COMBINE_KEEP>(ch.col<T>(into_g ? FA_COL_G : FA_COL_K),
                                                ch.col<const T>(into_g ? FA_COL_K : FA_COL_G), ch.length, x);
    });
  });
}

// target <- x * target + y * other (mode FA_COMBINE_*: which column is the target, and x, y)
void combine(int dtype, int64_t rows, int64_t chunks, int64_t sums, int64_t alpha, int64_t count, int64_t chunk_size,
             int mode) {
  const Launch L = launch_of(rows, chunks, count, chunk_size);
  const double* s = ptr<const double>(sums);
  const double* a = ptr<const double>(alpha);
  if (mode < FA_COMBINE_KEEP || mode > FA_COMBINE_GSAM) throw std::invalid_argument(
      "fastasam: unknown combine mode " + std::to_string(mode));
  py::gil_scoped_release release;
  switch (mode) {
    case FA_COMBINE_KEEP: combine_mode<FA_COMBINE_KEEP>(dtype, L, s, a); break;
    case FA_COMBINE_LOOK_FULL: combine_mode<FA_COMBINE_LOOK_FULL>(dtype, L, s, a); break;
    case FA_COMBINE_LOOK_ONE: combine_mode<FA_COMBINE_LOOK_ONE>(dtype, L, s, a); break;
    default: combine_mode<FA_COMBINE_GSAM>(dtype, L, s, a); break;
  }
}


}  // namespace FA_CPU_NS
