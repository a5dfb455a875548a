// Device side of the CUDA pack/unpack (csrc/packing_cuda.cu): the item table entry, the tiling and the two
// kernels. A header of its own so that a host-only build can run these kernels, unchanged, under a small
// CUDA emulation (tests/cuda_emulation/): define FLAGDIT_EMULATE_CUDA and the emulation's thread model first.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "token_layout.h"

#ifndef FLAGDIT_EMULATE_CUDA
// Dynamic shared memory of a kernel, 16-byte aligned.
#define FLAGDIT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
// Unrolling the lane loops lets each thread issue several independent global loads before their shared
// stores: the bytes in flight per SM, not instruction count, bound a copy kernel.
#define FLAGDIT_PRAGMA(x) _Pragma(#x)
#define FLAGDIT_UNROLL(n) FLAGDIT_PRAGMA(unroll n)
#else
#define FLAGDIT_UNROLL(n)
#endif

namespace flagdit {
namespace packing {

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

inline Tiling make_tiling(int64_t channels, int64_t p) {
  Tiling t{};
  t.channels = std::min<int64_t>(channels, std::max<int64_t>(1, 256 / (p * p)));
  t.tokens = std::max<int64_t>(1, std::min<int64_t>(kMaxTileTokens, kTileElements / (t.channels * p * p)));
  return t;
}

// The item table of a batch: per item its (F, H, W), (C, F, H, W) element strides and base address.
// Returns the entries and sets the batch's token and patch-token counts.
inline std::vector<ItemDesc> make_items(const std::vector<int64_t>& fhw, const std::vector<int64_t>& strides,
                                        const std::vector<int64_t>& addrs, int64_t p, bool nextline, bool nextframe,
                                        int64_t* total, int64_t* patches) {
  std::vector<ItemDesc> items(addrs.size());
  int64_t start = 0, n_patches = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    ItemDesc& d = items[i];
    d.start = start;
    d.patch_start = n_patches;
    d.addr = addrs[i];
    d.sc = strides[4 * i];
    d.sf = strides[4 * i + 1];
    d.sh = strides[4 * i + 2];
    d.sw = strides[4 * i + 3];
    d.g = ItemGeometry::make(fhw[3 * i], fhw[3 * i + 1], fhw[3 * i + 2], p, nextline, nextframe);
    start += d.g.tokens;
    n_patches += d.g.frames * d.g.patch_rows * d.g.patch_cols;
  }
  *total = start;
  *patches = n_patches;
  return items;
}

// Calls fn(word_t{}, std::integral_constant<int, P>{}) for the element width (raw 2-, 4- or 8-byte words) and
// the patch size (1, 2, 4 compiled in; others at run time as P = 0). False for an unsupported width.
template <typename Fn>
bool dispatch_word_and_p(int64_t elem_size, int64_t p, Fn&& fn) {
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
      with_p(uint16_t{});
      return true;
    case 4:
      with_p(uint32_t{});
      return true;
    case 8:
      with_p(uint64_t{});
      return true;
    default:
      return false;
  }
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
        kind[token] = place.kind;
        positions[3 * token] = static_cast<int32_t>(place.frame);
        positions[3 * token + 1] = static_cast<int32_t>(place.row);
        positions[3 * token + 2] = static_cast<int32_t>(place.col);
        if (place.kind == kPatch) patch_rows[d.patch_start + patch_index(d.g, place)] = token;
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

// Dynamic shared memory of one block: its staged tile, padded rows included.
template <typename word_t>
inline size_t tile_smem_bytes(const Tiling& tiling, int64_t p) {
  return static_cast<size_t>(tiling.tokens * (tiling.channels * p * p + row_pad<word_t>())) * sizeof(word_t);
}

// The part of the (token, channel) grid this block handles and the layout of its shared-memory tile
// ([token][vector element of this channel block], rows padded). Pack and unpack walk the same tile, in
// opposite directions.
struct BlockTile {
  int64_t t0, c0;  // first token and first channel of the block
  int cb;          // channels in this block
  int width;       // elements of a token in this block: cb * p * p
  int stride;      // tile row pitch: width plus the bank padding
  int n_tok;       // token rows of the tile
  int warp, lane, n_warps;

  // Token rows of the tile that exist (the last block may be short). Computed where it is used: kept from the
  // start it stays live across the token-locating phase and costs registers.
  __device__ __forceinline__ int live(int64_t total) const { return static_cast<int>(min64(n_tok, total - t0)); }
};

template <typename word_t>
__device__ __forceinline__ BlockTile block_tile(int p, int64_t channels, int64_t tile_tokens,
                                                int64_t tile_channels) {
  BlockTile b;
  b.t0 = blockIdx.x * tile_tokens;
  b.c0 = blockIdx.y * tile_channels;
  b.cb = static_cast<int>(min64(tile_channels, channels - b.c0));
  b.width = b.cb * p * p;
  b.stride = b.width + row_pad<word_t>();
  b.n_tok = static_cast<int>(tile_tokens);
  b.warp = threadIdx.x / 32;
  b.lane = threadIdx.x % 32;
  b.n_warps = blockDim.x / 32;
  return b;
}

// Offset of latent element (c, ph, pw) inside its token's tile row, in the token vector's order.
__device__ __forceinline__ int tile_offset(int c, int ph, int pw, int p, int cb, bool channels_last) {
  return channels_last ? (ph * p + pw) * cb + c : (c * p + ph) * p + pw;
}

// The latent side of a tile, warp by warp: a warp walks one (channel, ph) line of the tile across its tokens and
// pw, which are consecutive W in memory, so its latent accesses coalesce. Calls fn(k, c, ph, pw) for token row k
// of the tile and latent element (c0 + c, ph, pw) of that token's patch.
template <typename Fn>
__device__ __forceinline__ void for_each_latent_element(const BlockTile& block, int p, Fn&& fn) {
  const int line = block.n_tok * p;
  for (int cp = block.warp; cp < block.cb * p; cp += block.n_warps) {
    const int c = cp / p, ph = cp - c * p;
    FLAGDIT_UNROLL(4)
    for (int q = block.lane; q < line; q += 32) {
      const int k = q / p, pw = q - k * p;
      fn(k, c, ph, pw);
    }
  }
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
  FLAGDIT_DYNAMIC_SMEM(smem_raw);
  word_t* tile = reinterpret_cast<word_t*>(smem_raw);  // [token][vector element of this channel block]
  __shared__ TokenSlot slots[kMaxTileTokens];

  const int p = P > 0 ? P : static_cast<int>(p_rt);
  const BlockTile block = block_tile<word_t>(p, channels, tile_tokens, tile_channels);

  if (kLayout && blockIdx.x == 0 && blockIdx.y == 0) {
    for (int64_t i = threadIdx.x; i <= n_items; i += blockDim.x) {
      cu_seqlens[i] = static_cast<int32_t>(i < n_items ? items[i].start : total);
    }
  }
  locate_tile<kLayout>(items, n_items, total, p, block.t0, tile_tokens, block.c0, slots, positions, kind, patch_rows);
  __syncthreads();

  // Latent side. Placeholder and out-of-range tokens stage zeros.
  for_each_latent_element(block, p, [&](int k, int c, int ph, int pw) {
    const TokenSlot& s = slots[k];
    word_t v = word_t(0);
    if (s.base >= 0) {
      v = reinterpret_cast<const word_t*>(s.addr)[s.base + c * s.sc + ph * s.sh + pw * s.sw];
    }
    tile[k * block.stride + tile_offset(c, ph, pw, p, block.cb, channels_last)] = v;
  });
  __syncthreads();

  // Token side: each warp writes token rows' runs (contiguous in `out`).
  const int live = block.live(total);
  for (int k = block.warp; k < live; k += block.n_warps) {
    word_t* row = out + (block.t0 + k) * out_row_stride;
    FLAGDIT_UNROLL(4)
    for (int off = block.lane; off < block.width; off += 32) {
      row[vector_column(off, block.cb, block.c0, p, channels, channels_last)] = tile[k * block.stride + off];
    }
  }
}

template <typename word_t, int P>
__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const ItemDesc* __restrict__ items, int64_t n_items, int64_t total, int64_t channels, int64_t p_rt,
                  bool channels_last, int64_t tile_tokens, int64_t tile_channels, const word_t* __restrict__ tokens,
                  int64_t row_stride, int64_t col_stride) {
  FLAGDIT_DYNAMIC_SMEM(smem_raw);
  word_t* tile = reinterpret_cast<word_t*>(smem_raw);
  __shared__ TokenSlot slots[kMaxTileTokens];

  const int p = P > 0 ? P : static_cast<int>(p_rt);
  const BlockTile block = block_tile<word_t>(p, channels, tile_tokens, tile_channels);

  locate_tile<false>(items, n_items, total, p, block.t0, tile_tokens, block.c0, slots, nullptr, nullptr, nullptr);
  __syncthreads();

  // Token side: read each live patch row's run for this channel block; placeholder rows are not read.
  const int live = block.live(total);
  for (int k = block.warp; k < live; k += block.n_warps) {
    if (slots[k].base < 0) continue;
    const word_t* row = tokens + (block.t0 + k) * row_stride;
    FLAGDIT_UNROLL(4)
    for (int off = block.lane; off < block.width; off += 32) {
      const int64_t column = vector_column(off, block.cb, block.c0, p, channels, channels_last);
      tile[k * block.stride + off] = row[column * col_stride];
    }
  }
  __syncthreads();

  // Latent side: placeholder tokens are not written.
  for_each_latent_element(block, p, [&](int k, int c, int ph, int pw) {
    const TokenSlot& s = slots[k];
    if (s.base < 0) return;
    reinterpret_cast<word_t*>(s.addr)[s.base + c * s.sc + ph * s.sh + pw * s.sw] =
        tile[k * block.stride + tile_offset(c, ph, pw, p, block.cb, channels_last)];
  });
}

}  // namespace packing
}  // namespace flagdit
