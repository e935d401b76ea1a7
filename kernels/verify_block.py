"""Block verification of a chain (``specdec.ops.verify(..., method="block")``) in Triton.

What it computes is ``specdec.reference.verify_block`` (the specification; Sun et al., "Block
Verification Accelerates Speculative Decoding", ICLR 2025), with the same Philox numbers: weights
w_0 = 1, w_{i+1} = min(1, w_i p_i(x_i) / q_i(x_i)); "keep i drafts" holds iff u_i <= w_g (i = g,
the chain's length) or u_i (R_i + 1 - w_i) <= R_i with R_i the mass of max(0, w_i p_i - q_i),
read from i = g down to 1 (``STREAM_ACCEPT_PREFIX`` at offset + i - 1, index i - 1); the first
that holds is the stop s. Keeping s < g drafts emits a race over that residual (its mass 0: over
p_s) on the resample streams at offset + s; keeping all g emits the bonus, the target's own
sample (the sample op's streams). Greedy rows accept while the draft is the argmax, as ``verify``.

Kernels (B rows, K drafts, Vt target vocabulary):
  1. ``softmax_stats_kernel`` (sample.py), grid (B*(K+1), S1), as in verify.py: every position's
     partial (max, sum of exp, argmax) per vocabulary split.
  2. ``_verify_block_kernel``, grid (B,): one program per row combines the row's partials, computes
     the weights from each draft's logit and draft probability, runs the backward scan (one sweep
     over position i's logits and draft_probs row per test that needs R_i, none for a weight of
     0), then the two-level race at s: a sweep over race tiles (block sums and the block race),
     and the race inside the winning block.
Bytes read: the target logits once (pass 1), plus one logits row and one draft_probs row per test
the scan makes and two at the stop. One program per row keeps the scan simple; chains are short.
Token bitmask (``token_bitmask`` [B, K+1, W], HAS_MASK): every load of a position's logits goes
through ``sample.ban``, so banned ids are -inf before anything else (a banned draft has p = 0).
Nothing synchronises with the host.
"""
import torch
import triton
import triton.language as tl

from specdec.kernels.philox import (
    STREAM_ACCEPT_PREFIX,
    STREAM_RESAMPLE,
    STREAM_RESAMPLE_BLOCK,
    STREAM_SAMPLE,
    STREAM_SAMPLE_BLOCK,
    exponential,
    philox_bits,
    uniform_open_closed,
)
from specdec.kernels.sample import (
    _BIG_ID,
    RACE_BLOCK,
    ban,
    block_k,
    clean_logits,
    exp2_scale,
    filter_thresholds,
    kept,
    mask_args,
    race_in_block,
    race_tile,
    race_update,
    race_winner,
    softmax_stats_kernel,
    split_plan,
    target_probs,
)


@triton.jit
def _draft_q(q):
    """Draft probabilities as every backend reads them: float32, NaN counts as 0."""
    q = q.to(tl.float32)
    return tl.where(q == q, q, 0.0)


@triton.jit
def _residual_mass(row_ptr, q_row_ptr, Vt, Vd, w, c, thr, row_max, row_sum, mask_row_ptr, W,
                   BLOCK_V: tl.constexpr, HAS_MASK: tl.constexpr):
    """sum_x max(0, w p(x) - q(x)) over one position's vocabulary (q = 0 at ids >= Vd; HAS_MASK:
    p = 0 at banned ids)."""
    acc = tl.zeros([BLOCK_V], tl.float32)
    for j in range(tl.cdiv(Vt, BLOCK_V)):
        offs = j * BLOCK_V + tl.arange(0, BLOCK_V)
        raw = tl.load(row_ptr + offs, mask=offs < Vt, other=float("-inf"))
        if HAS_MASK:
            raw = ban(raw, mask_row_ptr, offs, W)
        p, _ = target_probs(raw, c, thr, row_max, row_sum)
        q = _draft_q(tl.load(q_row_ptr + offs, mask=offs < Vd, other=0.0))
        acc += tl.where(offs < Vt, tl.maximum(w * p - q, 0.0), 0.0)
    return tl.sum(acc, 0)


@triton.jit
def _pick(vec, pos, i):
    """vec[i] of a [BLOCK_K1] vector (float)."""
    return tl.sum(tl.where(pos == i, vec, 0.0), 0)


@triton.jit(do_not_specialize=["K", "S1"])
def _verify_block_kernel(
    logits_ptr,  # [B, K+1, Vt] float target logits
    drafts_ptr,  # [B, K] int64 draft ids
    q_ptr,  # [B, K, Vd] float draft probabilities
    temperature_ptr, seed_ptr, offset_ptr,  # [B]
    thr_ptr,  # [B * (K+1)] float32 top-k/top-p thresholds (HAS_THR)
    mask_ptr,  # [B * (K+1), W] int32 token bitmask (HAS_MASK)
    m_ptr, z_ptr, a_ptr, ai_ptr,  # [B * (K+1), S1] pass-1 partials
    out_ptr,  # [B, K+1] int64 output ids (out)
    num_acc_ptr,  # [B] int32 (out)
    K, Vt, Vd, S1, W,
    HAS_THR: tl.constexpr, BLOCK_K1: tl.constexpr, BLOCK_S1: tl.constexpr,
    TILE_BLOCKS: tl.constexpr, HAS_MASK: tl.constexpr = False,
):
    b = tl.program_id(0)
    K1 = K + 1
    t = tl.load(temperature_ptr + b)
    greedy = t <= 0
    c = exp2_scale(t)
    seed = tl.load(seed_ptr + b)
    offset = tl.load(offset_ptr + b)

    # ---- per-position statistics (as verify.py's accept kernel) ------------------------------
    pos = tl.arange(0, BLOCK_K1)
    sp = tl.arange(0, BLOCK_S1)
    pmask = (pos[:, None] < K1) & (sp[None, :] < S1)
    poff = (b * K1 + pos)[:, None] * S1 + sp[None, :]
    m = tl.load(m_ptr + poff, mask=pmask, other=float("-inf"))
    z = tl.load(z_ptr + poff, mask=pmask, other=0.0)
    a = tl.load(a_ptr + poff, mask=pmask, other=float("-inf"))
    ai = tl.load(ai_ptr + poff, mask=pmask, other=_BIG_ID)
    row_max = tl.max(m, 1)
    row_max = tl.where(row_max > float("-inf"), row_max, 0.0)  # no kept logit: no -inf - -inf
    row_sum = tl.sum(z * tl.math.exp2((m - row_max[:, None]) * c), 1)
    row_sum = tl.where(row_sum > 0, row_sum, 1.0)
    amax = tl.max(a, 1)
    argmax = tl.min(tl.where(a == amax[:, None], ai, _BIG_ID), 1)
    finite = amax > float("-inf")
    thr = tl.full([BLOCK_K1], float("-inf"), tl.float32)
    if HAS_THR:
        thr = tl.load(thr_ptr + b * K1 + pos, mask=pos < K1, other=float("-inf"))

    # ---- drafts, their target and draft probabilities ----------------------------------------
    is_draft = pos < K
    drafts = tl.load(drafts_ptr + b * K + pos, mask=is_draft, other=-1)
    n_drafts = tl.min(tl.where(is_draft & (drafts == -1), pos, K), 0)
    in_range = is_draft & (drafts >= 0) & (drafts < Vd)
    g = tl.min(tl.where(is_draft & ~in_range, pos, K), 0)  # the chain ends at a -1 or a bad id
    safe = tl.where(in_range, drafts, 0)
    x = clean_logits(tl.load(logits_ptr + (b * K1 + pos).to(tl.int64) * Vt + safe, mask=in_range,
                             other=float("-inf")))
    if HAS_MASK:  # a banned draft: p = 0 (lanes >= K1 read row K's words: in bounds)
        x = ban(x, mask_ptr + (b * K1 + tl.minimum(pos, K)).to(tl.int64) * W, safe, W)
    keep_draft = kept(x, thr)
    p_draft = tl.where(keep_draft, tl.math.exp2((x - row_max) * c) / row_sum, 0.0)
    q_draft = _draft_q(tl.load(q_ptr + (b * K + pos).to(tl.int64) * Vd + safe, mask=in_range, other=0.0))

    # greedy rows: accept while the draft is the argmax (verify's rule)
    accept_greedy = (drafts == argmax.to(tl.int64)) & in_range & (pos < n_drafts) & finite
    s_greedy = tl.min(tl.where(accept_greedy | ~is_draft, K, pos), 0)

    # ---- weights w_0..w_K (w_i in lane i) -----------------------------------------------------
    wv = tl.where(pos == 0, 1.0, 0.0)
    w_prev = tl.sum(wv, 0)  # 1.0 as a float32 scalar
    for i in range(0, K):
        px = _pick(p_draft, pos, i)
        qx = _pick(q_draft, pos, i)
        ratio = tl.where(qx > 0, tl.minimum(w_prev * px / tl.where(qx > 0, qx, 1.0), 1.0), 1.0)
        wn = tl.where(i < g, tl.where(px > 0, tl.where(w_prev > 0, ratio, 0.0), 0.0), 0.0)
        wv = tl.where(pos == i + 1, wn, wv)
        w_prev = wn

    # ---- backward scan: the largest i in 1..g whose test holds --------------------------------
    s = tl.where(greedy, s_greedy, 0)
    found = greedy.to(tl.int32)  # greedy rows are decided
    for step in range(0, K):
        i = K - step
        w_i = _pick(wv, pos, i)
        if (found == 0) & (i <= g) & (w_i > 0):  # a weight of 0 fails its test: nothing to read
            u = uniform_open_closed(philox_bits(seed, offset + (i - 1), STREAM_ACCEPT_PREFIX, 0, i - 1))
            R = 0.0
            if (i < g) & (tl.sum(tl.where((pos == i) & finite, 1, 0), 0) > 0):
                R = _residual_mass(logits_ptr + (b * K1 + i).to(tl.int64) * Vt,
                                   q_ptr + (b * K + i).to(tl.int64) * Vd, Vt, Vd, w_i, c,
                                   tl.max(tl.where(pos == i, thr, float("-inf")), 0),
                                   tl.max(tl.where(pos == i, row_max, float("-inf")), 0),
                                   _pick(row_sum, pos, i), mask_ptr + (b * K1 + i).to(tl.int64) * W, W,
                                   TILE_BLOCKS * RACE_BLOCK, HAS_MASK)
            stop = tl.where(i == g, u <= w_i, u * (R + 1.0 - w_i) <= R)
            if stop:
                s = i + 0 * s
                found = 1 + 0 * found

    # ---- the emitted token at s ----------------------------------------------------------------
    at_s = pos == s
    row_ok = tl.sum(tl.where(at_s & finite, 1, 0), 0) > 0
    max_s = tl.max(tl.where(at_s, row_max, float("-inf")), 0)
    sum_s = tl.sum(tl.where(at_s, row_sum, 0.0), 0)
    thr_s = tl.max(tl.where(at_s, thr, float("-inf")), 0)
    w_s = _pick(wv, pos, s)
    bonus = s == g
    row_ptr = logits_ptr + (b * K1 + s).to(tl.int64) * Vt
    mask_row_ptr = mask_ptr + (b * K1 + s).to(tl.int64) * W
    q_row_ptr = q_ptr + (b * K + tl.minimum(s, tl.maximum(K - 1, 0))).to(tl.int64) * Vd
    q_lim = tl.where(bonus, 0, Vd)  # the bonus position has no draft: q is not read
    sampled = row_ok & (t > 0)
    mass = 0.0
    if sampled & (s < g):
        mass = _residual_mass(row_ptr, q_row_ptr, Vt, q_lim, w_s, c, thr_s, max_s, sum_s,
                              mask_row_ptr, W, TILE_BLOCKS * RACE_BLOCK, HAS_MASK)
    use_r = mass > 0  # residual mass 0 (or the bonus): a race over p

    # block race over the race blocks of position s
    n_tiles = tl.cdiv(tl.cdiv(Vt, RACE_BLOCK), TILE_BLOCKS)
    n_tiles = tl.where(sampled, n_tiles, 0)
    best = tl.full([TILE_BLOCKS], float("-inf"), tl.float32)
    best_id = tl.full([TILE_BLOCKS], _BIG_ID, tl.int32)
    n_blocks = tl.cdiv(Vt, RACE_BLOCK)
    for j in range(n_tiles):
        blocks, offs, mask = race_tile(j * TILE_BLOCKS, n_blocks, Vt, TILE_BLOCKS)
        raw = tl.load(row_ptr + offs, mask=mask, other=float("-inf"))
        if HAS_MASK:
            raw = ban(raw, mask_row_ptr, offs, W)
        p, keep = target_probs(raw, c, thr_s, max_s, sum_s)
        q = _draft_q(tl.load(q_row_ptr + offs, mask=offs < q_lim, other=0.0))
        r = tl.where(mask, tl.maximum(w_s * p - q, 0.0), 0.0)
        w_r = tl.sum(r, 1)
        has_p = tl.max(keep.to(tl.int32), 1) > 0  # W_b > 0 in the reference
        e_res = exponential(philox_bits(seed, offset + s, STREAM_RESAMPLE_BLOCK, 0, blocks))
        e_own = exponential(philox_bits(seed, offset + s, STREAM_SAMPLE_BLOCK, 0, blocks))
        e = tl.where(bonus, e_own, e_res)
        score = tl.where(use_r, tl.where(w_r > 0, w_r / e, -1.0),
                         tl.where(has_p, tl.sum(p, 1) / e, -1.0))
        best, best_id = race_update(score, blocks, best, best_id)
    _, blk = race_winner(best, best_id)

    # the race inside the winning block
    offs = blk * RACE_BLOCK + tl.arange(0, RACE_BLOCK)
    raw = tl.load(row_ptr + offs, mask=(offs < Vt) & sampled, other=float("-inf"))
    if HAS_MASK:  # rows not sampled have no winning block (offs is garbage): read word 0
        raw = ban(raw, mask_row_ptr, tl.where(sampled, offs, 0), W)
    p, keep = target_probs(raw, c, thr_s, max_s, sum_s)
    q = _draft_q(tl.load(q_row_ptr + offs, mask=(offs < q_lim) & sampled, other=0.0))
    r = tl.maximum(w_s * p - q, 0.0)
    w = tl.where(use_r, r, p)
    competes = tl.where(use_r, r > 0, keep)
    resampled = race_in_block(w, competes, offs, seed, offset + s, STREAM_RESAMPLE, 0)
    own = race_in_block(w, competes, offs, seed, offset + s, STREAM_SAMPLE, 0)
    token = tl.where(bonus, own, resampled)
    token = tl.where(greedy, tl.min(tl.where(at_s, argmax, _BIG_ID), 0), token)

    ids = tl.where(pos < s, drafts, -1)
    ids = tl.where(at_s, token.to(tl.int64), ids)
    tl.store(out_ptr + b * K1 + pos, tl.where(row_ok, ids, -1), mask=pos < K1)
    tl.store(num_acc_ptr + b, tl.where(row_ok, s, 0))


def verify_block(target_logits, draft_token_ids, draft_probs, temperature, top_k, top_p, seed, offset,
                 *, block_v=None, num_splits=None, token_bitmask=None):
    """Block verification (Triton). Same contract as ``specdec.reference.verify_block``.

    target_logits [B, K+1, Vt] float32/float16/bfloat16; draft_token_ids [B, K] int64 (-1 tail);
    draft_probs [B, K, Vd] float (Vd <= Vt); temperature [B] float32 (<= 0: greedy row); top_k
    [B] int64 (0 = off) or None; top_p [B] float32 (1.0 = off) or None; seed, offset [B] int64; all
    on one device; token_bitmask [B, K+1, W] int32 (W >= 1) or None: position j's allowed ids
    (``specdec.reference.allowed_ids``). ``block_v`` / ``num_splits`` override pass 1's tiling
    (tests, tuning).
    Returns (output_ids [B, K+1] int64, num_accepted [B] int32).
    """
    B, K1, Vt = target_logits.shape
    K = K1 - 1
    dev = target_logits.device
    if B == 0 or Vt == 0:
        return (torch.full((B, K1), -1, dtype=torch.int64, device=dev),
                torch.zeros((B,), dtype=torch.int32, device=dev))
    out = torch.empty((B, K1), dtype=torch.int64, device=dev)
    num_acc = torch.empty((B,), dtype=torch.int32, device=dev)
    logits = target_logits.contiguous()
    drafts = draft_token_ids.to(torch.int64).contiguous()
    temperature = temperature.to(torch.float32).contiguous()
    seed = seed.to(torch.int64).contiguous()
    offset = offset.to(torch.int64).contiguous()
    Vd = draft_probs.shape[-1]
    q = draft_probs.contiguous() if draft_probs.numel() > 0 else logits  # K = 0: never read
    rows = B * K1
    has_mask = token_bitmask is not None
    bitmask = token_bitmask.reshape(rows, -1).contiguous() if has_mask else None  # one row per position
    thr = None
    if top_k is not None or top_p is not None:
        thr = filter_thresholds(logits.view(rows, Vt), temperature, top_k, top_p, group=K1,
                                token_bitmask=bitmask)
    thr_arg = thr if thr is not None else temperature  # placeholder pointer, never read
    drafts_arg = drafts if K > 0 else seed  # K = 0: never read, but a valid pointer

    BLOCK_V, tps1, S1, BLOCK_S1, warps1 = split_plan(Vt, rows, dev, block_v, num_splits)
    stats = torch.empty((3, rows, S1), dtype=torch.float32, device=dev)
    stats_id = torch.empty((rows, S1), dtype=torch.int32, device=dev)
    mask, W = mask_args(bitmask, stats_id)
    softmax_stats_kernel[(rows, S1)](
        logits, drafts_arg, temperature, thr_arg, mask, stats[0], stats[1], stats[2], stats_id,
        stats[1], stats[1], stats[1], Vt, K, tps1, S1, W,  # placeholders, never written without WANT_RAW
        HAS_THR=thr is not None, BLOCK_K=block_k(K), BLOCK_V=BLOCK_V, num_warps=warps1,
        HAS_MASK=has_mask)
    _verify_block_kernel[(B,)](
        logits, drafts_arg, q, temperature, seed, offset, thr_arg, mask,
        stats[0], stats[1], stats[2], stats_id, out, num_acc,
        K, Vt, Vd, S1, W,
        HAS_THR=thr is not None, BLOCK_K1=block_k(K1), BLOCK_S1=BLOCK_S1, TILE_BLOCKS=4,
        HAS_MASK=has_mask, num_warps=4)
    return out, num_acc
