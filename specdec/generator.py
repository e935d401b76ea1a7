"""Batched speculative generation over Hugging Face causal LMs.

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

Draft length. A forward over q positions of B rows costs more than one over 1 position, by a factor
that depends on the device and the batch (on a 2-core CPU, q=11 costs ~2x q=1 at B=1 but ~3.6x
at B=8), so no fixed K is right everywhere. With ``adaptive=True`` (default) a
:class:`DraftLengthPolicy` picks each step's width w <= K (the forward's q = w + 1) that minimises
the projected time to finish the batch (at batch 1: the most tokens per second), from two online
estimates: :class:`AcceptanceModel` (per class of row: the drafter's match class and the row's
previous outcome, the probability that draft i is accepted) and :class:`ForwardCostModel` (measured
forward times against the tokens processed, B * q). Every row drafts up to w tokens
(padding positions of a narrower row cost the same). ``adaptive=False`` drafts K every step (a row
with a shorter proposal drafts fewer).

Trees. With a drafter that proposes trees (``tree=None``/True) every step after the prefill
verifies a tree of drafts (``specdec.ops.verify_tree``, the cache keeps the accepted path). For an
n-gram tree the policy keeps, per row, the n nodes most likely to be accepted (estimated as the row
class's survival at the node's depth times the node's share of the matched occurrences), with n
chosen for the most expected tokens per predicted second (:meth:`DraftLengthPolicy.tree_nodes`); a
model drafter's tree is cut to the depth the policy picks for a chain.

Exactness does not depend on the draft lengths: the drafts are chosen before the step's random
numbers are drawn, so greedy rows emit the target's greedy tokens and sampled rows the target's
distribution whatever the policy.

Seeding. Every random number is keyed by the row's seed and the absolute index of the token it
decides (``offset`` = the row's length, for the drafter's samples and for verification), never by
the step. With a deterministic drafter (n-gram / prompt lookup, or no drafter)
verification is "sample and compare": each emitted token is the target's own sample at its index,
so a seeded sampled row's text is exactly the text of plain sampling with that seed: the same with
or without a drafter, for any K, adaptive or not, in any batch and on every call. With a model
drafter that samples (draft probabilities, q) the distribution is exact and the text is reproducible
for a fixed seed and a fixed K (``adaptive=False``) in any batch; the width policy changes which
positions are drafted, hence the text (not its distribution). Rows compared across batches differ
only where batched arithmetic rounds a near-tie differently.
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from specdec.drafters import Draft, Drafter, DraftState, make_drafter
from specdec.drafters.base import _tree_depths
from specdec.linear import narrow_linears
from specdec.models import check_compatible, model_vocab_size

_DRAFTER_NAMES = ("ngram", "n-gram", "prompt-lookup", "early-exit", "earlyexit", "self", "none")
MAX_DRAFT_TOKENS = 32  # cap for K
GROW_STEP = 256  # new tokens the caches have room for at first; they double as rows grow
TREE_COST_SLACK = 0.25  # adaptive trees: side branches may add this much to a forward's predicted cost
# a row that could have drafted but was given nothing this many steps in a row gets a probe of one draft
# (or node): no drafts means no new acceptance counts for its class, and a measured cost spike or an
# unlucky class estimate would otherwise keep it from drafting for good
EXPLORE_AFTER = 8


class ForwardCostModel:
    """Online estimate of one target forward's wall time against the tokens it processes, N = B * q.

    Keeps an exponential moving average of the measured seconds for every N seen. ``predict(N)``
    multiplies a prior shape, ``1 + N / knee`` (the fixed cost of reading the weights plus a per-token
    cost; ``knee`` = 16 tokens on CPU, 256 on GPU), by the measured/prior ratio interpolated between
    the nearest measured N below and above (or taken from the nearest one outside that range): a
    measured N predicts its own average. Only ratios of predictions matter to the policy, so the unit
    is irrelevant before any measurement.

    ``fixed``: a function of N giving the seconds (or any unit) of a forward; measurements are then
    ignored, and the policy's widths depend only on its inputs and the acceptance outcomes, never on
    timing (reproducible statistics, tests). ``fixed="prior"`` uses the prior shape.
    """

    def __init__(self, device_type: str = "cpu", *, knee: float | None = None, alpha: float = 0.3,
                 fixed: Callable | str | None = None):
        self.knee = float(knee if knee is not None else (16.0 if device_type == "cpu" else 256.0))
        self.alpha = alpha
        self.fixed = self.prior if fixed == "prior" else fixed
        if self.fixed is not None and not callable(self.fixed):
            raise TypeError(f"fixed must be a function of the token count, 'prior' or None, got {fixed!r}")
        self.seconds: dict[int, float] = {}
        self._keys: list[int] = []
        self._ratios = np.empty(0)

    def prior(self, n):
        return 1.0 + n / self.knee

    def observe(self, n: int, seconds: float) -> None:
        if self.fixed is not None:
            return
        old = self.seconds.get(n)
        if old is None:
            self._keys = sorted([*self.seconds, n])
            self.seconds[n] = seconds
        else:
            self.seconds[n] = old + self.alpha * (seconds - old)
        self._ratios = np.array([self.seconds[k] / self.prior(k) for k in self._keys])

    def predict(self, n):
        """Predicted seconds (arbitrary units before any measurement) for ``n`` tokens: int or array."""
        n = np.asarray(n, dtype=np.float64)
        if self.fixed is not None:
            out = np.vectorize(self.fixed, otypes=[np.float64])(n)
        elif not self._keys:
            out = self.prior(n)
        else:  # np.interp holds the end ratios outside the measured range
            out = np.interp(n, self._keys, self._ratios) * self.prior(n)
        return float(out) if out.ndim == 0 else out


class AcceptanceModel:
    """Online estimate of how many drafts a row accepts, per class of row.

    For each class key and draft position i it counts how often position i was reached (drafted,
    with every draft before it accepted) and accepted there. The conditional acceptance rate at i is
    ``(accepted_i + weight * rate_{i-1}) / (reached_i + weight)``, with ``rate_{-1} = prior``: a
    position seldom reached borrows the rate of the one before it, so a class that accepts its first
    drafts keeps a hopeful estimate of the deeper ones until they are tried. ``survival(key)[i]``, the
    probability of accepting more than i drafts, is the running product of the rates.
    """

    def __init__(self, max_drafts: int = MAX_DRAFT_TOKENS, *, prior: float = 0.5, weight: float = 2.0):
        self.max_drafts, self.prior, self.weight = max_drafts, prior, weight
        self.counts: dict = {}  # key -> [accepted [K], reached [K]] float64
        self._cache: dict = {}

    def survival(self, key) -> np.ndarray:
        out = self._cache.get(key)
        if out is None:
            t = self.counts.get(key)
            rates = np.empty(self.max_drafts)
            rate, w = self.prior, self.weight
            for i in range(self.max_drafts):
                if t is not None:
                    rate = (t[0][i] + w * rate) / (t[1][i] + w)
                rates[i] = rate
            out = self._cache[key] = np.cumprod(rates)
        return out

    def observe(self, key, drafted: int, accepted: int) -> None:
        """One row's step: ``drafted`` drafts, the first ``accepted`` of them accepted."""
        if drafted <= 0:
            return
        t = self.counts.get(key)
        if t is None:
            t = self.counts[key] = [np.zeros(self.max_drafts), np.zeros(self.max_drafts)]
        reached = min(accepted + 1, drafted)  # positions 0..accepted were tried (the last one failed)
        t[1][:reached] += 1
        t[0][:accepted] += 1
        self._cache.pop(key, None)


class DraftLengthPolicy:
    """Chooses each step's draft width w (the forward's q = w + 1) for the whole batch.

    Row b is expected to emit ``E_b(w) = 1 + sum_{i < min(w, available_b)} survival_b[i]`` tokens
    (:class:`AcceptanceModel`, keyed by the row's class), so at width w it needs about
    ``S_b(w) = remaining_b / E_b(w)`` more steps. Holding w, the batch shrinks as rows finish: after
    the i-th shortest ``S`` only ``B - i`` rows remain. The policy picks the w in
    ``0..max(available)`` that minimises the projected time to finish the batch,

        sum over those intervals of  (interval steps) * (cost((rows left) * (w + 1)) + w * draft_cost)

    with ``cost`` the :class:`ForwardCostModel` prediction and ``draft_cost`` the measured seconds per
    draft position of a drafter that runs a model (0 for the n-gram drafter), and decides again at
    the next step. At batch 1 this is the most tokens per second; at larger batches it does not pay
    for long drafts of rows that will finish first anyway while the others still need their steps
    (on a CPU, where every drafted position costs B tokens of compute).

    Row classes: ``(sampled, match class, previous outcome)`` with the previous outcome 0 = no drafts
    last step, 1 = none accepted, 2 = some, 3 = all.

    The policy has no randomness: given the same inputs, outcomes and measured costs it picks the
    same widths. Measured costs vary from run to run, so for statistics that must not depend on
    timing pass ``forward_cost`` (a function of the tokens of a forward, or "prior") and, for model
    drafters, ``draft_cost`` (per drafted position, in the same unit): nothing is then measured.
    """

    NO_DRAFT, REJECTED, PARTIAL, ALL = 0, 1, 2, 3

    def __init__(self, device_type: str = "cpu", *, forward_cost: Callable | str | None = None,
                 draft_cost: float | None = None):
        self.cost = ForwardCostModel(device_type, fixed=forward_cost)
        self.acceptance = AcceptanceModel()
        self.fixed_draft_cost = draft_cost is not None
        self.draft_cost = float(draft_cost or 0.0)  # seconds per draft position (EMA), model drafters only

    @staticmethod
    def keys(sampled: bool, match: np.ndarray | None, previous: np.ndarray) -> np.ndarray:
        m = np.zeros_like(previous) if match is None else np.minimum(match, 9)
        return int(sampled) * 100 + m * 10 + previous

    def expected_tokens(self, available: np.ndarray, keys: np.ndarray, top: int) -> np.ndarray:
        """``[B, top + 1]``: row b's expected emitted tokens at widths ``0..top``."""
        ws = np.arange(top + 1)
        out = np.empty((available.shape[0], top + 1))
        for key in np.unique(keys):
            cum = np.concatenate([[0.0], np.cumsum(self.acceptance.survival(int(key))[:top])])
            rows = keys == key
            out[rows] = 1.0 + cum[np.minimum(ws[None, :], np.minimum(available[rows], top)[:, None])]
        return out

    def width(self, available: np.ndarray, keys: np.ndarray, remaining: np.ndarray | None = None) -> int:
        """The width for rows with ``available[b]`` possible drafts, class ``keys[b]`` and ``remaining[b]``
        tokens still to generate (default: the same for every row)."""
        batch = available.shape[0]
        top = int(min(available.max(initial=0), self.acceptance.max_drafts))
        if batch == 0 or top == 0:
            return 0
        if remaining is None:
            remaining = np.ones(batch)
        steps = np.maximum(remaining, 1)[:, None] / self.expected_tokens(available, keys, top)  # [B, W+1]
        steps = np.sort(steps, axis=0)
        intervals = np.diff(steps, axis=0, prepend=0.0)  # steps during which B - i rows remain
        ws = np.arange(top + 1)
        rows_left = batch - np.arange(batch)
        step_cost = self.cost.predict(rows_left[:, None] * (ws[None, :] + 1)) + ws[None, :] * self.draft_cost
        return int(np.argmin((intervals * step_cost).sum(axis=0)))

    def tree_nodes(self, node_depth: np.ndarray, share: np.ndarray, keys: np.ndarray, min_nodes: int = 0) -> np.ndarray:
        """[B, N] bool: the nodes of the proposed trees worth verifying this step.

        node_depth [B, N] int (-1 = unused slot), share [B, N] float (the drafter's evidence share per
        node, ``DraftTree.host_share``), keys [B] (row classes, :meth:`keys`). Node i of row b is on the
        accepted path with probability about ``P = survival_b[depth_i] * share_i``: the row class's
        chance to accept more than depth_i drafts, split between the nodes of that depth as the
        drafter's evidence is. Each row's nodes are ranked by P (index order on ties: parents first,
        as P never grows from parent to child, so every prefix of the ranking is a tree), and the
        policy keeps each row's n best, with the n in 0..N that maximises the expected tokens per
        predicted second of the step, ``sum_b (1 + sum of row b's n best P) / cost(B * (n + 1))``.
        Where a forward over one more token costs little (a GPU below its knee), that is every node
        worth anything; on a CPU only the likely ones. ``min_nodes``: keep at least that many (a probe).
        """
        B, N = node_depth.shape
        used = node_depth >= 0
        if N == 0 or not used.any():
            return used
        top = min(N, self.acceptance.max_drafts)
        P = np.full((B, N), -1.0)
        for key in np.unique(keys):
            rows = keys == key
            surv = self.acceptance.survival(int(key))
            d = np.clip(node_depth[rows], 0, top - 1)
            P[rows] = np.where(used[rows] & (node_depth[rows] < top), surv[d] * share[rows], -1.0)
        order = np.argsort(-P, axis=1, kind="stable")
        ranked = np.take_along_axis(P, order, axis=1)
        gain = 1.0 + np.concatenate([np.zeros((B, 1)), np.cumsum(np.maximum(ranked, 0.0), axis=1)], axis=1)
        ns = np.arange(N + 1)
        rate = gain.sum(0) / self.cost.predict(B * (ns + 1))
        n = max(int(np.argmax(rate)), min(min_nodes, N))
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(N)[None, :].repeat(B, 0), axis=1)
        return used & (rank < n) & (P >= 0)

    def observe(self, keys: np.ndarray, drafted: np.ndarray, accepted: np.ndarray) -> np.ndarray:
        """Count one step's outcomes; returns each row's previous-outcome code for the next step."""
        previous = np.full(drafted.shape[0], self.NO_DRAFT, dtype=np.int64)
        for b in np.flatnonzero(drafted):
            d, a = int(drafted[b]), int(min(accepted[b], drafted[b]))
            self.acceptance.observe(int(keys[b]), d, a)
            previous[b] = self.ALL if a == d else (self.REJECTED if a == 0 else self.PARTIAL)
        return previous

    def observe_draft_time(self, width: int, seconds: float) -> None:
        if width > 0 and not self.fixed_draft_cost:
            per = seconds / width
            self.draft_cost = per if self.draft_cost == 0 else self.draft_cost + 0.3 * (per - self.draft_cost)


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


class Chunk(NamedTuple):
    """What one step emitted for one row, passed to the streaming callback.

    ``token_ids[:num_accepted]`` are accepted drafts; the last id is the target's own token
    (``is_bonus``: no draft was rejected where it was drawn, i.e. every draft of a chain was
    accepted, or a tree's accepted path ended at a leaf; else a resample after a rejection).
    ``num_drafted``: the row's drafts this step (a tree's nodes). ``row`` is the prompt's index in
    the caller's list.
    """

    row: int
    token_ids: list
    num_accepted: int
    num_drafted: int
    finished: bool
    leaf: bool | None = None  # tree steps: the accepted path ended at a node without children

    @property
    def is_bonus(self) -> bool:
        if self.leaf is not None:
            return self.leaf
        return self.num_accepted == self.num_drafted


@dataclass
class GenerationStats:
    """Counters of one ``generate`` call. Times in seconds, measured after device synchronisation."""

    num_sequences: int = 0
    generated_tokens: int = 0  # tokens emitted (EOS included), not characters
    target_steps: int = 0  # batched target forwards, the prefill included (it verifies drafts and emits too)
    row_steps: int = 0  # sum over target steps of the live rows
    drafted_tokens: int = 0  # draft positions: a tree counts its deepest path (acceptance = accepted / this)
    accepted_tokens: int = 0
    draft_nodes: int = 0  # tokens drafted and sent through the target: a tree's nodes, a chain's drafts
    tree_steps: int = 0  # target steps that verified trees
    drafted_per_position: list = field(default_factory=list)  # [i]: drafts at position i
    accepted_per_position: list = field(default_factory=list)  # [i]: of those, accepted
    prefill_time: float = 0.0  # the first forward (prompts + drafts from them) and its verification
    target_time: float = 0.0  # the later target forwards + verification
    drafter_time: float = 0.0  # drafter prefill + proposals + rollbacks
    total_time: float = 0.0
    drafter: str = ""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens a row gains per target forward, the prefill included (1.0 = plain decoding)."""
        return self.generated_tokens / self.row_steps if self.row_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.total_time if self.total_time > 0 else 0.0

    @property
    def position_acceptance(self) -> list:
        """Acceptance rate at draft position i (given the draft reached position i)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    def _count_positions(self, drafted: np.ndarray, accepted: np.ndarray) -> None:
        width = int(drafted.max()) if drafted.size else 0
        if width > len(self.drafted_per_position):
            grow = width - len(self.drafted_per_position)
            self.drafted_per_position += [0] * grow
            self.accepted_per_position += [0] * grow
        for i in range(width):
            self.drafted_per_position[i] += int((drafted > i).sum())
            self.accepted_per_position[i] += int((accepted > i).sum())

    def merge(self, other: "GenerationStats") -> None:
        for name in ("num_sequences", "generated_tokens", "target_steps", "row_steps", "drafted_tokens",
                     "accepted_tokens", "draft_nodes", "tree_steps", "prefill_time", "target_time", "drafter_time", "total_time"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        n = max(len(self.drafted_per_position), len(other.drafted_per_position))
        pad = lambda xs: xs + [0] * (n - len(xs))  # noqa: E731
        self.drafted_per_position = [a + b for a, b in zip(pad(self.drafted_per_position), pad(other.drafted_per_position))]
        self.accepted_per_position = [a + b for a, b in zip(pad(self.accepted_per_position), pad(other.accepted_per_position))]
        self.drafter = self.drafter or other.drafter

    def as_dict(self) -> dict:
        return {
            "drafter": self.drafter, "sequences": self.num_sequences, "generated_tokens": self.generated_tokens,
            "target_steps": self.target_steps, "tree_steps": self.tree_steps, "draft_nodes": self.draft_nodes,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "tokens_per_step": round(self.tokens_per_step, 3), "tokens_per_second": round(self.tokens_per_second, 2),
            "prefill_time_s": round(self.prefill_time, 4), "target_time_s": round(self.target_time, 4),
            "drafter_time_s": round(self.drafter_time, 4), "total_time_s": round(self.total_time, 4),
            "position_acceptance": [round(x, 3) for x in self.position_acceptance],
        }

    def summary(self) -> str:
        # counts next to rates: 1.00 from one draft is not 0.86 from fifty
        hist = " ".join(f"{a}/{d}" for a, d in zip(self.accepted_per_position[:16], self.drafted_per_position[:16]) if d)
        return (
            f"drafter {self.drafter or 'none'}: {self.generated_tokens} tokens in {self.total_time:.2f} s "
            f"= {self.tokens_per_second:.1f} tokens/s; acceptance {self.acceptance_rate:.1%} "
            f"({self.accepted_tokens}/{self.drafted_tokens}), {self.tokens_per_step:.2f} tokens per target step"
            + (f" ({self.tree_steps} tree steps, {self.draft_nodes} nodes)" if self.tree_steps else "") + "; "
            f"time: prefill {self.prefill_time:.2f} s, target {self.target_time:.2f} s, drafter {self.drafter_time:.2f} s"
            + (f"\naccepted/drafted by draft position: {hist}" if hist else "")
        )


@dataclass
class GenerationResult:
    """sequences[i]: the generated token ids of prompt i (EOS included when hit), in input order;
    prompt_ids[i]: its prompt ids; texts[i]: decoded ``sequences[i]`` when a tokenizer is known;
    finish_reasons[i]: "eos", "length" or "error" (the target produced no finite logit)."""

    sequences: list
    prompt_ids: list
    finish_reasons: list
    stats: GenerationStats
    texts: list | None = None


def encode_prompt(tokenizer, text: str, chat: bool | None = None) -> list:
    """Token ids of one text prompt. ``chat=None`` (default): wrapped as a user turn in the
    tokenizer's chat template when it has one (what instruct models expect; the CLI does the same),
    raw otherwise; ``chat=False``: raw completion; ``chat=True``: the template, or an error."""
    template = getattr(tokenizer, "chat_template", None)
    if chat is None:
        chat = bool(template)
    if chat:
        if not template:
            raise ValueError("chat=True, but the tokenizer has no chat template: pass chat=False")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


class _Verdict(NamedTuple):
    """What verification decided for the live rows of one step."""

    out_ids: torch.Tensor  # [B, K+1] int64 device: accepted drafts, the emitted token, -1
    num_accepted: torch.Tensor  # [B] int32 device
    host: np.ndarray  # [B, K+2] int64: out_ids and num_accepted, the step's one host copy
    accepted_nodes: torch.Tensor | None = None  # tree steps: [B, D] int64 device, the accepted path
    host_nodes: np.ndarray | None = None  # ... and its host copy


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


class _BatchRun:
    """The state of one batch during generation and the four parts of a step.

    Host side: each row's tokens (prompt + generated) and length, which rows are live; device side:
    the target's RaggedCache, each row's pending token (emitted, not yet in the cache), seed and
    Philox offset (its token index). A step reads top to bottom in ``_generate_batch``:
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

        cache, layout = None, _PaddedLayout()
        prefix = _common_prefix(rows) if batch > 1 and gen.share_prefix else 0
        drafter = self.drafter
        if prefix >= MIN_SHARED_PREFIX and not (drafter is not None and drafter.needs_target_cache):
            cache = RaggedCache.from_model(self.target, batch_size=1, max_length=capacity)
            if cache.sliding_window is None:  # the holes would shift the window
                ids = torch.tensor([rows[0][:prefix]], dtype=torch.int64, device=device)
                self.target(input_ids=ids, position_ids=cache.position_ids(prefix),
                            attention_mask=cache.attention_mask(prefix), past_key_values=cache, use_cache=True,
                            logits_to_keep=1)
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
            if self.gen._tree_step(self.step):
                draft = self._draft_tree(state, budget)
            elif not opts["adaptive"]:
                draft = drafter.propose(state)
            elif drafter.cheap:  # propose the longest drafts, then cut them to the policy's width
                draft = drafter.propose(state)
                keys = policy.keys(self.sampled, draft.match, self.previous)
                self.available = draft.num_drafted
                draft = draft.truncate(max(self.probe, policy.width(draft.num_drafted, keys, remaining)))
            else:  # pick the width first: proposing runs the drafter model once per position
                self.available = budget
                self.width = max(self.probe, policy.width(budget, policy.keys(self.sampled, None, self.previous),
                                                          remaining))
                if self.width > 0:
                    state.max_drafts = np.minimum(budget, self.width)
                    draft = drafter.propose(state)
            _sync(self.device)
        if draft is None:
            draft = Draft(torch.empty(len(self.live), 0, dtype=torch.int64, device=self.device), None,
                          np.zeros(len(self.live), dtype=np.int64))
        self.t1 = time.perf_counter()
        return draft

    def _draft_tree(self, state: DraftState, budget: np.ndarray) -> "_Tree | None":
        """A tree of drafts (the drafter's ``propose_tree``, up to ``max_tree_nodes`` nodes). Adaptive:
        a cheap drafter's tree with node shares (n-gram) keeps the nodes ``policy.tree_nodes`` picks;
        otherwise the policy picks the depth as it picks a chain's width, from the rows' deepest
        paths. The forward over N + 1 positions per row is what its cost model measures."""
        drafter, policy, nodes = self.drafter, self.policy, self.gen.max_tree_nodes
        if not self.opts["adaptive"]:
            return _Tree.of(drafter.propose_tree(state, nodes))
        if drafter.cheap:  # propose the full tree, keep what the policy picks
            tree = _Tree.of(drafter.propose_tree(state, nodes))
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
        self.available = budget
        self.width = max(self.probe, policy.width(budget, policy.keys(self.sampled, None, self.previous),
                                                  self.remaining))
        if self.width == 0:
            return None
        state.max_drafts = np.minimum(budget, self.width)
        return _Tree.of(drafter.propose_tree(state, nodes))

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
                          past_key_values=cache, use_cache=True).logits
        if self.step == 0:
            prefix, width0 = layout.prefix, self.width0
            ids = np.zeros((len(self.live), width0 - prefix), dtype=np.int64)
            for b in range(len(self.live)):
                ids[b, width0 - self.lengths[b]:] = self.tokens[b, prefix: self.lengths[b]]
            ids = torch.cat([torch.from_numpy(ids).to(self.device), drafts], dim=1)
            q = width0 - prefix + k
            return target(input_ids=ids, position_ids=layout.position_ids(cache, q),
                          attention_mask=layout.attention_mask(cache, q), past_key_values=cache,
                          use_cache=True, logits_to_keep=k + 1).logits
        ids = torch.cat([self.pending[:, None], drafts], dim=1)
        return target(input_ids=ids, position_ids=layout.position_ids(cache, k + 1),
                      attention_mask=layout.attention_mask(cache, k + 1), past_key_values=cache,
                      use_cache=True).logits

    # -- 3. verify --------------------------------------------------------------------------------

    def verify(self, logits: torch.Tensor, draft: Draft) -> _Verdict:
        """The fused op over the live rows, then the step's one host copy of its result."""
        from specdec import ops

        opts = self.opts
        probs = draft.probs if self.sampled else None
        if isinstance(draft, _Tree):
            D = int(draft.depth.max(initial=0))
            out_ids, num_acc, nodes = ops.verify_tree(
                logits, draft.token_ids, draft.parents, probs, temperature=opts["temperature"], top_k=opts["top_k"],
                top_p=opts["top_p"], seed=self.seeds, offset=self.offsets, max_depth=D, backend=self.gen.backend)
            host = torch.cat([out_ids, num_acc[:, None].long(), nodes.long()], dim=1).cpu().numpy()  # the one sync
            return _Verdict(out_ids, num_acc, host[:, : D + 2], nodes, host[:, D + 2:])
        out_ids, num_acc = ops.verify(logits, draft.token_ids, probs, temperature=opts["temperature"],
                                      top_k=opts["top_k"], top_p=opts["top_p"], seed=self.seeds,
                                      offset=self.offsets, backend=self.gen.backend)
        host = torch.cat([out_ids, num_acc[:, None].long()], dim=1).cpu().numpy()  # the one sync
        return _Verdict(out_ids, num_acc, host)

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
        elif k > 0:
            self.drafter.accept(accepted)
        t3 = time.perf_counter()
        leaf = draft.leaf_stop(verdict.host_nodes, accepted) if isinstance(draft, _Tree) else None
        self._count(draft, accepted, leaf, k, t2, t3)
        keep = self._emit(draft, verdict.host, accepted, leaf)
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
            self.previous = policy.observe(keys, depth if leaf is None else np.where(leaf, accepted, depth), accepted)
        drafted = draft.num_drafted
        self.idle = np.where(drafted > 0, 0, self.idle + (self.available > 0))
        stats.target_steps += 1
        stats.row_steps += len(self.live)
        stats.drafted_tokens += int(depth.sum())
        stats.draft_nodes += int(draft.num_drafted.sum())
        stats.tree_steps += isinstance(draft, _Tree)
        stats.accepted_tokens += int(accepted.sum())
        stats._count_positions(depth, accepted)

    def _emit(self, draft: Draft, host: np.ndarray, accepted: np.ndarray, leaf: np.ndarray | None) -> list:
        """Append each row's emitted tokens (cut at EOS and the length limit), call the callback;
        returns the batch rows that go on."""
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
            m = len(emitted)
            self.tokens[b, self.lengths[b]: self.lengths[b] + m] = emitted
            self.lengths[b] += m
            self.out_tokens[self.live[b]].extend(emitted.tolist())
            emitted_total += m
            if self.lengths[b] - self.prompt_lengths[b] >= self.max_new:
                finished = True
            if callback is not None:
                callback(Chunk(self.user_index[self.live[b]], emitted.tolist(), min(n, m),
                               int(drafted[b]), finished, None if leaf is None else bool(leaf[b])))
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
        index_np = np.asarray(keep)
        self.tokens, self.lengths = self.tokens[index_np], self.lengths[index_np]
        self.prompt_lengths, self.previous = self.prompt_lengths[index_np], self.previous[index_np]
        self.idle = self.idle[index_np]
        self.seeds, self.offsets, self.pending = self.seeds[dev_index], self.offsets[dev_index], self.pending[dev_index]


class SpeculativeGenerator:
    """Speculative decoding with an HF target and a drafter.

    Args:
        target: HF causal LM (fp32/fp16/bf16 or bitsandbytes int8), eval mode.
        drafter: an HF causal LM sharing the target's tokenizer (-> ModelDrafter), ``"ngram"``,
            ``"early-exit"``, a :class:`specdec.drafters.Drafter`, or None / ``"none"`` (plain
            decoding through the same loop).
        tokenizer: target tokenizer; needed for string prompts and decoded texts.
        drafter_tokenizer: when given, checked against ``tokenizer`` (IncompatibleModelsError).
        num_draft_tokens: K, the most drafts per row and step (default for n-gram: 32 = the cap when
            adaptive, 10 when not; 4 for model drafters).
        adaptive: pick each step's draft width in 0..K with :class:`DraftLengthPolicy` (default on);
            False: draft K every step.
        early_exit_layers: layers of the early-exit drafter (default a quarter of the target's).
        share_prefix: when a batch's prompts share their first tokens (a system prompt), prefill them
            once and copy their keys and values to every row (default on; not with drafters that read
            the target's cache, nor sliding-window attention).
        backend: implementation of the ops (``specdec.ops.verify``/``sample``): "auto", "cpp",
            "triton" or "reference".
        tree: verify a tree of drafts per row (``specdec.verify_tree``) instead of a chain, from the
            second step on: None (default) = when the drafter proposes trees (``supports_tree``).
        max_tree_nodes: node budget of a tree (default ``2 * num_draft_tokens``, 4..64).
        policy: the :class:`DraftLengthPolicy` (default: one that measures forward costs online);
            ``DraftLengthPolicy(forward_cost="prior")`` makes the widths, and so greedy statistics,
            independent of timing.
        narrow_linear: during ``generate``, route the float32 CPU ``nn.Linear`` layers of the target
            (and of a model drafter) through :func:`specdec.linear.narrow_linear`, which reads each
            weight once for the few tokens of a verification forward where MKL's sgemm costs about
            one matrix-vector product per token (default on; restored after each call; a no-op on
            GPU, for int8 layers, or without the C++ extension).
    """

    def __init__(self, target, drafter="ngram", tokenizer=None, *, drafter_tokenizer=None,
                 num_draft_tokens: int | None = None, adaptive: bool = True, early_exit_layers: int | None = None,
                 share_prefix: bool = True, backend: str = "auto", policy: "DraftLengthPolicy | None" = None,
                 tree: bool | None = None, max_tree_nodes: int | None = None, narrow_linear: bool = True):
        self.target = target
        self.narrow_linear = bool(narrow_linear)
        self.tokenizer = tokenizer
        self.vocab_size = model_vocab_size(target)
        if isinstance(drafter, torch.nn.Module):
            check_compatible(target, drafter, tokenizer, drafter_tokenizer)
        self.drafter = make_drafter(drafter, target, num_layers=early_exit_layers, vocab_size=self.vocab_size)
        if num_draft_tokens is None:
            ngram = type(self.drafter).__name__ == "NGramDrafter"
            # n-gram drafts cost nothing: adaptive, K is only a cap (the policy picks the nodes)
            num_draft_tokens = (MAX_DRAFT_TOKENS if adaptive else 10) if ngram else 4
        if not 0 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"num_draft_tokens must be in 0..{MAX_DRAFT_TOKENS}, got {num_draft_tokens}")
        self.num_draft_tokens = num_draft_tokens
        self.adaptive = adaptive
        supports_tree = bool(getattr(self.drafter, "supports_tree", False))
        if tree and not supports_tree:
            raise ValueError(f"tree=True, but the {self.drafter_name} drafter does not propose trees")
        self.tree = supports_tree if tree is None else bool(tree)
        if max_tree_nodes is None:
            max_tree_nodes = min(64, max(4, 2 * num_draft_tokens))
        if not 1 <= max_tree_nodes <= 256:
            raise ValueError(f"max_tree_nodes must be in 1..256, got {max_tree_nodes}")
        self.max_tree_nodes = max_tree_nodes
        self.share_prefix = share_prefix
        self.device = _model_device(target)
        self.backend = backend
        # acceptance and forward-cost estimates, kept across generate calls
        self.policy = policy if policy is not None else DraftLengthPolicy(self.device.type)

    @classmethod
    def from_pretrained(cls, target: str | None = None, drafter="ngram", *, quantization: str = "auto",
                        device=None, **kwargs) -> "SpeculativeGenerator":
        """Load a target (default: the embedded SmolLM2-135M-Instruct) and its tokenizer, and a drafter:
        ``"ngram"`` (default, the fastest measured on CPU), ``"early-exit"``, ``"none"``, or a model
        name/path loaded with the same quantization (its tokenizer is checked against the target's)."""
        from specdec.models import check_model_name, load_model, load_tokenizer

        named_drafter = isinstance(drafter, str) and drafter.lower().replace("_", "-") not in _DRAFTER_NAMES
        check_model_name(target, "target")  # both names before loading either: no wasted target load
        if named_drafter:
            check_model_name(drafter, "drafter")
        model = load_model(target, quantization=quantization, device=device)
        tokenizer = load_tokenizer(target)
        drafter_tokenizer = None
        if named_drafter:
            drafter_tokenizer = load_tokenizer(drafter)
            drafter = load_model(drafter, quantization=quantization, device=device)
        return cls(model, drafter, tokenizer, drafter_tokenizer=drafter_tokenizer, **kwargs)

    _kept = None  # set by _continue only, for its one generate call: a KeptCache

    def _tree_step(self, step: int) -> bool:
        """Whether this step drafts a tree: the first step (the prefill) always drafts a chain."""
        return self.tree and step > 0

    @property
    def drafter_name(self) -> str:
        if self.drafter is None:
            return "none"
        name = type(self.drafter).__name__
        return {"NGramDrafter": "ngram", "EarlyExitDrafter": "early-exit", "ModelDrafter": "model"}.get(name, name)

    # -- inputs --------------------------------------------------------------------------------

    def _prompt_ids(self, prompts, input_ids, attention_mask, chat=None) -> list:
        if prompts is not None and input_ids is not None:
            raise ValueError("pass either prompts or input_ids, not both")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            rows = []
            for p in prompts:
                if isinstance(p, str):
                    if self.tokenizer is None:
                        raise ValueError("string prompts need a tokenizer: SpeculativeGenerator(..., tokenizer=...)")
                    rows.append(encode_prompt(self.tokenizer, p, chat))
                else:
                    rows.append([int(t) for t in p])
        elif input_ids is not None:
            ids = torch.as_tensor(input_ids)
            if ids.dim() == 1:
                ids = ids[None]
            if attention_mask is None:
                rows = [r.tolist() for r in ids]
            else:  # left or right padding: keep the masked-in tokens of each row
                mask = torch.as_tensor(attention_mask).bool()
                rows = [r[m].tolist() for r, m in zip(ids, mask)]
        else:
            raise ValueError("generate() needs prompts or input_ids")
        if not rows:
            raise ValueError("prompts is empty: generate() needs at least one prompt")
        vocab, max_pos = self._vocab_size(), self._max_positions()
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in r if not 0 <= t < vocab] if vocab else []
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
            if max_pos and len(r) > max_pos:
                warnings.warn(f"prompt {i} has {len(r)} tokens, more than the target's maximum of "
                              f"{max_pos} positions: its output may be meaningless", stacklevel=3)
        return rows

    def _max_positions(self):
        return getattr(getattr(self.target, "config", None), "max_position_embeddings", None)

    def _vocab_size(self):
        try:
            return int(self.target.get_input_embeddings().num_embeddings)
        except Exception:  # noqa: BLE001  a model without an embedding accessor: no id check
            return None

    def _eos_ids(self, eos_token_id) -> list:
        if isinstance(eos_token_id, str) and eos_token_id == "default":
            eos_token_id = getattr(getattr(self.target, "generation_config", None), "eos_token_id", None)
            if eos_token_id is None and self.tokenizer is not None:
                eos_token_id = self.tokenizer.eos_token_id
        if eos_token_id is None:
            return []
        if isinstance(eos_token_id, torch.Tensor):
            eos_token_id = eos_token_id.tolist()
        if isinstance(eos_token_id, int) and not isinstance(eos_token_id, bool):
            return [eos_token_id]
        # a string would otherwise become its characters ("12" -> [1, 2])
        if not isinstance(eos_token_id, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in eos_token_id):
            raise TypeError(f"eos_token_id must be an int, a list of ints, None or 'default', got {eos_token_id!r}")
        return list(eos_token_id)

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_draft_tokens: int | None = None,
        adaptive: bool | None = None,
        eos_token_id="default",
        seed: int | Sequence[int] | None = None,
        batch_size: int | None = None,
        callback: Callable[[Chunk], None] | None = None,
        progress: bool = False,
        chat: bool | None = None,
    ) -> GenerationResult:
        """Generate continuations for a batch of prompts.

        Args:
            prompts: a string, a list of strings (needs the tokenizer) or a list of token-id lists.
            input_ids, attention_mask: alternatively [B, T] int64 (left or right padded) and its mask.
            max_new_tokens: per-row limit of generated tokens.
            temperature: 0 = greedy (default); top_k (0 = off), top_p (1.0 = off).
            num_draft_tokens, adaptive: override the generator's draft length and adaptivity.
            eos_token_id: int, list of ints, None (never stop early) or "default" (the model's).
            seed: int: row i of the caller's list gets the seed ``row_seeds(seed, n)[i]``; or a list
                of n ints, one seed per prompt; None draws one from torch's generator. Random
                numbers are keyed by (row seed, token index): see "Seeding" in the module docstring
                for what that makes reproducible.
            batch_size: rows per batch (default: all prompts in one batch).
            callback: called with a :class:`Chunk` for every row after every step.
            progress: show a tqdm bar of generated tokens on stderr.
            chat: how string prompts are encoded: None (default) wraps each in the tokenizer's chat
                template when it has one, as the CLI does (``--raw`` = chat=False); False: raw
                completion text; True: the template or an error. Token-id prompts are used as given.
        Returns:
            GenerationResult (token ids per prompt in input order, stats).
        """
        from specdec import ops

        rows = self._prompt_ids(prompts, input_ids, attention_mask, chat)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        max_pos = self._max_positions()
        if max_pos and max_new_tokens > max_pos:  # the cache is sized for it up front
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the target's {max_pos} positions")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
        k0 = self.num_draft_tokens if num_draft_tokens is None else num_draft_tokens
        if not 0 <= k0 <= MAX_DRAFT_TOKENS:
            raise ValueError(f"num_draft_tokens must be in 0..{MAX_DRAFT_TOKENS}, got {k0}")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)))
        if isinstance(seed, (list, tuple)):
            if len(seed) != len(rows) or not all(
                    isinstance(x, numbers.Integral) and not isinstance(x, bool) and -(2**63) <= x < 2**63
                    for x in seed):
                raise ValueError(f"seed must be an int or a list of {len(rows)} int64 seeds (one per prompt), "
                                 f"got {seed!r}")
            seeds = torch.tensor([int(x) for x in seed], dtype=torch.int64)
        elif isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
            seeds = ops.row_seeds(int(seed), len(rows))
        else:
            raise TypeError(f"seed must be an int, a list of ints or None, got {type(seed).__name__}")
        opts = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
                    top_p=float(top_p), k0=k0, adaptive=self.adaptive if adaptive is None else adaptive,
                    eos=self._eos_ids(eos_token_id), callback=callback)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(rows) * max_new_tokens, unit="tok", desc="generating", leave=False)
        sequences, reasons, stats = [None] * len(rows), [None] * len(rows), GenerationStats(drafter=self.drafter_name)
        step = batch_size or len(rows)
        try:
            for start in range(0, len(rows), step):
                index = list(range(start, min(start + step, len(rows))))
                part = self._generate_batch([rows[i] for i in index], index, seeds[index[0]: index[-1] + 1], opts, bar)
                for i, (seq, why) in zip(index, zip(*part[:2])):
                    sequences[i], reasons[i] = seq, why
                stats.merge(part[2])
        finally:
            if bar is not None:
                bar.close()
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(s, skip_special_tokens=True) for s in sequences]
        return GenerationResult(sequences, rows, reasons, stats, texts)

    @torch.inference_mode()
    def _generate_batch(self, rows, user_index, seeds, opts, bar):
        """One batch, step by step: draft -> target forward -> verify -> commit (see _BatchRun)."""
        models = (self.target, getattr(self.drafter, "model", None)) if self.narrow_linear else ()
        run = _BatchRun(self, rows, user_index, seeds, opts, bar)
        try:
            with narrow_linears(*models):
                while run.live:
                    run.make_room()
                    draft = run.draft()
                    logits = run.forward(draft)
                    verdict = run.verify(logits, draft)
                    run.commit(draft, verdict)
        finally:
            if self.drafter is not None:
                self.drafter.finish()
        _sync(self.device)
        run.stats.total_time = time.perf_counter() - run.t_start
        return run.out_tokens, run.reasons, run.stats

    def _continue(self, token_ids: Sequence[int], kept: KeptCache, *, callback: Callable[[Chunk], None] | None = None,
                  **kwargs) -> GenerationResult:
        """``generate([token_ids], **kwargs)`` for a batch of one whose first ``len(kept.tokens)`` tokens
        are already in ``kept``'s cache: only the rest is prefilled, and the loop (drafting,
        verification, rollback) is ``generate``'s own. Afterwards ``kept`` holds ``token_ids`` and the
        generated tokens but the last one; after an exception (a Ctrl-C included) it holds what the
        finished steps produced, so the next call can continue from there. :class:`specdec.ChatSession`
        drives this."""
        token_ids = [int(t) for t in token_ids]
        n = len(kept.tokens)
        if n >= len(token_ids) or token_ids[:n] != kept.tokens:
            raise ValueError(f"_continue: the kept cache's {n} tokens must be a proper prefix of token_ids "
                             f"({len(token_ids)} tokens); truncate it to their common prefix first")
        if kwargs.get("batch_size") not in (None, 1):
            raise ValueError("_continue generates one sequence: batch_size must be None or 1")
        emitted = []

        def collect(chunk: Chunk) -> None:
            emitted.extend(chunk.token_ids)
            if callback is not None:
                callback(chunk)

        self._kept = kept
        try:
            return self.generate([token_ids], callback=collect, **kwargs)
        finally:
            self._kept = None
            kept._settle(token_ids, emitted)
