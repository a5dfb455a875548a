// Host-side helpers shared by the CPU (packing_cpu.cpp) and CUDA (packing_cuda.cu) pack/unpack: how a latent's
// strides and shape are read, and how the op outputs are allocated, so both devices return the same tensors.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace flagdit {

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
