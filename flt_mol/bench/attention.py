"""Attention speed / memory benchmark (the FLT paper's Fig. 1 setting).

One pre-LN :class:`~flt_mol.models.blocks.TransformerBlock` (hidden 768, 12 heads, FFN 3072) with
the attention under test; FLT and Performer use m = 64 kernel features, FLT r = 16 RPE features.
For every (method, length) a **fresh subprocess** builds the block and random inputs, runs one
warm-up and ``repeats`` timed forward passes under ``torch.inference_mode`` and reports

* ``forward_s``: the best (minimum) wall time of one forward pass over the timed repeats, the
  usual estimator on a shared machine where other load only ever adds time (``median_s`` and
  every ``times_s`` are kept in the row too); ``forward_cpu_s``: the same for the process CPU
  time, which other processes' load does not inflate (with ``--threads 1`` it equals the wall
  time on an idle machine), so the ratio table uses it;
* ``peak_mem_mb``: the growth of the process's high-water resident set size during the forward
  passes, ``ru_maxrss(after) - RSS(before the first forward)`` (Linux ``getrusage``; it counts
  everything the forward allocated at its peak: activations, attention matrices, allocator
  slack; not the model weights, inputs or the torch runtime). ``peak_rss_mb`` is the absolute
  high-water mark.

A fresh process per row keeps one method's allocator high-water mark out of the next row, and
the workers pin glibc's ``MALLOC_MMAP_THRESHOLD_`` at 128 KiB so large freed tensors go back to
the OS at once (with glibc's default dynamic threshold, tensors up to 32 MiB are recycled in the
heap and the RSS peak then reflects fragmentation; measured on the FLT attention alone at
L = 4096: 244 MB with the default, 125 MB pinned, against 125 MB for the Performer). The
exact method's ``O(B H L^2)`` memory is estimated first; above ``--mem-budget-gb`` the row is
written with nulls and a ``reason`` instead of being run. Every worker also caps its address
space at its size after set-up plus the budget, so any method that outgrows it fails with a
null row (reason: out of memory) rather than exhausting the machine. Methods whose import fails (the
sequence baselines, performer-pytorch) also get a null row with the reason.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from flt_mol.errors import UsageError

__all__ = ["add_arguments", "run", "estimate_exact_bytes", "METHODS"]

METHODS = ("flt", "performer", "exact", "loglinear", "cosformer", "performer_pytorch")
RPE_CHOICES = ("gaussian_basis", "local", "gaussian_mixture", "kernel")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                        help="sequence lengths L to time")
    parser.add_argument("--batch", type=int, default=2, help="batch size B")
    parser.add_argument(
        "--methods", nargs="+", default=["flt", "performer", "exact", "performer_pytorch"],
        choices=METHODS, metavar="METHOD", help=f"attention methods to time, among {', '.join(METHODS)}",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed forward passes per row")
    parser.add_argument("--out", type=Path, required=True, help="output JSON (list of rows)")
    parser.add_argument("--plot", type=Path, default=None, help="also draw time and memory vs L (PNG) here")
    parser.add_argument("--embed-dim", type=int, default=768, help="model width D")
    parser.add_argument("--heads", type=int, default=12, help="attention heads H")
    parser.add_argument("--ffn-dim", type=int, default=3072, help="feed-forward width")
    parser.add_argument("--num-kernel-features", type=int, default=64, help="m, FAVOR+ random features")
    parser.add_argument("--num-rpe-features", type=int, default=16, help="r, RPE random features")
    parser.add_argument("--rpe", choices=RPE_CHOICES, default="gaussian_basis", help="RPE family of the FLT layer")
    parser.add_argument("--num-kernels", type=int, default=32, help="T terms of the RPE (paper IS2RE: 32)")
    parser.add_argument("--causal", action="store_true", help="causal (LM) attention instead of bidirectional")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per run")
    parser.add_argument(
        "--mem-budget-gb", type=float, default=8.0,
        help="skip the exact method when its estimated L^2 memory exceeds this",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and random features")


def estimate_exact_bytes(batch: int, heads: int, length: int) -> int:
    """Rough peak of the exact RPE attention (inference): three fp32 ``[B, H, L, L]`` tensors
    (the mask and its temporary, then mask + logits updated in place) plus the ``[B, L, L]``
    distances, with a 1.5x margin for allocator slack."""
    return int(1.5 * 4 * (3 * batch * heads * length * length + 2 * batch * length * length))


# ------------------------------------------------------------------------------------------------
# worker (runs in a fresh process)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _build_rpe(cfg: dict):
    from flt_mol.attention import GaussianBasisRPE, GaussianMixtureRPE, KernelRPE, LocalRPE

    H, T = cfg["heads"], cfg["num_kernels"]
    if cfg["rpe"] == "gaussian_basis":
        return GaussianBasisRPE(H, T, 3), 3
    if cfg["rpe"] == "local":
        return LocalRPE(H, T, 1, lattice=True), 1
    if cfg["rpe"] == "gaussian_mixture":
        return GaussianMixtureRPE(H, T, 1), 1
    return KernelRPE(H, "gaussian", 3), 3


class _PerformerPytorchAdapter:
    """Wraps performer-pytorch's SelfAttention in the ``(x, pos, padding_mask)`` interface."""

    @staticmethod
    def build(cfg: dict):
        import torch
        from performer_pytorch import SelfAttention

        class Adapter(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.attn = SelfAttention(
                    dim=cfg["embed_dim"], heads=cfg["heads"], dim_head=cfg["embed_dim"] // cfg["heads"],
                    nb_features=cfg["num_kernel_features"], causal=cfg["causal"], qkv_bias=True,
                )

            def forward(self, x, pos=None, padding_mask=None):
                mask = None if padding_mask is None else ~padding_mask
                return self.attn(x, mask=mask)

        return Adapter()


def _build_attention(method: str, cfg: dict, length: int):
    from flt_mol.attention import FLTAttention

    D, H = cfg["embed_dim"], cfg["heads"]
    if method in ("flt", "performer", "exact"):
        rpe, _ = _build_rpe(cfg)
        return FLTAttention(
            D, H, rpe=rpe, mode=method, causal=cfg["causal"],
            num_kernel_features=cfg["num_kernel_features"], num_rpe_features=cfg["num_rpe_features"],
        )
    if method == "performer_pytorch":
        return _PerformerPytorchAdapter.build(cfg)
    from flt_mol.attention import baselines

    if method == "cosformer":
        return baselines.CosFormerAttention(D, H, causal=cfg["causal"])
    if method == "loglinear":
        return baselines.LogLinearAttention(D, H, causal=cfg["causal"], max_len=length)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _worker(cfg: dict) -> dict:
    import torch

    from flt_mol.models.blocks import TransformerBlock

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    method, L, B = cfg["method"], cfg["length"], cfg["batch"]
    attn = _build_attention(method, cfg, L)
    block = TransformerBlock(cfg["embed_dim"], attn, cfg["ffn_dim"]).eval()
    _, dim = _build_rpe(cfg)
    x = torch.randn(B, L, cfg["embed_dim"])
    if dim == 1:
        pos = torch.arange(L, dtype=torch.float32)[None, :, None].expand(B, L, 1).contiguous()
    else:
        # Atom-like density: ~0.1 atoms per cubic Angstrom.
        side = (L / 0.1) ** (1.0 / 3.0)
        pos = side * torch.rand(B, L, dim)
    # Cap the address space at (current + budget) so a method that outgrows the budget fails
    # with an allocation error in this worker instead of exhausting the shared machine.
    with open("/proc/self/statm") as fh:
        vsize = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = vsize + int(cfg["mem_budget_gb"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        return _timed(block, x, pos, cfg["repeats"])
    except (MemoryError, RuntimeError) as err:
        # Allocation failures under the cap surface as MemoryError or as RuntimeErrors from the
        # allocator / oneDNN ("can't allocate memory", "could not create a primitive"); the
        # message is kept in the row so anything else is visible too.
        raise _BudgetExceeded(
            f"forward failed under the address-space cap of --mem-budget-gb {cfg['mem_budget_gb']} "
            f"(out of memory?): {type(err).__name__}: {str(err)[:200]}"
        ) from err


class _BudgetExceeded(Exception):
    pass


def _timed(block, x, pos, repeats: int) -> dict:
    """One warm-up and ``repeats`` timed forward passes; wall, CPU and peak-RSS figures."""
    import torch

    times, cpu_times = [], []
    with torch.inference_mode():
        rss0 = _rss_mb()
        block(x, pos)  # warm-up
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            y = block(x, pos)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            del y
    peak = _maxrss_mb()
    return {
        "forward_s": min(times),
        "median_s": statistics.median(times),
        "forward_cpu_s": min(cpu_times),
        "peak_mem_mb": max(peak - rss0, 0.0),
        "peak_rss_mb": peak,
        "times_s": times,
    }


def _worker_main(argv: list[str]) -> int:
    cfg = json.loads(argv[0])
    try:
        result = _worker(cfg)
    except ImportError as err:
        result = {"error": f"import failed: {err}"}
    except _BudgetExceeded as err:
        result = {"error": str(err)}
    print("__RESULT__" + json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------
# driver


def _run_one(cfg: dict) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(cfg["threads"])
    env["MKL_NUM_THREADS"] = str(cfg["threads"])
    # Pin glibc's mmap threshold (128 KiB): by default it rises to 32 MiB after the first large
    # free, after which freed tensors stay in the heap and the RSS high-water mark measures heap
    # fragmentation rather than live memory. Pinned, every large tensor is returned on free.
    env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    proc = subprocess.run(
        [sys.executable, "-m", "flt_mol.bench.attention", json.dumps(cfg)],
        capture_output=True, text=True, env=env,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("__RESULT__"):
            return json.loads(line[len("__RESULT__"):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"worker exited with code {proc.returncode}: {' | '.join(tail)}"}


def _row(method, length, batch, forward_s=None, peak_mem_mb=None, reason=None, **extra) -> dict:
    row = {"method": method, "length": length, "batch": batch, "forward_s": forward_s, "peak_mem_mb": peak_mem_mb}
    if reason is not None:
        row["reason"] = reason
    row.update(extra)
    return row


def _check_methods_importable(methods) -> dict[str, str]:
    """Reasons for methods that cannot be built here (checked once, in the driver)."""
    import importlib

    reasons = {}
    for method in methods:
        if method in ("loglinear", "cosformer"):
            try:
                mod = importlib.import_module("flt_mol.attention.baselines")
                getattr(mod, "CosFormerAttention" if method == "cosformer" else "LogLinearAttention")
            except (ImportError, AttributeError) as err:
                reasons[method] = f"flt_mol.attention.baselines unavailable: {err}"
        elif method == "performer_pytorch":
            try:
                importlib.import_module("performer_pytorch")
            except ImportError as err:
                reasons[method] = f"performer-pytorch not installed: {err}"
    return reasons


def run_rows(args: argparse.Namespace, *, log=print) -> list[dict]:
    """Run every (method, length); return the JSON rows."""
    for name in ("batch", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(L < 1 for L in args.lengths):
        raise UsageError(f"--lengths must be positive, got {args.lengths}")
    if args.embed_dim % args.heads != 0:
        raise UsageError(f"--embed-dim ({args.embed_dim}) must be divisible by --heads ({args.heads})")
    base = {
        "batch": args.batch, "embed_dim": args.embed_dim, "heads": args.heads, "ffn_dim": args.ffn_dim,
        "num_kernel_features": args.num_kernel_features, "num_rpe_features": args.num_rpe_features,
        "rpe": args.rpe, "num_kernels": args.num_kernels, "causal": bool(args.causal),
        "threads": args.threads, "repeats": args.repeats, "seed": args.seed,
        "mem_budget_gb": args.mem_budget_gb,
    }
    unavailable = _check_methods_importable(args.methods)
    rows = []
    budget = args.mem_budget_gb * 2**30
    for L in args.lengths:
        for method in args.methods:
            if method in unavailable:
                rows.append(_row(method, L, args.batch, reason=unavailable[method]))
            elif method == "exact" and estimate_exact_bytes(args.batch, args.heads, L) > budget:
                est = estimate_exact_bytes(args.batch, args.heads, L) / 2**30
                rows.append(_row(method, L, args.batch, reason=(
                    f"estimated {est:.1f} GB for the L^2 attention exceeds --mem-budget-gb {args.mem_budget_gb}")))
            else:
                res = _run_one({**base, "method": method, "length": L})
                if "error" in res:
                    rows.append(_row(method, L, args.batch, reason=res["error"]))
                else:
                    rows.append(_row(
                        method, L, args.batch, res["forward_s"], res["peak_mem_mb"],
                        median_s=res["median_s"], times_s=res["times_s"], forward_cpu_s=res["forward_cpu_s"],
                        peak_rss_mb=res["peak_rss_mb"], threads=args.threads,
                    ))
            r = rows[-1]
            if r["forward_s"] is None:
                log(f"  {method:>17s} L={L:>6d}  skipped: {r['reason']}")
            else:
                log(f"  {method:>17s} L={L:>6d}  {r['forward_s']:8.3f} s  {r['peak_mem_mb']:9.1f} MB")
    return rows


def _lookup(rows, method, length):
    for r in rows:
        if r["method"] == method and r["length"] == length and r["forward_s"] is not None:
            return r
    return None


def ratio_table(rows: list[dict], time_key: str = "forward_s") -> list[str]:
    """Ratios measured side by side in this run ('-' where a row is missing)."""
    lengths = sorted({r["length"] for r in rows})
    lines = [
        f"{'L':>6s} {'flt/perf t':>11s} {'flt/perf mem':>13s} {'exact/flt t':>12s} {'exact/flt mem':>14s} "
        f"{'perf/pp t':>10s} {'flt(2L)/flt(L)':>15s} {'loglin/flt t':>13s} {'loglin/flt mem':>15s}"
    ]

    def ratio(a, b, key):
        return None if a is None or b is None or not b.get(key) or a.get(key) is None else a[key] / b[key]

    def fmt(v, w):
        return f"{'-':>{w}s}" if v is None else f"{v:>{w}.2f}"

    for L in lengths:
        flt, perf, ex, pp, ll = (
            _lookup(rows, m, L) for m in ("flt", "performer", "exact", "performer_pytorch", "loglinear")
        )
        flt2 = _lookup(rows, "flt", 2 * L)
        t = time_key
        lines.append(
            f"{L:>6d} {fmt(ratio(flt, perf, t), 11)} {fmt(ratio(flt, perf, 'peak_mem_mb'), 13)} "
            f"{fmt(ratio(ex, flt, t), 12)} {fmt(ratio(ex, flt, 'peak_mem_mb'), 14)} "
            f"{fmt(ratio(perf, pp, t), 10)} {fmt(ratio(flt2, flt, t), 15)} "
            f"{fmt(ratio(ll, flt, t), 13)} {fmt(ratio(ll, flt, 'peak_mem_mb'), 15)}"
        )
    return lines


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Process CPU time when the rows have it (robust to other load on a shared machine).
    tkey = "forward_cpu_s" if all(r.get("forward_cpu_s") is not None for r in rows if r["forward_s"] is not None) else "forward_s"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["length"], r[tkey], r["peak_mem_mb"]) for r in rows if r["method"] == method and r["forward_s"] is not None]
        if not pts:
            continue
        Ls, ts, ms = zip(*pts)
        axes[0].plot(Ls, ts, "o-", label=method)
        axes[1].plot(Ls, ms, "o-", label=method)
    tlabel = "forward CPU time (s)" if tkey == "forward_cpu_s" else "forward wall time (s)"
    for ax, lab in zip(axes, (tlabel, "peak memory growth (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(lab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    print(
        f"bench attention: pre-LN block D={args.embed_dim} H={args.heads} FFN={args.ffn_dim} "
        f"m={args.num_kernel_features} r={args.num_rpe_features} rpe={args.rpe}(T={args.num_kernels}) "
        f"batch={args.batch} threads={args.threads} causal={bool(args.causal)}"
    )
    rows = run_rows(args)
    _write_json(args.out, rows)
    print("ratios of process CPU time (robust to other load; memory: peak RSS growth):")
    print("\n".join(ratio_table(rows, "forward_cpu_s")))
    print("ratios of wall time:")
    print("\n".join(ratio_table(rows, "forward_s")))
    print("(perf = our FAVOR+ Performer mode, pp = performer-pytorch SelfAttention, same m)")
    print(f"wrote {args.out}")
    if args.plot is not None:
        plot(rows, args.plot, title=f"one pre-LN layer, D={args.embed_dim}, H={args.heads}, B={args.batch}")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
