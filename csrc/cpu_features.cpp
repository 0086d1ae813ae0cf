#include "cpu_features.h"

#include "kernels.h"

#if defined(QWEN2RT_X86)
#include <cpuid.h>
#include <cstdint>
#endif

namespace qwen2rt {

#if defined(QWEN2RT_X86)
static uint64_t read_xcr0() {
    uint32_t eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return (uint64_t(edx) << 32) | eax;
}

static CpuFeatures detect() {
    CpuFeatures f;
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return f;
    f.intel = b == 0x756e6547 && d == 0x49656e69 && c == 0x6c65746e;  // "Genu" "ineI" "ntel"
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    bool osxsave = c & (1u << 27);
    f.fma = c & (1u << 12);
    f.f16c = c & (1u << 29);
    if (osxsave) {
        uint64_t xcr0 = read_xcr0();
        f.os_avx = (xcr0 & 0x6) == 0x6;                 // XMM and YMM state
        f.os_avx512 = f.os_avx && (xcr0 & 0xe0) == 0xe0;  // opmask, ZMM_Hi256, Hi16_ZMM
        f.os_amx = (xcr0 & 0x60000) == 0x60000;          // XTILECFG, XTILEDATA
    }
    if (__get_cpuid_max(0, nullptr) >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        f.avx2 = b & (1u << 5);
        f.avx512f = b & (1u << 16);
        f.avx512dq = b & (1u << 17);
        f.avx512bw = b & (1u << 30);
        f.avx512vl = b & (1u << 31);
        f.avx512vnni = c & (1u << 11);
        f.amx_bf16 = d & (1u << 22);
        f.amx_tile = d & (1u << 24);
        f.amx_int8 = d & (1u << 25);
        __cpuid_count(7, 1, a, b, c, d);
        f.avx_vnni = a & (1u << 4);
        f.avx512bf16 = a & (1u << 5);
    }
    return f;
}
#else
static CpuFeatures detect() { return CpuFeatures{}; }
#endif

const CpuFeatures& cpu_features() {
    static const CpuFeatures f = detect();
    return f;
}

int decode_prefetch_bytes() {
    static const int bytes = cpu_features().intel ? 2048 : 0;
    return bytes;
}

bool bf16_dot_beats_fma() {
    const CpuFeatures& f = cpu_features();
    return f.avx512bf16 && f.os_avx512 && !f.intel;
}

std::vector<std::string> available_isas() {
    std::vector<std::string> out{"generic"};
#if defined(QWEN2RT_X86)
    const CpuFeatures& f = cpu_features();
    if (f.os_avx && f.avx2 && f.fma && f.f16c) out.push_back("avx2");
    if (f.os_avx512 && f.avx2 && f.fma && f.f16c && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq &&
        f.avx512vnni && f.avx512bf16)
        out.push_back("avx512");
    if (out.back() == "avx512" && amx_usable()) out.push_back("amx");
#endif
    return out;
}

std::vector<std::string> emulated_isas() {
    std::vector<std::string> out;
#if defined(QWEN2RT_X86)
    const std::vector<std::string> have = available_isas();
    if (have.back() == "avx512" || have.back() == "amx") out.push_back("amx-emulated");
#endif
    return out;
}

}  // namespace qwen2rt
