"""``narrow_linear``: ``x @ weight.T + bias`` for the few rows of a verification forward on the CPU, and
``narrow_linears``: a context manager that routes a model's ``nn.Linear`` layers through it.

A speculative step's target forward runs every linear layer on M = B * q rows (q = 1 + drafts). On a
CPU, MKL's sgemm for M = 2..8 costs about M matrix-vector products (2-core AMD EPYC, 1 thread, the
211 linears of SmolLM2-135M: 40 ms at M = 1, 70-104 ms at M = 2..8), so drafting even one token
nearly doubles the forward and a speculative decoder can barely win. ``narrow_linear`` (C++ kernel
``csrc/narrow_linear_cpu.cpp``) reads each weight row once for all M rows: 32 ms at M = 1, 35-37 ms
at M = 2..4, 80 ms at 10 (sgemm 105), 176 ms at 32 (sgemm 195)
(``benchmarks/results/narrow_linear_cpu.csv``). Larger M, other dtypes, other devices and autograd go
to ``torch.nn.functional.linear``; results equal it up to float32 summation order.

``SpeculativeGenerator`` applies ``narrow_linears`` to its target (and model drafter) during
``generate`` (``narrow_linear=False`` turns it off); the layers are restored afterwards.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

__all__ = ["narrow_linear", "narrow_linears", "NARROW_MAX_ROWS", "narrow_linear_available"]

NARROW_MAX_ROWS = 32  # faster than sgemm up to 48 rows at 1 and 2 threads (narrow_linear_cpu*.csv), by 5% at 48


_available: list = []  # [bool] once known: the check runs once, not on every layer call


def narrow_linear_available() -> bool:
    """True when the C++ kernel loaded (``specdec.backends()['cpp']``)."""
    if not _available:
        from specdec.ops import _load_cpp

        _available.append(bool(_load_cpp()))
    return _available[0]


_F32 = torch.float32


def _use_kernel(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, limit: int) -> bool:
    """The kernel's rule for a 2-D ``w`` [N, K] (``limit`` = max_rows * K): float32 CPU tensors, at most
    max_rows rows of x, no autograd (the kernel has no backward). Written in its cheapest form: a
    patched SmolLM2 forward evaluates it 211 times, and each microsecond is 0.2 ms."""
    return x.dtype is _F32 and w.dtype is _F32 and x.is_cpu and w.is_cpu and 0 < x.numel() <= limit \
        and x.dim() > 0 and x.shape[-1] == w.shape[1] and (b is None or (b.dtype is _F32 and b.is_cpu)) \
        and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                              or (b is not None and b.requires_grad)))


def narrow_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  max_rows: int = NARROW_MAX_ROWS) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)``, through the C++ narrow kernel where it is faster.

    Args:
        x: ``[..., K]``.
        weight: ``[N, K]``.
        bias: ``[N]`` or None.
        max_rows: use the kernel only when x holds at most this many rows (``x.numel() / K``).
    Returns:
        ``[..., N]``, x's dtype. The kernel runs for float32 CPU tensors without autograd and at most
        ``max_rows`` rows when the extension is loaded; everything else calls ``F.linear`` (which
        also raises its errors on bad shapes).
    """
    if weight.dim() == 2 and _use_kernel(x, weight, bias, max_rows * weight.shape[1]) and narrow_linear_available():
        return torch.ops.specdec_cpp.narrow_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _forward(module: torch.nn.Linear, limit: int, x: torch.Tensor) -> torch.Tensor:
    """A patched layer's forward: :func:`narrow_linear` without the checks done when patching (the
    extension loaded, a 2-D weight); ``limit`` = max_rows * in_features."""
    w, b = module.weight, module.bias
    if _use_kernel(x, w, b, limit):
        return torch.ops.specdec_cpp.narrow_linear(x, w, b)
    return F.linear(x, w, b)


@contextlib.contextmanager
def narrow_linears(*models: torch.nn.Module | None, max_rows: int = NARROW_MAX_ROWS):
    """Within the block, every plain ``nn.Linear`` of ``models`` with a float32 CPU weight calls
    :func:`narrow_linear`. Subclasses (bitsandbytes' int8 layers, LoRA wrappers) and layers whose
    ``forward`` is already overridden on the instance are left alone. Yields the number of layers
    routed; the layers are restored on exit, also after an exception. A no-op when the extension
    did not load."""
    patched = []
    if narrow_linear_available():
        seen = set()
        for model in models:
            if model is None:
                continue
            for m in model.modules():
                if type(m) is torch.nn.Linear and id(m) not in seen and "forward" not in m.__dict__ \
                        and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32:
                    seen.add(id(m))
                    m.forward = functools.partial(_forward, m, max_rows * m.weight.shape[1])
                    patched.append(m)
    try:
        yield len(patched)
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)
