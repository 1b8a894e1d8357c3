// emu_pipeline.h -- asynchronous global-to-shared copies (include/cuda_pipeline_primitives.h).
//
// Checked mode: each CUDA thread keeps its open batch and its committed batches of copies. A copy
// reads its source when issued and poisons its destination (0xFF bytes); __pipeline_wait_prior(N)
// completes the thread's oldest committed batches until at most N remain, writing the bytes then
// (a checked, race-recorded store by the waiting thread). Fast mode copies at once: a GPU may
// complete a copy at any time before the wait, and fast mode checks nothing.
#pragma once

#include <deque>
#include <vector>

namespace emu {

struct AsyncCopy { char* dst; uint32_t size, zfill; unsigned char bytes[16]; };
struct ThreadPipeline { uint64_t launch, block; std::vector<AsyncCopy> open; std::deque<std::vector<AsyncCopy>> committed; };
static std::vector<ThreadPipeline>* g_pipelines;  // checked mode: one per thread of the block
static uint64_t g_launch_serial;                  // tells a pipeline left by an earlier block or launch

EMU_NOSAN static ThreadPipeline& this_pipeline() {
    if (!g_pipelines) g_pipelines = new std::vector<ThreadPipeline>();
    if (g_pipelines->size() < g_nthreads) g_pipelines->resize(g_nthreads);
    ThreadPipeline& p = (*g_pipelines)[g_tid];
    if (p.launch != g_launch_serial || p.block != g_block_linear) {  // a new block: nothing in flight
        p.launch = g_launch_serial;
        p.block = g_block_linear;
        p.open.clear();
        p.committed.clear();
    }
    return p;
}

[[noreturn]] EMU_NOSAN static void fail_pipeline(const char* what, const void* pc) {
    Report r = blank_report();
    snprintf(r.text, sizeof r.text, "%s", what);
    r.pc = code_offset(pc);
    fail_with(DEVICE_ASSERT, r);
}

EMU_NOSAN void pipeline_copy(void* dst_shared, const void* src_global, size_t size, size_t zfill) {
    char* dst = (char*)dst_shared;
    const char* src = (const char*)src_global;
#if EMU_CHECKED
    const void* pc = __builtin_return_address(0);
    if (size != 4 && size != 8 && size != 16)
        fail_pipeline("__pipeline_memcpy_async: size_and_align must be 4, 8 or 16", pc);
    if (zfill > size) fail_pipeline("__pipeline_memcpy_async: zfill must not exceed size_and_align", pc);
    const uintptr_t d = (uintptr_t)dst, s = (uintptr_t)src;
    const int dz = zone_of(d), sz = zone_of(s);
    if (!(d - (uintptr_t)shared_base < g_shared_used || (dz >= 0 && dz == g_dynamic_zone)))
        fail_pipeline("__pipeline_memcpy_async: the destination is not shared memory", pc);
    if (sz < 0 || sz == g_dynamic_zone) fail_pipeline("__pipeline_memcpy_async: the source is not global memory", pc);
    if (s % size) fail_access(MISALIGNED, sz, s, size, 0, pc);
    if (d % size) {
        if (dz >= 0) fail_access(MISALIGNED, dz, d, size, 1, pc);
        fail_shared_access(MISALIGNED, d, size, 1, pc);
    }
    if (size > zfill) check(s, size - zfill, 0, pc);  // the read, now
    check(d, size, 1, pc, true);                    // the destination's bounds (its write comes at the wait)
    AsyncCopy c{dst, (uint32_t)size, (uint32_t)zfill, {}};
    memcpy(c.bytes, src, size - zfill);
    this_pipeline().open.push_back(c);
    memset(dst, 0xFF, size);  // unusable until the wait
#else
    memcpy(dst, src, size - zfill);
    memset(dst + (size - zfill), 0, zfill);
#endif
}

EMU_NOSAN void pipeline_commit() {
#if EMU_CHECKED
    ThreadPipeline& p = this_pipeline();
    p.committed.push_back(std::move(p.open));
    p.open.clear();
#endif
}

EMU_NOSAN void pipeline_wait(size_t prior) {
#if EMU_CHECKED
    const void* pc = __builtin_return_address(0);
    ThreadPipeline& p = this_pipeline();
    while (p.committed.size() > prior) {
        for (AsyncCopy& c : p.committed.front()) {
            check((uintptr_t)c.dst, c.size, 1, pc);  // the write, now, by this thread
            memcpy(c.dst, c.bytes, c.size - c.zfill);
            memset(c.dst + (c.size - c.zfill), 0, c.zfill);
        }
        p.committed.pop_front();
    }
#else
    (void)prior;
#endif
}

}  // namespace emu
