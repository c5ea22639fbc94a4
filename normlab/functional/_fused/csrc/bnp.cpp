// Fused CPU kernels of Batch Normalization Preconditioning (BNP): the fold of one recorded batch
// into the running input statistics of many layers, and the gradient transform of many layers,
// each in one call (the formulas of normlab/functional/precondition.py: ema_update with
// linear_input_moments, and the transform of precondition_linear_ / precondition_conv2d_
// without weight normalization). On the small layers BNP is used with, the cost of the
// reference is the number of tensor operations per step, not their size.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "ops.h"

namespace normlab {
namespace {

using at::Tensor;

constexpr int64_t kGrain = 1 << 15;  // elements of work below which a loop stays on one thread

bool given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// Whether the kernels take t: a contiguous CPU tensor of the given dtype.
bool takes(const Tensor& t, at::ScalarType type) {
  return t.device().is_cpu() && t.scalar_type() == type && t.is_contiguous();
}

bool takes(const std::optional<Tensor>& t, at::ScalarType type) {
  return given(t) && takes(*t, type);
}

// Per-column mean and biased variance of a (rows, n) row-major matrix, two passes (the sum,
// then the centred squares). Blocks of up to kBlock rows are summed in float (double for double
// inputs), the blocks in double: as accurate as torch's float32 reductions, with a conversion per
// block rather than per value (the rule of the batch norm kernels, engine.h). float16 and
// bfloat16 inputs are read as they are and summed in float.
constexpr int64_t kBlock = 16;

// Columns per chunk: a chunk's partial sums stay in registers while the rows stream by (a
// chunk has a compile-time width so that they can; only the last few columns, fewer than 8, go
// through the loop of run-time width). One cache line of float32 per row: wider chunks measured
// slower on the 2-core AMD EPYC (64 columns: 1.5x the time of the fold of a 64 x 784 input).
constexpr int64_t kChunk = 16;

template <typename scalar_t, typename acc_t, int64_t W>
void chunk_moments(const scalar_t* __restrict x, int64_t rows, int64_t n, int64_t width,
                   double* __restrict mean, double* __restrict var) {
  const int64_t w = W > 0 ? W : width;
  double m[kChunk] = {}, v[kChunk] = {};
  acc_t centre[kChunk];
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    acc_t part[kChunk] = {};
    const int64_t r1 = std::min(rows, r0 + kBlock);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = x + r * n;
      for (int64_t j = 0; j < w; ++j) part[j] += static_cast<acc_t>(row[j]);
    }
    for (int64_t j = 0; j < w; ++j) m[j] += static_cast<double>(part[j]);
  }
  const double inv = 1.0 / static_cast<double>(rows);
  for (int64_t j = 0; j < w; ++j) m[j] *= inv, centre[j] = static_cast<acc_t>(m[j]);
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    acc_t part[kChunk] = {};
    const int64_t r1 = std::min(rows, r0 + kBlock);
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* row = x + r * n;
      for (int64_t j = 0; j < w; ++j) {
        const acc_t d = static_cast<acc_t>(row[j]) - centre[j];
        part[j] += d * d;
      }
    }
    for (int64_t j = 0; j < w; ++j) v[j] += static_cast<double>(part[j]);
  }
  // The squares were centred on the rounded mean c: add back (mean - c)^2 (exact in double).
  for (int64_t j = 0; j < w; ++j) {
    const double e = m[j] - static_cast<double>(centre[j]);
    mean[j] = m[j];
    var[j] = std::max(0.0, v[j] * inv - e * e);
  }
}

template <typename scalar_t>
void column_moments(const scalar_t* x, int64_t rows, int64_t n, double* mean, double* var) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  if (rows == 1) {  // batch size 1 (online BNP): the row is the mean, the variance is 0
    for (int64_t j = 0; j < n; ++j) mean[j] = static_cast<double>(x[j]), var[j] = 0.0;
    return;
  }
  at::parallel_for(0, n, std::max<int64_t>(1, kGrain / std::max<int64_t>(rows, 1)),
                   [&](int64_t begin, int64_t end) {
    // Full chunks, then one of 8 columns, then what is left.
    int64_t c0 = begin;
    const auto chunks = [&](auto width) {
      constexpr int64_t W = decltype(width)::value;
      for (; c0 + W <= end; c0 += W)
        chunk_moments<scalar_t, acc_t, W>(x + c0, rows, n, W, mean + c0, var + c0);
    };
    chunks(std::integral_constant<int64_t, kChunk>{});
    chunks(std::integral_constant<int64_t, 8>{});
    if (c0 < end) chunk_moments<scalar_t, acc_t, 0>(x + c0, rows, n, end - c0, mean + c0, var + c0);
  });
}

// sum_j a[j] * b[j] in kLanes independent partial sums of the input's dtype (so that it
// vectorizes; as BLAS's matrix-vector product accumulates), added up in double.
template <typename scalar_t>
double dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  constexpr int64_t kLanes = 16;
  scalar_t part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += a[j + l] * b[j + l];
  double acc = 0.0;
  for (; j < n; ++j) acc += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  for (int64_t l = 0; l < kLanes; ++l) acc += static_cast<double>(part[l]);
  return acc;
}

// The sizes of a fold's segments, checked; false (nothing computed) when a tensor is not one
// the kernel takes. Malformed arguments raise.
bool fold_sizes(const std::vector<std::optional<Tensor>>& xs,
                const std::vector<std::optional<Tensor>>& batch_means,
                const std::vector<std::optional<Tensor>>& batch_vars, const Tensor& mean,
                const Tensor& var, double rho, std::vector<int64_t>& sizes) {
  const at::ScalarType type = mean.scalar_type();
  const size_t segments = xs.size();
  TORCH_CHECK(batch_means.size() == segments && batch_vars.size() == segments,
              "bnp_fold: one input or one pair of batch moments per segment");
  TORCH_CHECK(rho > 0.0 && rho < 1.0, "bnp_fold: rho must be in (0, 1), got ", rho);
  if (!(type == at::kFloat || type == at::kDouble) || !takes(mean, type) || !takes(var, type))
    return false;
  TORCH_CHECK(mean.dim() == 1 && var.sizes() == mean.sizes(),
              "bnp_fold: mean and var must be 1-D of one size");
  sizes.assign(segments, 0);
  int64_t pos = 0;
  for (size_t i = 0; i < segments; ++i) {
    if (given(xs[i])) {
      // Inputs of the statistics' dtype, or float16/bfloat16 inputs of float32 statistics.
      const at::ScalarType xt = xs[i]->scalar_type();
      const bool half = type == at::kFloat && (xt == at::kHalf || xt == at::kBFloat16);
      if (!takes(xs[i], half ? xt : type)) return false;
      TORCH_CHECK(xs[i]->dim() == 2 && xs[i]->size(0) > 0,
                  "bnp_fold: inputs must be (rows > 0, n)");
      sizes[i] = xs[i]->size(1);
    } else {
      if (!takes(batch_means[i], type) || !takes(batch_vars[i], type)) return false;
      sizes[i] = batch_means[i]->numel();
      TORCH_CHECK(batch_vars[i]->numel() == sizes[i], "bnp_fold: batch moments' sizes differ");
    }
    pos += sizes[i];
  }
  TORCH_CHECK(pos == mean.numel(), "bnp_fold: the segments cover ", pos, " of ", mean.numel(),
              " statistics");
  return true;
}

// The fold of checked segments (fold_sizes) into new_mean/new_var: contiguous tensors of the
// statistics' size and dtype that overlap none of the arguments (the caller's to check).
void fold_into(const std::vector<std::optional<Tensor>>& xs,
               const std::vector<std::optional<Tensor>>& batch_means,
               const std::vector<std::optional<Tensor>>& batch_vars, const Tensor& mean,
               const Tensor& var, double rho, const std::vector<int64_t>& sizes,
               const Tensor& new_mean, const Tensor& new_var) {
  const at::ScalarType type = mean.scalar_type();
  const size_t segments = xs.size();
  const int64_t total = mean.numel();
  // The batch moments of every segment, concatenated, in double.
  std::vector<double> bm(static_cast<size_t>(total)), bv(static_cast<size_t>(total));
  int64_t pos = 0;
  for (size_t i = 0; i < segments; ++i) {
    const int64_t n = sizes[i];
    if (given(xs[i])) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs[i]->scalar_type(), "bnp_fold",
                                      [&] {
        column_moments(xs[i]->const_data_ptr<scalar_t>(), xs[i]->size(0), n, bm.data() + pos,
                       bv.data() + pos);
      });
      pos += n;
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES(type, "bnp_fold", [&] {
      const scalar_t* pm = batch_means[i]->const_data_ptr<scalar_t>();
      const scalar_t* pv = batch_vars[i]->const_data_ptr<scalar_t>();
      for (int64_t j = 0; j < n; ++j) {
        bm[pos + j] = static_cast<double>(pm[j]);
        bv[pos + j] = static_cast<double>(pv[j]);
      }
    });
    pos += n;
  }
  const double w = 1.0 - rho;
  AT_DISPATCH_FLOATING_TYPES(type, "bnp_fold", [&] {
    const scalar_t* m = mean.const_data_ptr<scalar_t>();
    const scalar_t* v = var.const_data_ptr<scalar_t>();
    scalar_t* nm = new_mean.mutable_data_ptr<scalar_t>();
    scalar_t* nv = new_var.mutable_data_ptr<scalar_t>();
    for (int64_t j = 0; j < total; ++j) {
      // A non-finite batch entry keeps the previous value (ema_update).
      if (!std::isfinite(bm[j]) || !std::isfinite(bv[j])) {
        nm[j] = m[j], nv[j] = v[j];
        continue;
      }
      const double d = bm[j] - static_cast<double>(m[j]);
      nm[j] = static_cast<scalar_t>(static_cast<double>(m[j]) + w * d);
      nv[j] = static_cast<scalar_t>(rho * static_cast<double>(v[j]) + w * bv[j] + rho * w * d * d);
    }
  });
}

// The fold of checked segments into new tensors: new flat (mean, var) and their views per
// segment.
std::vector<Tensor> fold_checked(const std::vector<std::optional<Tensor>>& xs,
                                 const std::vector<std::optional<Tensor>>& batch_means,
                                 const std::vector<std::optional<Tensor>>& batch_vars,
                                 const Tensor& mean, const Tensor& var, double rho,
                                 const std::vector<int64_t>& sizes) {
  const size_t segments = xs.size();
  Tensor new_mean = at::empty_like(mean), new_var = at::empty_like(var);
  fold_into(xs, batch_means, batch_vars, mean, var, rho, sizes, new_mean, new_var);
  // Each flat buffer's per-segment views come from one split (one dispatcher call for all of
  // them, rather than one narrow each: on small layers the calls are the cost).
  std::vector<Tensor> out{new_mean, new_var};
  out.reserve(2 + 2 * segments);
  for (const Tensor& flat : {new_mean, new_var}) {
    if (segments == 1) {
      out.push_back(flat.alias());
      continue;
    }
    for (Tensor& view : flat.split_with_sizes(sizes)) out.push_back(std::move(view));
  }
  return out;
}

// The shapes of a transform, checked: rows (C_out), fan-in and how many fan-in entries share one
// statistic (kh * kw for per-channel statistics of a convolution, else 1) per layer; false
// (nothing written) when a tensor is not one the kernel takes. Malformed arguments raise.
struct Transform {
  std::vector<int64_t> rows, fan_in, reps;
};

bool transform_shapes(const std::vector<Tensor>& grads_w,
                      const std::vector<std::optional<Tensor>>& grads_b,
                      const std::vector<Tensor>& means, const std::vector<Tensor>& vars,
                      Transform& shape) {
  const size_t layers = grads_w.size();
  TORCH_CHECK(grads_b.size() == layers && means.size() == layers && vars.size() == layers,
              "bnp_precondition: one bias gradient (or None), mean and var per weight gradient");
  shape.rows.assign(layers, 0);
  shape.fan_in.assign(layers, 0);
  shape.reps.assign(layers, 0);
  for (size_t i = 0; i < layers; ++i) {
    const Tensor& g = grads_w[i];
    const at::ScalarType type = g.scalar_type();
    if (!(type == at::kFloat || type == at::kDouble) || !takes(g, type) ||
        !takes(means[i], type) || !takes(vars[i], type) ||
        (given(grads_b[i]) && !takes(*grads_b[i], type)))
      return false;
    TORCH_CHECK(g.dim() >= 2 && g.size(0) > 0, "bnp_precondition: weight gradients are (C_out, ...)");
    shape.rows[i] = g.size(0);
    shape.fan_in[i] = g.numel() / shape.rows[i];
    const int64_t k = means[i].numel();
    TORCH_CHECK(k > 0 && vars[i].numel() == k && shape.fan_in[i] % k == 0,
                "bnp_precondition: statistics of ", k, " entries for a fan-in of ", shape.fan_in[i]);
    shape.reps[i] = shape.fan_in[i] / k;
    TORCH_CHECK(!given(grads_b[i]) || grads_b[i]->numel() == shape.rows[i],
                "bnp_precondition: bias gradient size");
  }
  return true;
}

// The transform of one layer's gradient in place: g (rows, K) row-major, b (rows) or null, the
// statistics pm/pv of K / rep entries (each repeated rep times along the fan-in).
template <typename scalar_t>
void transform_layer(scalar_t* g, scalar_t* b, const scalar_t* pm, const scalar_t* pv,
                     int64_t rows, int64_t K, int64_t rep, double eps, double floor) {
  // The statistics expanded to the fan-in: mu and s2 = max(var, floor) + eps.
  // The reciprocal 1 / s2: a multiplication vectorizes better than a division (the
  // result differs from dividing by at most one rounding).
  std::vector<scalar_t> mu(static_cast<size_t>(K)), inv(static_cast<size_t>(K));
  const scalar_t fl = static_cast<scalar_t>(floor), ep = static_cast<scalar_t>(eps);
  for (int64_t c = 0, j = 0; c < K / rep; ++c) {
    const scalar_t v = pv[c];
    const scalar_t r = scalar_t(1) / ((std::isnan(v) ? v : std::max(v, fl)) + ep);
    for (int64_t e = 0; e < rep; ++e, ++j) mu[j] = pm[c], inv[j] = r;
  }
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / K), [&](int64_t r0, int64_t r1) {
    for (int64_t o = r0; o < r1; ++o) {
      scalar_t* row = g + o * K;
      if (b == nullptr) {
        for (int64_t j = 0; j < K; ++j) row[j] *= inv[j];
        continue;
      }
      const scalar_t bo = b[o];
      for (int64_t j = 0; j < K; ++j) row[j] = (row[j] - bo * mu[j]) * inv[j];
      b[o] = static_cast<scalar_t>(static_cast<double>(bo) - dot(row, mu.data(), K));
    }
  });
}

// The transform of checked gradients (transform_shapes), in place.
void transform_checked(const std::vector<Tensor>& grads_w,
                       const std::vector<std::optional<Tensor>>& grads_b,
                       const std::vector<Tensor>& means, const std::vector<Tensor>& vars,
                       double eps, double floor, const Transform& shape) {
  for (size_t i = 0; i < grads_w.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES(grads_w[i].scalar_type(), "bnp_precondition", [&] {
      transform_layer(grads_w[i].mutable_data_ptr<scalar_t>(),
                      given(grads_b[i]) ? grads_b[i]->mutable_data_ptr<scalar_t>() : nullptr,
                      means[i].const_data_ptr<scalar_t>(), vars[i].const_data_ptr<scalar_t>(),
                      shape.rows[i], shape.fan_in[i], shape.reps[i], eps, floor);
    });
    mark_written(grads_w[i]);
    if (given(grads_b[i])) mark_written(*grads_b[i]);
  }
}

}  // namespace

std::vector<Tensor> bnp_fold(const std::vector<std::optional<Tensor>>& xs,
                             const std::vector<std::optional<Tensor>>& batch_means,
                             const std::vector<std::optional<Tensor>>& batch_vars,
                             const Tensor& mean, const Tensor& var, double rho) {
  std::vector<int64_t> sizes;
  if (!fold_sizes(xs, batch_means, batch_vars, mean, var, rho, sizes)) return {};
  return fold_checked(xs, batch_means, batch_vars, mean, var, rho, sizes);
}

bool bnp_precondition(const std::vector<Tensor>& grads_w,
                      const std::vector<std::optional<Tensor>>& grads_b,
                      const std::vector<Tensor>& means, const std::vector<Tensor>& vars,
                      double eps, double floor) {
  Transform shape;  // everything is checked before anything is written
  if (!transform_shapes(grads_w, grads_b, means, vars, shape)) return false;
  transform_checked(grads_w, grads_b, means, vars, eps, floor, shape);
  return true;
}

bool bnp_step(const std::vector<Tensor>& xs, const std::vector<Tensor>& grads_w,
              const std::vector<std::optional<Tensor>>& grads_b, const Tensor& mean,
              const Tensor& var, const Tensor& out_mean, const Tensor& out_var, double rho,
              double eps, double floor) {
  const size_t layers = xs.size();
  TORCH_CHECK(grads_w.size() == layers && grads_b.size() == layers,
              "bnp_step: one input, weight gradient and bias gradient (or None) per layer");
  const std::vector<std::optional<Tensor>> inputs(xs.begin(), xs.end()), none(layers);
  std::vector<int64_t> sizes;
  if (!fold_sizes(inputs, none, none, mean, var, rho, sizes)) return false;
  const at::ScalarType type = mean.scalar_type();
  if (!takes(out_mean, type) || !takes(out_var, type)) return false;
  TORCH_CHECK(out_mean.sizes() == mean.sizes() && out_var.sizes() == mean.sizes(),
              "bnp_step: out_mean and out_var must have the statistics' size");
  // Everything is checked before anything is written.
  for (const Tensor& in : {mean, var, out_var}) at::assert_no_overlap(out_mean, in);
  for (const Tensor& in : {mean, var}) at::assert_no_overlap(out_var, in);
  for (size_t i = 0; i < layers; ++i) {
    const Tensor& g = grads_w[i];
    if (!takes(g, type) || (given(grads_b[i]) && !takes(*grads_b[i], type))) return false;
    TORCH_CHECK(g.dim() == 2 && g.size(0) > 0 && g.size(1) == sizes[i],
                "bnp_step: weight gradient ", i, " must be (C_out > 0, ", sizes[i], "), got ",
                g.sizes());
    TORCH_CHECK(!given(grads_b[i]) || grads_b[i]->numel() == g.size(0),
                "bnp_step: bias gradient size");
  }
  fold_into(inputs, none, none, mean, var, rho, sizes, out_mean, out_var);
  mark_written(out_mean);
  mark_written(out_var);
  AT_DISPATCH_FLOATING_TYPES(type, "bnp_step", [&] {
    const scalar_t* pm = out_mean.const_data_ptr<scalar_t>();
    const scalar_t* pv = out_var.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < layers; ++i) {
      transform_layer(grads_w[i].mutable_data_ptr<scalar_t>(),
                      given(grads_b[i]) ? grads_b[i]->mutable_data_ptr<scalar_t>() : nullptr,
                      pm, pv, grads_w[i].size(0), sizes[i], 1, eps, floor);
      pm += sizes[i], pv += sizes[i];
    }
  });
  for (size_t i = 0; i < layers; ++i) {
    mark_written(grads_w[i]);
    if (given(grads_b[i])) mark_written(*grads_b[i]);
  }
  return true;
}

}  // namespace normlab
