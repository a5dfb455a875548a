// RMSNorm forward and backward on the CPU: the "cpu" backend of fk.rms_norm.
//
// Same semantics as flagdit_kernels/reference/norms.py and csrc/rms_norm_cuda.cu: the mean square and rstd in
// the op-math type (fp32, fp64 for fp64 inputs), x * rstd rounded to x's dtype, times the weight, rounded
// again; the backward passes the roundings straight. Rows are split across threads; within a row the loops
// are plain contiguous loops the compiler vectorizes. The weight gradient is summed per chunk of rows into
// (chunks, D) partials and finished by one sum, so results do not depend on the thread count's scheduling.
//
// The CPU implementations of flagdit_kernels::rms_norm_fwd / rms_norm_bwd (schemas in csrc/bindings.cpp; the
// CUDA ones are csrc/rms_norm_cuda.cu; fake impls and autograd live in flagdit_kernels/ops/norms.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "rms_norm_checks.h"

namespace flagdit {
namespace {

// Rows per parallel task: enough elements per task (~32K) to amortize the scheduling.
int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1)); }

// x as (rows, D) with a unit-stride last dim; the leading dims are read in place when they merge.
at::Tensor as_rows(const at::Tensor& x) {
  at::Tensor rows = x.reshape({-1, x.size(-1)});
  return rows.stride(1) == 1 ? rows : rows.contiguous();
}

// Sum of term(j) over a row with kLanes independent partial sums, so the compiler can vectorize the reduction
// without reassociating one serial sum (which -O3 alone does not do for floats).
constexpr int64_t kLanes = 16;

template <typename acc_t, typename Term>
acc_t row_sum(int64_t d, Term term) {
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += term(j + l);
  }
  acc_t total = 0;
  for (; j < d; ++j) total += term(j);
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

template <typename scalar_t, bool kHasWeight>
void rms_norm_rows(const scalar_t* xp, int64_t stride, const at::opmath_type<scalar_t>* wp, scalar_t* yp,
                   at::opmath_type<scalar_t>* rp, int64_t n, int64_t d, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, n, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = xp + r * stride;
      scalar_t* yr = yp + r * d;
      const acc_t ss = row_sum<acc_t>(d, [&](int64_t j) {
        const acc_t v = static_cast<acc_t>(xr[j]);
        return v * v;
      });
      const acc_t inv = acc_t(1) / std::sqrt(ss / static_cast<acc_t>(d) + static_cast<acc_t>(eps));
      rp[r] = inv;
      for (int64_t j = 0; j < d; ++j) {
        const scalar_t normed = static_cast<scalar_t>(static_cast<acc_t>(xr[j]) * inv);
        yr[j] = kHasWeight ? static_cast<scalar_t>(static_cast<acc_t>(normed) * wp[j]) : normed;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                    double eps) {
  check_rms_norm_fwd_args("rms_norm_cpu_fwd", x, weight, eps, at::kCPU);
  const at::Tensor rows = as_rows(x);
  const int64_t n = rows.size(0), d = rows.size(1);
  at::Tensor y = at::empty({n, d}, x.options());
  const auto opmath = at::toOpMathType(x.scalar_type());
  at::Tensor rstd = at::empty({n}, x.options().dtype(opmath));
  const bool has_weight = weight.has_value() && weight->defined();
  const at::Tensor w = has_weight ? weight->to(opmath).contiguous() : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_cpu_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = rows.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* rp = rstd.data_ptr<acc_t>();
    if (has_weight) {
      rms_norm_rows<scalar_t, true>(xp, rows.stride(0), w.data_ptr<acc_t>(), yp, rp, n, d, eps);
    } else {
      rms_norm_rows<scalar_t, false>(xp, rows.stride(0), nullptr, yp, rp, n, d, eps);
    }
  });
  return {y.view(x.sizes()), rstd};
}

// One chunk of rows of the backward: dx = rstd * (g - n * mean(g * n)) with g = dy * w and n = x * rstd, and
// (with a weight) dw[chunk] += dy * n.
template <typename scalar_t, bool kHasWeight>
void rms_norm_backward_rows(const scalar_t* xr, const scalar_t* gr, const at::opmath_type<scalar_t>* wp,
                            at::opmath_type<scalar_t> inv, scalar_t* dxr, at::opmath_type<scalar_t>* dw, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t dot = row_sum<acc_t>(d, [&](int64_t j) {
    const acc_t g = kHasWeight ? static_cast<acc_t>(gr[j]) * wp[j] : static_cast<acc_t>(gr[j]);
    return g * static_cast<acc_t>(xr[j]);
  });
  const acc_t mean_gn = dot * inv / static_cast<acc_t>(d);
  for (int64_t j = 0; j < d; ++j) {
    const acc_t normed = static_cast<acc_t>(xr[j]) * inv;
    const acc_t g = kHasWeight ? static_cast<acc_t>(gr[j]) * wp[j] : static_cast<acc_t>(gr[j]);
    dxr[j] = static_cast<scalar_t>(inv * (g - normed * mean_gn));
  }
  if constexpr (kHasWeight) {
    for (int64_t j = 0; j < d; ++j) dw[j] += static_cast<acc_t>(gr[j]) * static_cast<acc_t>(xr[j]) * inv;
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cpu_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                    const std::optional<at::Tensor>& weight, const at::Tensor& rstd) {
  check_rms_norm_bwd_args("rms_norm_cpu_bwd", dy, x, weight, rstd, at::kCPU);
  const at::Tensor rows = as_rows(x);
  const at::Tensor grad_rows = as_rows(dy.to(x.scalar_type()));
  const int64_t n = rows.size(0), d = rows.size(1);
  at::Tensor dx = at::empty({n, d}, x.options());
  const auto opmath = at::toOpMathType(x.scalar_type());
  const bool has_weight = weight.has_value() && weight->defined();
  const at::Tensor w = has_weight ? weight->to(opmath).contiguous() : at::Tensor();
  // Chunks of rows, each summing its weight gradient into its own partial row.
  const int64_t chunks = std::min<int64_t>(std::max<int64_t>(n, 1), 4 * at::get_num_threads());
  const int64_t rows_per_chunk = (n + chunks - 1) / chunks;
  at::Tensor partial = has_weight ? at::zeros({chunks, d}, x.options().dtype(opmath)) : at::Tensor();
  const at::Tensor inv_rms = rstd.to(opmath).contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_cpu_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = rows.data_ptr<scalar_t>();
    const scalar_t* gp = grad_rows.data_ptr<scalar_t>();
    const acc_t* wp = has_weight ? w.data_ptr<acc_t>() : nullptr;
    const acc_t* rp = inv_rms.data_ptr<acc_t>();
    acc_t* pp = has_weight ? partial.data_ptr<acc_t>() : nullptr;
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const int64_t xs = rows.stride(0), gs = grad_rows.stride(0);
    at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        for (int64_t r = c * rows_per_chunk; r < std::min(n, (c + 1) * rows_per_chunk); ++r) {
          if (has_weight) {
            rms_norm_backward_rows<scalar_t, true>(xp + r * xs, gp + r * gs, wp, rp[r], dxp + r * d, pp + c * d, d);
          } else {
            rms_norm_backward_rows<scalar_t, false>(xp + r * xs, gp + r * gs, nullptr, rp[r], dxp + r * d, nullptr, d);
          }
        }
      }
    });
  });
  at::Tensor dweight = has_weight ? partial.sum(0).to(weight->scalar_type()) : at::empty({0}, x.options());
  return {dx.view(x.sizes()), dweight};
}

}  // namespace

TORCH_LIBRARY_IMPL(flagdit_kernels, CPU, m) {
  m.impl("rms_norm_fwd", &rms_norm_cpu_fwd);
  m.impl("rms_norm_bwd", &rms_norm_cpu_bwd);
}

}  // namespace flagdit
