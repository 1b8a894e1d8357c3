// grid_index.cu -- every thread of a 3-D grid of 3-D blocks writes its own global (z, y, x)
// coordinates into a (D, H, W) volume: checks blockIdx/blockDim/threadIdx/gridDim in all axes.
extern "C" __global__ void write_coordinates(int* zyx, int depth, int height, int width) {
    const int x = blockIdx.x * blockDim.x + threadIdx.x;
    const int y = blockIdx.y * blockDim.y + threadIdx.y;
    const int z = blockIdx.z * blockDim.z + threadIdx.z;
    if (x >= width || y >= height || z >= depth) return;
    const int at = 3 * ((z * height + y) * width + x);
    zyx[at + 0] = z;
    zyx[at + 1] = y;
    zyx[at + 2] = x;
}

// How many threads the whole launch had, counted by every thread with an atomic.
extern "C" __global__ void count_threads(unsigned int* count) {
    const dim3 grid = gridDim;
    if (grid.x * grid.y * grid.z == 0) return;
    atomicAdd(count, 1u);
}

// The order threads ran in: slot k receives the linear id of the k-th thread to arrive.
extern "C" __global__ void arrival_order(int* order, int* next) {
    const int id = blockIdx.x * blockDim.x + threadIdx.x;
    order[atomicAdd(next, 1)] = id;
}
