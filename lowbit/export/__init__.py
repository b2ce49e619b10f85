"""Writers (and readers) of quantized checkpoints, one module per target layout.

``native`` is lowbit's own: a transformers checkpoint whose ``config.json`` carries the
manifest as ``quantization_config`` and whose safetensors hold the packed parts. Targets
with layouts of their own (GGUF, GPTQ, AWQ, compressed-tensors, MLX) convert from it here.
"""
