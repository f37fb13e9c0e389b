"""``SlotCache``: the key/value cache of a batch of rows that advance by different numbers of tokens, used by the
target (the loop's cache) and by both learned drafters (their context caches) alike.

Rows share one cache whose columns are *slots* (dim 2 of every layer's keys and values, ``(B, heads, S, D)``);
``mask`` (B, S) says which slots hold a real token of each row. Prompts are left-padded (mask 0), and after a verify
the slots of a row's rejected drafts are masked out for that row rather than cropped, since rows accept different
numbers of tokens. Position ids count real tokens only (``positions``), so every row sees exactly the keys and
positions it would see alone. The cache keeps one invariant: every slot is used by at least one row, so nothing is
computed for slots nobody reads. After a verify only the block's last slots can be nobody's (past the longest
accepted prefix): ``commit`` crops them with transformers' public ``crop``, knowing the width from the host, without
a device sync. When rows leave the batch (``select``), slots only they used can sit anywhere: ``compact`` removes
them (one sync; once per finishing row, not per step).

It is a ``transformers.DynamicCache`` (the target's decoder appends to it during a forward; a drafter appends with
``append``) and touches only the public cache API: ``update``, ``crop``, ``batch_select_indices`` and the layers'
``keys``/``values``, which it reads.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from draftopd import DraftopdError


def left_padded(lengths: Tensor, width: int) -> Tensor:
    """(B, width) bool mask of left-padded rows of these lengths (B,): True on each row's last ``lengths[b]``."""
    return torch.arange(width, device=lengths.device)[None] >= (width - lengths)[:, None]


def positions(mask: Tensor) -> Tensor:
    """Position ids (B, S) of the slots of ``mask`` (B, S): real tokens counted from 0; padding gets 0."""
    return (mask.long().cumsum(1) - 1).clamp_min(0)


class SlotCache(DynamicCache):
    """A ``DynamicCache`` plus ``mask`` (B, S) bool: which of the shared slots hold a real token of each row."""

    def __init__(self, config=None) -> None:
        # config: the target's (its layer types); None: a drafter's, layers created by its first ``append``
        super().__init__(config=config)
        self.mask: Tensor | None = None  # (B, S); None until the first commit
        other = next((type(layer).__name__ for layer in self.layers if type(layer) is not DynamicLayer), None)
        if other is not None:  # a sliding window keeps its own subset of slots: crop/compact would not match mask
            raise DraftopdError(
                f"the target's cache has a {other} (sliding-window or other non-full attention layers): "
                "the speculative loop supports targets whose layers all use full attention"
            )

    @property
    def width(self) -> int:
        """Slots held (committed ones: what ``mask`` covers)."""
        return 0 if self.mask is None else self.mask.shape[1]

    def attention_mask(self, new: int, rows: int, device: torch.device) -> Tensor:
        """(B, S + new) bool: the committed slots, then ``new`` tokens about to be appended (all real)."""
        old = self.mask if self.mask is not None else torch.zeros(rows, 0, dtype=torch.bool, device=device)
        return torch.cat([old, torch.ones(rows, new, dtype=torch.bool, device=device)], 1)

    def pairs(self) -> list[tuple[Tensor, Tensor]]:
        """Each layer's (keys, values), (B, heads, S, D)."""
        return [(layer.keys, layer.values) for layer in self.layers]

    def append(self, pairs: list[tuple[Tensor, Tensor]], valid: Tensor) -> None:
        """A drafter's append: per layer (keys, values) of T new slots (B, heads, T, D), ``valid`` (B, T)."""
        for i, (k, v) in enumerate(pairs):
            self.update(k, v, i)
        self.commit(valid)

    def commit(self, valid: Tensor, drop: int = 0) -> None:
        """The T slots appended since the last commit hold real tokens where ``valid`` (B, T); their last ``drop``
        are no row's (the caller knows it from the accepted counts on the host) and are cropped."""
        if drop:
            self.crop(-drop)  # transformers >= 5.24: a negative count of slots to remove from the end
            valid = valid[:, : valid.shape[1] - drop]
        self.mask = valid if self.mask is None else torch.cat([self.mask, valid], 1)

    def commit_path(self, index: Tensor, valid: Tensor) -> None:
        """The slots appended since the last commit were a verified draft tree's block ``[root, nodes]``: row b keeps
        block slots ``index[b]`` (B, W) (its accepted path, root first), moved to the front of the block, real where
        ``valid`` (B, W) (each row's path padded past its length); the rest of the block is cropped. So a rejected
        sibling's keys and values are never read again, and every kept slot sits where a chain commit of the same
        tokens would put it (position ids are per row and travel with the keys, which rope already rotated)."""
        start = self.width
        for layer in self.layers:
            block_k, block_v = layer.keys[:, :, start:], layer.values[:, :, start:]  # (B, heads, T, D)
            idx = index[:, None, :, None].expand(-1, block_k.shape[1], -1, block_k.shape[3])  # (B, heads, W, D)
            keys, values = block_k.gather(2, idx), block_v.gather(2, idx)
            layer.crop(start - layer.get_seq_length())  # negative: remove the whole block
            layer.update(keys, values)
        self.mask = valid if self.mask is None else torch.cat([self.mask, valid], 1)

    def select(self, rows: Tensor) -> None:
        """Keep these batch rows (finished rows leave), then drop the slots no remaining row uses."""
        self.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self.compact()

    def compact(self) -> None:
        """Drop the slots no row uses: crop from the first unused slot, then re-append the used slots after it."""
        keep = self.mask.any(0).nonzero().squeeze(1).tolist()  # the one device sync: after rows left the batch only
        if len(keep) == self.width:
            return
        first = next((i for i, slot in enumerate(keep) if slot != i), len(keep))  # the first unused slot
        tail = torch.tensor(keep[first:], dtype=torch.long, device=self.mask.device)  # used slots past it
        for layer in self.layers:
            k, v = layer.keys[:, :, tail], layer.values[:, :, tail]
            layer.crop(first - layer.get_seq_length())  # negative: remove every slot from `first` on
            layer.update(k, v)
        self.mask = torch.cat([self.mask[:, :first], self.mask[:, tail]], 1)
