"""Draft-OPD replay rollouts: the verify records derived from a cached greedy trajectory equal the live engine's, for
both drafter kinds (fp32, tiny targets, and the default target for DFlash); OPD updates in replay and live mode give
the same weights; the update's gradient does not depend on micro-batching."""

from __future__ import annotations

import json
import math

import pytest
import torch

from draftopd.decoding.loop import speculative_generate
from draftopd.models.dflash import DFlashConfig, DFlashModel
from draftopd.models.io import DRAFTERS, write_drafter
from draftopd.train.replay import derive_records

from helpers import make_tiny_target, tiny_drafter


def assert_same_records(live, derived) -> dict:
    """Anchors, proposals, accepted counts and tokens exactly; the target's log-probs of the proposals within 5e-5
    (relative to their size above 1: the live verify and the replay forward sum in another order, ~2e-6 relative
    through MKL's F.linear, up to ~1.2e-5 seen through oneDNN's packed linears, target.fast auto).
    Returns how often each path of the derivation was taken (so the test can check it covered them)."""
    seen = {"accepted": 0, "suffix": 0, "steps": 0}
    for row_live, row_derived in zip(live, derived, strict=True):
        assert len(row_live) == len(row_derived)
        for a, b in zip(row_live, row_derived, strict=True):
            assert (a.anchor, a.draft, a.n_accepted, a.token) == (b.anchor, b.draft, b.n_accepted, b.token)
            assert len(a.draft_logprobs_target) == len(b.draft_logprobs_target)
            for x, y in zip(a.draft_logprobs_target, b.draft_logprobs_target, strict=True):
                assert abs(x - y) <= 5e-5 * max(1.0, abs(x)), (a, b)
            seen["steps"] += 1
            seen["accepted"] += a.n_accepted > 0
            seen["suffix"] += len(a.draft) > a.n_accepted + 1
    return seen


def past_eos(records, responses, eos: int) -> int:
    """Verify steps whose accepted proposals run through the trajectory's final EOS (the target's argmax after EOS
    decides them: the branch forward's case)."""
    return sum(
        r.anchor + r.n_accepted >= len(y) - 1
        for recs, y in zip(records, responses, strict=True)
        if y[-1] == eos
        for r in recs
    )


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_replay_records_equal_live_records(kind):
    """Many small random targets with an EOS token, so every path is taken: accepted prefixes, rejections with a
    suffix scored on the draft's own prefix, budget cuts, and proposals past an accepted EOS."""
    seen = dict.fromkeys(("accepted", "suffix", "past_eos", "steps"), 0)
    for seed in range(6):
        target = make_tiny_target(vocab=8, layers=4, std=0.5, seed=seed, eos=3)
        model = tiny_drafter(kind, target, seed)
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(0, 8, (n,), generator=g).tolist() for n in (3, 7, 1, 5)]
        live = speculative_generate(target, prompts, model.engine(target, 4), 20, record=True)
        plain = speculative_generate(target, prompts, None, 20)
        assert live.tokens == plain.tokens  # the rollout text is the target's greedy output (lossless)
        rows = list(zip(prompts, plain.tokens, strict=True))  # the cached trajectories
        derived = derive_records(target, model.engine(target, 4), rows, 20)
        for k, v in assert_same_records(live.records, derived.records).items():
            seen[k] += v
        seen["past_eos"] += past_eos(live.records, plain.tokens, 3)
    assert seen["accepted"] > 5 and seen["suffix"] > 20 and seen["past_eos"] >= 1, seen


@pytest.mark.slow
def test_replay_records_on_the_default_target(real_target_fp32):
    """SmolLM2-135M in fp32 with a DFlash drafter over a reduced draft vocabulary, proposing the target's own text
    often enough (trained for a few steps on it would take too long here: it reuses the target's head)."""
    target = real_target_fp32
    cfg = DFlashConfig.from_target(target.config, num_layers=1, block_size=4, mask_token_id=2, draft_vocab_size=4096)
    torch.manual_seed(0)
    model = DFlashModel(cfg)
    model.d2t.copy_(torch.arange(4096) * 0)  # the first 4096 ids
    prompts = [target.encode_chat(q) for q in ("What is 2 + 3?", "Name three colours.")]
    live = speculative_generate(target, prompts, model.engine(target), 24, record=True)
    derived = derive_records(target, model.engine(target), list(zip(prompts, live.tokens, strict=True)), 24)
    seen = assert_same_records(live.records, derived.records)
    assert seen["steps"] > 10


def test_suffix_free_derivation_leaves_the_suffix_unscored():
    target = make_tiny_target(vocab=8, layers=4, std=0.5, seed=1, eos=3)
    model = tiny_drafter("dflash", target, 1)
    prompts = [[1, 2, 4], [5, 6]]
    rows = list(zip(prompts, speculative_generate(target, prompts, None, 16).tokens, strict=True))
    full = derive_records(target, model.engine(target), rows, 16)
    cheap = derive_records(target, model.engine(target), rows, 16, suffix=False)
    assert cheap.target_tokens < full.target_tokens
    for a, b in zip(sum(full.records, []), sum(cheap.records, []), strict=True):
        assert (a.anchor, a.draft) == (b.anchor, b.draft)
        first = a.n_accepted + 1  # up to the first rejected proposal: on the true prefix, the same
        assert a.draft_logprobs_target[:first] == pytest.approx(b.draft_logprobs_target[:first], abs=1e-6)
        assert all(math.isnan(x) for x in b.draft_logprobs_target[first:])


# ----------------------------------------------------------------------------------------------------------------
# train opd in both modes, in process, on a tiny target folder with the real tokenizer


@pytest.fixture(scope="module")
def opd_setup(tiny_folder, tmp_path_factory):
    """Greedy trajectories of the tiny target (a data folder as `draftopd data` writes it) and a DFlash and an
    EAGLE-3 drafter folder to start from."""
    from draftopd.config import ArchConfig
    from draftopd.models.target import load_target

    root = tmp_path_factory.mktemp("opd-modes")
    target = load_target(str(tiny_folder), "fp32")
    prompts = [target.encode_chat(f"Question {i}: what is {i} + {2 * i}?" + " and then?" * (i % 3)) for i in range(6)]
    resp = speculative_generate(target, prompts, None, 14).tokens
    data = root / "data"
    data.mkdir()
    torch.save([{"prompt": p, "response": r} for p, r in zip(prompts, resp, strict=True)], data / "shard_00000.pt")
    (data / "manifest.json").write_text(json.dumps({"settings": {"max_new_tokens": 14}}))
    seqs = [(p + r, len(p)) for p, r in zip(prompts, resp, strict=True)]
    inits = {}
    for kind, arch in (
        ("dflash", ArchConfig(kind="dflash", num_layers=1, block_size=4, draft_vocab_size=512)),
        ("eagle3", ArchConfig(kind="eagle3", draft_vocab_size=512)),
    ):
        torch.manual_seed(0)
        model = DRAFTERS[kind].build(target, arch, seqs)
        write_drafter(model, root / f"init-{kind}", dtype=torch.float32)
        inits[kind] = root / f"init-{kind}"
    return tiny_folder, data, inits


def opd_cfg(opd_setup, kind: str, out, **over):
    """An OPD config on the tiny target; ``over``: fields to change, loop keys (``max_steps``, ``lr``, ...) among
    them."""
    import dataclasses

    from draftopd.config import OPDConfig, TargetConfig
    from draftopd.recipes import LOOP_KEYS

    folder, data, inits = opd_setup
    base = {
        "target": TargetConfig(path=str(folder), dtype="fp32", threads=1),
        "init_from": str(inits[kind]),
        "out": str(out),
        "data": str(data),
        "rollout_batch": 4,
        "micro_batch": 4,
        "max_new_tokens": 14,
        "chain_length": 3,
        "logp_min": -40.0,
        "loss": "acceptance_aware",
        "anchors": "verify",
        "rej_weight": 1.0,
    }
    from draftopd.config import EvalConfig

    base["eval"] = EvalConfig(limit=1, max_new_tokens=4, chain_length=3)
    loop = {"max_steps": 2, "lr": 0.01, "warmup_ratio": 0.0, "eval_every": 100, "save_every": 1}
    loop |= {k: over.pop(k) for k in LOOP_KEYS if k in over}
    return OPDConfig(**{**base, **over}, loop=dataclasses.replace(OPDConfig().loop, **loop))


def metrics(out) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def weights(out, step: int) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_two_updates_give_the_same_weights_in_replay_and_live_mode(opd_setup, tmp_path, kind):
    from draftopd.train.opd import train_opd

    train_opd(opd_cfg(opd_setup, kind, tmp_path / "live", rollouts="live"))
    train_opd(opd_cfg(opd_setup, kind, tmp_path / "replay", rollouts="replay"))
    a, b = metrics(tmp_path / "live"), metrics(tmp_path / "replay")
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert [r["rej_tokens"] for r in a] == [r["rej_tokens"] for r in b] and a[0]["rej_tokens"] > 0
    wa, wb = weights(tmp_path / "live", 2), weights(tmp_path / "replay", 2)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), (k, (wa[k] - wb[k]).abs().max())


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_first_update_does_not_depend_on_micro_batching(opd_setup, tmp_path, kind):
    """Rows of different lengths: a mean of micro-batch means would weigh them differently; the global denominator
    does not. Loss and gradient norm at step 1 (before clipping: Adam's first step hides a gradient's scale)."""
    from draftopd.train.opd import train_opd

    rows = {}
    for mb in (1, 4):
        out = tmp_path / f"mb{mb}"
        train_opd(opd_cfg(opd_setup, kind, out, micro_batch=mb, max_steps=1, grad_clip=1e9))
        rows[mb] = metrics(out)[0]
    assert rows[1]["loss"] == pytest.approx(rows[4]["loss"], rel=1e-5)
    assert rows[1]["grad_norm"] == pytest.approx(rows[4]["grad_norm"], rel=1e-5)


def test_eagle3_recipe_trains_whole_sequences_without_a_rejected_stream(opd_setup, tmp_path):
    """The EAGLE-3 default (config.OPD_RECIPES): every response position supervised (TTT over the whole rollout), soft
    labels, no rejected stream, lr 1e-4; recorded resolved in the run config."""
    from draftopd.train.opd import train_opd

    out = tmp_path / "eagle3-recipe"
    train_opd(opd_cfg(opd_setup, "eagle3", out, loss=None, anchors=None, rej_weight=None, lr=None, max_steps=1))
    row = metrics(out)[0]
    assert row["rej_tokens"] == 0 and row["resp_tokens"] > 0 and math.isfinite(row["loss"])
    saved = json.loads((out / "run_config.json").read_text())
    resolved = (saved["loss"], saved["anchors"], saved["rej_weight"], saved["resp_gamma"], saved["loop"]["lr"])
    assert resolved == ("full_kl", "all", 0.0, 0.8, 1e-4)


# ----------------------------------------------------------------------------------------------------------------
# the loss's teacher side, computed once per distinct position, against the plain per-slot computation


def per_slot_loss(model, target, rows, sl, cfg, den, out):
    """``replay_loss`` as written before its teacher side was shared between slots: the target's state, head and
    log-probs recomputed for every slot, over the whole vocabulary."""
    from draftopd.models.base import ReplayBatch
    from draftopd.train.losses import expected_acceptance_loss, full_forward_kl, opd_loss, token_logprobs

    ri = sl.ri
    label_pos = sl.anchors[ri[:, 0], ri[:, 1]] + ri[:, 2]
    teacher_h = out.hidden[ri[:, 0], label_pos - 1]
    h_resp, h_rej = model.replay_states(
        target.embed, ReplayBatch(out.features, sl.ids, sl.anchors, sl.accepted, ri, sl.xi, sl.rej_tokens)
    )
    labels = model.to_draft_ids(sl.ids[ri[:, 0], label_pos])
    w_resp = cfg.resp_gamma ** (ri[:, 2].float() - 1)  # TTT step k - 1 (block offset k) weighted resp_gamma^(k-1)

    def head(h):
        return model.draft_logits(h, target)

    if cfg.loss == "tv":
        block = ri[:, 0] * sl.anchors.shape[1] + ri[:, 1]
        tv = expected_acceptance_loss(head(h_resp), target.logits(teacher_h), block)
        return tv * (len(block.unique()) / den)
    s_resp = token_logprobs(h_resp, labels, head)
    s_rej = token_logprobs(h_rej, model.to_draft_ids(sl.rej_tokens), head)
    t_resp = token_logprobs(teacher_h, model.to_target_ids(labels), target.logits)
    vocab = None if model.full_vocab else model.to_target_ids(torch.arange(model.config.draft_vocab_size))
    t = target.logits(teacher_h)
    l_resp = {
        "hard_ce": -s_resp,
        "full_kl": full_forward_kl(head(h_resp), t if vocab is None else t[:, vocab]),
    }.get(cfg.loss)
    kw = {"rej_reverse_kl": cfg.loss != "all_forward", "logp_min": cfg.logp_min, "den": den, "l_resp": l_resp,
          "w_resp": w_resp}  # fmt: skip
    return opd_loss(s_resp, t_resp, s_rej, sl.t_rej, sl.w_rej, cfg.resp_weight, cfg.rej_weight, **kw)


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_shared_teacher_states_give_the_per_slot_loss_and_gradient(kind):
    """Every response position is the label of several slots (anchors: all); the loss shares the target's head
    between them and, for soft labels, runs it over the draft vocabulary's rows only (EAGLE-3 here: a reduced one).
    Loss and gradient equal the per-slot computation, for every response-stream loss (slots weighted 0.8^(k-1))."""
    from draftopd.config import OPDConfig
    from draftopd.train.opd import replay_loss, replay_plans, replay_slots

    target = make_tiny_target(vocab=8, layers=4, std=0.5, seed=2, eos=3)
    model = tiny_drafter(kind, target, 2)
    prompts = [[1, 2, 4], [5, 6], [7, 0, 1, 2, 5]]
    rows_in = list(zip(prompts, speculative_generate(target, prompts, None, 16).tokens, strict=True))
    d = derive_records(target, model.engine(target, 4), rows_in, 16)
    rows = [(p, y, rec) for (p, y), rec in zip(rows_in, d.records, strict=True)]
    losses = ["acceptance_aware", "all_forward", "hard_ce", "full_kl"] + (["tv"] if model.full_vocab else [])
    for loss in losses:
        cfg = OPDConfig(loss=loss, anchors="all", rej_weight=1.0, chain_length=4, logp_min=-40.0, resp_gamma=0.8)
        gens = [torch.Generator().manual_seed(i) for i in range(len(rows))]
        plans = replay_plans(rows, model.replay_block(4), cfg, gens)
        sl = replay_slots(model, rows, plans, cfg.gamma, "cpu", cfg.resp_gamma)
        label_pos = sl.anchors[sl.ri[:, 0], sl.ri[:, 1]] + sl.ri[:, 2]
        assert len(torch.unique(sl.ri[:, 0] * 100 + label_pos)) < len(sl.ri) / 2  # positions are shared
        grads = []
        for fn in (replay_loss, per_slot_loss):
            model.zero_grad()
            value = fn(model, target, rows, sl, cfg, 50.0, d.out)
            value = value[0] if isinstance(value, tuple) else value
            value.backward()
            grads.append((value.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        (a, ga), (b, gb) = grads
        assert a == pytest.approx(b, rel=1e-5) and a != 0, loss
        assert len(ga) == len(gb) > 0
        for x, y in zip(ga, gb, strict=True):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), (loss, (x - y).abs().max())


def test_head_over_a_vocabulary_subset_is_the_full_heads_columns():
    target = make_tiny_target(vocab=32, layers=1, seed=3)
    h = torch.randn(5, 3, target.hidden_size)
    vocab = torch.tensor([7, 0, 31, 4])
    assert torch.allclose(target.logits(h, vocab), target.logits(h)[..., vocab], atol=1e-6)
    assert target.logits(h, vocab).shape == (5, 3, 4)


def test_soft_kl_keeps_the_slots_order():
    """Slots go through soft_kl grouped by teacher row; each comes back at its own place."""
    from draftopd.train.losses import full_forward_kl, soft_kl

    target = make_tiny_target(vocab=8, layers=4, seed=4)
    model = tiny_drafter("eagle3", target, 4)
    g = torch.Generator().manual_seed(0)
    teacher_h, h = torch.randn(6, target.hidden_size, generator=g), torch.randn(40, target.hidden_size, generator=g)
    back = torch.randint(0, 6, (40,), generator=g)
    vocab = model.to_target_ids(torch.arange(model.config.draft_vocab_size))
    want = full_forward_kl(model.draft_logits(h, target), target.logits(teacher_h[back])[:, vocab])
    got = soft_kl(h, teacher_h, back, lambda x: model.draft_logits(x, target), lambda x: target.logits(x, vocab), 7)
    assert torch.allclose(got, want, atol=1e-6)
