# Holds: the Drafter interface and what a step passes through it: DraftState, Draft, DraftTree.
# May use: numpy, torch. Nothing else of specdec: the drafters and the generator build on it.
"""The drafter interface: cheap proposers of the next K tokens.

The generator owns the token history and calls, once per speculative step:

    draft = drafter.propose(state)          # Draft(token_ids [B, K] int64, -1 tail; probs; num_drafted)
    ... target verifies ...
    drafter.accept(num_accepted)            # [B] numpy ints: how many drafts each row kept

plus ``start(state)`` once after the target's prefill and ``select_rows(index)`` when rows leave.
``state`` is a :class:`DraftState` view of the generator's batch.

Drafters with ``supports_tree`` also propose token trees (:class:`DraftTree`, the encoding of
``specdec.verify_tree`` and of the ragged cache's tree steps)::

    tree = drafter.propose_tree(state, max_nodes)   # DraftTree: per row up to max_nodes nodes, depth <= max_drafts
    ... target verifies the tree ...
    drafter.accept_tree(accepted_nodes, num_accepted)   # [B, D] node indices of the accepted path, [B] counts

A chain is the special case of a tree: ``Draft.to_tree()`` (node i's parent is i - 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch


@dataclass
class DraftState:
    """What a drafter sees of the batch (B live rows). Host arrays are numpy, device tensors torch.

    tokens:      [B, T_max] int64 numpy: each row's prompt + generated tokens (host copy)
    lengths:     [B] int64 numpy: valid tokens per row; the last one is the pending token, the one
                 the target has not consumed yet (drafts continue after it)
    max_drafts:  [B] int64 numpy: drafts wanted per row this step (0 allowed)
    temperature, top_k, top_p: the sampling parameters of the request (temperature 0 = greedy)
    seeds:       [B] int64 device tensor, one Philox seed per request row
    step:        int, the generator's step counter
    offsets:     [B] int64 device tensor, the token index of each row's first draft (= lengths):
                 drafters sample draft i with Philox offset ``offsets + i``, so their random numbers
                 are keyed by the absolute position of the token they draft, not by the step
    device:      the target's device (draft token ids are returned there)
    max_length:  initial capacity in tokens for a drafter's cache (the target cache's current one;
                 caches grow on demand, see ``_forward``)
    backend:     implementation for specdec.ops.sample ("auto", "cpp", "triton", "reference")
    cache:       the target's RaggedCache (row b holds the row's tokens but the pending one), or None;
                 drafters may run forwards over it inside ``cache.partial_depth`` but must leave its
                 lengths as they found them. Only drafters with ``needs_target_cache`` may read it:
                 the generator proposes their first drafts after the prefill (the first step's
                 forward) and keeps the batch in the plain left-padded layout for them
    """

    tokens: np.ndarray
    lengths: np.ndarray
    max_drafts: np.ndarray
    temperature: float
    top_k: int
    top_p: float
    seeds: torch.Tensor
    step: int
    device: torch.device
    max_length: int
    backend: str = "auto"
    cache: object = None
    offsets: torch.Tensor | None = None

    def draft_offsets(self, i: int) -> torch.Tensor:
        """[B] int64 device tensor: the Philox offsets of draft i (its tokens' absolute indices)."""
        if self.offsets is None:
            self.offsets = torch.from_numpy(self.lengths).to(self.device)
        return self.offsets + i


class Draft(NamedTuple):
    token_ids: torch.Tensor  # [B, K] int64 on the target device; -1 after each row's last draft
    probs: torch.Tensor | None  # [B, K, Vd] fp32: the distribution each draft was sampled from; None = one-hot
    num_drafted: np.ndarray  # [B] int64 host: real drafts per row (<= K)
    # [B] int64 host, optional: a small class describing how each row's drafts were found (n-gram
    # drafter: the matched n-gram's length, 0 = no match). The generator's draft-length policy keeps
    # acceptance statistics per class; None = one class.
    match: np.ndarray | None = None

    def truncate(self, width: int) -> "Draft":
        """The first ``width`` drafts of every row (``width <= K``)."""
        if width >= self.token_ids.shape[1]:
            return self
        probs = None if self.probs is None else self.probs[:, :width]
        return Draft(self.token_ids[:, :width], probs, np.minimum(self.num_drafted, width), self.match)

    def to_tree(self, host_token_ids: np.ndarray | None = None) -> "DraftTree":
        """The chain as a :class:`DraftTree`: node ``i``'s parent is ``i - 1`` (node 0 hangs off the root),
        slots past ``num_drafted[b]`` unused. ``probs`` carries over unchanged ([B, K, Vd] per node).

        ``host_token_ids`` ([B, K] int64 numpy) is the host copy of ``token_ids`` when the caller has it
        (an n-gram drafter does); without it ``token_ids`` is copied to the host (a device sync on CUDA).
        """
        batch, width = self.token_ids.shape
        num = np.asarray(self.num_drafted, dtype=np.int64)
        cols = np.arange(width, dtype=np.int64)[None, :]
        used = cols < num[:, None]
        host = (self.token_ids.cpu().numpy() if host_token_ids is None else np.asarray(host_token_ids))
        host_ids = np.where(used, host.astype(np.int64, copy=False), -1)
        host_parents = np.where(used, cols - 1, -1).astype(np.int64)
        dev = self.token_ids.device
        token_ids = self.token_ids
        if not bool((host == host_ids).all()):  # a chain with garbage past num_drafted: normalise to -1
            token_ids = torch.from_numpy(host_ids).to(dev, non_blocking=True)
        parents = torch.from_numpy(host_parents).to(dev, non_blocking=True)
        return DraftTree(token_ids, parents, self.probs, num.copy(), host_ids, host_parents, self.match)


class DraftTree(NamedTuple):
    """A token tree per row (the encoding of ``specdec.verify_tree`` and of ``RaggedCache`` tree steps).

    Row ``b`` has up to ``N`` nodes; the root is the row's pending token (the last one the target has not
    consumed), not a node. ``parents[b, i]`` is -1 for a child of the root, else the index of an earlier
    node (``< i``); ``token_ids[b, i] == -1`` marks an unused slot (its parent is -1 too). Node depth: 0
    for the root's children (a depth-``d`` node is the row's ``d + 1``-th draft token). Siblings are
    tried by the verifier in index order: the most likely child comes first (for siblings drawn without
    replacement, index order is the drawing order).
    """

    token_ids: torch.Tensor  # [B, N] int64 on the target device, -1 = unused
    parents: torch.Tensor  # [B, N] int64 on the target device, -1 = child of the root
    # [B, N, Vd] fp32: the distribution node i was drawn from (for siblings drawn without replacement the
    # conditional one: earlier siblings removed and renormalised); None = deterministic drafts
    probs: torch.Tensor | None
    num_nodes: np.ndarray  # [B] int64 host: used nodes per row
    host_token_ids: np.ndarray  # [B, N] int64 host copy of token_ids
    host_parents: np.ndarray  # [B, N] int64 host copy of parents
    match: np.ndarray | None = None  # [B] like Draft.match (n-gram: matched n-gram length, 0 = no match)
    # [B, N] float64 host or None: the share of the drafter's evidence that goes through node i (n-gram: its
    # weighted occurrences over all of them; 1 along a single continuation): the generator's tree policy
    # estimates P(node accepted) as P(depth reached) * share. A child's share is at most its parent's.
    host_share: np.ndarray | None = None

    def depths(self) -> np.ndarray:
        """[B, N] int64 host: each used node's depth (0 = child of the root), -1 for unused slots."""
        return _tree_depths(self.host_parents, self.host_token_ids >= 0)

    def is_chain(self) -> bool:
        """True when every row's used nodes are ``0 .. num_nodes[b] - 1`` and node ``i``'s parent is ``i - 1``."""
        width = self.host_token_ids.shape[1]
        cols = np.arange(width, dtype=np.int64)[None, :]
        used = cols < self.num_nodes[:, None]
        expected = np.where(used, cols - 1, -1)
        return bool(((self.host_token_ids >= 0) == used).all() and (self.host_parents == expected).all())

    def to_draft(self) -> Draft:
        """The inverse of :meth:`Draft.to_tree` for a chain (ValueError when the tree is not one)."""
        if not self.is_chain():
            raise ValueError("DraftTree.to_draft: the tree is not a chain (node i's parent must be i - 1)")
        return Draft(self.token_ids, self.probs, self.num_nodes.copy(), self.match)


def _tree_depths(parents: np.ndarray, used: np.ndarray) -> np.ndarray:
    """[B, N] depths (root's children 0) of a host tree encoding; -1 where not used."""
    depth = np.full(parents.shape, -1, dtype=np.int64)
    for i in range(parents.shape[1]):
        p = parents[:, i]
        depth[:, i] = np.where(used[:, i], np.where(p < 0, 0, depth[np.arange(parents.shape[0]), np.maximum(p, 0)] + 1),
                               -1)
    return depth


def _empty_tree(batch: int, device, match: np.ndarray | None = None) -> DraftTree:
    empty = torch.empty(batch, 0, dtype=torch.int64, device=device)
    host = np.zeros((batch, 0), dtype=np.int64)
    return DraftTree(empty, empty.clone(), None, np.zeros(batch, dtype=np.int64), host, host.copy(), match)


def _empty_draft(batch: int, device) -> Draft:
    return Draft(torch.empty(batch, 0, dtype=torch.int64, device=device), None, np.zeros(batch, dtype=np.int64))


class Drafter:
    """Interface. Subclasses override ``propose``; the others default to no-ops for stateless drafters."""

    #: True when proposing costs next to nothing whatever the length (no model runs): the generator
    #: then asks for the longest drafts and cuts them to the width its policy picks, knowing each
    #: row's available draft length. False: the generator picks the width first and asks for that.
    cheap = False
    #: True when ``propose`` reads the target's KV cache (``DraftState.cache``): the first proposal
    #: then waits for the target's prefill, and ``start`` is called after it.
    needs_target_cache = False

    def start(self, state: DraftState) -> None:
        """Called once per batch, after the target's prefill, with the prompts in ``state``."""

    def propose(self, state: DraftState) -> Draft:
        raise NotImplementedError

    def accept(self, num_accepted: np.ndarray) -> None:
        """After verification: ``num_accepted[b]`` drafts of row b were kept ([B] int64, host)."""

    #: True when ``propose_tree`` / ``accept_tree`` are implemented.
    supports_tree = False

    def propose_tree(self, state: DraftState, max_nodes: int) -> "DraftTree":
        """A tree of up to ``max_nodes`` nodes per row, no path longer than ``state.max_drafts[b]``."""
        raise NotImplementedError(f"{type(self).__name__} does not propose trees")

    def accept_tree(self, accepted_nodes: np.ndarray, num_accepted: np.ndarray) -> None:
        """After verifying a tree: row b kept nodes ``accepted_nodes[b, :num_accepted[b]]`` (the accepted
        root-to-node path, [B, D] int64 host, -1 padded; ``num_accepted`` [B] host)."""

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` ([B'] int64), in that order (finished rows leave the batch)."""

    def finish(self) -> None:
        """Release per-batch state (caches)."""
