// Torch glue of the fused pooling kernels: the adapt_deploy_kernels:: ops, CUDA only.
//
// adapt_deploy/ops/cuda_impl.py registers these as the CUDA implementations of the
// adapt_deploy:: ops (same names), keeping the PyTorch reference for what they do not take
// (other dtypes, empty tensors). Each function checks its inputs, allocates its outputs and
// scratch with the caching allocator, and launches on the current stream of the inputs' device.
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which needs cuBLAS headers), so
// this file also compiles against the CPU torch wheel's headers (the CI compile check).
#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "pooling.h"

namespace adapt_deploy_kernels {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK(false, "adapt_deploy_kernels: unsupported dtype ", t.scalar_type(),
                  " (expected float32, float16, bfloat16 or float64)");
  }
}

void check_tensor(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == dims, name, ": expected ", dims, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, ": expected a contiguous tensor");
  TORCH_CHECK(t.numel() > 0, name, ": expected a non-empty tensor, got shape ", t.sizes());
}

void check_like(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.scalar_type() == logits.scalar_type(), name, ": expected dtype ",
              logits.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == logits.device(), name, ": expected device ", logits.device(),
              ", got ", t.device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err != cudaErrorInvalidConfiguration, op,
              ": too many classes for the fused kernel's shared memory on this GPU");
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

// The shape of an attention pooling call. Features that are not read (the features-only
// backward takes them for their shape) need not be contiguous.
PoolShape pool_shape(const at::Tensor& logits, const at::Tensor& features,
                     bool features_read = true) {
  check_tensor(logits, "logits", 4);
  if (features_read) {
    check_tensor(features, "features", 4);
  } else {
    TORCH_CHECK(features.dim() == 4, "features: expected 4 dimensions, got shape ",
                features.sizes());
    TORCH_CHECK(features.numel() > 0, "features: expected a non-empty tensor");
  }
  check_like(features, logits, "features");
  TORCH_CHECK(features.size(0) == logits.size(0) && features.size(2) == logits.size(2) &&
                  features.size(3) == logits.size(3),
              "features: expected the N, H, W of logits ", logits.sizes(), ", got ",
              features.sizes());
  return PoolShape{logits.size(0), logits.size(1), features.size(1),
                   logits.size(2) * logits.size(3)};
}

// The shape of a backward call: grad (N, C, D) next to logits (N, C, H, W), features (N, D, H, W).
PoolShape check_backward_inputs(const at::Tensor& grad, const at::Tensor& logits,
                                const at::Tensor& features, bool features_read = true) {
  const PoolShape shape = pool_shape(logits, features, features_read);
  check_tensor(grad, "grad", 3);
  check_like(grad, logits, "grad");
  TORCH_CHECK(grad.size(0) == shape.n && grad.size(1) == shape.c && grad.size(2) == shape.d,
              "grad: expected shape (N, C, D) = (", shape.n, ", ", shape.c, ", ", shape.d,
              "), got ", grad.sizes());
  return shape;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

at::Tensor lse_pool_op(const at::Tensor& logits, double k) {
  check_tensor(logits, "logits", 4);
  TORCH_CHECK(k > 0, "k: expected a positive float, got ", k);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({logits.size(0), logits.size(1)}, logits.options());
  check_launch(lse_pool_forward(dtype_of(logits), logits.size(0) * logits.size(1),
                                logits.size(2) * logits.size(3), k, logits.const_data_ptr(),
                                out.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
               "lse_pool");
  return out;
}

at::Tensor lse_pool_backward_op(const at::Tensor& grad, const at::Tensor& logits, double k) {
  check_tensor(logits, "logits", 4);
  check_tensor(grad, "grad", 2);
  check_like(grad, logits, "grad");
  TORCH_CHECK(grad.size(0) == logits.size(0) && grad.size(1) == logits.size(1),
              "grad: expected shape (N, C) of logits ", logits.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(k > 0, "k: expected a positive float, got ", k);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  check_launch(lse_pool_backward(dtype_of(logits), logits.size(0) * logits.size(1),
                                 logits.size(2) * logits.size(3), k, grad.const_data_ptr(),
                                 logits.const_data_ptr(), grad_logits.mutable_data_ptr(),
                                 c10::cuda::getCurrentCUDAStream().stream()),
               "lse_pool_backward");
  return grad_logits;
}

at::Tensor attention_pool_op(const at::Tensor& logits, const at::Tensor& features) {
  const PoolShape shape = pool_shape(logits, features);
  const c10::cuda::CUDAGuard guard(logits.device());
  const DType dtype = dtype_of(logits);
  at::Tensor out = at::empty({shape.n, shape.c, shape.d}, logits.options());
  at::Tensor scratch = workspace(attention_pool_forward_workspace_bytes(dtype, shape), logits);
  check_launch(attention_pool_forward(dtype, shape, logits.const_data_ptr(),
                                      features.const_data_ptr(), out.mutable_data_ptr(),
                                      scratch.mutable_data_ptr(),
                                      c10::cuda::getCurrentCUDAStream().stream()),
               "attention_pool");
  return out;
}

std::tuple<at::Tensor, at::Tensor> attention_pool_backward_op(const at::Tensor& grad,
                                                              const at::Tensor& logits,
                                                              const at::Tensor& features) {
  const PoolShape shape = check_backward_inputs(grad, logits, features);
  const c10::cuda::CUDAGuard guard(logits.device());
  const DType dtype = dtype_of(logits);
  at::Tensor grad_logits = at::empty(logits.sizes(), logits.options());
  at::Tensor grad_features = at::empty(features.sizes(), features.options());
  at::Tensor scratch = workspace(attention_pool_backward_workspace_bytes(dtype, shape), logits);
  check_launch(attention_pool_backward(dtype, shape, grad.const_data_ptr(),
                                       logits.const_data_ptr(), features.const_data_ptr(),
                                       grad_logits.mutable_data_ptr(),
                                       grad_features.mutable_data_ptr(),
                                       scratch.mutable_data_ptr(),
                                       c10::cuda::getCurrentCUDAStream().stream()),
               "attention_pool_backward");
  return {grad_logits, grad_features};
}

at::Tensor attention_pool_backward_features_op(const at::Tensor& grad, const at::Tensor& logits,
                                               const at::Tensor& features) {
  const PoolShape shape = check_backward_inputs(grad, logits, features, false);
  const c10::cuda::CUDAGuard guard(logits.device());
  const DType dtype = dtype_of(logits);
  at::Tensor grad_features = at::empty(features.sizes(), features.options().memory_format(
                                                             at::MemoryFormat::Contiguous));
  at::Tensor scratch =
      workspace(attention_pool_backward_features_workspace_bytes(dtype, shape), logits);
  check_launch(attention_pool_backward_features(dtype, shape, grad.const_data_ptr(),
                                                logits.const_data_ptr(),
                                                grad_features.mutable_data_ptr(),
                                                scratch.mutable_data_ptr(),
                                                c10::cuda::getCurrentCUDAStream().stream()),
               "attention_pool_backward_features");
  return grad_features;
}

}  // namespace
}  // namespace adapt_deploy_kernels

TORCH_LIBRARY(adapt_deploy_kernels, m) {
  m.def("lse_pool(Tensor logits, float k) -> Tensor");
  m.def("lse_pool_backward(Tensor grad, Tensor logits, float k) -> Tensor");
  m.def("attention_pool(Tensor logits, Tensor features) -> Tensor");
  m.def("attention_pool_backward(Tensor grad, Tensor logits, Tensor features) -> (Tensor, Tensor)");
  m.def("attention_pool_backward_features(Tensor grad, Tensor logits, Tensor features) -> Tensor");
}

TORCH_LIBRARY_IMPL(adapt_deploy_kernels, CUDA, m) {
  m.impl("lse_pool", &adapt_deploy_kernels::lse_pool_op);
  m.impl("lse_pool_backward", &adapt_deploy_kernels::lse_pool_backward_op);
  m.impl("attention_pool", &adapt_deploy_kernels::attention_pool_op);
  m.impl("attention_pool_backward", &adapt_deploy_kernels::attention_pool_backward_op);
  m.impl("attention_pool_backward_features",
         &adapt_deploy_kernels::attention_pool_backward_features_op);
}
