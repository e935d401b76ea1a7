# Holds: RaggedCache, the transformers.Cache over a KVStore: ragged rows, left padding, partial depth.
# May use: torch, transformers, .store, .store_ops, .tree.
"""The Hugging Face Cache adapter of the ragged KV store."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from specdec.cache.store import KVStore, _as_index, _host_copy
from specdec.cache.store_ops import rollback_
from specdec.cache.tree import _TreeSteps


try:
    from transformers.cache_utils import Cache as _HFCache, CacheLayerMixin as _HFLayer
except ImportError:  # transformers not installed: the store alone still works
    _HFCache, _HFLayer = object, object


class _RaggedLayer(_HFLayer):
    """Per-layer facade HF code inspects (``cache.layers[i]``); all work is done by the parent cache."""

    is_sliding = False
    is_compileable = False
    is_croppable = True
    supports_early_init = False

    def __init__(self, cache: "RaggedCache", layer_idx: int):  # no super().__init__: keys/values are properties
        self._cache = cache
        self.layer_idx = layer_idx
        self.is_initialized = True

    @property
    def keys(self) -> torch.Tensor:
        return self._cache.store.keys[self.layer_idx, :, :, : self._cache.store.seq_length]

    @property
    def values(self) -> torch.Tensor:
        return self._cache.store.values[self.layer_idx, :, :, : self._cache.store.seq_length]

    @property
    def dtype(self) -> torch.dtype:
        return self._cache.store.dtype

    @property
    def device(self) -> torch.device:
        return self._cache.store.device

    @property
    def batch_size(self) -> int:
        return self._cache.store.batch_size

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self._cache.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        return self._cache.get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self._cache.store.seq_length

    def get_max_length(self) -> int:
        return self._cache.store.capacity


class RaggedCache(_TreeSteps, _HFCache):
    """``transformers.Cache`` over a :class:`KVStore`: per-row lengths, O(1) per-row rollback, batch > 1.

    Driving a model (explicit positions and mask are required for ragged rows; batch 1 without
    left padding also works with neither, like a ``DynamicCache``)::

        cache = RaggedCache.from_model(model, batch_size=B, max_length=T_max)
        out = model(input_ids=ids, position_ids=cache.position_ids(q), attention_mask=cache.attention_mask(q),
                    use_cache=True, **cache_kwargs(model, cache))   # every row advances by q;
        # cache_kwargs (specdec.hf_compat): cache= or past_key_values=, whichever the release takes
        cache.rollback(new_lengths)                           # per row, O(1)

    ``update`` writes layer ``l``'s new keys/values at ``lengths[b] + arange(q)`` and returns the
    buffers ``[B, H_kv, max(lengths) + q, D]`` (views, no copy); lengths are committed after the last
    layer. Slots a row does not own are hidden by :meth:`attention_mask`.

    Left padding: ``set_left_padding(num_pad)`` marks the first ``num_pad[b]`` slots of row ``b`` as
    padding (``start``); they are never attended and positions count from the first real token.

    Partial depth: inside ``with cache.partial_depth(n):`` forwards run only layers ``0..n-1`` (an
    early-exit drafter); lengths commit after layer ``n - 1`` and return to their entry values on exit.
    """

    is_compileable = False

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_length: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 attn_implementation: str | None = None, sliding_window: int | None = None,
                 backend: str | None = None):
        if _HFCache is object:
            raise ImportError("RaggedCache needs transformers (pip install transformers)")
        self.store = KVStore(num_layers, batch_size, num_kv_heads, head_dim, max_length, dtype=dtype, device=device,
                             backend=backend)
        super().__init__(layers=[_RaggedLayer(self, i) for i in range(num_layers)])
        #: attention implementation of the model; "eager" adds the mask to the scores, so it gets an additive mask
        self.attn_implementation = attn_implementation
        #: keys at query position p are visible only if p - s < sliding_window (Mistral); None = full attention
        self.sliding_window = sliding_window
        #: [B] int32: left-padding slots at the front of each row
        self.start = torch.zeros(batch_size, dtype=torch.int32, device=self.store.device)
        self._host_start = torch.zeros(batch_size, dtype=torch.int64)
        # layers a forward runs; the update of layer active_layers - 1 commits the lengths
        self._active_layers = num_layers

    @classmethod
    def from_model(cls, model, batch_size: int, max_length: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, backend: str | None = None) -> "RaggedCache":
        """Cache sized for ``model`` (an HF decoder): layers, KV heads and head_dim from its config, dtype and
        device from its parameters (or ``dtype``/``device``), attention implementation and sliding window
        from the config."""
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        param = next(model.parameters())
        if dtype is None:
            dtype = getattr(model, "dtype", param.dtype)
            if not dtype.is_floating_point:  # int8-quantised weights: activations run in the compute dtype
                dtype = torch.float16
        device = param.device if device is None else device
        layer_types = getattr(text, "layer_types", None)
        window = getattr(text, "sliding_window", None)
        if layer_types is not None:
            sliding = [t == "sliding_attention" for t in layer_types]
            if any(sliding) and not all(sliding):
                raise NotImplementedError("RaggedCache: models mixing sliding-window and full-attention layers "
                                          "are not supported yet")
            window = window if all(sliding) and sliding else None
        elif getattr(text, "use_sliding_window", True) is False:
            window = None
        return cls(text.num_hidden_layers, batch_size, kv_heads, head_dim, max_length, dtype=dtype, device=device,
                   attn_implementation=getattr(config, "_attn_implementation", None), sliding_window=window,
                   backend=backend)

    # -- the store's state ---------------------------------------------------------------------------
    @property
    def lengths(self) -> torch.Tensor:
        """``[B]`` int32 on the device: slots stored per row (committed), left padding included. Read-only."""
        return self.store.lengths

    @property
    def batch_size(self) -> int:
        return self.store.batch_size

    @property
    def max_batch_size(self) -> int:
        return self.store.batch_size

    @property
    def max_length(self) -> int:
        """Capacity ``T_max`` (positions per row)."""
        return self.store.capacity

    @property
    def max_cache_len(self) -> int:
        return self.store.capacity

    @property
    def is_initialized(self) -> bool:
        return True

    @property
    def is_croppable(self) -> bool:
        return True

    # -- transformers.Cache interface -------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` ``[B, H_kv, q, D]`` of layer ``layer_idx`` at per-row offsets.

        Returns views ``[B, H_kv, max(lengths) + q, D]`` of the layer's buffers. The last active layer's
        call (the last layer, or ``n - 1`` inside :meth:`partial_depth`) advances every row's length by ``q``.
        """
        if layer_idx >= self._active_layers:  # it would append after the commit, at the wrong offsets
            raise RuntimeError(f"RaggedCache.update: layer {layer_idx} written inside partial_depth"
                               f"({self._active_layers}); the forward must run only layers 0..{self._active_layers - 1}")
        q = key_states.shape[-2]
        kv_len = self.store.seq_length + q
        self.store.append(key_states, value_states, layer_idx, advance=layer_idx == self._active_layers - 1)
        return (self.store.keys[layer_idx, :, :, :kv_len], self.store.values[layer_idx, :, :, :kv_len])

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Longest row's stored length, ``max(lengths)`` (host int)."""
        return self.store.seq_length

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.store.seq_length

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        """``(kv_length, kv_offset) = (max(lengths) + q, 0)``; ``query_length`` may be an int (transformers 5)
        or the ``cache_position`` tensor (transformers 4.5x)."""
        q = query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)
        return self.store.seq_length + q, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.store.capacity

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # transformers 4.5x name
        return self.store.capacity

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Legacy tuple access: ``(keys, values)`` of one layer, ``[B, H_kv, max(lengths), D]`` views."""
        return self.layers[layer_idx].keys, self.layers[layer_idx].values

    def crop(self, max_length: int) -> None:
        """HF crop. Negative ``n`` (transformers 5): drop ``-n`` tokens from every row. Positive ``n``
        (legacy): truncate every row to at most ``n`` tokens after its left padding. ``0``: no-op."""
        if max_length == 0:
            return
        host = self.store.host_lengths
        new = host + max_length if max_length < 0 else torch.minimum(host, self._host_start + max_length)
        self.rollback(new.to(torch.int32).to(self.store.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select_rows(torch.arange(self.batch_size, device=self.store.device).repeat_interleave(repeats))

    def reset(self) -> None:
        """Empty every row and clear the left padding."""
        self.store.reset()
        self.start.zero_()
        self._host_start.zero_()

    # -- speculative-decoding interface ------------------------------------------------------------------
    @contextlib.contextmanager
    def partial_depth(self, num_layers: int) -> Iterator["RaggedCache"]:
        """Run forwards of the first ``num_layers`` layers only (an early-exit drafter) over this cache.

        Inside the block, ``update`` of layer ``num_layers - 1`` commits the lengths, so successive
        shallow forwards (``q`` tokens each) read the committed prefix of layers ``0..num_layers-1`` plus
        what the block appended; writing a deeper layer raises RuntimeError. On exit every row's length
        (``[B]`` int32, and its host mirror) goes back to its value on entry: O(1), no data moves and no
        device synchronisation. The shallow positions are scratch (layers ``num_layers..L-1`` never got
        them), and the next full forward overwrites their slots. Do not change the batch
        (``select_rows``, ``gather``, ``rollback`` ...) inside the block.

        Args:
            num_layers: ``1 <= num_layers <= L``.
        """
        if not 1 <= num_layers <= self.store.num_layers:
            raise ValueError(f"partial_depth: num_layers must be in 1..{self.store.num_layers}, got {num_layers}")
        if self._active_layers != self.store.num_layers:
            raise RuntimeError("partial_depth: already inside a partial_depth block")
        store = self.store
        saved, saved_host = store.lengths.clone(), store.host_lengths.clone()
        self._active_layers = num_layers
        try:
            yield self
        finally:
            self._active_layers = store.num_layers
            # restore through the rollback kernel without its checks: they would read the device lengths
            rollback_(store.lengths, saved, False, backend=store.backend)
            store._set_host(saved_host)

    def rollback(self, new_lengths: torch.Tensor, *, host_lengths: torch.Tensor | None = None) -> None:
        """Per-row rollback: ``new_lengths`` ``[B]`` int32/int64 on the cache's device, each in
        ``[start[b], lengths[b]]``. O(1), no data movement (one copy of ``B`` ints to the host, none
        when the caller passes the same values as a CPU tensor in ``host_lengths``)."""
        self.store.rollback(new_lengths, min_lengths=self._host_start, host_lengths=host_lengths)

    def gather(self, keep_index: torch.Tensor, keep_lengths: torch.Tensor,
               offset: torch.Tensor | None = None) -> None:
        """Tree acceptance / compaction: row ``b`` keeps slots ``keep_index[b, :keep_lengths[b]]`` at
        ``offset[b] + j`` (default ``offset = start``, the front of the row after its left padding).
        ``keep_index`` ``[B, N]`` int, ``keep_lengths`` ``[B]`` int; one kernel for all layers."""
        self.store.gather(keep_index, keep_lengths, self.start if offset is None else offset)

    def select_rows(self, index: torch.Tensor, *, host_index: torch.Tensor | None = None) -> None:
        """Keep rows ``index`` (``[B']`` int64) in that order; the batch size becomes ``B'``.
        ``host_index``: the same as a CPU tensor, when the caller has it (no wait for the device)."""
        index = _as_index(index, "index").to(self.store.device)
        host = index.cpu().long() if host_index is None else _host_copy(host_index, index.shape[0],
                                                                         "select_rows: host_index")
        self.store.select_rows(index, host_index=host)
        self.start = self.start.index_select(0, index.long())
        self._host_start = self._host_start[host]

    def grow(self, new_max_length: int) -> None:
        """Reallocate every layer with capacity ``new_max_length`` (>= the current one), keeping the data."""
        self.store.grow(new_max_length)

    def set_left_padding(self, num_pad: torch.Tensor | Sequence[int]) -> None:
        """Declare ``num_pad[b]`` (``[B]`` int) leading padding slots per row, before a left-padded prefill.

        A 2D HF-style padding mask ``[B, T0]`` (1 = token, 0 = pad, left padded) is accepted too.
        """
        num_pad = torch.as_tensor(num_pad)
        if num_pad.dim() == 2:
            num_pad = (num_pad == 0).sum(-1)
        if tuple(num_pad.shape) != (self.batch_size,) or num_pad.dtype.is_floating_point:
            raise ValueError(f"set_left_padding: need [B] = [{self.batch_size}] ints, got {tuple(num_pad.shape)}")
        host = num_pad.to("cpu", torch.int64)
        if (host < 0).any():
            raise ValueError("set_left_padding: negative padding")
        self._host_start = host
        self.start = host.to(device=self.store.device, dtype=torch.int32)

    def _mask(self, allowed: torch.Tensor, additive: bool | None) -> torch.Tensor:
        """A bool attention mask (True = attend) as the model wants it: bool, or (``additive``,
        default for ``eager`` attention, which adds the mask to the scores) 0 / finfo.min."""
        if additive is None:
            additive = self.attn_implementation == "eager"
        if not additive:
            return allowed
        dtype = self.store.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)

    def position_ids(self, q: int) -> torch.Tensor:
        """``[B, q]`` int64 position ids of the next ``q`` tokens: ``lengths[b] - start[b] + arange(q)``."""
        base = (self.store.lengths - self.start).long()
        return base[:, None] + torch.arange(q, device=self.store.device)

    def attention_mask(self, q: int, *, additive: bool | None = None) -> torch.Tensor:
        """4D mask ``[B, 1, q, max(lengths) + q]`` for the next ``q`` tokens.

        Query ``t`` of row ``b`` sits in slot ``p = lengths[b] + t`` and may attend slot ``s`` iff
        ``start[b] <= s <= p`` (and ``p - s < sliding_window`` if set). A query inside the left padding
        attends only itself, so no query row is fully masked (which would give NaN in ``sdpa``).

        Returns bool (True = attend), unless ``additive`` (default: the model uses ``eager`` attention,
        which adds the mask to the scores): then 0 / ``finfo(dtype).min`` in the cache's dtype.
        """
        dev = self.store.device
        kv_len = self.store.seq_length + q
        qpos = self.store.lengths.long()[:, None, None] + torch.arange(q, device=dev)[None, :, None]  # [B, q, 1]
        slot = torch.arange(kv_len, device=dev)[None, None, :]  # [1, 1, kv]
        allowed = (slot <= qpos) & (slot >= self.start.long()[:, None, None])
        if self.sliding_window is not None:
            allowed &= slot > qpos - self.sliding_window
        allowed |= slot == qpos
        return self._mask(allowed[:, None], additive)

    def __repr__(self) -> str:
        s = self.store
        return (f"RaggedCache(layers={s.num_layers}, batch={s.batch_size}, kv_heads={s.num_kv_heads}, "
                f"head_dim={s.head_dim}, T_max={s.capacity}, dtype={s.dtype}, device={s.device}, "
                f"longest={s.seq_length})")
