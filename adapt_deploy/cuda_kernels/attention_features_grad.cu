// Features-only backward of category-wise attention pooling (Eq. 3): dF = P^T dOut.
//
// Training uses the official detach semantics: the logits that weight the pooling carry no
// gradient (WDA's generator step), so autograd asks for dF alone. Per image n (every tensor
// contiguous, L = H*W):
//   dF[d, l] = sum_c dOut[c, d] P[c, l],   P[c, l] = exp(A[c, l] - lse[c])
// No read of F, no dP, no dA: one write of dF (D x L), which is what bounds the pass.
//
// Roofline (per image; es the element size, C = 19, D = 2048, L = 65*129 = 8385 at the paper's
// shapes):
//   bytes that must move:  D*L*es (write dF: 68.7 MB fp32, 34.3 MB bf16)
//                        + 2*C*L*es (A twice: lse, then P; 1.3 MB fp32, mostly from L2)
//                        + C*D*es (dOut; 0.16 MB)
//   FLOPs: 2*C*D*L = 653 M; intensity about 2*C/es FLOP per byte: 9.5 (fp32), 19 (fp16, bf16),
//   4.75 (fp64). An H200 moves about 4.2 TB/s (bench/kernels.py measures the copy in the same
//   run) and does about 67 TFLOP/s of fp32 FMA on CUDA cores: a ridge near 16 FLOP/byte. So fp32
//   and fp64 are write-bound if the FMA loop runs at >= 60% of the CUDA-core peak (the register
//   tile below is sized for that), and fp16/bf16 sit at the ridge (fp32 accumulation on CUDA
//   cores; their output is half the bytes). bench/kernels.py reports the achieved share of the
//   copy bandwidth for these bytes.
//
// The reference (pooling.py) materialises P (C x L), runs a K = C batched GEMM in the compute
// dtype (fp32 for half inputs: an fp32 dF, then a cast) and so moves 1x (fp32) to 3x (bf16) the
// bytes above.
//
// Plan: 1. the pass over A (common.cuh): lse, one read of A.
//       2. blocks of 256 threads own 128 positions x a range of channels of one image. Each block
//          stages P for its positions ([c][128], from A and lse) and dOut for 64 channels at a
//          time ([c][64]) in shared memory, up to kChunkC classes at a time (P is staged once
//          when C <= kChunkC). Warp w owns 8 channels, lane j the positions j + 32 u (u < 4):
//          32 accumulators per thread; per class 4 P loads (conflict-free) and 8 dOut values
//          (two 16-byte broadcasts) feed 32 FMAs; each store instruction writes 32 consecutive
//          elements of one row of dF (128 bytes in fp32: coalesced for any L and alignment).
//       3. channel ranges are split over blocks until there are about 4 blocks per SM.
// Accumulation is fp32 (fp64 for fp64 inputs); fp16/bf16 are converted on load and store.
// Deterministic: every element of dF is summed by one thread in class order.
#include <algorithm>

#include "common.cuh"

namespace adapt_deploy_kernels {
namespace {

constexpr int kFgThreads = 256;
constexpr int kFgTileL = 128;                           // positions per block: 32 lanes x 4
constexpr int kFgTileD = 64;                            // channels per step: 8 warps x 8
constexpr int kFgPositionsPerLane = kFgTileL / kWarp;   // 4
constexpr int kFgChannelsPerWarp = kFgTileD / (kFgThreads / kWarp);  // 8
static_assert(kFgChannelsPerWarp == 8, "two 4-wide dOut loads per class");

// Classes staged at a time: 24 KiB of shared memory for fp32, 24 KiB for fp64.
template <typename Acc>
constexpr int fg_chunk_c() {
  return 128 / static_cast<int>(sizeof(Acc));  // 32 (fp32 accumulation), 16 (fp64)
}

// One block: image blockIdx.z, positions blockIdx.x * 128 + [0, 128), channels
// [blockIdx.y * channels_per_split, ...) in steps of 64.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kFgThreads)
    attention_features_grad_kernel(const T* __restrict__ grad, const T* __restrict__ logits,
                                   const Acc* __restrict__ lse, int64_t classes, int64_t dim,
                                   int64_t l, int64_t channels_per_split,
                                   T* __restrict__ grad_features) {
  constexpr int kChunkC = fg_chunk_c<Acc>();
  __shared__ __align__(16) Acc p_tile[kChunkC * kFgTileL];  // [c][position]
  __shared__ __align__(16) Acc g_tile[kChunkC * kFgTileD];  // [c][channel]

  const int t = threadIdx.x, warp = t / kWarp, lane = t % kWarp;
  const int64_t n = blockIdx.z;
  const int64_t l0 = int64_t(blockIdx.x) * kFgTileL;
  const int64_t d_begin = int64_t(blockIdx.y) * channels_per_split;
  const int64_t d_end = min64(dim, d_begin + channels_per_split);
  const T* a_rows = logits + n * classes * l;
  const Acc* lse_rows = lse + n * classes;
  const T* g_rows = grad + n * classes * dim;
  T* df_rows = grad_features + n * dim * l;

  // P[c0 + cc, l0 + k] for the classes of one chunk; zeros past the last position or class.
  auto stage_p = [&](int64_t c0) {
    for (int e = t; e < kChunkC * kFgTileL; e += kFgThreads) {
      const int cc = e / kFgTileL, k = e % kFgTileL;
      const int64_t c = c0 + cc, pos = l0 + k;
      Acc p = Acc(0);
      if (c < classes && pos < l) p = acc_exp(to_acc<Acc>(a_rows[c * l + pos]) - lse_rows[c]);
      p_tile[e] = p;
    }
  };
  const bool p_staged_once = classes <= kChunkC;
  if (p_staged_once) stage_p(0);

  for (int64_t d0 = d_begin; d0 < d_end; d0 += kFgTileD) {
    Acc acc[kFgChannelsPerWarp][kFgPositionsPerLane] = {};
    for (int64_t c0 = 0; c0 < classes; c0 += kChunkC) {
      __syncthreads();  // the previous chunk's tiles are no longer read
      if (!p_staged_once) stage_p(c0);
      for (int e = t; e < kChunkC * kFgTileD; e += kFgThreads) {
        const int cc = e / kFgTileD, j = e % kFgTileD;
        const int64_t c = c0 + cc, d = d0 + j;
        g_tile[e] = (c < classes && d < d_end) ? to_acc<Acc>(g_rows[c * dim + d]) : Acc(0);
      }
      __syncthreads();
      const int chunk = static_cast<int>(min64(kChunkC, classes - c0));
      for (int cc = 0; cc < chunk; ++cc) {
        Acc p[kFgPositionsPerLane], g[kFgChannelsPerWarp];
#pragma unroll
        for (int u = 0; u < kFgPositionsPerLane; ++u) p[u] = p_tile[cc * kFgTileL + lane + kWarp * u];
        const Acc* g_src = g_tile + cc * kFgTileD + warp * kFgChannelsPerWarp;
        Acc lo[4], hi[4];
        load4(g_src, lo);  // the same address in every lane: a broadcast
        load4(g_src + 4, hi);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          g[i] = lo[i];
          g[i + 4] = hi[i];
        }
#pragma unroll
        for (int i = 0; i < kFgChannelsPerWarp; ++i) {
#pragma unroll
          for (int u = 0; u < kFgPositionsPerLane; ++u) acc[i][u] = fma(g[i], p[u], acc[i][u]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kFgChannelsPerWarp; ++i) {
      const int64_t d = d0 + warp * kFgChannelsPerWarp + i;
      if (d >= d_end) continue;
      T* row = df_rows + d * l;
#pragma unroll
      for (int u = 0; u < kFgPositionsPerLane; ++u) {
        const int64_t pos = l0 + lane + kWarp * u;
        if (pos < l) row[pos] = from_acc<T, Acc>(acc[i][u]);
      }
    }
  }
}

struct FeaturesGradPlan {
  int64_t l_tiles, splits, channels_per_split;
};

FeaturesGradPlan plan_features_grad(const PoolShape& s, int sms) {
  FeaturesGradPlan p{};
  p.l_tiles = ceil_div(s.l, kFgTileL);
  const int64_t steps = ceil_div(s.d, kFgTileD);
  // Split the channels until there are about 4 blocks per SM (at least one 64-channel step
  // per block); with one step per block the P tile is staged once per 64 channels.
  const int64_t wanted = ceil_div(4 * int64_t(sms), s.n * p.l_tiles);
  const int64_t splits = std::clamp<int64_t>(wanted, 1, std::min<int64_t>(steps, 65535));
  const int64_t steps_per_split = ceil_div(steps, splits);
  p.channels_per_split = steps_per_split * kFgTileD;
  p.splits = ceil_div(steps, steps_per_split);
  return p;
}

bool valid_features_grad_shape(const PoolShape& s) {
  return s.n > 0 && s.c > 0 && s.d > 0 && s.l > 0 && s.n <= 65535 &&
         ceil_div(s.l, kFgTileL) <= 0x7fffffff && s.n * s.c <= 0x7fffffff;
}

}  // namespace

size_t attention_pool_backward_features_workspace_bytes(DType dtype, const PoolShape& shape) {
  if (!valid_features_grad_shape(shape)) return 0;
  return align_up(acc_size(dtype) * shape.n * shape.c);  // lse
}

cudaError_t attention_pool_backward_features(DType dtype, const PoolShape& shape, const void* grad,
                                             const void* logits, void* grad_features,
                                             void* workspace, cudaStream_t stream) {
  if (!valid_features_grad_shape(shape)) return cudaErrorInvalidValue;
  const FeaturesGradPlan plan = plan_features_grad(shape, device_sm_count());
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    const int64_t rows = shape.n * shape.c;
    Acc* lse = static_cast<Acc*>(workspace);
    const T* a = static_cast<const T*>(logits);
    auto lse_kernel = row_logsumexp_kernel<T, Acc>;
    ADK_LAUNCH(lse_kernel, static_cast<unsigned>(rows), kRowThreads, 0, stream)(a, shape.l, lse);
    const dim3 grid(static_cast<unsigned>(plan.l_tiles), static_cast<unsigned>(plan.splits),
                    static_cast<unsigned>(shape.n));
    auto kernel = attention_features_grad_kernel<T, Acc>;
    ADK_LAUNCH(kernel, grid, kFgThreads, 0, stream)(
        static_cast<const T*>(grad), a, lse, shape.c, shape.d, shape.l, plan.channels_per_split,
        static_cast<T*>(grad_features));
    return cudaGetLastError();
  });
}

}  // namespace adapt_deploy_kernels
