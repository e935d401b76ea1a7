"""Test configuration shared by every test file.

Triton's interpreter must be switched on before triton is first imported, so it happens here:
without a GPU the Triton kernels run on CPU tensors through the interpreter.
"""
import os
import sys
import warnings

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import specdec.ops  # noqa: E402

ALL_BACKENDS = ("reference", "cpp", "triton")


def backend_available(name: str) -> bool:
    ok, _ = specdec.ops.backends()[name]
    if name == "triton":
        return ok and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
    return ok


def triton_device() -> str:
    """For files of Triton-only tests: "cuda", or "cpu" under the interpreter; skips the calling
    module when triton is missing or was imported before the interpreter could be switched on."""
    pytest.importorskip("triton", reason="triton is not installed")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1 (triton was imported before it was set)",
                    allow_module_level=True)
    return dev


def device_for(backend: str) -> str:
    """Where a backend's inputs live: Triton on the GPU when there is one, else the CPU."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Every implementation of the ops; the ones that did not load are skipped with the reason."""
    name = request.param
    if not backend_available(name):
        pytest.skip(f"backend {name} unavailable: {specdec.ops.backends()[name][1]}")
    return name


@pytest.fixture(params=[b for b in ALL_BACKENDS if b != "triton"])
def fast_backend(request):
    """Backends fast enough on a CPU for large statistical runs (Triton's interpreter is not;
    it is held to the C++ backend token for token instead)."""
    name = request.param
    if not backend_available(name):
        pytest.skip(f"backend {name} unavailable: {specdec.ops.backends()[name][1]}")
    return name


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module: with tiny models, thread start-up and contention on a
    shared 2-core machine cost more than they give. Opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN_CODE = tuple(os.path.join(_ROOT, d) + os.sep for d in ("specdec", "kernels", "benchmarks"))
_SITE = os.sep + "site-packages" + os.sep


def _own_caller():
    """The first frame of specdec's own code (the package, its kernels, the benchmarks) on the
    stack of a warning being shown, if the warning was raised from a call it made; None if not."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_OWN_CODE) or (_SITE + "specdec" + os.sep) in name:
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return None


@pytest.fixture(autouse=True)
def no_deprecated_calls(monkeypatch):
    """Fail a test in which specdec's own code calls into transformers or torch in a way that
    raises a FutureWarning or DeprecationWarning: the day an upstream release deprecates what we
    call is the day the suite says so, not the day the call is removed. Warnings that third-party
    code raises on its own (no specdec frame on the stack) are left to pytest's summary."""
    seen = []
    show = warnings._showwarnmsg_impl  # pytest's per-test recorder (or the default printer)

    def check(msg):
        if issubclass(msg.category, (FutureWarning, DeprecationWarning)):
            where = _own_caller()
            if where is not None:
                seen.append(f"{msg.category.__name__}: {msg.message} (called from {where})")
        show(msg)

    monkeypatch.setattr(warnings, "_showwarnmsg_impl", check)
    yield
    if seen:
        pytest.fail("deprecated calls from specdec's code:\n" + "\n".join(sorted(set(seen))), pytrace=False)


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: needs the real vllm package (make test-vllm, its own venv)")


def pytest_report_header(config):
    return ["specdec backends: " + ", ".join(
        f"{k}={'yes' if v[0] else 'no'} ({v[1]})" for k, v in specdec.ops.backends().items())]
