"""raymoe: serve and LoRA-finetune DeepSeek-V3-class MoE models on Ray and Kubernetes.

The distribution maps three source folders into this package (pyproject.toml: platform/ -> raymoe.platform,
deployments/ -> raymoe.deployments, finetune/ -> raymoe.finetune). `platform/` has no __init__.py (it would shadow
the stdlib module `platform`), so raymoe.platform is a namespace package. setuptools' editable finder cannot
resolve a namespace package nested in a regular one, so in a source checkout the repository root joins this
package's search path; an installed wheel has raymoe/platform/ beside this file and needs nothing.
"""
from pathlib import Path as _Path

__version__ = "0.1.0"

_root = _Path(__file__).resolve().parents[2]
if (_root / "pyproject.toml").is_file() and (_root / "platform" / "model" / "decoder.py").is_file():
    __path__.append(str(_root))  # noqa: F821 (package __path__)
