"""The fused (Inductor-compiled) forms of the training step's memory-bound pieces equal their eager forms.

On a GPU under autograd the model takes platform.model.fused's compiled functions; here `set_mode("force")` takes
them on the CPU (Inductor's C++ backend: same graphs, same fused forward and backward) and compares values and
gradients with the eager forms, one function at a time and through a whole bf16 model's forward and backward.
"""
from __future__ import annotations

import pytest
import torch

from raymoe.platform.model import fused, from_pretrained

G = torch.Generator().manual_seed(0)


def _rand(*shape: int, dtype=torch.float32, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, generator=G).to(dtype).requires_grad_(grad)


def _values_and_grads(fn, args: list, mode: str) -> list[torch.Tensor]:
    leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    with fused.set_mode(mode):
        out = fn(*leaves)
    outs = list(out) if isinstance(out, tuple) else [out]
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    torch.autograd.backward([o for o in outs], grads)
    return [o.detach() for o in outs] + [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]


def _case(name: str, dtype: torch.dtype):
    N, H, k = 37, 48, 4
    cos, sin = _rand(N, 8, grad=False), _rand(N, 8, grad=False)
    inv = torch.randperm(N * k, generator=G)
    return {
        "silu_mul": (fused.silu_mul, [_rand(N, H, dtype=dtype), _rand(N, H, dtype=dtype)]),
        "swiglu": (fused.swiglu, [_rand(N, 2 * H, dtype=dtype)]),
        "rms_norm": (lambda x, w: fused.rms_norm(x, w, 1e-6), [_rand(N, H, dtype=dtype), _rand(H, dtype=dtype)]),
        "rope_query": (lambda q, c, s: fused.rope_query(q, c, s, 24, True),
                       [_rand(N, 3, 40, dtype=dtype), cos, sin]),
        "expand_kv": (lambda kv, pe: fused.expand_kv(kv, pe, 24), [_rand(N, 3, 56, dtype=dtype),
                                                                   _rand(N, 16, dtype=dtype)]),
        "combine": (fused.combine, [_rand(N * k, H, dtype=dtype), _rand(N, k), inv]),
    }[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["silu_mul", "swiglu", "rms_norm", "rope_query", "expand_kv", "combine"])
def test_fused_equals_eager(name, dtype):
    fn, args = _case(name, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(_values_and_grads(fn, args, "off"), _values_and_grads(fn, args, "force"), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        err = ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()
        assert err < tol, f"{name}: relative error {err:.2e}"


def test_fused_backward_pieces_equal_eager():
    """The two pieces the experts' combine and row sort call from their own backward (no autograd there)."""
    N, H, k = 29, 40, 4
    g, y = _rand(N, H, grad=False), _rand(N * k, H, grad=False)
    w_sorted, token, inv = torch.rand(N * k, generator=G), torch.randint(0, N, (N * k,), generator=G), \
        torch.randperm(N * k, generator=G)
    for fn, args in ((fused.combine_backward, (g, y, w_sorted, token)), (fused.sum_rows_backward, (y, inv, k))):
        eager = fn(*args, training=True)
        with fused.set_mode("force"):
            comp = fn(*args, training=True)
        for a, b in zip(eager if isinstance(eager, tuple) else [eager], comp if isinstance(comp, tuple) else [comp]):
            assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_model_forward_backward_fused_equals_eager(tiny_ckpt_fp32, device):
    """A model (naive MLA, dense MLP, grouped experts with the fused combine and row sort) trains the same with the
    fused pieces: logits and every parameter's gradient. fp32, since in bf16 a rounding difference flips near-tied
    choices among the random gate's experts and the comparison says nothing (each piece is compared in bf16 above).
    On the CPU the fused forms are forced; on a GPU they are what training takes by itself ("auto")."""
    model = from_pretrained(tiny_ckpt_fp32, dtype=torch.float32, device=device)
    ids = torch.randint(5, 700, (2, 11), generator=torch.Generator().manual_seed(3)).to(device)
    runs = []
    for mode in ("off", "force" if device == "cpu" else "auto"):
        model.zero_grad(set_to_none=True)
        with fused.set_mode(mode):
            logits = model(ids)
            logits.float().pow(2).mean().backward()
        grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((logits.detach().float().cpu(), grads))
    (l0, g0), (l1, g1) = runs
    assert ((l0 - l1).abs().max() / l0.abs().max()).item() < 1e-5
    assert g0.keys() == g1.keys() and any("experts.gate_up_proj" in n for n in g0)
    for n in g0:
        err = ((g0[n] - g1[n]).norm() / g0[n].norm().clamp_min(1e-12)).item()
        assert err < 1e-4, f"{n}: relative error {err:.2e}"
