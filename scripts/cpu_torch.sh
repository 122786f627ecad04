# Sourced by scripts/setup.sh and scripts/setup_vllm.sh: install_cpu_torch PYTHON VERSION [PIP ARGS...]
# installs the CPU build of torch==VERSION into PYTHON's environment, on any Linux machine:
# first from pip's configured sources (a local wheel or mirror that serves VERSION+cpu), else
# from PyTorch's CPU wheel index ($CODEDISTILL_TORCH_INDEX, default
# https://download.pytorch.org/whl/cpu) with PyPI for its dependencies. A bare
# `pip install torch==VERSION` from PyPI would pull the multi-GB CUDA build on Linux.
# Does nothing when that CPU build is already installed; fails if a CUDA build would remain.

cpu_torch_installed() {  # PYTHON VERSION
  "$1" -c "import sys, torch; sys.exit(not (torch.__version__.split('+')[0] == '$2' and torch.version.cuda is None))" \
    >/dev/null 2>&1
}

install_cpu_torch() {  # PYTHON VERSION [PIP ARGS...]
  local py="$1" version="$2"
  shift 2
  cpu_torch_installed "$py" "$version" && return 0
  if ! "$py" -m pip install --quiet --only-binary torch "$@" "torch==$version+cpu" 2>/dev/null; then
    local index="${CODEDISTILL_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
    echo "torch $version+cpu is not in pip's configured sources: installing it from $index"
    "$py" -m pip install --quiet --only-binary torch "$@" "torch==$version" \
      --index-url "$index" --extra-index-url https://pypi.org/simple
  fi
  if ! cpu_torch_installed "$py" "$version"; then
    echo "error: $py does not have the CPU build of torch $version:" >&2
    "$py" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda)" >&2 || true
    echo "Set CODEDISTILL_TORCH_INDEX to a wheel index serving torch $version CPU builds, or on a GPU" \
      "machine install your CUDA torch and run CODEDISTILL_CONSTRAINTS=none scripts/setup.sh." >&2
    return 1
  fi
}
