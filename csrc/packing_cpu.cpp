// CPU pack/unpack: gathers latent patches into packed token rows and back, parallel over tokens.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "packing_host.h"
#include "token_layout.h"

namespace flagdit {
namespace {

struct Batch {
  std::vector<ItemGeometry> items;
  std::vector<int64_t> starts;  // first packed token of each item, plus the total at the end
};

Batch make_batch(const std::vector<std::vector<int64_t>>& fhw, int64_t p, bool nextline, bool nextframe,
                 TileShape tile) {
  Batch b;
  b.starts.push_back(0);
  for (const auto& s : fhw) {
    b.items.push_back(ItemGeometry::make(s[0], s[1], s[2], p, nextline, nextframe, tile));
    b.starts.push_back(b.starts.back() + b.items.back().tokens);
  }
  return b;
}

int64_t item_of(const Batch& b, int64_t token) {
  return std::upper_bound(b.starts.begin(), b.starts.end(), token) - b.starts.begin() - 1;
}

constexpr int64_t kGrain = 64;

// Packs the latents into (total, C*p*p) rows; with `layout` also writes positions, kind, patch_rows and
// cu_seqlens from the same pass over the tokens.
std::vector<at::Tensor> pack_cpu(at::TensorList latents, int64_t p, bool nextline, bool nextframe, bool channels_last,
                                 std::optional<int64_t> total_tokens, bool layout, at::IntArrayRef tile) {
  check_latents("pack_patches (cpu)", latents, p, at::kCPU);
  const TileShape tiling = check_tile("pack_patches (cpu)", tile);
  const int64_t channels = latents[0].size(0);
  std::vector<std::vector<int64_t>> fhw;
  for (const auto& x : latents) fhw.push_back(latent_fhw(x));
  const Batch batch = make_batch(fhw, p, nextline, nextframe, tiling);
  const int64_t total = batch.starts.back();
  TORCH_CHECK(!total_tokens || *total_tokens == total, "pack_patches: total_tokens disagrees with the shapes");
  const int64_t width = channels * p * p;
  std::vector<at::Tensor> result{at::empty({total, width}, latents[0].options())};
  int32_t* positions = nullptr;
  int8_t* kind = nullptr;
  int64_t* patch_rows = nullptr;
  // First patch index of every item, for patch_rows.
  std::vector<int64_t> patch_starts{0};
  for (const auto& g : batch.items) patch_starts.push_back(patch_starts.back() + g.frames * g.patch_rows * g.patch_cols);
  if (layout) {
    append_layout_outputs(result, total, patch_starts.back(), static_cast<int64_t>(batch.items.size()),
                          latents[0].options());
    positions = result[1].data_ptr<int32_t>();
    kind = result[2].data_ptr<int8_t>();
    patch_rows = result[3].data_ptr<int64_t>();
    int32_t* cu = result[4].data_ptr<int32_t>();
    for (size_t i = 0; i < batch.starts.size(); ++i) cu[i] = static_cast<int32_t>(batch.starts[i]);
  }
  std::vector<std::vector<int64_t>> strides;
  for (const auto& x : latents) strides.push_back(cfhw_strides(x));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, result[0].scalar_type(), "pack_patches_cpu", [&] {
    std::vector<const scalar_t*> src;
    for (const auto& x : latents) src.push_back(x.data_ptr<scalar_t>());
    scalar_t* dst_base = result[0].data_ptr<scalar_t>();
    at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t token = begin; token < end; ++token) {
        scalar_t* dst = dst_base + token * width;
        const int64_t i = item_of(batch, token);
        const ItemGeometry& g = batch.items[i];
        const TokenPlace place = locate(g, token - batch.starts[i]);
        if (layout) {
          positions[3 * token] = static_cast<int32_t>(place.frame);
          positions[3 * token + 1] = static_cast<int32_t>(place.row);
          positions[3 * token + 2] = static_cast<int32_t>(place.col);
          kind[token] = place.kind;
          if (place.kind == kPatch) patch_rows[patch_starts[i] + patch_index(g, place)] = token;
        }
        if (place.kind != kPatch) {
          std::fill(dst, dst + width, scalar_t(0));
          continue;
        }
        const auto& s = strides[i];
        const scalar_t* frame = src[i] + place.frame * s[1];
        for (int64_t ch = 0; ch < channels; ++ch) {
          for (int64_t ph = 0; ph < p; ++ph) {
            const scalar_t* line = frame + ch * s[0] + (place.row * p + ph) * s[2] + place.col * p * s[3];
            for (int64_t pw = 0; pw < p; ++pw) {
              dst[vector_offset(ch, ph, pw, p, channels, channels_last)] = line[pw * s[3]];
            }
          }
        }
      }
    });
  });
  return result;
}

at::Tensor pack_patches_cpu(at::TensorList latents, int64_t p, bool nextline, bool nextframe, bool channels_last,
                            int64_t total_tokens, at::IntArrayRef tile) {
  return pack_cpu(latents, p, nextline, nextframe, channels_last, total_tokens, false, tile)[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> pack_patches_layout_cpu(
    at::TensorList latents, int64_t p, bool nextline, bool nextframe, bool channels_last, at::IntArrayRef tile) {
  auto r = pack_cpu(latents, p, nextline, nextframe, channels_last, std::nullopt, true, tile);
  return {r[0], r[1], r[2], r[3], r[4]};
}

std::vector<at::Tensor> unpack_patches_cpu(const at::Tensor& tokens, at::IntArrayRef item_shapes, int64_t p,
                                           int64_t channels, bool nextline, bool nextframe, bool channels_last,
                                           at::IntArrayRef tile) {
  check_unpack_args("unpack_patches (cpu)", tokens, item_shapes, p, channels, at::kCPU);
  const TileShape tiling = check_tile("unpack_patches (cpu)", tile);
  std::vector<at::Tensor> outs = unpack_outputs(item_shapes, channels, tokens.options());
  std::vector<std::vector<int64_t>> fhw;
  for (const auto& o : outs) fhw.push_back(latent_fhw(o));
  const Batch batch = make_batch(fhw, p, nextline, nextframe, tiling);
  TORCH_CHECK(batch.starts.back() == tokens.size(0), "unpack_patches: tokens.shape[0] disagrees with the shapes");
  const int64_t row_stride = tokens.stride(0), col_stride = tokens.stride(1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "unpack_patches_cpu", [&] {
    std::vector<scalar_t*> dst;
    for (auto& o : outs) dst.push_back(o.data_ptr<scalar_t>());
    const scalar_t* src_base = tokens.data_ptr<scalar_t>();
    at::parallel_for(0, tokens.size(0), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t token = begin; token < end; ++token) {
        const int64_t i = item_of(batch, token);
        const ItemGeometry& g = batch.items[i];
        const TokenPlace place = locate(g, token - batch.starts[i]);
        if (place.kind != kPatch) continue;
        const scalar_t* src = src_base + token * row_stride;
        const int64_t plane = g.height * g.width, channel_stride = g.frames * plane;
        scalar_t* frame = dst[i] + place.frame * plane;
        for (int64_t ch = 0; ch < channels; ++ch) {
          for (int64_t ph = 0; ph < p; ++ph) {
            scalar_t* line = frame + ch * channel_stride + (place.row * p + ph) * g.width + place.col * p;
            for (int64_t pw = 0; pw < p; ++pw) {
              line[pw] = src[vector_offset(ch, ph, pw, p, channels, channels_last) * col_stride];
            }
          }
        }
      }
    });
  });
  return outs;
}

}  // namespace

TORCH_LIBRARY_IMPL(flagdit_kernels, CPU, m) {
  m.impl("pack_patches", &pack_patches_cpu);
  m.impl("pack_patches_layout", &pack_patches_layout_cpu);
  m.impl("unpack_patches", &unpack_patches_cpu);
}

}  // namespace flagdit
