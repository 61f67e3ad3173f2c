"""``flt-mol bench train-step``: where the time of one IS2RE training step goes.

One training step of a recipe's model (default ``recipes/emt_is2re_flt.yaml``) on fixed collated
batches of its training split, timed phase by phase:

* ``forward_s`` (model + loss), ``backward_s``, ``optimizer_s`` (grad clip + optimiser +
  scheduler), ``step_s`` (their sum), ``collate_s`` (one batch), each the median over the timed
  steps with the spread (min / max);
* ``tokens_per_s``: real tokens (atoms plus image tokens, not padding) per second of ``step_s``;
* ``flops``: the FLOPs of one step (forward + backward) counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (matrix products only: element-wise work is not
  counted, so the bound is optimistic), the machine's measured fp32 FLOP rate (the best of a few
  single-threaded ``512 x 512`` matmuls) and ``bound_ratio = step_s / (flops / rate)``;
* ``top_ops``: the operators with the most self CPU time in ``torch.profiler`` over a few steps.

``--compare ROOT [ROOT ...]`` times other checkouts of flt_mol (e.g. a ``git worktree`` of an older
commit) beside this one, **alternating** the code bases step-block by step-block in fresh
processes (one process per code base, driven round by round), so machine load falls on all of
them alike. Each process runs this file as a script with ``PYTHONPATH=ROOT``; only API that older
commits also have is used (``load_config``, ``build_task``, ``build_optimizer``).

Timings on a shared machine are noisy: read the medians and the spread, run with one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["add_arguments", "run", "measure_flop_rate"]

DEFAULT_RECIPE = "recipes/emt_is2re_flt.yaml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", type=Path, default=None, help=f"training recipe (default {DEFAULT_RECIPE})")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per code base")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, caches)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="with --compare: the timed steps are split into this many alternating blocks")
    parser.add_argument("--profile-steps", type=int, default=5, help="steps under torch.profiler (0: none)")
    parser.add_argument("--top", type=int, default=15, help="operators listed from the profile")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--compare", nargs="*", type=Path, default=[], metavar="ROOT",
                        help="other flt_mol checkouts to time beside this one (alternating)")
    parser.add_argument("--compare-overrides", nargs="*", default=None, metavar="key=value",
                        help="overrides for the --compare checkouts (default: the same as for this one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, e.g. run.compile=true")


# --------------------------------------------------------------------------------------------
# The worker: one code base, driven over stdin/stdout (runs under any flt_mol on PYTHONPATH)
# --------------------------------------------------------------------------------------------


def measure_flop_rate(size: int = 512, repeats: int = 20) -> float:
    """Best fp32 FLOP/s of a ``size x size`` matmul on this process's threads."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best


class _FlopCount:
    """FLOPs of the matrix products run inside the block, by ``torch.utils.flop_counter``'s formulas.

    A dispatch mode without ``FlopCounterMode``'s module tracking: its module hooks refuse a
    forward that calls ``torch.autograd.grad`` itself (conservative forces, ``task: s2ef``).
    """

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    counter.total += int(formula(*args, **kwargs, out_val=out))
                return out

        self.total = 0
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


class _Stepper:
    """Everything one training step needs, built once: task, model, optimiser, fixed batches."""

    def __init__(self, recipe: Path, overrides: list[str], num_batches: int = 8):
        import torch

        from flt_mol.train.config import load_config
        from flt_mol.train.loop import build_optimizer, build_scheduler, seed_everything
        from flt_mol.train.tasks import build_task

        self.torch = torch
        config = load_config(recipe, list(overrides))
        self.config = config
        seed_everything(config.run.seed)
        task = build_task(config)
        task.setup()
        task.begin_training(config.run.steps or 1000)
        self.task = task
        seed_everything(config.run.seed)
        model = task.build_model()
        self.optimizer = build_optimizer(model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, config.run.steps or 1000)
        self.model = model
        # The training loop's step function when this code base has one (compiled or not).
        ds = task.train_dataset()
        collate = task.collate_fn()
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(ds), generator=g).tolist()
        bs = task.batch_size
        num_batches = max(1, min(num_batches, len(ds) // bs))
        self.items = [[ds[i] for i in perm[k * bs:(k + 1) * bs]] for k in range(num_batches)]
        self.collate = collate
        self.batches = [collate(items) for items in self.items]
        self.step_no = 0
        model.train()

    def tokens(self, batch) -> int:
        return int((~batch.padding_mask).sum())

    def one(self) -> dict[str, float]:
        torch = self.torch
        batch = self.batches[self.step_no % len(self.batches)]
        self.step_no += 1
        t0 = time.perf_counter()
        loss, _ = self.task.loss(self.model, batch, self.step_no)
        t1 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        if self.config.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.grad_clip, foreach=True)
        self.optimizer.step()
        self.scheduler.step()
        t3 = time.perf_counter()
        return {"forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2, "step_s": t3 - t0,
                "tokens": self.tokens(batch)}

    def collate_time(self) -> float:
        t0 = time.perf_counter()
        self.collate(self.items[self.step_no % len(self.items)])
        return time.perf_counter() - t0

    def flops(self) -> int:
        batch = self.batches[0]
        with _FlopCount() as counter:
            loss, _ = self.task.loss(self.model, batch, 1)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return counter.total

    def profile(self, steps: int, top: int) -> list[dict]:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                self.one()
        rows = []
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) or 1.0
        for e in events[:top]:
            rows.append({"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                         "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps})
        return rows


def _worker(argv: list[str]) -> int:
    """Protocol: one JSON command per stdin line, one JSON answer per stdout line."""
    import torch

    spec = json.loads(argv[0])
    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    stepper = _Stepper(Path(spec["recipe"]), spec["overrides"])
    build_s = time.perf_counter() - t0
    out = sys.stdout
    sys.stdout = sys.stderr  # anything the code base prints goes to stderr
    out.write(json.dumps({"ready": True, "build_s": build_s}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "steps":
            t0 = time.perf_counter()
            rows = [stepper.one() for _ in range(cmd["n"])]
            answer = {"rows": rows, "wall_s": time.perf_counter() - t0}
        elif cmd["op"] == "collate":
            answer = {"collate_s": [stepper.collate_time() for _ in range(cmd["n"])]}
        elif cmd["op"] == "flops":
            answer = {"flops": stepper.flops(), "flop_rate": measure_flop_rate()}
        elif cmd["op"] == "profile":
            answer = {"top_ops": stepper.profile(cmd["n"], cmd["top"])}
        elif cmd["op"] == "quit":
            break
        else:
            answer = {"error": f"unknown op {cmd['op']!r}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


class _Proc:
    def __init__(self, root: Path, recipe: Path, overrides: list[str], threads: int):
        env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        spec = json.dumps({"recipe": str(recipe), "overrides": overrides, "threads": threads})
        self.root = root
        self.p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", spec], cwd=root,
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the benchmark worker for {self.root} exited (see its stderr above)")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.p.stdin.write(json.dumps(cmd) + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.p.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.p.stdin.flush()
        except BrokenPipeError:
            pass
        self.p.wait(timeout=60)


def _summary(rows: list[dict]) -> dict:
    out = {}
    for key in ("forward_s", "backward_s", "optimizer_s", "step_s"):
        vals = [r[key] for r in rows]
        out[key] = statistics.median(vals)
        out[key + "_min"] = min(vals)
        out[key + "_max"] = max(vals)
    tokens = sum(r["tokens"] for r in rows)
    out["tokens_per_step"] = tokens / len(rows)
    out["tokens_per_s"] = tokens / sum(r["step_s"] for r in rows)
    out["steps"] = len(rows)
    return out


def run(args: argparse.Namespace) -> int:
    here = Path(__file__).resolve().parents[2]
    recipe = (args.recipe if args.recipe is not None else here / DEFAULT_RECIPE).resolve()
    roots = [here] + [Path(r).resolve() for r in args.compare]
    overrides = list(args.overrides)
    other = overrides if args.compare_overrides is None else list(args.compare_overrides)
    procs = []
    for i, root in enumerate(roots):
        # An older checkout reads its own copy of the recipe (its keys may differ).
        r = recipe if i == 0 else root / recipe.relative_to(here) if recipe.is_relative_to(here) else recipe
        procs.append(_Proc(root, r, overrides if i == 0 else other, args.threads))
    try:
        for p in procs:
            p.ask(op="steps", n=args.warmup)
        rows: list[list[dict]] = [[] for _ in procs]
        per_round = max(1, args.steps // max(1, args.rounds if len(procs) > 1 else 1))
        done = 0
        rnd = 0
        while done < args.steps:
            n = min(per_round, args.steps - done)
            order = procs if rnd % 2 == 0 else procs[::-1]
            for p in order:
                rows[procs.index(p)].extend(p.ask(op="steps", n=n)["rows"])
            done += n
            rnd += 1
        results = []
        for p, r in zip(procs, rows):
            res = {"root": str(p.root), "build_s": p.ready["build_s"], **_summary(r)}
            res["collate_s"] = statistics.median(p.ask(op="collate", n=10)["collate_s"])
            fl = p.ask(op="flops")
            res["flops"] = fl["flops"]
            res["flop_rate"] = fl["flop_rate"]
            res["bound_s"] = fl["flops"] / fl["flop_rate"]
            res["bound_ratio"] = res["step_s"] / res["bound_s"]
            if args.profile_steps > 0:
                res["top_ops"] = p.ask(op="profile", n=args.profile_steps, top=args.top)["top_ops"]
            results.append(res)
    finally:
        for p in procs:
            p.close()
    _print(results)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    return 0


def _print(results: list[dict]) -> None:
    base = results[0]
    for res in results:
        print(f"== {res['root']}")
        print(f"  step {res['step_s'] * 1e3:.1f} ms (median of {res['steps']}, "
              f"{res['step_s_min'] * 1e3:.1f}-{res['step_s_max'] * 1e3:.1f}): forward {res['forward_s'] * 1e3:.1f}, "
              f"backward {res['backward_s'] * 1e3:.1f}, optimizer {res['optimizer_s'] * 1e3:.1f} ms; "
              f"collate {res['collate_s'] * 1e3:.1f} ms/batch")
        print(f"  {res['tokens_per_step']:.0f} tokens/step, {res['tokens_per_s']:.0f} tokens/s; "
              f"{res['flops'] / 1e9:.3f} GFLOP/step (matmuls), machine {res['flop_rate'] / 1e9:.1f} GFLOP/s fp32 "
              f"-> bound {res['bound_s'] * 1e3:.1f} ms, step = {res['bound_ratio']:.1f}x the bound")
        if res is not base:
            print(f"  this step / first step: {res['step_s'] / base['step_s']:.2f}x")
        for op in res.get("top_ops", []):
            print(f"    {op['self_cpu_ms_per_step']:7.2f} ms {100 * op['share']:5.1f}%  "
                  f"{op['calls_per_step']:6.0f} calls  {op['op']}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, os.environ.get("PYTHONPATH", ""))
        raise SystemExit(_worker(sys.argv[2:]))
    raise SystemExit("run as `flt-mol bench train-step`")
