"""A rough guess of each demo stage's time, from per-unit rates measured once on 2 AVX2 cores in fp32.

Planning help for a recipe (``python -m draftopd.lab.estimate configs/reproduce.yaml``), not part of the demo:
``draftopd demo`` reports the time each stage took, measured. The rates are constants of one machine and one
commit; bf16 on an AVX512-BF16 CPU is faster, a GPU far faster.
"""

from __future__ import annotations

import sys

from draftopd.config import DemoConfig
from draftopd.demo import STAGES, stage_configs
from draftopd.recipes import load


def estimate(stage: str, c, n_traj: int) -> float:
    """Rough seconds for a stage on 2 AVX2 cores in fp32 (measured rates; a guide only)."""
    if stage == "data":
        return len(c.sources) * c.limit_per_source * c.sampling.max_new_tokens / 200
    if stage in ("sft", "sft_continued"):
        if c.arch.kind == "eagle3":  # every position of every sequence, once per TTT step (2.5 s at 4 x 384 x 6)
            per_step = 0.00027 * c.batch_size * c.max_len * c.arch.ttt_steps
        else:  # dflash: the drafted slots of the sampled blocks
            per_step = 0.0021 * c.batch_size * c.blocks_per_seq * (c.arch.block_size - 1)
        evals = c.loop.max_steps // max(1, c.loop.eval_every) + 1
        feats = 0 if c.init_from else 0.5 * n_traj  # the target's feature pass (reused when continuing)
        return feats + c.loop.max_steps * per_step + evals * 0.12 * c.eval.limit * c.eval.max_new_tokens / 8
    if stage == "opd":
        evals = c.loop.max_steps // max(1, c.loop.eval_every) + 1
        return c.loop.max_steps * (0.045 * c.rollout_batch * c.max_new_tokens) + evals * 0.12 * c.eval.limit * 12
    if stage == "bench":
        return len(c.datasets) * c.limit * (len(c.method_configs()) + 1) * c.sampling.max_new_tokens / 14
    if stage == "tau":
        return len(c.datasets) * c.limit * len(c.method_configs()) * c.sampling.max_new_tokens / 60
    return 0.0


def demo_estimate(cfg: DemoConfig) -> dict[str, float]:
    """Guessed seconds per stage of the demo ``cfg`` describes."""
    stages = stage_configs(cfg)
    n_traj = len(cfg.data.sources) * cfg.data.limit_per_source
    return {name: estimate(name, stages[name][1], n_traj) for name in STAGES}


if __name__ == "__main__":
    guess = demo_estimate(load(DemoConfig, sys.argv[1] if len(sys.argv) > 1 else "configs/demo.yaml"))
    for name, seconds in [*guess.items(), ("total", sum(guess.values()))]:
        sys.stdout.write(f"{name:<14} ~{seconds / 60:.1f} min\n")
