# Holds: one batch's step loop, draft -> forward -> verify -> commit (run_batch, _BatchRun).
# May use: numpy, torch, specdec.{ops, cache, linear, drafters.base}; .policy, .trees, .layouts, .results.
"""One generation step of a batch: draft, target forward, verify, commit; and the loop over steps.

One step for B live rows (each row's last token, the *pending* one, is not in the target's cache):

    draft  = drafter.propose(...)                      # [B, K] ids, -1 tail; optional probs
    logits = target([pending, drafts])                 # [B, K+1, V], one cached forward
    out, n = specdec.ops.verify(logits, draft, probs)  # per-row acceptance, exact distribution
    cache.rollback(kept prefix per row)                # O(1), no re-prefill
    one host copy of (out, n)                          # the only synchronisation per step

The first step is the prefill: the prompts (left padded to a common width) and the drafts proposed
from them go through one forward, so the prefill already emits tokens (like Hugging Face's assisted
generation, whose first forward verifies candidates too). Drafters that read the target's cache
(early exit) start drafting at the second step.

Rows that hit EOS or their token budget leave the batch (``select_rows``) without stalling the
others.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from specdec.drafters.base import Draft, DraftState, _empty_draft
from specdec.generator.layouts import MIN_SHARED_PREFIX, _common_prefix, _PaddedLayout, _SharedPrefixLayout
from specdec.generator.policy import MAX_DRAFT_TOKENS
from specdec.generator.results import Chunk, GenerationStats
from specdec.generator.trees import _Tree
from specdec.hf_compat import cache_kwargs
from specdec.linear import narrow_linears

if TYPE_CHECKING:
    from specdec.generator.speculative import SpeculativeGenerator

GROW_STEP = 256  # new tokens the caches have room for at first; they double as rows grow
TREE_COST_SLACK = 0.25  # adaptive trees: side branches may add this much to a forward's predicted cost
# a row that could have drafted but was given nothing this many steps in a row gets a probe of one draft
# (or node): no drafts means no new acceptance counts for its class, and a measured cost spike or an
# unlucky class estimate would otherwise keep it from drafting for good
EXPLORE_AFTER = 8


@torch.inference_mode()
def run_batch(gen: SpeculativeGenerator, rows, user_index, seeds, opts, bar):
    """One batch of ``gen`` (a SpeculativeGenerator), step by step: draft -> target forward -> verify ->
    commit. Returns each row's generated ids, finish reasons, the batch's GenerationStats, and each
    row's (processed, raw) logprob pairs (None unless ``opts["logprobs"]``)."""
    models = (gen.target, getattr(gen.drafter, "model", None)) if gen.narrow_linear else ()
    run = _BatchRun(gen, rows, user_index, seeds, opts, bar)
    try:
        with narrow_linears(*models):
            while run.live:
                run.make_room()
                draft = run.draft()
                logits = run.forward(draft)
                verdict = run.verify(logits, draft)
                run.commit(draft, verdict)
    finally:
        if gen.drafter is not None:
            gen.drafter.finish()
    _sync(gen.device)
    run.stats.total_time = time.perf_counter() - run.t_start
    return run.out_tokens, run.reasons, run.stats, run.out_logprobs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Verdict(NamedTuple):
    """What verification decided for the live rows of one step."""

    out_ids: torch.Tensor  # [B, K+1] int64 device: accepted drafts, the emitted token, -1
    num_accepted: torch.Tensor  # [B] int32 device
    host: np.ndarray  # [B, K+2] int64: out_ids and num_accepted, the step's one host copy
    accepted_nodes: torch.Tensor | None = None  # tree steps: [B, D] int64 device, the accepted path
    host_nodes: np.ndarray | None = None  # ... and its host copy
    logprobs: np.ndarray | None = None  # [B, K+1, 2] float32 host: (processed, raw) of out_ids, when asked


class _BatchRun:
    """The state of one batch during generation and the four parts of a step.

    Host side: each row's tokens (prompt + generated) and length, which rows are live; device side:
    the target's RaggedCache, each row's pending token (emitted, not yet in the cache), seed and
    Philox offset (its token index). A step reads top to bottom in :func:`run_batch`:
    ``draft`` (drafter proposes, the width policy cuts), ``forward`` (one target forward over the
    pending token and the drafts: the first step is the prefill), ``verify`` (the fused op; the only
    host synchronisation of the step), ``commit`` (cache rollback to the kept prefix, tokens,
    stats, streaming callbacks, finished rows leave).
    """

    def __init__(self, gen: "SpeculativeGenerator", rows, user_index, seeds, opts, bar):
        from specdec.cache import RaggedCache

        self.gen, self.opts, self.bar, self.user_index = gen, opts, bar, user_index
        self.device, self.target, self.drafter, self.policy = gen.device, gen.target, gen.drafter, gen.policy
        self.stats = GenerationStats(drafter=gen.drafter_name, num_sequences=len(rows))
        _sync(self.device)
        self.t_start = time.perf_counter()
        batch = len(rows)
        device = self.device
        self.lengths = np.array([len(r) for r in rows], dtype=np.int64)
        self.max_new, self.eos, self.k_max = opts["max_new_tokens"], set(opts["eos"]), opts["k0"]
        self.sampled = opts["temperature"] > 0
        self.width0 = width0 = int(self.lengths.max())  # prompts, left padded to a common width, form step 0
        # caches and the host token array start with room for the prompts and GROW_STEP new tokens
        # and grow geometrically as the rows do (make_room), up to `full`: a large max_new_tokens
        # costs memory only when the tokens are generated
        # a step appends the pending token and up to MAX_DRAFT_TOKENS drafts or max_tree_nodes nodes
        self.room = max(MAX_DRAFT_TOKENS, gen.max_tree_nodes if gen.tree else 0) + 2
        self.full = width0 + self.max_new + self.room
        capacity = min(self.full, width0 + GROW_STEP + self.room)
        self.tokens = np.zeros((batch, capacity), dtype=np.int64)  # host copy: prompts + generated (not padded)
        for b, r in enumerate(rows):
            self.tokens[b, : len(r)] = r
        self.prompt_lengths = self.lengths.copy()
        self.live = list(range(batch))  # batch row -> position in `rows`
        self.out_tokens = [[] for _ in range(batch)]
        self.out_logprobs = [[] for _ in range(batch)] if opts["logprobs"] else None
        self.reasons = ["length"] * batch
        self.seeds = seeds.to(device)
        # Philox offset of each row's next token: its absolute index (the sequence length), so the
        # random numbers that decide a token depend on its position, not on the step structure
        self.offsets = torch.from_numpy(self.lengths).to(device)
        self.previous = np.zeros(batch, dtype=np.int64)  # the policy's previous-outcome code per row
        self.idle = np.zeros(batch, dtype=np.int64)  # steps in a row with drafts available but none taken
        self.available = np.zeros(batch, dtype=np.int64)  # this step's drafts before the policy's cut
        self.pending = None  # [B] device: each row's last emitted token, not yet in the cache
        self.step = 0
        self.started = False  # drafter.start() runs before its first proposal
        self.width = 0  # the width a model drafter was asked for this step (policy bookkeeping)
        self.remaining = None
        # grammar-constrained rows (generate(grammar=...)): one xgrammar matcher per row
        self.grammar = None
        if opts.get("grammars") is not None:
            from specdec.generator.grammar import _BatchGrammar

            self.grammar = _BatchGrammar([opts["grammars"][i] for i in user_index], gen.vocab_size, device)
        self.grammar_drafts = self.grammar is not None and opts.get("grammar_drafts", True) and (
            self.drafter is None or (self.drafter.cheap and not self.drafter.needs_target_cache))
        # forced drafts are chains; the tree steps of tree=None give way to them (tree=True keeps trees)
        self.tree_steps = gen.tree and not (self.grammar_drafts and gen._tree_auto)

        cache, layout = None, _PaddedLayout()
        prefix = _common_prefix(rows) if batch > 1 and gen.share_prefix else 0
        drafter = self.drafter
        if prefix >= MIN_SHARED_PREFIX and not (drafter is not None and drafter.needs_target_cache):
            cache = RaggedCache.from_model(self.target, batch_size=1, max_length=capacity)
            if cache.sliding_window is None:  # the holes would shift the window
                ids = torch.tensor([rows[0][:prefix]], dtype=torch.int64, device=device)
                self.target(input_ids=ids, position_ids=cache.position_ids(prefix),
                            attention_mask=cache.attention_mask(prefix), use_cache=True,
                            logits_to_keep=1, **cache_kwargs(self.target, cache))
                cache.select_rows(torch.zeros(batch, dtype=torch.int64, device=device))
                layout = _SharedPrefixLayout(prefix, width0 - self.lengths, device)
            else:
                cache = None
        if gen._kept is not None:  # _continue: a batch of one whose first tokens are in a kept cache
            cache, layout = gen._kept._adopt(self.target, capacity)
        if cache is None:
            cache = RaggedCache.from_model(self.target, batch_size=batch, max_length=capacity)
            if (self.lengths < width0).any():
                cache.set_left_padding(torch.from_numpy(width0 - self.lengths))
        self.cache, self.layout = cache, layout

    # -- 0. room ----------------------------------------------------------------------------------

    def make_room(self) -> None:
        """Grow the cache and the host tokens (doubling) so this step fits: at most
        MAX_DRAFT_TOKENS drafts (or max_tree_nodes tree nodes) and MAX_DRAFT_TOKENS + 1 emitted
        tokens per row."""
        room, cache = self.room, self.cache
        if cache.get_seq_length() + room > cache.max_length:
            cache.grow(max(cache.get_seq_length() + room, min(self.full, 2 * cache.max_length)))
        longest = int(self.lengths.max())
        if longest + room > self.tokens.shape[1]:
            wider = max(longest + room, min(self.full, 2 * self.tokens.shape[1]))
            self.tokens = np.pad(self.tokens, ((0, 0), (0, wider - self.tokens.shape[1])))

    # -- 1. draft ---------------------------------------------------------------------------------

    def draft(self) -> Draft:
        """The step's drafts: the drafter's proposal, cut to the width the policy picks (adaptive)."""
        drafter, policy, opts = self.drafter, self.policy, self.opts
        self.remaining = remaining = self.max_new - (self.lengths - self.prompt_lengths)
        budget = np.minimum(self.k_max, remaining - 1)  # never draft past the length limit
        self.t0 = time.perf_counter()
        draft, self.width = None, 0
        self.available = np.zeros(len(self.live), dtype=np.int64)
        self.certain = np.zeros(len(self.live), dtype=np.int64)  # drafts sure to be accepted (grammar-forced)
        self.probe = int(bool((self.idle >= EXPLORE_AFTER).any()))  # at least one draft this step
        first = self.step == 0
        if drafter is not None and budget.max() > 0 and not (first and drafter.needs_target_cache):
            state = DraftState(self.tokens, self.lengths, budget, opts["temperature"], opts["top_k"], opts["top_p"],
                               self.seeds, self.step, self.device, self.cache.max_length, self.gen.backend,
                               self.cache, offsets=self.offsets)
            if not self.started:
                drafter.start(state)
                self.started = True
                t_started = time.perf_counter()
                self.stats.drafter_time += t_started - self.t0
                self.t0 = t_started  # the step's drafting time (observe_draft_time) excludes the start
            if self.tree_steps and self.gen._tree_step(self.step):
                draft = self._draft_tree(state, budget)
            elif not opts["adaptive"]:
                draft = self._allowed(drafter.propose(state))
            elif drafter.cheap:  # propose the longest drafts, then cut them to the policy's width
                draft = self._allowed(drafter.propose(state))
                keys = policy.keys(self.sampled, draft.match, self.previous)
                self.available = draft.num_drafted
                draft = draft.truncate(max(self.probe, policy.width(draft.num_drafted, keys, remaining)))
            elif self._pick_width(state, budget):  # width first: proposing runs the drafter model per position
                draft = self._allowed(drafter.propose(state))
            _sync(self.device)
        if draft is None:
            draft = _empty_draft(len(self.live), self.device)
        if self.grammar_drafts:
            draft = self._forced_tree(draft) if isinstance(draft, _Tree) else self._forced(draft)
        self.t1 = time.perf_counter()
        return draft

    def _draft_tree(self, state: DraftState, budget: np.ndarray) -> "_Tree | None":
        """A tree of drafts (the drafter's ``propose_tree``, up to ``max_tree_nodes`` nodes). Adaptive:
        a cheap drafter's tree with node shares (n-gram) keeps the nodes ``policy.tree_nodes`` picks;
        otherwise the policy picks the depth as it picks a chain's width, from the rows' deepest
        paths. The forward over N + 1 positions per row is what its cost model measures."""
        drafter, policy, nodes = self.drafter, self.policy, self.gen.max_tree_nodes
        if not self.opts["adaptive"]:
            return self._allowed(_Tree.of(drafter.propose_tree(state, nodes)))
        if drafter.cheap:  # propose the full tree, keep what the policy picks
            tree = self._allowed(_Tree.of(drafter.propose_tree(state, nodes)))
            keys = policy.keys(self.sampled, tree.match, self.previous)
            self.available = tree.num_drafted
            if not self.available.any():
                return None
            if tree.share is not None:  # node by node, from each node's estimated acceptance
                keep = policy.tree_nodes(tree.node_depth, tree.share, keys, self.probe)
                return tree.keep(keep, self.device) if keep.any() else None
            # without shares: cut at the depth the policy picks for a chain, side branches within a budget
            depth = max(self.probe, policy.width(tree.depth, keys, self.remaining))
            if depth == 0:
                return None
            return tree.cut(depth, self._node_budget(depth), self.device)
        if not self._pick_width(state, budget):
            return None
        return self._allowed(_Tree.of(drafter.propose_tree(state, nodes)))

    def _allowed(self, draft):
        """Without a grammar the draft as it is; with one, each chain cut and each tree branch pruned at
        the first token the row's grammar refuses (no forward on a draft the mask would reject)."""
        if self.grammar is None:
            return draft
        if isinstance(draft, _Tree):
            return draft.keep(self.grammar.tree_allowed(draft.host_tokens, draft.host_parents), self.device)
        host = draft.token_ids.cpu().numpy()
        cut = self.grammar.cut_chain(host, draft.num_drafted)
        if (cut == draft.num_drafted).all():
            return draft
        return _chain(host, cut, draft.probs, draft.match, self.device)

    def _forced_chain(self, b: int, own: list, own_width: int) -> tuple[list, int] | None:
        """Row b's grammar-forced drafts (``_BatchGrammar.forced``), then, with the n-gram drafter, its
        lookup continued after them (at most ``own_width`` tokens in all, the width of the row's own
        draft after the policy's cut; the whole budget when not adaptive), cut at the first refused
        token; and how many drafts from the first are certain (the only id the grammar allows).
        None when nothing is forced, or when ``own`` (the row's own chain, or its tree's first-child
        path) already starts with the forced tokens and is as long."""
        grammar, drafter = self.grammar, self.drafter
        budget = int(min(MAX_DRAFT_TOKENS, self.remaining[b] - 1))
        forced, certain = grammar.forced(b, budget) if budget > 0 else ([], 0)
        if not forced or own[: len(forced)] == forced and len(own) >= len(forced):
            return None
        cont = []
        room = budget - len(forced) if not self.opts["adaptive"] else min(own_width, budget - len(forced))
        if hasattr(drafter, "lookup") and room > 0:  # the n-gram drafter
            text = np.concatenate([self.tokens[b, : self.lengths[b]], np.asarray(forced, dtype=np.int64)])
            cont = drafter.lookup(text, room).tolist()
            cont = cont[: grammar._walk(b, forced + cont) - len(forced)]
        return forced + cont, certain

    def _forced(self, draft: Draft) -> Draft:
        """The chain step with each row's forced drafts first (``_forced_chain``). Adaptive: the batch's
        chains are cut to the policy's width, the certain drafts counted as accepted for sure (one
        row's long forced text would otherwise widen the forward of every row)."""
        host = draft.token_ids.cpu().numpy()
        num = np.asarray(draft.num_drafted, dtype=np.int64)
        rows, changed = [], False
        for b in range(len(self.live)):
            own = host[b, : num[b]].tolist()
            chain = self._forced_chain(b, own, int(num[b]))
            rows.append(own if chain is None else chain[0])
            self.certain[b] = 0 if chain is None else chain[1]
            changed |= chain is not None
        if not changed:
            return draft
        num = np.array([len(r) for r in rows], dtype=np.int64)
        if self.opts["adaptive"] and len(rows) > 1:
            policy = self.policy
            keys = policy.keys(self.sampled, draft.match, self.previous)
            width = max(self.probe, policy.width(num, keys, self.remaining, certain=self.certain))
            num = np.minimum(num, width)
            rows = [r[:n] for r, n in zip(rows, num)]
            self.certain = np.minimum(self.certain, num)
        out = np.full((len(rows), max(int(num.max()), 1)), -1, dtype=np.int64)
        for b, r in enumerate(rows):
            out[b, : len(r)] = r
        return _chain(out, num, None, draft.match, self.device)

    def _forced_tree(self, tree: _Tree) -> _Tree:
        """The tree step with forced drafts: a row whose grammar forces tokens drafts the forced chain
        (``_forced_chain``, up to the depth of its tree) as its tree, a path from the root; the other
        rows keep the drafter's tree. (The drafter's branches were proposed for the text without the
        forced tokens, so they do not hang below them.) Forced nodes have no drafter node: ``source``
        -1. Only drafters without draft probabilities draft forced tokens (n-gram, or none)."""
        tokens, parents = tree.host_tokens, tree.host_parents
        chains = {}
        for b in range(len(self.live)):
            path, node = [], -1
            while True:  # the first-child path: each node's first used child, in index order
                kids = np.flatnonzero((parents[b] == node) & (tokens[b] >= 0))
                if not len(kids):
                    break
                node = int(kids[0])
                path.append(int(tokens[b, node]))
            chain = self._forced_chain(b, path, int(tree.depth[b]))
            if chain is not None:
                chains[b] = chain[0]
                self.certain[b] = chain[1]
        if not chains:
            return tree
        N = max(tokens.shape[1], max(len(c) for c in chains.values()))
        pad = ((0, 0), (0, N - tokens.shape[1]))
        new_tokens = np.pad(tokens, pad, constant_values=-1)
        new_parents = np.pad(parents, pad, constant_values=-1)
        depth = np.pad(tree.node_depth, pad, constant_values=-1)
        source = np.pad(np.tile(np.arange(tokens.shape[1]), (len(tokens), 1)) if tree.source is None else tree.source,
                        pad, constant_values=-1)
        share = None if tree.share is None else np.pad(tree.share, pad)
        for b, chain in chains.items():
            n = len(chain)
            new_tokens[b], new_parents[b], depth[b], source[b] = -1, -1, -1, -1
            new_tokens[b, :n], new_parents[b, :n], depth[b, :n] = chain, np.arange(n) - 1, np.arange(n)
            if share is not None:
                share[b], share[b, :n] = 0.0, 1.0
        dev = self.device
        return _Tree(torch.from_numpy(new_tokens).to(dev), torch.from_numpy(new_parents).to(dev), None, tree.match,
                     new_tokens, new_parents, depth, share, source)

    def _pick_width(self, state: DraftState, budget: np.ndarray) -> bool:
        """For a drafter that runs a model per drafted position: the policy picks the width before
        proposing (``state.max_drafts``); False when it picks none."""
        policy = self.policy
        self.available = budget
        self.width = max(self.probe, policy.width(budget, policy.keys(self.sampled, None, self.previous),
                                                  self.remaining))
        if self.width == 0:
            return False
        state.max_drafts = np.minimum(budget, self.width)
        return True

    def _node_budget(self, depth: int) -> int:
        """Nodes a tree of this depth may have: side branches may add up to TREE_COST_SLACK to the
        predicted cost of the forward over the main path alone (the cost model's: on a CPU past its
        knee every node costs; on a GPU, below the compute knee, nodes are nearly free)."""
        batch, cost = len(self.live), self.policy.cost
        limit = (1.0 + TREE_COST_SLACK) * cost.predict(batch * (depth + 1))
        n = depth
        while n < self.gen.max_tree_nodes and cost.predict(batch * (n + 2)) <= limit:
            n += 1
        return n

    # -- 2. target forward ------------------------------------------------------------------------

    def forward(self, draft: Draft) -> torch.Tensor:
        """Target logits [B, K+1, V] at the pending token and each draft (one cached forward). The
        first step is the prefill: every row's prompt (after a shared prefix; left padded), then its
        drafts."""
        cache, layout, target = self.cache, self.layout, self.target
        k = draft.token_ids.shape[1]
        drafts = draft.token_ids.clamp_min(0)
        if isinstance(draft, _Tree):  # every node attends the prefix and its ancestors only
            valid = draft.token_ids >= 0
            ids = torch.cat([self.pending[:, None], drafts], dim=1)
            return target(input_ids=ids, position_ids=layout.tree_position_ids(cache, draft.parents, valid),
                          attention_mask=layout.tree_attention_mask(cache, draft.parents, valid),
                          use_cache=True, **cache_kwargs(target, cache)).logits
        if self.step == 0:
            prefix, width0 = layout.prefix, self.width0
            ids = np.zeros((len(self.live), width0 - prefix), dtype=np.int64)
            for b in range(len(self.live)):
                ids[b, width0 - self.lengths[b]:] = self.tokens[b, prefix: self.lengths[b]]
            ids = torch.cat([torch.from_numpy(ids).to(self.device), drafts], dim=1)
            q = width0 - prefix + k
            return target(input_ids=ids, position_ids=layout.position_ids(cache, q),
                          attention_mask=layout.attention_mask(cache, q), use_cache=True,
                          logits_to_keep=k + 1, **cache_kwargs(target, cache)).logits
        ids = torch.cat([self.pending[:, None], drafts], dim=1)
        return target(input_ids=ids, position_ids=layout.position_ids(cache, k + 1),
                      attention_mask=layout.attention_mask(cache, k + 1), use_cache=True,
                      **cache_kwargs(target, cache)).logits

    # -- 3. verify --------------------------------------------------------------------------------

    def verify(self, logits: torch.Tensor, draft: Draft) -> _Verdict:
        """The fused op over the live rows, then the step's one host copy of its result."""
        from specdec import ops

        opts = self.opts
        probs = draft.probs if self.sampled else None
        mask = None
        if self.grammar is not None:  # the target restricted to each position's allowed ids (in the op)
            if isinstance(draft, _Tree):
                mask = self.grammar.tree_masks(draft.host_tokens, draft.host_parents)
            else:
                mask = self.grammar.chain_masks(draft.token_ids.cpu().numpy())
        want = opts["logprobs"]
        args = dict(temperature=opts["temperature"], top_k=opts["top_k"], top_p=opts["top_p"], seed=self.seeds,
                    offset=self.offsets, backend=self.gen.backend, return_logprobs=want, token_bitmask=mask)
        if isinstance(draft, _Tree):
            D = int(draft.depth.max(initial=0))
            out_ids, num_acc, nodes, *lp = ops.verify_tree(logits, draft.token_ids, draft.parents, probs,
                                                           max_depth=D, **args)
            host = torch.cat([out_ids, num_acc[:, None].long(), nodes.long()], dim=1).cpu().numpy()  # the one sync
            return _Verdict(out_ids, num_acc, host[:, : D + 2], nodes, host[:, D + 2:], self._host_logprobs(lp))
        out_ids, num_acc, *lp = ops.verify(logits, draft.token_ids, probs, method=opts["verify_method"], **args)
        host = torch.cat([out_ids, num_acc[:, None].long()], dim=1).cpu().numpy()  # the one sync
        return _Verdict(out_ids, num_acc, host, logprobs=self._host_logprobs(lp))

    @staticmethod
    def _host_logprobs(lp: list) -> np.ndarray | None:
        # copied after the step's one sync: the values are ready, nothing more waits
        return torch.stack(lp, dim=-1).cpu().numpy() if lp else None

    # -- 4. commit --------------------------------------------------------------------------------

    def commit(self, draft: Draft, verdict: _Verdict) -> None:
        """Keep what was accepted: cache rollback, pending tokens and offsets, drafter state, the
        policy's and the stats' counts, tokens and callbacks per row; finished rows leave."""
        k = draft.token_ids.shape[1]
        accepted = verdict.host[:, -1]
        # the cache keeps pending + accepted drafts; the emitted last token becomes the new pending
        # one (the host copy of the new lengths comes from the verdict: nothing waits)
        self.pending = verdict.out_ids.gather(1, verdict.num_accepted[:, None].long()).squeeze(1)
        self.offsets = self.offsets + verdict.num_accepted.long() + 1  # live rows keep all n + 1 tokens
        new_host = self.cache.store.host_lengths - k + torch.from_numpy(accepted)
        if isinstance(draft, _Tree):  # keep the root and the accepted path, moved next to the prefix
            self.cache.compact_tree(verdict.accepted_nodes, verdict.num_accepted, num_nodes=k, host_lengths=new_host)
        else:
            self.cache.rollback(self.cache.lengths - k + verdict.num_accepted, host_lengths=new_host)
        t2 = time.perf_counter()
        if isinstance(draft, _Tree):
            self.drafter.accept_tree(draft.drafter_nodes(verdict.host_nodes), accepted)
        elif k > 0 and self.drafter is not None:  # (grammar-forced drafts need no drafter)
            self.drafter.accept(accepted)
        t3 = time.perf_counter()
        leaf = draft.leaf_stop(verdict.host_nodes, accepted) if isinstance(draft, _Tree) else None
        self._count(draft, accepted, leaf, k, t2, t3)
        keep = self._emit(draft, verdict.host, accepted, leaf, verdict.logprobs)
        self.step += 1
        if len(keep) < len(self.live):
            self._drop_finished(keep)

    def _count(self, draft: Draft, accepted: np.ndarray, leaf: np.ndarray | None, k: int, t2: float,
               t3: float) -> None:
        stats, policy, adaptive = self.stats, self.policy, self.opts["adaptive"]
        stats.drafter_time += (self.t1 - self.t0) + (t3 - t2)
        if self.step == 0:
            stats.prefill_time = t2 - self.t_start
        else:
            stats.target_time += t2 - self.t1
            policy.cost.observe(len(self.live) * (k + 1), t2 - self.t1)
            if adaptive and self.drafter is not None and not self.drafter.cheap:
                policy.observe_draft_time(self.width, self.t1 - self.t0)
        # a tree counts like a chain as deep as its longest path (the policy's width is a depth)
        depth = draft.depth if isinstance(draft, _Tree) else draft.num_drafted
        if adaptive and self.drafter is not None:
            keys = policy.keys(self.sampled, draft.match, self.previous)
            # a path accepted to a leaf had nothing deeper to try: no rejection at the next depth,
            # though another branch goes deeper (for a chain that is "all accepted")
            # certain (grammar-forced) drafts say nothing about the row class's acceptance: not counted
            tried = depth if leaf is None else np.where(leaf, accepted, depth)
            sure = np.minimum(self.certain, accepted)
            self.previous = policy.observe(keys, tried - sure, accepted - sure)
        drafted = draft.num_drafted
        self.idle = np.where(drafted > 0, 0, self.idle + (self.available > 0))
        stats.target_steps += 1
        stats.row_steps += len(self.live)
        stats.drafted_tokens += int(depth.sum())
        stats.draft_nodes += int(draft.num_drafted.sum())
        stats.tree_steps += isinstance(draft, _Tree)
        stats.accepted_tokens += int(accepted.sum())
        stats._count_positions(depth, accepted)

    def _emit(self, draft: Draft, host: np.ndarray, accepted: np.ndarray, leaf: np.ndarray | None,
              logprobs: np.ndarray | None) -> list:
        """Append each row's emitted tokens (cut at EOS and the length limit) and, when asked, their
        logprobs (cut the same way), call the callback; returns the batch rows that go on."""
        keep, emitted_total, callback = [], 0, self.opts["callback"]
        drafted = draft.num_drafted
        for b in range(len(self.live)):
            n = int(accepted[b])
            emitted = host[b, : n + 1]
            finished = False
            if emitted[-1] < 0:  # no finite logit: the row cannot continue
                emitted, finished, self.reasons[self.live[b]] = emitted[:0], True, "error"
            emitted = emitted[: self.remaining[b]]
            if self.eos:
                hits = [i for i, t in enumerate(emitted.tolist()) if t in self.eos]
                if hits:
                    emitted, finished, self.reasons[self.live[b]] = emitted[: hits[0] + 1], True, "eos"
            if self.grammar is not None and len(emitted) and self.grammar.advance(b, emitted):
                finished, self.reasons[self.live[b]] = True, "eos"  # the grammar is complete: a stop token
            m = len(emitted)
            self.tokens[b, self.lengths[b]: self.lengths[b] + m] = emitted
            self.lengths[b] += m
            self.out_tokens[self.live[b]].extend(emitted.tolist())
            pairs = None
            if logprobs is not None:
                pairs = [tuple(p) for p in logprobs[b, :m].tolist()]
                self.out_logprobs[self.live[b]].extend(pairs)
            emitted_total += m
            if self.lengths[b] - self.prompt_lengths[b] >= self.max_new:
                finished = True
            if callback is not None:
                callback(Chunk(self.user_index[self.live[b]], emitted.tolist(), min(n, m),
                               int(drafted[b]), finished, None if leaf is None else bool(leaf[b]), pairs))
            if not finished:
                keep.append(b)
        self.stats.generated_tokens += emitted_total
        if self.bar is not None:
            self.bar.update(emitted_total)
        return keep

    def _drop_finished(self, keep: list) -> None:
        self.live = [self.live[b] for b in keep]
        if not self.live:
            return
        index = torch.tensor(keep, dtype=torch.int64)
        dev_index = index.to(self.device)
        self.cache.select_rows(dev_index, host_index=index)
        self.layout.select(index)
        if self.drafter is not None and self.started:
            self.drafter.select_rows(index)
        if self.grammar is not None:
            self.grammar.select(keep)
        index_np = np.asarray(keep)
        self.tokens, self.lengths = self.tokens[index_np], self.lengths[index_np]
        self.prompt_lengths, self.previous = self.prompt_lengths[index_np], self.previous[index_np]
        self.idle = self.idle[index_np]
        self.seeds, self.offsets, self.pending = self.seeds[dev_index], self.offsets[dev_index], self.pending[dev_index]


def _chain(host: np.ndarray, num: np.ndarray, probs, match, device) -> Draft:
    """A Draft of the chains ``host[b, :num[b]]`` ([B, K] host ids; -1 past each row's length)."""
    width = int(num.max(initial=0))
    cols = np.arange(width)[None, :]
    ids = np.where(cols < num[:, None], host[:, :width], -1)
    if probs is not None:
        probs = probs[:, :width]
    return Draft(torch.from_numpy(np.ascontiguousarray(ids)).to(device, non_blocking=True), probs, num, match)
