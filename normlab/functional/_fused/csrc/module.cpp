// Autograd nodes and Python bindings of normlab's fused CPU kernels (ops.h).
//
// Each training layer is a C++ autograd Function, so a forward + backward costs one node of the
// autograd graph and no Python frame. The backward runs the fused first-order kernel; when a
// graph of the backward itself is being recorded (create_graph=True) it calls the readable
// reference formulas instead (registered in normlab/functional/_fused/_graph.py by the
// reference modules), so double backward is exact.
#include <ATen/core/grad_mode.h>
#include <omp.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "engine.h"
#include "ops.h"

namespace py = pybind11;

namespace normlab {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool defined(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

std::optional<Tensor> opt(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

// Python arguments of the graph backward: an undefined tensor is None. Only called with the GIL.
py::object to_py(const Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }
py::object to_py(const std::optional<Tensor>& t) { return t.has_value() ? to_py(*t) : py::none(); }
template <typename T>
py::object to_py(const T& v) {
  return py::cast(v);
}

bool requires_grad(const std::optional<Tensor>& t) { return defined(t) && t->requires_grad(); }

// The graph-recording (create_graph) backward, in Python: the function registered under <name>
// in normlab.functional._fused._graph (a leaf module; the reference modules register them).
template <typename... Args>
variable_list graph_backward(const char* name, const Args&... args) {
  py::gil_scoped_acquire gil;  // every Python object lives inside this scope
  py::object fn = py::module_::import("normlab.functional._fused._graph").attr("backward")(name);
  py::tuple res = fn(to_py(args)...);
  variable_list out(res.size());
  for (size_t i = 0; i < res.size(); ++i)
    if (!res[i].is_none()) out[i] = res[i].cast<Tensor>();
  return out;
}

// Which forward arguments are autograd inputs (edges): x, then weight and bias when given.
struct Edges {
  int w = -1, b = -1;
  Edges(bool has_w, bool has_b) {
    int i = 1;
    if (has_w) w = i++;
    if (has_b) b = i++;
  }
};

bool needs(AutogradContext* ctx, int edge) { return edge >= 0 && ctx->needs_input_grad(edge); }

// ------------------------------------------------------------------------ batch norm (train)

struct BNTrain : public torch::autograd::Function<BNTrain> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const std::optional<Tensor>& w, const std::optional<Tensor>& b,
                               double eps) {
    variable_list out = bn_train_forward(x, w, b, eps);
    ctx->save_for_backward({x, w.value_or(Tensor()), out[1], out[2]});
    ctx->mark_non_differentiable({out[1], out[2]});
    ctx->set_materialize_grads(false);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_b"] = defined(b);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& gy = grads[0];
    if (!gy.defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    const Edges e(saved[1].defined(), ctx->saved_data["has_b"].toBool());
    const bool nx = needs(ctx, 0), nw = needs(ctx, e.w), nb = needs(ctx, e.b);
    variable_list r;
    if (at::GradMode::is_enabled()) {
      r = graph_backward("bn_train_backward", gy, saved[0], saved[1], eps);
    } else {
      r = bn_train_backward(gy, saved[0], opt(saved[1]), saved[2], saved[3], eps, nx, nw || nb);
    }
    return {nx ? r[0] : Tensor(), nw ? r[1] : Tensor(), nb ? r[2] : Tensor(), Tensor()};
  }
};

// ------------------------------------------------------------------------------------- eval

struct EvalArgs {  // not autograd inputs: the statistics are constants of the map
  Tensor mean, var;
  double eps;
  bool save_x;
};

struct NormEval : public torch::autograd::Function<NormEval> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const std::optional<Tensor>& w, const std::optional<Tensor>& b,
                               const EvalArgs& args) {
    Tensor coef;
    Tensor y = norm_eval_forward(x, args.mean, args.var, w, b, args.eps, &coef);
    ctx->save_for_backward({args.save_x ? x : Tensor(), w.value_or(Tensor())});
    ctx->saved_data["coef"] = coef;
    ctx->saved_data["has_b"] = defined(b);
    ctx->set_materialize_grads(false);
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& gy = grads[0];
    if (!gy.defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    const Tensor coef = ctx->saved_data["coef"].toTensor();
    const Edges e(saved[1].defined(), ctx->saved_data["has_b"].toBool());
    const bool nx = needs(ctx, 0), nw = needs(ctx, e.w), nb = needs(ctx, e.b);
    variable_list r;
    if (at::GradMode::is_enabled()) {
      r = graph_backward("norm_eval_backward", gy, saved[0], saved[1], coef);
    } else {
      r = norm_eval_backward(gy, saved[0], coef, opt(saved[1]), nx, (nw || nb) && saved[0].defined());
    }
    return {nx ? r[0] : Tensor(), nw ? r[1] : Tensor(), nb ? r[2] : Tensor(), Tensor()};
  }
};

// ------------------------------------------------------------------------ full normalization

struct FnArgs {  // not autograd inputs: the history and the live outer-factor state
  Tensor hist_mean, hist_var;
  std::optional<Tensor> outer_state, outer_count;
  double alpha, eps, momentum;
  int64_t estimator;
  bool with_rho;
  bool sample_norm;  // each sample standardized over (C, *) first
};

struct FNTrain : public torch::autograd::Function<FNTrain> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x,
                               const std::optional<Tensor>& w, const std::optional<Tensor>& b,
                               const FnArgs& a) {
    variable_list out = fn_train_forward(x, w, b, a.hist_mean, a.hist_var, a.alpha, a.eps,
                                         a.with_rho, a.sample_norm);
    ctx->save_for_backward({x, w.value_or(Tensor()), out[1], out[2], out[3]});
    if (a.sample_norm) {
      ctx->saved_data["zstats"] = out[4];  // the samples' (mean, 1/std): 2 N values
      out.pop_back();
    }
    ctx->mark_non_differentiable({out[1], out[2], out[3]});
    ctx->set_materialize_grads(false);
    auto& sd = ctx->saved_data;
    sd["alpha"] = a.alpha, sd["eps"] = a.eps, sd["momentum"] = a.momentum;
    sd["estimator"] = a.estimator;
    sd["has_b"] = defined(b);
    if (defined(a.outer_state)) sd["outer_state"] = *a.outer_state;
    if (defined(a.outer_count)) sd["outer_count"] = *a.outer_count;
    if (a.estimator == kAutograd) {
      // The history for the exact (create_graph) backward: copies, since the caller overwrites
      // its buffers with the updated estimates.
      sd["hist_mean"] = a.hist_mean.clone(), sd["hist_var"] = a.hist_var.clone();
    }
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor& gy = grads[0];
    if (!gy.defined()) return {Tensor(), Tensor(), Tensor(), Tensor()};
    const variable_list saved = ctx->get_saved_variables();
    auto& sd = ctx->saved_data;
    const Edges e(saved[1].defined(), sd["has_b"].toBool());
    const bool nx = needs(ctx, 0), nw = needs(ctx, e.w), nb = needs(ctx, e.b);
    const double alpha = sd["alpha"].toDouble(), eps = sd["eps"].toDouble();
    const double momentum = sd["momentum"].toDouble();
    const int64_t estimator = sd["estimator"].toInt();
    std::optional<Tensor> state, count;
    if (sd.count("outer_state")) state = sd["outer_state"].toTensor();
    if (sd.count("outer_count")) count = sd["outer_count"].toTensor();
    variable_list r;
    std::optional<Tensor> zstats;
    if (sd.count("zstats")) zstats = sd["zstats"].toTensor();
    if (at::GradMode::is_enabled()) {
      Tensor hm = sd.count("hist_mean") ? sd["hist_mean"].toTensor() : Tensor();
      Tensor hv = sd.count("hist_var") ? sd["hist_var"].toTensor() : Tensor();
      r = graph_backward("fn_train_backward", gy, saved[0], saved[1], saved[2], saved[3],
                         saved[4], hm, hv, alpha, eps, estimator, momentum, state, count,
                         zstats.has_value());
    } else {
      r = fn_train_backward(gy, saved[0], opt(saved[1]), saved[2], saved[3], saved[4], alpha, eps,
                            estimator, momentum, state, count, nx, nw || nb, zstats);
    }
    return {nx ? r[0] : Tensor(), nw ? r[1] : Tensor(), nb ? r[2] : Tensor(), Tensor()};
  }
};

bool recording(const Tensor& x, const std::optional<Tensor>& w, const std::optional<Tensor>& b) {
  return at::GradMode::is_enabled() && (x.requires_grad() || requires_grad(w) || requires_grad(b));
}

std::tuple<Tensor, Tensor, Tensor> bn_train(const Tensor& x, const std::optional<Tensor>& w,
                                            const std::optional<Tensor>& b, double eps) {
  const variable_list o =
      recording(x, w, b) ? BNTrain::apply(x, w, b, eps) : bn_train_forward(x, w, b, eps);
  return {o[0], o[1], o[2]};
}

Tensor norm_eval(const Tensor& x, const Tensor& mean, const Tensor& var,
                 const std::optional<Tensor>& w, const std::optional<Tensor>& b, double eps) {
  if (!recording(x, w, b)) return norm_eval_forward(x, mean, var, w, b, eps, nullptr);
  return NormEval::apply(x, w, b, EvalArgs{mean, var, eps, requires_grad(w)})[0];
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fn_train(
    const Tensor& x, const std::optional<Tensor>& w, const std::optional<Tensor>& b,
    const Tensor& hist_mean, const Tensor& hist_var, const std::optional<Tensor>& outer_state,
    const std::optional<Tensor>& outer_count, double alpha, double eps, int64_t estimator,
    double momentum, bool with_rho, bool sample_norm) {
  variable_list o;
  if (recording(x, w, b)) {
    o = FNTrain::apply(x, w, b,
                       FnArgs{hist_mean, hist_var, outer_state, outer_count, alpha, eps, momentum,
                              estimator, with_rho, sample_norm});
  } else {
    o = fn_train_forward(x, w, b, hist_mean, hist_var, alpha, eps, with_rho, sample_norm);
  }
  return {o[0], o[1], o[2], o[3]};
}

// Module steps: the training forward plus the running-statistics update of the layer's buffers,
// in one call (the update is a few loops over C values here, against a handful of tensor ops
// per step in Python). The buffers are written only when every statistic is finite; the module
// applies its non-finite policy when the returned flag is false.

bool all_finite(const Tensor& t) {
  const std::vector<double> v = to_double(t);
  for (double e : v)
    if (!std::isfinite(e)) return false;
  return true;
}

// torch's lerp: self + w (end - self), from the other end for w >= 0.5.
inline double lerp(double self, double end, double w) {
  return w < 0.5 ? self + w * (end - self) : end - (end - self) * (1.0 - w);
}

std::tuple<Tensor, Tensor, bool> bn_train_module(
    const Tensor& x, const std::optional<Tensor>& w, const std::optional<Tensor>& b, double eps,
    Tensor running_mean, Tensor running_var, Tensor tracked, double momentum) {
  const auto [y, mean, var] = bn_train(x, w, b, eps);
  if (!all_finite(var)) return {y, var, false};
  const double count = static_cast<double>(x.numel() / x.size(1));
  int64_t* n = tracked.mutable_data_ptr<int64_t>();
  *n += 1;
  mark_written(tracked);
  // momentum < 0: None, the cumulative average.
  const double factor = momentum >= 0 ? momentum : 1.0 / static_cast<double>(*n);
  const std::vector<double> m = to_double(mean), v = to_double(var);
  std::vector<double> rm = to_double(running_mean), rv = to_double(running_var);
  for (size_t c = 0; c < m.size(); ++c) {
    rm[c] = lerp(rm[c], m[c], factor);
    rv[c] = lerp(rv[c], v[c] * (count / (count - 1.0)), factor);
  }
  write_double(running_mean, rm);
  write_double(running_var, rv);
  return {y, var, true};
}

std::tuple<Tensor, Tensor, Tensor, bool> fn_train_module(
    const Tensor& x, const std::optional<Tensor>& w, const std::optional<Tensor>& b,
    Tensor running_mean, Tensor running_var, const std::optional<Tensor>& outer_state,
    const std::optional<Tensor>& outer_count, double alpha, double eps, int64_t estimator,
    double momentum, bool with_rho, Tensor tracked, bool sample_norm) {
  const auto [out, mean, var, rho] = fn_train(x, w, b, running_mean, running_var, outer_state,
                                              outer_count, alpha, eps, estimator, momentum,
                                              with_rho, sample_norm);
  (void)rho;
  if (!all_finite(mean) || !all_finite(var)) return {out, mean, var, false};
  write_double(running_mean, to_double(mean));
  write_double(running_var, to_double(var));
  *tracked.mutable_data_ptr<int64_t>() += 1;
  mark_written(tracked);
  return {out, mean, var, true};
}

}  // namespace
}  // namespace normlab

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "normlab's fused CPU kernels (batch norm, Full Normalization); see docs/performance.md";
  using py::arg;
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("bn_train", &normlab::bn_train, arg("x"), arg("weight"), arg("bias"), arg("eps"), nogil);
  m.def("norm_eval", &normlab::norm_eval, arg("x"), arg("mean"), arg("var"), arg("weight"),
        arg("bias"), arg("eps"), nogil);
  m.def("fn_train", &normlab::fn_train, arg("x"), arg("weight"), arg("bias"), arg("hist_mean"),
        arg("hist_var"), arg("outer_state"), arg("outer_count"), arg("alpha"), arg("eps"),
        arg("estimator"), arg("momentum"), arg("with_rho"), arg("sample_norm") = false, nogil);
  m.def("bn_train_module", &normlab::bn_train_module, nogil);
  m.def("fn_train_module", &normlab::fn_train_module, nogil);
  // Raw kernels, without autograd (for tests and benchmarks).
  m.def("bn_train_forward", &normlab::bn_train_forward, nogil);
  m.def("bn_train_backward", &normlab::bn_train_backward, nogil);
  m.def("fn_train_backward", &normlab::fn_train_backward, nogil);
  m.def("channel_statistics", &normlab::channel_statistics, arg("x"), nogil);
  m.def("bnp_fold", &normlab::bnp_fold, arg("xs"), arg("batch_means"), arg("batch_vars"),
        arg("mean"), arg("var"), arg("rho"), nogil);
  m.def("bnp_precondition", &normlab::bnp_precondition, arg("grads_w"), arg("grads_b"),
        arg("means"), arg("vars"), arg("eps"), arg("floor"), nogil);
  m.def("bnp_step", &normlab::bnp_step, arg("xs"), arg("grads_w"), arg("grads_b"), arg("mean"),
        arg("var"), arg("out_mean"), arg("out_var"), arg("rho"), arg("eps"), arg("floor"), nogil);
  m.def("max_threads", [] { return omp_get_max_threads(); });
  // Tuning knob for benchmarks: the rows layout splits columns between threads from this many
  // columns per thread (see engine.h); returns the previous value.
  m.def("set_columns_per_thread", [](int64_t n) {
    const int64_t old = normlab::columns_per_thread();
    normlab::columns_per_thread() = n;
    return old;
  });
}
