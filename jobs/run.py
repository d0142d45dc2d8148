"""Ray job entry point: the whole pipeline (data, warm-up, clustering, experts, router).

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/run.py --config gpu --run-dir s3://BUCKET/runs/NAME [section.field=value ...]

or `gs-ray submit run --address http://HEAD:8265 ...`, which does the same and follows the logs.
Stages already finished in the run dir are skipped, so a re-submitted job resumes.

Arguments are those of `gs-ray run` (see `gs-ray run --help`).
"""

import sys

from gs_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
