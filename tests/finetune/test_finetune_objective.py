"""The objective (masked next-token and MTP cross-entropy), the LR schedule, expert-load balancing by bias."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raymoe.finetune.balance import ExpertLoad
from raymoe.finetune.objective import CausalLMObjective, target_counts
from raymoe.finetune.train_loop import lr_factor
from raymoe.platform.model import from_pretrained


@pytest.fixture(scope="module")
def model(tiny32):
    return from_pretrained(tiny32, dtype=torch.float32)


def test_losses_are_sums_over_target_tokens(model):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 700, (3, 12), generator=g)
    mask = (torch.rand(3, 12, generator=g) > 0.4).float()
    main, mtp = CausalLMObjective(model, mtp_weight=0.5)(ids, mask)
    with torch.no_grad():
        logits = model(ids)
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        expected_main = (ce * mask[:, 1:].flatten()).sum()
        mtp_logits = model.mtp_logits(model.hidden_states(ids)[:, :-2], ids[:, 1:-1])
        ce2 = F.cross_entropy(mtp_logits.flatten(0, 1), ids[:, 2:].flatten(), reduction="none")
        expected_mtp = (ce2 * mask[:, 2:].flatten()).sum()
    assert torch.allclose(main, expected_main, rtol=1e-5) and torch.allclose(mtp, expected_mtp, rtol=1e-5)
    assert target_counts(mask) == (int(mask[:, 1:].sum()), int(mask[:, 2:].sum()))
    assert CausalLMObjective(model)(ids, mask)[1].item() == 0.0          # MTP off: no MTP forward


def test_warmup_then_cosine():
    f = [lr_factor(s, total=110, warmup=10, min_ratio=0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[110] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[10:], f[11:]))


def test_loss_free_balancing_evens_out_expert_load(tiny32):
    """b_i += rate * sign(mean - load_i) after each step: routing of the same tokens becomes more even."""
    model = from_pretrained(tiny32, dtype=torch.float32)
    layers = model.moe_layers()[:3]
    load = ExpertLoad(layers)
    ids = torch.randint(5, 700, (4, 64), generator=torch.Generator().manual_seed(1))
    history = []
    with torch.no_grad():
        for _ in range(40):
            model(ids)
            load.collect()
            history.append(load.finish_step(load.counts.clone(), update_bias=True, rate=0.02))
    assert history[0] > 1.5                         # a random gate routes unevenly
    assert history[-1] < 0.8 * history[0]
    assert all(float(m.gate.e_score_correction_bias.abs().max()) > 0.05 for m in layers)


def test_bf16_training_autocasts_lora_but_keeps_routing_fp32(tiny32):
    """A bf16 model trains under autocast: the LoRA branches (fp32 factors) run their matmuls in bf16 and get fp32
    gradients, while the gates still score in fp32 (the same experts as without autocast)."""
    from raymoe.finetune.config import LoraConfigSpec
    from raymoe.finetune.lora import apply_lora, plan_lora
    from raymoe.finetune.objective import mixed_precision
    m = from_pretrained(tiny32, dtype=torch.bfloat16)
    spec = LoraConfigSpec(rank=4, alpha=8, targets=["all"])
    pm = apply_lora(m, spec, plan_lora(m, spec), seed=0)
    gate = m.model.layers[1].mlp.gate
    x = torch.randn(64, m.config.hidden_size, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        plain = gate(x)
        with mixed_precision(m):
            cast = gate(x)
    assert torch.equal(plain[0], cast[0]) and cast[2].dtype == torch.float32 and torch.equal(plain[2], cast[2])
    ids = torch.randint(5, 700, (2, 16), generator=torch.Generator().manual_seed(2))
    main, _ = CausalLMObjective(pm)(ids, torch.ones(2, 16))
    main.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if "lora_" in n}
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()
                         for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)   # B starts at 0: A's grads are 0
