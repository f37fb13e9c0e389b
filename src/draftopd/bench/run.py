"""``draftopd bench``: acceptance length and wall-clock speed-up, measured side by side in one process.

For every prompt of every data set, in turn and on the same loaded target: plain decoding (our loop, no
drafter), speculative decoding with the chosen drafter, and, as the tool users already have, transformers'
``generate()`` plain and with prompt-lookup decoding. Interleaving per prompt spreads machine noise evenly
over the methods. Speed-ups are ratios of total tokens over total seconds within one data set.
``lossless`` counts prompts whose speculative tokens equal our plain greedy tokens (1.0 expected in fp32;
bf16 kernels are not bit-exact, see cpu-feasibility.md).
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

import torch
from tqdm import tqdm

from draftopd.bench.datasets import load_prompts
from draftopd.config import BenchConfig, to_dict
from draftopd.models import build_drafter
from draftopd.models.target import Target, load_target
from draftopd.spec.decode import SpecStats, speculative_generate
from draftopd.spec.sampling import SamplingParams

log = logging.getLogger(__name__)


def git_commit() -> str:
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return (sha.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


class _CallCounter:
    """Counts forward calls of a module (to get transformers' own acceptance length)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_: object) -> None:
        self.calls += 1


def hf_generate(target: Target, ids: list[int], max_new: int, params: SamplingParams, **kw) -> tuple[int, float, int]:
    """transformers' generate() on one prompt: (new tokens, seconds, forward calls)."""
    counter = _CallCounter(target.backbone)
    sampling = (
        {"do_sample": False}
        if params.greedy
        else {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
    )
    t0 = time.perf_counter()
    out = target.model.generate(
        torch.tensor([ids], device=target.device),
        max_new_tokens=max_new,
        pad_token_id=target.eos_ids[0],
        eos_token_id=list(target.eos_ids),
        top_k=None,
        **sampling,
        **kw,
    )
    dt = time.perf_counter() - t0
    counter.handle.remove()
    return out.shape[1] - len(ids), dt, counter.calls


def _hf_row(tokens: int, secs: float, verify_calls: int, later_tokens: int) -> dict:
    """Summary of transformers' runs; tau = tokens after the first per forward after the prefill."""
    return {
        "tokens_per_s": round(tokens / max(secs, 1e-9), 3),
        "new_tokens": tokens,
        "seconds": round(secs, 3),
        "tau": round(later_tokens / max(1, verify_calls), 4),
    }


def run_bench(cfg: BenchConfig, target: Target | None = None, progress: bool = True) -> dict:
    """Run the benchmark described by ``cfg``; returns the JSON-able result (also per data set)."""
    if cfg.target.threads:
        torch.set_num_threads(cfg.target.threads)
    target = target or load_target(cfg.target.path, cfg.target.dtype, cfg.target.device)
    drafter = build_drafter(cfg.drafter, target)
    params = SamplingParams(cfg.sampling.temperature, cfg.sampling.top_p)
    gen = torch.Generator().manual_seed(cfg.sampling.seed)
    max_new = cfg.sampling.max_new_tokens
    result: dict = {
        "config": to_dict(cfg),
        "dtype": str(target.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "commit": git_commit(),
        "torch": torch.__version__,
        "datasets": {},
    }
    for name in cfg.datasets:
        prompts = [target.encode_chat(p) for p in load_prompts(name, cfg.limit, cfg.gsm8k_path)]
        for i, ids in enumerate(prompts):
            target.check_prompt(ids, max_new, f"{name} prompt {i + 1}")
        for ids in prompts[: cfg.warmup]:  # untimed: first calls pay allocator and kernel warm-up
            speculative_generate(target, [ids], drafter, min(16, max_new), params, gen)
        plain, spec = SpecStats(), SpecStats()
        hf = {"plain": [0, 0.0, 0, 0], "pld": [0, 0.0, 0, 0]}  # tokens, seconds, verify calls, tokens - 1
        same = 0
        for ids in tqdm(prompts, desc=f"bench {name}", disable=not progress, unit="prompt"):
            a = speculative_generate(target, [ids], None, max_new, params, gen)
            b = speculative_generate(target, [ids], drafter, max_new, params, gen)
            plain.merge(a.stats)
            spec.merge(b.stats)
            same += int(a.tokens == b.tokens)
            if cfg.hf_baseline:
                for key, kw in (("plain", {}), ("pld", {"prompt_lookup_num_tokens": cfg.drafter.num_tokens})):
                    n, dt, calls = hf_generate(target, ids, max_new, params, **kw)
                    for j, v in enumerate((n, dt, calls - 1, n - 1)):
                        hf[key][j] += v
        row = {
            "prompts": len(prompts),
            "plain": plain.summary(),
            "spec": spec.summary(),
            "speedup": round(spec.tokens_per_s / plain.tokens_per_s, 4),
            "lossless": round(same / len(prompts), 4) if params.greedy else None,
        }
        if cfg.hf_baseline:
            row["hf_plain"], row["hf_pld"] = _hf_row(*hf["plain"]), _hf_row(*hf["pld"])
            row["hf_pld_speedup"] = round(row["hf_pld"]["tokens_per_s"] / row["hf_plain"]["tokens_per_s"], 4)
            row["speedup_vs_hf_plain"] = round(spec.tokens_per_s / row["hf_plain"]["tokens_per_s"], 4)
        result["datasets"][name] = row
    return result


def format_table(result: dict) -> str:
    """A plain-text table of the result, one line per data set."""
    hdr = (
        f"{'dataset':<10} {'n':>3} {'tau':>6} {'plain tok/s':>11} {'spec tok/s':>10} {'speedup':>7} "
        f"{'hf tok/s':>8} {'hf-pld tau':>10} {'hf-pld tok/s':>12} {'hf-pld x':>8} {'lossless':>8}"
    )
    lines = [hdr, "-" * len(hdr)]
    for name, r in result["datasets"].items():
        hp, hl = r.get("hf_plain", {}), r.get("hf_pld", {})
        lines.append(
            f"{name:<10} {r['prompts']:>3} {r['spec']['tau']:>6.2f} {r['plain']['tokens_per_s']:>11.1f} "
            f"{r['spec']['tokens_per_s']:>10.1f} {r['speedup']:>6.2f}x {hp.get('tokens_per_s', 0):>8.1f} "
            f"{hl.get('tau', 0):>10.2f} {hl.get('tokens_per_s', 0):>12.1f} {r.get('hf_pld_speedup', 0):>7.2f}x "
            f"{'' if r['lossless'] is None else r['lossless']:>8}"
        )
    lines.append(
        f"dtype={result['dtype']} threads={result['threads']} commit={result['commit']} "
        f"drafter={result['config']['drafter']['kind']} T={result['config']['sampling']['temperature']} "
        f"max_new_tokens={result['config']['sampling']['max_new_tokens']}"
    )
    return "\n".join(lines)


def save_result(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
