// LSE pooling (Eq. 1 before the sigmoid), forward and backward.
//
// Forward, one block per row r = (n, c) of the logits A (N*C rows of L = H*W values):
//   lse_k[r] = log sum_l exp(k A[r, l])          (the shared pass over A, see common.cuh)
//   out[r]   = (lse_k[r] - log L) / k            = (1/k) log( (1/L) sum_l exp(k A[r, l]) )
// Backward, one block per row: the gradient of the log-sum-exp is the softmax,
//   dA[r, l] = dOut[r] * exp(k A[r, l] - lse_k[r])
// so the block reads its row twice (the second read mostly from L2) and writes dA once.
// Accumulation is fp32 (fp64 for fp64 inputs); fp16/bf16 values are converted on load.
#include "common.cuh"

namespace adapt_deploy_kernels {
namespace {

template <typename T, typename Acc>
__global__ void __launch_bounds__(kRowThreads)
    lse_pool_forward_kernel(const T* __restrict__ logits, int64_t l, Acc k, Acc log_l,
                            T* __restrict__ out) {
  __shared__ Acc shared[2 * kWarp];
  const int64_t row = blockIdx.x;
  const Acc lse = row_logsumexp<T, Acc>(logits + row * l, l, k, shared);
  if (threadIdx.x == 0) out[row] = from_acc<T, Acc>((lse - log_l) / k);
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kRowThreads)
    lse_pool_backward_kernel(const T* __restrict__ grad, const T* __restrict__ logits, int64_t l,
                             Acc k, T* __restrict__ grad_logits) {
  __shared__ Acc shared[2 * kWarp];
  const int64_t row = blockIdx.x;
  const T* a = logits + row * l;
  const Acc lse = row_logsumexp<T, Acc>(a, l, k, shared);
  const Acc g = to_acc<Acc>(grad[row]);
  T* da = grad_logits + row * l;
  for (int64_t i = threadIdx.x; i < l; i += blockDim.x) {
    da[i] = from_acc<T, Acc>(g * acc_exp(k * to_acc<Acc>(a[i]) - lse));
  }
}

}  // namespace

cudaError_t lse_pool_forward(DType dtype, int64_t rows, int64_t l, double k, const void* logits,
                             void* out, cudaStream_t stream) {
  if (rows <= 0 || l <= 0) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    const Acc log_l = static_cast<Acc>(std::log(static_cast<double>(l)));
    auto kernel = lse_pool_forward_kernel<T, Acc>;
    ADK_LAUNCH(kernel, static_cast<unsigned>(rows), kRowThreads, 0, stream)(
        static_cast<const T*>(logits), l, static_cast<Acc>(k), log_l, static_cast<T*>(out));
    return cudaGetLastError();
  });
}

cudaError_t lse_pool_backward(DType dtype, int64_t rows, int64_t l, double k, const void* grad,
                              const void* logits, void* grad_logits, cudaStream_t stream) {
  if (rows <= 0 || l <= 0) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    auto kernel = lse_pool_backward_kernel<T, Acc>;
    ADK_LAUNCH(kernel, static_cast<unsigned>(rows), kRowThreads, 0, stream)(
        static_cast<const T*>(grad), static_cast<const T*>(logits), l, static_cast<Acc>(k),
        static_cast<T*>(grad_logits));
    return cudaGetLastError();
  });
}

}  // namespace adapt_deploy_kernels
