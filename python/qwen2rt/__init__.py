"""qwen2rt: a CPU inference runtime for Qwen2-architecture language models.

    import qwen2rt
    model = qwen2rt.Model("path/to/Qwen2.5-0.5B-Instruct")
    print(model.generate("def fibonacci(n):", max_new_tokens=64))
"""

from __future__ import annotations

import os as _os

from . import _core
from .errors import (
    ContextLengthError,
    FormatError,
    InvalidInputError,
    ModelBusyError,
    ModelNotFoundError,
    OutOfMemoryError,
    Qwen2rtError,
    UnsupportedModelError,
)
from .generation import Generation, TextStream
from .model import Model, default_threads

__version__ = "0.1.0"

__all__ = [
    "Model",
    "Generation",
    "TextStream",
    "system_info",
    "set_isa",
    "Qwen2rtError",
    "FormatError",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "InvalidInputError",
    "ModelBusyError",
    "ContextLengthError",
    "OutOfMemoryError",
]


def set_isa(isa: str) -> None:
    """Forces a kernel path for every model in this process: 'generic', 'avx2', 'avx512' or 'amx'
    (available_isas() lists this machine's), or 'amx-emulated' (tests)."""
    _core.set_isa(isa)


def system_info() -> dict:
    """Which kernel path and how many threads qwen2rt uses here, and what the CPU offers."""
    return {
        "version": __version__,
        "isa": _core.active_isa(),
        "available_isas": _core.available_isas(),
        "threads": default_threads(),
        "openmp_max_threads": _core.openmp_max_threads(),
        "cpu_flags": _core.cpu_flags(),
    }


_forced = _os.environ.get("QWEN2RT_ISA")
if _forced:
    try:
        _core.set_isa(_forced)
    except InvalidInputError as e:
        raise InvalidInputError(f"QWEN2RT_ISA={_forced!r}: {e}") from None
