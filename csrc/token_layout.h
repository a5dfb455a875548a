// Geometry of one packed item: where each of its tokens comes from in its (C, F, H, W) latent, and the
// (frame, row, col) position each token gets, placeholders included. The one statement of the token layout in
// C++, shared by the CPU and CUDA pack/unpack kernels; flagdit_kernels/triton/packing.py holds its Triton twin
// (tests/test_token_layout.py checks the two against each other and the reference).
//
// Placeholder positions: a [nextline] slot closing patch row r of frame f sits at (f, r, W/p), right after the
// row's last patch; a [nextframe] slot after frame f sits at (f, H/p, 0), the row right after the frame's last.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FLAGDIT_HD __host__ __device__ __forceinline__
#else
#define FLAGDIT_HD inline
#endif

namespace flagdit {

enum TokenKind : int8_t { kPatch = 0, kNextline = 1, kNextframe = 2 };

struct ItemGeometry {
  int64_t frames, height, width;  // latent F, H, W (F = 1 for images)
  int64_t patch_rows, patch_cols;  // H / p, W / p
  int64_t row_len;                 // patch_cols + nextline slot
  int64_t frame_len;               // tokens of one frame without the nextframe slot
  int64_t frame_stride;            // frame_len + nextframe slot
  int64_t tokens;                  // all tokens of the item

  // p >= 1 (callers check: a zero patch size divides by zero here).
  FLAGDIT_HD static ItemGeometry make(int64_t f, int64_t h, int64_t w, int64_t p, bool nextline, bool nextframe) {
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
    return g;
  }
};

// Where token `local` (index inside its item) sits: its kind and its (frame, row, col) position; for a patch
// token that is the patch's place in the item's patch grid.
struct TokenPlace {
  int8_t kind;
  int64_t frame, row, col;
};

FLAGDIT_HD TokenPlace locate(const ItemGeometry& g, int64_t local) {
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
  return frame * g.frame_stride + row * g.row_len + col;
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
