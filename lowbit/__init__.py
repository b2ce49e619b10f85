"""lowbit: make large language models small, and prove what it cost.

    import lowbit
    model = lowbit.quantize("model_dir_or.gguf", "int4-g128")
    lowbit.save(model, "out/")
    print(lowbit.evaluate(lowbit.load("out/"), reference="model_dir_or.gguf"))
"""

__version__ = "0.1.0"

from lowbit.api import (  # noqa: E402
    DEFAULT_SCHEMES,
    compare,
    evaluate,
    generate,
    load,
    quantize,
    save,
    size,
)
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.formats import get_format  # noqa: E402
from lowbit.plan import PRESETS, Plan  # noqa: E402
from lowbit.qtensor import QTensor  # noqa: E402

__all__ = [
    "DEFAULT_SCHEMES", "PRESETS", "LowbitError", "Plan", "QTensor",
    "compare", "evaluate", "generate", "get_format", "load", "quantize", "save", "size",
]  # fmt: skip
