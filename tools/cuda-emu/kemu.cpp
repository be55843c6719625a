// kiln's CUDA emulator, host side: the part of the CUDA driver API (libcuda) and of NVRTC
// (libnvrtc) that cubecl-cuda 0.10 calls, implemented on the CPU so that the emitted
// CUDA C++ of every kiln kernel runs here, through cubecl's own launch path, without a
// GPU. See README.md beside this file for what it proves and what it does not.
//
// - Device memory is host memory: a `CUdeviceptr` is a pointer. Copies are memcpy;
//   streams and events are synchronous.
// - "NVRTC" compiles the kernel source with the host C++ compiler against the headers in
//   include/ (fibers for threads, wmma on whole tiles) into a shared object, cached by a
//   hash of the source; its "PTX" is `KEMU:<path of the .so>`.
// - `cuLaunchKernel` runs the grid one block at a time, every thread a fiber.
//
// Environment: KEMU_CXX (default g++), KEMU_CACHE (default $TMPDIR/kemu-cache),
// KEMU_ARCH (compute capability reported, default 80), KEMU_CXXFLAGS (extra flags).
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <vector>

#define API extern "C" __attribute__((visibility("default")))

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void *CUcontext;
typedef void *CUstream;
typedef void *CUevent;
typedef void *CUmodule;
typedef void *CUfunction;

enum {
    OK = 0,
    ERR_INVALID_VALUE = 1,
    ERR_OUT_OF_MEMORY = 2,
    ERR_INVALID_DEVICE = 101,
    ERR_INVALID_IMAGE = 200,
    ERR_INVALID_HANDLE = 400,
    ERR_NOT_FOUND = 500,
    ERR_LAUNCH_FAILED = 719,
    ERR_NOT_SUPPORTED = 801,
};

static std::mutex g_lock;
static int g_context_token;

// The compute capability reported (KEMU_ARCH): 70, 72, 75, 80, 86 or 87 (default 80).
// 89 and up would turn on cubecl's fp8 and, from 90, TMA paths, which are not emulated.
static int arch() {
    const char *a = getenv("KEMU_ARCH");
    return a && *a ? atoi(a) : 80;
}
static bool arch_supported(int v) {
    return v == 70 || v == 72 || v == 75 || v == 80 || v == 86 || v == 87;
}
// The largest dynamic shared memory a block may opt in to on that architecture (bytes).
static int max_shared_optin() {
    switch (arch()) {
    case 70: case 72: return 96 * 1024;
    case 75: return 64 * 1024;
    case 80: case 87: return 163 * 1024;
    default: return 99 * 1024;
    }
}

// ---- device and context ----------------------------------------------------------------
API CUresult cuInit(unsigned) {
    if (!arch_supported(arch())) {
        fprintf(stderr, "kemu: KEMU_ARCH=%d: expected 70, 72, 75, 80, 86 or 87\n", arch());
        return ERR_INVALID_DEVICE;
    }
    return OK;
}
API CUresult cuDriverGetVersion(int *v) {
    *v = 12080;
    return OK;
}
API CUresult cuDeviceGetCount(int *n) {
    *n = 1;
    return OK;
}
API CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (ordinal != 0) return ERR_INVALID_DEVICE;
    *d = 0;
    return OK;
}
API CUresult cuDeviceGetName(char *name, int len, CUdevice) {
    snprintf(name, len, "kiln CUDA emulator (sm_%d, CPU)", arch());
    return OK;
}
API CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice) {
    *bytes = (size_t)8 << 30;
    return OK;
}
API CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    *free_bytes = (size_t)8 << 30;
    *total = (size_t)8 << 30;
    return OK;
}
API CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice) {
    switch (attr) {
    case 1: *v = 1024; break;                 // MAX_THREADS_PER_BLOCK
    case 2: case 3: *v = 1024; break;         // MAX_BLOCK_DIM_X/Y
    case 4: *v = 64; break;                   // MAX_BLOCK_DIM_Z
    case 5: *v = 2147483647; break;           // MAX_GRID_DIM_X
    case 6: case 7: *v = 65535; break;        // MAX_GRID_DIM_Y/Z
    case 8: *v = 48 * 1024; break;            // MAX_SHARED_MEMORY_PER_BLOCK
    case 10: *v = 32; break;                  // WARP_SIZE
    case 12: *v = 65536; break;               // MAX_REGISTERS_PER_BLOCK
    case 13: *v = 1500000; break;             // CLOCK_RATE (kHz)
    case 16: *v = 4; break;                   // MULTIPROCESSOR_COUNT
    case 39: *v = 2048; break;                // MAX_THREADS_PER_MULTIPROCESSOR
    case 75: *v = arch() / 10; break;         // COMPUTE_CAPABILITY_MAJOR
    case 76: *v = arch() % 10; break;         // COMPUTE_CAPABILITY_MINOR
    case 81: *v = max_shared_optin() + 1024; break; // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
    case 97: *v = max_shared_optin(); break;  // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
    case 115: *v = 0; break;                  // MEMORY_POOLS_SUPPORTED: plain cuMemAlloc
    default: *v = 0; break;
    }
    return OK;
}
API CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice) {
    *c = &g_context_token;
    return OK;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return OK; }
API CUresult cuCtxSetCurrent(CUcontext) { return OK; }
API CUresult cuCtxGetCurrent(CUcontext *c) {
    *c = &g_context_token;
    return OK;
}
API CUresult cuCtxPushCurrent_v2(CUcontext) { return OK; }
API CUresult cuCtxPopCurrent_v2(CUcontext *c) {
    if (c) *c = &g_context_token;
    return OK;
}
API CUresult cuCtxSynchronize() { return OK; }
API CUresult cuCtxGetDevice(CUdevice *d) {
    *d = 0;
    return OK;
}

// ---- streams and events: everything has finished when it returns -----------------------
API CUresult cuStreamCreate(CUstream *s, unsigned) {
    *s = malloc(1);
    return OK;
}
API CUresult cuStreamDestroy_v2(CUstream s) {
    free(s);
    return OK;
}
API CUresult cuStreamSynchronize(CUstream) { return OK; }
API CUresult cuStreamQuery(CUstream) { return OK; }
API CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned) { return OK; }
API CUresult cuEventCreate(CUevent *e, unsigned) {
    *e = calloc(1, sizeof(timespec));
    return OK;
}
API CUresult cuEventRecord(CUevent e, CUstream) {
    clock_gettime(CLOCK_MONOTONIC, (timespec *)e);
    return OK;
}
API CUresult cuEventSynchronize(CUevent) { return OK; }
API CUresult cuEventQuery(CUevent) { return OK; }
API CUresult cuEventDestroy_v2(CUevent e) {
    free(e);
    return OK;
}
API CUresult cuEventElapsedTime(float *ms, CUevent a, CUevent b) {
    const timespec *x = (const timespec *)a, *y = (const timespec *)b;
    *ms = (float)((y->tv_sec - x->tv_sec) * 1e3 + (y->tv_nsec - x->tv_nsec) * 1e-6);
    return OK;
}

// ---- memory ---------------------------------------------------------------------------
// Fresh allocations are filled with 0xFF bytes (NaN, -1): reading what no kernel or copy
// wrote shows up.
static CUresult alloc(CUdeviceptr *p, size_t n) {
    size_t bytes = (n + 255) / 256 * 256;
    void *m = aligned_alloc(256, bytes ? bytes : 256);
    if (!m) return ERR_OUT_OF_MEMORY;
    const char *poison = getenv("KEMU_POISON");
    memset(m, poison && *poison ? (int)strtoul(poison, nullptr, 0) & 0xff : 0xff, bytes);
    *p = (CUdeviceptr)m;
    return OK;
}
API CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) { return alloc(p, n); }
API CUresult cuMemAllocAsync(CUdeviceptr *p, size_t n, CUstream) { return alloc(p, n); }
API CUresult cuMemFree_v2(CUdeviceptr p) {
    free((void *)p);
    return OK;
}
API CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return cuMemFree_v2(p); }
API CUresult cuMemAllocHost_v2(void **p, size_t n) {
    *p = aligned_alloc(256, (n + 255) / 256 * 256 + 256);
    return *p ? OK : ERR_OUT_OF_MEMORY;
}
API CUresult cuMemHostAlloc(void **p, size_t n, unsigned) { return cuMemAllocHost_v2(p, n); }
API CUresult cuMemFreeHost(void *p) {
    free(p);
    return OK;
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void *s, size_t n) {
    memcpy((void *)d, s, n);
    return OK;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void *s, size_t n, CUstream) {
    return cuMemcpyHtoD_v2(d, s, n);
}
API CUresult cuMemcpyDtoH_v2(void *d, CUdeviceptr s, size_t n) {
    memcpy(d, (const void *)s, n);
    return OK;
}
API CUresult cuMemcpyDtoHAsync_v2(void *d, CUdeviceptr s, size_t n, CUstream) {
    return cuMemcpyDtoH_v2(d, s, n);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    memmove((void *)d, (const void *)s, n);
    return OK;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream) {
    return cuMemcpyDtoD_v2(d, s, n);
}
API CUresult cuMemcpyAsync(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream) {
    return cuMemcpyDtoD_v2(d, s, n);
}
struct Memcpy2D {
    size_t srcXInBytes, srcY;
    int srcMemoryType;
    const void *srcHost;
    CUdeviceptr srcDevice;
    void *srcArray;
    size_t srcPitch;
    size_t dstXInBytes, dstY;
    int dstMemoryType;
    void *dstHost;
    CUdeviceptr dstDevice;
    void *dstArray;
    size_t dstPitch;
    size_t WidthInBytes, Height;
};
API CUresult cuMemcpy2D_v2(const Memcpy2D *c) {
    // Memory types: 1 host, 2 device, 3 array (not supported), 4 unified.
    if (c->srcMemoryType == 3 || c->dstMemoryType == 3) return ERR_NOT_SUPPORTED;
    const char *src = (const char *)(c->srcMemoryType == 1 ? c->srcHost : (const void *)c->srcDevice);
    char *dst = (char *)(c->dstMemoryType == 1 ? c->dstHost : (void *)c->dstDevice);
    for (size_t y = 0; y < c->Height; y++)
        memmove(dst + (c->dstY + y) * c->dstPitch + c->dstXInBytes,
                src + (c->srcY + y) * c->srcPitch + c->srcXInBytes, c->WidthInBytes);
    return OK;
}
API CUresult cuMemcpy2DAsync_v2(const Memcpy2D *c, CUstream) { return cuMemcpy2D_v2(c); }
API CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    memset((void *)d, v, n);
    return OK;
}
API CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream) {
    return cuMemsetD8_v2(d, v, n);
}
API CUresult cuMemsetD32_v2(CUdeviceptr d, unsigned v, size_t n) {
    for (size_t i = 0; i < n; i++) ((unsigned *)d)[i] = v;
    return OK;
}
API CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, CUstream) {
    return cuMemsetD32_v2(d, v, n);
}

// ---- modules and launches --------------------------------------------------------------
typedef int (*Entry)(void **, const unsigned *, const unsigned *, unsigned, void *const *,
                     size_t);

// The fibers' stacks, one per thread of the largest block so far, shared by every module
// (launches are serialised): 1 MiB each (a thread's wmma fragments hold whole tiles), a
// guard page below each so that an overflow faults. Per module they would be hundreds
// of mappings per kernel, past the kernel's limit on mappings in a long self-test.
static const size_t STACK_BYTES = (size_t)1 << 20;
static std::vector<void *> g_stacks;
static bool grow_stacks(size_t n) {
    while (g_stacks.size() < n) {
        void *m = mmap(nullptr, STACK_BYTES, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) return false;
        mprotect(m, 4096, PROT_NONE);
        g_stacks.push_back(m);
    }
    return true;
}
struct Function {
    Entry entry;
    std::string name;
};
struct Module {
    void *handle;
};

API CUresult cuModuleLoadData(CUmodule *m, const void *image) {
    const char *s = (const char *)image;
    if (strncmp(s, "KEMU:", 5) != 0) {
        fprintf(stderr, "kemu: cuModuleLoadData was given real PTX or a cubin, not an emulator module\n");
        return ERR_INVALID_IMAGE;
    }
    void *h = dlopen(s + 5, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        fprintf(stderr, "kemu: %s\n", dlerror());
        return ERR_INVALID_IMAGE;
    }
    *m = new Module{h};
    return OK;
}
API CUresult cuModuleUnload(CUmodule m) {
    delete (Module *)m;  // the .so stays loaded: its fibers' stacks are reused
    return OK;
}
API CUresult cuModuleGetFunction(CUfunction *f, CUmodule m, const char *name) {
    std::string sym = std::string("kemu_entry_") + name;
    void *p = dlsym(((Module *)m)->handle, sym.c_str());
    if (!p) return ERR_NOT_FOUND;
    *f = new Function{(Entry)p, name};
    return OK;
}
API CUresult cuFuncSetAttribute(CUfunction, int, int) { return OK; }
API CUresult cuFuncGetAttribute(int *v, int attr, CUfunction) {
    *v = attr == 0 ? 1024 : 0;  // MAX_THREADS_PER_BLOCK
    return OK;
}
API CUresult cuFuncSetCacheConfig(CUfunction, int) { return OK; }
API CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                            unsigned by, unsigned bz, unsigned smem, CUstream, void **params,
                            void **extra) {
    if (extra) return ERR_NOT_SUPPORTED;
    // The limits a GPU of this compute capability enforces at launch.
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 || gx > 2147483647u ||
        gy > 65535 || gz > 65535 || bx > 1024 || by > 1024 || bz > 64 ||
        (unsigned long long)bx * by * bz > 1024 || smem > (unsigned)max_shared_optin()) {
        fprintf(stderr, "kemu: launch of %s refused: grid (%u,%u,%u), block (%u,%u,%u), %u bytes of shared memory\n",
                ((Function *)f)->name.c_str(), gx, gy, gz, bx, by, bz, smem);
        return ERR_INVALID_VALUE;
    }
    std::lock_guard<std::mutex> guard(g_lock);
    Function *fn = (Function *)f;
    unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    if (!grow_stacks((size_t)bx * by * bz)) return ERR_OUT_OF_MEMORY;
    if (fn->entry(params, grid, block, smem, g_stacks.data(), STACK_BYTES) != 0) {
        fprintf(stderr, "kemu: launch of %s failed\n", fn->name.c_str());
        return ERR_LAUNCH_FAILED;
    }
    return OK;
}

// What each result the emulator returns is called, and what it means.
static const struct {
    CUresult code;
    const char *name, *text;
} RESULTS[] = {
    {OK, "CUDA_SUCCESS", "no error"},
    {ERR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument (emulator)"},
    {ERR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory (emulator)"},
    {ERR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal (emulator: one device)"},
    {ERR_INVALID_IMAGE, "CUDA_ERROR_INVALID_IMAGE", "invalid module image (emulator)"},
    {ERR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid handle (emulator)"},
    {ERR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found (emulator)"},
    {ERR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "kernel failed in the emulator (see stderr)"},
    {ERR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "not supported by kiln's CUDA emulator"},
};
API CUresult cuGetErrorString(CUresult r, const char **s) {
    *s = "unknown error (emulator)";
    for (const auto &e : RESULTS)
        if (e.code == r) *s = e.text;
    return OK;
}
API CUresult cuGetErrorName(CUresult r, const char **s) {
    *s = "CUDA_ERROR_UNKNOWN";
    for (const auto &e : RESULTS)
        if (e.code == r) *s = e.name;
    return OK;
}

// ---- NVRTC ------------------------------------------------------------------------------
typedef int nvrtcResult;
struct Program {
    std::string source, log, module;
};

API const char *nvrtcGetErrorString(nvrtcResult r) {
    return r == 0 ? "NVRTC_SUCCESS" : r == 6 ? "NVRTC_ERROR_COMPILATION" : "NVRTC_ERROR (emulator)";
}
API nvrtcResult nvrtcVersion(int *major, int *minor) {
    *major = 12;
    *minor = 8;
    return 0;
}
API nvrtcResult nvrtcCreateProgram(Program **p, const char *src, const char *, int,
                                   const char *const *, const char *const *) {
    *p = new Program{src, "", ""};
    return 0;
}
API nvrtcResult nvrtcDestroyProgram(Program **p) {
    delete *p;
    *p = nullptr;
    return 0;
}

static void replace_all(std::string &s, const std::string &from, const std::string &to) {
    for (size_t at = s.find(from); at != std::string::npos; at = s.find(from, at + to.size()))
        s.replace(at, from.size(), to);
}

// The `extern "C" __global__ void [__launch_bounds__(...)] NAME (` kernels of a source.
static std::vector<std::string> kernel_names(const std::string &s) {
    std::vector<std::string> names;
    const std::string key = "__global__ void";
    for (size_t at = s.find(key); at != std::string::npos; at = s.find(key, at + 1)) {
        size_t i = at + key.size();
        while (i < s.size() && isspace((unsigned char)s[i])) i++;
        if (s.compare(i, 17, "__launch_bounds__") == 0) {
            i = s.find(')', i);
            if (i == std::string::npos) break;
            i++;
        }
        while (i < s.size() && isspace((unsigned char)s[i])) i++;
        size_t j = i;
        while (j < s.size() && (isalnum((unsigned char)s[j]) || s[j] == '_')) j++;
        if (j > i) names.push_back(s.substr(i, j - i));
    }
    return names;
}

static uint64_t fnv1a(const std::string &s) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
}

// cubecl 0.10's CUDA emission is not deterministic across processes (hash-map order):
// the same kernel comes with its variables numbered differently, its vector structs and
// mutable variables declared in another order, and its shared arrays at other offsets.
// The cache key is the source with those differences taken out: identifiers
// renumbered by first use, declaration runs and struct definitions sorted, shared-memory
// offsets and size comments dropped. The source compiled is the one cubecl gave (one of
// its equivalent layouts).
static bool is_word(char c) { return isalnum((unsigned char)c) || c == '_'; }

// Whether `t` is one of cubecl's numbered names: l_N, l_mut_N, l_arr_N, shared_memory_N,
// frag_<x>_N.
static bool numbered(const std::string &t) {
    size_t u = t.rfind('_');
    if (u == std::string::npos || u + 1 >= t.size()) return false;
    for (size_t i = u + 1; i < t.size(); i++)
        if (!isdigit((unsigned char)t[i])) return false;
    std::string p = t.substr(0, u);
    if (p == "l" || p == "l_mut" || p == "l_arr" || p == "shared_memory") return true;
    if (p.rfind("frag_", 0) == 0 && p.size() > 5) {
        for (size_t i = 5; i < p.size(); i++)
            if (!islower((unsigned char)p[i])) return false;
        return true;
    }
    return false;
}

// A line that only declares a variable: `<type> l_mut_N;`, `<type> l_arr_N[K];`,
// `nvcuda::wmma::fragment<...> frag_x_N;`, or a shared array's pointer.
static bool declaration(const std::string &line) {
    if (line.find("*shared_memory_") != std::string::npos &&
        line.find("reinterpret_cast<") != std::string::npos &&
        line.find("(&dynamic_shared_mem[") != std::string::npos)
        return true;
    size_t end = line.find_last_not_of(" \t");
    if (end == std::string::npos || line[end] != ';') return false;
    size_t e = end;
    if (e > 0 && line[e - 1] == ']') {
        size_t open = line.rfind('[', e);
        if (open == std::string::npos) return false;
        e = open;
    }
    size_t b = e;
    while (b > 0 && is_word(line[b - 1])) b--;
    std::string name = line.substr(b, e - b);
    bool mutable_or_array = name.rfind("l_mut_", 0) == 0 || name.rfind("l_arr_", 0) == 0;
    if (!numbered(name) || !(mutable_or_array || name.rfind("frag_", 0) == 0)) return false;
    for (size_t i = 0; i < b; i++)
        if (!is_word(line[i]) && !strchr(":<>, \t", line[i])) return false;
    return b > 0 && (line[b - 1] == ' ' || line[b - 1] == '\t');
}

static std::string cache_key_source(const std::string &src) {
    // Struct definitions, sorted, where the first one was.
    std::vector<std::string> lines, structs, sizes;
    size_t first_struct = std::string::npos;
    {
        size_t at = 0;
        while (at <= src.size()) {
            size_t nl = src.find('\n', at);
            std::string line = src.substr(at, nl == std::string::npos ? std::string::npos : nl - at);
            at = nl == std::string::npos ? src.size() + 1 : nl + 1;
            if (line.rfind("struct __align__(", 0) == 0) {
                std::string block = line + "\n";
                while (at <= src.size() && block.find("\n};\n") == std::string::npos) {
                    size_t n2 = src.find('\n', at);
                    block += src.substr(at, n2 == std::string::npos ? std::string::npos : n2 - at) + "\n";
                    at = n2 == std::string::npos ? src.size() + 1 : n2 + 1;
                }
                if (first_struct == std::string::npos) first_struct = lines.size();
                structs.push_back(block);
                continue;
            }
            if (line.rfind("// Shared array size", 0) == 0) {
                sizes.push_back(line);
                continue;
            }
            size_t d = line.find("dynamic_shared_mem[");
            if (d != std::string::npos) {
                size_t close = line.find(']', d);
                if (close != std::string::npos) line.erase(d + 19, close - d - 19);
            }
            lines.push_back(line);
        }
    }
    std::sort(structs.begin(), structs.end());
    // Renumber: first use outside declarations, then whatever only a declaration names.
    std::map<std::string, std::string> names;
    auto scan = [&](const std::string &line) {
        for (size_t i = 0; i < line.size();) {
            if (!is_word(line[i])) { i++; continue; }
            size_t j = i;
            while (j < line.size() && is_word(line[j])) j++;
            std::string t = line.substr(i, j - i);
            if ((i == 0 || !is_word(line[i - 1])) && numbered(t) && !names.count(t))
                names[t] = t.substr(0, t.rfind('_') + 1) + std::to_string(names.size());
            i = j;
        }
    };
    for (const std::string &l : lines)
        if (!declaration(l)) scan(l);
    for (const std::string &l : lines) scan(l);
    std::string out;
    std::vector<std::string> run;
    auto flush = [&]() {
        std::sort(run.begin(), run.end());
        for (const std::string &r : run) out += r + "\n";
        run.clear();
    };
    for (size_t k = 0; k < lines.size(); k++) {
        if (k == first_struct)
            for (const std::string &b : structs) out += b;
        std::string renamed;
        const std::string &line = lines[k];
        for (size_t i = 0; i < line.size();) {
            if (!is_word(line[i])) { renamed += line[i++]; continue; }
            size_t j = i;
            while (j < line.size() && is_word(line[j])) j++;
            std::string t = line.substr(i, j - i);
            auto it = names.find(t);
            renamed += it == names.end() ? t : it->second;
            i = j;
        }
        if (declaration(line)) {
            run.push_back(renamed);
        } else {
            flush();
            out += renamed + "\n";
        }
    }
    flush();
    // The shared arrays' sizes (not their offsets), as a sorted list.
    std::sort(sizes.begin(), sizes.end());
    for (const std::string &z : sizes) out += z + "\n";
    return out;
}


static std::string quote(const std::string &s) {
    std::string q = "'";
    for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
}

// The contents of a file (empty where it cannot be read).
static std::string read_file(const std::string &path) {
    std::string text;
    if (FILE *f = fopen(path.c_str(), "rb")) {
        char buf[4096];
        size_t k;
        while ((k = fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, k);
        fclose(f);
    }
    return text;
}

// Runs a shell command with its output to `log`; the exit status and the output.
static int run_logged(const std::string &command, const std::string &log, std::string &text) {
    int rc = system((command + " > " + quote(log) + " 2>&1").c_str());
    text += read_file(log);
    unlink(log.c_str());
    return rc;
}

// A suffix for temporary files no other process or thread writes (NVRTC may be called
// from several threads at once: the pid alone would let two compilers share a file).
static std::string unique_suffix() {
    static std::atomic<unsigned> count{0};
    return std::to_string(getpid()) + "-" + std::to_string(count++);
}

// The emulator's headers, precompiled once per cache directory and flags (they are most
// of a small kernel's compile time): `<dir>/pch-<hash>/cuda_runtime.h.gch`, found first
// on the include path. An empty string where that failed (kernels then parse the headers).
static std::string precompiled_headers(const std::string &dir, const std::string &command,
                                       const std::vector<std::string> &include_dirs) {
    char hash[32];
    snprintf(hash, sizeof hash, "%016llx", (unsigned long long)fnv1a(command));
    std::string pch_dir = dir + "/pch-" + hash, gch = pch_dir + "/cuda_runtime.h.gch";
    struct stat st;
    if (stat(gch.c_str(), &st) == 0) return pch_dir;
    for (const std::string &inc : include_dirs) {
        std::string header = inc + "/cuda_runtime.h";
        if (stat(header.c_str(), &st) != 0) continue;
        mkdir(pch_dir.c_str(), 0755);
        std::string tmp = gch + "." + unique_suffix(), text;
        if (run_logged(command + " -x c++-header " + quote(header) + " -o " + quote(tmp),
                       tmp + ".log", text) != 0) {
            unlink(tmp.c_str());
            return "";
        }
        rename(tmp.c_str(), gch.c_str());
        return pch_dir;
    }
    return "";
}

// The launch code (`kemu_runtime.cpp` beside the headers), compiled once per cache directory,
// flags and source (with `kemu_device.h`, whose state it shares) into `<dir>/rt-<hash>.o` and
// linked into every kernel's module. Returns the compile line's arguments for it: the
// object; where that failed, the source, compiled with each kernel (the failure is kept in
// `failed`); none where the headers have no runtime. `gold` tells whether GNU gold linked
// the object (probed once, `rt-<hash>.gold`): it links a small kernel's module in about a
// third of the default linker's time.
static std::string runtime_args(const std::string &dir, const std::string &command,
                                const std::vector<std::string> &include_dirs, bool &gold,
                                std::string &failed) {
    gold = false;
    std::string source, header;
    struct stat st;
    for (const std::string &inc : include_dirs)
        if (stat((inc + "/kemu_runtime.cpp").c_str(), &st) == 0) {
            source = inc + "/kemu_runtime.cpp";
            header = inc + "/kemu_device.h";
            break;
        }
    if (source.empty()) return "";
    char hash[32];
    std::string key = command + "\n" + read_file(source) + "\n" + read_file(header);
    snprintf(hash, sizeof hash, "%016llx", (unsigned long long)fnv1a(key));
    std::string object = dir + "/rt-" + hash + ".o", marker = dir + "/rt-" + hash + ".gold";
    if (stat(object.c_str(), &st) != 0) {
        std::string tmp = object + "." + unique_suffix(), text;
        if (run_logged(command + " -c -x c++ " + quote(source) + " -o " + quote(tmp), tmp + ".log",
                       text) != 0) {
            unlink(tmp.c_str());
            failed = text;
            return " -x c++ " + quote(source);
        }
        std::string probe = tmp + ".so";
        if (run_logged(command + " -shared -fuse-ld=gold " + quote(tmp) + " -o " + quote(probe),
                       probe + ".log", text) == 0)
            if (FILE *f = fopen(marker.c_str(), "w")) fclose(f);
        unlink(probe.c_str());
        rename(tmp.c_str(), object.c_str());
    }
    gold = stat(marker.c_str(), &st) == 0;
    return " -x none " + quote(object);
}

API nvrtcResult nvrtcCompileProgram(Program *p, int n, const char *const *options) {
    std::string includes, arch_flag = "-DKEMU_ARCH=80";
    std::vector<std::string> include_dirs;
    for (int i = 0; i < n; i++) {
        std::string o = options[i];
        if (o.rfind("--include-path=", 0) == 0) {
            includes += " -I" + quote(o.substr(15));
            include_dirs.push_back(o.substr(15));
        }
        if (o.rfind("--gpu-architecture=sm_", 0) == 0)
            arch_flag = "-DKEMU_ARCH=" + std::to_string(atoi(o.c_str() + 22));
    }
    std::string src = p->source;
    // Dynamic shared memory is one array per module (blocks run one at a time); a
    // `__shared__` variable is a function-level static for the same reason.
    replace_all(src, "extern __shared__", "extern");
    src += "\n// kemu entry points\n";
    for (const std::string &k : kernel_names(p->source))
        src += "extern \"C\" __attribute__((visibility(\"default\"))) int kemu_entry_" + k +
               "(void **args, const unsigned *grid, const unsigned *block, unsigned smem, "
               "void *const *stacks, size_t stack_bytes) { return kemu::run_kernel(&" + k +
               ", args, grid, block, smem, stacks, stack_bytes); }\n";
    const char *cxx = getenv("KEMU_CXX");
    const char *extra = getenv("KEMU_CXXFLAGS");
    std::string command = std::string(cxx ? cxx : "g++") +
                          " -std=c++20 -O1 -g0 -fPIC -w -fno-strict-aliasing"
                          // What x86 and PTX define differently is reported, not
                          // silently given x86's meaning: shifts by the width or more,
                          // float-to-int conversions out of range, division by zero,
                          // misaligned vector accesses.
                          " -fsanitize=shift-exponent,float-cast-overflow,integer-divide-by-zero,alignment"
                          // Locals a kernel reads before writing hold a pattern, not zero.
                          " -ftrivial-auto-var-init=pattern " +
                          arch_flag + " " + (extra ? extra : "");
    std::string flags = command;
    command += includes;
    const char *cache = getenv("KEMU_CACHE");
    const char *tmp = getenv("TMPDIR");
    std::string dir = cache ? cache : std::string(tmp ? tmp : "/tmp") + "/kemu-cache";
    mkdir(dir.c_str(), 0755);
    char hash[32];
    snprintf(hash, sizeof hash, "%016llx",
             (unsigned long long)fnv1a(cache_key_source(p->source) + "\n" + command +
                                       "\nkemu " __DATE__ " " __TIME__));
    std::string base = dir + "/" + hash, so = base + ".so";
    struct stat st;
    if (stat(so.c_str(), &st) != 0) {
        // The shared parts, built once per cache (only where a kernel is compiled: a
        // runtime that failed to compile is not tried again for cached kernels).
        std::string pch = precompiled_headers(dir, command, include_dirs), runtime_failed;
        bool gold = false;
        std::string runtime = runtime_args(dir, command, include_dirs, gold, runtime_failed);
        std::string suffix = unique_suffix();
        std::string cu = base + "." + suffix + ".cpp";
        std::string tmp_so = base + "." + suffix + ".so";
        std::string log = base + "." + suffix + ".log";
        FILE *f = fopen(cu.c_str(), "w");
        if (!f) {
            p->log = "kemu: cannot write " + cu;
            return 6;
        }
        fwrite(src.data(), 1, src.size(), f);
        fclose(f);
        // The precompiled header's directory goes before the include paths: GCC uses a
        // `.gch` only where it finds it before the header itself (placed after them, as
        // until 2026-12-06, it was never used and each kernel parsed the headers: 0.6 s a
        // kernel against 0.3 s).
        std::string full = flags + (pch.empty() ? "" : " -I" + quote(pch)) + includes +
                           " -shared -x c++ " + quote(cu) + runtime + " -o " + quote(tmp_so);
        std::string text;
        int rc = run_logged(full + (gold ? " -fuse-ld=gold" : ""), log, text);
        // gold linked the runtime alone; should it refuse a kernel's module, the default
        // linker gets its turn.
        if (rc != 0 && gold) {
            text.clear();
            rc = run_logged(full, log, text);
        }
        if (rc != 0 && !runtime_failed.empty())
            text += "\nkemu: the launch code (kemu_runtime.cpp) did not compile on its own:\n" +
                    runtime_failed;
        if (rc != 0) {
            p->log = "kemu: the host compiler refused the kernel (source kept in " + cu + ")\n" + text;
            return 6;
        }
        rename(tmp_so.c_str(), so.c_str());
        rename(cu.c_str(), (base + ".cpp").c_str());
    }
    p->module = "KEMU:" + so;
    return 0;
}
API nvrtcResult nvrtcGetProgramLogSize(Program *p, size_t *n) {
    *n = p->log.size() + 1;
    return 0;
}
API nvrtcResult nvrtcGetProgramLog(Program *p, char *out) {
    memcpy(out, p->log.c_str(), p->log.size() + 1);
    return 0;
}
API nvrtcResult nvrtcGetPTXSize(Program *p, size_t *n) {
    *n = p->module.size() + 1;
    return 0;
}
API nvrtcResult nvrtcGetPTX(Program *p, char *out) {
    memcpy(out, p->module.c_str(), p->module.size() + 1);
    return 0;
}
