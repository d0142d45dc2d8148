"""Build gs_ray's built-in data mix: gs_ray/resources/builtin_mix.jsonl.

Run from the repository root (deterministic: the same inputs and seed give the same bytes):

    .venv/bin/python scripts/build_builtin_mix.py \
        --datasets ../shared/datasets --out gs_ray/resources/builtin_mix.jsonl

The mix has three domains of ROWS_PER_DOMAIN alpaca rows each ({instruction, input,
output, domain}): "math" from GSM8K (MIT), "code" from MBPP (CC BY 4.0), and "text",
short string-manipulation tasks with exact answers generated here. GSM8K and MBPP rows
are sampled among those short enough for max_seq_len 512. The Alpaca seed tasks
are not used: their license is non-commercial. See gs_ray/resources/ATTRIBUTION.md.
The builder is gs_ray.data.mixes.build_builtin_mix.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gs_ray.data.mixes import build_builtin_mix, jsonl_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=Path("../shared/datasets"), help="folder with gsm8k_train.jsonl and mbpp_train.jsonl")
    parser.add_argument("--out", type=Path, default=Path("gs_ray/resources/builtin_mix.jsonl"))
    args = parser.parse_args()
    rows = build_builtin_mix(args.datasets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(jsonl_text(rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
