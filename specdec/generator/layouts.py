# Holds: the target cache's layouts of a batch (left padded, shared prefix, continued) and KeptCache.
# May use: numpy, torch, specdec.cache.
"""Target-cache layouts of a batch, and the cache a chat keeps between calls (:class:`KeptCache`)."""
from __future__ import annotations

import numpy as np
import torch

MIN_SHARED_PREFIX = 8  # tokens: a shorter common prefix of a batch's prompts is prefilled per row


class _PaddedLayout:
    """Target-cache layout of a batch: prompts left padded (``RaggedCache.set_left_padding``)."""

    prefix = 0

    def position_ids(self, cache, q: int) -> torch.Tensor:
        return cache.position_ids(q).clamp_min(0)  # padding slots of the prefill: any position, masked

    def attention_mask(self, cache, q: int) -> torch.Tensor:
        return cache.attention_mask(q)

    def tree_position_ids(self, cache, parents, valid) -> torch.Tensor:
        return cache.tree_position_ids(parents, valid).clamp_min(0)

    def tree_attention_mask(self, cache, parents, valid) -> torch.Tensor:
        return cache.tree_attention_mask(parents, valid)

    def select(self, index: torch.Tensor) -> None:
        pass


class _ContinuedLayout(_PaddedLayout):
    """Target-cache layout of a batch of one whose cache already holds the row's first ``prefix``
    tokens (:meth:`SpeculativeGenerator._continue`): the first step feeds only the rest."""

    def __init__(self, prefix: int):
        self.prefix = prefix


class KeptCache:
    """A batch-of-one target cache kept between generate calls for a growing sequence (a chat).

    ``cache`` (a :class:`specdec.cache.RaggedCache`, created on first use) holds the keys and
    values of ``tokens``, positions ``0..len(tokens)-1``; :meth:`SpeculativeGenerator._continue`
    prefills only what follows them. Only ``truncate`` (O(1) rollback) may shorten it from outside.
    """

    def __init__(self):
        self.cache = None
        self.tokens: list = []

    @torch.inference_mode()  # the cache's tensors were made in inference mode
    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens (a rollback: no data moves)."""
        n = max(0, min(int(n), len(self.tokens)))
        if self.cache is not None and n < self.cache.get_seq_length():
            self.cache.rollback(torch.tensor([n], dtype=torch.int64, device=self.cache.lengths.device))
        del self.tokens[n:]

    def _adopt(self, target, capacity: int):
        """The cache and layout the generation loop runs on (grown to ``capacity`` if needed)."""
        from specdec.cache import RaggedCache

        if self.cache is None:
            self.cache = RaggedCache.from_model(target, batch_size=1, max_length=capacity)
        elif self.cache.max_length < capacity:  # grow geometrically: a chat grows every turn
            self.cache.grow(max(capacity, 2 * self.cache.max_length))
        return self.cache, _ContinuedLayout(len(self.tokens))

    @torch.inference_mode()
    def _settle(self, token_ids: list, emitted: list) -> None:
        """After a generate call over ``token_ids`` that emitted ``emitted`` (all of it, or the steps
        that finished before an exception): keep every token but the last, the pending one, which
        the cache never saw. The cache may hold more (accepted drafts past an EOS, or the slots of an
        interrupted step): roll them back. Nothing emitted: keep what was there before the call."""
        if self.cache is None:
            self.tokens = []
            return
        store = self.cache.store
        store._set_host(store.lengths.cpu())  # an interrupt may have come between device and host copy
        keep = len(token_ids) + len(emitted) - 1 if emitted else len(self.tokens)
        keep = min(keep, self.cache.get_seq_length())
        if keep < self.cache.get_seq_length():
            self.cache.rollback(torch.tensor([keep], dtype=torch.int64, device=self.cache.lengths.device))
        self.tokens = (list(token_ids) + list(emitted))[:keep]


class _SharedPrefixLayout:
    """Target-cache layout of a batch whose prompts share their first ``prefix`` tokens.

    The prefix is prefilled once (batch 1) and copied to every row (``select_rows``); row b then holds
    ``[prefix][hole of holes[b] slots][rest of its prompt][generated]``, with the holes sized so that
    every prompt ends in the same slot (the first forward keeps the last K+1 logits of every row).
    Position ids skip the hole, and no query attends a hole slot (but its own: a hole query attends
    the prefix and itself).
    """

    def __init__(self, prefix: int, holes: np.ndarray, device):
        self.prefix = prefix
        self.holes = torch.from_numpy(holes).to(device=device, dtype=torch.int64)

    def position_ids(self, cache, q: int) -> torch.Tensor:
        return (cache.position_ids(q) - self.holes[:, None]).clamp_min(0)

    def attention_mask(self, cache, q: int) -> torch.Tensor:
        mask = cache.attention_mask(q)  # [B, 1, q, kv]
        dev = mask.device
        slot = torch.arange(mask.shape[-1], device=dev)
        hole = (slot[None, :] >= self.prefix) & (slot[None, :] < self.prefix + self.holes[:, None])  # [B, kv]
        qpos = cache.lengths.long()[:, None] + torch.arange(q, device=dev)  # [B, q]
        drop = hole[:, None, None, :] & (slot[None, None, None, :] != qpos[:, None, :, None])
        if mask.dtype == torch.bool:
            return mask & ~drop
        return mask.masked_fill(drop, torch.finfo(mask.dtype).min)

    def tree_position_ids(self, cache, parents, valid) -> torch.Tensor:
        return (cache.tree_position_ids(parents, valid) - self.holes[:, None]).clamp_min(0)

    def tree_attention_mask(self, cache, parents, valid) -> torch.Tensor:
        mask = cache.tree_attention_mask(parents, valid)  # [B, 1, N+1, kv]: no query of a tree step sits in a hole
        slot = torch.arange(mask.shape[-1], device=mask.device)
        hole = (slot[None, :] >= self.prefix) & (slot[None, :] < self.prefix + self.holes[:, None])
        drop = hole[:, None, None, :]
        if mask.dtype == torch.bool:
            return mask & ~drop
        return mask.masked_fill(drop, torch.finfo(mask.dtype).min)

    def select(self, index: torch.Tensor) -> None:
        self.holes = self.holes[index.to(self.holes.device)]


def _common_prefix(rows) -> int:
    """Length of the longest common prefix of the rows, leaving every row at least one token."""
    limit = min(len(r) for r in rows) - 1
    n = 0
    first = rows[0]
    while n < limit and all(r[n] == first[n] for r in rows):
        n += 1
    return n
