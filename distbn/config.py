"""Run configuration: frozen dataclasses loaded from YAML, with ``--set KEY=VALUE`` on top.

Unknown keys, wrong types and impossible values raise :class:`ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, Sequence, Union, get_args, get_origin, get_type_hints

import yaml

from .models import BN_CHOICES, known_arch

PRECISIONS = ("float32", "bfloat16", "float16")  # train.precision (distbn.precision)
PRECISE_BN_DEFAULT = 10240  # docs/results.md, "Statistics to evaluate with": chosen by measurement


class ConfigError(ValueError):
    """The configuration is unusable; the message names the key or the file."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "lenet"       # lenet (the book's) or a mxnet.gluon.model_zoo.vision name
    bn: str = "sync"          # sync | custom | gluon | none (lenet only), for every BN layer
    hybridize: bool = True    # compile the whole network, BN layers included
    bn_group: int = 0         # sync BN within groups of this many consecutive ranks; 0: all workers


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5
    batch_size: int = 256     # the *global* batch, split evenly across workers
    lr: float = 1.0           # applied to the global-batch mean gradient: independent of workers
    momentum: float = 0.0     # SGD momentum (the book uses plain SGD)
    seed: int = 0
    stall_timeout: float = 300.0  # seconds without a finished step before a worker gives up; 0: off
    precision: str = "float32"  # or bfloat16 (CPU), float16 (GPU): AMP (distbn.precision)
    devices_per_worker: int = 1  # devices each process drives (GPUs; on the CPU mx.cpu(i))
    # Examples (over all workers) from which BN statistics are re-estimated before each
    # evaluation (distbn.update_bn_stats); 0: evaluate with the running averages only.
    precise_bn: int = PRECISE_BN_DEFAULT


@dataclass(frozen=True)
class DataConfig:
    dir: Optional[str] = None      # None: DISTBN_DATA_DIR, user cache, Debian's copy, download
    limit: Optional[int] = None    # use only the first N training examples
    test_limit: Optional[int] = None


@dataclass(frozen=True)
class LogConfig:
    dir: str = "runs"
    every_steps: int = 10     # TensorBoard step scalars every N steps (each read waits for the step)
    histograms: bool = True   # BN gamma/beta/moving-stat histograms per epoch
    progress: bool = True     # tqdm progress bar on rank 0


@dataclass(frozen=True)
class Config:
    name: str = "lenet_syncbn"  # the defaults are configs/lenet_syncbn.yaml's settings
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` if it fits ``hint`` (ints are accepted for floats), else raise."""
    if get_origin(hint) is Union:  # Optional[X]
        if value is None:
            return None
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e6 and 1e-3 as strings
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float) and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, data: Any, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(prefix + name, value, hint)
    return cls(**kwargs)


def _validate(cfg: Config) -> Config:
    checks = [
        (cfg.model.bn in BN_CHOICES, "model.bn", f"must be one of {', '.join(BN_CHOICES)}"),
        (known_arch(cfg.model.arch), "model.arch",
         "must be lenet or a mxnet.gluon.model_zoo.vision name, e.g. resnet18_v1"),
        (cfg.model.arch == "lenet" or cfg.model.bn != "none", "model.bn",
         "none is for lenet only (model-zoo networks keep their BN layers)"),
        (cfg.model.bn_group >= 0, "model.bn_group", "must be 0 (all workers) or a group size"),
        (cfg.train.epochs >= 1, "train.epochs", "must be at least 1"),
        (cfg.train.batch_size >= 1, "train.batch_size", "must be at least 1"),
        (cfg.train.devices_per_worker >= 1, "train.devices_per_worker", "must be at least 1"),
        (cfg.train.lr > 0 and cfg.train.lr == cfg.train.lr and cfg.train.lr != float("inf"),
         "train.lr", "must be a positive finite number"),
        (0 <= cfg.train.momentum < 1, "train.momentum", "must be in [0, 1)"),
        (cfg.train.stall_timeout >= 0, "train.stall_timeout", "must be 0 (off) or positive"),
        (cfg.train.precise_bn >= 0, "train.precise_bn", "must be 0 (off) or a number of examples"),
        (cfg.train.precision in PRECISIONS, "train.precision", f"must be one of {', '.join(PRECISIONS)}"),
        (cfg.data.limit is None or cfg.data.limit >= 1, "data.limit", "must be at least 1"),
        (cfg.data.test_limit is None or cfg.data.test_limit >= 1, "data.test_limit",
         "must be at least 1"),
        (cfg.log.every_steps >= 1, "log.every_steps", "must be at least 1"),
        (bool(cfg.name) and os.sep not in cfg.name, "name", "must be a non-empty file name"),
    ]
    for ok, key, why in checks:
        if not ok:
            value = get_key(cfg, key)
            raise ConfigError(f"{key} {why}, got {value!r}")
    return cfg


def get_key(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _set_nested(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[parts[-1]] = value


def parse_overrides(pairs: Sequence[str]) -> List[tuple]:
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            out.append((key.strip(), yaml.safe_load(raw)))  # YAML scalars: 1, 0.5, true, null
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse {raw!r} ({e})") from e
    return out


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Read ``path`` (YAML), apply ``KEY=VALUE`` overrides, validate, return a frozen Config."""
    data: Dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
    for key, value in parse_overrides(overrides):
        _set_nested(data, key, value)
    return _validate(_build(Config, data, ""))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
