"""cluster_configs/ must agree with the code, the presets and the job scripts.

A RayJob naming a job script or preset that no longer exists, a Serve application whose
arguments no longer load, or a worker group too small for the `gpu` preset's actors fails
only after minutes of provisioning, on someone's cloud bill. These checks read the files and
fail here instead. No Ray cluster is started and no model is loaded. Every YAML file added to
cluster_configs/ is covered by the parametrized tests. The images' pins are test_image.py's.
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import re
import shlex

import pytest
import yaml

from gs_ray.cli import SUBMITTABLE
from gs_ray.config import load_config, parse_override
from gs_ray.serving.auth import API_KEY_ENV, is_loopback

from deploy_files import (
    CLUSTER_DIR,
    CONFIG_FILES,
    CONFIG_FLAG,
    JOB_SCRIPT,
    RAY_VERSION,
    ROOT,
    TEXT_FILES,
    docs_of_kind,
    files_matching,
    files_with,
    kind_of,
    node_groups,
    path_id,
    presets_named,
    ray_cluster_spec,
    rel,
    serve_applications,
    yaml_docs,
)


@pytest.mark.parametrize("path", TEXT_FILES, ids=rel)
def test_file_starts_with_a_header_comment(path):
    first = path.read_text().lstrip("\n").splitlines()[0]
    assert first.startswith("#"), f"{rel(path)}: must start with a comment saying what the file is for and how to use it"


@pytest.mark.parametrize("path", CONFIG_FILES, ids=rel)
def test_config_file_parses_as_a_known_kind(path):
    assert path.suffix in (".yaml", ".yml"), f"{rel(path)}: cluster_configs/ holds YAML files only"
    docs = yaml_docs(path)
    assert docs, f"{rel(path)}: no YAML document"
    for doc in docs:
        assert kind_of(doc) != "unknown", (
            f"{rel(path)}: not a cluster-launcher config, a Serve config, a KubeRay resource or a Kubernetes object")


@pytest.mark.parametrize("path", files_with("RayCluster", "RayJob", "RayService"), ids=path_id)
def test_kuberay_ray_version_is_pinned(path):
    for doc in yaml_docs(path):
        if kind_of(doc) not in ("RayCluster", "RayJob", "RayService"):
            continue
        spec = ray_cluster_spec(doc)
        assert spec, f"{rel(path)}: {doc['kind']} has no Ray cluster spec (rayClusterSpec / rayClusterConfig)"
        assert str(spec.get("rayVersion")) == RAY_VERSION, (
            f"{rel(path)}: {doc['kind']} rayVersion {spec.get('rayVersion')!r} must be pyproject.toml's {RAY_VERSION}")


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_each_kuberay_kind_is_shipped(kind):
    assert files_with(kind), f"cluster_configs/ has no {kind}: the checks parametrized over them would check nothing"


JOB_FILES = files_matching(JOB_SCRIPT)
PRESET_FILES = files_matching(CONFIG_FLAG)


def test_configs_name_job_scripts_and_presets():
    assert JOB_FILES and PRESET_FILES, "no cluster config names a job script or a --config preset"


@pytest.mark.parametrize("path", JOB_FILES, ids=rel)
def test_job_scripts_named_exist_with_a_docstring(path):
    for name in sorted({m["name"] for m in JOB_SCRIPT.finditer(path.read_text())}):
        script = ROOT / "jobs" / f"{name}.py"
        assert script.is_file(), f"{rel(path)}: names jobs/{name}.py, which does not exist"
        assert ast.get_docstring(ast.parse(script.read_text())), f"jobs/{name}.py (named in {rel(path)}): no docstring"


@pytest.mark.parametrize("path", PRESET_FILES, ids=rel)
def test_config_presets_named_exist_and_load(path):
    for name in sorted({m["name"] for m in CONFIG_FLAG.finditer(path.read_text())}):
        try:
            load_config(name)
        except Exception as exc:  # noqa: BLE001  (the message is the point)
            pytest.fail(f"{rel(path)}: --config {name}: {exc}")


@pytest.mark.parametrize("path", files_with("RayJob"), ids=path_id)
def test_rayjob_entrypoint_is_a_job_script_with_valid_arguments(path):
    for doc in yaml_docs(path):
        if kind_of(doc) != "RayJob":
            continue
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[:2] == ["python", "jobs/run.py"] and argv[2] in SUBMITTABLE, (
            f"{rel(path)}: spec.entrypoint must be `python jobs/run.py STAGE ...`, got {doc['spec']['entrypoint']!r}")
        preset = argv[argv.index("--config") + 1] if "--config" in argv else None
        assert "--run-dir" in argv, f"{rel(path)}: spec.entrypoint has no --run-dir (a pod's local disk dies with it)"
        overrides = [arg for arg in argv[3:] if "=" in arg and not arg.startswith("-")]
        try:
            load_config(preset, overrides)
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{rel(path)}: spec.entrypoint config {preset} {overrides}: {exc}")
        runtime_env = doc["spec"].get("runtimeEnvYAML")
        if runtime_env:
            assert isinstance(yaml.safe_load(runtime_env), dict), f"{rel(path)}: spec.runtimeEnvYAML is not a YAML mapping"


SERVE_APPS = [(path, app) for path, doc in docs_of_kind("serve", "RayService") for app in serve_applications(doc)]


@pytest.mark.parametrize("path, app", SERVE_APPS, ids=[f"{rel(p)}:{a.get('name')}" for p, a in SERVE_APPS])
def test_serve_applications_resolve_and_their_args_load(path, app):
    module_name, _, attribute = app["import_path"].partition(":")
    module = importlib.import_module(module_name)
    builder = getattr(module, attribute, None)
    assert callable(builder), f"{rel(path)}: import_path {app['import_path']} does not resolve"
    # The keys the builder reads: args.get("key") or args["key"] in its source.
    known = set(re.findall(r"args(?:\.get\(|\[)\s*[\"'](\w+)[\"']", inspect.getsource(builder)))
    args = app.get("args") or {}
    assert set(args) <= known, f"{rel(path)}: args {sorted(set(args) - known)} are not read by {app['import_path']}"
    assert args.get("run_dir"), f"{rel(path)}: args.run_dir is required by app_builder"
    overrides = [str(o) for o in args.get("overrides") or []]
    for text in overrides:
        assert parse_override(text), f"{rel(path)}: args.overrides {text!r}"
    try:
        load_config(args.get("config"), overrides)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{rel(path)}: args config={args.get('config')} overrides={overrides}: {exc}")


@pytest.mark.parametrize("path", files_with("RayService"), ids=path_id)
def test_rayservice_serves_the_application_of_serve_yaml(path):
    (reference,) = yaml_docs(CLUSTER_DIR / "serve.yaml")[0]["applications"]
    for doc in yaml_docs(path):
        for app in serve_applications(doc):
            for key in ("name", "route_prefix", "import_path"):
                assert app.get(key) == reference.get(key), (
                    f"{rel(path)}: serveConfigV2 application {key} {app.get(key)!r} differs from "
                    f"cluster_configs/serve.yaml's {reference.get(key)!r}")


ALLOW_UNAUTHENTICATED = "serve.allow_unauthenticated=true"


def _opens_without_a_key(app: dict) -> bool:
    return ALLOW_UNAUTHENTICATED in [str(o).replace(" ", "") for o in (app.get("args") or {}).get("overrides") or []]


def _serve_host(doc: dict) -> str:
    """Where the Serve proxy of a serve config or RayService listens (KubeRay's default: every interface)."""
    if kind_of(doc) == "serve":
        return (doc.get("http_options") or {}).get("host", "127.0.0.1")
    return (yaml.safe_load(doc["spec"]["serveConfigV2"]).get("http_options") or {}).get("host", "0.0.0.0")


@pytest.mark.parametrize("path", files_with("RayService"), ids=path_id)
def test_rayservice_pods_take_the_api_key_from_a_secret(path):
    """The proxy listens on every interface, where the app refuses to start without GS_RAY_API_KEY."""
    for doc in yaml_docs(path):
        if kind_of(doc) != "RayService" or is_loopback(_serve_host(doc)):
            continue
        if all(_opens_without_a_key(app) for app in serve_applications(doc)):
            continue
        spec = ray_cluster_spec(doc)
        for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
            for container in group["template"]["spec"]["containers"]:
                env = {item["name"]: item for item in container.get("env", [])}
                secret = env.get(API_KEY_ENV, {}).get("valueFrom", {}).get("secretKeyRef", {})
                assert secret.get("name") and secret.get("key"), (
                    f"{rel(path)}: container {container['name']} does not set {API_KEY_ENV} from a Secret, and no "
                    f"application has {ALLOW_UNAUTHENTICATED}: the app would refuse to start")


def test_serve_yaml_on_every_interface_says_how_it_authenticates():
    (doc,) = yaml_docs(CLUSTER_DIR / "serve.yaml")
    if is_loopback(_serve_host(doc)) or all(_opens_without_a_key(app) for app in serve_applications(doc)):
        return
    text = (CLUSTER_DIR / "serve.yaml").read_text()
    header = text[: text.index("proxy_location")]
    assert API_KEY_ENV in header and "serve.allow_unauthenticated=true" in header, (
        "cluster_configs/serve.yaml binds a public address: its header must say how to set GS_RAY_API_KEY "
        "(without it the app refuses to start) and name the opt-out")


CLUSTERS = docs_of_kind("launcher", "RayCluster", "RayJob", "RayService")


@pytest.mark.parametrize("path, doc", CLUSTERS, ids=[f"{rel(p)}:{kind_of(d)}" for p, d in CLUSTERS])
def test_gpu_node_groups_fit_the_presets_actors(path, doc):
    groups = node_groups(doc)
    gpu_groups = [g for g in groups if g.gpus > 0]
    assert gpu_groups, f"{rel(path)}: no node type or worker group offers a GPU"
    for preset in presets_named(path, doc):
        cfg = load_config(preset)
        needs = {  # what one Ray worker/actor/replica reserves: it must fit on one node
            "a Ray Train worker (train.*)": (cfg.train.cpus_per_worker, 1.0 if cfg.train.use_gpu else 0.0),
            "an expert's Train worker (experts.cpus_per_worker)": (
                cfg.experts.cpus_per_worker or cfg.train.cpus_per_worker, 1.0 if cfg.train.use_gpu else 0.0),
            "a gradient actor (grads.*)": (cfg.grads.num_cpus_per_actor, cfg.grads.num_gpus_per_actor),
            "an Expert replica (serve.*)": (cfg.serve.num_cpus_per_replica, cfg.serve.num_gpus_per_replica),
        }
        for group in gpu_groups:
            for what, (cpus, gpus) in needs.items():
                assert group.cpus >= cpus and group.gpus >= gpus, (
                    f"{rel(path)}: {group.name} offers {group.cpus:g} CPU / {group.gpus:g} GPU per node, "
                    f"less than {what} of preset {preset} reserves: {cpus:g} CPU / {gpus:g} GPU")
        assert any(g.cpus >= cfg.serve.router_num_cpus for g in groups), (
            f"{rel(path)}: no node fits a router replica of preset {preset} ({cfg.serve.router_num_cpus:g} CPU)")

        total_gpus = sum(g.gpus * g.max_count for g in groups)
        gpu_per_worker = 1.0 if cfg.train.use_gpu else 0.0
        jobs = {
            "one Ray Train job (train.num_workers GPUs)": cfg.train.num_workers * gpu_per_worker,
            "one expert job (experts.num_workers GPUs)": (cfg.experts.num_workers or cfg.train.num_workers) * gpu_per_worker,
            "the gradient actor pool (grads.concurrency x num_gpus_per_actor)": cfg.grads.concurrency * cfg.grads.num_gpus_per_actor,
            "the most Expert replicas (serve.*)": max(cfg.serve.num_replicas, cfg.serve.autoscale_max_replicas)
            * cfg.serve.num_gpus_per_replica,
        }
        for what, gpus in jobs.items():
            assert total_gpus >= gpus, (
                f"{rel(path)}: at most {total_gpus:g} GPUs (max workers x GPUs per node), fewer than {what} "
                f"of preset {preset} needs: {gpus:g}")


LAUNCHERS = sorted({path for path, _ in docs_of_kind("launcher")})


@pytest.mark.parametrize("path", LAUNCHERS, ids=rel)
def test_launcher_config_passes_rays_validation(path):
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as exc:
        pytest.skip(f"Ray's cluster-config validator is not importable: {exc}")
    (config,) = yaml_docs(path)
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before it validates
    try:
        validate_config(prepared)
    except ImportError as exc:  # jsonschema comes with ray[default]
        pytest.skip(f"Ray's cluster-config validator needs {exc.name}")
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{rel(path)}: Ray's validate_config rejects it: {exc}")
    for name, node_type in prepared["available_node_types"].items():
        assert node_type.get("min_workers", 0) <= node_type.get("max_workers", 0) <= prepared["max_workers"], (
            f"{rel(path)}: available_node_types.{name}: need min_workers <= max_workers <= the global max_workers")
    # Ray's defaults fill in commands that pip install a Ray nightly: the config must override them.
    for key in ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands"):
        for command in prepared.get(key) or []:
            assert not re.search(r"ray-wheels|pip install[^;&|]*\bray\b", command), (
                f"{rel(path)}: {key} installs Ray ({command!r}); the image already has ray=={RAY_VERSION}")
    images = {prepared["docker"].get(k) for k in ("image", "head_image", "worker_image")} - {None, ""}
    assert images, f"{rel(path)}: docker.image is empty: nodes would run without the gs-ray image"


def test_launcher_validation_rejects_a_broken_config():
    """The validation above has teeth: a misspelt top-level key fails it."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
        importlib.import_module("jsonschema")
    except ImportError as exc:
        pytest.skip(f"Ray's cluster-config validator is not importable: {exc}")
    if not LAUNCHERS:
        pytest.skip("no cluster-launcher config in cluster_configs/")
    (config,) = yaml_docs(LAUNCHERS[0])
    broken = prepare_config(copy.deepcopy(config))
    broken["max_worker"] = 3
    with pytest.raises(Exception, match="max_worker"):
        validate_config(broken)
