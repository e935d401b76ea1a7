"""A rejection sampler with vLLM's (v1) call shape, backed by :func:`specdec.ops.verify`.

vLLM flattens the drafts of a batch: ``metadata.draft_token_ids`` is ``[num_tokens]`` with
``metadata.num_draft_tokens[b]`` drafts for request ``b``; ``target_logits`` are the target's logits
at those draft positions, ``[num_tokens, V]``; the bonus token (sampled by vLLM from the position
after the last draft) comes in as ``bonus_token_ids [B, 1]``. The output is ``[B, max_K + 1]`` int32:
accepted drafts, then the recovered token at the first rejection or the bonus token, then
``PLACEHOLDER_TOKEN_ID`` (-1). No vLLM import: the metadata classes below duck-type vLLM's.

    sampler = RejectionSampler()
    out = sampler(metadata, draft_probs, target_logits, bonus_token_ids, sampling_metadata)
    tokens = RejectionSampler.parse_output(out, vocab_size)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PLACEHOLDER_TOKEN_ID = -1

__all__ = ["PLACEHOLDER_TOKEN_ID", "SpecDecodeMetadata", "SamplingMetadata", "RejectionSampler"]


@dataclass
class SpecDecodeMetadata:
    """draft_token_ids: [num_tokens] int32/int64, the drafts of all requests back to back;
    num_draft_tokens: drafts per request (list of B ints)."""

    draft_token_ids: torch.Tensor
    num_draft_tokens: list

    @classmethod
    def from_lists(cls, draft_token_ids: list, device=None) -> "SpecDecodeMetadata":
        flat = [t for row in draft_token_ids for t in row]
        return cls(torch.tensor(flat, dtype=torch.int32, device=device), [len(r) for r in draft_token_ids])


@dataclass
class SamplingMetadata:
    """Per-request sampling parameters ([B] tensors or None). ``temperature`` None or ``all_greedy``
    = greedy; ``seeds`` [B] int64 (None: drawn from torch's generator); ``step`` the call counter
    (advance it every call): call n draws with Philox offsets ``n << 20`` + position, so calls
    never share random numbers (position j of a call uses offset + j)."""

    temperature: torch.Tensor | None = None
    all_greedy: bool = False
    top_k: torch.Tensor | None = None
    top_p: torch.Tensor | None = None
    seeds: torch.Tensor | None = None
    step: int = 0


class RejectionSampler(torch.nn.Module):
    """Exact speculative rejection sampling (greedy and random requests mixed) in one fused op."""

    def forward(self, metadata: SpecDecodeMetadata, draft_probs: torch.Tensor | None, target_logits: torch.Tensor,
                bonus_token_ids: torch.Tensor, sampling_metadata: SamplingMetadata | None = None) -> torch.Tensor:
        """
        Args:
            metadata: flattened drafts, see :class:`SpecDecodeMetadata`.
            draft_probs: [num_tokens, Vd] float or None (deterministic drafter: n-gram, argmax).
            target_logits: [num_tokens, V] float, the target's logits at each draft position.
            bonus_token_ids: [B, 1] int, used for requests whose drafts are all accepted.
            sampling_metadata: per-request temperature/top-k/top-p/seeds (default: all greedy).
        Returns:
            [B, max_K + 1] int32 output token ids, -1 placeholders.
        """
        from specdec import ops

        sm = sampling_metadata or SamplingMetadata(all_greedy=True)
        dev = target_logits.device
        counts = torch.as_tensor(metadata.num_draft_tokens, dtype=torch.int64)
        B, N, V = counts.numel(), target_logits.shape[0], target_logits.shape[-1]
        if int(counts.sum()) != N or metadata.draft_token_ids.shape[0] != N:
            raise ValueError(f"num_draft_tokens sum to {int(counts.sum())} but target_logits has {N} rows and "
                             f"draft_token_ids {metadata.draft_token_ids.shape[0]}")
        K = int(counts.max()) if B else 0
        counts_d = counts.to(dev)
        row = torch.repeat_interleave(torch.arange(B, device=dev), counts_d)
        starts = torch.cumsum(counts_d, 0) - counts_d
        pos = torch.arange(N, device=dev) - starts[row]
        # padded layout of specdec.ops.verify: row b's bonus position is K_b (its logits are unused:
        # vLLM supplies the bonus token), positions after it hold -1 drafts
        logits = target_logits.new_zeros(B, K + 1, V)
        logits[row, pos] = target_logits
        drafts = torch.full((B, K), -1, dtype=torch.int64, device=dev)
        drafts[row, pos] = metadata.draft_token_ids.to(dev, torch.int64)
        probs = None
        if draft_probs is not None:
            probs = draft_probs.new_zeros(B, K, draft_probs.shape[-1])
            probs[row, pos] = draft_probs
        greedy = sm.all_greedy or sm.temperature is None
        temperature = 0.0 if greedy else sm.temperature.to(dev, torch.float32)
        out, num_accepted = ops.verify(
            logits, drafts, None if greedy else probs, temperature=temperature,
            top_k=0 if sm.top_k is None else sm.top_k, top_p=1.0 if sm.top_p is None else sm.top_p,
            seed=sm.seeds, offset=sm.step << 20,
        )
        all_accepted = num_accepted.long() == counts_d
        bonus = bonus_token_ids.reshape(B).to(dev, torch.int64)
        at = counts_d[:, None] == torch.arange(K + 1, device=dev)[None]
        out = torch.where(at & all_accepted[:, None], bonus[:, None], out)
        return out.to(torch.int32)

    @staticmethod
    def parse_output(output_token_ids: torch.Tensor, vocab_size: int) -> list:
        """[B, K+1] output -> per-request lists of valid token ids (placeholders and ids >= vocab dropped)."""
        valid = (output_token_ids != PLACEHOLDER_TOKEN_ID) & (output_token_ids < vocab_size)
        return [row[mask].tolist() for row, mask in zip(output_token_ids.cpu(), valid.cpu())]
