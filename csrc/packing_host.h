// Host-side helpers shared by the CPU (packing_cpu.cpp) and CUDA (packing_cuda.cu) pack/unpack: the argument
// checks, how a latent's strides and shape are read, and how the op outputs are allocated, so both devices
// accept the same arguments and return the same tensors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "token_layout.h"

namespace flagdit {

// Argument checks, run by every compiled pack/unpack whatever calls it (the public ops validate first, but
// torch.ops.flagdit_kernels.* is reachable directly): a patch size below 1 divides by zero in ItemGeometry, and
// sides that are not positive multiples of it would leave rows of an unpacked latent unwritten.

inline void check_item(const char* op, const char* what, int64_t index, int64_t f, int64_t h, int64_t w, int64_t p) {
  TORCH_CHECK(f >= 1 && h >= p && w >= p && h % p == 0 && w % p == 0, op, ": ", what, "[", index,
              "] has (F, H, W) = (", f, ", ", h, ", ", w, "); F must be >= 1 and H, W positive multiples of patch_size ",
              p);
}

inline void check_latents(const char* op, at::TensorList latents, int64_t p, at::DeviceType device) {
  TORCH_CHECK(p >= 1, op, ": patch_size must be >= 1, got ", p);
  TORCH_CHECK(!latents.empty(), op, ": latents must not be empty");
  const at::Tensor& x0 = latents[0];
  for (size_t i = 0; i < latents.size(); ++i) {
    const at::Tensor& x = latents[i];
    TORCH_CHECK(x.device().type() == device && x.device() == x0.device(), op, ": latents must be on one ", device,
                " device; latents[", i, "] is on ", x.device());
    TORCH_CHECK(x.dim() == 3 || x.dim() == 4, op, ": latents[", i, "] must be (C, H, W) or (C, F, H, W), got ",
                x.sizes());
    TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": latents[", i, "] must be floating point, got ",
                x.scalar_type());
    TORCH_CHECK(x.size(0) >= 1 && x.size(0) == x0.size(0) && x.scalar_type() == x0.scalar_type(), op,
                ": latents must share a positive channel count and the dtype; latents[", i, "] is ", x.sizes(), " ",
                x.scalar_type(), ", latents[0] ", x0.sizes(), " ", x0.scalar_type());
    const int64_t f = x.dim() == 4 ? x.size(1) : 1;
    check_item(op, "latents", static_cast<int64_t>(i), f, x.size(-2), x.size(-1), p);
  }
}

// The tile of a tile-major order: empty (raster order) or three positive sizes (frames, rows, columns).
inline TileShape check_tile(const char* op, at::IntArrayRef tile) {
  if (tile.empty()) return TileShape{};
  TORCH_CHECK(tile.size() == 3 && tile[0] >= 1 && tile[1] >= 1 && tile[2] >= 1, op,
              ": tile must be empty (raster order) or (frames, rows, columns) of positive sizes, got ", tile);
  TileShape t;
  t.t = tile[0];
  t.h = tile[1];
  t.w = tile[2];
  return t;
}

// tokens (T, channels * p * p) floating on `device`; item_shapes (ndim, F, H, W) per item, each a latent shape
// the patch size tiles.
inline void check_unpack_args(const char* op, const at::Tensor& tokens, at::IntArrayRef item_shapes, int64_t p,
                              int64_t channels, at::DeviceType device) {
  TORCH_CHECK(p >= 1, op, ": patch_size must be >= 1, got ", p);
  TORCH_CHECK(channels >= 1, op, ": channels must be >= 1, got ", channels);
  TORCH_CHECK(tokens.device().type() == device, op, ": tokens must be a ", device, " tensor, got ", tokens.device());
  TORCH_CHECK(at::isFloatingType(tokens.scalar_type()), op, ": tokens must be floating point, got ",
              tokens.scalar_type());
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(1) == channels * p * p, op,
              ": tokens must be (T, channels * patch_size^2) = (T, ", channels * p * p, "), got ", tokens.sizes());
  TORCH_CHECK(!item_shapes.empty() && item_shapes.size() % 4 == 0, op,
              ": item_shapes must hold (ndim, F, H, W) per item, got ", item_shapes.size(), " values");
  for (size_t k = 0; k < item_shapes.size(); k += 4) {
    const int64_t i = static_cast<int64_t>(k / 4);
    TORCH_CHECK(item_shapes[k] == 3 || item_shapes[k] == 4, op, ": item_shapes[", i, "] has ndim ", item_shapes[k],
                ", expected 3 or 4");
    TORCH_CHECK(item_shapes[k] == 4 || item_shapes[k + 1] == 1, op, ": item_shapes[", i,
                "] is a 3-D latent with F = ", item_shapes[k + 1], ", expected 1");
    check_item(op, "item_shapes", i, item_shapes[k + 1], item_shapes[k + 2], item_shapes[k + 3], p);
  }
}

// (F, H, W) of a (C, H, W) or (C, F, H, W) latent.
inline std::vector<int64_t> latent_fhw(const at::Tensor& x) {
  if (x.dim() == 4) return {x.size(1), x.size(2), x.size(3)};
  return {1, x.size(1), x.size(2)};
}

// Strides of a latent as (C, F, H, W), a 3-D (C, H, W) latent getting a frame stride of 0.
inline std::vector<int64_t> cfhw_strides(const at::Tensor& t) {
  if (t.dim() == 4) return t.strides().vec();
  return {t.stride(0), 0, t.stride(1), t.stride(2)};
}

// The latents unpack fills: item_shapes holds (ndim, F, H, W) per item.
inline std::vector<at::Tensor> unpack_outputs(at::IntArrayRef item_shapes, int64_t channels,
                                              const at::TensorOptions& options) {
  std::vector<at::Tensor> outs;
  for (size_t k = 0; k + 3 < item_shapes.size(); k += 4) {
    const int64_t f = item_shapes[k + 1], h = item_shapes[k + 2], w = item_shapes[k + 3];
    outs.push_back(item_shapes[k] == 4 ? at::empty({channels, f, h, w}, options)
                                       : at::empty({channels, h, w}, options));
  }
  return outs;
}

// The layout outputs of pack_patches_layout appended after the patches: positions int32 (T, 3), kind int8 (T,),
// patch_rows int64 (N,), cu_seqlens int32 (B+1,).
inline void append_layout_outputs(std::vector<at::Tensor>& result, int64_t tokens, int64_t patches, int64_t items,
                                  const at::TensorOptions& options) {
  result.push_back(at::empty({tokens, 3}, options.dtype(at::kInt)));
  result.push_back(at::empty({tokens}, options.dtype(at::kChar)));
  result.push_back(at::empty({patches}, options.dtype(at::kLong)));
  result.push_back(at::empty({items + 1}, options.dtype(at::kInt)));
}

}  // namespace flagdit
