// cuda_fp16.h -- the emulator's half-precision type (CUDA Math API, "Half Precision Intrinsics").
//
// __half holds the IEEE 754 binary16 bits; arithmetic converts to double, computes, and rounds
// back to nearest even, which is what a GPU's half instructions give for + - * (a single rounding
// of the exact result: double holds every sum and product of two halves exactly). Conversions
// follow the CUDA names: __float2half and __float2half_rn round to nearest even, _rz toward zero,
// _rd down, _ru up.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

struct __half;
namespace emu {
static inline uint16_t double_to_half_bits(double d, int mode);  // 0 nearest even, 1 zero, 2 down, 3 up
static inline uint16_t float_to_half_bits(float f, int mode);
static inline float half_bits_to_float(uint16_t h);
}

struct __align__(2) __half {
    uint16_t __x;
    __half() = default;
    __half(float f) : __x(emu::float_to_half_bits(f, 0)) {}
    __half(double f) : __x(emu::double_to_half_bits(f, 0)) {}
    __half(int i) : __x(emu::float_to_half_bits((float)i, 0)) {}
    operator float() const { return emu::half_bits_to_float(__x); }
};
typedef __half half;
struct __align__(4) __half2 { __half x, y; };
typedef __half2 half2;

namespace emu {
// Round a double (every float, and every sum of two halves, is one exactly) to binary16: the
// mantissa is shifted right with the discarded bits kept to decide the rounding; overflow gives
// infinity (or the largest finite value when rounding toward zero), underflow subnormals.
static inline uint16_t double_to_half_bits(double d, int mode) {
    uint64_t x;
    memcpy(&x, &d, 8);
    const uint32_t sign = (uint32_t)(x >> 48) & 0x8000u;
    const int e = (int)((x >> 52) & 0x7FF);
    uint64_t m = x & 0xFFFFFFFFFFFFFull;
    if (e == 0x7FF) return (uint16_t)(sign | 0x7C00u | (m ? 0x200u | (uint32_t)(m >> 42) : 0));  // inf, quiet NaN
    if (e == 0 && m == 0) return (uint16_t)sign;
    if (e != 0) m |= 1ull << 52;           // the implicit bit
    const int exp = e - 1023 + 15;         // the half's biased exponent
    int shift = exp >= 1 ? 42 : 43 - exp;  // normal: keep 10 of 52 bits; subnormal: fewer
    if (shift > 62) shift = 62;            // far below half's range: everything is discarded
    const uint64_t rest = m & ((1ull << shift) - 1), half_ulp = 1ull << (shift - 1);
    const uint32_t mant = (uint32_t)(m >> shift);
    uint32_t bits = exp >= 1 ? ((uint32_t)exp << 10) + (mant & 0x3FFu) : mant;  // subnormal: exponent 0
    bool up;
    switch (mode) {
        case 1: up = false; break;                       // toward zero
        case 2: up = sign && rest; break;                // down
        case 3: up = !sign && rest; break;               // up
        default: up = rest > half_ulp || (rest == half_ulp && (bits & 1)); break;  // nearest even
    }
    bits += up;                                          // may carry into the exponent: fine
    if (exp >= 31 || bits >= 0x7C00u) {
        const bool to_inf = mode == 0 || (mode == 2 && sign) || (mode == 3 && !sign);
        return (uint16_t)(sign | (to_inf ? 0x7C00u : 0x7BFFu));
    }
    return (uint16_t)(sign | bits);
}
static inline uint16_t float_to_half_bits(float f, int mode) { return double_to_half_bits(f, mode); }

static inline float half_bits_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const int e = (h >> 10) & 0x1F;
    uint32_t m = h & 0x3FFu, x;
    if (e == 0x1F) {
        x = sign | 0x7F800000u | (m << 13);
    } else if (e == 0) {
        float f = ldexpf((float)m, -24);  // subnormal (or zero): exact in float
        memcpy(&x, &f, 4);
        x |= sign;
    } else {
        x = sign | ((uint32_t)(e - 15 + 127) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}
}  // namespace emu

static inline __half __float2half(float f) { __half h; h.__x = emu::float_to_half_bits(f, 0); return h; }
static inline __half __float2half_rn(float f) { return __float2half(f); }
static inline __half __float2half_rz(float f) { __half h; h.__x = emu::float_to_half_bits(f, 1); return h; }
static inline __half __float2half_rd(float f) { __half h; h.__x = emu::float_to_half_bits(f, 2); return h; }
static inline __half __float2half_ru(float f) { __half h; h.__x = emu::float_to_half_bits(f, 3); return h; }
static inline float __half2float(__half h) { return emu::half_bits_to_float(h.__x); }
static inline __half __int2half_rn(int i) { return __float2half((float)i); }
static inline __half __ushort_as_half(unsigned short b) { __half h; h.__x = b; return h; }
static inline unsigned short __half_as_ushort(__half h) { return h.__x; }
static inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half(a), __float2half(b)}; }
static inline __half2 __float2half2_rn(float a) { return __half2{__float2half(a), __float2half(a)}; }
static inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
static inline float __low2float(__half2 h) { return __half2float(h.x); }
static inline float __high2float(__half2 h) { return __half2float(h.y); }
static inline __half __low2half(__half2 h) { return h.x; }
static inline __half __high2half(__half2 h) { return h.y; }

// Arithmetic: one rounding of the exact result (double holds + - * and fma of halves exactly).
static inline __half emu_half(double d) { __half h; h.__x = emu::double_to_half_bits(d, 0); return h; }
static inline __half __hadd(__half a, __half b) { return emu_half((double)__half2float(a) + __half2float(b)); }
static inline __half __hsub(__half a, __half b) { return emu_half((double)__half2float(a) - __half2float(b)); }
static inline __half __hmul(__half a, __half b) { return emu_half((double)__half2float(a) * __half2float(b)); }
static inline __half __hneg(__half a) { a.__x ^= 0x8000u; return a; }
static inline __half __habs(__half a) { a.__x &= 0x7FFFu; return a; }
static inline __half __hfma(__half a, __half b, __half c) {  // fused: one rounding (double is exact here)
    return emu_half((double)__half2float(a) * __half2float(b) + __half2float(c));
}
static inline __half operator+(__half a, __half b) { return __hadd(a, b); }
static inline __half operator-(__half a, __half b) { return __hsub(a, b); }
static inline __half operator*(__half a, __half b) { return __hmul(a, b); }
static inline __half operator-(__half a) { return __hneg(a); }
static inline __half& operator+=(__half& a, __half b) { return a = __hadd(a, b); }
static inline __half& operator*=(__half& a, __half b) { return a = __hmul(a, b); }
static inline bool __heq(__half a, __half b) { return __half2float(a) == __half2float(b); }
static inline bool __hlt(__half a, __half b) { return __half2float(a) < __half2float(b); }
static inline bool __hgt(__half a, __half b) { return __half2float(a) > __half2float(b); }
static inline bool __hisnan(__half a) { return (a.__x & 0x7FFFu) > 0x7C00u; }
