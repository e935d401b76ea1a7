"""Drop-in adapters: :mod:`specdec.integrations.transformers` (stock ``model.generate(assistant_model=...)``
verifies with specdec's fused op) and :mod:`specdec.integrations.vllm` (a rejection sampler with vLLM's
call shape). Each is imported on demand; neither needs the other framework at import time."""
