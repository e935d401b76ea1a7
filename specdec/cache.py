"""Ragged KV cache for speculative decoding: a preallocated store with per-row lengths and O(1) rollback.

After verification each row of a batch keeps a different number of tokens. The store keeps keys and
values for all layers in two preallocated tensors ``[L, B, H_kv, T_max, D]`` plus per-row lengths
``[B]`` int32 on the store's device, so rolling a row back is writing one integer (stale slots are
overwritten by the next append) and the prefill never has to be recomputed.

Layers:

* low-level ops (``append_``, ``rollback_``, ``gather_``, ``select_rows``): C++/CUDA kernels of the
  extension ``specdec._C`` (``torch.ops.specdec_cpp.cache_*``), with fake kernels registered here so
  they trace under ``torch.compile``/FakeTensor; a plain-PyTorch fallback runs when the extension
  is not built (``SPECDEC_NO_EXT=1``);
* :class:`KVStore`: the store object (tensors + a host mirror of the lengths, so shapes and checks
  never wait on the device);
* :class:`RaggedCache`: a ``transformers.Cache`` over a :class:`KVStore` that stock Hugging Face
  decoder models (Llama, Qwen2/3, Mistral; ``sdpa`` and ``eager``) read and write, plus the per-row
  ``position_ids`` and 4D ``attention_mask`` for ragged rows and left padding.

The target and a model drafter each get their own :class:`RaggedCache` (``from_model``); an early-exit
drafter runs the target's first layers over the target's own cache (:meth:`RaggedCache.partial_depth`).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Sequence

import torch

# transformers >= 5.2x warns on every forward that the ``past_key_values`` keyword is deprecated in
# favour of ``cache``; older releases (>= 4.57, which specdec supports) know only the former. specdec
# passes it on purpose, so that one message is silenced, nothing else.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)

try:  # the extension registers torch.ops.specdec_cpp.cache_*; `import torch` must come first
    import specdec._C  # noqa: F401

    _HAS_EXT = hasattr(torch.ops.specdec_cpp, "cache_append")
except ImportError:  # package built with SPECDEC_NO_EXT=1: the PyTorch fallback below serves
    _HAS_EXT = False

__all__ = ["KVStore", "RaggedCache", "append_", "rollback_", "gather_", "select_rows", "has_extension"]


def has_extension() -> bool:
    """True when the C++ (and, if built with CUDA, CUDA) kernels of ``specdec._C`` are loaded."""
    return _HAS_EXT


# ----------------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes only, so the ops work under FakeTensor / torch.compile tracing.

def _check_same_device(op: str, first: torch.Tensor, *others: torch.Tensor) -> None:
    # With mixed devices the dispatcher may pick the fake kernel (e.g. meta + cpu), so it checks too.
    for t in others:
        if t.device != first.device:
            raise RuntimeError(f"{op}: tensors on {t.device} and {first.device}; the store's tensors and inputs "
                               "must share one device")


if _HAS_EXT:

    @torch.library.register_fake("specdec_cpp::cache_append")
    def _append_fake(keys, values, lengths, new_keys, new_values, layer_start, advance, max_length):
        _check_same_device("append", keys, values, lengths, new_keys, new_values)
        return None

    @torch.library.register_fake("specdec_cpp::cache_rollback")
    def _rollback_fake(lengths, new_lengths, check):
        _check_same_device("rollback", lengths, new_lengths)
        return None

    @torch.library.register_fake("specdec_cpp::cache_gather")
    def _gather_fake(keys, values, lengths, keep_index, keep_lengths, offset, check):
        _check_same_device("gather", keys, values, lengths, keep_index, keep_lengths, offset)
        return None

    @torch.library.register_fake("specdec_cpp::cache_select_rows")
    def _select_rows_fake(keys, values, lengths, row_index, max_length):
        _check_same_device("select_rows", keys, values, lengths, row_index)
        L, _, H, _, D = keys.shape
        Bn = row_index.shape[0]
        return (keys.new_empty((L, Bn, H, max_length, D)), values.new_empty((L, Bn, H, max_length, D)),
                lengths.new_empty((Bn,)))


# ----------------------------------------------------------------------------------------------------
# Plain-PyTorch fallback of the four ops (same semantics and error wording as the C++ kernels).

def _torch_append(keys, values, lengths, new_keys, new_values, layer_start, advance, max_length):
    q = new_keys.shape[3]
    if new_keys.dtype != keys.dtype or new_values.dtype != keys.dtype:
        raise RuntimeError(f"append: new keys/values dtype {new_keys.dtype} must match the store dtype {keys.dtype}")
    if new_keys.device != keys.device or new_values.device != keys.device:
        raise RuntimeError(f"append: new keys/values on {new_keys.device}, store on {keys.device}")
    if new_keys.shape[1:3] != keys.shape[1:3] or new_keys.shape[4] != keys.shape[4] \
            or new_values.shape != new_keys.shape:
        raise RuntimeError(f"append: new_keys {tuple(new_keys.shape)} do not fit the store {tuple(keys.shape)}")
    Lp = new_keys.shape[0]
    if not 0 <= layer_start <= keys.shape[0] - Lp:
        raise RuntimeError(f"append: layers [{layer_start}, {layer_start + Lp}) outside the store's {keys.shape[0]} "
                           "layers")
    T = keys.shape[3]
    neg = (lengths < 0).nonzero()
    if neg.numel():
        b = int(neg[0, 0])
        raise RuntimeError(f"append: row {b} length {int(lengths[b])} is negative (lengths corrupted, e.g. by an "
                           "unchecked rollback); nothing was written")
    over = (lengths.long() + q > T).nonzero()
    if over.numel():
        b = int(over[0, 0])
        raise RuntimeError(f"KV cache capacity exceeded: row {b} holds {int(lengths[b])} positions, appending {q} "
                           f"needs {int(lengths[b]) + q} but T_max is {T}; nothing was written (call grow() first)")
    Lp, B, H, _, D = new_keys.shape
    pos = lengths.long()[:, None] + torch.arange(q, device=keys.device)  # [B, q]
    index = pos[None, :, None, :, None].expand(Lp, B, H, q, D)
    keys[layer_start:layer_start + Lp].scatter_(3, index, new_keys)
    values[layer_start:layer_start + Lp].scatter_(3, index, new_values)
    if advance:
        lengths += q


def _torch_rollback(lengths, new_lengths, check):
    if new_lengths.dim() != 1 or new_lengths.shape[0] != lengths.shape[0]:
        raise RuntimeError(f"rollback: new_lengths must be [B] = [{lengths.shape[0]}], got {tuple(new_lengths.shape)}")
    if new_lengths.dtype not in (torch.int32, torch.int64):
        raise RuntimeError(f"rollback: new_lengths must be int32 or int64, got {new_lengths.dtype}")
    if new_lengths.device != lengths.device:
        raise RuntimeError(f"rollback: new_lengths on {new_lengths.device}, store lengths on {lengths.device}")
    if check:
        _check_rollback_host(lengths.cpu().long(), new_lengths.cpu().long())
    lengths.copy_(new_lengths)


def _torch_gather(keys, values, lengths, keep_index, keep_lengths, offset, check):
    B = keys.shape[1]
    if check:
        len_h, idx_h = lengths.cpu().long(), keep_index.cpu().long()
        kl_h, off_h = keep_lengths.cpu().long(), offset.cpu().long()
        for b in range(B):
            n, o, L = int(kl_h[b]), int(off_h[b]), int(len_h[b])
            if not 0 <= L <= keys.shape[3]:
                raise RuntimeError(f"gather: row {b} length {L} outside [0, {keys.shape[3]}] (lengths corrupted, "
                                   "e.g. by an unchecked rollback)")
            if not 0 <= n <= idx_h.shape[1]:
                raise RuntimeError(f"gather: row {b} keep_length {n} outside [0, {idx_h.shape[1]}]")
            if not 0 <= o <= L:
                raise RuntimeError(f"gather: row {b} offset {o} outside [0, current length {L}]")
            if o + n > keys.shape[3]:
                raise RuntimeError(f"gather: row {b} would hold {o + n} positions, capacity is {keys.shape[3]}")
            row = idx_h[b, :n]
            if n and (row.min() < 0 or row.max() >= L):
                raise RuntimeError(f"gather: row {b} keep_index outside the row's stored positions [0, {L})")
    for b in range(B):  # B is small; the fallback favours clarity over speed
        n, o = int(keep_lengths[b]), int(offset[b])
        if n:
            idx = keep_index[b, :n].long()
            keys[:, b, :, o:o + n] = keys[:, b, :, idx].clone()  # clone: sources and destinations may overlap
            values[:, b, :, o:o + n] = values[:, b, :, idx].clone()
    lengths.copy_(offset.long() + keep_lengths.long())


def _torch_select_rows(keys, values, lengths, row_index, max_length):
    B = keys.shape[1]
    idx_h = row_index.cpu().long()
    if idx_h.numel() and (idx_h.min() < 0 or idx_h.max() >= B):
        bad = int(((idx_h < 0) | (idx_h >= B)).nonzero()[0, 0])
        raise RuntimeError(f"select_rows: row_index[{bad}] = {int(idx_h[bad])} outside [0, {B})")
    new_lengths = lengths.index_select(0, row_index.long())
    T = keys.shape[3]
    bad = ((new_lengths < 0) | (new_lengths > T)).nonzero()
    if bad.numel():
        r = int(idx_h[int(bad[0, 0])])
        raise RuntimeError(f"select_rows: row {r} length {int(lengths[r])} outside [0, {T}] (lengths corrupted, "
                           "e.g. by an unchecked rollback)")
    longest = int(new_lengths.max()) if new_lengths.numel() else 0
    if longest > max_length:
        raise RuntimeError(f"select_rows: a selected row holds {longest} positions, more than the new capacity "
                           f"max_length = {max_length}")
    L, _, H, T, D = keys.shape
    shape = (L, idx_h.numel(), H, max_length, D)
    new_keys, new_values = keys.new_zeros(shape), values.new_zeros(shape)
    n = min(T, max_length)
    valid = (torch.arange(n, device=keys.device) < new_lengths[:, None])[None, :, None, :, None]
    new_keys[..., :n, :] = keys[:, row_index.long(), :, :n] * valid
    new_values[..., :n, :] = values[:, row_index.long(), :, :n] * valid
    return new_keys, new_values, new_lengths


def _check_rollback_host(cur: torch.Tensor, new: torch.Tensor) -> None:
    """Raise ValueError naming the first row whose new length is negative or above the current one."""
    if not bool(((new < 0) | (new > cur)).any()):  # fast path: rollback is on every step
        return
    neg = (new < 0).nonzero()
    if neg.numel():
        b = int(neg[0, 0])
        raise ValueError(f"rollback: row {b} new length {int(new[b])} is negative")
    up = (new > cur).nonzero()
    if up.numel():
        b = int(up[0, 0])
        raise ValueError(f"rollback: row {b} new length {int(new[b])} exceeds its current length {int(cur[b])} "
                         "(rollback only shortens rows; append to extend them)")


def _use_ext(backend: str | None) -> bool:
    if backend is None:
        return _HAS_EXT
    if backend == "cpp" and not _HAS_EXT:
        raise RuntimeError("backend='cpp' requested but specdec._C is not built")
    if backend not in ("cpp", "torch"):
        raise ValueError(f"backend must be 'cpp', 'torch' or None, got {backend!r}")
    return backend == "cpp"


# ----------------------------------------------------------------------------------------------------
# Public low-level ops.

def append_(keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, new_keys: torch.Tensor,
            new_values: torch.Tensor, layer_start: int = 0, advance: bool = True, max_length: int = -1,
            *, backend: str | None = None) -> None:
    """Write ``q`` new positions per row at ``lengths[b] + arange(q)``, in place.

    Args:
        keys, values: the store, ``[L, B, H_kv, T_max, D]`` contiguous, any float dtype.
        lengths: ``[B]`` int32 on the store's device; advanced by ``q`` when ``advance``.
        new_keys, new_values: ``[L', B, H_kv, q, D]``, store dtype and device, any strides; written to
            layers ``layer_start .. layer_start + L' - 1`` (``L' = L`` writes all layers in one call).
        max_length: ``max(lengths)`` if the caller knows it on the host (lets the CUDA path check the
            capacity without synchronising); ``-1`` = unknown.
    Raises:
        RuntimeError: a negative ``lengths[b]`` or capacity exceeded (``lengths[b] + q > T_max``; nothing
            is written in either case), or a dtype/device/shape mismatch.

    Memory safety: the CPU path always checks the exact lengths. The CUDA path with ``max_length >= 0``
    trusts the hint on the host; if it is wrong the kernel clamps each length to ``[0, T_max]`` and skips
    slots at or past ``T_max``, so it never writes outside the store (the result is then garbage).
    """
    if _use_ext(backend):
        torch.ops.specdec_cpp.cache_append(keys, values, lengths, new_keys, new_values, layer_start, advance,
                                           max_length)
    else:
        _torch_append(keys, values, lengths, new_keys, new_values, layer_start, advance, max_length)


def rollback_(lengths: torch.Tensor, new_lengths: torch.Tensor, check: bool = True, *,
              backend: str | None = None) -> None:
    """Set ``lengths`` (``[B]`` int32) to ``new_lengths`` (``[B]`` int32/int64, same device). O(1), no copy of K/V.

    With ``check`` every ``new_lengths[b]`` must lie in ``[0, lengths[b]]`` (on CUDA this reads both
    to the host). Raises RuntimeError/ValueError naming the offending row. Without ``check`` any value is
    stored; it touches no K/V memory, and the other ops reject (CPU) or clamp (CUDA) such lengths.
    """
    if _use_ext(backend):
        torch.ops.specdec_cpp.cache_rollback(lengths, new_lengths, check)
    else:
        _torch_rollback(lengths, new_lengths, check)


def gather_(keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, keep_index: torch.Tensor,
            keep_lengths: torch.Tensor, offset: torch.Tensor, check: bool = True, *,
            backend: str | None = None) -> None:
    """Move kept positions per row, in place, in one kernel (all layers, keys and values).

    For every row ``b`` and ``j < keep_lengths[b]``: position ``keep_index[b, j]`` moves to
    ``offset[b] + j``; then ``lengths[b] = offset[b] + keep_lengths[b]``. Any index order is allowed
    (sources may overlap destinations). Positions before ``offset[b]`` are untouched: tree acceptance
    passes ``offset = prefix length`` and the accepted path's slots; full compaction passes ``offset = 0``.

    Args:
        keys, values: ``[L, B, H_kv, T_max, D]``; lengths: ``[B]`` int32.
        keep_index: ``[B, N]`` int32/int64, entries ``j < keep_lengths[b]`` in ``[0, lengths[b])``.
        keep_lengths: ``[B]`` int32/int64 in ``[0, N]``; offset: ``[B]`` int32/int64 in ``[0, lengths[b]]``.
        check: validate the index values and ``lengths`` (in ``[0, T_max]``); always done on CPU, on
            CUDA it costs one synchronisation.

    Memory safety: unchecked on CUDA, the kernels clamp ``keep_lengths[b]`` to ``[0, N]`` and ``offset[b]``
    to ``[0, T_max]``, skip entries of ``keep_index`` outside ``[0, T_max)`` and destinations at or past
    ``T_max``, and store ``lengths[b] = min(offset[b] + keep_lengths[b], T_max)`` with those clamped values:
    bad input gives garbage rows, never an access outside the store.
    """
    if _use_ext(backend):
        torch.ops.specdec_cpp.cache_gather(keys, values, lengths, keep_index, keep_lengths, offset, check)
    else:
        _torch_gather(keys, values, lengths, keep_index, keep_lengths, offset, check)


def select_rows(keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, row_index: torch.Tensor,
                max_length: int | None = None, *, backend: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build a new store whose row ``r`` is old row ``row_index[r]`` (drop, reorder, repeat rows), one kernel.

    Args:
        keys, values: ``[L, B, H_kv, T_max, D]``; lengths: ``[B]`` int32.
        row_index: ``[B']`` int64/int32 on the store's device, entries in ``[0, B)``.
        max_length: capacity of the new store (default ``T_max``; larger = grow).
    Raises:
        RuntimeError: an entry of ``row_index`` outside ``[0, B)``, a selected row's length outside
            ``[0, T_max]``, or one above ``max_length``. Always checked on the host (also on CUDA, one
            synchronisation); the CUDA kernel additionally reads a bad row as zeros and clamps lengths.
    Returns:
        ``(keys [L, B', H_kv, max_length, D], values [same], lengths [B'] int32)``; slots past each
        row's length are zero.
    """
    max_length = keys.shape[3] if max_length is None else int(max_length)
    if _use_ext(backend):
        return torch.ops.specdec_cpp.cache_select_rows(keys, values, lengths, row_index, max_length)
    return _torch_select_rows(keys, values, lengths, row_index, max_length)


# ----------------------------------------------------------------------------------------------------
# The store object.

def _host_copy(x, n: int, what: str) -> torch.Tensor:
    """A caller's host copy of ``n`` ints as a CPU int64 tensor (the store's mirror: never a device tensor)."""
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{what} must be a CPU int32/int64 tensor")
    if tuple(x.shape) != (n,):
        raise ValueError(f"{what} must have shape [{n}], got {tuple(x.shape)}")
    return x.to(torch.int64, copy=True)  # the mirror must not alias the caller's (numpy) memory


def _as_index(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x, dtype=torch.int64)
    if x.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 tensor, got {x.dtype}")
    return x


class KVStore:
    """Preallocated keys/values ``[L, B, H_kv, T_max, D]`` with per-row lengths ``[B]`` int32 on the device.

    A host copy of the lengths is kept alongside (``host_lengths``), so view shapes, capacity checks
    and rollback checks never wait on the device; it is updated by every method here, which is why
    ``lengths`` must only be changed through them.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, head_dim: int, max_length: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 backend: str | None = None):
        if min(num_layers, batch_size, num_kv_heads, head_dim) <= 0 or max_length < 0:
            raise ValueError("KVStore: num_layers, batch_size, num_kv_heads, head_dim must be > 0 and max_length >= 0")
        if not dtype.is_floating_point:
            raise TypeError(f"KVStore: dtype must be a floating dtype, got {dtype}")
        _use_ext(backend)  # validates the name
        self.backend = backend
        shape = (num_layers, batch_size, num_kv_heads, max_length, head_dim)
        # Zeros, not empty: masked-out slots still enter attention as 0 * value, and garbage could be NaN.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.int32, device=self.keys.device)
        self.host_lengths = torch.zeros(batch_size, dtype=torch.int64)
        self._longest = 0

    # -- geometry -----------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[2]

    @property
    def capacity(self) -> int:
        """``T_max``: positions per row the store can hold."""
        return self.keys.shape[3]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[4]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def seq_length(self) -> int:
        """Longest row, ``max(lengths)``, as a host int (no device synchronisation)."""
        return self._longest

    def _set_host(self, host: torch.Tensor) -> None:
        self.host_lengths = host.to(torch.int64).cpu()
        self._longest = int(self.host_lengths.max()) if self.host_lengths.numel() else 0

    # -- ops ----------------------------------------------------------------------------------------
    def append(self, new_keys: torch.Tensor, new_values: torch.Tensor, layer: int | None = None, *,
               advance: bool = True) -> None:
        """Write ``q`` positions per row at ``lengths[b] + arange(q)``.

        Args:
            new_keys, new_values: ``[B, H_kv, q, D]`` for one ``layer``, or ``[L, B, H_kv, q, D]`` for
                all layers (``layer=None``); store dtype and device.
            advance: add ``q`` to every row's length afterwards (when writing layer by layer, only the
                last layer's call advances).
        Raises:
            RuntimeError: not enough capacity (nothing written), or dtype/device/shape mismatch.
        """
        if layer is None:
            if new_keys.dim() != 5 or new_keys.shape[0] != self.num_layers:
                raise RuntimeError(f"append: with layer=None new_keys must be [L={self.num_layers}, B, H_kv, q, D], "
                                   f"got {tuple(new_keys.shape)}")
            nk, nv, start = new_keys, new_values, 0
        else:
            if new_keys.dim() != 4 or new_values.dim() != 4:
                raise RuntimeError(f"append: for one layer new_keys must be [B, H_kv, q, D], got {tuple(new_keys.shape)}")
            if not 0 <= layer < self.num_layers:
                raise IndexError(f"append: layer {layer} outside [0, {self.num_layers})")
            nk, nv, start = new_keys.unsqueeze(0), new_values.unsqueeze(0), layer
        if nk.device != self.device or nv.device != self.device:
            raise RuntimeError(f"append: new keys/values on {nk.device}/{nv.device}, store on {self.device}")
        q = nk.shape[3]
        if self._longest + q > self.capacity:
            b = int(self.host_lengths.argmax())
            raise RuntimeError(f"KV cache capacity exceeded: row {b} holds {self._longest} positions, appending {q} "
                               f"needs {self._longest + q} but T_max is {self.capacity}; nothing was written "
                               "(call grow() first)")
        append_(self.keys, self.values, self.lengths, nk, nv, start, advance, self._longest, backend=self.backend)
        if advance and q:
            self.host_lengths += q
            self._longest += q

    def rollback(self, new_lengths: torch.Tensor, *, min_lengths: torch.Tensor | None = None,
                 host_lengths: torch.Tensor | None = None) -> None:
        """Set every row's length: ``new_lengths`` ``[B]`` int32/int64 on the store's device, ``0 <= new <= current``
        (and ``new >= min_lengths``, a host ``[B]`` int tensor, if given).

        O(1) in the sequence length, no K/V data moves. Costs one device-to-host copy of ``B`` ints
        (for the checks and the host mirror), unless the caller passes ``host_lengths``, a CPU copy of
        the same values that it already has (the generator does: it knows what it accepted); then
        nothing waits for the device. Raises TypeError/ValueError with the offending row.
        """
        if not isinstance(new_lengths, torch.Tensor):
            raise TypeError(f"rollback: new_lengths must be a [B] int tensor, got {type(new_lengths).__name__}")
        if new_lengths.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"rollback: new_lengths must be int32 or int64, got {new_lengths.dtype}")
        if tuple(new_lengths.shape) != (self.batch_size,):
            raise ValueError(f"rollback: new_lengths must have shape [B] = [{self.batch_size}], "
                             f"got {tuple(new_lengths.shape)}")
        if new_lengths.device != self.device:
            raise ValueError(f"rollback: new_lengths is on device {new_lengths.device} but the store is on {self.device}")
        if host_lengths is not None:
            host = _host_copy(host_lengths, self.batch_size, "rollback: host_lengths")
        else:
            host = new_lengths.to("cpu", torch.int64)  # waits for the device
        _check_rollback_host(self.host_lengths, host)
        if min_lengths is not None and (host < min_lengths).any():
            b = int((host < min_lengths).nonzero()[0, 0])
            raise ValueError(f"rollback: row {b} new length {int(host[b])} cuts into its left padding "
                             f"({int(min_lengths[b])} slots)")
        rollback_(self.lengths, new_lengths, False, backend=self.backend)  # already checked on the host copy
        self._set_host(host)

    def gather(self, keep_index: torch.Tensor, keep_lengths: torch.Tensor,
               offset: torch.Tensor | None = None) -> None:
        """Keep, per row, the positions ``keep_index[b, :keep_lengths[b]]`` (in that order) at ``offset[b] + j``.

        Args:
            keep_index: ``[B, N]`` int32/int64 slot indices, each ``< lengths[b]``.
            keep_lengths: ``[B]`` int number of valid entries per row.
            offset: ``[B]`` int destination start (default 0 = compact to the front of the store row);
                slots before it are untouched.
        After the call ``lengths = offset + keep_lengths``. One kernel over all layers.
        """
        dev = self.device
        keep_index = _as_index(keep_index, "keep_index").to(dev)
        keep_lengths = _as_index(keep_lengths, "keep_lengths").to(dev)
        offset = torch.zeros_like(keep_lengths) if offset is None else _as_index(offset, "offset").to(dev)
        gather_(self.keys, self.values, self.lengths, keep_index, keep_lengths, offset, True, backend=self.backend)
        self._set_host(offset.cpu().long() + keep_lengths.cpu().long())

    def select_rows(self, index: torch.Tensor, max_length: int | None = None, *,
                    host_index: torch.Tensor | None = None) -> None:
        """Keep rows ``index`` (``[B']`` int), in that order: drop finished rows, reorder, or repeat them.

        Reallocates the store at ``[L, B', H_kv, max_length or T_max, D]`` (one kernel copies the
        stored prefixes); the batch size becomes ``B'``. ``host_index``: a CPU copy of ``index``
        the caller already has, so that nothing waits for the device.
        """
        index = _as_index(index, "index").to(self.device)
        if index.dim() != 1:
            raise ValueError(f"select_rows: index must be [B'], got {tuple(index.shape)}")
        host = index.cpu().long() if host_index is None else _host_copy(host_index, index.shape[0],
                                                                         "select_rows: host_index")
        if host.numel() and (host.min() < 0 or host.max() >= self.batch_size):
            raise RuntimeError(f"select_rows: row_index out of range for {self.batch_size} rows (the op's error)")
        self.keys, self.values, self.lengths = select_rows(self.keys, self.values, self.lengths, index,
                                                           max_length, backend=self.backend)
        self._set_host(self.host_lengths[host])

    def grow(self, new_max_length: int) -> None:
        """Reallocate with capacity ``new_max_length >= T_max``, keeping every row's stored positions."""
        if new_max_length < self.capacity:
            raise ValueError(f"grow: new_max_length {new_max_length} is below the current capacity {self.capacity}")
        if new_max_length == self.capacity:
            return
        self.select_rows(torch.arange(self.batch_size, device=self.device), new_max_length)

    def reset(self) -> None:
        """Empty every row (lengths 0) and zero the buffers."""
        self.keys.zero_()
        self.values.zero_()
        self.lengths.zero_()
        self._set_host(torch.zeros(self.batch_size, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------
# Hugging Face Cache over the store.

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


class RaggedCache(_HFCache):
    """``transformers.Cache`` over a :class:`KVStore`: per-row lengths, O(1) per-row rollback, batch > 1.

    Driving a model (explicit positions and mask are required for ragged rows; batch 1 without
    left padding also works with neither, like a ``DynamicCache``)::

        cache = RaggedCache.from_model(model, batch_size=B, max_length=T_max)
        out = model(input_ids=ids, position_ids=cache.position_ids(q), attention_mask=cache.attention_mask(q),
                    past_key_values=cache, use_cache=True)   # every row advances by q
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

    # -- tree steps ----------------------------------------------------------------------------------
    # A tree step feeds, per row, ``[root, node 0, ..., node N-1]`` (q = N + 1 positions): the root is the
    # pending token (the last emitted one, not yet in the cache), node i a drafted token whose parent is
    # ``tree_parents[b, i]`` (-1 = the root). The step's slots are ``lengths[b] + t`` with ``t = 0`` the root
    # and ``t = i + 1`` node i. After verification, :meth:`compact_tree` keeps the root and the accepted path.

    def _remember_tree_step(self, num_nodes: int) -> None:
        # what compact_tree needs to know about the step, on the host (no device reads)
        self._tree_step = (int(num_nodes), self.store.host_lengths.clone())

    def tree_position_ids(self, tree_parents: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, N+1]`` int64 position ids of a tree step ``[root, node 0, ..., node N-1]``.

        The root sits at ``lengths[b] - start[b]`` (like ``position_ids(1)``), node ``i`` at the root's
        position ``+ 1 + depth(i)`` (depth 0 = a child of the root): each token gets the position it
        would have in its root-to-node path. Unused nodes (``valid[b, i]`` False) get the root's position
        (any position would do: they are masked).

        Args:
            tree_parents: ``[B, N]`` int32/int64 on the cache's device, ``tree_parents[b, i]`` in
                ``[-1, i)`` (-1 = child of the root); see :func:`tree_ancestors` for other values.
            valid: ``[B, N]`` bool, False for unused slots (``tree_token_ids == -1``); None = all used.
        No host synchronisation.
        """
        anc = tree_ancestors(tree_parents.to(self.store.device), valid)
        self._remember_tree_step(anc.shape[1] - 1)
        return self._tree_positions(anc)

    def _tree_positions(self, anc: torch.Tensor) -> torch.Tensor:
        # number of ancestors (root included, self excluded) = depth + 1 for a node, 0 for the root
        return (self.store.lengths - self.start).long()[:, None] + anc.sum(-1) - 1

    def tree_attention_mask(self, tree_parents: torch.Tensor, valid: torch.Tensor | None = None, *,
                            additive: bool | None = None) -> torch.Tensor:
        """4D mask ``[B, 1, N+1, max(lengths) + N+1]`` of a tree step ``[root, node 0, ..., node N-1]``.

        Query ``t`` of row ``b`` (``t = 0`` the root, ``t = i + 1`` node ``i``) sits in slot ``lengths[b] + t``
        and attends the row's committed prefix (slots ``start[b] .. lengths[b] - 1``), itself and its
        ancestors among the step's slots (the root, slot ``lengths[b]``, is every used node's ancestor).
        An unused node (``valid[b, i]`` False) attends only itself (no fully masked query row: ``sdpa``
        would give NaN) and is nobody's ancestor. With ``sliding_window`` set, key ``s`` is visible only if
        ``position(query) - position(s) < sliding_window``, positions being those of
        :meth:`tree_position_ids` (so within the tree the distance is the difference of depths).

        Args:
            tree_parents: ``[B, N]`` int, as in :meth:`tree_position_ids`.
            valid: ``[B, N]`` bool or None (all used).
            additive: as in :meth:`attention_mask` (default: additive iff the model uses ``eager``).
        Returns bool (True = attend) or an additive 0 / ``finfo(dtype).min`` mask in the cache's dtype.
        Built on the device with tensor ops only (no host synchronisation, no loop over rows).
        """
        dev = self.store.device
        anc = tree_ancestors(tree_parents.to(dev), valid)  # [B, q, q]
        B, q = anc.shape[0], anc.shape[1]
        self._remember_tree_step(q - 1)
        kv_len = self.store.seq_length + q
        base = self.store.lengths.long()[:, None]  # [B, 1]: slot of the root
        slot = torch.arange(kv_len, device=dev)[None, :]  # [1, kv]
        rel = slot - base  # [B, kv]: index in the step (0 = root) for the step's slots
        in_step = (rel >= 0) & (rel < q)
        rel_c = rel.clamp(0, q - 1)
        step = anc.gather(2, rel_c[:, None, :].expand(B, q, kv_len)) & in_step[:, None, :]  # [B, q, kv]
        used = anc[:, :, 0]  # [B, q]: the root and every used node have the root as ancestor
        prefix = (slot >= self.start.long()[:, None]) & (rel < 0)  # [B, kv]
        allowed = step | (prefix[:, None, :] & used[:, :, None])
        if self.sliding_window is not None:
            pos = self._tree_positions(anc)  # [B, q]
            key_pos = torch.where(in_step, pos.gather(1, rel_c), slot - self.start.long()[:, None])  # [B, kv]
            allowed &= (pos[:, :, None] - key_pos[:, None, :]) < self.sliding_window
        allowed |= rel[:, None, :] == torch.arange(q, device=dev)[None, :, None]  # every query sees itself
        return self._mask(allowed[:, None], additive)

    def compact_tree(self, accepted_nodes: torch.Tensor, num_accepted: torch.Tensor, *,
                     num_nodes: int | None = None, host_lengths: torch.Tensor | None = None) -> None:
        """After a verified tree step: keep each row's root and accepted path, drop the other nodes.

        The step appended ``N + 1`` slots per row at ``L_b`` (the length before the step): the root at
        ``L_b``, node ``i`` at ``L_b + 1 + i``. Row ``b`` keeps the root and moves nodes
        ``accepted_nodes[b, :num_accepted[b]]`` (the accepted root-to-leaf path, in order) to the contiguous
        slots ``L_b + 1 .. L_b + num_accepted[b]``; its length becomes ``L_b + 1 + num_accepted[b]``.
        Only the accepted slots move (the prefix is not copied): one gather kernel for all layers, keys
        and values (C++ on CPU, CUDA on GPU, PyTorch fallback without the extension). Like
        :meth:`rollback`, afterwards the next step's logits equal a fresh prefill of the kept sequence.

        Args:
            accepted_nodes: ``[B, D]`` int32/int64 node indices in ``[0, N)`` (``verify_tree``'s
                ``accepted_nodes``; entries past ``num_accepted[b]`` are ignored).
            num_accepted: ``[B]`` int32/int64 in ``[0, min(D, N)]``.
            num_nodes: ``N`` of the step; default: the ``N`` of the last :meth:`tree_attention_mask` /
                :meth:`tree_position_ids` call, whose step must be the last thing appended. When given while
                such a step is remembered, it must be that step's ``N`` (ValueError otherwise).
            host_lengths: a CPU ``[B]`` int tensor of the new lengths ``L_b + 1 + num_accepted[b]`` when the
                caller has them (the generator does): then nothing waits for the device, the host values are
                checked against ``[L_b + 1, L_b + 1 + N]``, the device lengths are derived from them (so host
                and device lengths cannot disagree) and the device inputs are clamped into range (garbage
                in, garbage rows out, never a write outside the step's slots). Without it the inputs are
                read back (one synchronisation on CUDA) and checked: ValueError names the row.
        On a CPU cache every input is checked whether or not ``host_lengths`` is given (reading costs
        nothing there): ``num_accepted`` in range and equal to what ``host_lengths`` says, node indices
        in ``[0, N)`` and strictly increasing along each row's path (a root-to-node path of a tree whose
        parents come before their children; the in-place move also relies on it).
        """
        store = self.store
        if num_nodes is None:
            step = getattr(self, "_tree_step", None)
            if step is None:
                raise RuntimeError("compact_tree: no tree step to compact (run a step built with "
                                   "tree_attention_mask, or pass num_nodes)")
            num_nodes, before = step
            if tuple(before.shape) != (self.batch_size,) or not torch.equal(store.host_lengths,
                                                                            before + num_nodes + 1):
                raise RuntimeError(f"compact_tree: the cache is not one tree step of {num_nodes + 1} positions past "
                                   "the last tree_attention_mask call (pass num_nodes to compact anyway)")
        else:
            step = getattr(self, "_tree_step", None)
            if step is not None and int(num_nodes) != step[0]:
                raise ValueError(f"compact_tree: num_nodes={int(num_nodes)} but the last tree step "
                                 f"(tree_attention_mask / tree_position_ids) had {step[0]} nodes")
        N = int(num_nodes)
        if N < 0:
            raise ValueError(f"compact_tree: num_nodes must be >= 0, got {N}")
        base_host = store.host_lengths - (N + 1)
        short = (base_host < self._host_start).nonzero()
        if short.numel():
            b = int(short[0, 0])
            raise ValueError(f"compact_tree: row {b} holds {int(store.host_lengths[b])} slots, fewer than its left "
                             f"padding plus a tree step of {N + 1}")
        accepted_nodes = _as_index(accepted_nodes, "accepted_nodes")
        num_accepted = num_accepted_in = _as_index(num_accepted, "num_accepted")
        if accepted_nodes.dim() != 2 or accepted_nodes.shape[0] != self.batch_size \
                or tuple(num_accepted.shape) != (self.batch_size,):
            raise ValueError(f"compact_tree: need accepted_nodes [B, D] and num_accepted [B] with B = "
                             f"{self.batch_size}, got {tuple(accepted_nodes.shape)} and {tuple(num_accepted.shape)}")
        depth = min(accepted_nodes.shape[1], N)
        if host_lengths is not None:
            host = _host_copy(host_lengths, self.batch_size, "compact_tree: host_lengths")
            bad = ((host < base_host + 1) | (host > base_host + 1 + depth)).nonzero()
            if bad.numel():
                b = int(bad[0, 0])
                raise ValueError(f"compact_tree: row {b} host length {int(host[b])} outside [{int(base_host[b]) + 1}, "
                                 f"{int(base_host[b]) + 1 + depth}] (root + at most {depth} accepted nodes)")
            # the device lengths follow the host's: one small copy to the device, no wait for it
            num_accepted = (host - base_host - 1).to(store.device, non_blocking=True)
        on_host = accepted_nodes.device.type == "cpu" and num_accepted_in.device.type == "cpu"
        if host_lengths is None or on_host:  # read back (a synchronisation on CUDA) and check
            n_h, nodes_h = num_accepted.cpu().long(), accepted_nodes.cpu().long()
            if host_lengths is not None:
                n_given = num_accepted_in.long()
                bad = (n_given != n_h).nonzero()
                if bad.numel():
                    b = int(bad[0, 0])
                    raise ValueError(f"compact_tree: row {b} host length {int(host[b])} means {int(n_h[b])} "
                                     f"accepted nodes, num_accepted says {int(n_given[b])}")
            bad = ((n_h < 0) | (n_h > depth)).nonzero()
            if bad.numel():
                b = int(bad[0, 0])
                raise ValueError(f"compact_tree: row {b} num_accepted {int(n_h[b])} outside [0, {depth}]")
            cols = torch.arange(nodes_h.shape[1])[None, :] < n_h[:, None]
            bad = (cols & ((nodes_h < 0) | (nodes_h >= N))).nonzero()
            if bad.numel():
                b, j = (int(x) for x in bad[0])
                raise ValueError(f"compact_tree: row {b} accepted_nodes[{j}] = {int(nodes_h[b, j])} outside the "
                                 f"tree's nodes [0, {N})")
            order = cols[:, 1:] & (nodes_h[:, 1:] <= nodes_h[:, :-1])
            bad = order.nonzero()
            if bad.numel():
                b, j = (int(x) for x in bad[0])
                raise ValueError(f"compact_tree: row {b} accepted_nodes[{j + 1}] = {int(nodes_h[b, j + 1])} after "
                                 f"{int(nodes_h[b, j])}: a path's nodes are strictly increasing (duplicates or "
                                 "out-of-order indices would move slots already overwritten)")
            host = base_host + 1 + n_h
        compact_tree_(store.keys, store.values, store.lengths, accepted_nodes.to(store.device),
                      num_accepted.to(store.device), N, backend=store.backend)
        store._set_host(host)
        self._tree_step = None


# ----------------------------------------------------------------------------------------------------
# Tree steps: ancestor closure (for masks and positions) and compaction of the accepted path.

__all__ += ["tree_ancestors", "compact_tree_"]


def tree_ancestors(tree_parents: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, N+1, N+1]`` bool: ``anc[b, t, s]`` = step slot ``s`` is ``t`` itself or an ancestor of ``t``.

    Step index 0 is the root (the pending token), ``i + 1`` node ``i``. ``tree_parents`` ``[B, N]`` int:
    the parent of node ``i`` (``-1`` = the root, else a node index ``< i``). ``valid`` ``[B, N]`` bool
    (None = all used): an unused node is only its own ancestor and nobody else's.

    Computed on the tensors' device without host synchronisation and without a loop over rows: the
    parent relation (plus the identity) is closed transitively by ``ceil(log2 N)`` squarings of the
    ``[N+1, N+1]`` reachability matrix (batched matmuls on 0/1 values, exact in fp32). Parents outside
    ``[-1, N)`` are clamped into it (never an out-of-range read); parents ``>= i`` violate the encoding
    and give whatever relation the resulting graph closes to (still no fully empty row).
    """
    if tree_parents.dim() != 2:
        raise ValueError(f"tree_parents must be [B, N], got {tuple(tree_parents.shape)}")
    if tree_parents.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tree_parents must be int32/int64, got {tree_parents.dtype}")
    B, N = tree_parents.shape
    dev = tree_parents.device
    if valid is not None:
        if tuple(valid.shape) != (B, N) or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a [B, N] = [{B}, {N}] bool tensor, got {tuple(valid.shape)} {valid.dtype}")
        valid = valid.to(dev)
    parent = tree_parents.long().clamp(-1, max(N - 1, -1)) + 1  # [B, N]: parent's step index (0 = root)
    adj = torch.zeros(B, N + 1, N + 1, device=dev)
    adj[:, 1:].scatter_(2, parent[:, :, None], 1.0)
    eye = torch.eye(N + 1, device=dev, dtype=torch.bool)
    if valid is not None:
        used = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=dev), valid], 1)  # [B, N+1]
        adj *= (used[:, :, None] & used[:, None, :])  # unused: no edge in or out
    adj += eye
    for _ in range(max(N - 1, 0).bit_length()):  # paths of length up to 2^k >= N - 1 edges (+1 from adj)
        adj = (torch.bmm(adj, adj) > 0).float()
    return adj > 0


def compact_tree_(keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, accepted_nodes: torch.Tensor,
                  num_accepted: torch.Tensor, num_nodes: int, *, backend: str | None = None) -> None:
    """Low-level tree compaction over raw store tensors (what :meth:`RaggedCache.compact_tree` runs).

    The last ``num_nodes + 1`` slots of every row are a tree step appended at ``L_b = lengths[b] -
    num_nodes - 1``. Keeps the root slot ``L_b`` and moves slots ``L_b + 1 + accepted_nodes[b, j]``,
    ``j < num_accepted[b]``, to ``L_b + 1 + j``; sets ``lengths[b] = L_b + 1 + num_accepted[b]``. One
    :func:`gather_` call (one kernel for all layers) that copies only the accepted slots.

    Never accesses memory outside the store, on any input: ``num_accepted`` is clamped to
    ``[0, min(D, N)]``, ``accepted_nodes`` to ``[0, N)``, ``L_b`` to ``[0, T_max - N - 1]``, all on the
    device (no synchronisation). Corrupted ``lengths`` (outside ``[N + 1, T_max]``) then raise on CPU
    (the gather's own checks); on CUDA (unchecked, no synchronisation) they give garbage rows in bounds.
    """
    N = int(num_nodes)
    T = keys.shape[3]
    if N < 0 or N + 1 > T:
        raise ValueError(f"compact_tree: num_nodes {N} must be in [0, T_max - 1 = {T - 1}]")
    if accepted_nodes.dim() != 2 or num_accepted.dim() != 1:
        raise ValueError(f"compact_tree: need accepted_nodes [B, D] and num_accepted [B], got "
                         f"{tuple(accepted_nodes.shape)} and {tuple(num_accepted.shape)}")
    depth = min(accepted_nodes.shape[1], N)
    n = num_accepted.long().clamp(0, depth)
    nodes = accepted_nodes.long()[:, :depth].clamp(0, max(N - 1, 0))
    base = (lengths.long() - (N + 1)).clamp(0, T - N - 1)
    offset = base + 1
    check = keys.device.type == "cpu"  # free on CPU; on CUDA the kernels clamp instead of synchronising
    gather_(keys, values, lengths, offset[:, None] + nodes, n, offset, check, backend=backend)
