"""The paper's Figure 1 on the embedded default target: does Draft-OPD keep raising tau where SFT has plateaued?

For each drafter kind (DFlash, EAGLE-3): SFT on one pool of greedy target trajectories until its held-out tau stops
rising, then from that drafter (a) Draft-OPD in replay mode and (b) SFT continued, with the same rows per update (the
same draw), the same seed, optimizer and schedule, 256 updates of 16 rows each; held-out tau (32 prompts each of GSM8K
test_dev, HumanEval and MT-bench, ungated, batched) of the start and of 4 checkpoints of each run, and OPD's paired
gain over its control at the end with 95% bootstrap intervals over prompts. Then, for the kind where OPD did best, the
random-anchor ablation, the rejected stream toggled (dropped; added for EAGLE-3, whose recipe has none) and the
hard-CE response stream, at the same budget.

Every stage is a ``draftopd`` command with its config written under ``HOME/configs``, its log in ``HOME/logs`` (tail
them), a done marker in ``HOME/done``; trainers checkpoint, so a killed run resumes with the same command:

    python scripts/figure1.py                 # everything, resumable (HOME = $DRAFTOPD_HOME/figure1)
    python scripts/figure1.py --until tau-dflash
    python scripts/figure1.py --until tau-dflash --horizon 128   # both arms stopped at update 128 of the same
                                                                 # 256-update schedule, tau up to there
    python scripts/figure1.py --report        # the tables and docs/figures/figure1.png from what has finished
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from draftopd import DraftopdError
from draftopd.assets import home as cache_root
from draftopd.bench.run import paired_gain
from draftopd.config import BenchConfig, DataConfig, DrafterConfig, OPDConfig, SFTConfig
from draftopd.recipes import from_dict, load, migrate_loop, to_dict

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "configs" / "figure1"
KINDS = ("dflash", "eagle3")
STEPS = (64, 128, 192, 256)  # the checkpoints whose held-out tau is measured (keep_every 64)
DATASETS = ("gsm8k", "humaneval", "mtbench")
ABLATIONS = ("random-anchors", "no-rejected", "with-rejected", "hard-ce")  # the names ablations() may give


def ablations(opd: OPDConfig) -> dict[str, dict]:
    """name -> OPD overrides, one part of ``opd``'s recipe changed each: where it supervises (anchors scattered at
    random), the rejected stream (dropped, or added where the kind's recipe has none: EAGLE-3's), and the response
    stream's label (the target's greedy token, hard cross-entropy)."""
    rejected = {"no-rejected": {"rej_weight": 0.0}} if opd.rej_weight else {"with-rejected": {"rej_weight": 1.0}}
    return {"random-anchors": {"anchors": "random"}, **rejected, "hard-ce": {"loss": "hard_ce"}}


def configs(home: Path, steps: tuple[int, ...] = STEPS) -> dict[str, tuple[list[str], object]]:
    """Every stage: its ``draftopd`` verb and config, paths under ``home``; ``steps``: the checkpoints benched."""
    rep = dataclasses.replace
    data = rep(load(DataConfig, CONF / "data.yaml"), out=str(home / "data"))
    stages: dict[str, tuple[list[str], object]] = {"data": (["data"], data)}
    for kind in KINDS:
        sft = rep(load(SFTConfig, CONF / f"sft-{kind}.yaml"), data=data.out, out=str(home / f"sft-{kind}"))
        start = str(home / f"sft-{kind}" / "final")
        opd = rep(load(OPDConfig, CONF / "opd.yaml"), data=data.out, init_from=start, out=str(home / f"opd-{kind}"))
        opd = opd.for_kind(kind)
        cont = rep(
            sft,
            init_from=start,
            out=str(home / f"cont-{kind}"),
            batch_size=opd.rollout_batch * opd.accum,  # the same rows per update, drawn the same way (sample_order)
            max_len=max(sft.max_len, 640),  # whole trajectories (<= 256 + 256 tokens), as OPD replays them
            eval=rep(sft.eval, limit=opd.eval.limit, max_new_tokens=opd.eval.max_new_tokens),
            loop=opd.loop,  # the same steps, optimizer, schedule, seed, and log/eval/save/keep points
        )
        stages[f"sft-{kind}"] = (["train", "sft"], sft)
        stages[f"opd-{kind}"] = (["train", "opd"], opd)
        stages[f"cont-{kind}"] = (["train", "sft"], cont)
        folders = {"SFT start": start} | {
            f"{arm} {s}": str(home / f"{arm.lower()}-{kind}" / "checkpoints" / f"step_{s:06d}")
            for arm in ("OPD", "Cont")
            for s in steps
        }
        stages[f"tau-{kind}"] = (["bench", "--json", str(home / f"tau-{kind}.json")], tau_config(folders))
    return stages


def tau_config(folders: dict[str, str], limit: int = 32, max_new_tokens: int = 96) -> BenchConfig:
    """The held-out tau bench of drafter folders (name -> folder): batched, greedy, every proposal verified whole;
    ``limit`` prompts of each data set, ``max_new_tokens`` each."""
    cfg = load(
        BenchConfig,
        None,
        ["tau_only=true", "hf_baseline=false", f"limit={limit}", "batch_size=16",
         f"sampling.max_new_tokens={max_new_tokens}", f"datasets=[{','.join(DATASETS)}]", "target.threads=2"],
    )  # fmt: skip
    methods = {name: DrafterConfig(kind="path", path=folder, confidence=0.0) for name, folder in folders.items()}
    return dataclasses.replace(cfg, methods=methods)


def first_folder(bench_config: dict) -> str:
    """The drafter folder of a bench result's first method: a mapping name -> drafter, or in a result written
    before that, a list of name=folder strings."""
    methods = bench_config["methods"]
    if isinstance(methods, dict):
        return next(iter(methods.values()))["path"]
    return methods[0].split("=", 1)[1]


def ablation_stages(home: Path, kind: str, stages: dict, step: int = STEPS[-1]) -> dict:
    """The ablations of ``kind``'s OPD run, and their tau bench against its OPD and control at update ``step``
    (the runs whose checkpoint of that update exists: ``--only`` may have run some of them)."""
    _, opd = stages[f"opd-{kind}"]
    out = {}
    for name, over in ablations(opd).items():
        out[f"{name}-{kind}"] = (["train", "opd"], dataclasses.replace(opd, out=str(home / f"{name}-{kind}"), **over))
    last = f"step_{step:06d}"
    folders = {"Cont": str(home / f"cont-{kind}" / "checkpoints" / last)}
    folders |= {
        name: str(home / f"{run}-{kind}" / "checkpoints" / last)
        for name, run in (("OPD", "opd"), *((n, n) for n in ABLATIONS))
        if (home / f"{run}-{kind}" / "checkpoints" / last).is_dir()
    }
    result = home / f"tau-ablations-{kind}-{step}.json"  # one per update benched: a --horizon run's stays
    out[f"tau-ablations-{kind}"] = (["bench", "--json", str(result)], tau_config(folders))
    return out


def reached(cfg, step: int) -> bool:
    """Whether a training run's ``latest`` checkpoint is at or past ``step``."""
    pointer = Path(cfg.out) / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().removeprefix("step_")) >= step
    except (OSError, ValueError):
        return False


def named_methods(record: dict) -> dict:
    """A bench config recorded before methods were named sections (a list of ``name=folder`` strings sharing one
    ``drafter``) as this version writes it: each name gets that drafter with its folder, as the old bench built it."""
    if not isinstance(record.get("methods"), list) or not record["methods"]:
        return record
    shared = record.get("drafter") or {}
    methods = {}
    for item in record["methods"]:
        name, _, spec = item.partition("=")
        kind, path = (spec, None) if spec in ("pld", "none") else ("path", spec)
        methods[name] = {**shared, "kind": kind, "path": path}
    return {**record, "drafter": None, "methods": methods}


def finished_config(done: Path, cls: type) -> str | None:
    """The config a done marker records, read as this version reads it (one recorded before the loop section or the
    named methods, in its layout: ``migrate_loop``, ``named_methods``; fields added since at their defaults)."""
    record = json.loads(done.read_text()).get("config")
    if not record:
        return None
    try:
        cfg = from_dict(cls, named_methods(migrate_loop(json.loads(record))))
    except DraftopdError:  # a layout this version cannot read: the stage runs again
        return None
    return recorded(cfg)


def recorded(cfg) -> str:
    """What a done marker records of a stage's config: all of it but the machine's thread count."""
    d = to_dict(cfg)
    d["target"] = {**d["target"], "threads": None}
    return json.dumps(d, sort_keys=True, default=str)


def run_stage(home: Path, name: str, verb: list[str], cfg, horizon: int = 0, tag: str = "figure1") -> None:
    """Run one stage unless its done marker holds the same config. ``horizon``: a trainer is stopped once its
    checkpoint of that update is written (its schedule unchanged, so the next run resumes it to the end). The marker
    records the stage's wall seconds and its process CPU-seconds (``cpu_seconds``: user + system time of the child,
    from ``resource.getrusage``; an interrupted and resumed stage counts its last attempt only). ``tag`` prefixes
    what is printed (the driver's name)."""
    done = home / "done" / f"{name}.json"
    record = recorded(cfg)
    if done.exists() and finished_config(done, type(cfg)) == record:
        return
    if horizon and reached(cfg, horizon):
        print(f"[{tag}] {name}: at update {horizon} already", flush=True)
        return
    conf = home / "configs" / f"{name}.yaml"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False))
    log = home / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "draftopd.cli", *verb, "--config", str(conf)]
    print(f"[{tag}] {name}: {' '.join(cmd[2:])}  (log: {log})", flush=True)
    t0, cpu0 = time.time(), children_cpu()
    with log.open("a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        while proc.poll() is None:
            if horizon and reached(cfg, horizon):
                proc.send_signal(signal.SIGINT)  # the checkpoint is complete once latest names it
                proc.wait()
                print(f"[{tag}] {name}: stopped at update {horizon} ({(time.time() - t0) / 60:.1f} min)", flush=True)
                return
            time.sleep(1)
        rc = proc.returncode
    if rc:
        sys.exit(f"[{tag}] {name} failed (exit {rc}): see {log}")
    done.parent.mkdir(parents=True, exist_ok=True)
    config = json.dumps(to_dict(cfg), sort_keys=True, default=str)
    cpu = round(children_cpu() - cpu0, 1)
    done.write_text(json.dumps({"config": config, "seconds": round(time.time() - t0, 1), "cpu_seconds": cpu}))
    print(f"[{tag}] {name} done in {(time.time() - t0) / 60:.1f} min ({cpu:.0f} CPU-s)", flush=True)


def children_cpu() -> float:
    """User + system CPU-seconds of this process's finished (waited-for) children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def pooled_tau(per_prompt: list) -> float:
    return sum(t for t, _ in per_prompt) / max(1, sum(s for _, s in per_prompt))


def pool(result: dict) -> dict[str, list]:
    """Each method's per-prompt [tokens, steps] over all the data sets' prompts."""
    names = result["datasets"][DATASETS[0]]["methods"]
    return {n: sum((result["datasets"][ds]["methods"][n]["per_prompt"] for ds in DATASETS), []) for n in names}


def report(home: Path, figure: Path | None) -> str:
    """Markdown tables (tau per checkpoint and data set; OPD's paired gain over its control at each step) and the
    figure: tau vs update, OPD and its control, one panel per data set and kind, the SFT curve before it."""
    lines, curves = [], {}
    for kind in KINDS:
        path = home / f"tau-{kind}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        steps = [s for s in STEPS if f"OPD {s}" in r["datasets"][DATASETS[0]]["methods"]]  # a --horizon run: fewer
        lines += [
            f"### {kind}",
            "",
            "| data set | SFT start | " + " | ".join(f"OPD {s} / Cont {s}" for s in steps) + " |",
        ]
        lines.append("|---" * (2 + len(steps)) + "|")
        for ds in DATASETS:
            m = r["datasets"][ds]["methods"]
            start = m["SFT start"]
            cells = []
            for s in steps:
                o, c = m[f"OPD {s}"], m[f"Cont {s}"]
                g, lo, hi = paired_gain(c["per_prompt"], o["per_prompt"])
                cells.append(f"{o['tau']:.3f} / {c['tau']:.3f} ({100 * g:+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}])")
            lines.append(f"| {ds} | {start['tau']:.3f} | " + " | ".join(cells) + " |")
            curves[(kind, ds)] = {  # label -> {update: tau}
                "OPD": {0: start["tau"], **{s: m[f"OPD {s}"]["tau"] for s in steps}},
                "SFT continued": {0: start["tau"], **{s: m[f"Cont {s}"]["tau"] for s in steps}},
            }
        pooled = pool(r)
        cells = []
        for s in steps:
            o, c = pooled[f"OPD {s}"], pooled[f"Cont {s}"]
            g, lo, hi = paired_gain(c, o)
            cells.append(
                f"{pooled_tau(o):.3f} / {pooled_tau(c):.3f} ({100 * g:+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}])"
            )
        lines.append(
            f"| all {len(pooled['SFT start'])} | {pooled_tau(pooled['SFT start']):.3f} | " + " | ".join(cells) + " |"
        )
        lines.append("")
        for abl in sorted(home.glob(f"tau-ablations-{kind}-*.json"), key=lambda p: int(p.stem.rsplit("-", 1)[1])):
            a = json.loads(abl.read_text())
            step = Path(first_folder(a["config"])).name.removeprefix("step_").lstrip("0")
            lines += [f"Ablations ({kind}, update {step}), paired gain over SFT continued:", ""]
            for ds in (*DATASETS, "all"):
                if ds == "all":  # pooled over the data sets' prompts
                    m = {n: {"per_prompt": pp, "tau": pooled_tau(pp)} for n, pp in pool(a).items()}
                else:
                    m = a["datasets"][ds]["methods"]
                base = m["Cont"]["per_prompt"]
                cells = []
                for name in [n for n in ("OPD", *ABLATIONS) if n in m]:
                    g, lo, hi = paired_gain(base, m[name]["per_prompt"])
                    cells.append(f"{name} {m[name]['tau']:.3f} ({100 * g:+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}])")
                lines.append(f"- {ds}: Cont {m['Cont']['tau']:.3f}; " + "; ".join(cells))
                if (
                    ds in DATASETS and (kind, ds) in curves
                ):  # the ablations' points (and the arms' past the main bench)
                    for n, label in (
                        ("Cont", "SFT continued"),
                        ("OPD", "OPD"),
                        *((a, f"OPD, {a}") for a in ABLATIONS),
                    ):
                        if n in m:
                            curves[(kind, ds)].setdefault(label, {})[int(step)] = m[n]["tau"]
            lines.append("")
    if figure is not None and curves:
        draw(home, curves, figure)
    return "\n".join(lines)


def sft_curve(home: Path, kind: str) -> list[tuple[int, float]]:
    path = home / f"sft-{kind}" / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [(r["step"], r["tau"]) for r in rows if "tau" in r]


def draw(home: Path, curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({k for k, _ in curves}, key=KINDS.index)
    fig, axes = plt.subplots(len(kinds), 1 + len(DATASETS), figsize=(4 * (1 + len(DATASETS)), 3.2 * len(kinds)))
    axes = [axes] if len(kinds) == 1 else axes
    for row, kind in zip(axes, kinds, strict=True):
        steps, taus = zip(*sft_curve(home, kind), strict=True) if sft_curve(home, kind) else ((), ())
        row[0].plot(steps, taus, "o-", color="gray")
        row[0].set(title=f"{kind}: SFT (GSM8K, 32 prompts)", xlabel="SFT step", ylabel="tau")
        for ax, ds in zip(row[1:], DATASETS, strict=True):
            styles = iter(("o-", "s--", "^:", "v:", "D:"))
            for name, points in curves[(kind, ds)].items():
                xs = sorted(points)
                ax.plot(xs, [points[x] for x in xs], next(styles), label=name)
            ax.set(title=f"{kind}: {ds} (32 prompts)", xlabel="update after SFT", ylabel="tau")
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", default=str(cache_root() / "figure1"))
    ap.add_argument("--until", default="", help="stop after this stage")
    ap.add_argument("--report", action="store_true", help="only print the tables and draw the figure")
    ap.add_argument(
        "--horizon",
        type=int,
        default=0,
        help="stop OPD and its control at this update (a multiple "
        "of 64); tau is benched up to it; rerun without it to go on to the end",
    )
    ap.add_argument("--only", default="", help="run just these stages (comma-separated), e.g. no-rejected-dflash")
    ap.add_argument("--ablate", choices=KINDS, help="the kind whose OPD run is ablated (default: where OPD did best)")
    args = ap.parse_args()
    home = Path(args.home)
    figure = ROOT / "docs" / "figures" / "figure1.png"
    if args.report:
        print(report(home, figure))
        return
    steps = tuple(s for s in STEPS if not args.horizon or s <= args.horizon)
    stages = configs(home, steps)
    if args.only:
        for name in args.only.split(","):
            kind = name.rsplit("-", 1)[-1]
            every = {**stages, **(ablation_stages(home, kind, stages, steps[-1]) if kind in KINDS else {})}
            if name not in every:
                sys.exit(f"[figure1] no stage {name!r}: one of {', '.join(every)}")
            trainer = name.split("-")[0] not in ("data", "sft", "tau")
            run_stage(home, name, *every[name], horizon=args.horizon if trainer else 0)
        return
    order = ["data", *[f"{s}-{k}" for k in KINDS for s in ("sft", "opd", "cont", "tau")]]
    for name in order:
        arm = name.split("-")[0] in ("opd", "cont")
        run_stage(home, name, *stages[name], horizon=args.horizon if arm else 0)
        if name == args.until:
            return
    kind = args.ablate or best_kind(home)
    for name, (verb, cfg) in ablation_stages(home, kind, stages, steps[-1]).items():
        run_stage(home, name, verb, cfg, horizon=0 if name.startswith("tau") else args.horizon)
        if name == args.until:
            return
    print(report(home, figure))


def best_kind(home: Path) -> str:
    """The kind whose OPD gained most over its control at the last step, averaged over the data sets."""

    def gain(kind: str) -> float:
        r = json.loads((home / f"tau-{kind}.json").read_text())["datasets"]
        last = max(s for s in STEPS if f"OPD {s}" in r[DATASETS[0]]["methods"])  # the last update benched
        return sum(
            pooled_tau(r[ds]["methods"][f"OPD {last}"]["per_prompt"])
            / pooled_tau(r[ds]["methods"][f"Cont {last}"]["per_prompt"])
            for ds in DATASETS
        )

    done = [k for k in KINDS if (home / f"tau-{k}.json").exists()]
    if not done:
        sys.exit("[figure1] no tau-KIND.json yet: run the main stages first, or name the kind with --ablate")
    return max(done, key=gain)


if __name__ == "__main__":
    main()
