"""What makes our drafters pay in llama.cpp (issue 36 item 3): tokens/s and tau over a grid, JSON + a markdown table.

Run it ALONE on the machine (nothing else running: every number is a wall-clock rate), from the repository root,
after `bash scripts/gguf_env.sh` and with trained drafters:

    .venv/bin/python scripts/llamacpp_bench.py --drafter eagle3=runs/reproduce/sft-eagle3/final \\
        --drafter dflash=runs/demo/sft/final --out runs/llamacpp-bench

The grid, per target GGUF (``--targets``: the default target's own Q4_1 file, and Q8_0 / F32 GGUFs converted from
our de-quantised weights): llama.cpp's plain decoding (the baseline), its own n-gram drafting (``--ngram``), and each
drafter (``--drafter NAME=FOLDER``, any number: several shapes or draft vocabularies of a kind are several drafters)
exported ``--to gguf`` in each precision (``--precisions``: fp32, bf16, q8_0) at each ``--spec-draft-n-max``
(``--n-max``; DFlash capped at its block size - 1). Everything is greedy, batch 1, ``--threads`` threads, the same
``--limit`` GSM8K test_dev prompts x ``--max-new-tokens`` (one warm-up prompt first, not counted), through
``scripts/llamacpp_serve.py`` in the side venv (xllamacpp: llama.cpp b11549's server core, a prebuilt CPU wheel).

Per run: llama.cpp's tokens/s (its own generation timer, prompt processing excluded) and the speed-up over plain
decoding of the same target; whether every prompt's token ids equal plain decoding's (``lossless``); llama.cpp's tau
(tokens committed after the first / verify steps, steps = committed - accepted drafts) and acceptance (accepted /
drafted) beside ``draftopd bench``'s tau for the same drafter, chain and prompts (tau_only, ungated, fp32); and the
gap explained: a verify step's cost in plain decoding tokens (ms per step / plain ms per token) is the break-even
tau, so speed-up = tau / break-even; with the GGUF sizes (bytes read per token on a memory-bound CPU).

Results: ``OUT/results.json`` (every run, the machine: CPU flags, load average before and after each run, versions)
and ``OUT/results.md``, both rewritten after every run (an interrupted grid keeps what it measured). GGUF files are
made once under ``OUT/gguf`` and reused. ``--quick``: a slice to check the script works (2 prompts x 16 tokens, Q4_1,
fp32 drafters, n-max 2), not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return -1.0


def serve(py: Path, target: Path, prompts: Path, args, spec: str = "none", drafter: Path | None = None, k: int = 0):
    cmd = [str(py), str(ROOT / "scripts" / "llamacpp_serve.py"), "--target", str(target), "--prompts", str(prompts)]
    cmd += ["--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads)]
    if spec != "none":
        cmd += ["--spec-type", spec, "--n-max", str(k)]
    if drafter is not None:
        cmd += ["--drafter", str(drafter)]
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": str(args.threads)}
    before = load_avg()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"llamacpp_serve.py failed ({' '.join(cmd[2:])}): {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["load_before"], out["load_after"] = before, load_avg()
    return out


def metrics(run: dict, plain: dict | None) -> dict:
    """tau, acceptance, speed-up and step cost of one run (against ``plain``, the same target's plain run)."""
    rows = run["per_prompt"]
    committed = sum(g - 1 for _, _, g, _ in rows)  # after each prompt's first token (sampled from the prompt pass)
    accepted, drafted = run["accepted"], run["drafts"]
    steps = committed - accepted
    gen_ms = sum(ms for *_, ms in rows)
    m = {
        "tok_s": run["tok_s"],
        "tau": committed / steps if steps else None,
        "acceptance": accepted / drafted if drafted else None,
        "drafted": drafted,
        "accepted": accepted,
        "ms_per_step": gen_ms / (steps + len(rows)),
    }
    if plain is None:  # the baseline itself: no drafting, nothing to compare
        m["tau"] = None
    else:
        plain_ms = sum(ms for *_, ms in plain["per_prompt"]) / plain["generated"]
        m["speedup"] = run["tok_s"] / plain["tok_s"]
        m["lossless"] = run["tokens"] == plain["tokens"]
        m["same_prompts"] = sum(a == b for a, b in zip(run["tokens"], plain["tokens"], strict=True))
        m["break_even_tau"] = m["ms_per_step"] / plain_ms
    return m


def table(result: dict) -> str:
    head = (
        "| target | method | drafter GGUF | n-max | tok/s | x plain | lossless | tau llama.cpp | tau draftopd | "
        "accepted/drafted | step cost (plain tokens) = break-even tau |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in result["runs"]:
        m = r["metrics"]

        def f(x, fmt):
            return format(x, fmt) if isinstance(x, int | float) else "-"

        lines.append(
            f"| {r['target']} ({r['target_mb']:.0f} MB) | {r['method']} | "
            + (f"{r['precision']} ({r['draft_mb']:.1f} MB)" if r.get("precision") else "-")
            + f" | {r.get('n_max', '-')} | {f(m['tok_s'], '.1f')} | {f(m.get('speedup'), '.2f')} | "
            + ("-" if "lossless" not in m else ("yes" if m["lossless"] else f"NO ({m['same_prompts']})"))
            + f" | {f(m['tau'], '.3f')} | {f(r.get('tau_draftopd'), '.3f')} | "
            + (f"{m['accepted']}/{m['drafted']} ({m['acceptance']:.0%})" if m["drafted"] else "-")
            + f" | {f(m.get('break_even_tau'), '.2f')} |"
        )
    mach = result["machine"]
    return (
        f"# llama.cpp with our drafters ({result['prompts']} {result['dataset']} prompts x {result['max_new_tokens']} "
        f"new tokens, greedy, batch 1, {result['threads']} threads)\n\n"
        f"Machine: {mach['cpu']}; flags {mach['flags']}; llama.cpp build: {mach['system_info']}; xllamacpp "
        f"{mach['xllamacpp']}; commit {result['commit']}. Load average before/after each run is in results.json "
        "(a run with load > 0.5 before it was not alone).\n\n" + "\n".join(lines) + "\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--drafter", action="append", default=[], help="NAME=FOLDER (a trained drafter; repeatable)")
    p.add_argument("--out", default="runs/llamacpp-bench")
    p.add_argument("--targets", default="q4_1,q8_0,f32")
    p.add_argument("--precisions", default="fp32,bf16,q8_0", help="drafter GGUF types (export --dtype)")
    p.add_argument("--n-max", default="1,2,3,5", help="--spec-draft-n-max values")
    p.add_argument("--ngram", default="ngram-simple,ngram-mod", help="llama.cpp's own drafting ('' for none)")
    p.add_argument("--dataset", default="gsm8k")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a slice that checks the script works (not a measurement)")
    args = p.parse_args()
    if args.quick:
        args.targets, args.precisions, args.n_max, args.ngram = "q4_1", "fp32", "2", "ngram-simple"
        args.limit, args.max_new_tokens = 2, 16
    if not args.drafter:
        p.error("give at least one --drafter NAME=FOLDER")

    import torch

    from draftopd import assets
    from draftopd.bench.run import cpu_flags, git_commit, run_bench
    from draftopd.config import BenchConfig
    from draftopd.data.eval_sets import load_prompts
    from draftopd.export import export_drafter
    from draftopd.llamacpp import DRAFT_FILE, gguf_venv, target_file, write_target
    from draftopd.models.io import read_drafter
    from draftopd.models.layouts import layout_of
    from draftopd.models.target import load_target
    from draftopd.recipes import load

    py = gguf_venv() / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"no llama.cpp side venv at {gguf_venv()}: run `bash scripts/gguf_env.sh` first")
    out = Path(args.out)
    (out / "gguf").mkdir(parents=True, exist_ok=True)
    if load_avg() > 0.5:
        print(f"[llamacpp_bench] WARNING: load average {load_avg():.2f}: the machine is not idle, not of record")
    torch.set_num_threads(args.threads)
    target = load_target("default", "fp32")
    ids = [target.encode_chat(q) for q in load_prompts(args.dataset, args.limit)]
    prompts = out / "prompts.json"
    prompts.write_text(json.dumps(ids))

    targets = {}
    for t in args.targets.split(","):
        targets[t] = out / "gguf" / target_file(t)
        if not targets[t].exists():
            print(f"[llamacpp_bench] target {t}")
            write_target(assets.default_target_dir(), t, targets[t])
    drafters = {}  # name -> (folder, kind, layout, config)
    for spec in args.drafter:
        name, _, folder = spec.partition("=")
        model = read_drafter(folder)
        drafters[name] = (Path(folder), layout_of(model), model.config)
    n_maxes = [int(k) for k in args.n_max.split(",")]

    def chains(entry, c) -> list[int]:  # DFlash drafts at most its block size - 1 per step
        top = c.block_size - 1 if entry.SPEC_TYPE == "draft-dflash" else max(n_maxes)
        return sorted({min(k, top) for k in n_maxes})

    gguf = {}
    for name, (folder, _entry, _c) in drafters.items():
        for prec in args.precisions.split(","):
            dest = out / "gguf" / f"{name}-{prec}"
            if not (dest / DRAFT_FILE).exists():
                print(f"[llamacpp_bench] export {name} {prec}")
                export_drafter(folder, dest, prec, to="gguf", target_dtype="none", force=True)
            gguf[name, prec] = dest / DRAFT_FILE

    ours = {}  # draftopd bench's tau (fp32, ungated), per drafter and chain
    for name, (folder, entry, c) in drafters.items():
        for k in chains(entry, c):
            sets = [
                "target.dtype=fp32",
                f"target.threads={args.threads}",
                f"datasets=[{args.dataset}]",
                f"limit={args.limit}",
                f"sampling.max_new_tokens={args.max_new_tokens}",
                "tau_only=true",
                "drafter.kind=path",
                f"drafter.path={folder}",
                "drafter.confidence=0",
                f"drafter.chain_length={k}",
            ]
            (row,) = run_bench(load(BenchConfig, None, sets), target, progress=False)["datasets"][args.dataset][
                "methods"
            ].values()
            ours[name, k] = row["tau"]
            print(f"[llamacpp_bench] draftopd tau {name} k={k}: {row['tau']:.3f}")

    flags = Path("/proc/cpuinfo").read_text().split("\n\n")[0] if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in flags.splitlines() if ln.startswith("model name")), "unknown")
    result = {
        "dataset": args.dataset,
        "prompts": len(ids),
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "commit": git_commit(),
        "machine": {"cpu": cpu, "flags": cpu_flags(), "nproc": os.cpu_count()},
        "settings": vars(args),
        "runs": [],
    }

    def record(tname: str, method: str, run: dict, plain: dict | None, **extra) -> None:
        result["machine"]["system_info"] = run["system_info"]
        result["machine"]["xllamacpp"] = run["xllamacpp"]
        row = {"target": tname.upper(), "target_mb": targets[tname].stat().st_size / 1e6, "method": method, **extra}
        row["metrics"] = metrics(run, plain)
        row["load_before"], row["load_after"] = run["load_before"], run["load_after"]
        row["per_prompt"] = run["per_prompt"]
        result["runs"].append(row)
        (out / "results.json").write_text(json.dumps(result, indent=1))
        (out / "results.md").write_text(table(result))
        m = row["metrics"]
        print(
            f"[llamacpp_bench] {tname} {method} {extra}: {m['tok_s']:.1f} tok/s"
            + (f", {m['speedup']:.2f}x, lossless {m['lossless']}, tau {m['tau']}" if plain is not None else "")
        )

    start = time.time()
    for tname, tpath in targets.items():
        plain = serve(py, tpath, prompts, args)
        record(tname, "plain", plain, None)
        for ng in filter(None, args.ngram.split(",")):
            record(tname, f"llama.cpp {ng}", serve(py, tpath, prompts, args, ng, None, max(n_maxes)), plain)
        for name, (_folder, entry, c) in drafters.items():
            for prec in args.precisions.split(","):
                for k in chains(entry, c):
                    run = serve(py, tpath, prompts, args, entry.SPEC_TYPE, gguf[name, prec], k)
                    record(
                        tname,
                        f"{name} ({entry.LABEL})",
                        run,
                        plain,
                        precision=prec,
                        draft_mb=gguf[name, prec].stat().st_size / 1e6,
                        n_max=k,
                        tau_draftopd=ours[name, k],
                    )
    print(f"[llamacpp_bench] {len(result['runs'])} runs in {(time.time() - start) / 60:.1f} min -> {out}/results.md")
    print(table(result))


if __name__ == "__main__":
    sys.exit(main())
