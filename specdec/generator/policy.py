# Holds: draft widths: DraftLengthPolicy and its online models, ForwardCostModel and AcceptanceModel.
# May use: numpy only: host arithmetic, no torch, no model.
"""How many drafts to verify each step.

A forward over q positions of B rows costs more than one over 1 position, by a factor
that depends on the device and the batch (on a 2-core CPU, q=11 costs ~2x q=1 at B=1 but ~3.6x
at B=8), so no fixed K is right everywhere. With ``adaptive=True`` (default) a
:class:`DraftLengthPolicy` picks each step's width w <= K (the forward's q = w + 1) that minimises
the projected time to finish the batch (at batch 1: the most tokens per second), from two online
estimates: :class:`AcceptanceModel` (per class of row: the drafter's match class and the row's
previous outcome, the probability that draft i is accepted) and :class:`ForwardCostModel` (measured
forward times against the tokens processed, B * q). Every row drafts up to w tokens
(padding positions of a narrower row cost the same). ``adaptive=False`` drafts K every step (a row
with a shorter proposal drafts fewer).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

MAX_DRAFT_TOKENS = 32  # cap for K


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

    def expected_tokens(self, available: np.ndarray, keys: np.ndarray, top: int,
                        certain: np.ndarray | None = None) -> np.ndarray:
        """``[B, top + 1]``: row b's expected emitted tokens at widths ``0..top``. ``certain[b]``: the
        first drafts of row b are accepted for sure (a grammar that allows one token there), its
        class's survival applies after them."""
        ws = np.arange(top + 1)
        out = np.empty((available.shape[0], top + 1))
        for key in np.unique(keys):
            cum = np.concatenate([[0.0], np.cumsum(self.acceptance.survival(int(key))[:top])])
            rows = keys == key
            out[rows] = 1.0 + cum[np.minimum(ws[None, :], np.minimum(available[rows], top)[:, None])]
        for b in np.flatnonzero(certain if certain is not None else []):
            c = int(min(certain[b], available[b], top))
            surv = np.concatenate([np.ones(c), self.acceptance.survival(int(keys[b]))[: top - c]])
            out[b] = 1.0 + np.concatenate([[0.0], np.cumsum(surv)])[np.minimum(ws, min(int(available[b]), top))]
        return out

    def width(self, available: np.ndarray, keys: np.ndarray, remaining: np.ndarray | None = None,
              certain: np.ndarray | None = None) -> int:
        """The width for rows with ``available[b]`` possible drafts, class ``keys[b]`` and ``remaining[b]``
        tokens still to generate (default: the same for every row); ``certain``: as in
        :meth:`expected_tokens`."""
        batch = available.shape[0]
        top = int(min(available.max(initial=0), self.acceptance.max_drafts))
        if batch == 0 or top == 0:
            return 0
        if remaining is None:
            remaining = np.ones(batch)
        steps = np.maximum(remaining, 1)[:, None] / self.expected_tokens(available, keys, top, certain)  # [B, W+1]
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
