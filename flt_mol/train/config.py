"""Typed run configurations loaded from YAML recipes with ``key=value`` overrides.

A recipe is a YAML mapping with the sections of :class:`TrainConfig`::

    task: is2re
    data:  {...}   # the task's data dataclass (e.g. IS2REDataConfig)
    model: {...}   # the task's model dataclass (e.g. IS2REModelConfig)
    optim: {...}   # OptimConfig
    run:   {...}   # RunConfig

Overrides are dotted ``section.key=value`` strings whose value is parsed as YAML
(``optim.lr=1e-3``, ``data.val=[emt:val_id]``, ``run.ema_decay=null``). Every key is checked
against the dataclass fields and every value against the field's annotation: an unknown key or a
mistyped value raises :class:`ConfigError` naming the dotted key. No value is ever coerced
silently except ``int -> float`` (YAML writes ``1`` for ``1.0``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Defined beside the other expected errors (models/ raise it too); re-exported here, where
# callers have always imported it from.
from flt_mol.errors import ConfigError


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule.

    The schedule is :func:`flt_mol.train.loop.lr_factor`: linear warm-up over ``warmup_steps``
    to ``lr``, then linear decay to ``lr * final_lr_fraction`` at the last step.
    """

    name: str = "adamw"  # adam | adamw
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 1e-3
    warmup_steps: int = 100
    final_lr_fraction: float = 0.0
    grad_clip: float | None = 5.0  # max global grad norm; null disables clipping
    ema_decay: float | None = None  # e.g. 0.999; null disables the EMA copy

    def validate(self) -> None:
        if self.name not in ("adam", "adamw"):
            raise ConfigError(f"optim.name must be 'adam' or 'adamw', got {self.name!r}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ConfigError(f"optim.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay must be in (0, 1) or null, got {self.ema_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass
class RunConfig:
    """Length of the run, intervals, seed and device.

    Exactly one of ``steps`` and ``epochs`` sets the length (``steps`` wins when both are given
    as positive numbers is refused: give one).
    """

    steps: int | None = 1000
    epochs: int | None = None
    eval_interval: int = 500  # steps between validation passes (and best.pt updates); 0 = end only
    ckpt_interval: int = 500  # steps between checkpoint.pt writes; 0 = end only
    log_interval: int = 20
    redraw_interval: int = 1  # redraw the random features every k steps; 0 = never
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = True  # bf16 autocast, used on CUDA only
    progress: bool = True  # tqdm bar (also off when stderr is not a TTY or rank != 0)
    # torch.compile (inductor; on CPU it needs a C++ compiler) of every transformer block, in place
    # (state dicts unchanged; dynamic shapes). Measured on the EMT demo model (one thread, shared
    # machine): -12% step time for ~95 s of compilation (whole-model compilation: no gain, 275 s),
    # so it pays only beyond ~6,000 steps of that size: off by default. Fused kernels change the
    # float trajectory (not the model).
    compile: bool = False

    def validate(self) -> None:
        has_steps = self.steps is not None and self.steps > 0
        has_epochs = self.epochs is not None and self.epochs > 0
        if has_steps == has_epochs:
            raise ConfigError(
                f"give exactly one of run.steps and run.epochs (> 0), got steps={self.steps}, "
                f"epochs={self.epochs}"
            )
        for name in ("eval_interval", "ckpt_interval", "log_interval", "redraw_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run.{name} must be >= 0, got {getattr(self, name)}")
        if self.log_interval == 0:
            raise ConfigError("run.log_interval must be >= 1")


@dataclass
class TrainConfig:
    """A whole run: ``task`` selects the data and model dataclasses (see ``task_config_types``)."""

    task: str
    data: Any
    model: Any
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> None:
        for section in (self.data, self.model, self.optim, self.run):
            check = getattr(section, "validate", None)
            if check is not None:
                check()

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, **{k: to_plain(getattr(self, k)) for k in ("data", "model", "optim", "run")}}


# --------------------------------------------------------------------------------------------
# Typed conversion: plain YAML values -> dataclasses (and back)
# --------------------------------------------------------------------------------------------


def to_plain(obj: Any) -> Any:
    """Dataclasses / tuples -> dicts / lists of YAML-safe values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` (after resolving strings) and convert it."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt, f"{key}") : _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def from_dict(cls: type, values: dict[str, Any], *, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, checking every key and value type.

    Raises:
        ConfigError: naming ``prefix.key`` for an unknown key, a missing required key, or a
        value whose type does not match the annotation.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown config key {where}{unknown[0]!s} (valid keys for {cls.__name__}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in values:
            kwargs[name] = _convert(values[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key {key}")
    return cls(**kwargs)


def yaml_problem(err: yaml.YAMLError) -> str:
    """A one-line account of a YAML error: what and where (1-based line and column)."""
    problem = getattr(err, "problem", None)
    mark = getattr(err, "problem_mark", None)
    if problem is None:
        return " ".join(str(err).split())
    return problem + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (``["optim", "lr"]``, ``0.001``); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    # YAML 1.1 reads "1e-3" as a string; config_from_dict turns such strings back into floats.
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({yaml_problem(err)})") from err
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the nested mapping ``raw`` with dotted overrides applied.

    Overrides may create keys (unknown keys are caught by :func:`from_dict` with their full name).
    """
    import copy

    out = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def _yaml_floats(raw: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; turn such strings back into floats."""
    if isinstance(raw, dict):
        return {k: _yaml_floats(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_yaml_floats(v) for v in raw]
    if isinstance(raw, str):
        try:
            if any(c in raw for c in "eE") and raw[0] in "+-.0123456789":
                return float(raw)
        except ValueError:
            return raw
    return raw


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a plain nested mapping."""
    from flt_mol.train.tasks import task_config_types

    if not isinstance(raw, dict):
        raise ConfigError(f"a recipe must be a mapping, got {type(raw).__name__}")
    raw = _yaml_floats(raw)
    allowed = {"task", "data", "model", "optim", "run"}
    unknown = [k for k in raw if k not in allowed]
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]} (valid sections: {', '.join(sorted(allowed))})")
    if "task" not in raw:
        raise ConfigError("missing required config key task (is2re | lm | vit)")
    task = raw["task"]
    if not isinstance(task, str):
        raise ConfigError(f"task: expected a string, got {task!r}")
    data_cls, model_cls = task_config_types(task)
    config = TrainConfig(
        task=task,
        data=from_dict(data_cls, raw.get("data") or {}, prefix="data"),
        model=from_dict(model_cls, raw.get("model") or {}, prefix="model"),
        optim=from_dict(OptimConfig, raw.get("optim") or {}, prefix="optim"),
        run=from_dict(RunConfig, raw.get("run") or {}, prefix="run"),
    )
    config.validate()
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML recipe, apply ``key=value`` overrides and build the typed config.

    Raises:
        FileNotFoundError: the recipe does not exist.
        ConfigError: the recipe is empty or not YAML, an unknown key or a mistyped value (the
            message names the file or the dotted key).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    with open(path) as fh:
        try:
            raw = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise ConfigError(f"recipe {path} is not valid YAML ({yaml_problem(err)})") from err
    if raw is None:
        raise ConfigError(f"recipe {path} is empty (expected a YAML mapping with task, data, model, optim, run)")
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, list(overrides) if overrides is not None else [])
    return config_from_dict(raw)
