"""Triton kernels of specdec (installed as ``specdec.kernels``).

- ``specdec.kernels.verify.verify``: fused chain verification (``specdec.ops.verify``'s Triton path)
- ``specdec.kernels.verify_block.verify_block``: block verification (``specdec.ops.verify(method="block")``)
- ``specdec.kernels.sample.sample``: fused sampling (``specdec.ops.sample``'s Triton path)
- ``specdec.kernels.thresholds.filter_thresholds``: top-k / top-p keep thresholds (a search, no sort)
- ``specdec.kernels.verify_tree.verify_tree``: tree verification (``specdec.ops.verify_tree``'s Triton path)
- ``specdec.kernels.logprobs``: the emitted tokens' logprobs (``return_logprobs=True``)
- ``specdec.kernels.philox``: Philox4x32-10 and the uniform / exponential conversions (jit helpers)

They compute exactly ``specdec.reference`` (the specification) and draw the same Philox numbers.
Run on CUDA tensors, or on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set
before triton is imported). Importing this package imports triton.

The names ``verify`` and ``sample`` here are the submodules (``from specdec.kernels import verify
as tv; tv.verify(...)``), not the functions, so that the two never shadow each other.

This folder is only ever ``specdec.kernels``. Python or pytest started from the repository root,
or a build loading entry points there, puts the root on ``sys.path``, and ``import kernels`` then
finds this folder before Hugging Face's ``kernels`` package (which transformers >= 5.25 imports):
that import is handed to the installed package here, or fails as if the folder were not there.
"""
if __name__ != "specdec.kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]
    _spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
    # The import system returns sys.modules[name] once this file has run: put the real module
    # there and run it, so that its submodules resolve through its own __path__.
    _module = _util.module_from_spec(_spec)
    _sys.modules[__name__] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        _sys.modules.pop(__name__, None)
        raise
else:
    from specdec.kernels import _interpreter_compat

    _interpreter_compat.apply()  # before any kernel runs under Triton 3.6's interpreter

    from specdec.kernels import logprobs, philox, sample, thresholds, verify, verify_block, verify_tree  # noqa: F401

    __all__ = ["logprobs", "philox", "sample", "thresholds", "verify", "verify_block", "verify_tree"]
