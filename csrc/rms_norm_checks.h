// Argument checks of the compiled rms_norm ops (rms_norm_cpu.cpp, rms_norm_cuda.cu), run whatever calls them:
// the public op validates first, but torch.ops.flagdit_kernels.* is reachable directly and autograd hands the
// backward whatever the weight has become by then. Past these checks no kernel reads outside a tensor.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace flagdit {

// x (..., D) floating with D > 0 on `device`; weight None or (D,) floating on x's device; eps finite, >= 0.
inline void check_rms_norm_fwd_args(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                    double eps, at::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, op, ": x must be a ", device, " tensor, got ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && x.size(-1) <= INT32_MAX, op,
              ": x must be (..., D) with 0 < D < 2^31, got ", x.sizes());
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  if (!weight.has_value() || !weight->defined()) return;
  TORCH_CHECK(weight->device() == x.device(), op, ": weight is on ", weight->device(), " but x is on ", x.device());
  TORCH_CHECK(at::isFloatingType(weight->scalar_type()), op, ": weight must be floating point, got ",
              weight->scalar_type());
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == x.size(-1), op, ": weight must have shape (", x.size(-1),
              ",), got ", weight->sizes());
}

// The forward's checks on x and weight, plus dy shaped like x and rstd holding one floating value per row, all
// on x's device.
inline void check_rms_norm_bwd_args(const char* op, const at::Tensor& dy, const at::Tensor& x,
                                    const std::optional<at::Tensor>& weight, const at::Tensor& rstd,
                                    at::DeviceType device) {
  check_rms_norm_fwd_args(op, x, weight, 0.0, device);
  TORCH_CHECK(dy.device() == x.device(), op, ": dy is on ", dy.device(), " but x is on ", x.device());
  TORCH_CHECK(at::isFloatingType(dy.scalar_type()), op, ": dy must be floating point, got ", dy.scalar_type());
  TORCH_CHECK(dy.sizes() == x.sizes(), op, ": dy must have x's shape ", x.sizes(), ", got ", dy.sizes());
  TORCH_CHECK(rstd.device() == x.device(), op, ": rstd is on ", rstd.device(), " but x is on ", x.device());
  TORCH_CHECK(at::isFloatingType(rstd.scalar_type()), op, ": rstd must be floating point, got ",
              rstd.scalar_type());
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) * x.size(-1) == x.numel(), op, ": rstd must have shape (",
              x.numel() / x.size(-1), ",) (one value per row of x), got ", rstd.sizes());
}

}  // namespace flagdit
