"""Logprobs of emitted tokens (``return_logprobs=True`` of ``verify``, ``verify_tree``, ``sample``)
in Triton.

What it computes is ``specdec.reference.emitted_logprobs``: for output slot m of row b, whose token
x was drawn at logit row ``b * P + source[b, m]``,
    processed = (x - max_kept) / T - log(sum over kept of exp((x' - max_kept) / T))   (-inf if x is
                not kept; greedy rows: raw)
    raw       = (x - max) - log(sum over finite of exp(x' - max))
from the pass-1 partials that ``softmax_stats_kernel`` already wrote for that row (its WANT_RAW
adds the raw sums to the same sweep): a few numbers and one logit per slot, never a pass over the
vocabulary. grid = (B * M,).

With a token bitmask the pass-1 statistics are over the allowed ids: processed is under the masked
distribution (greedy rows: the log-softmax of the masked logits at temperature 1, from the masked
sums that WANT_RAW then writes), and raw comes from the unmasked max and sum written beside them.
"""
import torch
import triton
import triton.language as tl

from specdec.kernels.sample import _block_s, allowed, clean_logits, exp2_scale, kept

_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit(do_not_specialize=["M", "P", "S1"])
def _token_logprobs_kernel(
    logits_ptr,  # [B * P, V] float logits
    tokens_ptr, source_ptr,  # [B, M] int64: emitted token (-1: none), position it was drawn at
    temperature_ptr,  # [B] float32
    thr_ptr,  # [B * P] float32 top-k/top-p thresholds (HAS_THR)
    mask_ptr,  # [B * P, W] int32 token bitmask (HAS_MASK)
    m_ptr, z_ptr, a_ptr, zr_ptr,  # [B * P, S1] pass-1 partials (WANT_RAW)
    mu_ptr, zu_ptr,  # [B * P, S1] unmasked max and sum of pass 1 (HAS_MASK)
    processed_ptr, raw_ptr,  # [B, M] float32 (out)
    V, M, P, S1, W,
    HAS_THR: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr = False,
):
    slot = tl.program_id(0)
    b = slot // M
    tok = tl.load(tokens_ptr + slot)
    row = b * P + tl.load(source_ptr + slot)
    t = tl.load(temperature_ptr + b)
    c = exp2_scale(t)
    sp = tl.arange(0, BLOCK_S)
    mask = sp < S1
    base = row * S1 + sp
    m = tl.load(m_ptr + base, mask=mask, other=float("-inf"))
    z = tl.load(z_ptr + base, mask=mask, other=0.0)
    a = tl.load(a_ptr + base, mask=mask, other=float("-inf"))
    zr = tl.load(zr_ptr + base, mask=mask, other=0.0)
    kept_max = tl.max(m, 0)
    kept_ref = tl.where(kept_max > float("-inf"), kept_max, 0.0)
    kept_sum = tl.sum(z * tl.math.exp2((m - kept_ref) * c), 0)
    raw_max = tl.max(a, 0)
    raw_ref = tl.where(raw_max > float("-inf"), raw_max, 0.0)
    raw_sum = tl.sum(zr * tl.math.exp2((a - raw_ref) * _LOG2E), 0)
    x = clean_logits(tl.load(logits_ptr + row.to(tl.int64) * V + tl.maximum(tok, 0), mask=tok >= 0,
                             other=float("-inf")))
    thr = float("-inf")
    if HAS_THR:
        thr = tl.load(thr_ptr + row)
    ok = x > float("-inf")  # an emitted token always has a finite logit; -1 slots load -inf
    raw = tl.where(ok, (x - raw_ref) - tl.log(tl.where(ok, raw_sum, 1.0)), float("-inf"))
    greedy = raw  # log-softmax at temperature 1 of the logits the statistics saw
    if HAS_MASK:
        # the statistics above are the masked ones: greedy's value from them, raw from mu / zu
        x_raw = x
        x = tl.where(allowed(mask_ptr + row.to(tl.int64) * W, tl.maximum(tok, 0), W), x, float("-inf"))
        ok = x > float("-inf")
        greedy = tl.where(ok, (x - raw_ref) - tl.log(tl.where(ok, raw_sum, 1.0)), float("-inf"))
        mu = tl.load(mu_ptr + base, mask=mask, other=float("-inf"))
        zu = tl.load(zu_ptr + base, mask=mask, other=0.0)
        u_max = tl.max(mu, 0)
        u_ref = tl.where(u_max > float("-inf"), u_max, 0.0)
        u_sum = tl.sum(zu * tl.math.exp2((mu - u_ref) * _LOG2E), 0)
        ok_raw = x_raw > float("-inf")
        raw = tl.where(ok_raw, (x_raw - u_ref) - tl.log(tl.where(ok_raw, u_sum, 1.0)), float("-inf"))
    proc = (x - kept_ref) * (c * _LN2) - tl.log(tl.where(kept_sum > 0, kept_sum, 1.0))
    proc = tl.where(kept(x, thr), proc, float("-inf"))
    proc = tl.where(t <= 0, greedy, proc)
    tl.store(processed_ptr + slot, proc)
    tl.store(raw_ptr + slot, raw)


def token_logprobs(logits, tokens, source, temperature, thr, stats, raw_sums, token_bitmask=None):
    """(processed, raw) [B, M] float32 logprobs of ``tokens`` [B, M] int64 (-1: none, -inf out)
    drawn at logit rows b * P + ``source`` [B, M] of ``logits`` [B * P, V]; temperature [B]
    float32; thr [B * P] float32 or None; stats [>= 3, B * P, S1] (max, sum, argmax value) and
    raw_sums [1, B * P, S1] (with a bitmask [3, B * P, S1]: ``sample.raw_sums_buffer``) from
    ``softmax_stats_kernel`` run with WANT_RAW; token_bitmask [B * P, W] int32 or None, the one
    pass 1 used."""
    R, V = logits.shape
    B, M = tokens.shape
    dev = logits.device
    processed = torch.empty((B, M), dtype=torch.float32, device=dev)
    raw = torch.empty((B, M), dtype=torch.float32, device=dev)
    if B * M == 0:
        return processed, raw
    S1 = stats.shape[2]
    has_mask = token_bitmask is not None
    mask, W = (token_bitmask, token_bitmask.shape[-1]) if has_mask else (temperature, 1)  # placeholder
    zr, mu, zu = (raw_sums[0], raw_sums[1], raw_sums[2]) if has_mask else (raw_sums[0],) * 3
    _token_logprobs_kernel[(B * M,)](
        logits, tokens.to(torch.int64).contiguous(), source.to(torch.int64).contiguous(), temperature,
        thr if thr is not None else temperature, mask, stats[0], stats[1], stats[2], zr, mu, zu,
        processed, raw, V, M, R // B, S1, W, HAS_THR=thr is not None, BLOCK_S=_block_s(S1),
        HAS_MASK=has_mask, num_warps=1)
    return processed, raw
