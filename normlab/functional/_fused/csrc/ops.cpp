// Fused CPU kernels of normlab's batch norm and Full Normalization: the per-channel arithmetic
// (the formulas of normlab/functional/batch_norm.py and full_norm.py) around the two-phase
// engine of engine.h.
#include "ops.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/MemoryFormat.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

#include "engine.h"

namespace normlab {
namespace {

using at::Tensor;

// The layout the engine reads x in, and x itself (or a contiguous copy when it is neither
// contiguous nor channels_last).
struct Dense {
  Tensor t;
  Geometry g;
  c10::MemoryFormat fmt = c10::MemoryFormat::Contiguous;
};

Dense dense(const Tensor& x) {
  Dense d;
  const int64_t N = x.size(0), C = x.size(1);
  d.g.N = N, d.g.C = C;
  d.g.S = (N * C) == 0 ? 0 : x.numel() / (N * C);
  if (x.is_contiguous()) {
    d.t = x, d.g.rows = d.g.S == 1;
    return d;
  }
  if (x.dim() == 4 && x.is_contiguous(c10::MemoryFormat::ChannelsLast)) {
    d.t = x, d.g.rows = true, d.fmt = c10::MemoryFormat::ChannelsLast;
    return d;
  }
  if (x.dim() == 5 && x.is_contiguous(c10::MemoryFormat::ChannelsLast3d)) {
    d.t = x, d.g.rows = true, d.fmt = c10::MemoryFormat::ChannelsLast3d;
    return d;
  }
  d.t = x.contiguous(), d.g.rows = d.g.S == 1;
  return d;
}

// t in the memory format of d (a no-op when it already is).
Tensor like(const Tensor& t, const Dense& d) {
  return t.is_contiguous(d.fmt) ? t : t.contiguous(d.fmt);
}

at::ScalarType stat_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

std::vector<double> to_vec(const Tensor& t) {
  const Tensor c = t.contiguous();
  std::vector<double> v(static_cast<size_t>(c.numel()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "to_vec", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<double>(p[i]);
  });
  return v;
}

std::vector<double> opt_vec(const std::optional<Tensor>& t, int64_t C, double fill) {
  if (t.has_value() && t->defined()) return to_vec(*t);
  return std::vector<double>(static_cast<size_t>(C), fill);
}

Tensor from_vec(const double* v, at::IntArrayRef shape, at::ScalarType type) {
  Tensor out = at::empty(shape, at::TensorOptions().dtype(type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "from_vec", [&] {
    scalar_t* p = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < out.numel(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  return out;
}

void write_vec(Tensor& t, const double* v) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "write_vec", [&] {
    scalar_t* p = t.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.numel(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
}

at::ScalarType param_type(const std::optional<Tensor>& w, at::ScalarType fallback) {
  return (w.has_value() && w->defined()) ? w->scalar_type() : fallback;
}

bool has(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

inline double clip_to(double v, double bound) {
  const double b = std::fabs(bound);
  if (std::isnan(v) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  return std::max(std::min(v, b), -b);
}

}  // namespace

std::vector<double> to_double(const Tensor& t) { return to_vec(t); }

void mark_written(const Tensor& t) {
  // What an in-place op does: autograd then refuses a graph that saved the old values.
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

void write_double(Tensor& t, const std::vector<double>& v) {
  TORCH_CHECK(static_cast<int64_t>(v.size()) == t.numel(), "write_double: size mismatch");
  if (t.is_contiguous()) {
    write_vec(t, v.data());
    mark_written(t);
  } else {
    t.copy_(from_vec(v.data(), t.sizes(), t.scalar_type()));
  }
}

// --------------------------------------------------------------------------------- batch norm

std::vector<Tensor> bn_train_forward(const Tensor& x, const std::optional<Tensor>& w,
                                     const std::optional<Tensor>& b, double eps) {
  const Dense d = dense(x);
  const int64_t C = d.g.C;
  const std::vector<double> wv = opt_vec(w, C, 1.0), bv = opt_vec(b, C, 0.0);
  std::vector<double> mean(C), var(C);
  Tensor y = at::empty_like(d.t, d.t.options(), d.fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_train_forward", [&] {
    stats_apply<scalar_t>(d.t.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), d.g,
                          mean.data(), var.data(), nullptr, [&](int64_t c, double m, double v) {
                            const double scale = wv[c] / std::sqrt(v + eps);
                            return FwdCoef{m, scale, bv[c]};
                          });
  });
  const at::ScalarType st = stat_type(x.scalar_type());
  return {y, from_vec(mean.data(), {C}, st), from_vec(var.data(), {C}, st)};
}

std::vector<Tensor> channel_statistics(const Tensor& x) {
  const Dense d = dense(x);
  const int64_t C = d.g.C;
  std::vector<double> mean(C), var(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_statistics", [&] {
    stats_apply<scalar_t>(d.t.const_data_ptr<scalar_t>(), nullptr, d.g, mean.data(), var.data(),
                          nullptr, [](int64_t, double, double) { return FwdCoef{}; });
  });
  const at::ScalarType st = stat_type(x.scalar_type());
  return {from_vec(mean.data(), {C}, st), from_vec(var.data(), {C}, st)};
}

std::vector<Tensor> bn_train_backward(const Tensor& gy, const Tensor& x,
                                      const std::optional<Tensor>& w, const Tensor& mean,
                                      const Tensor& var, double eps, bool need_x, bool need_wb) {
  const Dense d = dense(x);
  const Tensor g = like(gy, d);
  const int64_t C = d.g.C;
  const double M = static_cast<double>(d.g.count());
  const std::vector<double> wv = opt_vec(w, C, 1.0), mv = to_vec(mean), vv = to_vec(var);
  std::vector<double> sg(C), sgx(C), invstd(C);
  for (int64_t c = 0; c < C; ++c) invstd[c] = 1.0 / std::sqrt(vv[c] + eps);
  Tensor gx;
  if (need_x) gx = at::empty_like(d.t, d.t.options(), d.fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_train_backward", [&] {
    sums_apply<scalar_t>(
        g.const_data_ptr<scalar_t>(), d.t.const_data_ptr<scalar_t>(),
        need_x ? gx.mutable_data_ptr<scalar_t>() : nullptr, d.g, mv.data(), sg.data(), sgx.data(),
        false, [&](int64_t c, double s_g, double s_gx) {
          // grad_x = a * (g - mean(g) - xhat * mean(g * xhat)) = a * g + b * (x - mu) + k
          const double is = invstd[c], a = wv[c] * is;
          return BwdCoef{a, -a * is * is * s_gx / M, -a * s_g / M};
        });
  });
  Tensor gw, gb;
  if (need_wb) {
    std::vector<double> sgxhat(C);
    for (int64_t c = 0; c < C; ++c) sgxhat[c] = sgx[c] * invstd[c];
    const at::ScalarType pt = param_type(w, stat_type(x.scalar_type()));
    gw = from_vec(sgxhat.data(), {C}, pt);
    gb = from_vec(sg.data(), {C}, pt);
  }
  return {gx, gw, gb};
}

// ------------------------------------------------------------------------------------- eval

Tensor norm_eval_forward(const Tensor& x, const Tensor& mean, const Tensor& var,
                         const std::optional<Tensor>& w, const std::optional<Tensor>& b,
                         double eps, Tensor* coef) {
  const Dense d = dense(x);
  const int64_t C = d.g.C;
  const std::vector<double> wv = opt_vec(w, C, 1.0), bv = opt_vec(b, C, 0.0);
  const std::vector<double> mv = to_vec(mean), vv = to_vec(var);
  std::vector<FwdCoef> coefs(C);
  std::vector<double> saved(coef ? 3 * C : 0);
  for (int64_t c = 0; c < C; ++c) {
    const double is = 1.0 / std::sqrt(vv[c] + eps), scale = is * wv[c];
    coefs[c] = FwdCoef{0.0, scale, bv[c] - mv[c] * scale};
    if (coef) saved[c] = mv[c], saved[C + c] = is, saved[2 * C + c] = scale;
  }
  Tensor y = at::empty_like(d.t, d.t.options(), d.fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_eval_forward", [&] {
    apply_only<scalar_t>(d.t.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), d.g,
                         coefs.data());
  });
  if (coef) *coef = from_vec(saved.data(), {3, C}, at::kDouble);
  return y;
}

std::vector<Tensor> norm_eval_backward(const Tensor& gy, const Tensor& x, const Tensor& coef,
                                       const std::optional<Tensor>& w, bool need_x,
                                       bool need_wb) {
  const int64_t C = coef.size(1);
  const double* cf = coef.const_data_ptr<double>();  // {mean, invstd, scale}
  Tensor gx, gw, gb;
  if (!need_wb) {  // grad_x = g * scale: no statistics needed
    const Dense d = dense(gy);
    std::vector<FwdCoef> coefs(C);
    for (int64_t c = 0; c < C; ++c) coefs[c] = FwdCoef{0.0, cf[2 * C + c], 0.0};
    gx = at::empty_like(d.t, d.t.options(), d.fmt);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gy.scalar_type(), "norm_eval_backward", [&] {
      apply_only<scalar_t>(d.t.const_data_ptr<scalar_t>(), gx.mutable_data_ptr<scalar_t>(), d.g,
                           coefs.data());
    });
    return {gx, gw, gb};
  }
  const Dense d = dense(x);
  const Tensor g = like(gy, d);
  std::vector<double> sg(C), sgx(C);
  if (need_x) gx = at::empty_like(d.t, d.t.options(), d.fmt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_eval_backward", [&] {
    sums_apply<scalar_t>(g.const_data_ptr<scalar_t>(), d.t.const_data_ptr<scalar_t>(),
                         need_x ? gx.mutable_data_ptr<scalar_t>() : nullptr, d.g, cf, sg.data(),
                         sgx.data(), true,
                         [&](int64_t c, double, double) { return BwdCoef{cf[2 * C + c], 0.0, 0.0}; });
  });
  for (int64_t c = 0; c < C; ++c) sgx[c] *= cf[C + c];
  const at::ScalarType pt = param_type(w, stat_type(x.scalar_type()));
  gw = from_vec(sgx.data(), {C}, pt);
  gb = from_vec(sg.data(), {C}, pt);
  return {gx, gw, gb};
}

// ------------------------------------------------------------------------ full normalization

std::vector<Tensor> fn_train_forward(const Tensor& x, const std::optional<Tensor>& w,
                                     const std::optional<Tensor>& b, const Tensor& hist_mean,
                                     const Tensor& hist_var, double alpha, double eps,
                                     bool with_rho, bool sample_norm) {
  const Dense d = dense(x);
  const int64_t N = d.g.N, C = d.g.C, S = d.g.S;
  const int64_t M = d.g.count();
  const std::vector<double> wv = opt_vec(w, C, 1.0), bv = opt_vec(b, C, 0.0);
  const std::vector<double> hm = to_vec(hist_mean), hv = to_vec(hist_var);
  std::vector<double> bmean(C), bvar(C), mean(C), var(C);
  const bool planes_needed = with_rho && N >= 2 && S > 1;
  std::vector<double> pmean(planes_needed ? N * C : 0);
  const bool keep_prior = M == 1 && alpha >= 1.0;
  Tensor y = at::empty_like(d.t, d.t.options(), d.fmt);
  std::vector<double> zs(sample_norm ? 2 * N : 0);  // the samples' mean and 1/std
  const auto update = [&](int64_t c, double bm, double bvr) {
    // The estimates' update (full_norm_update), then the affine map of the new ones.
    const double dlt = bm - hm[c];
    const double m = hm[c] + alpha * dlt;
    const double v = keep_prior
                         ? hv[c]
                         : (1.0 - alpha) * hv[c] + alpha * bvr + alpha * (1.0 - alpha) * dlt * dlt;
    mean[c] = m, var[c] = v;
    const double scale = wv[c] / std::sqrt(v + eps);
    return FwdCoef{0.0, scale, bv[c] - m * scale};
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fn_train_forward", [&] {
    const scalar_t* xp = d.t.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    if (sample_norm) {
      sample_stats_apply<scalar_t>(xp, yp, d.g, eps, zs.data(), zs.data() + N, bmean.data(),
                                   bvar.data(), planes_needed ? pmean.data() : nullptr, update);
      return;
    }
    stats_apply<scalar_t>(xp, yp, d.g, bmean.data(), bvar.data(),
                          (planes_needed && !d.g.rows) ? pmean.data() : nullptr, update);
    if (planes_needed && d.g.rows) sample_means_rows<scalar_t>(xp, d.g, pmean.data());
  });
  double rho = 1.0;
  if (with_rho && N >= 2) {
    // batch_representativeness: T = N sum_c w_c (m_c - mu_c)^2 / sum_c w_c s_c^2, rho = min(1, 1/T)
    double num = 0, den = 0;
    for (int64_t c = 0; c < C; ++c) {
      double m, s2;
      if (S == 1) {
        m = bmean[c];
        s2 = bvar[c] * static_cast<double>(N) / static_cast<double>(N - 1);
      } else {
        double s = 0;
        for (int64_t n = 0; n < N; ++n) s += pmean[n * C + c];
        m = s / static_cast<double>(N);
        double q = 0;
        for (int64_t n = 0; n < N; ++n) {
          const double e = pmean[n * C + c] - m;
          q += e * e;
        }
        s2 = q / static_cast<double>(N - 1);
      }
      const double wc = 1.0 / (hv[c] + eps), dm = m - hm[c];
      num += wc * dm * dm;
      den += wc * s2;
    }
    num *= static_cast<double>(N);
    rho = num > den ? den / std::max(num, std::numeric_limits<double>::min()) : 1.0;
  }
  const at::ScalarType st = stat_type(x.scalar_type());
  std::vector<Tensor> out{y, from_vec(mean.data(), {C}, st), from_vec(var.data(), {C}, st),
                          from_vec(&rho, {}, st)};
  if (sample_norm) out.push_back(from_vec(zs.data(), {2, N}, at::kDouble));
  return out;
}

std::vector<Tensor> fn_train_backward(const Tensor& gy, const Tensor& x,
                                      const std::optional<Tensor>& w, const Tensor& mean,
                                      const Tensor& var, const Tensor& rho_t, double alpha,
                                      double eps, int64_t estimator, double momentum,
                                      const std::optional<Tensor>& outer_state,
                                      const std::optional<Tensor>& outer_count, bool need_x,
                                      bool need_wb, const std::optional<Tensor>& zstats) {
  const Dense d = dense(x);
  const Tensor g = like(gy, d);
  const int64_t C = d.g.C;
  const double M = static_cast<double>(d.g.count());
  const double samples = static_cast<double>(d.g.N);
  const std::vector<double> wv = opt_vec(w, C, 1.0), mv = to_vec(mean), vv = to_vec(var);
  const double rho = to_vec(rho_t)[0];
  const bool stateful = (estimator == kAdaptive || estimator == kRunning) && has(outer_state) &&
                        has(outer_count);
  int64_t step = 0;
  std::vector<double> state;
  if (stateful) {
    TORCH_CHECK(outer_count->scalar_type() == at::kLong, "outer_count must be int64");
    step = *outer_count->const_data_ptr<int64_t>();
    state = to_vec(*outer_state);  // (2, C): the running factor from earlier batches
  }
  const bool has_running = stateful && step > 0;
  double lam_b = 1.0, lam_r = 0.0;
  if (estimator == kRunning) {
    lam_b = alpha, lam_r = 1.0 - alpha;
  } else if (estimator == kAdaptive) {
    lam_b = alpha + (1.0 - alpha) * rho * (1.0 - 1.0 / samples);
    lam_r = (1.0 - alpha) * rho / samples;
  }
  std::vector<double> invstd(C), sg(C), sgx(C), fu(C), fv(C);
  for (int64_t c = 0; c < C; ++c) invstd[c] = 1.0 / std::sqrt(vv[c] + eps);
  Tensor gx;
  if (need_x) gx = at::empty_like(d.t, d.t.options(), d.fmt);
  const auto coef = [&](int64_t c, double s_g, double s_gx) {
    // The batch's own outer factor (mean g, mean g y), then the estimator's correction.
    const double is = invstd[c];
    const double u = s_g / M, v = s_gx * is / M;
    double cu = 0, cv = 0;
    switch (estimator) {
      case kBatch:
        cu = u, cv = v;
        break;
      case kAutograd:
        cu = alpha * u, cv = alpha * v;
        break;
      case kNone:
        break;
      default: {  // running, adaptive: the running factor clipped to |b|
        const double hu = has_running ? state[c] : u, hv = has_running ? state[C + c] : v;
        cu = lam_b * u + lam_r * clip_to(hu, u);
        cv = lam_b * v + lam_r * clip_to(hv, v);
      }
    }
    const double a = wv[c] * is;
    return BwdCoef{a, -a * cv * is, -a * cu};
  };
  const std::vector<double> zs = has(zstats) ? to_vec(*zstats) : std::vector<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fn_train_backward", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = d.t.const_data_ptr<scalar_t>();
    scalar_t* op = need_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    if (has(zstats)) {
      const int64_t N = d.g.N;
      sample_sums_apply<scalar_t>(gp, xp, op, d.g, mv.data(), zs.data(), zs.data() + N,
                                  sg.data(), sgx.data(), coef);
    } else {
      sums_apply<scalar_t>(gp, xp, op, d.g, mv.data(), sg.data(), sgx.data(), false, coef);
    }
  });
  for (int64_t c = 0; c < C; ++c) fu[c] = sg[c] / M, fv[c] = sgx[c] * invstd[c] / M;
  if (stateful) {
    // running_outer_update, skipped (count included) when any value is not finite.
    const double beta = std::min(1.0, std::max(momentum, 1.0 / static_cast<double>(step + 1)));
    std::vector<double> upd(2 * C);
    for (int64_t c = 0; c < C; ++c) {
      upd[c] = state[c] + beta * (fu[c] - state[c]);
      upd[C + c] = state[C + c] + beta * (fv[c] - state[C + c]);
    }
    Tensor st = *outer_state;
    bool ok = true;  // finite once stored in the state's dtype
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st.scalar_type(), "fn_state", [&] {
      for (double u : upd) ok = ok && std::isfinite(static_cast<double>(static_cast<scalar_t>(u)));
    });
    if (ok) {
      write_double(st, upd);
      *outer_count->mutable_data_ptr<int64_t>() += 1;
      mark_written(*outer_count);
    }
  }
  Tensor gw, gb;
  if (need_wb) {
    std::vector<double> gwv(C);
    for (int64_t c = 0; c < C; ++c) gwv[c] = fv[c] * M;
    std::vector<double> gbv(C);
    for (int64_t c = 0; c < C; ++c) gbv[c] = fu[c] * M;
    const at::ScalarType pt = param_type(w, stat_type(x.scalar_type()));
    gw = from_vec(gwv.data(), {C}, pt);
    gb = from_vec(gbv.data(), {C}, pt);
  }
  return {gx, gw, gb};
}

}  // namespace normlab
