// Fused CPU kernels of normlab's batch norm and Full Normalization (no autograd here).
// Inputs are (N, C, *) tensors in any strided layout (dense contiguous and channels_last are
// used in place; anything else is copied to contiguous). Per-channel arguments are (C,) tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace normlab {

// Estimator codes of Full Normalization's backward (the order of ESTIMATORS in full_norm.py).
enum Estimator : int64_t { kAdaptive = 0, kBatch = 1, kRunning = 2, kAutograd = 3, kNone = 4 };

// Training batch norm: {y, mean, var} (biased var; statistics dtype).
std::vector<at::Tensor> bn_train_forward(const at::Tensor& x, const std::optional<at::Tensor>& w,
                                         const std::optional<at::Tensor>& b, double eps);

// Per-channel statistics of x (N, C, *) only: {mean, var} (biased var; statistics dtype).
std::vector<at::Tensor> channel_statistics(const at::Tensor& x);

// {grad_x (undefined unless need_x), grad_w, grad_b (undefined unless need_wb)}.
std::vector<at::Tensor> bn_train_backward(const at::Tensor& gy, const at::Tensor& x,
                                          const std::optional<at::Tensor>& w,
                                          const at::Tensor& mean, const at::Tensor& var,
                                          double eps, bool need_x, bool need_wb);

// Fixed-statistics affine map: y = (x - mean) / sqrt(var + eps) * w + b, as x * scale + shift.
// coef receives a (3, C) float64 tensor {mean, invstd, scale} for the backward.
at::Tensor norm_eval_forward(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                             const std::optional<at::Tensor>& w,
                             const std::optional<at::Tensor>& b, double eps, at::Tensor* coef);

// {grad_x, grad_w, grad_b} of norm_eval_forward from its coef; x may be undefined if !need_wb.
std::vector<at::Tensor> norm_eval_backward(const at::Tensor& gy, const at::Tensor& x,
                                           const at::Tensor& coef,
                                           const std::optional<at::Tensor>& w, bool need_x,
                                           bool need_wb);

// Full Normalization training forward: {out, mean, var, rho} (updated estimates; rho is 1
// unless with_rho). With sample_norm, FN of each sample standardized over (C, *) first (eps
// as FN's; z not written), and a fifth tensor: the samples' (mean, 1/std), (2, N) float64.
std::vector<at::Tensor> fn_train_forward(const at::Tensor& x, const std::optional<at::Tensor>& w,
                                         const std::optional<at::Tensor>& b,
                                         const at::Tensor& hist_mean, const at::Tensor& hist_var,
                                         double alpha, double eps, bool with_rho,
                                         bool sample_norm);

// Full Normalization first-order backward; updates outer_state/outer_count in place for the
// stateful estimators (when given). {grad_x, grad_w, grad_b}. With zstats (the forward's fifth
// tensor), of the forward with sample_norm: grad_x through the standardization.
std::vector<at::Tensor> fn_train_backward(const at::Tensor& gy, const at::Tensor& x,
                                          const std::optional<at::Tensor>& w,
                                          const at::Tensor& mean, const at::Tensor& var,
                                          const at::Tensor& rho, double alpha, double eps,
                                          int64_t estimator, double momentum,
                                          const std::optional<at::Tensor>& outer_state,
                                          const std::optional<at::Tensor>& outer_count,
                                          bool need_x, bool need_wb,
                                          const std::optional<at::Tensor>& zstats);

// BNP (bnp.cpp). The EMA fold of one batch into running statistics stored flat (mean, var: 1-D,
// float32/float64): segment i is the (rows, n_i) input xs[i], whose per-column moments are
// computed here, or (xs[i] None) its precomputed batch moments. {new_mean, new_var, then the
// segments' views of new_mean, then of new_var}; empty (nothing computed) when a tensor is not
// a contiguous CPU tensor of the statistics' dtype (float32/float64; inputs may also be
// float16/bfloat16 with float32 statistics).
std::vector<at::Tensor> bnp_fold(const std::vector<std::optional<at::Tensor>>& xs,
                                 const std::vector<std::optional<at::Tensor>>& batch_means,
                                 const std::vector<std::optional<at::Tensor>>& batch_vars,
                                 const at::Tensor& mean, const at::Tensor& var, double rho);

// The BNP gradient transform (no weight normalization), in place, for several layers: weight
// gradient (C_out, K...) with statistics of K entries or of K / (kh * kw) channels. False
// (nothing written) when a tensor is not contiguous on the CPU in the gradient's dtype.
bool bnp_precondition(const std::vector<at::Tensor>& grads_w,
                      const std::vector<std::optional<at::Tensor>>& grads_b,
                      const std::vector<at::Tensor>& means, const std::vector<at::Tensor>& vars,
                      double eps, double floor);

// One BNP step of dense layers in one call: the fold of bnp_fold of the inputs xs[i] ((rows, n_i),
// no precomputed moments) written into out_mean/out_var (contiguous, the statistics' size and
// dtype, overlapping neither mean nor var), then bnp_precondition of the layers' gradients
// ((C_out, n_i)) with those new statistics. True; or false with nothing written (the gradients
// and out_mean/out_var as they were) when either kernel would decline. Allocates no tensor.
bool bnp_step(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& grads_w,
              const std::vector<std::optional<at::Tensor>>& grads_b, const at::Tensor& mean,
              const at::Tensor& var, const at::Tensor& out_mean, const at::Tensor& out_var,
              double rho, double eps, double floor);

// Per-channel tensors <-> double vectors (any floating dtype; writes cast to t's dtype).
std::vector<double> to_double(const at::Tensor& t);
void write_double(at::Tensor& t, const std::vector<double>& v);
// Bump t's version counter after writing it through its data pointer (as an in-place op does).
void mark_written(const at::Tensor& t);

}  // namespace normlab
