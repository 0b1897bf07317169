# adapt-deploy on an NVIDIA GPU: CUDA runtime + cuDNN base, torch with CUDA, onnxruntime-gpu,
# cuda-python and TensorRT (the `gpu` and `trt` extras).
# Build: docker build -t adapt-deploy .
# Run:   docker run --gpus all --rm -it -v "$PWD/work:/work" adapt-deploy adapt-deploy doctor
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

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
RUN pip install --upgrade pip && pip install torch ".[gpu,trt]"

WORKDIR /work
ENTRYPOINT []
CMD ["adapt-deploy", "--help"]
