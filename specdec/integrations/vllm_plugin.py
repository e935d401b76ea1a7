"""vLLM plug-in: ``export SPECDEC_VLLM_SAMPLER=1`` makes vLLM 0.33 verify drafts with specdec.

setup.py registers :func:`register` in the ``vllm.general_plugins`` entry-point group, which vLLM
loads in every process (``vllm.plugins.load_general_plugins()``). Without the variable it does
nothing at all, whatever the vLLM version. With it, it checks the version (0.33.x only: anything
else raises, naming the supported range) and installs :mod:`specdec.integrations.vllm`'s samplers:

- Model Runner V2: through the ``ModelState.custom_sampler`` hook
  (``vllm/v1/worker/gpu/model_states/interface.py``), when speculative decoding is configured;
  a model state that already returns its own sampler keeps it.
- V1 runner: by replacing the ``RejectionSampler`` class that
  ``vllm/v1/worker/gpu_model_runner.py`` imports (in ``vllm.v1.sample.rejection_sampler``, and in
  the runner's module when it is already imported). ``RejectionSampler.parse_output`` stays vLLM's.

This module imports nothing from vLLM at import time, so the version check runs first.
"""
from __future__ import annotations

import os
import sys

ENV_VAR = "SPECDEC_VLLM_SAMPLER"
SUPPORTED_VLLM = ">=0.33.0,<0.34"
_SUPPORTED_MINOR = (0, 33)


def enabled() -> bool:
    """True when ``SPECDEC_VLLM_SAMPLER`` asks for specdec's sampler (1/true/yes/on)."""
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def check_version(version: str) -> None:
    """Raise RuntimeError unless ``version`` is a vLLM 0.33.x release."""
    parts = version.split("+")[0].split(".")
    try:
        minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        minor = None
    if minor != _SUPPORTED_MINOR:
        raise RuntimeError(
            f"specdec's vLLM sampler supports vllm{SUPPORTED_VLLM}, found vllm {version}; "
            f"install vllm==0.33.* or unset {ENV_VAR}")


def register() -> None:
    """The ``vllm.general_plugins`` entry point: install specdec's samplers when asked."""
    if not enabled():
        return
    import vllm

    check_version(vllm.__version__)
    install()


def install() -> None:
    """Put specdec's samplers in place for both runners (idempotent)."""
    from vllm.v1.sample import rejection_sampler as v1_module
    from vllm.v1.worker.gpu.model_states.interface import ModelState

    from specdec.integrations import vllm as adapters

    v1_module.RejectionSampler = adapters.RejectionSampler
    runner = sys.modules.get("vllm.v1.worker.gpu_model_runner")
    if runner is not None:
        runner.RejectionSampler = adapters.RejectionSampler

    if getattr(ModelState.custom_sampler, "_specdec", False):
        return
    original = ModelState.custom_sampler

    def custom_sampler(self, sampler):
        custom = original(self, sampler)
        spec_config = self.vllm_config.speculative_config
        if custom is not None or spec_config is None:
            return custom
        if getattr(self.vllm_config, "watermark_config", None) is not None:
            raise NotImplementedError(f"specdec's vLLM sampler does not watermark; unset {ENV_VAR}")
        return sampler, adapters.ModelRunnerV2RejectionSampler(sampler, spec_config, self.device)

    custom_sampler._specdec = True
    custom_sampler.__doc__ = original.__doc__
    ModelState.custom_sampler = custom_sampler
