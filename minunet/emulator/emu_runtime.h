// emu_runtime.h -- the launcher half of minunet's CUDA emulator, compiled into every module.
//
// A launch (emu_launch, called from launcher.py through ctypes) does what a GPU would, one block
// after another on one OS thread, and checks what a GPU would not:
//
//  1. Copy every array argument into a fresh *guarded arena*: each buffer sits right before a
//     PROT_NONE page (so running off its end faults) and after a slack area, and every load and
//     store the kernel makes is checked exactly against the buffer bounds (see "Exact bounds
//     checks" below). The kernel sees pointers into this arena, as it would see device pointers.
//  2. Run the blocks. A block's threads run either
//       - in a plain loop, one CUDA thread after another (fast; used while a kernel has never
//         reached a __syncthreads()), or
//       - as fibers, one small stack per CUDA thread: each runs until its next __syncthreads(),
//         and only when *every* thread of the block has arrived does any of them continue. That is
//         the real barrier semantics. A kernel that reaches __syncthreads() in loop mode aborts the
//         attempt, and the launch restarts in fiber mode from fresh copies of the arguments (the
//         host arrays are untouched until a launch succeeds), and the Python side remembers to use
//         fibers for that kernel from then on.
//     The order of blocks, and of threads between two barriers, is shuffled from a seed, so a
//     result that depends on an order a GPU does not promise (a missing __syncthreads(), a race)
//     changes from seed to seed. Static __shared__ memory and the extern __shared__ buffer are
//     filled with 0xFF bytes (NaN as float) at the start of each block.
//  3. On success copy the writable buffers back into the NumPy arrays. On any failure (bad access,
//     fault, divergent barrier, device assert) jump back here with siglongjmp, fill a Report that
//     launcher.py turns into an EmulatorError, and leave the NumPy arrays unchanged.
#pragma once

#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))
// The runtime's own loads and stores are not checked (only the kernel's are, see check()).
#define EMU_NOSAN __attribute__((no_sanitize_address))

namespace emu {

// ---- What crosses the ctypes boundary (mirrored by ctypes.Structure classes in launcher.py) ---
enum Failure : int32_t {
    OK = 0,
    OUT_OF_BOUNDS = 1,       // a load or store outside its buffer (exact check or guard page)
    WRITE_TO_CONST = 2,      // a store into a buffer that only const pointer parameters name
    WILD_ACCESS = 3,         // a fault at an address that belongs to no buffer (null, garbage)
    STACK_OVERFLOW = 4,      // a fiber ran past its stack (large local arrays)
    ARITHMETIC = 5,          // SIGFPE: integer division by zero
    BARRIER_DIVERGENCE = 6,  // threads of one block wait at different __syncthreads() lines
    BARRIER_EXIT = 7,        // some threads returned while others wait at a __syncthreads()
    DEVICE_ASSERT = 8,       // assert() or __trap() in the kernel
    SETUP = 9,               // the runtime could not allocate its memory
    SHARED_OUT_OF_BOUNDS = 10,  // an access in a redzone around a static __shared__ array
};

struct Region {              // one contiguous stretch of host memory = one emulated device buffer
    const void* host;        // the NumPy data (overlapping arguments share one region)
    uint64_t nbytes;
    int32_t writable;        // 0 when only `const T*` parameters point into it: no copy back
    int32_t reserved;
    char* device;            // out: the copy the kernel works on
};

struct Binding {             // argument `arg` is a pointer to region `region` + `offset` bytes
    int32_t arg, region;
    uint64_t offset;
};

struct Report {
    int32_t failure;         // a Failure
    int32_t region;          // the buffer involved, -1 for none, nregions = extern __shared__
    int64_t offset;          // byte offset of the bad access from the buffer's first byte
    int32_t size;            // bytes accessed (0 when unknown: caught by a guard page)
    int32_t is_write;        // 1 store, 0 load, -1 unknown
    uint32_t block[3], thread[3];
    uint64_t address;
    int32_t line, other_line;  // barrier lines (BARRIER_*), assert line
    uint32_t other_thread[3];
    int32_t used_fibers;     // out: 1 if the kernel ran (or had to run) in fiber mode
    int32_t element_bytes;   // SHARED_OUT_OF_BOUNDS: the array's element size ...
    uint64_t array_bytes;    // ... and total size
    char text[256];          // assert text / file name / shared array name
};

// ---- Launch state (one launch at a time: launcher.py holds a lock) ----------------------------
struct Span { uintptr_t lo, hi, data_lo, data_hi; int writable; };
static const size_t kAlign = 256;  // cudaMalloc returns 256-byte aligned pointers
static size_t g_page;
static char* g_arena;              // one mapping: [guard][buffer 0][guard][buffer 1][guard]...
static size_t g_arena_size;
static Span* g_spans;
static int g_nspans;
static Report* g_report;
static sigjmp_buf g_jump;          // siglongjmp(g_jump, 1): failure; (g_jump, 2): rerun with fibers
static void (*g_entry)(void**);
static void** g_args;
static int g_fiber_mode;
static uint64_t g_rng;

EMU_NOSAN static uint64_t next_random() {    // splitmix64: small, fast, good enough to shuffle
    uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

EMU_NOSAN static void copy_uint3(uint32_t* dst, uint3 v) { dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; }

[[noreturn]] EMU_NOSAN static void fail(Failure what) {
    g_report->failure = what;
    copy_uint3(g_report->block, block_idx);
    copy_uint3(g_report->thread, thread_idx);
    siglongjmp(g_jump, 1);
}

// ---- Static __shared__ arrays: storage for emu::SharedArray (cuda_emu.h) -----------------------
// One arena holds every static __shared__ array of the module, each 64 bytes (a redzone) from the
// next, in the order threads first reach their declarations. The runtime fills the used part with
// 0xFF at the start of every block (poison_shared) and check() sends every access inside it to
// check_shared(), which fails an access that touches a redzone. The arena is reserved once (4 MiB
// of address space; only touched pages use memory) and kept for the life of the module, as the
// arrays' holders are statics that are constructed once.
struct SharedSpan { uintptr_t lo, hi; size_t element; const char* name; };
static const int kMaxSharedArrays = 1024;
static const uintptr_t kSharedRedzone = 64;
static const size_t kSharedArenaBytes = (size_t)4 << 20;
static SharedSpan g_shared_arrays[kMaxSharedArrays];
static int g_nshared_arrays;
static char* g_shared_arena;
static size_t g_shared_used;                    // bytes of the arena in use, the last redzone included
static uintptr_t g_shared_lo, g_shared_size;    // what check() sends to check_shared(): the arena's used part

EMU_NOSAN void* allocate_shared(size_t bytes, size_t element_bytes, size_t alignment, const char* name) {
    if (!g_shared_arena) {
        void* m = mmap(nullptr, kSharedArenaBytes, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) device_failure("cannot map the emulator's __shared__ arena", __FILE__, __LINE__);
        g_shared_arena = (char*)m;
        g_shared_used = kSharedRedzone;         // the first array's front redzone
    }
    size_t offset = (g_shared_used + alignment - 1) / alignment * alignment;
    if (offset + bytes + kSharedRedzone > kSharedArenaBytes || g_nshared_arrays == kMaxSharedArrays)
        device_failure("static __shared__ arrays exceed the emulator's 4 MiB / 1024-array arena", __FILE__, __LINE__);
    char* array = g_shared_arena + offset;
    g_shared_arrays[g_nshared_arrays++] = SharedSpan{(uintptr_t)array, (uintptr_t)array + bytes, element_bytes, name};
    g_shared_used = offset + bytes + kSharedRedzone;
    memset(array, 0xFF, bytes);                 // poisoned from the start: this block is already running
    g_shared_lo = (uintptr_t)g_shared_arena;
    g_shared_size = g_shared_used;
    return array;
}

// The buffer an address belongs to or lies nearest to (for guard-page hits and slack hits).
EMU_NOSAN static int nearest_span(uintptr_t a) {
    int best = -1;
    uintptr_t best_distance = ~(uintptr_t)0;
    for (int i = 0; i < g_nspans; ++i) {
        const Span& s = g_spans[i];
        uintptr_t d = a < s.data_lo ? s.data_lo - a : (a >= s.data_hi ? a - s.data_hi : 0);
        if (d < best_distance) { best_distance = d; best = i; }
    }
    return best;
}

[[noreturn]] EMU_NOSAN static void fail_access(Failure what, uintptr_t a, int size, int is_write) {
    int i = nearest_span(a);
    g_report->region = i;
    g_report->offset = i >= 0 ? (int64_t)(a - g_spans[i].data_lo) : 0;
    g_report->size = size;
    g_report->is_write = is_write;
    g_report->address = a;
    fail(what);
}

// ---- Exact bounds checks ----------------------------------------------------------------------
// The module is compiled with `-fsanitize=kernel-address --param
// asan-instrumentation-with-call-threshold=0`: GCC then calls __asan_load4_noabort(address) before
// every 4-byte load the kernel makes (and likewise for other sizes and stores), and expects the
// program to provide these functions. Here they are: an address inside the arena must lie inside
// one buffer's data; anything else (fiber stacks, __shared__ arrays, globals) is let through. So
// x[-1] and x[n] are caught exactly, however the buffer size relates to the page size, for reads
// and writes alike, and the report names the buffer, the element and the CUDA thread.
EMU_NOSAN static void check_shared(uintptr_t a, size_t n, int is_write);

EMU_NOSAN static inline void check(uintptr_t a, size_t n, int is_write) {
    if (a - g_shared_lo < g_shared_size) return check_shared(a, n, is_write);
    if (a - (uintptr_t)g_arena >= g_arena_size) return;  // not a kernel buffer (one compare)
    for (int i = 0; i < g_nspans; ++i) {
        const Span& s = g_spans[i];
        if (a >= s.lo && a < s.hi) {
            if (a < s.data_lo || a + n > s.data_hi) fail_access(OUT_OF_BOUNDS, a, (int)n, is_write);
            if (is_write && !s.writable) fail_access(WRITE_TO_CONST, a, (int)n, is_write);
            return;
        }
    }
    fail_access(OUT_OF_BOUNDS, a, (int)n, is_write);  // a guard page: it would fault next
}

// An address inside the shared arena: fine inside an array; an access touching a redzone is
// reported with the nearest array.
EMU_NOSAN static void check_shared(uintptr_t a, size_t n, int is_write) {
    int hit = -1;
    uintptr_t best = ~(uintptr_t)0;
    for (int i = 0; i < g_nshared_arrays; ++i) {
        const SharedSpan& s = g_shared_arrays[i];
        if (a >= s.lo && a + n <= s.hi) return;
        bool in_redzone = (a < s.hi + kSharedRedzone && a + n > s.hi) || (a + n > s.lo - kSharedRedzone && a < s.lo);
        if (!in_redzone) continue;
        uintptr_t d = a < s.lo ? s.lo - a : a + n - s.hi;
        if (d < best) { best = d; hit = i; }
    }
    if (hit < 0) return;
    const SharedSpan& s = g_shared_arrays[hit];
    g_report->offset = (int64_t)(a - s.lo);
    g_report->size = (int)n;
    g_report->is_write = is_write;
    g_report->address = a;
    g_report->element_bytes = (int32_t)s.element;
    g_report->array_bytes = s.hi - s.lo;
    snprintf(g_report->text, sizeof g_report->text, "%s", s.name);
    fail(SHARED_OUT_OF_BOUNDS);
}

}  // namespace emu

#define EMU_ASAN_CALLBACKS(n)                                                              \
    extern "C" EMU_NOSAN void __asan_load##n##_noabort(uintptr_t a) { emu::check(a, n, 0); }          \
    extern "C" EMU_NOSAN void __asan_store##n##_noabort(uintptr_t a) { emu::check(a, n, 1); }
EMU_ASAN_CALLBACKS(1)
EMU_ASAN_CALLBACKS(2)
EMU_ASAN_CALLBACKS(4)
EMU_ASAN_CALLBACKS(8)
EMU_ASAN_CALLBACKS(16)
extern "C" EMU_NOSAN void __asan_loadN_noabort(uintptr_t a, size_t n) { emu::check(a, n, 0); }
extern "C" EMU_NOSAN void __asan_storeN_noabort(uintptr_t a, size_t n) { emu::check(a, n, 1); }
extern "C" void __asan_handle_no_return() {}

namespace emu {

// ---- The guarded arena ------------------------------------------------------------------------
// Buffer i occupies whole pages followed by a PROT_NONE guard page; its data ends at most 255
// bytes before that guard page (its start is 256-byte aligned, like cudaMalloc's). A store far
// past any buffer that escapes the exact check (e.g. from an uninstrumented build) faults on a
// guard page instead of corrupting the Python process.
EMU_NOSAN static bool map_arena(Region* regions, int nregions) {
    g_page = (size_t)sysconf(_SC_PAGESIZE);
    size_t pages = 1;
    for (int i = 0; i < nregions; ++i) pages += (regions[i].nbytes + kAlign + g_page - 1) / g_page + 1;
    g_arena_size = pages * g_page;
    void* m = mmap(nullptr, g_arena_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return false;
    g_arena = (char*)m;
    g_spans = (Span*)calloc((size_t)nregions + 1, sizeof(Span));
    g_nspans = nregions;
    char* p = g_arena;
    mprotect(p, g_page, PROT_NONE);  // leading guard page
    p += g_page;
    for (int i = 0; i < nregions; ++i) {
        size_t area = ((regions[i].nbytes + kAlign + g_page - 1) / g_page) * g_page;
        char* end = p + area;
        char* data = (char*)(((uintptr_t)end - regions[i].nbytes) & ~(uintptr_t)(kAlign - 1));
        g_spans[i] = Span{(uintptr_t)p, (uintptr_t)end, (uintptr_t)data,
                          (uintptr_t)data + regions[i].nbytes, regions[i].writable};
        regions[i].device = data;
        mprotect(end, g_page, PROT_NONE);  // trailing guard page
        p = end + g_page;
    }
    return true;
}

EMU_NOSAN static void unmap_arena() {
    if (g_arena) munmap(g_arena, g_arena_size);
    free(g_spans);
    g_arena = nullptr;
    g_arena_size = 0;
    g_spans = nullptr;
    g_nspans = 0;
}

// ---- Shared memory ----------------------------------------------------------------------------
// The linker defines these two symbols around the "emu_shared" section (all static __shared__
// variables, see cuda_emu.h); they are weak so a module without shared memory still links.
extern "C" char __start_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_emu_shared[] __attribute__((weak, visibility("hidden")));
static size_t g_dynamic_shared_bytes;

EMU_NOSAN static size_t section_shared_bytes() {  // the __shared__ scalars
    return __start_emu_shared ? (size_t)(__stop_emu_shared - __start_emu_shared) : 0;
}

EMU_NOSAN static size_t static_shared_bytes() {  // scalars and the arrays reached so far
    size_t arrays = 0;
    for (int i = 0; i < g_nshared_arrays; ++i) arrays += g_shared_arrays[i].hi - g_shared_arrays[i].lo;
    return section_shared_bytes() + arrays;
}

EMU_NOSAN static void poison_shared() {  // 0xFF bytes: NaN as float, -1 as int
    if (__start_emu_shared) memset(__start_emu_shared, 0xFF, section_shared_bytes());
    if (g_shared_used) memset(g_shared_arena, 0xFF, g_shared_used);
    if (g_dynamic_shared_bytes) memset(dynamic_shared, 0xFF, g_dynamic_shared_bytes);
}

// ---- Fibers: one stack per CUDA thread of a block ---------------------------------------------
// A context switch saves the callee-saved registers on the current stack, stores the stack
// pointer, loads the other one and pops its registers (x86-64: 15 instructions, no system call;
// glibc's swapcontext also saves the signal mask with a system call, ~0.5 us). Other CPUs use
// ucontext. Stacks are 64 KiB with a PROT_NONE page below each (overflow = STACK_OVERFLOW), mapped
// once and reused for every block and launch.
static const size_t kStackBytes = 64 * 1024;
enum FiberState : int { READY, AT_BARRIER, DONE };

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
struct Fiber { void* sp; int state; int line; };
static void* g_scheduler_sp;
#else
#include <ucontext.h>
struct Fiber { ucontext_t context; int state; int line; };
static ucontext_t g_scheduler_context;
#endif

static Fiber* g_fibers;
static char* g_stacks;
static size_t g_stack_capacity;    // number of fiber stacks mapped
static int g_current;              // the fiber now running
static uint32_t* g_order;          // the order threads run in during one barrier phase

EMU_NOSAN static bool ensure_fibers(size_t n) {
    if (n <= g_stack_capacity) return true;
    size_t slot = kStackBytes + g_page;
    if (g_stacks) munmap(g_stacks, g_stack_capacity * slot);
    free(g_fibers);
    free(g_order);
    g_stack_capacity = 0;
    void* m = mmap(nullptr, n * slot, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    g_fibers = (Fiber*)calloc(n, sizeof(Fiber));
    g_order = (uint32_t*)calloc(n, sizeof(uint32_t));
    if (m == MAP_FAILED || !g_fibers || !g_order) { g_stacks = nullptr; return false; }
    g_stacks = (char*)m;
    for (size_t i = 0; i < n; ++i) mprotect(g_stacks + i * slot, g_page, PROT_NONE);
    g_stack_capacity = n;
    return true;
}

EMU_NOSAN static bool in_stack_guard(uintptr_t a) {
    size_t slot = kStackBytes + g_page;
    if (!g_stacks || a < (uintptr_t)g_stacks || a >= (uintptr_t)g_stacks + g_stack_capacity * slot) return false;
    return (a - (uintptr_t)g_stacks) % slot < g_page;
}

EMU_NOSAN static uint3 thread_of(uint64_t t) {
    return uint3{(unsigned)(t % block_dim.x), (unsigned)((t / block_dim.x) % block_dim.y),
                 (unsigned)(t / ((uint64_t)block_dim.x * block_dim.y))};
}

EMU_NOSAN static void fiber_body() {  // what every fiber runs; it is never resumed after DONE
    g_entry(g_args);
    Fiber& f = g_fibers[g_current];
    f.state = DONE;
#if defined(__x86_64__)
    emu_ctx_switch(&f.sp, g_scheduler_sp);
#else
    swapcontext(&f.context, &g_scheduler_context);
#endif
    __builtin_unreachable();
}

EMU_NOSAN static void start_fiber(int t) {
    Fiber& f = g_fibers[t];
    char* top = g_stacks + (size_t)(t + 1) * (kStackBytes + g_page);  // stacks grow down
    f.state = READY;
    f.line = 0;
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
    f.context.uc_stack.ss_sp = top - kStackBytes;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_body, 0);
#endif
}

EMU_NOSAN static void resume_fiber(int t) {
    g_current = t;
    thread_idx = thread_of((uint64_t)t);
#if defined(__x86_64__)
    emu_ctx_switch(&g_scheduler_sp, g_fibers[t].sp);
#else
    swapcontext(&g_scheduler_context, &g_fibers[t].context);
#endif
}

// __syncthreads(): in fiber mode park this fiber at the barrier; in loop mode the kernel turns out
// to need barriers, so abandon this attempt and rerun the launch with fibers.
EMU_NOSAN void syncthreads(int line) {
    if (!g_fiber_mode) siglongjmp(g_jump, 2);
    Fiber& f = g_fibers[g_current];
    f.state = AT_BARRIER;
    f.line = line;
#if defined(__x86_64__)
    emu_ctx_switch(&f.sp, g_scheduler_sp);
#else
    swapcontext(&f.context, &g_scheduler_context);
#endif
}

EMU_NOSAN void device_failure(const char* what, const char* file, int line) {
    snprintf(g_report->text, sizeof g_report->text, "%s (%s:%d)", what, file, line);
    g_report->line = line;
    fail(DEVICE_ASSERT);
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
    Walk w = random_walk(nthreads, shuffled);
    for (uint64_t i = 0; i < nthreads; ++i) {
        thread_idx = thread_of(w.at(i));
        g_entry(g_args);
    }
}

EMU_NOSAN static void run_block_fibers(uint32_t nthreads, bool shuffled) {
    for (uint32_t t = 0; t < nthreads; ++t) { start_fiber((int)t); g_order[t] = t; }
    for (;;) {  // one barrier phase per iteration
        if (shuffled) shuffle(g_order, nthreads);
        for (uint32_t k = 0; k < nthreads; ++k) resume_fiber((int)g_order[k]);
        int done = -1, waiting = -1;  // one example thread of each kind
        for (uint32_t t = 0; t < nthreads; ++t) {
            Fiber& f = g_fibers[t];
            if (f.state == DONE) { done = (int)t; continue; }
            if (waiting >= 0 && f.line != g_fibers[waiting].line) {
                g_report->line = g_fibers[waiting].line;
                g_report->other_line = f.line;
                copy_uint3(g_report->other_thread, thread_of((uint64_t)waiting));
                thread_idx = thread_of(t);
                fail(BARRIER_DIVERGENCE);
            }
            waiting = (int)t;
        }
        if (waiting < 0) return;  // every thread finished
        if (done >= 0) {
            g_report->line = g_fibers[waiting].line;
            copy_uint3(g_report->other_thread, thread_of((uint64_t)waiting));
            thread_idx = thread_of((uint64_t)done);
            fail(BARRIER_EXIT);
        }
        for (uint32_t t = 0; t < nthreads; ++t) g_fibers[t].state = READY;
    }
}

EMU_NOSAN static void run_grid(bool shuffled) {
    uint64_t nblocks = (uint64_t)grid_dim.x * grid_dim.y * grid_dim.z;
    uint32_t nthreads = block_dim.x * block_dim.y * block_dim.z;
    Walk blocks = random_walk(nblocks, shuffled);
    for (uint64_t i = 0; i < nblocks; ++i) {
        uint64_t b = blocks.at(i);
        block_idx = uint3{(unsigned)(b % grid_dim.x), (unsigned)((b / grid_dim.x) % grid_dim.y),
                          (unsigned)(b / ((uint64_t)grid_dim.x * grid_dim.y))};
        poison_shared();
        if (g_fiber_mode) run_block_fibers(nthreads, shuffled);
        else run_block_loop(nthreads, shuffled);
    }
}

// ---- Faults -----------------------------------------------------------------------------------
static char g_signal_stack[64 * 1024];  // the handler runs here: fiber stacks are small

EMU_NOSAN static void on_fault(int sig, siginfo_t* info, void*) {
    uintptr_t a = (uintptr_t)info->si_addr;
    g_report->address = a;
    if (sig == SIGFPE) fail(ARITHMETIC);
    if (a - (uintptr_t)g_arena < g_arena_size) fail_access(OUT_OF_BOUNDS, a, 0, -1);
    if (in_stack_guard(a)) fail(STACK_OVERFLOW);
    fail(WILD_ACCESS);
}

struct SavedSignals { struct sigaction segv, bus, fpe; stack_t stack; };

EMU_NOSAN static void install_fault_handlers(SavedSignals* saved) {
    stack_t ss{};
    ss.ss_sp = g_signal_stack;
    ss.ss_size = sizeof g_signal_stack;
    sigaltstack(&ss, &saved->stack);
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
    sigaltstack(&saved->stack, nullptr);
}

static Region* g_regions;
static int g_nregions;

EMU_NOSAN static void copy_in() {
    for (int i = 0; i < g_nregions; ++i)
        if (g_regions[i].nbytes) memcpy(g_regions[i].device, g_regions[i].host, g_regions[i].nbytes);
}

}  // namespace emu

// ---- The entry point launcher.py calls --------------------------------------------------------
// Returns the Failure (0 on success). `args` is the driver API's array of pointers to argument
// values; for each binding the runtime stores the device pointer into that argument's slot.
EMU_EXPORT EMU_NOSAN int emu_launch(void (*entry)(void**), void** args, emu::Region* regions, int nregions,
                          const emu::Binding* bindings, int nbindings, const uint32_t* grid,
                          const uint32_t* block, uint64_t dynamic_shared_bytes, uint64_t seed,
                          int shuffled, int fiber_mode, emu::Report* report) {
    using namespace emu;
    memset(report, 0, sizeof *report);
    report->region = -1;
    g_report = report;
    g_entry = entry;
    g_args = args;
    grid_dim = dim3(grid[0], grid[1], grid[2]);
    block_dim = dim3(block[0], block[1], block[2]);
    uint32_t nthreads = block[0] * block[1] * block[2];
    // The extern __shared__ buffer is one more guarded region (with no host copy).
    Region* all = (Region*)calloc((size_t)nregions + 1, sizeof(Region));
    memcpy(all, regions, (size_t)nregions * sizeof(Region));
    all[nregions] = Region{nullptr, dynamic_shared_bytes, 1, 0, nullptr};
    g_regions = all;
    g_nregions = nregions;
    if (!map_arena(all, nregions + 1)) { free(all); report->failure = SETUP; return SETUP; }
    g_dynamic_shared_bytes = dynamic_shared_bytes;
    dynamic_shared = all[nregions].device;
    for (int i = 0; i < nregions; ++i) regions[i].device = all[i].device;
    for (int i = 0; i < nbindings; ++i)
        *(void**)args[bindings[i].arg] = all[bindings[i].region].device + bindings[i].offset;

    g_shared_lo = (uintptr_t)g_shared_arena;
    g_shared_size = g_shared_used;
    g_fiber_mode = fiber_mode;
    SavedSignals saved;
    install_fault_handlers(&saved);
    int jumped = sigsetjmp(g_jump, 1);
    if (jumped == 2) g_fiber_mode = 1;  // a __syncthreads() in loop mode: start over with fibers
    if (jumped != 1) {
        if (g_fiber_mode && !ensure_fibers(nthreads)) {
            report->failure = SETUP;
        } else {
            copy_in();
            g_rng = seed;
            run_grid(shuffled != 0);
            for (int i = 0; i < nregions; ++i)
                if (all[i].writable && all[i].nbytes) memcpy((void*)all[i].host, all[i].device, all[i].nbytes);
        }
    }
    restore_fault_handlers(&saved);
    report->used_fibers = g_fiber_mode;
    if (report->failure == BARRIER_EXIT || report->failure == BARRIER_DIVERGENCE) report->used_fibers = 1;
    fflush(stdout);  // kernel printf output appears before Python prints anything else
    unmap_arena();
    free(all);
    dynamic_shared = nullptr;
    return report->failure;
}

// Bytes of static __shared__ memory in this module (all kernels together, an upper bound for one;
// arrays count once a thread has reached their declaration).
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
    EMU_EXPORT const char* emu_signature__##name() { return emu::signature(name); }
// The kernel's __launch_bounds__ value (source.py defines emu_bound_value__<name> after the kernel).
#define EMU_LAUNCH_BOUND(name) \
    EMU_EXPORT int emu_launch_bound__##name() { return emu_bound_value__##name; }
