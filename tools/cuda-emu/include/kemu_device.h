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

KEMU_HIDDEN uint3 threadIdx;
KEMU_HIDDEN uint3 blockIdx;
KEMU_HIDDEN dim3 blockDim;
KEMU_HIDDEN dim3 gridDim;
KEMU_HIDDEN alignas(128) unsigned char dynamic_shared_mem[KEMU_SMEM_BYTES];
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
KEMU_HIDDEN Fiber fibers[1024];
KEMU_HIDDEN unsigned nthreads = 0;
KEMU_HIDDEN unsigned current = 0;
KEMU_HIDDEN Context scheduler;
KEMU_HIDDEN void (*body)() = nullptr;
// One 8-byte slot per thread for shuffles and votes.
KEMU_HIDDEN uint64_t slots[1024];
// The first misuse a kernel made of an API (a misaligned wmma pointer, ...): the launch
// fails with it once the grid has run.
KEMU_HIDDEN char fault[256];

inline void report(const char *what) {
    if (!fault[0])
        snprintf(fault, sizeof fault, "%s (block %u,%u,%u, thread %u,%u,%u)", what, blockIdx.x,
                 blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
}

// The byte that fills shared memory before each block: KEMU_POISON (default 0xff: NaN in
// every float type; 0x7f gives 3.4e38 in f32, which max() does not drop).
inline int poison_byte() {
    const char *s = getenv("KEMU_POISON");
    return s && *s ? (int)strtoul(s, nullptr, 0) & 0xff : 0xff;
}

inline unsigned lane() { return current % 32; }

inline void wait(int state) {
    fibers[current].state = state;
    switch_to(fibers[current].ctx, scheduler);
}

// A fiber's first frame: the kernel, then back to the scheduler for good.
inline void entry() {
    body();
    fibers[current].state = DONE;
    switch_to(fibers[current].ctx, scheduler);
    abort(); // a finished fiber is never resumed
}

// The order in which the fibers of a block run between barriers (and blocks run):
// KEMU_SCHEDULE=forward (thread 0 first, the default), reverse (last thread and last block
// first), or shuffle (a new permutation of the threads at every barrier, from KEMU_SEED).
// A kernel whose threads race (one writes what another has still to read, or reads what
// another has not yet written, between two barriers) gives different results in
// different orders: run a check under more than one.
inline int schedule() {
    const char *s = getenv("KEMU_SCHEDULE");
    if (!s || !*s || !strcmp(s, "forward")) return 0;
    if (!strcmp(s, "reverse")) return 1;
    if (!strcmp(s, "shuffle")) return 2;
    fprintf(stderr, "kemu: KEMU_SCHEDULE=%s: expected forward, reverse or shuffle\n", s);
    return -1;
}

// Runs `run` over the grid on the driver's fiber stacks (`stacks[i]`, `stack_bytes` each:
// one pool for every module, launches being serialised); 0 on success, a message on
// stderr and 1 on a deadlock or a fault.
inline int launch(void (*run)(), const unsigned grid[3], const unsigned block[3], unsigned smem,
                  void *const *stacks, size_t stack_bytes) {
    if (smem > KEMU_SMEM_BYTES) {
        fprintf(stderr, "kemu: %u bytes of dynamic shared memory asked for, %u available\n",
                smem, (unsigned)KEMU_SMEM_BYTES);
        return 1;
    }
    unsigned n = block[0] * block[1] * block[2];
    if (n == 0 || n > 1024) {
        fprintf(stderr, "kemu: %u threads per block\n", n);
        return 1;
    }
    nthreads = n;
    body = run;
    blockDim = dim3{block[0], block[1], block[2]};
    gridDim = dim3{grid[0], grid[1], grid[2]};
    for (unsigned i = 0; i < n; i++)
        fibers[i].tid = uint3{i % block[0], (i / block[0]) % block[1], i / (block[0] * block[1])};
    int mode = schedule();
    if (mode < 0) return 1;
    int poison = poison_byte();
    fault[0] = 0;
    // IEEE defaults whatever the host thread had set (no flush-to-zero), as on the GPU
    // where kernels are compiled without fast math.
    unsigned host_csr = _mm_getcsr();
    _mm_setcsr(0x1f80);
    static unsigned order[1024];
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    if (const char *s = getenv("KEMU_SEED")) seed ^= strtoull(s, nullptr, 10) * 0xbf58476d1ce4e5b9ull;
    uint64_t blocks = (uint64_t)grid[0] * grid[1] * grid[2];
    for (uint64_t step = 0; step < blocks; step++) {
        uint64_t b = mode == 1 ? blocks - 1 - step : step;
        unsigned bx = (unsigned)(b % grid[0]), by = (unsigned)(b / grid[0] % grid[1]),
                 bz = (unsigned)(b / ((uint64_t)grid[0] * grid[1]));
        blockIdx = uint3{bx, by, bz};
        // The whole array, not `smem` bytes: a cached module may lay its arrays out
        // differently from the source this launch was compiled for (same kernel).
        memset(dynamic_shared_mem, poison, KEMU_SMEM_BYTES);
        for (unsigned i = 0; i < n; i++) {
            make_context(fibers[i].ctx, stacks[i], stack_bytes, entry);
            fibers[i].state = RUN;
        }
        for (;;) {
            for (unsigned i = 0; i < n; i++) order[i] = mode == 1 ? n - 1 - i : i;
            if (mode == 2)
                for (unsigned i = n - 1; i > 0; i--) {
                    seed ^= seed << 13, seed ^= seed >> 7, seed ^= seed << 17;
                    std::swap(order[i], order[seed % (i + 1)]);
                }
            for (unsigned step = 0; step < n; step++) {
                unsigned i = order[step];
                if (fibers[i].state != RUN) continue;
                current = i;
                threadIdx = fibers[i].tid;
                switch_to(scheduler, fibers[i].ctx);
            }
            // Every live fiber now waits at a barrier or is done.
            bool live = false, released = false, block_wait = true;
            for (unsigned i = 0; i < n; i++) {
                if (fibers[i].state == DONE) continue;
                live = true;
                if (fibers[i].state != WAIT_BLOCK) block_wait = false;
            }
            if (!live) break;
            if (block_wait) {
                for (unsigned i = 0; i < n; i++)
                    if (fibers[i].state == WAIT_BLOCK) fibers[i].state = RUN;
                continue;
            }
            for (unsigned w = 0; w * 32 < n; w++) {
                unsigned lo = w * 32, hi = std::min(n, lo + 32);
                bool all = true, any = false;
                for (unsigned i = lo; i < hi; i++) {
                    if (fibers[i].state == DONE) continue;
                    any = true;
                    if (fibers[i].state != WAIT_WARP) all = false;
                }
                if (any && all) {
                    for (unsigned i = lo; i < hi; i++)
                        if (fibers[i].state == WAIT_WARP) fibers[i].state = RUN;
                    released = true;
                }
            }
            if (!released) {
                fprintf(stderr,
                        "kemu: deadlock in block (%u,%u,%u): threads wait at different "
                        "barriers (state per thread, 1 = __syncthreads, 2 = warp, 3 = "
                        "exited):",
                        bx, by, bz);
                for (unsigned i = 0; i < n; i++) fprintf(stderr, " %d", fibers[i].state);
                fprintf(stderr, "\n");
                _mm_setcsr(host_csr);
                return 1;
            }
        }
    }
    _mm_setcsr(host_csr);
    if (fault[0]) {
        fprintf(stderr, "kemu: %s\n", fault);
        return 1;
    }
    return 0;
}

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
