"""The `gs-ray` command line.

    gs-ray run     [--config PRESET|FILE] [--run-dir DIR] [section.field=value ...]
    gs-ray data    ...   # read, validate, tokenize and split the data
    gs-ray warmup  ...   # Stage I: the warm-up LoRA (runs `data` first if it is stale)
    gs-ray cluster ...   # Stage II: gradients streamed past the clustering actor -> assignments
    gs-ray experts ...   # Stage III: K expert LoRAs, trained concurrently
    gs-ray router  ...   # Stage III: the request router (`run` stops here)
    gs-ray evaluate ...  # baselines, held-out loss and exact match per source per method, report.md
    gs-ray config  ...   # print the resolved config with every field's documentation
    gs-ray serve   [--run-dir DIR] [--config ...] [--once TEXT]   # serve a finished run over HTTP
    gs-ray submit  STAGE --address http://HEAD:8265 [--working-dir DIR] [--no-wait] ...  # as a Ray job
    gs-ray status|logs|stop JOB_ID --address http://HEAD:8265

Every stage subcommand brings its prerequisites up to date and skips what is current.
Problems the user can fix (config, data, models) print one `error:` line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

import ray
from ray import serve

from gs_ray import submit
from gs_ray.config import Config, describe, load_config, preset_names
from gs_ray.core.errors import GsRayError
from gs_ray.core.rundir import RunDir
from gs_ray.evaluation.stages import describe_stage, run_evaluation
from gs_ray.serving.app import SERVED_STAGES, finished_run_experts, load_run_config, start
from gs_ray.serving.auth import API_KEY_ENV, require_authentication
from gs_ray.serving.client import ServeRequestError, chat, describe_answer
from gs_ray.stages.pipeline import RUN_LAST_STAGE, STAGES, run_stages

EVALUATE_COMMAND = "evaluate"
EXIT_USER_ERROR = 2
SERVE_POLL_S = 1.0
"""How often `gs-ray serve` wakes while it waits for Ctrl-C."""
STAGE_HELP = {
    "data": "read, validate, tokenize and split the data",
    "warmup": "Stage I: train the warm-up LoRA",
    "cluster": "Stage II: per-sample LoRA gradients, K, and online clustering of the training split",
    "experts": "Stage III: one LoRA expert per cluster, trained in parallel",
    "router": "Stage III: the encoder router that picks one expert per request",
}
EVALUATE_HELP = ("baselines (one LoRA, embedding and random-projection clusters), held-out loss and exact match per "
                 "source for every method, diagnostics, and report/report.md with plots")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help=f"preset name ({', '.join(preset_names())}) or YAML file; default: built-in defaults",
    )
    parser.add_argument("--run-dir", default=None, help="run directory (overrides run.run_dir)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.field=value", help="config overrides, e.g. train.num_workers=2"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gs-ray", description="GradientSpace instruction tuning on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run every stage")
    _add_config_arguments(run)
    for name in (*STAGES, EVALUATE_COMMAND):
        stage = commands.add_parser(name, help=STAGE_HELP.get(name, EVALUATE_HELP))
        _add_config_arguments(stage)
        stage.add_argument("--force", action="store_true", help="rebuild this stage even if it is up to date")
    show = commands.add_parser("config", help="print the resolved config with field documentation")
    _add_config_arguments(show)
    serve = commands.add_parser(
        "serve", help="serve a finished run: OpenAI-compatible HTTP on Ray Serve",
        description="Serve the run's router and experts. Model settings come from the run's config.yaml; "
                    "the serve section from --config if given, else from the run; overrides apply to both.")
    _add_config_arguments(serve)
    serve.add_argument("--once", metavar="TEXT", default=None,
                       help="send one routed chat request, print the answer and the expert chosen, then stop")
    _add_job_commands(commands)
    return parser


SUBMITTABLE = ("run", *STAGES, EVALUATE_COMMAND, "serve")
DEFAULT_ENTRYPOINT_CPUS = 0.0
"""The job's driver reserves no CPU, so Ray runs it on the head node (a job with entrypoint resources goes to any
node that has them). The cluster configs give the head no CPUs for work and never make it a spot instance, so the
node that can be reclaimed never takes the driver, and with it the whole run, along. The driver plans stages and
trains the router; the heavy work runs in workers (tests/deploy/test_multinode.py reads where each ran)."""


def _add_job_commands(commands: argparse._SubParsersAction) -> None:
    submit = commands.add_parser(
        "submit", help="run a command (run, a stage, evaluate, serve) as a Ray job on a cluster, via the Jobs API",
        description="Checks the config here, submits `python -m gs_ray.cli STAGE ...` to the cluster, follows its "
                    "logs, and exits with the job's outcome. Run dirs on a remote cluster should be URIs "
                    "(s3://, gs://) or paths on a filesystem every node mounts.")
    stages = submit.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name in SUBMITTABLE:
        stage = stages.add_parser(name, help=f"submit `gs-ray {name}`")
        _add_config_arguments(stage)
        _add_address_argument(stage)
        stage.add_argument("--working-dir", default=None,
                           help="upload this folder with the job and run its code (default: the cluster's gs_ray)")
        stage.add_argument("--no-wait", action="store_true", help="print the job id and return; do not follow the logs")
        stage.add_argument("--entrypoint-num-cpus", type=float, default=DEFAULT_ENTRYPOINT_CPUS,
                           help="CPUs reserved for the job's driver")
        stage.add_argument("--entrypoint-num-gpus", type=float, default=0.0, help="GPUs reserved for the job's driver")
    for name, what in (("status", "a submitted job's state"), ("logs", "a submitted job's logs"),
                       ("stop", "stop a submitted job")):
        command = commands.add_parser(name, help=what)
        command.add_argument("job_id", metavar="JOB_ID")
        _add_address_argument(command)
        if name == "logs":
            command.add_argument("--follow", action="store_true", help="keep printing until the job ends")


def _add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray Jobs API address, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS)")


def submit_job(args: argparse.Namespace) -> int:
    """`gs-ray submit`: 0 when the job succeeded (or was only submitted, with --no-wait), else 1."""
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run.run_dir={args.run_dir}")
    jobs, job_id, run_dir = submit.submit(
        args.stage, args.config, overrides, address=args.address, working_dir=args.working_dir,
        entrypoint_num_cpus=args.entrypoint_num_cpus, entrypoint_num_gpus=args.entrypoint_num_gpus)
    print(f"[submit] job {job_id}: gs-ray {args.stage}; results in {run_dir}", flush=True)
    if args.no_wait:
        print(f"[submit] follow with: gs-ray logs {job_id} --follow --address {submit.job_address(args.address)}")
        return 0
    status = submit.follow(jobs, job_id)
    print(f"[submit] job {job_id} {status}; results in {run_dir}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def job_command(args: argparse.Namespace) -> int:
    """`gs-ray status|logs|stop JOB_ID`."""
    jobs = submit.client(args.address)
    if args.command == "status":
        print(submit.describe(jobs, args.job_id))
    elif args.command == "logs":
        submit.print_logs(jobs, args.job_id, args.follow)
    else:
        submit.job_info(jobs, args.job_id)
        stopped = jobs.stop_job(args.job_id)
        print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run.run_dir={args.run_dir}")
    return load_config(args.config, overrides)


def _init_ray(cfg: Config) -> bool:
    """Connect to (or start) Ray unless it already runs in this process; whether this call did it."""
    if ray.is_initialized():  # called in-process (a notebook, a job script, a test)
        return False
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, logging_level=logging.WARNING)
    return True


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _on_sigterm(handler: object) -> object:
    """Install a SIGTERM handler (main thread only: elsewhere Python cannot); return the one it replaces."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.signal(signal.SIGTERM, handler)
    return signal.SIG_DFL if previous is None else previous  # None: a handler set from C (Ray's)


ARTIFACTS = {
    "warmup": "warmup/adapter",
    "cluster": "cluster/assignments.parquet, cluster/spectrum.png, cluster/cluster_sizes.png",
    "experts": "experts/expert-<e>/adapter (PEFT), experts/experts.json",
    "router": "router/router, router/router_metrics.json",
    "evaluate": "evaluate/evaluation.json, evaluate/answers.jsonl, single_lora/adapter, baselines/<method>/",
    "report": "report/report.md (tables and PNG plots)",
}
"""What each stage wrote that users reach for, relative to the run dir."""


def print_summary(cfg: Config, manifests: dict[str, dict]) -> None:
    run = RunDir(cfg.run.run_dir)
    print("\n== gs-ray summary ==")
    for name, manifest in manifests.items():
        print(f"  {name:<8} {describe_stage(name, manifest['summary'])}  [{manifest['seconds']:.0f} s]")
    print(f"  run dir  {run.location}" + (f" (local mirror {run.root})" if run.remote else ""))
    for name in manifests:
        if name in ARTIFACTS:
            print(f"    {name:<8} {ARTIFACTS[name]}")


def serve_run(args: argparse.Namespace, run_dir: str) -> int:
    """`gs-ray serve`: deploy the run, then answer one request (--once) or wait for Ctrl-C or SIGTERM.

    SIGTERM stops it as Ctrl-C does: Serve is shut down, then the Ray this command started, every process of it
    (Ray's own C++ handler would end the driver at once and leave the raylet's agents running).
    """
    cfg = load_run_config(run_dir, args.config, list(args.overrides))
    # Clear errors before any Ray process starts: a reachable address without an API key, an unfinished run.
    require_authentication(cfg.serve.host, cfg.serve.allow_unauthenticated)
    # On object storage the run is mirrored (and checked against its manifests) before its files are looked at.
    finished_run_experts(RunDir(cfg.run.run_dir).pull_finished(SERVED_STAGES))
    started_ray = _init_ray(cfg)
    previous = _on_sigterm(_interrupt)  # after ray.init, which installs a handler of its own
    try:
        url = start(cfg, quiet=args.once is not None)
        print(f"[serve] {url} serves {cfg.run.run_dir} (POST /v1/chat/completions, /v1/completions; GET /v1/models)",
              flush=True)
        if args.once is not None:
            print(f"question: {args.once}")
            print(describe_answer(chat(url, args.once, api_key=os.environ.get(API_KEY_ENV))), flush=True)
            return 0
        print("[serve] Ctrl-C to stop", flush=True)
        while True:
            time.sleep(SERVE_POLL_S)
    except KeyboardInterrupt:
        return 0
    except ServeRequestError as exc:
        print(f"gs-ray: error: the request failed: {exc}", file=sys.stderr)
        return 1
    finally:
        _on_sigterm(signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        try:
            serve.shutdown()
            if started_ray:
                ray.shutdown()
        finally:
            if previous is not None:
                _on_sigterm(previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "submit":
            return submit_job(args)
        if args.command in ("status", "logs", "stop"):
            return job_command(args)
        cfg = resolve_config(args)
        if args.command == "config":
            print(describe(cfg), end="")
            return 0
        if args.command == "serve":
            return serve_run(args, cfg.run.run_dir)
        _init_ray(cfg)
        force = getattr(args, "force", False)
        if args.command == EVALUATE_COMMAND:
            manifests = run_evaluation(cfg, force=force)
        else:
            manifests = run_stages(cfg, RUN_LAST_STAGE if args.command == "run" else args.command, force=force)
        print_summary(cfg, manifests)
        return 0
    except GsRayError as exc:
        print(f"gs-ray: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
