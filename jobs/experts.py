"""Ray job entry point: Stage III: one LoRA expert per cluster, K Ray Train jobs at once.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/experts.py --config gpu --run-dir s3://BUCKET/runs/NAME [section.field=value ...]

or `gs-ray submit experts --address http://HEAD:8265 ...`, which does the same and follows the logs.
Stages already finished in the run dir are skipped, so a re-submitted job resumes.

Arguments are those of `gs-ray experts` (see `gs-ray experts --help`).
"""

import sys

from gs_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["experts", *sys.argv[1:]]))
