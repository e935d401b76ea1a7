# Holds: ModelDrafter: a smaller HF causal LM with its own RaggedCache; chains, and EAGLE-2-style trees.
# May use: numpy, torch, specdec.ops (sampling), specdec.cache, specdec.hf_compat, .base.
"""The model drafter: a smaller Hugging Face causal LM with its own ragged KV cache."""
from __future__ import annotations

import numpy as np
import torch

from specdec.drafters.base import Draft, Drafter, DraftState, DraftTree, _empty_draft, _empty_tree
from specdec.hf_compat import cache_kwargs


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
        use_cache=True,
        **cache_kwargs(model, cache),
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
                use_cache=True,
                logits_to_keep=1,
                **cache_kwargs(self.model, self.cache),
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
                             use_cache=True, **cache_kwargs(self.model, cache))
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
