"""specdec.integrations.flashinfer.chain_speculative_sampling: FlashInfer 0.7.2's signature and
return values, the behaviour FlashInfer's own tests check for that function (valid layout, one-hot
targets reproduced, counts, in-place accumulation, per-row seeds that follow a request across
batch slots, seed/offset validation), plus exactness (chi-square per position) and the row's
independence of its batch slot."""
import inspect

import pytest
import torch

from specdec.integrations.flashinfer import chain_speculative_sampling
from stats import ALPHA, chi2_pvalue

pytestmark = pytest.mark.usefixtures("one_thread")


def normalised(x):
    return x / x.sum(-1, keepdim=True)


def random_case(B, n, V, g, onehot_target=False):
    draft_probs = normalised(torch.rand(B, n, V, generator=g))
    draft_ids = torch.randint(V, (B, n), generator=g)
    if not onehot_target:
        return draft_probs, draft_ids, normalised(torch.rand(B, n + 1, V, generator=g)), None
    target_ids = torch.randint(V, (B, n + 1), generator=g)
    target_ids[:, :n] = draft_ids
    target = torch.zeros(B, n + 1, V).scatter_(2, target_ids[..., None], 1.0)
    return draft_probs, draft_ids, target, target_ids


def test_signature_is_flashinfers():
    params = list(inspect.signature(chain_speculative_sampling).parameters.values())
    assert [p.name for p in params] == [
        "draft_probs", "draft_token_ids", "target_probs", "maybe_output_accepted_token_num",
        "maybe_output_emitted_draft_token_num", "deterministic", "generator", "seed", "offset"]
    assert [p.default for p in params[3:]] == [None, None, True, None, None, None]


def test_documented_example():
    """FlashInfer's docstring example: draft 2 is accepted (p = 0.6 >= q = 0.3), draft 1 rejected
    (p = 0), and the residual relu(p - q) puts all its mass on token 0. No randomness left."""
    draft_probs = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.2, 0.3, 0.4, 0.1]]])
    draft_ids = torch.tensor([[2, 1]], dtype=torch.int32)
    target = torch.tensor([[[0.0, 0.1, 0.6, 0.3], [1.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]]])
    for seed in range(5):
        out, accepted, emitted = chain_speculative_sampling(draft_probs, draft_ids, target, seed=seed, offset=0)
        assert out.dtype == accepted.dtype == emitted.dtype == torch.int32
        assert out.tolist() == [[2, 0, -1]] and accepted.tolist() == [1] and emitted.tolist() == [1]


@pytest.mark.parametrize("B,V,n", [(1, 111, 1), (33, 111, 3), (7, 1000, 7)])
@pytest.mark.parametrize("onehot_target", [False, True])
def test_valid_output(B, V, n, onehot_target):
    """FlashInfer's test: one-hot targets equal to the drafts are reproduced (drafts and bonus);
    otherwise ids are in range, everything after the first mismatch is -1, and emitted + 1 tokens
    are output; counts accumulate into the tensors passed in."""
    g = torch.Generator().manual_seed(B * V + n)
    draft_probs, draft_ids, target, target_ids = random_case(B, n, V, g, onehot_target)
    for trial in range(3):
        acc_in = torch.zeros(B, dtype=torch.int32)
        emit_in = torch.zeros(B, dtype=torch.int32)
        out, acc, emit = chain_speculative_sampling(draft_probs, draft_ids, target, acc_in, emit_in,
                                                    seed=trial, offset=0)
        assert acc is acc_in and emit is emit_in and out.shape == (B, n + 1)
        if onehot_target:
            assert torch.equal(out.long(), target_ids) and (emit == n).all() and (acc == n).all()
        else:
            assert ((out >= -1) & (out < V)).all()
            mismatch = out[:, :-1].long() != draft_ids
            for row in range(B):
                idx = mismatch[row].nonzero()[:, 0]
                if len(idx):
                    assert torch.equal(idx, torch.arange(int(idx[0]), n))  # contiguous to the end
                    assert (out[row, int(idx[0]) + 1:] == -1).all()
        assert torch.equal(emit + 1, (out != -1).sum(1).int())
        assert (acc >= emit).all() and (acc <= n).all()


def test_counts_accumulate_and_count_independent_acceptances():
    """accepted counts every draft whose test passes on its own (past the first rejection too);
    emitted counts what was output. p >= q passes always, p = 0 never: drafts pass, fail, pass,
    pass -> 1 emitted, 3 accepted; tensors passed in are added to."""
    V, n = 8, 4
    draft_probs = torch.full((2, n, V), 1.0 / V)
    draft_ids = torch.tensor([[1, 2, 3, 4]] * 2)
    target = torch.full((2, n + 1, V), 1.0 / V)
    target[:, 1, 2] = 0.0
    target = normalised(target)
    acc, emit = torch.tensor([10, 0], dtype=torch.int32), torch.tensor([5, 0], dtype=torch.int32)
    out, acc2, emit2 = chain_speculative_sampling(draft_probs, draft_ids, target, acc, emit, seed=3, offset=1)
    assert acc2 is acc and emit2 is emit
    assert acc.tolist() == [13, 3] and emit.tolist() == [6, 1]
    assert out[:, 0].tolist() == [1, 1] and (out[:, 1] != 2).all() and (out[:, 2:] == -1).all()


def test_emitted_tokens_follow_target():
    N, n, V = 40_000, 2, 16
    g = torch.Generator().manual_seed(7)
    target_logits = torch.randn(n + 1, V, generator=g) * 1.5
    target = torch.softmax(target_logits, -1)
    draft = normalised(0.5 * target[:n] + 0.5 * torch.softmax(-target_logits[:n], -1))
    draft_ids = torch.stack([torch.multinomial(draft[i], N, replacement=True, generator=g) for i in range(n)], 1)
    out, _, emit = chain_speculative_sampling(draft.expand(N, n, V), draft_ids, target.expand(N, n + 1, V),
                                              seed=torch.arange(N) * 3 + 1, offset=torch.zeros(N, dtype=torch.int64))
    for i in range(n + 1):
        emitted = out[:, i][out[:, i] >= 0].long()
        assert len(emitted) > 5000
        assert chi2_pvalue(emitted, target[i]) > ALPHA, f"position {i}"


def _per_row_case(B=4, n=3, V=257):
    """FlashInfer's seed test setup: drafts of token 0, accepted until position 1, then a
    rejection whose replacement is drawn (so the random numbers matter), and random targets."""
    g = torch.Generator().manual_seed(42)
    draft = torch.zeros(B, n, V)
    draft[:, :, 0] = 1
    target = torch.full((B, n + 1, V), 1 / 256)
    target[:, :, 0] = 0
    target[:, :1] = draft[:, :1]
    target[:, 2:] = normalised(torch.rand(B, n - 1, V, generator=g))
    return draft, torch.zeros(B, n, dtype=torch.int32), target


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint64])
def test_row_result_does_not_depend_on_its_batch_slot(dtype):
    """Per-row seeds and offsets follow the request: a row alone, the rows reordered or a subset
    give each row the tokens it got in the full batch; a request repeated in every slot with its
    seed draws the same tokens in each (FlashInfer 0.7.2 keys its numbers by the slot too)."""
    draft, ids, target = _per_row_case()
    seed = torch.tensor([17, 324, 907, 2**62 + 5]).to(dtype)
    offset = torch.tensor([0, 128, 512, 1024]).to(dtype)
    out, acc, emit = chain_speculative_sampling(draft, ids, target, seed=seed, offset=offset)
    assert (emit == 1).all() and len({tuple(r) for r in out.tolist()}) > 1
    as64 = lambda t, rows: t.view(torch.int64)[rows].view(dtype)  # noqa: E731  (no uint64 indexing)
    for rows in ([3, 1, 0, 2], [3, 1], [2]):
        got = chain_speculative_sampling(draft[rows], ids[rows], target[rows], seed=as64(seed, rows),
                                         offset=as64(offset, rows))
        for a, b in zip(got, (out, acc, emit)):
            assert torch.equal(a, b[rows])
    rows = [2, 2, 2, 2]
    got = chain_speculative_sampling(draft[rows], ids[rows], target[rows], seed=as64(seed, rows),
                                     offset=as64(offset, rows))
    assert all(torch.equal(got[0][i], out[2]) for i in range(4))


def test_one_seed_for_the_batch():
    """An int seed and offset, or length-1 tensors, are one seed for the batch: the same tokens
    either way, rows decorrelated (identical rows draw different numbers); a per-row offset with a
    length-1 seed keys each row by its own offset."""
    draft, ids, target = _per_row_case(B=16)
    a = chain_speculative_sampling(draft, ids, target, seed=99, offset=7)
    b = chain_speculative_sampling(draft, ids, target, seed=torch.tensor([99]), offset=torch.tensor([7]))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({tuple(r) for r in a[0].tolist()}) > 1  # the 16 identical rows differ
    offs = torch.arange(16, dtype=torch.int64) * 100
    c = chain_speculative_sampling(draft, ids, target, seed=torch.tensor([99]), offset=offs)
    d = chain_speculative_sampling(draft[5:6], ids[5:6], target[5:6], seed=torch.tensor([99]), offset=offs[5:6])
    assert torch.equal(c[0][5], d[0][0])


def test_generator_and_default_seeding():
    draft, ids, target = _per_row_case(B=8)
    a = chain_speculative_sampling(draft, ids, target, generator=torch.Generator().manual_seed(5))
    b = chain_speculative_sampling(draft, ids, target, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0])
    torch.manual_seed(6)
    c = chain_speculative_sampling(draft, ids, target)
    torch.manual_seed(6)
    d = chain_speculative_sampling(draft, ids, target, seed=None, offset=3)  # one None: both drawn
    assert torch.equal(c[0], d[0])


def test_bad_arguments_raise():
    draft, ids, target = _per_row_case(B=4)
    seeds = torch.arange(4)
    cases = [
        (dict(seed=1, offset=seeds), ValueError, "both be tensors or both be ints"),
        (dict(seed=seeds, offset=torch.arange(3)), ValueError, "offset tensor must be 1-D of length 1 or 4"),
        (dict(seed=seeds.int(), offset=seeds), ValueError, "seed tensor must be int64 or uint64"),
        (dict(seed=seeds[None], offset=seeds), ValueError, "seed tensor must be 1-D"),
        (dict(seed=seeds.to("meta"), offset=seeds), ValueError, "seed tensor must be on cpu"),
        (dict(seed=1.5, offset=0), TypeError, "seed and offset must be ints"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            chain_speculative_sampling(draft, ids, target, **kw)
    with pytest.raises(ValueError, match="target_probs"):
        chain_speculative_sampling(draft, ids, target[:, :3], seed=1, offset=0)
    with pytest.raises(TypeError, match="draft_token_ids must be int"):
        chain_speculative_sampling(draft, ids.float(), target, seed=1, offset=0)
