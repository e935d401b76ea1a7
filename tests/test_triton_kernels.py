"""Triton-backend checks: the kernels in ``specdec.kernels`` against ``specdec.reference``.

The backend-parametrised suite (tests/test_verify.py) checks the ops' semantics for every backend;
this file checks what is specific to Triton: its own Philox against the reference's (and the
Random123 known answers), and token-for-token equality of ``verify`` / ``sample`` with the
reference on small random inputs, including the tilings that split a vocabulary over programs and
vocabularies of several blocks of the two-level race (``reference.RACE_BLOCK`` ids each).
Without a GPU the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1,
set before triton is imported, in conftest.py), so sizes stay small.
"""
import pytest
import torch
from conftest import triton_device

DEV = triton_device()  # skips this file where Triton cannot run

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from specdec import reference  # noqa: E402
from specdec.kernels import philox as kphilox  # noqa: E402
from specdec.kernels import sample as ksample  # noqa: E402
from specdec.kernels import verify as kverify  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Philox
# ------------------------------------------------------------------------------------------------


@triton.jit
def _philox_words_kernel(c_ptr, k_ptr, out_ptr, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < N
    c0 = tl.load(c_ptr + 4 * i, mask=m).to(tl.uint32)
    c1 = tl.load(c_ptr + 4 * i + 1, mask=m).to(tl.uint32)
    c2 = tl.load(c_ptr + 4 * i + 2, mask=m).to(tl.uint32)
    c3 = tl.load(c_ptr + 4 * i + 3, mask=m).to(tl.uint32)
    k0 = tl.load(k_ptr + 2 * i, mask=m).to(tl.uint32)
    k1 = tl.load(k_ptr + 2 * i + 1, mask=m).to(tl.uint32)
    r0, r1, r2, r3 = kphilox.philox4x32_10(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + 4 * i, r0.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 1, r1.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 2, r2.to(tl.int64), mask=m)
    tl.store(out_ptr + 4 * i + 3, r3.to(tl.int64), mask=m)


@triton.jit
def _philox_draws_kernel(seed_ptr, offset_ptr, position_ptr, index_ptr, bits_ptr, u_ptr, e_ptr, N,
                         STREAM: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < N
    bits = kphilox.philox_bits(tl.load(seed_ptr + i, mask=m), tl.load(offset_ptr + i, mask=m),
                               STREAM, tl.load(position_ptr + i, mask=m),
                               tl.load(index_ptr + i, mask=m))
    tl.store(bits_ptr + i, bits.to(tl.int64), mask=m)
    tl.store(u_ptr + i, kphilox.uniform_open_closed(bits), mask=m)
    tl.store(e_ptr + i, kphilox.exponential(bits), mask=m)


@triton.jit
def _exponential_kernel(bits_ptr, e_ptr, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    b = tl.load(bits_ptr + i, mask=i < N).to(tl.uint32)
    tl.store(e_ptr + i, kphilox.exponential(b), mask=i < N)


def test_philox_random123_known_answers():
    # Random123 kat_vectors, philox4x32_10: (counter, key) -> output
    counters = [[0, 0, 0, 0], [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]]
    keys = [[0, 0], [0xFFFFFFFF] * 2, [0xA4093822, 0x299F31D0]]
    expected = [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
                [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
                [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]]
    out = torch.zeros(3, 4, dtype=torch.int64, device=DEV)
    _philox_words_kernel[(1,)](torch.tensor(counters, device=DEV), torch.tensor(keys, device=DEV),
                               out, 3, BLOCK=4)
    assert out.cpu().tolist() == expected
    ref = torch.stack(reference.philox4x32_10(*torch.tensor(counters).T, *torch.tensor(keys).T), 1)
    assert ref.tolist() == expected


def test_constants_match_reference():
    for name in ("STREAM_ACCEPT", "STREAM_RESAMPLE", "STREAM_SAMPLE", "STREAM_RESAMPLE_BLOCK",
                 "STREAM_SAMPLE_BLOCK"):
        assert getattr(kphilox, name).value == getattr(reference, name), name
    assert ksample.RACE_BLOCK.value == reference.RACE_BLOCK


@pytest.mark.parametrize("stream", [reference.STREAM_ACCEPT, reference.STREAM_RESAMPLE,
                                    reference.STREAM_SAMPLE, reference.STREAM_RESAMPLE_BLOCK,
                                    reference.STREAM_SAMPLE_BLOCK])
def test_philox_draws_match_reference(stream):
    g = torch.Generator().manual_seed(stream)
    n = 500
    seed = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g)
    seed[:3] = torch.tensor([0, -1, 2**32])
    offset = torch.randint(-(2**63), 2**63 - 1, (n,), generator=g)
    offset[:3] = torch.tensor([0, 1 << 40, -1])
    position = torch.randint(0, 70000, (n,), generator=g)  # the counter keeps the low 16 bits
    index = torch.randint(0, 2**32, (n,), generator=g)
    index[:2] = torch.tensor([0, 2**32 - 1])
    bits = torch.empty(n, dtype=torch.int64, device=DEV)
    u = torch.empty(n, dtype=torch.float32, device=DEV)
    e = torch.empty(n, dtype=torch.float32, device=DEV)
    _philox_draws_kernel[(1,)](seed.to(DEV), offset.to(DEV), position.to(DEV), index.to(DEV),
                               bits, u, e, n, STREAM=stream, BLOCK=512)
    ref_bits = reference.philox_bits(seed, offset, stream, position, index)
    assert torch.equal(bits.cpu(), ref_bits)
    assert torch.equal(u.cpu().double(), reference.uniform_open_closed(ref_bits))  # exact
    torch.testing.assert_close(e.cpu().double(), reference.exponential(ref_bits), rtol=2e-6, atol=0)


def test_exponential_extremes():
    # the largest and smallest uniforms: e stays positive and relatively precise at both ends
    bits = torch.tensor([0xFFFFFFFF, 0xFFFFFE00, 0xFFFFF000, 0x80000000, 0x3FF, 0], device=DEV)
    n = bits.numel()
    ref = reference.exponential(bits.cpu())
    e = torch.empty(n, dtype=torch.float32, device=DEV)
    _exponential_kernel[(1,)](bits, e, n, BLOCK=8)
    assert bool((e > 0).all())
    torch.testing.assert_close(e.cpu().double(), ref, rtol=2e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------


def _params(B, g, *, greedy=(), top_k=None, top_p=None):
    temperature = (torch.rand(B, generator=g) * 1.5 + 0.3).float()
    for b in greedy:
        temperature[b] = 0.0
    top_k = torch.zeros(B, dtype=torch.int64) if top_k is None else torch.tensor(top_k)
    top_p = torch.ones(B) if top_p is None else torch.tensor(top_p, dtype=torch.float32)
    seed = torch.randint(-(2**62), 2**62, (B,), generator=g)
    offset = torch.randint(0, 2**40, (B,), generator=g)
    return temperature, top_k, top_p, seed, offset


def _verify_inputs(B, K, Vt, *, Vd=None, dtype=torch.float32, with_q=True, seed=0, greedy=(),
                   top_k=None, top_p=None, tails=False, bad_ids=False):
    """Random logits; drafts drawn from draft_probs (or argmax-ish for greedy rows) so that some
    are accepted and some rejected; optional -1 tails and out-of-range ids."""
    g = torch.Generator().manual_seed(seed)
    Vd = Vd or Vt
    logits = (torch.randn(B, K + 1, Vt, generator=g) * 2.5).to(dtype)
    draft_probs = None
    if with_q:
        # a drafter close to the target, so that acceptance is neither always nor never
        near = logits[:, :K, :Vd].float() + torch.randn(B, K, Vd, generator=g)
        draft_probs = torch.softmax(near, dim=-1)
        drafts = torch.multinomial(draft_probs.reshape(-1, Vd), 1, generator=g).view(B, K)
    else:
        drafts = logits[:, :K, :Vd].float().argmax(-1)
        flip = torch.rand(B, K, generator=g) < 0.3
        drafts = torch.where(flip, torch.randint(0, Vd, (B, K), generator=g), drafts)
    if tails and K > 1:
        drafts[0, K // 2:] = -1
        drafts[-1, K - 1] = -1
    if bad_ids and K > 0:
        drafts[-1, 0] = Vd + 3 if Vd + 3 < 2**31 else -5  # rejected, never read
        if B > 1 and K > 1:
            drafts[0, 1] = -7
    params = _params(B, g, greedy=greedy, top_k=top_k, top_p=top_p)
    return (logits.to(DEV), drafts.to(DEV), None if draft_probs is None else draft_probs.to(DEV),
            *(p.to(DEV) for p in params))


def _check_verify(args, **tiling):
    out, n_acc = kverify.verify(*args, **tiling)
    ref_out, ref_n = reference.verify(*(a.cpu() if a is not None else None for a in args))
    Vt = args[0].shape[-1]
    assert out.dtype == torch.int64 and n_acc.dtype == torch.int32
    assert bool((out < Vt).all()), "emitted an id >= Vt"
    assert torch.equal(out.cpu(), ref_out), f"\ntriton\n{out}\nreference\n{ref_out}"
    assert torch.equal(n_acc.cpu(), ref_n)
    return out, n_acc


# tilings: the default (one program per row under the interpreter), and small tiles split over
# several programs, so that the online softmax, the tail mask and the combines all run
SPLIT = dict(block_v=32, num_splits=3, num_race_splits=2)


# ------------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,K", [(1, 0), (3, 0), (1, 1), (3, 1), (3, 3), (1, 8), (3, 8)])
@pytest.mark.parametrize("with_q", [True, False])
def test_verify_matches_reference(B, K, with_q):
    for s in range(2):
        args = _verify_inputs(B, K, 111, with_q=with_q, seed=100 * B + 10 * K + s,
                              greedy=(1,) if B > 1 else ())
        _check_verify(args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_verify_split_vocabulary(dtype):
    args = _verify_inputs(3, 3, 111, dtype=dtype, seed=7, greedy=(2,), tails=True)
    a, na = _check_verify(args, **SPLIT)
    b, nb = _check_verify(args)  # the tiling never changes the result
    assert torch.equal(a, b) and torch.equal(na, nb)


def test_verify_accepts_and_rejects():
    # the equality tests above are only meaningful if both outcomes occur
    accepted = rejected = 0
    for s in range(6):
        args = _verify_inputs(3, 3, 111, seed=1000 + s)
        _, n = _check_verify(args)
        accepted += int((n > 0).sum())
        rejected += int((n < 3).sum())
    assert accepted > 0 and rejected > 0


@pytest.mark.parametrize("with_q", [True, False])
def test_verify_draft_vocab_smaller(with_q):
    args = _verify_inputs(3, 3, 111, Vd=90, with_q=with_q, seed=11, bad_ids=True)
    _check_verify(args, **SPLIT)


def test_verify_tails_and_bad_ids():
    for s in range(3):
        args = _verify_inputs(3, 8, 111, seed=20 + s, greedy=(1,), tails=True, bad_ids=True)
        _check_verify(args)


def test_verify_greedy_ties_lowest_id():
    B, K, V = 2, 2, 111
    logits = torch.zeros(B, K + 1, V)
    logits[:, :, 40] = logits[:, :, 7] = logits[:, :, 90] = 5.0
    drafts = torch.tensor([[7, 40], [7, 7]])
    temperature = torch.zeros(B)
    args = (logits.to(DEV), drafts.to(DEV), None, temperature.to(DEV),
            torch.zeros(B, dtype=torch.int64, device=DEV), torch.ones(B, device=DEV),
            torch.tensor([1, 2], device=DEV), torch.zeros(B, dtype=torch.int64, device=DEV))
    out, n = _check_verify(args, **SPLIT)
    assert out.cpu().tolist() == [[7, 7, -1], [7, 7, 7]] and n.cpu().tolist() == [1, 2]


@pytest.mark.parametrize("with_q", [True, False])
def test_verify_top_k_top_p(with_q):
    for s in range(2):
        args = _verify_inputs(3, 3, 111, with_q=with_q, seed=30 + s, greedy=(0,) if s else (),
                              top_k=[5, 0, 1], top_p=[1.0, 0.7, 0.5])
        _check_verify(args)
        _check_verify(args, **SPLIT)
    # ties at the top-k threshold are kept: quantised logits have many ties
    args = list(_verify_inputs(3, 3, 111, with_q=with_q, seed=40, top_k=[3, 10, 50],
                               top_p=[0.9, 1.0, 0.3]))
    args[0] = args[0].round()
    _check_verify(tuple(args))


def test_verify_filters_off_equal_none():
    args = _verify_inputs(3, 3, 111, seed=50)
    out, n = kverify.verify(*args)
    a = list(args)
    a[4] = a[5] = None  # top_k / top_p None: no thresholds computed
    out2, n2 = kverify.verify(*a)
    assert torch.equal(out, out2) and torch.equal(n, n2)


def test_verify_non_finite_logits():
    B, K, V = 3, 3, 111
    args = list(_verify_inputs(B, K, V, seed=60, greedy=(1,)))
    logits = args[0].clone()
    logits[0, 0, :50] = float("nan")  # some non-finite values: they are -inf
    logits[0, 1, 3] = float("inf")
    logits[0, 2, 4] = float("-inf")
    logits[1, 0] = float("nan")  # a whole first position (always reached): row 1 emits nothing
    drafts = args[1].clone()
    drafts[2, 1:] = -1
    logits[2, 3] = float("nan")  # a position after row 2's tail: irrelevant
    args[0], args[1] = logits, drafts
    out, n = _check_verify(tuple(args), **SPLIT)
    assert out[1].cpu().tolist() == [-1] * (K + 1) and int(n[1]) == 0
    assert int((out[2] >= 0).sum()) >= 1


# several race blocks: V = 700 is 3 blocks of the two-level race (the last one 188 ids), V = 1000
# is 4 (the last one 232 ids). Tilings: the default (one tile of 4 blocks, the last masked off),
# one block per tile and per split, and 2-block tiles over 2 splits (the second one half empty
# for V = 700).
RACE_TILINGS = [{}, dict(block_v=256, num_splits=2, num_race_splits=4),
                dict(block_v=512, num_race_splits=2)]


@pytest.mark.parametrize("V", [700, 1000])
@pytest.mark.parametrize("with_q", [True, False])
def test_verify_several_race_blocks(V, with_q):
    args = _verify_inputs(3, 2, V, with_q=with_q, seed=80 + V, greedy=(2,), top_p=[1.0, 0.9, 1.0])
    first = _check_verify(args)
    for tiling in RACE_TILINGS[1:]:
        out, n = _check_verify(args, **tiling)
        assert torch.equal(out, first[0]) and torch.equal(n, first[1])


def _far_block_verify_inputs(seed):
    """p: mass in block 0 (ids 0..199) and in the last, partial block (ids 800..999 of V = 1000),
    -inf logits elsewhere; q: all its mass in block 0, where q > p. Drafts come from q, so about
    half are rejected, and a rejection's residual max(0, p - q) lies in the far block only."""
    B, K, V = 4, 2, 1000
    g = torch.Generator().manual_seed(seed)
    logits = torch.full((B, K + 1, V), float("-inf"))
    logits[..., :200] = torch.randn(B, K + 1, 200, generator=g)
    logits[..., 800:] = torch.randn(B, K + 1, 200, generator=g)
    q = torch.zeros(B, K, V)
    q[..., :200] = torch.softmax(logits[:, :K, :200], dim=-1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, K)
    params = _params(B, g)
    params[0].fill_(1.0)  # temperature 1: p = softmax(logits), below q in block 0
    return (logits.to(DEV), drafts.to(DEV), q.to(DEV), *(p.to(DEV) for p in params))


def test_verify_residual_in_one_far_block():
    rejections = 0
    for s in range(3):
        args = _far_block_verify_inputs(90 + s)
        out, n = _check_verify(args)
        _check_verify(args, **RACE_TILINGS[1])
        K = args[1].shape[1]
        for b in range(out.shape[0]):
            if int(n[b]) < K:  # rejected: the residual's block is the only one with mass
                rejections += 1
                assert 800 <= int(out[b, int(n[b])]) < 1000
    assert rejections > 0


def test_verify_large_vocab():
    args = _verify_inputs(1, 1, 32003, seed=70, dtype=torch.bfloat16, top_p=[0.95])
    _check_verify(args)


# ------------------------------------------------------------------------------------------------
# sample
# ------------------------------------------------------------------------------------------------


def _check_sample(logits, params, **tiling):
    tok, probs = ksample.sample(logits, *params, **tiling)
    ref_tok, ref_probs = reference.sample(logits.cpu(), *(p.cpu() for p in params))
    assert tok.dtype == torch.int64 and probs.dtype == torch.float32
    assert torch.equal(tok.cpu(), ref_tok), f"{tok} vs {ref_tok}"
    torch.testing.assert_close(probs.cpu(), ref_probs, rtol=0, atol=1e-5)
    return tok, probs


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_matches_reference(B, dtype):
    for s in range(3):
        g = torch.Generator().manual_seed(200 + s)
        logits = (torch.randn(B, 111, generator=g) * 3).to(dtype).to(DEV)
        params = [p.to(DEV) for p in _params(B, g, greedy=(1,) if B > 1 else ())]
        _check_sample(logits, params)
        _check_sample(logits, params, block_v=32, num_splits=3)


def test_sample_top_k_top_p_and_non_finite():
    B, V = 4, 111
    g = torch.Generator().manual_seed(300)
    logits = (torch.randn(B, V, generator=g) * 3).round()  # ties at the thresholds
    logits[0, :10] = float("nan")
    logits[1, 5] = float("inf")
    logits[3] = float("nan")  # no finite logit: token -1, probs 0
    params = [p.to(DEV) for p in _params(B, g, greedy=(2,), top_k=[3, 0, 2, 5],
                                         top_p=[1.0, 0.6, 0.9, 0.5])]
    tok, probs = _check_sample(logits.to(DEV), params, block_v=32, num_splits=2)
    assert int(tok[3]) == -1 and float(probs[3].abs().sum()) == 0.0


@pytest.mark.parametrize("V", [700, 1000])
def test_sample_several_race_blocks(V):
    g = torch.Generator().manual_seed(500 + V)
    logits = (torch.randn(3, V, generator=g) * 2).to(DEV)
    params = [p.to(DEV) for p in _params(3, g, greedy=(1,), top_k=[0, 0, 300])]
    first, _ = _check_sample(logits, params)
    for tiling in RACE_TILINGS[1:]:
        tok, _ = _check_sample(logits, params, block_v=tiling["block_v"],
                               num_splits=tiling.get("num_race_splits"))
        assert torch.equal(tok, first)


def test_sample_mass_in_one_block():
    # only one block has finite logits: the last, partial one (row 0), a middle one (row 1), the
    # first (row 2, and a single id); the block race must pick it whatever the tiling
    B, V = 3, 1000
    g = torch.Generator().manual_seed(600)
    logits = torch.full((B, V), float("-inf"))
    logits[0, 900:] = torch.randn(100, generator=g)
    logits[1, 300:310] = torch.randn(10, generator=g)
    logits[2, 5] = 1.0
    params = [p.to(DEV) for p in _params(B, g)]
    for s in range(3):
        params[3] = params[3] + 1  # another seed: another draw
        for tiling in ({}, dict(block_v=256, num_splits=4)):
            tok, _ = _check_sample(logits.to(DEV), params, **tiling)
            t = tok.cpu().tolist()
            assert 900 <= t[0] < 1000 and 300 <= t[1] < 310 and t[2] == 5


def test_sample_large_vocab():
    g = torch.Generator().manual_seed(400)
    logits = torch.randn(2, 32003, generator=g).to(DEV)
    params = [p.to(DEV) for p in _params(2, g, top_k=[0, 50])]
    _check_sample(logits, params)


# ------------------------------------------------------------------------------------------------
# token bitmask (tests/test_bitmask.py runs the ops on every backend; here: what the Triton kernels
# add, the tiles and splits the mask must cross, and the thresholds kernel)
# ------------------------------------------------------------------------------------------------


def _bitmask(allowed: torch.Tensor, W: int) -> torch.Tensor:
    """bool [..., V] -> int32 [..., W], bit i % 32 of word i // 32 (ids >= 32 W dropped)."""
    V = allowed.shape[-1]
    ids = torch.arange(V)
    words = torch.zeros(*allowed.shape[:-1], W, dtype=torch.int64)
    keep = allowed & (ids < 32 * W)
    contrib = keep.long() << (ids % 32)
    words.index_add_(-1, (ids // 32).clamp(max=W - 1), contrib)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # bit 31: negative


def _mask_case(B, P, V, W, g):
    """Random allowed sets with the cases the kernels' tiles meet: a row whose first 256 ids (a
    whole race block and several 32-id tiles) are banned, a row with one allowed id, bit 31 of a
    word set; W < ceil(V / 32) bans the tail."""
    allowed = torch.rand(B, P, V, generator=g) < 0.4
    allowed[0, 0, :256] = False
    allowed[0, 0, min(300, V - 1)] = True  # (V = 100, W = 1: banned too, nothing allowed)
    allowed[-1, -1] = False
    allowed[-1, -1, 31 + 32 * int(torch.randint(0, min(W, V // 32), (1,), generator=g))] = True
    return allowed, _bitmask(allowed, W).to(DEV)


@pytest.mark.parametrize("V,W", [(700, 22), (700, 15), (100, 1)])
def test_bitmask_thresholds_are_those_of_the_masked_logits(V, W):
    """filter_thresholds with a mask = without a mask on logits whose banned ids are -inf, bit
    for bit (the mask is read in every pass of the search)."""
    from specdec.kernels import thresholds as kthr

    g = torch.Generator().manual_seed(V + W)
    N = 6
    logits = torch.randn(N, V, generator=g) * 2
    allowed, mask = _mask_case(N, 1, V, W, g)
    allowed, mask = allowed[:, 0], mask[:, 0]
    banned = logits.masked_fill(~reference.allowed_ids(mask.cpu(), V), float("-inf"))
    t = torch.tensor([0.7, 1.0, 0.0, 1.3, 1.0, 2.0])
    k = torch.tensor([0, 3, 40, 1, 500, 7])
    p = torch.tensor([0.9, 1.0, 0.5, 0.95, 0.3, 1.0])
    for top_k, top_p in ((k, None), (None, p), (k, p)):
        for block_v in (None, 64):
            got = kthr.filter_thresholds(logits.to(DEV), t.to(DEV), *[x if x is None else x.to(DEV) for x in (top_k, top_p)],
                                         block_v=block_v, token_bitmask=mask)
            want = kthr.filter_thresholds(banned.to(DEV), t.to(DEV), *[x if x is None else x.to(DEV) for x in (top_k, top_p)],
                                          block_v=block_v)
            assert torch.equal(got.cpu(), want.cpu()), (top_k is not None, top_p is not None, block_v)


@pytest.mark.parametrize("with_q", [True, False])
@pytest.mark.parametrize("V,W", [(700, 22), (700, 15)])
def test_bitmask_across_tiles_and_splits(with_q, V, W):
    """verify, verify(block), verify_tree and sample with a mask under split tilings (several race
    blocks, pass 1 and the races split over programs): the reference's tokens, and its logprobs
    (processed: the masked target; raw: the unmasked logits)."""
    from specdec.kernels import verify_block as kblock
    from specdec.kernels import verify_tree as ktree

    B, K = 3, 2
    args = _verify_inputs(B, K, V, with_q=with_q, seed=V + W + with_q, greedy=(2,), top_p=[1.0, 0.9, 1.0])
    logits, drafts, q, t, top_k, top_p, seed, offset = args
    g = torch.Generator().manual_seed(W)
    allowed, mask = _mask_case(B, K + 1, V, W, g)
    # about half the drafts are banned where they stand
    drafts = torch.where(torch.rand(B, K, generator=g).to(DEV) < 0.5, drafts,
                         torch.randint(0, V, (B, K), generator=g).to(DEV))
    cpu = lambda xs: [x.cpu() if isinstance(x, torch.Tensor) else x for x in xs]  # noqa: E731
    common = (t, top_k, top_p, seed, offset)
    want = reference.verify(*cpu((logits, drafts, q, *common)), token_bitmask=mask.cpu())
    want_lp = reference.emitted_logprobs(logits.cpu(), torch.arange(K + 1).expand(B, K + 1), want[0],
                                         t.cpu(), top_k.cpu(), top_p.cpu(), mask.cpu())
    for tiling in ({}, SPLIT):
        got = kverify.verify(logits, drafts, q, *common, token_bitmask=mask, return_logprobs=True, **tiling)
        assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), tiling
        for a, b in zip(got[2:], want_lp):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
    if with_q:
        want = reference.verify_block(*cpu((logits, drafts, q, *common)), token_bitmask=mask.cpu())
        for tiling in ({}, dict(block_v=32, num_splits=3)):
            got = kblock.verify_block(logits, drafts, q, *common, token_bitmask=mask, **tiling)
            assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1]), tiling
    chain = (torch.arange(K) - 1).expand(B, K).to(DEV)
    want = reference.verify_tree(*cpu((logits, drafts, chain, q, *common)), K, token_bitmask=mask.cpu())
    got = ktree.verify_tree(logits, drafts, chain, q, *common, K, token_bitmask=mask, block_v=32, num_splits=3)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
    want = reference.sample(*cpu((logits[:, 0], *common)), token_bitmask=mask[:, 0].cpu())
    for tiling in ({}, dict(block_v=32, num_splits=3)):
        tok, probs = ksample.sample(logits[:, 0], *common, token_bitmask=mask[:, 0], **tiling)
        assert torch.equal(tok.cpu(), want[0]), tiling
        torch.testing.assert_close(probs.cpu(), want[1], rtol=0, atol=1e-5)


@pytest.mark.skipif(DEV == "cuda", reason="on a GPU every other test compiles the kernels already")
def test_triton_compiles_for_sm90(tmp_path):
    """The interpreter accepts code that the compiler rejects: record the launches of a few calls
    (every kernel; fp32 and bf16 logits; with and without draft_probs and top-k/top-p) and compile
    each for sm_90 in a child process with the interpreter off (tests/triton_compile.py)."""
    import json

    from triton_compile import compile_in_child, record_launches


    g = torch.Generator().manual_seed(5)
    B, K, V = 2, 2, 600
    params = _params(B, g, greedy=(0,))
    with record_launches() as launches:
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.randn(B, K + 1, V, generator=g).to(dtype)
            q = torch.softmax(torch.randn(B, K, V, generator=g), -1)
            drafts = torch.randint(0, V, (B, K), generator=g)
            t, _, _, seed, offset = params
            for draft_probs in (q, None):
                for top_k, top_p in ((None, None), (torch.tensor([0, 5]), torch.tensor([1.0, 0.9]))):
                    kverify.verify(logits, drafts, draft_probs, t, top_k, top_p, seed, offset)
            ksample.sample(logits[:, 0], t, None, None, seed, offset)
            ksample.sample(logits[:, 0], t, torch.tensor([0, 5]), torch.tensor([1.0, 0.9]), seed, offset)
        # HAS_MASK=True variants (fp32 logits): every kernel that reads logits, with logprobs
        from specdec.kernels import verify_block as kblock
        from specdec.kernels import verify_tree as ktree

        logits = torch.randn(B, K + 1, V, generator=g)
        mask = torch.randint(-(2**31), 2**31, (B, K + 1, (V + 31) // 32), generator=g, dtype=torch.int64).to(torch.int32)
        filt = (torch.tensor([0, 5]), torch.tensor([1.0, 0.9]))
        for draft_probs in (q, None):
            kverify.verify(logits, drafts, draft_probs, t, *filt, seed, offset, token_bitmask=mask,
                           return_logprobs=True)
        kblock.verify_block(logits, drafts, q, t, *filt, seed, offset, token_bitmask=mask)
        ktree.verify_tree(logits, drafts, torch.tensor([[-1, 0], [-1, -1]]), q, t, *filt, seed, offset, K,
                          token_bitmask=mask)
        ksample.sample(logits[:, 0], t, *filt, seed, offset, token_bitmask=mask[:, 0], return_logprobs=True)
    names = {json.loads(k)[1] for k in launches if json.loads(k)[3].get("HAS_MASK")}
    assert {"softmax_stats_kernel", "_thresholds_kernel", "_verify_accept_race_kernel", "_verify_finish_kernel",
            "_sample_probs_kernel", "_sample_finish_kernel", "_token_logprobs_kernel", "_verify_block_kernel",
            "_tree_walk_kernel"} <= names, names
    assert len(launches) >= 6  # every kernel at least once
    ok, out = compile_in_child([json.loads(k) for k in launches], tmp_path)
    assert ok, out
