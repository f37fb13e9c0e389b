"""``draftopd data --engine vllm``: target trajectories from vLLM's offline API (``vllm.LLM``), optional.

vLLM is not a dependency: ``scripts/vllm_env.sh`` makes a side virtualenv (``.venv-vllm``) with vLLM's CPU
build and draftopd, and ``draftopd data --engine vllm`` runs there (or wherever ``import vllm`` works: on a GPU
its paged, continuously batched decoding is far ahead of a ``generate``-style loop). Prompts go in as token ids
(the same chat-templated ids the ``hf`` engine uses) and responses come back as token ids, EOS included as the
``hf`` engine includes it, so the shards are the same format; in greedy fp32 they are the same tokens
(tests/test_vllm.py checks 16 prompts on the default target).

What a vLLM CPU user otherwise hits, handled here:

* the dtype is the target's resolved dtype (``float32`` or ``bfloat16``), never vLLM's ``auto`` (bf16 on any
  CPU, 3-8x slower than fp32 without AVX512-BF16/AMX);
* ``enforce_eager=True`` unless ``$DRAFTOPD_VLLM_COMPILE=1``: a start otherwise compiles the model with
  inductor for minutes (~6.5 min on a 2-core CPU), longer than a small data run;
* ``$VLLM_CPU_KVCACHE_SPACE`` (GiB) defaults to 2 and ``$VLLM_CPU_OMP_THREADS_BIND`` to the first
  ``target.threads`` cores (``nobind`` when threads is 0) when not set;
* the engine core runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` unless set): vLLM's own
  process is started with ``spawn``, which re-runs an unguarded ``__main__``; in-process needs no guard.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from draftopd import DraftopdError

log = logging.getLogger(__name__)

VLLM_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def vllm_available() -> bool:
    """True when ``import vllm`` works (cheap: only the spec is looked up)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VllmEngine:
    """One ``vllm.LLM`` over a model folder; ``generate`` takes and returns token ids. ``speculative`` is vLLM's
    ``speculative_config`` (a served drafter: ``scripts/vllm_serve.py``); ``counters`` reads its spec-decode
    counters."""

    def __init__(
        self,
        model: str,
        dtype: torch.dtype,
        eos_ids: Sequence[int],
        max_len: int,
        max_seqs: int,
        threads: int = 0,
        speculative: dict | None = None,
    ) -> None:
        if not vllm_available():
            raise DraftopdError(
                "engine vllm: vllm is not importable here: run scripts/vllm_env.sh and use .venv-vllm/bin/draftopd"
            )
        vdtype = VLLM_DTYPES.get(dtype)
        if vdtype is None:
            raise DraftopdError(f"engine vllm: unsupported dtype {dtype}")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads else "nobind")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        self.eos = list(eos_ids)
        start = time.perf_counter()
        try:
            self.llm = LLM(
                model=model,
                dtype=vdtype,
                enforce_eager=os.environ.get("DRAFTOPD_VLLM_COMPILE", "") != "1",
                max_model_len=max_len,
                max_num_seqs=max_seqs,
                seed=0,
                speculative_config=speculative,
                disable_log_stats=speculative is None,  # the spec-decode counters need the stats on
            )
        except Exception as e:  # noqa: BLE001 - vLLM raises many types: one line, the cause kept in the log
            log.debug("vLLM start failed", exc_info=True)
            raise DraftopdError(f"engine vllm: could not start vLLM ({_first_line(e)})") from None
        log.info("vLLM %s started in %.1f s (dtype %s)", _version(), time.perf_counter() - start, vdtype)

    def counters(self) -> dict[str, float]:
        """vLLM's counters by name (``vllm:spec_decode_num_drafts``, ``..._num_accepted_tokens``, ...)."""
        return {m.name: m.value for m in self.llm.get_metrics() if isinstance(getattr(m, "value", None), int | float)}

    def per_position(self) -> list[int]:
        """Accepted draft tokens by position (``vllm:spec_decode_num_accepted_tokens_per_pos``)."""
        found = [m.values for m in self.llm.get_metrics() if m.name.endswith("num_accepted_tokens_per_pos")]
        return list(found[0]) if found else []

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float, seed: int
    ) -> list[list[int]]:
        """New token ids per prompt, in order; greedy when ``temperature`` is 0 (then ``top_p``/``seed`` unused)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                temperature=temperature,
                top_p=top_p if temperature > 0 else 1.0,
                seed=seed + i if temperature > 0 else None,
                max_tokens=max_new_tokens,
                stop_token_ids=self.eos,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outs: list[Any] = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False
        )
        return [list(o.outputs[0].token_ids) for o in outs]


def _version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "?"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
