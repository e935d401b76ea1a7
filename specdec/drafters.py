"""Drafters: cheap proposers of the next K tokens, behind one small interface.

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

* :class:`NGramDrafter` - prompt lookup: copies the continuation of an earlier occurrence of the last
  n tokens (prompt and generated text; the longest continuation, then the most recent). No model;
  ``probs`` is None (deterministic drafts).
* :class:`ModelDrafter` - a smaller HF model with its own ragged KV cache and O(1) per-row rollback.
* :class:`EarlyExitDrafter` - the target's first N layers plus its final norm and head, sharing the
  target's weights (a view, no copy) and its KV cache (``DraftState.cache``), so it needs no prefill.
"""
from __future__ import annotations

import copy
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

    #: True when ``propose`` can return draft probabilities (model drafters when sampling).
    stochastic = False
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


class NGramDrafter(Drafter):
    """Prompt-lookup drafting: find an earlier occurrence of the row's last ``n`` tokens (``n`` from
    ``max_ngram`` down to ``min_ngram``; the longest ``n`` that occurs wins) and propose the tokens that
    followed it.

    Among the occurrences of that n-gram, the one with the longest continuation (up to the draft
    length) wins, and among those the most recent (``prefer="recent"``, default) or the earliest
    (``prefer="earliest"``, Hugging Face's choice). An occurrence close to the end of the text has a
    short continuation (it stops at the pending token); Hugging Face's prompt lookup takes the
    earliest occurrence with any continuation. On input-grounded prompts (the e2e benchmark), the
    longest-then-most-recent rule gains more tokens per target step than either earliest or latest.

    Works on the host copy of the tokens the generator already keeps, so it costs no device work
    and no synchronisation; rows without a match draft nothing (their step is a plain decode step).
    """

    cheap = True

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, prefer: str = "recent", *,
                 tree_weight: int = 16, tree_decay: float = 0.8):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if prefer not in ("recent", "earliest"):
            raise ValueError(f"prefer must be 'recent' or 'earliest', got {prefer!r}")
        if not (isinstance(tree_weight, int) and tree_weight >= 1) or not 0 < tree_decay < 1:
            raise ValueError(f"need an int tree_weight >= 1 and 0 < tree_decay < 1, got {tree_weight}, {tree_decay}")
        self.max_ngram, self.min_ngram, self.prefer = max_ngram, min_ngram, prefer
        #: tree scores: an occurrence matching n tokens weighs tree_weight ** (n - min_ngram); a node's
        #: weighted occurrence count is multiplied by tree_decay ** depth (see :meth:`tree`)
        self.tree_weight, self.tree_decay = tree_weight, float(tree_decay)

    def match(self, tokens: np.ndarray, max_tokens: int) -> tuple[int, int]:
        """``(start, n)``: where the chosen continuation starts in ``tokens`` [L] and the length of the
        matched n-gram; ``(-1, 0)`` when nothing matches (or ``max_tokens <= 0``)."""
        length = tokens.shape[0]
        if max_tokens <= 0:
            return -1, 0
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            suffix = tokens[length - n:]
            # windows start at p = 0 .. L-1-n, so the match is followed by at least one token and is
            # never the suffix itself
            windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if hits.size:
                starts = hits + n
                cont = np.minimum(length - starts, max_tokens)
                best = np.flatnonzero(cont == cont.max())
                return int(starts[best[-1] if self.prefer == "recent" else best[0]]), n
        return -1, 0

    def lookup(self, tokens: np.ndarray, max_tokens: int) -> np.ndarray:
        """Continuation (up to ``max_tokens`` ids, possibly empty) for one row's ``tokens`` [L] int64."""
        start, _ = self.match(tokens, max_tokens)
        if start < 0:
            return tokens[:0]
        return tokens[start: min(start + max_tokens, tokens.shape[0])]

    def propose(self, state: DraftState) -> Draft:
        batch = state.lengths.shape[0]
        num = np.zeros(batch, dtype=np.int64)
        match = np.zeros(batch, dtype=np.int64)
        starts = np.full(batch, -1, dtype=np.int64)
        for b in range(batch):
            length, k = int(state.lengths[b]), int(state.max_drafts[b])
            start, n = self.match(state.tokens[b, :length], k)
            if start >= 0:
                starts[b], match[b], num[b] = start, n, min(k, length - start)
        width = int(num.max()) if batch else 0
        if width == 0:
            return _empty_draft(batch, state.device)._replace(match=match)
        host = np.full((batch, width), -1, dtype=np.int64)
        for b in np.flatnonzero(num):
            host[b, : num[b]] = state.tokens[b, starts[b]: starts[b] + num[b]]
        return Draft(torch.from_numpy(host).to(state.device, non_blocking=True), None, num, match)


    # -- trees ----------------------------------------------------------------------------------------
    supports_tree = True

    def occurrences(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, n)``: every continuation start ``s`` in ``tokens`` [L] whose preceding tokens match the
        row's last ``n[s] >= min_ngram`` tokens (``n`` the longest such match, at most ``max_ngram``), in
        increasing ``s``. The match is never the suffix itself: ``s <= L - 1``."""
        length = tokens.shape[0]
        if length < 2:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        # one pass over the text for 1-token matches (start s: tokens[s - 1] == the last token), then the
        # few candidates are extended while tokens[s - m] == tokens[L - m]
        starts = np.flatnonzero(tokens[: length - 1] == tokens[length - 1]) + 1
        n = np.ones(starts.shape[0], dtype=np.int64)
        alive = starts
        for m in range(2, min(self.max_ngram, length - 1) + 1):
            alive = alive[alive >= m]
            alive = alive[tokens[alive - m] == tokens[length - m]]
            if alive.size == 0:
                break
            n[np.searchsorted(starts, alive)] += 1
        keep = n >= self.min_ngram
        return starts[keep], n[keep]

    def tree(self, tokens: np.ndarray, max_depth: int, max_nodes: int) -> tuple[np.ndarray, np.ndarray, int]:
        """One row's n-gram tree: ``(token_ids [M], parents [M], matched n)`` with ``M <= max_nodes`` nodes and
        depth < ``max_depth``; empty when nothing matches.

        Every occurrence (:meth:`occurrences`) contributes its continuation (up to ``max_depth`` tokens, cut
        at the end of the text); continuations are merged by common prefix into a trie. A trie node's
        score estimates how likely its path is: the occurrences through it, an occurrence matching ``n``
        tokens weighing ``tree_weight ** (n - min_ngram)`` (longer matches are better evidence, as in
        :meth:`match`), times ``tree_decay ** depth`` (a copied continuation drifts from the text as it
        goes on); ties go to the most recent occurrence through the node (``prefer="earliest"``: the
        earliest), then to the shallower node. The ``max_nodes`` best nodes are kept: a child scores less
        than its parent, so the kept set is a tree, and spending the budget best-first goes wide where the
        occurrences disagree and deep where they agree, instead of letting one long continuation take it
        all. Nodes are numbered in score order (parents before children, the best sibling first).
        """
        return self._tree(tokens, max_depth, max_nodes)[:3]

    def _tree(self, tokens: np.ndarray, max_depth: int, max_nodes: int):
        """:meth:`tree` plus each node's share [M] float64: its weighted occurrences over all of them."""
        empty = np.zeros(0, dtype=np.int64)
        length = tokens.shape[0]
        depth = min(int(max_depth), int(max_nodes))
        if depth <= 0:
            return empty, empty, 0, empty.astype(np.float64)
        starts, n = self.occurrences(tokens)
        if starts.size == 0:
            return empty, empty, 0, empty.astype(np.float64)
        matched = int(n.max())
        S = starts.shape[0]
        if S == 1:  # one occurrence: its continuation is a chain
            cont = tokens[starts[0]: starts[0] + min(depth, max_nodes)].astype(np.int64)
            return cont, np.arange(-1, cont.shape[0] - 1, dtype=np.int64), matched, np.ones(cont.shape[0])
        # continuations [depth, S] (depth-major), -1 past the end of the text; sorting them (first token
        # first) makes every trie node a run of consecutive columns
        idx = starts[None, :] + np.arange(depth)[:, None]
        cont = np.where(idx < length, tokens[np.minimum(idx, length - 1)], -1)
        order = np.lexsort(cont[::-1])
        cont, starts, n = cont[:, order], starts[order], n[order]
        # new[d, i]: column i starts a new trie node at depth d (its prefix 0..d differs from column i-1's)
        new = np.ones((depth, S), dtype=bool)
        new[:, 1:] = ~np.logical_and.accumulate(cont[:, 1:] == cont[:, :-1], axis=0)
        flat_new = new.ravel()
        flat_node = np.cumsum(flat_new) - 1  # node id of every (depth, column), depth-major
        first = np.flatnonzero(flat_new)  # each node's first (depth, column), flat
        num = first.shape[0]
        tok = cont.ravel()[first]
        dep = first // S
        parent = np.where(first >= S, flat_node[first - S], -1)  # the same column one level up
        # score: weighted occurrences through the node times decay^depth; ties: recency, then depth
        weight = float(self.tree_weight) ** (n - self.min_ngram)  # [S] integers: the sums are exact
        count = np.bincount(flat_node, weights=np.tile(weight, depth), minlength=num)
        score = count * (self.tree_decay ** np.arange(depth, dtype=np.float64))[dep]
        rec = np.tile(starts, depth)
        if self.prefer == "recent":
            recency = -np.maximum.reduceat(rec, first)
        else:
            recency = np.minimum.reduceat(rec, first)
        order = np.lexsort([dep, recency, -score])
        order = order[tok[order] >= 0][:max_nodes]
        out = np.full(num, -1, dtype=np.int64)
        out[order] = np.arange(order.shape[0])
        par = parent[order]
        share = count[order] / weight.sum()
        return tok[order].astype(np.int64), np.where(par >= 0, out[par], -1), matched, share

    def propose_tree(self, state: DraftState, max_nodes: int) -> DraftTree:
        """Per row :meth:`tree` with depth ``max_drafts[b]``; host numpy only, one non-blocking copy to the
        device, ``probs`` None (deterministic drafts), ``match`` the matched n-gram length (0 = none)."""
        batch = state.lengths.shape[0]
        match = np.zeros(batch, dtype=np.int64)
        rows = []
        for b in range(batch):
            length, k = int(state.lengths[b]), int(state.max_drafts[b])
            ids, par, m, share = self._tree(state.tokens[b, :length], k, max_nodes)
            rows.append((ids, par, share))
            match[b] = m
        num = np.array([r[0].size for r in rows], dtype=np.int64)
        width = int(num.max()) if batch else 0
        if width == 0:
            return _empty_tree(batch, state.device, match)
        host = np.full((2, batch, width), -1, dtype=np.int64)
        share = np.zeros((batch, width))
        for b in np.flatnonzero(num):
            host[0, b, : num[b]] = rows[b][0]
            host[1, b, : num[b]] = rows[b][1]
            share[b, : num[b]] = rows[b][2]
        dev = torch.from_numpy(host).to(state.device, non_blocking=True)
        return DraftTree(dev[0], dev[1], None, num, host[0], host[1], match, share)


def _forward(model, cache, input_ids: torch.Tensor) -> torch.Tensor:
    """One cached forward of ``input_ids`` [B, q]; returns logits [B, q, V]. The cache grows
    (doubling) when the forward would not fit: it starts small, sized like the target's."""
    q = input_ids.shape[1]
    if cache.get_seq_length() + q > cache.max_length:
        cache.grow(max(cache.get_seq_length() + q, 2 * cache.max_length))
    out = model(
        input_ids=input_ids,
        position_ids=cache.position_ids(q),
        attention_mask=cache.attention_mask(q),
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits


class ModelDrafter(Drafter):
    """Drafts with a (smaller) HF causal LM that shares the target's tokenizer.

    Keeps its own :class:`specdec.cache.RaggedCache`. Per step: catch up on the 1-2 tokens the target
    accepted since the last step (one forward, rows right-padded), then K-1 single-token forwards.
    After verification the cache is rolled back per row to the accepted prefix: no re-prefill.
    Sampling uses :func:`specdec.ops.sample` with the request's temperature/top-k/top-p, so the
    returned ``probs`` are exactly the distributions the drafts were drawn from; greedy uses argmax.
    Trees (:meth:`propose_tree`, EAGLE-2 style top-k, ``tree_children`` children per expanded node,
    ``tree_expand`` nodes expanded per level): one forward per level over the drafter cache's tree steps;
    :meth:`accept_tree` compacts the cache to the accepted path (no re-prefill either).
    """

    stochastic = True
    supports_tree = True

    def __init__(self, model, vocab_size: int | None = None, *, tree_children: int = 4, tree_expand: int = 4):
        if tree_children < 1 or tree_expand < 1:
            raise ValueError(f"tree_children and tree_expand must be >= 1, got {tree_children}, {tree_expand}")
        self.model = model
        self.vocab_size = vocab_size  # the target's logits width; drafter logits beyond it are cut
        self.cache = None
        #: trees: children drawn per expanded node (k), nodes expanded per level (W); see propose_tree
        self.tree_children, self.tree_expand = tree_children, tree_expand
        self._tree_step = None

    def _make_cache(self, batch: int, max_length: int):
        from specdec.cache import RaggedCache

        return RaggedCache.from_model(self.model, batch_size=batch, max_length=max_length)

    @torch.inference_mode()
    def start(self, state: DraftState) -> None:
        batch = state.lengths.shape[0]
        self.cache = self._make_cache(batch, state.max_length)
        # the cache holds everything but each row's pending token: prefill prompt[:-1]
        self.cached = state.lengths - 1
        width = int(self.cached.max())
        if width > 0:
            ids = torch.from_numpy(np.ascontiguousarray(state.tokens[:, :width])).to(state.device)
            self.model(
                input_ids=ids,
                position_ids=self.cache.position_ids(width),
                attention_mask=self.cache.attention_mask(width),
                past_key_values=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.cache.rollback(torch.from_numpy(self.cached).to(self.cache.lengths),
                           host_lengths=torch.from_numpy(self.cached))

    def _sample(self, logits: torch.Tensor, state: DraftState, offset: torch.Tensor):
        """logits [B, V] -> (token ids [B] int64, probs [B, V] fp32 or None when greedy)."""
        if self.vocab_size is not None and logits.shape[-1] > self.vocab_size:
            logits = logits[:, : self.vocab_size]  # padded drafter head: never propose ids the target lacks
        if state.temperature == 0:
            return logits.argmax(dim=-1), None
        from specdec import ops

        ids, probs = ops.sample(
            logits, temperature=state.temperature, top_k=state.top_k, top_p=state.top_p,
            seed=state.seeds, offset=offset, backend=state.backend,
        )
        return ids.long(), probs

    @torch.inference_mode()
    def propose(self, state: DraftState) -> Draft:
        batch = state.lengths.shape[0]
        num = state.max_drafts
        k = int(num.max()) if batch else 0
        self.proposed = 0
        self._tree_step = None
        if k == 0:
            return _empty_draft(batch, state.device)
        last = self._catch_up(state)
        draft = self._draft(last, state, self.cache)
        self.lengths_at_propose = state.lengths.copy()
        self.proposed = k
        return draft

    def _catch_up(self, state: DraftState) -> torch.Tensor:
        """Feed each row's tokens the cache lacks, the pending one last (one forward, rows right-padded);
        returns the logits after the pending token [B, V]. The cache then holds every row's tokens."""
        batch = state.lengths.shape[0]
        need = state.lengths - self.cached  # 1, or 2 after a row accepted all drafts
        width = int(need.max())
        host = np.zeros((batch, width), dtype=np.int64)
        for b in range(batch):
            host[b, : need[b]] = state.tokens[b, self.cached[b]: state.lengths[b]]
        logits = _forward(self.model, self.cache, torch.from_numpy(host).to(state.device))
        rows = torch.arange(batch, device=logits.device)
        last = logits[rows, torch.from_numpy(need - 1).to(logits.device)]
        if width > 1:  # drop the right padding of rows that needed one token
            self.cache.rollback(torch.from_numpy(state.lengths).to(self.cache.lengths),
                               host_lengths=torch.from_numpy(state.lengths))
        return last

    def _draft(self, last: torch.Tensor, state: DraftState, cache) -> Draft:
        """Draft ``k = max(max_drafts)`` tokens from ``last`` [B, V] logits (after each row's pending
        token), feeding drafts 1..k-1 back through ``self.model`` over ``cache`` (which advances by k-1)."""
        num = state.max_drafts
        k = int(num.max())
        ids, probs = [], []
        for i in range(k):  # draft i is token lengths + i of its row: keyed by that position
            tok, prob = self._sample(last.float(), state, state.draft_offsets(i))
            ids.append(tok)
            probs.append(prob)
            if i + 1 < k:
                last = _forward(self.model, cache, tok[:, None])[:, -1]
        token_ids = torch.stack(ids, dim=1)
        if (num < k).any():  # rows with a smaller budget: mask their tail
            mask = torch.arange(k, device=token_ids.device)[None, :] >= torch.from_numpy(num).to(token_ids.device)[:, None]
            token_ids = token_ids.masked_fill(mask, -1)
        draft_probs = None if probs[0] is None else torch.stack(probs, dim=1)
        return Draft(token_ids, draft_probs, num)

    # -- trees ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose_tree(self, state: DraftState, max_nodes: int) -> DraftTree:
        """An EAGLE-2 style top-k tree of up to ``max_nodes`` nodes per row, depth <= ``max_drafts[b]``.

        Level by level from the pending token (the root): each level's nodes are the children of the
        previous level's ``tree_expand`` (W) nodes of highest path probability (the root at level 0), up
        to ``tree_children`` (k) children each, drawn from the drafter's distribution at the parent. One
        drafter forward per level feeds the W expanded nodes into the drafter's cache as a tree step
        (``tree_position_ids`` / ``tree_attention_mask`` over every node fed this step): each attends the
        committed prefix, the root and its own ancestors only.

        Greedy (``temperature == 0``): the children are the top-k ids, ``probs`` None. Sampled: child j of a
        node is drawn with :func:`specdec.ops.sample` from the node's logits with children 0..j-1 set to
        -inf (without replacement); its ``probs`` row is the distribution it was drawn from; its Philox
        offset is ``draft_offsets(depth) + (rank << 40)`` with ``rank = e * k + j`` unique within the level
        (``e`` the parent's slot among the level's expanded nodes), so no two draws of a step share random
        numbers and the numbers stay keyed by token position (rank 0 of the best node is the chain's draw).

        Budget, exact for sampled trees: how many nodes a level gets is fixed on the host before anything
        is drawn (at most ``W * k`` and what ``max_nodes`` leaves, keeping ``min(W, max_nodes // depth)``
        per later level so deep paths survive a small budget). Within a level the children compete on
        ``path probability of the parent x the mass not yet drawn among its children`` - a value that does
        not depend on the child's own token, so keeping or dropping a drawn child never biases the
        distribution it was drawn from (greedy: the child's own path probability). Siblings keep their
        drawing order. After verification :meth:`accept_tree` compacts the cache to the accepted path.
        """
        batch = state.lengths.shape[0]
        self.proposed = 0
        self._tree_step = None
        depth = np.minimum(np.asarray(state.max_drafts, dtype=np.int64), max(int(max_nodes), 0))
        if batch == 0 or int(depth.max(initial=0)) == 0:
            return _empty_tree(batch, state.device)
        last = self._catch_up(state)
        root_slot = state.lengths - 1  # the cache holds every token; the root (pending) is the last one
        tree, fed, num_fed = self._grow_tree(last, state, self.cache, root_slot, depth, int(max_nodes))
        self._tree_step = (state.lengths.copy(), fed, num_fed)
        return tree

    def _tree_schedule(self, depth: np.ndarray, max_nodes: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Host plan of a tree, fixed before drawing: per level ``(parents expanded [B], nodes kept [B])``."""
        k, W = self.tree_children, self.tree_expand
        if self.vocab_size is not None:
            k = min(k, self.vocab_size)
        budget = np.where(depth > 0, max_nodes, 0).astype(np.int64)
        keep = np.clip(np.minimum(W, max_nodes // np.maximum(depth, 1)), 1, None)  # per later level
        plan, prev = [], None
        for t in range(int(depth.max(initial=0))):
            expanded = np.ones_like(budget) if t == 0 else np.minimum(W, prev)
            expanded = np.where(depth > t, expanded, 0)
            reserve = keep * np.maximum(depth - 1 - t, 0)
            n = np.minimum(np.minimum(expanded * k, budget), np.maximum(budget - reserve, np.minimum(keep, budget)))
            n = np.where(expanded > 0, n, 0)
            if not n.any():
                break
            plan.append((expanded, n))
            budget = budget - n
            prev = n
        return plan

    def _level_inputs(self, cache, root_dev, root_host, parents, valid, first: int):
        """Position ids and mask for the step's nodes ``first..`` of a tree step whose root sits in slot
        ``root_host[b]`` while the cache already holds the root and nodes ``0..first-1`` after it."""
        from specdec.cache import rollback_

        store = cache.store
        saved, saved_host = store.lengths.clone(), store.host_lengths.clone()
        rollback_(store.lengths, root_dev, False, backend=store.backend)  # the step's base: the root slot
        store._set_host(torch.from_numpy(root_host))
        try:
            pos = cache.tree_position_ids(parents, valid)
            mask = cache.tree_attention_mask(parents, valid)
        finally:
            rollback_(store.lengths, saved, False, backend=store.backend)
            store._set_host(saved_host)
        return pos[:, first + 1:], mask[:, :, first + 1:]

    def _grow_tree(self, last: torch.Tensor, state: DraftState, cache, root_slot: np.ndarray, depth: np.ndarray,
                   max_nodes: int):
        """The tree from the root's logits ``last`` [B, V]; the cache holds the root at ``root_slot[b]``.
        Returns ``(DraftTree, fed [B, N] host: the cache-step index of each tree node fed to the drafter or
        -1, number of fed slots)``."""
        batch = last.shape[0]
        dev = last.device
        plan = self._tree_schedule(depth, max_nodes)
        k = min(self.tree_children, last.shape[-1] if self.vocab_size is None else min(self.vocab_size, last.shape[-1]))
        greedy = state.temperature == 0
        width = int(sum(n for _, n in plan).max())  # tree slots (an upper bound on every row's nodes)
        dump = width  # scatter target of unselected pairs
        out_ids = torch.full((batch, width + 1), -1, dtype=torch.int64, device=dev)
        out_par = torch.full((batch, width + 1), -1, dtype=torch.int64, device=dev)
        out_fed = torch.full((batch, width + 1), -1, dtype=torch.int64, device=dev)
        out_probs = None
        count = torch.zeros(batch, dtype=torch.int64, device=dev)  # nodes so far per row
        rows = torch.arange(batch, device=dev)
        root_dev = torch.from_numpy(root_slot).to(dev, torch.int32)
        # parents of this level: logits [B, E, V], path probability, tree index (-1 root), fed index, valid
        par_logits = last[:, None, :]
        par_cum = torch.ones(batch, 1, device=dev)
        par_node = torch.full((batch, 1), -1, dtype=torch.int64, device=dev)
        par_fed = torch.full((batch, 1), -1, dtype=torch.int64, device=dev)
        par_valid = torch.from_numpy(plan[0][0] > 0).to(dev)[:, None]
        fed_parents = torch.zeros(batch, 0, dtype=torch.int64, device=dev)
        fed_valid = torch.zeros(batch, 0, dtype=torch.bool, device=dev)
        for t, (_, n_keep) in enumerate(plan):
            E = par_logits.shape[1]
            logits = par_logits.float()
            if self.vocab_size is not None and logits.shape[-1] > self.vocab_size:
                logits = logits[..., : self.vocab_size]
            V = logits.shape[-1]
            if greedy:
                q0 = torch.softmax(logits, dim=-1)
                ids = logits.topk(k, dim=-1).indices  # [B, E, k], best first
                qx = q0.gather(-1, ids)
                prio = par_cum[..., None] * qx
                probs = None
            else:
                from specdec import ops

                flat = logits.reshape(batch * E, V).clone()
                seeds = state.seeds.to(dev).repeat_interleave(E)
                base = state.draft_offsets(t).to(dev).repeat_interleave(E)
                slot = torch.arange(E, device=dev).repeat(batch) * k
                ids_j, probs_j = [], []
                for j in range(k):
                    tok, pr = ops.sample(flat, temperature=state.temperature, top_k=state.top_k, top_p=state.top_p,
                                         seed=seeds, offset=base + ((slot + j) << 40), backend=state.backend)
                    tok = tok.long()
                    ids_j.append(tok)
                    probs_j.append(pr)
                    if j + 1 < k:  # without replacement: the drawn id leaves the next sibling's logits
                        flat.scatter_(1, tok.clamp(min=0)[:, None],
                                      torch.where(tok[:, None] >= 0, float("-inf"), flat.gather(1, tok.clamp(min=0)[:, None])))
                ids = torch.stack(ids_j, -1).view(batch, E, k)
                probs = torch.stack(probs_j, 1).view(batch, E, k, V)
                qx = probs[:, :, 0].gather(-1, ids.clamp(min=0))  # each child's mass under the first draw's q
                rem = (1.0 - (torch.cumsum(qx, -1) - qx)).clamp(min=0.0)  # mass not drawn before child j
                prio = par_cum[..., None] * rem
            valid = par_valid[..., None] & (ids >= 0)
            prio = torch.where(valid, prio, torch.full_like(prio, -1.0)).reshape(batch, E * k)
            # keep the n_keep[b] best pairs (stable: ties go to the earlier parent / sibling)
            order = torch.sort(prio, dim=1, descending=True, stable=True).indices
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(E * k, device=dev).expand(batch, -1))
            sel = (rank < torch.from_numpy(n_keep).to(dev)[:, None]) & valid.reshape(batch, E * k)
            node = torch.where(sel, count[:, None] + torch.cumsum(sel, 1) - 1, torch.full_like(rank, dump))
            flat_ids = ids.reshape(batch, E * k)
            out_ids.scatter_(1, node, torch.where(sel, flat_ids, -1))
            out_par.scatter_(1, node, torch.where(sel, par_node.repeat_interleave(k, 1), -1))
            if probs is not None:
                if out_probs is None:
                    out_probs = torch.zeros(batch, width + 1, V, device=dev)
                out_probs.scatter_(1, node[..., None].expand(-1, -1, V), probs.reshape(batch, E * k, V))
            count = count + sel.sum(1)
            out_ids[:, dump] = -1
            out_par[:, dump] = -1
            if t + 1 == len(plan):
                break
            # expand the W nodes of this level with the highest path probability
            cum = torch.where(sel, (par_cum[..., None] * qx).reshape(batch, E * k), torch.full_like(prio, -1.0))
            n_exp = plan[t + 1][0]
            W = int(n_exp.max())
            pick = torch.sort(cum, dim=1, descending=True, stable=True).indices[:, :W]  # [B, W] pair indices
            exp_valid = (torch.arange(W, device=dev)[None, :] < torch.from_numpy(n_exp).to(dev)[:, None]) \
                & (cum.gather(1, pick) >= 0)
            exp_tok = flat_ids.gather(1, pick)
            exp_node = node.gather(1, pick)
            exp_fed = fed_parents.shape[1] + torch.arange(W, device=dev)[None, :].expand(batch, -1)
            exp_fedpar = par_fed.gather(1, pick // k)
            fed_parents = torch.cat([fed_parents, torch.where(exp_valid, exp_fedpar, -1)], 1)
            fed_valid = torch.cat([fed_valid, exp_valid], 1)
            out_fed.scatter_(1, torch.where(exp_valid, exp_node, dump), torch.where(exp_valid, exp_fed, -1))
            out_fed[:, dump] = -1
            # one drafter forward over the expanded nodes, as a tree step over everything fed so far
            first = fed_parents.shape[1] - W
            pos, mask = self._level_inputs(cache, root_dev, root_slot, fed_parents, fed_valid, first)
            if cache.get_seq_length() + W > cache.max_length:
                cache.grow(max(cache.get_seq_length() + W, 2 * cache.max_length))
            out = self.model(input_ids=torch.where(exp_valid, exp_tok, 0), position_ids=pos, attention_mask=mask,
                             past_key_values=cache, use_cache=True)
            par_logits = out.logits
            par_cum = torch.where(exp_valid, cum.gather(1, pick), 0.0)
            par_node = torch.where(exp_valid, exp_node, -1)
            par_fed = torch.where(exp_valid, exp_fed, -1)
            par_valid = exp_valid
        host = torch.cat([out_ids[:, :width], out_par[:, :width], out_fed[:, :width], count[:, None]], 1).cpu().numpy()
        host_ids, host_par = host[:, :width].copy(), host[:, width: 2 * width].copy()
        fed, num = host[:, 2 * width: 3 * width].copy(), host[:, -1].copy()
        probs = None if out_probs is None else out_probs[:, :width]
        tree = DraftTree(out_ids[:, :width], out_par[:, :width], probs, num, host_ids, host_par)
        return tree, fed, fed_parents.shape[1]

    @torch.inference_mode()
    def accept_tree(self, accepted_nodes: np.ndarray, num_accepted: np.ndarray) -> None:
        """Compact the drafter cache to the root and the accepted path's nodes that were fed to the drafter
        (a prefix of the path: every accepted node but possibly the last was expanded); the next step
        catches up on the rest, as after the chain's rollback."""
        step, self._tree_step = self._tree_step, None
        if step is None:
            return
        lengths, fed, num_fed = step
        batch = lengths.shape[0]
        accepted_nodes = np.asarray(accepted_nodes, dtype=np.int64).reshape(batch, -1)
        num_accepted = np.asarray(num_accepted, dtype=np.int64).reshape(batch)
        cols = np.arange(accepted_nodes.shape[1])[None, :]
        on_path = (cols < num_accepted[:, None]) & (accepted_nodes >= 0)
        idx = np.clip(accepted_nodes, 0, max(fed.shape[1] - 1, 0))
        slots = np.where(on_path, fed[np.arange(batch)[:, None], idx] if fed.shape[1] else -1, -1)
        kept = np.logical_and.accumulate(slots >= 0, axis=1).sum(1) if slots.shape[1] else np.zeros(batch, np.int64)
        self.cached = lengths + kept
        if num_fed == 0:
            return  # nothing fed past the root: the cache already holds exactly the row's tokens
        depth = max(int(kept.max(initial=0)), 1)
        keep = np.where(cols[:, :depth] < kept[:, None], slots[:, :depth], 0) if slots.shape[1] else np.zeros((batch, 1), np.int64)
        self.cache.compact_tree(torch.from_numpy(np.ascontiguousarray(keep)), torch.from_numpy(kept),
                                num_nodes=num_fed, host_lengths=torch.from_numpy(self.cached))

    def accept(self, num_accepted: np.ndarray) -> None:
        if self.proposed == 0:
            return
        # fed: pending + drafts 1..k-1; the kept prefix is pending + accepted drafts
        self.cached = self.lengths_at_propose + np.minimum(num_accepted, self.proposed - 1)
        self.cache.rollback(torch.from_numpy(self.cached).to(self.cache.lengths),
                           host_lengths=torch.from_numpy(self.cached))

    def select_rows(self, index: torch.Tensor) -> None:
        self.cache.select_rows(index.to(self.cache.lengths.device), host_index=index.cpu())
        self.cached = self.cached[index.cpu().numpy()]

    def finish(self) -> None:
        self.cache = None


def truncated_model(model, num_layers: int):
    """A view of an HF decoder-only model with only its first ``num_layers`` layers.

    Shares every parameter with ``model`` (embeddings, layers, final norm, head): no copy. Works for
    the ``XForCausalLM(model=XModel(layers=ModuleList))`` layout of Llama, Qwen2/3, Mistral, ...
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no .model.layers ModuleList; early exit is not supported")
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"early-exit layers must be in 1..{len(layers)}, got {num_layers}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    view_inner = copy.copy(inner)
    view_inner._modules = dict(inner._modules)  # shallow copies share _modules; give the view its own
    view_inner.layers = torch.nn.ModuleList(list(layers)[:num_layers])
    view_inner.config = config
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.model = view_inner
    view.config = config
    return view


class EarlyExitDrafter(ModelDrafter):
    """Self-speculation: the target's first ``num_layers`` layers + final norm + head as the drafter.

    Shares the target's weights through :func:`truncated_model` and the target's KV cache
    (``state.cache``): no extra parameter or cache memory and no prefill, since the target's prefill
    and verification forwards already wrote layers ``0..num_layers-1`` of every accepted token.
    ``propose`` runs the pending token and drafts 1..k-1 through those layers inside
    ``cache.partial_depth(num_layers)``; on exit the lengths are back at the target's (O(1)), and the
    target's verification forward overwrites the drafted slots. ``accept``/``select_rows`` have
    nothing to do: the generator rolls back and selects rows of its own cache.
    """

    needs_target_cache = True
    supports_tree = False  # a tree over the target's cache would need the generator's compaction; not yet
    propose_tree = Drafter.propose_tree
    accept_tree = Drafter.accept_tree

    def __init__(self, target, num_layers: int | None = None, vocab_size: int | None = None):
        total = len(target.model.layers)
        if num_layers is None:
            num_layers = max(1, total // 4)
        super().__init__(truncated_model(target, num_layers), vocab_size=vocab_size)
        self.num_layers = num_layers

    def start(self, state: DraftState) -> None:
        if state.cache is None:
            raise ValueError("EarlyExitDrafter drafts over the target's cache: DraftState.cache must be set")

    @torch.inference_mode()
    def propose(self, state: DraftState) -> Draft:
        batch = state.lengths.shape[0]
        if batch == 0 or int(state.max_drafts.max()) == 0:
            return _empty_draft(batch, state.device)
        pending = torch.from_numpy(state.tokens[np.arange(batch), state.lengths - 1]).to(state.device)
        with state.cache.partial_depth(self.num_layers) as cache:
            last = _forward(self.model, cache, pending[:, None])[:, -1]
            return self._draft(last, state, cache)

    def accept(self, num_accepted: np.ndarray) -> None:
        pass

    def select_rows(self, index: torch.Tensor) -> None:
        pass

    def finish(self) -> None:
        pass


def make_drafter(kind, target=None, *, num_layers: int | None = None, vocab_size: int | None = None) -> Drafter | None:
    """Build a drafter from a name (``"ngram"``, ``"early-exit"``, ``"none"``), a model, or a Drafter."""
    if kind is None or isinstance(kind, Drafter):
        return kind
    if isinstance(kind, str):
        name = kind.lower().replace("_", "-")
        if name in ("ngram", "n-gram", "prompt-lookup"):
            return NGramDrafter()
        if name in ("early-exit", "earlyexit", "self"):
            return EarlyExitDrafter(target, num_layers, vocab_size=vocab_size)
        if name == "none":
            return None
        raise ValueError(f"unknown drafter kind {kind!r}: use 'ngram', 'early-exit', 'none' or a model")
    if isinstance(kind, torch.nn.Module):
        return ModelDrafter(kind, vocab_size=vocab_size)
    raise TypeError(f"drafter must be a name, an HF model or a specdec.drafters.Drafter, got {type(kind).__name__}")
