"""``draftopd bench --costs``: what one speculative step costs, by drafter shape and dtype, against a plain step.

Speed-up = tau x (plain step time) / (draft + verify + bookkeeping time per step), so the step cost fixes the
*break-even tau*: the acceptance length at which a drafter only matches plain decoding. This measures it with
the real loop (``speculative_generate`` times its draft and verify phases, ``SpecStats.draft_s``/``verify_s``)
at batch 1 on a few held-out prompts, for untrained drafters of each shape (the cost of a step does not
depend on the weights: an untrained drafter is rejected at once, so every step verifies its full block, the
worst case), in each dtype, side by side in one process; a plain run precedes each shape and that shape's
break-even tau is taken against it (rows measured minutes apart drifted by ~15% on a shared 2-core machine).
"""

from __future__ import annotations

import time

import torch

from draftopd.bench.datasets import load_prompts
from draftopd.config import ArchConfig
from draftopd.decoding.loop import SpecStats, speculative_generate
from draftopd.models.io import DRAFTERS
from draftopd.models.target import load_target

# (label, arch, chain length) of the shapes measured; dflash block b verifies b tokens, eagle3 chain c verifies c+1
SHAPES: tuple[tuple[str, ArchConfig, int], ...] = (
    ("dflash block 4", ArchConfig(kind="dflash", block_size=4, draft_vocab_size=1 << 30), 0),
    ("dflash block 8", ArchConfig(kind="dflash", block_size=8, draft_vocab_size=1 << 30), 0),
    ("dflash block 8, draft vocab 8k", ArchConfig(kind="dflash", block_size=8, draft_vocab_size=8192), 0),
    ("dflash block 16", ArchConfig(kind="dflash", block_size=16, draft_vocab_size=1 << 30), 0),
    ("dflash block 16, draft vocab 8k", ArchConfig(kind="dflash", block_size=16, draft_vocab_size=8192), 0),
    ("eagle3 chain 3", ArchConfig(kind="eagle3", draft_vocab_size=16384), 3),
    ("eagle3 chain 6", ArchConfig(kind="eagle3", draft_vocab_size=16384), 6),
    ("eagle3 chain 2, draft vocab 8k", ArchConfig(kind="eagle3", draft_vocab_size=8192), 2),
    ("eagle3 chain 4, draft vocab 8k", ArchConfig(kind="eagle3", draft_vocab_size=8192), 4),
    ("eagle3 chain 6, draft vocab 8k", ArchConfig(kind="eagle3", draft_vocab_size=8192), 6),
)


def _run(target, prompts, drafter, max_new: int) -> SpecStats:
    st = SpecStats()
    for ids in prompts:
        st.merge(speculative_generate(target, [ids], drafter, max_new).stats)
    return st


def step_costs(
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    target_path: str = "default",
    dataset: str = "gsm8k",
    prompts: int = 3,
    max_new: int = 48,
    threads: int = 0,
    say=print,
) -> dict:
    """Per dtype: ms of a plain step, and per drafter shape ms of drafting and verifying per step, the step over
    a plain step, and the break-even tau (the step's total time over a plain step's)."""
    if threads:
        torch.set_num_threads(threads)
    out: dict = {"threads": torch.get_num_threads(), "prompts": prompts, "max_new_tokens": max_new, "dtypes": {}}
    for dtype in dtypes:
        target = load_target(target_path, dtype)
        ids = [target.encode_chat(p) for p in load_prompts(dataset, prompts)]
        # the draft vocabulary of a reduced-vocab shape: the most frequent tokens of these prompts (cost only)
        seqs = [(x, 1) for x in ids]
        drafters = {}
        for label, arch, chain in SHAPES:
            torch.manual_seed(0)
            drafters[label] = DRAFTERS[arch.kind].build(target, arch, seqs).engine(target, chain)
        _run(target, ids[:1], None, 8)  # warm-up: first calls pay allocator and kernel set-up
        for d in drafters.values():
            _run(target, ids[:1], d, 8)
        t0 = time.perf_counter()
        rows, plains = {}, []
        for label, d in drafters.items():
            # a plain run right before each shape: the ratio compares neighbours, not rows minutes apart
            plain = _run(target, ids, None, max_new)
            plain_ms = 1000 * plain.decode_s / max(1, plain.steps)
            plains.append(plain_ms)
            st = _run(target, ids, d, max_new)
            step = 1000 * st.decode_s / max(1, st.steps)
            rows[label] = {
                "step_ms": round(step, 2),
                "draft_ms": round(1000 * st.draft_s / max(1, st.steps), 2),
                "verify_ms": round(1000 * st.verify_s / max(1, st.steps), 2),
                "plain_ms": round(plain_ms, 2),
                "break_even_tau": round(step / plain_ms, 3),
            }
        mean = sum(plains) / len(plains)
        rows = {"plain": {"step_ms": round(mean, 2), "draft_ms": 0.0, "verify_ms": round(mean, 2)}, **rows}
        name = str(target.dtype).removeprefix("torch.")
        out["dtypes"][name] = rows
        say(f"[costs] {name}: {time.perf_counter() - t0:.0f} s")
    return out


def format_costs(result: dict) -> str:
    """A markdown table: one row per shape, per dtype ms per step and break-even tau."""
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
