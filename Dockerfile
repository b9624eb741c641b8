# Two images from one Dockerfile (multi-stage targets):
#   front (no torch):  docker build --target front -t rwkv-serve-front .      # rwkv-front, rwkv-gateway, rwkv-admin
#   worker (CPU):      docker build --target worker -t rwkv-serve .           # rwkv-worker (and everything else)
#   worker (GPU):      docker build --target worker -t rwkv-serve:gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
# (PyPI's Linux torch wheels bundle CUDA; the CPU index keeps the image ~1 GB smaller.) `worker` is the last stage,
# so a plain `docker build .` builds it. Both install the SDK distribution (client/: the generated gRPC code and
# rwkv_serve.contract) first, then the server, whose base dependencies need no torch.
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
RUN useradd --create-home --uid 10001 rwkv
# The SDK changes less often than the server: its own layer.
COPY client ./client
RUN pip install ./client

# ---- the front, the HTTP gateway and the admin CLI: grpcio, protobuf, redis, opentelemetry, pydantic-settings,
# fastapi + uvicorn; no torch ----
FROM base AS front
COPY pyproject.toml README.md ./
COPY common ./common
COPY service ./service
COPY gateway ./gateway
RUN pip install . && python -c "import service.server, service.admin, gateway.server" \
    && ! python -c "import torch" 2>/dev/null
USER rwkv
EXPOSE 50051 8000
CMD ["rwkv-front", "--host", "0.0.0.0", "--port", "50051"]

# ---- the model worker: the server plus its [worker] extra (torch, tokenizers, rwkv, ninja) ----
FROM base AS worker
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# A C++ compiler for the engine's native CPU kernels (built below, once, for the image's user).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
# torch first, in its own layer: it is most of the image and changes least.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.2,<2.15"
COPY pyproject.toml README.md ./
COPY common ./common
COPY worker ./worker
COPY service ./service
COPY gateway ./gateway
COPY tuning ./tuning
RUN pip install ".[worker]"
USER rwkv
RUN python -m worker.cpu_kernels
EXPOSE 50051 50052 8000
CMD ["rwkv-worker", "--host", "0.0.0.0", "--port", "50052"]
