"""Ray job entry point: the data stage: read, validate, tokenize and split.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/data.py --config gpu --run-dir s3://BUCKET/runs/NAME [section.field=value ...]

or `gs-ray submit data --address http://HEAD:8265 ...`, which does the same and follows the logs.
Stages already finished in the run dir are skipped, so a re-submitted job resumes.

Arguments are those of `gs-ray data` (see `gs-ray data --help`).
"""

import sys

from gs_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", *sys.argv[1:]]))
