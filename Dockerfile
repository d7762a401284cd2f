# One image for every dpserve service; the command picks the service (see docker-compose.yml).
#   docker build -t dpserve .                                   CPU torch (default)
#   docker build -t dpserve:cuda \
#     --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .     CUDA torch on a CUDA base
ARG BASE=python:3.11-slim
FROM ${BASE}

# CUDA bases have no Python: install it (a no-op on the python base).
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_BREAK_SYSTEM_PACKAGES=1 DPSERVE_CACHE_DIR=/models
RUN command -v python >/dev/null || (apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip python-is-python3 \
 && rm -rf /var/lib/apt/lists/*)
WORKDIR /app
# torch first, pinned, so no other requirement pulls a different build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX} --extra-index-url https://pypi.org/simple
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
RUN pip install .
# The tiny default model is created at build time: containers never download weights.
RUN python -m services.launcher create-tiny-model /models/tiny-llama
ENV DPSERVE_MODEL_PATH=/models/tiny-llama
EXPOSE 30000
HEALTHCHECK --interval=5s --timeout=10s --retries=60 CMD python -m services.launcher.healthcheck gateway
CMD ["python", "-m", "services.launcher", "serve", "--host", "0.0.0.0"]
