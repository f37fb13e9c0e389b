"""``draftopd bench``: acceptance length and wall-clock speed-up of named drafters (methods), side by side.

``run_methods`` is the one loop: every method on each batch of prompts in turn, on the same loaded target. The
timed bench runs it at batch 1 with plain decoding (our loop, no drafter) as the baseline and, as the tool users
already have, transformers' ``generate()`` plain and with prompt-lookup decoding; interleaving per prompt spreads
machine noise evenly over the methods. Speed-ups are ratios of total tokens over total seconds within one data
set. The tau-only bench runs the same loop batched, greedy and untimed. Recipes: ``configs/bench*.yaml``;
``bench/cost.py`` turns timed results into the step-cost table, with the verify cost by width (``bench/curve.py``,
``--costs``); ``bench/budget.py`` resolves ``tree_budget: auto`` before the methods are built.

Lossless, measured where it is defined. Greedy speculative decoding is exact: its tokens equal the target's own
greedy tokens. That holds for the accept rule with exact arithmetic; in bf16 the target's kernels round a
``k+1``-token verify differently from a 1-token step (other matmul blocking, other reduction order), so a near-tie
between the top two logits can flip and the two texts drift apart from there on. Comparing bf16 speculative text
with bf16 plain text therefore measures numerics, and read "lossless 0.0" for a correct method. So the bench keeps
two numbers apart:

* ``lossless`` (greedy, timed bench): the share of the checked prompts whose speculative tokens equal plain
  decoding's, **both in fp32**. In an fp32 bench that is the timed run itself, every prompt; in any other dtype the
  first ``lossless_prompts`` prompts of each set are decoded again after the timed runs, every method and plain
  decoding, by an fp32 copy of the target (loaded once, from the timed target's own weights) with the methods'
  drafters built for it, those prompts in one batch (untimed; greedy fp32 is lossless batched too, as the tests
  check). 1.0 is expected; anything less is a bug in the method (or an exact fp32 tie: look). fp32
  is not bitwise width-invariant either, but its rounding is ~1e-7 relative against bf16's ~4e-3, so a flip needs
  a tie 5 orders of magnitude closer. ``None`` when sampling (the chi-square tests check the distribution) or
  when the check is off (``lossless_prompts: 0`` in a non-fp32 bench).
* ``text_agree`` and ``first_diff`` (every timed bench): the share of all prompts whose speculative text equals
  plain decoding's *in the bench's dtype*, and the mean index of the first differing token over the prompts whose
  texts differ (``None`` if none). In fp32 ``text_agree`` equals ``lossless``; in bf16 it is a diagnostic of the
  numerics, shown as its own column (``bf16 agree``).

The alternative, a batch-invariant verify in bf16, was not taken: it is not cheap. Plain decoding would have to
run its 1-token step at the verify's width (padding it to k+1 tokens, so the baseline pays a verify's cost: ~1.5x
a 1-token step at width 8 in fp32 on the machine of record, docs/BENCHMARKS.md, and it would no longer be plain
decoding), or the verify would run as k+1 one-token forwards (no speed-up left), or kernels with a fixed reduction
order at every width (torch's CPU kernels have none). The fp32 re-run costs one batched fp32 generation of
``lossless_prompts`` prompts per set and method, plain decoding included (on a CPU with AMX or AVX512-BF16, fp32
runs 2-5x slower than bf16, README), and the fp32 copy's memory (4 bytes per parameter) while it runs.

Results written before this split (no ``lossless_dtype`` key) called the bench-dtype agreement ``lossless``;
``lossless_columns`` reads them so: in fp32 it is both numbers, in bf16 only the agreement (lossless unchecked).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import statistics
import subprocess
import time
from pathlib import Path

import torch
from tqdm import tqdm

from draftopd import DraftopdError
from draftopd.atomic import check_output_file, write_json
from draftopd.bench.budget import resolve_budget
from draftopd.bench.cost import budget_choices, cost_dtypes, costs_result
from draftopd.bench.curve import width_costs
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
    (drafter None) also ``speedup``, tokens/s over plain's, and (greedy; None when sampling) ``text_agree``, the
    share of prompts whose tokens equal plain's in this target's dtype, and ``first_diff``, the mean index of the
    first differing token where they differ (None if none): exactness only where the dtype is fp32 (module
    docstring). ``warmup``: that many prompts of every method first, untimed and
    unrecorded. ``hf_pld_tokens > 0`` (batch 1) adds transformers' generate(), plain and with prompt lookup of
    that many tokens."""
    if hf_pld_tokens and (batch_size != 1 or PLAIN not in methods):
        raise DraftopdError("transformers' generate() is timed at batch 1 only, beside plain decoding")
    for ids in prompts[:warmup]:  # first calls pay allocator and kernel warm-up
        for drafter in methods.values():
            speculative_generate(target, [ids], drafter, min(16, max_new), params, gen)
    stats = {name: SpecStats() for name in methods}
    same = dict.fromkeys(methods, 0)  # prompts whose tokens equal plain decoding's
    diffs: dict[str, list[int]] = {name: [] for name in methods}  # index of the first differing token, per prompt
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
                for a, b in zip(tokens[name], tokens[PLAIN], strict=True):
                    same[name] += a == b
                    if a != b:
                        diffs[name].append(first_difference(a, b))
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
            agree = round(same[name] / len(prompts), 4) if params.greedy else None
            first = round(statistics.mean(diffs[name]), 1) if params.greedy and diffs[name] else None
            out[name] |= {"text_agree": agree, "first_diff": first}
    if hf_pld_tokens:
        for key in hf:
            out[key] = {**_hf_row(*hf[key]), "text_agree": None, "first_diff": None}
            out[key]["speedup"] = round(out[key]["tokens_per_s"] / stats[PLAIN].tokens_per_s, 4)
        out["hf_pld"]["speedup_vs_hf_plain"] = round(
            out["hf_pld"]["tokens_per_s"] / out["hf_plain"]["tokens_per_s"], 4
        )
    return out


def first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first token where two generations differ (the shorter one's length if it is a prefix)."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def fp32_copy(target: Target) -> Target:
    """An fp32 copy of ``target`` (its own weights, cast up: the timed model, with exact numerics)."""
    if target.dtype == torch.float32:
        return target
    copied = Target(copy.deepcopy(target.model).to(torch.float32), target.tokenizer, target.name)
    copied.set_fast(target.fast)  # a copy's linears are plain (models/fast.py): pack them again
    return copied


def lossless_check(
    cfg: BenchConfig, target: Target, every: dict[str, list[list[int]]], progress: bool = True
) -> dict[str, dict[str, float]]:
    """Per data set, per method: the share of the first ``cfg.lossless_prompts`` prompts whose greedy tokens equal
    plain greedy decoding's, both decoded by an fp32 copy of ``target`` with the methods' drafters built for it
    (those prompts in one batch, untimed). Plain decoding's own share is 1.0 by definition."""
    ref = fp32_copy(target)
    methods = {PLAIN: None, **build_methods(cfg, ref)}
    out = {}
    for ds, prompts in every.items():
        head = prompts[: cfg.lossless_prompts]
        rows = run_methods(
            ref, head, methods, cfg.sampling.max_new_tokens, batch_size=len(head), desc=f"lossless fp32 {ds}",
            progress=progress,
        )  # fmt: skip
        out[ds] = {name: row["text_agree"] for name, row in rows.items()}
    return out


def lossless_columns(result: dict, row: dict) -> tuple[float | None, float | None, float | None]:
    """(lossless, text_agree, first_diff) of a method's row of a timed result, any version: results written before
    the fp32 check (no ``lossless_dtype``) called the bench-dtype agreement ``lossless``, which is exactness only
    in fp32 (elsewhere: the agreement, lossless unchecked)."""
    if "lossless_dtype" in result:
        return row.get("lossless"), row.get("text_agree"), row.get("first_diff")
    old = row.get("lossless")
    return (old if result["dtype"] == "float32" else None), old, None


def build_methods(cfg: BenchConfig, target: Target) -> dict[str, Drafter | None]:
    """The engine-side drafter of every method ``cfg`` names (``BenchConfig.method_configs``), in its order."""
    return {name: build_drafter(d, target) for name, d in cfg.method_configs().items()}


def resolve_budgets(cfg: BenchConfig, target: Target) -> BenchConfig:
    """``cfg`` with every ``tree_budget: auto`` resolved for ``target`` (``budget.resolve_budget``)."""
    named = {name: resolve_budget(d, target) for name, d in cfg.method_configs().items()}
    if named == cfg.method_configs():
        return cfg
    if cfg.methods:
        return dataclasses.replace(cfg, methods=named)
    return dataclasses.replace(cfg, drafter=next(iter(named.values())))


TAU_KEYS = ("tau", "new_tokens", "tau_histogram", "per_prompt")  # a tau_only row: nothing timed


def run_bench(cfg: BenchConfig, target: Target | None = None, progress: bool = True) -> dict:
    """Run the benchmark described by ``cfg``; returns the JSON result. Timed (batch 1, plain decoding first as the
    baseline) unless ``cfg.tau_only`` (batched, greedy, no baseline, rows cut to ``TAU_KEYS``): both through
    ``run_methods``."""
    if cfg.target.threads:
        torch.set_num_threads(cfg.target.threads)
    target = target or load_target(cfg.target.path, cfg.target.dtype, cfg.target.device, cfg.target.fast)
    cfg = resolve_budgets(cfg, target)  # tree_budget auto -> this machine's measured choice (the result says which)
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
    lossless_dtype = "float32" if not cfg.tau_only else None
    result["lossless_dtype"] = lossless_dtype  # the dtype the lossless column is computed in (None: not reported)
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
    if not cfg.tau_only:
        _add_lossless(cfg, target, every, result, params.greedy, progress)
    return result


def _add_lossless(cfg: BenchConfig, target: Target, every: dict, result: dict, greedy: bool, progress: bool) -> None:
    """Each timed row's ``lossless`` (module docstring) and each data set's ``lossless_prompts`` (prompts checked):
    an fp32 bench's own agreement, else the fp32 re-run of the first ``lossless_prompts`` prompts, else None."""
    exact = target.dtype == torch.float32
    rerun = greedy and not exact and cfg.lossless_prompts > 0
    checked = lossless_check(cfg, target, every, progress) if rerun else {}
    for ds, r in result["datasets"].items():
        n = len(every[ds]) if exact else min(cfg.lossless_prompts, len(every[ds]))
        r["lossless_prompts"] = n if greedy and (exact or rerun) else 0
        for name, row in r["methods"].items():
            if name in ("hf_plain", "hf_pld") or not r["lossless_prompts"]:  # not our loop, or not checked
                row["lossless"] = None
            else:
                row["lossless"] = row["text_agree"] if exact else checked[ds][name]


SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # a dtype as the table's columns name it


def lossless_note(result: dict) -> str:
    """The table's footnote: what ``lossless`` and (outside fp32) ``<dtype> agree`` mean in this result (greedy)."""
    d = SHORT.get(result["dtype"], result["dtype"])
    n = max(r.get("lossless_prompts", 0) for r in result["datasets"].values())
    if result["dtype"] == "float32":  # the timed text itself, in results of any version
        return (
            "* lossless: share of prompts whose speculative tokens equal plain decoding's, fp32, every prompt "
            "(1.0 expected; less is a bug)."
        )
    if "lossless_dtype" not in result:  # written before the fp32 check
        return (
            f"* an older result: its 'lossless' was the {d} text agreement (shown as '{d} agree'); exactness was "
            "not checked in fp32."
        )
    checked = (
        f"* lossless: share of the first {n} prompts per set whose speculative tokens equal plain decoding's, both "
        "re-run in fp32 (1.0 expected; less is a bug)."
        if n
        else "* lossless: not checked (lossless_prompts: 0)."
    )
    return (
        f"{checked} {d} agree: share of all prompts whose {d} speculative text equals {d} plain decoding's text, "
        f"@ the mean index of the first differing token. A {d} k+1-token verify rounds differently from a 1-token "
        "step, so near-ties flip and the texts drift apart: numerics, not the accept rule."
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
    exact = result["dtype"] == "float32"  # fp32: the timed text is the exact check; else a column of its own
    agree_col = f"{SHORT.get(result['dtype'], result['dtype'])} agree"
    hdr = f"{'dataset':<10} {'method':<14} {'n':>3} {'tau':>6} {'tok/s':>7} {'speedup':>8} {'lossless':>9}"
    hdr += "" if exact else f" {agree_col:>12}"
    lines = [hdr, "-" * len(hdr)]
    for ds, r in result["datasets"].items():
        for name, m in r["methods"].items():
            lossless, agree, first = lossless_columns(result, m)
            cells = f"{'' if lossless is None else f'{lossless}*':>9}"
            if not exact:
                at = "" if first is None else f" @{first:.0f}"
                cells += f" {'' if agree is None else f'{agree:.2f}{at}':>12}"
            lines.append(
                f"{ds:<10} {name[:14]:<14} {r['prompts']:>3} {m['tau']:>6.2f} {m['tokens_per_s']:>7.1f} "
                f"{m['speedup']:>7.2f}x {cells}"
            )
    c = result["config"]
    lines.append(
        f"dtype={result['dtype']} threads={result['threads']} commit={result['commit']} "
        f"T={c['sampling']['temperature']} max_new_tokens={c['sampling']['max_new_tokens']}"
    )
    if c["sampling"]["temperature"] == 0:
        lines.append(lossless_note(result))
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


def run_costs(cfg: BenchConfig, target: Target | None = None, progress: bool = True) -> dict:
    """``bench --costs``: per dtype of ``cost_dtypes``, the bench's timed run and the verify cost by width on the
    same loaded target (``target``: the one to use, for a single dtype), then ``costs_result``."""
    runs, curves, choices = [], {}, {}
    c, dtypes = cfg.cost_curve, cost_dtypes(cfg)
    if target is not None and len(dtypes) != 1:
        raise DraftopdError(f"run_costs: one loaded target cannot run {' and '.join(dtypes)}: set target.dtype")
    for dtype in dtypes:
        one = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, dtype=dtype))
        t = target or load_target(one.target.path, dtype, one.target.device, one.target.fast)
        run = run_bench(one, t, progress=progress)
        cost_ms = width_costs(t, c.widths, c.context, c.reps)
        curves[run["dtype"]] = {
            "context": c.context,
            "reps": c.reps,
            "ms": {str(w): round(ms, 3) for w, ms in cost_ms.items()},
        }
        choices[run["dtype"]] = budget_choices(one, run, cost_ms, t)
        runs.append(run)
    return costs_result(runs, curves, choices)
