"""What differs between the transformers releases specdec supports (>= 4.57), in one place.

Uses only the standard library: callers pass the model.
"""
import inspect

_CACHE_KWARG: dict = {}


def cache_kwarg(model) -> str:
    """The keyword by which ``model``'s forward takes its KV cache: ``"cache"`` in transformers
    releases that renamed it (``past_key_values`` there is deprecated, to be removed in 5.40),
    ``"past_key_values"`` in older ones. Read from the forward's signature once per class."""
    key = type(model)
    if key not in _CACHE_KWARG:
        try:
            params = inspect.signature(model.forward).parameters  # follows the deprecation wrapper
        except (TypeError, ValueError):
            params = {}
        _CACHE_KWARG[key] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KWARG[key]


def cache_kwargs(model, cache) -> dict:
    """``{cache_kwarg(model): cache}``, to splat into a forward call."""
    return {cache_kwarg(model): cache}
