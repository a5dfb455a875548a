// CUDA pack/unpack: latents of any (C, [F,] H, W) size <-> packed token rows, one launch for the whole batch.
//
// The host describes the batch in a small device table of ItemDesc (first packed token, latent base address,
// (C, F, H, W) element strides, ItemGeometry from token_layout.h), copied to the device with one small
// asynchronous copy. A block owns `tile_tokens` consecutive tokens and `tile_channels` channels; it stages them
// in shared memory so that both sides are coalesced:
//   latent side : threads walk (channel, ph, token, pw) with pw fastest, i.e. along W inside a patch row;
//   token side  : threads walk (token, vector element), i.e. along contiguous token rows.
// Kernels move raw bits (2-, 4- or 8-byte words), so one instantiation serves every dtype of that width.
// Placeholder rows are written as zeros by pack and skipped by unpack.
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

struct DeviceTable {
  at::Tensor storage;  // keeps the device copy alive until the launch is queued
  const ItemDesc* items;
  int64_t total, patches;
};

// The item table for `tensors` (latents for pack, freshly allocated outputs for unpack), on their device.
DeviceTable make_table(const std::vector<at::Tensor>& tensors, int64_t p, bool nextline, bool nextframe) {
  std::vector<int64_t> fhw, strides, addrs;
  for (const at::Tensor& x : tensors) {
    const auto dims = latent_fhw(x);
    fhw.insert(fhw.end(), dims.begin(), dims.end());
    const auto s = cfhw_strides(x);
    strides.insert(strides.end(), s.begin(), s.end());
    addrs.push_back(reinterpret_cast<int64_t>(x.data_ptr()));
  }
  DeviceTable table{};
  const std::vector<ItemDesc> host = make_items(fhw, strides, addrs, p, nextline, nextframe, &table.total,
                                                &table.patches);
  const int64_t bytes = static_cast<int64_t>(host.size() * sizeof(ItemDesc));
  // Pinned staging: the copy is then asynchronous for certain (a pageable source may make the driver wait for
  // the stream), and PyTorch's pinned allocator keeps the block until the copy has run.
  at::Tensor cpu = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(cpu.data_ptr(), host.data(), bytes);
  table.storage = cpu.to(tensors[0].device(), /*non_blocking=*/true);
  table.items = reinterpret_cast<const ItemDesc*>(table.storage.data_ptr());
  return table;
}

// The CUDA kernels stage a block's patches in shared memory: one token's patch of one channel must fit a tile.
void check_tile_fits(const char* op, int64_t p) {
  TORCH_CHECK(p * p <= kTileElements, op, ": patch_size must be at most 64 on CUDA, got ", p);
}

std::vector<at::Tensor> pack_impl(at::TensorList latents, int64_t p, bool nextline, bool nextframe,
                                  bool channels_last, std::optional<int64_t> expect_tokens, bool layout) {
  check_latents("pack_patches (cuda)", latents, p, at::kCUDA);
  check_tile_fits("pack_patches (cuda)", p);
  const at::Tensor& x0 = latents[0];
  c10::DeviceGuard guard(x0.device());
  const std::vector<at::Tensor> items(latents.begin(), latents.end());
  const DeviceTable table = make_table(items, p, nextline, nextframe);
  if (expect_tokens) {
    TORCH_CHECK(table.total == *expect_tokens, "pack_patches: total_tokens disagrees with the shapes");
  }
  const int64_t channels = x0.size(0), n_items = static_cast<int64_t>(items.size());
  at::Tensor out = at::empty({table.total, channels * p * p}, x0.options());
  std::vector<at::Tensor> result{out};
  int32_t* positions = nullptr;
  int8_t* kind = nullptr;
  int64_t* patch_rows = nullptr;
  int32_t* cu = nullptr;
  if (layout) {
    append_layout_outputs(result, table.total, table.patches, n_items, x0.options());
    positions = result[1].data_ptr<int32_t>();
    kind = result[2].data_ptr<int8_t>();
    patch_rows = result[3].data_ptr<int64_t>();
    cu = result[4].data_ptr<int32_t>();
  }
  if (table.total == 0) return result;
  const Tiling tiling = make_tiling(channels, p);
  const dim3 grid(static_cast<unsigned>((table.total + tiling.tokens - 1) / tiling.tokens),
                  static_cast<unsigned>((channels + tiling.channels - 1) / tiling.channels));
  const cudaStream_t stream = current_stream(x0.device());
  const bool supported = dispatch_word_and_p(x0.element_size(), p, [&](auto word, auto pc) {
    using word_t = decltype(word);
    constexpr int P = decltype(pc)::value;
    const size_t smem = tile_smem_bytes<word_t>(tiling, p);
    auto kernel = layout ? pack_kernel<word_t, P, true> : pack_kernel<word_t, P, false>;
    kernel<<<grid, kThreads, smem, stream>>>(table.items, n_items, table.total, channels, p, channels_last,
                                             tiling.tokens, tiling.channels,
                                             reinterpret_cast<word_t*>(out.data_ptr()), out.stride(0), positions,
                                             kind, patch_rows, cu);
    check_launch("pack_patches");
  });
  TORCH_CHECK(supported, "pack_patches: unsupported element size ", x0.element_size());
  return result;
}

at::Tensor pack_patches_cuda(at::TensorList latents, int64_t p, bool nextline, bool nextframe, bool channels_last,
                             int64_t total_tokens) {
  return pack_impl(latents, p, nextline, nextframe, channels_last, total_tokens, false)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_patches_layout_cuda(
    at::TensorList latents, int64_t p, bool nextline, bool nextframe, bool channels_last) {
  auto r = pack_impl(latents, p, nextline, nextframe, channels_last, std::nullopt, true);
  return {r[0], r[1], r[2], r[3], r[4]};
}

std::vector<at::Tensor> unpack_patches_cuda(const at::Tensor& tokens, at::IntArrayRef item_shapes, int64_t p,
                                            int64_t channels, bool nextline, bool nextframe, bool channels_last) {
  check_unpack_args("unpack_patches (cuda)", tokens, item_shapes, p, channels, at::kCUDA);
  check_tile_fits("unpack_patches (cuda)", p);
  c10::DeviceGuard guard(tokens.device());
  std::vector<at::Tensor> outs = unpack_outputs(item_shapes, channels, tokens.options());
  const DeviceTable table = make_table(outs, p, nextline, nextframe);
  TORCH_CHECK(table.total == tokens.size(0), "unpack_patches: tokens.shape[0] disagrees with the shapes");
  if (table.total == 0) return outs;
  const Tiling tiling = make_tiling(channels, p);
  const dim3 grid(static_cast<unsigned>((table.total + tiling.tokens - 1) / tiling.tokens),
                  static_cast<unsigned>((channels + tiling.channels - 1) / tiling.channels));
  const cudaStream_t stream = current_stream(tokens.device());
  const int64_t n_items = static_cast<int64_t>(outs.size());
  const bool supported = dispatch_word_and_p(tokens.element_size(), p, [&](auto word, auto pc) {
    using word_t = decltype(word);
    constexpr int P = decltype(pc)::value;
    const size_t smem = tile_smem_bytes<word_t>(tiling, p);
    unpack_kernel<word_t, P><<<grid, kThreads, smem, stream>>>(
        table.items, n_items, table.total, channels, p, channels_last, tiling.tokens, tiling.channels,
        reinterpret_cast<const word_t*>(tokens.data_ptr()), tokens.stride(0), tokens.stride(1));
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
