"""Plain decoding, prompt lookup, a drafter's tree + lookup branch, and the same with the lookup switch, batch 1,
greedy, one process, prompt by prompt (issue 34's probe of the switch; `draftopd bench` is the measurement of record).
Run it alone on the machine:

    .venv/bin/python scripts/lookup_switch_probe.py DRAFTER --dataset humaneval --limit 4 --dtype bf16 --budget 8

Per method, over ``--reps`` passes of the prompts: new tokens per second of decoding (prefill left out) and the ratio
over plain decoding, verify steps, tau, and per step the ms of drafting, of the verify forward and of the rest (each
method decodes its own text: in bf16 the texts drift apart at near-ties); then the switch's final averages per
context (lookup matched / found nothing) and proposal: rounds, tokens per round, ms per round.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from draftopd.config import DrafterConfig  # noqa: E402
from draftopd.data.eval_sets import load_prompts  # noqa: E402
from draftopd.decoding.loop import SpecStats, speculative_generate  # noqa: E402
from draftopd.models.io import build_drafter  # noqa: E402
from draftopd.models.target import load_target  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("drafter")
    p.add_argument("--dataset", default="humaneval")
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--budget", type=int, default=8)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t = load_target("default", a.dtype)

    def tree(**kw):
        return build_drafter(DrafterConfig(kind="path", path=a.drafter, tree_budget=a.budget, lookup=True, **kw), t)

    methods = {"plain": None, "prompt lookup": build_drafter(DrafterConfig(kind="pld"), t)}
    methods |= {"tree + lookup": tree(), "switched": tree(lookup_switch=True)}
    prompts = [t.encode_chat(q) for q in load_prompts(a.dataset, a.limit)]
    speculative_generate(t, [prompts[0]], None, 8)  # warm-up
    total = collections.defaultdict(SpecStats)
    for _ in range(a.reps):
        for q in prompts:
            for name, d in methods.items():
                total[name].merge(speculative_generate(t, [q], d, a.max_new_tokens).stats)
    plain = total["plain"]
    for name, s in total.items():
        rate, n = s.new_tokens / s.decode_s, max(1, s.verifies)
        ms = {k: 1000 * v / n for k, v in (("draft", s.draft_s), ("verify", s.verify_s), ("all", s.decode_s))}
        print(
            f"{a.dataset} {a.dtype} budget {a.budget} {name:14s} {rate:6.1f} tok/s "
            f"{rate / (plain.new_tokens / plain.decode_s):.2f}x plain  {s.verifies} steps "
            f"tau {s.tau:.2f}  ms/step {ms['all']:.1f}: draft {ms['draft']:.2f} verify {ms['verify']:.1f} "
            f"rest {ms['all'] - ms['draft'] - ms['verify']:.2f}"
        )
    for ctx, rates in methods["switched"].rates.items():  # rounds where lookup matched / found nothing
        shown = {k: f"{n} rounds, {tok:.2f} tokens, {1000 * sec:.1f} ms" for k, (n, tok, sec) in rates.items()}
        print(f"switch ({ctx}):", shown)


if __name__ == "__main__":
    main()
