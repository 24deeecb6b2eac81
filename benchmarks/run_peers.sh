#!/usr/bin/env bash
# Run the peer side of the CPU decode benchmark (HF transformers and vLLM CPU) on one checkpoint.
#
#   bash benchmarks/run_peers.sh [MODEL_DIR] [OUT_DIR]
#       MODEL_DIR  default /tmp/vllm-tiny (made with `raymoe tiny-checkpoint MODEL_DIR --preset vllm --dtype float32`
#                  when missing)
#       OUT_DIR    default /tmp/raymoe-peers: prompts.json, hf.json, vllm.json (each the peer's JSON line),
#                  *.log (their stderr)
#   env: MAX_TOKENS (64), CONCURRENCY (1,8,32), REPEATS (3), N_PROMPTS (32), SEED (0), PEERS ("hf vllm"),
#        HF_ARGS / VLLM_ARGS (extra arguments, e.g. HF_ARGS="--threads 1 --eos ignore --cache static";
#        on CPUs with AMX vLLM needs VLLM_ARGS="--dtype bfloat16", and "--compilation default" is its best mode)
#
# benchmarks/cpu_decode.py is the comparison with raymoe (all engines interleaved in one run); this script runs
# the peers alone, one after another.
#
# The peers run one after another, never together: on 2 cores anything else running skews the timings.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${1:-/tmp/vllm-tiny}"
OUT="${2:-/tmp/raymoe-peers}"
MAX_TOKENS="${MAX_TOKENS:-64}"
CONCURRENCY="${CONCURRENCY:-1,8,32}"
REPEATS="${REPEATS:-3}"
N_PROMPTS="${N_PROMPTS:-32}"
SEED="${SEED:-0}"
PEERS="${PEERS:-hf vllm}"
PY="$REPO_ROOT/.venv/bin/python"
VLLM_PY="${VLLM_VENV:-$REPO_ROOT/.cache/vllm-venv}/bin/python"
mkdir -p "$OUT"

if [[ ! -f "$MODEL/config.json" ]]; then
    "$REPO_ROOT/.venv/bin/raymoe" tiny-checkpoint "$MODEL" --preset vllm --dtype float32
fi
"$PY" "$REPO_ROOT/benchmarks/peers/prompts.py" --model "$MODEL" --out "$OUT/prompts.json" --n "$N_PROMPTS" --seed "$SEED"

common=(--model "$MODEL" --prompts "$OUT/prompts.json" --max-tokens "$MAX_TOKENS" --concurrency "$CONCURRENCY"
        --repeats "$REPEATS")
for peer in $PEERS; do
    case "$peer" in
        hf)   "$PY" "$REPO_ROOT/benchmarks/peers/hf_peer.py" "${common[@]}" ${HF_ARGS:-} \
                  2>"$OUT/hf.log" | tail -n 1 >"$OUT/hf.json" ;;
        vllm) bash "$REPO_ROOT/benchmarks/setup_vllm.sh" >"$OUT/setup_vllm.log" 2>&1
              "$VLLM_PY" "$REPO_ROOT/benchmarks/peers/vllm_peer.py" "${common[@]}" ${VLLM_ARGS:-} \
                  2>"$OUT/vllm.log" | tail -n 1 >"$OUT/vllm.json" ;;
        *) echo "unknown peer $peer" >&2; exit 2 ;;
    esac
    "$PY" - "$OUT/$peer.json" <<'EOF'
import json, sys
d = json.loads(open(sys.argv[1]).read())
for r in d["results"]:
    mode = f" {r['mode']:<10}" if "mode" in r else ""
    print(f"{d['peer']:<5}{mode} c={r['concurrency']:<3} {r['tokens']:>5} tok {r['seconds']:>8.3f} s "
          f"{r['tokens_per_s']:>8.1f} tok/s  decode-only {r.get('decode_tokens_per_s')}")
EOF
done
