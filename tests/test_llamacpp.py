"""llama.cpp at the CPU user's end, where its side virtualenv exists (``bash scripts/gguf_env.sh``; skipped otherwise,
and failed instead where ``DRAFTOPD_ENGINE_CHECKS=1``: CI's engine step).

* ``draftopd export --to gguf`` on tiny drafters of a tiny target (seconds): llama.cpp's converter writes the tensor
  names, types and metadata llama.cpp reads (a golden list per kind, written from llama.cpp's ``gguf-py``
  ``MODEL_ARCH.EAGLE3``/``DFLASH`` tensor lists and ``conversion/llama.py``/``qwen.py``), export's own check holds
  every tensor byte for byte, and that check refuses a file that does not match the drafter (one line naming it).
* llama.cpp (xllamacpp, ``scripts/llamacpp_serve.py``) loads those files and decodes greedily with the drafter
  exactly as without it (the tiny target: random weights, nothing accepted; the losslessness of the plumbing).
* The serve check: an EAGLE-3 and a DFlash drafter of the default target (conftest's ``quick_drafter``, shared with
  the vLLM check), exported with ``--to gguf --dtype fp32``, served by llama.cpp against the target's Q4_1 file (the
  wheel's) and an F32 GGUF of our weights, greedy, 16 GSM8K prompts x 64 new tokens, batch 1, 2 threads
  (``DRAFTOPD_LLAMACPP_THREADS``): the token ids with the drafter equal llama.cpp's own without it, prompt by prompt,
  for both target dtypes. It prints llama.cpp's draft acceptance and tau beside ``draftopd bench``'s (tau_only,
  ungated, the same prompts and chain) and llama.cpp's tokens/s with and without the drafter (not of record: CI's
  machine is not idle; the measurement of record is ``scripts/llamacpp_bench.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from draftopd import DraftopdError, assets
from draftopd.config import ArchConfig, BenchConfig
from draftopd.export import export_drafter
from draftopd.llamacpp import check_drafter, gguf_venv, read_gguf, write_target
from draftopd.models.io import DRAFTERS, read_drafter, write_drafter
from draftopd.models.layouts import for_engines
from draftopd.models.target import load_target
from draftopd.recipes import load

from helpers import SERVE_NEW

ROOT = Path(__file__).resolve().parents[1]
PY = gguf_venv() / "bin" / "python"
REQUIRED = os.environ.get("DRAFTOPD_ENGINE_CHECKS") == "1"  # CI's engine step: a missing venv fails, not skips
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not PY.exists() and not REQUIRED, reason=f"no llama.cpp side venv at {gguf_venv()} (bash scripts/gguf_env.sh)"
    ),
]
SERVE_PROMPTS = 16  # GSM8K test_dev prompts of the serve check
THREADS = int(os.environ.get("DRAFTOPD_LLAMACPP_THREADS", "2"))  # 1 on a busy machine: 2 OpenMP threads on 2
# shared cores wait on each other (seen here: 16 prompts x 64 tokens plain Q4_1 took > 15 min at load 11)

# What llama.cpp's converter writes for our plain layout (names, GGML type at --outtype f32, numpy shape), per kind;
# L: the drafter's layers. EAGLE-3: llama's tensors + fc, attn_norm_2 (hidden_norm), the reduced head, d2t (I64, t2d
# dropped); DFlash: qwen3's (q/k norms) + fc, enc.output_norm (hidden_norm), no embedding or head.
LAYER = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
GOLDEN = {
    "eagle3": lambda L: (
        {"fc.weight", "output_norm.weight", "output.weight", "d2t", "blk.0.attn_norm_2.weight"}
        | {f"blk.0.{n}.weight" for n in LAYER}
    ),
    "dflash": lambda L: (
        {"fc.weight", "enc.output_norm.weight", "output_norm.weight"}
        | {f"blk.{i}.{n}.weight" for i in range(L) for n in [*LAYER, "attn_q_norm", "attn_k_norm"]}
    ),
}


def _run(cmd: list[str], timeout: int = 1800) -> str:
    env = {**os.environ, "PYTHONPATH": "", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def serve(target: Path, prompts: Path, new: int, drafter: Path | None = None, spec: str = "", k: int = 0) -> dict:
    """scripts/llamacpp_serve.py in the side venv: its JSON."""
    cmd = [str(PY), str(ROOT / "scripts" / "llamacpp_serve.py"), "--target", str(target), "--prompts", str(prompts)]
    cmd += ["--max-new-tokens", str(new), "--threads", str(THREADS)]
    if drafter is not None:
        cmd += ["--drafter", str(drafter), "--spec-type", spec, "--n-max", str(k)]
    return json.loads(_run(cmd).strip().splitlines()[-1])


# --- tiny: the files and the plumbing ---


@pytest.fixture(scope="module")
def tiny_exports(tiny_folder, tmp_path_factory) -> dict[str, Path]:
    """A DFlash (2 layers, block 4) and an EAGLE-3 drafter (draft vocabulary 512) of the tiny target, random
    weights, exported --to gguf --dtype fp32 with an F32 target; and the EAGLE-3 one again in q8_0."""
    target = load_target(str(tiny_folder), "fp32")
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("gguf-tiny")
    out = {}
    for kind, arch in (
        ("dflash", ArchConfig(kind="dflash", num_layers=2, block_size=4)),
        ("eagle3", ArchConfig(kind="eagle3", draft_vocab_size=512)),
    ):
        final = root / f"{kind}-final"
        write_drafter(DRAFTERS[kind].build(target, arch, []), final, "final", torch.float32)
        out[kind] = root / f"{kind}-gguf"
        export_drafter(final, out[kind], "fp32", to="gguf", target=str(tiny_folder), target_dtype="f32")
    out["eagle3-q8_0"] = root / "eagle3-gguf-q8"
    export_drafter(
        root / "eagle3-final", out["eagle3-q8_0"], "q8_0", to="gguf", target=str(tiny_folder), target_dtype="none"
    )
    return out


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_gguf_export_writes_what_llamacpp_reads(kind, tiny_exports, tiny_folder):
    folder = tiny_exports[kind]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "draft.gguf", "target-F32.gguf"]
    model = for_engines(read_drafter(folder.parent / f"{kind}-final"))
    c = model.config
    fields, tensors = read_gguf(folder / "draft.gguf")
    layers = c.num_hidden_layers if kind == "dflash" else 1
    assert set(tensors) == GOLDEN[kind](layers)
    ids = [i + 1 for i in c.target_layer_ids]  # llama.cpp numbers a layer by its input, as vLLM does
    assert fields["general.architecture"] == kind
    assert fields[f"{kind}.target_layers"] == ids
    assert fields[f"{kind}.block_count"] == layers
    assert fields[f"{kind}.embedding_length"] == c.hidden_size == 32
    assert fields["tokenizer.ggml.tokens"] == c.vocab_size == 49152  # the target's tokenizer, from its folder
    if kind == "dflash":
        assert fields["dflash.block_size"] == c.block_size == 4
        assert fields["tokenizer.ggml.mask_token_id"] == c.mask_token_id
        assert {t for t, _ in tensors.values()} == {"F32"}
    else:
        assert fields["eagle3.target_hidden_size"] == 32
        assert tensors["output.weight"][1].shape == (512, 32)  # the reduced head, as trained
        d2t = tensors["d2t"]
        assert d2t[0] == "I64"  # absolute target ids of the draft vocabulary, ascending
        assert np.array_equal(d2t[1], (model.d2t.long() + torch.arange(512)).numpy())
        assert sorted(p.name for p in tiny_exports["eagle3-q8_0"].iterdir()) == ["README.md", "draft.gguf"]
        q8 = read_gguf(tiny_exports["eagle3-q8_0"] / "draft.gguf")[1]
        matrices = ["fc.weight", "output.weight", *(f"blk.0.{n}.weight" for n in LAYER if "norm" not in n)]
        assert {n: t for n, (t, _) in q8.items() if t != "F32"} == {**dict.fromkeys(matrices, "Q8_0"), "d2t": "I64"}
    tf, _ = read_gguf(folder / "target-F32.gguf")
    assert (tf["general.architecture"], tf["llama.block_count"], tf["general.file_type"]) == ("llama", 4, 0)
    card = (folder / "README.md").read_text()
    spec = "draft-dflash --spec-draft-n-max 3" if kind == "dflash" else "draft-eagle3 --spec-draft-n-max 5"
    assert f"llama-server -m {folder}/target-F32.gguf -md {folder}/draft.gguf --spec-type {spec}" in card


def test_gguf_check_refuses_a_file_that_is_not_the_drafter(tiny_exports):
    folder = tiny_exports["eagle3"]
    model = for_engines(read_drafter(folder.parent / "eagle3-final"))
    assert check_drafter(folder / "draft.gguf", model)["blk.0.attn_q.weight"] == "F32"  # q/k rows in rotary order
    with torch.no_grad():
        model.fc.weight[0, 0] += 1e-6
    with pytest.raises(DraftopdError, match=r"tensor fc.weight \(F32\) differs from the drafter's fc.weight"):
        check_drafter(folder / "draft.gguf", model)
    other = for_engines(read_drafter(folder.parent / "dflash-final"))
    with pytest.raises(DraftopdError, match="general.architecture is 'eagle3', expected 'dflash'"):
        check_drafter(folder / "draft.gguf", other)


def test_gguf_export_refusals(tiny_exports, tiny_folder, tmp_path, monkeypatch):
    final = tiny_exports["dflash"].parent / "dflash-final"
    with pytest.raises(DraftopdError, match="q4_1 is the embedded default target's own file"):
        export_drafter(final, tmp_path / "a", "fp32", to="gguf", target=str(tiny_folder), target_dtype="q4_1")
    with pytest.raises(DraftopdError, match="--target-dtype is for --to gguf"):
        export_drafter(final, tmp_path / "b", "fp32", to="sglang", target_dtype="f32")
    with pytest.raises(DraftopdError, match=r"--dtype 'q8_0'.*\(and q8_0 with --to gguf\)"):
        export_drafter(final, tmp_path / "c", "q8_0", to="vllm")
    monkeypatch.setenv("DRAFTOPD_GGUF_VENV", str(tmp_path / "nowhere"))
    with pytest.raises(DraftopdError, match="run `bash scripts/gguf_env.sh`"):
        export_drafter(final, tmp_path / "d", "fp32", to="gguf", target=str(tiny_folder))
    assert not any((tmp_path / n).exists() for n in "abcd")


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_llamacpp_tiny_with_drafter_equals_without(kind, tiny_exports, tiny_folder, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([tok.encode(f"Question {i}: what is {i} + {i}?") for i in range(3)]))
    folder = tiny_exports[kind]
    plain = serve(folder / "target-F32.gguf", prompts, 24)
    spec = serve(folder / "target-F32.gguf", prompts, 24, folder / "draft.gguf", f"draft-{kind}", 3)
    assert spec["tokens"] == plain["tokens"] and all(len(t) > 0 for t in plain["tokens"])
    assert spec["drafts"] > 0 and plain["drafts"] == 0  # it drafted (random weights: acceptance is luck)


# --- the serve check: the default target, drafters trained by the project ---


@pytest.fixture(scope="module")
def served(real_target_fp32, tmp_path_factory) -> dict:
    """The serve check's prompts (16 GSM8K test_dev, chat-templated token ids) and both target GGUFs: the wheel's
    Q4_1 file and an F32 one converted from our de-quantised weights; plain llama.cpp decoding of each, cached."""
    from draftopd.data.eval_sets import load_prompts

    root = tmp_path_factory.mktemp("gguf-serve")
    ids = [real_target_fp32.encode_chat(p) for p in load_prompts("gsm8k", SERVE_PROMPTS)]
    (root / "prompts.json").write_text(json.dumps(ids))
    targets = {}
    for dtype in ("q4_1", "f32"):
        targets[dtype] = root / f"target-{dtype.upper()}.gguf"
        write_target(assets.default_target_dir(), dtype, targets[dtype])
    return {"root": root, "ids": ids, "targets": targets, "plain": {}}


@pytest.mark.parametrize("kind", ["eagle3", "dflash"])
def test_llamacpp_serves_our_gguf_lossless(kind, quick_drafter, served, real_target_fp32, tmp_path):
    from draftopd.bench.run import run_bench
    from draftopd.decoding.loop import speculative_generate

    final = quick_drafter(kind)
    out = tmp_path / f"{kind}-gguf"
    export_drafter(final, out, "fp32", to="gguf")  # the default target's Q4_1 beside it
    assert (out / "target-Q4_1.gguf").stat().st_size == served["targets"]["q4_1"].stat().st_size
    model = read_drafter(final)
    from draftopd.models.layouts import layout_of

    k = layout_of(model).serve_tokens(model.config)
    sets = [
        "target.dtype=fp32",
        f"target.threads={THREADS}",
        "datasets=[gsm8k]",
        f"limit={SERVE_PROMPTS}",
        f"sampling.max_new_tokens={SERVE_NEW}",
        "tau_only=true",
        "drafter.kind=path",
        f"drafter.path={final}",
        "drafter.confidence=0",
        f"drafter.chain_length={k}",
    ]
    (row,) = run_bench(load(BenchConfig, None, sets), real_target_fp32, progress=False)["datasets"]["gsm8k"][
        "methods"
    ].values()
    ours_plain = speculative_generate(real_target_fp32, served["ids"], None, SERVE_NEW).tokens
    tau_o = sum(t for t, _ in row["per_prompt"]) / sum(s for _, s in row["per_prompt"])
    acc_o = sum(t - s for t, s in row["per_prompt"])
    lines = [f"\n{kind}, k {k}: draftopd bench tau {row['tau']:.4f} (accepted {acc_o} drafts)"]
    prompts = served["root"] / "prompts.json"
    for dtype, tgt in served["targets"].items():
        if dtype not in served["plain"]:
            served["plain"][dtype] = serve(tgt, prompts, SERVE_NEW)
        plain = served["plain"][dtype]
        spec = serve(tgt, prompts, SERVE_NEW, out / "draft.gguf", layout_of(model).SPEC_TYPE, k)
        # greedy: llama.cpp with our drafter = llama.cpp without it, token for token, every prompt
        assert spec["tokens"] == plain["tokens"], (dtype, kind)
        committed = sum(g - 1 for _, _, g, _ in spec["per_prompt"])  # after the prompt's own token, as ours counts
        tau_l = committed / (committed - spec["accepted"])
        same = sum(a == b for a, b in zip(plain["tokens"], ours_plain, strict=True))
        lines.append(
            f"  target {dtype.upper()}: llama.cpp tau {tau_l:.4f}, accepted {spec['accepted']} of {spec['drafts']} "
            f"drafted ({spec['accepted'] / max(spec['drafts'], 1):.1%}); tok/s plain {plain['tok_s']:.1f}, with "
            f"drafter {spec['tok_s']:.1f} ({spec['tok_s'] / plain['tok_s']:.2f}x); plain text = draftopd's fp32 "
            f"greedy on {same}/{SERVE_PROMPTS} prompts"
        )
        if dtype == "f32":  # the same weights as ours: acceptance within reach of ours (kernels differ, not much)
            assert spec["accepted"] > 0 and abs(tau_l - tau_o) <= 0.1 * tau_o, lines
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-s"]))
