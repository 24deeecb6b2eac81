"""LoRA adapters over HTTP on the session's Serve app (adapters from its lora_root, one preloaded from lora_modules):
the models list, answers equal to the merged model's, streaming, vLLM's load/unload API, and every refusal (unknown
404, broken 400, traversal 400, no key 401) in OpenAI's format with the server still serving."""
from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import openai
import pytest
import torch

from serve_helpers import LORA_MAX_LORAS, LORA_MAX_RANK, TIGHT_KEY, assert_openai_error, make_adapter

PROMPT = [5, 17, 123, 444, 9, 31, 600, 2]
QUESTION = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def adapters(served, lora_root, tiny_ckpt_fp32, write_ckpt, tmp_path_factory) -> dict[str, Path]:
    """Good and broken adapters under the app's lora_root, by folder name."""
    out = {
        "alpha": make_adapter(tiny_ckpt_fp32, lora_root / "alpha", ["all"], seed=1),
        "beta": make_adapter(tiny_ckpt_fp32, lora_root / "beta", ["attention"], seed=2),
        "rank16": make_adapter(tiny_ckpt_fp32, lora_root / "rank16", ["attention"], rank=2 * LORA_MAX_RANK, seed=3),
    }
    missing = lora_root / "no-weights"
    shutil.copytree(out["alpha"], missing)
    (missing / "adapter_model.safetensors").unlink()
    out["no-weights"] = missing
    other = write_ckpt("lora_other_base", seed=4, dtype="float32",
                       overrides={"q_lora_rank": 48, "intermediate_size": 96})
    out["other-base"] = make_adapter(other, lora_root / "other-base", ["attention", "dense_mlp"], seed=5)
    return out


def _merged_greedy(base: Path, adapter: Path | None, prompt: list[int], n: int) -> list[int]:
    """The reference: the fp32 model with only this adapter merged, greedy, full recompute per token."""
    from raymoe.platform.checkpoint.adapter import apply_adapter
    from raymoe.platform.model import from_pretrained
    model = from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        apply_adapter(model, adapter)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def _greedy_tokens(served, model: str, n: int = 8) -> list[str]:
    """The greedy completion of PROMPT as its tokens' texts (logprobs.tokens)."""
    r = httpx.post(f"{served.url}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": n,
                                                         "temperature": 0, "ignore_eos": True, "logprobs": 0},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def _load(served, **body) -> httpx.Response:
    return httpx.post(f"{served.url}/v1/load_lora_adapter", json=body, timeout=120)


def _unload(served, **body) -> httpx.Response:
    return httpx.post(f"{served.url}/v1/unload_lora_adapter", json=body, timeout=120)


def _still_serving(served) -> None:
    assert httpx.get(f"{served.url}/health", timeout=30).status_code == 200
    c = served.client(timeout=120)
    out = c.chat.completions.create(model="alpha", messages=QUESTION, max_tokens=4, temperature=0)
    assert out.choices[0].message.content is not None and out.usage.completion_tokens >= 1


def test_models_lists_the_base_and_every_adapter(served, adapters, preloaded_adapter):
    cards = {m.id: m for m in served.client().models.list().data}
    assert {served.name, "preloaded", *adapters} <= set(cards), sorted(cards)
    assert getattr(cards[served.name], "parent", None) is None
    for name in ["preloaded", *adapters]:
        assert cards[name].parent == served.name, cards[name]
    assert cards["preloaded"].root == str(preloaded_adapter)
    assert Path(cards["alpha"].root).resolve() == adapters["alpha"].resolve()


def test_adapter_answers_as_the_merged_model(served, adapters, tiny_ckpt_fp32, preloaded_adapter):
    """Token by token what the fp32 model with only that adapter merged answers, greedy; the base differs; the
    `<base>:<adapter>` form is the same adapter."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_ckpt_fp32)
    got = {m: _greedy_tokens(served, m) for m in ("alpha", f"{served.name}:alpha", "beta", "preloaded",
                                                    served.name)}
    for name, path in (("alpha", adapters["alpha"]), ("beta", adapters["beta"]), ("preloaded", preloaded_adapter),
                       (served.name, None)):
        want = [tok.decode([t]) for t in _merged_greedy(tiny_ckpt_fp32, path, PROMPT, 8)]
        assert got[name] == want, name
    assert got[f"{served.name}:alpha"] == got["alpha"]
    assert got["alpha"] != got[served.name] and got["beta"] != got[served.name]


def test_streamed_adapter_answer_equals_the_non_streamed_one(served, adapters):
    c = served.client(timeout=120)
    full = c.chat.completions.create(model="beta", messages=QUESTION, max_tokens=12, temperature=0)
    assert full.model == "beta"
    chunks = list(c.chat.completions.create(model="beta", messages=QUESTION, max_tokens=12, temperature=0,
                                            stream=True))
    assert {ch.model for ch in chunks} == {"beta"}
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == full.choices[0].message.content and streamed
    base = c.chat.completions.create(model=served.name, messages=QUESTION, max_tokens=12, temperature=0)
    assert base.choices[0].message.content != streamed


def test_unknown_adapter_is_404(served, adapters):
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="nope", messages=QUESTION, max_tokens=2)
    for model in ("nope", f"{served.name}:nope", "../alpha", f"{served.name}:../alpha", "alpha/..", "x:alpha"):
        r = httpx.post(f"{served.url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2},
                       timeout=60)
        err = assert_openai_error(r, 404)
        assert err["param"] == "model" and err["code"] == "model_not_found", err
    assert_openai_error(_unload(served, lora_name="nope"), 404)
    _still_serving(served)


@pytest.mark.parametrize("case", ["no-weights", "rank16", "other-base", "absent"])
def test_broken_adapter_is_400_and_the_server_keeps_serving(served, adapters, case):
    r = _load(served, lora_name=f"load-{case}", lora_path=case)
    err = assert_openai_error(r, 400)
    assert err["param"] == "lora_path", err
    if case == "rank16":
        assert "rank" in err["message"], err
    _still_serving(served)
    if case != "absent":                        # found under lora_root on first use: refused then, the same way
        r = httpx.post(f"{served.url}/v1/completions", json={"model": case, "prompt": "hi", "max_tokens": 2},
                       timeout=120)
        assert_openai_error(r, 400)
        _still_serving(served)
    names = {m.id for m in served.client().models.list().data}
    assert f"load-{case}" not in names          # a refused load registers nothing


@pytest.mark.parametrize("body", [
    {"lora_name": "../evil", "lora_path": "alpha"},
    {"lora_name": "a/b", "lora_path": "alpha"},
    {"lora_name": "/etc", "lora_path": "alpha"},
    {"lora_name": "ok", "lora_path": "../../../../etc"},
    {"lora_name": "ok", "lora_path": "/etc"},
    {"lora_name": "ok", "lora_path": "alpha/../../x"},
    {"lora_name": "ok", "lora_path": "file:///etc"},
    {"lora_name": "", "lora_path": "alpha"},
    {"lora_name": 3, "lora_path": "alpha"},
    {"lora_path": "alpha"},
])
def test_traversal_and_bad_names_are_refused(served, adapters, body):
    err = assert_openai_error(_load(served, **body), 400)
    assert err["param"] in ("lora_name", "lora_path"), err
    _still_serving(served)


def test_load_unload_cycle(served, adapters):
    assert _load(served, lora_name="gamma", lora_path="alpha").text == \
        "Success: LoRA adapter 'gamma' added successfully."
    assert _greedy_tokens(served, "gamma") == _greedy_tokens(served, "alpha")
    err = assert_openai_error(_load(served, lora_name="gamma", lora_path="beta"), 400)
    assert "already been loaded" in err["message"]
    r = _load(served, lora_name="gamma", lora_path=str(adapters["beta"]), load_inplace=True)   # absolute, inside
    assert r.status_code == 200, r.text
    assert _greedy_tokens(served, "gamma") == _greedy_tokens(served, "beta")     # replicas reload the new one
    assert "gamma" in {m.id for m in served.client().models.list().data}
    r = _unload(served, lora_name="gamma")
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'gamma' removed successfully."
    assert_openai_error(httpx.post(f"{served.url}/v1/completions", json={"model": "gamma", "prompt": "hi",
                                                                         "max_tokens": 2}, timeout=60), 404)
    assert "gamma" not in {m.id for m in served.client().models.list().data}
    assert_openai_error(_unload(served, lora_name="gamma"), 404)
    # a folder under lora_root, once unloaded, stays unknown until loaded again
    assert _unload(served, lora_name="beta").status_code == 200
    assert_openai_error(httpx.post(f"{served.url}/v1/completions", json={"model": "beta", "prompt": "hi",
                                                                         "max_tokens": 2}, timeout=60), 404)
    assert _load(served, lora_name="beta").status_code == 200                      # lora_path: <root>/beta
    assert _greedy_tokens(served, "beta")
    _still_serving(served)


def test_lora_metrics(served, adapters):
    _greedy_tokens(served, "alpha")
    text = httpx.get(f"{served.url}/metrics", timeout=60).text
    lines = [ln for ln in text.splitlines() if ln.startswith("vllm:lora_requests_info{")]
    assert lines and all(f'max_lora="{LORA_MAX_LORAS}"' in ln and "running_lora_adapters=" in ln and "waiting_lora_adapters=" in ln
                         for ln in lines), lines


def test_adapter_api_needs_the_key(tight, adapters):
    r = httpx.post(f"{tight.url}/v1/load_lora_adapter", json={"lora_name": "alpha", "lora_path": "alpha"},
                   timeout=60)
    assert_openai_error(r, 401)
    r = httpx.post(f"{tight.url}/v1/unload_lora_adapter", json={"lora_name": "alpha"}, timeout=60)
    assert_openai_error(r, 401)
    r = httpx.post(f"{tight.url}/v1/load_lora_adapter", json={"lora_name": "alpha", "lora_path": "alpha"},
                   headers={"Authorization": f"Bearer {TIGHT_KEY}"}, timeout=60)
    err = assert_openai_error(r, 400)                       # this app has no lora_root
    assert "lora_root" in err["message"]
