"""``draftopd demo`` (what ``make demo`` runs): the paper's story on the embedded default target, in stages.

1. data            target trajectories of GSM8K-train and ShareGPT prompts    (``draftopd data``)
2. sft             a DFlash drafter trained by SFT on them                     (``draftopd train sft``)
3. opd             Draft-OPD from the SFT drafter, the data's greedy trajectories replayed as its rollouts
                   (``draftopd train opd``, replay mode)
4. sft_continued   SFT continued from the same drafter on the same sequences, update for update, with OPD's
                   optimizer and schedule (the matched control)
5. bench           tokens/s and speed-up of plain decoding, prompt lookup, SFT, OPD and SFT continued on
                   held-out GSM8K test_dev, HumanEval and MT-bench prompts, batch 1, side by side (``draftopd bench``);
                   SFT and OPD also as draft trees with the lookup branch (``bench.drafter``'s tree setting)
6. tau             held-out tau of SFT, OPD and SFT continued on more prompts per set, batched and untimed
                   (``draftopd bench --set tau_only=true``): the prompts pair, so the report gives OPD's gain over
                   its matched control with a 95% interval
7. report          REPORT.md, figures, printed paths

Each stage runs as its own process (the exact ``draftopd`` command, from a config file written under
``out/configs``), with its output shown and copied to ``out/logs/<stage>.log``. A stage that finished writes
``out/done/<stage>.json`` and is skipped on the next run, unless its config changed (then it and every later
stage are redone); ``--fresh`` starts over, in a folder the demo made only (it carries ``.draftopd-demo``;
any other non-empty folder is refused, with or without ``--fresh``). The trainers checkpoint as
they go, so Ctrl-C (or a crash) in the middle of a stage loses at most a few steps: the next ``make demo``
resumes it. The report is rebuilt from the stage outputs every time, so an interrupted run and an
uninterrupted one produce the same report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from draftopd import DraftopdError
from draftopd.atomic import check_output_dir, write_json, write_text
from draftopd.config import DemoConfig, DrafterConfig
from draftopd.owner import contents, owning, sweep
from draftopd.recipes import load, to_dict
from draftopd.report import LEARNED, TREE

STAGES = ("data", "sft", "opd", "sft_continued", "bench", "tau")


def _fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def stage_configs(cfg: DemoConfig) -> dict[str, tuple[list[str], object]]:
    """Per stage: the ``draftopd`` verb and its config, every path filled in from ``cfg.out``."""
    out = Path(cfg.out)
    rep = dataclasses.replace
    data = rep(cfg.data, target=cfg.target, out=str(out / "data"))
    sft = rep(cfg.sft, target=cfg.target, data=data.out, out=str(out / "sft"), init_from="")
    # OPD draws its rows from the SFT data as SFT draws them (sample_order): in replay mode the greedy trajectories are
    # its rollouts, so the SFT-continued control trains on the same target text, update for update, with the same
    # optimizer, schedule and seed (OPD's loop, the recipe of the drafter kind filled in), logging every step.
    opd = rep(
        cfg.opd,
        target=cfg.target,
        init_from=str(out / "sft" / "final"),
        out=str(out / "opd"),
        data=data.out,
        max_new_tokens=data.sampling.max_new_tokens,
        eval=sft.eval,
    ).for_kind(sft.arch.kind)
    cont = rep(
        sft,
        init_from=opd.init_from,
        out=str(out / "sft_continued"),
        batch_size=opd.rollout_batch * opd.accum,
        loop=rep(opd.loop, log_every=1, keep_every=sft.loop.keep_every),  # the checkpoints kept: SFT's rule
    )
    bench = rep(cfg.bench, target=cfg.target, drafter=None, methods=demo_methods(cfg.bench.drafter, out, pld=True))
    tau = rep(cfg.tau, target=cfg.target, drafter=None, methods=demo_methods(cfg.tau.drafter, out))
    tau = rep(tau, tau_only=True, hf_baseline=False)
    return {
        "data": (["data"], data),
        "sft": (["train", "sft"], sft),
        "opd": (["train", "opd"], opd),
        "sft_continued": (["train", "sft"], cont),
        "bench": (["bench", "--json", str(out / "bench" / "result.json")], bench),
        "tau": (["bench", "--json", str(out / "tau" / "result.json")], tau),
    }


def demo_methods(drafter: DrafterConfig | None, out: Path, pld: bool = False) -> dict[str, DrafterConfig]:
    """The methods a bench stage compares: the three trained drafters as chains, each decoding as ``drafter`` says
    (its chain_length and confidence; the demo fills in kind and path), and with ``pld`` prompt lookup first. Where
    ``drafter`` asks for a tree or the lookup branch (tree_budget > 0, lookup), SFT and Draft-OPD also decode that
    way, as "SFT tree" and "Draft-OPD tree" (report.TREE), after the chains."""
    d = drafter or DrafterConfig()
    chain = dataclasses.replace(d, tree_budget=0, lookup=False, lookup_switch=False)
    methods = {"prompt lookup": dataclasses.replace(chain, kind="pld", path=None)} if pld else {}
    for name, stage in LEARNED.items():
        methods[name] = dataclasses.replace(chain, kind="path", path=str(out / stage / "final"))
    if d.tree_budget or d.lookup:
        for name in ("SFT", "Draft-OPD"):
            methods[name + TREE] = dataclasses.replace(
                methods[name], tree_budget=d.tree_budget, lookup=d.lookup, lookup_switch=d.lookup_switch
            )
    return methods


def _lines(stream) -> Iterator[bytes]:
    """Pieces of a byte stream ending in \n or \r (a progress bar redraws with \r), as soon as they arrive."""
    pending = b""
    for chunk in iter(lambda: stream.read1(4096), b""):
        pending += chunk
        *done, pending = re.split(rb"(?<=[\r\n])", pending)
        yield from (piece for piece in done if piece)
    if pending:
        yield pending


def run_stage(cmd: list[str], log_path: Path) -> tuple[int, str]:
    """Run one stage's command; its output goes to the terminal and to the stage's log file, except a Python
    traceback, which only the log keeps. Returns (exit status, the error's one line: the last line of the
    traceback or the ``error: ...`` line, '' when there was none)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    error, in_traceback = "", False
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert proc.stdout is not None
            for line in _lines(proc.stdout):
                log.write(line)
                log.flush()
                text = line.decode(errors="replace").strip()
                in_traceback = in_traceback or text.startswith("Traceback (most recent call last)")
                if text and (in_traceback or text.startswith("error: ")):
                    error = text  # the last line of a traceback is the exception and its message
                if not in_traceback:
                    sys.stderr.buffer.write(line)
                    sys.stderr.flush()
            return proc.wait(), error
        except KeyboardInterrupt:  # pass it on (a terminal's Ctrl-C reaches both), let the child stop cleanly
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait()
            raise


MARKER = ".draftopd-demo"  # written by the demo into the folder it made; --fresh removes only such a folder


def is_demo_folder(out: Path) -> bool:
    """``out`` carries the demo's marker (or, from before the marker, the demo's own layout)."""
    legacy = (out / "demo_config.yaml").is_file() and (out / "done").is_dir() and (out / "configs").is_dir()
    return (out / MARKER).is_file() or legacy


def claim(out: Path, fresh: bool) -> None:
    """Make ``out`` the demo's folder, or refuse: a missing or empty folder is created and marked; one that
    carries the marker is resumed (``fresh``: emptied first); anything else is left untouched."""
    check_output_dir(out, "demo out")
    if fresh and out.is_symlink():
        raise DraftopdError(
            f"demo --fresh --out {out}: a symbolic link (to {os.readlink(out)}); --fresh removes only a real "
            "folder: give the folder it points to, or drop --fresh to resume in it"
        )
    if out.is_dir() and contents(out) and not is_demo_folder(out):
        raise DraftopdError(
            f"{out} is not empty and was not made by `draftopd demo` (it has no {MARKER}): nothing was changed; "
            + ("--fresh removes only a demo's own folder; " if fresh else "")
            + "choose another --out"
        )
    if fresh and out.is_dir():  # emptied, not removed: its lock (owner.py) stays where it is, held
        for p in contents(out):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if not (out / MARKER).is_file():
        write_text(out / MARKER, "made by `draftopd demo`: `draftopd demo --fresh` may remove this folder\n")


def run_demo(cfg: DemoConfig, fresh: bool = False, say=print) -> Path:
    """Run (or resume) every stage, then write the report; returns the path of REPORT.md. The demo folder's lock
    is held throughout (a second demo on it stops in one line); each stage locks its own folder."""
    out = Path(cfg.out)
    check_output_dir(out, "demo out")
    with owning(out, "demo", sweep_inside=False, inside=True):
        claim(out, fresh)
        for folder in (out, out / "configs", out / "done", out / "figures"):  # the demo's own files
            sweep(folder)
        return _run(cfg, out, say)


def _run(cfg: DemoConfig, out: Path, say) -> Path:
    (out / "configs").mkdir(parents=True, exist_ok=True)
    write_text(out / "demo_config.yaml", yaml.safe_dump(_plain(to_dict(cfg)), sort_keys=False))
    stages = stage_configs(cfg)
    t_start = time.perf_counter()
    todo = [n for n in STAGES if not (out / "done" / f"{n}.json").exists()]
    say(f"[demo] {len(todo)} of {len(STAGES)} stages to run ({', '.join(todo) or 'none'}), then the report -> {out}")
    changed = False
    for i, name in enumerate(STAGES, 1):
        verb, c = stages[name]
        done = out / "done" / f"{name}.json"
        conf = out / "configs" / f"{name}.yaml"
        text = yaml.safe_dump(_plain(to_dict(c)), sort_keys=False)
        # compared as configs (new fields default; one written before the loop section read in its layout)
        if changed or _changed(conf, c):
            changed = True  # a stage whose recipe changed starts over, and so does every stage after it
            if (out / name).exists() or done.exists():
                say(f"[demo] stage {name}: its config changed, redoing it")
            shutil.rmtree(out / name, ignore_errors=True)
            done.unlink(missing_ok=True)
            (out / "done" / f"{name}.seconds").unlink(missing_ok=True)
        if done.exists():
            took = _fmt(json.loads(done.read_text())["seconds"])
            say(f"[demo] stage {i}/{len(STAGES)} {name}: done earlier ({took}), skipped")
            continue
        write_text(conf, text)
        cmd = [sys.executable, "-m", "draftopd.cli", *verb, "--config", str(conf)]
        spent = out / "done" / f"{name}.seconds"  # time of earlier, interrupted attempts of this stage
        before = float(spent.read_text()) if spent.exists() else 0.0
        earlier = f"; {_fmt(before)} in earlier attempts" if before else ""
        say(
            f"[demo] stage {i}/{len(STAGES)} {name}: started "
            f"(elapsed {_fmt(time.perf_counter() - t_start)}{earlier}; log {out / 'logs' / (name + '.log')})"
        )
        t0 = time.perf_counter()
        try:
            rc, error = run_stage(cmd, out / "logs" / f"{name}.log")
        finally:
            spent.parent.mkdir(parents=True, exist_ok=True)
            write_text(spent, str(before + time.perf_counter() - t0))
        if rc != 0:
            why = error.removeprefix("error: ") or f"exit status {rc}"
            raise DraftopdError(f"demo stage {name} failed: {why} (log: {out / 'logs' / (name + '.log')})")
        total = before + time.perf_counter() - t0
        write_json(done, {"seconds": total, "command": _shell(cmd)}, indent=None)
        say(f"[demo] stage {i}/{len(STAGES)} {name}: done in {_fmt(total)}")
    from draftopd.report import write_report

    say("[demo] writing the report")
    report = write_report(out, {n: json.loads((out / "done" / f"{n}.json").read_text()) for n in STAGES})
    say(f"[demo] finished in {_fmt(time.perf_counter() - t_start)}; report: {report}")
    for fig in sorted((out / "figures").glob("*.png")):
        say(f"[demo]   figure: {fig}")
    return report


def _changed(conf: Path, cfg) -> bool:
    """Whether the stage config written earlier at ``conf`` differs from ``cfg``, compared as configs (new fields
    take their defaults); one an older version wrote that no longer loads (e.g. a bench's list of methods) has."""
    if not conf.exists():
        return False
    try:
        return load(type(cfg), conf, stored=True) != cfg
    except DraftopdError:
        return True


def _plain(x):
    """Tuples -> lists so the YAML stays plain (and loads back through recipes.load)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _shell(cmd: list[str]) -> str:
    return " ".join(["draftopd", *cmd[3:]])  # "python -m draftopd.cli" is the console script
