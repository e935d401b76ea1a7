"""Plain-PyTorch reference of every specdec op, runnable in float64.

This file is the specification: the C++ (``csrc/``) and Triton (``kernels/``) implementations
compute exactly what is written here, including which random number is used for what, so that all
backends emit the same tokens on the same inputs (barring floating-point near-ties). It is one
file (about 650 lines) on purpose: the ops share its Philox streams, filters and residual rules,
and a reader checks a kernel against one place.

Random numbers: counter-based Philox4x32-10, stateless. One 32-bit word per
(seed, offset, stream, position, index):

    key     = (seed & 0xFFFFFFFF, seed >> 32)                      # seed: int64 bit pattern
    counter = (index, (stream << 16) | position, offset & 0xFFFFFFFF, offset >> 32)
    bits    = first output word of Philox4x32-10(counter, key)

    uniform in (0, 1]:   u = ((bits >> 8) + 1) * 2**-24             # exact in float32
    uniform in (0, 1):   v = (2 * (bits >> 9) + 1) * 2**-24         # exact in float32
    exponential(1):      e = -log(v)

Streams: ``STREAM_ACCEPT`` (acceptance test, index 0), ``STREAM_RESAMPLE`` (residual or bonus
token, index = vocabulary id), ``STREAM_SAMPLE`` (the ``sample`` op, and the target's own sample in
verification without draft probabilities), and their block streams ``STREAM_RESAMPLE_BLOCK`` /
``STREAM_SAMPLE_BLOCK`` (index = block number, below), and ``STREAM_ACCEPT_PREFIX`` (block
verification's tests, below). The Philox ``position`` word is 0 in every op:

Keyed by token position. ``verify`` draws everything about chain position j (its acceptance test,
its emitted token) with the counter offset ``offset + j`` (int64, wrapping): a caller that passes
each row's sequence length as ``offset`` keys the random numbers by the absolute index of the token
they decide, not by the step that happens to decide it. The target's own sample at position j is
``sample(logits_j, seed, offset + j)`` (streams ``STREAM_SAMPLE*``). Without draft probabilities
(n-gram, argmax drafters) verification is "sample and compare": drafts are accepted while they
equal the target's own samples and the first mismatch emits it, so the emitted text is exactly the
text that plain sampling (``sample`` with offset = token index, no drafter) produces with the same
seed, whatever the drafts, K or batch. With draft probabilities the bonus token (no rejection) is
the target's own sample too; a rejection draws the residual from ``STREAM_RESAMPLE*``.
Block verification (``verify_block``) decides "keep drafts 0..j" with a uniform of its own stream
``STREAM_ACCEPT_PREFIX`` at counter ``offset + j`` and index ``j``: it reads the decisions of drafts
past the one it stops at, so the next step, which starts right after the stop, must not reuse
them; the index (the draft's place in this step) keeps them apart, since the same absolute position
has a smaller index in any later step. Its emitted token uses the streams above, at ``offset + s``.
``verify_tree`` keys the same way by depth: everything about the children of a node at depth j
(the root is at depth 0) uses ``offset + j``, and the r-th child tried there uses index r of
``STREAM_ACCEPT``; on a chain this is ``verify``'s layout.

Sampling from a weight vector w >= 0 (not necessarily normalised) is a two-level exponential race
(``_race``). An exponential race draws argmax_j w_j / e_j over w_j > 0 (ties to the lowest index),
which is exact, P(j) = w_j / sum(w), and needs neither a cumulative sum nor normalisation. One race
over the whole vocabulary would cost a Philox draw per entry, which dominates a CPU kernel, so:
  1. the vocabulary is cut into blocks of ``RACE_BLOCK`` ids (the last one shorter) and block b
     weighs W_b = sum of its w_j; a race over the blocks (block stream, index = b) picks block b
     with probability W_b / sum(w);
  2. a race inside block b (index = vocabulary id) picks j with probability w_j / W_b.
The product is w_j / sum(w), and the two levels use different streams, so their noise is
independent. Cost: one pass of sums over the vocabulary, then V / RACE_BLOCK + RACE_BLOCK draws.

Target distribution at each position (``_target_probs``): non-finite logits become -inf, and so do
the ids a token bitmask bans (``_masked``, before anything else: structured output); scaled =
logits / temperature; top-k keeps scaled >= the k-th largest value (ties kept); top-p then keeps the
smallest set of highest-probability tokens whose mass reaches top_p (ties at the boundary kept);
p = softmax over what is kept. temperature <= 0 means greedy: only the argmax matters (lowest id
on ties); top-k/top-p never remove the argmax. A NaN or +inf temperature voids its row.
"""
from __future__ import annotations

import torch

STREAM_ACCEPT = 0
STREAM_RESAMPLE = 1
STREAM_SAMPLE = 2
STREAM_RESAMPLE_BLOCK = 3
STREAM_SAMPLE_BLOCK = 4
STREAM_ACCEPT_PREFIX = 5  # block verification: "stop after draft j", index j (verify_block)
RACE_BLOCK = 256  # vocabulary ids per block of the two-level race

_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mul_hi_lo(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit halves of the 64-bit product of uint32 values ``a`` (int64 tensor) and ``m``.

    Split into 16-bit halves so that no intermediate overflows a signed int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    m_hi, m_lo = m >> 16, m & 0xFFFF
    low = a_lo * m_lo
    mid = a_hi * m_lo + a_lo * m_hi
    low_full = low + ((mid & 0xFFFF) << 16)
    lo = low_full & _MASK32
    hi = a_hi * m_hi + (mid >> 16) + (low_full >> 32)
    return hi & _MASK32, lo


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al. 2011). All arguments are int64 tensors (broadcastable) holding
    uint32 values; returns the four output words as int64 tensors holding uint32 values."""
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(c0, c1, c2, c3, k0, k1)
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(c0, _PHILOX_M0)
        hi1, lo1 = _mul_hi_lo(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _MASK32
        k1 = (k1 + _PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def philox_bits(seed, offset, stream: int, position, index):
    """32 random bits (int64 tensor holding uint32) for each (seed, offset, stream, position, index).

    seed, offset: int64 tensors (any bit pattern); position, index: int64 tensors; all broadcast."""
    seed = torch.as_tensor(seed, dtype=torch.int64)
    offset = torch.as_tensor(offset, dtype=torch.int64)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c2, c3 = offset & _MASK32, (offset >> 32) & _MASK32
    c1 = (torch.as_tensor(position, dtype=torch.int64) & 0xFFFF) | (stream << 16)
    c0 = torch.as_tensor(index, dtype=torch.int64) & _MASK32
    return philox4x32_10(c0, c1, c2, c3, k0, k1)[0]


def uniform_open_closed(bits: torch.Tensor) -> torch.Tensor:
    """Uniform in (0, 1], float64 (values exactly representable in float32)."""
    return ((bits >> 8) + 1).double() * 2.0**-24


def exponential(bits: torch.Tensor) -> torch.Tensor:
    """Exponential(1) from a uniform in the open interval (0, 1), float64."""
    return -torch.log((2 * (bits >> 9) + 1).double() * 2.0**-24)


def _keep_mask(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Which entries of ``scaled`` [N, V] (-inf = excluded) survive top-k then top-p.

    top_k: [N] int (<= 0 or >= V: off); top_p: [N] float (>= 1: off). Returns bool [N, V]."""
    N, V = scaled.shape
    keep = torch.isfinite(scaled)
    k = top_k.to(torch.int64)
    use_k = (k > 0) & (k < V)
    if bool(use_k.any()):
        kk = torch.where(use_k, k, torch.ones_like(k))
        kth = scaled.sort(dim=-1, descending=True).values.gather(1, (kk - 1)[:, None])
        keep &= ~use_k[:, None] | (scaled >= kth)
    use_p = top_p.double() < 1.0
    if bool(use_p.any()):
        masked = torch.where(keep, scaled, float("-inf"))
        sorted_vals = masked.sort(dim=-1, descending=True).values
        probs = torch.softmax(sorted_vals, dim=-1)
        cum = probs.cumsum(dim=-1)
        # smallest prefix whose mass reaches top_p: count the prefixes strictly below it, plus one
        m = (cum < top_p.double()[:, None]).sum(dim=-1, keepdim=True) + 1
        m = torch.minimum(m, keep.sum(dim=-1, keepdim=True).clamp(min=1))
        thr = sorted_vals.gather(1, m - 1)
        keep &= ~use_p[:, None] | (masked >= thr)
    return keep


def _target_probs(logits, temperature, top_k, top_p):
    """logits [N, V] float64 with -inf for non-finite; per-row temperature/top_k/top_p [N].

    Returns (probs [N, V] float64, zeros for rows without a finite logit; argmax [N] int64)."""
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    scaled = logits / t[:, None]
    keep = _keep_mask(scaled, top_k, top_p)
    masked = torch.where(keep, scaled, float("-inf"))
    probs = torch.softmax(masked, dim=-1).nan_to_num(0.0)  # all -inf rows give NaN
    return probs, logits.argmax(dim=-1)


def _clean(logits: torch.Tensor) -> torch.Tensor:
    out = logits.double()
    return torch.where(torch.isfinite(out), out, torch.full_like(out, float("-inf")))


def allowed_ids(token_bitmask: torch.Tensor, V: int) -> torch.Tensor:
    """The ids a token bitmask allows: int32 [..., W] -> bool [..., V].

    Bit ``i % 32`` of word ``i // 32`` set = id ``i`` allowed (xgrammar's ``allocate_token_bitmask``
    layout). Ids from 32 * W on (a mask sized for a tokenizer smaller than the logits) are banned;
    bits past V are ignored."""
    W = token_bitmask.shape[-1]
    if W == 0:
        return torch.zeros(*token_bitmask.shape[:-1], V, dtype=torch.bool, device=token_bitmask.device)
    ids = torch.arange(V, device=token_bitmask.device)
    words = token_bitmask.long()[..., (ids >> 5).clamp(max=W - 1)]
    return (((words >> (ids & 31)) & 1) == 1) & ((ids >> 5) < W)


def _masked(logits: torch.Tensor, token_bitmask) -> torch.Tensor:
    """Logits with every id the mask bans at -inf (float64, cleaned); the logits as they are when
    ``token_bitmask`` is None. Every op applies the mask first: the target at a position is the
    target restricted to the allowed ids, and temperature, top-k and top-p act on what is left."""
    if token_bitmask is None:
        return logits
    out = _clean(logits)
    return out.masked_fill(~allowed_ids(token_bitmask.to(out.device), out.shape[-1]), float("-inf"))


def _race_flat(weights: torch.Tensor, seed, offset, stream: int, position, index) -> torch.Tensor:
    """One exponential race over weights [B, N] >= 0 whose entries have Philox indices index [B, N]:
    the column of argmax_j w_j / e_j over w_j > 0, ties to the lowest column."""
    e = exponential(philox_bits(seed[:, None], offset[:, None], stream, position[:, None], index))
    score = torch.where(weights > 0, weights / e, torch.full_like(weights, -1.0))
    return score.argmax(dim=-1)


def _race(weights: torch.Tensor, seed, offset, stream: int, block_stream: int, position) -> torch.Tensor:
    """Two-level exponential race over weights [B, V] >= 0 (module docstring): a race over the
    RACE_BLOCK-sized blocks' sums on ``block_stream``, then one inside the winning block on
    ``stream``. Returns the token [B] int64 (some id, not a sample, for an all-zero row)."""
    B, V = weights.shape
    dev = weights.device
    nb = -(-V // RACE_BLOCK)
    blocks = torch.nn.functional.pad(weights, (0, nb * RACE_BLOCK - V)).view(B, nb, RACE_BLOCK)
    block_ids = torch.arange(nb, dtype=torch.int64, device=dev).expand(B, nb)
    block = _race_flat(blocks.sum(-1), seed, offset, block_stream, position, block_ids)
    # ids past V weigh 0 and never win (an all-zero row still gives column 0), so a vocabulary
    # smaller than one block draws only V numbers: the same tokens, less work
    width = min(RACE_BLOCK, V)
    ids = block[:, None] * RACE_BLOCK + torch.arange(width, dtype=torch.int64, device=dev)
    inner = blocks[torch.arange(B, device=dev), block, :width]  # [B, width], zero past V
    return block * RACE_BLOCK + _race_flat(inner, seed, offset, stream, position, ids)


def _bad_temperature(temperature):
    """Rows whose temperature is NaN or +inf have no defined distribution: they emit nothing
    (token -1, num_accepted 0, zero probs), like a row without a finite logit. t <= 0 (vLLM's
    -1 included) is greedy."""
    return torch.isnan(temperature) | (temperature == float("inf"))


def _positions(target_logits, temperature, top_k, top_p):
    """What verification needs at every position of [B, P, V] target logits: (cleaned logits
    float64, p [B, P, V] float64, argmax [B, P], temperature [B] float64 with NaN/+inf rows set
    to 1, greedy [B] bool, bad_t [B] bool: rows that emit nothing)."""
    B, P, Vt = target_logits.shape
    dev = target_logits.device
    logits = _clean(target_logits)
    temperature = temperature.double().to(dev)
    bad_t = _bad_temperature(temperature)
    temperature = torch.where(bad_t, torch.ones_like(temperature), temperature)
    rep = lambda x: x.to(dev).repeat_interleave(P)  # noqa: E731  per row -> per (row, position)
    probs, argmax = _target_probs(
        logits.reshape(B * P, Vt), rep(temperature), rep(top_k), rep(top_p.double())
    )
    return logits, probs.view(B, P, Vt), argmax.view(B, P), temperature, temperature <= 0, bad_t


def _draft_q(draft_probs, dev) -> torch.Tensor:
    """draft_probs in float64 on ``dev``, NaN read as 0: the rule of every backend and op. A NaN is
    no probability a drafter can have had; as 0 (like a non-finite logit, which is -inf) the draft
    is accepted iff the target gives it p(x) > 0, and the entry takes nothing from the residual."""
    q = draft_probs.to(dev).double()
    return torch.where(torch.isnan(q), torch.zeros_like(q), q)


def verify(target_logits, draft_token_ids, draft_probs, temperature, top_k, top_p, seed, offset,
           token_bitmask=None):
    """Chain verification, reference implementation (float64 inside).

    target_logits [B, K+1, Vt] float; draft_token_ids [B, K] int (-1 tail = no draft);
    draft_probs [B, K, Vd] float or None (deterministic drafter: q is one-hot at the draft);
    temperature [B] float (<= 0: greedy), top_k [B] int, top_p [B] float,
    seed [B] int64, offset [B] int64 (already per row; position j draws with ``offset + j``);
    token_bitmask [B, K+1, W] int32 or None: position j's target restricted to the ids it allows
    (``allowed_ids``), as if the other logits were -inf.
    Returns (output_ids [B, K+1] int64, num_accepted [B] int32); see DESIGN.md for the semantics.
    """
    target_logits = _masked(target_logits, token_bitmask)
    B, K1, Vt = target_logits.shape
    K = K1 - 1
    dev = target_logits.device
    logits, probs, argmax, temperature, greedy, bad_t = _positions(target_logits, temperature, top_k, top_p)
    rep = lambda x: x.to(dev).repeat_interleave(K1)  # noqa: E731  per row -> per (row, position)
    seed, offset = seed.to(dev, torch.int64), offset.to(dev, torch.int64)
    positions = torch.arange(K1, device=dev)
    offsets = offset[:, None] + positions[None]  # [B, K+1]: position j draws with offset + j
    zero = torch.zeros(B, dtype=torch.int64, device=dev)

    drafts = draft_token_ids.to(dev, torch.int64)
    Vd = draft_probs.shape[-1] if draft_probs is not None else Vt
    pos = positions[:K]
    is_end = drafts == -1
    n_drafts = (~is_end).long().cumprod(1).sum(1)  # drafts before the first -1
    in_range = (drafts >= 0) & (drafts < Vd)
    safe = drafts.clamp(0, Vd - 1)
    finite = torch.isfinite(logits).any(-1)  # [B, K+1]: the position has a distribution
    rows = torch.arange(B, device=dev)

    if draft_probs is None:
        # sample and compare: the target's own sample at every position (sample's numbers), drafts
        # accepted while equal to it. P(accept x) = p(x) and a mismatch emits p conditioned on != x,
        # the residual norm(max(0, p - onehot(x))): exact, and the text of plain sampling.
        own, _ = sample(target_logits.reshape(B * K1, Vt), rep(temperature), rep(top_k),
                        rep(top_p.double()), rep(seed), offsets.reshape(-1))
        own = own.view(B, K1)  # greedy rows: the argmax
        accept = drafts == own[:, :K]
        accept &= in_range & (pos[None] < n_drafts[:, None]) & finite[:, :K]
        num_accepted = accept.long().cumprod(1).sum(1)
        token = own[rows, num_accepted]
    else:
        p_draft = probs[:, :K].gather(2, safe[..., None]).squeeze(-1)
        q_all = _draft_q(draft_probs, dev)
        q_draft = q_all.gather(2, safe[..., None]).squeeze(-1)
        u = uniform_open_closed(philox_bits(seed[:, None], offsets[:, :K], STREAM_ACCEPT, 0, 0))
        accept_sampled = (p_draft > 0) & (u * q_draft <= p_draft)
        accept_greedy = drafts == argmax[:, :K]
        accept = torch.where(greedy[:, None], accept_greedy, accept_sampled)
        accept &= in_range & (pos[None] < n_drafts[:, None]) & finite[:, :K]
        num_accepted = accept.long().cumprod(1).sum(1)  # drafts before the first rejection

        # the one emitted token at position s = num_accepted: residual after a rejection, else the
        # bonus, which is the target's own sample there (sample's numbers, as without draft probs:
        # a position that no draft reached gives the same token whether the step had probs or not)
        s = num_accepted
        rejected = s < n_drafts
        p_s = probs[rows, s]
        weights = p_s
        if K > 0:
            resid_ok = rejected & in_range[rows, s.clamp(max=K - 1)]
            q_s = torch.zeros_like(p_s)
            q_s[:, :Vd] = q_all[rows, s.clamp(max=K - 1)]
            resid = (p_s - q_s).clamp(min=0)
            use_resid = resid_ok & (resid.sum(1) > 0)  # residual mass 0: sample from p
            weights = torch.where(use_resid[:, None], resid, p_s)
        resampled = _race(weights, seed, offset + s, STREAM_RESAMPLE, STREAM_RESAMPLE_BLOCK, zero)
        bonus = _race(p_s, seed, offset + s, STREAM_SAMPLE, STREAM_SAMPLE_BLOCK, zero)
        token = torch.where(greedy, argmax[rows, s], torch.where(rejected, resampled, bonus))

    # the sequential algorithm stops at s: a row emits nothing only when the position its token
    # is drawn from has no finite logit; positions after s are never looked at
    s = num_accepted
    row_ok = finite[rows, s] & ~bad_t

    out = torch.full((B, K1), -1, dtype=torch.int64, device=dev)
    keep = positions[None] < num_accepted[:, None]
    out[:, :K] = torch.where(keep[:, :K], drafts, out[:, :K])
    out[rows, s] = token
    out = torch.where(row_ok[:, None], out, torch.full_like(out, -1))
    num_accepted = torch.where(row_ok, num_accepted, torch.zeros_like(num_accepted))
    return out, num_accepted.to(torch.int32)


def sample(logits, temperature, top_k, top_p, seed, offset, token_bitmask=None):
    """Sampling, reference implementation (float64 inside).

    logits [B, V] float; temperature [B] float (<= 0: greedy), top_k [B] int, top_p [B] float,
    seed [B] int64, offset [B] int64; token_bitmask [B, W] int32 or None (as in ``verify``). Returns (token_ids [B] int64, probs [B, V] float32): probs is
    the distribution the token was drawn from (one-hot at the argmax for greedy rows); a row with no
    finite logit gives token -1 and zero probs.
    """
    logits = _masked(logits, token_bitmask)
    B, V = logits.shape
    dev = logits.device
    clean = _clean(logits)
    temperature = temperature.double().to(dev)
    bad_t = _bad_temperature(temperature)
    temperature = torch.where(bad_t, torch.ones_like(temperature), temperature)
    greedy = temperature <= 0
    probs, argmax = _target_probs(clean, temperature, top_k.to(dev), top_p.double().to(dev))
    probs = torch.where(greedy[:, None], torch.nn.functional.one_hot(argmax, V).double(), probs)
    zero = torch.zeros(B, dtype=torch.int64, device=dev)
    token = _race(probs, seed.to(dev, torch.int64), offset.to(dev, torch.int64), STREAM_SAMPLE,
                  STREAM_SAMPLE_BLOCK, zero)
    token = torch.where(greedy, argmax, token)
    row_ok = torch.isfinite(logits).any(-1) & ~bad_t
    token = torch.where(row_ok, token, torch.full_like(token, -1))
    probs = torch.where(row_ok[:, None], probs, torch.zeros_like(probs))
    return token, probs.float()


def _residual(p_cur: torch.Tensor, q: torch.Tensor):
    """The target after a rejection: norm(max(0, p_cur - q)) per row [B, V], and whether it has
    mass (rows without mass keep p_cur; the returned row is then meaningless)."""
    resid = (p_cur - q).clamp(min=0)
    mass = resid.sum(1, keepdim=True)
    return resid / torch.where(mass > 0, mass, torch.ones_like(mass)), mass[:, 0] > 0


def tree_structure(tree_token_ids, tree_parents, max_depth: int):
    """Which nodes of a token tree take part, and their depths.

    tree_token_ids, tree_parents [B, N] int. Node i is *valid* iff its token is not -1, its parent
    is -1 (the root) or a valid node with a smaller index, and its depth (1 for a child of the
    root, parent's depth + 1 below) is at most ``max_depth``. Invalid nodes (unused -1 slots, bad
    parents, nodes under an invalid node, nodes too deep) are never anyone's child: nothing about
    them is read. A valid node whose token lies outside the draft vocabulary stays in the tree and
    is simply rejected when tried. Returns (valid [B, N] bool, depth [B, N] int64, 0 if invalid).
    """
    tokens = tree_token_ids.long()
    parents = tree_parents.long()
    B, N = tokens.shape
    dev = tokens.device
    rows = torch.arange(B, device=dev)
    valid = torch.zeros(B, N, dtype=torch.bool, device=dev)
    depth = torch.zeros(B, N, dtype=torch.int64, device=dev)
    for i in range(N):
        par = parents[:, i]
        at_root = par == -1
        inner = (par >= 0) & (par < i)
        safe = par.clamp(0, max(i - 1, 0))
        parent_ok = inner & valid[rows, safe] if i > 0 else torch.zeros_like(inner)
        d = torch.where(at_root, torch.ones_like(par), depth[rows, safe] + 1)
        ok = (tokens[:, i] != -1) & (at_root | parent_ok) & (d <= max_depth)
        valid[:, i] = ok
        depth[:, i] = torch.where(ok, d, torch.zeros_like(d))
    return valid, depth


def verify_tree(target_logits, tree_token_ids, tree_parents, draft_probs, temperature, top_k, top_p,
                seed, offset, max_depth: int, token_bitmask=None):
    """Tree verification, reference implementation (float64 inside): exact multi-draft
    speculative sampling over a token tree (SpecInfer; recursive rejection sampling, RSD).

    target_logits [B, N+1, Vt] float: index 0 is the root (the last committed token), index i+1 is
    tree node i; the logits at index n predict n's children. tree_token_ids [B, N] int (node i's
    token; -1 = unused slot); tree_parents [B, N] int (node i's parent: -1 = the root, else a node
    index < i); draft_probs [B, N, Vd] float (the distribution node i's token was drawn from, for
    siblings drawn without replacement the conditional one that excluded the earlier siblings) or
    None (deterministic children); temperature / top_k / top_p / seed / offset [B] as in
    ``verify``; max_depth D: nodes deeper than D are ignored (``tree_structure``); token_bitmask
    [B, N+1, W] int32 or None: the allowed ids at the root and at each node (as in ``verify``).
    Returns (output_ids [B, D+1] int64: the accepted path's tokens, one emitted token, then -1;
    num_accepted [B] int32; accepted_nodes [B, D] int64: the accepted path's node indices, -1 pad).

    The walk starts at the root. At the current node v, at depth j (the root's children are
    decided at j = 0, theirs at j = 1, ...; every draw about them uses counter offset + j), v's
    valid children are tried in index order; the first accepted one becomes the current node, and
    a node where none is accepted emits one token and ends the row:
      - greedy rows (temperature <= 0): accept the first child whose token is argmax p_v (and in
        [0, Vd)); else emit argmax p_v;
      - draft_probs None (sample and compare): y = the target's own sample at v, exactly what
        ``sample(logits_v, seed, offset + j)`` draws (streams STREAM_SAMPLE*), drawn once; accept
        the first child whose token is y, else emit y;
      - with draft_probs: p_cur = p_v; the r-th child c tried (r = 0, 1, ...) is accepted iff
        p_cur(x_c) > 0 and u * q_c(x_c) <= p_cur(x_c), u = uniform_open_closed of Philox
        (STREAM_ACCEPT, index r); a token outside [0, Vd) is rejected and leaves p_cur as it is;
        otherwise a rejection sets p_cur = norm(max(0, p_cur - q_c)), unless that has no mass
        (p_cur <= q_c everywhere), where p_cur stays. When every child is rejected the token is
        a race over p_cur on STREAM_RESAMPLE*; a node without children emits the bonus, the
        target's own sample at v (STREAM_SAMPLE*, as ``verify``).
    On a chain (parent of node i = i - 1) this is ``verify``, token for token.
    A row emits nothing (all -1, num_accepted 0) only when the node where its emitted token is
    drawn has no finite logit, or its temperature is NaN / +inf; nodes off the walked path are
    never looked at.
    """
    target_logits = _masked(target_logits, token_bitmask)
    B, N1, Vt = target_logits.shape
    N = N1 - 1
    D = int(max_depth)
    dev = target_logits.device
    logits, probs, argmax, temperature, greedy, bad_t = _positions(target_logits, temperature, top_k, top_p)
    finite = torch.isfinite(logits).any(-1)  # [B, N+1]
    seed, offset = seed.to(dev, torch.int64), offset.to(dev, torch.int64)
    rows = torch.arange(B, device=dev)

    tokens = tree_token_ids.to(dev, torch.int64)
    parents = tree_parents.to(dev, torch.int64)
    valid, _ = tree_structure(tokens, parents, D)
    Vd = draft_probs.shape[-1] if draft_probs is not None else Vt
    in_range = (tokens >= 0) & (tokens < Vd)
    safe = tokens.clamp(0, Vd - 1)
    node_ids = torch.arange(N, device=dev)
    q_all = _draft_q(draft_probs, dev) if draft_probs is not None else None

    out = torch.full((B, D + 1), -1, dtype=torch.int64, device=dev)
    accepted_nodes = torch.full((B, D), -1, dtype=torch.int64, device=dev)
    num_accepted = torch.zeros(B, dtype=torch.int64, device=dev)
    void = bad_t.clone()
    active = ~bad_t  # rows still walking
    cur = torch.full((B,), -1, dtype=torch.int64, device=dev)  # current node, -1 = the root

    def race(p, off, need, stream, block_stream):
        """_race over the rows in ``need`` (the others get 0: never used)."""
        tok = torch.zeros(B, dtype=torch.int64, device=dev)
        idx = need.nonzero()[:, 0]
        if len(idx):
            tok[idx] = _race(p[idx], seed[idx], off[idx], stream, block_stream, torch.zeros_like(idx))
        return tok

    for j in range(D + 1):
        if not bool(active.any()):
            break
        v = cur + 1  # index into target_logits
        p_v = probs[rows, v]
        off = offset + j
        # the token is drawn at v: a node without a finite logit voids its row
        void |= active & ~finite[rows, v]
        active &= finite[rows, v]
        children = valid & (parents == cur[:, None]) & active[:, None]  # [B, N]
        has_child = children.any(1)
        # the lowest node where m holds, N if none
        first = lambda m: torch.where(m, node_ids, N).amin(1) if N else torch.zeros_like(cur)  # noqa: E731

        # the target's own sample at v (the sample op's race); with draft probabilities it is
        # only the bonus of a node without children
        own_needed = active & ~greedy
        if draft_probs is not None:
            own_needed &= ~has_child
        own = race(p_v, off, own_needed, STREAM_SAMPLE, STREAM_SAMPLE_BLOCK)
        # greedy rows and sample and compare: the first child equal to the target's token
        target_tok = torch.where(greedy, argmax[rows, v], own)
        match = first(children & in_range & (tokens == target_tok[:, None]))
        accepted = torch.where(match < N, match, torch.full_like(match, -1))
        token = target_tok

        if draft_probs is not None:
            # recursive rejection sampling over v's children, in index order (sampled rows)
            sampled = active & ~greedy
            p_cur = p_v.clone()
            decided = ~sampled | ~has_child
            rank = torch.zeros(B, dtype=torch.int64, device=dev)
            acc_q = torch.full((B,), -1, dtype=torch.int64, device=dev)
            for i in range(N):
                tried = children[:, i] & ~decided
                if not bool(tried.any()):
                    continue
                q_i = torch.zeros_like(p_v)
                q_i[:, :Vd] = q_all[:, i]
                x = safe[:, i, None]
                px = p_cur.gather(1, x).squeeze(1)
                qx = q_i.gather(1, x).squeeze(1)
                u = uniform_open_closed(philox_bits(seed, off, STREAM_ACCEPT, 0, rank))
                acc = tried & in_range[:, i] & (px > 0) & (u * qx <= px)
                acc_q = torch.where(acc, torch.full_like(acc_q, i), acc_q)
                decided |= acc
                rejected = tried & ~acc
                resid, has_mass = _residual(p_cur, q_i)
                update = rejected & in_range[:, i] & has_mass
                p_cur = torch.where(update[:, None], resid, p_cur)
                rank += tried.long()
            all_rejected = sampled & has_child & (acc_q < 0)
            resampled = race(p_cur, off, all_rejected, STREAM_RESAMPLE, STREAM_RESAMPLE_BLOCK)
            q_token = torch.where(has_child, resampled, own)  # no child: the bonus, own sample
            accepted = torch.where(greedy, accepted, acc_q)
            token = torch.where(greedy, token, q_token)

        go_on = active & (accepted >= 0)
        stop = active & ~go_on
        out[:, j] = torch.where(stop, token, out[:, j])
        if j < D and N > 0:  # N = 0: nothing to accept, only the bonus (no node to index)
            safe_acc = accepted.clamp(min=0)
            out[:, j] = torch.where(go_on, tokens[rows, safe_acc], out[:, j])
            accepted_nodes[:, j] = torch.where(go_on, accepted, accepted_nodes[:, j])
        num_accepted += go_on.long()
        cur = torch.where(go_on, accepted, cur)
        active = go_on

    out = torch.where(void[:, None], torch.full_like(out, -1), out)
    accepted_nodes = torch.where(void[:, None], torch.full_like(accepted_nodes, -1), accepted_nodes)
    num_accepted = torch.where(void, torch.zeros_like(num_accepted), num_accepted)
    return out, num_accepted.to(torch.int32), accepted_nodes


def emitted_logprobs(target_logits, source_positions, token_ids, temperature, top_k, top_p, token_bitmask=None):
    """Log-probabilities of emitted tokens (``return_logprobs=True`` of every op), float64 inside.

    target_logits [B, P, V] float; source_positions [B, M] int: the position (index into P) that
    output slot m's token was drawn at; token_ids [B, M] int (-1: nothing emitted there);
    temperature / top_k / top_p [B] as in ``verify``; token_bitmask [B, P, W] int32 or None.
    Returns (processed [B, M] float32: log p(token) with p the target distribution after the mask,
    temperature, top-k and top-p (``_target_probs``), -inf outside what is kept; raw [B, M] float32:
    log-softmax of the raw logits at temperature 1, without the mask). Greedy rows (temperature
    <= 0): processed = log-softmax of the masked logits at temperature 1 (= raw without a mask).
    -inf where token_ids is -1. For a token emitted after a rejection this is the target's
    value, not the residual's: the distribution the position stands for, not the correction.
    """
    B, P, V = target_logits.shape
    M = token_ids.shape[1]
    dev = target_logits.device
    rows = torch.arange(B, device=dev)[:, None]
    src = source_positions.to(dev, torch.int64).clamp(0, max(P - 1, 0))
    raw = torch.log_softmax(_clean(target_logits)[rows, src], dim=-1)  # [B, M, V]; no finite logit: NaN
    logits = _clean(_masked(target_logits, token_bitmask))[rows, src]
    temperature = temperature.double().to(dev)
    temperature = torch.where(_bad_temperature(temperature), torch.ones_like(temperature), temperature)
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    scaled = (logits / t[:, None, None]).reshape(B * M, V)
    rep = lambda x: x.to(dev).repeat_interleave(M)  # noqa: E731  per row -> per (row, slot)
    keep = _keep_mask(scaled, rep(top_k), rep(top_p.double()))
    processed = torch.log_softmax(torch.where(keep, scaled, float("-inf")), dim=-1).view(B, M, V)
    processed = torch.where(greedy[:, None, None], torch.log_softmax(logits, dim=-1), processed)
    tok = token_ids.to(dev, torch.int64)
    emitted = tok >= 0
    idx = tok.clamp(0, V - 1)[..., None]
    pick = lambda lp: torch.where(emitted, lp.gather(2, idx).squeeze(2), float("-inf")).float()  # noqa: E731
    return pick(processed), pick(raw)


def tree_source_positions(accepted_nodes):
    """Where ``verify_tree``'s output slots were drawn: [B, D] accepted nodes -> [B, D+1] indices
    into target_logits (slot 0 at the root, index 0; slot j at the (j-1)-th accepted node, index
    node + 1; slots after the emitted token get 0, their token is -1)."""
    root = torch.zeros_like(accepted_nodes[:, :1])
    return torch.cat([root, (accepted_nodes + 1).clamp(min=0)], dim=1)


def verify_block(target_logits, draft_token_ids, draft_probs, temperature, top_k, top_p, seed, offset,
                 token_bitmask=None):
    """Block verification of a chain (Sun et al., "Block Verification Accelerates Speculative
    Decoding", ICLR 2025), reference implementation (float64 inside). Arguments and outputs as
    ``verify``; exact like it, and it accepts at least as many drafts in expectation (the most any
    exact verifier of a drafted chain can).

    Per sampled row with drafts x_0..x_{g-1} (g = the drafts before the -1 tail or the first id
    outside [0, Vd), which ends the chain like a -1), target p_j and draft q_j (NaN read as 0):
      weights  w_0 = 1,  w_i = min(1, w_{i-1} p_{i-1}(x_{i-1}) / q_{i-1}(x_{i-1}))
               (0 when p_{i-1}(x_{i-1}) = 0; 1 when q_{i-1}(x_{i-1}) = 0 < p);
      residual mass R_i = sum_x max(0, w_i p_i(x) - q_i(x)) over the target vocabulary (q = 0
               past Vd), for 0 < i < g;
      stop after draft i-1 (keep i drafts), for i = g, g-1, ..., 1, the first that holds:
               i = g:  u_i <= w_g;   i < g:  u_i (R_i + 1 - w_i) <= R_i   (h_i = R_i / (R_i + 1 - w_i),
               1 when both are 0), with u_i = uniform_open_closed on STREAM_ACCEPT_PREFIX at counter
               offset + i - 1, index i - 1; none: keep 0 drafts.
    Keeping s < g drafts emits a race over max(0, w_s p_s - q_s) (its mass 0: over p_s) on the
    resample streams at offset + s; keeping all g emits the bonus, the target's own sample at g
    (sample's streams), as ``verify`` does. Greedy rows, and every row without draft probabilities
    (q one-hot: each prefix is then accepted with its target probability, the most any exact
    verifier can, so block and token verification coincide), are ``verify``'s, token for token.
    Positions after a draft that the target gives probability 0 (its weight, and all later
    ones, are 0: no test there can hold) are never looked at; a row emits nothing
    only when the position its token is drawn from has no finite logit (or its temperature is NaN
    / +inf).
    """
    target_logits = _masked(target_logits, token_bitmask)  # token_bitmask [B, K+1, W]: as in verify
    token_out, token_n = verify(target_logits, draft_token_ids, draft_probs, temperature, top_k, top_p,
                                seed, offset)
    if draft_probs is None:
        return token_out, token_n
    B, K1, Vt = target_logits.shape
    K = K1 - 1
    dev = target_logits.device
    logits, probs, argmax, temperature, greedy, bad_t = _positions(target_logits, temperature, top_k, top_p)
    finite = torch.isfinite(logits).any(-1)  # [B, K+1]
    seed, offset = seed.to(dev, torch.int64), offset.to(dev, torch.int64)
    rows = torch.arange(B, device=dev)
    drafts = draft_token_ids.to(dev, torch.int64)
    Vd = draft_probs.shape[-1]
    q = torch.zeros(B, K, Vt, dtype=torch.float64, device=dev)
    q[..., :Vd] = _draft_q(draft_probs, dev)
    in_range = (drafts >= 0) & (drafts < Vd)
    g = in_range.long().cumprod(1).sum(1)  # the chain: drafts before the -1 tail or a bad id
    safe = drafts.clamp(0, Vd - 1)

    # w[:, i] = min(1, w_{i-1} p(x) / q(x)), i = 0..K
    w = torch.ones(B, K + 1, dtype=torch.float64, device=dev)
    for i in range(1, K + 1):
        px = probs[rows, i - 1, safe[:, i - 1]]
        qx = q[rows, i - 1, safe[:, i - 1]]
        ratio = torch.where(qx > 0, w[:, i - 1] * px / torch.where(qx > 0, qx, torch.ones_like(qx)),
                            torch.ones_like(px))
        w[:, i] = torch.where((i - 1 < g) & (px > 0) & (w[:, i - 1] > 0), ratio.clamp(max=1.0),
                              torch.zeros_like(px))

    # the stop: the largest i in 1..g whose test holds (the tests read backwards from g)
    s = torch.zeros(B, dtype=torch.int64, device=dev)
    for i in range(1, K + 1):
        u = uniform_open_closed(philox_bits(seed, offset + (i - 1), STREAM_ACCEPT_PREFIX, 0, i - 1))
        if i < K:
            resid_mass = (w[:, i, None] * probs[:, i] - q[:, i]).clamp(min=0).sum(-1)
        else:
            resid_mass = torch.zeros(B, dtype=torch.float64, device=dev)
        test = torch.where(i == g, u <= w[:, i], u * (resid_mass + 1 - w[:, i]) <= resid_mass)
        s = torch.where((i <= g) & test, torch.full_like(s, i), s)

    # the emitted token at s
    zero = torch.zeros(B, dtype=torch.int64, device=dev)
    p_s = probs[rows, s]
    w_s = w[rows, s]
    q_s = q[rows, s.clamp(max=max(K - 1, 0))] if K > 0 else torch.zeros_like(p_s)
    resid = (w_s[:, None] * p_s - q_s).clamp(min=0)
    weights = torch.where((resid.sum(-1) > 0)[:, None], resid, p_s)  # mass 0: sample from p
    resampled = _race(weights, seed, offset + s, STREAM_RESAMPLE, STREAM_RESAMPLE_BLOCK, zero)
    bonus = _race(p_s, seed, offset + s, STREAM_SAMPLE, STREAM_SAMPLE_BLOCK, zero)
    token = torch.where(s == g, bonus, resampled)

    positions = torch.arange(K1, device=dev)
    out = torch.full((B, K1), -1, dtype=torch.int64, device=dev)
    out[:, :K] = torch.where(positions[None, :K] < s[:, None], drafts, out[:, :K])
    out[rows, s] = token
    row_ok = finite[rows, s] & ~bad_t
    out = torch.where(row_ok[:, None], out, torch.full_like(out, -1))
    n = torch.where(row_ok, s, torch.zeros_like(s)).to(torch.int32)
    # greedy rows: token verification
    out = torch.where(greedy[:, None], token_out.to(dev), out)
    n = torch.where(greedy, token_n.to(dev), n)
    return out, n
