"""lowbit: make large language models small, and prove what it cost.

    import lowbit
    model = lowbit.quantize("model_dir_or.gguf", "int4-g128")
    lowbit.save(model, "out/")
    print(lowbit.evaluate(lowbit.load("out/"), reference="model_dir_or.gguf"))
"""

from lowbit.version import __version__
from lowbit.algorithms import AWQConfig, GPTQConfig, RTNConfig, SmoothQuantConfig, method_names
from lowbit.api import (
    DEFAULT_SCHEME,
    QUALITY_BUDGETS,
    DEFAULT_SCHEMES,
    compare,
    evaluate,
    export,
    export_gguf,
    generate,
    imatrix,
    inspect,
    load,
    quantize,
    recipe,
    save,
    size,
)
from lowbit.errors import LowbitError
from lowbit.export import exporter_names
from lowbit.formats import get_format
from lowbit.plan import PRESETS, Plan
from lowbit.qtensor import QTensor
from lowbit.sources import DEFAULT_MODEL
from lowbit.integrations import register_with_transformers

__all__ = [
    "AWQConfig", "DEFAULT_MODEL", "DEFAULT_SCHEME", "DEFAULT_SCHEMES", "GPTQConfig", "LowbitConfig", "PRESETS", "QUALITY_BUDGETS", "LowbitError", "Plan", "QTensor", "RTNConfig", "SmoothQuantConfig",
    "__version__", "compare", "method_names", "evaluate", "export", "export_gguf", "exporter_names", "generate", "get_format", "imatrix", "inspect", "load",
    "quantize", "recipe", "save", "size",
]  # fmt: skip


def __getattr__(name: str):
    # LowbitConfig subclasses transformers' quantization config: imported on first use only
    if name == "LowbitConfig":
        from lowbit.integrations.transformers import LowbitConfig

        return LowbitConfig
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


register_with_transformers()  # last: registration may import lowbit's own modules
