// csrc/token_layout.h behind a C interface, so that tests compare the one C++ statement of the token layout
// with the reference and with its Triton twin (tests/test_packing_token_layout.py builds this with g++).
#include <cstdint>

#include "token_layout.h"

// Every token of one item: its kind, its (frame, row, col) position and, for a patch, its patch index (-1 for a
// placeholder), in the order of tile (tile_t, tile_h, tile_w: all zero for raster order). Returns the item's token
// count; the arrays hold at least that many entries (positions 3 each). token_index() must invert locate().
extern "C" int64_t item_layout(int64_t frames, int64_t height, int64_t width, int64_t p, int nextline, int nextframe,
                               int64_t tile_t, int64_t tile_h, int64_t tile_w, int8_t* kind, int64_t* positions,
                               int64_t* patch) {
  flagdit::TileShape tile;
  tile.t = tile_t;
  tile.h = tile_h;
  tile.w = tile_w;
  const flagdit::ItemGeometry g = flagdit::ItemGeometry::make(frames, height, width, p, nextline, nextframe, tile);
  for (int64_t t = 0; t < g.tokens; ++t) {
    const flagdit::TokenPlace place = flagdit::locate(g, t);
    if (flagdit::token_index(g, place.frame, place.row, place.col) != t) return -1;
    kind[t] = place.kind;
    positions[3 * t] = place.frame;
    positions[3 * t + 1] = place.row;
    positions[3 * t + 2] = place.col;
    patch[t] = place.kind == flagdit::kPatch ? flagdit::patch_index(g, place) : -1;
  }
  return g.tokens;
}
