"""Kernel paths for tests: which exist here, and a model's logits with each one forced in turn."""

import qwen2rt
from qwen2rt import _core

# Paths whose prompts of 16 tokens or more run on AMX tiles (csrc/kernels_amx.cpp): q8 / q4 weights
# and their activations are rounded to bf16 there, while decode keeps the integer kernels.
TILE_ISAS = ("amx", "amx-emulated")
# "amx" where the CPU has it; its emulation wherever the CPU has AVX-512.
TILE_ISAS_HERE = [i for i in TILE_ISAS if i in _core.available_isas() + _core.emulated_isas()]
# Every path a test may force here, the emulated ones included.
ALL_ISAS_HERE = _core.available_isas() + _core.emulated_isas()


def logits_per_isa(isas, load, ids):
    """{isa: load().forward(ids, all_logits=True)} with each path forced in turn (the model is
    loaded under it); the path in use before is restored."""
    before = _core.active_isa()
    out = {}
    try:
        for isa in isas:
            qwen2rt.set_isa(isa)
            out[isa] = load().forward(ids, all_logits=True)
    finally:
        qwen2rt.set_isa(before)
    return out
