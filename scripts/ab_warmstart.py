"""Issue 35 items 2-3 as A/Bs at equal CPU-time: cheap warm starts and acceptance-aware SFT objectives, per kind.

For each drafter kind (DFlash, EAGLE-3), five arms on the same SFT data (pool A: a snapshot of the shards that exist
when the first driver runs, shared with scripts/plateau.py; pool B, held back for Draft-OPD, is refused), each given
the same budget of training CPU-seconds (``--budget``, the trainer's ``cpu_seconds`` counter; ``loop.max_cpu_seconds``
caps it):

* ``plain``: the recipe (configs/figure1/sft-KIND.yaml), hard cross-entropy on the target's greedy token;
* ``text``: first SFT on the target's features over existing text (``draftopd data --responses text``: GSM8K-train
  reference answers of pool A's questions and ShareGPT replies; labels are the target's greedy tokens from the same
  prefill), for ``--text-share`` of the budget (its own feature pass included), then SFT on pool A from it for the
  rest;
* ``init``: the recipe with the drafter's layers initialised from the target's (``arch.init_from_target``);
* ``soft``: soft labels, KL from the target's distribution (``sft_loss: soft``);
* ``auf``: accept-until-fail truncation (``accept_until_fail: true``).

What the budget counts. The target's feature pass over pool A (~1,000 tokens/s here, so ~1 CPU-hour for 3M tokens)
is made once per kind (stage ``features-KIND`` in ``$DRAFTOPD_HOME/pool-a``, with the target's last hidden states
that soft labels need) and read by every run on the pool: these arms, the plateau run and its extension. It is a
fixed cost common to all of them, so it is left out of the budgets: an arm's budget counts its training steps and
any target pass it adds beyond the pool's (the text arm's pass over its text). Steps: a short calibration run of each
distinct step cost (plain, soft, auf, and the text pre-training) measures CPU-seconds per step (``cal-*`` stages);
an arm then gets ``max_steps = budget / (s/step)`` (its cosine schedule completes at the budget) and
``loop.max_cpu_seconds = budget + the pool's feature cost`` as the cap (the counter starts at that recorded cost).
Feature caches are shared by hard links (a cache serves any run with the same data, target, layers and cut).
Held-out tau: ``draftopd bench`` tau-only (greedy, 96 new tokens, every proposal verified: confidence 0) on 64 prompts
each of GSM8K test_dev, HumanEval and MT-bench, each arm's paired gain over ``plain`` with a 95% bootstrap interval
over prompts (``bench.run.paired_gain``); the training curve of each arm (tau on the recipe's GSM8K eval prompts,
8 evals) judged by the plateau rule (``lab.study.plateaued``: the last 4 within +-1.5% of their mean).

Every stage is a ``draftopd`` command with its config under ``HOME/configs``, its log in ``HOME/logs``, a done marker
(config, seconds, process CPU-seconds) in ``HOME/done`` (scripts/figure1.py's ``run_stage``); trainers checkpoint,
so a killed driver resumes with the same command:

    python scripts/ab_warmstart.py --kinds dflash    # (HOME = $DRAFTOPD_HOME/ab_warmstart)
    python scripts/ab_warmstart.py --kinds eagle3 --budget 1800
    python scripts/ab_warmstart.py --quick           # tiny budgets, 4 prompts, a tiny pool: the pipeline end to end
    python scripts/ab_warmstart.py --report          # HOME/report.{json,md} from what has finished
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # figure1.py, the pattern this driver shares

from figure1 import DATASETS, pool, pooled_tau, run_stage, tau_config  # noqa: E402

from draftopd.assets import home as cache_root  # noqa: E402
from draftopd.bench.run import paired_gain  # noqa: E402
from draftopd.config import DataConfig, SFTConfig  # noqa: E402
from draftopd.data.trajectories import data_folders, read_manifest  # noqa: E402
from draftopd.lab.study import plateaued  # noqa: E402
from draftopd.recipes import load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "configs" / "figure1"  # the plain recipe of each kind
POOL_A = ROOT / "pools" / "smollm2-135m-instruct" / "A"
KINDS = ("dflash", "eagle3")
ARMS = {  # name -> (what it changes, SFT overrides)
    "plain": ("the recipe (hard CE)", {}),
    "text": ("text pre-training, then the recipe", {}),
    "init": ("layers from the target's", {"arch.init_from_target": True}),
    "soft": ("soft labels (KL from the target)", {"sft_loss": "soft"}),
    "auf": ("accept-until-fail", {"accept_until_fail": True}),
}
CALIBRATED = {"plain": "plain", "text": "plain", "init": "plain", "soft": "soft", "auf": "auf"}  # arm -> its s/step
TEXT_SOURCES = ("gsm8k_a", "sharegpt")  # never gsm8k_b (pool B) nor an evaluation set
EVALS = 8  # held-out tau evaluations along each arm's run (the plateau curve)
SHARED = "pool-a"  # under $DRAFTOPD_HOME: pool A's snapshot and its feature caches, shared with scripts/plateau.py


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of a run: full, or ``--quick``."""

    budget: float  # training CPU-seconds per arm (the pool's shared feature pass not counted)
    text_share: float  # of the budget, for the text arm's pre-training
    calibration: int  # steps of a calibration run
    prompts: int  # held-out prompts per data set
    max_new: int  # new tokens per held-out prompt
    eval_limit: int  # the training curve's GSM8K prompts
    eval_new: int
    text_rows: int  # text pairs per source
    text_tokens: int  # response tokens kept per text pair


FULL = Plan(3600.0, 0.5, 12, 64, 96, 32, 64, 1000, 256)
QUICK = Plan(20.0, 0.5, 3, 4, 16, 2, 8, 4, 48)


def override(cfg, **values):
    """``cfg`` with dotted ``values`` set (``arch.init_from_target``, ``loop.max_steps``)."""
    nested: dict = {}
    for key, v in values.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = v
        else:
            nested[head] = v
    direct = {k: v for k, v in nested.items() if not isinstance(v, dict)}
    sections = {k: override(getattr(cfg, k), **v) for k, v in nested.items() if isinstance(v, dict)}
    return dataclasses.replace(cfg, **direct, **sections)


def check_pool(folder: Path) -> list[Path]:
    """The data folders of an SFT pool, refused (one line) when any holds pool B's prompts."""
    folders = data_folders(folder) if folder.is_dir() else []
    if not folders:
        sys.exit(f"[ab] no shards in {folder}: pool A is not generated yet (give --pool, or --quick)")
    for f in folders:
        m = read_manifest(f) or {}
        sources = set((m.get("config") or {}).get("sources") or ()) | set(m.get("sources") or {})
        if "gsm8k_b" in sources or f.name == "gsm8k_b":
            sys.exit(f"[ab] {f} holds pool B (gsm8k_b), held back for Draft-OPD: it is never SFT data here")
    return folders


def snapshot(pool_dir: Path, shared: Path) -> Path:
    """A fixed copy of the pool's shards as they are now (``SHARED/pool``), made once: every run trains on the same
    rows (the same path: their feature caches' key) while the pool may still grow. The manifests come along (u16
    shards are checked against them)."""
    out = shared / "pool"
    if (out / "done").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    for f in check_pool(pool_dir):
        dest = out / f.name
        dest.mkdir(parents=True)
        for x in f.iterdir():
            if x.name.startswith("shard_") or x.name == "manifest.json":
                shutil.copy2(x, dest / x.name)
    (out / "done").write_text(str(pool_dir.resolve()))
    return out


def pool_features(shared: Path, kind: str, base: SFTConfig, plan: Plan) -> tuple[Path, float]:
    """The run folder holding the feature cache of ``kind`` over the pool (``base.data``) with the target's last
    hidden states (what soft labels need; a cache serves runs that need less), made once by a soft-label
    calibration run (stage ``features-KIND`` in ``shared``), and what that pass cost in CPU-seconds."""
    out = shared / f"features-{kind}"
    cfg = calibration(override(base, sft_loss="soft"), out, plan)
    run_stage(shared, f"features-{kind}", ["train", "sft"], cfg, tag="pool")
    return out, step_cost(out)[1]


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def step_cost(cal: Path) -> tuple[float, float]:
    """(CPU-seconds per step, feature-pass CPU-seconds) from a calibration run's metrics (logged every step): the
    counter's growth between its first and last step, and what the first step's counter holds besides a step."""
    rows = [r for r in metrics(cal) if "loss" in r and "cpu_seconds" in r]
    if len(rows) < 2:
        sys.exit(f"[ab] {cal}: a calibration run needs 2 logged steps or more")
    per_step = (rows[-1]["cpu_seconds"] - rows[0]["cpu_seconds"]) / (rows[-1]["step"] - rows[0]["step"])
    return per_step, max(0.0, rows[0]["cpu_seconds"] - per_step * rows[0]["step"])


def spent(out: Path) -> float:
    """The CPU-seconds a finished training run's counter reached."""
    rows = [r for r in metrics(out) if "cpu_seconds" in r]
    return rows[-1]["cpu_seconds"] if rows else 0.0


def link_features(src: Path, dst: Path) -> None:
    """Share ``src``'s feature cache with ``dst`` (a hard link; the trainer recomputes it when its key does not fit,
    replacing the link, never the original)."""
    if (src / "features.pt").exists() and not (dst / "features.pt").exists():
        dst.mkdir(parents=True, exist_ok=True)
        os.link(src / "features.pt", dst / "features.pt")


def sized(cfg: SFTConfig, steps: int, budget: float, plan: Plan) -> SFTConfig:
    """``cfg`` for ``steps`` steps under a cap of ``budget`` on its CPU-seconds counter (which starts at the cost of
    the feature pass it reads), tau measured EVALS times on the plan's prompts."""
    every = max(1, steps // EVALS)
    return override(
        cfg, **{"loop.max_steps": steps, "loop.max_cpu_seconds": max(round(budget, 1), 0.1), "loop.eval_every": every,
                "loop.save_every": every, "loop.keep_every": 0, "eval.limit": plan.eval_limit,
                "eval.max_new_tokens": plan.eval_new},
    )  # fmt: skip


def calibration(cfg: SFTConfig, out: Path, plan: Plan) -> SFTConfig:
    return override(
        cfg, out=str(out), **{"loop.max_steps": plan.calibration, "loop.log_every": 1, "loop.eval_every": 10**6,
                              "loop.save_every": 10**6, "eval.limit": 1, "eval.max_new_tokens": 4},
    )  # fmt: skip


def steps_for(budget: float, per_step: float) -> int:
    """Training steps that spend ``budget`` CPU-seconds at ``per_step`` each (at least one)."""
    return max(1, int(budget / max(per_step, 1e-6)))


def run_kind(home: Path, shared: Path, kind: str, plan: Plan, pool_dir: Path, text_dir: Path, say) -> None:
    """Calibrate, train the five arms of ``kind``, bench their held-out tau."""
    base = override(load(SFTConfig, RECIPES / f"sft-{kind}.yaml"), data=str(pool_dir), **{"target.threads": 2})
    arm_cfg = {arm: override(base, **over) for arm, (_, over) in ARMS.items()}
    pre = override(base, data=str(text_dir))  # the text arm's pre-training: the recipe on the text folder
    feats, pool_cost = pool_features(shared, kind, base, plan)
    cal, cost = home / "cal", {}
    for name, cfg in (("plain", arm_cfg["plain"]), ("soft", arm_cfg["soft"]), ("auf", arm_cfg["auf"]), ("pre", pre)):
        out = cal / f"{name}-{kind}"
        if name != "pre":  # the pool's shared cache (pre's features are of the text: its own pass)
            link_features(feats, out)
        say(f"cal-{name}-{kind}", ["train", "sft"], calibration(cfg, out, plan))
        cost[name] = step_cost(out)  # (CPU-s per step, the feature pass's)
    folders = {}
    for arm, cfg in arm_cfg.items():
        out, budget = home / f"{arm}-{kind}", plan.budget
        if arm == "text":  # its text pass and pre-training come out of its budget
            pre_out, share = home / f"text-pre-{kind}", plan.budget * plan.text_share
            link_features(cal / f"pre-{kind}", pre_out)
            per_step, text_cost = cost["pre"]
            pre_cfg = sized(override(pre, out=str(pre_out)), steps_for(share - text_cost, per_step), share, plan)
            say(f"text-pre-{kind}", ["train", "sft"], pre_cfg)
            budget = max(plan.budget - spent(pre_out), 0.1)  # what the pre-training left (its text pass included)
            cfg = override(cfg, init_from=str(pre_out / "final"))
        link_features(feats, out)
        steps = steps_for(budget, cost[CALIBRATED[arm]][0])
        say(f"{arm}-{kind}", ["train", "sft"], sized(override(cfg, out=str(out)), steps, budget + pool_cost, plan))
        folders[arm] = str(out / "final")
    result = home / f"tau-{kind}.json"
    say(f"tau-{kind}", ["bench", "--json", str(result)], tau_config(folders, plan.prompts, plan.max_new))


def text_data(home: Path, plan: Plan) -> DataConfig:
    """The text arm's pre-training data: existing text, labels from the target at SFT time (``data/text.py``)."""
    return load(
        DataConfig, None,
        ["responses=text", f"sources=[{','.join(TEXT_SOURCES)}]", f"limit_per_source={plan.text_rows}",
         f"sampling.max_new_tokens={plan.text_tokens}", "target.threads=2", f"out={home / 'text'}"],
    )  # fmt: skip


def quick_pool(home: Path) -> DataConfig:
    """--quick's own SFT data: 6 greedy trajectories of pool A's GSM8K questions, 48 tokens each."""
    return load(
        DataConfig, None,
        ["sources=[gsm8k_a]", "limit_per_source=6", "sampling.max_new_tokens=48", "target.threads=2",
         "batch_size=6", f"out={home / 'quick-pool'}"],
    )  # fmt: skip


# --- the report ---


def arm_runs(home: Path, kind: str, arm: str) -> list[str]:
    """The stages (= run folder names) of an arm: the text arm's pre-training, then its SFT."""
    return ([f"text-pre-{kind}"] if arm == "text" else []) + [f"{arm}-{kind}"]


def arm_row(home: Path, kind: str, arm: str, r: dict, pool_cost: float = 0.0) -> dict:
    """One arm's record: CPU-seconds (the trainer's counter summed over its runs less ``pool_cost``, the pool's
    shared feature pass its last run starts from, and the processes' from the done markers), steps, held-out tau
    per data set and pooled, paired gain over plain, its curve and plateau verdict."""
    runs = arm_runs(home, kind, arm)
    marks = [home / "done" / f"{s}.json" for s in runs]
    marks = [json.loads(m.read_text()) for m in marks if m.exists()]
    curve = [(m["step"], m["tau"]) for m in metrics(home / runs[-1]) if "tau" in m]
    methods = {ds: r["datasets"][ds]["methods"] for ds in DATASETS}
    pooled = pool(r)
    return {
        "what": ARMS[arm][0],
        "cpu_seconds_trainer": round(sum(spent(home / x) for x in runs) - pool_cost, 1),  # the budget's measure
        "cpu_seconds_processes": round(sum(m.get("cpu_seconds", 0.0) for m in marks), 1),
        "steps": [max((m["step"] for m in metrics(home / x)), default=0) for x in runs],
        "tau": {ds: methods[ds][arm]["tau"] for ds in DATASETS} | {"all": pooled_tau(pooled[arm])},
        "gain_over_plain": {
            ds: paired_gain(methods[ds]["plain"]["per_prompt"], methods[ds][arm]["per_prompt"]) for ds in DATASETS
        }
        | {"all": paired_gain(pooled["plain"], pooled[arm])},  # fmt: skip
        "curve": curve,
        "plateaued": plateaued(curve),
        "configs": [str(home / "configs" / f"{x}.yaml") for x in runs],
    }


def pct(g: tuple[float, float, float]) -> str:
    return f"{100 * g[0]:+.1f}% [{100 * g[1]:+.1f}, {100 * g[2]:+.1f}]"


def report(home: Path, shared: Path | None = None) -> dict:
    """HOME/report.json and HOME/report.md: a table per kind, one row per arm (``arm_row``)."""
    out: dict = {"home": str(home), "datasets": list(DATASETS)}
    lines: list[str] = []
    for kind in KINDS:
        path = home / f"tau-{kind}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        feats = (shared or home) / f"features-{kind}"  # pool_features' run: its calibration logs every step
        pool_cost = step_cost(feats)[1] if (feats / "metrics.jsonl").exists() else 0.0
        rows = {arm: arm_row(home, kind, arm, r, pool_cost) for arm in ARMS if arm in pool(r)}
        out[kind] = rows
        n = len(r["datasets"][DATASETS[0]]["methods"]["plain"]["per_prompt"])
        lines += [f"### {kind} ({n} prompts per data set)", "",
                  "| arm | what | CPU-s trainer / processes | steps | " + " | ".join(DATASETS) + " | all | plateau |",
                  "|---" * (6 + len(DATASETS)) + "|"]  # fmt: skip
        for arm, row in rows.items():
            cells = [f"{row['tau'][ds]:.3f} ({pct(row['gain_over_plain'][ds])})" for ds in (*DATASETS, "all")]
            lines.append(
                f"| {arm} | {row['what']} | {row['cpu_seconds_trainer']:.0f} / {row['cpu_seconds_processes']:.0f} | "
                f"{'+'.join(map(str, row['steps']))} | " + " | ".join(cells) + " | "
                f"{'yes' if row['plateaued'] else 'no'} ({len(row['curve'])} evals) |"
            )
        lines.append("")
    head = [
        "Held-out tau (greedy, every proposal verified) with the paired gain over plain and its 95% bootstrap "
        "interval "
        "over prompts; CPU-s: the trainers' counters less the pool's shared feature pass (steps and the arm's own "
        "passes: the budget's measure) / the processes' "
        "user + system time (model loading and tau evals included); plateau: the last 4 training-curve evals within "
        "+-1.5% of their mean. Command: python scripts/ab_warmstart.py --home HOME; each stage's config in "
        "HOME/configs.",
        "",
    ]
    (home / "report.json").write_text(json.dumps(out, indent=2))
    (home / "report.md").write_text("\n".join(head + lines))
    print("\n".join(head + lines))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", default="", help="default $DRAFTOPD_HOME/ab_warmstart (ab_warmstart-quick with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets, 4 prompts, a tiny pool of its own")
    ap.add_argument("--report", action="store_true", help="only write HOME/report.{json,md} from what has finished")
    ap.add_argument("--pool", default="", help=f"the SFT pool (default {POOL_A}; --quick: a tiny one it makes)")
    ap.add_argument("--budget", type=float, default=0.0, help="training CPU-s per arm (default 3600; --quick 20)")
    ap.add_argument("--text-share", type=float, default=0.0, help="of the budget, the text pre-training's (0.5)")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: dflash,eagle3")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    plan = dataclasses.replace(plan, budget=args.budget or plan.budget, text_share=args.text_share or plan.text_share)
    home = Path(args.home or cache_root() / ("ab_warmstart-quick" if args.quick else "ab_warmstart"))
    shared = home if args.quick or args.pool else cache_root() / SHARED
    if args.report:
        report(home, shared)
        return
    say = lambda name, verb, cfg: run_stage(home, name, verb, cfg, tag="ab")  # noqa: E731
    if args.pool:
        pool_dir = snapshot(Path(args.pool), shared)
    elif args.quick:
        cfg = quick_pool(home)
        say("quick-pool", ["data"], cfg)
        pool_dir = Path(cfg.out)
        check_pool(pool_dir)
    else:
        pool_dir = snapshot(POOL_A, shared)
    text = text_data(home, plan)
    say("text", ["data"], text)
    for kind in args.kinds.split(","):
        if kind not in KINDS:
            sys.exit(f"[ab] unknown kind {kind!r}: dflash or eagle3")
        run_kind(home, shared, kind, plan, pool_dir, Path(text.out), say)
    report(home, shared)


if __name__ == "__main__":
    main()
