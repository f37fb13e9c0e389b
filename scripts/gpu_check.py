#!/usr/bin/env python
"""One prepared GPU check: engine correctness, SFT and OPD step costs, peak memory; one JSON file out.

Runs with no network and no downloads: the target is a ``Qwen3ForCausalLM`` of Qwen3-8B's shape
(``draftopd.lab.scaling.PRESETS['qwen3-8b']``) with random weights, built directly on the device in bf16 (``--tiny``:
a 4-layer small shape, so the same code is tested on a CPU). Acceptance (tau) means nothing with random
weights; speed and memory do. What it measures, each phase recorded even when another fails:

* ``greedy``: random prompt ids, batched; ``speculative_generate`` with no drafter and with a fresh DFlash
  drafter against transformers' ``generate(do_sample=False)`` one prompt at a time. fp32 (the tiny CPU run):
  token for token; bf16 on a GPU: the fraction of tokens before the first divergence (bf16 kernels differ
  across batch shapes: recorded, not failed).
* ``sft.{dflash,eagle3}``: optimizer steps of the SFT step code (``sft_states`` -> ``token_logprobs`` ->
  ``weighted_nll``, AdamW) on synthetic random-token trajectories at the sizes of ``configs/gpu-sft-*.yaml``:
  tokens/s, seconds per step, peak memory, and the memory model's prediction for the same shapes.
* ``opd.{dflash,eagle3}``: a target-assisted rollout with the drafter's engine (``record=True``; seconds per
  verify step), and Draft-OPD updates (``opd.replay_plans`` -> ``opd.replay_loss`` -> AdamW) on synthetic
  rollouts whose verify records commit ``tau`` tokens per step, at the sizes of ``configs/gpu-opd-*.yaml``:
  seconds per update (replay), the rollout time per update those sizes imply, peak memory, prediction.
* ``torchrun`` (``--torchrun``): the DFlash SFT steps again in a child launched by ``torchrun --nproc-per-node
  1``, through the trainers' ``init_distributed`` and their all-reduce of the gradients. A failure there is
  recorded in the JSON, not fatal.

Peak memory: ``torch.cuda.max_memory_allocated`` per phase on a GPU; on a CPU the process's peak RSS so far
(it only grows). Usage: ``scripts/gpu_check.sh`` (GPU) or ``python scripts/gpu_check.py --tiny --device cpu``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

from draftopd.config import ArchConfig, OPDConfig, SFTConfig  # noqa: E402
from draftopd.decoding.loop import VerifyStep, speculative_generate  # noqa: E402
from draftopd.lab import scaling  # noqa: E402
from draftopd.models.base import SeqBatch  # noqa: E402
from draftopd.models.io import DRAFTERS  # noqa: E402
from draftopd.models.target import Target  # noqa: E402
from draftopd.recipes import load  # noqa: E402
from draftopd.train import opd  # noqa: E402
from draftopd.train.losses import token_logprobs, weighted_nll  # noqa: E402
from draftopd.train.scaffold import feature_scale, make_optimizer  # noqa: E402

TINY = scaling.TargetShape("tiny-qwen3", 64, 128, 4, 4, 2, 16, 512)


# ----------------------------------------------------------------------------------------------------------
# Set-up


def build_target(shape: scaling.TargetShape, device: str, dtype: torch.dtype, seed: int, std: float) -> Target:
    """A Qwen3ForCausalLM of ``shape`` with random weights, made on ``device`` in ``dtype`` (no CPU copy of an
    8B model). No EOS: every generation runs to its token budget."""
    cfg = Qwen3Config(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        vocab_size=shape.vocab,
        tie_word_embeddings=shape.tied,
        initializer_range=std,
        max_position_embeddings=8192,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return Target(model.to(device), tokenizer=None, name=shape.name)  # already in dtype: buffers keep theirs


def recipes(tiny: bool) -> dict:
    """The sizes measured: the GPU recipes in configs/, or tiny versions of them."""
    sft = {k: load(SFTConfig, ROOT / f"configs/gpu-sft-{k}.yaml") for k in ("dflash", "eagle3")}
    opd_ = {k: load(OPDConfig, ROOT / f"configs/gpu-opd-{k}.yaml") for k in ("dflash", "eagle3")}
    if tiny:
        sft["dflash"] = dataclasses.replace(
            sft["dflash"],
            arch=ArchConfig(kind="dflash", num_layers=2, block_size=8),
            batch_size=2,
            blocks_per_seq=4,
            max_len=48,
        )
        sft["eagle3"] = dataclasses.replace(
            sft["eagle3"], arch=ArchConfig(kind="eagle3", draft_vocab_size=256, ttt_steps=3), batch_size=2, max_len=48
        )
        for k in opd_:
            opd_[k] = dataclasses.replace(opd_[k], rollout_batch=2, micro_batch=1, max_new_tokens=24, chain_length=3)
    return {"sft": sft, "opd": opd_}


def say(msg: str) -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> dict:
    if device.startswith("cuda"):
        return {
            "peak_gib": round(torch.cuda.max_memory_allocated() / scaling.GIB, 3),
            "peak_kind": "cuda_max_allocated",
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"peak_gib": round(rss / scaling.GIB, 3), "peak_kind": "process_max_rss (cumulative)"}


def random_ids(n: int, length: int, vocab: int, gen: torch.Generator) -> list[list[int]]:
    return torch.randint(0, vocab, (n, length), generator=gen).tolist()


def drafter_shape(model) -> scaling.DrafterShape:
    c = model.config
    if hasattr(c, "block_size"):
        return scaling.DrafterShape("dflash", num_layers=c.num_hidden_layers, block_size=c.block_size)
    return scaling.DrafterShape("eagle3", draft_vocab=c.draft_vocab_size)


def new_drafter(target: Target, arch: ArchConfig, seqs: list[tuple[list[int], int]]):
    """A fresh drafter of ``arch`` for ``target`` (feature scale from a few sequences), on the target's device."""
    model = DRAFTERS[arch.kind].build(target, arch, seqs)
    model.set_feature_scale(feature_scale(target, seqs[:4], model.config.target_layer_ids))
    return model.to(target.device).train()


# ----------------------------------------------------------------------------------------------------------
# Phases


def greedy_check(target: Target, args, shape: scaling.TargetShape) -> dict:
    """Our engine (plain, and with a fresh DFlash drafter) against transformers' generate, greedy."""
    gen = torch.Generator().manual_seed(args.seed)
    n_new = 12 if args.tiny else 48
    lengths = [5, 9, 7] if args.tiny else [17, 41, 29, 64]
    prompts = [random_ids(1, n, shape.vocab, gen)[0] for n in lengths]
    dev = target.device
    t0 = time.perf_counter()
    ref = []
    for p in prompts:
        ids = torch.tensor([p], device=dev)
        out = target.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n_new,
            min_new_tokens=n_new,
            pad_token_id=0,
        )
        ref.append(out[0, len(p) :].tolist())
    hf_s = time.perf_counter() - t0
    arch = ArchConfig(kind="dflash", num_layers=2, block_size=8 if args.tiny else 16)
    drafter = new_drafter(target, arch, [(p, len(p) // 2) for p in prompts])
    res = {"prompts": len(prompts), "new_tokens": n_new, "dtype": str(target.dtype), "hf_generate_s": round(hf_s, 3)}
    for name, engine in (("plain", None), ("dflash", drafter.engine(target))):
        t0 = time.perf_counter()
        out = speculative_generate(target, prompts, engine, n_new)
        sync(args.device)
        prefix = []
        for a, b in zip(out.tokens, ref, strict=True):
            same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            prefix.append(same / max(len(b), 1))
        res[name] = {
            "exact": out.tokens == ref,
            "match_fraction": round(sum(prefix) / len(prefix), 4),
            "seconds": round(time.perf_counter() - t0, 3),
            "tau": round(out.stats.tau, 3),
        }
    res["exact"] = res["plain"]["exact"] and res["dflash"]["exact"]
    return res


def synthetic_seqs(n: int, length: int, prompt_len: int, vocab: int, gen: torch.Generator):
    """Random-token trajectories (ids, prompt length); tokens from the first ``vocab`` ids, so a reduced EAGLE-3
    vocabulary built from them covers them (real text concentrates on frequent tokens too)."""
    return [(ids, prompt_len) for ids in random_ids(n, length, vocab, gen)]


def sft_batch(target: Target, layer_ids, seqs, seeds: list[int], gen_seed: int) -> tuple[SeqBatch, object]:
    """A training batch on the target's device with its features, and the anchor generator for a drafter API that
    takes one (older ``sft_states(embed, batch, gen, cfg)``) or None (``SeqBatch.seeds``)."""
    dev = target.device
    ids = torch.tensor([s for s, _ in seqs], device=dev)
    pos = torch.arange(ids.shape[1], device=dev).expand_as(ids)
    feats = target.forward(ids, torch.ones_like(ids), pos, None, tuple(layer_ids), "none").features
    lengths = torch.full((len(seqs),), ids.shape[1], device=dev)
    prompt_len = torch.tensor([p for _, p in seqs], device=dev)
    if "seeds" in {f.name for f in dataclasses.fields(SeqBatch)}:
        return SeqBatch(ids, lengths, prompt_len, feats, seeds), None
    return SeqBatch(ids, lengths, prompt_len, feats), torch.Generator().manual_seed(gen_seed)


def sft_loss(model, target: Target, batch: SeqBatch, gen, cfg: SFTConfig) -> torch.Tensor:
    with torch.autocast(target.device.type, dtype=target.dtype, enabled=target.dtype != torch.float32):
        args = (batch, cfg) if gen is None else (batch, gen, cfg)
        out = model.sft_states(target.embed, *args)
        # SFTSlots (states, labels, weights, where each slot sits), or the (states, labels, weights) of older code
        h, labels, weights = (out.states, out.labels, out.weights) if hasattr(out, "states") else out
        logp = token_logprobs(h, labels, lambda x: model.draft_logits(x, target))
        return weighted_nll(logp, weights)


def optimizer_step(model, opt, sched, clip: float, all_reduce=None) -> float:
    if all_reduce is not None:
        all_reduce(model)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def sft_phase(target: Target, cfg: SFTConfig, args, all_reduce=None) -> dict:
    """Warm-up + timed SFT optimizer steps at the recipe's sizes (the batch is this process's)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    vocab = min(target.vocab_size, cfg.arch.draft_vocab_size)
    prompt_len = min(256, cfg.max_len // 4)
    seqs = synthetic_seqs(cfg.batch_size, cfg.max_len, prompt_len, vocab, gen)
    model = new_drafter(target, cfg.arch, seqs)
    opt, sched = make_optimizer(dataclasses.replace(cfg.loop, max_steps=1000), model)
    batch, anchor_gen = sft_batch(target, model.config.target_layer_ids, seqs, list(range(len(seqs))), args.seed)
    reset_peak(args.device)
    losses, times = [], []
    for step in range(args.warmup + args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        loss = sft_loss(model, target, batch, anchor_gen, cfg)
        loss.backward()
        optimizer_step(model, opt, sched, cfg.loop.grad_clip, all_reduce)
        sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(round(loss.item(), 4))
    tokens = cfg.batch_size * cfg.max_len
    d = drafter_shape(model)
    d = dataclasses.replace(d, ttt_steps=cfg.arch.ttt_steps)
    shape = scaling.TargetShape.from_hf(target.config, target.name)
    pred = scaling.sft_memory(
        shape, d, micro_batch=cfg.batch_size, seq_len=cfg.max_len, prompt_len=prompt_len,
        blocks_per_seq=cfg.blocks_per_seq,
    )  # fmt: skip
    step_s = sum(times) / len(times)
    return {
        "batch_size": cfg.batch_size,
        "max_len": cfg.max_len,
        "blocks_per_seq": cfg.blocks_per_seq if cfg.arch.kind == "dflash" else None,
        "drafter_params": sum(p.numel() for p in model.parameters()),
        "steps_timed": len(times),
        "s_per_step": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s, 1),
        "losses": losses,
        **peak_gib(args.device),
        "predicted_gib": round(pred.gib(), 3),
        "predicted_parts_gib": pred.parts_gib(),
    }


def synthetic_rollouts(n: int, prompt_len: int, response_len: int, tau: float, proposals: int, vocab: int, gen):
    """Rollouts (prompt, response, verify records) as the engine records them, committing ``tau`` tokens per
    verify step on average: accepted proposals equal the response, the rest are random wrong tokens."""
    rows = []
    p_acc = 1 - 1 / tau  # geometric acceptance: E[accepted + 1] = tau (before the cap at ``proposals``)
    for _ in range(n):
        prompt = random_ids(1, prompt_len, vocab, gen)[0]
        resp = random_ids(1, response_len, vocab, gen)[0]
        steps, anchor = [], 0
        while anchor < response_len - 1:
            r = 0
            while r < proposals and torch.rand(1, generator=gen).item() < p_acc:
                r += 1
            r = min(r, response_len - 2 - anchor)
            wrong = [(t + 1) % vocab for t in resp[anchor + r + 1 : anchor + proposals + 1]]
            draft = resp[anchor + 1 : anchor + r + 1] + wrong
            draft += random_ids(1, proposals - len(draft), vocab, gen)[0] if len(draft) < proposals else []
            logp = (-8 * torch.rand(proposals, generator=gen)).tolist()
            steps.append(VerifyStep(anchor, draft[:proposals], r, resp[anchor + r + 1], logp))
            anchor += r + 1
        rows.append((prompt, resp, steps))
    return rows


def opd_phase(target: Target, cfg: OPDConfig, kind: str, sft_cfg: SFTConfig, args) -> dict:
    """A real rollout (seconds per verify step) and timed Draft-OPD updates on synthetic rollouts."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    vocab = min(target.vocab_size, sft_cfg.arch.draft_vocab_size)
    cfg = cfg.for_kind(kind)  # fields left at None: the kind's recipe
    plen, resp = (16 if args.tiny else 512), cfg.max_new_tokens  # prompts as the paper's (<= 512 tokens)
    tau = args.tau if args.tau else (6.0 if kind == "dflash" else 4.0)
    model = new_drafter(target, sft_cfg.arch, synthetic_seqs(8, min(plen + resp, 512), 16, vocab, gen))
    # (a) rollout: the engine with this (untrained: tau ~ 1) drafter, a short budget, timed per verify step
    prompts = random_ids(cfg.rollout_batch, min(plen, 128), target.vocab_size, gen)
    rollout_new = min(resp, 24 if args.tiny else 128)
    reset_peak(args.device)
    sync(args.device)
    t0 = time.perf_counter()
    out = speculative_generate(target, prompts, model.engine(target, cfg.chain_length), rollout_new, record=True)
    sync(args.device)
    rollout_s = time.perf_counter() - t0
    verifies = out.stats.target_calls - 1
    rollout = {
        "rows": len(prompts),
        "new_tokens": rollout_new,
        "seconds": round(rollout_s, 3),
        "verify_steps": verifies,
        "s_per_verify_step": round(out.stats.decode_s / max(verifies, 1), 5),
        "tau_untrained": round(out.stats.tau, 3),
        **peak_gib(args.device),
    }
    # (b) replay updates: cfg.rollout_batch synthetic rollouts per update, micro-batches of cfg.micro_batch
    opt, sched = make_optimizer(dataclasses.replace(cfg.loop, max_steps=1000), model)
    block = model.replay_block(cfg.chain_length)
    rows = synthetic_rollouts(cfg.rollout_batch, plen, resp, tau, block - 1, vocab, gen)
    micro = [rows[i : i + cfg.micro_batch] for i in range(0, len(rows), cfg.micro_batch)]
    reset_peak(args.device)
    times, losses, counts = [], [], {}
    for step in range(args.warmup + max(1, args.steps // 2)):
        sync(args.device)
        t0 = time.perf_counter()
        total = 0.0
        for j, mb in enumerate(micro):
            gens = [torch.Generator().manual_seed(step * 1000 + j * 100 + i) for i in range(len(mb))]
            plans = opd.replay_plans(mb, block, cfg, gens)
            slots = opd.replay_slots(model, mb, plans, cfg.gamma, target.device, cfg.resp_gamma)
            with torch.autocast(target.device.type, dtype=target.dtype, enabled=target.dtype != torch.float32):
                loss, counts = opd.replay_loss(model, target, mb, slots, cfg, slots.denominator(cfg) * len(micro))
            loss.backward()
            total += loss.item()
        optimizer_step(model, opt, sched, cfg.loop.grad_clip)
        sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(round(total, 4))
    replay_s = sum(times) / len(times)
    steps_per_rollout = resp / tau  # verify steps of one batched rollout at this tau
    est_rollout = cfg.accum * steps_per_rollout * rollout["s_per_verify_step"]
    shape = scaling.TargetShape.from_hf(target.config, target.name)
    d = dataclasses.replace(drafter_shape(model), chain_length=cfg.chain_length, ttt_steps=cfg.chain_length)
    pred = scaling.opd_memory(
        shape, d, rollout_batch=cfg.rollout_batch, micro_batch=cfg.micro_batch, prompt_len=plen, response_len=resp,
        tau=tau, rej_first_only=cfg.rej_first_only,
    )  # fmt: skip
    return {
        "rollout": rollout,
        "replay": {
            "rollouts_per_update": cfg.rollout_batch,
            "micro_batch": cfg.micro_batch,
            "prompt_len": plen,
            "response_len": resp,
            "tau": tau,
            "rej_first_only": cfg.rej_first_only,
            "last_micro_batch_tokens": counts,
            "updates_timed": len(times),
            "s_per_update": round(replay_s, 4),
            "losses": losses,
            **peak_gib(args.device),
            "predicted_gib": round(pred.gib(), 3),
            "predicted_parts_gib": pred.parts_gib(),
        },
        # one update = accum rollouts of rollout_batch prompts (each ~response/tau verify steps) + their replay
        "s_per_update_estimated": round(est_rollout + cfg.accum * replay_s, 3),
    }


def torchrun_phase(args) -> dict:
    """The DFlash SFT steps in a child under ``torchrun --nproc-per-node 1``; errors are recorded."""
    exe = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(exe).exists() and not shutil.which(exe):
        return {"error": "torchrun not found"}
    child_out = Path(args.out).with_suffix(".torchrun.json")
    cmd = [exe, "--standalone", "--nproc-per-node", "1", str(Path(__file__).resolve()), "--worker"]
    cmd += ["--device", args.device, "--dtype", args.dtype, "--out", str(child_out), "--steps", str(args.steps)]
    cmd += ["--warmup", str(args.warmup), "--seed", str(args.seed), "--threads", str(args.threads)]
    cmd += ["--tiny"] if args.tiny else []
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.torchrun_timeout)
    res = {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    if child_out.exists():
        res.update(json.loads(child_out.read_text()))
        child_out.unlink()
    if proc.returncode != 0:
        res["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
    return res


def worker(args) -> None:
    """The torchrun child: the trainers' process-group set-up, then the DFlash SFT steps with their gradient
    all-reduce (a flat all-reduce of every gradient, as ``Run.optimizer_step`` does)."""
    import torch.distributed as dist

    result: dict = {}
    try:
        from draftopd.train import scaffold as common

        if not hasattr(common, "init_distributed"):
            raise RuntimeError("draftopd.train.scaffold has no init_distributed: the trainers' DDP has not landed")
        device = common.init_distributed(args.device)
        # a 1-process torchrun: init_distributed leaves the group to the trainers' world > 1 path; join it here
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        args.device = device
        world = dist.get_world_size()

        def all_reduce(model) -> None:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            for g, new in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(new.view_as(g))

        shape, dtype = setup_shape_dtype(args)
        target = build_target(shape, device, dtype, args.seed, args.init_std)
        cfg = recipes(args.tiny)["sft"]["dflash"]
        result = {
            "world_size": world,
            "backend": dist.get_backend(),
            "sft_dflash": sft_phase(target, cfg, args, all_reduce),
        }
        dist.destroy_process_group()
    except Exception as e:  # noqa: BLE001 - recorded for the parent
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc().splitlines()[-8:]}
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(result, indent=2))
    sys.exit(1 if "error" in result else 0)


def setup_shape_dtype(args) -> tuple[scaling.TargetShape, torch.dtype]:
    shape = TINY if args.tiny else scaling.PRESETS["qwen3-8b"]
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype]
    return shape, dtype


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 4-layer small target (CPU tests)")
    ap.add_argument("--device", default="cuda" if cuda else "cpu")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32", "fp16"], help="default: bf16 on cuda, else fp32")
    ap.add_argument(
        "--out", default=str(Path(os.environ["OUT"]) / "gpu_check.json") if os.environ.get("OUT") else "gpu_check.json"
    )
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per SFT phase (OPD: half)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--tau", type=float, default=0.0, help="synthetic OPD rollouts' tau (default: 6 DFlash, 4 EAGLE-3)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--init-std", type=float, default=None, help="random weights' std (default 0.02; tiny 0.5)")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: greedy,sft,opd")
    ap.add_argument("--torchrun", action="store_true", help="also run the DFlash SFT steps under torchrun (1 process)")
    ap.add_argument("--torchrun-timeout", type=int, default=240)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.init_std = args.init_std if args.init_std is not None else (0.5 if args.tiny else 0.02)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
    torch.manual_seed(args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    shape, dtype = setup_shape_dtype(args)
    result: dict = {
        "schema": 1,
        "argv": sys.argv[1:],
        "tiny": args.tiny,
        "device": args.device,
        "dtype": args.dtype,
        "host": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / scaling.GIB, 1)
            if args.device.startswith("cuda")
            else None,
        },
        "errors": {},
    }

    def save() -> None:
        result["total_s"] = round(time.perf_counter() - t_start, 1)
        Path(args.out).write_text(json.dumps(result, indent=2))

    def phase(name: str, fn, *a):
        say(f"[gpu_check] {name} ...")
        t0 = time.perf_counter()
        try:
            value = fn(*a)
        except Exception as e:  # noqa: BLE001 - one phase's failure is recorded, the others still run
            value = None
            result["errors"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            say(f"[gpu_check] {name} failed: {type(e).__name__}: {e}")
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        say(f"[gpu_check] {name} done in {time.perf_counter() - t0:.1f} s")
        save()
        return value

    t0 = time.perf_counter()
    target = build_target(shape, args.device, dtype, args.seed, args.init_std)
    sync(args.device)
    result["target"] = {
        "shape": dataclasses.asdict(shape),
        "params": sum(p.numel() for p in target.model.parameters()),
        "build_s": round(time.perf_counter() - t0, 2),
        "init_std": args.init_std,
        **peak_gib(args.device),
    }
    save()
    skip = set(filter(None, args.skip.split(",")))
    rec = recipes(args.tiny)
    if "greedy" not in skip:
        result["greedy"] = phase("greedy", greedy_check, target, args, shape)
    if "sft" not in skip:
        result["sft"] = {k: phase(f"sft.{k}", sft_phase, target, rec["sft"][k], args) for k in ("dflash", "eagle3")}
    if "opd" not in skip:
        result["opd"] = {
            k: phase(f"opd.{k}", opd_phase, target, rec["opd"][k], k, rec["sft"][k], args)
            for k in ("dflash", "eagle3")
        }
    if args.torchrun:
        del target
        result["torchrun"] = phase("torchrun", torchrun_phase, args)
    save()
    say(f"[gpu_check] wrote {args.out} ({result['total_s']} s; {len(result['errors'])} phase errors)")
    failed = {k for k in result["errors"] if k != "torchrun"}
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
