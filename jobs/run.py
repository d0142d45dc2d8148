"""Ray job entry point: any `gs-ray` command (the whole pipeline, one stage, evaluate, serve) as a Ray job.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/run.py STAGE --config gpu --run-dir s3://BUCKET/runs/NAME [section.field=value ...]

STAGE is `run` (every stage up to the router), one of `data warmup cluster experts router`,
`evaluate` or `serve`; the arguments after it are that `gs-ray` command's. Without a STAGE
it runs `run`. `gs-ray submit STAGE --address http://HEAD:8265 ...` does the same and follows
the logs. Stages already finished in the run dir are skipped, so a re-submitted job resumes.
"""

import sys

from gs_ray.cli import SUBMITTABLE, main

if __name__ == "__main__":
    arguments = sys.argv[1:]
    if not arguments or arguments[0] not in SUBMITTABLE:
        arguments = ["run", *arguments]
    sys.exit(main(arguments))
