"""specdec: fused kernels for exact speculative decoding."""
__version__ = "0.1.0"
