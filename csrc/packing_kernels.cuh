// Device side of the CUDA pack/unpack (csrc/packing_cuda.cu): the item table entry, the tiling, the choice of
// access width and the two kernels. A header of its own so that a host-only build can run these kernels,
// unchanged, under a small CUDA emulation (tests/support/cuda_emulation/): define FLAGDIT_EMULATE_CUDA and the
// emulation's thread model first.
//
// Work unit: a *segment*, up to `rows` consecutive patch rows of one frame of one item times up to `cols`
// consecutive patches of each, times a block of channels; the grid is (segments of the batch, channel blocks).
// Wide items get one patch row per segment, narrow ones several, so every block moves about kTileElements
// elements. On the latent side a segment is, per channel, rows * p latent rows of cols * p contiguous elements
// along W; on the token side rows * cols token rows of channels * p * p elements, contiguous per row. A block
// stages the segment in shared memory in latent order, so both sides are coalesced, and moves 16-byte vectors
// on both sides when the batch allows it (vector_words: aligned addresses, strides and extents), else single
// elements (any strides).
//
// Bounds: every index a block uses comes from the table the host built from the tensors themselves, and every
// access is limited by the segment's real rows, columns and channels; each output element is written by
// exactly one block.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "token_layout.h"

#ifndef FLAGDIT_EMULATE_CUDA
// Dynamic shared memory of a kernel, 16-byte aligned.
#define FLAGDIT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
// Unrolling the copy loops lets each thread issue several independent global loads before their shared-memory
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
  int64_t seg_start;    // first segment of the item
  int64_t patch_start;  // index of its first patch token among all patch tokens
  int64_t addr;         // latent base address (data_ptr, storage offset included)
  int64_t sc, sf, sh, sw;  // element strides of the latent as (C, F, H, W); sf = 0 for (C, H, W)
  ItemGeometry g;
};

constexpr int kThreads = 256;
constexpr int kTileElements = 4096;       // elements staged per block: 8 KiB (2-byte) to 32 KiB (8-byte)
constexpr int kMaxVectorElements = 256;  // elements of one token a block covers (more: more channel blocks)

// A segment's extent: channels per block, patch rows and patch columns per segment.
struct Tiling {
  int64_t channels, rows, cols;
};

inline Tiling make_tiling(int64_t channels, int64_t p, int64_t max_rows, int64_t max_cols) {
  Tiling t{};
  t.channels = std::min<int64_t>(channels, std::max<int64_t>(1, kMaxVectorElements / (p * p)));
  const int64_t tokens = std::max<int64_t>(1, kTileElements / (t.channels * p * p));
  t.cols = std::max<int64_t>(1, std::min(tokens, max_cols));
  t.rows = std::max<int64_t>(1, std::min(tokens / t.cols, max_rows));
  return t;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The item table of a batch: per item its (F, H, W), (C, F, H, W) element strides, base address, first token,
// first segment and first patch. Sets the batch's token, patch and segment counts.
inline std::vector<ItemDesc> make_items(const std::vector<int64_t>& fhw, const std::vector<int64_t>& strides,
                                        const std::vector<int64_t>& addrs, int64_t p, bool nextline, bool nextframe,
                                        TileShape tile, const Tiling& tiling, int64_t* total, int64_t* patches, int64_t* segments) {
  std::vector<ItemDesc> items(addrs.size());
  int64_t start = 0, n_patches = 0, n_segments = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    ItemDesc& d = items[i];
    d.start = start;
    d.seg_start = n_segments;
    d.patch_start = n_patches;
    d.addr = addrs[i];
    d.sc = strides[4 * i];
    d.sf = strides[4 * i + 1];
    d.sh = strides[4 * i + 2];
    d.sw = strides[4 * i + 3];
    d.g = ItemGeometry::make(fhw[3 * i], fhw[3 * i + 1], fhw[3 * i + 2], p, nextline, nextframe, tile);
    start += d.g.tokens;
    n_patches += d.g.frames * d.g.patch_rows * d.g.patch_cols;
    n_segments += d.g.frames * ceil_div(d.g.patch_rows, tiling.rows) * ceil_div(d.g.patch_cols, tiling.cols);
  }
  *total = start;
  *patches = n_patches;
  *segments = n_segments;
  return items;
}

// The largest (patch rows, patch cols) of the batch's items, for make_tiling.
inline std::pair<int64_t, int64_t> max_patch_grid(const std::vector<int64_t>& fhw, int64_t p) {
  int64_t rows = 1, cols = 1;
  for (size_t k = 0; k + 2 < fhw.size(); k += 3) {
    rows = std::max(rows, fhw[k + 1] / p);
    cols = std::max(cols, fhw[k + 2] / p);
  }
  return {rows, cols};
}

// Words per access both kernels may use: 16 bytes' worth when every latent has a 16-byte aligned base, unit W
// stride, C / F / H strides and W in whole vectors, a segment's columns start on vector boundaries, and the
// token rows (base, row stride, unit column stride) and every channel block's part of a row are whole
// vectors too (in channels-last order a part is contiguous only when one block holds every channel); else 1.
inline int vector_words(const std::vector<ItemDesc>& items, int64_t elem_size, int64_t p, int64_t channels,
                        const Tiling& tiling, bool channels_last, int64_t tokens_addr, int64_t row_stride,
                        int64_t col_stride) {
  const int64_t v = 16 / elem_size;
  auto whole = [v](int64_t x) { return x % v == 0; };
  bool ok = tokens_addr % 16 == 0 && col_stride == 1 && whole(row_stride) && whole(tiling.cols * p) &&
            whole(tiling.channels * p * p) && whole(channels * p * p) && (!channels_last || tiling.channels == channels);
  for (const ItemDesc& d : items) {
    ok = ok && d.addr % 16 == 0 && d.sw == 1 && whole(d.sc) && whole(d.sf) && whole(d.sh) && whole(d.g.width);
  }
  return ok ? static_cast<int>(v) : 1;
}

// Calls fn(word_t{}, std::integral_constant<int, P>{}, std::integral_constant<int, V>{}) for the element width
// (raw 2-, 4- or 8-byte words), the patch size (1, 2, 4 compiled in; others at run time as P = 0) and the words
// per access (1, or a 16-byte vector). False for an unsupported width.
template <typename Fn>
bool dispatch_kernel(int64_t elem_size, int64_t p, int vec, Fn&& fn) {
  auto with_vec = [&](auto word, auto pc) {
    constexpr int kWide = static_cast<int>(16 / sizeof(decltype(word)));
    if (vec > 1) return fn(word, pc, std::integral_constant<int, kWide>{});
    return fn(word, pc, std::integral_constant<int, 1>{});
  };
  auto with_p = [&](auto word) {
    switch (p) {
      case 1:
        return with_vec(word, std::integral_constant<int, 1>{});
      case 2:
        return with_vec(word, std::integral_constant<int, 2>{});
      case 4:
        return with_vec(word, std::integral_constant<int, 4>{});
      default:
        return with_vec(word, std::integral_constant<int, 0>{});
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

// Words between two staged latent lines: the line plus padding that keeps vectors aligned (V > 1) or moves the
// next line to another shared-memory bank.
template <typename word_t, int V>
__host__ __device__ constexpr int64_t line_pad() {
  return V > 1 ? V : (sizeof(word_t) >= 4 ? 1 : static_cast<int64_t>(4 / sizeof(word_t)));
}

// Dynamic shared memory of one block: the staged segment, channels x rows * p lines of cols * p words.
template <typename word_t, int V>
inline size_t tile_smem_bytes(const Tiling& t, int64_t p) {
  return static_cast<size_t>(t.channels * t.rows * p * (t.cols * p + line_pad<word_t, V>())) * sizeof(word_t);
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// Stores a run of V words at an address aligned to the run. A 16-byte run goes out as one uint4 built from
// 32-bit lanes: stored as the Vec itself, a run gathered from 2-byte words becomes four 4-byte stores.
template <typename word_t, int V>
__device__ __forceinline__ void store_run(word_t* dst, const Vec<word_t, V>& v) {
  if constexpr (sizeof(Vec<word_t, V>) == 16) {
    uint32_t lane[4];
    for (int k = 0; k < 4; ++k) {
      if constexpr (sizeof(word_t) == 2) {
        lane[k] = static_cast<uint32_t>(v.v[2 * k]) | (static_cast<uint32_t>(v.v[2 * k + 1]) << 16);
      } else if constexpr (sizeof(word_t) == 4) {
        lane[k] = static_cast<uint32_t>(v.v[k]);
      } else {
        lane[k] = static_cast<uint32_t>(v.v[k / 2] >> (32 * (k % 2)));
      }
    }
    uint4 u;
    u.x = lane[0];
    u.y = lane[1];
    u.z = lane[2];
    u.w = lane[3];
    *reinterpret_cast<uint4*>(dst) = u;
  } else {
    *reinterpret_cast<Vec<word_t, V>*>(dst) = v;
  }
}

// Binary search: the item whose [seg_start, next seg_start) holds `segment`.
__device__ __forceinline__ int64_t find_item(const ItemDesc* items, int64_t n_items, int64_t segment) {
  int64_t lo = 0, hi = n_items - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (items[mid].seg_start <= segment) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// This block's segment and channel block, and the layout of its staged tile.
struct Segment {
  const ItemDesc* d;
  int64_t frame, r0, t0;  // first patch row and column
  int nrows, ncols;       // patch rows and columns in the segment
  int64_t c0;             // first channel
  int cb;                 // channels in the block
  int p;
  int64_t line;           // words between staged lines
  int64_t lines_per_c;    // staged lines per channel: tiling rows * p

  // Staged word of element (c, patch row rr, ph, patch column t, pw).
  __device__ __forceinline__ int64_t staged(int c, int rr, int ph, int t, int pw) const {
    return (c * lines_per_c + rr * p + ph) * line + t * p + pw;
  }
  __device__ __forceinline__ bool closes_rows() const { return t0 + ncols == d->g.patch_cols; }
};

template <typename word_t, int V>
__device__ __forceinline__ Segment find_segment(const ItemDesc* items, int64_t n_items, int p, int64_t channels,
                                                const Tiling& t) {
  Segment s;
  const int64_t seg = blockIdx.x;
  s.d = &items[find_item(items, n_items, seg)];
  const ItemGeometry& g = s.d->g;
  const int64_t col_tiles = (g.patch_cols + t.cols - 1) / t.cols;
  const int64_t row_tiles = (g.patch_rows + t.rows - 1) / t.rows;
  const int64_t local = seg - s.d->seg_start;
  const int64_t block = local / col_tiles;
  s.t0 = (local - block * col_tiles) * t.cols;
  s.frame = block / row_tiles;
  s.r0 = (block - s.frame * row_tiles) * t.rows;
  s.nrows = static_cast<int>(t.rows < g.patch_rows - s.r0 ? t.rows : g.patch_rows - s.r0);
  s.ncols = static_cast<int>(t.cols < g.patch_cols - s.t0 ? t.cols : g.patch_cols - s.t0);
  s.c0 = blockIdx.y * t.channels;
  s.cb = static_cast<int>(t.channels < channels - s.c0 ? t.channels : channels - s.c0);
  s.p = p;
  s.line = t.cols * p + line_pad<word_t, V>();
  s.lines_per_c = t.rows * p;
  return s;
}

// Offset (in elements, from the latent base) of latent element (channel c of the block, latent row hh of the
// segment, latent column w of the segment).
__device__ __forceinline__ int64_t latent_offset(const Segment& s, int c, int64_t hh, int64_t w) {
  const ItemDesc& d = *s.d;
  return (s.c0 + c) * d.sc + s.frame * d.sf + (s.r0 * s.p + hh) * d.sh + (s.t0 * s.p + w) * d.sw;
}

// Calls fn(word offset in the staged tile, latent element offset) for every V-word run of the segment's latent
// lines, thread by thread along each line (coalesced: consecutive threads, consecutive runs).
template <int V, typename Fn>
__device__ __forceinline__ void for_each_latent_run(const Segment& s, Fn&& fn) {
  const int runs = s.ncols * s.p / V;  // V divides the line when V > 1 (vector_words)
  const int lines = s.nrows * s.p;
  const int work = s.cb * lines * runs;
  FLAGDIT_UNROLL(2)
  for (int i = threadIdx.x; i < work; i += blockDim.x) {
    const int run = i % runs;
    const int rest = i / runs;
    const int hh = rest % lines, c = rest / lines;
    fn((c * s.lines_per_c + hh) * s.line + run * V, latent_offset(s, c, hh, static_cast<int64_t>(run) * V));
  }
}

// Staged word of element `e` of a token's part of its row (vector order), for the token at (rr, t) of the
// segment: (c, ph, pw) order, or (ph, pw, c) with `channels_last`.
__device__ __forceinline__ int64_t staged_element(const Segment& s, int e, int rr, int t, bool channels_last) {
  const int pp = s.p * s.p;
  int c, php;
  if (channels_last) {
    php = e / s.cb;
    c = e - php * s.cb;
  } else {
    c = e / pp;
    php = e - c * pp;
  }
  const int ph = php / s.p;
  return s.staged(c, rr, ph, t, php - ph * s.p);
}

// Column of element `e` of the block's part of a token row.
__device__ __forceinline__ int64_t token_column(const Segment& s, int e, int64_t channels, bool channels_last) {
  if (!channels_last) return s.c0 * s.p * s.p + e;
  const int php = e / s.cb;
  return php * channels + s.c0 + (e - php * s.cb);
}

// Calls fn(token, rr, t, column, e0) for every V-word run of the block's part of the segment's token rows,
// thread by thread along each row: the token at patch row rr and column t of the segment, the column of the
// run's first element in the token row and that element's index e0 in the block's part.
template <int V, typename Fn>
__device__ __forceinline__ void for_each_token_run(const Segment& s, int64_t channels, bool channels_last, Fn&& fn) {
  const int runs = s.cb * s.p * s.p / V;
  const int tokens = s.nrows * s.ncols;
  FLAGDIT_UNROLL(2)
  for (int i = threadIdx.x; i < tokens * runs; i += blockDim.x) {
    const int run = i % runs, k = i / runs;
    const int rr = k / s.ncols, t = k - rr * s.ncols;
    const int64_t token = s.d->start + token_index(s.d->g, s.frame, s.r0 + rr, s.t0 + t);
    fn(token, rr, t, token_column(s, run * V, channels, channels_last), run * V);
  }
}

// Placeholder slots the segment closes (when it ends its rows): the [nextline] slot of each of its rows, then
// the frame's [nextframe] slot after the frame's last row unless the frame is the item's last. Slot i's token,
// or -1 when slot i does not exist.
__device__ __forceinline__ int64_t placeholder_slot(const Segment& s, int i) {
  const ItemGeometry& g = s.d->g;
  if (!s.closes_rows()) return -1;
  const bool nextline = g.row_len > g.patch_cols;
  const bool nextframe = g.frame_stride > g.frame_len;
  if (i < s.nrows) return nextline ? s.d->start + token_index(g, s.frame, s.r0 + i, g.patch_cols) : -1;
  const bool frame_ends = s.r0 + s.nrows == g.patch_rows && s.frame < g.frames - 1;
  return i == s.nrows && nextframe && frame_ends ? s.d->start + token_index(g, s.frame, g.patch_rows, 0) : -1;
}

// P > 0: patch size known at compile time (divisions fold); P == 0: runtime patch size `p_rt`. V: words per
// access (vector_words).
template <typename word_t, int P, int V, bool kLayout>
__global__ void __launch_bounds__(kThreads)
    pack_kernel(const ItemDesc* __restrict__ items, int64_t n_items, int64_t total, int64_t channels, int64_t p_rt,
                bool channels_last, Tiling tiling, word_t* __restrict__ out, int64_t out_row_stride,
                int32_t* __restrict__ positions, int8_t* __restrict__ kind, int64_t* __restrict__ patch_rows,
                int32_t* __restrict__ cu_seqlens) {
  using vec_t = Vec<word_t, V>;
  FLAGDIT_DYNAMIC_SMEM(smem_raw);
  word_t* tile = reinterpret_cast<word_t*>(smem_raw);
  const int p = P > 0 ? P : static_cast<int>(p_rt);
  const Segment s = find_segment<word_t, V>(items, n_items, p, channels, tiling);

  // Latent side: the segment's lines into the tile, V words at a time.
  const word_t* latent = reinterpret_cast<const word_t*>(s.d->addr);
  for_each_latent_run<V>(s, [&](int64_t staged, int64_t offset) {
    *reinterpret_cast<vec_t*>(tile + staged) = *reinterpret_cast<const vec_t*>(latent + offset);
  });
  __syncthreads();

  // Token side: each run of a token row gathered from the tile, then stored V words at a time.
  for_each_token_run<V>(s, channels, channels_last, [&](int64_t token, int rr, int t, int64_t column, int e0) {
    vec_t v;
    for (int j = 0; j < V; ++j) v.v[j] = tile[staged_element(s, e0 + j, rr, t, channels_last)];
    store_run(out + token * out_row_stride + column, v);
  });

  // Placeholder rows the segment closes: zeros.
  const int runs = s.cb * p * p / V;
  for (int i = threadIdx.x; i < (s.nrows + 1) * runs; i += blockDim.x) {
    const int64_t token = placeholder_slot(s, i / runs);
    if (token < 0) continue;
    vec_t zero;
    for (int j = 0; j < V; ++j) zero.v[j] = word_t(0);
    store_run(out + token * out_row_stride + token_column(s, (i % runs) * V, channels, channels_last), zero);
  }

  if (kLayout && blockIdx.y == 0) {
    // kind, positions and patch_rows of the segment's patch tokens and of the slots it closes, from locate().
    const ItemGeometry& g = s.d->g;
    const int tokens = s.nrows * s.ncols;
    for (int i = threadIdx.x; i < tokens + s.nrows + 1; i += blockDim.x) {
      const int64_t token = i < tokens ? s.d->start + token_index(g, s.frame, s.r0 + i / s.ncols, s.t0 + i % s.ncols)
                                       : placeholder_slot(s, i - tokens);
      if (token < 0) continue;
      const TokenPlace place = locate(g, token - s.d->start);
      kind[token] = place.kind;
      positions[3 * token] = static_cast<int32_t>(place.frame);
      positions[3 * token + 1] = static_cast<int32_t>(place.row);
      positions[3 * token + 2] = static_cast<int32_t>(place.col);
      if (place.kind == kPatch) patch_rows[s.d->patch_start + patch_index(g, place)] = token;
    }
    if (blockIdx.x == 0) {
      for (int64_t i = threadIdx.x; i <= n_items; i += blockDim.x) {
        cu_seqlens[i] = static_cast<int32_t>(i < n_items ? items[i].start : total);
      }
    }
  }
}

template <typename word_t, int P, int V>
__global__ void __launch_bounds__(kThreads)
    unpack_kernel(const ItemDesc* __restrict__ items, int64_t n_items, int64_t channels, int64_t p_rt,
                  bool channels_last, Tiling tiling, const word_t* __restrict__ tokens, int64_t row_stride,
                  int64_t col_stride) {
  using vec_t = Vec<word_t, V>;
  FLAGDIT_DYNAMIC_SMEM(smem_raw);
  word_t* tile = reinterpret_cast<word_t*>(smem_raw);
  const int p = P > 0 ? P : static_cast<int>(p_rt);
  const Segment s = find_segment<word_t, V>(items, n_items, p, channels, tiling);

  // Token side: the segment's patch rows (placeholder rows are not read), scattered into the tile.
  for_each_token_run<V>(s, channels, channels_last, [&](int64_t token, int rr, int t, int64_t column, int e0) {
    const word_t* row = tokens + token * row_stride;
    if (V > 1) {  // unit column stride (vector_words)
      const vec_t v = *reinterpret_cast<const vec_t*>(row + column);
      for (int j = 0; j < V; ++j) tile[staged_element(s, e0 + j, rr, t, channels_last)] = v.v[j];
    } else {
      tile[staged_element(s, e0, rr, t, channels_last)] = row[column * col_stride];
    }
  });
  __syncthreads();

  // Latent side: the tile's lines into the latent, V words at a time.
  word_t* latent = reinterpret_cast<word_t*>(s.d->addr);
  for_each_latent_run<V>(s, [&](int64_t staged, int64_t offset) {
    *reinterpret_cast<vec_t*>(latent + offset) = *reinterpret_cast<const vec_t*>(tile + staged);
  });
}

}  // namespace packing
}  // namespace flagdit
