// emu_runtime.h -- the launcher half of minunet's CUDA emulator, compiled into every module.
//
// A launch (emu_launch, called from launcher.py through ctypes) does what a GPU would and, in
// checked mode, checks what a GPU would not:
//
//  1. Checked mode: copy every array argument into its own zone of reserved address space (see
//     emu_check.h), where every load and store the kernel makes is checked against the buffer its
//     pointer came from. Fast mode: the kernel works on the NumPy memory itself ("direct") once
//     the Python side knows whether the kernel needs fibers; until then it works on copies, so a
//     restart in fiber mode starts from unchanged arrays.
//  2. Run the blocks (emu_sched.h): checked mode on the calling OS thread, in a shuffled order,
//     with shared memory poisoned at every block; fast mode on several OS threads ("workers"),
//     each taking the next block from a shared counter, with its own shared memory and fibers.
//  3. On success copy the writable buffers back into the NumPy arrays. On any failure (bad access,
//     fault, divergent barrier, race, device assert) jump back with siglongjmp, fill a Report that
//     launcher.py turns into an EmulatorError, and leave the NumPy arrays unchanged (checked mode).
#pragma once

#include <thread>
#include "emu_state.h"
#include "emu_shared.h"
#include "emu_check.h"
#include "emu_sched.h"
#include "emu_profile.h"
#include "emu_pipeline.h"

namespace emu {

// ---- Faults -----------------------------------------------------------------------------------
EMU_NOSAN static void on_fault(int sig, siginfo_t* info, void*) {
    uintptr_t a = (uintptr_t)info->si_addr;
    Report r = blank_report();
    r.address = a;
    if (sig == SIGFPE) fail_with(ARITHMETIC, r);
    int z = g_zones ? zone_of(a) : -1;
    if (z >= 0) {  // an access the checks did not see (fast mode's copies): still the right buffer
        r.region = z;
        r.offset = (int64_t)(a - g_spans[z].lo);
        r.size = 0;
        fail_with(OUT_OF_BOUNDS, r);
    }
    if (in_stack_guard(a)) fail_with(STACK_OVERFLOW, r);
    fail_with(WILD_ACCESS, r);
}

struct SavedSignals { struct sigaction segv, bus, fpe; };

EMU_NOSAN static void install_fault_handlers(SavedSignals* saved) {
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &saved->segv);
    sigaction(SIGBUS, &sa, &saved->bus);
    sigaction(SIGFPE, &sa, &saved->fpe);
}

EMU_NOSAN static void restore_fault_handlers(const SavedSignals* saved) {
    sigaction(SIGSEGV, &saved->segv, nullptr);
    sigaction(SIGBUS, &saved->bus, nullptr);
    sigaction(SIGFPE, &saved->fpe, nullptr);
}

// ---- Workers ----------------------------------------------------------------------------------
static uint64_t g_next_block;        // the block counter workers take from
static Walk g_block_order;

EMU_NOSAN static bool prepare_worker(Worker& w, int index) {
    w.index = index;
    if (!w.shared_arena && !(w.shared_arena = map_shared_arena())) return false;
    if (!w.signal_stack && !(w.signal_stack = (char*)malloc(64 * 1024))) return false;
    if (!EMU_CHECKED && g_dynamic_bytes > w.dynamic_capacity) {
        free(w.dynamic_shared);
        w.dynamic_shared = (char*)malloc(g_dynamic_bytes);
        if (!w.dynamic_shared) { w.dynamic_capacity = 0; return false; }
        w.dynamic_capacity = g_dynamic_bytes;
    }
    return !g_options.fiber_mode || ensure_fibers(w, g_nthreads);
}

// Run blocks until none is left (or a failure or a restart stops every worker).
EMU_NOSAN static void run_blocks(Worker& w) {
    g_self = &w;
    shared_base = w.shared_arena;
    if (EMU_CHECKED) dynamic_shared = g_spans[g_dynamic_zone].lo ? (char*)g_spans[g_dynamic_zone].lo : nullptr;
    else dynamic_shared = w.dynamic_shared;
    stack_t ss{}, old{};
    ss.ss_sp = w.signal_stack;
    ss.ss_size = 64 * 1024;
    sigaltstack(&ss, &old);
    w.fiber_mode = g_options.fiber_mode;
    const bool shuffled = EMU_CHECKED && g_options.shuffled;
    if (sigsetjmp(w.jump, 1) == 0) {
        for (;;) {
            if (__atomic_load_n(&g_failed, __ATOMIC_ACQUIRE) || __atomic_load_n(&g_need_fibers, __ATOMIC_ACQUIRE)) break;
            uint64_t i = __atomic_fetch_add(&g_next_block, 1, __ATOMIC_RELAXED);
            if (i >= g_nblocks) break;
            uint64_t b = g_block_order.at(i);
            if (EMU_CHECKED) g_block_linear = b;
            block_idx = block_of(b);
            if (EMU_CHECKED) {
                poison_shared(g_dynamic_bytes);
                if (g_options.racecheck) new_interval(g_nthreads);
                profile_block_start(b);
            }
            if (w.fiber_mode) run_block_fibers(w, g_nthreads, shuffled);
            else run_block_loop(g_nthreads, shuffled);
            if (EMU_CHECKED) profile_block_end();
        }
    }
    sigaltstack(&old, nullptr);
}

static Region* g_regions;
static int g_nregions;
static Profile* g_profile_out;

EMU_NOSAN static void copy_in() {
    for (int i = 0; i < g_nregions; ++i)
        if (g_regions[i].nbytes && g_regions[i].device != g_regions[i].host)
            memcpy(g_regions[i].device, g_regions[i].host, g_regions[i].nbytes);
}

// One attempt at the launch: fresh copies, every block. Returns false to ask for a rerun with fibers.
EMU_NOSAN static bool attempt(int workers) {
    g_next_block = 0;
    g_need_fibers = 0;
    g_pending.active = 0;
    g_fenced = false;
    g_launch_number++;
    g_launch_serial++;
    g_nused = 0;
    g_static_bytes = 0;
    for (int i = 0; i < g_nspans; ++i)
        if (g_spans[i].cells) { munmap(g_spans[i].cells, (g_spans[i].hi - g_spans[i].lo) * sizeof(GlobalCell)); g_spans[i].cells = nullptr; }
    copy_in();
    g_tensor_flops = 0;
    if (g_options.fiber_mode && !g_thread_table && (g_thread_table = (uint3*)malloc(g_nthreads * sizeof(uint3))))
        for (uint32_t t = 0; t < g_nthreads; ++t) g_thread_table[t] = thread_of(t);
    if (EMU_CHECKED) profile_attempt_start(g_profile_out);
    g_self = &g_workers[0];
    g_self->rng = g_options.seed;
    g_block_order = random_walk(g_nblocks, EMU_CHECKED && g_options.shuffled);
    for (int i = 0; i < workers; ++i)
        if (!prepare_worker(g_workers[i], i)) { g_report->failure = SETUP; return true; }
    if (workers == 1) {
        run_blocks(g_workers[0]);
    } else {
        std::thread* threads = new std::thread[workers - 1];
        for (int i = 1; i < workers; ++i) threads[i - 1] = std::thread([i] { run_blocks(g_workers[i]); });
        run_blocks(g_workers[0]);
        for (int i = 1; i < workers; ++i) threads[i - 1].join();
        delete[] threads;
        g_self = &g_workers[0];
    }
    if (g_failed) return true;
    return !g_need_fibers;
}

}  // namespace emu

// ---- The entry point launcher.py calls --------------------------------------------------------
// Returns the Failure (0 on success). `args` is the driver API's array of pointers to argument
// values; for each binding the runtime stores the device pointer into that argument's slot.
EMU_EXPORT EMU_NOSAN int emu_launch(void (*entry)(void**), void (*block_entry)(void**), void** args,
                                    emu::Region* regions, int nregions,
                                    const emu::Binding* bindings, int nbindings, const uint32_t* grid,
                                    const uint32_t* block, uint64_t dynamic_shared_bytes,
                                    const emu::Options* options, emu::Report* report, emu::Profile* profile) {
    using namespace emu;
    memset(report, 0, sizeof *report);
    report->region = -1;
    g_report = report;
    g_failed = 0;
    g_entry = entry;
    g_block_entry = EMU_CHECKED ? nullptr : block_entry;  // checked mode shuffles the threads
    g_args = args;
    g_options = *options;
    if (!EMU_CHECKED) { g_options.racecheck = 0; g_options.profile = 0; }
    g_profile_out = profile;
    grid_dim = dim3(grid[0], grid[1], grid[2]);
    block_dim = dim3(block[0], block[1], block[2]);
    g_nthreads = block[0] * block[1] * block[2];
    g_nblocks = (uint64_t)grid[0] * grid[1] * grid[2];
    g_dynamic_bytes = dynamic_shared_bytes;
    if (!g_library_base) {
        Dl_info info;
        if (dladdr((void*)&emu_launch, &info)) g_library_base = (uintptr_t)info.dli_fbase;
    }
    int workers = EMU_CHECKED ? 1 : (int)(g_options.workers < 1 ? 1 : g_options.workers > kMaxWorkers ? kMaxWorkers : g_options.workers);
    if ((uint64_t)workers > g_nblocks) workers = (int)g_nblocks;

    // Buffers: zones (checked mode, and fast mode until the kernel's barrier use is known), or the
    // NumPy memory itself (fast mode, direct). The extern __shared__ buffer is the last zone.
    Region* all = (Region*)calloc((size_t)nregions + 1, sizeof(Region));
    memcpy(all, regions, (size_t)nregions * sizeof(Region));
    all[nregions] = Region{nullptr, EMU_CHECKED ? dynamic_shared_bytes : 0, 1, 0, nullptr};
    g_regions = all;
    g_nregions = nregions;
    g_dynamic_zone = nregions;
    bool zoned = EMU_CHECKED || !g_options.direct;
    if (zoned) {
        if (!map_zones(all, nregions + 1)) { unmap_zones(); free(all); report->failure = SETUP; return SETUP; }
    } else {
        for (int i = 0; i < nregions; ++i) all[i].device = (char*)all[i].host;
    }
    for (int i = 0; i < nregions; ++i) regions[i].device = all[i].device;
    for (int i = 0; i < nbindings; ++i)
        *(void**)args[bindings[i].arg] = all[bindings[i].region].device + bindings[i].offset;
    if (EMU_CHECKED && g_options.racecheck) {
        if (!g_static_cells) g_static_cells = (SharedCell*)map_zeroed(kSharedArenaBytes * sizeof(SharedCell));
        g_dynamic_cells = dynamic_shared_bytes ? (SharedCell*)map_zeroed(dynamic_shared_bytes * sizeof(SharedCell)) : nullptr;
        g_sync_count = (uint16_t*)calloc(g_nthreads, sizeof(uint16_t));
        g_sync_log = (uint32_t*)malloc((size_t)g_nthreads * kSyncLog * sizeof(uint32_t));
    }

    SavedSignals saved;
    install_fault_handlers(&saved);
    bool finished = attempt(workers);
    if (!finished) {  // a barrier or warp collective in loop mode: start over with fibers
        g_options.fiber_mode = 1;
        attempt(workers);
    }
    free(g_thread_table);
    g_thread_table = nullptr;
    restore_fault_handlers(&saved);
    if (EMU_CHECKED) {
        if (!report->failure) profile_launch_end();
        profile_free();
    }
    if (!report->failure && zoned)
        for (int i = 0; i < nregions; ++i)
            if (all[i].writable && all[i].nbytes) memcpy((void*)all[i].host, all[i].device, all[i].nbytes);
    report->used_fibers = g_options.fiber_mode;
    if (report->failure == BARRIER_EXIT || report->failure == BARRIER_DIVERGENCE) report->used_fibers = 1;
    fflush(stdout);  // kernel printf output appears before Python prints anything else
    if (zoned) unmap_zones();
    if (g_dynamic_cells) munmap(g_dynamic_cells, dynamic_shared_bytes * sizeof(SharedCell));
    g_dynamic_cells = nullptr;
    free(g_sync_count);
    free(g_sync_log);
    g_sync_count = nullptr;
    g_sync_log = nullptr;
    free(all);
    g_regions = nullptr;
    dynamic_shared = nullptr;
    return report->failure;
}

// Bytes of static __shared__ memory registered in this module (all kernels together).
EMU_EXPORT uint64_t emu_static_shared_bytes() { return emu::static_shared_bytes(); }

namespace emu {
// ---- Calling a kernel with the driver API's argument convention -------------------------------
// invoke(kernel, args) calls kernel(*(A0*)args[0], *(A1*)args[1], ...) with the parameter types
// A0, A1, ... read off the kernel's own declaration, so no Python-side parsing of C types is needed.
template <class... A, size_t... I>
EMU_NOSAN static inline void invoke_impl(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}
template <class... A>
EMU_NOSAN static inline void invoke(void (*kernel)(A...), void** args) {
    invoke_impl(kernel, args, std::index_sequence_for<A...>{});
}

// Fast mode, loop mode: every thread of a block in one function, the kernel inlined into the loop
// (`flatten`), so the per-thread cost is the kernel's own work: no call, the arguments unpacked
// and thread-local addresses computed once per block.
template <auto Kernel, class... A, size_t... I>
__attribute__((flatten)) static inline void block_loop_impl(void (*)(A...), void** args, std::index_sequence<I...>) {
    const unsigned nx = block_dim.x, ny = block_dim.y, nz = block_dim.z;
    for (unsigned z = 0; z < nz; ++z)
        for (unsigned y = 0; y < ny; ++y)
            for (unsigned x = 0; x < nx; ++x) {
                thread_idx = uint3{x, y, z};
                Kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...);
            }
}
template <auto Kernel, class... A>
static inline void block_loop(void (*kernel)(A...), void** args) {
    block_loop_impl<Kernel>(kernel, args, std::index_sequence_for<A...>{});
}

// signature(kernel): the parameter types as text for launcher.py to check arguments against,
// one token per parameter: "f32" float, "i32" int, "u64" unsigned long long, "b8" bool, "c8" char,
// "*cf32" const float*, "*u8" unsigned char*, "*v" void*, "x12" some other 12-byte type.
template <class T>
EMU_NOSAN static void type_code(char*& p) {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>) {
        using E = std::remove_pointer_t<U>;
        *p++ = '*';
        if (std::is_const_v<E>) *p++ = 'c';
        type_code<E>(p);
    } else if constexpr (std::is_void_v<U>) {
        *p++ = 'v';
    } else if constexpr (std::is_same_v<U, bool>) {
        p += sprintf(p, "b8");
    } else if constexpr (std::is_same_v<U, char>) {
        p += sprintf(p, "c8");
    } else if constexpr (std::is_floating_point_v<U>) {
        p += sprintf(p, "f%d", (int)(8 * sizeof(U)));
    } else if constexpr (std::is_integral_v<U>) {
        p += sprintf(p, "%c%d", std::is_signed_v<U> ? 'i' : 'u', (int)(8 * sizeof(U)));
    } else {
        p += sprintf(p, "x%d", (int)sizeof(U));
    }
}
template <class... A>
EMU_NOSAN static const char* signature(void (*)(A...)) {
    static char text[32 * (sizeof...(A) + 1)];
    char* p = text;
    ((type_code<A>(p), *p++ = ' '), ...);
    *p = '\0';
    return text;
}
}  // namespace emu

// One pair of these per kernel, written by compiler.py after the kernel source.
#define EMU_KERNEL(name)                                                                      \
    EMU_EXPORT EMU_NOSAN void emu_entry__##name(void** args) { emu::invoke(name, args); }              \
    EMU_EXPORT EMU_NOSAN void emu_block__##name(void** args) { emu::block_loop<name>(name, args); }    \
    EMU_EXPORT const char* emu_signature__##name() { return emu::signature(name); }
// The kernel's __launch_bounds__ value (source.py defines emu_bound_value__<name> after the kernel).
#define EMU_LAUNCH_BOUND(name) \
    EMU_EXPORT int emu_launch_bound__##name() { return emu_bound_value__##name; }
// Facts about the whole module: file-scope __shared__ variables (one copy: fast mode must run the
// blocks on one OS thread) and whether this is a checked build.
#define EMU_MODULE_INFO(file_scope_shared) \
    EMU_EXPORT int emu_file_scope_shared() { return (file_scope_shared); } \
    EMU_EXPORT int emu_checked_build() { return EMU_CHECKED; }
