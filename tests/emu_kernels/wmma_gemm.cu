// wmma_gemm.cu -- matrix products on tensor cores through nvcuda::wmma. Written for a real GPU
// (sm_80 or later for TF32): the tests compile this file unchanged with NVRTC for sm_80 and sm_90
// and run it on the emulator.
#include <mma.h>
#include <cuda_fp16.h>
using namespace nvcuda;

// C (M x N) = A (M x K) * B (K x N), all row-major float, M and N multiples of 16, K of 8.
// One warp per 16 x 16 tile of C (blockDim.x == 32, grid = (N / 16, M / 16)); the K dimension
// is walked 8 at a time, each A and B tile rounded to TF32 before the tensor-core product.
extern "C" __global__ void gemm_tf32(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ C,
                                     int M, int N, int K, int round_to_tf32) {
    const int tile_row = blockIdx.y * 16, tile_col = blockIdx.x * 16;
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k = 0; k < K; k += 8) {
        wmma::load_matrix_sync(a, A + tile_row * K + k, K);
        wmma::load_matrix_sync(b, B + k * N + tile_col, N);
        if (round_to_tf32) {
            for (int i = 0; i < a.num_elements; i++) a.x[i] = wmma::__float_to_tf32(a.x[i]);
            for (int i = 0; i < b.num_elements; i++) b.x[i] = wmma::__float_to_tf32(b.x[i]);
        }
        wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(C + tile_row * N + tile_col, acc, N, wmma::mem_row_major);
}

// The same with B given transposed in memory (column-major B, i.e. Bt row-major N x K), and C
// stored column-major: exercises the other layouts.
extern "C" __global__ void gemm_tf32_bt_colmajor_c(const float* __restrict__ A, const float* __restrict__ Bt,
                                                  float* __restrict__ Ct, int M, int N, int K) {
    const int tile_row = blockIdx.y * 16, tile_col = blockIdx.x * 16;
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k = 0; k < K; k += 8) {
        wmma::load_matrix_sync(a, A + tile_row * K + k, K);
        wmma::load_matrix_sync(b, Bt + tile_col * K + k, K);
        for (int i = 0; i < a.num_elements; i++) a.x[i] = wmma::__float_to_tf32(a.x[i]);
        for (int i = 0; i < b.num_elements; i++) b.x[i] = wmma::__float_to_tf32(b.x[i]);
        wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(Ct + tile_col * M + tile_row, acc, M, wmma::mem_col_major);
}

// FP16 inputs, FP32 accumulator: C = A * B + C0 with m16n16k16 tiles; A, B in __half.
extern "C" __global__ void gemm_fp16(const __half* __restrict__ A, const __half* __restrict__ B,
                                     const float* __restrict__ C0, float* __restrict__ C, int M, int N, int K) {
    const int tile_row = blockIdx.y * 16, tile_col = blockIdx.x * 16;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(acc, C0 + tile_row * N + tile_col, N, wmma::mem_row_major);
    for (int k = 0; k < K; k += 16) {
        wmma::load_matrix_sync(a, A + tile_row * K + k, K);
        wmma::load_matrix_sync(b, B + k * N + tile_col, N);
        wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(C + tile_row * N + tile_col, acc, N, wmma::mem_row_major);
}

// __float_to_tf32 and __float2half element by element.
extern "C" __global__ void convert(const float* __restrict__ x, float* __restrict__ tf32, __half* __restrict__ half_out,
                                   int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        tf32[i] = wmma::__float_to_tf32(x[i]);
        half_out[i] = __float2half(x[i]);
    }
}

// The GPU's preconditions: A at an offset (not 256-bit aligned), or an ldm that is not a
// multiple of 4 floats.
extern "C" __global__ void load_with(const float* __restrict__ A, float* __restrict__ C, int offset, int ldm) {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> b;
    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
    wmma::fill_fragment(b, 1.0f);
    wmma::fill_fragment(acc, 0.0f);
    wmma::load_matrix_sync(a, A + offset, ldm);
    wmma::mma_sync(acc, a, b, acc);
    wmma::store_matrix_sync(C, acc, 16, wmma::mem_row_major);
}

// Only the first 16 lanes of the warp reach the load: all 32 must.
extern "C" __global__ void load_by_half_a_warp(const float* __restrict__ A, float* __restrict__ C) {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
    if (threadIdx.x >= 16) return;
    wmma::load_matrix_sync(a, A, 8);
    C[threadIdx.x] = a.x[0];
}
