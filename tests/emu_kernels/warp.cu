// warp.cu -- warp-level code: shuffles, votes, __syncwarp. Written for a real GPU: the tests
// compile this file unchanged with NVRTC for sm_80 and sm_90 and run it on the emulator.

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

// The classic warp reduction: each warp sums its 32 values with 5 __shfl_down_sync steps, lane 0
// of every warp writes the warp's sum to shared memory, and the first warp sums those with
// __shfl_xor_sync (after which every lane of it holds the total).
__device__ float warp_sum_down(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(FULL_MASK, v, offset);
    return v;
}
__device__ float warp_sum_xor(float v) {
    for (int mask = 16; mask > 0; mask /= 2) v += __shfl_xor_sync(FULL_MASK, v, mask);
    return v;
}

extern "C" __global__ void block_reduce(const float* __restrict__ x, float* __restrict__ out, int n) {
    __shared__ float warp_sums[32];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = warp_sum_down(i < n ? x[i] : 0.0f);
    if (lane_id() == 0) warp_sums[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        const int warps = (blockDim.x + 31) / 32;
        v = warp_sum_xor(lane_id() < warps ? warp_sums[lane_id()] : 0.0f);
        if (threadIdx.x == 0) out[blockIdx.x] = v;
    }
}

// One shuffle of every kind per thread: value[t] is what thread t passes; out[4 t + k] is what it
// gets back from __shfl_sync (k = 0), _up (1), _down (2), _xor (3) with the given arguments.
extern "C" __global__ void shuffle_all(const int* __restrict__ value, int* __restrict__ out, int src_lane,
                                       unsigned delta, int lane_mask, int width) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const int v = value[t];
    out[4 * t + 0] = __shfl_sync(FULL_MASK, v, src_lane, width);
    out[4 * t + 1] = __shfl_up_sync(FULL_MASK, v, delta, width);
    out[4 * t + 2] = __shfl_down_sync(FULL_MASK, v, delta, width);
    out[4 * t + 3] = __shfl_xor_sync(FULL_MASK, v, lane_mask, width);
}

// 64-bit values go through the same lanes (a double is two 32-bit shuffles on a GPU).
extern "C" __global__ void shuffle_double(const double* __restrict__ value, double* __restrict__ out, int src_lane) {
    out[threadIdx.x] = __shfl_sync(FULL_MASK, value[threadIdx.x], src_lane);
}

// Votes: ballot/any/all over the warp, and __activemask() inside a branch taken by lanes < k.
extern "C" __global__ void votes(const int* __restrict__ predicate, unsigned* __restrict__ ballot,
                                 int* __restrict__ any, int* __restrict__ all, unsigned* __restrict__ active, int k) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const int p = predicate[t];
    ballot[t] = __ballot_sync(FULL_MASK, p);
    any[t] = __any_sync(FULL_MASK, p);
    all[t] = __all_sync(FULL_MASK, p);
    unsigned mask = 0;
    if (lane_id() < k) mask = __activemask();
    active[t] = mask;
}

// A partial mask: only the lower half-warp shuffles, among itself.
extern "C" __global__ void half_warp_broadcast(const int* __restrict__ value, int* __restrict__ out) {
    const int t = threadIdx.x;
    int v = value[t];
    if (lane_id() < 16) v = __shfl_sync(0x0000ffffu, v, 3);
    out[t] = v;
}

// The last step of a block reduction done by one warp in shared memory: correct only with the
// __syncwarp() calls, which order the lanes' shared-memory accesses (Volta and later run the
// lanes of a warp independently, so "warp-synchronous" code without them is a race).
extern "C" __global__ void warp_shared_reduce(const float* __restrict__ x, float* __restrict__ out, int with_syncwarp) {
    __shared__ float s[64];
    const int t = threadIdx.x;  // blockDim.x == 32
    s[t] = x[t];
    s[t + 32] = x[t + 32];
    __syncwarp();
    for (int stride = 32; stride > 0; stride /= 2) {
        float v = 0.0f;
        if (t < stride) v = s[t] + s[t + stride];
        if (with_syncwarp) __syncwarp();
        if (t < stride) s[t] = v;
        if (with_syncwarp) __syncwarp();
    }
    if (t == 0) out[0] = s[0];
}

// ---- misuse ------------------------------------------------------------------------------------
// Every lane calls with a mask that names only the lower half: lanes 16..31 are not in their own mask.
extern "C" __global__ void lane_outside_mask(const int* __restrict__ value, int* __restrict__ out) {
    out[threadIdx.x] = __shfl_sync(0x0000ffffu, value[threadIdx.x], 0);
}

// The two halves of a warp call __shfl_sync with the full mask from different lines.
extern "C" __global__ void shuffles_at_different_lines(const int* __restrict__ value, int* __restrict__ out) {
    int v = value[threadIdx.x];
    if (lane_id() < 16) {
        v = __shfl_sync(FULL_MASK, v, 0);  // lower half
    } else {
        v = __shfl_sync(FULL_MASK, v, 1);  // upper half
    }
    out[threadIdx.x] = v;
}

// Lanes 0..15 shuffle with the full mask while the others wait at a block barrier.
extern "C" __global__ void shuffle_against_barrier(const int* __restrict__ value, int* __restrict__ out) {
    int v = value[threadIdx.x];
    if (lane_id() < 16) v = __shfl_sync(FULL_MASK, v, 0);
    else __syncthreads();
    out[threadIdx.x] = v;
}

// A width that is not a power of two.
extern "C" __global__ void shuffle_width_three(const int* __restrict__ value, int* __restrict__ out) {
    out[threadIdx.x] = __shfl_sync(FULL_MASK, value[threadIdx.x], 0, 3);
}

// A block of 48 threads: the second warp has 16 lanes, so __shfl_down_sync reads lanes that do
// not exist. A GPU returns an undefined value; the emulator returns NaN, so the sum shows it.
extern "C" __global__ void reduce_partial_warp(const float* __restrict__ x, float* __restrict__ out) {
    const float v = warp_sum_down(x[threadIdx.x]);
    if (lane_id() == 0) out[threadIdx.x / 32] = v;
}
