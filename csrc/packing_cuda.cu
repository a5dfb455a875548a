// CUDA pack/unpack: latents of any (C, [F,] H, W) size <-> packed token rows, one launch for the whole batch.
//
// The host describes the batch in a small device table of ItemDesc (first packed token, first segment, latent
// base address, (C, F, H, W) element strides, ItemGeometry from token_layout.h), copied to the device with one
// small asynchronous copy. A block owns one segment (packing_kernels.cuh: patch rows x patch columns of one
// frame of one item) and a block of channels; it stages them in shared memory so that both sides are coalesced
// and, where the batch is aligned, move 16-byte vectors. Kernels move raw bits (2-, 4- or 8-byte words), so one
// instantiation serves every dtype of that width. Placeholder rows are written as zeros by pack and skipped by
// unpack.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "packing_host.h"
#include "packing_kernels.cuh"
#include "token_layout.h"

namespace flagdit {
namespace {

using namespace packing;  // NOLINT: the kernels and their table types

// Host side ---------------------------------------------------------------------------------------------------
// Only device-generic c10 headers are used (DeviceGuard, Stream): a CPU build of torch ships incomplete
// c10/cuda headers, and CI compile-checks this file against those.

cudaStream_t current_stream(const c10::Device& device) {
  return static_cast<cudaStream_t>(
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle());
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA launch failed: ", cudaGetErrorString(err));
}

// A batch as the kernels see it: the item table (on the host), its tiling and its totals.
struct Batch {
  std::vector<ItemDesc> items;
  Tiling tiling;
  int64_t total, patches, segments;
};

// The batch of `tensors` (latents for pack, freshly allocated outputs for unpack).
Batch make_batch(const std::vector<at::Tensor>& tensors, int64_t p, bool nextline, bool nextframe,
                 TileShape tile, int64_t channels) {
  std::vector<int64_t> fhw, strides, addrs;
  for (const at::Tensor& x : tensors) {
    const auto dims = latent_fhw(x);
    fhw.insert(fhw.end(), dims.begin(), dims.end());
    const auto s = cfhw_strides(x);
    strides.insert(strides.end(), s.begin(), s.end());
    addrs.push_back(reinterpret_cast<int64_t>(x.data_ptr()));
  }
  Batch b{};
  const auto [max_rows, max_cols] = max_patch_grid(fhw, p);
  b.tiling = make_tiling(channels, p, max_rows, max_cols);
  b.items = make_items(fhw, strides, addrs, p, nextline, nextframe, tile, b.tiling, &b.total, &b.patches, &b.segments);
  return b;
}

// The item table on `device`; the returned tensor keeps it alive until the launch is queued.
at::Tensor device_table(const std::vector<ItemDesc>& items, const at::Device& device) {
  const int64_t bytes = static_cast<int64_t>(items.size() * sizeof(ItemDesc));
  // Pinned staging: the copy is then asynchronous for certain (a pageable source may make the driver wait for
  // the stream), and PyTorch's pinned allocator keeps the block until the copy has run.
  at::Tensor cpu = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(cpu.data_ptr(), items.data(), bytes);
  return cpu.to(device, /*non_blocking=*/true);
}

dim3 grid_of(const Batch& b, int64_t channels) {
  return dim3(static_cast<unsigned>(b.segments), static_cast<unsigned>(ceil_div(channels, b.tiling.channels)));
}

// The CUDA kernels stage a block's patches in shared memory: one token's patch of one channel must fit a tile.
void check_tile_fits(const char* op, int64_t p) {
  TORCH_CHECK(p * p <= kTileElements, op, ": patch_size must be at most 64 on CUDA, got ", p);
}

std::vector<at::Tensor> pack_impl(at::TensorList latents, int64_t p, bool nextline, bool nextframe,
                                  bool channels_last, std::optional<int64_t> expect_tokens, bool layout,
                                  at::IntArrayRef tile) {
  check_latents("pack_patches (cuda)", latents, p, at::kCUDA);
  const TileShape tiling = check_tile("pack_patches (cuda)", tile);
  check_tile_fits("pack_patches (cuda)", p);
  const at::Tensor& x0 = latents[0];
  c10::DeviceGuard guard(x0.device());
  const int64_t channels = x0.size(0), n_items = static_cast<int64_t>(latents.size());
  const Batch batch = make_batch(std::vector<at::Tensor>(latents.begin(), latents.end()), p, nextline, nextframe,
                                 tiling, channels);
  if (expect_tokens) {
    TORCH_CHECK(batch.total == *expect_tokens, "pack_patches: total_tokens disagrees with the shapes");
  }
  at::Tensor out = at::empty({batch.total, channels * p * p}, x0.options());
  std::vector<at::Tensor> result{out};
  int32_t* positions = nullptr;
  int8_t* kind = nullptr;
  int64_t* patch_rows = nullptr;
  int32_t* cu = nullptr;
  if (layout) {
    append_layout_outputs(result, batch.total, batch.patches, n_items, x0.options());
    positions = result[1].data_ptr<int32_t>();
    kind = result[2].data_ptr<int8_t>();
    patch_rows = result[3].data_ptr<int64_t>();
    cu = result[4].data_ptr<int32_t>();
  }
  if (batch.total == 0) return result;
  const int vec = vector_words(batch.items, x0.element_size(), p, channels, batch.tiling, channels_last,
                               reinterpret_cast<int64_t>(out.data_ptr()), out.stride(0), 1);
  const at::Tensor table = device_table(batch.items, x0.device());
  const auto* items = reinterpret_cast<const ItemDesc*>(table.data_ptr());
  const cudaStream_t stream = current_stream(x0.device());
  const bool supported = dispatch_kernel(x0.element_size(), p, vec, [&](auto word, auto pc, auto vc) {
    using word_t = decltype(word);
    constexpr int P = decltype(pc)::value, V = decltype(vc)::value;
    const size_t smem = tile_smem_bytes<word_t, V>(batch.tiling, p);
    auto kernel = layout ? pack_kernel<word_t, P, V, true> : pack_kernel<word_t, P, V, false>;
    kernel<<<grid_of(batch, channels), kThreads, smem, stream>>>(
        items, n_items, batch.total, channels, p, channels_last, batch.tiling,
        reinterpret_cast<word_t*>(out.data_ptr()), out.stride(0), positions, kind, patch_rows, cu);
    check_launch("pack_patches");
  });
  TORCH_CHECK(supported, "pack_patches: unsupported element size ", x0.element_size());
  return result;
}

at::Tensor pack_patches_cuda(at::TensorList latents, int64_t p, bool nextline, bool nextframe, bool channels_last,
                             int64_t total_tokens, at::IntArrayRef tile) {
  return pack_impl(latents, p, nextline, nextframe, channels_last, total_tokens, false, tile)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_patches_layout_cuda(
    at::TensorList latents, int64_t p, bool nextline, bool nextframe, bool channels_last, at::IntArrayRef tile) {
  auto r = pack_impl(latents, p, nextline, nextframe, channels_last, std::nullopt, true, tile);
  return {r[0], r[1], r[2], r[3], r[4]};
}

std::vector<at::Tensor> unpack_patches_cuda(const at::Tensor& tokens, at::IntArrayRef item_shapes, int64_t p,
                                            int64_t channels, bool nextline, bool nextframe, bool channels_last,
                                            at::IntArrayRef tile) {
  check_unpack_args("unpack_patches (cuda)", tokens, item_shapes, p, channels, at::kCUDA);
  const TileShape tiling = check_tile("unpack_patches (cuda)", tile);
  check_tile_fits("unpack_patches (cuda)", p);
  c10::DeviceGuard guard(tokens.device());
  std::vector<at::Tensor> outs = unpack_outputs(item_shapes, channels, tokens.options());
  const Batch batch = make_batch(outs, p, nextline, nextframe, tiling, channels);
  TORCH_CHECK(batch.total == tokens.size(0), "unpack_patches: tokens.shape[0] disagrees with the shapes");
  if (batch.total == 0) return outs;
  const int vec = vector_words(batch.items, tokens.element_size(), p, channels, batch.tiling, channels_last,
                               reinterpret_cast<int64_t>(tokens.data_ptr()), tokens.stride(0), tokens.stride(1));
  const at::Tensor table = device_table(batch.items, tokens.device());
  const auto* items = reinterpret_cast<const ItemDesc*>(table.data_ptr());
  const cudaStream_t stream = current_stream(tokens.device());
  const int64_t n_items = static_cast<int64_t>(outs.size());
  const bool supported = dispatch_kernel(tokens.element_size(), p, vec, [&](auto word, auto pc, auto vc) {
    using word_t = decltype(word);
    constexpr int P = decltype(pc)::value, V = decltype(vc)::value;
    const size_t smem = tile_smem_bytes<word_t, V>(batch.tiling, p);
    unpack_kernel<word_t, P, V><<<grid_of(batch, channels), kThreads, smem, stream>>>(
        items, n_items, channels, p, channels_last, batch.tiling, reinterpret_cast<const word_t*>(tokens.data_ptr()),
        tokens.stride(0), tokens.stride(1));
    check_launch("unpack_patches");
  });
  TORCH_CHECK(supported, "unpack_patches: unsupported element size ", tokens.element_size());
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(flagdit_kernels, CUDA, m) {
  m.impl("pack_patches", &pack_patches_cuda);
  m.impl("pack_patches_layout", &pack_patches_layout_cuda);
  m.impl("unpack_patches", &unpack_patches_cuda);
}

}  // namespace flagdit
