"""The serving side of LoRA adapters without a server: the name rule, lora_path resolution inside lora_root (a local
folder, and a file:// URL through fsspec), listing, fetching a remote adapter, the registry, and the config/CLI
checks that fail before anything starts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raymoe.deployments.adapters import AdapterRef, AdapterRegistry, AdapterRoot, check_name, fetch, valid_name
from raymoe.deployments.config import ServeAppConfig
from raymoe.deployments.errors import APIError
from raymoe.deployments.local import parse_lora_modules

BAD_NAMES = ["", "..", "../etc", "a/b", "/etc/passwd", "a\\b", "x..y", ".hidden", "-x", "a b", "a:b", "é", "a\x00",
             "x" * 129, "%2e%2e"]


def _adapter(path: Path, safetensors: bool = True) -> Path:
    """A folder shaped like a PEFT adapter (contents are the engine's to check)."""
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    if safetensors:
        (path / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    return path


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(name):
    assert not valid_name(name)
    with pytest.raises(APIError) as e:
        check_name(name)
    assert e.value.status == 400 and e.value.param == "lora_name" and "adapter name" in e.value.message


@pytest.mark.parametrize("name", ["qa", "QA-v2", "my_adapter.1", "0", "a" * 128])
def test_good_names(name):
    assert valid_name(name) and check_name(name) == name


def test_local_root_resolves_inside_only(tmp_path):
    root = tmp_path / "adapters"
    _adapter(root / "qa")
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", root / "link")
    r = AdapterRoot(str(root))
    real = os.path.realpath(root)
    assert r.resolve(None, "qa") == os.path.join(real, "qa")
    assert r.resolve("qa", "other") == os.path.join(real, "qa")
    assert r.resolve(str(root / "qa"), "x") == os.path.join(real, "qa")          # absolute, inside: fine
    assert r.resolve("sub/dir", "x") == os.path.join(real, "sub", "dir")
    for bad in ["../secret", "qa/../../secret", str(tmp_path / "secret"), "/etc", "link", ".", "",
                "file:///etc", "s3://bucket/x", "qa\x00"]:
        if bad == "":
            assert r.resolve(bad, "qa") == os.path.join(real, "qa")           # empty: <root>/<name>
            continue
        with pytest.raises(APIError) as e:
            r.resolve(bad, "qa")
        assert e.value.status == 400 and e.value.param == "lora_path", bad
    with pytest.raises(APIError) as e:
        AdapterRoot(None).resolve("qa", "qa")
    assert e.value.status == 400 and "lora_root" in e.value.message


def test_url_root_through_fsspec(tmp_path):
    """A URL root goes through fsspec (file:// here: the same code path as s3:// or gs://)."""
    pytest.importorskip("fsspec")
    _adapter(tmp_path / "store" / "qa")
    _adapter(tmp_path / "store" / "half", safetensors=False)
    (tmp_path / "store" / "not-an-adapter").mkdir()
    (tmp_path / "store" / "bad..name").mkdir()
    root = f"file://{tmp_path}/store"
    r = AdapterRoot(root + "/")
    assert r.names() == ["half", "qa"]
    assert r.find("qa") == f"{root}/qa" and r.find("nope") is None
    assert r.resolve("qa", "x") == f"{root}/qa" and r.resolve(f"{root}/qa", "x") == f"{root}/qa"
    for bad in ["../x", "qa/../../x", f"file://{tmp_path}/elsewhere", f"{root}x/qa", f"{root}/../x", "/abs",
                "s3://other/qa"]:
        with pytest.raises(APIError):
            r.resolve(bad, "qa")

    local = fetch(AdapterRef(name="qa", path=f"{root}/qa", generation=3), tmp_path / "cache")
    assert Path(local).parent == tmp_path / "cache"
    assert sorted(os.listdir(local)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert fetch(AdapterRef(name="qa", path=f"{root}/qa", generation=3), tmp_path / "cache") == local   # cached
    again = fetch(AdapterRef(name="qa", path=f"{root}/qa", generation=4), tmp_path / "cache")
    assert again != local                                     # loaded again: a fresh copy
    assert fetch(AdapterRef(name="x", path=str(tmp_path)), tmp_path / "cache") == str(tmp_path)   # local: as is


def test_registry(tmp_path):
    root = tmp_path / "adapters"
    _adapter(root / "found")
    _adapter(root / "other")
    mod = _adapter(tmp_path / "elsewhere" / "m")
    reg = AdapterRegistry(AdapterRoot(str(root)), {"mod": str(mod)})
    assert [r.name for r in reg.listing()] == ["found", "mod", "other"]
    assert reg.get("found").path == os.path.join(os.path.realpath(root), "found")
    assert reg.get("missing") is None and reg.get("../adapters/found") is None
    assert reg.loaded == {"mod"}                              # found under the root: available, not "loaded"
    ref = reg.next_ref("qa", str(root / "found"))
    assert reg.get("qa") is None                              # not registered until it loaded
    reg.put(ref)
    assert reg.get("qa") == ref and "qa" in reg.loaded and reg.next_ref("qa", "p").generation > ref.generation
    assert reg.remove("found") is not None and reg.get("found") is None     # unloaded: not found again
    assert "found" not in [r.name for r in reg.listing()]
    assert reg.remove("found") is None
    reg.put(reg.next_ref("found", str(root / "found")))       # loaded again: back
    assert reg.get("found") is not None


def test_config_checks(tmp_path, tiny_ckpt_fp32):
    from raymoe.deployments.app import app_config
    cfg = ServeAppConfig(model=str(tiny_ckpt_fp32), max_loras=2, max_cpu_loras=3, max_lora_rank=8)
    e = cfg.engine_config()
    assert (e.max_loras, e.max_cpu_loras, e.max_lora_rank) == (2, 3, 8)
    with pytest.raises(ValueError, match="lora_modules: invalid adapter name '../x'"):
        ServeAppConfig(model=str(tiny_ckpt_fp32), lora_modules={"../x": "/tmp"})
    with pytest.raises(ValueError, match="engine.max_loras: set it with the top-level `max_loras` key"):
        ServeAppConfig(model=str(tiny_ckpt_fp32), engine={"max_loras": 2})
    with pytest.raises(ValueError, match="is the served model's own name"):
        ServeAppConfig(model=str(tiny_ckpt_fp32), served_model_name="tiny", lora_modules={"tiny": "/tmp"})
    with pytest.raises(ValueError, match=r"lora_modules.qa: .* is not a PEFT adapter directory"):
        app_config({"model": str(tiny_ckpt_fp32), "lora_modules": {"qa": str(tmp_path)}})
    with pytest.raises(ValueError, match="max_loras"):
        app_config({"model": str(tiny_ckpt_fp32), "max_loras": 0})


def test_lora_modules_option():
    assert parse_lora_modules(["a=/p/a b=s3://x/b", "c=/p/c"]) == {"a": "/p/a", "b": "s3://x/b", "c": "/p/c"}
    with pytest.raises(ValueError, match="expected NAME=PATH"):
        parse_lora_modules(["nopath"])


def test_cli_refuses_bad_lora_options_in_one_line(tiny_ckpt_fp32, tmp_path):
    raymoe = Path(sys.executable).with_name("raymoe")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    for extra, expected in [(["--lora-modules", "qa"], "error: --lora-modules 'qa': expected NAME=PATH"),
                            (["--lora-modules", f"../x={tmp_path}"], "error: invalid serve app args: "
                             "lora_modules: invalid adapter name '../x'")]:
        p = subprocess.run([str(raymoe), "serve", "--model", str(tiny_ckpt_fp32), *extra], capture_output=True,
                           text=True, env=env, timeout=120)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith(expected), p.stderr
