# One image for the front and the workers (the command picks the role).
#   CPU (default):  docker build -t rwkv-serve .
#   GPU:            docker build -t rwkv-serve:gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
# (PyPI's Linux torch wheels bundle CUDA; the CPU index keeps the image ~1 GB smaller.)
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# A C++ compiler for the engine's native CPU kernels (built below, once, for the image's user).
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
# torch first, in its own layer: it is most of the image and changes least.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.2,<2.15"
COPY pyproject.toml README.md ./
COPY rwkv_serve ./rwkv_serve
COPY worker ./worker
COPY service ./service
COPY client ./client
COPY tuning ./tuning
COPY protos ./protos
RUN pip install .

RUN useradd --create-home --uid 10001 rwkv
USER rwkv
RUN python -m worker.cpu_kernels
EXPOSE 50051 50052
# The front by default; compose runs workers with `rwkv-worker ...`.
CMD ["rwkv-front", "--host", "0.0.0.0", "--port", "50051"]
