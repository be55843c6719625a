// kiln's CUDA emulator: the launch of a kernel over its grid (fibers, schedules, shared
// memory poisoning, deadlock detection). Compiled once per cache directory and flags by
// the driver (kemu.cpp, `<cache>/rt-<hash>.o`) and linked into every kernel's module,
// whose hidden state (kemu_device.h) it shares.
#include "cuda_runtime.h"

namespace kemu {
// The byte that fills shared memory before each block: KEMU_POISON (default 0xff: NaN in
// every float type; 0x7f gives 3.4e38 in f32, which max() does not drop).
static int poison_byte() {
    const char *s = getenv("KEMU_POISON");
    return s && *s ? (int)strtoul(s, nullptr, 0) & 0xff : 0xff;
}

// A fiber's first frame: the kernel, then back to the scheduler for good.
static void entry() {
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
static int schedule() {
    const char *s = getenv("KEMU_SCHEDULE");
    if (!s || !*s || !strcmp(s, "forward")) return 0;
    if (!strcmp(s, "reverse")) return 1;
    if (!strcmp(s, "shuffle")) return 2;
    fprintf(stderr, "kemu: KEMU_SCHEDULE=%s: expected forward, reverse or shuffle\n", s);
    return -1;
}

// `launch` (declared and described in kemu_device.h).
int launch(void (*run)(), const unsigned grid[3], const unsigned block[3], unsigned smem,
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

} // namespace kemu
