#!/usr/bin/env bash
# Set everything up in ./.venv: the CPU build of torch pinned by constraints.txt (from pip's
# configured sources if they serve it, else from PyTorch's CPU wheel index: scripts/cpu_torch.sh),
# then codedistill with its ML stack and test tools. Idempotent; re-run after pulling.
#   CODEDISTILL_PYTHON=python3.11 scripts/setup.sh   # pick the interpreter
#   CODEDISTILL_TORCH_INDEX=URL scripts/setup.sh      # another index serving CPU builds of torch
#   CODEDISTILL_CONSTRAINTS=none scripts/setup.sh     # GPU machines: keep the torch you installed
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cpu_torch.sh
PY="${CODEDISTILL_PYTHON:-python3}"
TORCH_VERSION="$(sed -n 's/^torch==//p' constraints.txt)"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${CODEDISTILL_CONSTRAINTS:-}" = "none" ]; then
  .venv/bin/python -m pip install --quiet -e ".[ml,dev]"
else
  install_cpu_torch .venv/bin/python "$TORCH_VERSION" -c constraints.txt
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[ml,dev]"
fi
# the reference judge of HumanEval+/MBPP+ for the parity tests (see the file for why --no-deps)
.venv/bin/python -m pip install --quiet --no-deps -r requirements-evalplus.txt
.venv/bin/python -c "import torch, transformers, peft, codedistill; print('codedistill', codedistill.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
