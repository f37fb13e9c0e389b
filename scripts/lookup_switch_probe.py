"""Plain decoding, prompt lookup, a drafter's tree + lookup branch, and the same with the lookup switch, batch 1,
greedy, one process, prompt by prompt (issue 34's probe of the switch; `draftopd bench` is the measurement of record).
Run it alone on the machine:

    .venv/bin/python scripts/lookup_switch_probe.py DRAFTER --dataset humaneval --limit 4 --dtype bf16 --budget 6

Prints tokens/s and the ratio over plain decoding per method (each method decodes its own text: in bf16 the texts
drift apart at near-ties), and the switch's final averages per context (lookup matched / found nothing) and proposal:
rounds, tokens per round, ms per round.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from draftopd.config import DrafterConfig  # noqa: E402
from draftopd.data.eval_sets import load_prompts  # noqa: E402
from draftopd.decoding.loop import speculative_generate  # noqa: E402
from draftopd.models.io import build_drafter  # noqa: E402
from draftopd.models.target import load_target  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("drafter")
    p.add_argument("--dataset", default="humaneval")
    p.add_argument("--limit", type=int, default=4)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--budget", type=int, default=6)
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
    total = collections.defaultdict(lambda: [0, 0.0])
    for q in prompts:
        for name, d in methods.items():
            t0 = time.perf_counter()
            total[name][0] += len(speculative_generate(t, [q], d, a.max_new_tokens).tokens[0])
            total[name][1] += time.perf_counter() - t0
    plain = total["plain"][0] / total["plain"][1]
    for name, (k, s) in total.items():
        print(f"{a.dataset} {a.dtype} budget {a.budget} {name:14s} {k / s:6.1f} tok/s  {k / s / plain:.2f}x plain")
    for ctx, rates in methods["switched"].rates.items():  # rounds where lookup matched / found nothing
        shown = {k: f"{n} rounds, {tok:.2f} tokens, {1000 * sec:.1f} ms" for k, (n, tok, sec) in rates.items()}
        print(f"switch ({ctx}):", shown)


if __name__ == "__main__":
    main()
