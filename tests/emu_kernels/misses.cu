// misses.cu -- bugs the first emulator let pass (issue 10, "find what a GPU lets pass"). Each
// kernel here ran without complaint there; the emulator now stops each with the kernel, thread,
// array or argument and source line. tests/test_emulator_checks.py checks every message.

// An index that jumps into another argument's buffer: a[i] with i far past a's end. Buffers sat
// next to each other, so a[5000] on an 8-element a silently read b.
extern "C" __global__ void read_far_past_end(const float* a, const float* b, float* out, int i) {
    out[threadIdx.x] = a[i] + b[0];
}

// The commonest halo bug of tiled kernels: t[r][8] of a float t[8][8] reads t[r+1][0], which is
// inside the array, so a check on the flattened array misses it. (The last row stays inside.)
extern "C" __global__ void halo_row_overrun(const float* x, float* y) {
    __shared__ float t[8][8];
    const int r = threadIdx.y, c = threadIdx.x;
    t[r][c] = x[r * 8 + c];
    __syncthreads();
    const float right = r < 7 ? t[r][c + 1] : 0.0f;  // bug: c + 1 == 8 for the last column
    y[r * 8 + c] = t[r][c] + right;
}

// A lost update: every thread adds to one shared sum without an atomic. Threads of the first
// emulator ran one after another between barriers, so the sum came out exactly right.
extern "C" __global__ void lost_update(const float* x, float* out) {
    __shared__ float s;
    if (threadIdx.x == 0) s = 0.0f;
    __syncthreads();
    s += x[threadIdx.x];  // bug: read-modify-write by every thread, no atomicAdd
    __syncthreads();
    if (threadIdx.x == 0) out[0] = s;
}

// The same sum with atomicAdd: correct, no hazard.
extern "C" __global__ void atomic_update(const float* x, float* out) {
    __shared__ float s;
    if (threadIdx.x == 0) s = 0.0f;
    __syncthreads();
    atomicAdd(&s, x[threadIdx.x]);
    __syncthreads();
    if (threadIdx.x == 0) out[0] = s;
}

// A shift in place: each thread reads its right neighbour and overwrites its own slot, so thread
// t may overwrite tile[t] before thread t-1 has read it (write-after-read).
extern "C" __global__ void shift_in_place(const float* x, float* y) {
    __shared__ float tile[64];
    const int t = threadIdx.x;
    tile[t] = x[t];
    __syncthreads();
    const float right = t < 63 ? tile[t + 1] : 0.0f;
    tile[t] = right;  // bug: needs a __syncthreads() between the read above and this write
    __syncthreads();
    y[t] = tile[t];
}

// Every thread writes its own index to one shared slot: the survivor depends on the order.
extern "C" __global__ void last_writer_wins(int* out) {
    __shared__ int winner;
    winner = (int)threadIdx.x;  // bug: write-after-write with different values
    __syncthreads();
    if (threadIdx.x == 0) out[0] = winner;
}

// Every thread writes the same value to one flag: deterministic, not reported.
extern "C" __global__ void same_value_flag(const float* x, int* out) {
    __shared__ int any_negative;
    if (threadIdx.x == 0) any_negative = 0;
    __syncthreads();
    if (x[threadIdx.x] < 0.0f) any_negative = 1;  // several threads may write 1: benign
    __syncthreads();
    if (threadIdx.x == 0) out[0] = any_negative;
}

// Global memory: every thread of every block writes its block's index to out[0].
extern "C" __global__ void global_last_writer(int* out) {
    out[0] = (int)blockIdx.x;  // bug: which block's write survives is up to the scheduler
}

// Global memory: block b reads what block b-1 wrote in the same launch (no grid-wide barrier).
extern "C" __global__ void read_other_blocks_output(const float* x, float* y, float* z) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    y[i] = 2.0f * x[i];
    if (blockIdx.x > 0) z[i] = y[i - blockDim.x];  // bug: y of block b-1 may not be written yet
}

// A float4 load from a pointer that is not 16-byte aligned: a GPU faults.
extern "C" __global__ void misaligned_float4(const float* x, float* y, int offset) {
    const float4 v = reinterpret_cast<const float4*>(x + offset)[threadIdx.x];
    y[threadIdx.x] = v.x + v.y + v.z + v.w;
}

// The same in shared memory: a float2 store at an odd float index.
extern "C" __global__ void misaligned_shared_float2(float* y) {
    __shared__ float buffer[66];
    reinterpret_cast<float2*>(&buffer[1 + 2 * threadIdx.x])[0] = make_float2(1.0f, 2.0f);  // bug: 4-byte aligned only
    __syncthreads();
    y[threadIdx.x] = buffer[1 + threadIdx.x];
}

// 52,000 bytes of static shared memory: ptxas refuses more than 48 KiB.
extern "C" __global__ void too_much_static_shared(float* y) {
    __shared__ float big[13000];
    big[threadIdx.x] = 1.0f;
    __syncthreads();
    y[threadIdx.x] = big[(threadIdx.x + 1) % blockDim.x];
}

// 40,000 static bytes are fine alone, but not with 16 KiB of dynamic shared memory on top.
extern "C" __global__ void static_plus_dynamic_shared(float* y) {
    extern __shared__ float extra[];
    __shared__ float table[10000];
    table[threadIdx.x] = 1.0f;
    extra[threadIdx.x] = 2.0f;
    __syncthreads();
    y[threadIdx.x] = table[threadIdx.x] + extra[threadIdx.x];
}
