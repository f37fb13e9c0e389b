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
and prints ``format_costs`` of the runs.
"""

from __future__ import annotations

from draftopd import DraftopdError
from draftopd.config import BenchConfig


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


def costs_result(runs: list[dict]) -> dict:
    """The ``--costs`` JSON: the step costs of each run (one per dtype), keyed by its dtype, and the runs."""
    first = runs[0]
    return {
        "threads": first["threads"],
        "prompts": first["config"]["limit"],
        "max_new_tokens": first["config"]["sampling"]["max_new_tokens"],
        **{k: first[k] for k in ("commit", "cpu_flags", "torch")},
        "dtypes": {r["dtype"]: step_costs(r) for r in runs},
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
    return "\n".join(lines)
