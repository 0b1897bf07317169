// Category-wise attention pooling (Eq. 3), forward and backward.
//
// Notation (per image n; every tensor contiguous): A the logits (C x L, L = H*W), F the features
// (D x L), P = softmax over l of each row of A (C x L), Out = P F^T (C x D), dOut its gradient.
//
// Forward, out[c, :] = sum_l P[c, l] F[:, l]:
//   1. the pass over A (common.cuh): lse[c] = log sum_l exp(A[c, l]), one read of A;
//   2. one pass over F: the (C x L)(L x D) product with P[c, l] = exp(A[c, l] - lse[c]) made on
//      the fly from A (small, re-read from L2) while each element of F is read exactly once.
//      A block owns a tile of 128 feature channels x (up to) 64 classes of one image and a range
//      of positions; it stages P and F for 32 positions at a time in shared memory.
//      fp32 / fp64: CUDA-core FMAs, 4 classes x 4 channels per thread (fp32 / fp64 accumulation).
//      fp16 / bf16: tensor cores (WMMA 16x16x16, fp32 accumulation), P rounded to the input type
//      (fp16: scaled by 2^12 first so small weights stay normal; the scale is exact and undone).
//   3. when N*C is small (too few blocks to fill the GPU) the positions are split over S blocks
//      that write fp32 partial sums, added in a fixed order by a small kernel (deterministic).
//
// Backward, given dOut (C x D):
//   dF[:, l] = sum_c dOut[c, :] P[c, l]                      (D x L, the  P^T dOut  outer product)
//   dP[c, l] = sum_d dOut[c, d] F[d, l]                      (C x L)
//   dA[c, l] = P[c, l] (dP[c, l] - delta[c]),  delta[c] = sum_l P[c, l] dP[c, l]
// The last line is FlashAttention-2's rowsum trick: the softmax Jacobian never materializes and
// delta[c] = rowsum(P o dP) = rowsum(dOut o Out) is one number per row. The op receives
// (dOut, A, F) and not Out, so delta is summed from the dP this kernel produces (an A-sized pass)
// rather than from dOut o Out; the value is the same and F is still read once.
//   1. the pass over A: lse (as in the forward);
//   2. one pass over F: a block owns up to 128 positions of one image (one thread per position)
//      and a range of channels; per chunk of 32 channels each thread loads its F column once into
//      registers, then for every class c: dF[d, l] += dOut[c, d] P[c, l] (dOut broadcast from
//      shared memory) and dP[c, l] += dOut[c, d] F[d, l]; dF is written once. Channel ranges are
//      split over S blocks when N*L is small; each writes its partial dP (fixed-order sum later);
//   3. finalize, one block per row: dP = sum of the partials, delta = sum_l P dP, dA = P (dP - delta).
// Everything accumulates in fp32 (fp64 for fp64 inputs); fp16/bf16 are converted on load/store.
// The features-only backward (detached logits, the training case) is attention_features_grad.cu.
//
// Roofline (per image; es the element size; C = 19, D = 2048, L = 65*129 = 8385):
//   forward, bytes that must move: D*L*es (read F: 68.7 MB fp32) + C*L*es (A) + C*D*es (out);
//     FLOPs 2*C*D*L, about 2*C/es per byte: 9.5 (fp32), 19 (bf16). The first GPU run
//     (H200, 2026-12-04, copy 4249 GB/s) reached 13% / 18% of the copy at N = 1 / 8 in fp32 and
//     11% / 25% in bf16: far below the roof, and slower than the reference in fp32.
//   both-inputs backward: 2*D*L*es (read F, write dF) + 3*C*L*es (A for lse, P and the
//     finalize, dA) + the split partials of dP (splits*C*L*4, written and read).
// Why so far below, estimated from the launch plan of that run (N = 1, fp32; not profiled):
// 16 channel tiles x 30 position splits of 9 steps each; each step stages a 128 x 32 F tile
// through shared memory with 4-byte loads, 8 in flight per thread, and computes only after a
// barrier, so the next tile's loads never overlap this tile's FMAs, and about 18 KiB are in
// flight per SM where Little's law (about 0.7 us at 36 GB/s per SM) asks for about 25 KiB; the
// 30 splits also write and read back 4.7 MB of fp32 partials (14% more traffic).
// Redesign (outstanding: it needs GPU time to measure): double-buffered staging (cp.async, or
// TMA on sm_90) so loads of tile k+1 overlap FMAs on tile k; 16-byte loads where a row's start
// allows (rows of F start 4*L bytes apart, so an odd L needs a scalar head per row); fewer,
// longer-lived blocks (one wave, a position split sized to the SM count) so the partials
// shrink; TF32 tensor cores for fp32 behind a flag, keeping this strict-fp32 path. Until a GPU
// run shows the kernel winning, ADAPT_DEPLOY_KERNELS=auto keeps fp32 on the reference
// (ops/kernel_choice.py).
#include <algorithm>
#include <type_traits>

#include <mma.h>

#include "common.cuh"

namespace adapt_deploy_kernels {
namespace {

// ------------------------------------------------------------------------------- helpers

template <typename T>
constexpr bool kTensorCores = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// out[i] = sum_s partial[s * count + i], the split-K reduction in a fixed order.
template <typename T, typename Acc>
__global__ void __launch_bounds__(256) split_sum_kernel(const Acc* __restrict__ partial,
                                                        int64_t splits, int64_t count,
                                                        T* __restrict__ out) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    Acc sum = Acc(0);
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * count + i];
    out[i] = from_acc<T, Acc>(sum);
  }
}

// ------------------------------------------------------------------ forward, CUDA cores

constexpr int kSimtTileD = 128;      // channels per block: 32 lanes x 4, lane + 32 j
constexpr int kSimtMaxClasses = 64;  // classes per block: up to 16 warps x 4
constexpr int kSimtStrideP = kSimtMaxClasses + 4;  // keeps each thread's 4 classes 16-B aligned
constexpr int kSimtStrideF = kSimtTileD + 1;       // odd: the transposing stores hit 32 banks
constexpr int kLoadBatch = 8;                      // global loads in flight per thread

template <typename Acc>
__host__ __device__ constexpr int simt_tile_k() {
  return 128 / static_cast<int>(sizeof(Acc));  // 32 positions (fp32), 16 (fp64): 25 KiB smem
}

// One block: image n (blockIdx.z / splits), channels d0..d0+127, classes c0..c0+4*warps-1,
// positions of split blockIdx.z % splits. Thread (warp w, lane) accumulates classes 4w..4w+3 x
// channels lane + 32 j, j < 4.
template <typename T, typename Acc>
__global__ void __launch_bounds__(512)
    attention_forward_simt_kernel(const T* __restrict__ logits, const Acc* __restrict__ lse,
                                  const T* __restrict__ features, int64_t images, int64_t classes,
                                  int64_t dim, int64_t l, int64_t k_per_split, int64_t splits,
                                  T* __restrict__ out, Acc* __restrict__ partial) {
  constexpr int TK = simt_tile_k<Acc>();
  __shared__ __align__(16) Acc p_tile[TK * kSimtStrideP];  // [k][c]
  __shared__ __align__(16) Acc f_tile[TK * kSimtStrideF];  // [k][d]
  __shared__ Acc lse_tile[kSimtMaxClasses];

  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int tile_c = static_cast<int>(blockDim.x / kWarp) * 4;
  const int64_t d0 = int64_t(blockIdx.x) * kSimtTileD;
  const int64_t c0 = int64_t(blockIdx.y) * tile_c;
  const int64_t n = blockIdx.z / splits, split = blockIdx.z % splits;
  const int64_t k_begin = split * k_per_split;
  const int64_t k_end = min64(l, k_begin + k_per_split);
  const T* a_rows = logits + (n * classes + c0) * l;
  const T* f_rows = features + (n * dim + d0) * l;

  if (static_cast<int>(threadIdx.x) < tile_c) {
    const int64_t c = c0 + threadIdx.x;
    lse_tile[threadIdx.x] = c < classes ? lse[n * classes + c] : Acc(0);
  }

  Acc acc[4][4] = {};
  for (int64_t k0 = k_begin; k0 < k_end; k0 += TK) {
    __syncthreads();  // the previous step is done with the tiles; lse_tile is visible
    // P tile: element e -> (class e / TK, position e % TK); lanes read consecutive positions.
    for (int base = threadIdx.x; base < tile_c * TK; base += kLoadBatch * blockDim.x) {
      Acc v[kLoadBatch];
#pragma unroll
      for (int u = 0; u < kLoadBatch; ++u) {
        const int e = base + u * blockDim.x;
        const int c = e / TK, kk = e % TK;
        v[u] = Acc(0);
        if (e < tile_c * TK && c0 + c < classes && k0 + kk < k_end) {
          v[u] = acc_exp(to_acc<Acc>(a_rows[c * l + k0 + kk]) - lse_tile[c]);
        }
      }
#pragma unroll
      for (int u = 0; u < kLoadBatch; ++u) {
        const int e = base + u * blockDim.x;
        if (e < tile_c * TK) p_tile[(e % TK) * kSimtStrideP + e / TK] = v[u];
      }
    }
    // F tile, transposed to [k][d]; zeros beyond the last channel or position.
    for (int base = threadIdx.x; base < kSimtTileD * TK; base += kLoadBatch * blockDim.x) {
      Acc v[kLoadBatch];
#pragma unroll
      for (int u = 0; u < kLoadBatch; ++u) {
        const int e = base + u * blockDim.x;
        const int d = e / TK, kk = e % TK;
        v[u] = Acc(0);
        if (e < kSimtTileD * TK && d0 + d < dim && k0 + kk < k_end) {
          v[u] = to_acc<Acc>(f_rows[d * l + k0 + kk]);
        }
      }
#pragma unroll
      for (int u = 0; u < kLoadBatch; ++u) {
        const int e = base + u * blockDim.x;
        if (e < kSimtTileD * TK) f_tile[(e % TK) * kSimtStrideF + e / TK] = v[u];
      }
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < TK; ++kk) {
      Acc p[4], f[4];
      load4(p_tile + kk * kSimtStrideP + warp * 4, p);  // broadcast within the warp
#pragma unroll
      for (int j = 0; j < 4; ++j) f[j] = f_tile[kk * kSimtStrideF + lane + kWarp * j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fma(p[i], f[j], acc[i][j]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t c = c0 + warp * 4 + i;
    if (c >= classes) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t d = d0 + lane + kWarp * j;
      if (d >= dim) continue;
      if (splits == 1) {
        out[(n * classes + c) * dim + d] = from_acc<T, Acc>(acc[i][j]);
      } else {
        partial[((split * images + n) * classes + c) * dim + d] = acc[i][j];
      }
    }
  }
}

// ---------------------------------------------------------------- forward, tensor cores

constexpr int kMmaTileC = 32;   // classes per block: two 16-row fragments
constexpr int kMmaTileD = 128;  // channels per block: one 16-column fragment per warp
constexpr int kMmaTileK = 32;   // positions per step: two k16 steps
constexpr int kMmaThreads = 256;
constexpr int kMmaStrideK = kMmaTileK + 8;  // 80 B rows: fragment pointers stay 32-B aligned
constexpr int kMmaStrideO = kMmaTileD + 4;

// Scale applied to P before rounding it to T (undone on output): fp16 weights of a softmax over
// tens of thousands of positions would otherwise be subnormal. A power of two: exact.
template <typename T>
__host__ __device__ constexpr float p_scale() {
  return std::is_same_v<T, __half> ? 4096.0f : 1.0f;
}

// One block: image n, classes c0..c0+31, channels d0..d0+127, the positions of one split.
// Warp w computes Out[c0:c0+32, d0+16w : d0+16w+16] as two 16x16 fp32 accumulator fragments:
// A operand = P tile (row-major [c][k]), B operand = F tile read as col-major K x D ([d][k]).
template <typename T>
__global__ void __launch_bounds__(kMmaThreads, 3)
    attention_forward_mma_kernel(const T* __restrict__ logits, const float* __restrict__ lse,
                                 const T* __restrict__ features, int64_t images, int64_t classes,
                                 int64_t dim, int64_t l, int64_t k_per_split, int64_t splits,
                                 T* __restrict__ out, float* __restrict__ partial) {
  namespace wmma = nvcuda::wmma;
  __shared__ __align__(32) T p_tile[kMmaTileC * kMmaStrideK];      // [c][k]
  __shared__ __align__(32) T f_tile[kMmaTileD * kMmaStrideK];      // [d][k]
  __shared__ __align__(32) float o_tile[kMmaTileC * kMmaStrideO];  // [c][d]
  __shared__ float lse_tile[kMmaTileC];

  const int warp = threadIdx.x / kWarp;
  const int64_t d0 = int64_t(blockIdx.x) * kMmaTileD;
  const int64_t c0 = int64_t(blockIdx.y) * kMmaTileC;
  const int64_t n = blockIdx.z / splits, split = blockIdx.z % splits;
  const int64_t k_begin = split * k_per_split;
  const int64_t k_end = min64(l, k_begin + k_per_split);
  const T* a_rows = logits + (n * classes + c0) * l;
  const T* f_rows = features + (n * dim + d0) * l;
  constexpr float scale = p_scale<T>();

  if (threadIdx.x < kMmaTileC) {
    const int64_t c = c0 + threadIdx.x;
    lse_tile[threadIdx.x] = c < classes ? lse[n * classes + c] : 0.0f;
  }

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);

  // Thread t stages position `pos` = t % 32 of tile rows t / 32 + 8 u (lanes: consecutive
  // positions, so global reads are coalesced); all of its loads are issued before any store.
  constexpr int kRowsPerPass = kMmaThreads / kMmaTileK;  // 8
  static_assert(kMmaTileC % kRowsPerPass == 0 && kMmaTileD % kRowsPerPass == 0);
  static_assert(kMmaTileD == 16 * (kMmaThreads / kWarp), "one 16-channel fragment per warp");
  const int pos = threadIdx.x % kMmaTileK, r0 = threadIdx.x / kMmaTileK;
  const int64_t row_step = kRowsPerPass * l;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kMmaTileK) {
    __syncthreads();  // the previous step's fragments are loaded; lse_tile is visible
    const bool in_range = k0 + pos < k_end;
    T pv[kMmaTileC / kRowsPerPass];  // 4
    T fv[kMmaTileD / kRowsPerPass];  // 16
    const T* a_src = a_rows + r0 * l + k0 + pos;
#pragma unroll
    for (int u = 0; u < kMmaTileC / kRowsPerPass; ++u) {
      const int c = r0 + u * kRowsPerPass;
      float p = 0.0f;
      if (in_range && c0 + c < classes) p = expf(to_acc<float>(a_src[u * row_step]) - lse_tile[c]);
      pv[u] = from_acc<T, float>(p * scale);
    }
    const T* f_src = f_rows + r0 * l + k0 + pos;
#pragma unroll
    for (int u = 0; u < kMmaTileD / kRowsPerPass; ++u) {
      fv[u] = from_acc<T, float>(0.0f);
      if (in_range && d0 + r0 + u * kRowsPerPass < dim) fv[u] = f_src[u * row_step];
    }
#pragma unroll
    for (int u = 0; u < kMmaTileC / kRowsPerPass; ++u) {
      p_tile[(r0 + u * kRowsPerPass) * kMmaStrideK + pos] = pv[u];
    }
#pragma unroll
    for (int u = 0; u < kMmaTileD / kRowsPerPass; ++u) {
      f_tile[(r0 + u * kRowsPerPass) * kMmaStrideK + pos] = fv[u];
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kMmaTileK; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
      wmma::load_matrix_sync(b, f_tile + warp * 16 * kMmaStrideK + kk, kMmaStrideK);
#pragma unroll
      for (int m = 0; m < 2; ++m) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, p_tile + m * 16 * kMmaStrideK + kk, kMmaStrideK);
        wmma::mma_sync(acc[m], a, b, acc[m]);
      }
    }
  }

#pragma unroll
  for (int m = 0; m < 2; ++m) {
    wmma::store_matrix_sync(o_tile + m * 16 * kMmaStrideO + warp * 16, acc[m], kMmaStrideO,
                            wmma::mem_row_major);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < kMmaTileC * kMmaTileD; e += kMmaThreads) {
    const int c = e / kMmaTileD, d = e % kMmaTileD;
    if (c0 + c >= classes || d0 + d >= dim) continue;
    const float value = o_tile[c * kMmaStrideO + d] / scale;
    if (splits == 1) {
      out[(n * classes + c0 + c) * dim + d0 + d] = from_acc<T, float>(value);
    } else {
      partial[((split * images + n) * classes + c0 + c) * dim + d0 + d] = value;
    }
  }
}

// -------------------------------------------------------------------------- forward plan

struct ForwardPlan {
  bool tensor_cores;
  int threads;
  int64_t tile_k;
  int64_t d_tiles, c_tiles;
  int64_t splits, k_per_split;
};

ForwardPlan plan_forward(DType dtype, const PoolShape& s, int sms) {
  ForwardPlan p{};
  p.tensor_cores = dtype == DType::kFloat16 || dtype == DType::kBFloat16;
  int64_t tile_c = 0;
  if (p.tensor_cores) {
    p.threads = kMmaThreads;
    tile_c = kMmaTileC;
    p.tile_k = kMmaTileK;
    p.d_tiles = ceil_div(s.d, kMmaTileD);
  } else {
    const int64_t groups = ceil_div(std::min<int64_t>(s.c, kSimtMaxClasses), 4);
    p.threads = static_cast<int>(groups * kWarp);
    tile_c = groups * 4;
    p.tile_k = dtype == DType::kFloat64 ? simt_tile_k<double>() : simt_tile_k<float>();
    p.d_tiles = ceil_div(s.d, kSimtTileD);
  }
  p.c_tiles = ceil_div(s.c, tile_c);
  // Split the positions until there are about 4 blocks per SM, keeping >= 8 steps per split.
  const int64_t blocks = s.n * p.d_tiles * p.c_tiles;
  const int64_t wanted = ceil_div(4 * int64_t(sms), blocks);
  const int64_t most = std::max<int64_t>(1, s.l / (8 * p.tile_k));
  int64_t splits = std::clamp<int64_t>(wanted, 1, most);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, 65535 / s.n));  // gridDim.z limit
  p.k_per_split = ceil_div(ceil_div(s.l, splits), p.tile_k) * p.tile_k;
  p.splits = ceil_div(s.l, p.k_per_split);
  return p;
}

// ------------------------------------------------------------------------- backward

constexpr int kChunkD = 32;  // channels per step of the backward pass over F

template <typename Acc>
size_t backward_smem_bytes(int64_t classes, int tile_k) {
  // P and dP columns ([c][k]) and the dOut chunk ([c][32]).
  return sizeof(Acc) * static_cast<size_t>(classes) * (2 * static_cast<size_t>(tile_k) + kChunkD);
}

// One block: image blockIdx.z, positions blockIdx.x * blockDim.x + threadIdx.x (one per thread),
// channel chunks [blockIdx.y * chunks_per_split, ...). Shared memory: P and dP columns of all
// classes (each thread touches only its own column) and the dOut chunk (read by all: broadcast).
template <typename T, typename Acc>
__global__ void __launch_bounds__(128)
    attention_backward_kernel(const T* __restrict__ grad, const T* __restrict__ logits,
                              const Acc* __restrict__ lse, const T* __restrict__ features,
                              int64_t images, int64_t classes, int64_t dim, int64_t l,
                              int64_t chunks_per_split, T* __restrict__ grad_features,
                              Acc* __restrict__ dp_partial) {
  ADK_DYNAMIC_SHARED(unsigned char, smem);
  const int tile_k = blockDim.x, t = threadIdx.x;
  Acc* p_col = reinterpret_cast<Acc*>(smem);     // [c][tile_k]
  Acc* dp_col = p_col + classes * tile_k;         // [c][tile_k]
  Acc* g_tile = dp_col + classes * tile_k;        // [c][kChunkD], 16-B aligned rows

  const int64_t n = blockIdx.z, split = blockIdx.y;
  const int64_t k = int64_t(blockIdx.x) * tile_k + t;
  const bool valid = k < l;
  const int64_t d_begin = split * chunks_per_split * kChunkD;
  const int64_t d_end = min64(dim, d_begin + chunks_per_split * kChunkD);

  for (int64_t c = 0; c < classes; ++c) {
    const int64_t row = n * classes + c;
    p_col[c * tile_k + t] = valid ? acc_exp(to_acc<Acc>(logits[row * l + k]) - lse[row]) : Acc(0);
    dp_col[c * tile_k + t] = Acc(0);
  }

  for (int64_t d0 = d_begin; d0 < d_end; d0 += kChunkD) {
    __syncthreads();  // everyone is done with the previous dOut chunk
    for (int64_t e = t; e < classes * kChunkD; e += tile_k) {
      const int64_t c = e / kChunkD, j = e % kChunkD;
      g_tile[e] = d0 + j < dim ? to_acc<Acc>(grad[(n * classes + c) * dim + d0 + j]) : Acc(0);
    }
    Acc f[kChunkD];  // this position's features, read from global memory exactly once
#pragma unroll
    for (int j = 0; j < kChunkD; ++j) {
      f[j] = (valid && d0 + j < dim) ? to_acc<Acc>(features[(n * dim + d0 + j) * l + k]) : Acc(0);
    }
    __syncthreads();
    Acc df[kChunkD] = {};
    for (int64_t c = 0; c < classes; ++c) {
      const Acc p = p_col[c * tile_k + t];
      const Acc* g = g_tile + c * kChunkD;
      Acc dp[4] = {};
#pragma unroll
      for (int j = 0; j < kChunkD; j += 4) {
        Acc gv[4];
        load4(g + j, gv);  // same address for every thread: a broadcast
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          df[j + u] = fma(gv[u], p, df[j + u]);
          dp[u] = fma(gv[u], f[j + u], dp[u]);
        }
      }
      dp_col[c * tile_k + t] += (dp[0] + dp[1]) + (dp[2] + dp[3]);
    }
    if (valid) {
#pragma unroll
      for (int j = 0; j < kChunkD; ++j) {
        if (d0 + j < dim) grad_features[(n * dim + d0 + j) * l + k] = from_acc<T, Acc>(df[j]);
      }
    }
  }

  if (valid) {
    for (int64_t c = 0; c < classes; ++c) {
      dp_partial[((split * images + n) * classes + c) * l + k] = dp_col[c * tile_k + t];
    }
  }
}

// One block per row (n, c): dP = sum of the split partials (kept in split 0), then
// delta = sum_l P dP and dA = P (dP - delta).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kRowThreads)
    attention_backward_finalize_kernel(const T* __restrict__ logits, const Acc* __restrict__ lse,
                                       Acc* __restrict__ dp_partial, int64_t splits, int64_t rows,
                                       int64_t l, T* __restrict__ grad_logits) {
  __shared__ Acc shared[kWarp];
  const int64_t row = blockIdx.x;
  const T* a = logits + row * l;
  Acc* dp = dp_partial + row * l;
  const int64_t split_stride = rows * l;
  const Acc m = lse[row];
  Acc local = Acc(0);
  for (int64_t i = threadIdx.x; i < l; i += blockDim.x) {
    Acc value = dp[i];
    for (int64_t s = 1; s < splits; ++s) value += dp[s * split_stride + i];
    if (splits > 1) dp[i] = value;  // read back below by this same thread
    local += acc_exp(to_acc<Acc>(a[i]) - m) * value;
  }
  const Acc delta = block_sum(local, shared);
  T* da = grad_logits + row * l;
  for (int64_t i = threadIdx.x; i < l; i += blockDim.x) {
    da[i] = from_acc<T, Acc>(acc_exp(to_acc<Acc>(a[i]) - m) * (dp[i] - delta));
  }
}

struct BackwardPlan {
  int tile_k;  // threads per block = positions per block
  size_t smem;
  int64_t k_tiles, splits, chunks_per_split;
};

// Largest tile that fits the device's shared memory; tile_k == 0 when none does.
BackwardPlan plan_backward(DType dtype, const PoolShape& s, int sms, size_t smem_limit) {
  BackwardPlan p{};
  for (int tile_k : {128, 64, 32}) {
    const size_t bytes = dtype == DType::kFloat64 ? backward_smem_bytes<double>(s.c, tile_k)
                                                  : backward_smem_bytes<float>(s.c, tile_k);
    if (bytes <= smem_limit) {
      p.tile_k = tile_k;
      p.smem = bytes;
      break;
    }
  }
  if (p.tile_k == 0) return p;
  p.k_tiles = ceil_div(s.l, p.tile_k);
  const int64_t chunks = ceil_div(s.d, kChunkD);
  // Split the channels until there are about 4 blocks per SM, keeping >= 4 chunks (128
  // channels) per split so the partial dP (C x L per split) stays small next to F.
  const int64_t wanted = ceil_div(4 * int64_t(sms), s.n * p.k_tiles);
  const int64_t most = std::clamp<int64_t>(chunks / 4, 1, 65535);
  const int64_t splits = std::clamp<int64_t>(wanted, 1, most);
  p.chunks_per_split = ceil_div(chunks, splits);
  p.splits = ceil_div(chunks, p.chunks_per_split);
  return p;
}

size_t device_smem_limit() {
  int device = 0, bytes = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 48 * 1024;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) !=
      cudaSuccess) {
    return 48 * 1024;
  }
  return static_cast<size_t>(bytes);
}

bool valid_shape(const PoolShape& s) {
  return s.n > 0 && s.c > 0 && s.d > 0 && s.l > 0 && s.n <= 65535 &&
         s.n * s.c <= 0x7fffffff;
}

}  // namespace

// ------------------------------------------------------------------------ host functions

size_t attention_pool_forward_workspace_bytes(DType dtype, const PoolShape& shape) {
  if (!valid_shape(shape)) return 0;
  const ForwardPlan plan = plan_forward(dtype, shape, device_sm_count());
  const size_t acc = acc_size(dtype);
  size_t bytes = align_up(acc * shape.n * shape.c);  // lse
  if (plan.splits > 1) bytes += align_up(acc * plan.splits * shape.n * shape.c * shape.d);
  return bytes;
}

cudaError_t attention_pool_forward(DType dtype, const PoolShape& shape, const void* logits,
                                   const void* features, void* out, void* workspace,
                                   cudaStream_t stream) {
  if (!valid_shape(shape)) return cudaErrorInvalidValue;
  const ForwardPlan plan = plan_forward(dtype, shape, device_sm_count());
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    const int64_t rows = shape.n * shape.c;
    Acc* lse = static_cast<Acc*>(workspace);
    Acc* partial = plan.splits > 1 ? reinterpret_cast<Acc*>(static_cast<char*>(workspace) +
                                                            align_up(sizeof(Acc) * rows))
                                   : nullptr;
    const T* a = static_cast<const T*>(logits);
    const T* f = static_cast<const T*>(features);
    T* o = static_cast<T*>(out);
    auto lse_kernel = row_logsumexp_kernel<T, Acc>;
    ADK_LAUNCH(lse_kernel, static_cast<unsigned>(rows), kRowThreads, 0, stream)(a, shape.l, lse);
    const dim3 grid(static_cast<unsigned>(plan.d_tiles), static_cast<unsigned>(plan.c_tiles),
                    static_cast<unsigned>(shape.n * plan.splits));
    if constexpr (kTensorCores<T>) {
      auto kernel = attention_forward_mma_kernel<T>;
      ADK_LAUNCH(kernel, grid, plan.threads, 0, stream)(
          a, lse, f, shape.n, shape.c, shape.d, shape.l, plan.k_per_split, plan.splits, o,
          partial);
    } else {
      auto kernel = attention_forward_simt_kernel<T, Acc>;
      ADK_LAUNCH(kernel, grid, plan.threads, 0, stream)(
          a, lse, f, shape.n, shape.c, shape.d, shape.l, plan.k_per_split, plan.splits, o,
          partial);
    }
    if (plan.splits > 1) {
      const int64_t count = rows * shape.d;
      const int64_t blocks = std::min<int64_t>(ceil_div(count, 256), 65535);
      auto sum_kernel = split_sum_kernel<T, Acc>;
      ADK_LAUNCH(sum_kernel, static_cast<unsigned>(blocks), 256, 0, stream)(
          partial, plan.splits, count, o);
    }
    return cudaGetLastError();
  });
}

size_t attention_pool_backward_workspace_bytes(DType dtype, const PoolShape& shape) {
  if (!valid_shape(shape)) return 0;
  const BackwardPlan plan = plan_backward(dtype, shape, device_sm_count(), device_smem_limit());
  if (plan.tile_k == 0) return 0;
  const size_t acc = acc_size(dtype);
  return align_up(acc * shape.n * shape.c) + align_up(acc * plan.splits * shape.n * shape.c * shape.l);
}

cudaError_t attention_pool_backward(DType dtype, const PoolShape& shape, const void* grad,
                                    const void* logits, const void* features, void* grad_logits,
                                    void* grad_features, void* workspace, cudaStream_t stream) {
  if (!valid_shape(shape)) return cudaErrorInvalidValue;
  const BackwardPlan plan = plan_backward(dtype, shape, device_sm_count(), device_smem_limit());
  if (plan.tile_k == 0) return cudaErrorInvalidConfiguration;  // too many classes for smem
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    const int64_t rows = shape.n * shape.c;
    Acc* lse = static_cast<Acc*>(workspace);
    Acc* dp_partial =
        reinterpret_cast<Acc*>(static_cast<char*>(workspace) + align_up(sizeof(Acc) * rows));
    const T* a = static_cast<const T*>(logits);
    auto lse_kernel = row_logsumexp_kernel<T, Acc>;
    ADK_LAUNCH(lse_kernel, static_cast<unsigned>(rows), kRowThreads, 0, stream)(a, shape.l, lse);
    auto kernel = attention_backward_kernel<T, Acc>;
    if (plan.smem > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem));
      if (err != cudaSuccess) return err;
    }
    const dim3 grid(static_cast<unsigned>(plan.k_tiles), static_cast<unsigned>(plan.splits),
                    static_cast<unsigned>(shape.n));
    ADK_LAUNCH(kernel, grid, plan.tile_k, plan.smem, stream)(
        static_cast<const T*>(grad), a, lse, static_cast<const T*>(features), shape.n, shape.c,
        shape.d, shape.l, plan.chunks_per_split, static_cast<T*>(grad_features), dp_partial);
    auto finalize = attention_backward_finalize_kernel<T, Acc>;
    ADK_LAUNCH(finalize, static_cast<unsigned>(rows), kRowThreads, 0, stream)(
        a, lse, dp_partial, plan.splits, rows, shape.l, static_cast<T*>(grad_logits));
    return cudaGetLastError();
  });
}

}  // namespace adapt_deploy_kernels
