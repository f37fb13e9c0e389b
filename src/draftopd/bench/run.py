"""``draftopd bench``: acceptance length and wall-clock speed-up of named drafters (methods), side by side.

``run_methods`` is the one loop: every method on each batch of prompts in turn, on the same loaded target. The
timed bench runs it at batch 1 with plain decoding (our loop, no drafter) as the baseline and, as the tool users
already have, transformers' ``generate()`` plain and with prompt-lookup decoding; interleaving per prompt spreads
machine noise evenly over the methods. Speed-ups are ratios of total tokens over total seconds within one data
set. ``lossless`` counts prompts whose speculative tokens equal our plain greedy tokens (1.0 expected in fp32;
bf16 kernels round differently at different block widths, so equality is only guaranteed in fp32). The tau-only
bench runs the same loop batched, greedy and untimed. Recipes: ``configs/bench*.yaml``; ``bench/cost.py`` turns a
timed result into the step-cost table (``--costs``).
"""

from __future__ import annotations

import logging
import random
import subprocess
import time
from pathlib import Path

import torch
from tqdm import tqdm

from draftopd import DraftopdError
from draftopd.atomic import check_output_file, write_json
from draftopd.config import BenchConfig, DrafterConfig
from draftopd.data.eval_sets import load_prompts
from draftopd.decoding.interface import Drafter
from draftopd.decoding.loop import SpecStats, speculative_generate
from draftopd.decoding.sampling import SamplingParams
from draftopd.models.io import build_drafter
from draftopd.models.target import Target, load_target
from draftopd.recipes import to_dict

log = logging.getLogger(__name__)


def git_commit() -> str:
    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=root, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return (sha.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def cpu_flags() -> str:
    """The CPU's matmul-relevant instruction sets (every figure states them): amx, avx512_bf16, avx512f, avx2."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    have = [f for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if f in flags]
    return " ".join(have) or "none of amx/avx512/avx2"


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


PLAIN = "plain"  # the baseline's row: plain decoding through the same loop (a method with drafter None)


def run_methods(
    target: Target,
    prompts: list[list[int]],
    methods: dict[str, Drafter | None],
    max_new: int,
    params: SamplingParams = SamplingParams(),  # noqa: B008 (frozen dataclass)
    gen: torch.Generator | None = None,
    batch_size: int = 1,
    warmup: int = 0,
    hf_pld_tokens: int = 0,
    desc: str = "bench",
    progress: bool = True,
) -> dict[str, dict]:
    """THE benchmark loop: every method on each batch of ``batch_size`` prompts in turn, so machine noise spreads
    evenly over the methods (batch 1: prompt by prompt, what the timed bench runs). One row per method:
    ``SpecStats.summary()`` plus ``step_ms`` (ms per verify step, drafting included). With a ``plain`` method
    (drafter None) also ``speedup``, tokens/s over plain's, and ``lossless``, the share of prompts whose tokens
    equal plain's (None when sampling). ``warmup``: that many prompts of every method first, untimed and
    unrecorded. ``hf_pld_tokens > 0`` (batch 1) adds transformers' generate(), plain and with prompt lookup of
    that many tokens."""
    if hf_pld_tokens and (batch_size != 1 or PLAIN not in methods):
        raise DraftopdError("transformers' generate() is timed at batch 1 only, beside plain decoding")
    for ids in prompts[:warmup]:  # first calls pay allocator and kernel warm-up
        for drafter in methods.values():
            speculative_generate(target, [ids], drafter, min(16, max_new), params, gen)
    stats = {name: SpecStats() for name in methods}
    same = dict.fromkeys(methods, 0)  # prompts whose tokens equal plain decoding's
    hf = {"hf_plain": [0, 0.0, 0, 0], "hf_pld": [0, 0.0, 0, 0]}  # tokens, seconds, verify calls, tokens - 1
    starts = range(0, len(prompts), batch_size)
    for i in tqdm(starts, desc=desc, disable=not progress, unit="prompt" if batch_size == 1 else "batch"):
        batch = prompts[i : i + batch_size]
        tokens = {}  # name -> new tokens per prompt of the batch
        for name, drafter in methods.items():
            g = speculative_generate(target, batch, drafter, max_new, params, gen)
            stats[name].merge(g.stats)
            tokens[name] = g.tokens
        if PLAIN in tokens:
            for name in methods:
                same[name] += sum(a == b for a, b in zip(tokens[name], tokens[PLAIN], strict=True))
        if hf_pld_tokens:
            for key, kw in (("hf_plain", {}), ("hf_pld", {"prompt_lookup_num_tokens": hf_pld_tokens})):
                n, dt, calls = hf_generate(target, batch[0], max_new, params, **kw)
                for j, v in enumerate((n, dt, calls - 1, n - 1)):
                    hf[key][j] += v
    out = {}
    for name, st in stats.items():
        out[name] = {**st.summary(), "step_ms": round(1000 * st.decode_s / max(1, st.verifies), 3)}
        if PLAIN in stats:
            out[name]["speedup"] = round(st.tokens_per_s / stats[PLAIN].tokens_per_s, 4)
            out[name]["lossless"] = round(same[name] / len(prompts), 4) if params.greedy else None
    if PLAIN in out:
        out[PLAIN]["lossless"] = 1.0
    if hf_pld_tokens:
        for key in hf:
            out[key] = {**_hf_row(*hf[key]), "lossless": None}
            out[key]["speedup"] = round(out[key]["tokens_per_s"] / stats[PLAIN].tokens_per_s, 4)
        out["hf_pld"]["speedup_vs_hf_plain"] = round(
            out["hf_pld"]["tokens_per_s"] / out["hf_plain"]["tokens_per_s"], 4
        )
    return out


def build_methods(cfg: BenchConfig, target: Target) -> dict[str, Drafter | None]:
    """The engine-side drafter of every method ``cfg`` names (``BenchConfig.method_configs``), in its order."""
    return {name: build_drafter(d, target) for name, d in cfg.method_configs().items()}


TAU_KEYS = ("tau", "new_tokens", "tau_histogram", "per_prompt")  # a tau_only row: nothing timed


def run_bench(cfg: BenchConfig, target: Target | None = None, progress: bool = True) -> dict:
    """Run the benchmark described by ``cfg``; returns the JSON result. Timed (batch 1, plain decoding first as the
    baseline) unless ``cfg.tau_only`` (batched, greedy, no baseline, rows cut to ``TAU_KEYS``): both through
    ``run_methods``."""
    if cfg.target.threads:
        torch.set_num_threads(cfg.target.threads)
    target = target or load_target(cfg.target.path, cfg.target.dtype, cfg.target.device, cfg.target.fast)
    drafters = build_methods(cfg, target)
    max_new = cfg.sampling.max_new_tokens
    result: dict = {
        "config": to_dict(cfg),
        "dtype": str(target.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "commit": git_commit(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "datasets": {},
    }
    every = {}  # every data set read and checked before anything runs: a bad one fails first, not last
    for ds in cfg.datasets:
        every[ds] = [target.encode_chat(p) for p in load_prompts(ds, cfg.limit)]
        for i, ids in enumerate(every[ds]):
            target.check_prompt(ids, max_new, f"{ds} prompt {i + 1}")
    params = SamplingParams(cfg.sampling.temperature, cfg.sampling.top_p)
    gen = torch.Generator(target.device).manual_seed(cfg.sampling.seed)
    pld = [d.num_tokens for d in cfg.method_configs().values() if d.kind == "pld"]
    hf = (pld or [DrafterConfig().num_tokens])[0] if cfg.hf_baseline else 0  # the first pld method's, else 10
    for ds, prompts in every.items():
        if cfg.tau_only:  # tau and its histogram per method: greedy (the prompts pair), batched, untimed
            rows = run_methods(
                target, prompts, drafters, max_new, batch_size=cfg.batch_size, desc=f"tau {ds}", progress=progress
            )
            rows = {name: {k: row[k] for k in TAU_KEYS} for name, row in rows.items()}
        else:  # batch 1, timed, plain decoding first
            methods = {PLAIN: None, **drafters}
            rows = run_methods(
                target, prompts, methods, max_new, params, gen,
                warmup=cfg.warmup, hf_pld_tokens=hf, desc=f"bench {ds}", progress=progress,
            )  # fmt: skip
        result["datasets"][ds] = {"prompts": len(prompts), "methods": rows}
    return result


LOSSLESS_NOTE = (
    "* {dtype}: 'lossless' is the share of prompts whose speculative text equals plain {dtype} decoding's. In {dtype} "
    "the target's kernels round differently for a {{k+1}}-token verify than for a 1-token step, so near-ties can "
    "flip and the texts drift apart: that is numerics, not the accept rule. Exact equality is checked in fp32 "
    "(--dtype fp32), where it is 1.0."
)


def paired_gain(base: list, other: list, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """tau(other) / tau(base) - 1 over the same prompts, with a 95% bootstrap interval over prompts.

    ``base``/``other``: per-prompt ``[tokens committed, verify steps]`` (a bench result's ``per_prompt``).
    Greedy decoding is lossless, so both methods commit the same tokens on a prompt and differ only in the
    number of verify steps: resampling prompts *pairs* them, and the interval shows how much of a gain the
    choice of prompts alone could make (not run-to-run training noise)."""
    if len(base) != len(other) or not base:
        raise DraftopdError(f"paired_gain: {len(base)} vs {len(other)} prompts")

    def gain(idx) -> float:
        tau_b = sum(base[i][0] for i in idx) / max(1, sum(base[i][1] for i in idx))
        tau_o = sum(other[i][0] for i in idx) / max(1, sum(other[i][1] for i in idx))
        return tau_o / tau_b - 1

    rng = random.Random(seed)
    n = len(base)
    boots = sorted(gain([rng.randrange(n) for _ in range(n)]) for _ in range(n_boot))
    return gain(range(n)), boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]


def format_table(result: dict) -> str:
    """A plain-text table of the result, one line per data set and method."""
    if result["config"].get("tau_only"):  # greedy: every method commits the same tokens, so prompts pair
        lines = [f"{'dataset':<10} {'method':<24} {'n':>4} {'tau':>6}  vs the first method [95% CI over prompts]"]
        for ds, r in result["datasets"].items():
            base = next(iter(r["methods"].values()))
            for name, m in r["methods"].items():
                vs = ""
                if m is not base and "per_prompt" in m and "per_prompt" in base:
                    g, lo, hi = paired_gain(base["per_prompt"], m["per_prompt"])
                    vs = f"  {100 * g:+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}]"
                lines.append(f"{ds:<10} {name[:24]:<24} {r['prompts']:>4} {m['tau']:>6.3f}{vs}")
        return "\n".join(lines) + f"\ndtype={result['dtype']} commit={result['commit']} (tau only, batched)"
    exact = result["dtype"] == "float32"  # only fp32 kernels give the same numbers at every block width
    hdr = f"{'dataset':<10} {'method':<14} {'n':>3} {'tau':>6} {'tok/s':>7} {'speedup':>8} {'lossless':>8}"
    lines = [hdr, "-" * len(hdr)]
    for ds, r in result["datasets"].items():
        for name, m in r["methods"].items():
            lossless = "" if m.get("lossless") is None else f"{m['lossless']}{'' if exact else '*'}"
            lines.append(
                f"{ds:<10} {name[:14]:<14} {r['prompts']:>3} {m['tau']:>6.2f} {m['tokens_per_s']:>7.1f} "
                f"{m['speedup']:>7.2f}x {lossless:>8}"
            )
    c = result["config"]
    lines.append(
        f"dtype={result['dtype']} threads={result['threads']} commit={result['commit']} "
        f"T={c['sampling']['temperature']} max_new_tokens={c['sampling']['max_new_tokens']}"
    )
    if not exact and c["sampling"]["temperature"] == 0:
        lines.append(LOSSLESS_NOTE.format(dtype=result["dtype"]))
    return "\n".join(lines)


def save_result(result: dict, path: str | Path) -> None:
    """Write the result JSON atomically (a temporary file renamed; nothing is left behind on failure)."""
    path = Path(path)
    check_output_file(path, "--json")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)


def plot_formats() -> set[str]:
    """File extensions matplotlib can write (``--plot`` must end in one)."""
    from matplotlib.figure import Figure

    return set(Figure().canvas.get_supported_filetypes())


def check_outputs(json_path: str | None, plot_path: str | None) -> None:
    """Every output location of a benchmark checked before it runs: one-line errors, nothing written."""
    if json_path:
        check_output_file(json_path, "--json")
    if plot_path:
        check_output_file(plot_path, "--plot")
        ext = Path(plot_path).suffix.lower().removeprefix(".")
        if ext not in plot_formats():
            raise DraftopdError(
                f"--plot {plot_path}: cannot write a {ext or 'nameless'} figure "
                f"(use one of {', '.join(sorted(plot_formats()))})"
            )
