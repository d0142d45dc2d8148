"""Ray job entry point: Stage III: the encoder router.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/router.py --config gpu --run-dir s3://BUCKET/runs/NAME [section.field=value ...]

or `gs-ray submit router --address http://HEAD:8265 ...`, which does the same and follows the logs.
Stages already finished in the run dir are skipped, so a re-submitted job resumes.

Arguments are those of `gs-ray router` (see `gs-ray router --help`).
"""

import sys

from gs_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["router", *sys.argv[1:]]))
