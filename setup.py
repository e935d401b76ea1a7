"""Build specdec and its C++ extension ``specdec._C``.

C++ sources in ``csrc/*.cpp`` are always compiled; ``csrc/*.cu`` are compiled as well when nvcc
and a CUDA build of torch are present (``CUDA_HOME`` set, e.g. /usr/local/cuda). Set
``SPECDEC_NO_CUDA=1`` to skip them, ``SPECDEC_NO_EXT=1`` to skip the extension altogether (the
package then runs on its Triton and PyTorch-reference backends). Build against the torch already
installed: ``pip install --no-build-isolation -e .``
"""
import glob
import os
import platform

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("SPECDEC_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu"))
    with_cuda = (
        bool(cu)
        and os.environ.get("SPECDEC_NO_CUDA") != "1"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
    )
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
        "hf": ["transformers>=4.57", "accelerate", "safetensors", "gguf", "bitsandbytes>=0.45"],
        "bench": ["matplotlib"],
        "test": ["pytest", "scipy"],
    },
    entry_points={
        "console_scripts": ["specdec=specdec.cli:main"],
        # vLLM loads this in every process; it acts only when SPECDEC_VLLM_SAMPLER=1 (README: vLLM)
        "vllm.general_plugins": ["specdec_sampler=specdec.integrations.vllm_plugin:register"],
    },
)
