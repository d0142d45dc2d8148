"""Ray job entry point: serving: router + experts of a finished run behind an OpenAI-compatible endpoint.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/serve.py --run-dir s3://BUCKET/runs/demo

The job deploys the Serve application and keeps running (stop it with `ray job stop`);
the endpoint is on the cluster's Serve proxies, port 8000. For a long-lived endpoint,
prefer `serve deploy cluster_configs/serve.yaml` or the KubeRay RayService.

Arguments are those of `gs-ray serve` (see `gs-ray serve --help`).
"""

import sys

from gs_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
