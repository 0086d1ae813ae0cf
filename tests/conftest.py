import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import qwen2rt  # noqa: E402
from qwen2rt import _core  # noqa: E402

ISAS = _core.available_isas()
# The model tests run on the portable path and on the best path this machine has.
MODEL_ISAS = sorted({"generic", ISAS[-1]}, key=ISAS.index)


@pytest.fixture(params=MODEL_ISAS)
def isa(request):
    """Runs the test with the kernel path forced to each ISA in turn, then restores the default."""
    before = _core.active_isa()
    qwen2rt.set_isa(request.param)
    yield request.param
    qwen2rt.set_isa(before)
