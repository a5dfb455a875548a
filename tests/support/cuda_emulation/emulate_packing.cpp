// Runs the CUDA pack/unpack kernels of csrc/packing_kernels.cuh, unchanged, on the CPU: every block's threads
// are std::threads meeting at a real barrier for __syncthreads(), shared memory is one buffer per block
// (filled with 0xFF bytes so that reading an unwritten element shows up as NaN), blocks run one at a time.
// Built by tests/test_packing_cuda_emulated.py with g++ into a shared library and called through ctypes.
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#define FLAGDIT_EMULATE_CUDA
namespace emu {
struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

class Barrier {
 public:
  explicit Barrier(unsigned n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const unsigned gen = generation_;
    if (++waiting_ == n_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen != generation_; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  unsigned n_, waiting_ = 0, generation_ = 0;
};

inline thread_local Dim3 thread_idx;
inline Dim3 block_idx, block_dim;
inline std::vector<unsigned char> dynamic_smem;
inline Barrier* barrier = nullptr;

template <typename Body>
void launch(Dim3 grid, unsigned threads, size_t smem_bytes, Body body) {
  block_dim = {threads, 1, 1};
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      block_idx = {bx, by, 0};
      dynamic_smem.assign(smem_bytes + 16, 0xFF);
      Barrier bar(threads);
      barrier = &bar;
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads; ++t) {
        pool.emplace_back([t, &body] {
          thread_idx = {t, 0, 0};
          body();
        });
      }
      for (auto& th : pool) th.join();
    }
  }
}
}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define __syncthreads() emu::barrier->wait()
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define FLAGDIT_DYNAMIC_SMEM(name) unsigned char* name = emu::dynamic_smem.data()
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

#include "packing_kernels.cuh"

using namespace flagdit::packing;

namespace {

std::vector<int64_t> copy(const int64_t* p, size_t n) { return std::vector<int64_t>(p, p + n); }

// A batch as both entry points see it: its item table, token count, tiling and launch grid.
struct Batch {
  std::vector<ItemDesc> items;
  int64_t total = 0;
  Tiling tiling;
  emu::Dim3 grid;
};

Batch make_batch(int64_t n_items, const int64_t* fhw, const int64_t* strides, const int64_t* addrs,
                 int64_t channels, int64_t p, int nextline, int nextframe, const int64_t* tile) {
  Batch b;
  flagdit::TileShape order;
  order.t = tile[0];
  order.h = tile[1];
  order.w = tile[2];
  int64_t patches = 0, segments = 0;
  const std::vector<int64_t> dims = copy(fhw, 3 * n_items);
  const auto [max_rows, max_cols] = max_patch_grid(dims, p);
  b.tiling = make_tiling(channels, p, max_rows, max_cols);
  b.items = make_items(dims, copy(strides, 4 * n_items), copy(addrs, n_items), p, nextline, nextframe, order,
                       b.tiling, &b.total, &patches, &segments);
  b.grid = {static_cast<unsigned>(segments), static_cast<unsigned>(ceil_div(channels, b.tiling.channels)), 1};
  return b;
}

}  // namespace

// fhw: (F, H, W) per item; strides: (C, F, H, W) element strides per item; addrs: latent addresses; tile: the
// token order's tile (t, h, w), all zero for raster order.
// Returns the number of tokens, or -1 for an unsupported element size. *vec receives the words per access used.
extern "C" int64_t emu_pack(int64_t elem_size, int64_t n_items, const int64_t* fhw, const int64_t* strides,
                            const int64_t* addrs, int64_t channels, int64_t p, int nextline, int nextframe,
                            int channels_last, const int64_t* tile, int layout, void* out, int64_t out_row_stride,
                            int32_t* positions, int8_t* kind, int64_t* patch_rows, int32_t* cu_seqlens, int* vec_used) {
  const Batch b = make_batch(n_items, fhw, strides, addrs, channels, p, nextline, nextframe, tile);
  const int vec = vector_words(b.items, elem_size, p, channels, b.tiling, channels_last,
                               reinterpret_cast<int64_t>(out), out_row_stride, 1);
  *vec_used = vec;
  const bool ok = dispatch_kernel(elem_size, p, vec, [&](auto word, auto pc, auto vc) {
    using word_t = decltype(word);
    constexpr int P = decltype(pc)::value, V = decltype(vc)::value;
    emu::launch(b.grid, kThreads, tile_smem_bytes<word_t, V>(b.tiling, p), [&] {
      auto kernel = layout ? pack_kernel<word_t, P, V, true> : pack_kernel<word_t, P, V, false>;
      kernel(b.items.data(), n_items, b.total, channels, p, channels_last, b.tiling, static_cast<word_t*>(out),
             out_row_stride, positions, kind, patch_rows, cu_seqlens);
    });
  });
  return ok ? b.total : -1;
}

extern "C" int64_t emu_unpack(int64_t elem_size, int64_t n_items, const int64_t* fhw, const int64_t* strides,
                              const int64_t* addrs, int64_t channels, int64_t p, int nextline, int nextframe,
                              int channels_last, const int64_t* tile, const void* tokens, int64_t row_stride, int64_t col_stride,
                              int* vec_used) {
  const Batch b = make_batch(n_items, fhw, strides, addrs, channels, p, nextline, nextframe, tile);
  const int vec = vector_words(b.items, elem_size, p, channels, b.tiling, channels_last,
                               reinterpret_cast<int64_t>(tokens), row_stride, col_stride);
  *vec_used = vec;
  const bool ok = dispatch_kernel(elem_size, p, vec, [&](auto word, auto pc, auto vc) {
    using word_t = decltype(word);
    constexpr int P = decltype(pc)::value, V = decltype(vc)::value;
    emu::launch(b.grid, kThreads, tile_smem_bytes<word_t, V>(b.tiling, p), [&] {
      unpack_kernel<word_t, P, V>(b.items.data(), n_items, channels, p, channels_last, b.tiling,
                                  static_cast<const word_t*>(tokens), row_stride, col_stride);
    });
  });
  return ok ? b.total : -1;
}
