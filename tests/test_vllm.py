"""specdec's samplers against the real vLLM 0.33 package (``make test-vllm``: its own venv).

Skipped where vllm is not installed (the main venv). vLLM's metadata, batches and samplers are
the real classes, called the way vLLM's model runners call them; where vLLM's own rejection
sampler runs on the CPU (its Triton kernels through Triton's interpreter), outputs are compared
with it directly.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm", reason="vllm is not installed here: `make test-vllm` runs these in .venv-vllm")

if not torch.cuda.is_available():
    # vLLM turns Triton off when no GPU driver is active, except where CUDA_VISIBLE_DEVICES is set
    # and empty (its distributed start-up case); with TRITON_INTERPRET=1 (conftest) its kernels then
    # run on CPU tensors. Must be set before vLLM's triton_utils is imported.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
from vllm.v1.sample.logits_processor import LogitsProcessors  # noqa: E402
from vllm.v1.sample.metadata import SamplingMetadata  # noqa: E402
from vllm.v1.sample.rejection_sampler import RejectionSampler as VllmRejectionSampler  # noqa: E402
from vllm.v1.sample.sampler import Sampler  # noqa: E402
from vllm.v1.spec_decode.metadata import SpecDecodeMetadata  # noqa: E402

from specdec.integrations import vllm_plugin  # noqa: E402
from specdec.integrations.vllm import MAX_SPEC_LEN, RejectionSampler  # noqa: E402
from stats import ALPHA, biased, chi2_pvalue  # noqa: E402

DEV = torch.device("cpu")
if not torch.cuda.is_available():
    # vLLM on a host without a GPU ("UnspecifiedPlatform"): no pinned memory, and a nominal
    # compute-unit count for the grid sizes of its Triton top-k/top-p kernel
    import vllm.utils.platform_utils as _platform_utils  # noqa: E402
    import vllm.utils.torch_utils as _torch_utils  # noqa: E402
    from vllm.platforms import current_platform  # noqa: E402

    current_platform.is_pin_memory_available = lambda: False
    current_platform.num_compute_units = lambda device_id=0: 2
    current_platform.device_type = "cpu"  # Model Runner V2's buffers are allocated on it
    _platform_utils.is_pin_memory_available.cache_clear()
    _platform_utils.num_compute_units.cache_clear()
    import vllm.v1.sample.ops.penalties as _penalties  # noqa: E402
    import vllm.v1.sample.ops.topk_topp_sampler as _topk_topp  # noqa: E402

    _torch_utils.PIN_MEMORY = _penalties.PIN_MEMORY = False
    _topk_topp.HAS_TRITON = False  # vLLM's PyTorch top-k/top-p, as on its CPU platform


def spec_metadata(drafts: list) -> SpecDecodeMetadata:
    """vLLM's SpecDecodeMetadata with the logits layout of gpu_model_runner's
    _calc_spec_decode_metadata: per request its draft positions, then its bonus position."""
    md = SpecDecodeMetadata.make_dummy(drafts, DEV)
    counts = np.array([len(d) for d in drafts])
    cu_sampled = np.cumsum(counts + 1)
    starts = cu_sampled - (counts + 1)
    md.target_logits_indices = torch.from_numpy(
        np.concatenate([s + np.arange(n) for s, n in zip(starts, counts)]).astype(np.int32))
    md.bonus_logits_indices = torch.from_numpy((cu_sampled - 1).astype(np.int32))
    md.logits_indices = torch.arange(int(cu_sampled[-1]), dtype=torch.int32)
    return md


def sampling_metadata(B: int, V: int, temperature=None, *, top_k=None, top_p=None, generators=None,
                      max_num_logprobs=None, allowed_token_ids_mask=None, penalties=None,
                      output_token_ids=None, spec_token_ids=None) -> SamplingMetadata:
    """vLLM's SamplingMetadata as gpu_input_batch builds it: temperature None = all greedy,
    0 marks a greedy row among random ones."""
    all_greedy = temperature is None
    all_random = not all_greedy and bool((temperature != 0).all())
    freq, pres, rep = penalties if penalties is not None else (torch.zeros(B), torch.zeros(B), torch.ones(B))
    return SamplingMetadata(
        temperature=temperature, all_greedy=all_greedy, all_random=all_random, top_p=top_p, top_k=top_k,
        generators=generators or {}, max_num_logprobs=max_num_logprobs, no_penalties=penalties is None,
        prompt_token_ids=torch.zeros(B, 1, dtype=torch.int64) if penalties is not None else None,
        frequency_penalties=freq, presence_penalties=pres, repetition_penalties=rep,
        output_token_ids=output_token_ids if output_token_ids is not None else [[] for _ in range(B)],
        allowed_token_ids_mask=allowed_token_ids_mask, bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
        spec_token_ids=spec_token_ids)


def argmax_walk(logits: torch.Tensor, md: SpecDecodeMetadata, drafts: list) -> list:
    """The greedy answer: accept drafts while they equal the target argmax, then the argmax."""
    out = []
    best = logits.argmax(-1)
    t = md.target_logits_indices.tolist()
    bonus = md.bonus_logits_indices.tolist()
    k = 0
    for b, row in enumerate(drafts):
        emitted = []
        for j, d in enumerate(row):
            emitted.append(int(best[t[k + j]]))
            if d != emitted[-1]:
                break
        else:
            emitted.append(int(best[bonus[b]]))
        k += len(row)
        out.append(emitted)
    return out


def both(md, draft_probs, logits, sm):
    """specdec's and vLLM's samplers on the same inputs (vLLM's on fresh copies: it may write in place)."""
    ours = RejectionSampler(Sampler())(md, draft_probs, logits.clone(), sm)
    theirs = VllmRejectionSampler(Sampler())(md, draft_probs, logits.clone(), sm)
    return ours, theirs


def test_greedy_output_format_and_argmax_walk():
    torch.manual_seed(0)
    V = 50
    logits = torch.randn(6 + 4, V)
    drafts = [[0, 0, 0], [], [0, 0], [0]]
    md = spec_metadata(drafts)
    best = logits.argmax(-1)
    t = md.target_logits_indices
    # request 0: two accepted, the third rejected; request 2: all accepted (bonus); request 3: rejected
    drafts[0] = [int(best[t[0]]), int(best[t[1]]), (int(best[t[2]]) + 1) % V]
    drafts[2] = [int(best[t[3]]), int(best[t[4]])]
    drafts[3] = [(int(best[t[5]]) + 3) % V]
    md = spec_metadata(drafts)
    ours, theirs = both(md, None, logits, sampling_metadata(4, V))
    out = ours.sampled_token_ids
    assert out.dtype == torch.int32 and out.shape == (4, md.max_spec_len + 1) and ours.logprobs_tensors is None
    expected = argmax_walk(logits, md, drafts)
    assert [len(e) for e in expected] == [3, 1, 3, 1]
    for row, e in zip(out.tolist(), expected):
        assert row == e + [-1] * (4 - len(e))
    assert torch.equal(out, theirs.sampled_token_ids)
    tokens, lp = RejectionSampler.parse_output(out, V)
    assert tokens == expected and lp is None
    tokens, _ = RejectionSampler.parse_output(out, V, discard_req_indices=[1])
    assert tokens == [expected[0], [], expected[2], expected[3]]


def test_greedy_equals_vllm_random_batches():
    gen = torch.Generator().manual_seed(1)
    V = 12  # small vocabulary: drafts hit the argmax often
    for trial in range(6):
        counts = torch.randint(0, 5, (5,), generator=gen).tolist()
        counts[0] = max(counts[0], 1)
        drafts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in counts]
        md = spec_metadata(drafts)
        logits = torch.randn(sum(counts) + 5, V, generator=gen)
        # half the drafts copied from the argmax so that acceptance runs are long
        best = logits.argmax(-1)
        flat = [d for row in drafts for d in row]
        t = md.target_logits_indices.tolist()
        for i in range(0, len(flat), 2):
            flat[i] = int(best[t[i]])
        it = iter(flat)
        drafts = [[next(it) for _ in row] for row in drafts]
        md = spec_metadata(drafts)
        ours, theirs = both(md, None, logits, sampling_metadata(5, V))
        assert torch.equal(ours.sampled_token_ids, theirs.sampled_token_ids), trial
        assert RejectionSampler.parse_output(ours.sampled_token_ids, V)[0] == argmax_walk(logits, md, drafts)


def test_mixed_greedy_rows_and_allowed_token_ids_mask_equal_vllm():
    """vLLM's processors reach the draft positions: a mask that forbids each row's argmax changes
    the greedy answer, and specdec's greedy rows still equal vLLM's."""
    torch.manual_seed(2)
    V, B = 20, 3
    drafts = [[1, 2], [3], [4, 5, 6]]
    md = spec_metadata(drafts)
    logits = torch.randn(6 + B, V)
    mask = torch.zeros(B, V, dtype=torch.bool)
    mask[:, :5] = True  # True = not allowed (vLLM's convention)
    sm = sampling_metadata(B, V, allowed_token_ids_mask=mask)
    ours, theirs = both(md, None, logits, sm)
    assert torch.equal(ours.sampled_token_ids, theirs.sampled_token_ids)
    assert (ours.sampled_token_ids[:, 0] >= 5).all()
    # a random row among greedy ones: the greedy rows stay identical to vLLM's
    sm = sampling_metadata(B, V, torch.tensor([0.0, 0.8, 0.0]))
    ours, theirs = both(md, None, logits, sm)
    for b in (0, 2):
        assert torch.equal(ours.sampled_token_ids[b], theirs.sampled_token_ids[b])


def test_penalties_applied_at_draft_positions_like_vllm():
    torch.manual_seed(3)
    V, B = 16, 2
    drafts = [[1, 2, 3], [4]]
    md = spec_metadata(drafts)
    logits = torch.randn(4 + B, V)
    rep = torch.tensor([3.0, 2.0])
    sm = sampling_metadata(B, V, penalties=(torch.full((B,), 1.5), torch.full((B,), 2.0), rep),
                           output_token_ids=[[int(logits[0].argmax()), 7], [int(logits[4].argmax())]],
                           spec_token_ids=drafts)
    ours, theirs = both(md, None, logits, sm)
    assert torch.equal(ours.sampled_token_ids, theirs.sampled_token_ids)
    assert ours.sampled_token_ids[0, 0] != logits[0].argmax()  # the penalty moved the argmax


def _target_probs(logits: torch.Tensor, temperature: float, top_k: int = 0) -> torch.Tensor:
    z = logits.double() / temperature
    if top_k:
        kth = z.topk(top_k).values[-1]
        z = z.masked_fill(z < kth, float("-inf"))
    return torch.softmax(z, -1)


@pytest.mark.parametrize("with_probs", [False, True])
def test_sampled_tokens_follow_the_target(with_probs):
    """Many copies of one request in one batch: the first emitted token follows p_0, and the
    token after an accepted first draft follows p_1 (chi-square, and a 1% bias must fail)."""
    V, K, B = 12, 2, 30000
    gen = torch.Generator().manual_seed(4)
    row_logits = torch.randn(K + 1, V, generator=gen) * 1.5
    temperature, top_k = 0.8, 9
    p = [_target_probs(row_logits[j], temperature, top_k) for j in range(K)]
    first = int(p[0].argmax())
    draft_probs = None
    if with_probs:  # drafts sampled from a draft distribution, as the proof assumes
        draft_dist = torch.softmax(torch.randn(K, V, generator=gen), -1)
        sampled = torch.stack([torch.multinomial(draft_dist[j], B, True, generator=gen) for j in range(K)], 1)
        drafts = sampled.tolist()
        draft_probs = draft_dist.repeat(B, 1)
    else:  # a deterministic drafter proposing the likeliest token
        drafts = [[first, 3]] * B
    md = spec_metadata(drafts)
    logits = row_logits.repeat(B, 1)
    sm = sampling_metadata(B, V, torch.full((B,), temperature), top_k=torch.full((B,), top_k, dtype=torch.int32))
    torch.manual_seed(5)
    out = RejectionSampler(Sampler())(md, draft_probs, logits, sm).sampled_token_ids
    assert out.dtype == torch.int32 and out.shape == (B, K + 1)
    n_emitted = (out != -1).sum(1)
    assert ((n_emitted >= 1) & (n_emitted <= K + 1)).all()
    # no gaps: -1 only after the emitted tokens
    assert torch.equal(out != -1, torch.arange(K + 1)[None] < n_emitted[:, None])
    t0 = out[:, 0].long()
    assert chi2_pvalue(t0, p[0]) > ALPHA
    assert chi2_pvalue(t0, biased(p[0])) < ALPHA
    accepted = out[:, 0] == md.draft_token_ids.view(B, K)[:, 0]
    t1 = out[accepted, 1].long()
    assert len(t1) > 1000 and chi2_pvalue(t1, p[1]) > ALPHA


def test_seeded_requests_reproducible_whatever_the_batch():
    V = 30
    torch.manual_seed(6)
    req_logits = torch.randn(4, V)  # one request: 3 drafts + bonus
    req_drafts = [int(req_logits[0].argmax()), 5, 6]

    def run(slot: int, others: int):
        drafts, rows = [], []
        for b in range(others + 1):
            if b == slot:
                drafts.append(req_drafts)
                rows.append(req_logits)
            else:
                drafts.append([1, 2])
                rows.append(torch.randn(3, V))
        md = spec_metadata(drafts)
        B = len(drafts)
        sm = sampling_metadata(B, V, torch.ones(B), generators={slot: torch.Generator().manual_seed(1234)})
        out = RejectionSampler(Sampler())(md, None, torch.cat(rows), sm).sampled_token_ids
        return out[slot].tolist()

    a = run(0, 0)
    assert a == run(0, 0) == run(2, 3) == run(1, 4)
    results = set()
    for seed in range(8):  # different seeds: not a constant answer
        md = spec_metadata([req_drafts])
        sm = sampling_metadata(1, V, torch.ones(1), generators={0: torch.Generator().manual_seed(seed)})
        results.add(tuple(RejectionSampler(Sampler())(md, None, req_logits.clone(), sm).sampled_token_ids[0].tolist()))
    assert len(results) > 1


def test_logprobs_equal_vllm_for_greedy():
    torch.manual_seed(7)
    V = 25
    drafts = [[1, 2, 3], [4], []]
    md = spec_metadata(drafts)
    logits = torch.randn(4 + 3, V)
    for k in (0, 3):
        ours, theirs = both(md, None, logits, sampling_metadata(3, V, max_num_logprobs=k))
        assert torch.equal(ours.sampled_token_ids, theirs.sampled_token_ids)
        lo, lt = ours.logprobs_tensors, theirs.logprobs_tensors
        assert lo.logprobs.shape == (3 * 4, k + 1)
        assert torch.equal(lo.logprob_token_ids, lt.logprob_token_ids)
        torch.testing.assert_close(lo.logprobs, lt.logprobs)
        assert torch.equal(lo.selected_token_ranks, lt.selected_token_ranks)
        tokens, lists = RejectionSampler.parse_output(ours.sampled_token_ids, V, logprobs_tensors=lo)
        tokens_v, lists_v = VllmRejectionSampler.parse_output(theirs.sampled_token_ids, V, logprobs_tensors=lt)
        assert tokens == tokens_v and lists.logprob_token_ids.tolist() == lists_v.logprob_token_ids.tolist()


def test_logprobs_processed_mode_runs():
    torch.manual_seed(8)
    V = 25
    md = spec_metadata([[1, 2], [3]])
    logits = torch.randn(3 + 2, V)
    sm = sampling_metadata(2, V, torch.tensor([0.7, 1.3]), top_p=torch.tensor([0.9, 1.0]), max_num_logprobs=2)
    out = RejectionSampler(Sampler(logprobs_mode="processed_logprobs"))(md, None, logits, sm)
    lp = out.logprobs_tensors
    assert lp.logprobs.shape == (2 * 3, 3) and lp.selected_token_ranks.shape == (6,)
    valid = (out.sampled_token_ids != -1).flatten()
    assert torch.isfinite(lp.logprobs[valid, 0]).all() and (lp.logprobs[valid] <= 0).all()


def test_limits_and_unsupported_methods():
    V = 8
    md = spec_metadata([[1] * (MAX_SPEC_LEN + 1)])
    with pytest.raises(ValueError, match="MAX_SPEC_LEN"):
        RejectionSampler(Sampler())(md, None, torch.randn(MAX_SPEC_LEN + 2, V), sampling_metadata(1, V))
    md = spec_metadata([[1, 2]])
    with pytest.raises(ValueError, match="logits must be"):
        RejectionSampler(Sampler())(md, None, torch.randn(2, V), sampling_metadata(1, V))

    class Fly:
        rejection_sample_method = "fly"

    with pytest.raises(NotImplementedError, match="fly"):
        RejectionSampler(Sampler(), Fly())


def test_version_check():
    vllm_plugin.check_version("0.33.0")
    vllm_plugin.check_version("0.33.2+cu130")
    for bad in ("0.34.0", "0.32.1", "1.0", "dev"):
        with pytest.raises(RuntimeError, match=r"vllm>=0\.33\.0,<0\.34"):
            vllm_plugin.check_version(bad)


_PLUGIN_PROBE = textwrap.dedent("""
    import os, sys
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import vllm.plugins
    from vllm.v1.worker.gpu.model_states.interface import ModelState
    vllm.plugins.load_general_plugins()
    import vllm.v1.sample.rejection_sampler as v1
    import vllm.v1.worker.gpu_model_runner as runner
    print("V1", v1.RejectionSampler.__module__, runner.RejectionSampler.__module__)
    print("V2", getattr(ModelState.custom_sampler, "_specdec", False))
""")


@pytest.mark.parametrize("switch", ["1", ""])
def test_plugin_registration_through_load_general_plugins(switch):
    env = dict(os.environ, SPECDEC_VLLM_SAMPLER=switch)
    run = subprocess.run([sys.executable, "-c", _PLUGIN_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith(("V1", "V2"))]
    if switch:
        assert lines == ["V1 specdec.integrations.vllm specdec.integrations.vllm", "V2 True"]
    else:
        mod = "vllm.v1.sample.rejection_sampler"
        assert lines == [f"V1 {mod} {mod}", "V2 False"]


def test_v2_custom_sampler_hook_builds_specdec_sampler():
    from vllm.v1.worker.gpu.model_states.interface import ModelState

    from specdec.integrations.vllm import ModelRunnerV2RejectionSampler

    vllm_plugin.install()
    vllm_plugin.install()  # idempotent

    class Spec:
        rejection_sample_method = "standard"
        num_speculative_tokens = 3
        enable_adaptive_verification = False

    class Config:
        speculative_config = Spec()
        watermark_config = None

    class State:  # what the hook reads from a ModelState
        vllm_config = Config()
        device = DEV

    sampler = object()
    got_sampler, rejection = ModelState.custom_sampler(State(), sampler)
    assert got_sampler is sampler and isinstance(rejection, ModelRunnerV2RejectionSampler)
    assert rejection.num_speculative_steps == 3
    Config.speculative_config = None
    assert ModelState.custom_sampler(State(), sampler) is None


# --- Model Runner V2 ---------------------------------------------------------------------------

from types import SimpleNamespace  # noqa: E402

from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.worker.gpu.input_batch import InputBatch  # noqa: E402
from vllm.v1.worker.gpu.sample.sampler import Sampler as V2Sampler  # noqa: E402
from vllm.v1.worker.gpu.spec_decode.rejection_sampler import RejectionSampler as VllmV2RejectionSampler  # noqa: E402
from vllm.v1.worker.gpu.states import RequestState  # noqa: E402

from specdec.integrations.vllm import ModelRunnerV2RejectionSampler  # noqa: E402


def v2_spec_config(K: int):
    return SimpleNamespace(num_speculative_tokens=K, enable_adaptive_verification=False,
                           rejection_sample_method="standard", fly_entropy_threshold=0.3, fly_entropy_top_k=3,
                           fly_window_size=None, synthetic_acceptance_rates=None)


class V2Step:
    """One decode step of Model Runner V2 with drafts: V2's real RequestState, Sampler (as the
    runner builds them) and InputBatch. Request i: prompt of `prompt_len` tokens, `generated`
    tokens so far, its last sampled token then its drafts as the step's input."""

    def __init__(self, V: int, K: int, params: list, drafts: list, *, prompt_len: int = 5, generated=None,
                 chunked_prefill=()):
        B = len(params)
        self.V, self.K = V, K
        self.req_states = RequestState(max_num_reqs=B, max_model_len=64, max_num_batched_tokens=B * (K + 1),
                                       num_speculative_steps=K, vocab_size=V, device=DEV)
        self.sampler = V2Sampler(SimpleNamespace(reasoning_config=None), B, V, DEV, self.req_states,
                                 num_speculative_tokens=K + 1)
        generated = generated or [3] * B
        idx, ids, positions, seq_lens, local = [], [], [], [], []
        for i, (sp, d) in enumerate(zip(params, drafts)):
            prefill = prompt_len + (40 if i in chunked_prefill else 0)  # still prefilling: seq_len < prefill_len
            self.req_states.add_request(f"r{i}", prompt_len, list(range(prefill)), prompt_len, 20)
            r = self.req_states.req_id_to_index[f"r{i}"]
            self.sampler.add_request(r, sp)
            idx.append(r)
            start = prompt_len + generated[i]
            ids += [7] + list(d)
            positions += list(range(start, start + len(d) + 1))
            seq_lens.append(start + len(d) + 1)
            local += list(range(len(d) + 1))
        self.req_states.apply_staged_writes()
        self.sampler.apply_staged_writes()
        counts = np.array([len(d) + 1 for d in drafts], dtype=np.int32)
        cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        n = int(cu[-1])
        idx_t = torch.tensor(idx, dtype=torch.int64)
        self.batch = InputBatch(
            req_ids=[f"r{i}" for i in range(B)], num_reqs=B, num_reqs_after_padding=B,
            idx_mapping=idx_t, idx_mapping_np=np.array(idx, dtype=np.intp),
            expanded_idx_mapping=idx_t.repeat_interleave(torch.from_numpy(counts).long()),
            expanded_local_pos=torch.tensor(local, dtype=torch.int32),
            num_scheduled_tokens=counts, num_tokens=n, num_tokens_after_padding=n,
            num_draft_tokens=n - B, num_draft_tokens_per_req=counts - 1,
            query_start_loc=torch.from_numpy(cu.copy()), query_start_loc_np=cu,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), seq_lens_cpu_upper_bound=torch.tensor(seq_lens),
            dcp_local_seq_lens=None, num_computed_tokens_np=np.array(seq_lens) - counts,
            prefill_len_np=self.req_states.prefill_len.np[idx], num_computed_prefill_tokens_np=np.zeros(B, np.int32),
            is_prefilling_np=np.zeros(B, bool), has_prefill=False, decode_graph_eligible=False,
            input_ids=torch.tensor(ids, dtype=torch.int32), positions=torch.tensor(positions, dtype=torch.int64),
            is_padding=torch.zeros(n, dtype=torch.bool), logits_indices=torch.arange(n, dtype=torch.int64),
            cu_num_logits=torch.from_numpy(cu.copy()), cu_num_logits_np=cu,
            has_structured_output_reqs=False, prompt_lens=None)

    def run(self, cls, logits, draft_logits=None, invalid_drafts=None):
        rejection = cls(self.sampler, v2_spec_config(self.K), DEV)
        return rejection(logits.clone(), self.batch, draft_logits, invalid_drafts)  # as model_runner.py calls it


def test_v2_greedy_output_format_and_argmax_walk():
    torch.manual_seed(10)
    V, K = 40, 3
    drafts = [[0, 0, 0], [0], [0, 0, 0], []]
    counts = [len(d) + 1 for d in drafts]
    logits = torch.randn(sum(counts), V)
    best = logits.argmax(-1).tolist()
    starts = np.cumsum([0] + counts[:-1])
    drafts[0] = [best[starts[0]], best[starts[0] + 1], (best[starts[0] + 2] + 1) % V]  # 2 accepted
    drafts[1] = [best[starts[1]]]                                                       # all + bonus
    drafts[2] = [(best[starts[2]] + 5) % V, 1, 2]                                       # rejected at once
    params = [SamplingParams(temperature=0.0)] * 4
    step = V2Step(V, K, params, drafts)
    out = step.run(ModelRunnerV2RejectionSampler, logits)
    expected = [best[starts[0]:starts[0] + 3], best[starts[1]:starts[1] + 2], best[starts[2]:starts[2] + 1],
                best[starts[3]:starts[3] + 1]]
    assert out.sampled_token_ids.shape == (4, K + 1) and out.sampled_token_ids.dtype == torch.int64
    assert out.num_sampled.dtype == torch.int32 and out.num_sampled.tolist() == [len(e) for e in expected]
    assert out.num_rejected.tolist() == [c - len(e) for c, e in zip(counts, expected)]
    for row, e in zip(out.sampled_token_ids.tolist(), expected):
        assert row[:len(e)] == e and all(t == -1 for t in row[len(e):])
    assert out.logprobs_tensors is None
    theirs = step.run(VllmV2RejectionSampler, logits)
    for b, e in enumerate(expected):
        assert theirs.sampled_token_ids[b, :len(e)].tolist() == e
    assert torch.equal(out.num_sampled, theirs.num_sampled) and torch.equal(out.num_rejected, theirs.num_rejected)


def test_v2_chunked_prefill_and_invalid_drafts():
    torch.manual_seed(11)
    V, K = 30, 2
    logits = torch.randn(3 + 3, V)
    best = logits.argmax(-1).tolist()
    drafts = [[best[0], best[1]], [best[3], best[4]]]
    step = V2Step(V, K, [SamplingParams(temperature=0.0)] * 2, drafts, chunked_prefill=(1,))
    invalid = torch.zeros(6, dtype=torch.bool)
    invalid[2] = True  # request 0's second draft (logit row 2 holds it): rejected, argmax emitted
    out = step.run(ModelRunnerV2RejectionSampler, logits, invalid_drafts=invalid)
    assert out.num_sampled.tolist() == [2, 0]  # request 1 is still prefilling: emits nothing
    assert out.sampled_token_ids[0, :2].tolist() == [best[0], best[1]]


@pytest.mark.parametrize("with_draft_logits", [False, True])
def test_v2_sampled_tokens_follow_the_target(with_draft_logits):
    V, K, B = 10, 2, 3000
    gen = torch.Generator().manual_seed(12)
    row_logits = torch.randn(K + 1, V, generator=gen) * 1.5
    temperature, top_k = 0.7, 8
    p0 = _target_probs(row_logits[0], temperature, top_k)
    draft_logits = None
    if with_draft_logits:
        draft_row = torch.randn(K, V, generator=gen)
        q = torch.softmax(draft_row / temperature, -1)
        drafts = torch.stack([torch.multinomial(q[j], B, True, generator=gen) for j in range(K)], 1).tolist()
        draft_logits = draft_row.repeat(B, 1, 1)  # [max_num_reqs, K, V], before temperature
    else:
        drafts = [[int(p0.argmax()), 1]] * B
    params = [SamplingParams(temperature=temperature, top_k=top_k, seed=i) for i in range(B)]
    step = V2Step(V, K, params, drafts)
    out = step.run(ModelRunnerV2RejectionSampler, row_logits.repeat(B, 1), draft_logits)
    assert ((out.num_sampled >= 1) & (out.num_sampled <= K + 1)).all()
    t0 = out.sampled_token_ids[:, 0]
    assert chi2_pvalue(t0, p0) > ALPHA
    assert chi2_pvalue(t0, biased(p0, 0.02)) < ALPHA


def test_v2_seeded_by_request_seed_and_position():
    V, K = 30, 3
    torch.manual_seed(13)
    req_logits = torch.randn(K + 1, V)
    req_drafts = [int(req_logits[0].argmax()), 4, 5]

    def run(slot, others, seed=99):
        params, drafts, rows = [], [], []
        for b in range(others + 1):
            params.append(SamplingParams(temperature=1.0, seed=seed if b == slot else 1000 + b))
            drafts.append(req_drafts if b == slot else [1, 2, 3])
            rows.append(req_logits if b == slot else torch.randn(K + 1, V))
        out = V2Step(V, K, params, drafts).run(ModelRunnerV2RejectionSampler, torch.cat(rows))
        n = int(out.num_sampled[slot])
        return out.sampled_token_ids[slot, :n].tolist()

    a = run(0, 0)
    assert a == run(2, 3) == run(1, 2)
    assert len({tuple(run(0, 0, seed)) for seed in range(8)}) > 1
