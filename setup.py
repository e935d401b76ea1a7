"""Build specdec and its C++ extension ``specdec._C``.

C++ sources in ``csrc/*.cpp`` are always compiled. ``csrc/*.cu`` are compiled as well when torch
is a CUDA build, nvcc is found (``CUDA_HOME``, e.g. /usr/local/cuda) and either a GPU is visible
(its architectures are built) or the build asks for them without one: ``SPECDEC_CUDA=1`` or
``TORCH_CUDA_ARCH_LIST`` set (default list without a GPU: ``DEFAULT_CUDA_ARCHS``). Otherwise the
build skips them and says why. ``SPECDEC_NO_CUDA=1`` skips them always, ``SPECDEC_NO_EXT=1`` skips
the extension altogether (the package then runs on its Triton and PyTorch-reference backends).
Build against the torch already installed: ``pip install --no-build-isolation -e .``
"""
import glob
import os
import platform
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Without a GPU to ask, build for Ampere (A100) and Hopper (H100/H200), plus PTX that newer GPUs JIT.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _say(msg: str) -> None:
    print(f"specdec setup: {msg}", file=sys.stderr)


def _cuda_wanted(torch, cpp_extension) -> bool:
    """Whether to compile csrc/*.cu, saying why not; sets TORCH_CUDA_ARCH_LIST when no GPU can tell
    torch which architectures to build (torch's own fallback fails on an empty device list)."""
    if os.environ.get("SPECDEC_NO_CUDA") == "1":
        _say("SPECDEC_NO_CUDA=1: CUDA kernels not built")
        return False
    if torch.version.cuda is None:
        _say(f"torch {torch.__version__} is a CPU build: CUDA kernels not built (CPU kernels only)")
        return False
    if cpp_extension.CUDA_HOME is None:
        _say("nvcc not found (set CUDA_HOME): CUDA kernels not built")
        return False
    try:
        gpus = torch.cuda.device_count()
    except Exception:  # a broken driver is no GPU
        gpus = 0
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if gpus == 0 and not arch_list and os.environ.get("SPECDEC_CUDA") != "1":
        _say("no GPU visible: CUDA kernels not built (SPECDEC_CUDA=1 or TORCH_CUDA_ARCH_LIST builds them anyway)")
        return False
    if gpus == 0 and (not arch_list or arch_list == "native"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    _say(f"building CUDA kernels for {os.environ.get('TORCH_CUDA_ARCH_LIST') or 'the visible GPUs'}")
    return True


def _extensions():
    if os.environ.get("SPECDEC_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    with_cuda = bool(cu) and _cuda_wanted(torch, cpp_extension)
    cxx = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++20 for torch >= 2.10)
    if platform.machine() in ("x86_64", "AMD64"):
        # AVX2+FMA: every x86-64 server of the last decade; the vectorised exp/log need them.
        cxx += ["-mavx2", "-mfma", "-mf16c"]
    macros = []
    if with_cuda:
        macros.append(("SPECDEC_WITH_CUDA", "1"))
        ext = cpp_extension.CUDAExtension(
            "specdec._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
            define_macros=macros,
        )
    else:
        ext = cpp_extension.CppExtension(
            "specdec._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
            define_macros=macros,
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


# Built only when run as a build script (pip, setuptools' build backend), so that tests can import
# the helpers above without starting a build.
if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()

    setup(
        # "specdec" on the public index is an unrelated project: the distribution is specdec-kernels,
        # the import name stays specdec
        name="specdec-kernels",
        version="0.1.0",
        description="Fused kernels for exact speculative decoding: verification, sampling, ragged KV cache",
        long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists("README.md") else "",
        long_description_content_type="text/markdown",
        python_requires=">=3.10",
        packages=find_packages(include=["specdec", "specdec.*"]) + ["specdec.kernels"],
        package_dir={"specdec.kernels": "kernels"},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        install_requires=[
            "torch>=2.4",
            "numpy",
            "tqdm",
        ],
        extras_require={
            # transformers >= 5.25 imports Hugging Face's `kernels`, which this repository's kernels/
            # folder no longer shadows (kernels/__init__.py); the tested set is requirements-lock.txt
            # xgrammar: structured output (generate(grammar=...)), tested on 0.2.9
            "hf": ["transformers>=4.57", "accelerate", "safetensors", "gguf", "bitsandbytes>=0.45", "xgrammar>=0.2.9"],
            # the Triton kernels are tested on triton 3.6 (the GPU image) to 3.8 (torch 2.14); 3.9.0's CPU
            # interpreter rejects a scalar bool combined into a load mask (verify_block's kernel)
            "triton": ["triton>=3.6,<3.9"],
            "bench": ["matplotlib"],
            "test": ["pytest", "scipy", "jsonschema"],
        },
        entry_points={
            "console_scripts": ["specdec=specdec.cli:main"],
            # vLLM loads this in every process; it acts only when SPECDEC_VLLM_SAMPLER=1 (README: vLLM)
            "vllm.general_plugins": ["specdec_sampler=specdec.integrations.vllm_plugin:register"],
        },
    )
