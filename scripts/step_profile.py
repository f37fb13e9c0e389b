#!/usr/bin/env python3
"""step_profile: what one target step costs against the memory floor, per dtype and linear path, and where it goes.

Times the real ``Target.forward`` on a ``SlotCache`` holding ``--ctx`` tokens: a plain step (1 new token) and
verifies of k new tokens (k = ``--widths``: k - 1 drafts after the last accepted token), each with the loop's host
read of the argmax and a crop back to ``ctx`` (so every timed forward sees the same cache), median of ``--reps``
after warm-up calls. Each is set against the memory floor: the bytes a step must read (every linear's weight once,
the LM head included, plus the keys and values of the cache) over the read rate measured here (a sum over 256 MiB).
Packed rows also give their largest logit difference from the plain path and whether the argmax agrees. Then
``torch.profiler`` over a few steps per path: the top ops by self CPU time, ops per step, the time outside any op
(Python and transformers' bookkeeping), and host syncs (``aten::_local_scalar_dense``: a tensor's value read back by
Python, e.g. transformers' mask check; the loop's own ``tolist`` is not an op and is not counted). Prints tables and
writes JSON (``--json``).

Quiet machine only (nothing else running; the numbers are medians of wall time), from the repo root:

    PYTHONPATH=src .venv/bin/python scripts/step_profile.py [--dtypes fp32,bf16] [--fast plain,packed]
        [--widths 1,2,4,8,16,32] [--ctx 256] [--reps 20] [--threads 2] [--batch 1] [--json runs/step_profile.json]

``--quick`` checks that it runs (fp32, widths 1 and 4, ctx 32, 2 reps): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from draftopd.models.target import load_target

SYNC_OP = "aten::_local_scalar_dense"  # every read of a tensor's value by Python (item, bool(t), is_nonzero) ends here


def median_ms(fn, reps: int, warm: int = 3) -> float:
    """Median wall ms of ``fn()`` over ``reps`` calls after ``warm`` untimed ones."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def read_rate_gbs(reps: int) -> float:
    """GB/s of a streaming read: ``sum`` over a 256 MiB float32 tensor (larger than any cache)."""
    x = torch.ones(64 << 20)
    return x.numel() * 4 / median_ms(x.sum, reps, warm=2) / 1e6


def step_bytes(target, ctx: int, batch: int) -> dict[str, int]:
    """Bytes one forward must read however it is computed: every linear's weight (once, whatever the width) and
    the cache's keys and values (B x ctx slots per layer); embeddings and norms are left out (rows, not matrices)."""
    lin = sum(
        m.weight.numel() * m.weight.element_size() for m in target.model.modules() if isinstance(m, torch.nn.Linear)
    )
    cfg = target.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * ctx * batch * target.dtype.itemsize
    return {"linears": lin, "kv_cache": kv, "total": lin + kv}


class Stepper:
    """A target with ``ctx`` tokens cached per row, and one timed step: forward ``w`` new tokens, read the argmax
    on the host (as the loop does), crop the cache back to ``ctx``."""

    def __init__(self, target, ctx: int, batch: int, widths: list[int]) -> None:
        g = torch.Generator().manual_seed(0)
        self.target, self.ctx, self.batch = target, ctx, batch
        self.prompt = torch.randint(3, target.vocab_size, (batch, ctx), generator=g)
        self.blocks = {w: torch.randint(3, target.vocab_size, (batch, w), generator=g) for w in widths}
        self.cache = None

    def prefill(self) -> None:
        b, s = self.prompt.shape
        self.cache = self.target.new_cache()
        self.target.forward(
            self.prompt, torch.ones(b, s, dtype=torch.long), torch.arange(s).expand(b, -1), self.cache, (), "last"
        )

    def step(self, w: int) -> torch.Tensor:
        b, s = self.batch, self.ctx
        mask, pos = torch.ones(b, s + w, dtype=torch.long), torch.arange(s, s + w).expand(b, -1)
        logits = self.target.forward(self.blocks[w], mask, pos, self.cache, (), "all").logits
        logits.argmax(-1).tolist()  # the loop's host read of the verdict
        self.cache.crop(-w)
        return logits


def profile_steps(stepper: Stepper, w: int, steps: int, top: int) -> dict:
    """torch.profiler over ``steps`` steps of width ``w``: per step, the top ops by self CPU time, op and sync
    counts, and the wall time outside any op."""
    from torch.profiler import ProfilerActivity, profile

    stepper.step(w)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            stepper.step(w)
    wall = 1000 * (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    self_ms = sum(e.self_cpu_time_total for e in events) / 1000 / steps
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "width": w,
        "wall_ms_profiled": wall,
        "ops_per_step": sum(e.count for e in events) / steps,
        "op_self_ms": self_ms,
        "outside_ops_ms": wall - self_ms,  # Python, transformers' bookkeeping, the profiler's own cost
        "host_syncs_per_step": sum(e.count for e in events if e.key == SYNC_OP) / steps,  # tolist() not counted
        "top": [
            {"op": e.key, "self_ms": e.self_cpu_time_total / 1000 / steps, "calls": e.count / steps} for e in rows
        ],
    }


def machine() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    isa = " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in set(text.split()))
    return f"{name or platform.processor()} [{isa}] | torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="default")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--fast", default="plain,packed", help="target.fast paths: plain, packed, compiled, auto")
    p.add_argument("--widths", default="1,2,4,8,16,32")
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile-widths", default="1,4", help="widths to run under torch.profiler ('' = none)")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json", default="runs/step_profile.json")
    p.add_argument("--quick", action="store_true", help="a check that it runs: tiny settings, meaningless numbers")
    a = p.parse_args()
    if a.quick:
        a.dtypes, a.widths, a.ctx, a.reps, a.profile_steps, a.profile_widths = "fp32", "1,4", 32, 2, 1, "1"
    torch.set_num_threads(a.threads)
    widths = [int(w) for w in a.widths.split(",")]
    prof_widths = [int(w) for w in a.profile_widths.split(",") if w]
    rate = read_rate_gbs(max(3, a.reps // 4))
    result: dict = {
        "machine": machine(),
        "threads": a.threads,
        "ctx": a.ctx,
        "batch": a.batch,
        "reps": a.reps,
        "read_gbs": rate,
        "runs": [],
        "profiles": [],
    }
    print(
        f"{result['machine']} | {a.threads} threads | ctx {a.ctx} | batch {a.batch} | read {rate:.1f} GB/s", flush=True
    )
    for dt in a.dtypes.split(","):
        target = load_target(a.target, dt, fast="plain")
        need = step_bytes(target, a.ctx, a.batch)
        floor = need["total"] / rate / 1e6
        result.setdefault("bytes", {})[dt] = need
        stepper = Stepper(target, a.ctx, a.batch, sorted({*widths, *prof_widths}))
        plain: dict[int, torch.Tensor] = {}
        for mode in a.fast.split(","):
            path = target.set_fast(mode)
            stepper.prefill()
            for w in widths:
                logits = stepper.step(w).reshape(-1, target.vocab_size)
                ms = median_ms(functools.partial(stepper.step, w), a.reps)
                row = {"dtype": dt, "fast": path, "width": w, "ms": ms, "floor_ms": floor, "x_floor": ms / floor}
                if path == "plain":
                    plain[w] = logits
                elif w in plain:
                    d = (logits - plain[w]).abs().max().item()
                    same = bool((logits.argmax(-1) == plain[w].argmax(-1)).all())
                    row |= {"max_dlogit_vs_plain": d, "argmax_eq_plain": same}
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
            for w in prof_widths:
                result["profiles"].append(
                    {"dtype": dt, "fast": path, **profile_steps(stepper, w, a.profile_steps, a.top)}
                )
        target = stepper = None  # free this dtype's model before the next loads
    report(result)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {a.json}")


def report(result: dict) -> None:
    print(
        f"\nms per forward, median of {result['reps']} (ctx {result['ctx']}, batch {result['batch']}, "
        f"{result['threads']} threads); floor = bytes read per step / {result['read_gbs']:.1f} GB/s"
    )
    print("| dtype | fast | w | ms | ms/token | floor ms | x floor | max dlogit vs plain | argmax = plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["runs"]:
        d = r.get("max_dlogit_vs_plain")
        cells = ["-" if d is None else f"{d:.1e}", str(r.get("argmax_eq_plain", "-"))]
        print(
            f"| {r['dtype']} | {r['fast']} | {r['width']} | {r['ms']:.1f} | {r['ms'] / r['width']:.2f} | "
            f"{r['floor_ms']:.1f} | {r['x_floor']:.2f} | " + " | ".join(cells) + " |"
        )
    for pr in result["profiles"]:
        print(
            f"\n{pr['dtype']} fast={pr['fast']} w={pr['width']}: {pr['wall_ms_profiled']:.1f} ms/step profiled, "
            f"{pr['ops_per_step']:.0f} ops/step, {pr['op_self_ms']:.1f} ms in ops, {pr['outside_ops_ms']:.1f} ms "
            f"outside ops, {pr['host_syncs_per_step']:.0f} host syncs/step"
        )
        print("| op | self ms/step | calls/step |\n|---|---|---|")
        for t in pr["top"]:
            print(f"| {t['op']} | {t['self_ms']:.2f} | {t['calls']:.0f} |")


if __name__ == "__main__":
    main()
