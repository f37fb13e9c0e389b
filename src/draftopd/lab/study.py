"""The scaling study (docs/RESULTS.md section 8): held-out tau of SFT drafters against SFT training tokens.

``scripts/scaling_study.sh`` trains DFlash and EAGLE-3 drafters at several step budgets on the same data and
measures every one on the same held-out prompts in one ``draftopd bench --set tau_only=true`` call; this
module turns that into a table (tau with a 95% bootstrap interval over prompts, the paired gain over the
previous budget of the same kind), a log-x figure, and an extrapolation.

The extrapolation fits a power law to the *excess* acceptance length, ``tau - 1 = c * N**b`` (N: SFT training
tokens), i.e. a straight line in log-log coordinates, by least squares over the budgets of one kind and data
set, and solves it for tau = 3 and tau = 6. The smallest budget is left out of the fit (when there are three or
more): a drafter that has barely trained accepts by chance (tau - 1 of a few thousandths), and on a log scale that
noise would set the slope. It is a trend line, not a law: tau is capped at the draft length
+ 1 (DFlash block_size, EAGLE-3 chain_length + 1), so a fit that keeps rising is optimistic near the cap, and
four points fix a slope only roughly. The table reports the slope so a reader can judge.

Usage: ``python -m draftopd.lab.study OUT`` (the last stage of the script).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
from pathlib import Path

from draftopd import DraftopdError
from draftopd.atomic import write_text

DATASET_NAMES = {"gsm8k": "GSM8K test_dev", "humaneval": "HumanEval", "mtbench": "MT-bench"}


def tau_interval(per_prompt: list, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """tau over prompts (tokens committed / verify steps, pooled) and its 95% bootstrap interval over prompts."""
    if not per_prompt:
        raise DraftopdError("tau_interval: no prompts")

    def tau(idx) -> float:
        return sum(per_prompt[i][0] for i in idx) / max(1, sum(per_prompt[i][1] for i in idx))

    rng, n = random.Random(seed), len(per_prompt)
    boots = sorted(tau([rng.randrange(n) for _ in range(n)]) for _ in range(n_boot))
    return tau(range(n)), boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]


def plateaued(curve: list, last: int = 4, tolerance: float = 0.015) -> bool:
    """The declared plateau rule (issue 35): the last ``last`` held-out evaluations all lie within +-``tolerance``
    (relative) of their mean. ``curve``: tau values, or (step, tau) points, in training order; fewer than ``last``
    evaluations is not a plateau. (The issue's second condition, that a 20% longer run gains < 1%, compares two
    runs: ``extension_gain`` below.)"""
    if last < 2:
        raise DraftopdError(f"plateaued: last must be >= 2 evaluations, not {last}")
    taus = [float(x[1]) if isinstance(x, list | tuple) else float(x) for x in curve]
    if len(taus) < last:
        return False
    tail = taus[-last:]
    mean = sum(tail) / last
    return all(abs(t - mean) <= tolerance * mean for t in tail)


def extension_gain(before: float, after: float) -> float:
    """The relative gain of a run extended past its plateau (tau after / tau before - 1): the rule wants < 1%."""
    return after / before - 1


def fit_power(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares fit of log(tau - 1) = log(c) + b * log(N) over (N, tau) points; returns (c, b)."""
    pts = [(math.log(n), math.log(t - 1)) for n, t in points if n > 0 and t > 1]
    if len(pts) < 2:
        raise DraftopdError(f"fit_power: need 2 points with tokens > 0 and tau > 1, got {len(pts)}")
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        raise DraftopdError("fit_power: all points have the same number of tokens")
    b = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return math.exp(my - b * mx), b


def tokens_for(tau: float, c: float, b: float) -> float:
    """The N at which the fitted ``1 + c * N**b`` reaches ``tau`` (inf when the fit does not rise)."""
    if b <= 0:
        return math.inf
    return ((tau - 1) / c) ** (1 / b)


def _method_key(name: str) -> tuple[str, int]:
    kind, _, steps = name.rpartition(" ")
    return kind, int(steps)


def collect(out: Path) -> dict:
    """Per kind, per budget: steps, SFT training tokens (from the run's metrics) and per data set the per-prompt
    counts, from ``out/tau.json`` and ``out/<kind>-<steps>/metrics.jsonl``."""
    path = out / "tau.json"
    if not path.exists():
        raise DraftopdError(f"{path}: missing (run scripts/scaling_study.sh first)")
    result = json.loads(path.read_text())
    kinds: dict[str, list[dict]] = {}
    for ds, r in result["datasets"].items():
        for name, m in r["methods"].items():
            kind, steps = _method_key(name)
            rows = kinds.setdefault(kind, [])
            row = next((x for x in rows if x["steps"] == steps), None)
            if row is None:
                run = out / f"{kind}-{steps}"
                metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
                tokens = max((x.get("target_tokens", 0) for x in metrics), default=0)
                row = {"steps": steps, "tokens": tokens, "run": str(run), "per_prompt": {}}
                rows.append(row)
            row["per_prompt"][ds] = m["per_prompt"]
    for rows in kinds.values():
        rows.sort(key=lambda x: x["steps"])
    return {"kinds": kinds, "bench": {k: result.get(k) for k in ("dtype", "threads", "commit", "cpu_flags")}}


def scaling_report(out: str | Path) -> Path:
    """``out/SCALING.md`` (table, fits, extrapolation) and ``out/scaling.png`` from a finished study."""
    from draftopd.bench.run import paired_gain

    out = Path(out)
    data = collect(out)
    lines = [
        "# Scaling study: held-out tau against SFT training tokens",
        "",
        f"dtype {data['bench']['dtype']}, {data['bench']['threads']} threads, commit {data['bench']['commit']}, "
        f"CPU flags: {data['bench']['cpu_flags']}",
        "",
        "tau [95% bootstrap interval over prompts]; gain: paired over the same prompts, vs the previous budget.",
        "",
    ]
    fits: dict[tuple[str, str], tuple[float, float]] = {}
    curves: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    for kind, rows in data["kinds"].items():
        sets = list(rows[0]["per_prompt"])
        lines += [f"## {kind}", ""]
        lines.append("| steps | SFT tokens | " + " | ".join(DATASET_NAMES.get(d, d) for d in sets) + " |")
        lines.append("|---|---|" + "---|" * len(sets))
        prev = None
        for row in rows:
            cells = []
            for ds in sets:
                t, lo, hi = tau_interval(row["per_prompt"][ds])
                curves.setdefault((kind, ds), []).append((row["tokens"], t, lo, hi))
                cell = f"{t:.3f} [{lo:.2f}, {hi:.2f}]"
                if prev is not None:
                    g, glo, ghi = paired_gain(prev["per_prompt"][ds], row["per_prompt"][ds])
                    cell += f" ({g * 100:+.1f}% [{glo * 100:+.1f}, {ghi * 100:+.1f}])"
                cells.append(cell)
            lines.append(f"| {row['steps']} | {row['tokens']:,} | " + " | ".join(cells) + " |")
            prev = row
        lines.append("")
        for ds in sets:
            pts = [(n, t) for n, t, _, _ in curves[(kind, ds)]]
            with contextlib.suppress(DraftopdError):  # fewer than 2 usable points: no fit, no row
                fits[(kind, ds)] = fit_power(pts[1:] if len(pts) > 2 else pts)
    lines += [
        "## Extrapolation: tau - 1 = c * N^b fitted per kind and data set (all budgets but the smallest)",
        "",
        "| kind | data set | b (slope, log-log) | SFT tokens for tau 3 | SFT tokens for tau 6 |",
        "|---|---|---|---|---|",
    ]
    for (kind, ds), (c, b) in fits.items():
        n3, n6 = tokens_for(3, c, b), tokens_for(6, c, b)
        lines.append(f"| {kind} | {DATASET_NAMES.get(ds, ds)} | {b:.3f} | {_big(n3)} | {_big(n6)} |")
    lines.append("")
    _figure(curves, fits, out / "scaling.png")
    lines.append("![tau vs SFT tokens](scaling.png)")
    return write_text(out / "SCALING.md", "\n".join(lines) + "\n")


def _big(n: float) -> str:
    if not math.isfinite(n):
        return "never (the fit does not rise)"
    return f"{n:.2e}"


def _figure(curves, fits, path: Path) -> None:
    from draftopd.report import _plt, _savefig

    plt = _plt()
    sets = sorted({ds for _, ds in curves}, key=list(DATASET_NAMES).index)
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.4), dpi=100, sharey=True, squeeze=False)
    for ax, ds in zip(axes[0], sets, strict=True):
        for i, kind in enumerate(sorted({k for k, _ in curves})):
            pts = curves.get((kind, ds), [])
            if not pts:
                continue
            color = f"C{i}"
            xs = [p[0] for p in pts]
            ax.errorbar(
                xs,
                [p[1] for p in pts],
                yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                marker="o",
                ms=4,
                capsize=2,
                color=color,
                label=kind,
            )
            if (kind, ds) in fits:
                c, b = fits[(kind, ds)]
                grid = [min(xs) * (100 * max(xs) / min(xs)) ** (j / 40) for j in range(41)]
                ax.plot(grid, [1 + c * g**b for g in grid], ls="--", lw=1, color=color, alpha=0.6)
        ax.set_xscale("log")
        ax.set_ylim(1, 3.2)
        ax.set_xlabel("SFT training tokens")
        ax.set_title(DATASET_NAMES.get(ds, ds), fontsize=9)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("held-out tau (dashed: power-law fit)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _savefig(plt, fig, path)


if __name__ == "__main__":
    sys.stdout.write(f"{scaling_report(sys.argv[1])}\n")
