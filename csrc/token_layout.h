// Geometry of one packed item: where each of its tokens comes from in its (C, F, H, W) latent, and the
// (frame, row, col) position each token gets, placeholders included. The one statement of the token layout in
// C++, shared by the CPU and CUDA pack/unpack kernels; flagdit_kernels/triton/packing.py holds its Triton twin
// (tests/test_packing_token_layout.py checks the two against each other and the reference).
//
// Placeholder positions: a [nextline] slot closing patch row r of frame f sits at (f, r, W/p), right after the
// row's last patch; a [nextframe] slot after frame f sits at (f, H/p, 0), the row right after the frame's last.
//
// Two token orders, the positions being the same in both: raster (rows of patches, each closed by its [nextline]
// slot, [nextframe] slots between frames) and tile-major (TileShape t, h, w > 0): the patches tile by tile, a
// tile being t frames x h rows x w columns of patches (edge tiles partial), tiles in (frame, row, col) raster
// order and patches in raster order inside a tile; then every placeholder slot, in the order raster packing
// gives them.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FLAGDIT_HD __host__ __device__ __forceinline__
#else
#define FLAGDIT_HD inline
#endif

namespace flagdit {

enum TokenKind : int8_t { kPatch = 0, kNextline = 1, kNextframe = 2 };

// Tile of a tile-major order, in patches; all zero: raster order.
struct TileShape {
  int64_t t = 0, h = 0, w = 0;
  FLAGDIT_HD bool tiled() const { return t > 0; }
};

FLAGDIT_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

struct ItemGeometry {
  int64_t frames, height, width;  // latent F, H, W (F = 1 for images)
  int64_t patch_rows, patch_cols;  // H / p, W / p
  int64_t row_len;                 // patch_cols + nextline slot
  int64_t frame_len;               // tokens of one frame without the nextframe slot
  int64_t frame_stride;            // frame_len + nextframe slot
  int64_t tokens;                  // all tokens of the item
  int64_t patches;                 // patch tokens: frames * patch_rows * patch_cols
  int64_t slots_per_frame;         // placeholder slots per frame (its [nextline]s and its [nextframe])
  TileShape tile;                  // tile-major order when tile.tiled()

  // p >= 1, tile sizes all positive or all zero (callers check: a zero divides by zero here).
  FLAGDIT_HD static ItemGeometry make(int64_t f, int64_t h, int64_t w, int64_t p, bool nextline, bool nextframe,
                                      TileShape tile = TileShape{}) {
    ItemGeometry g{};
    g.frames = f;
    g.height = h;
    g.width = w;
    g.patch_rows = h / p;
    g.patch_cols = w / p;
    g.row_len = g.patch_cols + (nextline ? 1 : 0);
    g.frame_len = g.patch_rows * g.row_len;
    g.frame_stride = g.frame_len + (nextframe ? 1 : 0);
    g.tokens = f * g.frame_len + (nextframe ? f - 1 : 0);
    g.patches = f * g.patch_rows * g.patch_cols;
    g.slots_per_frame = g.frame_stride - g.patch_rows * g.patch_cols;
    g.tile = tile;
    return g;
  }
};

// Where token `local` (index inside its item) sits: its kind and its (frame, row, col) position; for a patch
// token that is the patch's place in the item's patch grid.
struct TokenPlace {
  int8_t kind;
  int64_t frame, row, col;
};

// Tile-major: where token `local` sits (see the top of the file).
FLAGDIT_HD TokenPlace locate_tiled(const ItemGeometry& g, int64_t local) {
  TokenPlace t{};
  if (local >= g.patches) {  // the placeholder slots, frame by frame: [nextline]s, then the [nextframe]
    const int64_t slot = local - g.patches;
    t.frame = slot / g.slots_per_frame;
    const int64_t in_frame = slot - t.frame * g.slots_per_frame;
    const int64_t nextlines = g.row_len > g.patch_cols ? g.patch_rows : 0;
    t.kind = in_frame == nextlines ? kNextframe : kNextline;
    t.row = in_frame == nextlines ? g.patch_rows : in_frame;
    t.col = in_frame == nextlines ? 0 : g.patch_cols;
    return t;
  }
  const TileShape& s = g.tile;
  const int64_t slab = s.t * g.patch_rows * g.patch_cols;  // tokens of a full slab of tile frames
  const int64_t a = local / slab;
  const int64_t tf = min64(s.t, g.frames - a * s.t);  // frames of this slab's tiles
  int64_t rest = local - a * slab;
  const int64_t b = rest / (s.h * g.patch_cols * tf);
  const int64_t hb = min64(s.h, g.patch_rows - b * s.h);  // rows of this band's tiles
  rest -= b * s.h * g.patch_cols * tf;
  const int64_t c = rest / (s.w * tf * hb);
  const int64_t wc = min64(s.w, g.patch_cols - c * s.w);  // columns of this tile
  rest -= c * s.w * tf * hb;
  const int64_t df = rest / (hb * wc);
  rest -= df * hb * wc;
  const int64_t dr = rest / wc;
  t.kind = kPatch;
  t.frame = a * s.t + df;
  t.row = b * s.h + dr;
  t.col = c * s.w + rest - dr * wc;
  return t;
}

FLAGDIT_HD TokenPlace locate(const ItemGeometry& g, int64_t local) {
  if (g.tile.tiled()) return locate_tiled(g, local);
  TokenPlace t{};
  t.frame = local / g.frame_stride;
  const int64_t in_frame = local - t.frame * g.frame_stride;
  if (in_frame == g.frame_len) {
    t.kind = kNextframe;
    t.row = g.patch_rows;
    t.col = 0;
    return t;
  }
  t.row = in_frame / g.row_len;
  t.col = in_frame - t.row * g.row_len;
  t.kind = t.col == g.patch_cols ? kNextline : kPatch;
  return t;
}

// Index inside its item of the token at position (frame, row, col): the inverse of locate(), placeholders
// included (a [nextline] slot's col is patch_cols, a [nextframe] slot's row is patch_rows).
FLAGDIT_HD int64_t token_index(const ItemGeometry& g, int64_t frame, int64_t row, int64_t col) {
  if (!g.tile.tiled()) return frame * g.frame_stride + row * g.row_len + col;
  if (row == g.patch_rows) return g.patches + frame * g.slots_per_frame + g.slots_per_frame - 1;  // [nextframe]
  if (col == g.patch_cols) return g.patches + frame * g.slots_per_frame + row;                     // [nextline]
  const TileShape& s = g.tile;
  const int64_t a = frame / s.t, b = row / s.h, c = col / s.w;
  const int64_t tf = min64(s.t, g.frames - a * s.t);
  const int64_t hb = min64(s.h, g.patch_rows - b * s.h);
  const int64_t wc = min64(s.w, g.patch_cols - c * s.w);
  return a * s.t * g.patch_rows * g.patch_cols + b * s.h * g.patch_cols * tf + c * s.w * tf * hb +
         ((frame - a * s.t) * hb + row - b * s.h) * wc + col - c * s.w;
}

// Index of a patch token among the item's patch tokens (frame-major, then rows, then columns).
FLAGDIT_HD int64_t patch_index(const ItemGeometry& g, const TokenPlace& t) {
  return (t.frame * g.patch_rows + t.row) * g.patch_cols + t.col;
}

// Offset inside a patch vector of element (channel, ph, pw): (C, ph, pw) order or (ph, pw, C) order.
FLAGDIT_HD int64_t vector_offset(int64_t ch, int64_t ph, int64_t pw, int64_t p, int64_t channels,
                                 bool channels_last) {
  return channels_last ? (ph * p + pw) * channels + ch : (ch * p + ph) * p + pw;
}

}  // namespace flagdit
