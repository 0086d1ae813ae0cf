"""The decode attention kernel alone: one query position's G heads against T cached keys.

    python benchmarks/attention.py [--isa avx2] [--kv f16|bf16|f32] [--threads 2] [--contexts 512,2048,8192]

Two figures per context: one (layer, KV head) with its cache in the CPU caches, on one thread (the
kernel's compute speed, GFLOP/s = 4 G D T / s); and a whole decode step's attention for
Qwen2.5-0.5B's 24 layers x 2 KV heads (G = 7, D = 64, an f16 cache by default) from DRAM on `threads` threads, as
the model splits KV heads (ms per token, and the cache bytes read per second).
"""

from __future__ import annotations

import argparse

from qwen2rt import _core, system_info
from qwen2rt.model import KV_DTYPES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", default=system_info()["isa"])
    ap.add_argument("--kv", default="f16", choices=["f16", "bf16", "f32"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", default="512,2048,8192")
    ap.add_argument("--G", type=int, default=7)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--caches", type=int, default=48, help="(layer, KV head) pairs of a decode step")
    a = ap.parse_args()
    k = _core.kernels
    print(f"isa {a.isa}, G={a.G}, D={a.D}, {a.kv} cache, {a.caches} caches on {a.threads} threads")
    print("| keys | in cache: ms | GFLOP/s | from DRAM: ms per token | KV GB/s |")
    print("|---|---|---|---|---|")
    for T in (int(x) for x in a.contexts.split(",") if x):
        one = k.attention_seconds(a.isa, a.G, a.D, T, a.kv, 1, 1, 50)
        step = k.attention_seconds(a.isa, a.G, a.D, T, a.kv, a.caches, a.threads, 10)
        kv_bytes = 2 * KV_DTYPES[a.kv] * a.D * T * a.caches
        print(f"| {T} | {one * 1e3:.3f} | {4 * a.G * a.D * T / one / 1e9:.0f} | {step * 1e3:.2f} | "
              f"{kv_bytes / step / 1e9:.1f} |")


if __name__ == "__main__":
    main()
