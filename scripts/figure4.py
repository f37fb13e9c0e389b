"""Issue 37: the paper's Figure 4 on the embedded default target, as one resumable driver: from a DFlash drafter
trained to its plateau on pool A, does Draft-OPD on new prompts (pool B) beat SFT on the same prompts?

The rules that read the result were committed before any arm ran (docs/figure4-rules.md, commit 171b466) and are
applied as written by ``draftopd.lab.matched``. The experiment:

* **Start (N)**: the plateaued DFlash drafter (``--start``: a run folder of scripts/plateau.py, default
  $DRAFTOPD_HOME/plateau/run-dflash: its last training checkpoint, so S carries its AdamW moments; O starts from the
  same weights with a fresh optimizer, as the authors' recipe does).
* **Data**: pool B (pools/smollm2-135m-instruct/B: 2,000 held-back GSM8K-train prompts, greedy trajectories of up to
  384 tokens), 3 epochs of 16 rows per update (125 updates an epoch, 375 in all), whole trajectories for every arm
  (OPD's ``max_new_tokens`` 384, SFT's ``max_len`` 640), the same rows per update for every arm of a seed
  (``sample_order``).
* **Arms**: O = Draft-OPD, the DFlash recipe (configs/figure1/opd.yaml, OPD_RECIPES: replay, both streams, lr 3e-4,
  5% warm-up, cosine to 0); O-rej = O without the rejected stream; O-25 = O with the rejected stream weighted so that
  it is ~25% of the loss (its weight from O seed 0's first epoch: lam = resp / (3 rej), the streams' logged sums);
  S = SFT continued on the same rows with O's loop (hard CE, the start's moments carried); S-paper = SFT continued
  with a fresh AdamW at lr 6e-4; seeds 0 and 1 for O and S, seed 0 for the others. (S-more, the compute-matched
  reading, is not built here.)
* **Score**: ``draftopd bench`` tau-only (greedy, ungated, 96 new tokens, batched) on the first 64 prompts each of
  GSM8K test_dev, HumanEval and MT-bench, of N and of each arm's checkpoints at the ends of epochs 1, 2 and 3: one
  bench stage per arm (``tau-ARM``), so that an arm's stage ends with its evaluation.

Stages (``scripts/figure1.py``'s ``run_stage``: configs, logs and done markers under HOME; trainers checkpoint, so
the same command resumes a killed stage); HOME = $DRAFTOPD_HOME/figure4:

    python scripts/figure4.py                       # every arm, in the order O s0, S s0, O s1, S s1, O-rej, ...
    python scripts/figure4.py --arms O-s0,S-s0      # just these (each with its tau stage)
    python scripts/figure4.py --report              # HOME/figure4.{json,md}, docs/figures/figure4.png
    python scripts/figure4.py --quick               # tiny pool and start of its own, 2 updates an epoch

Only numbers and small files need to survive a machine change: each ``tau-ARM.json`` (copy them with ``--report``'s
JSON into docs/), the start's checkpoint and pool B being what a rerun needs besides.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the drivers this one shares its stages with

from ab_warmstart import link_features, override  # noqa: E402
from figure1 import CONF, run_stage, tau_config  # noqa: E402

from draftopd.assets import home as cache_root  # noqa: E402
from draftopd.bench.run import cpu_flags  # noqa: E402
from draftopd.config import DataConfig, OPDConfig, SFTConfig  # noqa: E402
from draftopd.lab import matched  # noqa: E402
from draftopd.recipes import from_dict, load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
POOL_B = ROOT / "pools" / "smollm2-135m-instruct" / "B"
RULES_COMMIT = "171b466"  # the commit that added docs/figure4-rules.md, before any arm
ROWS = 16  # rows per update, every arm
SEEDS = {"O": (0, 1), "S": (0, 1), "O-rej": (0,), "O-25": (0,), "S-paper": (0,)}
ORDER = ("O-s0", "S-s0", "O-s1", "S-s1", "O-rej-s0", "O-25-s0", "S-paper-s0")


@dataclasses.dataclass(frozen=True)
class Plan:
    epoch: int  # updates per epoch (pool rows / ROWS)
    prompts: int  # held-out prompts per set
    max_new: int  # new tokens per held-out prompt
    eval_limit: int  # the trainers' own small tau eval (GSM8K), at each epoch's end
    max_new_tokens: int  # OPD's trajectory budget (whole pool trajectories)


FULL = Plan(125, 64, 96, 16, 384)
QUICK = Plan(2, 4, 16, 2, 48)


def start_checkpoint(run: Path) -> Path:
    """The training checkpoint a plateau run ended at (``checkpoints/latest``): weights and AdamW moments."""
    pointer = run / "checkpoints" / "latest"
    if not pointer.exists():
        sys.exit(f"[figure4] {run}: no checkpoints/latest (give --start a finished SFT run folder)")
    return run / "checkpoints" / pointer.read_text().strip()


def loop_for(opd: OPDConfig, plan: Plan, seed: int) -> dict:
    """O's loop (every arm's but S-paper's lr): 3 epochs, a checkpoint kept at each epoch's end."""
    return {"loop.max_steps": 3 * plan.epoch, "loop.seed": seed, "loop.save_every": max(1, plan.epoch // 5),
            "loop.keep_every": plan.epoch, "loop.eval_every": plan.epoch, "loop.log_every": 1,
            "eval.limit": plan.eval_limit}  # fmt: skip


def arm_configs(home: Path, start: Path, data: Path, plan: Plan, rej25: float | None) -> dict[str, tuple]:
    """Every training arm: stage name -> (verb, config). ``rej25``: O-25's rejected-stream weight (None until O
    seed 0's first epoch has run)."""
    ckpt = start_checkpoint(start)
    opd = load(OPDConfig, CONF / "opd.yaml")
    opd = dataclasses.replace(
        opd, data=str(data), init_from=str(start / "final"), max_new_tokens=plan.max_new_tokens
    ).for_kind("dflash")
    sft = from_dict(SFTConfig, json.loads((start / "run_config.json").read_text()))  # the start's own recipe
    sft = dataclasses.replace(
        sft, data=str(data), init_from=str(ckpt), batch_size=ROWS, max_len=max(sft.max_len, 640), sft_loss="hard_ce",
        accept_until_fail=False, loop=opd.loop, eval=dataclasses.replace(sft.eval, limit=plan.eval_limit),
    )  # fmt: skip
    sft = override(sft, **{"loop.max_cpu_seconds": 0.0, "target.threads": 2})
    out: dict[str, tuple] = {}
    for arm, seeds in SEEDS.items():
        for k in seeds:
            stage = f"{arm}-s{k}"
            if arm.startswith("O"):
                if arm == "O-25" and rej25 is None:
                    continue
                over = {"O": {}, "O-rej": {"rej_weight": 0.0}, "O-25": {"rej_weight": rej25}}[arm]
                cfg = dataclasses.replace(opd, out=str(home / stage), **over)
                out[stage] = (["train", "opd"], override(cfg, **loop_for(opd, plan, k)))
            else:
                cfg = dataclasses.replace(sft, out=str(home / stage))
                cfg = override(cfg, **loop_for(opd, plan, k))
                if arm == "S-paper":  # fresh AdamW (from the serving folder: no moments) at lr 6e-4
                    cfg = override(dataclasses.replace(cfg, init_from=str(start / "final")), **{"loop.lr": 6e-4})
                out[stage] = (["train", "sft"], cfg)
    return out


def tau_stage(home: Path, stage: str, plan: Plan):
    """The held-out bench of an arm's checkpoints at the ends of epochs 1-3 (names ``ARM sK eE``)."""
    arm, _, seed = stage.rpartition("-s")
    folders = {
        matched.name(arm, int(seed), e): str(home / stage / "checkpoints" / f"step_{e * plan.epoch:06d}")
        for e in matched.EPOCHS
    }
    return ["bench", "--json", str(home / f"tau-{stage}.json")], tau_config(folders, plan.prompts, plan.max_new)


def rej_weight_for_25pct(run: Path, epoch: int) -> float | None:
    """O-25's rejected-stream weight from O's first epoch: lam with lam * rej / (resp + lam * rej) = 1/4, i.e.
    lam = resp / (3 rej), the streams' sums over the epoch's updates (metrics resp_loss_sum, rej_loss_sum)."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows = [r for r in rows if "rej_loss_sum" in r and r["step"] <= epoch]
    if len(rows) < epoch:
        return None
    resp, rej = sum(r["resp_loss_sum"] for r in rows), sum(r["rej_loss_sum"] for r in rows)
    return round(resp / (3 * rej), 4) if rej > 0 else None


def quick_inputs(home: Path, say) -> tuple[Path, Path]:
    """--quick: 8 greedy trajectories of pool B's questions and a 4-step SFT start on them."""
    data = load(DataConfig, None, ["sources=[gsm8k_b]", "limit_per_source=8", "sampling.max_new_tokens=48",
                                   "batch_size=8", "target.threads=2", f"out={home / 'quick-pool'}"])  # fmt: skip
    say("quick-pool", ["data"], data)
    sets = [f"data={data.out}", f"out={home / 'quick-start'}", "loop.max_steps=4", "loop.eval_every=4",
            "loop.save_every=4", "eval.limit=1", "eval.max_new_tokens=4"]  # fmt: skip
    sft = load(SFTConfig, CONF / "sft-dflash.yaml", sets)
    say("quick-start", ["train", "sft"], sft)
    return Path(sft.out), Path(data.out)


# --- the report ---


def cpu_seconds(home: Path, stage: str) -> float:
    done = home / "done" / f"{stage}.json"
    return json.loads(done.read_text()).get("cpu_seconds", 0.0) if done.exists() else 0.0


def report(home: Path, plan: Plan, figure: Path | None) -> dict:
    """HOME/figure4.json and .md: tau per arm, seed and epoch on each set and pooled, the gains the rules read,
    the verdict (``matched.verdict``), per-arm CPU-seconds; and the figure (tau vs epoch, every arm)."""
    benches = [json.loads(p.read_text()) for p in sorted(home.glob("tau-*.json"))]
    res = matched.from_bench(benches)
    cpu = {stage: cpu_seconds(home, stage) for stage in ORDER}
    per_epoch = {}
    for arm in SEEDS:
        spent = [cpu[f"{arm}-s{k}"] for k in SEEDS[arm] if cpu.get(f"{arm}-s{k}")]
        if spent:
            per_epoch[arm] = sum(spent) / len(spent) / 3
    rows = []
    for n in sorted(res, key=lambda x: (x != "N", x)):
        taus = {w: matched.tau(res[n][w]) for w in ("in", "out", "all")}
        base = {w: matched.gain(res, "N", n, w) for w in ("in", "out", "all")} if "N" in res and n != "N" else {}
        rows.append({"name": n, "tau": taus, "gain_over_N": base})
    host = {"cpu": platform.processor() or platform.machine(), "flags": cpu_flags()}
    out = {"rules": f"docs/figure4-rules.md at {RULES_COMMIT}", "machine": host, "cpu_seconds": cpu,
           "cpu_seconds_per_epoch": per_epoch, "rows": rows, **matched.verdict(res, per_epoch)}  # fmt: skip
    (home / "figure4.json").write_text(json.dumps(out, indent=2, default=str))
    lines = [f"Rules: docs/figure4-rules.md (commit {RULES_COMMIT}). Verdict: **{out['verdict']}**.", "",
             "| drafter | GSM8K (in) | HumanEval + MT-bench (out) | pooled | pooled gain over N |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        g = r["gain_over_N"].get("all")
        cell = f"{100 * g[0]:+.1f}% [{100 * g[1]:+.1f}, {100 * g[2]:+.1f}]" if g else ""
        lines.append(
            f"| {r['name']} | {r['tau']['in']:.3f} | {r['tau']['out']:.3f} | {r['tau']['all']:.3f} | {cell} |"
        )
    (home / "figure4.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if figure is not None and res:
        draw(res, figure)
    return out


def draw(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (where, title) in zip(axes, (("in", "GSM8K (in domain)"), ("out", "HumanEval + MT-bench (out)"),
                                         ("all", "pooled")), strict=True):  # fmt: skip
        n = matched.tau(res["N"][where]) if "N" in res else None
        for arm in SEEDS:
            for k in SEEDS[arm]:
                pts = [(e, matched.tau(res[matched.name(arm, k, e)][where])) for e in matched.EPOCHS
                       if matched.name(arm, k, e) in res]  # fmt: skip
                if not pts:
                    continue
                xs, ys = zip(*([(0, n)] if n else []) + pts, strict=True)
                ax.plot(xs, ys, "o-" if k == 0 else "s--", label=f"{arm} s{k}")
        ax.set(title=title, xlabel="epoch of pool B (0 = N, the plateaued start)", ylabel="held-out tau")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", default="", help="default $DRAFTOPD_HOME/figure4 (figure4-quick with --quick)")
    ap.add_argument(
        "--start", default="", help="the plateaued SFT run folder (default $DRAFTOPD_HOME/plateau/run-dflash)"
    )
    ap.add_argument("--arms", default=",".join(ORDER), help=f"stages to run, in order (default {','.join(ORDER)})")
    ap.add_argument("--report", action="store_true", help="only the tables, the verdict and the figure")
    ap.add_argument("--quick", action="store_true", help="a tiny pool and start of its own: the pipeline end to end")
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    home = Path(args.home or cache_root() / ("figure4-quick" if args.quick else "figure4"))
    figure = None if args.quick else ROOT / "docs" / "figures" / "figure4.png"
    if args.report:
        report(home, plan, figure)
        return
    say = lambda name, verb, cfg: run_stage(home, name, verb, cfg, tag="figure4")  # noqa: E731
    if args.quick:
        start, data = quick_inputs(home, say)
    else:
        start, data = Path(args.start or cache_root() / "plateau" / "run-dflash"), POOL_B
    n_stage = tau_config({"N": str(start / "final")}, plan.prompts, plan.max_new)
    say("tau-N", ["bench", "--json", str(home / "tau-N.json")], n_stage)
    for stage in args.arms.split(","):
        rej25 = rej_weight_for_25pct(home / "O-s0", plan.epoch)
        arms = arm_configs(home, start, data, plan, rej25)
        if stage not in arms:
            why = (
                "O-25 needs O seed 0's first epoch first" if stage.startswith("O-25") else f"one of {', '.join(ORDER)}"
            )
            sys.exit(f"[figure4] no stage {stage!r} yet: {why}")
        if stage.startswith("S"):  # the SFT arms read the same features of pool B: S seed 0's, once made
            link_features(home / "S-s0", home / stage)
        say(stage, *arms[stage])
        say(f"tau-{stage}", *tau_stage(home, stage, plan))
    report(home, plan, figure)


if __name__ == "__main__":
    main()
