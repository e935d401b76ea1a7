"""Make stock Hugging Face assisted generation verify drafts with :func:`specdec.ops.verify`.

    import specdec.integrations.transformers as sdt
    sdt.patch()
    model.generate(ids, assistant_model=small, do_sample=False)   # acceptance by specdec's fused op
    model.generate(ids, prompt_lookup_num_tokens=10)               # n-gram drafts, same op
    sdt.unpatch()

``patch()`` rebuilds ``GenerationMixin._assisted_decoding`` from its own source with the token
selection step (greedy comparison, or Algorithm 1 of Leviathan et al. when sampling) replaced by one
``verify`` call; everything else (candidate generators, caches, stopping criteria, streamers) is
transformers' own code. The rebuilt method is checked against anchors of the source: if a
transformers release moves them, ``patch()`` raises instead of guessing. Sampling draws its Philox
seed from torch's global generator, so ``torch.manual_seed`` makes patched runs reproducible.
"""
from __future__ import annotations

import inspect
import textwrap

import torch

__all__ = ["patch", "unpatch", "is_patched", "select_tokens"]

_ORIGINAL = None
_START = "assistant_ensemble_weight = generation_config.assistant_ensemble_weight"
_END = "# Whenever we are drafting several tokens at once"


def select_tokens(candidate_input_ids, candidate_logits, candidate_length, new_logits, cur_len, do_sample):
    """The verification step of assisted decoding through specdec's op (batch 1, as HF requires).

    Args:
        candidate_input_ids: [1, cur_len + K] int64, prompt + K drafts.
        candidate_logits: [1, K, Vd] processed drafter logits, or None (n-gram drafts).
        new_logits: [1, K+1, Vt] fp32 target logits after HF's logits processors.
    Returns:
        (valid_tokens [1, n+1] int64, n_matches int) exactly as HF's own selection returns them.
    """
    from specdec import ops

    drafts = candidate_input_ids[:, cur_len: cur_len + candidate_length]
    draft_probs = None
    if do_sample and candidate_logits is not None:
        draft_probs = candidate_logits.float().softmax(dim=-1)[..., : new_logits.shape[-1]]
    seed = int(torch.randint(0, 2**62, (1,))) if do_sample else 0
    out, num_accepted = ops.verify(new_logits.float(), drafts, draft_probs,
                                   temperature=1.0 if do_sample else 0.0, seed=seed)
    n = int(num_accepted[0])
    return out[:, : n + 1], n


def _rebuild(original):
    source = textwrap.dedent(inspect.getsource(original))
    lines = source.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if _START in l), None)
    end = next((i for i, l in enumerate(lines) if _END in l), None)
    if start is None or end is None or end <= start:
        import transformers

        raise RuntimeError(
            f"specdec.integrations.transformers.patch(): transformers {transformers.__version__} changed "
            "_assisted_decoding (selection-step anchors not found); this adapter supports transformers 5.x"
        )
    indent = lines[start][: len(lines[start]) - len(lines[start].lstrip())]
    block = "".join(indent + "    " + l[len(indent):] if l.strip() else l for l in lines[start:end])
    replacement = (
        f"{indent}if generation_config.assistant_ensemble_weight is None:\n"
        f"{indent}    valid_tokens, n_matches = __specdec_select_tokens__(\n"
        f"{indent}        candidate_input_ids, candidate_logits, candidate_length, new_logits, cur_len, do_sample)\n"
        f"{indent}else:  # DIVERSE ensemble verification is not exact sampling: transformers' own code\n"
        + block
    )
    new_source = "".join(lines[:start]) + replacement + "".join(lines[end:])
    module = inspect.getmodule(original)
    namespace = dict(vars(module))
    namespace["__specdec_select_tokens__"] = select_tokens
    code = compile(new_source, f"<specdec-patched {module.__name__}._assisted_decoding>", "exec")
    exec(code, namespace)
    patched = namespace[original.__name__]
    patched.__specdec_patched__ = True
    patched.__doc__ = original.__doc__
    return patched


def patch() -> None:
    """Route HF assisted generation's verification through ``specdec.ops.verify``. Idempotent."""
    global _ORIGINAL
    from transformers.generation.utils import GenerationMixin

    if is_patched():
        return
    original = GenerationMixin._assisted_decoding
    patched = _rebuild(original)
    _ORIGINAL = original
    GenerationMixin._assisted_decoding = patched


def unpatch() -> None:
    """Restore transformers' own assisted decoding."""
    global _ORIGINAL
    from transformers.generation.utils import GenerationMixin

    if _ORIGINAL is not None:
        GenerationMixin._assisted_decoding = _ORIGINAL
        _ORIGINAL = None


def is_patched() -> bool:
    from transformers.generation.utils import GenerationMixin

    return getattr(GenerationMixin._assisted_decoding, "__specdec_patched__", False)
