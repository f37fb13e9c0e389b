"""SlotCache: shared slots of rows that advance by different amounts; commit crops, select compacts."""

from __future__ import annotations

import pytest
import torch

from draftopd.decoding.loop import speculative_generate
from draftopd.decoding.slots import SlotCache, left_padded, positions

from helpers import make_tiny_target, tiny_drafter


def _pairs(b: int, t: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 2, t, 4, generator=g), torch.randn(b, 2, t, 4, generator=g)) for _ in range(3)]


def _attend(cache: SlotCache, q: torch.Tensor) -> torch.Tensor:
    """Each row's attention output over its real slots, per layer: what a model computes from the cache."""
    mask = cache.mask[:, None, None, :]
    return torch.stack([torch.nn.functional.scaled_dot_product_attention(q, k, v, mask) for k, v in cache.pairs()])


def test_left_padding_and_positions():
    mask = left_padded(torch.tensor([3, 1, 4]), 4)
    assert mask.tolist() == [[False, True, True, True], [False, False, False, True], [True] * 4]
    assert positions(mask).tolist() == [[0, 0, 1, 2], [0, 0, 0, 0], [0, 1, 2, 3]]


def test_commit_crops_the_slots_no_row_accepted():
    cache = SlotCache()
    cache.append(_pairs(2, 3, 0), left_padded(torch.tensor([3, 2]), 3))
    block = _pairs(2, 5, 1)  # a block of 5 slots; row 0 keeps 2 of them, row 1 keeps 1: slots 2..4 are no row's
    for i, (k, v) in enumerate(block):
        cache.update(k, v, i)
    valid = torch.arange(5)[None] <= torch.tensor([[1], [0]])
    cache.commit(valid, drop=3)
    assert cache.width == cache.get_seq_length() == 5
    assert cache.mask.tolist() == [[True, True, True, True, True], [False, True, True, True, False]]
    assert torch.equal(cache.pairs()[2][0][:, :, 3:], block[2][0][:, :, :2])


def test_select_compacts_and_keeps_what_every_remaining_row_sees():
    cache = SlotCache()
    valid = torch.tensor([[1, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 1], [1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    cache.append(_pairs(3, 6, 2), valid)
    q = torch.randn(3, 2, 1, 4, generator=torch.Generator().manual_seed(3))
    before = _attend(cache, q)
    rows = torch.tensor([0, 2])  # row 1 leaves: slot 4 was only its own
    cache.select(rows)
    assert cache.width == cache.get_seq_length() == 5 and bool(cache.mask.any(0).all())
    assert cache.mask.tolist() == [[True, False, True, True, True], [True, True, False, False, True]]
    assert torch.allclose(_attend(cache, q[rows]), before[:, rows], atol=1e-6)
    cache.select(torch.tensor([1]))  # then only the old row 2: its 3 slots remain
    assert cache.get_seq_length() == 3 and cache.mask.tolist() == [[True, True, True]]
    assert torch.allclose(_attend(cache, q[2:]), before[:, 2:], atol=1e-6)


@pytest.mark.parametrize("kind", ["dflash", "eagle3"])
def test_a_drafter_keeps_no_slot_of_rows_that_left(kind):
    """Rows of different prompt lengths stopping at EOS in different rounds: after each leave, every slot of the
    drafter's context cache, and every EAGLE-3 pair still to be cached, is some remaining row's; output unchanged."""
    leaves = 0
    for seed in range(4):
        target = make_tiny_target(vocab=8, layers=4, std=0.5, seed=seed, eos=3)
        engine = tiny_drafter(kind, target, seed).engine(target, 4)
        select = engine.select

        def checked(rows: torch.Tensor, engine=engine, select=select) -> None:
            nonlocal leaves
            select(rows)
            leaves += 1
            assert engine.cache.width == 0 or bool(engine.cache.mask.any(0).all())
            if kind == "eagle3":
                assert bool(engine.pending[3].any(0).all())  # (B, T) valid of the pending pairs

        engine.select = checked
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(0, 8, (n,), generator=g).tolist() for n in (3, 7, 1, 5)]
        out = speculative_generate(target, prompts, engine, 20)
        assert out.tokens == speculative_generate(target, prompts, None, 20).tokens
    assert leaves >= 4


def test_a_target_with_sliding_window_layers_is_refused_in_one_line():
    from transformers import MistralConfig

    from draftopd import DraftopdError

    with pytest.raises(DraftopdError, match="DynamicSlidingWindowLayer") as e:
        SlotCache(MistralConfig(num_hidden_layers=2, sliding_window=16))
    assert "\n" not in str(e.value)
