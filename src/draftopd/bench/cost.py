"""``draftopd bench --costs``: what one speculative step costs against a plain step, read from timed bench results.

Speed-up = tau x (plain step time) / (draft + verify + bookkeeping time per step), so the step cost fixes the
*break-even tau*: the acceptance length at which a drafter only matches plain decoding. The timed bench measures
it with the real loop (``speculative_generate`` times its draft and verify phases, ``SpecStats.draft_s`` and
``verify_s``) at batch 1, plain decoding interleaved with every method prompt by prompt, so each break-even tau
compares neighbours, not runs minutes apart (those drifted by ~15% on a shared 2-core machine).

``configs/bench-costs.yaml`` names untrained drafters of several shapes (``kind: shape``): the cost of a step
does not depend on the weights, and an untrained drafter is rejected at once, so every step verifies its full
block (the worst case; ``confidence: 0``, so no proposal is cut short). ``draftopd bench --costs`` runs that recipe
(or ``--config``'s) once per dtype, fp32 and bf16 side by side in one process when ``target.dtype`` is ``auto``,
and prints ``format_costs`` of the runs (``bench.run.run_costs`` makes them: this module sits below the runner).

The verify cost by width and the node budget chosen on it come from ``bench/curve.py``; ``budget_choices`` feeds it
tau per method: *measured* by budget for a drafter with trees (and cached for ``tree_budget: auto``,
``bench/budget.py``), *estimated* from the chain acceptance by depth for prompt lookup (``tau_from_chain``). The
printed tables say which.
"""

from __future__ import annotations

from draftopd import DraftopdError
from draftopd.bench.budget import save_choice
from draftopd.bench.curve import choose_budget, measure_tau, measured_choice
from draftopd.config import BenchConfig, DrafterConfig
from draftopd.data.eval_sets import load_prompts
from draftopd.models.target import Target


def cost_dtypes(cfg: BenchConfig) -> tuple[str, ...]:
    """The dtypes ``--costs`` runs ``cfg`` in: fp32 and bf16 side by side for ``auto``, else the one set."""
    if cfg.tau_only:
        raise DraftopdError("--costs times each step: tau_only must be false")
    return ("fp32", "bf16") if cfg.target.dtype == "auto" else (cfg.target.dtype,)


def step_costs(result: dict) -> dict[str, dict]:
    """Per method of a timed bench result: ms per verify step of drafting, verifying and the whole step, its data
    sets pooled (weighted by their verify steps), and the break-even tau (the step over a plain step)."""
    if result["config"].get("tau_only"):
        raise DraftopdError("step costs need a timed bench result (tau_only: false)")
    pooled: dict[str, list[float]] = {}  # name -> [verify steps, then step, draft and verify ms times steps]
    for r in result["datasets"].values():
        for name, m in r["methods"].items():
            if "step_ms" not in m:  # transformers' generate(): not our loop, no per-step times
                continue
            steps = m["target_calls"] - r["prompts"]  # batch 1: one prefill per prompt, then verify steps
            acc = pooled.setdefault(name, [0, 0.0, 0.0, 0.0])
            for j, v in enumerate((1, m["step_ms"], m["draft_ms"], m["verify_ms"])):
                acc[j] += steps * v
    per_step = {name: [ms / max(1, acc[0]) for ms in acc[1:]] for name, acc in pooled.items()}
    plain_ms = per_step["plain"][0]
    rows = {}
    for name, (step, draft, verify) in per_step.items():
        rows[name] = {"step_ms": round(step, 2), "draft_ms": round(draft, 2), "verify_ms": round(verify, 2)}
        if name != "plain":
            rows[name] |= {"plain_ms": round(plain_ms, 2), "break_even_tau": round(step / plain_ms, 3)}
    return rows


def tau_from_chain(acceptance_rate: list[float]) -> dict[int, float]:
    """An *estimate* of tau by node budget from a chain drafter's acceptance by depth (``SpecStats.acceptance_rate``:
    a_j = P(draft j accepted | proposed), and draft j is accepted only with d_1..d_j all accepted, so a_j is the
    probability that the accepted prefix reaches j): a chain of b nodes commits 1 + sum_{j<=b} a_j tokens per verify
    in expectation, as if every proposal were a full chain (a confidence gate or a drafter that proposes fewer
    tokens makes it optimistic). A tree of b nodes can hold that chain, so this is what a tree drafter should at
    least reach. Budgets up to the measured depth."""
    tau: dict[int, float] = {}
    for b, a in enumerate(acceptance_rate, 1):
        tau[b] = tau.get(b - 1, 1.0) + a
    return tau


def pooled_acceptance(result: dict, name: str) -> list[float]:
    """A method's acceptance by depth over a timed result's data sets, weighted by each set's verify steps."""
    acc: list[list[float]] = []  # per depth: [weighted sum, weight]
    for r in result["datasets"].values():
        m = r["methods"][name]
        steps = m["target_calls"] - r["prompts"]
        for j, a in enumerate(m.get("acceptance_rate", [])):
            if j == len(acc):
                acc.append([0.0, 0.0])
            acc[j][0] += steps * a
            acc[j][1] += steps
    return [s / w for s, w in acc if w]


def has_trees(d: DrafterConfig) -> bool:
    """A drafter whose tree budget can be measured: a trained DFlash or EAGLE-3 folder (an untrained ``shape``'s
    acceptance says nothing; prompt lookup has no trees)."""
    return d.kind == "path"


def budget_choices(
    cfg: BenchConfig, run: dict, cost_ms: dict[int, float], target: Target | None = None
) -> dict[str, dict]:
    """Per method with a measured acceptance (not plain, not an untrained ``shape``): the budget ``choose_budget``
    picks on this dtype's curve. A drafter with trees (``has_trees``; needs ``target``): tau measured at each of
    ``cost_curve.budgets`` on the first ``cost_curve.tau_prompts`` prompts of each set (``measure_tau``), and the
    choice cached for ``tree_budget: auto`` (bench/budget.py). Any other (prompt lookup): tau *estimated* from its
    chain acceptance (``tau_from_chain``), budgets within the curve."""
    out = {}
    c = cfg.cost_curve
    for name, d in cfg.method_configs().items():
        if d.kind in ("none", "shape"):  # plain decoding; an untrained drafter's acceptance says nothing
            continue
        if has_trees(d) and target is not None:
            prompts = [target.encode_chat(p) for ds in cfg.datasets for p in load_prompts(ds, c.tau_prompts)]
            measured = measure_tau(target, d, prompts, cfg.sampling.max_new_tokens, c.budgets)
            out[name] = measured_choice(cost_ms, measured)
            out[name]["cached"] = str(save_choice(d, target, out[name]))
            continue
        tau = {b: t for b, t in tau_from_chain(pooled_acceptance(run, name)).items() if b + 1 <= max(cost_ms)}
        budget, table = choose_budget(cost_ms, tau)
        out[name] = {"budget": budget, "tau_source": "estimate: chain acceptance by depth", "table": table}
    return out


def costs_result(runs: list[dict], curves: dict | None = None, budgets: dict | None = None) -> dict:
    """The ``--costs`` JSON: the step costs of each run (one per dtype), keyed by its dtype, the verify cost by width
    (``widths``: per dtype context, reps and ms by width) and the budget choices (``budgets``: per dtype, per
    method), and the runs."""
    first = runs[0]
    return {
        "threads": first["threads"],
        "prompts": first["config"]["limit"],
        "max_new_tokens": first["config"]["sampling"]["max_new_tokens"],
        **{k: first[k] for k in ("commit", "cpu_flags", "torch")},
        "dtypes": {r["dtype"]: step_costs(r) for r in runs},
        "widths": curves or {},
        "budgets": budgets or {},
        "runs": runs,
    }


def format_costs(result: dict) -> str:
    """A markdown table: one row per method, per dtype ms per step and break-even tau."""
    dtypes = list(result["dtypes"])
    head = "| step | " + " | ".join(f"{d}: draft / verify / whole step, ms (break-even tau)" for d in dtypes) + " |"
    lines = [head, "|---|" + "---|" * len(dtypes)]
    for label in result["dtypes"][dtypes[0]]:
        cells = []
        for d in dtypes:
            r = result["dtypes"][d][label]
            if label == "plain":
                cells.append(f"{r['step_ms']:.1f} ms (1)")
            else:
                ms = f"{r['draft_ms']:.1f} / {r['verify_ms']:.1f} / {r['step_ms']:.1f}"
                cells.append(f"{ms} ({r['break_even_tau']:.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, *format_widths(result), *format_budgets(result)])


def format_widths(result: dict) -> list[str]:
    """The verify cost by width: per dtype ms and the ratio to the width-1 step (empty without a curve)."""
    curves = result.get("widths") or {}
    if not curves:
        return []
    dtypes = list(curves)
    c = curves[dtypes[0]]
    lines = [
        "",
        f"Verify cost by width: one target forward of w tokens (a random tree of w - 1 draft nodes under its ancestor "
        f"mask, logits at every node) after {c['context']} cached tokens, median of {c['reps']}.",
        "",
        "| width | " + " | ".join(f"{d}: ms (x width 1)" for d in dtypes) + " |",
        "|---|" + "---|" * len(dtypes),
    ]
    for w in c["ms"]:
        cells = [f"{curves[d]['ms'][w]:.1f} ({curves[d]['ms'][w] / curves[d]['ms']['1']:.2f})" for d in dtypes]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return lines


def format_budgets(result: dict) -> list[str]:
    """Per dtype and method: the node budget chosen on the curve, why (its table), and where tau came from
    (measured by budget, or estimated from a chain's acceptance)."""
    lines = []
    for dtype, methods in (result.get("budgets") or {}).items():
        for name, choice in methods.items():
            rows = {r["budget"]: r for r in choice["table"]}
            best, base = rows[choice["budget"]], rows[0]
            zero = choice.get("zero", "plain")  # budget 0: the drafter's own chain (measured), or no drafting at all
            cached = f" Cached for tree_budget auto: {choice['cached']}." if choice.get("cached") else ""
            lines += [
                "",
                f"Node budget for {name}, {dtype}: **{choice['budget']}**, the most tokens per ms of verify "
                f"({best['tau']:.2f} tokens / {best['ms']:.1f} ms = {best['tok_per_ms']:.4f}, {best['vs_plain']:.2f}x "
                f"plain decoding's; drafting not counted). tau: {choice['tau_source']}; "
                f"ms: the curve above at the verify's width (~ interpolated).{cached}",
                "",
                f"| budget | tau ({choice['tau_source'].split(':')[0]}) | width | verify ms | tok/ms | x plain |",
                "|---|---|---|---|---|---|",
            ]
            for r in choice["table"]:
                b = f"{r['budget']} ({zero})" if r is base else str(r["budget"])
                b = f"**{b}**" if r["budget"] == choice["budget"] else b
                ms = f"{'~' if r['interpolated'] else ''}{r['ms']:.1f}"
                w = r.get("width", r["budget"] + 1)
                lines.append(
                    f"| {b} | {r['tau']:.2f} | {w:.1f} | {ms} | {r['tok_per_ms']:.4f} | {r['vs_plain']:.2f} |"
                )
    if not lines and result.get("widths"):
        lines = ["", "No node budget chosen: no method here has a measured acceptance (untrained shapes only)."]
    return lines
