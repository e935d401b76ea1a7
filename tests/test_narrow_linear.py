"""specdec.linear: the C++ narrow linear kernel against a float64 reference, its fallbacks, and the
context manager that routes a model's linears through it (also inside SpeculativeGenerator)."""
import pytest
import torch
import torch.nn.functional as F

from specdec.linear import NARROW_MAX_ROWS, narrow_linear, narrow_linear_available, narrow_linears

pytestmark = pytest.mark.skipif(not narrow_linear_available(), reason="specdec._C not built")


def _op(*args):
    return torch.ops.specdec_cpp.narrow_linear(*args)


def _ref(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 32])
@pytest.mark.parametrize("K", [1, 7, 8, 15, 16, 17, 40, 576])
def test_matches_float64_reference(M, K):
    g = torch.Generator().manual_seed(M * 1000 + K)
    N = 37  # odd: no row blocking assumption
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g)
    for bias in (None, b):
        y = _op(x, w, bias)
        assert y.shape == (M, N) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), _ref(x, w, bias), rtol=1e-5, atol=1e-4 * K ** 0.5)


def test_leading_dims_noncontiguous_and_threads():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 130, 2, generator=g).transpose(1, 2)[:, :, ::2]  # [3, 2, 65], not contiguous
    w = torch.randn(5000, 65, generator=g)  # 5000 rows: several parallel chunks
    w_nc = torch.randn(65, 5000, generator=g).t()  # [5000, 65], a transposed view
    for weight in (w, w_nc):
        y = _op(x, weight, None)
        assert y.shape == (3, 2, 5000)
        torch.testing.assert_close(y.double(), _ref(x, weight, None), rtol=1e-5, atol=1e-4)
    threads = torch.get_num_threads()
    try:  # the row split over threads must not change a single value
        torch.set_num_threads(1)
        one = _op(x, w, None)
        torch.set_num_threads(2)
        assert torch.equal(_op(x, w, None), one)
    finally:
        torch.set_num_threads(threads)


def test_empty_and_degenerate_shapes():
    assert _op(torch.randn(0, 5), torch.randn(4, 5), None).shape == (0, 4)
    assert _op(torch.randn(3, 5), torch.randn(0, 5), None).shape == (3, 0)
    b = torch.randn(4)
    torch.testing.assert_close(_op(torch.randn(2, 0), torch.randn(4, 0), b), b.expand(2, 4))


@pytest.mark.parametrize("args, match", [
    ((torch.randn(2, 5), torch.randn(4, 6), None), "last dimension"),
    ((torch.randn(2, 5).double(), torch.randn(4, 5), None), "float32"),
    ((torch.randn(2, 5), torch.randn(4, 5).half(), None), "float32"),
    ((torch.randn(2, 5), torch.randn(4, 5, 1), None), r"\[N, K\]"),
    ((torch.randn(2, 5), torch.randn(4, 5), torch.randn(5)), "bias"),
    ((torch.randn(2, 5), torch.randn(4, 5), torch.randn(4).double()), "bias"),
    ((torch.randn(()), torch.randn(4, 5), None), "dimension"),
])
def test_bad_input_raises(args, match):
    with pytest.raises(RuntimeError, match=match):
        _op(*args)


def test_fake_tensor_and_opcheck():
    x, w, b = torch.randn(2, 3, 8), torch.randn(5, 8), torch.randn(5)
    torch.library.opcheck(torch.ops.specdec_cpp.narrow_linear.default, (x, w, b),
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        y = torch.ops.specdec_cpp.narrow_linear(mode.from_tensor(x), mode.from_tensor(w), None)
    assert y.shape == (2, 3, 5)


def test_python_wrapper_routes_and_falls_back(monkeypatch):
    calls = []
    real = torch.ops.specdec_cpp.narrow_linear

    class Spy:
        def __call__(self, *a):
            calls.append(a[0].shape)
            return real(*a)

    import specdec.linear as L

    monkeypatch.setattr(L.torch.ops.specdec_cpp, "narrow_linear", Spy(), raising=False)
    w, b = torch.randn(9, 16), torch.randn(9)
    cases = [
        (torch.randn(1, NARROW_MAX_ROWS, 16), True),      # at the row limit: kernel
        (torch.randn(NARROW_MAX_ROWS + 1, 16), False),    # one more row: sgemm
        (torch.randn(3, 16).double(), False),             # other dtype
        (torch.randn(3, 16, requires_grad=True), False),  # autograd
    ]
    for x, kernel in cases:
        calls.clear()
        wx = w.double() if x.dtype == torch.float64 else w
        bx = b.double() if x.dtype == torch.float64 else b
        y = narrow_linear(x, wx, bx)
        assert bool(calls) == kernel, x.shape
        torch.testing.assert_close(y.double(), _ref(x.detach(), wx, bx), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):  # F.linear's own error on a shape mismatch, never a crash
        narrow_linear(torch.randn(20, 5), w)


class _Int8Like(torch.nn.Linear):
    """A Linear subclass (as bitsandbytes' layers are): must be left alone."""


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), _Int8Like(16, 16),
                               torch.nn.Linear(16, 4, bias=False))


def test_context_manager_patches_plain_linears_and_restores():
    m = _model()
    x = torch.randn(3, 8)
    with torch.inference_mode():
        want = m(x)
        with narrow_linears(m, m) as n:  # a model named twice is patched once
            assert n == 2
            assert "forward" in m[0].__dict__ and "forward" not in m[2].__dict__
            got = m(x)
        assert all("forward" not in mod.__dict__ for mod in m.modules())
        torch.testing.assert_close(got, want)
        with pytest.raises(ZeroDivisionError):  # restored after an exception too
            with narrow_linears(m):
                1 / 0
        assert all("forward" not in mod.__dict__ for mod in m.modules())
        with narrow_linears(m.double()) as n:  # float64 weights: nothing to route
            assert n == 0
        with narrow_linears(None) as n:
            assert n == 0


def test_patched_layer_routes_like_the_function(monkeypatch):
    """The patched forward has its own cheap checks: the same cases as narrow_linear, through a layer."""
    calls = []
    real = torch.ops.specdec_cpp.narrow_linear
    monkeypatch.setattr(torch.ops.specdec_cpp, "narrow_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(1)
    lin = torch.nn.Linear(16, 9)
    w, b = lin.weight.detach(), lin.bias.detach()
    with narrow_linears(lin):
        for x, grad, kernel in [
            (torch.randn(1, NARROW_MAX_ROWS, 16), False, True),   # at the row limit: kernel
            (torch.randn(NARROW_MAX_ROWS + 1, 16), False, False),  # one more row: sgemm
            (torch.randn(0, 16), False, False),                    # no rows
            (torch.randn(3, 16), True, False),                     # autograd on (the weight requires grad)
        ]:
            calls.clear()
            with torch.set_grad_enabled(grad):
                y = lin(x)
            assert bool(calls) == kernel, x.shape
            assert y.requires_grad == grad
            torch.testing.assert_close(y.detach().double(), _ref(x, w, b), rtol=1e-5, atol=1e-5)
        with torch.no_grad(), pytest.raises(RuntimeError):  # a wrong width: F.linear's error
            lin(torch.randn(2, 5))
        with torch.no_grad(), pytest.raises(RuntimeError):  # a float64 input on a float32 layer, as unpatched
            lin(torch.randn(2, 16, dtype=torch.float64))
        with torch.no_grad(), pytest.raises(RuntimeError):  # a 0-d input: F.linear's error too
            lin(torch.tensor(1.0))


def test_generator_uses_it_and_restores(monkeypatch):
    from _tiny_models import tiny_model

    from specdec import SpeculativeGenerator
    import specdec.linear as L

    model = tiny_model("llama")
    rows = []
    assert L.narrow_linear_available()
    real = torch.ops.specdec_cpp.narrow_linear

    def spy(x, *a, **k):  # counts the kernel's calls
        rows.append(x.numel() // x.shape[-1])
        return real(x, *a, **k)

    monkeypatch.setattr(torch.ops.specdec_cpp, "narrow_linear", spy)
    prompt = [[5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]]
    out = {}
    for on in (True, False):
        rows.clear()
        gen = SpeculativeGenerator(model, "ngram", narrow_linear=on)
        out[on] = gen.generate(prompt, max_new_tokens=12, temperature=0.0).sequences[0]
        assert bool(rows) == on
        assert all("forward" not in mod.__dict__ for mod in model.modules())
    assert out[True] == out[False]
