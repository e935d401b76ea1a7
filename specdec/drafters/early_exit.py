# Holds: EarlyExitDrafter (the target's first layers as drafter) and truncated_model (that view).
# May use: numpy, torch, .base, .model (it is a ModelDrafter over the target's cache).
"""The early-exit drafter: the target's first layers, its weights and its KV cache, as the drafter."""
from __future__ import annotations

import copy

import numpy as np
import torch

from specdec.drafters.base import Draft, Drafter, DraftState, _empty_draft
from specdec.drafters.model import ModelDrafter, _forward


def truncated_model(model, num_layers: int):
    """A view of an HF decoder-only model with only its first ``num_layers`` layers.

    Shares every parameter with ``model`` (embeddings, layers, final norm, head): no copy. Works for
    the ``XForCausalLM(model=XModel(layers=ModuleList))`` layout of Llama, Qwen2/3, Mistral, ...
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no .model.layers ModuleList; early exit is not supported")
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"early-exit layers must be in 1..{len(layers)}, got {num_layers}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    view_inner = copy.copy(inner)
    view_inner._modules = dict(inner._modules)  # shallow copies share _modules; give the view its own
    view_inner.layers = torch.nn.ModuleList(list(layers)[:num_layers])
    view_inner.config = config
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.model = view_inner
    view.config = config
    return view


class EarlyExitDrafter(ModelDrafter):
    """Self-speculation: the target's first ``num_layers`` layers + final norm + head as the drafter.

    Shares the target's weights through :func:`truncated_model` and the target's KV cache
    (``state.cache``): no extra parameter or cache memory and no prefill, since the target's prefill
    and verification forwards already wrote layers ``0..num_layers-1`` of every accepted token.
    ``propose`` runs the pending token and drafts 1..k-1 through those layers inside
    ``cache.partial_depth(num_layers)``; on exit the lengths are back at the target's (O(1)), and the
    target's verification forward overwrites the drafted slots. ``accept``/``select_rows`` have
    nothing to do: the generator rolls back and selects rows of its own cache.
    """

    needs_target_cache = True
    supports_tree = False  # a tree over the target's cache would need the generator's compaction; not yet
    propose_tree = Drafter.propose_tree
    accept_tree = Drafter.accept_tree

    def __init__(self, target, num_layers: int | None = None, vocab_size: int | None = None):
        total = len(target.model.layers)
        if num_layers is None:
            num_layers = max(1, total // 4)
        super().__init__(truncated_model(target, num_layers), vocab_size=vocab_size)
        self.num_layers = num_layers

    def start(self, state: DraftState) -> None:
        if state.cache is None:
            raise ValueError("EarlyExitDrafter drafts over the target's cache: DraftState.cache must be set")

    @torch.inference_mode()
    def propose(self, state: DraftState) -> Draft:
        batch = state.lengths.shape[0]
        if batch == 0 or int(state.max_drafts.max()) == 0:
            return _empty_draft(batch, state.device)
        pending = torch.from_numpy(state.tokens[np.arange(batch), state.lengths - 1]).to(state.device)
        with state.cache.partial_depth(self.num_layers) as cache:
            last = _forward(self.model, cache, pending[:, None])[:, -1]
            return self._draft(last, state, cache)

    def accept(self, num_accepted: np.ndarray) -> None:
        pass

    def select_rows(self, index: torch.Tensor) -> None:
        pass

    def finish(self) -> None:
        pass
