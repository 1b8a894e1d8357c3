// broken.cu -- kernels with the classic bugs, each of which a GPU would often let pass silently.
// The emulator's tests check that every one of them is caught.

// Off by one: `<=` lets thread n read a[n] and write c[n], one past the end of both.
extern "C" __global__ void copy_off_by_one(const float* a, float* c, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) c[i] = a[i];
}

// Reads in bounds, but writes one element past the end of c (a stencil that forgot its border).
extern "C" __global__ void write_past_end(const float* a, float* c, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) c[i + 1] = a[i];
}

// A left neighbour without a border check: thread 0 reads a[-1].
extern "C" __global__ void left_difference(const float* a, float* d, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) d[i] = a[i] - a[i - 1];
}

// block_sum (block_sum.cu) without the __syncthreads() inside the loop: a thread may read a partner's
// partial sum before or after the partner added to it, so the result depends on thread order.
extern "C" __global__ void block_sum_missing_sync(const float* x, float* out, int n) {
    __shared__ float partial[256];
    const int t = threadIdx.x;
    const int i = blockIdx.x * 256 + t;
    partial[t] = i < n ? x[i] : 0.0f;
    __syncthreads();
    for (int stride = 128; stride > 0; stride /= 2) {
        if (t < stride) partial[t] += partial[t + stride];
        // missing: __syncthreads();
    }
    if (t == 0) atomicAdd(out, partial[0]);
}

// A neighbour read from shared memory where the last slot is never written: y[last] reads garbage
// on a GPU (whatever the previous block left), NaN on the emulator.
extern "C" __global__ void shared_neighbour_unwritten(const float* x, float* y, int n) {
    __shared__ float tile[128];
    const int t = threadIdx.x;
    const int i = blockIdx.x * blockDim.x + t;
    if (t < blockDim.x - 1) tile[t] = i < n ? x[i] : 0.0f;  // bug: slot blockDim.x-1 stays unwritten
    __syncthreads();
    if (i < n) y[i] = tile[t] + tile[min(t + 1, (int)blockDim.x - 1)];
}

// Out-of-range threads return before a barrier the others wait at.
extern "C" __global__ void early_return_before_barrier(const float* x, float* y, int n) {
    __shared__ float tile[64];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    tile[threadIdx.x] = x[i];
    __syncthreads();
    y[i] = tile[(threadIdx.x + 1) % blockDim.x];
}

// A barrier inside a branch: even and odd threads wait at different __syncthreads().
extern "C" __global__ void divergent_barrier(float* y) {
    if (threadIdx.x % 2 == 0) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    y[threadIdx.x] = 1.0f;
}

// A device-side assert that fails for one thread.
extern "C" __global__ void checked_positive(const float* x, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) assert(x[i] > 0.0f);
}

// Integer division by a zero the caller passed.
extern "C" __global__ void divide_by(int* y, int d) { y[threadIdx.x] = 100 / d; }

// A store through a garbage pointer (here: an address the caller passes in): a fault outside
// every buffer. (A literal null store would be deleted by the optimizer as undefined behaviour.)
extern "C" __global__ void store_to_address(unsigned long long address) {
    if (threadIdx.x == 3) *(volatile float*)address = 1.0f;
}

// Too much dynamic shared memory indexing: writes one float past shared_mem bytes.
extern "C" __global__ void dynamic_shared_overrun(float* y) {
    extern __shared__ float scratch[];
    scratch[threadIdx.x + 1] = 1.0f;  // bug: thread blockDim.x-1 writes past the buffer
    __syncthreads();
    y[threadIdx.x] = scratch[threadIdx.x];
}

// A static shared tile one element too small: the last thread writes tile[64].
extern "C" __global__ void shared_tile_too_small(const float* x, float* y) {
    __shared__ float tile[64];
    tile[threadIdx.x + 1] = x[threadIdx.x];  // bug: should be tile[threadIdx.x]
    __syncthreads();
    y[threadIdx.x] = tile[threadIdx.x];
}

// Writing through a const parameter (casting the const away): the caller's input changes.
extern "C" __global__ void write_through_const(const float* x) {
    const_cast<float*>(x)[threadIdx.x] = 0.0f;
}

// 128 KiB of local memory per thread: more than an emulator fiber's 64 KiB stack.
extern "C" __global__ void huge_local_array(float* y, int n) {
    volatile float scratch[32 * 1024];
    __syncthreads();  // (makes the threads run as fibers, on their own small stacks)
    for (int i = 0; i < n; ++i) scratch[i] = (float)i;
    y[threadIdx.x] = scratch[n - 1];
}

// The same bugs with the shared array declared in a *template* device function, as conv3x3.cu's
// tiled kernels do (GCC ignores a linker-section attribute on a template's static locals, so the
// emulator must not rely on one to find, poison and check shared memory).
template <int TILE>
__device__ void neighbour_sum_in_template(const float* x, float* y, int n) {
    __shared__ float tile[TILE];
    const int t = threadIdx.x;
    const int i = blockIdx.x * blockDim.x + t;
    if (t < blockDim.x - 1) tile[t] = i < n ? x[i] : 0.0f;  // bug: slot blockDim.x-1 stays unwritten
    __syncthreads();
    if (i < n) y[i] = tile[t] + tile[min(t + 1, (int)blockDim.x - 1)];
}
extern "C" __global__ void shared_neighbour_unwritten_template(const float* x, float* y, int n) {
    neighbour_sum_in_template<128>(x, y, n);
}

template <int TILE>
__device__ void copy_through_small_tile(const float* x, float* y) {
    __shared__ float tile[TILE];
    tile[threadIdx.x + 1] = x[threadIdx.x];  // bug: should be tile[threadIdx.x]
    __syncthreads();
    y[threadIdx.x] = tile[threadIdx.x];
}
extern "C" __global__ void shared_tile_too_small_template(const float* x, float* y) {
    copy_through_small_tile<64>(x, y);
}

// Only block 0 fills the tile; every other block reads it anyway. On a GPU those blocks may see
// what block 0 left (if they share its multiprocessor) or anything else; the emulator gives NaN.
template <int TILE>
__device__ void read_block_zeros_tile(const float* x, float* y) {
    __shared__ float tile[TILE];
    if (blockIdx.x == 0) tile[threadIdx.x] = x[threadIdx.x];  // bug: the other blocks never write it
    __syncthreads();
    y[blockIdx.x * blockDim.x + threadIdx.x] = tile[threadIdx.x];
}
extern "C" __global__ void shared_left_by_another_block_template(const float* x, float* y) {
    read_block_zeros_tile<32>(x, y);
}
