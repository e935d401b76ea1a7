"""Drop-in adapters: :mod:`specdec.integrations.transformers` (stock ``model.generate(assistant_model=...)``
verifies with specdec's fused op), :mod:`specdec.integrations.vllm` (vLLM 0.33's rejection samplers,
both model runners; needs vllm installed), switched on in vLLM by :mod:`specdec.integrations.vllm_plugin`
(``SPECDEC_VLLM_SAMPLER=1``), and :mod:`specdec.integrations.flashinfer` (FlashInfer's
``chain_speculative_sampling``). Each is imported on demand; none needs the other framework at import time."""
