"""Advice before any weight is touched: how much memory a model needs, and in which format it fits.

``sizing`` works from a ``config.json`` alone: the bytes of the weights in every format, the KV
cache for a context and batch, and whether the whole fits a given amount of GPU memory.
"""
