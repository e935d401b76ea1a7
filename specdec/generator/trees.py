# Holds: _Tree: a tree step's drafts on host and device, and its pruning (cut, keep) to the policy's nodes.
# May use: numpy, torch, specdec.drafters.base.
"""Tree steps in the generator.

With a drafter that proposes trees (``tree=None``/True) every step after the prefill
verifies a tree of drafts (``specdec.ops.verify_tree``, the cache keeps the accepted path). For an
n-gram tree the policy keeps, per row, the n nodes most likely to be accepted (estimated as the row
class's survival at the node's depth times the node's share of the matched occurrences), with n
chosen for the most expected tokens per predicted second (:meth:`DraftLengthPolicy.tree_nodes`); a
model drafter's tree is cut to the depth the policy picks for a chain.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from specdec.drafters.base import _tree_depths


def _over_budget(parents: np.ndarray, used: np.ndarray, max_nodes: int) -> np.ndarray:
    """[B, N] bool: the nodes beyond a budget of ``max_nodes`` per row. Kept first: the row's
    first-child path from the root (the drafter's best guess), then the other nodes in index order
    whose parent is kept."""
    B, N = parents.shape
    drop = np.zeros((B, N), dtype=bool)
    for b in np.flatnonzero(used.sum(1) > max_nodes):
        keep = np.zeros(N, dtype=bool)
        node, n = -1, 0
        while n < max_nodes:
            kids = np.flatnonzero(used[b] & (parents[b] == node))
            if kids.size == 0:
                break
            node = int(kids[0])
            keep[node], n = True, n + 1
        for i in range(N):
            if n >= max_nodes:
                break
            if used[b, i] and not keep[i] and (parents[b, i] < 0 or keep[parents[b, i]]):
                keep[i], n = True, n + 1
        drop[b] = used[b] & ~keep
    return drop


class _Tree(NamedTuple):
    """A tree step's drafts as the generator uses them (from a drafter's ``DraftTree``): device
    tensors for the forward and the op, host copies for the policy, the stats and pruning."""

    token_ids: torch.Tensor  # [B, N] int64 device, -1 = unused
    parents: torch.Tensor  # [B, N] int64 device, -1 = child of the root
    probs: torch.Tensor | None  # [B, N, Vd] or None
    match: np.ndarray | None
    host_tokens: np.ndarray  # [B, N] host copy of token_ids
    host_parents: np.ndarray  # [B, N] host parents, -1 where unused too
    node_depth: np.ndarray  # [B, N] host: each node's depth (0 = child of the root), -1 where unused
    share: np.ndarray | None = None  # [B, N] host: the drafter's evidence share per node (DraftTree.host_share)
    source: np.ndarray | None = None  # [B, N] host: each node's index in the drafter's tree (None: the same)

    @property
    def used(self) -> np.ndarray:
        return self.host_tokens >= 0

    @property
    def num_drafted(self) -> np.ndarray:
        """[B] host: used nodes per row."""
        return self.used.sum(1)

    @property
    def depth(self) -> np.ndarray:
        """[B] host: the longest path (in drafts) of each row's tree."""
        return self.node_depth.max(1, initial=-1) + 1

    @classmethod
    def of(cls, tree) -> "_Tree":
        """From a drafter's DraftTree."""
        tokens, parents = np.asarray(tree.host_token_ids), np.asarray(tree.host_parents)
        used = tokens >= 0
        return cls(tree.token_ids, tree.parents, tree.probs, tree.match, tokens, np.where(used, parents, -1),
                   _tree_depths(parents, used), tree.host_share)

    def cut(self, max_depth, max_nodes: int, device) -> "_Tree":
        """The tree without nodes at depth >= ``max_depth`` ([B] or int) and beyond ``max_nodes``
        per row (each row's first-child path first, then the other nodes in index order: the drafters
        number parents first, best sibling first). Host work, one copy to the device if anything goes."""
        used = self.used
        cut = used & (self.node_depth >= np.asarray(max_depth).reshape(-1, 1))
        cut |= _over_budget(self.host_parents, used & ~cut, max_nodes)
        return self.keep(used & ~cut, device)

    def keep(self, keep: np.ndarray, device) -> "_Tree":
        """The tree with only the nodes ``keep`` [B, N] bool (closed under parents: the caller's
        duty), renumbered densely in their order (parents still before children), so the forward
        computes no empty slots between them; ``source`` maps the new indices to the drafter's. Host
        work, one copy to the device if anything goes."""
        keep = keep & self.used
        if (keep == self.used).all():
            return self
        width = int(keep.sum(1).max(initial=0))
        order = np.argsort(~keep, axis=1, kind="stable")[:, :width]  # each row's kept nodes first, in order
        valid = np.take_along_axis(keep, order, 1)
        rank = np.cumsum(keep, axis=1) - 1  # a kept node's new index
        old_parents = np.take_along_axis(self.host_parents, order, 1)
        new_parents = np.take_along_axis(rank, np.clip(old_parents, 0, None), 1)
        tokens = np.where(valid, np.take_along_axis(self.host_tokens, order, 1), -1)
        parents = np.where(valid & (old_parents >= 0), new_parents, -1)
        depth = np.where(valid, np.take_along_axis(self.node_depth, order, 1), -1)
        share = None if self.share is None else np.where(valid, np.take_along_axis(self.share, order, 1), 0.0)
        source = order if self.source is None else np.take_along_axis(self.source, order, 1)
        probs = self.probs
        if probs is not None:
            index = torch.from_numpy(order).to(probs.device)
            probs = probs.gather(1, index[:, :, None].expand(-1, -1, probs.shape[-1]))
        return _Tree(torch.from_numpy(tokens).to(device), torch.from_numpy(parents).to(device), probs, self.match,
                     tokens, parents, depth, share, np.where(valid, source, -1))

    def drafter_nodes(self, nodes: np.ndarray) -> np.ndarray:
        """Node indices [B, D] of this tree (-1 = none) as the drafter numbered them."""
        if self.source is None:
            return nodes
        if self.source.shape[1] == 0:
            return np.full_like(nodes, -1)
        index = np.clip(nodes, 0, self.source.shape[1] - 1)
        return np.where(nodes >= 0, np.take_along_axis(self.source, index, 1), -1)

    def leaf_stop(self, host_nodes: np.ndarray, accepted: np.ndarray) -> np.ndarray:
        """[B] bool: the accepted path (node indices [B, D], lengths [B]) ended at a node with no
        children, so the emitted token is the bonus, not a resample after a rejection."""
        rows = np.arange(accepted.shape[0])
        last = np.full(accepted.shape[0], -1)
        if host_nodes.shape[1]:
            last = np.where(accepted > 0, host_nodes[rows, np.clip(accepted - 1, 0, host_nodes.shape[1] - 1)], -1)
        return ~(self.used & (self.host_parents == last[:, None])).any(1)
