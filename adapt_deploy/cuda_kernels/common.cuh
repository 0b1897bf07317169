// Shared by the pooling kernels: element types, conversions, block reductions, the pass over A.
//
// The pass over A (row_logsumexp) is the one both ops share: for each row r = (n, c) of the
// logits it computes lse[r] = log sum_l exp(k * A[r, l]) in one read of the row, with the online
// (streaming) form of the max-shifted sum: every thread keeps a running maximum m and a sum s of
// exp(x - m) over its elements, rescaling s by exp(m_old - m_new) when the maximum grows; the
// block then merges the (m, s) pairs (m = max(m1, m2), s = s1 exp(m1 - m) + s2 exp(m2 - m)).
// The result equals the two-pass form (max first, then sum of exp(x - max)) up to rounding, never
// overflows, and costs one read of A. lse_pool turns it into the pooled score; attention pooling
// turns it into the softmax weights P[r, l] = exp(A[r, l] - lse[r]) wherever it needs them.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "pooling.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "adapt_deploy pooling kernels need compute capability 8.0 (Ampere) or newer"
#endif

// Kernel launches and dynamic shared memory go through these two macros so that
// tests/cuda_emulation can run the same kernels on the CPU (one host thread per CUDA thread);
// for nvcc they are the usual syntax.
#ifndef ADK_LAUNCH
#define ADK_LAUNCH(kernel, grid, block, smem, stream) kernel<<<(grid), (block), (smem), (stream)>>>
#endif
#ifndef ADK_DYNAMIC_SHARED
#define ADK_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#endif

namespace adapt_deploy_kernels {

constexpr int kWarp = 32;

// ---------------------------------------------------------------------------- element types

// Accumulation type: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 inputs.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T x) {
  return static_cast<Acc>(x);
}
template <>
__device__ __forceinline__ float to_acc<float, __half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half, float>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float x) {
  return __float2bfloat16_rn(x);
}

// Accurate exp/log (not the __expf intrinsics): the fp32 results are compared at 1e-5.
__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename Acc>
__device__ __forceinline__ Acc neg_inf() {
  return -static_cast<Acc>(INFINITY);
}

// ----------------------------------------------------------------------------- reductions

// Running log-sum-exp state: the maximum seen and the sum of exp(x - max).
template <typename Acc>
struct LseState {
  Acc m;
  Acc s;
};

template <typename Acc>
__device__ __forceinline__ void lse_push(LseState<Acc>& st, Acc x) {
  if (x > st.m) {
    st.s = st.s * acc_exp(st.m - x) + Acc(1);  // exp(-inf) = 0 on the first element
    st.m = x;
  } else if (x != neg_inf<Acc>()) {  // -inf adds nothing (and -inf - -inf would be NaN)
    st.s += acc_exp(x - st.m);     // a NaN x fails both tests' first branch: s becomes NaN
  }
}

template <typename Acc>
__device__ __forceinline__ LseState<Acc> lse_merge(LseState<Acc> a, LseState<Acc> b) {
  const Acc m = a.m > b.m ? a.m : b.m;
  if (m == neg_inf<Acc>()) return {m, Acc(0)};
  return {m, a.s * acc_exp(a.m - m) + b.s * acc_exp(b.m - m)};
}

// Merge every thread's state; all threads get the block's. `shared` holds 2 * kWarp values.
template <typename Acc>
__device__ LseState<Acc> block_lse_merge(LseState<Acc> st, Acc* shared) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    LseState<Acc> other{__shfl_xor_sync(0xffffffffu, st.m, offset),
                        __shfl_xor_sync(0xffffffffu, st.s, offset)};
    st = lse_merge(st, other);
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  if (lane == 0) {
    shared[warp] = st.m;
    shared[kWarp + warp] = st.s;
  }
  __syncthreads();
  LseState<Acc> total{neg_inf<Acc>(), Acc(0)};
  for (int w = 0; w < warps; ++w) total = lse_merge(total, LseState<Acc>{shared[w], shared[kWarp + w]});
  __syncthreads();  // `shared` may be reused by the caller
  return total;
}

// Four consecutive values from a 16-byte aligned address (one or two vector loads).
__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 q = *reinterpret_cast<const float4*>(p);  // p is 16-byte aligned
  v[0] = q.x;
  v[1] = q.y;
  v[2] = q.z;
  v[3] = q.w;
}

__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  const double2 lo = *reinterpret_cast<const double2*>(p);  // p is 16-byte aligned
  const double2 hi = *reinterpret_cast<const double2*>(p + 2);
  v[0] = lo.x;
  v[1] = lo.y;
  v[2] = hi.x;
  v[3] = hi.y;
}

// Sum over the block in a fixed order (deterministic); all threads get it.
template <typename Acc>
__device__ Acc block_sum(Acc v, Acc* shared) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int warps = (blockDim.x + kWarp - 1) / kWarp;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  Acc total = Acc(0);
  for (int w = 0; w < warps; ++w) total += shared[w];
  __syncthreads();
  return total;
}

// log sum_l exp(k * row[l]) for one row, read once by the whole block (blockDim a multiple of 32).
template <typename T, typename Acc>
__device__ Acc row_logsumexp(const T* __restrict__ row, int64_t l, Acc k, Acc* shared) {
  LseState<Acc> st{neg_inf<Acc>(), Acc(0)};
  for (int64_t i = threadIdx.x; i < l; i += blockDim.x) lse_push(st, k * to_acc<Acc>(row[i]));
  st = block_lse_merge(st, shared);
  return st.m + acc_log(st.s);
}

// lse[r] = log sum_l exp(A[r, l]) for every row: one block per row, the pass over A.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256) row_logsumexp_kernel(const T* __restrict__ logits, int64_t l,
                                                            Acc* __restrict__ lse) {
  __shared__ Acc shared[2 * kWarp];
  const int64_t row = blockIdx.x;
  const Acc value = row_logsumexp<T, Acc>(logits + row * l, l, Acc(1), shared);
  if (threadIdx.x == 0) lse[row] = value;
}

// --------------------------------------------------------------------------- host helpers

constexpr int kRowThreads = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Workspace sub-buffers start on 256-byte boundaries.
inline size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

// Streaming multiprocessors of the current device (the launch plans scale with it).
inline int device_sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 1;
  return sms > 0 ? sms : 1;
}

inline size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat64:
      return 8;
    case DType::kFloat32:
    default:
      return 4;
  }
}

inline size_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

// Call f with a value of the element type for dtype (f(T{}) picks the template instance).
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
    case DType::kFloat64:
      return f(double{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace adapt_deploy_kernels
