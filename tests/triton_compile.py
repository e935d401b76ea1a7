"""Compile the Triton kernels for a GPU without one (sm_90, the H100/H200 of the benchmarks).

The interpreter that runs the kernels in CI accepts code that the compiler rejects (and the other
way round), so test_triton_compiles records the launches of a few small verify/sample calls
through the interpreter and compiles each distinct one with ``triton.compile`` in a child process
with the interpreter off:

    python tests/triton_compile.py LAUNCHES.json      # prints "N compiled, M failed"
"""
import contextlib
import importlib
import inspect
import json
import sys

_PTR = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
        "bool": "i1"}


def describe_launch(fn, args, kwargs):
    """[module, name, signature, constexprs, num_warps] of one launch of the @triton.jit ``fn``."""
    import torch

    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args))
    kw = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    num_warps = kw.pop("num_warps", 4)
    bound.update(kw)
    sig, const = {}, {}
    for name, p in params.items():
        v = bound.get(name, p.default)
        if "constexpr" in str(p.annotation):
            const[name] = getattr(v, "value", v)
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _PTR[str(v.dtype).removeprefix("torch.")]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i64" if abs(v) >= 2**31 else "i32"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(v).__name__}")
    return [fn.__module__, fn.__name__, sig, const, num_warps]


@contextlib.contextmanager
def record_launches():
    """Inside the block, every launch through Triton's interpreter is recorded: yields a dict whose
    keys are the distinct launches (json of :func:`describe_launch`), for :func:`compile_in_child`."""
    from triton.runtime import interpreter

    launches = {}
    run = interpreter.InterpretedFunction.run

    def recording_run(self, *args, **kwargs):
        launches[json.dumps(describe_launch(self.fn, args, kwargs), sort_keys=True, default=str)] = 1
        return run(self, *args, **kwargs)

    interpreter.InterpretedFunction.run = recording_run
    try:
        yield launches
    finally:
        interpreter.InterpretedFunction.run = run


def compile_all(launches, arch=90):
    """Compile each launch for CUDA sm_<arch>; returns the failures as (name, error) pairs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = []
    for mod, name, sig, const, num_warps in launches:
        fn = getattr(importlib.import_module(mod), name)
        signature = {n: sig.get(n, "constexpr") for n in fn.arg_names}
        try:
            triton.compile(ASTSource(fn=fn, signature=signature, constexprs=const),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        except Exception as exc:  # noqa: BLE001  reported, not raised: one run shows every failure
            failures.append((name, f"{type(exc).__name__}: {exc}"[:2000]))
    return failures


def compile_in_child(launches, tmp_path, timeout=900):
    """Compile ``launches`` (describe_launch lists) for sm_90 in a child process with the
    interpreter off and a fresh cache; returns (ok, output)."""
    import os
    import subprocess

    path = tmp_path / "launches.json"
    path.write_text(json.dumps(launches))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from a cache
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(path)], capture_output=True, text=True,
                          env=env, timeout=timeout)
    out = proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.returncode == 0 and f"{len(launches)} compiled, 0 failed" in proc.stdout, out


if __name__ == "__main__":
    import triton

    launches = json.load(open(sys.argv[1]))
    failures = compile_all(launches)
    for name, err in failures:
        print(f"FAIL {name}: {err}")
    print(f"triton {triton.__version__}: {len(launches) - len(failures)} compiled, {len(failures)} failed")
    sys.exit(1 if failures else 0)
