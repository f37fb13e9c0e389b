"""Figures that compare runs: tau against training compute, acceptance-length histograms, tokens/s bars.

Each run folder holds ``metrics.jsonl``; rows carrying ``tau`` also carry ``target_tokens``, the tokens the
frozen target processed so far (rollout verifications and replay/feature forwards): the compute axis on
which SFT continuation and OPD are compared.
"""

from __future__ import annotations

import json
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tau(rows: list[dict], path: Path, title: str, x: str = "step") -> None:
    """tau vs step (or any x) from metrics rows that carry a 'tau' value."""
    plt = _plt()
    pts = [(r[x], r["tau"]) for r in rows if "tau" in r]
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(*zip(*pts, strict=True), marker="o", ms=3)
    ax.set_xlabel(x)
    ax.set_ylabel("acceptance length tau")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tau_curves(runs: dict[str, str | Path], out: str | Path, title: str, x: str = "target_tokens") -> Path:
    """One line per run: tau on the held-out set against ``x`` (target tokens by default)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for label, folder in runs.items():
        path = Path(folder) / "metrics.jsonl"
        if not path.exists():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        pts = sorted((r.get(x, r["step"]), r["tau"]) for r in rows if "tau" in r)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=label)
    ax.set_xlabel("target tokens processed (training compute)" if x == "target_tokens" else x)
    ax.set_ylabel("acceptance length tau")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)


def histograms(hists: dict[str, dict], out: str | Path, title: str) -> Path:
    """Acceptance-length histograms (tokens committed per verify step), one bar group per method."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    names = list(hists)
    width = 0.8 / max(1, len(names))
    top = max((int(k) for h in hists.values() for k in h), default=1)
    for i, name in enumerate(names):
        total = sum(hists[name].values()) or 1
        xs = list(range(1, top + 1))
        ax.bar(
            [x + i * width for x in xs],
            [hists[name].get(str(x), hists[name].get(x, 0)) / total for x in xs],
            width,
            label=name,
        )
    ax.set_xlabel("tokens committed per verification")
    ax.set_ylabel("fraction of verify steps")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return Path(out)
