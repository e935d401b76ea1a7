# Holds: the drafters' public names, and make_drafter (a name, a model or a Drafter -> a drafter).
# May use: torch and this package's modules.
"""Drafters: cheap proposers of the next K tokens, behind one small interface (``base.py``).

* :class:`NGramDrafter` - prompt lookup: copies the continuation of an earlier occurrence of the last
  n tokens (prompt and generated text; the longest continuation, then the most recent). No model;
  ``probs`` is None (deterministic drafts).
* :class:`ModelDrafter` - a smaller HF model with its own ragged KV cache and O(1) per-row rollback.
* :class:`EarlyExitDrafter` - the target's first N layers plus its final norm and head, sharing the
  target's weights (a view, no copy) and its KV cache (``DraftState.cache``), so it needs no prefill.
"""
from __future__ import annotations

import torch

from specdec.drafters.base import Draft, Drafter, DraftState, DraftTree
from specdec.drafters.early_exit import EarlyExitDrafter, truncated_model
from specdec.drafters.model import ModelDrafter
from specdec.drafters.ngram import NGramDrafter

__all__ = ["Draft", "Drafter", "DraftState", "DraftTree", "NGramDrafter", "ModelDrafter", "EarlyExitDrafter",
           "truncated_model", "make_drafter", "DRAFTER_NAMES"]

# the names make_drafter accepts for the built-in drafters (any other string is a model name to load)
NGRAM_NAMES = ("ngram", "n-gram", "prompt-lookup")
EARLY_EXIT_NAMES = ("early-exit", "earlyexit", "self")
DRAFTER_NAMES = (*NGRAM_NAMES, *EARLY_EXIT_NAMES, "none")


def make_drafter(kind, target=None, *, num_layers: int | None = None, vocab_size: int | None = None) -> Drafter | None:
    """Build a drafter from a name (``"ngram"``, ``"early-exit"``, ``"none"``), a model, or a Drafter."""
    if kind is None or isinstance(kind, Drafter):
        return kind
    if isinstance(kind, str):
        name = kind.lower().replace("_", "-")
        if name in NGRAM_NAMES:
            return NGramDrafter()
        if name in EARLY_EXIT_NAMES:
            return EarlyExitDrafter(target, num_layers, vocab_size=vocab_size)
        if name == "none":
            return None
        raise ValueError(f"unknown drafter kind {kind!r}: use 'ngram', 'early-exit', 'none' or a model")
    if isinstance(kind, torch.nn.Module):
        return ModelDrafter(kind, vocab_size=vocab_size)
    raise TypeError(f"drafter must be a name, an HF model or a specdec.drafters.Drafter, got {type(kind).__name__}")
