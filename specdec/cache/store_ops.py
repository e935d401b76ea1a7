# Holds: append_, rollback_, gather_, select_rows over raw tensors: specdec._C kernels, fakes, torch fallback.
# May use: torch only.
"""Low-level ops of the ragged KV store, over raw tensors ``keys``/``values`` ``[L, B, H_kv, T_max, D]``
and ``lengths`` ``[B]`` int32.

C++/CUDA kernels of the extension ``specdec._C`` (``torch.ops.specdec_cpp.cache_*``), with fake kernels
registered here so they trace under ``torch.compile``/FakeTensor; a plain-PyTorch fallback runs when the
extension is not built (``SPECDEC_NO_EXT=1``).
"""
from __future__ import annotations

import torch

try:  # the extension registers torch.ops.specdec_cpp.cache_*; `import torch` must come first
    import specdec._C  # noqa: F401

    _HAS_EXT = hasattr(torch.ops.specdec_cpp, "cache_append")
except ImportError:  # package built with SPECDEC_NO_EXT=1: the PyTorch fallback below serves
    _HAS_EXT = False


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
