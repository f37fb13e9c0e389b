"""``draftopd demo``: the main job on the embedded default target.

For now (before learned drafters land) it shows the engine: one generation with every verify step made
visible, then a small side-by-side benchmark of plain decoding, prompt-lookup speculative decoding and
transformers' own prompt-lookup decoding on GSM8K, HumanEval and MT-bench prompts.
"""

from __future__ import annotations

import logging

from draftopd.bench.run import format_table, run_bench, save_result
from draftopd.config import BenchConfig
from draftopd.models.pld import PromptLookupDrafter
from draftopd.models.target import load_target
from draftopd.spec.decode import speculative_generate
from draftopd.spec.show import render_steps

log = logging.getLogger(__name__)

DEMO_PROMPT = "Write a Python function is_prime(n), then use it to list the primes below 20."


def run_demo(cfg: BenchConfig, out_json: str = "runs/demo/bench.json") -> str:
    """Generate once with the acceptance made visible, then benchmark; returns the printable report."""
    target = load_target(cfg.target.path, cfg.target.dtype, cfg.target.device)
    log.info("stage 1/2: one speculative generation with prompt lookup, each verify step shown")
    gen = speculative_generate(target, [target.encode_chat(DEMO_PROMPT)], PromptLookupDrafter(), 96, record=True)
    shown = render_steps(target.tokenizer, gen.tokens[0], gen.steps[0])
    log.info("stage 2/2: benchmark, %d prompts per data set, %d new tokens", cfg.limit, cfg.sampling.max_new_tokens)
    result = run_bench(cfg, target)
    save_result(result, out_json)
    return f"{DEMO_PROMPT}\n\n{shown}\n\n{format_table(result)}\n\nfull result: {out_json}"
