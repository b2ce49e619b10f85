"""lowbit inside other libraries: transformers (``transformers.py``: a quantization config and
quantizer for ``quant_method: "lowbit"``) and peft (``peft.py``: LoRA on QuantLinear).

``import lowbit`` calls :func:`register_with_transformers`, which costs nothing up front:
importing transformers' quantizer machinery takes seconds (it pulls in accelerate and
``torch.distributed``), and most ``lowbit`` commands never need it. Registration runs the
moment ``transformers.modeling_utils`` (where ``from_pretrained`` lives) has been imported,
or at once when it already was; nothing of transformers is changed, a finder on
``sys.meta_path`` only runs ``lowbit.integrations.transformers`` after that module loads.
"""

from __future__ import annotations

import importlib.machinery
import sys
import warnings

#: the transformers module whose import makes ``from_pretrained`` callable
TRANSFORMERS_MODULE = "transformers.modeling_utils"


def _register() -> None:
    try:
        import lowbit.integrations.transformers  # noqa: F401  (registers itself)
    except Exception as error:  # never break the user's transformers import for lowbit's sake
        warnings.warn(f"lowbit could not register with transformers ({error}); use lowbit.load for lowbit checkpoints", stacklevel=2)


class _AfterImport:
    """A ``sys.meta_path`` finder that lets the normal finders find :data:`TRANSFORMERS_MODULE`
    and registers lowbit once that module has executed."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TRANSFORMERS_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def register_with_transformers() -> None:
    """Make ``from_pretrained`` know ``quant_method: "lowbit"`` (once; see the module docstring)."""
    if TRANSFORMERS_MODULE in sys.modules:
        _register()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
