"""Greedy decoding of token-id prompts in vLLM's offline API, plain or with an exported drafter; prints JSON.

Run with the vLLM side virtualenv (``bash scripts/vllm_env.sh`` makes it); tests/test_vllm.py drives it:

    .venv-vllm/bin/python scripts/vllm_serve.py --target TARGET --prompts prompts.json --max-new-tokens 64 \
        [--method eagle3|dflash --drafter EXPORTED_FOLDER --k 5] [--dtype float32]

``prompts.json`` is a list of token-id lists (already chat-templated). The JSON printed on the last line has
``tokens`` (new token ids per prompt, EOS included), ``drafts`` and ``accepted`` (vLLM's spec-decode counters:
verify steps that carried drafts, and draft tokens accepted; tau = 1 + accepted / drafts), ``per_pos``
(accepted drafts by position), ``per_prompt`` ([drafts, accepted] per prompt, with ``--each``), ``seconds``
(generation only) and ``vllm`` (its version). The engine's set-up (float32, eager, KV cache space, in-process
engine core) is ``draftopd.data.vllm_engine``'s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DRAFTS, ACCEPTED = "vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens"


def main() -> None:
    from draftopd.data.vllm_engine import VllmEngine

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="target model folder")
    p.add_argument("--prompts", required=True, help="json file: a list of token-id lists")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--method", choices=["none", "eagle3", "dflash"], default="none")
    p.add_argument("--drafter", help="a folder written by `draftopd export --to vllm`")
    p.add_argument("--k", type=int, default=5, help="num_speculative_tokens")
    p.add_argument("--eos", type=int, nargs="*", default=[], help="stop token ids (the target's EOS ids)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--batch", type=int, default=8, help="max_num_seqs")
    p.add_argument("--each", action="store_true", help="one prompt at a time: counters per prompt (per_prompt)")
    a = p.parse_args()
    prompts = json.loads(Path(a.prompts).read_text())
    spec = None if a.method == "none" else {"method": a.method, "model": a.drafter, "num_speculative_tokens": a.k}
    max_len = max(map(len, prompts)) + a.max_new_tokens + a.k + 1
    engine = VllmEngine(a.target, DTYPES[a.dtype], a.eos, max_len, a.batch, speculative=spec)
    start, per_prompt = time.perf_counter(), []
    if a.each:
        tokens = []
        for ids in prompts:
            before = engine.counters() if spec else {}
            tokens += engine.generate([ids], a.max_new_tokens, 0.0, 1.0, 0)
            after = engine.counters() if spec else {}
            per_prompt.append([after.get(k, 0) - before.get(k, 0) for k in (DRAFTS, ACCEPTED)])
    else:
        tokens = engine.generate(prompts, a.max_new_tokens, 0.0, 1.0, 0)
    seconds = time.perf_counter() - start
    counters, per_pos = (engine.counters(), engine.per_position()) if spec else ({}, [])
    import vllm

    out = {
        "tokens": tokens,
        "drafts": counters.get(DRAFTS, 0),
        "accepted": counters.get(ACCEPTED, 0),
        "per_pos": per_pos,
        "per_prompt": per_prompt,
        "seconds": seconds,
        "vllm": vllm.__version__,
    }
    print(json.dumps(out))


if __name__ == "__main__":  # vLLM may start processes with spawn: nothing runs on import
    main()
