"""Typed configuration for every stage, loaded from YAML presets plus `key=value` overrides.

A config is one `Config` of sections (`model`, `lora`, `data`, ...). Each field carries
its documentation as an attribute docstring right below it; `field_docs` reads those so
that `gs-ray config` can print them. Presets live in `gs_ray/config/presets/<name>.yaml`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import os
import textwrap
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from gs_ray.config.sections import (
    ClusterConfig,
    DataConfig,
    ExpertsConfig,
    GradsConfig,
    LoraConfig,
    ModelConfig,
    RouterConfig,
    RunConfig,
    TrainConfig,
    WarmupConfig,
)
from gs_ray.config.serving_sections import BaselinesConfig, EvaluateConfig, ServeConfig
from gs_ray.core.errors import ConfigError


@dataclass
class Config:
    """A whole gs_ray run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    grads: GradsConfig = field(default_factory=GradsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self, sections: list[str]) -> str:
        """Hash of the named sections: a stage reruns when any of them changes."""
        subset = {name: dataclasses.asdict(getattr(self, name)) for name in sections}
        return hashlib.sha256(json.dumps(subset, sort_keys=True).encode()).hexdigest()[:16]


SECTIONS: dict[str, type] = typing.get_type_hints(Config)
"""Section name -> its dataclass, in config order."""


def preset_names() -> list[str]:
    presets = resources.files("gs_ray.config.presets")
    return sorted(p.name[: -len(".yaml")] for p in presets.iterdir() if p.name.endswith(".yaml"))


YAML_MERGE_TAG = "tag:yaml.org,2002:merge"
"""The `<<` key: what it merges in may be overridden by the mapping's own keys."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, where PyYAML would keep the last silently."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != YAML_MERGE_TAG:
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line saying where in the text and what, instead of PyYAML's multi-line excerpt."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or problem is None:
        return "invalid YAML: " + " ".join(str(exc).split())
    return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _read_yaml(source: str) -> tuple[dict[str, Any], str]:
    """Read a preset name or a YAML path; return the mapping and a label for errors."""
    if os.path.sep not in source and not source.endswith((".yaml", ".yml")):
        if source not in preset_names():
            raise ConfigError(f"unknown preset {source!r}; presets: {', '.join(preset_names())}, or give a YAML path")
        text = resources.files("gs_ray.config.presets").joinpath(f"{source}.yaml").read_text(encoding="utf-8")
        label = f"preset {source}"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file not found: {source}")
        label = str(path)
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{label}: cannot read: {exc.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise ConfigError(f"{label}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label}: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: top level must be a mapping of sections, got {type(data).__name__}")
    return data, label


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(options)}"


def _coerce(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Check a YAML value against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} expects a list, got {value!r}")
        return [_coerce(item, item_type, key, where) for item in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key} expects {annotation.__name__}, got {value!r}")
    return value


def _merge(target: dict[str, dict[str, Any]], data: dict[str, Any], where: str) -> None:
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section {section!r}{_suggest(str(section), list(SECTIONS))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping, got {values!r}")
        hints = typing.get_type_hints(SECTIONS[section])
        for name, value in values.items():
            key = f"{section}.{name}"
            if name not in hints:
                raise ConfigError(f"{where}: unknown key {key!r}{_suggest(f'{section}.{name}', [f'{section}.{h}' for h in hints])}")
            target.setdefault(section, {})[name] = _coerce(value, hints[name], key, where)


def parse_override(text: str) -> dict[str, Any]:
    """`section.field=value` -> {section: {field: value}}; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or key.count(".") != 1:
        raise ConfigError(f"override {text!r}: expected section.field=value, e.g. train.num_workers=2")
    section, name = key.strip().split(".")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return {section: {name: value}}


def load_config(source: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then a preset or YAML file, then `key=value` overrides; validated."""
    values: dict[str, dict[str, Any]] = {}
    if source:
        data, label = _read_yaml(source)
        _merge(values, data, label)
    for text in overrides or []:
        _merge(values, parse_override(text), f"override {text!r}")
    return Config(**{name: SECTIONS[name](**values.get(name, {})) for name in SECTIONS})


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. a manifest or a Ray task argument)."""
    values: dict[str, dict[str, Any]] = {}
    _merge(values, data, "config")
    return Config(**{name: SECTIONS[name](**values.get(name, {})) for name in SECTIONS})


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a config dataclass, by field name."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def describe(cfg: Config) -> str:
    """The resolved config as YAML with each field's documentation as a comment."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:  # {(cls.__doc__ or '').strip()}")
        docs = field_docs(cls)
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            rendered = json.dumps(value)
            lines.append(f"  {name}: {rendered}  # {docs.get(name, '')}")
    return "\n".join(lines) + "\n"
