# Holds: NGramDrafter: prompt lookup over the host token history (longest match; trie trees).
# May use: numpy, torch, .base. No model runs here.
"""The n-gram (prompt-lookup) drafter: no model, drafts copied from earlier text."""
from __future__ import annotations

import numpy as np
import torch

from specdec.drafters.base import Draft, Drafter, DraftState, DraftTree, _empty_draft, _empty_tree


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
