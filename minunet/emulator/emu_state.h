// emu_state.h -- what the runtime headers share: the failure codes and report that cross the
// ctypes boundary, the launch's state, the workers (OS threads running blocks) and fail().
#pragma once

#include <dlfcn.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace emu {

// ---- What crosses the ctypes boundary (mirrored by ctypes.Structure classes in launcher.py) ---
enum Failure : int32_t {
    OK = 0,
    OUT_OF_BOUNDS = 1,         // a load or store outside the buffer its pointer came from
    WRITE_TO_CONST = 2,        // a store into a buffer that only const pointer parameters name
    WILD_ACCESS = 3,           // a fault at an address that belongs to no buffer (null, garbage)
    STACK_OVERFLOW = 4,        // a fiber ran past its stack (large local arrays)
    ARITHMETIC = 5,            // SIGFPE: integer division by zero
    BARRIER_DIVERGENCE = 6,    // threads of one block wait at different __syncthreads() lines
    BARRIER_EXIT = 7,          // some threads returned while others wait at a __syncthreads()
    DEVICE_ASSERT = 8,         // assert() or __trap() in the kernel
    SETUP = 9,                 // the runtime could not allocate its memory
    SHARED_OUT_OF_BOUNDS = 10, // an access outside every static __shared__ variable (a redzone)
    SHARED_INDEX = 11,         // one index of a static __shared__ array out of its dimension
    MISALIGNED = 12,           // an access not aligned to its size (a float4 load from x + 1)
    RACE = 13,                 // two threads, one writing, the same address, no barrier between
    SHARED_LIMIT = 14,         // more than 48 KiB of shared memory for one block
    WARP_MASK = 15,            // a lane called a warp collective with its own bit not in the mask
    WARP_DIVERGENCE = 16,      // lanes named in a mask wait at different calls (or masks differ)
    WARP_EXIT = 17,            // a wmma call without all 32 lanes of the warp
    WARP_ARGUMENT = 18,        // invalid width, wmma pointer/ldm, lanes passing different arguments
};
enum Hazard : int32_t { READ_AFTER_WRITE = 1, WRITE_AFTER_READ = 2, WRITE_AFTER_WRITE = 3 };
enum Space : int32_t { SPACE_NONE = 0, SPACE_SHARED = 1, SPACE_DYNAMIC_SHARED = 2, SPACE_GLOBAL = 3 };

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

struct Options {             // how to run one launch (launcher.py fills it)
    uint64_t seed;           // thread/block order shuffle seed
    int32_t shuffled;        // 0: blocks and threads in index order
    int32_t fiber_mode;      // 1: run threads as fibers from the start (the kernel has barriers)
    int32_t racecheck;       // checked mode: record accesses and report hazards
    int32_t workers;         // OS threads running blocks (fast mode), >= 1
    int32_t direct;          // fast mode: the kernel works on the NumPy memory itself (no copies)
    int32_t profile;         // count memory requests (see emu_profile.h)
    uint64_t sample_every;   // profile: trace every n-th block (1 = all)
};

struct Report {
    int32_t failure;         // a Failure
    int32_t region;          // the buffer involved, -1 for none, nregions = extern __shared__
    int64_t offset;          // byte offset of the bad access from the buffer's (array's) first byte
    int32_t size;            // bytes accessed (0 when unknown: caught by a fault)
    int32_t is_write;        // 1 store, 0 load, -1 unknown
    uint32_t block[3], thread[3];
    uint64_t address;
    int32_t line, other_line;  // source lines when known without debug info (barriers, warps, indices)
    uint32_t other_thread[3], other_block[3];
    int32_t used_fibers;     // out: 1 if the kernel ran (or had to run) in fiber mode
    int32_t element_bytes;   // shared arrays: the element size ...
    uint64_t array_bytes;    // ... and total size
    uint64_t pc, other_pc;   // code offsets in the library (addr2line gives file:line), 0 unknown
    int32_t detail;          // RACE: a Hazard; SHARED_INDEX: the dimension; warps: the operation
    int32_t space;           // RACE: a Space
    int32_t other_is_write;
    int32_t other_region;
    int64_t value, other_value;  // SHARED_INDEX: index, extent; SHARED_LIMIT: bytes; warps: masks
    char text[256];          // assert text / shared array name / warp function
    char text2[256];         // shared array declaration / the other lane's function
};

// ---- Launch state -----------------------------------------------------------------------------
static Report* g_report;
static void (*g_entry)(void**);             // runs one CUDA thread
static void (*g_block_entry)(void**);       // fast mode: runs every thread of a block (loop mode)
static void** g_args;
static Options g_options;
static uint32_t g_nthreads;                 // threads per block
static uint64_t g_nblocks;
static int g_failed;                        // set once (atomically) by the first failure
static int g_need_fibers;                   // a barrier or warp call was reached in loop mode
static uintptr_t g_library_base;            // for code offsets in reports
static uint64_t g_tensor_flops;             // profiler: 2*m*n*k per wmma::mma_sync of a warp

// One worker per OS thread that runs blocks (checked mode: just the calling thread).
struct Fiber;
struct Worker {
    sigjmp_buf jump;                        // siglongjmp(jump, 1): failure; (jump, 2): need fibers
    int index;
    bool fiber_mode;
    Fiber* fibers;
    char* stacks;                           // one mapping: [guard page][stack] per fiber
    size_t capacity;                        // fibers mapped
    uint32_t* order;                        // the order threads run in during one pass
    int current;                            // the fiber now running
    int warp_waiting;                       // fibers parked at a warp collective
    void* scheduler_sp;                     // x86-64: the scheduler's saved stack pointer
    char* shared_arena;                     // static __shared__ variables of the block it runs
    char* dynamic_shared;                   // fast mode: its own extern __shared__ buffer
    size_t dynamic_capacity;
    char* signal_stack;
    uint64_t rng;
};
static const int kMaxWorkers = 64;
static Worker g_workers[kMaxWorkers];
static EMU_TLS Worker* g_self;              // the worker this OS thread is

// The running CUDA thread, for the checks and the profiler (checked mode, one worker; fast mode
// never writes them).
static uint32_t g_tid;                      // linear thread index in the block
static uint64_t g_block_linear;

__attribute__((no_sanitize_address)) static inline uint64_t next_random() {  // splitmix64
    uint64_t z = (g_self->rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

EMU_NOSAN static void copy_uint3(uint32_t* dst, uint3 v) { dst[0] = v.x; dst[1] = v.y; dst[2] = v.z; }

EMU_NOSAN static uint3 thread_of(uint64_t t) {
    return uint3{(unsigned)(t % block_dim.x), (unsigned)((t / block_dim.x) % block_dim.y),
                 (unsigned)(t / ((uint64_t)block_dim.x * block_dim.y))};
}
EMU_NOSAN static uint3 block_of(uint64_t b) {
    return uint3{(unsigned)(b % grid_dim.x), (unsigned)((b / grid_dim.x) % grid_dim.y),
                 (unsigned)(b / ((uint64_t)grid_dim.x * grid_dim.y))};
}

EMU_NOSAN static uint64_t code_offset(const void* pc) {
    return pc ? (uint64_t)((uintptr_t)pc - g_library_base) : 0;
}

// The first failure of a launch fills the report (blocks on other workers just stop); then this
// worker jumps back to where it started running blocks.
static bool claim_report() { return __atomic_exchange_n(&g_failed, 1, __ATOMIC_ACQ_REL) == 0; }

[[noreturn]] EMU_NOSAN static void fail_with(Failure what, const Report& details) {
    if (claim_report()) {
        *g_report = details;
        g_report->failure = what;
        copy_uint3(g_report->block, block_idx);
        copy_uint3(g_report->thread, thread_idx);
    }
    siglongjmp(g_self->jump, 1);
}

[[noreturn]] EMU_NOSAN static void fail(Failure what) {
    if (claim_report()) {
        g_report->failure = what;
        copy_uint3(g_report->block, block_idx);
        copy_uint3(g_report->thread, thread_idx);
    }
    siglongjmp(g_self->jump, 1);
}

static Report blank_report() {
    Report r;
    memset(&r, 0, sizeof r);
    r.region = -1;
    r.other_region = -1;
    r.is_write = -1;
    return r;
}

EMU_NOSAN void device_failure(const char* what, const char* file, int line) {
    Report r = blank_report();
    snprintf(r.text, sizeof r.text, "%s (%s:%d)", what, file, line);
    r.line = line;
    fail_with(DEVICE_ASSERT, r);
}

}  // namespace emu
