// emu_check.h -- checked mode: every load and store the kernel makes, checked as a GPU's
// compute-sanitizer would (memcheck and racecheck), and counted for the profiler.
//
// How the checks see the accesses: the module is compiled with `-fsanitize=thread` (and linked
// without its runtime library), so GCC calls __tsan_read4(address) before every 4-byte load the
// kernel makes (and likewise for other sizes and stores), and expects the program to define those
// functions. They are defined at the end of this file; the return address of each call is the
// kernel's own instruction, which addr2line turns into a source line. (GCC's address-sanitizer
// hooks would do for bounds, but they skip a store to an address the same block just loaded from,
// which hides exactly the read-modify-writes a race checker must see.)
//
// Buffers ("zones"): every buffer of a launch gets its own 64 GiB slice of reserved address space,
// its data in the middle and nothing else mapped. An address tells which buffer its pointer came
// from (the slice it falls in), because a 32-bit index times an element of up to 16 bytes moves a
// pointer at most 32 GiB: `a[5000]` on an 8-element `a` is reported against `a`, never silently
// read from the buffer after it, and an uninstrumented stray access faults inside the right slice.
//
// Races (the rules of racecheck): between two barriers (__syncthreads, and __syncwarp for the
// lanes it names), a write by one thread and a read or write of the same byte by another is a
// hazard, reported with both threads and both source lines. Per byte of shared memory the checker
// remembers the last writer and two readers of the current barrier interval; per byte of a
// writable global buffer of up to 16 MiB the last writer and the last reader (global memory:
// hazards also between blocks, which never synchronise within a launch). Atomics are not hazards. Two
// writes of the *same value* are not reported: the result does not depend on their order (the
// check compares the bytes once the second store has happened).
#pragma once

namespace emu {

// ---- Zones: the buffers of one launch ---------------------------------------------------------
struct GlobalCell {  // the last write and the last read of one byte (block1 = block + 1, 0 = none)
    uint32_t block1; uint16_t tid, sync; uint32_t epoch, pc;
    uint32_t rblock1; uint16_t rtid, rsync; uint32_t repoch, rpc;
};
struct SharedCell { uint32_t epoch; int16_t writer, reader, reader2; uint16_t wsync, rsync, r2sync; uint32_t wpc, rpc, r2pc; };
struct Span { uintptr_t lo, hi; int writable; GlobalCell* cells; };

static char* g_zones;               // one reservation: [zone 0][zone 1]...; the last is extern __shared__
static size_t g_zones_bytes;
static int g_zone_bits;
static Span* g_spans;
static int g_nspans;                // regions + 1
static int g_dynamic_zone;          // the extern __shared__ buffer's zone
static SharedCell* g_static_cells;  // race shadow of the static shared arena (module lifetime)
static SharedCell* g_dynamic_cells; // ... of the extern __shared__ buffer (per launch)

EMU_NOSAN static void* map_zeroed(size_t bytes) {  // lazily backed zeros (only touched pages cost)
    void* m = mmap(nullptr, bytes ? bytes : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return m == MAP_FAILED ? nullptr : m;
}

EMU_NOSAN static bool map_zones(Region* regions, int nregions) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    for (g_zone_bits = 36; g_zone_bits >= 24; g_zone_bits -= 4) {  // 64 GiB slices, smaller if refused
        g_zones_bytes = (size_t)nregions << g_zone_bits;
        void* m = mmap(nullptr, g_zones_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m != MAP_FAILED) { g_zones = (char*)m; break; }
    }
    if (!g_zones) return false;
    g_spans = (Span*)calloc((size_t)nregions, sizeof(Span));
    g_nspans = nregions;
    for (int i = 0; i < nregions; ++i) {
        char* data = g_zones + ((size_t)i << g_zone_bits) + ((size_t)1 << (g_zone_bits - 1));
        size_t mapped = (regions[i].nbytes + page - 1) / page * page;
        if (mapped && mprotect(data, mapped, PROT_READ | PROT_WRITE) != 0) return false;
        g_spans[i] = Span{(uintptr_t)data, (uintptr_t)data + regions[i].nbytes, regions[i].writable, nullptr};
        regions[i].device = data;
    }
    return true;
}

EMU_NOSAN static void unmap_zones() {
    if (g_zones) munmap(g_zones, g_zones_bytes);
    for (int i = 0; i < g_nspans; ++i)
        if (g_spans[i].cells) munmap(g_spans[i].cells, (g_spans[i].hi - g_spans[i].lo) * sizeof(GlobalCell));
    free(g_spans);
    g_zones = nullptr;
    g_zones_bytes = 0;
    g_spans = nullptr;
    g_nspans = 0;
}

EMU_NOSAN static int zone_of(uintptr_t a) {
    uintptr_t off = a - (uintptr_t)g_zones;
    return off < g_zones_bytes ? (int)(off >> g_zone_bits) : -1;
}

// ---- Reports ----------------------------------------------------------------------------------
[[noreturn]] EMU_NOSAN static void fail_access(Failure what, int zone, uintptr_t a, size_t n, int is_write, const void* pc) {
    Report r = blank_report();
    r.region = zone;
    r.offset = zone >= 0 ? (int64_t)(a - g_spans[zone].lo) : 0;
    r.size = (int32_t)n;
    r.is_write = is_write;
    r.address = a;
    r.pc = code_offset(pc);
    fail_with(what, r);
}

[[noreturn]] EMU_NOSAN static void fail_shared_access(Failure what, uintptr_t a, size_t n, int is_write, const void* pc) {
    size_t off = a - (uintptr_t)shared_base;
    int i = nearest_shared_variable(off);
    Report r = blank_report();
    r.size = (int32_t)n;
    r.is_write = is_write;
    r.address = a;
    r.pc = code_offset(pc);
    r.space = SPACE_SHARED;
    if (i >= 0) {
        r.offset = (int64_t)off - (int64_t)g_shared[i].offset;
        r.element_bytes = (int32_t)g_shared[i].element;
        r.array_bytes = g_shared[i].bytes;
        snprintf(r.text, sizeof r.text, "%s", g_shared[i].name);
        snprintf(r.text2, sizeof r.text2, "%s", g_shared[i].decl);
    }
    fail_with(what, r);
}

// ---- Races ------------------------------------------------------------------------------------
// An interval is the stretch between two barriers of one block; g_epoch numbers them (module-wide,
// so shared-memory cells from an earlier block or launch read as empty).
static uint32_t g_epoch = 1;
static bool g_fenced;                     // a __threadfence() was called: global read-after-write
                                          // across blocks may be deliberate (last-block patterns)
// __syncwarp ordering: the masks of the groups each thread joined in the current interval.
static const int kSyncLog = 64;
static uint16_t* g_sync_count;            // per thread of the block
static uint32_t* g_sync_log;              // [thread][kSyncLog]

EMU_NOSAN static void new_interval(uint32_t nthreads) {
    if (++g_epoch == 0) {  // wrapped: forget every cell
        g_epoch = 1;
        if (g_static_cells) memset(g_static_cells, 0, kSharedArenaBytes * sizeof(SharedCell));
    }
    if (g_sync_count) memset(g_sync_count, 0, nthreads * sizeof(uint16_t));
}

EMU_NOSAN static void note_syncwarp(uint32_t tid, uint32_t members) {
    uint16_t& n = g_sync_count[tid];
    if (n < kSyncLog) g_sync_log[(size_t)tid * kSyncLog + n] = members;
    if (n < 0xFFFF) ++n;
}

// Did thread a's access, made after it had joined `sync` __syncwarp groups, happen before the
// running thread b's access? Only through a __syncwarp both joined afterwards (same interval).
EMU_NOSAN static bool ordered(uint32_t a, uint32_t sync, uint32_t b) {
    if ((a >> 5) != (b >> 5) || !g_sync_count) return false;
    uint32_t n = g_sync_count[a], bit = 1u << (b & 31);
    if (n > (uint32_t)kSyncLog) return true;  // log overflow: assume ordered rather than cry wolf
    for (uint32_t k = sync; k < n; ++k)
        if (g_sync_log[(size_t)a * kSyncLog + k] & bit) return true;
    return false;
}

// A write-after-write candidate waits here until the second store has happened; then the bytes
// tell whether the two writes wrote the same value (not a hazard) or not.
struct Pending {
    int active;
    uintptr_t address;
    size_t size;
    unsigned char before[16];
    Report report;                        // the race, ready to be reported
    uint3 thread;
};
static Pending g_pending;

[[noreturn]] EMU_NOSAN static void fail_race(Report& r, uint3 thread) {
    thread_idx = thread;
    fail_with(RACE, r);
}

EMU_NOSAN static void resolve_pending() {
    if (!g_pending.active) return;
    g_pending.active = 0;
    if (memcmp((const void*)g_pending.address, g_pending.before, g_pending.size) != 0)
        fail_race(g_pending.report, g_pending.thread);
}

EMU_NOSAN static Report race_report(Hazard kind, Space space, uintptr_t a, size_t n, int is_write, const void* pc,
                                    uint32_t other, uint32_t other_pc, int other_is_write, uint64_t other_block) {
    Report r = blank_report();
    r.detail = kind;
    r.space = space;
    r.address = a;
    r.size = (int32_t)n;
    r.is_write = is_write;
    r.pc = code_offset(pc);
    r.other_pc = other_pc;
    r.other_is_write = other_is_write;
    copy_uint3(r.other_thread, thread_of(other));
    copy_uint3(r.other_block, block_of(other_block));
    if (space == SPACE_GLOBAL || space == SPACE_DYNAMIC_SHARED) {
        int z = zone_of(a);
        r.region = z;
        r.offset = (int64_t)(a - g_spans[z].lo);
    } else {
        size_t off = a - (uintptr_t)shared_base;
        int i = nearest_shared_variable(off);
        r.offset = (int64_t)off - (int64_t)g_shared[i].offset;
        r.element_bytes = (int32_t)g_shared[i].element;
        r.array_bytes = g_shared[i].bytes;
        snprintf(r.text, sizeof r.text, "%s", g_shared[i].name);
        snprintf(r.text2, sizeof r.text2, "%s", g_shared[i].decl);
    }
    return r;
}

EMU_NOSAN static void defer_write_after_write(const Report& r, uintptr_t a, size_t n) {
    if (g_pending.active) return;  // one per access is enough
    g_pending.active = 1;
    g_pending.address = a;
    g_pending.size = n < 16 ? n : 16;
    memcpy(g_pending.before, (const void*)a, g_pending.size);
    g_pending.report = r;
    g_pending.thread = thread_idx;
}

EMU_NOSAN static void shared_race(SharedCell* cells, Space space, uintptr_t a, size_t off, size_t n, int is_write, const void* pc) {
    const uint32_t tid = g_tid;
    const uint16_t sync = g_sync_count ? g_sync_count[tid] : 0;
    const uint32_t code = (uint32_t)code_offset(pc);
    for (size_t b = off; b < off + n; ++b) {
        SharedCell& c = cells[b];
        if (c.epoch != g_epoch) c = SharedCell{g_epoch, -1, -1, -1, 0, 0, 0, 0, 0, 0};
        if (is_write) {
            if (c.reader >= 0 && (uint32_t)c.reader != tid && !ordered(c.reader, c.rsync, tid)) {
                Report r = race_report(WRITE_AFTER_READ, space, a, n, 1, pc, c.reader, c.rpc, 0, g_block_linear);
                fail_race(r, thread_idx);
            }
            if (c.reader2 >= 0 && (uint32_t)c.reader2 != tid && !ordered(c.reader2, c.r2sync, tid)) {
                Report r = race_report(WRITE_AFTER_READ, space, a, n, 1, pc, c.reader2, c.r2pc, 0, g_block_linear);
                fail_race(r, thread_idx);
            }
            if (c.writer >= 0 && (uint32_t)c.writer != tid && !ordered(c.writer, c.wsync, tid))
                defer_write_after_write(race_report(WRITE_AFTER_WRITE, space, a, n, 1, pc, c.writer, c.wpc, 1, g_block_linear), a, n);
            c.writer = (int16_t)tid; c.wpc = code; c.wsync = sync;
        } else {
            if (c.writer >= 0 && (uint32_t)c.writer != tid && !ordered(c.writer, c.wsync, tid)) {
                Report r = race_report(READ_AFTER_WRITE, space, a, n, 0, pc, c.writer, c.wpc, 1, g_block_linear);
                fail_race(r, thread_idx);
            }
            if (c.reader < 0 || (uint32_t)c.reader == tid) { c.reader = (int16_t)tid; c.rpc = code; c.rsync = sync; }
            else if (c.reader2 < 0 || (uint32_t)c.reader2 == tid) { c.reader2 = (int16_t)tid; c.r2pc = code; c.r2sync = sync; }
        }
    }
}

// Global memory: the other access conflicts when it came from another block (blocks never
// synchronise within a launch), or from another thread of this block in the same interval.
EMU_NOSAN static inline bool global_conflict(uint32_t block1, uint32_t tid, uint32_t epoch, uint32_t sync,
                                             uint32_t my_block1, uint32_t me) {
    if (!block1 || (block1 == my_block1 && tid == me)) return false;
    return block1 != my_block1 || (epoch == g_epoch && !ordered(tid, sync, me));
}

// Global buffers larger than this are not race-checked: their shadow (32 bytes per byte written
// or read) would cost more memory than a checked run should take.
static const size_t kRaceCheckedBytes = (size_t)16 << 20;

EMU_NOSAN static void global_race(Span& s, uintptr_t a, size_t n, int is_write, const void* pc) {
    if (!s.writable || s.hi - s.lo > kRaceCheckedBytes) return;  // nothing writes it, or too large
    if (!s.cells && !(s.cells = (GlobalCell*)map_zeroed((s.hi - s.lo) * sizeof(GlobalCell)))) return;
    const uint32_t tid = g_tid, block1 = (uint32_t)g_block_linear + 1;
    const uint16_t sync = g_sync_count ? g_sync_count[tid] : 0;
    const uint32_t code = (uint32_t)code_offset(pc);
    for (size_t b = a - s.lo; b < a - s.lo + n; ++b) {
        GlobalCell& c = s.cells[b];
        if (is_write) {
            if (global_conflict(c.rblock1, c.rtid, c.repoch, c.rsync, block1, tid) && !g_fenced) {
                Report r = race_report(WRITE_AFTER_READ, SPACE_GLOBAL, a, n, 1, pc, c.rtid, c.rpc, 0, c.rblock1 - 1);
                fail_race(r, thread_idx);
            }
            if (global_conflict(c.block1, c.tid, c.epoch, c.sync, block1, tid))
                defer_write_after_write(race_report(WRITE_AFTER_WRITE, SPACE_GLOBAL, a, n, 1, pc, c.tid, c.pc, 1,
                                                    c.block1 - 1), a, n);
            c.block1 = block1; c.tid = (uint16_t)tid; c.sync = sync; c.epoch = g_epoch; c.pc = code;
        } else {
            if (global_conflict(c.block1, c.tid, c.epoch, c.sync, block1, tid) && !g_fenced) {
                Report r = race_report(READ_AFTER_WRITE, SPACE_GLOBAL, a, n, 0, pc, c.tid, c.pc, 1, c.block1 - 1);
                fail_race(r, thread_idx);
            }
            c.rblock1 = block1; c.rtid = (uint16_t)tid; c.rsync = sync; c.repoch = g_epoch; c.rpc = code;
        }
    }
}

EMU_NOSAN void note_fence() { g_fenced = true; }

// ---- The check of one access ------------------------------------------------------------------
struct ProfileHook { void (*access)(int space, uintptr_t a, size_t n, int is_write, const void* pc); };
static ProfileHook g_profile_hook;

EMU_NOSAN static inline bool misaligned(uintptr_t a, size_t n) {
    return n <= 16 && (n & (n - 1)) == 0 && (a & (n - 1)) != 0;  // natural alignment of 2..16 bytes
}

EMU_NOSAN static void check(uintptr_t a, size_t n, int is_write, const void* pc, bool atomic = false) {
    if (g_pending.active) resolve_pending();
    uintptr_t off = a - (uintptr_t)g_zones;
    if (off < g_zones_bytes) {
        int z = (int)(off >> g_zone_bits);
        Span& s = g_spans[z];
        if (a < s.lo || a + n > s.hi) fail_access(OUT_OF_BOUNDS, z, a, n, is_write, pc);
        if (is_write && !s.writable) fail_access(WRITE_TO_CONST, z, a, n, is_write, pc);
        if (misaligned(a, n)) fail_access(MISALIGNED, z, a, n, is_write, pc);
        if (z == g_dynamic_zone) {
            if (g_options.racecheck && !atomic) shared_race(g_dynamic_cells, SPACE_DYNAMIC_SHARED, a, a - s.lo, n, is_write, pc);
            if (g_profile_hook.access && !atomic) g_profile_hook.access(SPACE_DYNAMIC_SHARED, a, n, is_write, pc);
        } else {
            if (g_options.racecheck && !atomic) global_race(s, a, n, is_write, pc);
            if (g_profile_hook.access && !atomic) g_profile_hook.access(SPACE_GLOBAL, a, n, is_write, pc);
        }
        return;
    }
    uintptr_t s = a - (uintptr_t)shared_base;
    if (s < g_shared_used) {
        if (shared_variable_at(s, n) < 0) fail_shared_access(SHARED_OUT_OF_BOUNDS, a, n, is_write, pc);
        if (misaligned(a, n)) fail_shared_access(MISALIGNED, a, n, is_write, pc);
        if (g_options.racecheck && !atomic && g_static_cells) shared_race(g_static_cells, SPACE_SHARED, a, s, n, is_write, pc);
        if (g_profile_hook.access && !atomic) g_profile_hook.access(SPACE_SHARED, a, n, is_write, pc);
    }
}

// A 2- or 4-component vector type copied (cuda_emu.h): one access of its size on each side, as a
// GPU's 8- or 16-byte load and store (so misalignment is caught and the profiler counts one
// request); stack copies are not checked (check() ignores addresses outside device memory).
EMU_NOSAN void vector_copy(void* to, const void* from, size_t bytes) {
    const void* pc = __builtin_return_address(0);  // in the kernel, where the copy was inlined
    check((uintptr_t)from, bytes, 0, pc);
    check((uintptr_t)to, bytes, 1, pc);
    memmove(to, from, bytes);
}

// Atomics (cuda_emu.h): checked for bounds and alignment, never a race.
EMU_NOSAN void atomic_access(const void* address, size_t bytes, const void* pc) {
    check((uintptr_t)address, bytes, 1, pc, true);
}

}  // namespace emu

// GCC's -fsanitize=thread instrumentation (compiled in, its runtime library not linked): a call
// before every load and store of the kernel, and before every atomic builtin of instrumented code.
#define EMU_TSAN_ACCESS(n)                                                                                   \
    extern "C" EMU_NOSAN void __tsan_read##n(void* a) { emu::check((uintptr_t)a, n, 0, __builtin_return_address(0)); }  \
    extern "C" EMU_NOSAN void __tsan_write##n(void* a) { emu::check((uintptr_t)a, n, 1, __builtin_return_address(0)); } \
    extern "C" EMU_NOSAN void __tsan_unaligned_read##n(void* a) { emu::check((uintptr_t)a, n, 0, __builtin_return_address(0)); } \
    extern "C" EMU_NOSAN void __tsan_unaligned_write##n(void* a) { emu::check((uintptr_t)a, n, 1, __builtin_return_address(0)); }
EMU_TSAN_ACCESS(1)
EMU_TSAN_ACCESS(2)
EMU_TSAN_ACCESS(4)
EMU_TSAN_ACCESS(8)
EMU_TSAN_ACCESS(16)
extern "C" EMU_NOSAN void __tsan_read_range(void* a, size_t n) { emu::check((uintptr_t)a, n, 0, __builtin_return_address(0)); }
extern "C" EMU_NOSAN void __tsan_write_range(void* a, size_t n) { emu::check((uintptr_t)a, n, 1, __builtin_return_address(0)); }
extern "C" EMU_NOSAN void __tsan_init() {}
extern "C" EMU_NOSAN void __tsan_func_entry(void*) {}
extern "C" EMU_NOSAN void __tsan_func_exit() {}
extern "C" EMU_NOSAN void __tsan_vptr_update(void**, void*) {}
extern "C" EMU_NOSAN void __tsan_vptr_read(void**) {}
extern "C" EMU_NOSAN void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" EMU_NOSAN void __tsan_atomic_signal_fence(int) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
// Atomic builtins in instrumented code (e.g. the guard of a function-local static): done as asked.
#define EMU_TSAN_ATOMICS(bits, T)                                                                            \
    extern "C" EMU_NOSAN T __tsan_atomic##bits##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
    extern "C" EMU_NOSAN void __tsan_atomic##bits##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" EMU_NOSAN T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" EMU_NOSAN T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" EMU_NOSAN T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" EMU_NOSAN T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" EMU_NOSAN T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" EMU_NOSAN T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" EMU_NOSAN T __tsan_atomic##bits##_fetch_nand(volatile T* a, T v, int) { return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" EMU_NOSAN int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) { \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }              \
    extern "C" EMU_NOSAN int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) { \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); }               \
    extern "C" EMU_NOSAN T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) {     \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); return c; }
EMU_TSAN_ATOMICS(8, uint8_t)
EMU_TSAN_ATOMICS(16, uint16_t)
EMU_TSAN_ATOMICS(32, uint32_t)
EMU_TSAN_ATOMICS(64, uint64_t)
