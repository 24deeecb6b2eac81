"""The chart renders objects the cluster accepts and configs the project runs: helm lint --strict, core objects
through kubernetes-validate, RayService/RayJob through the KubeRay v1.7.0 CRDs (strict), serveConfigV2 through Ray
Serve's own schema and raymoe's build_app, the finetune job file through the finetune JobConfig."""
from __future__ import annotations

import importlib
import shlex

import jsonschema
import kubernetes_validate
import pytest
import yaml

from .conftest import CHART, EXAMPLES, KUBE_VERSION

EX = {p.stem.removeprefix("values-"): p for p in EXAMPLES}
# name -> (values files, --set, --set-json): the defaults, each example, and every optional object switched on.
CASES = {
    "defaults": ([], [], []),
    "tiny-cpu": ([EX["tiny-cpu"]], [], []),
    "tiny-cpu+finetune": ([EX["tiny-cpu"]], ["finetune.enabled=true"], []),
    "deepseek-v3-8xh200": ([EX["deepseek-v3-8xh200"]], [], []),
    "deepseek-v3-8xh200+finetune": ([EX["deepseek-v3-8xh200"]], ["finetune.enabled=true"], []),
    "everything": ([], ["finetune.enabled=true", "apiKey.enabled=true", "apiKey.value=sk-test", "networkPolicy.enabled=true",
                        "ingress.enabled=true", "ingress.className=nginx", "ingress.hosts[0]=llm.example.com",
                        "ingress.tls[0].secretName=llm-tls", "ingress.tls[0].hosts[0]=llm.example.com",
                        "cpuWorkers.enabled=true", "finetune.activeDeadlineSeconds=7200", "model.servedName=my-model",
                        "serve.throughputOptimized=true", "serve.haproxy=true", "serve.engineCore=thread"],
                   ['networkPolicy.serveFrom=[{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]']),
    "emptydir-object-store": ([], ["storage.type=emptyDir", "model.source=s3://weights/DeepSeek-V3",
                                   "model.sourceSecret=s3-creds", "apiKey.enabled=true",
                                   "apiKey.existingSecret=my-key", "serve.routePrefix=/llm"], []),
    "vllm": ([], ["serve.engine.kind=vllm"], ['serve.engine.vllm={"engine_args": {"enforce_eager": true}}']),
}
RAY_KINDS = {"RayService", "RayJob"}
CORE_KINDS = {"PersistentVolumeClaim", "Secret", "ConfigMap", "NetworkPolicy", "Ingress"}


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request, render):
    values, sets, set_json = CASES[request.param]
    return request.param, render(values, sets, set_json)


def by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


def pod_templates(obj):
    """(where, pod template) of every Ray pod of a RayService or RayJob."""
    spec = obj["spec"]
    cluster = spec["rayClusterConfig"] if obj["kind"] == "RayService" else spec["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]
    for g in cluster.get("workerGroupSpecs", []):
        yield g["groupName"], g["template"]


@pytest.mark.parametrize("values", [[]] + [[p] for p in EXAMPLES], ids=["defaults"] + [p.stem for p in EXAMPLES])
def test_lint_strict(run_helm, values):
    for extra in ([], ["--set", "finetune.enabled=true"]):
        out = run_helm("lint", "--strict", str(CHART), "--kube-version", KUBE_VERSION,
                       *[a for v in values for a in ("-f", str(v))], *extra)
        assert "0 chart(s) failed" in out


def test_kinds(case):
    name, objs = case
    kinds = {o["kind"] for o in objs}
    assert kinds <= RAY_KINDS | CORE_KINDS, kinds
    assert len(by_kind(objs, "RayService")) == 1
    assert len(by_kind(objs, "RayJob")) == (1 if "finetune" in name or name == "everything" else 0)
    if name == "everything":
        assert kinds == RAY_KINDS | CORE_KINDS


@pytest.mark.parametrize("version", [KUBE_VERSION, str(kubernetes_validate.latest_version())])
def test_core_objects_validate(case, version):
    """Core kinds, and every Ray pod template as a Pod, against Kubernetes' own schemas (strict)."""
    _, objs = case
    for o in objs:
        if o["kind"] in CORE_KINDS:
            kubernetes_validate.validate(o, version, strict=True)
        elif o["kind"] in RAY_KINDS:
            for where, tpl in pod_templates(o):
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"x-{where}", **tpl["metadata"]},
                       "spec": tpl["spec"]}
                kubernetes_validate.validate(pod, version, strict=True)
            if o["kind"] == "RayJob":
                sub = o["spec"]["submitterPodTemplate"]
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "submitter"},
                                              "spec": sub["spec"]}, version, strict=True)


def test_ray_objects_validate_against_kuberay_crds(case, crd_schemas):
    _, objs = case
    for o in objs:
        if o["kind"] in RAY_KINDS:
            jsonschema.Draft7Validator(crd_schemas[o["kind"]]).validate(o)


def test_crd_check_is_strict(render, crd_schemas):
    """An unknown field anywhere in a RayService fails: the check would catch a typo in a template."""
    [rs] = by_kind(render(), "RayService")
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(jsonschema.ValidationError, match="resourcez"):
        jsonschema.Draft7Validator(crd_schemas["RayService"]).validate(rs)


def test_kuberay_operator_rules(case):
    """What the KubeRay operator checks beyond the CRD schema (ray-operator/controllers/ray/utils/validation.go):
    DNS-1035 names of at most 47 characters (it appends 6 for the cluster), a TTL only with
    shutdownAfterJobFinishes, a positive activeDeadlineSeconds when set, a known upgradeStrategy, and no group
    `resources` field beside rayStartParams resources."""
    import re
    _, objs = case
    for o in by_kind(objs, "RayService") + by_kind(objs, "RayJob"):
        name = o["metadata"]["name"]
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 47, name
        spec = o["spec"]
        cluster = spec["rayClusterConfig"] if o["kind"] == "RayService" else spec["rayClusterSpec"]
        for g in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
            assert "resources" not in g and "labels" not in g.get("rayStartParams", {})
            assert g["template"]["spec"]["containers"], "KubeRay needs the Ray container first"
        if o["kind"] == "RayService":
            assert spec["upgradeStrategy"]["type"] in ("NewCluster", "None")
        else:
            assert spec.get("ttlSecondsAfterFinished", 0) == 0 or spec["shutdownAfterJobFinishes"]
            assert spec.get("activeDeadlineSeconds", 1) > 0 and spec["backoffLimit"] >= 0
            assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_security(case):
    """Non-root pods, no privilege escalation, capabilities dropped, in every container of every Ray pod."""
    _, objs = case
    for o in by_kind(objs, "RayService") + by_kind(objs, "RayJob"):
        templates = list(pod_templates(o))
        if o["kind"] == "RayJob":
            templates.append(("submitter", o["spec"]["submitterPodTemplate"]))
        for where, tpl in templates:
            spec = tpl["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, where
            assert spec["securityContext"]["fsGroup"] == 100, where
            for c in spec["containers"] + spec.get("initContainers", []):
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, (where, c["name"])
                assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], (where, c["name"])
        if o["kind"] == "RayService":
            auto = o["spec"]["rayClusterConfig"]["autoscalerOptions"]
            assert auto["securityContext"]["allowPrivilegeEscalation"] is False


def test_ray_cluster_shape(render):
    """Head without GPU work; the GPU group asks for whole GPUs with /dev/shm, tolerations and node selectors; the
    autoscaler is on; readiness is the app's /health, liveness Ray's own."""
    objs = render([EX["deepseek-v3-8xh200"]], ["cpuWorkers.enabled=true"])
    [rs] = by_kind(objs, "RayService")
    rc = rs["spec"]["rayClusterConfig"]
    assert rs["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert rc["rayVersion"] == "2.60.0" and rc["enableInTreeAutoscaling"] is True
    assert rc["autoscalerOptions"]["upscalingMode"] == "Conservative"
    head = rc["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    hc = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in hc["resources"].get("limits", {})
    assert hc["readinessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365}
    gpu, cpu = rc["workerGroupSpecs"]
    assert (gpu["groupName"], gpu["minReplicas"], gpu["maxReplicas"]) == ("h200", 1, 4)
    spec = gpu["template"]["spec"]
    c = spec["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "serve"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "256Gi"}} in spec["volumes"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    # the API key reaches the app only through the Secret, as the env var the app is told to read
    env = {e["name"]: e for e in c["env"]}
    assert env["RAYMOE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "raymoe-api-key", "key": "api-key"}


def serve_config(objs) -> dict:
    [rs] = by_kind(objs, "RayService")
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def test_serve_config_is_a_serve_deploy_config_that_builds_the_app(case, write_ckpt, monkeypatch):
    """serveConfigV2 passes Ray Serve's own schema, names raymoe's builder, and its args build the application."""
    import sys

    from ray.serve import Application
    from ray.serve._private.utils import validate_route_prefix
    from ray.serve.schema import ServeDeploySchema

    name, objs = case
    cfg = serve_config(objs)
    ServeDeploySchema.model_validate(cfg)
    [app] = cfg["applications"]
    validate_route_prefix(app["route_prefix"])             # Serve checks this at deploy time, not in the schema
    assert app["import_path"] == "raymoe.deployments.app:build_app"
    module, attr = app["import_path"].split(":")
    build_app = getattr(importlib.import_module(module), attr)
    args = dict(app["args"])
    ckpt = write_ckpt("helm-tiny", dtype="float32")          # the pods' model.path does not exist here
    assert args["model"].startswith("/")
    args["model"] = str(ckpt)
    if args["engine"].get("kind") == "vllm":      # the image's Python with vLLM: a Python that exists, here
        monkeypatch.setenv("RAYMOE_VLLM_PYTHON", sys.executable)
    assert isinstance(build_app(args), Application)


def test_serve_args_follow_values(render):
    objs = render([EX["deepseek-v3-8xh200"]])
    [app] = serve_config(objs)["applications"]
    args = app["args"]
    assert args["model"] == "/models/DeepSeek-V3" and args["served_model_name"] == "deepseek-ai/DeepSeek-V3"
    assert args["api_key_env"] == "RAYMOE_API_KEY"
    assert args["autoscaling"]["max_replicas"] == 4 and args["max_ongoing_requests"] == 64
    assert args["engine"]["max_model_len"] == 131072
    assert args["engine"]["parallel"] == {"num_shards": 7, "transport": "collective", "cpus_per_shard": 8,
                                          "gpus_per_shard": 1, "placement_strategy": "STRICT_PACK"}
    from raymoe.deployments.app import app_config
    args["model"] = "/nonexistent"
    with pytest.raises(ValueError, match="not a checkpoint directory"):   # the app checks the path, as in the pod
        app_config(args)
    assert args["engine_core"] == "auto"             # a process, which starts the expert shards
    # no expert parallelism asked: no `parallel` key, and no API key
    [app] = serve_config(render())["applications"]
    assert "parallel" not in app["args"]["engine"] and "api_key_env" not in app["args"]


LORA_ARGS = {"lora_root", "lora_modules", "max_loras", "max_cpu_loras", "max_lora_rank"}


def test_engine_kind_vllm(render):
    """serve.engine.kind vllm renders engine.kind vllm (and engine.vllm), no expert-parallel or LoRA args, and the
    args validate as ServeAppConfig; the default (raymoe) renders neither kind nor vllm, and LoRA as before."""
    from raymoe.deployments.config import ServeAppConfig
    [app] = serve_config(render(sets=["serve.engine.kind=vllm"],
                                set_json=['serve.engine.vllm={"python": "/opt/vllm/bin/python", '
                                          '"engine_args": {"tensor_parallel_size": 1}}']))["applications"]
    args = app["args"]
    cfg = ServeAppConfig.model_validate(args)
    assert cfg.engine_kind == "vllm"
    assert cfg.vllm_settings().python == "/opt/vllm/bin/python"
    assert cfg.vllm_settings().engine_args == {"tensor_parallel_size": 1}
    assert args["engine"] == {"kind": "vllm", "device": "cuda", "dtype": "bfloat16", "kv_cache_memory_gb": 20,
                              "vllm": {"python": "/opt/vllm/bin/python", "engine_args": {"tensor_parallel_size": 1}}}
    assert not LORA_ARGS & set(args)                       # serve.lora.enabled (the default) is not rendered
    # no vllm settings given: no engine.vllm key
    [app] = serve_config(render(sets=["serve.engine.kind=vllm"]))["applications"]
    assert app["args"]["engine"] == {"kind": "vllm", "device": "cuda", "dtype": "bfloat16", "kv_cache_memory_gb": 20}
    assert ServeAppConfig.model_validate(app["args"]).engine_kind == "vllm"
    # the default: raymoe, rendered as before (no kind key), with serve.lora's args
    [app] = serve_config(render())["applications"]
    assert app["args"]["engine"] == {"device": "cuda", "dtype": "bfloat16", "kv_cache_memory_gb": 20}
    assert LORA_ARGS - {"lora_modules"} <= set(app["args"])
    assert ServeAppConfig.model_validate(app["args"]).engine_kind == "raymoe"
    [app] = serve_config(render(sets=["serve.engine.kind=raymoe"]))["applications"]
    assert "kind" not in app["args"]["engine"]


def test_model_volume_and_init_check(case):
    """Every Ray pod mounts the model volume where model.path lies and runs the weights check first."""
    name, objs = case
    for o in by_kind(objs, "RayService") + by_kind(objs, "RayJob"):
        for where, tpl in pod_templates(o):
            spec = tpl["spec"]
            [init] = spec["initContainers"]
            env = {e["name"]: e["value"] for e in init["env"]}
            assert init["name"] == "model-check" and "no model weights at $m" in init["args"][0]
            mount = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}["models"]
            assert env["MODEL_PATH"].startswith(mount + "/")
            [vol] = [v for v in spec["volumes"] if v["name"] == "models"]
            if name == "emptydir-object-store":
                assert "emptyDir" in vol and env["MODEL_SOURCE"] == "s3://weights/DeepSeek-V3"
                assert init["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
            else:
                assert vol["persistentVolumeClaim"]["claimName"] == "rm-raymoe-models"


def test_finetune_job(render, tmp_path):
    """K8sJobMode RayJob whose entrypoint reads the ConfigMap's job file; the job file loads with raymoe's own
    loader and writes the adapter under the adapter root on the model volume."""
    from raymoe.finetune.__main__ import main  # noqa: F401  (the entrypoint module exists)
    from raymoe.finetune.config import load_job

    objs = render([EX["tiny-cpu"]], ["finetune.enabled=true"])
    [job], [cm] = by_kind(objs, "RayJob"), by_kind(objs, "ConfigMap")
    spec = job["spec"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 600
    argv = shlex.split(spec["entrypoint"])
    assert argv[:3] == ["python", "-m", "raymoe.finetune"] and argv[3] == "--config"
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    [cfg_vol] = [v for v in head["volumes"] if v["name"] == "job-config"]
    assert cfg_vol["configMap"]["name"] == cm["metadata"]["name"]
    assert argv[4] == f"{mounts['job-config']}/job.yaml"
    # the ConfigMap's files, as the driver sees them
    for fname, text in cm["data"].items():
        (tmp_path / fname).write_text(text)
    job_cfg = load_job(tmp_path / "job.yaml")
    assert job_cfg.name == "tiny-qa" and job_cfg.model == "/models/tiny"
    assert job_cfg.output_dir == "/models/adapters/tiny-qa"              # <adapters.root>/<finetune.name>
    assert job_cfg.output_dir.startswith(mounts["models"] + "/")
    for train in job_cfg.data.train:                                   # its dataset travels in the ConfigMap
        assert train.startswith(mounts["job-config"] + "/") and train.rsplit("/", 1)[1] in cm["data"]
    assert job_cfg.scaling.num_workers == 2 and job_cfg.scaling.use_gpu is False


@pytest.mark.parametrize("values", [[]] + [[p] for p in EXAMPLES], ids=["defaults"] + [p.stem for p in EXAMPLES])
def test_finetune_job_file_parses(render, values):
    from raymoe.finetune.config import parse_job
    objs = render(values, ["finetune.enabled=true"])
    [cm] = by_kind(objs, "ConfigMap")
    parse_job(yaml.safe_load(cm["data"]["job.yaml"]), source="job.yaml")


def test_finetune_renders_alone_with_show_only(render):
    objs = render([EX["deepseek-v3-8xh200"]], ["finetune.enabled=true", "finetune.name=legal-v2"],
                  show_only=["templates/finetune-configmap.yaml", "templates/finetune-rayjob.yaml"])
    assert [o["kind"] for o in objs] == ["ConfigMap", "RayJob"]
    assert objs[1]["metadata"]["name"] == "rm-raymoe-ft-legal-v2"
    gpu = objs[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_network_policy_and_ingress(render):
    objs = render(*CASES["everything"])
    [np], [ing], [rs] = by_kind(objs, "NetworkPolicy"), by_kind(objs, "Ingress"), by_kind(objs, "RayService")
    pod_labels = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    assert np["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    serve_rule = np["spec"]["ingress"][1]
    assert serve_rule["ports"] == [{"port": 8000, "protocol": "TCP"}]
    assert serve_rule["from"] == [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]
    for where, tpl in pod_templates(rs):                            # serving pods only, every one of them
        env = tpl["spec"]["containers"][0]["env"]
        assert {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1"} in env, where
        assert {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"} in env, where
    assert serve_config(objs)["applications"][0]["args"]["engine_core"] == "thread"
    [job] = by_kind(objs, "RayJob")
    assert all("env" not in tpl["spec"]["containers"][0] for _, tpl in pod_templates(job))
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": f"{rs['metadata']['name']}-serve-svc", "port": {"number": 8000}}
    assert ing["spec"]["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]
    [secret] = by_kind(objs, "Secret")
    assert secret["data"] == {"api-key": "c2stdGVzdA=="}


@pytest.mark.parametrize("sets", [[], ["apiKey.enabled=true", "apiKey.existingSecret=k", "ingress.enabled=true",
                                       "ingress.hosts[0]=llm.example.com"], ["finetune.enabled=true"],
                                  ["serve.engine.kind=vllm"]],
                         ids=["defaults", "api-key+ingress", "finetune", "vllm"])
def test_notes(run_helm, tmp_path, sets):
    """NOTES.txt renders (helm template never shows it, so it is rendered here through tpl in a copy of the chart)
    and names the Service, the Secret and the finetune commands that exist."""
    import shutil
    chart = tmp_path / "raymoe"
    shutil.copytree(CHART, chart)
    shutil.copy(CHART / "templates" / "NOTES.txt", chart / "notes.txt")
    (chart / "templates" / "notes-render.yaml").write_text('notes: {{ tpl (.Files.Get "notes.txt") . | toJson }}\n')
    out = run_helm("template", "rm", str(chart), "--namespace", "ml", "--show-only", "templates/notes-render.yaml",
                   *[a for s in sets for a in ("--set", s)])
    notes = yaml.safe_load(out)["notes"]
    assert "kubectl -n ml port-forward svc/rm-raymoe-serve-svc 8000:8000" in notes
    assert ("get secret k" in notes) == ("apiKey.enabled=true" in sets)
    assert ("https://llm.example.com/v1" in notes) == ("ingress.enabled=true" in sets)
    if "finetune.enabled=true" in sets:
        assert "kubectl -n ml get rayjob rm-raymoe-ft-my-adapter -w" in notes
    else:
        assert "--show-only templates/finetune-rayjob.yaml" in notes
    assert ('"model": "<name>"' in notes) == ("serve.engine.kind=vllm" not in sets)   # vllm serves no adapters


def test_kube_version_floor(run_helm):
    from .conftest import HelmError
    with pytest.raises(HelmError, match="chart requires kubeVersion: >=1.28.0-0"):
        run_helm("template", "rm", str(CHART), "--kube-version", "1.27.0")


def test_route_prefix_reaches_probe_and_config(render):
    objs = render(*CASES["emptydir-object-store"])
    [app] = serve_config(objs)["applications"]
    assert app["route_prefix"] == "/llm"
    [rs] = by_kind(objs, "RayService")
    worker = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["readinessProbe"]["httpGet"]["path"] == "/llm/health"


def _run_init(objs, tmp_path, model: str, source: str):
    """Run the rendered model-check script in bash, as the init container would, with model.path under tmp_path."""
    import os
    import subprocess
    import sys
    [rs] = by_kind(objs, "RayService")
    [init] = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["initContainers"]
    assert init["command"] == ["/bin/bash", "-c"]
    env = {**os.environ, "MODEL_PATH": str(tmp_path / model), "MODEL_SOURCE": source, "HOSTNAME": "pod-0",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}   # raymoe and python, as in the image
    return subprocess.run(["/bin/bash", "-c", init["args"][0]], env=env, capture_output=True, text=True, timeout=120)


def test_init_step_stops_a_pod_without_weights(render, tmp_path):
    p = _run_init(render(), tmp_path, "DeepSeek-V3", "")
    assert p.returncode == 1
    assert f"raymoe: no model weights at {tmp_path}/DeepSeek-V3 (model.path)" in p.stderr
    assert "(PVC rm-raymoe-models, mounted at /models)" in p.stderr
    assert "set model.source" in p.stderr


def test_init_step_finds_copies_or_writes_weights(render, tmp_path, write_ckpt):
    import os
    objs = render()
    ckpt = write_ckpt("helm-tiny", dtype="float32")
    os.symlink(ckpt, tmp_path / "present")
    p = _run_init(objs, tmp_path, "present", "")
    assert p.returncode == 0 and "model weights found" in p.stdout
    # a source URI is copied with pyarrow (a local path here; s3:// and gs:// take the same call)
    p = _run_init(objs, tmp_path, "copied", str(ckpt))
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path / "copied")) == sorted(os.listdir(ckpt))
    assert not list(tmp_path.glob("*.partial-*"))
    # "tiny" writes raymoe's tiny checkpoint with the CLI
    p = _run_init(objs, tmp_path, "sub/tiny", "tiny")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "sub" / "tiny" / "config.json").is_file()


def test_matches_the_projects_own_serve_config(render):
    """Values that say what deployments/configs/deepseek-v3.yaml says render the same Serve config: the same
    top-level options and args the app validates to the same ServeAppConfig."""
    from raymoe.deployments.config import ServeAppConfig
    ref = yaml.safe_load((CHART.parents[1] / "deployments" / "configs" / "deepseek-v3.yaml").read_text())
    objs = render(sets=["model.servedName=deepseek-ai/DeepSeek-V3", "apiKey.enabled=true", "apiKey.existingSecret=k",
                        "serve.numCpus=8", "serve.maxQueuedRequests=512", "serve.retryAfterS=2",
                        "serve.autoscaling.maxReplicas=4", "gpuWorkers.maxReplicas=4",
                        "serve.autoscaling.targetOngoingRequests=32", "serve.engine.kv_cache_memory_gb=40",
                        "serve.engine.max_num_seqs=64", "serve.engine.num_speculative_tokens=1"])
    ours = serve_config(objs)
    assert {k: v for k, v in ours.items() if k != "applications"} == \
        {k: v for k, v in ref.items() if k != "applications"}
    [mine], [theirs] = ours["applications"], ref["applications"]
    assert {k: mine[k] for k in ("name", "route_prefix", "import_path")} == \
        {k: theirs[k] for k in ("name", "route_prefix", "import_path")}
    assert ServeAppConfig.model_validate(mine["args"]) == ServeAppConfig.model_validate(theirs["args"])
