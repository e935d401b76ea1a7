# Holds: the ragged KV cache's public names, re-exported from this package's files.
# May use: the modules of this package only.
"""Ragged KV cache for speculative decoding: a preallocated store with per-row lengths and O(1) rollback.

After verification each row of a batch keeps a different number of tokens. The store keeps keys and
values for all layers in two preallocated tensors ``[L, B, H_kv, T_max, D]`` plus per-row lengths
``[B]`` int32 on the store's device, so rolling a row back is writing one integer (stale slots are
overwritten by the next append) and the prefill never has to be recomputed.

Files, from the kernels up:

* ``store_ops.py``: the low-level ops (``append_``, ``rollback_``, ``gather_``, ``select_rows``): C++/CUDA
  kernels of the extension ``specdec._C`` (``torch.ops.specdec_cpp.cache_*``), with fake kernels
  registered so they trace under ``torch.compile``/FakeTensor; a plain-PyTorch fallback runs when the
  extension is not built (``SPECDEC_NO_EXT=1``);
* ``store.py``: :class:`KVStore`, the store object (tensors + a host mirror of the lengths, so shapes and
  checks never wait on the device);
* ``ragged.py``: :class:`RaggedCache`, a ``transformers.Cache`` over a :class:`KVStore` that stock Hugging
  Face decoder models (Llama, Qwen2/3, Mistral; ``sdpa`` and ``eager``) read and write, plus the per-row
  ``position_ids`` and 4D ``attention_mask`` for ragged rows and left padding;
* ``tree.py``: tree steps (``tree_ancestors``, ``compact_tree_``, and the cache's tree positions, masks
  and ``compact_tree``).

The target and a model drafter each get their own :class:`RaggedCache` (``from_model``); an early-exit
drafter runs the target's first layers over the target's own cache (:meth:`RaggedCache.partial_depth`).
"""
from specdec.cache.ragged import RaggedCache
from specdec.cache.store import KVStore
from specdec.cache.store_ops import append_, gather_, has_extension, rollback_, select_rows
from specdec.cache.tree import compact_tree_, tree_ancestors

__all__ = ["KVStore", "RaggedCache", "append_", "rollback_", "gather_", "select_rows", "has_extension",
           "tree_ancestors", "compact_tree_"]
