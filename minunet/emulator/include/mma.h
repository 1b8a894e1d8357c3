// mma.h -- the emulator's nvcuda::wmma (CUDA C++ Programming Guide, "Warp Matrix Functions"):
// TF32 (m16n16k8) and FP16 (m16n16k16, m32n8k16, m8n32k16) fragments, fill_fragment,
// load_matrix_sync, store_matrix_sync, mma_sync and __float_to_tf32, with the same names,
// template parameters and num_elements as CUDA 13's <mma.h>, so one source compiles for both.
//
// How a warp-wide operation runs on fibers: every lane of the warp calls it; the call parks the
// lane until all 32 have arrived at the same call (emu::warp_collective), checking that they all
// pass the same pointer, ldm and layout. Loads and stores are then done by each lane for its own
// share of the matrix (so they are bounds-, race- and alignment-checked like any access); mma_sync
// is computed once for the whole warp from every lane's fragments.
//
// The fragment layout is CUDA's secret ("the mapping of matrix elements into fragment storage is
// unspecified"); here lane l holds the elements l*U .. l*U+U-1 of the matrix in row-major order
// (U = rows*cols/32). Where CUDA's fragment has more elements than that (num_elements 16 for an
// FP16 matrix_a of 16x16, whose lanes hold duplicates), element i holds the same value as
// element i % U, so element-wise code over x[0..num_elements) works the same.
//
// The GPU's preconditions are checked: the pointer must be 256-bit (32-byte) aligned (checked
// mode) and ldm a multiple of 8 for __half and 4 for float (16 bytes), and all 32 lanes must take
// part.
//
// Numerics: each product is exact, and each element of D = A*B + C is the exact sum rounded once
// to the accumulator type (a GPU's tensor cores add in an unspecified order with their own
// rounding, so compare with a tolerance). TF32 inputs: mma_sync uses the upper 19 bits of each
// float (sign, exponent, 10 mantissa bits), as the hardware does; convert with __float_to_tf32
// (round to nearest, ties away from zero) to round rather than truncate.
#pragma once

#include <cuda_fp16.h>

namespace nvcuda {
namespace wmma {

// cvt.rna.tf32.f32: round to 10 mantissa bits, to nearest, ties away from zero; the low 13 bits
// of the result are zero. Infinities and NaNs pass through (a NaN stays a NaN).
static inline float __float_to_tf32(float in) {
    uint32_t x;
    memcpy(&x, &in, 4);
    if ((x & 0x7F800000u) != 0x7F800000u) {  // finite: add half an ulp of tf32 to the magnitude, cut
        x += 0x1000u;
        x &= 0xFFFFE000u;
    }
    float out;
    memcpy(&out, &x, 4);
    return out;
}

struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;
namespace precision { struct tf32; }
enum layout_t { mem_row_major, mem_col_major };

template <typename T> struct helper_traits { typedef T element_type; typedef T storage_element_type; typedef T fill_argument_type; };
template <> struct helper_traits<precision::tf32> {
    typedef precision::tf32 element_type;
    typedef float storage_element_type;
    typedef float fill_argument_type;
};

template <typename T, int size, int packed_size = size>
struct __align__(8) __frag_base {
    enum { num_elements = size };
    enum { num_storage_elements = packed_size };
    typedef T element_type;
    typedef typename helper_traits<T>::storage_element_type storage_element_type;
    storage_element_type x[num_storage_elements];
};

template <typename FragEleType, int size, int packed_size>
static inline void fill_fragment(__frag_base<FragEleType, size, packed_size>& f,
                                 const typename helper_traits<FragEleType>::fill_argument_type& in) {
    for (int i = 0; i < f.num_storage_elements; i++) f.x[i] = in;
}

template <typename Use, int m, int n, int k, typename T, typename Layout = void> class fragment;

// The matrix a fragment holds: matrix_a is m x k, matrix_b k x n, the accumulator m x n.
template <typename Use, int m, int n, int k> struct shape;
template <int m, int n, int k> struct shape<matrix_a, m, n, k> { enum { rows = m, cols = k, use = 0 }; };
template <int m, int n, int k> struct shape<matrix_b, m, n, k> { enum { rows = k, cols = n, use = 1 }; };
template <int m, int n, int k> struct shape<accumulator, m, n, k> { enum { rows = m, cols = n, use = 2 }; };

#define EMU_WMMA_FRAGMENT(Use, m, n, k, T, L, size)                                                  \
    template <> class fragment<Use, m, n, k, T, L> : public __frag_base<T, size> {                   \
      public:                                                                                        \
        typedef shape<Use, m, n, k> emu_shape;                                                       \
        enum { emu_rows = emu_shape::rows, emu_cols = emu_shape::cols,                               \
               emu_unique = emu_shape::rows * emu_shape::cols / 32 };                                \
    };
// FP16 (the sizes of CUDA 13's <mma.h>)
EMU_WMMA_FRAGMENT(matrix_a, 16, 16, 16, __half, row_major, 16)
EMU_WMMA_FRAGMENT(matrix_a, 16, 16, 16, __half, col_major, 16)
EMU_WMMA_FRAGMENT(matrix_b, 16, 16, 16, __half, row_major, 16)
EMU_WMMA_FRAGMENT(matrix_b, 16, 16, 16, __half, col_major, 16)
EMU_WMMA_FRAGMENT(accumulator, 16, 16, 16, __half, void, 8)
EMU_WMMA_FRAGMENT(accumulator, 16, 16, 16, float, void, 8)
EMU_WMMA_FRAGMENT(matrix_a, 32, 8, 16, __half, row_major, 16)
EMU_WMMA_FRAGMENT(matrix_a, 32, 8, 16, __half, col_major, 16)
EMU_WMMA_FRAGMENT(matrix_b, 32, 8, 16, __half, row_major, 16)
EMU_WMMA_FRAGMENT(matrix_b, 32, 8, 16, __half, col_major, 16)
EMU_WMMA_FRAGMENT(accumulator, 32, 8, 16, __half, void, 8)
EMU_WMMA_FRAGMENT(accumulator, 32, 8, 16, float, void, 8)
EMU_WMMA_FRAGMENT(matrix_a, 8, 32, 16, __half, row_major, 16)
EMU_WMMA_FRAGMENT(matrix_a, 8, 32, 16, __half, col_major, 16)
EMU_WMMA_FRAGMENT(matrix_b, 8, 32, 16, __half, row_major, 16)
EMU_WMMA_FRAGMENT(matrix_b, 8, 32, 16, __half, col_major, 16)
EMU_WMMA_FRAGMENT(accumulator, 8, 32, 16, __half, void, 8)
EMU_WMMA_FRAGMENT(accumulator, 8, 32, 16, float, void, 8)
// TF32
EMU_WMMA_FRAGMENT(matrix_a, 16, 16, 8, precision::tf32, row_major, 4)
EMU_WMMA_FRAGMENT(matrix_a, 16, 16, 8, precision::tf32, col_major, 4)
EMU_WMMA_FRAGMENT(matrix_b, 16, 16, 8, precision::tf32, row_major, 4)
EMU_WMMA_FRAGMENT(matrix_b, 16, 16, 8, precision::tf32, col_major, 4)
EMU_WMMA_FRAGMENT(accumulator, 16, 16, 8, float, void, 8)
#undef EMU_WMMA_FRAGMENT

// ---- The emulator's side -----------------------------------------------------------------------
namespace detail {
template <typename L> struct is_col_major { enum { value = 0 }; };
template <> struct is_col_major<col_major> { enum { value = 1 }; };

static inline int lane() {
    return (int)((threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) & 31u);
}
// Lane l's element i is the row-major element e(l, i) of the fragment's matrix.
template <class F> static inline int element(int l, int i) { return l * F::emu_unique + i % F::emu_unique; }

template <class F> static inline int kind() { return F::emu_shape::use * 1000000 + F::emu_rows * 1000 + F::emu_cols; }

// Park until all 32 lanes arrive with the same arguments; check the GPU's preconditions first.
template <class F, class S>
static inline void rendezvous(int op, const S* p, unsigned ldm, int layout, int line, const char* what) {
    emu::WarpCall c{};
    c.op = op; c.mask = 0xffffffffu; c.line = line; c.what = what;
    c.pointer = p; c.ldm = ldm; c.arg = layout; c.kind = kind<F>();
#if EMU_CHECKED  // (fast mode may work on the NumPy memory itself, which is not 256-byte aligned)
    if ((uintptr_t)p % 32 != 0)
        emu::warp_precondition(&c, "the matrix pointer must be 256-bit (32-byte) aligned");
#endif
    if (ldm % (16 / sizeof(S)) != 0)
        emu::warp_precondition(&c, sizeof(S) == 2 ? "ldm must be a multiple of 8 for __half elements"
                                                  : "ldm must be a multiple of 4 for float elements");
    emu::warp_collective(&c);
}

template <class T> static inline double value_of(T v) { return (double)v; }
static inline double value_of(__half v) { return (double)__half2float(v); }
// What the tensor cores read of a TF32 operand: the upper 19 bits of the float.
static inline double tf32_operand(float v) {
    uint32_t x;
    memcpy(&x, &v, 4);
    x &= 0xFFFFE000u;
    float t;
    memcpy(&t, &x, 4);
    return (double)t;
}
template <class T> static inline void store_value(T& out, double v) { out = (T)v; }
static inline void store_value(__half& out, double v) { out.__x = emu::double_to_half_bits(v, 0); }

template <class FD, class FA, class FB, class FC, bool TF32>
static void mma_compute(emu::WarpCall* const* lanes) {
    enum { M = FA::emu_rows, K = FA::emu_cols, N = FB::emu_cols };
    static_assert(FB::emu_rows == K && FC::emu_rows == M && FC::emu_cols == N, "fragment shapes do not match");
    double a[M * K], b[K * N], c[M * N];
    for (int l = 0; l < 32; ++l) {
        const FA& fa = *static_cast<const FA*>(lanes[l]->fragments[1]);
        const FB& fb = *static_cast<const FB*>(lanes[l]->fragments[2]);
        const FC& fc = *static_cast<const FC*>(lanes[l]->fragments[3]);
        for (int i = 0; i < FA::emu_unique; ++i)
            a[element<FA>(l, i)] = TF32 ? tf32_operand((float)fa.x[i]) : value_of(fa.x[i]);
        for (int i = 0; i < FB::emu_unique; ++i)
            b[element<FB>(l, i)] = TF32 ? tf32_operand((float)fb.x[i]) : value_of(fb.x[i]);
        for (int i = 0; i < FC::emu_unique; ++i) c[element<FC>(l, i)] = value_of(fc.x[i]);
    }
    for (int l = 0; l < 32; ++l) {  // D may be C (d and c are often the same fragment): c is copied
        FD& fd = *static_cast<FD*>(lanes[l]->fragments[0]);
        for (int i = 0; i < FD::num_elements; ++i) {
            const int e = element<FD>(l, i), r = e / N, col = e % N;
            double sum = c[e];  // products of 11-bit significands are exact in double, and so are
            for (int q = 0; q < K; ++q) sum += a[r * K + q] * b[q * N + col];  // these short sums
            store_value(fd.x[i], sum);
        }
    }
}
}  // namespace detail

// ---- load_matrix_sync / store_matrix_sync ------------------------------------------------------
template <typename Use, int m, int n, int k, typename T, typename L,
          class = std::enable_if_t<!std::is_same_v<Use, accumulator>>>
static inline void load_matrix_sync(fragment<Use, m, n, k, T, L>& a,
                                    const typename helper_traits<T>::storage_element_type* p, unsigned ldm,
                                    int line = __builtin_LINE()) {
    typedef fragment<Use, m, n, k, T, L> F;
    const int col = detail::is_col_major<L>::value;
    detail::rendezvous<F>(emu::OP_WMMA_LOAD, p, ldm, col, line, "wmma::load_matrix_sync");
    const int l = detail::lane();
    for (int i = 0; i < F::num_elements; ++i) {
        const int e = detail::element<F>(l, i), r = e / F::emu_cols, c = e % F::emu_cols;
        a.x[i] = col ? p[r + (size_t)c * ldm] : p[(size_t)r * ldm + c];
    }
}
// matrix_a and matrix_b take their layout from the fragment type: a layout argument is an error.
template <typename Use, int m, int n, int k, typename T, typename L,
          class = std::enable_if_t<!std::is_same_v<Use, accumulator>>>
void load_matrix_sync(fragment<Use, m, n, k, T, L>& a, const typename helper_traits<T>::storage_element_type* p,
                      unsigned ldm, layout_t layout) = delete;

template <int m, int n, int k, typename T>
static inline void load_matrix_sync(fragment<accumulator, m, n, k, T>& a, const T* p, unsigned ldm, layout_t layout,
                                    int line = __builtin_LINE()) {
    typedef fragment<accumulator, m, n, k, T> F;
    const int col = layout == mem_col_major;
    detail::rendezvous<F>(emu::OP_WMMA_LOAD, p, ldm, col, line, "wmma::load_matrix_sync");
    const int l = detail::lane();
    for (int i = 0; i < F::num_elements; ++i) {
        const int e = detail::element<F>(l, i), r = e / F::emu_cols, c = e % F::emu_cols;
        a.x[i] = col ? p[r + (size_t)c * ldm] : p[(size_t)r * ldm + c];
    }
}

template <int m, int n, int k, typename T>
static inline void store_matrix_sync(T* p, const fragment<accumulator, m, n, k, T>& a, unsigned ldm, layout_t layout,
                                     int line = __builtin_LINE()) {
    typedef fragment<accumulator, m, n, k, T> F;
    const int col = layout == mem_col_major;
    detail::rendezvous<F>(emu::OP_WMMA_STORE, p, ldm, col, line, "wmma::store_matrix_sync");
    const int l = detail::lane();
    for (int i = 0; i < F::emu_unique; ++i) {
        const int e = detail::element<F>(l, i), r = e / F::emu_cols, c = e % F::emu_cols;
        (col ? p[r + (size_t)c * ldm] : p[(size_t)r * ldm + c]) = a.x[i];
    }
}

// ---- mma_sync: D = A * B + C for the whole warp -------------------------------------------------
template <int m, int n, int k, typename TD, typename TA, typename LA, typename LB, typename TC>
static inline void mma_sync(fragment<accumulator, m, n, k, TD>& d, const fragment<matrix_a, m, n, k, TA, LA>& a,
                            const fragment<matrix_b, m, n, k, TA, LB>& b, const fragment<accumulator, m, n, k, TC>& c,
                            int line = __builtin_LINE()) {
    typedef fragment<accumulator, m, n, k, TD> FD;
    typedef fragment<matrix_a, m, n, k, TA, LA> FA;
    typedef fragment<matrix_b, m, n, k, TA, LB> FB;
    typedef fragment<accumulator, m, n, k, TC> FC;
    emu::WarpCall call{};
    call.op = emu::OP_WMMA_MMA; call.mask = 0xffffffffu; call.line = line; call.what = "wmma::mma_sync";
    call.kind = detail::kind<FD>();
    call.arg = 2 * m * n * k;  // the warp's FLOPs, for the profiler
    call.fragments[0] = &d;
    call.fragments[1] = const_cast<FA*>(&a);
    call.fragments[2] = const_cast<FB*>(&b);
    call.fragments[3] = const_cast<FC*>(&c);
    call.compute = &detail::mma_compute<FD, FA, FB, FC, std::is_same_v<TA, precision::tf32>>;
    emu::warp_collective(&call);
}

}  // namespace wmma
}  // namespace nvcuda
