"""`load_format: dummy`: an engine built from config.json alone (no safetensors in the folder), random weights of
the real shapes from the tiny checkpoints' init rule, deterministic for a seed; `auto` on that folder fails."""
from __future__ import annotations

import shutil

import pytest
import torch
from pydantic import ValidationError

from raymoe.platform.checkpoint import CheckpointError
from raymoe.platform.checkpoint.tiny import random_init
from raymoe.platform.config import EngineConfig, ModelConfig, ParallelConfig, SamplingParams
from raymoe.platform.engine import LLMEngine
from raymoe.platform.model.decoder import DeepseekV3ForCausalLM
from engine_helpers import greedy_reference, prompts

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def config_only(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint's folder with every *.safetensors file (and the index) deleted."""
    out = tmp_path_factory.mktemp("config_only") / "tiny"
    shutil.copytree(tiny_ckpt, out)
    for f in [*out.glob("*.safetensors"), *out.glob("*.safetensors.index.json")]:
        f.unlink()
    assert (out / "config.json").is_file() and not list(out.glob("*.safetensors*"))
    return out


def _engine(path, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(path), device="cpu", dtype="float32", num_blocks=64, block_size=4,
                                  enforce_eager=True, **kw))


def _greedy(eng: LLMEngine, prompt: list[int]) -> list[int]:
    return eng.generate([prompt], GREEDY)[0]["outputs"][0]["token_ids"]


def test_dummy_engine_generates_deterministically_without_safetensors(config_only):
    prompt = prompts(0, (12,))[0]
    a, b, c = (_engine(config_only, load_format="dummy", seed=s) for s in (3, 3, 4))
    try:
        got = _greedy(a, prompt)
        assert len(got) == GREEDY.max_tokens
        assert got == _greedy(b, prompt)                          # same seed: same weights, same tokens
        assert got == greedy_reference(a.model, prompt, GREEDY.max_tokens)   # a working model, not noise
        assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)  # another seed: other weights
    finally:
        for e in (a, b, c):
            e.close()


def test_dummy_weights_are_the_init_rule_in_the_real_shapes_and_dtypes(config_only):
    eng = _engine(config_only, load_format="dummy", seed=5, num_speculative_tokens=1)
    try:
        cfg = ModelConfig.from_pretrained(config_only)
        want = DeepseekV3ForCausalLM(cfg)                          # the full model (MTP too), fp32 on the CPU
        random_init(want, 5)
        got = dict(eng.model.state_dict())
        assert got.keys() == want.state_dict().keys()
        for name, t in want.state_dict().items():
            assert got[name].shape == t.shape and got[name].dtype == t.dtype, name
            assert torch.equal(got[name], t), name
        assert len(eng.model.mtp) == cfg.num_nextn_predict_layers
    finally:
        eng.close()


def test_auto_on_a_folder_without_weights_fails_clearly(config_only):
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        _engine(config_only)


def test_dummy_refuses_expert_shards(config_only):
    with pytest.raises(ValidationError, match="does not reach expert shards"):
        EngineConfig(model=str(config_only), load_format="dummy", parallel=ParallelConfig(num_shards=2))
    with pytest.raises(ValidationError):
        EngineConfig(model=str(config_only), load_format="fp8")
