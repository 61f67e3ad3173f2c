"""Meta-training learned optimisers with truncated unrolls.

A pool of ``parallel_tasks`` workers each hold a task drawn from the distribution, the current
parameters and the rule's state. One meta-iteration advances every worker by ``unroll_length``
steps with the rule, keeping the graph, and minimises the mean over steps and workers of

``log( L_task(theta_{t+1}) / L_task(theta_0) + eps )``

(the log makes tasks of different loss scales count equally), with meta-gradients through the
unrolled updates. As usual (Andrychowicz et al. 2016) the gradients fed to the rule are treated
as inputs (no second derivatives of the task loss). Workers whose task reached ``horizon`` steps
are replaced by fresh tasks; states are detached between truncations. Checkpoints hold the rule,
the meta-optimiser, the worker pool and the RNG state, are written atomically and resume exactly.

``kind: coordinate`` trains a :class:`~flt_mol.optim.learned.LearnedUpdateRule` on the task
distribution; ``kind: swarm`` trains a :class:`~flt_mol.optim.swarm.SwarmUpdateRule` on
Rastrigin functions of ``swarm.dim`` dimensions.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flt_mol.errors import CheckpointError, ConfigError
from flt_mol.fileio import atomic_write

from flt_mol.optim.learned import LearnedOptimizerConfig, LearnedUpdateRule
from flt_mol.optim.swarm import SwarmConfig, SwarmUpdateRule
from flt_mol.optim.tasks import RastriginTask, TaskDistributionConfig, sample_task

__all__ = [
    "MetaTrainConfig",
    "load_config",
    "config_from_dict",
    "build_rule",
    "meta_train",
    "load_rule",
    "save_atomic",
]

CHECKPOINT_FORMAT = "flt_mol.optim.meta/1"
META_KINDS = ("coordinate", "swarm")
SWARM_META_LOSSES = ("mean", "best")


def population_loss(losses: torch.Tensor, how: str) -> torch.Tensor:
    """The swarm's loss at one step: mean over members (``"mean"``) or the best one (``"best"``).

    Shapes: ``losses [K]`` -> ``[]``.
    """
    if how == "mean":
        return losses.mean()
    if how == "best":
        return losses.min()
    raise ValueError(f"swarm_meta_loss must be one of {SWARM_META_LOSSES}, got {how!r}")


@dataclass
class MetaTrainConfig:
    """A meta-training run (one YAML recipe).

    Attributes:
        kind: ``coordinate`` (uses ``optimizer`` and ``tasks``) or ``swarm`` (uses ``swarm`` and
            ``tasks.rastrigin_amplitude``).
        optimizer, swarm, tasks: the rule and the task distribution.
        meta_lr: Adam learning rate of the meta-optimiser.
        meta_iterations: number of meta-updates.
        unroll_length: steps per truncation (meta-gradient horizon).
        horizon: optimisation steps a task runs before it is replaced.
        parallel_tasks: workers per meta-update.
        grad_clip: meta-gradient norm clip.
        loss_eps: ``eps`` inside the log meta-loss.
        swarm_meta_loss: which population loss enters the swarm's meta-loss at each step:
            ``mean`` (mean over members) or ``best`` (the best member's, ``min_k f_k``: the quantity
            the evaluation reports, so the population is free to keep exploring members).
        seed: seeds the rule init, the tasks and the random features.
        checkpoint_every, log_every: in meta-iterations.
    """

    kind: str = "coordinate"
    optimizer: LearnedOptimizerConfig = field(default_factory=LearnedOptimizerConfig)
    swarm: SwarmConfig = field(default_factory=SwarmConfig)
    tasks: TaskDistributionConfig = field(default_factory=TaskDistributionConfig)
    meta_lr: float = 1e-3
    meta_iterations: int = 200
    unroll_length: int = 10
    horizon: int = 50
    parallel_tasks: int = 4
    grad_clip: float = 1.0
    loss_eps: float = 1e-6
    swarm_meta_loss: str = "mean"
    seed: int = 0
    checkpoint_every: int = 50
    log_every: int = 10

    def __post_init__(self):
        if self.kind not in META_KINDS:
            raise ValueError(f"MetaTrainConfig.kind must be one of {META_KINDS}, got {self.kind!r}")
        for name in ("meta_iterations", "unroll_length", "horizon", "parallel_tasks", "checkpoint_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MetaTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.horizon < self.unroll_length:
            raise ValueError(
                f"MetaTrainConfig.horizon ({self.horizon}) must be >= unroll_length ({self.unroll_length})"
            )
        if self.swarm_meta_loss not in SWARM_META_LOSSES:
            raise ValueError(
                f"MetaTrainConfig.swarm_meta_loss must be one of {SWARM_META_LOSSES}, got {self.swarm_meta_loss!r}"
            )
        if not self.meta_lr > 0 or not self.grad_clip > 0 or not self.loss_eps > 0:
            raise ValueError(
                f"MetaTrainConfig: meta_lr, grad_clip, loss_eps must be > 0, got {self.meta_lr}, {self.grad_clip}, {self.loss_eps}"
            )


# ---------------------------------------------------------------------------------------------
# typed configs from YAML


def config_from_dict(cls, data: dict, *, where: str = ""):
    """Build dataclass ``cls`` from ``data`` recursively.

    Raises:
        ConfigError: (a ``ValueError``) an unknown key, a mistyped value, or a value the
            dataclass rejects; the message names ``where`` and the key.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        name = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = config_from_dict(hint, value, where=name)
        elif hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            # PyYAML reads "1e-3" (no dot) as a string: accept numeric strings for float fields
            try:
                kwargs[key] = float(value)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got {value!r}") from None
        elif hint is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # the dataclass's own checks (__post_init__)
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def _set_override(data: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> MetaTrainConfig:
    """Read a recipe YAML and apply ``key.sub=value`` overrides (values parsed as YAML).

    Raises:
        FileNotFoundError: the recipe does not exist.
        ConfigError: the recipe is empty or not YAML, an unknown key or a bad value.
    """
    import yaml

    from flt_mol.train.config import yaml_problem

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as err:
            raise ConfigError(f"recipe {path} is not valid YAML ({yaml_problem(err)})") from err
    if data is None:
        raise ConfigError(f"recipe {path} is empty (expected a YAML mapping of MetaTrainConfig keys)")
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a YAML mapping, got {type(data).__name__}")
    for item in overrides if overrides is not None else []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. meta_iterations=100)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({yaml_problem(err)})") from err
        _set_override(data, key.strip(), value)
    return config_from_dict(MetaTrainConfig, data, where=str(path))


# ---------------------------------------------------------------------------------------------
# rules and checkpoints


def build_rule(config: MetaTrainConfig) -> LearnedUpdateRule | SwarmUpdateRule:
    """The rule a config describes, freshly initialised (seeded by ``config.seed``)."""
    torch.manual_seed(config.seed)
    if config.kind == "coordinate":
        return LearnedUpdateRule(config.optimizer)
    return SwarmUpdateRule(config.swarm)


def save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace`` (the file
    gets the mode a plain ``open()`` would give it)."""
    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def _load_checked(path: Path) -> dict:
    """A learned-optimiser checkpoint, or :class:`CheckpointError` saying what the file is not."""
    from flt_mol.train.checkpoint import load_torch_file

    expected = f"expected a learned-optimiser checkpoint written by flt-mol optim meta-train (format {CHECKPOINT_FORMAT})"
    ckpt = load_torch_file(path, expected=expected)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        hint = "; this is a flt-mol train checkpoint" if isinstance(ckpt, dict) and "model" in ckpt else ""
        raise CheckpointError(f"not a flt_mol checkpoint: {path} ({expected}{hint})")
    return ckpt


def load_rule(path: str | os.PathLike) -> tuple[LearnedUpdateRule | SwarmUpdateRule, MetaTrainConfig]:
    """Load a meta-trained rule (eval mode) and its config from a checkpoint."""
    ckpt = _load_checked(Path(path))
    config = config_from_dict(MetaTrainConfig, ckpt["config"], where=f"{path}:config")
    rule = build_rule(config)
    rule.load_state_dict(ckpt["rule"])
    rule.eval()
    return rule, config


# ---------------------------------------------------------------------------------------------
# truncated unrolls


def _detach(state):
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, dict):
        return {k: _detach(v) for k, v in state.items()}
    raise TypeError(f"unexpected state entry of type {type(state).__name__}")


def _task_for(config: MetaTrainConfig, seed: int):
    if config.kind == "coordinate":
        return sample_task(config.tasks, seed)
    return RastriginTask(config.swarm.dim, seed=seed, amplitude_range=config.tasks.rastrigin_amplitude)


def _new_worker(config: MetaTrainConfig, rule, seed: int) -> dict:
    task = _task_for(config, seed)
    if config.kind == "coordinate":
        params = task.initial_params()
        state = rule.initial_state(params.numel(), dtype=params.dtype)
        with torch.no_grad():
            initial_loss = float(task.loss(params, 0))
    else:
        gen = torch.Generator().manual_seed(seed)
        params = rule.initial_positions(gen)  # [K, d]
        state = rule.initial_state(dtype=params.dtype)
        with torch.no_grad():
            losses0 = task.loss(params, 0)
            initial_loss = float(population_loss(losses0, config.swarm_meta_loss))
    return {"seed": seed, "step": 0, "params": params, "state": state, "initial_loss": initial_loss}


def unroll(
    rule, task, worker: dict, length: int, *, kind: str, loss_eps: float, swarm_meta_loss: str = "mean"
) -> tuple[torch.Tensor, dict, list[float]]:
    """Advance one worker by ``length`` steps keeping the graph.

    Returns the mean log-loss-ratio meta-loss (differentiable in the rule), the detached worker
    and the task losses seen (floats; for the swarm, the population's best). For the swarm the
    per-step loss is the members' mean (``swarm_meta_loss="mean"``) or minimum (``"best"``).
    """
    if swarm_meta_loss not in SWARM_META_LOSSES:
        raise ValueError(f"unroll: swarm_meta_loss must be one of {SWARM_META_LOSSES}, got {swarm_meta_loss!r}")
    l0 = max(worker["initial_loss"], 1e-12)
    params = worker["params"].detach().requires_grad_(True)
    state = worker["state"]
    step = worker["step"]
    seen = []
    terms = []
    loss = task.loss(params, step)
    for _ in range(length):
        (grad,) = torch.autograd.grad(loss.sum(), params, retain_graph=True)
        grad = grad.detach()  # gradients are rule inputs, not differentiated through (first order)
        if kind == "coordinate":
            update, state = rule(grad, state)
        else:
            update, state = rule(params, loss, grad, state)
        params = params + update
        step += 1
        loss = task.loss(params, step)
        mean_loss = loss if kind == "coordinate" else population_loss(loss, swarm_meta_loss)
        terms.append(torch.log(mean_loss / l0 + loss_eps))
        seen.append(float(loss.detach().min()))
    meta_loss = torch.stack(terms).mean()
    new_worker = dict(worker, step=step, params=params.detach(), state=_detach(state))
    return meta_loss, new_worker, seen


def _checkpoint(config, rule, meta_opt, workers, iteration, task_counter) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "config": dataclasses.asdict(config),
        "rule": rule.state_dict(),
        "meta_optimizer": meta_opt.state_dict(),
        "iteration": iteration,
        "task_counter": task_counter,
        "workers": [{k: v for k, v in w.items()} for w in workers],
        "torch_rng": torch.get_rng_state(),
    }


def meta_train(
    config: MetaTrainConfig, out_dir: str | os.PathLike, *, resume: bool = True, progress: bool = False
) -> dict:
    """Meta-train the rule of ``config``; writes ``out_dir/checkpoint.pt`` and ``out_dir/meta_log.csv``.

    Resumes from ``out_dir/checkpoint.pt`` when it exists and ``resume`` is true (exactly: same
    rule, meta-optimiser, worker pool and RNG). Returns a summary dict.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    log_path = out_dir / "meta_log.csv"
    rule = build_rule(config)
    rule.train()
    meta_opt = torch.optim.Adam(rule.parameters(), lr=config.meta_lr)
    start = 0
    task_counter = 0

    def next_seed() -> int:
        nonlocal task_counter
        task_counter += 1
        return config.seed * 1_000_003 + task_counter

    if resume and ckpt_path.is_file():
        ckpt = _load_checked(ckpt_path)
        if ckpt["config"] != dataclasses.asdict(config):
            raise ConfigError(f"{ckpt_path} was written with a different config; use another --out or resume=False")
        rule.load_state_dict(ckpt["rule"])
        meta_opt.load_state_dict(ckpt["meta_optimizer"])
        start = int(ckpt["iteration"])
        task_counter = int(ckpt["task_counter"])
        workers = ckpt["workers"]
        torch.set_rng_state(ckpt["torch_rng"])
    else:
        workers = [_new_worker(config, rule, next_seed()) for _ in range(config.parallel_tasks)]
        with open(log_path, "w", newline="") as fh:
            csv.writer(fh).writerow(["iteration", "meta_loss", "skipped", "seconds"])
    tasks = {w["seed"]: _task_for(config, w["seed"]) for w in workers}

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.meta_iterations, initial=start, desc=f"meta-train ({config.kind})")
    t_start = time.perf_counter()
    history = []
    skipped_total = 0
    for iteration in range(start, config.meta_iterations):
        meta_opt.zero_grad(set_to_none=True)
        losses = []
        skipped = 0
        for i, worker in enumerate(workers):
            task = tasks[worker["seed"]]
            meta_loss, new_worker, _ = unroll(
                rule, task, worker, config.unroll_length, kind=config.kind, loss_eps=config.loss_eps,
                swarm_meta_loss=config.swarm_meta_loss,
            )
            if not torch.isfinite(meta_loss):
                # a diverged trajectory: drop its contribution and restart the worker on a new task
                skipped += 1
                new_worker = _new_worker(config, rule, next_seed())
                tasks[new_worker["seed"]] = _task_for(config, new_worker["seed"])
            else:
                (meta_loss / len(workers)).backward()
                losses.append(float(meta_loss.detach()))
                if new_worker["step"] >= config.horizon:
                    new_worker = _new_worker(config, rule, next_seed())
                    tasks[new_worker["seed"]] = _task_for(config, new_worker["seed"])
            workers[i] = new_worker
        tasks = {w["seed"]: tasks[w["seed"]] for w in workers}
        grads_finite = all(p.grad is None or torch.isfinite(p.grad).all() for p in rule.parameters())
        if losses and grads_finite:
            torch.nn.utils.clip_grad_norm_(rule.parameters(), config.grad_clip)
            meta_opt.step()
        elif not grads_finite:
            skipped += len(workers)
        skipped_total += skipped
        mean_loss = sum(losses) / len(losses) if losses else float("nan")
        history.append(mean_loss)
        done = iteration + 1
        if done % config.log_every == 0 or done == config.meta_iterations:
            with open(log_path, "a", newline="") as fh:
                csv.writer(fh).writerow([done, f"{mean_loss:.6g}", skipped, f"{time.perf_counter() - t_start:.2f}"])
        if done % config.checkpoint_every == 0 or done == config.meta_iterations:
            save_atomic(_checkpoint(config, rule, meta_opt, workers, done, task_counter), ckpt_path)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(meta_loss=f"{mean_loss:.3f}")
    if bar is not None:
        bar.close()
    finite = [h for h in history if math.isfinite(h)]
    return {
        "iterations": config.meta_iterations,
        "resumed_from": start,
        "final_meta_loss": finite[-1] if finite else float("nan"),
        "first_meta_loss": finite[0] if finite else float("nan"),
        "skipped": skipped_total,
        "seconds": time.perf_counter() - t_start,
        "checkpoint": str(ckpt_path),
    }
