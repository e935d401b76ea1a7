"""specdec: fused kernels for exact speculative decoding.

``specdec.ops`` holds the fused ops (``verify``, ``verify_tree``, ``sample``), ``specdec.cache`` the ragged KV cache,
and the top level the Hugging Face layer (``load_model``, ``SpeculativeGenerator``), imported lazily
so that ``import specdec`` stays light.
"""
__version__ = "0.1.0"

from specdec import ops  # noqa: E402
from specdec.ops import backends, sample, verify, verify_tree  # noqa: E402

_LAZY = {
    "load_model": "specdec.models",
    "load_tokenizer": "specdec.models",
    "ModelLoadError": "specdec.models",
    "IncompatibleModelsError": "specdec.models",
    "SpeculativeGenerator": "specdec.generator",
    "GenerationResult": "specdec.generator",
    "GenerationStats": "specdec.generator",
    "DraftLengthPolicy": "specdec.generator",
    "Grammar": "specdec.generator.grammar",
    "ChatSession": "specdec.chat",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'specdec' has no attribute {name!r}")


__all__ = ["ops", "verify", "verify_tree", "sample", "backends", *_LAZY]
