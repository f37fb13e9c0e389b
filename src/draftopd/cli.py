"""The ``draftopd`` console script: one verb per job, each a thin call into the library.

Every verb takes ``--config recipe.yaml`` and repeatable ``--set key.path=value`` overrides; the named
flags below are shorthands for the most common overrides. Defaults live in ``config.py`` only.
Bad input ends in one line on stderr (``error: ...``) and exit status 2; Ctrl-C in status 130.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from draftopd import DraftopdError, __version__
from draftopd.config import DTYPE_NAMES

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RECIPES = Path(__file__).resolve().parents[2] / "configs"  # the repository's recipes (src layout)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. sampling.temperature=0.7 (repeatable)",
    )
    p.add_argument(
        "--gsm8k",
        metavar="PATH",
        help="GSM8K folder (train.jsonl, test_dev.jsonl), one jsonl, or 'hub' (default: the shipped copy)",
    )


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="'default', a local HF model folder, or a hub id")
    p.add_argument("--drafter", help="'pld' (prompt lookup), 'none' (plain decoding), or a drafter folder")
    p.add_argument("--dtype", choices=("auto", *DTYPE_NAMES))
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")


def _overrides(args: argparse.Namespace) -> list[str]:
    """Turn the shorthand flags into dotted overrides (applied after --set, so they win)."""
    o = list(args.overrides)
    pairs = {
        "target": "target.path",
        "dtype": "target.dtype",
        "threads": "target.threads",
        "temperature": "sampling.temperature",
        "top_p": "sampling.top_p",
        "max_new_tokens": "sampling.max_new_tokens",
        "limit": "limit",
        "datasets": "datasets",
        "engine": "engine",
        "responses": "responses",
    }
    for flag, key in pairs.items():
        if getattr(args, flag, None) is not None:
            o.append(f"{key}={getattr(args, flag)}")
    if getattr(args, "drafter", None) is not None and not args.drafter.strip():  # an unset shell variable
        raise DraftopdError(f"--drafter {args.drafter!r}: give pld, none or a drafter folder")
    if getattr(args, "drafter", None) is not None:  # a name, or a drafter folder
        o += (
            [f"drafter.kind={args.drafter}"]
            if args.drafter in ("pld", "none")
            else ["drafter.kind=path", f"drafter.path={args.drafter}"]
        )
    return o


# path flags and what each wants: given empty (an unset shell variable, ``--json "$OUT"``) they are refused in one
# line, never read as "not given" (``--out`` and ``--drafter``: ``_out``, ``_overrides``; export's DRAFTER and OUT:
# ``export_drafter``)
PATH_FLAGS = {
    "config": "a YAML recipe",
    "json": "a file name",
    "plot": "a file name",
    "gsm8k": "a GSM8K folder, a jsonl file or 'hub'",
    "bench": "a `draftopd bench --json` result",
    "target": "'default', a model folder or a hub id",
}


def _check_paths(args: argparse.Namespace) -> None:
    for dest, wanted in PATH_FLAGS.items():
        value = getattr(args, dest, None)
        if isinstance(value, str) and not value.strip():  # generate's --json is a switch (a bool)
            raise DraftopdError(f"--{dest} {value!r}: give {wanted}")


def _out(args: argparse.Namespace) -> list[str]:
    """``--out`` as an override; ``--out ''`` (an unset shell variable) is refused, never dropped."""
    if args.out is None:
        return []
    if not args.out.strip():
        raise DraftopdError(f"--out {args.out!r}: give a folder")
    return [f"out={args.out}"]


def cmd_setup(args: argparse.Namespace) -> int:
    from draftopd import assets

    for name, path in assets.setup(data=not args.model_only).items():
        print(f"{name:<10} {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from draftopd.bench.budget import resolve_budget
    from draftopd.config import GenerateConfig
    from draftopd.decoding.loop import speculative_generate
    from draftopd.decoding.sampling import SamplingParams
    from draftopd.models.io import build_drafter
    from draftopd.models.target import load_target
    from draftopd.recipes import load

    cfg = load(GenerateConfig, args.config, _overrides(args))
    if cfg.target.threads:
        torch.set_num_threads(cfg.target.threads)
    target = load_target(cfg.target.path, cfg.target.dtype, cfg.target.device, cfg.target.fast)
    drafter = build_drafter(resolve_budget(cfg.drafter, target), target)
    ids = target.encode_chat(args.prompt)
    target.check_prompt(ids, cfg.sampling.max_new_tokens)
    gen = torch.Generator(target.device).manual_seed(cfg.sampling.seed)  # drafts and verification draw from it
    params = SamplingParams(cfg.sampling.temperature, cfg.sampling.top_p)
    out = speculative_generate(
        target, [ids], drafter, cfg.sampling.max_new_tokens, params, gen, record=args.show_acceptance
    )
    text = target.tokenizer.decode(out.tokens[0], skip_special_tokens=True)
    if args.json:
        print(
            json.dumps({"text": text, "token_ids": out.tokens[0], "tau": out.stats.tau, "stats": out.stats.summary()})
        )
        return 0
    if args.show_acceptance:
        from draftopd.decoding.show import render_steps

        print(render_steps(target.tokenizer, out.tokens[0], out.records[0]))
    else:
        print(text)
    s = out.stats
    print(
        f"\n[tau {s.tau:.2f} | {s.new_tokens} tokens in {s.seconds:.2f} s = {s.tokens_per_s:.1f} tok/s | "
        f"ttft {1000 * s.prefill_s:.0f} ms | tpot {1000 * s.tpot_s:.1f} ms | {target.dtype}]",
        file=sys.stderr,
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from draftopd.bench.run import check_outputs, format_table, run_bench, save_result
    from draftopd.config import BenchConfig
    from draftopd.owner import owning
    from draftopd.recipes import load

    config = args.config or (str(RECIPES / "bench-costs.yaml") if args.costs else None)
    cfg = load(BenchConfig, config, _overrides(args))
    check_outputs(args.json, args.plot)  # before the run: a bad output path fails now, not after an hour
    if args.costs:
        from draftopd.bench.cost import cost_dtypes, format_costs
        from draftopd.bench.run import run_costs

        if args.plot:
            raise DraftopdError("--plot: the step costs are a table (--costs), not a chart")
        cost_dtypes(cfg)  # tau_only refused before anything loads
    with contextlib.ExitStack() as outputs:  # each output file is this run's alone (owner.py)
        for path in {args.json, args.plot} - {None}:
            outputs.enter_context(owning(path, "bench"))
        if args.costs:  # the same bench once per dtype, in one process, and the verify cost by width
            result = run_costs(cfg)
            print(format_costs(result), flush=True)
        else:
            result = run_bench(cfg)
            print(format_table(result), flush=True)  # first: whatever happens to the files, the table is shown
        if args.json:
            save_result(result, args.json)
        if args.plot:
            from draftopd.report import bars

            what = "tau" if cfg.tau_only else "tokens_per_s"
            title = f"{what}: {result['dtype']}, {result['threads']} threads, {result['commit']}"
            bars(result, args.plot, title, what)
    if not args.costs:
        print(json.dumps({k: v for k, v in result.items() if k != "config"}))  # machine-readable last line
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from draftopd.config import DemoConfig
    from draftopd.demo import run_demo
    from draftopd.recipes import load

    config = args.config or str(RECIPES / ("demo-quick.yaml" if args.quick else "demo.yaml"))
    cfg = load(DemoConfig, config, _overrides(args) + _out(args))
    try:
        run_demo(cfg, fresh=args.fresh)
    except KeyboardInterrupt:
        print(f"\n[demo] interrupted: finished stages are kept; run the same command again to resume ({cfg.out})")
        return 130
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from draftopd.config import DataConfig
    from draftopd.data.trajectories import generate_trajectories
    from draftopd.recipes import load

    o = _overrides(args) + _out(args)
    print(generate_trajectories(load(DataConfig, args.config, o)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from draftopd.config import OPDConfig, SFTConfig
    from draftopd.recipes import load

    if args.algo == "sft":
        from draftopd.train.sft import train_sft

        print(train_sft(load(SFTConfig, args.config, _overrides(args))))
    else:
        from draftopd.train.opd import train_opd

        print(train_opd(load(OPDConfig, args.config, _overrides(args))))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from draftopd.export import export_drafter

    print(
        export_drafter(
            args.drafter,
            args.out,
            args.dtype,
            to=args.to,
            force=args.force,
            bench=args.bench,
            target=args.target,
            target_dtype=args.target_dtype,
            tree_budget=args.tree_budget,
            tree_topk=args.tree_topk,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftopd", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"draftopd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("setup", help="fetch and convert the default target, unpack evaluation data")
    p.add_argument("--model-only", action="store_true")
    p.set_defaults(func=cmd_setup)

    p = sub.add_parser("generate", help="generate text with speculative decoding")
    p.add_argument("--prompt", required=True)
    p.add_argument("--json", action="store_true", help="print text, token_ids, tau and stats as JSON")
    p.add_argument("--show-acceptance", action="store_true", help="mark accepted, corrected and rejected tokens")
    _model_flags(p)
    _common(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="tau and speed-up against plain decoding and transformers, side by side")
    p.add_argument("--datasets", help="comma list of gsm8k,humaneval,mtbench")
    p.add_argument("--limit", type=int, help="prompts per data set")
    p.add_argument("--json", metavar="OUT", help="write the full result as JSON")
    p.add_argument("--plot", metavar="PNG", help="bar chart per method and data set (tau if tau_only, else tokens/s)")
    p.add_argument(
        "--costs",
        action="store_true",
        help="instead of the table: ms per draft and verify step of each method and the break-even tau, in fp32 and "
        "bf16 (or target.dtype if set), the verify cost by width (cost_curve) and the node budget it suggests per "
        "drafter; without --config, of prompt lookup and untrained drafters of several shapes "
        "(configs/bench-costs.yaml)",
    )
    _model_flags(p)
    _common(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("data", help="generate target trajectories (resumable shards) for drafter training")
    p.add_argument("--out", help="output folder (data.out)")
    p.add_argument("--target")
    p.add_argument("--dtype", choices=("auto", *DTYPE_NAMES))
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--engine", choices=["hf", "vllm"], help="hf (default) or vllm (where vllm is importable)")
    p.add_argument(
        "--responses",
        choices=["generated", "text"],
        help="generated (default: the target's own) or text (the sources' existing responses, nothing generated; "
        "SFT then labels each position with the target's greedy token from its feature pass)",
    )
    _common(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train a drafter: `train sft` or `train opd`")
    p.add_argument("algo", choices=["sft", "opd"])
    p.add_argument("--target")
    p.add_argument("--dtype", choices=("auto", *DTYPE_NAMES))
    p.add_argument("--threads", type=int)
    _common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "export", help="write a drafter in the layout SGLang / vLLM / speculators / llama.cpp load, with a card"
    )
    p.add_argument("drafter", help="drafter folder (final/, a training checkpoint, or a z-lab/SpecForge folder)")
    p.add_argument("out", help="output folder (written to a temporary sibling, then renamed)")
    p.add_argument(
        "--to",
        choices=["sglang", "vllm", "speculators", "hf", "gguf"],
        default="sglang",
        help="sglang, vllm, hf: one plain folder every engine reads; speculators: vLLM's self-describing format; "
        "gguf: llama.cpp's draft.gguf and the target GGUF it pairs with (needs `bash scripts/gguf_env.sh`)",
    )
    p.add_argument("--dtype", choices=(*DTYPE_NAMES, "q8_0"), default="bf16", help="the drafter's (q8_0: gguf only)")
    p.add_argument(
        "--target-dtype",
        choices=("q4_1", "q8_0", "bf16", "f16", "f32", "none"),
        help="gguf: the target GGUF written beside the drafter (default q4_1, the embedded default target's own "
        "file; f32 for other targets; none: no target file)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing non-empty output folder")
    p.add_argument("--bench", metavar="RESULT", help="a `draftopd bench --json` result: its tau goes on the card")
    p.add_argument("--target", help="the target's path or hub id, when no run_config.json says it")
    p.add_argument(
        "--tree-budget",
        type=int,
        metavar="N",
        help="the card also serves it as draft trees of N nodes (drafter.tree_budget; default: a --bench result's "
        "first tree method's, else none)",
    )
    p.add_argument("--tree-topk", type=int, default=4, metavar="K", help="with --tree-budget: drafter.tree_topk")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the main job on the embedded default target")
    _common(p)
    p.add_argument("--quick", action="store_true", help="the pipeline scaled down (configs/demo-quick.yaml)")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing finished ones")
    p.add_argument("--out", help="output folder (default runs/demo, runs/demo-quick with --quick)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any("\x00" in a for a in argv):  # no path or value can hold one; open() would raise ValueError
        print("error: an argument contains a NUL byte", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="[draftopd] %(message)s")
    if not args.verbose:
        warnings.filterwarnings("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        _check_paths(args)  # before anything runs
        if getattr(args, "gsm8k", None):  # the configured GSM8K location, for this process and its children
            os.environ["DRAFTOPD_GSM8K"] = args.gsm8k
        return args.func(args)
    except DraftopdError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no (name too long, permission, disk full): one line; -v for more
        if args.verbose:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or type(e).__name__}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
