"""GPU kernels (Triton) behind the model's PyTorch paths: paged MLA decode attention and FP8 weight-only GEMMs.

The PyTorch paths stay the reference and the CPU path; a kernel serves a call only where `enabled(x)` says so: a
CUDA tensor, Triton importable, and kernels not switched off. `set_enabled(False)` switches them off within a block
(tests, before/after benchmarks); RAYMOE_KERNELS=off switches them off for a whole process.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

_on: bool = os.environ.get("RAYMOE_KERNELS", "on") != "off"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:                                   # noqa: BLE001 - any import failure: no kernels
        return False
    return True


def enabled(x: torch.Tensor) -> bool:
    """Whether a kernel may serve a call on tensor `x`."""
    return _on and x.is_cuda and triton_available()


@contextlib.contextmanager
def set_enabled(on: bool) -> Iterator[None]:
    """Within the block, kernels serve calls (True, where available) or never (False)."""
    global _on
    old, _on = _on, on
    try:
        yield
    finally:
        _on = old
