"""Ray job entry point: evaluation: one-LoRA baseline vs routed experts, held-out loss per source.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/evaluate.py --config gpu --run-dir s3://BUCKET/runs/NAME [section.field=value ...]

or `gs-ray submit evaluate --address http://HEAD:8265 ...`, which does the same and follows the logs.
Stages already finished in the run dir are skipped, so a re-submitted job resumes.

Arguments are those of `gs-ray evaluate` (see `gs-ray evaluate --help`).
"""

import sys

from gs_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
