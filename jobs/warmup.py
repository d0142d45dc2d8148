"""Ray job entry point: Stage I: the warm-up LoRA (and the data stage if it is stale).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/warmup.py --config gpu --run-dir s3://BUCKET/runs/NAME [section.field=value ...]

or `gs-ray submit warmup --address http://HEAD:8265 ...`, which does the same and follows the logs.
Stages already finished in the run dir are skipped, so a re-submitted job resumes.

Arguments are those of `gs-ray warmup` (see `gs-ray warmup --help`).
"""

import sys

from gs_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["warmup", *sys.argv[1:]]))
