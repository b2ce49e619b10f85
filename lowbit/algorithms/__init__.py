"""Algorithms: how to *choose* the quantized values of the linears of a block, per format.

Each algorithm is a typed config dataclass plus a block handler registered for that type
(``base.py`` says what a handler receives). ``config_class("rtn")`` finds a config by the
method name plans use; ``handler_for(config)`` finds its handler. A new algorithm is one
module here that defines its config and registers its handler, plus its import below.
"""

from lowbit.algorithms.awq import AWQConfig
from lowbit.algorithms.base import AlgorithmConfig, Block, config_class, handler_for, method_names, register, sequential_stages
from lowbit.algorithms.gptq import GPTQConfig
from lowbit.algorithms.rtn import RTNConfig
from lowbit.algorithms.smoothquant import SmoothQuantConfig
from lowbit.algorithms.statistics import InputStatistics

__all__ = [
    "AWQConfig", "AlgorithmConfig", "Block", "GPTQConfig", "InputStatistics", "RTNConfig", "SmoothQuantConfig",
    "config_class", "handler_for", "method_names", "register", "sequential_stages",
]  # fmt: skip
