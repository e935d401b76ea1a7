"""specdec's fused verification as vLLM 0.33's rejection sampler, for both of vLLM's model runners.

Switch it on with one line: ``export SPECDEC_VLLM_SAMPLER=1`` before starting vLLM (the
``vllm.general_plugins`` entry point in :mod:`specdec.integrations.vllm_plugin` then puts these
classes in place in every vLLM process). Or build them yourself, with vLLM's own arguments:

- :class:`RejectionSampler` for the V1 runner (``vllm/v1/worker/gpu_model_runner.py``):
  ``RejectionSampler(sampler, spec_config=None, device=None)``,
  ``forward(metadata, draft_probs, logits, sampling_metadata) -> SamplerOutput``,
  ``parse_output(output_token_ids, vocab_size, discard_req_indices=(), logprobs_tensors=None)``.
- :class:`ModelRunnerV2RejectionSampler` for Model Runner V2 (``vllm/v1/worker/gpu/``):
  ``(sampler, spec_config, device, *, watermark_key=None)``,
  ``__call__(logits, input_batch, draft_logits=None, invalid_drafts=None) -> SamplerOutput``.

Both subclass vLLM's own classes and keep everything around the accept/reject step vLLM's: V1
samples the bonus token through ``self.sampler``, applies vLLM's logits processors (penalties,
bad words, ``allowed_token_ids_mask``, min-tokens, thinking budget) to the draft positions with
vLLM's ``apply_logits_processors``, and computes logprobs with vLLM's ``_get_logprobs_tensors``;
V2 gathers drafts and positions with vLLM's ``gather_draft_sampled``, processes logits with
``sampler.apply_sampling_params`` and counts tokens with ``get_num_sampled_and_rejected``. In
between, one :func:`specdec.ops.verify` call applies temperature, top-k and top-p and does the
accept/reject/recover step: sample-and-compare when there are no draft probabilities (n-gram,
greedy drafters), the ratio test against the real draft distribution when there are.

Random numbers and what is bit-identical to vLLM:

- Greedy requests: identical tokens (argmax walk, ties to the lowest id as ``torch.argmax``).
- V1, a request with no drafts this step: its token is vLLM's own sampler's (the bonus path).
- V1 seeding: a request with its own ``torch.Generator`` (``SamplingParams.seed``) gets, each
  step it has drafts, a 62-bit specdec seed drawn from that generator (offset 0, position j of the
  step uses offset j); other requests draw theirs from the device's default generator. Same seed,
  same step history => same tokens, whatever the batch around the request.
- V2 seeding: specdec's Philox is keyed by (the request's seed from ``sampling_states.seeds``,
  the token's absolute position), as vLLM V2's own Gumbel sampling is: reproducible per request
  and position, independent of the batch.
- Sampled (temperature > 0) tokens at draft positions are NOT bit-identical to vLLM's: the same
  distribution (exactness is what specdec's tests prove), other random numbers.

Logprobs: vLLM's ``LogprobsTensors`` hold the top-``max_num_logprobs`` ids and values and the
sampled token's rank, which need the whole processed distribution, so they are computed the way
vLLM's samplers compute them (vLLM's own functions, on vLLM's processed or raw logits per
``logprobs_mode``), not taken from ``specdec.verify``.

Not supported (a clear error, never a silent fallback): ``rejection_sample_method`` other than
"standard" (fly, synthetic, block), V2 watermarking, V2 adaptive verification.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

try:
    import vllm
except ImportError as e:  # pragma: no cover - exercised in the main venv
    raise ImportError("specdec.integrations.vllm needs vllm 0.33.x (pip install vllm==0.33.0)") from e

from specdec.integrations.vllm_plugin import check_version

check_version(vllm.__version__)

from vllm.config.model import PROCESSED_LOGPROBS_MODES  # noqa: E402
from vllm.v1.outputs import SamplerOutput  # noqa: E402
from vllm.v1.sample import rejection_sampler as _v1  # noqa: E402
from vllm.v1.worker.gpu import input_batch as _v2_batch  # noqa: E402
from vllm.v1.worker.gpu.metrics.logits import get_num_nans  # noqa: E402
from vllm.v1.worker.gpu.sample.output import SamplerOutput as V2SamplerOutput  # noqa: E402
from vllm.v1.worker.gpu.sample.output import SamplingMaskTensors  # noqa: E402
from vllm.v1.worker.gpu.sample.states import NO_LOGPROBS  # noqa: E402
from vllm.v1.worker.gpu.spec_decode import rejection_sampler as _v2  # noqa: E402

from specdec import ops  # noqa: E402

PLACEHOLDER_TOKEN_ID = -1
MAX_SPEC_LEN = 128  # vLLM's limit on drafts per request and step
_SEED_HIGH = 2**62

__all__ = ["PLACEHOLDER_TOKEN_ID", "MAX_SPEC_LEN", "RejectionSampler", "ModelRunnerV2RejectionSampler"]


def _check_method(spec_config) -> None:
    method = getattr(spec_config, "rejection_sample_method", "standard") if spec_config is not None else "standard"
    if method != "standard":
        raise NotImplementedError(
            f"specdec's vLLM sampler implements rejection_sample_method='standard' only, got {method!r}; "
            "unset SPECDEC_VLLM_SAMPLER to use vLLM's sampler for it")


def _padded(rows: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, B: int, width: int, fill) -> torch.Tensor:
    """rows [N, ...] scattered to [B, width, ...] at (row, pos); `fill` elsewhere."""
    out = torch.full((B, width, *rows.shape[1:]), fill, dtype=rows.dtype, device=rows.device)
    out[row, pos] = rows
    return out


class RejectionSampler(_v1.RejectionSampler):
    """vLLM 0.33 V1 runner's ``RejectionSampler``, verification by :func:`specdec.ops.verify`.

    Args (vLLM's): sampler: vLLM's ``Sampler`` (bonus tokens, logprob helpers);
    spec_config: ``SpeculativeConfig`` or None; device: unused (tensors carry theirs).
    """

    def __init__(self, sampler, spec_config=None, device: torch.device | None = None):
        # vLLM's __init__ registers warm-ups of its Triton kernels, which this class never runs
        torch.nn.Module.__init__(self)
        _check_method(spec_config)
        self.sampler = sampler
        self.use_fly = False
        self.fly_window_size = self.fly_entropy_threshold = None
        self.fly_entropy_top_k = 3
        self.synthetic_conditional_rates = None
        self.synthetic_mode = False
        self.use_fp64_gumbel = getattr(sampler, "use_fp64_gumbel", False)
        self.is_processed_logprobs_mode = sampler.logprobs_mode in PROCESSED_LOGPROBS_MODES
        self.is_logits_logprobs_mode = sampler.logprobs_mode in ("raw_logits", "processed_logits")

    def forward(self, metadata, draft_probs: torch.Tensor | None, logits: torch.Tensor,
                sampling_metadata) -> SamplerOutput:
        """
        Args:
            metadata: vLLM's ``SpecDecodeMetadata``: ``draft_token_ids`` [N] int32,
                ``num_draft_tokens`` (B ints), ``cu_num_draft_tokens`` [B] int32,
                ``target_logits_indices`` [N], ``bonus_logits_indices`` [B].
            draft_probs: [N, Vd] float, the distributions the drafts were sampled from, or None
                (n-gram and other deterministic drafters).
            logits: [N + B, V] float, the target's logits at draft and bonus positions.
            sampling_metadata: vLLM's ``SamplingMetadata`` (temperature [B] with 0 = greedy or
                None when all greedy, top_k / top_p [B] or None, ``generators``, processors).
        Returns:
            vLLM's ``SamplerOutput``: ``sampled_token_ids`` [B, max_spec_len + 1] int32 (accepted
            drafts, then the recovered or bonus token, then -1), ``logprobs_tensors`` when
            ``sampling_metadata.max_num_logprobs`` is set.
        """
        K = metadata.max_spec_len
        if K > MAX_SPEC_LEN:
            raise ValueError(f"max_spec_len {K} exceeds MAX_SPEC_LEN={MAX_SPEC_LEN}")
        sm = sampling_metadata
        counts_list = metadata.num_draft_tokens
        B, N = len(counts_list), metadata.draft_token_ids.shape[0]
        if logits.dim() != 2 or logits.shape[0] != N + B:
            raise ValueError(f"logits must be [num_draft_tokens + batch_size = {N + B}, V], "
                             f"got {tuple(logits.shape)}")
        dev = logits.device

        # the bonus token, exactly as vLLM samples it (logits processors, seeds and all)
        bonus_output = self.sampler(
            logits=logits[metadata.bonus_logits_indices],
            sampling_metadata=replace(sm, max_num_logprobs=-1),
            predict_bonus_token=True,
            logprobs_mode_override="processed_logits" if self.is_processed_logprobs_mode else "raw_logits",
        )
        bonus_token_ids = bonus_output.sampled_token_ids.reshape(B, 1).to(torch.int64)

        raw_target_logits = logits[metadata.target_logits_indices].to(torch.float32)
        want_logprobs = sm.max_num_logprobs is not None
        target_logits = raw_target_logits
        if want_logprobs and not self.is_processed_logprobs_mode:
            target_logits = raw_target_logits.clone()  # the processors below work in place
        target_logits = self.apply_logits_processors(target_logits, sm, metadata)

        if N == 0:
            output_token_ids = bonus_token_ids.to(torch.int32)
        else:
            counts = metadata.cu_num_draft_tokens.to(torch.int64).diff(prepend=torch.zeros(1, dtype=torch.int64, device=dev))
            row = torch.repeat_interleave(torch.arange(B, device=dev), counts, output_size=N)
            pos = torch.arange(N, device=dev) - (torch.cumsum(counts, 0) - counts)[row]
            # position n_b of row b (its bonus position) and everything after: zeros, finite
            # logits that verify may sample from; the token there is replaced by vLLM's bonus
            padded_logits = _padded(target_logits, row, pos, B, K + 1, 0.0)
            drafts = _padded(metadata.draft_token_ids.to(torch.int64), row, pos, B, K, -1)
            greedy = sm.all_greedy or sm.temperature is None
            probs = None if greedy or draft_probs is None else _padded(draft_probs, row, pos, B, K, 0.0)
            out, num_accepted = ops.verify(
                padded_logits, drafts, probs,
                temperature=0.0 if greedy else sm.temperature,
                top_k=0 if greedy or sm.top_k is None else sm.top_k,
                top_p=1.0 if greedy or sm.top_p is None else sm.top_p,
                seed=0 if greedy else _v1_seeds(counts_list, sm.generators, B, dev),
                offset=0,
            )
            all_accepted = num_accepted.to(torch.int64) == counts
            at_bonus = counts[:, None] == torch.arange(K + 1, device=dev)[None]
            output_token_ids = torch.where(at_bonus & all_accepted[:, None], bonus_token_ids, out).to(torch.int32)

        logprobs_tensors = None
        if want_logprobs:
            if self.is_processed_logprobs_mode:
                # vLLM's processed logits: temperature, top-k, top-p as vLLM applies them
                target_logits = _v1.apply_sampling_constraints(target_logits, metadata.cu_num_draft_tokens, sm)
            logprobs_tensors = self._get_logprobs_tensors(
                sm.max_num_logprobs, metadata, logits,
                target_logits if self.is_processed_logprobs_mode else raw_target_logits,
                bonus_output.logprobs_tensors.logprobs, output_token_ids)
        return SamplerOutput(sampled_token_ids=output_token_ids, logprobs_tensors=logprobs_tensors)


def _v1_seeds(num_draft_tokens: list, generators: dict, B: int, dev) -> torch.Tensor:
    """[B] int64 specdec seeds for one step: from each request's own generator when it has one
    (and drafts this step: vLLM draws nothing for a request without drafts either), else from the
    device's default generator. No host sync: in-place draws on the device."""
    seeds = torch.empty(B, dtype=torch.int64, device=dev).random_(0, _SEED_HIGH)
    for i, gen in generators.items():
        if i < B and num_draft_tokens[i] > 0:
            seeds[i:i + 1].random_(0, _SEED_HIGH, generator=gen)
    return seeds


class ModelRunnerV2RejectionSampler(_v2.RejectionSampler):
    """vLLM 0.33 Model Runner V2's ``RejectionSampler``, verification by :func:`specdec.ops.verify`.

    Args (vLLM's): sampler: V2's ``Sampler`` (its ``sampling_states``, ``req_states`` and
    ``apply_sampling_params``); spec_config: ``SpeculativeConfig``; device: unused;
    watermark_key: must be None (specdec does not watermark).
    """

    def __init__(self, sampler, spec_config, device: torch.device | None = None, *, watermark_key: int | None = None):
        if watermark_key is not None:
            raise NotImplementedError("specdec's vLLM sampler does not watermark; unset SPECDEC_VLLM_SAMPLER "
                                      "to use vLLM's sampler with a watermark_config")
        _check_method(spec_config)
        if getattr(spec_config, "enable_adaptive_verification", False):
            raise NotImplementedError("specdec's vLLM sampler does not support enable_adaptive_verification")
        self.sampler = sampler
        self.watermark_key = None
        self.num_speculative_steps = spec_config.num_speculative_tokens
        self.enable_adaptive_verification = False
        self.use_block_verification = False
        self.synthetic_conditional_rates = None
        self.fly_window_size = 0

    def __call__(self, logits: torch.Tensor, input_batch, draft_logits: torch.Tensor | None = None,
                 invalid_drafts: torch.Tensor | None = None) -> V2SamplerOutput:
        """
        Args:
            logits: [num_logits, V] float, the target's logits; request i owns rows
                ``cu_num_logits[i]:cu_num_logits[i+1]`` (its drafts' positions, then the bonus).
            input_batch: V2's ``InputBatch`` (input ids, positions, idx_mapping, cu_num_logits...).
            draft_logits: [max_num_reqs, num_speculative_steps, Vd] float, the drafter's logits
                before temperature (rows by request state index), or None (one-hot drafts).
            invalid_drafts: [num_logits] bool or None: drafts to treat as rejected (grammar).
        Returns:
            V2's ``SamplerOutput``: ``sampled_token_ids`` [num_reqs, num_speculative_steps + 1]
            int64 (-1 after the emitted tokens), ``num_sampled`` / ``num_rejected`` [num_reqs]
            int32, logprobs / sampling masks when requested.
        """
        sampler = self.sampler
        states = sampler.sampling_states
        ib = input_batch
        num_nans = get_num_nans(logits) if sampler.compute_nans else None
        draft_sampled, pos = _v2.gather_draft_sampled(
            ib.input_ids, ib.positions, ib.logits_indices, ib.expanded_idx_mapping, ib.expanded_local_pos,
            sampler.req_states.prefill_len.gpu)
        verify_draft_sampled = draft_sampled if invalid_drafts is None else draft_sampled.masked_fill(invalid_drafts, -1)
        # penalties, bias, bad words, custom processors, thinking budget, temperature, min-p: vLLM's
        processed = sampler.apply_sampling_params(
            logits, ib.expanded_idx_mapping, ib.idx_mapping, ib.idx_mapping_np, pos, draft_sampled,
            ib.expanded_local_pos, ib.seq_lens_cpu_upper_bound.numpy(), skip_top_k_top_p=True)

        B, K, V = ib.num_reqs, self.num_speculative_steps, logits.shape[-1]
        dev = logits.device
        idx, idx_np = ib.idx_mapping, ib.idx_mapping_np
        cu, cu_np = ib.cu_num_logits, ib.cu_num_logits_np
        num_logits = logits.shape[0]
        if np.all(np.diff(cu_np[:B + 1]) == K + 1):  # every request has K drafts: a view, no copy
            padded_logits = processed.reshape(B, K + 1, V)
            drafts = verify_draft_sampled.reshape(B, K + 1)[:, 1:].to(torch.int64)
        else:
            per_req = cu[1:B + 1].to(torch.int64) - cu[:B].to(torch.int64)
            row = torch.repeat_interleave(torch.arange(B, device=dev), per_req, output_size=num_logits)
            local = ib.expanded_local_pos.to(torch.int64)
            padded_logits = _padded(processed, row, local, B, K + 1, 0.0)
            # local position 0 holds the last sampled token, drafts follow it
            drafts = _padded(verify_draft_sampled.to(torch.int64), row, local, B, K + 2, -1)[:, 1:K + 1]

        temperature = states.temperature.gpu[idx]
        greedy = temperature == 0
        probs = None
        if draft_logits is not None:
            Vd = min(V, draft_logits.shape[-1])
            scale = torch.where(greedy, torch.ones_like(temperature), temperature)
            probs = torch.softmax(draft_logits[idx, :K, :Vd].to(torch.float32) / scale[:, None, None], dim=-1)
        do_top_k = bool(np.any(states.top_k.np[idx_np] != states.vocab_size))
        do_top_p = bool(np.any(states.top_p.np[idx_np] != 1.0))
        out, num_accepted = ops.verify(
            padded_logits, drafts, probs,
            # temperature is already in `processed`: 1 for sampled rows, 0 keeps greedy rows greedy
            temperature=torch.where(greedy, 0.0, 1.0).to(torch.float32),
            top_k=states.top_k.gpu[idx] if do_top_k else 0,
            top_p=states.top_p.gpu[idx] if do_top_p else 1.0,
            seed=states.seeds.gpu[idx],
            offset=pos[cu[:B].to(torch.int64)].to(torch.int64),  # absolute position of each request's first row
        )
        num_sampled = num_accepted + 1

        max_num_logprobs = states.max_num_logprobs(idx_np)
        need_full = sampler.return_sampling_mask or (
            max_num_logprobs != NO_LOGPROBS and sampler.logprobs_mode in PROCESSED_LOGPROBS_MODES)
        full = states.apply_top_k_top_p(processed, ib.expanded_idx_mapping, idx_np) if need_full else None
        logprobs_tensors = self._get_logprobs_tensors(
            out, num_sampled, full if sampler.logprobs_mode in PROCESSED_LOGPROBS_MODES else logits,
            cu, cu_np, max_num_logprobs)
        sampling_mask_tensors = None
        if sampler.return_sampling_mask:
            max_num_kept = int(np.max(states.top_k.np[idx_np]))
            sampling_mask_tensors = SamplingMaskTensors.from_logits(full, cu, num_sampled, max_num_kept, K + 1)

        num_sampled, num_rejected = _v2_batch.get_num_sampled_and_rejected(
            num_sampled, ib.seq_lens, cu, idx, sampler.req_states.prefill_len.gpu)
        return V2SamplerOutput(sampled_token_ids=out, logprobs_tensors=logprobs_tensors, num_nans=num_nans,
                               num_sampled=num_sampled, num_rejected=num_rejected,
                               sampling_mask_tensors=sampling_mask_tensors)
