#!/usr/bin/env python
"""Confidence-gated drafting: tau and wall-clock speed-up of one drafter at several (chain length, threshold)
settings, against plain decoding and prompt lookup, every arm interleaved prompt by prompt in one process.

Batch 1, greedy, the dtype ``auto`` picks (bf16 only where the CPU has it). A setting ``L:c`` drafts chains of up
to ``L`` tokens (EAGLE-3; DFlash ignores ``L``) and ends a proposal at its first token drafted with top-1
probability below ``c`` (``draftopd.models.base.confident_length``). Prints one line per arm and, with ``--json``,
writes them. RESULTS.md 8.5 has the figures this made.

    .venv/bin/python scripts/confidence_sweep.py runs/reproduce/sft/final --dataset gsm8k 4:0 6:0.5 6:0.7
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch

from draftopd import DraftopdError
from draftopd.bench.datasets import load_prompts
from draftopd.decoding.loop import SpecStats, speculative_generate
from draftopd.models.io import read_drafter
from draftopd.models.pld import PromptLookupDrafter
from draftopd.models.target import load_target


def cpu() -> str:
    """The CPU's model name and the flags that decide the dtype (``auto`` = bf16 with avx512_bf16 or amx_bf16)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    flags = sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16"} & set(text.split()))
    return f"{name} ({' '.join(flags)})"


def setting(text: str) -> tuple[int, float]:
    """``L:c`` -> (chain length >= 1, or 0 for DFlash; threshold in [0, 1)), else a one-line argparse error."""
    try:
        length, conf = text.split(":")
        out = int(length), float(conf)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected chain_length:confidence, e.g. 6:0.5") from None
    if out[0] < 0 or not 0 <= out[1] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: chain length >= 0 and confidence in [0, 1)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("drafter", help="a drafter folder (DFlash or EAGLE-3)")
    ap.add_argument("settings", nargs="+", type=setting, help="chain_length:confidence pairs, e.g. 6:0.5")
    ap.add_argument("--dataset", default="gsm8k")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    target = load_target("default", "auto")
    model = read_drafter(a.drafter, target)
    arms = {"plain": None, "prompt lookup": PromptLookupDrafter(10, 2, 1)}
    for length, conf in a.settings:
        arms[f"chain {length}, confidence {conf}"] = model.engine(target, length, conf)
    prompts = [target.encode_chat(p) for p in load_prompts(a.dataset, a.limit)]
    for d in arms.values():  # warm-up
        speculative_generate(target, [prompts[0]], d, 12)
    stats = {k: SpecStats() for k in arms}
    for i, ids in enumerate(prompts):
        for name, d in arms.items():
            stats[name].merge(speculative_generate(target, [ids], d, a.max_new_tokens).stats)
        print(f"prompt {i + 1}/{len(prompts)}", flush=True)
    plain = stats["plain"].tokens_per_s
    rows = {}
    for name, st in stats.items():
        n = max(1, st.steps)
        rows[name] = {
            "tau": round(st.tau, 3),
            "speedup": round(st.tokens_per_s / plain, 3),
            "tokens_per_s": round(st.tokens_per_s, 2),
            "step_ms": round(1000 * st.decode_s / n, 1),
            "draft_ms": round(1000 * st.draft_s / n, 1),
            "verify_ms": round(1000 * st.verify_s / n, 1),
        }
        r = rows[name]
        print(
            f"{name:26s} tau {r['tau']:.3f}  {r['speedup']:.3f}x  step {r['step_ms']} ms "
            f"(draft {r['draft_ms']}, verify {r['verify_ms']})"
        )
    if a.json:
        meta = {
            "drafter": a.drafter,
            "dataset": a.dataset,
            "limit": a.limit,
            "max_new_tokens": a.max_new_tokens,
            "dtype": str(target.dtype),
            "threads": torch.get_num_threads(),
            "cpu": cpu(),
            "commit": subprocess.run(
                ["git", "describe", "--always", "--dirty"], capture_output=True, text=True
            ).stdout.strip(),
        }
        with open(a.json, "w") as f:
            json.dump({**meta, "arms": rows}, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except DraftopdError as e:  # bad drafter folder, target not set up: one line, no traceback
        raise SystemExit(f"confidence_sweep.py: error: {e}") from None
