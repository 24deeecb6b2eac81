"""Fixtures of the chart tests: the real helm binary (fetched once by tools/get_helm.py), `render` (helm template ->
a list of objects, or the error text), and the KubeRay v1.7.0 CRDs from ../shared/kuberay-crds (never copied here).

No Kubernetes API server exists here, so every rendered object is checked offline: core kinds by
kubernetes-validate, ray.io kinds by the CRDs' openAPIV3Schema made strict.
"""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "raymoe"
EXAMPLES = sorted((CHART / "examples").glob("values-*.yaml"))
CRDS = REPO.parent / "shared" / "kuberay-crds"
KUBE_VERSION = "1.34.0"              # the Kubernetes version helm renders for (helm 3.19's client is 1.34)


def _get_helm():
    spec = importlib.util.spec_from_file_location("get_helm", REPO / "tools" / "get_helm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def helm() -> Path:
    return _get_helm().helm_path()


class HelmError(Exception):
    pass


def _args(values: list[Path | str] = (), sets: list[str] = (), set_json: list[str] = ()) -> list[str]:
    out = []
    for v in values:
        out += ["-f", str(v)]
    for s in sets:
        out += ["--set", s]
    for s in set_json:
        out += ["--set-json", s]
    return out


@pytest.fixture(scope="session")
def run_helm(helm):
    def run(*args: str) -> str:
        p = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60)
        if p.returncode:
            raise HelmError(p.stderr.strip() or p.stdout.strip())
        return p.stdout
    return run


@pytest.fixture(scope="session")
def render(run_helm):
    """render(values=[...], sets=[...], set_json=[...], show_only=[...]) -> the rendered objects, in order."""
    cache: dict = {}

    def go(values=(), sets=(), set_json=(), show_only=(), release="rm") -> list[dict]:
        key = (tuple(map(str, values)), tuple(sets), tuple(set_json), tuple(show_only), release)
        if key not in cache:
            extra = [a for s in show_only for a in ("--show-only", s)]
            out = run_helm("template", release, str(CHART), "--namespace", "ml", "--kube-version", KUBE_VERSION,
                           *_args(values, sets, set_json), *extra)
            cache[key] = [d for d in yaml.safe_load_all(out) if d]
        return cache[key]
    return go


@pytest.fixture(scope="session")
def render_error(run_helm):
    """The error text of a `helm template` that must fail (the test fails if it renders)."""
    def go(values=(), sets=(), set_json=()) -> str:
        try:
            run_helm("template", "rm", str(CHART), "--kube-version", KUBE_VERSION, *_args(values, sets, set_json))
        except HelmError as e:
            return str(e)
        raise AssertionError(f"helm template accepted values={values} sets={sets} set_json={set_json}")
    return go


def _strict(node):
    """Close every object schema that lists properties (the API server's strict field validation): unknown fields
    fail. The CRDs declare no x-kubernetes-preserve-unknown-fields; honoured anyway where present."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if ("properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@pytest.fixture(scope="session")
def crd_schemas() -> dict[str, dict]:
    """kind -> the strict openAPIV3Schema of its ray.io/v1 CRD (KubeRay v1.7.0)."""
    if not CRDS.is_dir():
        pytest.skip(f"the KubeRay v1.7.0 CRDs are not at {CRDS} (expected beside the repository: shared/kuberay-crds)")
    out = {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)        # 1 MB each: libyaml is ten times faster
    for f in (CRDS / "ray.io_rayservices.yaml", CRDS / "ray.io_rayjobs.yaml"):
        crd = yaml.load(f.read_text(), Loader=loader)
        [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[crd["spec"]["names"]["kind"]] = _strict(v1["schema"]["openAPIV3Schema"])
    return out
