// emu_sched.h -- running the threads of one block: a plain loop, or fibers with real barrier and
// warp-collective semantics.
//
// A block's threads run either
//   - in a plain loop, one CUDA thread after another (fast; used while a kernel has never reached
//     a __syncthreads() or a warp collective), or
//   - as fibers, one small stack per CUDA thread (64 KiB, a 15-instruction context switch on
//     x86-64, ucontext elsewhere). The scheduler runs every ready fiber until it parks -- at a
//     barrier, at a warp collective, or at its end -- then completes the warp collectives whose
//     lanes have all arrived (each lane's result computed at once, as the hardware does), runs
//     the lanes it released, and so on; when nothing can run and every live thread waits at the
//     same __syncthreads(), it releases the barrier.
// A kernel that reaches a barrier or warp collective in loop mode aborts the attempt; the launch
// restarts in fiber mode from fresh copies of the arguments, and the Python side remembers to use
// fibers for that kernel from then on. In checked mode the order of threads is shuffled at every
// pass from a seed, so a result that depends on an order a GPU does not promise changes with it.
#pragma once

namespace emu {

static const size_t kStackBytes = 64 * 1024;
enum FiberState : int { READY, AT_BARRIER, AT_WARP, DONE };
static const size_t g_page_bytes = (size_t)sysconf(_SC_PAGESIZE);

#if defined(__x86_64__)
extern "C" __attribute__((visibility("hidden"))) void emu_ctx_switch(void** save_sp, void* next_sp);
extern "C" __attribute__((visibility("hidden"))) void emu_fiber_trampoline();
asm(R"(
    .text
    .p2align 4
    .hidden emu_ctx_switch
    .type emu_ctx_switch, @function
emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_ctx_switch, .-emu_ctx_switch
    .p2align 4
    .hidden emu_fiber_trampoline
    .type emu_fiber_trampoline, @function
emu_fiber_trampoline:
    callq *%r12
    ud2
    .size emu_fiber_trampoline, .-emu_fiber_trampoline
)");
struct Fiber { void* sp; int state; int line; WarpCall* call; };
#else
#include <ucontext.h>
struct Fiber { ucontext_t context; int state; int line; WarpCall* call; };
static EMU_TLS ucontext_t g_scheduler_context;
#endif

EMU_NOSAN static bool ensure_fibers(Worker& w, size_t n) {
    if (n <= w.capacity) return true;
    size_t page = g_page_bytes, slot = kStackBytes + page;
    if (w.stacks) munmap(w.stacks, w.capacity * slot);
    free(w.fibers);
    free(w.order);
    w.capacity = 0;
    void* m = mmap(nullptr, n * slot, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    w.fibers = (Fiber*)calloc(n, sizeof(Fiber));
    w.order = (uint32_t*)calloc(n, sizeof(uint32_t));
    if (m == MAP_FAILED || !w.fibers || !w.order) { w.stacks = nullptr; return false; }
    w.stacks = (char*)m;
    for (size_t i = 0; i < n; ++i) mprotect(w.stacks + i * slot, page, PROT_NONE);
    w.capacity = n;
    return true;
}

EMU_NOSAN static bool in_stack_guard(uintptr_t a) {
    size_t page = g_page_bytes, slot = kStackBytes + page;
    for (int i = 0; i < kMaxWorkers; ++i) {
        const Worker& w = g_workers[i];
        if (!w.stacks || a < (uintptr_t)w.stacks || a >= (uintptr_t)w.stacks + w.capacity * slot) continue;
        return (a - (uintptr_t)w.stacks) % slot < page;
    }
    return false;
}

EMU_NOSAN static void switch_to_scheduler(Fiber& f) {
#if defined(__x86_64__)
    emu_ctx_switch(&f.sp, g_self->scheduler_sp);
#else
    swapcontext(&f.context, &g_scheduler_context);
#endif
}

EMU_NOSAN static void fiber_body() {  // what every fiber runs; it is never resumed after DONE
    g_entry(g_args);
    Fiber& f = g_self->fibers[g_self->current];
    f.state = DONE;
    switch_to_scheduler(f);
    __builtin_unreachable();
}

EMU_NOSAN static void start_fiber(Worker& w, int t) {
    Fiber& f = w.fibers[t];
    // Stacks grow down from the top of their slot. The slots are a multiple of 4 KiB apart, so
    // their tops would all fall in the same set of the L1 data cache (which has 8 ways: at most 8
    // fibers' top frames cached at once); starting fiber t's stack (t % 64) cache lines lower
    // spreads 64 fibers over all 64 sets.
    char* top = w.stacks + (size_t)(t + 1) * (kStackBytes + g_page_bytes) - (size_t)(t % 64) * 64;
    f.state = READY;
    f.line = 0;
    f.call = nullptr;
#if defined(__x86_64__)
    // The frame emu_ctx_switch pops: r15 r14 r13 r12 rbx rbp, then the return address. r12 holds
    // the function the trampoline calls; the stack is 16-byte aligned at that call, as the ABI asks.
    void** sp = (void**)(top - 56);
    for (int i = 0; i < 6; ++i) sp[i] = nullptr;
    sp[3] = (void*)&fiber_body;
    sp[6] = (void*)&emu_fiber_trampoline;
    f.sp = sp;
#else
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = top - (kStackBytes - (size_t)(t % 64) * 64);   // above the guard page
    f.context.uc_stack.ss_size = kStackBytes - (size_t)(t % 64) * 64;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_body, 0);
#endif
}

static uint3* g_thread_table;  // thread_of(t) for every thread of a block, when fibers run

EMU_NOSAN static void set_thread(uint32_t t) {
    thread_idx = g_thread_table ? g_thread_table[t] : thread_of(t);
    if (EMU_CHECKED) g_tid = t;
}

EMU_NOSAN static void resume_fiber(Worker& w, int t) {
    w.current = t;
    set_thread((uint32_t)t);
#if defined(__x86_64__)
    emu_ctx_switch(&w.scheduler_sp, w.fibers[t].sp);
#else
    swapcontext(&g_scheduler_context, &w.fibers[t].context);
#endif
}

// Loop mode found a barrier or a warp collective: abandon this attempt, rerun with fibers.
[[noreturn]] EMU_NOSAN static void need_fibers() {
    __atomic_store_n(&g_need_fibers, 1, __ATOMIC_RELEASE);
    siglongjmp(g_self->jump, 2);
}

// __syncthreads(): park this fiber at the barrier.
EMU_NOSAN void syncthreads(int line) {
    if (!g_self->fiber_mode) need_fibers();
    Fiber& f = g_self->fibers[g_self->current];
    f.state = AT_BARRIER;
    f.line = line;
    switch_to_scheduler(f);
}

[[noreturn]] EMU_NOSAN static void fail_warp(Failure what, const WarpCall* c, uint32_t tid, const WarpCall* other,
                                            uint32_t other_tid, int other_line, const char* other_what,
                                            int64_t value, int64_t other_value) {
    Report r = blank_report();
    r.detail = c->op;
    r.line = c->line;
    snprintf(r.text, sizeof r.text, "%s", c->what);
    r.value = value;
    r.other_value = other_value;
    r.other_line = other ? other->line : other_line;
    snprintf(r.text2, sizeof r.text2, "%s", other ? other->what : (other_what ? other_what : ""));
    copy_uint3(r.other_thread, thread_of(other_tid));
    set_thread(tid);
    fail_with(what, r);
}

// A warp collective: check what can be checked by this lane alone, then park until the lanes of
// the mask have arrived; the scheduler (complete_group) leaves this lane's result in c->result.
EMU_NOSAN uint64_t warp_collective(WarpCall* c) {
    Worker& w = *g_self;
    if (!w.fiber_mode) need_fibers();
    const uint32_t tid = (uint32_t)w.current, lane = tid & 31;
    if (c->op <= OP_SHFL_XOR && (c->width < 1 || c->width > 32 || (c->width & (c->width - 1))))
        fail_warp(WARP_ARGUMENT, c, tid, nullptr, tid, 0, nullptr, c->width, 0);
    if (!((c->mask >> lane) & 1)) fail_warp(WARP_MASK, c, tid, nullptr, tid, 0, nullptr, c->mask, lane);
    Fiber& f = w.fibers[tid];
    f.state = AT_WARP;
    f.line = c->line;
    f.call = c;
    w.warp_waiting++;
    switch_to_scheduler(f);
    return c->result;
}

// A precondition of a wmma call that one lane can check alone (alignment of the pointer, ldm).
EMU_NOSAN void warp_precondition(const WarpCall* c, const char* problem) {
    Report r = blank_report();
    r.detail = c->op;
    r.line = c->line;
    r.value = -1;
    snprintf(r.text, sizeof r.text, "%s", c->what);
    snprintf(r.text2, sizeof r.text2, "%s (pointer %p, ldm %u)", problem, c->pointer, c->ldm);
    fail_with(WARP_ARGUMENT, r);
}

EMU_NOSAN static bool same_call(const WarpCall* a, const WarpCall* b) {
    return a->op == b->op && a->line == b->line && strcmp(a->what, b->what) == 0;
}

// The source lane of a shuffle, exactly as PTX's shfl.sync defines it: `c` packs the segment
// mask ((32 - width) << 8) and, except for .up, the clamp 0x1f (cuda's sm_30_intrinsics.hpp).
EMU_NOSAN static int shuffle_source(int op, int lane, int arg, int width) {
    const int segmask = ((32 - width) << 8 >> 8) & 0x1f;
    const int cval = op == OP_SHFL_UP ? 0 : 0x1f;
    const int bval = arg & 0x1f;
    const int max_lane = (lane & segmask) | (cval & ~segmask);
    const int min_lane = lane & segmask;
    int j;
    bool in_range;
    switch (op) {
        case OP_SHFL_UP: j = lane - bval; in_range = j >= max_lane; break;
        case OP_SHFL_DOWN: j = lane + bval; in_range = j <= max_lane; break;
        case OP_SHFL_XOR: j = lane ^ bval; in_range = j <= max_lane; break;
        default: j = min_lane | (bval & ~segmask); in_range = j <= max_lane; break;
    }
    return in_range ? j : lane;
}

// Every lane of the group (bits of `members`, lanes of the warp starting at thread `base`) has
// arrived at the same call: compute each lane's result and release them.
EMU_NOSAN static void complete_group(Worker& w, uint32_t base, uint32_t members) {
    WarpCall* calls[32] = {};
    for (int j = 0; j < 32; ++j) if ((members >> j) & 1) calls[j] = w.fibers[base + j].call;
    const WarpCall* first = nullptr;
    for (int j = 0; j < 32 && !first; ++j) first = calls[j];
    switch (first->op) {
        case OP_SHFL_IDX: case OP_SHFL_UP: case OP_SHFL_DOWN: case OP_SHFL_XOR:
            for (int j = 0; j < 32; ++j) {
                if (!calls[j]) continue;
                int src = shuffle_source(calls[j]->op, j, calls[j]->arg, calls[j]->width);
                // From a lane that does not take part the value is undefined: 0xFF bytes show it.
                calls[j]->result = calls[src] ? calls[src]->value : ~0ull;
            }
            break;
        case OP_BALLOT: case OP_ANY: case OP_ALL: case OP_ACTIVEMASK: {
            uint32_t ballot = 0;
            for (int j = 0; j < 32; ++j) if (calls[j] && calls[j]->arg) ballot |= 1u << j;
            for (int j = 0; j < 32; ++j) {
                if (!calls[j]) continue;
                calls[j]->result = first->op == OP_BALLOT ? ballot
                                 : first->op == OP_ANY ? (ballot != 0)
                                 : first->op == OP_ALL ? (ballot == members) : members;
            }
            break;
        }
        case OP_SYNCWARP:
            if (g_sync_count)
                for (int j = 0; j < 32; ++j) if (calls[j]) note_syncwarp(base + j, members);
            break;
        case OP_WMMA_LOAD: case OP_WMMA_STORE:
            for (int j = 0; j < 32; ++j)  // every lane must pass the same pointer, ldm and layout
                if (calls[j]->pointer != first->pointer || calls[j]->ldm != first->ldm ||
                    calls[j]->arg != first->arg || calls[j]->kind != first->kind) {
                    int k = 0;
                    while (calls[k] != first) ++k;
                    fail_warp(WARP_ARGUMENT, calls[j], base + j, first, base + k, 0, nullptr,
                              (int64_t)(uintptr_t)calls[j]->pointer, (int64_t)(uintptr_t)first->pointer);
                }
            break;
        case OP_WMMA_MMA:
            first->compute(calls);
            __atomic_fetch_add(&g_tensor_flops, (uint64_t)first->arg, __ATOMIC_RELAXED);
            break;
    }
    for (int j = 0; j < 32; ++j)
        if (calls[j]) { w.fibers[base + j].state = READY; w.warp_waiting--; }
}

static const char* barrier_what = "__syncthreads()";

// Complete every warp collective whose lanes have all arrived. Returns whether any did.
EMU_NOSAN static bool resolve_warps(Worker& w, uint32_t nthreads) {
    bool progress = false;
    if (!w.warp_waiting) return false;
    for (uint32_t base = 0; base < nthreads; base += 32) {
        const uint32_t count = nthreads - base < 32 ? nthreads - base : 32;
        uint32_t waiting = 0;
        for (uint32_t j = 0; j < count; ++j) if (w.fibers[base + j].state == AT_WARP) waiting |= 1u << j;
        while (waiting) {
            const uint32_t l = __builtin_ctz(waiting);
            const WarpCall* c = w.fibers[base + l].call;
            const bool wmma = c->op >= OP_WMMA_LOAD;
            uint32_t members = 0;
            bool complete = true;
            if (c->op == OP_ACTIVEMASK) {  // the lanes that reached this call together
                for (uint32_t j = 0; j < count; ++j) {
                    const Fiber& g = w.fibers[base + j];
                    if (g.state == AT_WARP && same_call(g.call, c)) members |= 1u << j;
                }
            } else {
                for (uint32_t j = 0; j < 32 && complete; ++j) {
                    if (!((c->mask >> j) & 1)) continue;
                    if (j >= count || w.fibers[base + j].state == DONE) {
                        // A lane past the end of a partial warp, or one that exited: it does not
                        // take part (allowed, except for wmma, which needs the whole warp).
                        if (wmma) fail_warp(WARP_EXIT, c, base + l, nullptr, base + j, 0,
                                            j >= count ? "(no such thread)" : "(exited)", count, j);
                        continue;
                    }
                    const Fiber& g = w.fibers[base + j];
                    if (g.state == AT_WARP && same_call(g.call, c)) {
                        if (g.call->mask != c->mask)
                            fail_warp(WARP_DIVERGENCE, c, base + l, g.call, base + j, 0, nullptr, c->mask, g.call->mask);
                        members |= 1u << j;
                    } else {
                        complete = false;  // elsewhere for now: maybe it comes here later
                    }
                }
            }
            if (complete) {
                complete_group(w, base, members);
                progress = true;
                waiting &= ~members;
            }
            waiting &= ~(1u << l);
        }
    }
    return progress;
}

// Nothing can run and some lanes wait at a warp collective that can never complete: name a lane
// of its mask that waits somewhere else (another call, or a __syncthreads()).
EMU_NOSAN static void fail_stuck_warp(Worker& w, uint32_t nthreads) {
    for (uint32_t t = 0; t < nthreads; ++t) {
        const Fiber& f = w.fibers[t];
        if (f.state != AT_WARP) continue;
        const uint32_t base = t & ~31u;
        for (uint32_t j = 0; j < 32 && base + j < nthreads; ++j) {
            if (!((f.call->mask >> j) & 1)) continue;
            const Fiber& g = w.fibers[base + j];
            if (g.state == AT_WARP && !same_call(g.call, f.call))
                fail_warp(WARP_DIVERGENCE, f.call, t, g.call, base + j, 0, nullptr, f.call->mask, g.call->mask);
            if (g.state == AT_BARRIER)
                fail_warp(WARP_DIVERGENCE, f.call, t, nullptr, base + j, g.line, barrier_what, f.call->mask, 0);
        }
    }
}

// ---- Running a block ---------------------------------------------------------------------------
EMU_NOSAN static void shuffle(uint32_t* order, uint32_t n) {  // Fisher-Yates
    for (uint32_t i = n - 1; i > 0; --i) {
        uint32_t j = (uint32_t)(next_random() % (i + 1));
        uint32_t t = order[i]; order[i] = order[j]; order[j] = t;
    }
}

EMU_NOSAN static uint64_t gcd(uint64_t a, uint64_t b) { while (b) { uint64_t t = a % b; a = b; b = t; } return a; }

// A cheap permutation of 0..n-1 without memory: i -> (start + i * stride) mod n, stride coprime to n.
struct Walk { uint64_t start, stride, n; uint64_t at(uint64_t i) const { return (start + i * stride) % n; } };
EMU_NOSAN static Walk random_walk(uint64_t n, bool shuffled) {
    if (!shuffled || n < 2) return Walk{0, 1, n};
    uint64_t stride = 1 + next_random() % (n - 1);
    while (gcd(stride, n) != 1) stride = stride % (n - 1) + 1;
    return Walk{next_random() % n, stride, n};
}

EMU_NOSAN static void run_block_loop(uint32_t nthreads, bool shuffled) {
    if (g_block_entry) { g_block_entry(g_args); return; }
    Walk walk = random_walk(nthreads, shuffled);
    for (uint64_t i = 0; i < nthreads; ++i) {
        set_thread((uint32_t)walk.at(i));
        g_entry(g_args);
        if (g_pending.active) resolve_pending();
    }
}

// One pass resumes every ready fiber once and notes where each thread now is; a barrier that every
// live thread reached is released at the start of the next pass (no separate loops over threads).
EMU_NOSAN static void run_block_fibers(Worker& w, uint32_t nthreads, bool shuffled) {
    for (uint32_t t = 0; t < nthreads; ++t) { start_fiber(w, (int)t); w.order[t] = t; }
    w.warp_waiting = 0;
    bool release = false;
    for (;;) {
        if (shuffled) shuffle(w.order, nthreads);
        int done = -1, waiting = -1, first = -1, second = -1;  // example threads; first/second diverge
        for (uint32_t k = 0; k < nthreads; ++k) {
            const uint32_t t = w.order[k];
            Fiber& f = w.fibers[t];
            if (release && f.state == AT_BARRIER) f.state = READY;
            if (f.state == READY) {
                resume_fiber(w, (int)t);
                if (g_pending.active) resolve_pending();
            }
            if (f.state == DONE) {
                done = (int)t;
            } else if (f.state == AT_BARRIER) {
                if (waiting >= 0 && f.line != w.fibers[waiting].line && first < 0) { first = waiting; second = (int)t; }
                waiting = (int)t;
            }
        }
        release = false;
        if (w.warp_waiting) {
            if (resolve_warps(w, nthreads)) continue;
            fail_stuck_warp(w, nthreads);
        }
        if (waiting < 0) return;  // every thread finished
        if (first >= 0) {
            Report r = blank_report();
            r.line = w.fibers[first].line;
            r.other_line = w.fibers[second].line;
            copy_uint3(r.other_thread, thread_of((uint64_t)first));
            set_thread((uint32_t)second);
            fail_with(BARRIER_DIVERGENCE, r);
        }
        if (done >= 0) {
            Report r = blank_report();
            r.line = w.fibers[waiting].line;
            copy_uint3(r.other_thread, thread_of((uint64_t)waiting));
            set_thread((uint32_t)done);
            fail_with(BARRIER_EXIT, r);
        }
        if (g_options.racecheck) new_interval(nthreads);
        release = true;
    }
}

}  // namespace emu
