"""Check vLLM's greedy tokens against raymoe's reference model (exact, slow). Run with the PROJECT venv:

    .venv/bin/python benchmarks/peers/check_vllm_tokens.py --model /tmp/vllm-tiny \
        [--vllm-python .cache/vllm-venv/bin/python] [--prompts /tmp/prompts.json] [--n 4 --tokens 16]

vLLM lives in its own venv, so this script runs vllm_peer.py there as a subprocess (concurrency n, greedy,
ignore_eos, max_tokens T) and reads its "greedy_tokens"; or pass --vllm-json FILE with a saved peer result.
The reference is `raymoe.platform.model.from_pretrained(dir, dtype=float32)`, decoding greedily by re-running
the whole sequence every step (no KV cache) and taking the argmax of the last position.

For each prompt it prints match/mismatch; at the first differing step it shows both tokens, the reference's
top-2 logit margin (a tiny margin means a float near-tie, not a bug) and the reference's logit for vLLM's
token. Exit status 0 when every prompt matches, 1 otherwise. Last stdout line: a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
from prompts import load_prompts, make_prompts  # noqa: E402


def vllm_greedy(a: argparse.Namespace, prompts: list[list[int]]) -> list[list[int]]:
    if a.vllm_json:
        lines = Path(a.vllm_json).read_text().strip().splitlines()
        return json.loads(lines[-1])["greedy_tokens"][:len(prompts)]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"prompts": prompts}, f)
    cmd = [a.vllm_python, str(HERE / "vllm_peer.py"), "--model", a.model, "--prompts", f.name,
           "--max-tokens", str(a.tokens), "--concurrency", str(len(prompts)), "--no-prefill-split", *a.vllm_arg]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    Path(f.name).unlink(missing_ok=True)
    if proc.returncode != 0:
        sys.exit(f"vllm_peer.py failed with exit status {proc.returncode} (its log is above on stderr)")
    return json.loads(proc.stdout.strip().splitlines()[-1])["greedy_tokens"]


def reference_greedy(model_dir: str, prompts: list[list[int]], n_tokens: int):
    import torch
    from raymoe.platform.model import from_pretrained

    torch.manual_seed(0)
    m = from_pretrained(model_dir, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor(p, dtype=torch.long)
            toks, steps = [], []
            for _ in range(n_tokens):
                logits = m(ids[None])[0, -1].float()
                nxt = int(torch.argmax(logits))
                toks.append(nxt)
                steps.append(logits)
                ids = torch.cat([ids, torch.tensor([nxt])])
            out.append((toks, steps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="vLLM greedy tokens vs raymoe reference")
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", help="prompts.py JSON (default: generated from the model's tokenizer, seed 0)")
    ap.add_argument("--n", type=int, default=4, help="number of prompts")
    ap.add_argument("--tokens", type=int, default=16, help="generated tokens per prompt")
    ap.add_argument("--vllm-python", default=str(REPO / ".cache/vllm-venv/bin/python"))
    ap.add_argument("--vllm-json", help="use this saved vllm_peer.py output instead of running vLLM")
    ap.add_argument("--vllm-arg", action="append", default=[],
                    help="extra argument for vllm_peer.py (repeatable), e.g. --vllm-arg=--cpu-rotary-kernel")
    a = ap.parse_args()

    prompts = load_prompts(a.prompts) if a.prompts else make_prompts(a.model, n=a.n)["prompts"]
    prompts = prompts[:a.n]
    got = vllm_greedy(a, prompts)
    ref = reference_greedy(a.model, prompts, a.tokens)

    rows, all_ok = [], True
    for i, (p, g, (r, steps)) in enumerate(zip(prompts, got, ref)):
        g = g[:a.tokens]
        ok = g == r
        all_ok &= ok
        row = {"prompt": i, "prompt_len": len(p), "match": ok}
        if ok:
            print(f"prompt {i} (len {len(p)}): MATCH {r}")
        else:
            k = next((j for j, (x, y) in enumerate(zip(g, r)) if x != y), min(len(g), len(r)))
            row["first_diff_step"] = k
            msg = f"prompt {i} (len {len(p)}): MISMATCH at step {k}\n  ref  {r}\n  vllm {g}"
            if k < len(r) and k < len(g):
                lg = steps[k]
                top2 = lg.topk(2).values
                row.update(ref_token=r[k], vllm_token=g[k], ref_top2_margin=float(top2[0] - top2[1]),
                           ref_logit_gap_to_vllm_token=float(lg[r[k]] - lg[g[k]]))
                msg += (f"\n  step {k}: ref {r[k]} vs vllm {g[k]}; ref top-2 margin {row['ref_top2_margin']:.3g}, "
                        f"ref logit(ref) - logit(vllm) = {row['ref_logit_gap_to_vllm_token']:.3g}")
            print(msg)
        rows.append(row)
    print(("ALL MATCH" if all_ok else "MISMATCH") + f": {sum(r['match'] for r in rows)}/{len(rows)} prompts x "
          f"{a.tokens} tokens")
    print(json.dumps({"check": "vllm_vs_raymoe_reference", "all_match": all_ok, "tokens": a.tokens, "prompts": rows}))
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
