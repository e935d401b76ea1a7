"""Public op API: ``verify`` (fused chain verification), ``verify_tree`` (tree verification) and
``sample`` (fused sampling).

Each op is a ``torch.library`` custom op (``torch.ops.specdec.verify`` / ``verify_block`` (``verify``'s
``method="block"``) / ``verify_tree`` / ``sample``) with a fake implementation, so it traces under
``torch.compile``. The Python functions below turn scalar or per-row arguments into per-row tensors
(on the device, no host sync), optionally validate them (``check=True``), and call the op, which
dispatches to one of three implementations:

- ``"triton"``: Triton kernels in ``specdec.kernels`` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, which is how the tests run them);
- ``"cpp"``: C++ CPU kernels in the extension ``specdec._C`` (the fast path on CPU);
- ``"reference"``: ``specdec.reference``, plain PyTorch in float64 (any device; slow).

``backend="auto"`` picks triton for CUDA tensors and cpp for CPU tensors, falling back to the
reference when those are unavailable; ``backends()`` reports what loaded and why not.

Why one file of 800 lines: the four ops share every helper here (per-row arguments without a host
sync, the checks that name the argument, backend choice, the custom-op registrations and fake
kernels); split per op, each file would import most of the others. Read it as: helpers, then one
section per op (custom op + fake, then the public function).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import torch

from specdec import reference

__all__ = ["verify", "verify_tree", "sample", "backends", "row_seeds", "BACKENDS"]

BACKENDS = ("auto", "reference", "cpp", "triton")
Scalar = Union[int, float]
PerRow = Union[Scalar, Sequence, torch.Tensor]

_status: dict = {}


def _load_cpp():
    if "cpp" not in _status:
        try:
            import specdec._C  # noqa: F401  (registers torch.ops.specdec_cpp.*)

            _status["cpp"] = (True, "specdec._C loaded" + (
                " (with CUDA kernels)" if torch.ops.specdec_cpp.has_cuda_kernels() else ""))
        except Exception as exc:  # report, never hide: backends() shows the reason
            _status["cpp"] = (False, f"specdec._C failed to load: {type(exc).__name__}: {exc}")
    return _status["cpp"][0]


def _load_triton():
    if "triton" not in _status:
        try:
            import specdec.kernels.sample  # noqa: F401
            import specdec.kernels.verify  # noqa: F401
            import specdec.kernels.verify_tree  # noqa: F401
            import specdec.kernels.verify_block  # noqa: F401

            if os.environ.get("TRITON_INTERPRET") == "1":
                msg = "triton kernels loaded (interpreter on: CPU tensors allowed, slow)"
            elif torch.cuda.is_available():
                msg = "triton kernels loaded (CUDA)"
            else:
                msg = "triton kernels loaded, idle: needs CUDA tensors (no CUDA device here)"
            _status["triton"] = (True, msg)
        except Exception as exc:
            _status["triton"] = (False, f"triton kernels failed to load: {type(exc).__name__}: {exc}")
    return _status["triton"][0]


def backends() -> dict:
    """Which implementations are usable here: ``{name: (available: bool, reason: str)}``."""
    _load_cpp()
    _load_triton()
    out = {"reference": (True, "plain PyTorch, always available")}
    out["cpp"] = _status["cpp"]
    out["triton"] = _status["triton"]
    return out


def _triton_ok_for(device: torch.device) -> bool:
    return _load_triton() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def _pick(backend: str, device: torch.device) -> str:
    if backend == "auto":
        if device.type == "cuda" and _triton_ok_for(device):
            return "triton"
        if device.type == "cpu" and _load_cpp():
            return "cpp"
        return "reference"
    if backend == "cpp":
        if not _load_cpp():
            raise RuntimeError(_status["cpp"][1])
        if device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on CPU tensors, got device {device}")
    elif backend == "triton":
        if not _load_triton():
            raise RuntimeError(_status["triton"][1])
        if not _triton_ok_for(device):
            raise ValueError("backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    elif backend != "reference":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


# ---------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("specdec::verify", mutates_args=())
def _verify_op(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    temperature: torch.Tensor,
    top_k: Optional[torch.Tensor],
    top_p: Optional[torch.Tensor],
    seed: torch.Tensor,
    offset: torch.Tensor,
    backend: str,
    return_logprobs: bool = False,
    token_bitmask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (output_ids, num_accepted, processed_logprobs, raw_logprobs); the logprobs are
    [B, K+1] float32 with return_logprobs, else [B, 0] (nothing computed)."""
    impl = _pick(backend, target_logits.device)
    if impl == "reference":
        top_k, top_p = _materialise(top_k, top_p, temperature)
        out = reference.verify(target_logits, draft_token_ids, draft_probs, temperature, top_k, top_p,
                               seed, offset, token_bitmask)
        B, K1, _ = target_logits.shape
        positions = torch.arange(K1, device=target_logits.device).expand(B, K1)
        return (*out, *_reference_logprobs(return_logprobs, target_logits, positions, out[0], temperature,
                                           top_k, top_p, token_bitmask))
    t_ok = torch.nan_to_num(temperature, nan=1.0, posinf=1.0)  # the kernels never see NaN / inf
    if impl == "triton":  # None = filter off everywhere: the kernels then skip the threshold pass
        from specdec.kernels import verify as tv

        out = tv.verify(target_logits, draft_token_ids, draft_probs, t_ok, top_k, top_p, seed, offset,
                        return_logprobs=return_logprobs, token_bitmask=token_bitmask)
        out = _pad_logprobs(out, 2, return_logprobs)
    else:
        top_k, top_p = _materialise(top_k, top_p, temperature)
        out = torch.ops.specdec_cpp.verify(target_logits, draft_token_ids, draft_probs, t_ok, top_k, top_p,
                                           seed, offset, return_logprobs, token_bitmask)
    return (*_void_bad_temperature(temperature, *out[:2]), *_void_logprobs(temperature, *out[2:]))


@_verify_op.register_fake
def _(target_logits, draft_token_ids, draft_probs, temperature, top_k, top_p, seed, offset, backend,
      return_logprobs=False, token_bitmask=None):
    B, K1, _ = target_logits.shape
    return (target_logits.new_empty((B, K1), dtype=torch.int64),
            target_logits.new_empty((B,), dtype=torch.int32),
            *_fake_logprobs(target_logits, B, K1, return_logprobs))


@torch.library.custom_op("specdec::verify_block", mutates_args=())
def _verify_block_op(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: torch.Tensor,
    temperature: torch.Tensor,
    top_k: Optional[torch.Tensor],
    top_p: Optional[torch.Tensor],
    seed: torch.Tensor,
    offset: torch.Tensor,
    backend: str,
    token_bitmask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    impl = _pick(backend, target_logits.device)
    if impl == "reference":
        top_k, top_p = _materialise(top_k, top_p, temperature)
        return reference.verify_block(target_logits, draft_token_ids, draft_probs, temperature, top_k, top_p,
                                      seed, offset, token_bitmask)
    t_ok = torch.nan_to_num(temperature, nan=1.0, posinf=1.0)  # the kernels never see NaN / inf
    if impl == "triton":
        from specdec.kernels import verify_block as tvb

        out = tvb.verify_block(target_logits, draft_token_ids, draft_probs, t_ok, top_k, top_p, seed, offset,
                               token_bitmask=token_bitmask)
    else:
        top_k, top_p = _materialise(top_k, top_p, temperature)
        out = torch.ops.specdec_cpp.verify_block(target_logits, draft_token_ids, draft_probs, t_ok, top_k, top_p,
                                                 seed, offset, token_bitmask)
    return _void_bad_temperature(temperature, *out)


@_verify_block_op.register_fake
def _(target_logits, draft_token_ids, draft_probs, temperature, top_k, top_p, seed, offset, backend,
      token_bitmask=None):
    B, K1, _ = target_logits.shape
    return (target_logits.new_empty((B, K1), dtype=torch.int64),
            target_logits.new_empty((B,), dtype=torch.int32))


@torch.library.custom_op("specdec::verify_tree", mutates_args=())
def _verify_tree_op(
    target_logits: torch.Tensor,
    tree_token_ids: torch.Tensor,
    tree_parents: torch.Tensor,
    draft_probs: Optional[torch.Tensor],
    temperature: torch.Tensor,
    top_k: Optional[torch.Tensor],
    top_p: Optional[torch.Tensor],
    seed: torch.Tensor,
    offset: torch.Tensor,
    max_depth: int,
    backend: str,
    return_logprobs: bool = False,
    token_bitmask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (output_ids, num_accepted, accepted_nodes, processed_logprobs, raw_logprobs); the
    logprobs are [B, D+1] float32 with return_logprobs, else [B, 0] (nothing computed)."""
    impl = _pick(backend, target_logits.device)
    if impl == "reference":
        top_k, top_p = _materialise(top_k, top_p, temperature)
        out = reference.verify_tree(target_logits, tree_token_ids, tree_parents, draft_probs, temperature,
                                    top_k, top_p, seed, offset, max_depth, token_bitmask)
        positions = reference.tree_source_positions(out[2])
        return (*out, *_reference_logprobs(return_logprobs, target_logits, positions, out[0], temperature,
                                           top_k, top_p, token_bitmask))
    t_ok = torch.nan_to_num(temperature, nan=1.0, posinf=1.0)  # the kernels never see NaN / inf
    if impl == "triton":
        from specdec.kernels import verify_tree as tvt

        out = tvt.verify_tree(target_logits, tree_token_ids, tree_parents, draft_probs, t_ok, top_k, top_p,
                              seed, offset, max_depth, return_logprobs=return_logprobs,
                              token_bitmask=token_bitmask)
        out = _pad_logprobs(out, 3, return_logprobs)
    else:
        top_k, top_p = _materialise(top_k, top_p, temperature)
        out = torch.ops.specdec_cpp.verify_tree(target_logits, tree_token_ids, tree_parents, draft_probs, t_ok,
                                                top_k, top_p, seed, offset, max_depth, return_logprobs,
                                                token_bitmask)
    return (*_void_bad_temperature(temperature, *out[:3]), *_void_logprobs(temperature, *out[3:]))


@_verify_tree_op.register_fake
def _(target_logits, tree_token_ids, tree_parents, draft_probs, temperature, top_k, top_p, seed, offset,
      max_depth, backend, return_logprobs=False, token_bitmask=None):
    B = target_logits.shape[0]
    return (target_logits.new_empty((B, max_depth + 1), dtype=torch.int64),
            target_logits.new_empty((B,), dtype=torch.int32),
            target_logits.new_empty((B, max_depth), dtype=torch.int64),
            *_fake_logprobs(target_logits, B, max_depth + 1, return_logprobs))


@torch.library.custom_op("specdec::sample", mutates_args=())
def _sample_op(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: Optional[torch.Tensor],
    top_p: Optional[torch.Tensor],
    seed: torch.Tensor,
    offset: torch.Tensor,
    backend: str,
    return_logprobs: bool = False,
    token_bitmask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (token_ids, probs, processed_logprobs, raw_logprobs); the logprobs are [B] float32
    with return_logprobs, else [0] (nothing computed)."""
    impl = _pick(backend, logits.device)
    if impl == "reference":
        top_k, top_p = _materialise(top_k, top_p, temperature)
        out = reference.sample(logits, temperature, top_k, top_p, seed, offset, token_bitmask)
        B = logits.shape[0]
        lps = _reference_logprobs(return_logprobs, logits[:, None], torch.zeros(B, 1, dtype=torch.int64,
                                  device=logits.device), out[0][:, None], temperature, top_k, top_p,
                                  None if token_bitmask is None else token_bitmask[:, None])
        return (*out, *(lp.reshape(-1) for lp in lps))
    t_ok = torch.nan_to_num(temperature, nan=1.0, posinf=1.0)
    if impl == "triton":
        from specdec.kernels import sample as ts

        out = ts.sample(logits, t_ok, top_k, top_p, seed, offset, return_logprobs=return_logprobs,
                        token_bitmask=token_bitmask)
        out = _pad_logprobs(out, 2, return_logprobs, flat=True)
    else:
        top_k, top_p = _materialise(top_k, top_p, temperature)
        out = torch.ops.specdec_cpp.sample(logits, t_ok, top_k, top_p, seed, offset, return_logprobs, token_bitmask)
    return (*_void_bad_temperature(temperature, *out[:2]), *_void_logprobs(temperature, *out[2:]))


@_sample_op.register_fake
def _(logits, temperature, top_k, top_p, seed, offset, backend, return_logprobs=False, token_bitmask=None):
    B, V = logits.shape
    return (logits.new_empty((B,), dtype=torch.int64), logits.new_empty((B, V), dtype=torch.float32),
            *(lp.reshape(-1) for lp in _fake_logprobs(logits, B, 1, return_logprobs)))


# ---------------------------------------------------------------------------------------------
# logprobs (return_logprobs=True): the custom ops always return the two tensors, empty when off


def _fake_logprobs(like, B, M, return_logprobs):
    """(processed, raw) shapes: [B, M] float32 when asked, else [B, 0]."""
    width = M if return_logprobs else 0
    return tuple(like.new_empty((B, width), dtype=torch.float32) for _ in range(2))


def _reference_logprobs(return_logprobs, target_logits, positions, token_ids, temperature, top_k, top_p,
                        token_bitmask=None):
    """The reference backend's logprobs: reference.emitted_logprobs, or [B, 0] when off."""
    if not return_logprobs:
        return _fake_logprobs(target_logits, token_ids.shape[0], 0, False)
    return reference.emitted_logprobs(target_logits, positions, token_ids, temperature, top_k, top_p, token_bitmask)


def _pad_logprobs(out, n, return_logprobs, flat=False):
    """The Triton functions return logprobs only when asked: add the empty pair the op returns
    otherwise ([B, 0], or [0] for ``sample``: ``flat``)."""
    if return_logprobs:
        return out
    B = out[0].shape[0]
    empty = out[0].new_empty((0,) if flat else (B, 0), dtype=torch.float32)
    return (*out[:n], empty, empty.clone())


def _void_logprobs(temperature, *logprobs):
    """-inf logprobs for the rows that ``_void_bad_temperature`` voids (NaN / +inf temperature)."""
    bad = reference._bad_temperature(temperature)
    return tuple(lp.masked_fill(bad.view(-1, *([1] * (lp.dim() - 1))), float("-inf")) if lp.numel() else lp
                 for lp in logprobs)


# ---------------------------------------------------------------------------------------------
# argument handling


def _materialise(top_k, top_p, like):
    """The C++ and reference backends take per-row tensors: None (off) becomes 0 / 1.0."""
    if top_k is None:
        top_k = torch.zeros(like.shape, dtype=torch.int64, device=like.device)
    if top_p is None:
        top_p = torch.ones(like.shape, dtype=torch.float32, device=like.device)
    return top_k, top_p


def _filters(top_k, top_p, B, dev):
    """Per-row top_k / top_p tensors, or None where the caller left the filter off as a scalar
    (known on the host, so the threshold pass is skipped without a sync)."""
    k = None if _is_scalar(top_k) and top_k == 0 else _per_row(top_k, B, torch.int64, dev, "top_k")
    p = None if _is_scalar(top_p) and top_p == 1.0 else _per_row(top_p, B, torch.float32, dev, "top_p")
    return k, p


def _verify_method(method) -> str:
    if method not in ("token", "block"):
        raise ValueError(f'method must be "token" or "block", got {method!r}')
    return method


def _is_scalar(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)

_SEED_STRIDE = 0x9E3779B97F4A7C15  # golden-ratio increment: decorrelates the rows of one seed


def _to_int64(x: int) -> int:
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= (1 << 63) else x


def row_seeds(seed: int, batch_size: int, first_row: int = 0) -> torch.Tensor:
    """Per-row seeds [batch_size] int64 that an int ``seed`` expands to (row r gets a seed derived
    from (seed, first_row + r)). Pass slices of this to get the same tokens for a row whatever
    batch it runs in."""
    return torch.tensor([_to_int64(seed + (first_row + r) * _SEED_STRIDE) for r in range(batch_size)],
                        dtype=torch.int64)


def _per_row(value, B: int, dtype: torch.dtype, device, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta" and torch.device(device).type != "meta":
            raise ValueError(f"{name} is a meta tensor (no data), the other inputs are on {device}")
        if value.is_floating_point() and not dtype.is_floating_point:
            raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.dim() == 0:
            value = value.reshape(1)
        if value.dim() != 1 or value.shape[0] not in (1, B):
            raise ValueError(f"{name} must be a scalar or a [B]={B} tensor, got shape {tuple(value.shape)}")
        return value.to(device=device, dtype=dtype).expand(B).contiguous()
    if isinstance(value, (list, tuple)):
        if len(value) != B:
            raise ValueError(f"{name} has {len(value)} entries, expected B={B}")
        if not dtype.is_floating_point:
            for v in value:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise TypeError(f"{name} entries must be ints, got {type(v).__name__} {v!r}")
                if not -(2**63) <= v < 2**63:
                    raise ValueError(f"{name} entries must fit in int64, got {v}")
        # a host-to-device copy: pass a device tensor on the hot path
        return torch.tensor(value, dtype=dtype, device=device)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, a sequence or a tensor, got {type(value).__name__}")
    if not dtype.is_floating_point:
        if not isinstance(value, int):  # silently truncating 2.7 to 2 would hide a caller's bug
            raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"{name} must fit in int64, got {value}")
    return torch.full((B,), value, dtype=dtype, device=device)


def _seeds(seed, B: int, device) -> torch.Tensor:
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))  # torch's CPU generator: honours manual_seed
    if isinstance(seed, int) and not isinstance(seed, bool):
        # row_seeds computed on the device (int64 arithmetic wraps mod 2^64, as _to_int64 does):
        # an int seed costs no host-to-device copy, so the call stays free of host syncs
        stride = _to_int64(_SEED_STRIDE)
        return torch.arange(B, dtype=torch.int64, device=device) * stride + _to_int64(seed)
    return _per_row(seed, B, torch.int64, device, "seed")


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _same_device(first: torch.Tensor, first_name: str, **others):
    """Tensors on different devices raise (a device comparison costs no sync): a kernel given a
    pointer from another device would read memory that is not its input."""
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"{first_name} must be a torch.Tensor, got {type(first).__name__}")
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device}, {first_name} on {first.device}: "
                             "all tensor inputs must be on one device")


def _as_kernel_float(t: torch.Tensor) -> torch.Tensor:
    """float64 inputs are accepted and computed in float32, like every kernel does (one copy)."""
    return t.float() if t.dtype == torch.float64 else t


def _void_bad_temperature(temperature, out_ids, second, *more_ids):
    """Rows whose temperature is NaN or +inf emit nothing (ids -1; num_accepted 0 / probs 0), on
    every backend: the same rule as ``reference._bad_temperature``. ``more_ids``: further id
    outputs of the op (-1 too). Device ops, no sync."""
    bad = reference._bad_temperature(temperature)
    per_row = lambda t: bad.view(-1, *([1] * (t.dim() - 1)))  # noqa: E731
    second = second.masked_fill(per_row(second), 0)
    return (out_ids.masked_fill(per_row(out_ids), -1), second, *(t.masked_fill(per_row(t), -1) for t in more_ids))


def _check_float(t: torch.Tensor, name: str):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (no data): check=True validates values; "
                         "pass check=False to trace shapes only")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32/float16/bfloat16/float64, got {t.dtype}")


def _check_params(B, device, temperature, top_k, top_p):
    if not bool(torch.isfinite(temperature).all()):
        raise ValueError(f"temperature must be finite (<= 0 = greedy), got {temperature.tolist()}")
    if bool((top_k < 0).any()):
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k.tolist()}")
    if bool(((top_p <= 0) | (top_p > 1) | torch.isnan(top_p)).any()):
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p.tolist()}")


def _check_verify(target_logits, draft_token_ids, draft_probs, temperature, top_k, top_p):
    _check_float(target_logits, "target_logits")
    if target_logits.dim() != 3:
        raise ValueError(f"target_logits must be [B, K+1, V], got shape {tuple(target_logits.shape)}")
    B, K1, Vt = target_logits.shape
    if K1 < 1 or Vt < 1 or B < 1:
        raise ValueError(f"target_logits must have B >= 1, K+1 >= 1, V >= 1, got {tuple(target_logits.shape)}")
    if not isinstance(draft_token_ids, torch.Tensor):
        raise TypeError(f"draft_token_ids must be a torch.Tensor, got {type(draft_token_ids).__name__}")
    if draft_token_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"draft_token_ids must be int32 or int64, got {draft_token_ids.dtype}")
    if tuple(draft_token_ids.shape) != (B, K1 - 1):
        raise ValueError(f"draft_token_ids must be [B, K] = [{B}, {K1 - 1}] to match target_logits "
                         f"{tuple(target_logits.shape)}, got {tuple(draft_token_ids.shape)}")
    if draft_token_ids.device != target_logits.device:
        raise ValueError(f"draft_token_ids is on {draft_token_ids.device}, target_logits on {target_logits.device}")
    Vd = Vt
    if draft_probs is not None:
        _check_float(draft_probs, "draft_probs")
        if draft_probs.dim() != 3 or tuple(draft_probs.shape[:2]) != (B, K1 - 1):
            raise ValueError(f"draft_probs must be [B, K, Vd] = [{B}, {K1 - 1}, Vd], got {tuple(draft_probs.shape)}")
        Vd = draft_probs.shape[2]
        if not 1 <= Vd <= Vt:
            raise ValueError(f"draft_probs vocabulary Vd={Vd} must be in [1, Vt={Vt}]")
        if draft_probs.device != target_logits.device:
            raise ValueError(f"draft_probs is on {draft_probs.device}, target_logits on {target_logits.device}")
        if bool((draft_probs < 0).any()) or not bool(torch.isfinite(draft_probs).all()):
            raise ValueError("draft_probs must be finite and >= 0")
    ids = draft_token_ids.long()
    is_end = ids == -1
    after_end = is_end.long().cummax(dim=1).values.bool()
    bad = after_end & ~is_end
    if bool(bad.any()):
        row = int(bad.any(1).nonzero()[0])
        raise ValueError(f"draft_token_ids row {row}: a draft follows a -1; -1 may only pad the tail")
    oob = ~is_end & ((ids < 0) | (ids >= Vd))
    if bool(oob.any()):
        b, i = (int(x) for x in oob.nonzero()[0])
        raise ValueError(f"draft_token_ids[{b}, {i}] = {int(ids[b, i])} is outside the draft vocabulary [0, {Vd})")
    _check_params(B, target_logits.device, temperature, top_k, top_p)
    # a position without a finite logit is valid input (a grammar mask past a rejection): only
    # the position where a row's token is drawn matters, which the op tells (verify's check)


def _bitmask(token_bitmask, lead: tuple, like: torch.Tensor) -> Optional[torch.Tensor]:
    """Validate ``token_bitmask`` (always: shape, dtype and device are host metadata, no sync) and
    make it contiguous. ``lead`` is the logits' leading shape ([B, K+1], [B, N+1] or [B])."""
    if token_bitmask is None:
        return None
    if not isinstance(token_bitmask, torch.Tensor):
        raise TypeError(f"token_bitmask must be an int32 tensor or None, got {type(token_bitmask).__name__}")
    if token_bitmask.dtype != torch.int32:
        raise TypeError(f"token_bitmask must be int32 (xgrammar's layout), got {token_bitmask.dtype}")
    shape = tuple(token_bitmask.shape)
    if len(shape) != len(lead) + 1 or shape[:-1] != tuple(lead) or shape[-1] < 1:
        dims = ", ".join(str(d) for d in lead)
        raise ValueError(f"token_bitmask must be [{dims}, W] with W >= 1 (W = ceil(V / 32) for V logits), "
                         f"got shape {shape}")
    if token_bitmask.device != like.device:
        raise ValueError(f"token_bitmask is on {token_bitmask.device} but the logits are on {like.device}")
    return token_bitmask.contiguous()


def _check_int_tensor(t, name: str, shape, like: torch.Tensor):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must be [B, N] = {list(shape)} to match target_logits "
                         f"{tuple(like.shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, target_logits on {like.device}")


def _check_verify_tree(target_logits, tree_token_ids, tree_parents, draft_probs, max_depth,
                       temperature, top_k, top_p):
    _check_float(target_logits, "target_logits")
    if target_logits.dim() != 3:
        raise ValueError(f"target_logits must be [B, N+1, V], got shape {tuple(target_logits.shape)}")
    B, N1, Vt = target_logits.shape
    if N1 < 1 or Vt < 1 or B < 1:
        raise ValueError(f"target_logits must have B >= 1, N+1 >= 1, V >= 1, got {tuple(target_logits.shape)}")
    N = N1 - 1
    _check_int_tensor(tree_token_ids, "tree_token_ids", (B, N), target_logits)
    _check_int_tensor(tree_parents, "tree_parents", (B, N), target_logits)
    Vd = Vt
    if draft_probs is not None:
        _check_float(draft_probs, "draft_probs")
        if draft_probs.dim() != 3 or tuple(draft_probs.shape[:2]) != (B, N):
            raise ValueError(f"draft_probs must be [B, N, Vd] = [{B}, {N}, Vd], got {tuple(draft_probs.shape)}")
        Vd = draft_probs.shape[2]
        if not 1 <= Vd <= Vt:
            raise ValueError(f"draft_probs vocabulary Vd={Vd} must be in [1, Vt={Vt}]")
        if draft_probs.device != target_logits.device:
            raise ValueError(f"draft_probs is on {draft_probs.device}, target_logits on {target_logits.device}")
        if bool((draft_probs < 0).any()) or not bool(torch.isfinite(draft_probs).all()):
            raise ValueError("draft_probs must be finite and >= 0")
    tokens = tree_token_ids.long().cpu()
    parents = tree_parents.long().cpu()
    used = tokens != -1
    oob = used & ((tokens < 0) | (tokens >= Vd))
    if bool(oob.any()):
        b, i = (int(x) for x in oob.nonzero()[0])
        raise ValueError(f"tree_token_ids[{b}, {i}] = {int(tokens[b, i])} is outside the draft vocabulary "
                         f"[0, {Vd}) (-1 marks an unused slot)")
    idx = torch.arange(N)
    bad = used & (parents != -1) & ((parents < 0) | (parents >= idx[None]))
    if bool(bad.any()):
        b, i = (int(x) for x in bad.nonzero()[0])
        raise ValueError(f"tree_parents[{b}, {i}] = {int(parents[b, i])}: a node's parent must be -1 (the root) "
                         f"or an earlier node index in [0, {i}) (parents before children)")
    orphan = used & (parents >= 0) & ~used.gather(1, parents.clamp(0, max(N - 1, 0)))
    if bool(orphan.any()):
        b, i = (int(x) for x in orphan.nonzero()[0])
        raise ValueError(f"tree_parents[{b}, {i}] = {int(parents[b, i])} is an unused slot "
                         f"(tree_token_ids[{b}, {int(parents[b, i])}] = -1): a used node needs a used parent")
    _, depth = reference.tree_structure(tokens, parents, N)
    deep = depth > max_depth
    if bool(deep.any()):
        b, i = (int(x) for x in deep.nonzero()[0])
        raise ValueError(f"max_depth={max_depth} but node [{b}, {i}] is at depth {int(depth[b, i])}: "
                         "nodes deeper than max_depth would be ignored")
    _check_params(B, target_logits.device, temperature, top_k, top_p)


# ---------------------------------------------------------------------------------------------
# public functions


def verify(
    target_logits: torch.Tensor,
    draft_token_ids: torch.Tensor,
    draft_probs: Optional[torch.Tensor] = None,
    *,
    temperature: PerRow = 1.0,
    top_k: PerRow = 0,
    top_p: PerRow = 1.0,
    seed: Optional[PerRow] = None,
    offset: PerRow = 0,
    check: bool = False,
    backend: str = "auto",
    return_logprobs: bool = False,
    method: str = "token",
    token_bitmask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, ...]:
    """Fused chain verification of K draft tokens per row (speculative sampling, exact).

    Args:
        target_logits: [B, K+1, Vt] float32/float16/bfloat16, the target's logits at each draft
            position; the last position is the bonus position.
        draft_token_ids: [B, K] int32/int64; -1 marks "no draft" (ragged rows: drafts, then -1s).
        draft_probs: [B, K, Vd] float, Vd <= Vt: the distribution each draft was sampled from;
            None for deterministic drafters (n-gram, argmax): "sample and compare", position j
            emits the target's own sample (what ``sample`` draws with offset + j), drafts are
            accepted while they equal it. With offset = the row's token index, the emitted text
            is then that of plain sampling with the same seed, whatever the drafts.
            A NaN in draft_probs counts as 0 (every backend and method; ``check=True`` raises).
        temperature: float or [B]; <= 0 makes a row greedy (0, or vLLM's -1; rows may mix greedy
            and sampled). A NaN or +inf temperature voids its row (all -1, num_accepted 0).
        top_k: int or [B] (0 = off); top_p: float or [B] (1.0 = off), applied to the target.
        seed: int (expanded per row with ``row_seeds``, on the device), [B] int64 tensor (a list
            costs a host-to-device copy), or None (drawn from
            torch's CPU generator); offset: int or [B] int64, the Philox counter offset of
            position 0; position j draws with offset + j. Pass each row's token index (its
            sequence length) to key the random numbers by absolute position.
        check: validate eagerly (host sync) and raise ValueError/TypeError naming the argument.
        backend: "auto", "cpp", "triton" or "reference".
        return_logprobs: also return the log-probabilities of the emitted tokens (below),
            computed from the statistics the op already keeps per position (no second pass over
            the vocabulary). False returns exactly the two outputs below.
        method: "token" (default: each draft accepted with probability min(1, p/q), stop at the
            first rejection) or "block" (Sun et al., ICLR 2025: the chain verified jointly;
            exact too, and never fewer accepted drafts in expectation; ``reference.verify_block``
            has the algorithm). Same inputs, outputs and seeding (draws keyed by row seed and
            offset + position). "block" reads every draft position (not only up to the first
            rejection) and one more logits / draft_probs row per test of its backward scan.
            Without draft_probs, and for greedy rows, it is
            "token" token for token: with a one-hot q each prefix is already accepted with its
            target probability, the most any exact verifier can, so the two coincide (explicit
            one-hot draft_probs run the block algorithm: other tokens, the same acceptance).
            With return_logprobs, "block" gets its logprobs from a second pass over the emitted
            positions (``reference.emitted_logprobs``), not from its kernel's statistics.
        token_bitmask: [B, K+1, W] int32 or None: which ids each position allows (structured
            output), in xgrammar's layout (``allocate_token_bitmask`` / ``fill_next_token_bitmask``):
            bit ``i % 32`` of word ``i // 32`` set = id i allowed; ids from 32 * W on are banned
            (W = ceil(V / 32) normally; a mask sized for a smaller tokenizer bans the padding ids).
            Position j's target becomes the target restricted to its allowed ids, exactly as if
            the other logits were -inf: the mask comes first, then temperature, top-k (the k best
            allowed ids) and top-p (over the allowed mass); greedy takes the argmax over allowed
            ids. A draft whose bit is 0 is never accepted; a position with no allowed finite logit
            is a position with no finite logit (above). Applied inside every backend's kernels,
            in the loads of the logits: no masked copy, no extra pass, no sync. None: no mask.

    Returns:
        output_ids: [B, K+1] int64: accepted drafts, one recovered-or-bonus token, then -1.
        num_accepted: [B] int32 in [0, K]; tokens emitted per row = num_accepted + 1. A row
            emits nothing (all -1, num_accepted 0) only when the position its token is drawn from
            has no finite logit; positions after it are never looked at.
        processed_logprobs (return_logprobs only): [B, K+1] float32, log p(output_ids[b, j]) under
            the target distribution at position j after the token mask, temperature, top-k and
            top-p (vLLM's processed logprobs); greedy rows give log_softmax at temperature 1 of
            the masked logits (the raw value when there is no mask). A token emitted after a
            rejection gets the target's value there, not the residual's. -inf where output_ids
            is -1.
        raw_logprobs (return_logprobs only): [B, K+1] float32, log_softmax(target_logits[b, j])
            at the emitted token (temperature 1, no filtering, no token mask: what the model gives
            it; vLLM, which masks the logits before its sampler, reports the masked value);
            -inf where output_ids is -1.
    """
    if check:
        _check_float(target_logits, "target_logits")
        if target_logits.dim() != 3:
            raise ValueError(f"target_logits must be [B, K+1, V], got shape {tuple(target_logits.shape)}")
    _same_device(target_logits, "target_logits", draft_token_ids=draft_token_ids, draft_probs=draft_probs)
    target_logits = _as_kernel_float(target_logits)
    if draft_probs is not None:
        draft_probs = _as_kernel_float(draft_probs)
    B = target_logits.shape[0]
    dev = target_logits.device
    token_bitmask = _bitmask(token_bitmask, tuple(target_logits.shape[:2]), target_logits)
    temperature_t = _per_row(temperature, B, torch.float32, dev, "temperature")
    top_k_t, top_p_t = _filters(top_k, top_p, B, dev)
    if check:
        _check_verify(target_logits, draft_token_ids, draft_probs, temperature_t,
                      *_materialise(top_k_t, top_p_t, temperature_t))
    seed_t = _seeds(seed, B, dev)
    offset_t = _per_row(offset, B, torch.int64, dev, "offset")
    if draft_probs is not None:
        draft_probs = draft_probs.contiguous()
    if _verify_method(method) == "block" and draft_probs is not None:  # else block = token
        out, num_accepted = torch.ops.specdec.verify_block(
            target_logits.contiguous(), draft_token_ids.to(torch.int64).contiguous(), draft_probs,
            temperature_t, top_k_t, top_p_t, seed_t, offset_t, backend, token_bitmask,
        )
        if return_logprobs:  # the block kernels keep no per-position statistics: a second pass
            positions = torch.arange(out.shape[1], device=dev).expand(B, -1)
            processed, raw = reference.emitted_logprobs(target_logits, positions, out, temperature_t,
                                                        *_materialise(top_k_t, top_p_t, temperature_t),
                                                        token_bitmask)
    else:
        out, num_accepted, processed, raw = torch.ops.specdec.verify(
            target_logits.contiguous(), draft_token_ids.to(torch.int64).contiguous(), draft_probs,
            temperature_t, top_k_t, top_p_t, seed_t, offset_t, backend, return_logprobs, token_bitmask,
        )
    if check:
        void = out[:, 0] < 0
        if bool(void.any()):
            b = int(void.nonzero()[0])
            raise ValueError(f"target_logits row {b}: the position its token is drawn from (after "
                             "its accepted drafts) has no finite logit; the row emits nothing")
    if return_logprobs:
        return out, num_accepted, processed, raw
    return out, num_accepted


def verify_tree(
    target_logits: torch.Tensor,
    tree_token_ids: torch.Tensor,
    tree_parents: torch.Tensor,
    draft_probs: Optional[torch.Tensor] = None,
    *,
    temperature: PerRow = 1.0,
    top_k: PerRow = 0,
    top_p: PerRow = 1.0,
    seed: Optional[PerRow] = None,
    offset: PerRow = 0,
    max_depth: Optional[int] = None,
    check: bool = False,
    backend: str = "auto",
    return_logprobs: bool = False,
    token_bitmask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, ...]:
    """Exact verification of a token tree per row (multi-draft speculative sampling: SpecInfer's
    recursive rejection sampling with the real draft distributions; ``specdec.reference.verify_tree``
    is the specification).

    Args:
        target_logits: [B, N+1, Vt] float32/float16/bfloat16. Index 0 is the root (the last
            committed token), index i+1 is tree node i; the logits at index n predict n's children.
        tree_token_ids: [B, N] int32/int64, node i's token; -1 marks an unused slot (ragged trees).
        tree_parents: [B, N] int32/int64, node i's parent: -1 = the root, else a node index < i
            (parents before children). Siblings are tried in index order.
        draft_probs: [B, N, Vd] float, Vd <= Vt: the distribution node i's token was drawn from
            (for siblings drawn without replacement, the conditional one that excluded the earlier
            siblings), or None for deterministic children (n-gram / argmax trees): then a node
            accepts the first child equal to the target's own sample there (what ``sample`` draws
            with offset + depth), drawn once. A NaN in draft_probs counts as 0, as in ``verify``.
        temperature, top_k, top_p, seed, offset: as in ``verify``. The draws that decide the
            children of a node at depth j (the root is at depth 0) use counter offset + j, so on a
            chain (node i's parent is i - 1) this op gives ``verify``'s tokens.
        max_depth: D, the longest path accepted (static output shape, no host sync); default N.
            Nodes deeper than D are ignored (``check=True`` raises instead).
        check: validate eagerly (host sync) and raise ValueError/TypeError naming the argument:
            shapes, dtypes, devices, parents (-1 or an earlier used node), tokens in [0, Vd) or -1,
            depths, sampling parameters, and a row that emits nothing. Without it, invalid nodes
            (bad parent, parent an unused slot, too deep) are simply never anyone's child, and
            tokens outside [0, Vd) are rejected: nothing is read out of bounds.
        backend: "auto", "cpp", "triton" or "reference".
        return_logprobs: also return the log-probabilities of the emitted tokens, as in
            ``verify``. False returns exactly the three outputs below.
        token_bitmask: [B, N+1, W] int32 or None: the ids allowed at the root (index 0) and at
            each node (index i+1: the ids allowed after node i's path), as in ``verify``.

    Returns:
        output_ids: [B, D+1] int64: the accepted path's tokens, one emitted token (a recovered
            token or the bonus), then -1.
        num_accepted: [B] int32 in [0, D]; tokens emitted per row = num_accepted + 1.
        accepted_nodes: [B, D] int64: node indices of the accepted path, -1 padded (for cache
            compaction). A row emits nothing (all -1, num_accepted 0) only when the node where its
            token is drawn has no finite logit, or its temperature is NaN / +inf.
        processed_logprobs, raw_logprobs (return_logprobs only): [B, D+1] float32 each, as in
            ``verify``: slot j's token under the target at the node it was drawn at (the root for
            j = 0, else accepted_nodes[j-1]); -inf where output_ids is -1.
    """
    if check:
        _check_float(target_logits, "target_logits")
        if target_logits.dim() != 3:
            raise ValueError(f"target_logits must be [B, N+1, V], got shape {tuple(target_logits.shape)}")
    _same_device(target_logits, "target_logits", tree_token_ids=tree_token_ids, tree_parents=tree_parents,
                 draft_probs=draft_probs)
    target_logits = _as_kernel_float(target_logits)
    if draft_probs is not None:
        draft_probs = _as_kernel_float(draft_probs)
    B, N1 = target_logits.shape[0], target_logits.shape[1]
    if max_depth is None:
        max_depth = N1 - 1
    if isinstance(max_depth, bool) or not isinstance(max_depth, int):
        raise TypeError(f"max_depth must be an int or None, got {type(max_depth).__name__}")
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")
    if max_depth > N1 - 1 and B * (max_depth + 1) >= 2**31:  # never a real tree: a caller's slip
        raise ValueError(f"max_depth={max_depth}: no path is longer than the N={N1 - 1} tree nodes, and the "
                         f"[B, max_depth + 1] output would hold {B * (max_depth + 1)} entries; pass max_depth <= N")
    dev = target_logits.device
    token_bitmask = _bitmask(token_bitmask, (B, N1), target_logits)
    temperature_t = _per_row(temperature, B, torch.float32, dev, "temperature")
    top_k_t, top_p_t = _filters(top_k, top_p, B, dev)
    if check:
        _check_verify_tree(target_logits, tree_token_ids, tree_parents, draft_probs, max_depth, temperature_t,
                           *_materialise(top_k_t, top_p_t, temperature_t))
    seed_t = _seeds(seed, B, dev)
    offset_t = _per_row(offset, B, torch.int64, dev, "offset")
    if draft_probs is not None:
        draft_probs = draft_probs.contiguous()
    out, num_accepted, nodes, processed, raw = torch.ops.specdec.verify_tree(
        target_logits.contiguous(), tree_token_ids.to(torch.int64).contiguous(),
        tree_parents.to(torch.int64).contiguous(), draft_probs, temperature_t, top_k_t, top_p_t, seed_t,
        offset_t, max_depth, backend, return_logprobs, token_bitmask,
    )
    if check:
        void = out[:, 0] < 0
        if bool(void.any()):
            b = int(void.nonzero()[0])
            raise ValueError(f"target_logits row {b}: the node its token is drawn from (after its accepted "
                             "path) has no finite logit; the row emits nothing")
    if return_logprobs:
        return out, num_accepted, nodes, processed, raw
    return out, num_accepted, nodes


def sample(
    logits: torch.Tensor,
    *,
    temperature: PerRow = 1.0,
    top_k: PerRow = 0,
    top_p: PerRow = 1.0,
    seed: Optional[PerRow] = None,
    offset: PerRow = 0,
    check: bool = False,
    backend: str = "auto",
    return_logprobs: bool = False,
    token_bitmask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, ...]:
    """Fused sampling with temperature, top-k and top-p, for drafters and plain decoding.

    Args:
        logits: [B, V] float32/float16/bfloat16.
        temperature, top_k, top_p, seed, offset, check, backend, return_logprobs: as in ``verify``.
        token_bitmask: [B, W] int32 or None: the ids each row allows, as in ``verify`` (probs is
            then the masked distribution, zero at banned ids).

    Returns:
        token_ids: [B] int64 (-1 for a row with no finite logit).
        probs: [B, V] float32, the exact distribution the token was drawn from (one-hot at the
            argmax for greedy rows), ready to pass to ``verify`` as ``draft_probs``.
        processed_logprobs, raw_logprobs (return_logprobs only): [B] float32 each, as in
            ``verify``: the token under the processed distribution (temperature, top-k, top-p;
            greedy rows: raw) and under log_softmax(logits); -inf where token_ids is -1. Unlike
            log(probs), never rounded to -inf by float32 underflow.
    """
    if check:
        _check_float(logits, "logits")
        if logits.dim() != 2 or logits.shape[0] < 1 or logits.shape[1] < 1:
            raise ValueError(f"logits must be [B, V] with B, V >= 1, got shape {tuple(logits.shape)}")
    _same_device(logits, "logits")
    logits = _as_kernel_float(logits)
    B = logits.shape[0]
    dev = logits.device
    token_bitmask = _bitmask(token_bitmask, (B,), logits)
    temperature_t = _per_row(temperature, B, torch.float32, dev, "temperature")
    top_k_t, top_p_t = _filters(top_k, top_p, B, dev)
    if check:
        _check_params(B, dev, temperature_t, *_materialise(top_k_t, top_p_t, temperature_t))
        finite = torch.isfinite(logits)
        if token_bitmask is not None:
            finite &= reference.allowed_ids(token_bitmask, logits.shape[-1])
        dead = ~finite.any(-1)
        if bool(dead.any()):
            what = "finite logit" if token_bitmask is None else "finite logit that token_bitmask allows"
            raise ValueError(f"logits row {int(dead.nonzero()[0])} has no {what}")
    seed_t = _seeds(seed, B, dev)
    offset_t = _per_row(offset, B, torch.int64, dev, "offset")
    token_ids, probs, processed, raw = torch.ops.specdec.sample(
        logits.contiguous(), temperature_t, top_k_t, top_p_t, seed_t, offset_t, backend, return_logprobs,
        token_bitmask)
    if return_logprobs:
        return token_ids, probs, processed, raw
    return token_ids, probs
