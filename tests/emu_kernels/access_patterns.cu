// access_patterns.cu -- kernels whose memory counters are known by hand (tests/test_emulator_profile.py).

// Thread i copies element i: a warp reads 32 consecutive floats = 128 bytes = 4 sectors of 32
// bytes per request, and writes them the same way.
extern "C" __global__ void copy(const float* __restrict__ x, float* __restrict__ y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}

// Thread i reads element i * stride: with stride >= 8 floats every lane's float lies in its own
// sector, 32 sectors per request (the write stays coalesced).
extern "C" __global__ void strided_copy(const float* __restrict__ x, float* __restrict__ y, int n, int stride) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[(long long)i * stride];
}

// A 32 x 32 tile in shared memory, written by rows and read by columns: lane tx of row ty reads
// tile[tx][ty]. Rows are 32 floats = 128 bytes apart, so all 32 lanes of a warp hit the same bank
// at 32 different words: 32 wavefronts per read. With one float of padding per row
// (tile[32][33]) the 32 words fall into 32 different banks: 1 wavefront.
extern "C" __global__ void transpose_tile(const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float tile[32][32];
    const int tx = threadIdx.x, ty = threadIdx.y;
    tile[ty][tx] = x[ty * 32 + tx];
    __syncthreads();
    y[ty * 32 + tx] = tile[tx][ty];
}

extern "C" __global__ void transpose_tile_padded(const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float tile[32][33];
    const int tx = threadIdx.x, ty = threadIdx.y;
    tile[ty][tx] = x[ty * 32 + tx];
    __syncthreads();
    y[ty * 32 + tx] = tile[tx][ty];
}

// Every lane reads the same shared word: a broadcast, 1 wavefront.
extern "C" __global__ void broadcast(const float* __restrict__ x, float* __restrict__ y) {
    __shared__ float value[1];
    if (threadIdx.x == 0) value[0] = x[0];
    __syncthreads();
    y[threadIdx.x] = value[0];
}

// float4 loads of consecutive 16-byte vectors: a warp reads 512 bytes = 16 sectors per request.
extern "C" __global__ void copy_float4(const float4* __restrict__ x, float4* __restrict__ y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i];
}
