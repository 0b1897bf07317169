// Runs one pooling op's host function (and so its kernels) on the CPU emulation (emu.h).
//
//   driver OP DTYPE N C D H W K SMS SMEM_OPTIN DIR
//
// OP: lse_forward | lse_backward | attention_forward | attention_backward |
// attention_backward_features. DTYPE: the DType number (0 fp32, 1 fp16, 2 bf16, 3 fp64). SMS
// and SMEM_OPTIN describe the emulated device (the launch plans depend on them). Inputs are raw element bytes in DIR: logits.bin, features.bin,
// grad.bin. Outputs out.bin, grad_logits.bin, grad_features.bin and the workspace start as 0xff
// bytes (NaN in every float format), so an element the kernels never write reads back as NaN.
// tests/test_cuda_emulation.py builds and drives this.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "../../adapt_deploy/cuda_kernels/pooling.h"

namespace adk = adapt_deploy_kernels;

namespace {

using Bytes = std::vector<unsigned char>;

Bytes read_file(const std::string& path, size_t expected) {
  std::ifstream in(path, std::ios::binary);
  Bytes data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (!in.good() && !in.eof()) {
    std::fprintf(stderr, "cannot read %s\n", path.c_str());
    std::exit(2);
  }
  if (data.size() != expected) {
    std::fprintf(stderr, "%s: expected %zu bytes, got %zu\n", path.c_str(), expected, data.size());
    std::exit(2);
  }
  return data;
}

void write_file(const std::string& path, const Bytes& data) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
}

Bytes poisoned(size_t bytes) { return Bytes(bytes, 0xff); }

int check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    std::fprintf(stderr, "%s failed: error %d\n", what, static_cast<int>(err));
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 12) {
    std::fprintf(stderr, "usage: %s OP DTYPE N C D H W K SMS SMEM_OPTIN DIR\n", argv[0]);
    return 2;
  }
  const std::string op = argv[1];
  const auto dtype = static_cast<adk::DType>(std::atoi(argv[2]));
  const int64_t n = std::atoll(argv[3]), c = std::atoll(argv[4]), d = std::atoll(argv[5]);
  const int64_t l = std::atoll(argv[6]) * std::atoll(argv[7]);
  const double k = std::atof(argv[8]);
  emu::sm_count = std::atoi(argv[9]);
  emu::smem_optin = std::atoi(argv[10]);
  const std::string dir = argv[11];
  const size_t es = dtype == adk::DType::kFloat32 ? 4 : dtype == adk::DType::kFloat64 ? 8 : 2;
  const adk::PoolShape shape{n, c, d, l};
  cudaStream_t stream = nullptr;

  const Bytes logits = read_file(dir + "/logits.bin", es * n * c * l);
  if (op == "lse_forward") {
    Bytes out = poisoned(es * n * c);
    if (check(adk::lse_pool_forward(dtype, n * c, l, k, logits.data(), out.data(), stream), op.c_str()))
      return 1;
    write_file(dir + "/out.bin", out);
  } else if (op == "lse_backward") {
    const Bytes grad = read_file(dir + "/grad.bin", es * n * c);
    Bytes grad_logits = poisoned(es * n * c * l);
    if (check(adk::lse_pool_backward(dtype, n * c, l, k, grad.data(), logits.data(),
                                     grad_logits.data(), stream),
              op.c_str()))
      return 1;
    write_file(dir + "/grad_logits.bin", grad_logits);
  } else if (op == "attention_forward") {
    const Bytes features = read_file(dir + "/features.bin", es * n * d * l);
    Bytes out = poisoned(es * n * c * d);
    Bytes workspace = poisoned(adk::attention_pool_forward_workspace_bytes(dtype, shape));
    if (check(adk::attention_pool_forward(dtype, shape, logits.data(), features.data(), out.data(),
                                          workspace.data(), stream),
              op.c_str()))
      return 1;
    write_file(dir + "/out.bin", out);
  } else if (op == "attention_backward") {
    const Bytes features = read_file(dir + "/features.bin", es * n * d * l);
    const Bytes grad = read_file(dir + "/grad.bin", es * n * c * d);
    Bytes grad_logits = poisoned(es * n * c * l);
    Bytes grad_features = poisoned(es * n * d * l);
    Bytes workspace = poisoned(adk::attention_pool_backward_workspace_bytes(dtype, shape));
    if (check(adk::attention_pool_backward(dtype, shape, grad.data(), logits.data(),
                                           features.data(), grad_logits.data(),
                                           grad_features.data(), workspace.data(), stream),
              op.c_str()))
      return 1;
    write_file(dir + "/grad_logits.bin", grad_logits);
    write_file(dir + "/grad_features.bin", grad_features);
  } else if (op == "attention_backward_features") {
    const Bytes grad = read_file(dir + "/grad.bin", es * n * c * d);
    Bytes grad_features = poisoned(es * n * d * l);
    Bytes workspace =
        poisoned(adk::attention_pool_backward_features_workspace_bytes(dtype, shape));
    if (check(adk::attention_pool_backward_features(dtype, shape, grad.data(), logits.data(),
                                                    grad_features.data(), workspace.data(),
                                                    stream),
              op.c_str()))
      return 1;
    write_file(dir + "/grad_features.bin", grad_features);
  } else {
    std::fprintf(stderr, "unknown op %s\n", op.c_str());
    return 2;
  }
  return 0;
}
