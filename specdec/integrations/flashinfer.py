"""A drop-in for FlashInfer's ``flashinfer.sampling.chain_speculative_sampling`` (the signature,
argument conventions and return values of flashinfer-python 0.7.2), backed by
:func:`specdec.ops.verify`. A stack switches by changing one import::

    # from flashinfer.sampling import chain_speculative_sampling
    from specdec.integrations.flashinfer import chain_speculative_sampling

    output_token_ids, accepted, emitted = chain_speculative_sampling(
        draft_probs, draft_token_ids, target_probs, seed=seeds, offset=offsets)

FlashInfer's conventions: probabilities in, not logits. ``draft_probs`` [B, n, V] is what each draft
was sampled from, ``target_probs`` [B, n+1, V] the target's distribution at each draft position
plus the bonus position (float32/float16/bfloat16), ``draft_token_ids`` [B, n] int32/int64.
Returns ``output_token_ids`` [B, n+1] int32 (accepted drafts, then the recovered or bonus token,
then -1), ``output_accepted_token_num`` [B] int32 (how many drafts pass their acceptance test each
taken on its own, also past the first rejection: an alignment metric of drafter and target) and
``output_emitted_draft_token_num`` [B] int32 (drafts emitted; tokens emitted = that + 1). Tensors
passed as ``maybe_output_*`` are added to in place and returned, as FlashInfer does.

Seeding follows FlashInfer's rules: ``seed`` and ``offset`` are both ints or both tensors (int64 or
uint64, 1-D, length 1 or B, on the probabilities' device); when either is None both come from
``generator`` (torch's default CPU generator when that is None too). Where specdec differs, on
purpose: every row's seed and offset are honoured and a row's tokens depend only on its own
inputs, seed and offset, never on its slot in the batch (FlashInfer 0.7.2 also keys its Philox
subsequence by the row index, so moving a request to another slot changes its tokens). One seed
and offset for the whole batch (ints or length-1 tensors) is expanded to decorrelated per-row
seeds (:func:`specdec.ops.row_seeds`), since identical rows must not draw identical numbers.
The numbers are specdec's (Philox keyed by (seed, offset + position), see ``specdec.reference``),
so the tokens are not FlashInfer's; their distribution is the same (exact speculative sampling).
``deterministic`` is accepted and ignored: specdec's kernels are always deterministic.

Other differences: target rows are renormalised (FlashInfer uses them as given; the same when they
sum to 1); a draft id of -1 ends a row's chain (ragged rows), where FlashInfer reads out of bounds;
CPU tensors work too (the C++ backend). A CUDA ``generator`` costs one host sync per call (the seed
is read back); pass seed and offset tensors on the hot path, as FlashInfer recommends for CUDA
graphs. A NaN draft probability counts as 0 (specdec's rule).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

__all__ = ["chain_speculative_sampling"]

Seed = Optional[Union[int, torch.Tensor]]


def chain_speculative_sampling(
    draft_probs: torch.Tensor,
    draft_token_ids: torch.Tensor,
    target_probs: torch.Tensor,
    maybe_output_accepted_token_num: Optional[torch.Tensor] = None,
    maybe_output_emitted_draft_token_num: Optional[torch.Tensor] = None,
    deterministic: bool = True,
    generator: Optional[torch.Generator] = None,
    seed: Seed = None,
    offset: Seed = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact speculative sampling of a chain of n drafts per row (module docstring: conventions).

    Args:
        draft_probs: [B, n, V] float, the distribution each draft was sampled from.
        draft_token_ids: [B, n] int32/int64 (a -1 ends the row's drafts).
        target_probs: [B, n+1, V] float, the target's probabilities; the last is the bonus position.
        maybe_output_accepted_token_num, maybe_output_emitted_draft_token_num: [B] int32 tensors to
            add the counts to in place (None: fresh zeros).
        deterministic: ignored (always deterministic).
        generator: draws the seed when seed or offset is None.
        seed, offset: ints, or int64/uint64 [1] or [B] tensors; both or neither.

    Returns:
        (output_token_ids [B, n+1] int32, output_accepted_token_num [B] int32,
        output_emitted_draft_token_num [B] int32).
    """
    from specdec import ops, reference

    B, n, V = _check_shapes(draft_probs, draft_token_ids, target_probs)
    dev = draft_probs.device
    seeds, offsets = _rng(seed, offset, B, dev, generator)
    # probabilities -> logits: log(0) = -inf is never emitted; the op's softmax renormalises
    target_logits = torch.log(target_probs.float())
    out, num = ops.verify(target_logits, draft_token_ids, draft_probs, temperature=1.0, seed=seeds,
                          offset=offsets)

    # the acceptance tests past the stop, each taken on its own, with the numbers the op would draw
    # there (STREAM_ACCEPT at offset + i): accepted = emitted + those that pass
    ids = draft_token_ids.long()
    safe = ids.clamp(0, V - 1)[..., None]
    p = target_probs[:, :n].float()
    p_x = (p.gather(2, safe) / p.sum(-1, keepdim=True)).squeeze(-1)
    q_x = draft_probs.float().gather(2, safe).squeeze(-1)
    q_x = torch.where(torch.isnan(q_x), torch.zeros_like(q_x), q_x)
    positions = torch.arange(n, device=dev)
    u = reference.uniform_open_closed(
        reference.philox_bits(seeds[:, None], offsets[:, None] + positions, reference.STREAM_ACCEPT, 0, 0))
    passes = (ids >= 0) & (ids < V) & (p_x > 0) & (u * q_x <= p_x)
    later = passes & (positions[None] > num[:, None].long())
    accepted = num + later.sum(1).to(torch.int32)

    output_accepted = maybe_output_accepted_token_num
    if output_accepted is None:
        output_accepted = torch.zeros(B, dtype=torch.int32, device=dev)
    output_emitted = maybe_output_emitted_draft_token_num
    if output_emitted is None:
        output_emitted = torch.zeros(B, dtype=torch.int32, device=dev)
    output_accepted += accepted.to(output_accepted.dtype)
    output_emitted += num.to(output_emitted.dtype)
    return out.to(torch.int32), output_accepted, output_emitted


def _check_shapes(draft_probs, draft_token_ids, target_probs):
    for name, t in (("draft_probs", draft_probs), ("draft_token_ids", draft_token_ids),
                    ("target_probs", target_probs)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if draft_probs.dim() != 3 or target_probs.dim() != 3 or draft_token_ids.dim() != 2:
        raise ValueError("need draft_probs [B, n, V], draft_token_ids [B, n] and target_probs [B, n+1, V], got "
                         f"{tuple(draft_probs.shape)}, {tuple(draft_token_ids.shape)}, {tuple(target_probs.shape)}")
    B, n, V = draft_probs.shape
    if tuple(draft_token_ids.shape) != (B, n) or tuple(target_probs.shape) != (B, n + 1, V):
        raise ValueError(f"draft_probs {tuple(draft_probs.shape)} needs draft_token_ids [{B}, {n}] and target_probs "
                         f"[{B}, {n + 1}, {V}], got {tuple(draft_token_ids.shape)} and {tuple(target_probs.shape)}")
    if draft_token_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"draft_token_ids must be int32 or int64, got {draft_token_ids.dtype}")
    return B, n, V


def _int64(x: int) -> int:
    """An int (uint64 values included) as the int64 with the same bits."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= (1 << 63) else x


def _rng(seed: Seed, offset: Seed, B: int, dev, generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row seeds and offsets [B] int64 on ``dev`` (FlashInfer's argument rules)."""
    from specdec import ops

    if seed is None or offset is None:
        gen_dev = generator.device if generator is not None else "cpu"
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_dev))
        offset = 0
    if isinstance(seed, torch.Tensor) != isinstance(offset, torch.Tensor):
        raise ValueError("seed and offset must both be tensors or both be ints")
    if not isinstance(seed, torch.Tensor):
        if isinstance(seed, bool) or not isinstance(seed, int) or isinstance(offset, bool) \
                or not isinstance(offset, int):
            raise TypeError(f"seed and offset must be ints or tensors, got {type(seed).__name__} and "
                            f"{type(offset).__name__}")
        return ops._seeds(_int64(seed), B, dev), torch.full((B,), _int64(offset), dtype=torch.int64, device=dev)
    for name, t in (("seed", seed), ("offset", offset)):
        if t.device != torch.device(dev):
            raise ValueError(f"{name} tensor must be on {dev}, got {t.device}")
        if t.dtype not in (torch.int64, torch.uint64):
            raise ValueError(f"{name} tensor must be int64 or uint64, got {t.dtype}")
        if t.dim() != 1 or t.shape[0] not in (1, B):
            raise ValueError(f"{name} tensor must be 1-D of length 1 or {B}, got shape {tuple(t.shape)}")
    seed, offset = seed.view(torch.int64), offset.view(torch.int64)  # uint64: the same bits
    if seed.shape[0] == 1 and offset.shape[0] == 1:  # one seed for the batch: decorrelated rows
        stride = ops._to_int64(ops._SEED_STRIDE)
        seeds = torch.arange(B, dtype=torch.int64, device=dev) * stride + seed
        return seeds, offset.expand(B).contiguous()
    return seed.expand(B).contiguous(), offset.expand(B).contiguous()
