"""Issue 35 item 4: a drafter of each kind trained to its declared plateau on pool A, in stages that each end inside
a session (3 hours on 2 cores), with everything a later stage needs small enough to commit.

The rule, declared before any run (and not changed after; ``lab.study``):
  (a) the run's training curve (held-out tau on 32 GSM8K test_dev prompts x 64 tokens, ``EVALS`` evaluations evenly
      spread over the run) ends flat: its last 4 evaluations within +-1.5% of their mean (``plateaued``); and
  (b) a 20% longer run gains < 1%: the run continued from its final weights for 20% more steps at its schedule's last
      learning rate (constant, fresh AdamW) gains < 1% pooled held-out tau (``extension_gain``; 64 prompts each of
      GSM8K test_dev, HumanEval and MT-bench, ungated chains, 96 tokens, greedy).
  A run that meets (a) and (b) has plateaued on this data; one that does not is reported with both numbers, and the
  next run is twice as long (``--budget``), from scratch, on the same snapshot.

Stages (``scripts/figure1.py``'s ``run_stage``: done markers, logs, configs under HOME; trainers checkpoint, so the
same command resumes a killed stage), HOME = $DRAFTOPD_HOME/plateau:
  pool          a snapshot of pool A's shards as they are at the first run of this driver or ab_warmstart's (pool B
                refused: ab_warmstart.check_pool), in $DRAFTOPD_HOME/pool-a, shared with ab_warmstart
  features-KIND the target's feature pass over it, made once per kind and shared (ab_warmstart.pool_features), not
                counted in ``--budget`` (a fixed cost of the pool, the same for every run on it)
  cal-KIND      a short calibration run: CPU-seconds per step
  run-KIND      SFT with the recipe (configs/figure1/sft-KIND.yaml and ``--arm``'s overrides from ab_warmstart.ARMS),
                ``max_steps`` sized so that its steps spend ``--budget`` CPU-seconds
  ext-KIND      the extension of (b), from run-KIND/final
  tau-KIND      held-out tau of run-KIND/final and ext-KIND/final (``figure1.tau_config``, 64 prompts per set)
Then HOME/plateau-KIND.json: the curve, both taus, (a), (b), the verdict, CPU-seconds, and the snapshot's shards;
``--export DIR`` also writes the run's final drafter in bf16 (``draftopd export --to plain``) for shipping.

    python scripts/plateau.py --kinds dflash                  # ~2 h of wall on 2 cores at the default budget
    python scripts/plateau.py --kinds eagle3 --budget 20000
    python scripts/plateau.py --quick                         # tiny budgets on a tiny pool: the pipeline end to end
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the drivers this one shares its stages with

from ab_warmstart import (  # noqa: E402
    ARMS,
    KINDS,
    POOL_A,
    RECIPES,
    SHARED,
    calibration,
    check_pool,
    link_features,
    metrics,
    override,
    pool_features,
    quick_pool,
    snapshot,
    spent,
    step_cost,
    steps_for,
)
from figure1 import DATASETS, pool, pooled_tau, run_stage, tau_config  # noqa: E402

from draftopd.assets import home as cache_root  # noqa: E402
from draftopd.bench.run import paired_gain  # noqa: E402
from draftopd.config import SFTConfig  # noqa: E402
from draftopd.lab.study import extension_gain, plateaued  # noqa: E402
from draftopd.recipes import load  # noqa: E402

EVALS = 12  # training-curve evaluations per run
EXTENSION = 0.2  # (b): the extension's length, as a fraction of the run's steps
FLAT, GAIN = 0.015, 0.01  # (a)'s tolerance over the last 4 evaluations, (b)'s largest gain


@dataclasses.dataclass(frozen=True)
class Plan:
    budget: float  # CPU-seconds of the run's steps (the pool's shared feature pass not counted)
    calibration: int  # steps of the calibration run
    prompts: int  # held-out prompts per data set
    max_new: int
    eval_limit: int  # the training curve's GSM8K prompts
    eval_new: int


FULL = Plan(14400.0, 12, 64, 96, 32, 64)
QUICK = Plan(30.0, 3, 4, 16, 2, 8)


def run_config(base: SFTConfig, out: Path, steps: int, budget: float, plan: Plan) -> SFTConfig:
    every = max(1, steps // EVALS)
    return override(
        base, out=str(out), **{"loop.max_steps": steps, "loop.max_cpu_seconds": round(budget, 1),
                               "loop.eval_every": every, "loop.save_every": every, "loop.keep_every": 0,
                               "eval.limit": plan.eval_limit, "eval.max_new_tokens": plan.eval_new},
    )  # fmt: skip


def extension_config(run: SFTConfig, out: Path, plan: Plan) -> SFTConfig:
    """(b)'s run: from ``run``'s final weights, 20% of its steps at its last learning rate, constant."""
    steps = max(1, round(EXTENSION * run.loop.max_steps))
    every = max(1, steps // 4)
    return override(
        run, out=str(out), init_from=str(Path(run.out) / "final"),
        **{"loop.max_steps": steps, "loop.max_cpu_seconds": 0.0, "loop.lr": run.loop.lr * run.loop.min_lr_ratio,
           "loop.warmup_ratio": 0.0, "loop.min_lr_ratio": 1.0, "loop.eval_every": every, "loop.save_every": every,
           "eval.limit": plan.eval_limit, "eval.max_new_tokens": plan.eval_new},
    )  # fmt: skip


def verdict(curve: list, tau_run: list, tau_ext: list) -> dict:
    """The rule on a finished run: (a) on its curve, (b) on the paired pooled held-out gain of its extension."""
    flat = plateaued(curve, 4, FLAT)
    gain = paired_gain(tau_run, tau_ext)
    ext = extension_gain(pooled_tau(tau_run), pooled_tau(tau_ext))
    return {"a_flat": flat, "b_extension_gain": ext, "b_interval": gain[1:], "plateaued": flat and ext < GAIN}


def run_kind(home: Path, shared: Path, kind: str, arm: str, plan: Plan, pool_dir: Path, say) -> dict:
    recipe = override(load(SFTConfig, RECIPES / f"sft-{kind}.yaml"), data=str(pool_dir), **{"target.threads": 2})
    feats, pool_cost = pool_features(shared, kind, recipe, plan)
    base = override(recipe, **ARMS[arm][1])
    cal = home / f"cal-{kind}"
    link_features(feats, cal)
    say(f"cal-{kind}", ["train", "sft"], calibration(override(base, out=str(cal)), cal, plan))
    per_step = step_cost(cal)[0]
    out = home / f"run-{kind}"
    link_features(feats, out)
    run = run_config(base, out, steps_for(plan.budget, per_step), plan.budget + pool_cost, plan)
    say(f"run-{kind}", ["train", "sft"], run)
    ext_out = home / f"ext-{kind}"
    link_features(feats, ext_out)
    say(f"ext-{kind}", ["train", "sft"], extension_config(run, ext_out, plan))
    result = home / f"tau-{kind}.json"
    folders = {"run": str(out / "final"), "extended": str(ext_out / "final")}
    say(f"tau-{kind}", ["bench", "--json", str(result)], tau_config(folders, plan.prompts, plan.max_new))
    r = json.loads(result.read_text())
    pooled = pool(r)
    curve = [(m["step"], m["tau"]) for m in metrics(out) if "tau" in m]
    record = {
        "kind": kind,
        "arm": arm,
        "rule": f"(a) last 4 of {EVALS} curve evals within +-{100 * FLAT:.1f}%; (b) +{100 * EXTENSION:.0f}% steps "
        f"at the last lr gain < {100 * GAIN:.0f}% pooled held-out tau",
        "steps": run.loop.max_steps,
        "cpu_seconds": {
            "pool_features": pool_cost,
            "run": spent(out) - pool_cost,
            "extension": spent(ext_out) - pool_cost,
        },
        "curve": curve,
        "tau": {
            name: {ds: r["datasets"][ds]["methods"][name]["tau"] for ds in DATASETS}
            | {"all": pooled_tau(pooled[name])}
            for name in folders
        },
        **verdict(curve, pooled["run"], pooled["extended"]),
        "pool": sorted(p.name for f in check_pool(pool_dir) for p in f.glob("shard_*")),
        "prompts_per_set": plan.prompts,
    }
    (home / f"plateau-{kind}.json").write_text(json.dumps(record, indent=2))
    shown = {k: record[k] for k in ("tau", "a_flat", "b_extension_gain", "plateaued")}
    print(f"[plateau] {kind}: {json.dumps(shown)}")
    return record


def best_arm(report: Path, kind: str) -> tuple[str, str]:
    """The A/B's winner for ``kind`` (scripts/ab_warmstart.py's report.json): the arm with the largest pooled held-out
    gain over plain whose 95% interval lies above 0, the text arm left out (its pre-training is a stage of the A/B,
    not a recipe); plain when none. Returns (arm, why); exits in one line when the A/B of ``kind`` has not finished."""
    rows = json.loads(report.read_text()).get(kind) if report.exists() else None
    if not rows:
        sys.exit(f"[plateau] --arm best: no A/B result for {kind} in {report} (run scripts/ab_warmstart.py first)")
    gains = {arm: r["gain_over_plain"]["all"] for arm, r in rows.items() if arm not in ("plain", "text")}
    wins = {arm: g for arm, g in gains.items() if g[1] > 0}
    if not wins:
        return "plain", "no arm's pooled gain over plain has an interval above 0"
    arm = max(wins, key=lambda a: wins[a][0])
    g = wins[arm]
    return arm, f"pooled gain over plain {100 * g[0]:+.1f}% [{100 * g[1]:+.1f}, {100 * g[2]:+.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", default="", help="default $DRAFTOPD_HOME/plateau (plateau-quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets, 4 prompts, a tiny pool of its own")
    ap.add_argument("--pool", default="", help=f"the SFT pool (default {POOL_A})")
    ap.add_argument("--budget", type=float, default=0.0, help="CPU-s of the run's steps (default 14400; --quick 30)")
    ap.add_argument(
        "--arm", default="plain", choices=[*ARMS, "best"],
        help="the recipe: ab_warmstart's arm (not text); best: the A/B's winner per kind (best_arm)",
    )  # fmt: skip
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: dflash,eagle3")
    args = ap.parse_args()
    if args.arm == "text":
        sys.exit("[plateau] --arm text needs its pre-training stage: run scripts/ab_warmstart.py for it")
    plan = QUICK if args.quick else FULL
    plan = dataclasses.replace(plan, budget=args.budget or plan.budget)
    home = Path(args.home or cache_root() / ("plateau-quick" if args.quick else "plateau"))
    say = lambda name, verb, cfg: run_stage(home, name, verb, cfg, tag="plateau")  # noqa: E731
    shared = home if args.quick or args.pool else cache_root() / SHARED
    if args.quick and not args.pool:
        cfg = quick_pool(home)
        say("quick-pool", ["data"], cfg)
        pool_dir = Path(cfg.out)
        check_pool(pool_dir)
    else:
        pool_dir = snapshot(Path(args.pool) if args.pool else POOL_A, shared)
    for kind in args.kinds.split(","):
        if kind not in KINDS:
            sys.exit(f"[plateau] unknown kind {kind!r}: dflash or eagle3")
        arm = args.arm
        if arm == "best":
            arm, why = best_arm(cache_root() / "ab_warmstart" / "report.json", kind)
            print(f"[plateau] {kind}: arm {arm} ({why})", flush=True)
        run_kind(home, shared, kind, arm, plan, pool_dir, say)


if __name__ == "__main__":
    main()
