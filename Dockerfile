# One image for every dpserve service; the command picks the service.
#   docker build -t dpserve .                                  (CPU torch)
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 ...   (CUDA base; see README)
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DPSERVE_CACHE_DIR=/models
WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
# torch first, pinned, so no other requirement pulls a different build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX} --extra-index-url https://pypi.org/simple \
 && pip install .
# The tiny default model is created at build time: containers never download weights.
RUN python -m services.launcher create-tiny-model /models/tiny-llama
ENV DPSERVE_MODEL_PATH=/models/tiny-llama
EXPOSE 30000
CMD ["python", "-m", "services.launcher", "serve", "--host", "0.0.0.0"]
