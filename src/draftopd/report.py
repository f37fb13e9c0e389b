"""Figures and tables that compare runs: tau against training steps and compute, acceptance-length histograms,
tokens/s bars, and the demo's ``REPORT.md`` (numbers, tables, figures; README.md says how to read them).

Each run folder holds ``metrics.jsonl`` (training writes metrics only; every figure is drawn here, from them);
rows carrying ``tau`` also carry ``target_tokens``, the tokens the frozen target processed so far (rollout
verifications and replay/feature forwards): the compute axis on which SFT continuation and OPD are compared.

``python -m draftopd.report OUT.png RUN [RUN ...]`` draws held-out tau against the optimizer step of each run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from draftopd.atomic import replacing, write_text
from draftopd.metrics import read_metrics


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tau_curves(
    runs: dict[str, str | Path],
    out: str | Path,
    title: str,
    x: str = "target_tokens",
    after: dict[str, str] | None = None,
    xlabel: str | None = None,
) -> Path:
    """One line per run: tau on the held-out set against ``x`` (target tokens by default). ``after``: runs that
    continue another (label -> the label of the run they start from): drawn from where that run's line ends."""
    curves = {
        label: sorted((r.get(x, r["step"]), r["tau"]) for r in _rows(Path(folder)) if "tau" in r)
        for label, folder in runs.items()
    }
    for label, base in (after or {}).items():
        start = curves[base][-1][0] if curves.get(base) else 0
        curves[label] = [(start + v, tau) for v, tau in curves.get(label, [])]
    xlabel = xlabel or ("target tokens processed (training compute)" if x == "target_tokens" else x)
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
    """A run's metrics rows (``metrics.read_metrics``: a torn last line, from a run killed mid-append, is left out)."""
    return read_metrics(folder / "metrics.jsonl")


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


# the demo's drafters: bench method label -> training stage folder
LEARNED = {"SFT": "sft", "Draft-OPD": "opd", "SFT continued": "sft_continued"}
TREE = " tree"  # "SFT tree", "Draft-OPD tree": the same drafter decoding draft trees (bench.drafter's tree settings)


def learned_setting(cfg: dict) -> dict:
    """How the demo's trained drafters decoded in a bench (chain_length, confidence): its SFT method's settings (the
    demo gives the three the same), or, in a result written while methods were name=folder strings, ``drafter``."""
    methods = cfg.get("methods")
    if isinstance(methods, dict) and "SFT" in methods:
        return methods["SFT"]
    return cfg.get("drafter") or {}


def tree_rows(cfg: dict) -> list[str]:
    """Markdown rows naming the tree setting of a bench's tree methods ("SFT tree", "Draft-OPD tree"), if any: one
    row each, since ``tree_budget: auto`` resolves per drafter (the result's config has the budget that ran)."""
    methods = cfg.get("methods")
    if not isinstance(methods, dict):
        return []
    rows = []
    for name in ("SFT" + TREE, "Draft-OPD" + TREE):
        tree = methods.get(name)
        if not tree:
            continue
        setting = f"tree_budget {tree.get('tree_budget', 0)}, tree_topk {tree.get('tree_topk', '-')}"
        lookup = ", prompt lookup branch" if tree.get("lookup") else ""
        if tree.get("lookup_switch"):
            lookup += " (switched: lookup alone on rounds where it measured faster)"
        rows.append(f"| `{name}` decodes draft trees | {setting}{lookup} |")
    return rows


def gain_table(result: dict) -> list[str]:
    """Markdown lines: per data set, SFT's and Draft-OPD's benchmark tau, OPD's gain and its 95% interval over
    prompts (paired: greedy text is the same, so prompts pair)."""
    from draftopd.bench.run import paired_gain

    lines = ["| data set | SFT | Draft-OPD | OPD vs SFT | 95% interval |", "|---|---|---|---|---|"]
    for ds, r in result["datasets"].items():
        sft, opd = r["methods"]["SFT"], r["methods"]["Draft-OPD"]
        span = "-"
        if "per_prompt" in sft and "per_prompt" in opd:
            _, lo, hi = paired_gain(sft["per_prompt"], opd["per_prompt"])
            span = f"[{100 * lo:+.1f}, {100 * hi:+.1f}]"
        lines.append(
            f"| {ds} | {sft['tau']:.3f} | {opd['tau']:.3f} | {100 * (opd['tau'] / sft['tau'] - 1):+.1f}% | {span} |"
        )
    return lines


def speedup_table(result: dict) -> list[str]:
    """Markdown lines: per data set and method, the tokens/s ratio over plain decoding and over prompt lookup."""
    lines = ["| data set | method | x plain | x prompt lookup |", "|---|---|---|---|"]
    for ds, r in result["datasets"].items():
        pld = r["methods"].get("prompt lookup", {}).get("speedup")
        for name, m in r["methods"].items():
            if name != "plain":
                vs = f"{m['speedup'] / pld:.2f}" if pld else "-"
                lines.append(f"| {ds} | {name} | {m['speedup']:.2f} | {vs} |")
    return lines


def cost_table(result: dict) -> list[str]:
    """Markdown lines: per learned drafter, its step time over a plain step (the tau at which it breaks even)."""
    lines = ["| drafter | step time / plain step (break-even tau) |", "|---|---|"]
    first = next(iter(result["datasets"].values()))["methods"]
    names = [*LEARNED, *(name + TREE for name in LEARNED)]
    lines += [f"| {name} | {_step_cost(result, name):.2f} |" for name in names if name in first]
    return lines


def training_table(curves: dict[str, list[tuple[int, float]]]) -> list[str]:
    """Markdown lines: per training run, its held-out tau at the first and the last evaluation."""
    lines = ["| run | evaluations | first tau | last tau | target tokens at the end |", "|---|---|---|---|---|"]
    for label, pts in curves.items():
        if pts:
            lines.append(f"| {label} | {len(pts)} | {pts[0][1]:.3f} | {pts[-1][1]:.3f} | {pts[-1][0]:,} |")
    return lines


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
        f"## Draft-OPD vs SFT continued (matched updates): held-out tau, {n} prompts per set, "
        f"drafter.confidence {learned_setting(result['config']).get('confidence', 0)}",
        "",
        f"Batched, greedy, {result['config']['sampling']['max_new_tokens']} new tokens, {result['dtype']}; "
        "gains paired over prompts [95% bootstrap interval].",
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
    """REPORT.md and figures/ of a demo run, rebuilt from its stage outputs (the same inputs, the same report):
    numbers, tables and figures only; README.md ("Reading the demo report") says what they mean."""
    from draftopd.bench.run import format_table

    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    result = json.loads((out / "bench" / "result.json").read_text())
    curves = compute_curves(out, figs / "tau_vs_compute.png")
    runs = {label: out / folder for label, folder in LEARNED.items()}
    continued = {label: "SFT" for label in runs if label != "SFT"}  # both arms start from SFT's last step
    steps = "optimizer steps (Draft-OPD and SFT continued from SFT's last step)"
    tau_curves(runs, figs / "tau_vs_step.png", "held-out tau during training", "step", continued, steps)
    histograms(
        {m: _merge_hist(result, m) for m in ("SFT", "Draft-OPD")},
        figs / "acceptance_histogram.png",
        "tokens committed per verification, all held-out sets",
    )
    bars(result, figs / "tokens_per_s.png", f"decoding speed, {result['dtype']}, {result['threads']} threads")
    sets = result["datasets"]
    bench_cfg = result["config"]
    drafter = learned_setting(bench_cfg)
    lines = [
        "# draftopd demo report",
        "",
        f"Target: {_target_name(result)}, {result['dtype']}, {result['threads']} threads "
        f"(CPU flags: {result.get('cpu_flags', 'not recorded')}), T={bench_cfg['sampling']['temperature']}, "
        f"batch 1, {bench_cfg['sampling']['max_new_tokens']} new tokens per prompt, "
        f"{next(iter(sets.values()))['prompts']} prompts per data set; commit {result['commit']}.",
        "",
        "```",
        format_table(result),
        "```",
        "",
        "| bench drafter setting | value |",
        "|---|---|",
        f"| drafter.confidence | {drafter.get('confidence', 0)} |",
        f"| drafter.chain_length | {drafter.get('chain_length', '-')} |",
        *tree_rows(bench_cfg),
        "",
        "## Draft-OPD vs SFT: benchmark tau",
        "",
        *gain_table(result),
        "",
        "## Speed-up: tokens/s ratios, batch 1, side by side",
        "",
        *speedup_table(result),
        "",
        "## Step cost",
        "",
        *cost_table(result),
        "",
        "## Training: held-out tau at the first and last evaluation",
        "",
        *training_table(curves),
        "",
        *tau_section(out),
        "![tau vs compute](figures/tau_vs_compute.png)",
        "![tau vs step](figures/tau_vs_step.png)",
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


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python -m draftopd.report OUT.png RUN [RUN ...]")
    folders = [Path(a) for a in sys.argv[2:]]
    png = tau_curves({f.name: f for f in folders}, sys.argv[1], "held-out tau during training", x="step")
    sys.stdout.write(f"{png}\n")
