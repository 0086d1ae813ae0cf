// What the CPU can run, and which kernel table is in use.
#pragma once

#include <string>
#include <vector>

namespace qwen2rt {

struct CpuFeatures {
    bool avx2 = false, fma = false, f16c = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
    bool avx512vnni = false, avx512bf16 = false, avx_vnni = false;
    bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
    bool os_avx = false, os_avx512 = false, os_amx = false;  // the OS saves the wide registers
    bool intel = false;                                     // vendor "GenuineIntel"
};

const CpuFeatures& cpu_features();

// How far ahead of a decode kernel's weight stream (one token: q8 / q4 row groups, bf16 groups) its
// software prefetch asks, into L2, in bytes; 0: none. On 2 cores of a Xeon with AMX, 2048 bytes
// ahead decoded q4 14%, q8 11% and bf16 10% faster (alternating processes, 16 blocks of 32 steps;
// 1-8 KiB ahead all gained, 2 KiB the most; into L1 less); on Zen 4, asking ahead had cost bandwidth
// (kernels_avx512.cpp), so other CPUs keep to the hardware prefetcher.
int decode_prefetch_bytes();

// Whether bf16 pair dot products (`vdpbf16ps`) multiply faster than f32 FMAs here, which makes a
// bf16 KV cache the fast one (model.py: default_kv_dtype). On Zen 4 the attention over a bf16 cache
// took half the time of the f16 one. On a Xeon with AMX `vdpbf16ps` ran at half the FMAs' flops
// (105 against 211 GFLOP/s a core, multiply_add_peak) and the bf16 attention at 1.4x the f16 one's
// time in cache (benchmarks/attention.py); q4's decode at 8k positions was 0.65-0.69 of its speed at
// 128 with a bf16 cache and 0.75 with f16. So: CPUs with AVX-512 BF16 but Intel's.
bool bf16_dot_beats_fma();

// Instruction-set paths this build has and this CPU can run, worst to best ("generic" first).
std::vector<std::string> available_isas();
// Paths that emulate instructions this CPU lacks, for tests: they may be named, never picked.
std::vector<std::string> emulated_isas();

}  // namespace qwen2rt
