// cuda_pipeline_primitives.h -- the emulator's asynchronous copies from global to shared memory
// (CUDA C++ Programming Guide, "Pipeline Primitives Interface"; cp.async on compute capability 8.0
// and later): __pipeline_memcpy_async, __pipeline_commit, __pipeline_wait_prior.
//
// A copy is made when the thread issues it: the source is read then (bounds- and alignment-
// checked), and the destination is filled with 0xFF bytes (NaN as float) at once. The bytes land
// in shared memory only when the thread waits for the batch that holds the copy, so a kernel that
// reads the destination before __pipeline_wait_prior (or without any wait) reads NaN, as the
// mistake deserves. The race checker sees the write at the wait, by the waiting thread: other
// threads need a __syncthreads() after the wait before they read it, as on a GPU.
#pragma once

namespace emu {
void pipeline_copy(void* dst_shared, const void* src_global, size_t size_and_align, size_t zfill);
void pipeline_commit();
void pipeline_wait(size_t prior);
}  // namespace emu

// Copy size_and_align (4, 8 or 16) bytes, the last zfill of them as zeros, from global to shared
// memory; both addresses aligned to size_and_align.
static inline void __pipeline_memcpy_async(void* __restrict__ dst_shared, const void* __restrict__ src_global,
                                           size_t size_and_align, size_t zfill = 0) {
    emu::pipeline_copy(dst_shared, src_global, size_and_align, zfill);
}
// Close the thread's current batch of copies (an empty batch is a batch too).
static inline void __pipeline_commit() { emu::pipeline_commit(); }
// Wait until at most `prior` of the thread's committed batches are still in flight (the most
// recent ones); values over 8 count as 8, as in CUDA.
static inline void __pipeline_wait_prior(size_t prior) { emu::pipeline_wait(prior > 8 ? 8 : prior); }
