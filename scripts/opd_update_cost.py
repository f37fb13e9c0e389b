"""What one Draft-OPD update costs in replay mode, against one SFT step and one live-mode OPD update on the same rows.

Runs the three trainers one after the other from the same drafter on the same rows per update (the same draw: same
seed, rows per update = SFT batch), a few steps each with nothing else logged, evaluated or saved in between, and
reports the median seconds per step of the steps after the first (from each run's metrics.jsonl: the trainer's own
clock, the same code a user runs). Run it with nothing else on the machine.

    python scripts/opd_update_cost.py --drafter RUN/sft-dflash/final --data RUN/data --kind dflash
    python scripts/opd_update_cost.py --drafter RUN/sft-eagle3/final --data RUN/data --kind eagle3 \
        --opd-set rej_weight=1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(verb: list[str], sets: list[str], out: Path) -> list[float]:
    cmd = [sys.executable, "-m", "draftopd.cli", *verb, "--set", f"out={out}"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in rows if "seconds" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", required=True, help="the drafter folder every run starts from")
    ap.add_argument("--data", required=True, help="the trajectory folder (draftopd data)")
    ap.add_argument("--kind", choices=("dflash", "eagle3"), required=True)
    ap.add_argument("--rows", type=int, default=16, help="rows per update / SFT batch")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shards", type=int, default=2, help="data shards the runs draw from (the SFT feature pass)")
    ap.add_argument("--sft-config", default=None, help="SFT recipe (default configs/figure1/sft-KIND.yaml)")
    ap.add_argument("--opd-set", action="append", default=[], help="an override of both OPD runs (repeatable), "
                    "e.g. rej_weight=1.0 for EAGLE-3 with the rejected stream its recipe leaves out")  # fmt: skip
    args = ap.parse_args()
    sft_cfg = args.sft_config or str(ROOT / "configs" / "figure1" / f"sft-{args.kind}.yaml")
    common = [f"data={args.data}", f"init_from={args.drafter}", f"loop.max_steps={args.steps}", "loop.log_every=1",
              f"loop.eval_every={10 * args.steps}", f"loop.save_every={10 * args.steps}", "eval.limit=1",
              "eval.max_new_tokens=4", f"target.threads={args.threads}"]  # fmt: skip
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        pool = t / "data"  # a few shards spread over the data (length-sorted): the SFT feature pass covers these
        pool.mkdir()
        files = sorted(Path(args.data).glob("shard_*.pt"))
        for f in files[:: max(1, len(files) // args.shards)][: args.shards]:
            shutil.copy(f, pool / f.name)
        shutil.copy(Path(args.data) / "manifest.json", pool / "manifest.json")
        common[0] = f"data={pool}"
        times["SFT step"] = run(
            ["train", "sft", "--config", sft_cfg], [*common, f"batch_size={args.rows}", "max_len=640"], t / "sft"
        )
        opd = ["train", "opd", "--config", str(ROOT / "configs" / "figure1" / "opd.yaml")]
        rows = [*common, f"rollout_batch={args.rows}", *args.opd_set]
        times["OPD update, replay"] = run(opd, [*rows, "rollouts=replay"], t / "replay")
        times["OPD update, live"] = run(opd, [*rows, "rollouts=live"], t / "live")
    base = statistics.median(times["SFT step"][1:])
    print(f"{'':<22} {'s/step (median of steps 2..)':>30} {'x SFT step':>11}")
    for name, secs in times.items():
        med = statistics.median(secs[1:])
        print(f"{name:<22} {med:>30.2f} {med / base:>11.2f}")
    print(json.dumps({k: [round(x, 3) for x in v] for k, v in times.items()}))


if __name__ == "__main__":
    main()
