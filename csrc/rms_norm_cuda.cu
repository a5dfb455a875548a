// RMSNorm forward and backward in CUDA C++: the "cuda" backend of fk.rms_norm.
//
// Semantics follow flagdit_kernels/reference/norms.py (Lumina-T2X): fp32 mean square and rstd, x * rstd
// rounded to x's dtype, times the weight in fp32, rounded again. The backward passes the roundings straight.
//
// Layout: x is (..., D) with a unit-stride last dim; the leading dims are read in place when they merge into
// one row stride (a row slice of a larger buffer, for instance), otherwise reshape() copies them once.
// Outputs are contiguous. One thread block normalizes one row at a time (grid-stride over rows):
//  * 16-byte vector loads/stores (8 x bf16/fp16, 4 x fp32) when D, the row strides and the pointers allow
//    it, else a scalar path with the same code;
//  * the first kMaxVecs vectors of each thread stay in registers between the two passes over the row (sum
//    of squares, then the output), so x is read from DRAM once; a longer row re-reads its tail from L1/L2;
//  * warp-shuffle reductions, combined across warps through 32 floats of shared memory.
// Backward: dweight is summed per block in shared memory (each thread owns fixed columns, so no atomics and
// no synchronization are needed), written as (blocks, D) fp32 partials and finished by one at::sum.
//
// The CUDA implementations of flagdit_kernels::rms_norm_fwd / rms_norm_bwd (schemas in csrc/bindings.cpp; the
// CPU ones are csrc/rms_norm_cpu.cpp; fake impls and autograd live in flagdit_kernels/ops/norms.py).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "rms_norm_checks.h"

namespace flagdit {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 1024;
// Vectors each thread keeps in registers across the two passes over a row. With 1024 threads this covers
// D <= 32768 (bf16/fp16) and D <= 16384 (fp32) without a second read.
constexpr int kMaxVecs = 4;
// The backward caches both x and dy: fewer vectors keep it near 64 registers (occupancy) for D <= 16384 bf16.
constexpr int kMaxVecsBwd = 2;
// Aim for this many vectors per thread when sizing a block: enough loads in flight, several rows per SM.
constexpr int kVecsPerThread = 2;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// ss plus the squares of one vector's elements, added one by one in fp32 (the summation order of the row).
template <typename T, int N>
__device__ __forceinline__ float add_squares(float ss, const Pack<T, N>& p) {
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float f = static_cast<float>(p.v[j]);
    ss += f * f;
  }
  return ss;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block, returned to every thread. blockDim.x is a multiple of 32.
__device__ __forceinline__ float block_sum(float v, float* shared) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // the previous row's reduction may still be reading `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  return warp_sum(lane < warps ? shared[lane] : 0.f);
}

template <typename T, typename W, int VEC>
__global__ void rms_norm_fwd_kernel(const T* __restrict__ x, const W* __restrict__ weight, T* __restrict__ y,
                                    float* __restrict__ rstd_out, int64_t rows, int D, int64_t x_stride,
                                    float eps) {
  using P = Pack<T, VEC>;
  using PW = Pack<W, VEC>;
  __shared__ float shared[kWarp];
  const int nvec = D / VEC;
  const PW* w = reinterpret_cast<const PW*>(weight);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const P* xr = reinterpret_cast<const P*>(x + row * x_stride);
    P* yr = reinterpret_cast<P*>(y + row * D);
    P cache[kMaxVecs];
    float ss = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxVecs; ++i) {
      const int vi = threadIdx.x + i * blockDim.x;
      if (vi < nvec) {
        cache[i] = xr[vi];
        ss = add_squares(ss, cache[i]);
      }
    }
    for (int vi = threadIdx.x + kMaxVecs * blockDim.x; vi < nvec; vi += blockDim.x) ss = add_squares(ss, xr[vi]);
    const float r = rsqrtf(block_sum(ss, shared) / static_cast<float>(D) + eps);
    if (threadIdx.x == 0) rstd_out[row] = r;

    auto emit = [&](const P& p, int vi) {
      P out;
      if (w != nullptr) {
        const PW wv = w[vi];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float n = round_to<T>(static_cast<float>(p.v[j]) * r);
          out.v[j] = static_cast<T>(n * static_cast<float>(wv.v[j]));
        }
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.v[j] = static_cast<T>(static_cast<float>(p.v[j]) * r);
      }
      yr[vi] = out;
    };
#pragma unroll
    for (int i = 0; i < kMaxVecs; ++i) {
      const int vi = threadIdx.x + i * blockDim.x;
      if (vi < nvec) emit(cache[i], vi);
    }
    for (int vi = threadIdx.x + kMaxVecs * blockDim.x; vi < nvec; vi += blockDim.x) emit(xr[vi], vi);
  }
}

template <typename T, typename W, int VEC>
__global__ void rms_norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const W* __restrict__ weight,
                                    const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ dw_part,
                                    int64_t rows, int D, int64_t dy_stride, int64_t x_stride) {
  using P = Pack<T, VEC>;
  using PW = Pack<W, VEC>;
  __shared__ float shared[kWarp];
  // dweight accumulators, D floats, stored [j][vi] so that a warp touches consecutive banks. Thread t owns
  // the vectors vi = t, t + blockDim.x, ... in every row, so nobody else ever reads or writes its slots.
  extern __shared__ float dw_acc[];
  const int nvec = D / VEC;
  const PW* w = reinterpret_cast<const PW*>(weight);
  if (w != nullptr) {
    for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) dw_acc[j * nvec + vi] = 0.f;
    }
  }
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const P* xr = reinterpret_cast<const P*>(x + row * x_stride);
    const P* dyr = reinterpret_cast<const P*>(dy + row * dy_stride);
    P* dxr = reinterpret_cast<P*>(dx + row * D);
    const float r = rstd[row];
    P xc[kMaxVecsBwd];
    P dyc[kMaxVecsBwd];

    // Pass 1: dn = dy * w; dot = sum(dn * xhat); dweight += dy * round(xhat).
    auto accumulate = [&](const P& xp, const P& dyp, int vi) {
      float dot = 0.f;
      PW wv;
      if (w != nullptr) wv = w[vi];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xhat = static_cast<float>(xp.v[j]) * r;
        const float g = static_cast<float>(dyp.v[j]);
        if (w != nullptr) {
          dw_acc[j * nvec + vi] += g * round_to<T>(xhat);
          dot += g * static_cast<float>(wv.v[j]) * xhat;
        } else {
          dot += g * xhat;
        }
      }
      return dot;
    };
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxVecsBwd; ++i) {
      const int vi = threadIdx.x + i * blockDim.x;
      if (vi < nvec) {
        xc[i] = xr[vi];
        dyc[i] = dyr[vi];
        dot += accumulate(xc[i], dyc[i], vi);
      }
    }
    for (int vi = threadIdx.x + kMaxVecsBwd * blockDim.x; vi < nvec; vi += blockDim.x) {
      dot += accumulate(xr[vi], dyr[vi], vi);
    }
    const float c = block_sum(dot, shared) / static_cast<float>(D);

    // Pass 2: dx = rstd * (dn - xhat * mean(dn * xhat)).
    auto emit = [&](const P& xp, const P& dyp, int vi) {
      P out;
      PW wv;
      if (w != nullptr) wv = w[vi];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float xhat = static_cast<float>(xp.v[j]) * r;
        float dn = static_cast<float>(dyp.v[j]);
        if (w != nullptr) dn *= static_cast<float>(wv.v[j]);
        out.v[j] = static_cast<T>(r * (dn - xhat * c));
      }
      dxr[vi] = out;
    };
#pragma unroll
    for (int i = 0; i < kMaxVecsBwd; ++i) {
      const int vi = threadIdx.x + i * blockDim.x;
      if (vi < nvec) emit(xc[i], dyc[i], vi);
    }
    for (int vi = threadIdx.x + kMaxVecsBwd * blockDim.x; vi < nvec; vi += blockDim.x) emit(xr[vi], dyr[vi], vi);
  }
  if (w != nullptr) {
    float* part = dw_part + static_cast<int64_t>(blockIdx.x) * D;
    for (int vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) part[vi * VEC + j] = dw_acc[j * nvec + vi];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side. Only device-generic c10 headers (DeviceGuard, Stream) and the CUDA runtime are used: a CPU
// build of torch ships incomplete c10/cuda and ATen/cuda headers, and the compile-only CI check uses one.

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "rms_norm (cuda): ", what, ": ", cudaGetErrorString(err));
}

int device_attribute(cudaDeviceAttr attr) {
  int device = 0;
  int value = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&value, attr, device), "cudaDeviceGetAttribute");
  return value;
}

cudaStream_t current_stream(const c10::Device& device) {
  return static_cast<cudaStream_t>(
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device).native_handle());
}

int threads_for(int nvec) {
  int per = (nvec + kVecsPerThread - 1) / kVecsPerThread;
  int threads = ((per + kWarp - 1) / kWarp) * kWarp;
  return threads < kWarp ? kWarp : (threads > kMaxThreads ? kMaxThreads : threads);
}

// Blocks for a grid-stride loop over rows: the SM count times the blocks of `threads` threads (and `smem` dynamic
// shared bytes) an SM holds for this kernel, as the occupancy calculator reports from its registers.
template <typename Kernel>
int64_t grid_for(Kernel kernel, int64_t rows, int threads, size_t smem) {
  int per_sm = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem),
             "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  const int64_t cap = static_cast<int64_t>(device_attribute(cudaDevAttrMultiProcessorCount)) * (per_sm > 0 ? per_sm : 1);
  return rows < cap ? rows : cap;
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

// (rows, D) view of x with a unit-stride last dim: a view when the leading dims merge, else a copy.
at::Tensor rows_view(const at::Tensor& t) {
  const int64_t D = t.size(-1);
  const at::Tensor u = (t.stride(-1) == 1 || D == 1) ? t : t.contiguous();
  return u.reshape({-1, D});
}

struct Weight {
  at::Tensor t;  // undefined when there is no weight
  bool is_float = false;
};

// The weight as the kernels read it: in x's dtype or in fp32 (any other dtype is converted once, D elements).
Weight prepare_weight(const std::optional<at::Tensor>& weight, const at::Tensor& x) {
  Weight w;
  if (!weight.has_value() || !weight->defined()) return w;
  w.t = weight->scalar_type() == x.scalar_type() ? weight->contiguous() : weight->to(at::kFloat).contiguous();
  w.is_float = w.t.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
  return w;
}

template <typename T, typename W>
void launch_fwd(const at::Tensor& x2, const at::Tensor& w, at::Tensor& y, at::Tensor& rstd, double eps) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t rows = x2.size(0);
  const int D = static_cast<int>(x2.size(1));
  const T* xp = x2.data_ptr<T>();
  const W* wp = w.defined() ? w.data_ptr<W>() : nullptr;
  T* yp = y.data_ptr<T>();
  const bool vec = D % kVec == 0 && x2.stride(0) % kVec == 0 && aligned(xp, 16) && aligned(yp, 16) &&
                   (wp == nullptr || aligned(wp, sizeof(W) * kVec));
  const int nvec = vec ? D / kVec : D;
  const int threads = threads_for(nvec);
  const cudaStream_t stream = current_stream(x2.device());
  auto kernel = vec ? rms_norm_fwd_kernel<T, W, kVec> : rms_norm_fwd_kernel<T, W, 1>;
  const int64_t grid = grid_for(kernel, rows, threads, 0);
  kernel<<<grid, threads, 0, stream>>>(xp, wp, yp, rstd.data_ptr<float>(), rows, D, x2.stride(0),
                                       static_cast<float>(eps));
  check_cuda(cudaGetLastError(), "kernel launch");
}

template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes) {
  const size_t limit = static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  TORCH_CHECK(bytes + kWarp * sizeof(float) <= limit, "rms_norm (cuda): D = ", bytes / sizeof(float),
              " needs more shared memory for the weight gradient than this device offers; use backend='triton'");
  if (bytes > 48 * 1024) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               "cudaFuncSetAttribute");
  }
}

// Launches the backward over a grid sized for the kernel's residency and returns the (blocks, D) fp32 weight
// gradient partials (undefined without a weight).
template <typename T, typename W>
at::Tensor launch_bwd(const at::Tensor& dy2, const at::Tensor& x2, const at::Tensor& w, const at::Tensor& rstd,
                      at::Tensor& dx, int threads, bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t rows = x2.size(0);
  const int D = static_cast<int>(x2.size(1));
  const W* wp = w.defined() ? w.data_ptr<W>() : nullptr;
  const size_t smem = w.defined() ? static_cast<size_t>(D) * sizeof(float) : 0;
  const cudaStream_t stream = current_stream(x2.device());
  auto kernel = vec ? rms_norm_bwd_kernel<T, W, kVec> : rms_norm_bwd_kernel<T, W, 1>;
  allow_shared(kernel, smem);
  const int64_t grid = grid_for(kernel, rows, threads, smem);
  at::Tensor dw_part = w.defined() ? at::empty({grid, D}, x2.options().dtype(at::kFloat)) : at::Tensor();
  kernel<<<grid, threads, smem, stream>>>(dy2.data_ptr<T>(), x2.data_ptr<T>(), wp, rstd.data_ptr<float>(),
                                          dx.data_ptr<T>(), w.defined() ? dw_part.data_ptr<float>() : nullptr, rows,
                                          D, dy2.stride(0), x2.stride(0));
  check_cuda(cudaGetLastError(), "kernel launch");
  return dw_part;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda_fwd(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                                     double eps) {
  check_rms_norm_fwd_args("rms_norm_cuda_fwd", x, weight, eps, at::kCUDA);
  const c10::DeviceGuard guard(x.device());
  const at::Tensor x2 = rows_view(x);
  const Weight w = prepare_weight(weight, x);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor rstd = at::empty({x2.size(0)}, x.options().dtype(at::kFloat));
  if (x2.size(0) == 0) return {y, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_cuda_fwd", [&] {
    if (w.is_float) {
      launch_fwd<scalar_t, float>(x2, w.t, y, rstd, eps);
    } else {
      launch_fwd<scalar_t, scalar_t>(x2, w.t, y, rstd, eps);
    }
  });
  return {y, rstd};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_cuda_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                     const std::optional<at::Tensor>& weight,
                                                     const at::Tensor& rstd) {
  check_rms_norm_bwd_args("rms_norm_cuda_bwd", dy, x, weight, rstd, at::kCUDA);
  const c10::DeviceGuard guard(x.device());
  const at::Tensor x2 = rows_view(x);
  const at::Tensor dy2 = rows_view(dy.scalar_type() == x.scalar_type() ? dy : dy.to(x.scalar_type()));
  const at::Tensor rstd_c = rstd.to(at::kFloat).contiguous();
  const Weight w = prepare_weight(weight, x);
  const int64_t rows = x2.size(0);
  const int64_t D = x2.size(1);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  if (rows == 0) {
    at::Tensor dw = w.t.defined() ? at::zeros_like(*weight) : at::empty({0}, x.options());
    return {dx, dw};
  }
  const int vec_elems = static_cast<int>(16 / x.element_size());
  const bool vec = D % vec_elems == 0 && x2.stride(0) % vec_elems == 0 && dy2.stride(0) % vec_elems == 0 &&
                   aligned(x2.data_ptr(), 16) && aligned(dy2.data_ptr(), 16) && aligned(dx.data_ptr(), 16) &&
                   (!w.t.defined() || aligned(w.t.data_ptr(), w.t.element_size() * vec_elems));
  const int threads = threads_for(static_cast<int>(vec ? D / vec_elems : D));
  at::Tensor dw_part;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm_cuda_bwd", [&] {
    if (w.is_float) {
      dw_part = launch_bwd<scalar_t, float>(dy2, x2, w.t, rstd_c, dx, threads, vec);
    } else {
      dw_part = launch_bwd<scalar_t, scalar_t>(dy2, x2, w.t, rstd_c, dx, threads, vec);
    }
  });
  at::Tensor dw = w.t.defined() ? dw_part.sum(0).to(weight->scalar_type()) : at::empty({0}, x.options());
  return {dx, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(flagdit_kernels, CUDA, m) {
  m.impl("rms_norm_fwd", &rms_norm_cuda_fwd);
  m.impl("rms_norm_bwd", &rms_norm_cuda_bwd);
}

}  // namespace flagdit
