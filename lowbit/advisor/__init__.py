"""Advice before any weight is touched: how much memory a model needs, and in which format it fits.

``sizing`` is the public face of the sizing advisor, which works from a ``config.json`` alone:
the bytes of the weights in every format (``weights``, with ``shapes`` and ``gguf_mixes``), the
KV cache and activations for a context and batch (``memory``), and whether the whole fits a
given amount of GPU memory (``report``).
"""
