"""Fused sampling (``specdec.ops.sample``) in Triton, and the pieces that verification reuses.

What it computes is ``specdec.reference.sample`` (the specification): per row, the target
distribution p = softmax(top-p(top-k(logits / temperature))) with non-finite logits as -inf, a token
drawn from p by the exponential race ``argmax_j p_j / e_j`` (e_j ~ Exp(1) from Philox, stream
``STREAM_SAMPLE``, position 0, index j), and p itself as float32 (one-hot at the argmax for greedy
rows, zeros and token -1 for rows without a finite logit).

Kernels (grid, what they read):
  1. ``softmax_stats_kernel`` (rows, splits): each program streams one chunk of vocabulary tiles of
     one row and writes its partial (max, sum of exp, argmax value, argmax id). Online softmax per
     lane, so the loop has no cross-lane reduction. Shared with verification, where a row is a
     (batch row, draft position) pair.
  2. ``_sample_probs_kernel`` (rows, splits): combines the row's partials (a few numbers), streams
     its chunk again, writes probs and the chunk's race winner.
  3. ``_sample_finish_kernel`` (rows,): combines the race winners into the token.
Bytes: logits read twice, probs written once; intermediate state is [B, splits].

Top-k / top-p: ``filter_thresholds`` computes with torch ops on the device one threshold per row
on the temperature-scaled logits (a token is kept iff scaled >= threshold, so ties at the threshold
are kept, as in the reference); the kernels compare against it. Scaled logits are computed the same
way on both sides (float32, correctly rounded division: ``tl.math.div_rn`` / torch's ``/``), so the
comparison is exact.
"""
import torch
import triton
import triton.language as tl

from specdec.kernels.philox import STREAM_SAMPLE, exponential, philox_bits

_BIG_ID: tl.constexpr = tl.constexpr(2147483647)  # "no id yet"; loses every lowest-id tie-break


# ------------------------------------------------------------------------------------------------
# jit helpers shared with verify.py
# ------------------------------------------------------------------------------------------------


@triton.jit
def clean_logits(x):
    """To float32, NaN and +-inf become -inf (the reference's ``_clean``)."""
    x = x.to(tl.float32)
    return tl.where(tl.abs(x) < float("inf"), x, float("-inf"))


@triton.jit
def effective_temperature(t):
    """Greedy rows (t <= 0) scale by 1: only their argmax matters."""
    return tl.where(t <= 0, 1.0, t)


@triton.jit
def scale_and_filter(x, temp, thr):
    """Scaled logits of cleaned logits ``x`` and the keep mask (finite and >= the top-k/top-p
    threshold ``thr``; -inf when no filtering). div_rn: bit-identical to torch's float32 division,
    which ``filter_thresholds`` used to place ``thr``."""
    scaled = tl.math.div_rn(x, temp)
    keep = (x > float("-inf")) & (scaled >= thr)
    return scaled, keep


@triton.jit
def chunk_softmax_stats(row_ptr, V, tile_start, n_tiles, temp, thr, BLOCK_V: tl.constexpr):
    """Softmax statistics of tiles [tile_start, tile_start + n_tiles) of one row of V logits.

    Returns (max of kept scaled logits, sum over kept of exp(scaled - max), max of the cleaned raw
    logits, lowest id reaching it); (-inf, 0, -inf, _BIG_ID) for an empty or all -inf chunk."""
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)  # per-lane running max
    z = tl.zeros([BLOCK_V], tl.float32)  # per-lane sum of exp(scaled - m)
    a_val = tl.full([BLOCK_V], float("-inf"), tl.float32)
    a_idx = tl.full([BLOCK_V], _BIG_ID, tl.int32)
    for i in range(n_tiles):
        offs = (tile_start + i) * BLOCK_V + lanes
        x = clean_logits(tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")))
        scaled, keep = scale_and_filter(x, temp, thr)
        scaled = tl.where(keep, scaled, float("-inf"))
        m_new = tl.maximum(m, scaled)
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)  # avoids (-inf) - (-inf) = NaN
        z = z * tl.exp(m - m_ref) + tl.exp(scaled - m_ref)
        m = m_new
        better = x > a_val  # strict: each lane keeps its lowest id on ties
        a_val = tl.where(better, x, a_val)
        a_idx = tl.where(better, offs, a_idx)
    row_max = tl.max(m, 0)
    ref = tl.where(row_max > float("-inf"), row_max, 0.0)
    row_sum = tl.sum(z * tl.exp(m - ref), 0)
    best = tl.max(a_val, 0)
    best_id = tl.min(tl.where(a_val == best, a_idx, _BIG_ID), 0)
    return row_max, row_sum, best, best_id


@triton.jit
def race_update(score, ids, best, best_id):
    """Per-lane exponential-race bookkeeping; strict > keeps the lowest id of a lane on ties."""
    better = score > best
    return tl.where(better, score, best), tl.where(better, ids, best_id)


@triton.jit
def race_winner(best, best_id):
    """(max score, lowest id reaching it) of per-lane (or per-split) race results."""
    top = tl.max(best, 0)
    return top, tl.min(tl.where(best == top, best_id, _BIG_ID), 0)


@triton.jit
def softmax_stats_kernel(
    logits_ptr,  # [B * (K+1), V] float logits, contiguous
    drafts_ptr,  # [B, K] int64 draft ids (K = 0: unused)
    temperature_ptr,  # [B] float32
    thr_ptr,  # [B * (K+1)] float32 top-k/top-p thresholds (HAS_THR)
    m_ptr, z_ptr, a_ptr, ai_ptr,  # [B * (K+1), num_splits] partial statistics (out)
    V, K, tiles_per_split, num_splits,
    HAS_THR: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Pass 1. grid = (B * (K+1), num_splits): program (row, split) reduces one vocabulary chunk
    of row = b * (K+1) + position. Verification skips positions after a row's last draft (the
    -1 tail): nothing downstream looks at them."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // (K + 1)
    position = row % (K + 1)
    ks = tl.arange(0, BLOCK_K)
    drafts = tl.load(drafts_ptr + b * K + ks, mask=ks < K, other=0)
    n_drafts = tl.min(tl.where((ks < K) & (drafts == -1), ks, K), 0)

    temp = effective_temperature(tl.load(temperature_ptr + b))
    thr = float("-inf")
    if HAS_THR:
        thr = tl.load(thr_ptr + row)
    tile_start = split * tiles_per_split
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(V, BLOCK_V) - tile_start)
    n_tiles = tl.where(position <= n_drafts, tl.maximum(n_tiles, 0), 0)

    row_max, row_sum, best, best_id = chunk_softmax_stats(
        logits_ptr + row.to(tl.int64) * V, V, tile_start, n_tiles, temp, thr, BLOCK_V)
    out = row * num_splits + split
    tl.store(m_ptr + out, row_max)
    tl.store(z_ptr + out, row_sum)
    tl.store(a_ptr + out, best)
    tl.store(ai_ptr + out, best_id)


@triton.jit
def combine_row_stats(m_ptr, z_ptr, a_ptr, ai_ptr, row, num_splits, BLOCK_S: tl.constexpr):
    """Combine one row's pass-1 partials: (max, sum of exp(scaled - max), argmax value, argmax)."""
    sp = tl.arange(0, BLOCK_S)
    mask = sp < num_splits
    base = row * num_splits + sp
    m = tl.load(m_ptr + base, mask=mask, other=float("-inf"))
    z = tl.load(z_ptr + base, mask=mask, other=0.0)
    a = tl.load(a_ptr + base, mask=mask, other=float("-inf"))
    ai = tl.load(ai_ptr + base, mask=mask, other=_BIG_ID)
    row_max = tl.max(m, 0)
    ref = tl.where(row_max > float("-inf"), row_max, 0.0)
    row_sum = tl.sum(z * tl.exp(m - ref), 0)
    best, best_id = race_winner(a, ai)
    return row_max, row_sum, best, best_id


# ------------------------------------------------------------------------------------------------
# sample kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _sample_probs_kernel(
    logits_ptr,  # [B, V] float logits
    temperature_ptr, thr_ptr, seed_ptr, offset_ptr,  # [B] each
    m_ptr, z_ptr, a_ptr, ai_ptr,  # [B, num_splits] pass-1 partials
    probs_ptr,  # [B, V] float32 (out)
    race_ptr, race_id_ptr,  # [B, num_splits] chunk race winners (out)
    V, tiles_per_split, num_splits,
    HAS_THR: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Pass 2. grid = (B, num_splits): writes probs for one chunk and runs its exponential race."""
    row = tl.program_id(0)
    split = tl.program_id(1)
    row_max, row_sum, best, best_id = combine_row_stats(
        m_ptr, z_ptr, a_ptr, ai_ptr, row, num_splits, BLOCK_S)
    t = tl.load(temperature_ptr + row)
    greedy = t <= 0
    temp = effective_temperature(t)
    row_ok = best > float("-inf")
    row_max = tl.where(row_ok, row_max, 0.0)  # rows without a kept logit: no (-inf) - (-inf)
    row_sum = tl.where(row_ok, row_sum, 1.0)  # ... and no 0 / 0
    thr = float("-inf")
    if HAS_THR:
        thr = tl.load(thr_ptr + row)
    seed = tl.load(seed_ptr + row)
    offset = tl.load(offset_ptr + row)

    tile_start = split * tiles_per_split
    n_tiles = tl.maximum(tl.minimum(tiles_per_split, tl.cdiv(V, BLOCK_V) - tile_start), 0)
    row_off = row.to(tl.int64) * V
    lanes = tl.arange(0, BLOCK_V)
    race = tl.full([BLOCK_V], float("-inf"), tl.float32)
    race_id = tl.full([BLOCK_V], _BIG_ID, tl.int32)
    for i in range(n_tiles):
        offs = (tile_start + i) * BLOCK_V + lanes
        mask = offs < V
        x = clean_logits(tl.load(logits_ptr + row_off + offs, mask=mask, other=float("-inf")))
        scaled, keep = scale_and_filter(x, temp, thr)
        p = tl.where(keep, tl.exp(scaled - row_max) / row_sum, 0.0)
        p = tl.where(greedy, tl.where(offs == best_id, 1.0, 0.0), p)
        p = tl.where(row_ok, p, 0.0)
        tl.store(probs_ptr + row_off + offs, p, mask=mask)
        if t <= 0:
            pass  # greedy rows need no Philox draws, the costly part of this loop
        else:
            e = exponential(philox_bits(seed, offset, STREAM_SAMPLE, 0, offs))
            race, race_id = race_update(tl.where(p > 0, p / e, -1.0), offs, race, race_id)
    top, top_id = race_winner(race, race_id)
    tl.store(race_ptr + row * num_splits + split, top)
    tl.store(race_id_ptr + row * num_splits + split, top_id)


@triton.jit
def _sample_finish_kernel(
    temperature_ptr,  # [B]
    m_ptr, z_ptr, a_ptr, ai_ptr,  # [B, num_splits] pass-1 partials
    race_ptr, race_id_ptr,  # [B, num_splits] chunk race winners
    token_ptr,  # [B] int64 (out)
    num_splits, BLOCK_S: tl.constexpr,
):
    """grid = (B,): token = argmax (greedy) or race winner; -1 for a row without a finite logit."""
    row = tl.program_id(0)
    _, _, best, best_id = combine_row_stats(m_ptr, z_ptr, a_ptr, ai_ptr, row, num_splits, BLOCK_S)
    sp = tl.arange(0, BLOCK_S)
    mask = sp < num_splits
    race = tl.load(race_ptr + row * num_splits + sp, mask=mask, other=float("-inf"))
    race_id = tl.load(race_id_ptr + row * num_splits + sp, mask=mask, other=_BIG_ID)
    _, winner = race_winner(race, race_id)
    token = tl.where(tl.load(temperature_ptr + row) <= 0, best_id, winner)
    token = tl.where(best > float("-inf"), token, -1)
    tl.store(token_ptr + row, token.to(tl.int64))


# ------------------------------------------------------------------------------------------------
# host side
# ------------------------------------------------------------------------------------------------


def filter_thresholds(logits, temperature, top_k, top_p):
    """Per-row keep threshold on the scaled logits for top-k then top-p, or None if both are None.

    logits [N, V] float (any float dtype); temperature [N] float32; top_k [N] int (<= 0 or >= V:
    off) or None; top_p [N] float (>= 1: off) or None. Returns [N] float32: token j of row n is
    kept iff its scaled logit is finite and >= thr[n] (-inf where no filtering applies). Mirrors
    ``specdec.reference._keep_mask``, with the scaled logits in float32 exactly as the kernels
    compute them and the top-p masses in float64. Device-side torch ops only (sort), no host sync.
    """
    if top_k is None and top_p is None:
        return None
    N, V = logits.shape
    x = logits.float()
    x = torch.where(torch.isfinite(x), x, torch.full_like(x, float("-inf")))
    t = temperature.float()
    t = torch.where(t <= 0, torch.ones_like(t), t)
    scaled = x / t[:, None]  # correctly rounded, like tl.math.div_rn in the kernels
    sorted_vals = scaled.sort(dim=-1, descending=True).values
    thr = torch.full((N,), float("-inf"), dtype=torch.float32, device=logits.device)
    if top_k is not None:
        k = top_k.to(torch.int64)
        use_k = (k > 0) & (k < V)
        kth = sorted_vals.gather(1, (torch.where(use_k, k, torch.ones_like(k)) - 1)[:, None])
        thr = torch.where(use_k, kth.squeeze(1), thr)
    if top_p is not None:
        p = top_p.double()
        use_p = p < 1.0
        # the survivors of top-k, still sorted; top-p keeps the smallest prefix reaching top_p
        kept = torch.where(sorted_vals >= thr[:, None], sorted_vals, float("-inf"))
        cum = torch.softmax(kept.double(), dim=-1).cumsum(dim=-1)
        n = (cum < p[:, None]).sum(dim=-1, keepdim=True) + 1
        n = torch.minimum(n, (kept > float("-inf")).sum(dim=-1, keepdim=True).clamp(min=1))
        thr = torch.where(use_p, kept.gather(1, n - 1).squeeze(1), thr)
    return thr.contiguous()


_SM_COUNT = {}


def num_splits_for(rows: int, n_tiles: int, device: torch.device) -> int:
    """How many programs share a row's vocabulary: enough programs to fill the GPU (about 4 per
    SM) when there are few rows. Under the interpreter programs run one after another, so 1."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return max(1, min(n_tiles, (4 * _SM_COUNT[idx]) // max(rows, 1)))


def split_plan(V: int, rows: int, device, block_v=None, num_splits=None):
    """(BLOCK_V, tiles_per_split, num_splits, BLOCK_S, num_warps) for rows of V logits."""
    BLOCK_V = block_v or min(2048, triton.next_power_of_2(max(V, 16)))
    n_tiles = triton.cdiv(V, BLOCK_V)
    splits = num_splits or num_splits_for(rows, n_tiles, device)
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(splits, n_tiles)))
    splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty split
    num_warps = 8 if BLOCK_V >= 2048 else 4
    return BLOCK_V, tiles_per_split, splits, triton.next_power_of_2(splits), num_warps


def sample(logits, temperature, top_k, top_p, seed, offset, *, block_v=None, num_splits=None):
    """Fused sampling (Triton). Same contract as ``specdec.reference.sample``.

    logits [B, V] float32/float16/bfloat16; temperature [B] float32 (<= 0: greedy row); top_k [B]
    int64 (0 = off) or None; top_p [B] float32 (1.0 = off) or None; seed, offset [B] int64; all on
    one device. ``block_v`` / ``num_splits`` override the tiling (tests, tuning).
    Returns (token_ids [B] int64, probs [B, V] float32).
    """
    B, V = logits.shape
    dev = logits.device
    tokens = torch.full((B,), -1, dtype=torch.int64, device=dev)
    probs = torch.zeros((B, V), dtype=torch.float32, device=dev)
    if B == 0 or V == 0:
        return tokens, probs
    logits = logits.contiguous()
    temperature = temperature.to(torch.float32).contiguous()
    seed = seed.to(torch.int64).contiguous()
    offset = offset.to(torch.int64).contiguous()
    thr = filter_thresholds(logits, temperature, top_k, top_p)
    BLOCK_V, tiles_per_split, S, BLOCK_S, num_warps = split_plan(V, B, dev, block_v, num_splits)

    stats = torch.empty((3, B, S), dtype=torch.float32, device=dev)  # max, sum, argmax value
    stats_id = torch.empty((B, S), dtype=torch.int32, device=dev)
    race = torch.empty((B, S), dtype=torch.float32, device=dev)
    race_id = torch.empty((B, S), dtype=torch.int32, device=dev)
    thr_arg = thr if thr is not None else temperature  # placeholder pointer, never read
    no_drafts = seed  # K = 0: never read

    softmax_stats_kernel[(B, S)](
        logits, no_drafts, temperature, thr_arg, stats[0], stats[1], stats[2], stats_id,
        V, 0, tiles_per_split, S,
        HAS_THR=thr is not None, BLOCK_K=1, BLOCK_V=BLOCK_V, num_warps=num_warps)
    _sample_probs_kernel[(B, S)](
        logits, temperature, thr_arg, seed, offset, stats[0], stats[1], stats[2], stats_id,
        probs, race, race_id, V, tiles_per_split, S,
        HAS_THR=thr is not None, BLOCK_S=BLOCK_S, BLOCK_V=BLOCK_V, num_warps=num_warps)
    _sample_finish_kernel[(B,)](
        temperature, stats[0], stats[1], stats[2], stats_id, race, race_id, tokens, S,
        BLOCK_S=BLOCK_S, num_warps=1)
    return tokens, probs
