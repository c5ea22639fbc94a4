// Per-channel two-phase kernels shared by normlab's fused batch norm and Full Normalization.
//
// A tensor (N, C, *) is seen in one of two memory layouts (Geometry):
//   * planes:  contiguous NC*, each (n, c) is a run of S contiguous values;
//   * rows:    channels innermost ((N, C) or channels_last): N*S rows of C contiguous values.
//
// Forward (stats_apply): phase A computes each channel's mean and centred sum of squares in one
// read of the input (two passes over cache-sized blocks, the blocks merged with Chan's formula
// in double); a caller-supplied function turns them into y = (x - center) * scale + shift per
// channel; phase B writes y. Backward (sums_apply): phase A computes sum(g) and
// sum(g * (x - center)) per channel; the caller's function turns them into
// grad = a * g + b * (x - center) + k; phase B writes grad. Where every thread owns whole
// channels, phase B follows phase A channel by channel while the channel is in cache.
// Design notes and measurements: docs/performance.md.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <omp.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace normlab {

// Opmath: arithmetic type of a storage type (float for float, half and bfloat16).
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// Element loads in the arithmetic type and rounded stores. Half and bfloat16 convert with plain
// bit operations that vectorize (c10's own half conversions do not).
inline float ld(float v) { return v; }
inline double ld(double v) { return v; }
inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
// IEEE half <-> float without branches (the algorithm of c10's fp16_ieee_to_fp32_value and
// fp16_ieee_from_fp32_value, written so that the compiler vectorizes it).
inline float ld(c10::Half v) {
  const uint32_t w = static_cast<uint32_t>(v.x) << 16;
  const uint32_t sign = w & 0x80000000u, two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  return f32_from_bits(sign | (two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized)));
}
inline float ld(c10::BFloat16 v) { return f32_from_bits(static_cast<uint32_t>(v.x) << 16); }

template <typename T>
inline T st(float v) {
  return static_cast<T>(v);
}
template <typename T>
inline T st(double v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 st<c10::BFloat16>(float v) {
  // Round to nearest even, NaN to the canonical quiet NaN (c10's rule).
  const uint32_t u = f32_bits(v);
  const uint32_t r = (v != v) ? 0x7FC0u : ((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return c10::BFloat16(static_cast<uint16_t>(r), c10::BFloat16::from_bits());
}
template <>
inline c10::Half st<c10::Half>(float v) {
  float base = (std::fabs(v) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(v), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const uint32_t h = (sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign);
  return c10::Half(static_cast<uint16_t>(h), c10::Half::from_bits());
}

struct Geometry {
  int64_t N = 0, C = 0, S = 1;
  bool rows = false;  // channels innermost
  int64_t numel() const { return N * C * S; }
  int64_t count() const { return N * S; }  // values per channel
};

struct FwdCoef {
  double center = 0, scale = 1, shift = 0;
};
struct BwdCoef {
  double a = 0, b = 0, k = 0;
};

// Per-sample standardization folded into the loads of the rows layout: a value v of row r reads
// as z = v * s[n] + t, t = -mu[n] * s[n] (torch's layer_norm form), n = r / per (the sample of
// the row: per = S rows per sample).
struct ZMap {
  const double* mu = nullptr;
  const double* s = nullptr;
  int64_t per = 1;
  // Set (rows_moments with one row per sample, per = 1): mu/s of each row are computed there,
  // into fill_mu/fill_s (the arrays mu/s point to), as its block of rows is read.
  double* fill_mu = nullptr;
  double* fill_s = nullptr;
  double eps = 0;
};
// Row r's (t, s) in the arithmetic type P; (0, 1) without the map (Z false).
template <bool Z, typename P>
inline void z_of_row(const ZMap& zm, int64_t r, P& t, P& s) {
  if constexpr (Z) {
    const int64_t n = zm.per == 1 ? r : r / zm.per;  // (a 64-bit division per row shows)
    s = static_cast<P>(zm.s[n]), t = static_cast<P>(-zm.mu[n] * zm.s[n]);
  } else {
    t = P(0), s = P(1);
  }
}
// A loaded value in P: z = v s + t with the map, else the value itself.
template <bool Z, typename P, typename T>
inline P zld(T v, P t, P s) {
  if constexpr (Z) {
    return static_cast<P>(ld(v)) * s + t;
  } else {
    return static_cast<P>(ld(v));
  }
}

// Four consecutive rows i..i+3 of x (row r at x + r * stride) and their maps: the loops that add
// four rows per load and store of per-column accumulators.
template <bool Z, typename P, typename T>
struct FourRows {
  const T* row[4];
  P t[4], s[4];
  FourRows(const T* x, int64_t i, int64_t stride, const ZMap& zm) {
    for (int k = 0; k < 4; ++k) {
      row[k] = x + (i + k) * stride;
      z_of_row<Z>(zm, i + k, t[k], s[k]);
    }
  }
  // Column c of row i + k, as z with the map.
  P at(int k, int64_t c) const { return zld<Z>(row[k][c], t[k], s[k]); }
};

// Below this many elements a kernel runs on the calling thread (a fork/join costs more).
constexpr int64_t kParallelMin = 1 << 15;
// Longest run of a plane whose two passes (sum, then centred squares) run while it is in L1.
constexpr int64_t kRun = 2048;

// Rows layout: threads own ranges of columns (no merge, no barrier) when each gets at least
// this many; otherwise ranges of rows, merged. Settable (set_columns_per_thread) to compare.
inline int64_t& columns_per_thread() {
  static int64_t value = 1024;
  return value;
}

// Thread t's range of columns, in multiples of 16 (whole cache lines of float).
inline void split_columns(int64_t C, int t, int nt, int64_t& b, int64_t& e) {
  const int64_t units = (C + 15) / 16;
  const int64_t q = units / nt, r = units % nt;
  b = std::min<int64_t>(C, 16 * (t * q + std::min<int64_t>(t, r)));
  e = std::min<int64_t>(C, b + 16 * (q + (t < r ? 1 : 0)));
}

inline void split(int64_t n, int t, int nt, int64_t& b, int64_t& e) {
  int64_t q = n / nt, r = n % nt;
  b = t * q + std::min<int64_t>(t, r);
  e = b + q + (t < r ? 1 : 0);
}

// Threads for a kernel over numel values: torch's intra-op thread count (the OpenMP setting of
// this thread, initialized from torch's as at::parallel_for does), 1 for small work or inside a
// parallel region.
inline int team_for(int64_t numel) {
  if (numel < kParallelMin || omp_in_parallel()) return 1;
  at::internal::lazy_init_num_threads();
  return std::max(1, omp_get_max_threads());
}

// Planes layout: whole channels per thread when they balance between the team's threads and the
// tensor is small enough to stay in cache; else planes in memory order, per thread, and a merge.
// A channel's planes lie C*S values apart: past about 4 MiB (where the input, the output and the
// gradients no longer share the cache) walking them costs more than reading the tensor twice in
// memory order, even on one thread (measured: docs/performance.md, "What was tried").
constexpr int64_t kByChannelBytes = int64_t{4} << 20;
inline bool by_channel(int64_t C, int team, int64_t bytes) {
  return bytes <= kByChannelBytes && (team == 1 || C % team == 0 || C >= 8 * team);
}

// In a parallel region: the calling thread (t of nt) and its share [b, e) of n items (split).
struct Share {
  int t = 0, nt = 1;
  int64_t b = 0, e = 0;
};
inline Share share_of(int64_t n) {
  Share s;
  s.t = omp_get_thread_num(), s.nt = omp_get_num_threads();
  split(n, s.t, s.nt, s.b, s.e);
  return s;
}

// Runs body(b, e) on every thread of a team of `team` threads (one: the calling thread), [b, e)
// the thread's share of n items.
template <typename Body>
inline void parallel_ranges(int64_t n, int team, Body body) {
#pragma omp parallel if (team > 1)
  {
    const Share s = share_of(n);
    body(s.b, s.e);
  }
}

// Runs body(c0, c1) on every thread of a full team, [c0, c1) the thread's columns
// (split_columns).
template <typename Body>
inline void parallel_columns(int64_t C, Body body) {
#pragma omp parallel
  {
    int64_t c0, c1;
    split_columns(C, omp_get_thread_num(), omp_get_num_threads(), c0, c1);
    body(c0, c1);
  }
}

// Chan's merge of (count, mean, centred sum of squares); the plain sum is kept as well and
// gives the final mean (so that an infinite value gives an infinite mean, as a plain mean does).
// Everything accumulates in double, whatever the input type.
struct Moments {
  double n = 0, mean = 0, m2 = 0, sum = 0;
  inline void merge(double nb, double mb, double m2b, double sb) {
    if (nb == 0) return;
    sum += sb;
    if (n == 0) {
      n = nb, mean = mb, m2 = m2b;
      return;
    }
    const double nt = n + nb, d = mb - mean;
    mean += d * (nb / nt);
    m2 += m2b + d * d * (n * nb / nt);
    n = nt;
  }
  inline void merge(const Moments& o) { merge(o.n, o.mean, o.m2, o.sum); }
};

// Independent accumulators per reduction (kLanes doubles = 4 AVX-512 or 8 AVX2 registers):
// a single vector accumulator would make each reduction wait on the add latency.
constexpr int kLanes = 32;
// Statistics of float, half and bfloat16 inputs sum kFlush values per lane in float, then add
// the partial sums in double: a float sum of 8 terms is as accurate as torch's own float
// reductions, and converting every element to double would cost twice the arithmetic.
constexpr int kFlush = 8;

inline double lane_total(const double* acc) {
  double s = 0;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// Accumulators of the per-row loops of short rows (a row of a few hundred values pays for every
// lane it adds up), and their total by halving (log2 of them dependent adds, not one per lane).
constexpr int kRowLanes = 16;
template <typename P>
inline P tree_total(P* a) {
  for (int w = kRowLanes / 2; w >= 1; w /= 2) {
#pragma omp simd
    for (int j = 0; j < w; ++j) a[j] += a[j + w];
  }
  return a[0];
}

// Sum and centred sum of squares of a run, two passes while the run is in cache.
template <typename T>
inline void run_moments(const T* p, int64_t len, double& sum, double& m2) {
  using P = typename Acc<T>::type;
  constexpr int64_t step = static_cast<int64_t>(kLanes) * kFlush;
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + step <= len; i += step) {
    P part[kLanes] = {};
    for (int k = 0; k < kFlush; ++k) {
      const T* q = p + i + k * kLanes;
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) part[j] += ld(q[j]);
    }
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(part[j]);
  }
  for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(ld(p[i + j]));
  }
  double s = lane_total(acc);
  for (; i < len; ++i) s += static_cast<double>(ld(p[i]));
  const double m = s / static_cast<double>(len);
  const P mp = static_cast<P>(m);
  double sq[kLanes] = {};
  for (i = 0; i + step <= len; i += step) {
    P part[kLanes] = {};
    for (int k = 0; k < kFlush; ++k) {
      const T* q = p + i + k * kLanes;
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        const P d = ld(q[j]) - mp;
        part[j] += d * d;
      }
    }
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) sq[j] += static_cast<double>(part[j]);
  }
  for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const double d = static_cast<double>(ld(p[i + j])) - m;
      sq[j] += d * d;
    }
  }
  double q = lane_total(sq);
  for (; i < len; ++i) {
    const double d = static_cast<double>(ld(p[i])) - m;
    q += d * d;
  }
  sum = s;
  m2 = q;
}

// Moments of a whole channel: N planes of S values at x + n * stride, two passes over the
// channel (for channels small enough to stay in cache between them), one set of kLanes
// accumulators across the planes (a reduction per plane costs more than the plane when S is a
// few hundred values).
constexpr int64_t kChannelTwoPass = 1 << 15;

// One pass of channel_moments: adds f(v) of every value v of the N planes, in the arithmetic
// type P, into the kLanes double accumulators acc (whole groups of kLanes values; at most kFlush
// groups summed in P first, as run_moments does) and tail (the rest of each plane).
template <typename T, typename F>
inline void planes_lanes(const T* x, int64_t N, int64_t stride, int64_t S, F f, double* acc,
                         double& tail) {
  using P = typename Acc<T>::type;
  for (int64_t n = 0; n < N; ++n) {
    const T* p = x + n * stride;
    int64_t i = 0;
    while (i + kLanes <= S) {
      P part[kLanes] = {};
      for (int k = 0; k < kFlush && i + kLanes <= S; ++k, i += kLanes) {
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) part[j] += f(static_cast<P>(ld(p[i + j])));
      }
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) acc[j] += static_cast<double>(part[j]);
    }
    for (; i < S; ++i) tail += static_cast<double>(f(static_cast<P>(ld(p[i]))));
  }
}

template <typename T>
inline void channel_moments(const T* x, int64_t N, int64_t stride, int64_t S, Moments& out) {
  using P = typename Acc<T>::type;
  double acc[kLanes] = {}, tail = 0;
  planes_lanes(x, N, stride, S, [](P v) { return v; }, acc, tail);
  const double M = static_cast<double>(N * S), s = lane_total(acc) + tail, m = s / M;
  // Squares centred on the mean rounded to P, then corrected to the mean itself:
  // sum (v - m)^2 = sum (v - mp)^2 - M (m - mp)^2.
  const P mp = static_cast<P>(m);
  double sq[kLanes] = {}, qt = 0;
  const auto square = [mp](P v) {
    const P d = v - mp;
    return d * d;
  };
  planes_lanes(x, N, stride, S, square, sq, qt);
  const double e = m - static_cast<double>(mp);
  double q = lane_total(sq) + qt - M * e * e;
  if (q < 0) q = 0;  // (a NaN stays NaN)
  out.merge(M, m, q, s);
}

// Moments of one (n, c) plane of S values (runs of kRun merged) into acc; also its mean.
template <typename T>
inline void plane_moments(const T* p, int64_t S, Moments& acc, double* plane_mean) {
  Moments local;
  for (int64_t s0 = 0; s0 < S; s0 += kRun) {
    const int64_t len = std::min(kRun, S - s0);
    double sum, q;
    run_moments(p + s0, len, sum, q);
    local.merge(static_cast<double>(len), sum / static_cast<double>(len), q, sum);
  }
  if (plane_mean) *plane_mean = local.sum / local.n;
  acc.merge(local);
}

template <typename T>
inline void run_apply(const T* x, T* y, int64_t len, const FwdCoef& f) {
  using A = typename Acc<T>::type;
  const A c = static_cast<A>(f.center), sc = static_cast<A>(f.scale), sh = static_cast<A>(f.shift);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) y[i] = st<T>((ld(x[i]) - c) * sc + sh);
}

// sum(g) and sum(g * (x - center)) of runs, accumulated in double into kLanes lanes a1, a2
// (kept across the runs of a channel) and the scalar tails t1, t2; lanes_finish adds them up.
// float64 is summed in double element by element. float, half and bfloat16 are centred on the
// center rounded to float (x - cf loses nothing for values near it) and summed in float, at most
// kFlush groups of kLanes values per lane, then added in double (as run_moments does; in double
// element by element, with 128-bit vectors, the conversions were the loop's cost);
// lanes_finish moves the sums from cf to center.
template <typename T>
inline void lanes_sums(const T* g, const T* x, int64_t len, double center, double* a1, double* a2,
                       double& t1, double& t2) {
  int64_t i = 0;
  if constexpr (std::is_same_v<T, double>) {
    for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        a1[j] += g[i + j];
        a2[j] += g[i + j] * (x[i + j] - center);
      }
    }
  } else {
    const float cf = static_cast<float>(center);
    while (i + kLanes <= len) {
      float p1[kLanes] = {}, p2[kLanes] = {};
      for (int k = 0; k < kFlush && i + kLanes <= len; ++k, i += kLanes) {
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) {
          const float gi = ld(g[i + j]);
          p1[j] += gi;
          p2[j] += gi * (ld(x[i + j]) - cf);
        }
      }
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) a1[j] += p1[j], a2[j] += p2[j];
    }
  }
  const double c =
      std::is_same_v<T, double> ? center : static_cast<double>(static_cast<float>(center));
  for (; i < len; ++i) {
    const double gi = static_cast<double>(ld(g[i]));
    t1 += gi;
    t2 += gi * (static_cast<double>(ld(x[i])) - c);
  }
}

template <typename T>
inline void lanes_finish(const double* a1, const double* a2, double t1, double t2, double center,
                         double& sg, double& sgx) {
  const double s1 = lane_total(a1) + t1, s2 = lane_total(a2) + t2;
  sg += s1;
  // float inputs: from the rounded center cf to center, sum g (x - center) = s2 - (center - cf) s1
  const double shift =
      std::is_same_v<T, double> ? 0.0 : center - static_cast<double>(static_cast<float>(center));
  sgx += s2 - shift * s1;
}

template <typename T>
inline void run_sums(const T* g, const T* x, int64_t len, double center, double& sg, double& sgx) {
  double a1[kLanes] = {}, a2[kLanes] = {}, t1 = 0, t2 = 0;
  lanes_sums(g, x, len, center, a1, a2, t1, t2);
  lanes_finish<T>(a1, a2, t1, t2, center, sg, sgx);
}

template <typename T>
inline void run_scale(const T* g, T* out, int64_t len, double a) {
  using A = typename Acc<T>::type;
  const A s = static_cast<A>(a);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) out[i] = st<T>(s * ld(g[i]));
}

template <typename T>
inline void run_grad(const T* g, const T* x, T* out, int64_t len, double center, const BwdCoef& f) {
  using A = typename Acc<T>::type;
  const A c = static_cast<A>(center), a = static_cast<A>(f.a), b = static_cast<A>(f.b),
          k = static_cast<A>(f.k);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i)
    out[i] = st<T>(a * ld(g[i]) + (b * (ld(x[i]) - c) + k));
}

// Per-column sums over rows [r0, r1), added to sg and sgx in double: sum(g) and
// sum(g * (x - center)) for float64 inputs; for float, half and bfloat16 the uncentred
// sum(g x), to be corrected by the caller (rows_centre): in double that cancellation is harmless
// and it saves a subtraction per element. Row by row with the accumulators in L1 (a
// column-chunked loop with register accumulators walks the rows at a stride of C values and
// measured 1.6 times slower for C = 1024).
// With Z, x reads as z (ZMap).
template <typename T, bool Z = false>
inline void rows_sums(const T* g, const T* x, int64_t r0, int64_t r1, int64_t stride,
                      int64_t C, const double* center, double* sg, double* sgx,
                      const ZMap& zm = ZMap{}) {
  constexpr bool kCentre = std::is_same_v<T, double>;
  int64_t i = r0;
  // Four rows at a time: one load and store of each accumulator per four values (the
  // accumulators' traffic, not the arithmetic, bounds this loop).
  for (; i + 4 <= r1; i += 4) {
    const FourRows<false, double, T> gs(g, i, stride, zm);
    const FourRows<Z, double, T> xs(x, i, stride, zm);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double k = kCentre ? center[c] : 0.0;
      const double a0 = gs.at(0, c), a1 = gs.at(1, c), a2 = gs.at(2, c), a3 = gs.at(3, c);
      sg[c] += (a0 + a1) + (a2 + a3);
      sgx[c] += (a0 * (xs.at(0, c) - k) + a1 * (xs.at(1, c) - k)) +
                (a2 * (xs.at(2, c) - k) + a3 * (xs.at(3, c) - k));
    }
  }
  for (; i < r1; ++i) {
    const T* gr = g + i * stride;
    const T* xr = x + i * stride;
    double t, s;
    z_of_row<Z>(zm, i, t, s);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const double gi = static_cast<double>(ld(gr[c]));
      sg[c] += gi;
      sgx[c] += gi * (zld<Z>(xr[c], t, s) - (kCentre ? center[c] : 0.0));
    }
  }
}

// sum(g x) - center sum(g) for the uncentred sums of rows_sums.
template <typename T>
inline void rows_centre(int64_t C, const double* center, const double* sg, double* sgx) {
  if (std::is_same_v<T, double>) return;
  for (int64_t c = 0; c < C; ++c) sgx[c] -= center[c] * sg[c];
}

// Sample n's (mu, s) from its moments (count n, centred squares m2, plain sum).
inline void sample_scale(const Moments& m, double eps, double& mu, double& s) {
  mu = m.sum / m.n;
  s = 1.0 / std::sqrt(m.m2 / m.n + eps);
}

// (mu, s) of the L contiguous values of a sample: two passes in the arithmetic type while the
// sample is in L1 (up to kRun values; plane_moments' lanes cost more than a short row), else
// plane_moments.
template <typename T>
inline void sample_moments(const T* p, int64_t L, double eps, double& mu, double& s) {
  using P = typename Acc<T>::type;
  if (L > kRun) {
    Moments m;
    plane_moments(p, L, m, nullptr);
    sample_scale(m, eps, mu, s);
    return;
  }
  P acc[kRowLanes] = {};
  int64_t i = 0;
  for (; i + kRowLanes <= L; i += kRowLanes) {
#pragma omp simd
    for (int j = 0; j < kRowLanes; ++j) acc[j] += ld(p[i + j]);
  }
  P sum = tree_total(acc);
  for (; i < L; ++i) sum += ld(p[i]);
  const P m = sum / static_cast<P>(L);
  P sq[kRowLanes] = {};
  for (i = 0; i + kRowLanes <= L; i += kRowLanes) {
#pragma omp simd
    for (int j = 0; j < kRowLanes; ++j) {
      const P d = ld(p[i + j]) - m;
      sq[j] += d * d;
    }
  }
  P q = tree_total(sq);
  for (; i < L; ++i) {
    const P d = ld(p[i]) - m;
    q += d * d;
  }
  mu = static_cast<double>(m);
  s = 1.0 / std::sqrt(static_cast<double>(q) / static_cast<double>(L) + eps);
}

// Moments of rows [r0, r1) of the rows layout, merged into one thread's per-column
// accumulators (tn values so far; mean tm, centred squares tq, plain sum ts). Blocks of
// kRowBlock rows, row by row (contiguous), two passes while the block is in L2, summed in the
// arithmetic type and merged with Chan's formula in double. (A column-chunked loop with
// register accumulators walks the rows at a stride of C values: 2 times slower for C = 1024.)
constexpr int64_t kRowBlock = 16;

// acc[c] += term(v, c) for the value v of column c (z with Z) of every row in [i0, i1), in the
// arithmetic type P: four rows per load and store of acc (one row at a time, the accumulators'
// traffic bounds the loop).
template <bool Z, typename P, typename T, typename Term>
inline void rows_accumulate(const T* x, int64_t i0, int64_t i1, int64_t stride, int64_t C,
                            const ZMap& zm, P* acc, Term term) {
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) {
    const FourRows<Z, P, T> xs(x, i, stride, zm);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c)
      acc[c] += (term(xs.at(0, c), c) + term(xs.at(1, c), c)) +
                (term(xs.at(2, c), c) + term(xs.at(3, c), c));
  }
  for (; i < i1; ++i) {
    const T* row = x + i * stride;
    P t, s;
    z_of_row<Z>(zm, i, t, s);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) acc[c] += term(zld<Z>(row[c], t, s), c);
  }
}

// With Z, x reads as z (ZMap).
template <typename T, bool Z = false>
inline void rows_moments(const T* x, int64_t r0, int64_t r1, int64_t stride, int64_t C,
                         double* tm, double* tq, double* ts, double& tn,
                         const ZMap& zm = ZMap{}) {
  using P = typename Acc<T>::type;
  std::vector<P> pv(C), mv(C), qv(C);
  P* p = pv.data();
  P* m = mv.data();
  P* q = qv.data();
  for (int64_t i0 = r0; i0 < r1; i0 += kRowBlock) {
    const int64_t i1 = std::min(r1, i0 + kRowBlock);
    const T* first = x + i0 * stride;
    if constexpr (Z) {
      if (zm.fill_mu) {
        for (int64_t i = i0; i < i1; ++i)
          sample_moments(x + i * stride, C, zm.eps, zm.fill_mu[i], zm.fill_s[i]);
      }
    }
    P zt0, zs0;
    z_of_row<Z>(zm, i0, zt0, zs0);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) p[c] = zld<Z>(first[c], zt0, zs0);
    rows_accumulate<Z>(x, i0 + 1, i1, stride, C, zm, p, [](P v, int64_t) { return v; });
    const P inv = P(1) / static_cast<P>(i1 - i0);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      m[c] = p[c] * inv;
      const P d = zld<Z>(first[c], zt0, zs0) - m[c];
      q[c] = d * d;
    }
    rows_accumulate<Z>(x, i0 + 1, i1, stride, C, zm, q, [m](P v, int64_t c) {
      const P d = v - m[c];
      return d * d;
    });
    const double nb = static_cast<double>(i1 - i0);
    if (tn == 0) {
      for (int64_t c = 0; c < C; ++c) tm[c] = m[c], tq[c] = q[c], ts[c] = p[c];
    } else {
      const double nt = tn + nb, wb = nb / nt, wc = tn * nb / nt;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double d = static_cast<double>(m[c]) - tm[c];
        tm[c] += d * wb;
        tq[c] += static_cast<double>(q[c]) + d * d * wc;
        ts[c] += static_cast<double>(p[c]);
      }
    }
    tn += nb;
  }
}

// Rows layout: the forward coefficients of W columns in the accumulation type A, and the affine
// map y = (x - center) * scale + shift that applies them to rows of those columns.
template <typename A>
struct ColumnCoefs {
  std::vector<A> center, scale, shift;
  explicit ColumnCoefs(int64_t W) : center(W), scale(W), shift(W) {}
  void set(int64_t j, const FwdCoef& f) {
    center[j] = static_cast<A>(f.center), scale[j] = static_cast<A>(f.scale);
    shift[j] = static_cast<A>(f.shift);
  }
  // Rows [r0, r1) of the W columns at x (row r at x + r * stride) into y (same layout); with Z,
  // x reads as z (ZMap).
  template <typename T, bool Z = false>
  void apply(const T* x, T* y, int64_t r0, int64_t r1, int64_t stride,
             const ZMap& zm = ZMap{}) const {
    const int64_t W = static_cast<int64_t>(center.size());
    const A *pc = center.data(), *ps = scale.data(), *ph = shift.data();
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * stride;
      T* yr = y + r * stride;
      A t, s;
      z_of_row<Z>(zm, r, t, s);
#pragma omp simd
      for (int64_t j = 0; j < W; ++j)
        yr[j] = st<T>((zld<Z>(xr[j], t, s) - pc[j]) * ps[j] + ph[j]);
    }
  }
};

// ------------------------------------------------------------------------------------ forward

// The rows layout of stats_apply; with Z, x reads as z (ZMap).
template <typename T, bool Z = false, typename CoefFn>
void rows_stats_apply(const T* x, T* y, const Geometry& g, double* mean, double* var,
                      CoefFn coef, const ZMap& zm = ZMap{}) {
  const int64_t N = g.N, C = g.C, S = g.S;
  const double M = static_cast<double>(g.count());
  const int team = team_for(g.numel());
  using A = typename Acc<T>::type;
  const int64_t R = N * S;
  if (team > 1 && C >= columns_per_thread() * team) {
    // Wide rows: each thread its columns over every row, statistics then output.
    parallel_columns(C, [&](int64_t c0, int64_t c1) {
      const int64_t W = c1 - c0;
      std::vector<double> tm(W), tq(W), ts(W);
      ColumnCoefs<A> cf(y ? W : 0);
      double tn = 0;
      if (W > 0)
        rows_moments<T, Z>(x + c0, 0, R, C, W, tm.data(), tq.data(), ts.data(), tn, zm);
      for (int64_t j = 0; j < W; ++j) {
        const int64_t c = c0 + j;
        mean[c] = ts[j] / M;
        var[c] = tq[j] / M;
        if (y) cf.set(j, coef(c, mean[c], var[c]));
      }
      if (y && W > 0) cf.template apply<T, Z>(x + c0, y + c0, 0, R, C, zm);
    });
    return;
  }
  // Rows of C values split between threads: blocks of rows, two passes per block in cache,
  // merged per thread, then across threads.
  const size_t TC = static_cast<size_t>(team) * C;
  std::vector<double> pm(TC), pq(TC), ps(TC);  // per thread: mean, centred squares, sum
  std::vector<double> pn(team, 0.0);
  std::vector<FwdCoef> coefs(y ? C : 0);
#pragma omp parallel if (team > 1)
  {
    const Share rows = share_of(R);
    const size_t mine = static_cast<size_t>(rows.t) * C;
    double tn = 0;
    rows_moments<T, Z>(x, rows.b, rows.e, C, C, pm.data() + mine, pq.data() + mine,
                       ps.data() + mine, tn, zm);
    pn[rows.t] = tn;
#pragma omp barrier
    const Share chans = share_of(C);
    for (int64_t c = chans.b; c < chans.e; ++c) {
      Moments acc;
      for (int u = 0; u < chans.nt; ++u) {
        const size_t o = static_cast<size_t>(u) * C + c;
        acc.merge(pn[u], pm[o], pq[o], ps[o]);
      }
      mean[c] = acc.sum / M;
      var[c] = acc.m2 / M;
      if (y) coefs[c] = coef(c, mean[c], var[c]);
    }
    if (y) {
#pragma omp barrier
      ColumnCoefs<A> cf(C);
      for (int64_t c = 0; c < C; ++c) cf.set(c, coefs[c]);
      cf.template apply<T, Z>(x, y, rows.b, rows.e, C, zm);
    }
  }
}

// mean/var (length C, biased var) receive the batch statistics; plane_mean (N*C, may be null)
// the mean of each (n, c) plane (planes layout only). coef(c, mean, var) -> FwdCoef. y may be
// null (statistics only).
template <typename T, typename CoefFn>
void stats_apply(const T* x, T* y, const Geometry& g, double* mean, double* var,
                 double* plane_mean, CoefFn coef) {
  const int64_t N = g.N, C = g.C, S = g.S;
  const double M = static_cast<double>(g.count());
  const int team = team_for(g.numel());
  if (!g.rows) {
    if (by_channel(C, team, g.numel() * static_cast<int64_t>(sizeof(T)))) {
      parallel_ranges(C, team, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          Moments acc;
          if (!plane_mean && N * S <= kChannelTwoPass) {
            channel_moments(x + c * S, N, C * S, S, acc);
          } else {
            for (int64_t n = 0; n < N; ++n)
              plane_moments(x + (n * C + c) * S, S, acc,
                            plane_mean ? plane_mean + n * C + c : nullptr);
          }
          mean[c] = acc.sum / M;
          var[c] = acc.m2 / M;
          if (y) {
            const FwdCoef f = coef(c, mean[c], var[c]);
            for (int64_t n = 0; n < N; ++n)
              run_apply(x + (n * C + c) * S, y + (n * C + c) * S, S, f);
          }
        }
      });
      return;
    }
    // Planes (n, c) in memory order split between threads; per-thread moments per channel.
    std::vector<Moments> part(static_cast<size_t>(team) * C);
    std::vector<FwdCoef> coefs(y ? C : 0);
#pragma omp parallel if (team > 1)
    {
      const Share planes = share_of(N * C);
      Moments* mine = part.data() + static_cast<size_t>(planes.t) * C;
      for (int64_t p = planes.b; p < planes.e; ++p)
        plane_moments(x + p * S, S, mine[p % C], plane_mean ? plane_mean + p : nullptr);
#pragma omp barrier
      const Share chans = share_of(C);
      for (int64_t c = chans.b; c < chans.e; ++c) {
        Moments acc;
        for (int u = 0; u < chans.nt; ++u) acc.merge(part[static_cast<size_t>(u) * C + c]);
        mean[c] = acc.sum / M;
        var[c] = acc.m2 / M;
        if (y) coefs[c] = coef(c, mean[c], var[c]);
      }
      if (y) {
#pragma omp barrier
        for (int64_t p = planes.b; p < planes.e; ++p)
          run_apply(x + p * S, y + p * S, S, coefs[p % C]);
      }
    }
    return;
  }
  rows_stats_apply<T>(x, y, g, mean, var, coef);
}

// Per-sample means of a rows-layout (channels_last) tensor: out[n * C + c] = mean over the S
// rows of sample n.
template <typename T>
void sample_means_rows(const T* x, const Geometry& g, double* out) {
  const int64_t N = g.N, C = g.C, S = g.S;
  parallel_ranges(N, team_for(g.numel()), [&](int64_t n0, int64_t n1) {
    std::vector<double> acc(C);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t s = 0; s < S; ++s) {
        const T* row = x + (n * S + s) * C;
        double* a = acc.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) a[c] += static_cast<double>(ld(row[c]));
      }
      for (int64_t c = 0; c < C; ++c) out[n * C + c] = acc[c] / static_cast<double>(S);
    }
  });
}

// Affine map with fixed per-channel coefficients: y = (x - center) * scale + shift.
template <typename T>
void apply_only(const T* x, T* y, const Geometry& g, const FwdCoef* coefs) {
  using A = typename Acc<T>::type;
  const int64_t C = g.C, S = g.S;
  const int team = team_for(g.numel());
  if (!g.rows) {
    parallel_ranges(g.N * C, team, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) run_apply(x + p * S, y + p * S, S, coefs[p % C]);
    });
    return;
  }
  ColumnCoefs<A> cf(C);
  for (int64_t c = 0; c < C; ++c) cf.set(c, coefs[c]);
  parallel_ranges(g.N * S, team, [&](int64_t r0, int64_t r1) { cf.apply(x, y, r0, r1, C); });
}

// ----------------------------------------------------------------------------------- backward

// Per-thread partial sums of the C channels: thread t's sum(g) at g(t)[c], its sum(g (x -
// center)) at gx(t)[c].
struct PartialSums {
  int64_t C;
  std::vector<double> data;
  PartialSums(int team, int64_t C) : C(C), data(static_cast<size_t>(team) * C * 2, 0.0) {}
  double* g(int t) { return data.data() + static_cast<size_t>(t) * C * 2; }
  double* gx(int t) { return g(t) + C; }
  // In the parallel region, after a barrier: this thread adds up the threads' partial sums of
  // its share of the channels into sum_g[c] and sum_gx[c], then calls done(c).
  template <typename Done>
  void merge(double* sum_g, double* sum_gx, Done done) {
    const Share chans = share_of(C);
    for (int64_t c = chans.b; c < chans.e; ++c) {
      double sg = 0, sgx = 0;
      for (int u = 0; u < chans.nt; ++u) {
        sg += g(u)[c];
        sgx += gx(u)[c];
      }
      sum_g[c] = sg;
      sum_gx[c] = sgx;
      done(c);
    }
  }
};

// Rows layout: the backward coefficients of W columns and their centers in the accumulation type
// A, and the gradients they give on rows of those columns (row r at + r * stride).
template <typename A>
struct ColumnBwd {
  std::vector<A> a, b, k, center;
  ColumnBwd(int64_t W, const double* centers) : a(W), b(W), k(W), center(W) {
    for (int64_t j = 0; j < W; ++j) center[j] = static_cast<A>(centers[j]);
  }
  void set(int64_t j, const BwdCoef& f) {
    a[j] = static_cast<A>(f.a), b[j] = static_cast<A>(f.b), k[j] = static_cast<A>(f.k);
  }
  // out = a * g on rows [r0, r1).
  template <typename T>
  void scale(const T* g, T* out, int64_t r0, int64_t r1, int64_t stride) const {
    const int64_t W = static_cast<int64_t>(a.size());
    const A* pa = a.data();
    for (int64_t i = r0; i < r1; ++i) {
      const T* gr = g + i * stride;
      T* o = out + i * stride;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) o[j] = st<T>(pa[j] * ld(gr[j]));
    }
  }
  // out = a * g + b * (x - center) + k on rows [r0, r1).
  template <typename T>
  void grad(const T* g, const T* x, T* out, int64_t r0, int64_t r1, int64_t stride) const {
    const int64_t W = static_cast<int64_t>(a.size());
    const A *pa = a.data(), *pb = b.data(), *pk = k.data(), *pc = center.data();
    for (int64_t i = r0; i < r1; ++i) {
      const T* gr = g + i * stride;
      const T* xr = x + i * stride;
      T* o = out + i * stride;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j)
        o[j] = st<T>(pa[j] * ld(gr[j]) + (pb[j] * (ld(xr[j]) - pc[j]) + pk[j]));
    }
  }
};

// sum_g/sum_gx (length C) receive sum(g) and sum(g * (x - center)) per channel; coef(c, sum_g,
// sum_gx) -> BwdCoef (called once per channel, also without out); out (may be null: sums
// only) receives a * g + b * (x - center) + k.
// With one_pass the gradient is a * g alone (b and k must be 0, a may not depend on the sums:
// coef is called with zeros, first) and the sums and the gradient share one pass.
template <typename T, typename CoefFn>
void sums_apply(const T* g, const T* x, T* out, const Geometry& geo, const double* center,
                double* sum_g, double* sum_gx, bool one_pass, CoefFn coef) {
  using A = typename Acc<T>::type;
  const int64_t N = geo.N, C = geo.C, S = geo.S;
  const int team = team_for(geo.numel());
  if (!geo.rows) {
    if (by_channel(C, team, geo.numel() * static_cast<int64_t>(sizeof(T)))) {
      parallel_ranges(C, team, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          double sg = 0, sgx = 0, a1[kLanes] = {}, a2[kLanes] = {}, t1 = 0, t2 = 0;
          BwdCoef f;
          if (one_pass) f = coef(c, 0.0, 0.0);
          for (int64_t n = 0; n < N; ++n) {  // one set of lanes for the whole channel
            const int64_t o = (n * C + c) * S;
            lanes_sums(g + o, x + o, S, center[c], a1, a2, t1, t2);
            if (one_pass && out) run_scale(g + o, out + o, S, f.a);
          }
          lanes_finish<T>(a1, a2, t1, t2, center[c], sg, sgx);
          sum_g[c] = sg;
          sum_gx[c] = sgx;
          if (!one_pass) f = coef(c, sg, sgx);
          if (!one_pass && out) {
            for (int64_t n = 0; n < N; ++n) {
              const int64_t o = (n * C + c) * S;
              run_grad(g + o, x + o, out + o, S, center[c], f);
            }
          }
        }
      });
      return;
    }
    PartialSums part(team, C);
    std::vector<BwdCoef> coefs(C);
    if (one_pass)
      for (int64_t c = 0; c < C; ++c) coefs[c] = coef(c, 0.0, 0.0);
#pragma omp parallel if (team > 1)
    {
      const Share planes = share_of(N * C);
      double *mg = part.g(planes.t), *mgx = part.gx(planes.t);
      for (int64_t p = planes.b; p < planes.e; ++p) {
        const int64_t c = p % C;
        run_sums(g + p * S, x + p * S, S, center[c], mg[c], mgx[c]);
        if (one_pass && out) run_scale(g + p * S, out + p * S, S, coefs[c].a);
      }
#pragma omp barrier
      part.merge(sum_g, sum_gx, [&](int64_t c) {
        if (!one_pass) coefs[c] = coef(c, sum_g[c], sum_gx[c]);
      });
      if (!one_pass && out) {
#pragma omp barrier
        for (int64_t p = planes.b; p < planes.e; ++p)
          run_grad(g + p * S, x + p * S, out + p * S, S, center[p % C], coefs[p % C]);
      }
    }
    return;
  }
  const int64_t R = N * S;
  if (team > 1 && C >= columns_per_thread() * team) {
    // Wide rows: each thread its columns over every row, sums then gradient.
    parallel_columns(C, [&](int64_t c0, int64_t c1) {
      const int64_t W = c1 - c0;
      ColumnBwd<A> cf(W, center + c0);
      for (int64_t j = 0; j < W; ++j) {
        sum_g[c0 + j] = 0.0, sum_gx[c0 + j] = 0.0;
        if (one_pass) cf.set(j, coef(c0 + j, 0.0, 0.0));
      }
      const int64_t B = one_pass ? 64 : R;
      for (int64_t r = 0; W > 0 && r < R; r += B) {
        const int64_t re = std::min(R, r + B);
        rows_sums(g + c0, x + c0, r, re, C, W, center + c0, sum_g + c0, sum_gx + c0);
        if (one_pass && out) cf.scale(g + c0, out + c0, r, re, C);
      }
      if (W > 0) rows_centre<T>(W, center + c0, sum_g + c0, sum_gx + c0);
      if (!one_pass && out && W > 0) {
        for (int64_t j = 0; j < W; ++j) cf.set(j, coef(c0 + j, sum_g[c0 + j], sum_gx[c0 + j]));
        cf.grad(g + c0, x + c0, out + c0, 0, R, C);
      } else if (!one_pass) {
        for (int64_t j = 0; j < W; ++j) coef(c0 + j, sum_g[c0 + j], sum_gx[c0 + j]);
      }
    });
    return;
  }
  // Rows layout split by rows: per-thread column sums over its rows, merged; then the gradient.
  PartialSums part(team, C);
  ColumnBwd<A> cf(C, center);
  if (one_pass)
    for (int64_t c = 0; c < C; ++c) cf.set(c, coef(c, 0.0, 0.0));
  const int64_t B = one_pass ? 64 : R;  // one pass: the gradient of each block while in cache
#pragma omp parallel if (team > 1)
  {
    const Share rows = share_of(R);
    double *mg = part.g(rows.t), *mgx = part.gx(rows.t);
    for (int64_t r = rows.b; r < rows.e; r += B) {
      const int64_t re = std::min(rows.e, r + B);
      rows_sums(g, x, r, re, C, C, center, mg, mgx);
      if (one_pass && out) cf.scale(g, out, r, re, C);  // a * g, while the block is in cache
    }
    rows_centre<T>(C, center, mg, mgx);
#pragma omp barrier
    part.merge(sum_g, sum_gx, [&](int64_t c) {
      if (!one_pass) cf.set(c, coef(c, sum_g[c], sum_gx[c]));
    });
    if (!one_pass && out) {
#pragma omp barrier
      cf.grad(g, x, out, rows.b, rows.e, C);
    }
  }
}

// ------------------------------------------------------------- per-sample standardization first
//
// The kernels above applied to z instead of x, where each sample n (its C*S values) is
// standardized: z = (x - mu[n]) * s[n], s[n] = 1 / sqrt(var_n + eps) (biased var over the
// sample), without writing z. Planes layout: every plane (n, c) is an affine image of x, so the
// moments of z's planes follow from those of x's, and the forward and the backward each keep
// two passes. Rows layout: the loads are mapped (ZMap); with one row per sample each row's
// statistics are taken as its block of rows is read (else in a pass of their own); the
// backward applies the standardization's gradient sample by sample while the sample is in
// cache (FN's gradient of a row, its two sums, then the row rewritten).

// stats_apply of z: mean/var receive z's per-channel statistics, coef(c, mean, var) ->
// FwdCoef of z; mu/s (length N) the samples' statistics; plane_mean (N*C, may be null) z's
// per-(n, c) means in either layout. y may be null.
template <typename T, typename CoefFn>
void sample_stats_apply(const T* x, T* y, const Geometry& g, double eps, double* mu, double* s,
                        double* mean, double* var, double* plane_mean, CoefFn coef) {
  const int64_t N = g.N, C = g.C, S = g.S;
  const int team = team_for(g.numel());
  if (g.rows) {
    ZMap zm{mu, s, S};
    if (S == 1 && !(team > 1 && C >= columns_per_thread() * team)) {
      zm.fill_mu = mu, zm.fill_s = s, zm.eps = eps;  // rows split between threads: as read
    } else {
      const int64_t L = C * S;  // sample n: rows [n S, (n + 1) S), L contiguous values
      parallel_ranges(N, team, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) sample_moments(x + n * L, L, eps, mu[n], s[n]);
      });
    }
    rows_stats_apply<T, true>(x, y, g, mean, var, coef, zm);
    if (plane_mean) {
      sample_means_rows<T>(x, g, plane_mean);
      for (int64_t p = 0; p < N * C; ++p) plane_mean[p] = (plane_mean[p] - mu[p / C]) * s[p / C];
    }
    return;
  }
  std::vector<Moments> pm(static_cast<size_t>(N * C));
  parallel_ranges(N * C, team, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) plane_moments(x + p * S, S, pm[p], nullptr);
  });
  for (int64_t n = 0; n < N; ++n) {
    Moments m;
    for (int64_t c = 0; c < C; ++c) m.merge(pm[n * C + c]);
    sample_scale(m, eps, mu[n], s[n]);
  }
  const double M = static_cast<double>(g.count());
  std::vector<FwdCoef> coefs(C);
  for (int64_t c = 0; c < C; ++c) {
    Moments acc;
    for (int64_t n = 0; n < N; ++n) {  // plane (n, c) of z: x's moments mapped
      const Moments& q = pm[n * C + c];
      const double zmean = (q.sum / q.n - mu[n]) * s[n];
      acc.merge(q.n, (q.mean - mu[n]) * s[n], q.m2 * s[n] * s[n], (q.sum - q.n * mu[n]) * s[n]);
      if (plane_mean) plane_mean[n * C + c] = zmean;
    }
    mean[c] = acc.sum / M;
    var[c] = acc.m2 / M;
    coefs[c] = coef(c, mean[c], var[c]);
  }
  if (!y) return;
  parallel_ranges(N * C, team, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      // (z - center) * scale + shift with z = (x - mu) * s
      const int64_t n = p / C;
      const FwdCoef& f = coefs[p % C];
      const FwdCoef h{mu[n], s[n] * f.scale, f.shift - f.center * f.scale};
      run_apply(x + p * S, y + p * S, S, h);
    }
  });
}

// Plane sums of the standardization's backward, d = x - mu: sum(g), sum(g d), sum(d),
// sum(d d), into out[0..3].
template <typename T>
inline void plane_sums4(const T* g, const T* x, int64_t len, double mu, double* out) {
  double a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {}, a4[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const double gi = static_cast<double>(ld(g[i + j]));
      const double d = static_cast<double>(ld(x[i + j])) - mu;
      a1[j] += gi, a2[j] += gi * d, a3[j] += d, a4[j] += d * d;
    }
  }
  double t1 = 0, t2 = 0, t3 = 0, t4 = 0;
  for (; i < len; ++i) {
    const double gi = static_cast<double>(ld(g[i]));
    const double d = static_cast<double>(ld(x[i])) - mu;
    t1 += gi, t2 += gi * d, t3 += d, t4 += d * d;
  }
  out[0] = lane_total(a1) + t1, out[1] = lane_total(a2) + t2;
  out[2] = lane_total(a3) + t3, out[3] = lane_total(a4) + t4;
}

// One row of the rows layout's gradient of z, gz = a g + b (z - center) + k with
// z = x s + t, written to o; sum(gz) and sum(gz z) of the written values added to ga, gb.
template <typename A, typename T>
inline void grad_row_sums(const ColumnBwd<A>& cb, const T* g, const T* x, T* o, int64_t C, A t,
                          A s, double& ga, double& gb) {
  const A *pa = cb.a.data(), *pb = cb.b.data(), *pk = cb.k.data(), *pc = cb.center.data();
  A la[kRowLanes] = {}, lb[kRowLanes] = {};
  int64_t c = 0;
  for (; c + kRowLanes <= C; c += kRowLanes) {
#pragma omp simd
    for (int j = 0; j < kRowLanes; ++j) {
      const int64_t i = c + j;
      const A z = zld<true>(x[i], t, s);
      const T v = st<T>(pa[i] * ld(g[i]) + (pb[i] * (z - pc[i]) + pk[i]));
      o[i] = v;
      const A u = static_cast<A>(ld(v));
      la[j] += u;
      lb[j] += u * z;
    }
  }
  double ta = static_cast<double>(tree_total(la)), tb = static_cast<double>(tree_total(lb));
  for (; c < C; ++c) {
    const A z = zld<true>(x[c], t, s);
    const T v = st<T>(pa[c] * ld(g[c]) + (pb[c] * (z - pc[c]) + pk[c]));
    o[c] = v;
    const A u = static_cast<A>(ld(v));
    ta += u, tb += u * z;
  }
  ga += ta, gb += tb;
}

// sums_apply of z (mu, s from sample_stats_apply): sum_g/sum_gz receive sum(g) and
// sum(g (z - center)) per channel, coef(c, sum_g, sum_gz) -> BwdCoef of z's gradient
// gz = a g + b (z - center) + k; out (may be null) receives the gradient of x through the
// standardization, s[n] (gz - mean_n(gz) - z mean_n(gz z)), means over sample n.
template <typename T, typename CoefFn>
void sample_sums_apply(const T* g, const T* x, T* out, const Geometry& geo, const double* center,
                       const double* mu, const double* s, double* sum_g, double* sum_gz,
                       CoefFn coef) {
  using A = typename Acc<T>::type;
  const int64_t N = geo.N, C = geo.C, S = geo.S;
  const double L = static_cast<double>(C * S);
  const int team = team_for(geo.numel());
  if (!geo.rows) {
    std::vector<double> q(static_cast<size_t>(N * C * 4));
    parallel_ranges(N * C, team, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        plane_sums4(g + p * S, x + p * S, S, mu[p / C], &q[4 * p]);
    });
    std::vector<BwdCoef> cf(C);
    for (int64_t c = 0; c < C; ++c) {
      double sg = 0, sgz = 0;
      for (int64_t n = 0; n < N; ++n) {
        sg += q[4 * (n * C + c)];
        sgz += s[n] * q[4 * (n * C + c) + 1];
      }
      sum_g[c] = sg;
      sum_gz[c] = sgz - center[c] * sg;
      cf[c] = coef(c, sum_g[c], sum_gz[c]);
    }
    if (!out) return;
    std::vector<BwdCoef> pc(static_cast<size_t>(N * C));
    const double Sd = static_cast<double>(S);
    for (int64_t n = 0; n < N; ++n) {
      // mean_n(gz) and mean_n(gz z) from the planes' sums (z = s d on the sample)
      double ga = 0, gb = 0;
      const double sn = s[n];
      for (int64_t c = 0; c < C; ++c) {
        const double* qp = &q[4 * (n * C + c)];
        const BwdCoef& f = cf[c];
        ga += f.a * qp[0] + f.b * (sn * qp[2] - Sd * center[c]) + f.k * Sd;
        gb += f.a * sn * qp[1] + f.b * (sn * sn * qp[3] - center[c] * sn * qp[2]) +
              f.k * sn * qp[2];
      }
      ga /= L, gb /= L;
      for (int64_t c = 0; c < C; ++c) {
        const BwdCoef& f = cf[c];
        pc[n * C + c] = BwdCoef{sn * f.a, sn * sn * (f.b - gb), sn * (f.k - f.b * center[c] - ga)};
      }
    }
    parallel_ranges(N * C, team, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        run_grad(g + p * S, x + p * S, out + p * S, S, mu[p / C], pc[p]);
    });
    return;
  }
  // Rows: column sums of z over the rows (split between threads, merged), then the gradient
  // sample by sample: gz into out, the sample's two means, out rewritten in place.
  const ZMap zm{mu, s, S};
  const int64_t R = N * S;
  PartialSums part(team, C);
  ColumnBwd<A> cb(C, center);
#pragma omp parallel if (team > 1)
  {
    const Share rows = share_of(R);
    double *mg = part.g(rows.t), *mgz = part.gx(rows.t);
    rows_sums<T, true>(g, x, rows.b, rows.e, C, C, center, mg, mgz, zm);
    rows_centre<T>(C, center, mg, mgz);
#pragma omp barrier
    part.merge(sum_g, sum_gz, [&](int64_t c) { cb.set(c, coef(c, sum_g[c], sum_gz[c])); });
    if (out) {
#pragma omp barrier
      const Share samples = share_of(N);
      for (int64_t n = samples.b; n < samples.e; ++n) {
        const int64_t r0 = n * S, r1 = r0 + S;
        A t, sn;
        z_of_row<true>(zm, r0, t, sn);
        double ga = 0, gb = 0;
        for (int64_t r = r0; r < r1; ++r)
          grad_row_sums(cb, g + r * C, x + r * C, out + r * C, C, t, sn, ga, gb);
        // s (gz - mean(gz) - z mean(gz z)) = s gz + bx x + k0, as torch's layer_norm backward
        const double sd = s[n], ma = ga / L, mb = gb / L;
        const A bx = static_cast<A>(-sd * sd * mb);
        const A k0 = static_cast<A>(sd * (mu[n] * sd * mb - ma));
        for (int64_t r = r0; r < r1; ++r) {
          T* o = out + r * C;
          const T* xr = x + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) o[c] = st<T>(sn * ld(o[c]) + (bx * ld(xr[c]) + k0));
        }
      }
    }
  }
}

}  // namespace normlab
