"""Readers of the deployment files the tests check: cluster_configs/, the Dockerfile, the Makefile, pyproject.toml.

Shared by test_cluster_configs.py (the cluster configs agree with the code and presets) and
test_image.py (the images agree with the pins). Not a test module: it only reads files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import REPO as ROOT

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


def files_matching(pattern: re.Pattern) -> list[Path]:
    """The deploy files that name something `pattern` finds: a test parametrized over them never passes on nothing."""
    return [path for path in TEXT_FILES if pattern.search(path.read_text())]


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


def files_with(*kinds: str) -> list[Path]:
    """The files holding a document of these kinds (test_cluster_configs checks that each kind is shipped)."""
    return sorted({path for path, _ in docs_of_kind(*kinds)})


def path_id(path: Path) -> str:
    return rel(path)


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
