// kiln's CUDA emulator: `__half` (IEEE binary16, GCC's `_Float16`) and `__nv_bfloat16`
// (the top half of an f32, rounded to nearest even), with the operators and intrinsics
// of cuda_fp16.h / cuda_bf16.h that generated kernels use. Arithmetic on them rounds
// through f32, as CUDA's does for one operation.
#pragma once
#include "kemu_device.h"

struct __half {
    _Float16 v;
    __half() = default;
    __half(float f) : v((_Float16)f) {}
    __half(double f) : v((_Float16)(float)f) {}
    __half(int i) : v((_Float16)(float)i) {}
    __half(unsigned i) : v((_Float16)(float)i) {}
    __half(long long i) : v((_Float16)(float)i) {}
    __half(unsigned long long i) : v((_Float16)(float)i) {}
    __half(short i) : v((_Float16)(float)i) {}
    __half(unsigned short i) : v((_Float16)(float)i) {}
    operator float() const { return (float)v; }
};
struct __nv_bfloat16 {
    uint16_t bits;
    __nv_bfloat16() = default;
    static uint16_t round(float f) {
        uint32_t u;
        memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
        u += 0x7fffu + ((u >> 16) & 1u);
        return (uint16_t)(u >> 16);
    }
    __nv_bfloat16(float f) : bits(round(f)) {}
    __nv_bfloat16(double f) : bits(round((float)f)) {}
    __nv_bfloat16(int i) : bits(round((float)i)) {}
    __nv_bfloat16(unsigned i) : bits(round((float)i)) {}
    __nv_bfloat16(long long i) : bits(round((float)i)) {}
    __nv_bfloat16(unsigned long long i) : bits(round((float)i)) {}
    __nv_bfloat16(__half h) : bits(round((float)h)) {}
    operator float() const {
        uint32_t u = (uint32_t)bits << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
};
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

#define KEMU_SCALAR_OPS(T)                                                                   \
    inline T operator+(T a, T b) { return T((float)a + (float)b); }                          \
    inline T operator-(T a, T b) { return T((float)a - (float)b); }                          \
    inline T operator*(T a, T b) { return T((float)a * (float)b); }                          \
    inline T operator/(T a, T b) { return T((float)a / (float)b); }                          \
    inline T operator-(T a) { return T(-(float)a); }                                         \
    inline T &operator+=(T &a, T b) { return a = a + b; }                                    \
    inline T &operator-=(T &a, T b) { return a = a - b; }                                    \
    inline T &operator*=(T &a, T b) { return a = a * b; }                                    \
    inline T &operator/=(T &a, T b) { return a = a / b; }                                    \
    inline bool operator==(T a, T b) { return (float)a == (float)b; }                        \
    inline bool operator!=(T a, T b) { return (float)a != (float)b; }                        \
    inline bool operator<(T a, T b) { return (float)a < (float)b; }                          \
    inline bool operator>(T a, T b) { return (float)a > (float)b; }                          \
    inline bool operator<=(T a, T b) { return (float)a <= (float)b; }                        \
    inline bool operator>=(T a, T b) { return (float)a >= (float)b; }                        \
    inline T min(T a, T b) { return T(std::fmin((float)a, (float)b)); }                      \
    inline T max(T a, T b) { return T(std::fmax((float)a, (float)b)); }                      \
    inline T exp(T a) { return T(std::exp((float)a)); }                                      \
    inline T log(T a) { return T(std::log((float)a)); }                                      \
    inline T sqrt(T a) { return T(std::sqrt((float)a)); }                                    \
    inline T abs(T a) { return T(std::fabs((float)a)); }                                     \
    inline T tanh(T a) { return T(std::tanh((float)a)); }                                    \
    inline T erf(T a) { return T(std::erf((float)a)); }                                      \
    inline T rint(T a) { return T(std::rint((float)a)); }                                    \
    inline T floor(T a) { return T(std::floor((float)a)); }                                  \
    inline T ceil(T a) { return T(std::ceil((float)a)); }                                    \
    inline bool isnan(T a) { return std::isnan((float)a); }                                  \
    inline bool isinf(T a) { return std::isinf((float)a); }
KEMU_SCALAR_OPS(__half)
KEMU_SCALAR_OPS(__nv_bfloat16)

#define KEMU_PAIR(P, T)                                                                      \
    struct __align__(4) P {                                                                  \
        T x, y;                                                                              \
        P() = default;                                                                       \
        P(T a, T b) : x(a), y(b) {}                                                          \
    };                                                                                       \
    inline P operator+(P a, P b) { return P(a.x + b.x, a.y + b.y); }                         \
    inline P operator-(P a, P b) { return P(a.x - b.x, a.y - b.y); }                         \
    inline P operator*(P a, P b) { return P(a.x * b.x, a.y * b.y); }                         \
    inline P operator/(P a, P b) { return P(a.x / b.x, a.y / b.y); }                         \
    inline P operator-(P a) { return P(-a.x, -a.y); }                                        \
    inline P &operator+=(P &a, P b) { return a = a + b; }                                    \
    inline P &operator-=(P &a, P b) { return a = a - b; }                                    \
    inline P &operator*=(P &a, P b) { return a = a * b; }                                    \
    inline P &operator/=(P &a, P b) { return a = a / b; }                                    \
    inline P min(P a, P b) { return P(min(a.x, b.x), min(a.y, b.y)); }                      \
    inline P max(P a, P b) { return P(max(a.x, b.x), max(a.y, b.y)); }                      \
    inline P exp(P a) { return P(exp(a.x), exp(a.y)); }                                      \
    inline P log(P a) { return P(log(a.x), log(a.y)); }                                      \
    inline P sqrt(P a) { return P(sqrt(a.x), sqrt(a.y)); }                                   \
    inline P abs(P a) { return P(abs(a.x), abs(a.y)); }
KEMU_PAIR(__half2, __half)
KEMU_PAIR(__nv_bfloat162, __nv_bfloat16)
typedef __half2 half2;
typedef __nv_bfloat162 nv_bfloat162;

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return (float)h; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return (float)h; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2(__half(a), __half(b)); }
inline __half2 __float2half2_rn(float a) { return __half2(__half(a), __half(a)); }
inline __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
inline __half2 __half2half2(__half a) { return __half2(a, a); }
inline __half __low2half(__half2 a) { return a.x; }
inline __half __high2half(__half2 a) { return a.y; }
inline float __low2float(__half2 a) { return (float)a.x; }
inline float __high2float(__half2 a) { return (float)a.y; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162(__nv_bfloat16(a), __nv_bfloat16(b));
}
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) {
    return __nv_bfloat162(a, b);
}
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162(a, a); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 a) { return a.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 a) { return a.y; }
inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hsub(__half a, __half b) { return a - b; }
inline __half __hmul(__half a, __half b) { return a * b; }
inline __half __hdiv(__half a, __half b) { return a / b; }
inline __half __hfma(__half a, __half b, __half c) {
    return __half(std::fma((float)a, (float)b, (float)c));
}
inline __half __hmax(__half a, __half b) { return max(a, b); }
inline __half __hmin(__half a, __half b) { return min(a, b); }
inline __half __habs(__half a) { return abs(a); }
inline __half __hneg(__half a) { return -a; }
inline __half hexp(__half a) { return exp(a); }
inline __half hlog(__half a) { return log(a); }
inline __half hsqrt(__half a) { return sqrt(a); }
inline __half hrsqrt(__half a) { return __half(1.0f / std::sqrt((float)a)); }
inline __half2 __hadd2(__half2 a, __half2 b) { return a + b; }
inline __half2 __hmul2(__half2 a, __half2 b) { return a * b; }
inline __half2 __hmax2(__half2 a, __half2 b) { return max(a, b); }
inline __half2 __hmin2(__half2 a, __half2 b) { return min(a, b); }
inline __half2 h2exp(__half2 a) { return exp(a); }
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) { return max(a, b); }
inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) { return min(a, b); }
inline __nv_bfloat16 hexp(__nv_bfloat16 a) { return exp(a); }
inline __nv_bfloat16 hlog(__nv_bfloat16 a) { return log(a); }
inline __nv_bfloat16 hsqrt(__nv_bfloat16 a) { return sqrt(a); }
inline __nv_bfloat162 __hmax2(__nv_bfloat162 a, __nv_bfloat162 b) { return max(a, b); }
inline __nv_bfloat162 __hmin2(__nv_bfloat162 a, __nv_bfloat162 b) { return min(a, b); }
inline __nv_bfloat162 h2exp(__nv_bfloat162 a) { return exp(a); }
