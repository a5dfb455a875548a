// csrc/token_layout.h behind a C interface, so that tests compare the one C++ statement of the token layout
// with the reference and with its Triton twin (tests/test_token_layout.py builds this with g++).
#include <cstdint>

#include "token_layout.h"

// Every token of one item: its kind, its (frame, row, col) position and, for a patch, its patch index (-1 for a
// placeholder). Returns the item's token count; the arrays hold at least that many entries (positions 3 each).
extern "C" int64_t item_layout(int64_t frames, int64_t height, int64_t width, int64_t p, int nextline, int nextframe,
                               int8_t* kind, int64_t* positions, int64_t* patch) {
  const flagdit::ItemGeometry g = flagdit::ItemGeometry::make(frames, height, width, p, nextline, nextframe);
  for (int64_t t = 0; t < g.tokens; ++t) {
    const flagdit::TokenPlace place = flagdit::locate(g, t);
    kind[t] = place.kind;
    positions[3 * t] = place.frame;
    positions[3 * t + 1] = place.row;
    positions[3 * t + 2] = place.col;
    patch[t] = place.kind == flagdit::kPatch ? flagdit::patch_index(g, place) : -1;
  }
  return g.tokens;
}
