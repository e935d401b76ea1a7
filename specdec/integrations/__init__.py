"""Drop-in adapters: :mod:`specdec.integrations.transformers` (stock ``model.generate(assistant_model=...)``
verifies with specdec's fused op), :mod:`specdec.integrations.vllm` (a rejection sampler with vLLM's
call shape) and :mod:`specdec.integrations.flashinfer` (FlashInfer's ``chain_speculative_sampling``).
Each is imported on demand; none needs the other framework at import time."""
