// kiln's CUDA emulator, device side: what an NVRTC-compiled kernel sees, for a host C++
// compiler. Every CUDA thread of a block is a fiber (its own stack); the fibers of one block
// run one at a time until each reaches a barrier, so `__syncthreads`, `__syncwarp`,
// warp shuffles and atomics need no locks, and a barrier that not every live thread
// reaches is reported as a deadlock (a real kernel bug) instead of hanging.
//
// Tensor-core fragments (`nvcuda::wmma`) hold the whole tile in every lane: a load reads
// the tile, `mma_sync` multiplies it in the accumulator's type (f32 for f16/bf16
// operands), a store writes it. Lanes see identical fragments, as the API requires.
//
// Shared memory is poisoned with 0xFF bytes (NaN in every float type, -1 in every
// integer) before each block, and so is fresh device memory: a kernel that reads what
// it never wrote shows NaN instead of a plausible stale value.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <ucontext.h>
#include <utility>
#include <xmmintrin.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __constant__ static
#define __grid_constant__
#define __CUDACC__ 1
#define __CUDA_ARCH__ (KEMU_ARCH * 10)

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
// cubecl builds the absolute position with it where a kernel reads ABSOLUTE_POS_X/Y/Z.
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

#define KEMU_HIDDEN __attribute__((visibility("hidden")))
#define KEMU_SMEM_BYTES (256 * 1024)

// The state is `inline`: one copy per module, shared by the kernel's translation unit
// and the launch code (kemu_runtime.cpp, compiled once and linked into every module).
KEMU_HIDDEN inline uint3 threadIdx;
KEMU_HIDDEN inline uint3 blockIdx;
KEMU_HIDDEN inline dim3 blockDim;
KEMU_HIDDEN inline dim3 gridDim;
KEMU_HIDDEN alignas(128) inline unsigned char dynamic_shared_mem[KEMU_SMEM_BYTES];
static const int warpSize = 32;

// ---- fibers -------------------------------------------------------------------------
namespace kemu {
enum State { RUN = 0, WAIT_BLOCK = 1, WAIT_WARP = 2, DONE = 3 };
#if defined(__x86_64__)
// A fiber switch without ucontext's two signal-mask system calls (430 ns a round trip
// here; this is a few ns): push the callee-saved registers, swap stack pointers, pop.
struct Context {
    void *sp;
};
__attribute__((naked, noinline)) static void switch_stack(void **from, void *to) {
    asm volatile("pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\t"
                 "pushq %r14\n\tpushq %r15\n\tmovq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
                 "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\t"
                 "popq %rbp\n\tret");
}
inline void switch_to(Context &from, Context &to) { switch_stack(&from.sp, to.sp); }
// A new context that starts `fn` (which never returns) on the stack [base, base + size).
inline void make_context(Context &c, void *base, size_t size, void (*fn)()) {
    uintptr_t top = ((uintptr_t)base + size) & ~(uintptr_t)15;
    void **sp = (void **)top;
    *--sp = nullptr;        // fn's return address: it never returns
    *--sp = (void *)fn;     // where the first switch's `ret` goes
    for (int i = 0; i < 6; i++) *--sp = nullptr; // rbp rbx r12 r13 r14 r15
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};
inline void switch_to(Context &from, Context &to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context &c, void *base, size_t size, void (*fn)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = base;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, fn, 0);
}
#endif

struct Fiber {
    Context ctx;
    int state;
    uint3 tid;
};
KEMU_HIDDEN inline Fiber fibers[1024];
KEMU_HIDDEN inline unsigned nthreads = 0;
KEMU_HIDDEN inline unsigned current = 0;
KEMU_HIDDEN inline Context scheduler;
KEMU_HIDDEN inline void (*body)() = nullptr;
// One 8-byte slot per thread for shuffles and votes.
KEMU_HIDDEN inline uint64_t slots[1024];
// The first misuse a kernel made of an API (a misaligned wmma pointer, ...): the launch
// fails with it once the grid has run.
KEMU_HIDDEN inline char fault[256];

inline void report(const char *what) {
    if (!fault[0])
        snprintf(fault, sizeof fault, "%s (block %u,%u,%u, thread %u,%u,%u)", what, blockIdx.x,
                 blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
}

inline unsigned lane() { return current % 32; }

inline void wait(int state) {
    fibers[current].state = state;
    switch_to(fibers[current].ctx, scheduler);
}

// Runs `run` over the grid on the driver's fiber stacks (`stacks[i]`, `stack_bytes` each:
// one pool for every module, launches being serialised); 0 on success, a message on
// stderr and 1 on a deadlock or a fault. Defined in kemu_runtime.cpp, which the driver
// compiles once per cache and links into every module: compiled into each kernel's
// module, the launch code was most of a small kernel's compile time.
KEMU_HIDDEN int launch(void (*run)(), const unsigned grid[3], const unsigned block[3],
                       unsigned smem, void *const *stacks, size_t stack_bytes);

template <typename... A> struct Thunk {
    static inline void (*fn)(A...) = nullptr;
    static inline void **args = nullptr;
    template <size_t... I> static void call(std::index_sequence<I...>) {
        fn(*static_cast<std::remove_cv_t<A> *>(args[I])...);
    }
    static void run() { call(std::index_sequence_for<A...>{}); }
};

template <typename... A>
int run_kernel(void (*fn)(A...), void **args, const unsigned grid[3], const unsigned block[3],
               unsigned smem, void *const *stacks, size_t stack_bytes) {
    Thunk<A...>::fn = fn;
    Thunk<A...>::args = args;
    return launch(&Thunk<A...>::run, grid, block, smem, stacks, stack_bytes);
}

template <typename T> inline uint64_t to_slot(T v) {
    static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
    uint64_t s = 0;
    memcpy(&s, &v, sizeof(T));
    return s;
}
template <typename T> inline T from_slot(uint64_t s) {
    T v;
    memcpy(&v, &s, sizeof(T));
    return v;
}
// Every lane publishes `v`, then reads lane `src`'s (its own where `src` is out of range).
// `src` is a lane of the warp (0..31); a lane that exited or is past the block reads its
// own value (CUDA leaves it undefined).
template <typename T> inline T exchange(T v, unsigned src) {
    unsigned me = current;
    unsigned base = me - me % 32;
    slots[me] = to_slot(v);
    wait(WAIT_WARP);
    unsigned from = base + src % 32;
    T r = from >= nthreads || fibers[from].state == DONE ? v : from_slot<T>(slots[from]);
    wait(WAIT_WARP);
    return r;
}
} // namespace kemu

inline void __syncthreads() { kemu::wait(kemu::WAIT_BLOCK); }
inline void __syncwarp(unsigned = 0xffffffffu) { kemu::wait(kemu::WAIT_WARP); }
inline void __threadfence() {}
inline void __threadfence_block() {}
inline unsigned __activemask() { return 0xffffffffu; }

// The shuffles as the CUDA programming guide defines them for a `width` (a power of two
// up to 32) segment; masks are not checked (every lane of the warp takes part).
template <typename T> inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
    unsigned seg = kemu::lane() & ~(unsigned)(width - 1);
    return kemu::exchange(v, seg + ((unsigned)src & (unsigned)(width - 1)));
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    unsigned src = kemu::lane() ^ (unsigned)mask;
    // A source past the lane's own segment reads the lane's own value.
    if ((src & ~(unsigned)(width - 1)) > (kemu::lane() | (unsigned)(width - 1))) src = kemu::lane();
    return kemu::exchange(v, src);
}
template <typename T> inline T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32) {
    unsigned in_seg = (kemu::lane() & (unsigned)(width - 1)) + d;
    return kemu::exchange(v, in_seg < (unsigned)width ? kemu::lane() + d : kemu::lane());
}
template <typename T> inline T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32) {
    unsigned in_seg = kemu::lane() & (unsigned)(width - 1);
    return kemu::exchange(v, in_seg >= d ? kemu::lane() - d : kemu::lane());
}
inline unsigned __ballot_sync(unsigned, int pred) {
    unsigned me = kemu::current, base = me - me % 32;
    kemu::slots[me] = pred != 0;
    kemu::wait(kemu::WAIT_WARP);
    unsigned bits = 0;
    for (unsigned i = 0; i < 32 && base + i < kemu::nthreads; i++)
        if (kemu::fibers[base + i].state != kemu::DONE && kemu::slots[base + i]) bits |= 1u << i;
    kemu::wait(kemu::WAIT_WARP);
    return bits;
}
// Every live lane's predicate: a ballot of the negation is empty.
inline int __all_sync(unsigned m, int p) { return __ballot_sync(m, !p) == 0; }
inline int __any_sync(unsigned m, int p) { return __ballot_sync(m, p) != 0; }

// ---- integer and float intrinsics -----------------------------------------------------
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((int64_t)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((__uint128_t)a * b) >> 64);
}
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; memcpy(&x, &f, 4); return x; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __saturatef(float x) { return x != x ? 0.0f : std::min(std::max(x, 0.0f), 1.0f); }
template <typename T> inline T __ldg(const T *p) { return *p; }

using std::abs;
using std::ceil;
using std::cos;
using std::erf;
using std::exp;
using std::floor;
using std::isinf;
using std::isnan;
using std::log;
using std::log1p;
using std::pow;
using std::rint;
using std::round;
using std::sin;
using std::sqrt;
using std::tanh;
using std::trunc;

// CUDA's `min`/`max` on floats are `fminf`/`fmaxf` (a NaN operand loses).
template <typename T, typename U>
inline auto min(T a, U b) -> std::enable_if_t<std::is_integral_v<T> && std::is_integral_v<U>,
                                              std::common_type_t<T, U>> {
    using C = std::common_type_t<T, U>;
    return (C)a < (C)b ? (C)a : (C)b;
}
template <typename T, typename U>
inline auto max(T a, U b) -> std::enable_if_t<std::is_integral_v<T> && std::is_integral_v<U>,
                                              std::common_type_t<T, U>> {
    using C = std::common_type_t<T, U>;
    return (C)a > (C)b ? (C)a : (C)b;
}
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// ---- atomics: fibers never run at once, so plain read-modify-writes are atomic --------
template <typename T, typename U> inline T atomicAdd(T *p, U v) { T o = *p; *p = o + (T)v; return o; }
template <typename T, typename U> inline T atomicSub(T *p, U v) { T o = *p; *p = o - (T)v; return o; }
template <typename T, typename U> inline T atomicMax(T *p, U v) { T o = *p; *p = o > (T)v ? o : (T)v; return o; }
template <typename T, typename U> inline T atomicMin(T *p, U v) { T o = *p; *p = o < (T)v ? o : (T)v; return o; }
template <typename T, typename U> inline T atomicExch(T *p, U v) { T o = *p; *p = (T)v; return o; }
template <typename T, typename U> inline T atomicAnd(T *p, U v) { T o = *p; *p = o & (T)v; return o; }
template <typename T, typename U> inline T atomicOr(T *p, U v) { T o = *p; *p = o | (T)v; return o; }
template <typename T, typename U> inline T atomicXor(T *p, U v) { T o = *p; *p = o ^ (T)v; return o; }
template <typename T, typename U, typename V> inline T atomicCAS(T *p, U cmp, V v) {
    T o = *p;
    if (o == (T)cmp) *p = (T)v;
    return o;
}
