"""A fix for Triton's CPU interpreter before 3.7, applied only when the interpreter is on.

Triton 3.6's interpreter turns a scalar tensor into a loop bound with ``int(handle.data)``, and the
data of a scalar there is a one-element array: NumPy >= 2.4 refuses that ("only 0-dimensional
arrays can be converted to Python scalars"), so every ``for i in range(n)`` with a computed ``n``
fails. Triton 3.7+ squeezes first; this gives 3.6 the same ``__index__``. Compiled kernels (GPU)
never run this code, so they are unaffected either way.
"""
import os


def apply() -> bool:
    """Patch the interpreter if it is on and needs it; returns whether a patch was applied."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton
    from triton.runtime import interpreter

    major, minor = (int(v) for v in triton.__version__.split(".")[:2])
    if (major, minor) >= (3, 7) or getattr(interpreter, "_specdec_index_fix", False):
        return False
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter._specdec_index_fix = True
    return True
