"""Triton kernels of specdec (installed as ``specdec.kernels``).

- ``specdec.kernels.verify.verify``: fused chain verification (``specdec.ops.verify``'s Triton path)
- ``specdec.kernels.sample.sample``: fused sampling (``specdec.ops.sample``'s Triton path)
- ``specdec.kernels.thresholds.filter_thresholds``: top-k / top-p keep thresholds (a search, no sort)
- ``specdec.kernels.philox``: Philox4x32-10 and the uniform / exponential conversions (jit helpers)

They compute exactly ``specdec.reference`` (the specification) and draw the same Philox numbers.
Run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set
before triton is imported). Importing this package imports triton.

The names ``verify`` and ``sample`` here are the submodules (``from specdec.kernels import verify
as tv; tv.verify(...)``), not the functions, so that the two never shadow each other.
"""
from specdec.kernels import philox, sample, thresholds, verify  # noqa: F401

__all__ = ["philox", "sample", "thresholds", "verify"]
