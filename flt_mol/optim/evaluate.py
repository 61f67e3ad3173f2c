"""Evaluate learned optimisers against Adam (tuned learning rate) on held-out tasks.

- Held-out Rastrigin functions (:class:`~flt_mol.optim.tasks.RastriginTask`, seeds disjoint from
  meta-training) in several dimensions: loss curves of every coordinate-wise checkpoint and of Adam.
- Training a small MLP on scikit-learn's digits (the offline image default): training-loss curves
  and test accuracy.
- Swarm checkpoints: best-member loss of the population on held-out Rastrigin functions of their
  dimension, against K independent Adam runs (best member) from the same starting points.

Adam's learning rate is picked from a grid on a separate set of tuning functions (never on the
held-out ones), by the mean final log-loss. Plots are written with matplotlib's Agg backend.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from flt_mol.optim.learned import LearnedOptimizer, LearnedUpdateRule
from flt_mol.optim.swarm import SwarmUpdateRule
from flt_mol.optim.tasks import DigitsMLPTask, RastriginTask, Task

__all__ = [
    "run_learned",
    "run_adam",
    "run_swarm",
    "run_adam_population",
    "tune_adam_lr",
    "evaluate",
    "HELDOUT_SEED",
    "TUNING_SEED",
]

HELDOUT_SEED = 900_000_000  # held-out functions: seeds HELDOUT_SEED + 1000 d + i
TUNING_SEED = 800_000_000  # Adam tuning functions: seeds TUNING_SEED + 1000 d + i
DEFAULT_ADAM_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)  # Rastrigin favours lr ~ 1


def _loss_and_grad(task: Task, params: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.enable_grad():
        p = params.detach().requires_grad_(True)
        loss = task.loss(p, step)
        (grad,) = torch.autograd.grad(loss.sum(), p)
    return loss.detach(), grad


@torch.no_grad()
def run_learned(rule: LearnedUpdateRule, task: Task, steps: int) -> list[float]:
    """Optimise ``task`` for ``steps`` steps with the rule; returns the ``steps + 1`` losses."""
    params = task.initial_params()
    state = rule.initial_state(params.numel(), dtype=params.dtype)
    losses = []
    for t in range(steps):
        loss, grad = _loss_and_grad(task, params, t)
        losses.append(float(loss))
        update, state = rule(grad, state)
        params = params + update
    losses.append(float(task.loss(params, steps)))
    return losses


def run_adam(task: Task, lr: float, steps: int) -> list[float]:
    """Adam (torch defaults besides ``lr``) on ``task``; returns the ``steps + 1`` losses."""
    params = task.initial_params().requires_grad_(True)
    opt = torch.optim.Adam([params], lr=lr)
    losses = []
    for t in range(steps):
        opt.zero_grad()
        loss = task.loss(params, t)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
    with torch.no_grad():
        losses.append(float(task.loss(params, steps)))
    return losses


@torch.no_grad()
def run_swarm(rule: SwarmUpdateRule, task: RastriginTask, steps: int, *, seed: int) -> list[float]:
    """Population run; returns the best member's loss at each of the ``steps + 1`` steps."""
    x = rule.initial_positions(torch.Generator().manual_seed(seed))
    state = rule.initial_state(dtype=x.dtype)
    best = []
    for t in range(steps):
        losses, grad = _loss_and_grad(task, x, t)
        best.append(float(losses.min()))
        update, state = rule(x, losses, grad, state)
        x = x + update
    best.append(float(task.loss(x, steps).min()))
    return best


def run_adam_population(
    task: RastriginTask, lr: float, steps: int, *, population: int, init_radius: float, seed: int
) -> list[float]:
    """K independent Adam runs from the swarm's starting points; best member's loss per step."""
    gen = torch.Generator().manual_seed(seed)
    x = ((torch.rand(population, task.dim, generator=gen) * 2.0 - 1.0) * init_radius).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    best = []
    for t in range(steps):
        opt.zero_grad()
        losses = task.loss(x, t)  # [K]
        best.append(float(losses.detach().min()))
        losses.sum().backward()
        opt.step()
    with torch.no_grad():
        best.append(float(task.loss(x, steps).min()))
    return best


def _final_logs(curves: list[list[float]]) -> list[float]:
    """log10 of each curve's final loss (floored at 1e-12), one per function."""
    return [math.log10(max(c[-1], 1e-12)) for c in curves]


def _final_log(curves: list[list[float]]) -> float:
    logs = _final_logs(curves)
    return sum(logs) / len(logs)


def tune_adam_lr(run, lrs) -> tuple[float, dict[float, float]]:
    """Pick the lr minimising the mean final log10-loss; ``run(lr) -> list of curves``."""
    scores = {}
    for lr in lrs:
        curves = run(lr)
        score = _final_log(curves)
        scores[lr] = score if math.isfinite(score) else float("inf")
    best = min(scores, key=scores.get)
    return best, scores


def _summary(curves: list[list[float]]) -> dict:
    finals = torch.tensor([c[-1] for c in curves])
    logs = _final_logs(curves)
    # standard error of the mean final log10-loss over the functions (0 for a single function)
    sem = float(torch.tensor(logs).std() / len(logs) ** 0.5) if len(logs) > 1 else 0.0
    return {
        "final_log10_losses": logs,  # one per function, in order: paired comparisons across methods
        "final_log10_loss_sem": sem,
        "final_loss_mean": float(finals.mean()),
        "final_loss_median": float(finals.median()),
        "final_log10_loss_mean": sum(logs) / len(logs),
        "min_loss_mean": float(torch.tensor([min(c) for c in curves]).mean()),
        "curve_log10_mean": [
            sum(math.log10(max(c[t], 1e-12)) for c in curves) / len(curves) for t in range(len(curves[0]))
        ],
    }


def _plot(curves_by_method: dict[str, list[float]], path: Path, *, title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for label, curve in curves_by_method.items():
        ax.plot(range(len(curve)), curve, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_json_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def evaluate(
    checkpoints: dict[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    dims: tuple[int, ...] = (2, 5, 10),
    num_functions: int = 8,
    tune_functions: int = 4,
    steps: int = 200,
    digits_steps: int = 300,
    adam_lrs: tuple[float, ...] = DEFAULT_ADAM_LRS,
    progress: bool = False,
) -> dict:
    """Run the comparison; writes ``out_dir/results.json`` and PNG plots; returns the results.

    Args:
        checkpoints: label -> meta-training checkpoint (coordinate-wise or swarm).
        dims: Rastrigin dimensions for the coordinate-wise optimisers (swarms use their own).
        num_functions: held-out functions per dimension.  tune_functions: Adam tuning functions.
        steps: optimisation steps on Rastrigin.  digits_steps: steps on digits (0 skips it).
        adam_lrs: Adam's learning-rate grid.
    """
    from flt_mol.optim.meta import load_rule

    if not checkpoints:
        raise ValueError("evaluate: give at least one checkpoint (label=path)")
    if num_functions < 1 or tune_functions < 1 or steps < 1 or digits_steps < 0:
        raise ValueError(
            "evaluate: need num_functions, tune_functions, steps >= 1 and digits_steps >= 0, got "
            f"{num_functions}, {tune_functions}, {steps}, {digits_steps}"
        )
    if not adam_lrs or any(lr <= 0 for lr in adam_lrs):
        raise ValueError(f"evaluate: adam_lrs must be positive, got {adam_lrs}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rules = {label: load_rule(path) for label, path in checkpoints.items()}
    coordinate = {k: r for k, (r, c) in rules.items() if c.kind == "coordinate"}
    swarms = {k: (r, c) for k, (r, c) in rules.items() if c.kind == "swarm"}
    # fail before the long Rastrigin runs if the digits data cannot be loaded
    digits_task = DigitsMLPTask(seed=0) if digits_steps > 0 and coordinate else None
    results: dict = {"rastrigin": {}, "digits": {}, "swarm": {}, "settings": {
        "dims": list(dims), "num_functions": num_functions, "tune_functions": tune_functions, "steps": steps,
        "digits_steps": digits_steps, "adam_lrs": list(adam_lrs), "checkpoints": {k: str(v) for k, v in checkpoints.items()},
    }}
    say = print if progress else (lambda *a, **k: None)

    if coordinate:
        for d in dims:
            heldout = [RastriginTask(d, seed=HELDOUT_SEED + 1000 * d + i) for i in range(num_functions)]
            tuning = [RastriginTask(d, seed=TUNING_SEED + 1000 * d + i) for i in range(tune_functions)]
            lr, scores = tune_adam_lr(lambda lr: [run_adam(t, lr, steps) for t in tuning], adam_lrs)
            entry = {"adam_lr": lr, "adam_tuning_scores": {str(k): v for k, v in scores.items()}, "methods": {}}
            entry["methods"][f"adam (lr={lr:g})"] = _summary([run_adam(t, lr, steps) for t in heldout])
            for label, rule in coordinate.items():
                entry["methods"][label] = _summary([run_learned(rule, t, steps) for t in heldout])
            results["rastrigin"][str(d)] = entry
            say(f"rastrigin d={d}: " + ", ".join(
                f"{m}={v['final_log10_loss_mean']:.3f}" for m, v in entry["methods"].items()))
            _plot({m: v["curve_log10_mean"] for m, v in entry["methods"].items()},
                  out_dir / f"rastrigin_d{d}.png", title=f"held-out Rastrigin, d={d} ({num_functions} functions)",
                  ylabel="mean log10 loss")

        if digits_task is not None:
            task = digits_task
            tune_steps = digits_steps
            scores = {}
            for lr in adam_lrs:
                curve = run_adam(task, lr, tune_steps)
                # tune on the mean training loss of the last 10% of steps (minibatch noise)
                tail = curve[-max(1, tune_steps // 10):]
                scores[lr] = sum(tail) / len(tail) if all(math.isfinite(x) for x in tail) else float("inf")
            lr = min(scores, key=scores.get)
            entry = {"adam_lr": lr, "adam_tuning_scores": {str(k): v for k, v in scores.items()}, "methods": {}}
            curves = {}
            runs = {f"adam (lr={lr:g})": lambda: _digits_adam(task, lr, digits_steps)}
            for label, rule in coordinate.items():
                runs[label] = (lambda r=rule: _digits_learned(task, r, digits_steps))
            for label, fn in runs.items():
                curve, metrics = fn()
                tail = curve[-max(1, digits_steps // 10):]
                entry["methods"][label] = {"final_train_loss": sum(tail) / len(tail), **metrics}
                curves[label] = _smooth(curve)
            results["digits"] = entry
            say("digits: " + ", ".join(f"{m}: loss {v['final_train_loss']:.3f} acc {v['test_accuracy']:.3f}"
                                       for m, v in entry["methods"].items()))
            _plot(curves, out_dir / "digits.png", title="digits MLP 64-32-10 (training loss, smoothed)",
                  ylabel="cross-entropy")

    by_dim: dict[int, dict] = {}
    for label, (rule, config) in swarms.items():
        by_dim.setdefault(config.swarm.dim, {})[label] = (rule, config)
    for d, group in by_dim.items():
        first = next(iter(group.values()))[1].swarm
        k, radius = first.population, first.init_radius
        heldout = [(RastriginTask(d, seed=HELDOUT_SEED + 1000 * d + i), HELDOUT_SEED + i) for i in range(num_functions)]
        tuning = [(RastriginTask(d, seed=TUNING_SEED + 1000 * d + i), TUNING_SEED + i) for i in range(tune_functions)]
        lr, scores = tune_adam_lr(
            lambda lr: [run_adam_population(t, lr, steps, population=k, init_radius=radius, seed=s) for t, s in tuning],
            adam_lrs,
        )
        entry = {"population": k, "adam_lr": lr, "adam_tuning_scores": {str(a): b for a, b in scores.items()},
                 "methods": {}}
        entry["methods"][f"adam x{k} (lr={lr:g})"] = _summary(
            [run_adam_population(t, lr, steps, population=k, init_radius=radius, seed=s) for t, s in heldout])
        for label, (rule, config) in group.items():
            if config.swarm.population != k or config.swarm.init_radius != radius:
                raise ValueError(f"swarm checkpoints of dim {d} must share population and init_radius ({label})")
            entry["methods"][label] = _summary([run_swarm(rule, t, steps, seed=s) for t, s in heldout])
        results["swarm"][str(d)] = entry
        say(f"swarm d={d}: " + ", ".join(f"{m}={v['final_log10_loss_mean']:.3f}" for m, v in entry["methods"].items()))
        _plot({m: v["curve_log10_mean"] for m, v in entry["methods"].items()}, out_dir / f"swarm_d{d}.png",
              title=f"population K={k}, held-out Rastrigin d={d}", ylabel="mean log10 best-member loss")

    _write_json_atomic(results, out_dir / "results.json")
    return results


def _smooth(curve: list[float], width: int = 10) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(curve):
        acc += x
        if i >= width:
            acc -= curve[i - width]
        out.append(acc / min(i + 1, width))
    return out


def _digits_adam(task: DigitsMLPTask, lr: float, steps: int):
    params = task.initial_params().requires_grad_(True)
    opt = torch.optim.Adam([params], lr=lr)
    return _digits_loop(task, params, opt, steps)


def _digits_learned(task: DigitsMLPTask, rule: LearnedUpdateRule, steps: int):
    params = task.initial_params().requires_grad_(True)
    opt = LearnedOptimizer([params], rule)  # exercises the torch.optim wrapper end to end
    return _digits_loop(task, params, opt, steps)


def _digits_loop(task, params, opt, steps):
    curve = []
    for t in range(steps):
        opt.zero_grad()
        loss = task.loss(params, t)
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    return curve, task.test_metrics(params.detach())
