"""Run configuration: a JSON file parsed into frozen dataclasses and validated before any work starts.

Top-level keys (see `RunConfig`): ``model``, ``optimizer``, ``schedule``, ``batch``, ``train``, ``data``,
``backend``, ``backend_options``, ``name``. Unknown keys, wrong types and out-of-range values are a
`LaunchError` naming the key (and, for unknown keys, the valid ones). `config_to_dict` gives the resolved
form (model dimensions spelled out, defaults filled in), which `parse_config` reads back unchanged.
"""
from __future__ import annotations

import json
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from launch import optim_factory
from launch.backends.registry import KNOWN_BACKENDS
from launch.errors import LaunchError
from launch.model import GPTShape

MODEL_SIZES: dict[str, GPTShape] = {
    "nano": GPTShape(n_layer=2, n_head=2, n_embd=32, block_size=32),
    "tiny": GPTShape(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small": GPTShape(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "base": GPTShape(n_layer=12, n_head=12, n_embd=768, block_size=1024),
}


def _min(value: int | float) -> dict[str, Any]:
    return {"min": value}


@dataclass(frozen=True)
class ModelConfig:
    """GPT dimensions; ``size`` names a preset in `MODEL_SIZES` whose dimensions the other keys override."""

    n_layer: int = field(metadata=_min(1))
    n_head: int = field(metadata=_min(1))
    n_embd: int = field(metadata=_min(1))
    block_size: int = field(metadata=_min(1))
    size: Optional[str] = None

    def shape(self) -> GPTShape:
        return GPTShape(self.n_layer, self.n_head, self.n_embd, self.block_size)


@dataclass(frozen=True)
class OptimizerConfig:
    """``name`` (any name `mgup_dist.build_optimizer` accepts) and its constructor hyperparameters."""

    name: str
    hparams: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup from 0 to the optimizer's ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr``."""

    warmup_steps: int = field(default=0, metadata=_min(0))
    min_lr: float = field(default=0.0, metadata=_min(0))


@dataclass(frozen=True)
class BatchConfig:
    """Sequences per optimizer step (all ranks together) and per forward pass on one rank."""

    global_batch: int = field(metadata=_min(1))
    micro_batch: int = field(metadata=_min(1))

    def split(self, world_size: int) -> tuple[int, int]:
        """``(per_rank_batch, grad_accum_steps)`` at ``world_size`` ranks; `LaunchError` if it does not divide."""
        if self.global_batch % (world_size * self.micro_batch):
            raise LaunchError(
                f"batch: global_batch {self.global_batch} is not divisible by world_size {world_size} x "
                f"micro_batch {self.micro_batch}; pick a global_batch that is a multiple of "
                f"{world_size * self.micro_batch}"
            )
        per_rank = self.global_batch // world_size
        return per_rank, per_rank // self.micro_batch


@dataclass(frozen=True)
class TrainConfig:
    """Loop settings. ``grad_clip`` 0 disables clipping; ``eval_every``/``checkpoint_every`` 0 mean "only at
    the end"; ``keep_last`` 0 keeps every checkpoint."""

    steps: int = field(metadata=_min(1))
    grad_clip: float = field(default=1.0, metadata=_min(0))
    seed: int = field(default=0, metadata=_min(0))
    log_every: int = field(default=1, metadata=_min(1))
    eval_every: int = field(default=0, metadata=_min(0))
    eval_samples: int = field(default=32, metadata=_min(1))
    checkpoint_every: int = field(default=0, metadata=_min(0))
    keep_last: int = field(default=0, metadata=_min(0))


@dataclass(frozen=True)
class DataConfig:
    """``path`` None trains on the embedded corpus (the interpreter's standard library source); otherwise a
    UTF-8 text file or a folder of them. At most ``max_bytes`` are read; 1 in ``val_every`` files (or the
    last 1/``val_every`` of the bytes when there are fewer files) is validation data."""

    path: Optional[str] = None
    max_bytes: int = field(default=4_000_000, metadata=_min(1))
    val_every: int = field(default=10, metadata=_min(2))


@dataclass(frozen=True)
class RunConfig:
    """A whole training run."""

    model: ModelConfig
    optimizer: OptimizerConfig
    batch: BatchConfig
    train: TrainConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backend: str = "ddp"
    backend_options: dict = field(default_factory=dict)
    name: Optional[str] = None


_SECTIONS = {"schedule": ScheduleConfig, "batch": BatchConfig, "train": TrainConfig, "data": DataConfig}


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return f"{args[0].__name__} or null" if args else getattr(hint, "__name__", str(hint))


def _check_value(where: str, value: Any, hint: Any, metadata: Mapping[str, Any]) -> Any:
    """``value`` checked against ``hint`` (int, float, str, dict, or Optional of one) and ``metadata['min']``."""
    base = [a for a in typing.get_args(hint) if a is not type(None)]
    if base and value is None:
        return None
    kind = base[0] if base else hint
    is_int = isinstance(value, int) and not isinstance(value, bool)
    accepted = {int: is_int, float: is_int or isinstance(value, float)}
    ok = accepted[kind] if kind in accepted else isinstance(value, kind)
    if not ok or (kind is float and not math.isfinite(value)):
        raise LaunchError(f"{where} must be {'a finite ' if ok else ''}{_type_name(hint)}, got {json.dumps(value)}")
    if "min" in metadata and value < metadata["min"]:
        raise LaunchError(f"{where} must be >= {metadata['min']}, got {value}")
    return float(value) if kind is float else value


def _parse_fields(cls: type, data: Any, where: str, defaults: Mapping[str, Any] | None = None) -> Any:
    """Builds dataclass ``cls`` from JSON object ``data``; ``defaults`` fill keys ``data`` leaves out."""
    if not isinstance(data, dict):
        raise LaunchError(f"{where} must be a JSON object, got {json.dumps(data)}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            raise LaunchError(f"unknown key {where}.{key}; valid keys: {', '.join(known)}")
    values = {**(defaults or {}), **data}
    for f in fields(cls):
        if f.name not in values and f.default is MISSING and f.default_factory is MISSING:
            raise LaunchError(f"missing key {where}.{f.name}")
    return cls(**{k: _check_value(f"{where}.{k}", v, hints[k], _field(cls, k).metadata) for k, v in values.items()})


def _field(cls: type, name: str) -> Any:
    return next(f for f in fields(cls) if f.name == name)


def _parse_model(data: Any) -> ModelConfig:
    if isinstance(data, str):
        data = {"size": data}
    size = data.get("size") if isinstance(data, dict) else None
    if size is not None and size not in MODEL_SIZES:
        raise LaunchError(f"model.size {json.dumps(size)} is unknown; valid sizes: {', '.join(MODEL_SIZES)}")
    preset = asdict(MODEL_SIZES[size]) if size is not None else {}
    model = _parse_fields(ModelConfig, data, "model", preset)
    if model.n_embd % model.n_head:
        raise LaunchError(f"model.n_embd {model.n_embd} is not divisible by model.n_head {model.n_head}")
    return model


def _parse_optimizer(data: Any) -> OptimizerConfig:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise LaunchError(f'optimizer must be a JSON object with a string "name", got {json.dumps(data)}')
    hparams = {k: v for k, v in data.items() if k != "name"}
    optim_factory.check(data["name"], hparams)
    return OptimizerConfig(name=data["name"], hparams=hparams)


def _check_run(cfg: RunConfig) -> None:
    if cfg.backend not in KNOWN_BACKENDS:
        raise LaunchError(f"unknown backend {json.dumps(cfg.backend)}; valid backends: {', '.join(KNOWN_BACKENDS)}")
    lr = optim_factory.peak_lr(cfg.optimizer.name, cfg.optimizer.hparams)
    if cfg.schedule.min_lr > lr:
        raise LaunchError(f"schedule.min_lr {cfg.schedule.min_lr} exceeds the optimizer lr {lr}")
    if cfg.schedule.warmup_steps > cfg.train.steps:
        raise LaunchError(f"schedule.warmup_steps {cfg.schedule.warmup_steps} exceeds train.steps {cfg.train.steps}")
    cfg.batch.split(1)  # micro_batch must divide global_batch at any world size


def parse_config(data: Any) -> RunConfig:
    """A validated `RunConfig` from the JSON value ``data``."""
    if not isinstance(data, dict):
        raise LaunchError(f"the config must be a JSON object, got {type(data).__name__}")
    known = [f.name for f in fields(RunConfig)]
    for key in data:
        if key not in known:
            raise LaunchError(f"unknown key {key}; valid keys: {', '.join(known)}")
    for key in ("model", "optimizer", "batch", "train"):
        if key not in data:
            raise LaunchError(f"missing key {key}")
    values: dict[str, Any] = {"model": _parse_model(data["model"]), "optimizer": _parse_optimizer(data["optimizer"])}
    for key, cls in _SECTIONS.items():
        if key in data:
            values[key] = _parse_fields(cls, data[key], key)
    hints = typing.get_type_hints(RunConfig)
    for key in ("backend", "backend_options", "name"):
        if key in data:
            values[key] = _check_value(key, data[key], hints[key], {})
    cfg = RunConfig(**values)
    _check_run(cfg)
    return cfg


def load_config(path: str | Path) -> RunConfig:
    """Reads and validates a JSON config file; a missing or malformed file is a `LaunchError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LaunchError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LaunchError(f"cannot read config file {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LaunchError(f"config file {path} is not valid JSON: {exc}") from None
    return parse_config(data)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved JSON form of ``cfg`` (optimizer hyperparameters inlined next to ``name``)."""
    data = asdict(cfg)
    data["optimizer"] = {"name": cfg.optimizer.name, **cfg.optimizer.hparams}
    return data
