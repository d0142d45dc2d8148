"""Submit gs-ray stages to a remote Ray cluster through the Ray Jobs API, and follow them.

`gs-ray submit` checks the config on the submitting machine (a typo fails here, not after
the job has queued), then submits `python -m gs_ray.cli <stage> ...` with a runtime_env.
With --working-dir, that folder is uploaded and put first on the job's PYTHONPATH, so the
cluster runs the submitted code; without it, the gs_ray installed in the cluster's image.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from gs_ray.config import Config, load_config, preset_names
from gs_ray.core import storage
from gs_ray.core.errors import ConfigError, JobError

ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
"""Where the Jobs API address is read from when --address is not given (as `ray job` does)."""
WORKING_DIR_EXCLUDES = [".venv", ".git", ".cache", "runs", "**/__pycache__", "*.egg-info"]
"""Never uploaded with --working-dir: environments, caches and local run outputs."""
JOB_ENV_VARS = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
"""A job never downloads models at run time; tokenizers' own threads fight Ray's workers for cores."""
DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
"""Where Ray keeps the token of clusters it started (token auth is on by default for new clusters)."""
UNKNOWN_JOB_STATUS = "status code 404"
"""How the Jobs client words the answer to a job id the cluster does not know."""


def job_address(address: str | None) -> str:
    """The Jobs API (dashboard) address: --address, else $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS."""
    found = address or next((os.environ[name] for name in ADDRESS_ENV if os.environ.get(name)), "")
    if not found:
        raise ConfigError("no Ray cluster to submit to: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    return found


def auth_headers() -> dict[str, str]:
    """A bearer token for clusters with token auth, found where Ray's own tools look for it; none if there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "")
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN_FILE).expanduser()
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None) -> Any:
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = job_address(address)
    try:
        return JobSubmissionClient(url, headers=auth_headers())
    except ConnectionError as exc:
        raise ConfigError(f"cannot reach the Ray Jobs API at {url}: {exc}") from exc
    except AuthenticationError as exc:
        raise ConfigError(f"the Ray cluster at {url} refused the token: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) "
                          f"to the cluster's token") from exc


def _config_argument(config: str | None, working_dir: Path | None) -> list[str]:
    """--config as the job will see it: a preset name, or a file inside the uploaded working dir."""
    if config is None or config in preset_names():
        return [] if config is None else ["--config", config]
    path = Path(config).absolute()
    if working_dir is None or not path.is_relative_to(working_dir):
        raise ConfigError(f"--config {config}: a config file reaches the cluster only inside --working-dir "
                          f"(got {'no --working-dir' if working_dir is None else working_dir})")
    return ["--config", path.relative_to(working_dir).as_posix()]


def _run_dir(cfg: Config) -> str:
    """The run dir as the job will see it: a URI as given, a local path made absolute (it must be shared)."""
    if storage.is_uri(cfg.run.run_dir):
        return cfg.run.run_dir
    return str(Path(cfg.run.run_dir).absolute())


def entrypoint(stage: str, config: str | None, run_dir: str, overrides: list[str], working_dir: Path | None) -> str:
    args = [stage, *_config_argument(config, working_dir), "--run-dir", run_dir, *overrides]
    return shlex.join(["python", "-m", "gs_ray.cli", *args])


def submit(stage: str, config: str | None, overrides: list[str], *, address: str | None, working_dir: str | None,
           entrypoint_num_cpus: float, entrypoint_num_gpus: float) -> tuple[Any, str, str]:
    """Validate locally, submit; return (client, job id, run dir)."""
    cfg = load_config(config, overrides)  # a bad config fails here, before anything is queued
    folder = Path(working_dir).absolute() if working_dir else None
    if folder is not None and not folder.is_dir():
        raise ConfigError(f"--working-dir {working_dir}: not a folder")
    run_dir = _run_dir(cfg)
    runtime_env: dict[str, Any] = {"env_vars": dict(JOB_ENV_VARS)}
    if folder is not None:
        runtime_env |= {"working_dir": str(folder), "excludes": WORKING_DIR_EXCLUDES}
    jobs = client(address)
    job_id = jobs.submit_job(
        entrypoint=entrypoint(stage, config, run_dir, [o for o in overrides if not o.startswith("run.run_dir=")],
                              folder),
        runtime_env=runtime_env,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
        metadata={"gs_ray_stage": stage, "gs_ray_run_dir": run_dir},
    )
    return jobs, job_id, run_dir


def follow(jobs: Any, job_id: str) -> str:
    """Print the job's logs as they come until it ends; return its final status."""

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return str(jobs.get_job_status(job_id).value)


def job_info(jobs: Any, job_id: str) -> Any:
    """The job's record; a clear error for an id the cluster does not know."""
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as exc:  # the client's only signal for an HTTP error, 404 included
        if UNKNOWN_JOB_STATUS not in str(exc):
            raise
        raise JobError(f"job {job_id!r} is not known to the cluster at {jobs.get_address()} "
                       "(list its jobs with `ray job list`)") from exc


def describe(jobs: Any, job_id: str) -> str:
    info = job_info(jobs, job_id)
    where = (info.metadata or {}).get("gs_ray_run_dir", "?")
    message = f" ({info.message})" if info.message else ""
    return f"{job_id}: {info.status.value}{message}; run dir {where}"


def print_logs(jobs: Any, job_id: str, follow_logs: bool) -> None:
    job_info(jobs, job_id)  # the log calls would answer an unknown id with a bare HTTP error
    if follow_logs:
        follow(jobs, job_id)
    else:
        sys.stdout.write(jobs.get_job_logs(job_id))
