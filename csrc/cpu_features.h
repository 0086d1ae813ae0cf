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
};

const CpuFeatures& cpu_features();

// Instruction-set paths this build has and this CPU can run, worst to best ("generic" first).
std::vector<std::string> available_isas();
// Paths that emulate instructions this CPU lacks, for tests: they may be named, never picked.
std::vector<std::string> emulated_isas();

}  // namespace qwen2rt
