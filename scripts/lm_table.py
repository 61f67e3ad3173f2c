"""Summarise the LM seed runs of ``scripts/experiments.sh lm`` as the README's table.

Reads ``RUNS/<model>/seed<k>/metrics.json`` (validation perplexity) and ``.../time.txt``
(``/usr/bin/time -f "%e %U %S"``: wall, user and system seconds) and prints one markdown row per
model: mean ± sample standard deviation of the perplexity over the seeds, the per-seed values, and
the mean wall and CPU time per run. Also writes ``RUNS/summary.json``.

    python scripts/lm_table.py runs/lm
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

LABELS = {
    "flt_local": "FLT, local (box) RPE",
    "flt_gm": "FLT, Gaussian-mixture RPE",
    "performer": "Performer (FAVOR+)",
    "loglinear": "log-linear Performer (Toeplitz RPE)",
    "linear": "Linear Transformer (elu+1)",
    "cosformer": "cosFormer",
    "exact": "exact softmax + local RPE (no estimation noise)",
}


def main(root: str) -> None:
    runs = Path(root)
    summary = {}
    print("| LM attention | val perplexity, mean ± std | per seed | wall / CPU per run |")
    print("|---|---|---|---|")
    for name, label in LABELS.items():
        seeds = sorted((runs / name).glob("seed*/metrics.json"))
        if not seeds:
            continue
        ppl = [json.loads(p.read_text())["val"]["perplexity"] for p in seeds]
        times = []
        for p in seeds:
            t = p.parent / "time.txt"
            if t.exists():
                wall, user, system = (float(x) for x in t.read_text().split()[-3:])
                times.append((wall, user + system))
        mean = statistics.fmean(ppl)
        std = statistics.stdev(ppl) if len(ppl) > 1 else math.nan
        wall = statistics.fmean(t[0] for t in times) if times else math.nan
        cpu = statistics.fmean(t[1] for t in times) if times else math.nan
        summary[name] = {"perplexity": ppl, "mean": mean, "std": std, "wall_s": wall, "cpu_s": cpu}
        per_seed = ", ".join(f"{x:.3f}" for x in ppl)
        print(f"| {label} | {mean:.3f} ± {std:.3f} | {per_seed} | {wall:.0f} s / {cpu:.0f} s |")
    (runs / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/lm")
