"""Drop-in adapters: :mod:`specdec.integrations.transformers` (stock ``model.generate(assistant_model=...)``
verifies with specdec's fused op) and :mod:`specdec.integrations.vllm` (vLLM 0.33's rejection samplers,
both model runners; needs vllm installed), switched on in vLLM by :mod:`specdec.integrations.vllm_plugin`
(``SPECDEC_VLLM_SAMPLER=1``). Each is imported on demand."""
