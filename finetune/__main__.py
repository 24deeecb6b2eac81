"""`python -m raymoe.finetune --config job.yaml [--set key=value ...]`: run a finetuning job on Ray.

Works as a `ray job submit ... -- python -m raymoe.finetune --config job.yaml` entrypoint (it connects to the
cluster through RAY_ADDRESS) and as `raymoe finetune`. Bad input ends with one `error: ...` line and exit code 2;
relative paths in the job are taken against the current directory (the job's working dir under `ray job submit`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def run_cli(config: str | Path, overrides: list[str]) -> int:
    from raymoe.finetune.config import load_job
    from raymoe.finetune.launcher import USER_ERRORS, run

    try:
        job = load_job(config, overrides).resolve_paths(Path.cwd())
        summary = run(job)
    except USER_ERRORS as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raymoe.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="job YAML file (see finetune/configs/tiny-lora.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job key, e.g. --set lora.rank=16 --set scaling.num_workers=2 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_cli(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
