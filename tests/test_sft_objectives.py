"""SFT's acceptance-aware objectives and cheap warm starts (issue 35, items 2-4): accept-until-fail, soft labels from
the target's feature pass, text folders labelled by the target, drafter layers from the target's, the CPU budget, the
plateau rule; and that SFT's default loss is still exactly what it was."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from draftopd import DraftopdError
from draftopd.config import ArchConfig, DataConfig, EvalConfig, LoopConfig, SamplingConfig, SFTConfig, TargetConfig
from draftopd.lab.study import plateaued
from draftopd.models.eagle3 import ttt_forward, ttt_labels
from draftopd.train.checkpoints import config_changes
from draftopd.train.losses import (
    accept_until_fail,
    full_forward_kl,
    soft_kl,
    soft_kl_top1,
    token_logprobs,
    token_logprobs_hits,
    weighted_nll,
)
from draftopd.train.sft import compute_features, seq_batch, slot_losses

from helpers import make_tiny_target, metric_rows, tiny_drafter

# --- pure functions ---


def test_accept_until_fail_keeps_each_group_up_to_its_first_miss():
    # group 0: hit, hit, miss, hit -> keep 0..2 (the miss itself kept); group 1: miss first -> keep only it;
    # group 2: all hits -> all kept. Slots given out of order: order decides, not position in the list.
    hit = torch.tensor([True, True, False, True, False, True, True, True])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    order = torch.tensor([1, 0, 2, 3, 0, 1, 5, 4])
    keep = accept_until_fail(hit, group, order)
    assert keep.tolist() == [True, True, True, False, True, False, True, True]


def test_accept_until_fail_counts_unsupervised_misses():
    hit = torch.tensor([True, True, True])
    group, order = torch.tensor([3, 3, 3]), torch.tensor([0, 1, 2])
    # an unsupervised miss at order 1 of group 3 (e.g. a label outside the draft vocabulary): order 2 is dropped
    keep = accept_until_fail(hit, group, order, torch.tensor([3]), torch.tensor([1]))
    assert keep.tolist() == [True, True, False]
    assert accept_until_fail(hit, group, order, torch.tensor([7]), torch.tensor([0])).all()  # another group's
    assert accept_until_fail(hit[:0], group[:0], order[:0]).numel() == 0


def test_token_logprobs_hits_and_soft_kl_top1_agree_with_the_plain_functions():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11)
    h, labels = torch.randn(7, 8), torch.randint(0, 11, (7,))
    logp, hit = token_logprobs_hits(h, labels, head, chunk=3)
    assert torch.equal(logp, token_logprobs(h, labels, head, chunk=3))
    assert torch.equal(hit, head(h).argmax(-1) == labels)
    teacher_h, back = torch.randn(4, 8), torch.tensor([2, 0, 1, 2, 3, 0, 1])
    kl, top = soft_kl_top1(h, teacher_h, back, head, head, chunk=3)
    assert torch.allclose(kl, soft_kl(h, teacher_h, back, head, head, chunk=3))
    assert torch.allclose(kl, full_forward_kl(head(h), head(teacher_h)[back]), atol=1e-6)
    assert torch.equal(top, head(h).argmax(-1))


def test_plateau_rule():
    assert plateaued([1.0, 1.9, 2.0, 2.02, 1.99, 2.01])  # the last 4 within +-1.5% of their mean
    assert not plateaued([1.0, 1.9, 1.95, 2.0, 2.05, 2.1])  # still rising: 2.1 is 2.6% over the last 4's mean
    assert not plateaued([2.0, 2.0, 2.0])  # fewer than 4 evals: not yet
    assert plateaued([2.0, 2.1, 2.0, 2.1], tolerance=0.03) and not plateaued([2.0, 2.1, 2.0, 2.1])
    assert plateaued([(60, 1.5), (120, 2.0), (180, 2.0), (240, 2.0), (300, 2.0)])  # (step, tau) points too
    with pytest.raises(DraftopdError, match="last"):
        plateaued([2.0] * 5, last=1)


def test_config_checks():
    with pytest.raises(DraftopdError, match="sft_loss"):
        SFTConfig(sft_loss="kl")
    with pytest.raises(DraftopdError, match="responses"):
        DataConfig(responses="book")
    with pytest.raises(DraftopdError, match="max_cpu_seconds"):
        LoopConfig(max_cpu_seconds=-1.0)


def test_a_run_stored_before_a_new_field_still_matches():
    """A field added since a run was stored is no change while it keeps its default; any other value is one."""
    now = json.loads(json.dumps(dataclasses.asdict(SFTConfig())))
    defaults = json.loads(json.dumps(dataclasses.asdict(SFTConfig())))
    saved = {k: v for k, v in now.items() if k not in ("sft_loss", "accept_until_fail")}
    saved["loop"] = {k: v for k, v in now["loop"].items() if k != "max_cpu_seconds"}
    assert config_changes(saved, now, defaults=defaults) == []
    assert config_changes(saved, now) != []  # without the defaults every added field is a change
    assert config_changes(saved, {**now, "sft_loss": "soft"}, defaults=defaults) == ["sft_loss"]


def test_gsm8k_text_is_the_reference_solution_without_annotations():
    from draftopd.data.text import gsm8k_pairs, gsm8k_solution, text_pairs

    assert gsm8k_solution("He pays 48/2 = $<<48/2=24>>24.\n#### 24") == (
        "He pays 48/2 = $24.\nThe final answer is $\\boxed{24}$."
    )
    pairs = gsm8k_pairs("", 3)  # the 40-record fixture (conftest)
    assert len(pairs) == 3 and all("<<" not in r and "####" not in r and "boxed" in r for _, r in pairs)
    with pytest.raises(DraftopdError, match="pool B's indices"):
        gsm8k_pairs("a", 3)  # the fixture is not the whole train split: pools cannot be told apart
    for source in ("humaneval", "mbpp"):
        with pytest.raises(DraftopdError, match="evaluation set|without solutions"):
            text_pairs(source, 2)


# --- the drafters' SFT slots on a tiny target ---


def tiny_batch(target, model, labels=False, teacher=False):
    """Two sequences with their features (and the feature pass's greedy labels / teacher states when asked)."""
    g = torch.Generator().manual_seed(1)
    seqs = [(torch.randint(0, target.vocab_size, (n,), generator=g).tolist(), p) for n, p in ((14, 3), (10, 4))]
    extras = [x for x, on in (("greedy", labels), ("teacher", teacher)) if on]
    store = compute_features(target, seqs, model.config.target_layer_ids, progress=False, extras=extras)
    idx = [0, 1]
    return seq_batch(
        seqs, store.features, [5, 6], target.device, store.pick("greedy", idx), store.pick("teacher", idx)
    )


def cfg_for(kind: str, **kw) -> SFTConfig:
    arch = ArchConfig(kind=kind, ttt_steps=3) if kind == "eagle3" else ArchConfig(kind=kind, block_size=5)
    return SFTConfig(arch=arch, blocks_per_seq=4, **kw)


def test_the_default_eagle3_loss_is_the_ttt_loss_sft_always_computed():
    """hard_ce (the default), accept-until-fail off: exactly the pre-option loss, written out here from its parts:
    TTT step k at position p, label token p + k + 2 in the response and the draft vocabulary, weight decay**k, the
    weighted mean of -log q(label). Soft labels give another loss (so this test can tell them apart)."""
    target = make_tiny_target(vocab=32, layers=4)
    model = tiny_drafter("eagle3", target, seed=0)
    batch, cfg = tiny_batch(target, model, teacher=True), cfg_for("eagle3")
    outs = ttt_forward(model, target.embed, batch.features, batch.ids, cfg.arch.ttt_steps)
    num, den = 0.0, 0.0
    for k, h in enumerate(outs):
        lab, ok = ttt_labels(batch.ids, batch.lengths, batch.prompt_len, k)
        lab = model.to_draft_ids(lab)
        ok &= lab >= 0
        logp = torch.log_softmax(model.logits(h[ok]).float(), -1).gather(-1, lab[ok][:, None]).squeeze(-1)
        num, den = num - cfg.arch.ttt_decay**k * logp.sum(), den + cfg.arch.ttt_decay**k * int(ok.sum())
    slots = model.sft_states(target.embed, batch, cfg)
    per_slot, _ = slot_losses(cfg, model, target, batch, slots)
    loss = weighted_nll(-per_slot, slots.weights, slots.weights.sum())
    assert torch.allclose(loss, num / den, rtol=1e-6, atol=0)
    soft, _ = slot_losses(dataclasses.replace(cfg, sft_loss="soft"), model, target, batch, slots)
    assert not torch.allclose(weighted_nll(-soft, slots.weights), loss, rtol=1e-2)


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_soft_labels_are_the_targets_distribution_at_the_position_before_the_label(kind):
    """Each slot's soft loss is KL(p || q) with p the target's own next-token distribution at label_pos - 1 (from a
    plain full forward here), renormalised over the drafter's vocabulary; an off-by-one teacher does not match."""
    target = make_tiny_target(vocab=32, layers=4, std=0.5)
    model = tiny_drafter(kind, target, seed=0)
    batch, cfg = tiny_batch(target, model, teacher=True), cfg_for(kind, sft_loss="soft")
    slots = model.sft_states(target.embed, batch, cfg)
    kl, hit = slot_losses(cfg, model, target, batch, slots)
    valid = torch.ones_like(batch.ids)
    pos = torch.arange(batch.ids.shape[1]).expand_as(batch.ids)
    logits = target.forward(batch.ids, valid, pos, None, (), "all").logits  # (B, S, V)
    vocab = None if model.full_vocab else model.to_target_ids(torch.arange(model.config.draft_vocab_size))
    q = model.draft_logits(slots.states, target)

    def ref(shift: int) -> torch.Tensor:
        p = logits[slots.row, (slots.label_pos - shift).clamp(max=batch.ids.shape[1] - 1)]
        return full_forward_kl(q, p if vocab is None else p[:, vocab])

    assert len(kl) >= 3 and torch.allclose(kl, ref(1), rtol=2e-2, atol=1e-3)
    assert not torch.allclose(kl, ref(0), rtol=2e-2, atol=1e-3)
    assert torch.equal(hit, q.argmax(-1) == slots.labels)


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_slot_groups_follow_verification_order(kind):
    """DFlash: a group is one block, order its slot k; EAGLE-3: a group is the chain from one position, order the
    TTT step. Accept-until-fail on the drafter's own hits keeps a prefix of every group."""
    target = make_tiny_target(vocab=32, layers=4)
    model = tiny_drafter(kind, target, seed=0)
    batch, cfg = tiny_batch(target, model), cfg_for(kind)
    s = model.sft_states(target.embed, batch, cfg)
    if kind == "dflash":
        assert s.order.min() == 1 and s.order.max() <= 4 and torch.equal(s.weights, torch.exp(-(s.order - 1.0) / 7))
    else:
        assert s.order.max() == 2 and torch.equal(s.label_pos, s.group % batch.ids.shape[1] + s.order + 2)
        assert len(s.miss_group) > 0  # a 7-token draft vocabulary misses most labels
    assert torch.equal(s.labels, model.to_draft_ids(batch.ids[s.row, s.label_pos]))
    _, hit = slot_losses(cfg, model, target, batch, s)
    keep = accept_until_fail(hit, s.group, s.order, s.miss_group, s.miss_order)
    for g in s.group.unique():
        mine = s.group == g
        ks, os_ = keep[mine], s.order[mine]
        assert not (ks[os_.argsort()].int().diff() > 0).any()  # kept slots form a prefix of the group's order
    assert 0 < int(keep.sum()) < len(keep)


def test_text_labels_are_the_targets_greedy_tokens():
    """The feature pass's greedy labels: position p gets the target's argmax at p - 1 (position 0 its own token),
    and the drafters supervise with them, not with the sequence's tokens."""
    target = make_tiny_target(vocab=32, layers=4, std=0.5)
    batch = tiny_batch(target, tiny_drafter("dflash", target, seed=0), labels=True)
    pos = torch.arange(batch.ids.shape[1]).expand_as(batch.ids)
    logits = target.forward(batch.ids, torch.ones_like(batch.ids), pos, None, (), "all").logits
    for b, n in enumerate(batch.lengths.tolist()):
        assert torch.equal(batch.labels[b, 1:n], logits[b, : n - 1].argmax(-1))
        assert batch.labels[b, 0] == batch.ids[b, 0]
    for kind in ("dflash", "eagle3"):
        m = tiny_drafter(kind, target, seed=0)
        batch = tiny_batch(target, m, labels=True)  # features of its layers
        s = m.sft_states(target.embed, batch, cfg_for(kind))
        assert torch.equal(s.labels, m.to_draft_ids(batch.labels[s.row, s.label_pos]))
        # random text: not what the target would have said
        assert not torch.equal(s.labels, m.to_draft_ids(batch.ids[s.row, s.label_pos]))


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_init_from_target_copies_the_targets_layers(kind):
    from draftopd.models.dflash import DFlashModel, build_target_layer_ids
    from draftopd.models.eagle3 import Eagle3Model

    target = make_tiny_target(vocab=32, layers=6)
    seqs = [(list(range(3, 20)), 4)]
    cls = DFlashModel if kind == "dflash" else Eagle3Model
    arch = ArchConfig(kind=kind, num_layers=2, draft_vocab_size=16, init_from_target=True)
    torch.manual_seed(0)
    model = cls.build(target, arch, seqs)
    torch.manual_seed(0)  # the same random start: what the copy did not touch is equal
    plain = cls.build(target, dataclasses.replace(arch, init_from_target=False), seqs)
    tl = target.backbone.layers
    if kind == "dflash":
        for layer, t in zip(model.layers, build_target_layer_ids(6, 2), strict=True):
            for name, w in tl[t].state_dict().items():
                assert torch.equal(layer.state_dict()[name], w), name
        assert torch.equal(model.fc.weight, plain.fc.weight)  # fc as built
        assert not torch.equal(plain.layers[0].mlp.up_proj.weight, tl[1].mlp.up_proj.weight)
    else:
        last, mid, h = tl[5].state_dict(), model.midlayer, target.hidden_size
        for name in ("self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                     "post_attention_layernorm.weight"):  # fmt: skip
            assert torch.equal(mid.state_dict()[name], last[name]), name
        assert torch.equal(mid.hidden_norm.weight, last["input_layernorm.weight"])
        for name in ("q_proj", "k_proj", "v_proj"):
            w = getattr(mid.self_attn, name).weight
            assert torch.equal(w[:, h:], last[f"self_attn.{name}.weight"])  # the hidden half
            plain_w = getattr(plain.midlayer.self_attn, name).weight
            assert torch.equal(w[:, :h], plain_w[:, :h])  # the embedding half: as built
        assert torch.equal(model.fc.weight, plain.fc.weight)  # fc as built


# --- in process: text data, then SFT with every option, under a CPU budget ---


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    from draftopd.models.target import load_target

    return load_target(str(tiny_folder), "fp32")


@pytest.fixture(scope="module")
def text_data(tiny_folder, loaded, tmp_path_factory):
    from draftopd.data.trajectories import generate_trajectories

    pairs = tmp_path_factory.mktemp("pairs") / "p.jsonl"
    rows = [
        {"prompt": f"What is {i} + {i}?", "response": f"{i} + {i} is {2 * i}. The answer is {2 * i}."}
        for i in range(6)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        target=TargetConfig(path=str(tiny_folder), dtype="fp32"), sampling=SamplingConfig(max_new_tokens=12),
        sources=(str(pairs),), chunk_size=4, out=str(tmp_path_factory.mktemp("data") / "text"), responses="text",
    )  # fmt: skip
    return generate_trajectories(cfg, loaded), rows


def test_text_folder_holds_the_texts_tokens_and_says_so(text_data, loaded):
    from draftopd.data.trajectories import load_shards, read_manifest, responses_are_text

    out, rows = text_data
    got = sorted(load_shards(out), key=lambda r: r["prompt"])
    assert len(got) == 6 and read_manifest(out)["settings"]["responses"] == "text" and responses_are_text(out)
    for r in got:
        src = next(x for x in rows if loaded.encode_chat(x["prompt"]) == r["prompt"])
        ids = loaded.tokenizer(src["response"], add_special_tokens=False)["input_ids"] + [
            loaded.tokenizer.eos_token_id
        ]
        assert r["response"] == ids[:12]  # the text's own tokens, cut to max_new_tokens


def test_a_pool_mixing_text_and_generated_folders_is_refused(text_data, tmp_path):
    import shutil

    from draftopd.data.trajectories import responses_are_text

    out, _ = text_data
    shutil.copytree(out, tmp_path / "pool" / "a")
    shutil.copytree(out, tmp_path / "pool" / "b")
    manifest = json.loads((tmp_path / "pool" / "b" / "manifest.json").read_text())
    manifest["settings"].pop("responses")
    (tmp_path / "pool" / "b" / "manifest.json").write_text(json.dumps(manifest))
    assert not responses_are_text(tmp_path / "pool" / "b")
    with pytest.raises(DraftopdError, match="mixes"):
        responses_are_text(tmp_path / "pool")


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_sft_with_every_option_trains_and_stops_at_its_cpu_budget(tiny_folder, loaded, text_data, tmp_path, kind):
    """Text data (target labels), soft loss, accept-until-fail, target-layer init: it trains (finite losses, a final
    drafter); the feature cache holds the greedy labels and teacher states; a CPU budget stops it early, with a
    checkpoint, and the same command again does no step."""
    from draftopd.models.io import read_drafter
    from draftopd.train.sft import train_sft

    arch = ArchConfig(kind=kind, num_layers=1, block_size=4, draft_vocab_size=256, ttt_steps=2, init_from_target=True)
    loop = LoopConfig(max_steps=30, lr=1e-2, warmup_ratio=0.0, log_every=1, eval_every=100, save_every=100)
    cfg = SFTConfig(
        target=TargetConfig(path=str(tiny_folder), dtype="fp32"), arch=arch,
        eval=EvalConfig(limit=1, max_new_tokens=4), data=str(text_data[0]), out=str(tmp_path / "sft"), loop=loop,
        batch_size=2, blocks_per_seq=2, sft_loss="soft", accept_until_fail=True,
    )  # fmt: skip
    final = train_sft(cfg, loaded)
    rows = [r for r in metric_rows(tmp_path / "sft") if "loss" in r]
    assert len(rows) == 30 and all(math.isfinite(r["loss"]) and 0 < r["kept"] <= 1 for r in rows)
    assert rows[-1]["cpu_seconds"] > rows[0]["cpu_seconds"] > 0
    read_drafter(final, loaded)
    cache = torch.load(tmp_path / "sft" / "features.pt", weights_only=True)
    assert {"greedy", "teacher", "cpu_seconds"} <= set(cache)

    spent = rows[9]["cpu_seconds"]  # a budget the 10th step reaches
    budget = dataclasses.replace(cfg, out=str(tmp_path / "cut"), loop=dataclasses.replace(loop, max_cpu_seconds=spent))
    train_sft(budget, loaded)
    cut = [r for r in metric_rows(tmp_path / "cut") if "loss" in r]
    assert 1 <= len(cut) < 30 and cut[-1]["cpu_seconds"] >= spent  # stopped once the budget was spent
    last = (tmp_path / "cut" / "checkpoints" / "latest").read_text().strip()
    assert last == f"step_{cut[-1]['step']:06d}" and (tmp_path / "cut" / "final").is_dir()
    train_sft(budget, loaded)  # resumed past its budget: no step more
    assert len([r for r in metric_rows(tmp_path / "cut") if "loss" in r]) == len(cut)
