# Holds: KVStore: preallocated keys/values, per-row lengths on the device and their host mirror.
# May use: torch, .store_ops.
"""The ragged KV store object: tensors, per-row lengths, and a host copy of the lengths so that shapes and
checks never wait on the device."""
from __future__ import annotations

import torch

from specdec.cache.store_ops import _check_rollback_host, _use_ext, append_, gather_, rollback_, select_rows


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
