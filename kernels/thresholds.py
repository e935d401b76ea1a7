"""Top-k / top-p keep thresholds (``filter_thresholds``) by a multi-pivot search, in Triton.

What it computes is the keep set of ``specdec.reference._keep_mask`` (the specification) as one
threshold per row on the raw logits: token j of row n is kept iff its cleaned logit (non-finite ->
-inf) is finite and >= thr[n]. Dividing by T > 0 does not reorder float32 logits (nor merge two of
them, in float64), so the k-th largest raw logit is the k-th largest scaled one.

Why a search, not a sort: sorting [N, V] logits and a float64 softmax + cumsum over the sorted rows
need several [N, V] temporaries (~6-7 GB at N = 1280, V = 151936). Here one program per row
streams its logits a few times and keeps O(BLOCK_V) state; nothing but the [N] result is written.

Search: float32 values map to order-preserving int32 keys (negatives have their 31 low bits
flipped; -0.0 is +0.0 first, as the float comparison sees them equal). Every pass over the row
counts, for PIVOTS = 16 evenly spaced keys p_0 = lo < p_1 < ... in the interval [lo, hi] that
holds the answer, the quantity f(p_i) (top-k: count of x >= p_i; top-p: float64 softmax mass of
the kept x >= p_i), and narrows the interval to [p_j, p_{j+1} - 1] for the largest p_j that still
qualifies: 4 bits of the 32-bit key per pass, so at most 8 passes, exact. Each pass also finds the
smallest and largest key inside [lo, hi], which shrinks the interval to the data it holds and ends
the search as soon as it holds one distinct value (typically after 4-5 passes on real logits).

  pass 0     max, min and count of the finite logits (M, the top-p softmax's shift)
  top-k      largest v with count(x >= v) >= k (ties at the k-th value are kept; k = 1: the max,
             no search); -inf when the row has fewer than k finite logits. Off when k <= 0 or
             k >= V.
  top-p      over the top-k survivors x >= thr_k, weights w = exp(x / T - M / T) in float64,
             Z = sum w: largest kept v with sum_{x >= v} w >= top_p * Z. The smallest kept value
             always qualifies (the reference's clamp to the kept count), so the search starts
             there. Off when top_p >= 1 (or NaN). T <= 0 (greedy) counts as T = 1.
Both off, or no finite logit: -inf. Row n reads its parameters at n // group, so verification
passes its [B] parameters with group = K + 1 (or N + 1 nodes) rather than repeating them.
A token bitmask (``token_bitmask``) bans ids before anything else: they read as -inf, so the
thresholds are those of the allowed logits. Nothing synchronises with the host.
"""
import torch
import triton
import triton.language as tl

from specdec.kernels.sample import allowed, clean_logits

KEY_NEG_INF: tl.constexpr = tl.constexpr(-2139095041)  # key(-inf): below every finite key
KEY_BIG: tl.constexpr = tl.constexpr(2147483647)  # above every key (empty min)
MAX_PASSES: tl.constexpr = tl.constexpr(12)  # a guard: 16 pivots need at most 8 passes (+1)


@triton.jit
def float_key(x):
    """Order-preserving int32 key of float32 x (no NaN): x < y iff key(x) < key(y), and -0.0 has
    +0.0's key (equal floats, equal keys)."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b)


@triton.jit
def key_float(k):
    """The float32 whose key is k (inverse of ``float_key``)."""
    b = tl.where(k < 0, k ^ 0x7FFFFFFF, k)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _row_keys(row_ptr, V, tile, lanes, mask_row_ptr, W, BLOCK_V: tl.constexpr,
              HAS_MASK: tl.constexpr):
    """(cleaned float32 logits, their keys) of one tile; past V (and banned ids, HAS_MASK): -inf."""
    offs = tile * BLOCK_V + lanes
    x = clean_logits(tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")))
    if HAS_MASK:
        x = tl.where(allowed(mask_row_ptr, offs, W), x, float("-inf"))
    return x, float_key(x)


@triton.jit
def _search(row_ptr, V, lo, hi, target, keep_key, t, ms, mask_row_ptr, W,
            IS_P: tl.constexpr, BLOCK_V: tl.constexpr, PIVOTS: tl.constexpr, HAS_MASK: tl.constexpr):
    """Largest key v in [lo, hi] with f(v) >= target, given f(lo) >= target (assumed, never
    tested) and f(hi + 1) < target; f nonincreasing. IS_P: f(v) = sum of w over x >= v with
    w = exp(x / t - ms) in float64 and target = top_p * Z, Z = the sum of w over the kept keys
    (>= keep_key; recomputed every pass, in the same order: the same bits); else f(v) = count of
    x >= v. Returns lo itself when the interval is empty (lo > hi)."""
    lanes = tl.arange(0, BLOCK_V)
    piv_ids = tl.arange(0, PIVOTS)
    n_tiles = tl.cdiv(V, BLOCK_V)
    it = 0
    while (lo < hi) & (it < MAX_PASSES):
        # PIVOTS keys splitting [lo, hi] evenly; p_0 = lo (int64: the span may exceed int32)
        lo64 = lo.to(tl.int64)
        span = hi.to(tl.int64) - lo64 + 1
        piv = (lo64 + (span * piv_ids) // PIVOTS).to(tl.int32)
        # per-lane accumulators, reduced once after the pass: no cross-lane work in the loop
        if IS_P:
            acc = tl.zeros([PIVOTS, BLOCK_V], tl.float64)
        else:
            acc = tl.zeros([PIVOTS, BLOCK_V], tl.int32)
        z = tl.zeros([BLOCK_V], tl.float64)
        dmin = tl.full([BLOCK_V], KEY_BIG, tl.int32)
        dmax = tl.full([BLOCK_V], KEY_NEG_INF, tl.int32)
        for tile in range(n_tiles):
            x, key = _row_keys(row_ptr, V, tile, lanes, mask_row_ptr, W, BLOCK_V, HAS_MASK)
            inside = (key >= lo) & (key <= hi)
            dmin = tl.minimum(dmin, tl.where(inside, key, KEY_BIG))
            dmax = tl.maximum(dmax, tl.where(inside, key, KEY_NEG_INF))
            ge = key[None, :] >= piv[:, None]  # pivots >= lo > key(-inf): only finite x count
            if IS_P:
                keep = key >= keep_key
                w = tl.where(keep, tl.exp(x.to(tl.float64) / t - ms), 0.0)
                z += w
                acc += tl.where(ge, w[None, :], 0.0)
            else:
                acc += ge.to(tl.int32)
        f = tl.sum(acc, axis=1)  # [PIVOTS], nonincreasing (same reduction tree, fewer terms)
        if IS_P:
            ok = f >= target * tl.sum(z, axis=0)
        else:
            ok = f >= target
        j = tl.max(tl.where(ok, piv_ids, 0), axis=0).to(tl.int64)  # p_0 qualifies by the invariant
        new_lo = (lo64 + (span * j) // PIVOTS).to(tl.int32)
        new_hi = (lo64 + (span * (j + 1)) // PIVOTS - 1).to(tl.int32)  # j = PIVOTS - 1: hi
        # shrink to the data inside: no key of [lo, hi] lies below dmin or above dmax, so f does
        # not change there; one distinct value left -> lo == hi, done
        d_lo = tl.min(dmin, axis=0)
        d_hi = tl.max(dmax, axis=0)
        found = d_lo <= d_hi
        lo = tl.where(found, tl.maximum(new_lo, d_lo), new_lo)
        hi = tl.where(found, tl.minimum(new_hi, d_hi), new_lo)  # no data: every v is the same
        it += 1
    return lo


@triton.jit(do_not_specialize=["group"])
def _thresholds_kernel(
    logits_ptr,  # [N, V] float logits (fp32/bf16/fp16), contiguous
    temperature_ptr,  # [N // group] float
    top_k_ptr,  # [N // group] int (HAS_K)
    top_p_ptr,  # [N // group] float (HAS_P)
    mask_ptr,  # [N, W] int32 token bitmask (HAS_MASK)
    thr_ptr,  # [N] float32 thresholds (out)
    V, group, W,
    HAS_K: tl.constexpr, HAS_P: tl.constexpr, BLOCK_V: tl.constexpr, PIVOTS: tl.constexpr,
    HAS_MASK: tl.constexpr = False,
):
    """grid = (N,): one row per program, its parameters at row // group."""
    row = tl.program_id(0)
    prm = row // group
    row_ptr = logits_ptr + row.to(tl.int64) * V
    mask_row_ptr = mask_ptr + row.to(tl.int64) * W
    lanes = tl.arange(0, BLOCK_V)
    n_tiles = tl.cdiv(V, BLOCK_V)

    # pass 0: largest / smallest finite key and the finite count
    kmax = tl.full([BLOCK_V], KEY_NEG_INF, tl.int32)
    kmin = tl.full([BLOCK_V], KEY_BIG, tl.int32)
    cnt = tl.zeros([BLOCK_V], tl.int32)
    for tile in range(n_tiles):
        x, key = _row_keys(row_ptr, V, tile, lanes, mask_row_ptr, W, BLOCK_V, HAS_MASK)
        fin = x > float("-inf")
        kmax = tl.maximum(kmax, key)
        kmin = tl.minimum(kmin, tl.where(fin, key, KEY_BIG))
        cnt += fin.to(tl.int32)
    kmax = tl.max(kmax, axis=0)
    kmin = tl.min(kmin, axis=0)
    n_finite = tl.sum(cnt, axis=0)
    has_data = n_finite > 0

    # top-k: the survivors are the keys >= keep_key
    keep_key = kmin
    use_k = False
    if HAS_K:
        k = tl.load(top_k_ptr + prm).to(tl.int64)
        use_k = (k > 0) & (k < V)
        # fewer than k finite logits: every finite one is kept (threshold -inf); k = 1: the max
        search = use_k & (n_finite >= k) & (k > 1)
        lo = tl.where(search, kmin, kmax)  # lo == hi: no pass
        keep_key = _search(row_ptr, V, lo, kmax, k, kmin, 1.0, 0.0, mask_row_ptr, W,
                           IS_P=False, BLOCK_V=BLOCK_V, PIVOTS=PIVOTS, HAS_MASK=HAS_MASK)
        keep_key = tl.where(search, keep_key, tl.where(use_k & (k == 1), kmax, kmin))
    thr_key = tl.where(use_k & has_data, keep_key, KEY_NEG_INF)

    if HAS_P:
        p = tl.load(top_p_ptr + prm).to(tl.float64)
        use_p = (p < 1.0) & has_data
        t = tl.load(temperature_ptr + prm).to(tl.float64)
        t = tl.where(t <= 0.0, 1.0, t)
        ms = key_float(kmax).to(tl.float64) / t  # the softmax's shift: max(x / T) = M / T
        lo = tl.where(use_p, keep_key, kmax)  # lo == hi: no pass
        p_key = _search(row_ptr, V, lo, kmax, p, keep_key, t, ms, mask_row_ptr, W,
                        IS_P=True, BLOCK_V=BLOCK_V, PIVOTS=PIVOTS, HAS_MASK=HAS_MASK)
        thr_key = tl.where(use_p, p_key, thr_key)

    tl.store(thr_ptr + row, key_float(thr_key))


BLOCK_V_DEFAULT = 256  # [16, BLOCK_V] per-lane accumulators: 32 per thread at 4 warps


def filter_thresholds(logits, temperature, top_k, top_p, group: int = 1, *, block_v=None,
                      token_bitmask=None):
    """Per-row keep threshold on the raw logits for top-k then top-p, or None if both are None.

    logits [N, V] float (float32/bfloat16/float16); temperature [N // group] float (<= 0: T = 1);
    top_k [N // group] int (<= 0 or >= V: off) or None; top_p [N // group] float (>= 1: off) or
    None; row n uses the parameters at n // group (N a multiple of group). Returns [N] float32:
    token j of row n is kept iff its cleaned logit is finite and >= thr[n] (-inf where no
    filtering applies or the row has no finite logit). Equals the keep set of
    ``specdec.reference._keep_mask(logits.double() / T, top_k, top_p)``. token_bitmask [N, W]
    int32 (contiguous, W >= 1) or None: row n's banned ids (``reference.allowed_ids``) count as
    -inf logits. No host sync, no [N, V] temporaries. ``block_v`` overrides the tile width (tests).
    """
    if top_k is None and top_p is None:
        return None
    N, V = logits.shape
    dev = logits.device
    thr = torch.empty((N,), dtype=torch.float32, device=dev)
    if N == 0:
        return thr
    if V == 0:
        return thr.fill_(float("-inf"))
    logits = logits.contiguous()
    temperature = temperature.contiguous()
    k_arg = top_k.contiguous() if top_k is not None else temperature  # placeholder, never read
    p_arg = top_p.contiguous() if top_p is not None else temperature
    BLOCK_V = block_v or min(BLOCK_V_DEFAULT, triton.next_power_of_2(max(V, 16)))
    has_mask = token_bitmask is not None
    mask, W = (token_bitmask.reshape(N, -1), token_bitmask.shape[-1]) if has_mask else (thr, 1)  # placeholder
    _thresholds_kernel[(N,)](
        logits, temperature, k_arg, p_arg, mask, thr, V, group, W,
        HAS_K=top_k is not None, HAS_P=top_p is not None, BLOCK_V=BLOCK_V, PIVOTS=16,
        HAS_MASK=has_mask, num_warps=4)
    return thr
