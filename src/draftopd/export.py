"""``draftopd export``: write a drafter folder in the layout SGLang and vLLM load, and check the round trip.

Our drafters are named after the serving checkpoints from the start (SGLang, vLLM and z-lab loader code), so export is
a save: ``model.safetensors`` (bf16 floats; EAGLE-3's ``d2t``/``t2d`` keep their integer/bool dtypes) and
``config.json``. The exported folder is reloaded and compared tensor by tensor before we report success.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from draftopd import DraftopdError
from draftopd.models import load_model

SERVE_HINTS = {
    "DFlashDraftModel": "sglang: --speculative-algorithm DFLASH --speculative-draft-model-path {out} "
    "--speculative-num-draft-tokens {block}\nvllm: --speculative-config "
    '\'{{"method": "dflash", "model": "{out}", "num_speculative_tokens": {k}}}\'',
    "LlamaForCausalLMEagle3": "sglang: --speculative-algorithm EAGLE3 --speculative-draft-model-path {out}\n"
    'vllm: --speculative-config \'{{"method": "eagle3", "model": "{out}", "num_speculative_tokens": 5}}\'',
}


def export_drafter(src: str | Path, out: str | Path, dtype: str = "bf16") -> str:
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise DraftopdError("export: the output folder must differ from the source")
    model = load_model(src)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    model.save(out, dtype=torch_dtype)
    saved = load_file(str(out / "model.safetensors"))
    # round trip: every tensor back, same values at the saved dtype (fc.weight with the feature scale folded in)
    for name, t in model.pack_state(fold=True).items():
        expect = t.to(torch_dtype) if t.is_floating_point() else t
        if name not in saved or not torch.equal(saved[name], expect):
            raise DraftopdError(f"export round trip failed at {name}")
    cfg = json.loads((out / "config.json").read_text())
    block = cfg.get("block_size", 16)
    return SERVE_HINTS[model.ARCH].format(out=out, block=block, k=block - 1)
