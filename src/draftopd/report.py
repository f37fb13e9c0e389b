"""Figures that compare runs: tau against training compute, acceptance-length histograms, tokens/s bars.

Each run folder holds ``metrics.jsonl``; rows carrying ``tau`` also carry ``target_tokens``, the tokens the
frozen target processed so far (rollout verifications and replay/feature forwards): the compute axis on
which SFT continuation and OPD are compared.
"""

from __future__ import annotations

import json
from pathlib import Path

from draftopd.atomic import replacing, write_text


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
    _savefig(plt, fig, path)


def tau_curves(runs: dict[str, str | Path], out: str | Path, title: str, x: str = "target_tokens") -> Path:
    """One line per run: tau on the held-out set against ``x`` (target tokens by default)."""
    curves = {
        label: sorted((r.get(x, r["step"]), r["tau"]) for r in _rows(Path(folder)) if "tau" in r)
        for label, folder in runs.items()
    }
    xlabel = "target tokens processed (training compute)" if x == "target_tokens" else x
    return _lines(curves, out, title, xlabel, "acceptance length tau")


def _lines(curves: dict[str, list[tuple[float, float]]], out, title: str, xlabel: str, ylabel: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    for label, pts in curves.items():
        if pts:
            ax.plot(*zip(*sorted(pts), strict=True), marker="o", ms=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return _save(plt, fig, ax, out, title)


def _save(plt, fig, ax, out, title: str) -> Path:
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _savefig(plt, fig, out)
    return Path(out)


def _savefig(plt, fig, out) -> None:
    """Save atomically (a temporary file renamed): a reader never sees half a figure."""
    fmt = Path(out).suffix.lower().removeprefix(".") or "png"
    try:
        with replacing(out) as tmp:
            fig.savefig(tmp, format=fmt)
    finally:
        plt.close(fig)


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
    return _save(plt, fig, ax, out, title)


def bars(result: dict, out: str | Path, title: str, key: str = "tokens_per_s") -> Path:
    """One value per method (bars) and data set (groups) from a bench result: tokens/s, or tau (a tau_only
    result has no timings). Values are written on the bars, so small differences stay readable."""
    plt = _plt()
    sets = list(result["datasets"])
    methods = list(next(iter(result["datasets"].values()))["methods"]) if sets else []
    fig, ax = plt.subplots(figsize=(min(10.0, max(6.4, 2 + 0.6 * len(sets) * len(methods))), 3.6), dpi=100)
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        ys = [result["datasets"][d]["methods"][m][key] for d in sets]
        drawn = ax.bar([j + i * width for j in range(len(sets))], ys, width, label=m)
        ax.bar_label(drawn, fmt="%.2f" if key == "tau" else "%.1f", fontsize=7)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], sets)
    if key == "tau":
        low = min(result["datasets"][d]["methods"][m]["tau"] for d in sets for m in methods)
        ax.set_ylim(max(0.0, low - 0.25), None)  # tau >= 1: start the axis near the data, differences are small
    ax.set_ylabel({"tau": "acceptance length tau", "tokens_per_s": "tokens / s (batch 1)"}.get(key, key))
    return _save(plt, fig, ax, out, title)


def _rows(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def compute_curves(out: Path, path: Path) -> dict[str, list[tuple[int, float]]]:
    """tau vs cumulative target tokens: the SFT run, then OPD and SFT-continued starting where SFT ended."""
    sft = [(r["target_tokens"], r["tau"]) for r in _rows(out / "sft") if "tau" in r]
    start = sft[-1][0] if sft else 0
    curves = {"SFT": sft}
    for label, name in (("Draft-OPD", "opd"), ("SFT continued (matched updates)", "sft_continued")):
        curves[label] = [(start + r["target_tokens"], r["tau"]) for r in _rows(out / name) if "tau" in r]
    xlabel = "target tokens processed (training compute)"
    _lines(curves, path, "acceptance length vs training compute", xlabel, "tau, held-out GSM8K")
    return curves


def _merge_hist(result: dict, method: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in result["datasets"].values():
        for k, v in r["methods"][method]["tau_histogram"].items():
            total[str(k)] = total.get(str(k), 0) + v
    return total


def _step_cost(result: dict, method: str) -> float:
    """Seconds per target call of ``method`` over plain decoding's, all data sets pooled."""

    def per_call(m: str) -> float:
        rows = [r["methods"][m] for r in result["datasets"].values()]
        return sum(r["seconds"] for r in rows) / max(1, sum(r["target_calls"] for r in rows))

    return per_call(method) / per_call("plain")


def _target_name(result: dict) -> str:
    path = result["config"]["target"]["path"]
    return "embedded SmolLM2-135M-Instruct" if path == "default" else f"`{path}`"


def standing(result: dict) -> str:
    """One paragraph: where each learned drafter stands against plain decoding and prompt lookup (wall clock)."""
    parts = []
    for ds, r in result["datasets"].items():
        m = r["methods"]
        pld = m.get("prompt lookup", {}).get("speedup")
        cells = []
        for name in ("SFT", "Draft-OPD", "SFT continued"):
            if name in m:
                vs_pld = f", {m[name]['speedup'] / pld:.2f}x prompt lookup's speed" if pld else ""
                cells.append(f"{name} {m[name]['speedup']:.2f}x plain{vs_pld}")
        parts.append(f"{ds}: " + "; ".join(cells) + (f" (prompt lookup {pld:.2f}x plain)" if pld else ""))
    d = result.get("config", {}).get("drafter", {})
    rule = ""
    if d.get("confidence"):
        rule = (
            f" The learned drafters proposed up to {d.get('chain_length')} tokens a step (EAGLE-3; DFlash: its"
            f" block), each proposal ending at its first token drafted with probability below {d['confidence']}."
        )
    return (
        "**Against plain decoding and prompt lookup** (tokens/s ratios, batch 1, measured side by side): "
        + ". ".join(parts)
        + "."
        + rule
    )


def tau_section(out: Path) -> list[str]:
    """Markdown lines: held-out tau of SFT, SFT continued and Draft-OPD on the tau stage's prompts, with OPD's
    paired gains (95% bootstrap interval over prompts) over its matched control and over the SFT start."""
    from draftopd.bench.run import paired_gain

    path = out / "tau" / "result.json"
    if not path.exists():
        return []
    result = json.loads(path.read_text())
    sets = result["datasets"]
    n = next(iter(sets.values()))["prompts"]
    lines = [
        f"## Draft-OPD against SFT continued with matched updates: held-out tau, {n} prompts per set",
        "",
        f"Batched, greedy, {result['config']['sampling']['max_new_tokens']} new tokens, {result['dtype']}; gains "
        "paired over the same prompts, [95% bootstrap interval over prompts].",
        "",
        "| data set | SFT (start) | SFT continued | Draft-OPD | OPD vs SFT continued | OPD vs SFT |",
        "|---|---|---|---|---|---|",
    ]
    for ds, r in sets.items():
        m = r["methods"]

        def gain(base: str, m=m) -> str:
            g, lo, hi = paired_gain(m[base]["per_prompt"], m["Draft-OPD"]["per_prompt"])
            return f"{100 * g:+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}]"

        taus = " | ".join(f"{m[k]['tau']:.3f}" for k in ("SFT", "SFT continued", "Draft-OPD"))
        lines.append(f"| {ds} | {taus} | {gain('SFT continued')} | {gain('SFT')} |")
    return [*lines, ""]


def write_report(out: Path, stages: dict[str, dict]) -> Path:
    """REPORT.md and figures/ of a demo run, rebuilt from its stage outputs (the same inputs, the same report)."""
    from draftopd.bench.run import format_table, paired_gain

    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    result = json.loads((out / "bench" / "result.json").read_text())
    curves = compute_curves(out, figs / "tau_vs_compute.png")
    histograms(
        {m: _merge_hist(result, m) for m in ("SFT", "Draft-OPD")},
        figs / "acceptance_histogram.png",
        "tokens committed per verification, all held-out sets",
    )
    bars(result, figs / "tokens_per_s.png", f"decoding speed, {result['dtype']}, {result['threads']} threads")
    sets = result["datasets"]
    tau = {d: {m: r["methods"][m]["tau"] for m in r["methods"]} for d, r in sets.items()}
    gains = {d: t["Draft-OPD"] / t["SFT"] - 1 for d, t in tau.items()}
    spans = {  # 95% interval of the gain over the choice of prompts (paired: greedy text is the same)
        d: paired_gain(r["methods"]["SFT"]["per_prompt"], r["methods"]["Draft-OPD"]["per_prompt"])[1:]
        for d, r in sets.items()
        if "per_prompt" in r["methods"]["SFT"]
    }
    above = [d for d, g in gains.items() if g > 0]
    cont = curves["SFT continued (matched updates)"]
    opd = curves["Draft-OPD"]
    step_cost = _step_cost(result, "Draft-OPD")
    lines = [
        "# draftopd demo report",
        "",
        f"Target: {_target_name(result)}, {result['dtype']}, {result['threads']} threads "
        f"(CPU flags: {result.get('cpu_flags', 'not recorded')}), greedy (T=0), "
        f"batch 1, {result['config']['sampling']['max_new_tokens']} new tokens per prompt, "
        f"{next(iter(sets.values()))['prompts']} prompts per data set; commit {result['commit']}.",
        "",
        "```",
        format_table(result),
        "```",
        "",
        f"**What it means.** Draft-OPD's acceptance length tau is above the SFT drafter's on {len(above)} of "
        f"{len(sets)} held-out sets ("
        + ", ".join(
            f"{d} {tau[d]['SFT']:.2f} -> {tau[d]['Draft-OPD']:.2f} ({100 * gains[d]:+.1f}%"
            + (f", 95% over prompts {100 * spans[d][0]:+.1f}% to {100 * spans[d][1]:+.1f}%)" if d in spans else ")")
            for d in sets
        )
        + "). Both drafters start from the same SFT weights; OPD then trained on its own verification "
        "boundaries and rejected proposals"
        + (
            f" (held-out GSM8K tau during training {opd[0][1]:.2f} -> {opd[-1][1]:.2f}), while SFT continued on the "
            f"same prompts for the same number of updates went {cont[0][1]:.2f} -> {cont[-1][1]:.2f}."
            if opd and cont
            else "."
        )
        + (
            f" These are the benchmark's tau with proposals gated at drafter.confidence"
            f" {result['config']['drafter']['confidence']} (the gate treats the drafters differently); the"
            " shipped recipes' tau stage (below) measures them ungated."
            if result["config"].get("drafter", {}).get("confidence")
            else ""
        ),
        "",
        standing(result),
        "",
        *tau_section(out),
        "**In tokens per second.** Every output above is the target's own greedy text (the `lossless` column "
        "compares each drafter's tokens with plain decoding's). A drafter pays off only when tau exceeds the cost "
        f"of one of its steps (draft + verify) in plain decoding steps: measured here {step_cost:.2f} for the "
        "learned drafters, so that is the tau where they break even. The speed-up column is the wall-clock ratio "
        "against plain decoding, measured in the same process, prompt by prompt.",
        "",
        "![tau vs compute](figures/tau_vs_compute.png)",
        "![acceptance histogram](figures/acceptance_histogram.png)",
        "![tokens per second](figures/tokens_per_s.png)",
        "",
        "## Stages",
        "",
        "| stage | time | command |",
        "|---|---|---|",
        *(f"| {n} | {s['seconds'] / 60:.1f} min | `{s['command']}` |" for n, s in stages.items()),
        "",
        f"Total {sum(s['seconds'] for s in stages.values()) / 60:.1f} min of stage time. Configs: `configs/` in "
        "this folder; logs: `logs/`.",
    ]
    return write_text(out / "REPORT.md", "\n".join(lines) + "\n")
