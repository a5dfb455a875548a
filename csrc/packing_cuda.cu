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

#include "token_layout.h"

namespace flagdit {
namespace {

struct ItemDesc {
  int64_t start;        // first packed token of the item
  int64_t patch_start;  // index of its first patch token among all patch tokens
  int64_t addr;         // latent base address (data_ptr, storage offset included)
  int64_t sc, sf, sh, sw;  // element strides of the latent as (C, F, H, W); sf = 0 for (C, H, W)
  ItemGeometry g;
};

constexpr int kThreads = 256;
constexpr int kMaxTileTokens = 256;
constexpr int kTileElements = 4096;  // elements staged per block: 8 KiB (2-byte) to 32 KiB (8-byte)

struct Tiling {
  int64_t tokens, channels;  // tokens and channels per block
};

Tiling make_tiling(int64_t channels, int64_t p) {
  Tiling t{};
  t.channels = std::min<int64_t>(channels, std::max<int64_t>(1, 256 / (p * p)));
  t.tokens = std::max<int64_t>(1, std::min<int64_t>(kMaxTileTokens, kTileElements / (t.channels * p * p)));
  return t;
}

// Binary search: the item whose [start, next start) holds `token`.
__device__ __forceinline__ int64_t find_item(const ItemDesc* items, int64_t n_items, int64_t token) {
  int64_t lo = 0, hi = n_items - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (items[mid].start <= token) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

struct TokenSlot {
  int64_t base;  // element offset (from the item address) of channel c0, (frame, row * p, col * p); -1 if none
  int64_t sc, sh, sw;
  int64_t addr;
};

// Per-token phase shared by both directions: locate every token of the tile once, keep its source/destination
// in shared memory, and (pack with layout) write kind / positions / patch_rows.
template <bool kLayout>
__device__ void locate_tile(const ItemDesc* items, int64_t n_items, int64_t total, int64_t p, int64_t t0,
                            int64_t tile_tokens, int64_t c0, TokenSlot* slots, int32_t* positions, int8_t* kind,
                            int64_t* patch_rows) {
  for (int64_t k = threadIdx.x; k < tile_tokens; k += blockDim.x) {
    const int64_t token = t0 + k;
    TokenSlot s{};
    s.base = -1;
    if (token < total) {
      const int64_t i = find_item(items, n_items, token);
      const ItemDesc& d = items[i];
      const TokenPlace place = locate(d.g, token - d.start);
      if (place.kind == kPatch) {
        s.base = c0 * d.sc + place.frame * d.sf + place.row * p * d.sh + place.col * p * d.sw;
        s.sc = d.sc;
        s.sh = d.sh;
        s.sw = d.sw;
        s.addr = d.addr;
      }
      if (kLayout && c0 == 0) {
        // Positions follow the reference: a nextline slot sits at (frame, row, W/p), a nextframe slot at
        // (frame, H/p, 0).
        const bool frame_slot = place.kind == kNextframe;
        kind[token] = place.kind;
        positions[3 * token] = static_cast<int32_t>(place.frame);
        positions[3 * token + 1] = static_cast<int32_t>(frame_slot ? d.g.patch_rows : place.row);
        positions[3 * token + 2] = static_cast<int32_t>(frame_slot ? 0 : place.col);
        if (place.kind == kPatch) {
          patch_rows[d.patch_start + (place.frame * d.g.patch_rows + place.row) * d.g.patch_cols + place.col] =
              token;
        }
      }
    }
    slots[k] = s;
  }
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Tile rows are padded by one 4-byte bank so that the latent-side walk (consecutive tokens = rows) does not
// hit one shared-memory bank.
template <typename word_t>
__host__ __device__ constexpr int row_pad() {
  return sizeof(word_t) >= 4 ? 1 : static_cast<int>(4 / sizeof(word_t));
}

// Element of a token vector held in a channel block of `cb` channels starting at c0: its column in the token
// row given its offset `off` inside the block's run ((c, ph, pw) order: one run; (ph, pw, c): runs of cb).
__device__ __forceinline__ int64_t vector_column(int off, int cb, int64_t c0, int64_t p, int64_t channels,
                                                 bool channels_last) {
  if (!channels_last) return c0 * p * p + off;
  const int php = off / cb;
  return php * channels + c0 + (off - php * cb);
}

// P > 0: patch size known at compile time (divisions fold); P == 0: runtime patch size `p_rt`.
// Threads work warp by warp: on the latent side a warp walks one (channel, ph) line of the tile across its
// tokens and pw (consecutive W in memory); on the token side a warp walks one token row.
template <typename word_t, int P, bool kLayout>
__global__ void __launch_bounds__(kThreads)
    pack_kernel(const ItemDesc* __restrict__ items, int64_t n_items, int64_t total, int64_t channels, int64_t p_rt,
                bool channels_last, int64_t tile_tokens, int64_t tile_channels, word_t* __restrict__ out,
                int64_t out_row_stride, int32_t* __restrict__ positions, int8_t* __restrict__ kind,
                int64_t* __restrict__ patch_rows, int32_t* __restrict__ cu_seqlens) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  word_t* tile = reinterpret_cast<word_t*>(smem_raw);  // [token][vector element of this channel block]
  __shared__ TokenSlot slots[kMaxTileTokens];

  const int p = P > 0 ? P : static_cast<int>(p_rt);
  const int64_t t0 = blockIdx.x * tile_tokens;
  const int64_t c0 = blockIdx.y * tile_channels;
  const int cb = static_cast<int>(min64(tile_channels, channels - c0));  // channels in this block
  const int width = cb * p * p;                                          // elements of a token in this block
  const int stride = width + row_pad<word_t>();
  const int n_tok = static_cast<int>(tile_tokens);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;

  if (kLayout && blockIdx.x == 0 && blockIdx.y == 0) {
    for (int64_t i = threadIdx.x; i <= n_items; i += blockDim.x) {
      cu_seqlens[i] = static_cast<int32_t>(i < n_items ? items[i].start : total);
    }
  }
  locate_tile<kLayout>(items, n_items, total, p, t0, tile_tokens, c0, slots, positions, kind, patch_rows);
  __syncthreads();

  // Latent side. Placeholder and out-of-range tokens stage zeros.
  const int line = n_tok * p;
  for (int cp = warp; cp < cb * p; cp += n_warps) {
    const int c = cp / p, ph = cp - c * p;
    for (int q = lane; q < line; q += 32) {
      const int k = q / p, pw = q - k * p;
      const TokenSlot& s = slots[k];
      word_t v = word_t(0);
      if (s.base >= 0) {
        v = reinterpret_cast<const word_t*>(s.addr)[s.base + c * s.sc + ph * s.sh + pw * s.sw];
      }
      const int off = channels_last ? (ph * p + pw) * cb + c : (c * p + ph) * p + pw;
      tile[k * stride + off] = v;
    }
  }
  __syncthreads();

  // Token side: each warp writes token rows' runs (contiguous in `out`).
  const int live = static_cast<int>(min64(tile_tokens, total - t0));
  for (int k = warp; k < live; k += n_warps) {
    word_t* row = out + (t0 + k) * out_row_stride;
    for (int off = lane; off < width; off += 32) {
      row[vector_column(off, cb, c0, p, channels, channels_last)] = tile[k * stride + off];
    }
  }
}

template <typename word_t, int P>
__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const ItemDesc* __restrict__ items, int64_t n_items, int64_t total, int64_t channels, int64_t p_rt,
                  bool channels_last, int64_t tile_tokens, int64_t tile_channels, const word_t* __restrict__ tokens,
                  int64_t row_stride, int64_t col_stride) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  word_t* tile = reinterpret_cast<word_t*>(smem_raw);
  __shared__ TokenSlot slots[kMaxTileTokens];

  const int p = P > 0 ? P : static_cast<int>(p_rt);
  const int64_t t0 = blockIdx.x * tile_tokens;
  const int64_t c0 = blockIdx.y * tile_channels;
  const int cb = static_cast<int>(min64(tile_channels, channels - c0));
  const int width = cb * p * p;
  const int stride = width + row_pad<word_t>();
  const int n_tok = static_cast<int>(tile_tokens);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;

  locate_tile<false>(items, n_items, total, p, t0, tile_tokens, c0, slots, nullptr, nullptr, nullptr);
  __syncthreads();

  // Token side: read each live patch row's run for this channel block; placeholder rows are not read.
  const int live = static_cast<int>(min64(tile_tokens, total - t0));
  for (int k = warp; k < live; k += n_warps) {
    if (slots[k].base < 0) continue;
    const word_t* row = tokens + (t0 + k) * row_stride;
    for (int off = lane; off < width; off += 32) {
      tile[k * stride + off] = row[vector_column(off, cb, c0, p, channels, channels_last) * col_stride];
    }
  }
  __syncthreads();

  // Latent side: one (channel, ph) line per warp, along W.
  const int line = n_tok * p;
  for (int cp = warp; cp < cb * p; cp += n_warps) {
    const int c = cp / p, ph = cp - c * p;
    for (int q = lane; q < line; q += 32) {
      const int k = q / p, pw = q - k * p;
      const TokenSlot& s = slots[k];
      if (s.base < 0) continue;
      const int off = channels_last ? (ph * p + pw) * cb + c : (c * p + ph) * p + pw;
      reinterpret_cast<word_t*>(s.addr)[s.base + c * s.sc + ph * s.sh + pw * s.sw] = tile[k * stride + off];
    }
  }
}

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

std::vector<int64_t> cfhw_strides(const at::Tensor& t) {
  if (t.dim() == 4) return t.strides().vec();
  return {t.stride(0), 0, t.stride(1), t.stride(2)};
}

struct DeviceTable {
  at::Tensor storage;  // keeps the device copy alive until the launch is queued
  const ItemDesc* items;
  int64_t total, patches;
};

// The item table for `tensors` (latents for pack, freshly allocated outputs for unpack), on their device.
DeviceTable make_table(const std::vector<at::Tensor>& tensors, int64_t p, bool nextline, bool nextframe) {
  std::vector<ItemDesc> host(tensors.size());
  int64_t start = 0, patches = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& x = tensors[i];
    const bool video = x.dim() == 4;
    const int64_t f = video ? x.size(1) : 1, h = x.size(video ? 2 : 1), w = x.size(video ? 3 : 2);
    const auto s = cfhw_strides(x);
    ItemDesc& d = host[i];
    d.start = start;
    d.patch_start = patches;
    d.addr = reinterpret_cast<int64_t>(x.data_ptr());
    d.sc = s[0];
    d.sf = s[1];
    d.sh = s[2];
    d.sw = s[3];
    d.g = ItemGeometry::make(f, h, w, p, nextline, nextframe);
    start += d.g.tokens;
    patches += f * d.g.patch_rows * d.g.patch_cols;
  }
  const int64_t bytes = static_cast<int64_t>(host.size() * sizeof(ItemDesc));
  at::Tensor cpu = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(cpu.data_ptr(), host.data(), bytes);
  at::Tensor dev = cpu.to(tensors[0].device(), /*non_blocking=*/true);
  return {dev, reinterpret_cast<const ItemDesc*>(dev.data_ptr()), start, patches};
}

void check_latents(at::TensorList latents, int64_t p) {
  TORCH_CHECK(!latents.empty(), "pack_patches: latents must not be empty");
  TORCH_CHECK(p >= 1 && p * p <= kTileElements, "pack_patches: patch_size must be in [1, 64]");
  const at::Tensor& x0 = latents[0];
  for (const auto& x : latents) {
    TORCH_CHECK(x.is_cuda() && x.device() == x0.device(), "pack_patches: latents must be on one CUDA device");
    TORCH_CHECK(x.dim() == 3 || x.dim() == 4, "pack_patches: latents must be (C, H, W) or (C, F, H, W)");
    TORCH_CHECK(x.size(0) == x0.size(0) && x.scalar_type() == x0.scalar_type(),
                "pack_patches: latents must share channels and dtype");
    const int64_t h = x.size(x.dim() - 2), w = x.size(x.dim() - 1);
    TORCH_CHECK(h % p == 0 && w % p == 0 && h >= p && w >= p, "pack_patches: H and W must be multiples of p");
  }
}

// Calls fn(word_t{}, std::integral_constant<int, P>{}) for the element width and patch size.
template <typename Fn>
void dispatch_word_and_p(int64_t elem_size, int64_t p, Fn&& fn) {
  auto with_p = [&](auto word) {
    switch (p) {
      case 1:
        return fn(word, std::integral_constant<int, 1>{});
      case 2:
        return fn(word, std::integral_constant<int, 2>{});
      case 4:
        return fn(word, std::integral_constant<int, 4>{});
      default:
        return fn(word, std::integral_constant<int, 0>{});
    }
  };
  switch (elem_size) {
    case 2:
      return with_p(uint16_t{});
    case 4:
      return with_p(uint32_t{});
    case 8:
      return with_p(uint64_t{});
    default:
      TORCH_CHECK(false, "pack/unpack: unsupported element size ", elem_size);
  }
}

std::vector<at::Tensor> pack_impl(at::TensorList latents, int64_t p, bool nextline, bool nextframe,
                                  bool channels_last, std::optional<int64_t> expect_tokens, bool layout) {
  check_latents(latents, p);
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
    auto opts = x0.options();
    result.push_back(at::empty({table.total, 3}, opts.dtype(at::kInt)));
    result.push_back(at::empty({table.total}, opts.dtype(at::kChar)));
    result.push_back(at::empty({table.patches}, opts.dtype(at::kLong)));
    result.push_back(at::empty({n_items + 1}, opts.dtype(at::kInt)));
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
  dispatch_word_and_p(x0.element_size(), p, [&](auto word, auto pc) {
    using word_t = decltype(word);
    constexpr int P = decltype(pc)::value;
    const size_t smem =
        static_cast<size_t>(tiling.tokens * (tiling.channels * p * p + row_pad<word_t>())) * sizeof(word_t);
    auto kernel = layout ? pack_kernel<word_t, P, true> : pack_kernel<word_t, P, false>;
    kernel<<<grid, kThreads, smem, stream>>>(table.items, n_items, table.total, channels, p, channels_last,
                                             tiling.tokens, tiling.channels,
                                             reinterpret_cast<word_t*>(out.data_ptr()), out.stride(0), positions,
                                             kind, patch_rows, cu);
    check_launch("pack_patches");
  });
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
  TORCH_CHECK(tokens.is_cuda(), "unpack_patches: tokens must be a CUDA tensor");
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(1) == channels * p * p,
              "unpack_patches: tokens must be (T, out_channels * p * p)");
  TORCH_CHECK(p >= 1 && p * p <= kTileElements, "unpack_patches: patch_size must be in [1, 64]");
  TORCH_CHECK(!item_shapes.empty() && item_shapes.size() % 4 == 0,
              "unpack_patches: item_shapes holds (ndim, F, H, W) per item");
  c10::DeviceGuard guard(tokens.device());
  std::vector<at::Tensor> outs;
  for (size_t k = 0; k < item_shapes.size(); k += 4) {
    const int64_t f = item_shapes[k + 1], h = item_shapes[k + 2], w = item_shapes[k + 3];
    outs.push_back(item_shapes[k] == 4 ? at::empty({channels, f, h, w}, tokens.options())
                                       : at::empty({channels, h, w}, tokens.options()));
  }
  const DeviceTable table = make_table(outs, p, nextline, nextframe);
  TORCH_CHECK(table.total == tokens.size(0), "unpack_patches: tokens.shape[0] disagrees with the shapes");
  if (table.total == 0) return outs;
  const Tiling tiling = make_tiling(channels, p);
  const dim3 grid(static_cast<unsigned>((table.total + tiling.tokens - 1) / tiling.tokens),
                  static_cast<unsigned>((channels + tiling.channels - 1) / tiling.channels));
  const cudaStream_t stream = current_stream(tokens.device());
  const int64_t n_items = static_cast<int64_t>(outs.size());
  dispatch_word_and_p(tokens.element_size(), p, [&](auto word, auto pc) {
    using word_t = decltype(word);
    constexpr int P = decltype(pc)::value;
    const size_t smem =
        static_cast<size_t>(tiling.tokens * (tiling.channels * p * p + row_pad<word_t>())) * sizeof(word_t);
    unpack_kernel<word_t, P><<<grid, kThreads, smem, stream>>>(
        table.items, n_items, table.total, channels, p, channels_last, tiling.tokens, tiling.channels,
        reinterpret_cast<const word_t*>(tokens.data_ptr()), tokens.stride(0), tokens.stride(1));
    check_launch("unpack_patches");
  });
  return outs;
}

}  // namespace

// pack_patches plus the token layout (positions, kind, patch_rows, cu_seqlens) from the same launch; the
// public fk.pack uses it on CUDA. CUDA-only, so it is declared here rather than in bindings.cpp.
TORCH_LIBRARY_FRAGMENT(flagdit_kernels, m) {
  m.def(
      "pack_patches_layout(Tensor[] latents, int patch_size, bool nextline, bool nextframe, bool channels_last) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(flagdit_kernels, CUDA, m) {
  m.impl("pack_patches", &pack_patches_cuda);
  m.impl("pack_patches_layout", &pack_patches_layout_cuda);
  m.impl("unpack_patches", &unpack_patches_cuda);
}

}  // namespace flagdit
