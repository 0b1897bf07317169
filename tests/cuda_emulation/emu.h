// CPU emulation of the CUDA features the adapt_deploy pooling kernels use. Tests only.
//
// The kernels in adapt_deploy/cuda_kernels/*.cu compile with g++ against the stub headers in
// include/ (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h, mma.h all include this file) and run on
// the host: a launch runs the blocks one after another on one std::thread per CUDA thread of a
// block; __syncthreads is a std::barrier over the block, __shfl_xor_sync exchanges through a
// per-warp buffer between two warp barriers, __shared__ arrays are function statics (shared by
// the block's threads), WMMA fragments hold the whole 16x16 tile in every lane. Launch limits
// (grid y/z <= 65535, block <= 1024 and a multiple of 32, dynamic shared memory above 48 KiB only
// after cudaFuncSetAttribute, up to the emulated device's opt-in limit) are enforced, and WMMA
// pointers and strides are checked for the documented alignment.
//
// What it shows: the index math, bounds, tiling, split reductions and barriers of the real kernel
// source compute the right numbers. What it cannot show: speed, the GPU memory model, the real
// fragment layouts, or bugs that only appear with warps running out of lockstep on hardware.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// ----------------------------------------------------------------------------- 16-bit types

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);  // IEEE round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}

// -------------------------------------------------------------------------- execution model

namespace emu {

struct Warp {
  std::barrier<> sync{32};
  alignas(16) unsigned char slots[32][16];
};

struct Block {
  explicit Block(unsigned threads, size_t dynamic_bytes)
      : sync(threads), dynamic(dynamic_bytes + 16, 0xff) {  // NaN bytes: unset reads show
    for (unsigned w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<Warp>());
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<Warp>> warps;
  std::vector<unsigned char> dynamic;
};

inline thread_local uint3 thread_index{0, 0, 0};
inline thread_local uint3 block_index{0, 0, 0};
inline thread_local dim3 block_dim;
inline thread_local dim3 grid_dim;
inline thread_local Block* block = nullptr;

// The emulated device.
inline int sm_count = 1;
inline int smem_optin = 99 * 1024;
inline cudaError_t last_error = cudaSuccess;
inline std::map<const void*, int> dynamic_smem_limit;

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, threads;
  size_t smem;

  bool valid() const {
    if (threads.y != 1 || threads.z != 1 || threads.x == 0 || threads.x > 1024) return false;
    if (threads.x % 32 != 0) return false;  // the kernels assume whole warps
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) return false;
    if (smem > 48 * 1024) {
      const auto it = dynamic_smem_limit.find(reinterpret_cast<const void*>(kernel));
      if (it == dynamic_smem_limit.end() || static_cast<size_t>(it->second) < smem) return false;
    }
    return smem <= static_cast<size_t>(smem_optin);
  }

  template <typename... A>
  void operator()(A&&... args) const {
    if (!valid()) {
      std::fprintf(stderr, "emu: invalid launch (grid %u,%u,%u block %u smem %zu)\n", grid.x,
                   grid.y, grid.z, threads.x, smem);
      last_error = cudaErrorInvalidConfiguration;
      return;
    }
    const std::tuple<P...> params(static_cast<P>(args)...);
    // One team of threads.x host threads runs the blocks in order; between two blocks every
    // thread waits, then the dynamic shared memory is poisoned again.
    Block state(threads.x, smem);
    std::barrier<> between(threads.x);
    std::vector<std::thread> team;
    team.reserve(threads.x);
    for (unsigned t = 0; t < threads.x; ++t) {
      team.emplace_back([&, t] {
        thread_index = uint3{t, 0, 0};
        block_dim = threads;
        grid_dim = grid;
        block = &state;
        for (unsigned z = 0; z < grid.z; ++z) {
          for (unsigned y = 0; y < grid.y; ++y) {
            for (unsigned x = 0; x < grid.x; ++x) {
              block_index = uint3{x, y, z};
              std::apply(kernel, params);
              between.arrive_and_wait();
              if (t == 0) std::fill(state.dynamic.begin(), state.dynamic.end(), 0xff);
              between.arrive_and_wait();
            }
          }
        }
      });
    }
    for (auto& thread : team) thread.join();
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 threads, size_t smem, cudaStream_t) {
  return Launch<P...>{kernel, grid, threads, smem};
}

}  // namespace emu

#define threadIdx (::emu::thread_index)
#define blockIdx (::emu::block_index)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

#define ADK_LAUNCH(kernel, grid, block, smem, stream) ::emu::launch(kernel, grid, block, smem, stream)
#define ADK_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::emu::block->dynamic.data())

inline void __syncthreads() { emu::block->sync.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask) {
  static_assert(sizeof(T) <= 16);
  emu::Warp& warp = *emu::block->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  std::memcpy(warp.slots[lane], &value, sizeof(T));
  warp.sync.arrive_and_wait();
  T out;
  std::memcpy(&out, warp.slots[lane ^ static_cast<unsigned>(lane_mask)], sizeof(T));
  warp.sync.arrive_and_wait();
  return out;
}

// ------------------------------------------------------------------------------- runtime API

inline cudaError_t cudaGetLastError() {
  const cudaError_t err = emu::last_error;
  emu::last_error = cudaSuccess;
  return err;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = emu::sm_count;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = emu::smem_optin;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename... P>
cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute, int value) {
  if (value > emu::smem_optin) return cudaErrorInvalidValue;
  emu::dynamic_smem_limit[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------ WMMA

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

// Every lane holds the whole tile (values of 16-bit types are exact in float).
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the kernels use 16x16x16 only");
  float v[16][16];
};

inline float element(float x) { return x; }
inline float element(__half x) { return __half2float(x); }
inline float element(__nv_bfloat16 x) { return __bfloat162float(x); }

inline void check_pointer(const void* p, unsigned ldm, size_t element_bytes) {
  // mma.h: pointers 256-bit aligned; ldm a multiple of 16 bytes.
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * element_bytes) % 16 != 0) {
    std::fprintf(stderr, "emu: misaligned WMMA pointer %p or ldm %u\n", p, ldm);
    std::abort();
  }
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  check_pointer(p, ldm, sizeof(T));
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      f.v[r][c] = element(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
    }
  }
}

template <typename T>
void fill_fragment(fragment<accumulator, 16, 16, 16, T>& f, float value) {
  for (auto& row : f.v) {
    for (float& x : row) x = value;
  }
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[16][16];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float sum = c.v[i][j];
      for (int k = 0; k < 16; ++k) sum += a.v[i][k] * b.v[k][j];
      out[i][j] = sum;
    }
  }
  std::memcpy(d.v, out, sizeof(out));
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  check_pointer(p, ldm, sizeof(float));
  if (threadIdx.x % 32 != 0) return;  // one lane writes the warp's tile
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) {
      (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r][c];
    }
  }
}

}  // namespace nvcuda::wmma
