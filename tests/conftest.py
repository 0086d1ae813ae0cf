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


@pytest.fixture(scope="session")
def real_gguf():
    """The real Qwen2.5-Coder-0.5B-Instruct GGUF: $QWEN2RT_GGUF, else where `qwen2rt pull` (and
    ../shared/models/fetch) put it. Tests that need it skip when it is absent; .ci/run pulls it."""
    import os

    from qwen2rt import registry

    path = os.environ.get("QWEN2RT_GGUF") or str(registry.model_path(registry.DEFAULT_MODEL))
    if not os.path.isfile(path):
        pytest.skip(f"real weights not present at {path} (qwen2rt pull, or set QWEN2RT_GGUF)")
    return path
