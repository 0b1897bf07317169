// Host interface of the fused pooling kernels: what bindings.cpp calls, what the .cu files define.
//
// Plain C++ over raw device pointers and a cudaStream_t, with no torch types, so the kernels
// compile with nvcc alone and the torch glue (tensors, checks, allocation, the current stream)
// stays in bindings.cpp. Every tensor is contiguous: logits (N, C, L), features (N, D, L),
// pooled features (N, C, D), with L = H*W. Scratch memory comes from the caller (the caching
// allocator) in the size the matching *_workspace_bytes function returns.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace adapt_deploy_kernels {

// Element type of every tensor of one call. Accumulation is fp32, or fp64 for kFloat64.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct PoolShape {
  int64_t n;  // images
  int64_t c;  // classes (rows of the logits)
  int64_t d;  // feature channels
  int64_t l;  // spatial positions H*W
};

// Eq. 1 before the sigmoid: out[n, c] = (logsumexp_l(k * A[n, c, l]) - log L) / k.
cudaError_t lse_pool_forward(DType dtype, int64_t rows, int64_t l, double k, const void* logits,
                             void* out, cudaStream_t stream);

// grad_logits[n, c, l] = grad[n, c] * softmax_l(k * A[n, c])[l].
cudaError_t lse_pool_backward(DType dtype, int64_t rows, int64_t l, double k, const void* grad,
                              const void* logits, void* grad_logits, cudaStream_t stream);

// Eq. 3: out[n, c, :] = sum_l softmax_l(A[n, c])[l] * F[n, :, l].
size_t attention_pool_forward_workspace_bytes(DType dtype, const PoolShape& shape);
cudaError_t attention_pool_forward(DType dtype, const PoolShape& shape, const void* logits,
                                   const void* features, void* out, void* workspace,
                                   cudaStream_t stream);

// dF = P^T dOut and dA = P * (dP - rowsum(P * dP)) with dP = dOut F^T, P = softmax_l(A).
size_t attention_pool_backward_workspace_bytes(DType dtype, const PoolShape& shape);
cudaError_t attention_pool_backward(DType dtype, const PoolShape& shape, const void* grad,
                                    const void* logits, const void* features, void* grad_logits,
                                    void* grad_features, void* workspace, cudaStream_t stream);

// dF = P^T dOut alone, for detached logits (no read of F, no dA): attention_features_grad.cu.
size_t attention_pool_backward_features_workspace_bytes(DType dtype, const PoolShape& shape);
cudaError_t attention_pool_backward_features(DType dtype, const PoolShape& shape, const void* grad,
                                             const void* logits, void* grad_features,
                                             void* workspace, cudaStream_t stream);

}  // namespace adapt_deploy_kernels
