"""Packaging: raymoe.platform never shadows the stdlib `platform`, the wheel carries raymoe/platform, the CLI runs."""
from __future__ import annotations

import subprocess
import sys
import zipfile

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_stdlib_platform_not_shadowed_from_repo_root():
    assert not (REPO / "platform" / "__init__.py").exists()
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.__file__); print(platform.system())"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\n")
    assert "site-packages" not in out[0] and not out[0].startswith(str(REPO)), out[0]
    assert out[1] == "Linux"


def test_raymoe_platform_importable_from_repo_root():
    code = "import raymoe.platform.model as m, raymoe.platform.config as c; print(m.from_pretrained.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "from_pretrained"


def test_wheel_contains_platform_subpackages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("raymoe-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for f in ("raymoe/__init__.py", "raymoe/cli.py", "raymoe/platform/model/decoder.py",
              "raymoe/platform/checkpoint/loader.py", "raymoe/platform/config/model_config.py"):
        assert f in names, f
    assert "raymoe/platform/__init__.py" not in names
    assert not any(n.startswith("platform/") for n in names)
    # The installed wheel imports raymoe.platform without the source tree.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import raymoe.platform.model.decoder as d; print(d.__file__)"
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path[:0] = [{str(site)!r}] + "
                          f"[p for p in {sys.path!r} if 'site-packages' in p]; {code}"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(site))


def test_cli_help_and_bad_input(tmp_path):
    exe = REPO / ".venv" / "bin" / "raymoe"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "raymoe.cli"]
    assert "tiny-checkpoint" in subprocess.run(cmd + ["--help"], capture_output=True, text=True).stdout
    bad = subprocess.run(cmd + ["tiny-checkpoint", str(tmp_path / "x"), "--experts", "6", "--n-group", "4"],
                         capture_output=True, text=True)
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0 and "divisible by n_group" in bad.stderr
    assert "Traceback" not in bad.stderr
