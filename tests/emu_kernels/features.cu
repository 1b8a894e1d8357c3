// features.cu -- CUDA C features the real kernels use: __device__ helpers, uint32_t arithmetic
// modulo 2^32, #pragma unroll, 2-D blocks with a 2-D shared tile and barriers.
#include <stdint.h>

#define TILE 8

// docs/backends.md's counter-based hash ("lowbias32"): u in [0, 1) from (index, seed).
__device__ __forceinline__ uint32_t lowbias32(uint32_t h) {
    h ^= h >> 16; h *= 0x7FEB352Du;
    h ^= h >> 15; h *= 0x846CA68Bu;
    h ^= h >> 16;
    return h;
}

extern "C" __global__ void hash_uniform(float* __restrict__ u, unsigned int seed, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const uint32_t h = lowbias32((uint32_t)i + seed * 0x9E3779B9u);
    u[i] = (float)(h >> 8) * (1.0f / 16777216.0f);
}

// out (W, H) = transpose of in (H, W), through a padded shared tile (the +1 avoids bank conflicts
// on a GPU). Every thread loads one element, the block waits, every thread stores one element.
extern "C" __global__ void transpose(const float* __restrict__ in, float* __restrict__ out, int height, int width) {
    __shared__ float tile[TILE][TILE + 1];
    const dim3 corner(blockIdx.x * TILE, blockIdx.y * TILE);
    int x = corner.x + threadIdx.x, y = corner.y + threadIdx.y;
    if (x < width && y < height) tile[threadIdx.y][threadIdx.x] = in[y * width + x];
    __syncthreads();
    x = corner.y + threadIdx.x;
    y = corner.x + threadIdx.y;
#pragma unroll
    for (int k = 0; k < 1; ++k) {
        if (x < height && y < width) out[y * height + x] = tile[threadIdx.x][threadIdx.y];
    }
}
