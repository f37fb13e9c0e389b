"""Soak: thousands of batched verify steps (DFlash drafter, rows finishing at different times, rejected slots
dropped) hold memory flat: the resident set after the last rollout is within a few MB of the one after the
second (the first ones pay for allocator pools and kernel set-up)."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest
import torch

from draftopd.decoding.loop import speculative_generate

from helpers import make_tiny_target, tiny_dflash

pytestmark = pytest.mark.slow


def rss_mb() -> float:
    """Current resident set size of this process (Linux /proc), in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_rollouts_hold_memory_flat():
    target = make_tiny_target(vocab=64, layers=4, hidden=64, std=0.3, seed=3)
    drafter = tiny_dflash(target, layers=1, block=5).engine(target)
    gen = torch.Generator().manual_seed(0)
    prompts = [[int(t) for t in torch.randint(64, (n,), generator=gen)] for n in (3, 9, 17, 5, 30, 12, 7, 21)]
    steps, after = 0, []
    for _ in range(10):
        out = speculative_generate(target, prompts, drafter, 96)
        steps += len(out.stats.committed)
        after.append(rss_mb())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"soak: {steps} verify steps (row-steps), RSS after rollout 2 {after[1]:.1f} MB, after rollout 10 "
          f"{after[-1]:.1f} MB, peak {peak:.1f} MB")  # fmt: skip
    assert steps > 3000
    assert after[-1] - after[1] < 8.0, after  # no growth with the number of rollouts
