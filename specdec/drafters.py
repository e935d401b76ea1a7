"""Drafters: cheap proposers of the next K tokens, behind one small interface.

The generator owns the token history and calls, once per speculative step:

    draft = drafter.propose(state)          # Draft(token_ids [B, K] int64, -1 tail; probs; num_drafted)
    ... target verifies ...
    drafter.accept(num_accepted)            # [B] numpy ints: how many drafts each row kept

plus ``start(state)`` once after the target's prefill and ``select_rows(index)`` when rows leave.
``state`` is a :class:`DraftState` view of the generator's batch.

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

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, prefer: str = "recent"):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if prefer not in ("recent", "earliest"):
            raise ValueError(f"prefer must be 'recent' or 'earliest', got {prefer!r}")
        self.max_ngram, self.min_ngram, self.prefer = max_ngram, min_ngram, prefer

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
    """

    stochastic = True

    def __init__(self, model, vocab_size: int | None = None):
        self.model = model
        self.vocab_size = vocab_size  # the target's logits width; drafter logits beyond it are cut
        self.cache = None

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
        if k == 0:
            return _empty_draft(batch, state.device)
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
        draft = self._draft(last, state, self.cache)
        self.lengths_at_propose = state.lengths.copy()
        self.proposed = k
        return draft

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
