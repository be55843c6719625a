// kiln's CUDA emulator: `nvcuda::wmma` with the whole tile in every lane. Lanes load the
// same tile from the same (warp-uniform) pointer, so their fragments agree; `mma_sync`
// multiplies in the accumulator's type, summing k in order. A store is shared out: lane
// l writes the elements whose index is l modulo 32, so a lane that reads what the store
// wrote without a `__syncwarp` between sees stale values in some schedule, as on a GPU.
// Pointers must be 32-byte aligned and `ldm` a multiple of 16 bytes (the API's rules);
// a violation fails the launch.
#pragma once
#include "kemu_device.h"
#include "kemu_half.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}

template <typename Use, int M, int N, int K> struct shape;
template <int M, int N, int K> struct shape<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K> struct shape<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K> struct shape<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};
template <typename T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static constexpr int rows = shape<Use, M, N, K>::rows;
    static constexpr int cols = shape<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols;
    using element_type = typename storage<T>::type;
    // Row-major: element (r, c) at x[r * cols + c].
    element_type x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L> &f, const V &v) {
    for (int i = 0; i < f.num_elements; i++) f.x[i] = (typename storage<T>::type)v;
}

template <typename P> inline void check_operand(const P *p, unsigned ldm, const char *what) {
    if ((uintptr_t)p % 32 != 0) kemu::report(what);
    if (ldm * sizeof(P) % 16 != 0) kemu::report("wmma: ldm is not a multiple of 16 bytes");
}

template <typename F, typename P> inline void load(F &f, const P *p, unsigned ldm, bool row) {
    check_operand(p, ldm, "wmma: load_matrix_sync from a pointer not 32-byte aligned");
    for (int r = 0; r < F::rows; r++)
        for (int c = 0; c < F::cols; c++)
            f.x[r * F::cols + c] =
                (typename F::element_type)(row ? p[(size_t)r * ldm + c] : p[(size_t)c * ldm + r]);
}
template <typename Use, int M, int N, int K, typename T, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, row_major> &f, const P *p, unsigned ldm) {
    load(f, p, ldm, true);
}
template <typename Use, int M, int N, int K, typename T, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, col_major> &f, const P *p, unsigned ldm) {
    load(f, p, ldm, false);
}
template <int M, int N, int K, typename T, typename P>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T, void> &f, const P *p,
                             unsigned ldm, layout_t layout) {
    load(f, p, ldm, layout == mem_row_major);
}
template <int M, int N, int K, typename T, typename P>
inline void store_matrix_sync(P *p, const fragment<accumulator, M, N, K, T, void> &f,
                              unsigned ldm, layout_t layout) {
    using F = fragment<accumulator, M, N, K, T, void>;
    check_operand(p, ldm, "wmma: store_matrix_sync to a pointer not 32-byte aligned");
    for (int r = 0; r < F::rows; r++)
        for (int c = 0; c < F::cols; c++) {
            if ((unsigned)(r * F::cols + c) % 32 != kemu::lane()) continue;
            P v = (P)f.x[r * F::cols + c];
            if (layout == mem_row_major)
                p[(size_t)r * ldm + c] = v;
            else
                p[(size_t)c * ldm + r] = v;
        }
}
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC, void> &d,
                     const fragment<matrix_a, M, N, K, TA, LA> &a,
                     const fragment<matrix_b, M, N, K, TB, LB> &b,
                     const fragment<accumulator, M, N, K, TC, void> &c) {
    using Acc = typename storage<TC>::type;
    Acc out[M * N];
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            Acc s = c.x[i * N + j];
            for (int k = 0; k < K; k++) s += (Acc)a.x[i * K + k] * (Acc)b.x[k * N + j];
            out[i * N + j] = s;
        }
    for (int i = 0; i < M * N; i++) d.x[i] = out[i];
}
} // namespace wmma
} // namespace nvcuda
