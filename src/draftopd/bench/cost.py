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
and prints ``format_costs`` of the runs (``run_costs``).

Verify cost by width, for tree drafting: a tree of N draft nodes is verified as one target forward of N + 1 tokens
(the last committed token, then the nodes) under an ancestor mask. ``width_costs`` times exactly that, the public
``Target.forward`` of width w = 1, 2, 4, ... 64 (``cost_curve.widths``) after ``cost_curve.context`` cached tokens,
with a random tree's 4-D additive float mask as ``Target.branch_forward`` builds it and logits at every node (what
a verify reads), the median of ``cost_curve.reps`` timings, widths interleaved within each repetition so that
machine noise spreads over all of them. ``choose_budget`` turns that curve and an acceptance length per node budget
into the budget that commits the most tokens per ms of verify; ``--costs`` prints its table for every method that
has a measured acceptance (not the untrained shapes), with tau *estimated* from the method's chain acceptance by
depth (``tau_from_chain``) until tree drafters measure tau by budget themselves.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time

import torch
from torch import Tensor

from draftopd import DraftopdError
from draftopd.bench.run import run_bench
from draftopd.config import BenchConfig
from draftopd.decoding.slots import positions
from draftopd.models.target import Target, load_target


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


def random_tree(nodes: int, rng: random.Random) -> list[int]:
    """Parents of a random tree of ``nodes`` draft nodes: node i's parent is the root (-1) or an earlier node,
    uniformly (``Proposal.parents``' convention)."""
    return [rng.randrange(-1, i) for i in range(nodes)]


def tree_attention(parents: list[int], context: int) -> tuple[Tensor, Tensor]:
    """The verify of a tree: ``allowed`` (1, T, context + T) bool and positions (1, T) of the T = N + 1 query slots
    [root, node 0 .. node N-1] (the root: the last committed token). Every slot sees the whole context, its own
    ancestors and itself; a node sits at position context + its depth (the root at ``context``)."""
    t = len(parents) + 1
    allowed = torch.zeros(t, context + t, dtype=torch.bool)
    allowed[:, :context] = True
    depth = [0] * t
    for j in range(t):  # slot j = node j - 1; a parent comes before its child, so its row is complete
        allowed[j, context + j] = True
        if j:
            up = parents[j - 1] + 1  # the parent's slot (the root's is 0)
            allowed[j, context : context + t] |= allowed[up, context : context + t]
            depth[j] = depth[up] + 1
    return allowed[None], (context + torch.tensor(depth))[None]


def tree_mask(parents: list[int], context: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``tree_attention`` as the target takes it: the additive float mask (1, 1, T, context + T) of
    ``Target.branch_forward`` (0 where allowed, the dtype's minimum elsewhere) and the positions (1, T)."""
    allowed, pos = tree_attention(parents, context)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None], pos


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def width_costs(target: Target, widths: tuple[int, ...], context: int, reps: int, seed: int = 0) -> dict[int, float]:
    """Median ms of one verify forward of each width (module docstring): ``context`` random tokens cached first,
    one untimed round of every width, then ``reps`` rounds, a fresh random tree per forward; the cache is cropped
    back to the context after each."""
    if context + max(widths) > target.max_positions:
        raise DraftopdError(
            f"cost_curve: context {context} + width {max(widths)} is more than the target's "
            f"{target.max_positions} positions"
        )
    dev, rng = target.device, random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    cache = target.new_cache()
    ids = torch.randint(target.vocab_size, (1, context), generator=gen)
    seen = torch.ones(1, context, dtype=torch.bool)
    target.forward(ids.to(dev), seen.long().to(dev), positions(seen).to(dev), cache, (), "none")
    cache.commit(seen.to(dev))
    times: dict[int, list[float]] = {w: [] for w in widths}
    for rep in range(reps + 1):  # round 0 warms up
        for w in widths:
            mask, pos = tree_mask(random_tree(w - 1, rng), context, target.dtype)  # (1, 1, w, context + w), (1, w)
            mask, pos = mask.to(dev), pos.to(dev)
            block = torch.randint(target.vocab_size, (1, w), generator=gen).to(dev)
            _sync(dev)
            t0 = time.perf_counter()
            target.forward(block, mask, pos, cache, (), "all")
            _sync(dev)
            if rep:
                times[w].append(time.perf_counter() - t0)
            cache.crop(-w)  # the w slots just appended (transformers >= 5.24: a negative count)
    return {w: 1000 * statistics.median(ts) for w, ts in times.items()}


def interpolate(cost_ms: dict[int, float], width: int) -> float:
    """The cost of ``width`` on a measured curve: measured, or linear between the nearest measured widths."""
    if width in cost_ms:
        return cost_ms[width]
    lo = max((w for w in cost_ms if w < width), default=None)
    hi = min((w for w in cost_ms if w > width), default=None)
    if lo is None or hi is None:
        raise DraftopdError(f"verify width {width} is outside the measured curve ({min(cost_ms)}..{max(cost_ms)})")
    return cost_ms[lo] + (cost_ms[hi] - cost_ms[lo]) * (width - lo) / (hi - lo)


def choose_budget(cost_ms: dict[int, float], tau: dict[int, float]) -> tuple[int, list[dict]]:
    """The node budget that commits the most tokens per ms of verify: argmax over budgets b of
    tau(b) / cost(b + 1), with b = 0 (plain decoding: tau 1, a width-1 step) always a candidate, so 0 means that no
    budget pays on this curve. ``cost_ms``: ms of a verify by width (width 1 required; widths between measured ones
    are interpolated linearly, past them refused); ``tau``: tokens committed per verify by budget (>= 1). Ties
    (within 1e-9 relative) go to the smaller budget: as fast, and fewer tokens to draft. Drafting's own cost is not
    counted. Returns (budget, table): one row per budget, ascending: budget, tau, ms, tok_per_ms, vs_plain (the
    rate over plain decoding's), interpolated (the width's cost was not measured)."""
    if 1 not in cost_ms:
        raise DraftopdError("choose_budget: the cost curve needs width 1 (the plain step)")
    if any(not (math.isfinite(v) and v > 0) for v in cost_ms.values()):
        raise DraftopdError(f"choose_budget: costs must be finite and > 0 ms, not {sorted(cost_ms.items())}")
    if any(b < 1 or not (math.isfinite(t) and t >= 1) for b, t in tau.items()):
        raise DraftopdError(f"choose_budget: budgets must be >= 1 and tau finite and >= 1, not {sorted(tau.items())}")
    plain_rate = 1 / cost_ms[1]
    table = []
    for b, t in sorted({0: 1.0, **tau}.items()):
        ms = interpolate(cost_ms, b + 1)
        rate = t / ms
        row = {"budget": b, "tau": t, "ms": ms, "tok_per_ms": rate, "vs_plain": rate / plain_rate}
        table.append(row | {"interpolated": b + 1 not in cost_ms})
    best = max(r["tok_per_ms"] for r in table)
    chosen = next(r["budget"] for r in table if r["tok_per_ms"] >= best * (1 - 1e-9))
    return chosen, table


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


def budget_choices(cfg: BenchConfig, run: dict, cost_ms: dict[int, float]) -> dict[str, dict]:
    """Per method with a measured acceptance (not plain, not an untrained ``shape``): the budget ``choose_budget``
    picks on this dtype's curve, tau estimated from its chain acceptance (``tau_from_chain``), budgets within
    the curve."""
    out = {}
    for name, d in cfg.method_configs().items():
        if d.kind in ("none", "shape"):  # plain decoding; an untrained drafter's acceptance says nothing
            continue
        tau = {b: t for b, t in tau_from_chain(pooled_acceptance(run, name)).items() if b + 1 <= max(cost_ms)}
        budget, table = choose_budget(cost_ms, tau)
        out[name] = {"budget": budget, "tau_source": "estimate: chain acceptance by depth", "table": table}
    return out


def run_costs(cfg: BenchConfig, target: Target | None = None, progress: bool = True) -> dict:
    """``bench --costs``: per dtype of ``cost_dtypes``, the bench's timed run and the verify cost by width on the
    same loaded target (``target``: the one to use, for a single dtype), then ``costs_result``."""
    runs, curves, choices = [], {}, {}
    c, dtypes = cfg.cost_curve, cost_dtypes(cfg)
    if target is not None and len(dtypes) != 1:
        raise DraftopdError(f"run_costs: one loaded target cannot run {' and '.join(dtypes)}: set target.dtype")
    for dtype in dtypes:
        one = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, dtype=dtype))
        t = target or load_target(one.target.path, dtype, one.target.device)
        run = run_bench(one, t, progress=progress)
        cost_ms = width_costs(t, c.widths, c.context, c.reps)
        curves[run["dtype"]] = {
            "context": c.context,
            "reps": c.reps,
            "ms": {str(w): round(ms, 3) for w, ms in cost_ms.items()},
        }
        choices[run["dtype"]] = budget_choices(one, run, cost_ms)
        runs.append(run)
    return costs_result(runs, curves, choices)


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
    """Per dtype and method: the node budget chosen on the curve, why (its table), and where tau came from."""
    lines = []
    for dtype, methods in (result.get("budgets") or {}).items():
        for name, choice in methods.items():
            rows = {r["budget"]: r for r in choice["table"]}
            best, plain = rows[choice["budget"]], rows[0]
            lines += [
                "",
                f"Node budget for {name}, {dtype}: **{choice['budget']}**, the most tokens per ms of verify "
                f"({best['tau']:.2f} tokens / {best['ms']:.1f} ms = {best['tok_per_ms']:.4f}, {best['vs_plain']:.2f}x "
                f"plain decoding's {plain['tok_per_ms']:.4f}; drafting not counted). tau: {choice['tau_source']}; "
                "ms: the curve above (~ interpolated).",
                "",
                "| budget | tau | verify ms | tok/ms | x plain |",
                "|---|---|---|---|---|",
            ]
            for r in choice["table"]:
                b = f"**{r['budget']}**" if r["budget"] == choice["budget"] else str(r["budget"])
                ms = f"{'~' if r['interpolated'] else ''}{r['ms']:.1f}"
                lines.append(f"| {b} | {r['tau']:.2f} | {ms} | {r['tok_per_ms']:.4f} | {r['vs_plain']:.2f} |")
    if not lines and result.get("widths"):
        lines = ["", "No node budget chosen: no method here has a measured acceptance (untrained shapes only)."]
    return lines
