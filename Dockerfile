# adapt-deploy on an NVIDIA GPU: CUDA (devel: nvcc builds the fused pooling kernels) + cuDNN base,
# torch with CUDA, onnxruntime-gpu, cuda-python and TensorRT (the `gpu` and `trt` extras).
# Build: docker build -t adapt-deploy .
# Run:   docker run --gpus all --rm -it -v "$PWD/work:/work" adapt-deploy adapt-deploy doctor
FROM nvidia/cuda:13.0.0-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/adapt-deploy
COPY pyproject.toml README.md ./
COPY adapt_deploy ./adapt_deploy
# torch from PyPI is the CUDA build on Linux x86_64; the extras add ONNX Runtime GPU and TensorRT.
RUN pip install --upgrade pip && pip install torch ".[train,gpu,trt]"
# The fused CUDA kernels of the pooling ops, compiled now (no GPU needed) into a cache the runtime
# reads, so nothing compiles at run time. nvcc's CUDA major version must match torch's.
ENV ADAPT_DEPLOY_KERNELS_CACHE=/opt/adapt-deploy/kernels \
    TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0;10.0;12.0+PTX"
RUN adapt-deploy kernels build

WORKDIR /work
ENTRYPOINT []
CMD ["adapt-deploy", "--help"]
