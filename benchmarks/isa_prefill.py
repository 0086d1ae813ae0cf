"""Prefill speed of each kernel path in one process: the AMX tiles against AVX-512 on a CPU with
both, or any paths this machine lists.

    python benchmarks/isa_prefill.py                       # every listed path, bf16 / q8 / q4
    python benchmarks/isa_prefill.py --isas avx512,amx --tokens 512 --rounds 5

Each dtype's model is loaded once per path, and the paths take turns, round by round, on the same
prompt (the path is forced before each prefill: a forward pass uses the path active when it runs);
medians of tok/s are printed with their ratio to the first path. The speed of an emulated path
(amx-emulated) means nothing: it checks that the kernels run, not how fast.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402

import qwen2rt  # noqa: E402
from qwen2rt import _core, registry  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF or model folder (default: the pulled default model)")
    p.add_argument("--isas", default=",".join(_core.available_isas()[1:]), help="comma-separated kernel paths")
    p.add_argument("--dtypes", default="bf16,q8,q4")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    path = a.model or str(registry.model_path(registry.DEFAULT_MODEL))
    isas = a.isas.split(",")
    print(f"model {path}; {a.tokens} tokens; threads {a.threads or qwen2rt.default_threads()}; "
          f"CPU paths {', '.join(_core.available_isas())}")
    for dtype in a.dtypes.split(","):
        models = {}
        for isa in isas:
            qwen2rt.set_isa(isa)
            models[isa] = qwen2rt.Model(path, dtype=dtype, threads=a.threads, max_context=a.tokens + 16)
        ids = bench._prompt_ids(models[isas[0]].tokenize, a.tokens)
        rates = {isa: [] for isa in isas}
        for _ in range(a.rounds):
            for isa, m in models.items():
                qwen2rt.set_isa(isa)
                m.reset()
                t = time.perf_counter()
                m.forward(ids)
                rates[isa].append(a.tokens / (time.perf_counter() - t))
        base = statistics.median(rates[isas[0]])
        for isa in isas:
            r = statistics.median(rates[isa])
            rounds = ", ".join(f"{x:.0f}" for x in rates[isa])
            print(f"{dtype:5s} {isa:13s} {r:8.1f} tok/s  {r / base:5.2f}x  (rounds: {rounds})")
        del models


if __name__ == "__main__":
    main()
