"""Ray job entry point: Stage II: per-sample LoRA gradients and online clustering.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/cluster.py --config gpu --run-dir s3://BUCKET/runs/NAME [section.field=value ...]

or `gs-ray submit cluster --address http://HEAD:8265 ...`, which does the same and follows the logs.
Stages already finished in the run dir are skipped, so a re-submitted job resumes.

Arguments are those of `gs-ray cluster` (see `gs-ray cluster --help`).
"""

import sys

from gs_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["cluster", *sys.argv[1:]]))
