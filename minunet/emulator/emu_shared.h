// emu_shared.h -- storage for static __shared__ variables (emu::SharedArray in cuda_emu.h).
//
// Every __shared__ variable of the module gets an offset in one layout, in the order threads
// first reach their declarations, each 64 bytes (a redzone) from the next. Each worker (OS
// thread) has its own arena with that layout (4 MiB of address space, only touched pages use
// memory), so blocks running at the same time in fast mode have their own shared memory.
// In checked mode the runtime also
//   - fills every variable a launch uses with 0xFF bytes (NaN as float, -1 as int) at the start
//     of each block, so reading a slot no thread wrote shows up;
//   - adds up the bytes of the variables a launch reaches and refuses more than 48 KiB, as ptxas
//     and the driver do (arrays a launch never reaches are not counted: a lower bound);
//   - knows, for every 16-byte granule of the arena, which variable it belongs to, so a check is
//     one table lookup and a report can name the variable.
#pragma once

namespace emu {

static const size_t kSharedRedzone = 64;
static const size_t kSharedArenaBytes = (size_t)4 << 20;
static const int kMaxSharedArrays = 4096;
static const size_t kSharedLimit = 48 * 1024;     // per block, without cudaFuncSetAttribute

struct SharedDecl { size_t offset, bytes, element; const char* name; const char* decl; uint64_t used_in; };
static SharedDecl g_shared[kMaxSharedArrays];
static int g_nshared;
static size_t g_shared_used = kSharedRedzone;     // bytes of the layout, the first redzone included
static int16_t* g_granule;                        // variable index per 16-byte granule, -1 redzone
static int g_shared_lock;

// Per launch (checked mode): which variables it reached and how many bytes they hold.
static uint64_t g_launch_number;
static int g_used[kMaxSharedArrays];
static int g_nused;
static size_t g_static_bytes, g_dynamic_bytes;

EMU_NOSAN static void lock_shared() { while (__atomic_exchange_n(&g_shared_lock, 1, __ATOMIC_ACQUIRE)) {} }
EMU_NOSAN static void unlock_shared() { __atomic_store_n(&g_shared_lock, 0, __ATOMIC_RELEASE); }

EMU_NOSAN static char* map_shared_arena() {
    void* m = mmap(nullptr, kSharedArenaBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return m == MAP_FAILED ? nullptr : (char*)m;
}

EMU_NOSAN int register_shared(size_t bytes, size_t element, size_t alignment, const char* name, const char* decl) {
    lock_shared();
    size_t offset = (g_shared_used + alignment - 1) / alignment * alignment;
    if (offset + bytes + kSharedRedzone > kSharedArenaBytes || g_nshared == kMaxSharedArrays) {
        unlock_shared();
        device_failure("static __shared__ variables exceed the emulator's 4 MiB / 4096-variable arena", __FILE__, __LINE__);
    }
    if (!g_granule) {
        g_granule = (int16_t*)malloc(kSharedArenaBytes / 16 * sizeof(int16_t));
        if (!g_granule) { unlock_shared(); device_failure("out of memory", __FILE__, __LINE__); }
        memset(g_granule, 0xFF, kSharedArenaBytes / 16 * sizeof(int16_t));
    }
    int index = g_nshared;
    g_shared[index] = SharedDecl{offset, bytes, element, name, decl, 0};
    for (size_t g = offset / 16; g < (offset + bytes + 15) / 16; ++g) g_granule[g] = (int16_t)index;
    __atomic_store_n(&g_nshared, index + 1, __ATOMIC_RELEASE);
    g_shared_used = offset + bytes + kSharedRedzone;
    unlock_shared();
    return index;
}

EMU_NOSAN size_t shared_offset(int array) { return g_shared[array].offset; }

// Checked mode: the first time a launch reaches a declaration, count its bytes and poison it.
EMU_NOSAN void note_shared_use(int array) {
    SharedDecl& d = g_shared[array];
    if (d.used_in == g_launch_number) return;
    d.used_in = g_launch_number;
    g_used[g_nused++] = array;
    g_static_bytes += d.bytes;
    memset(shared_base + d.offset, 0xFF, d.bytes);
    if (g_static_bytes > kSharedLimit || g_static_bytes + g_dynamic_bytes > kSharedLimit) {
        Report r = blank_report();
        r.value = (int64_t)g_static_bytes;
        r.other_value = (int64_t)g_dynamic_bytes;
        char* p = r.text;
        for (int i = 0; i < g_nused && p < r.text + sizeof r.text - 64; ++i)
            p += snprintf(p, r.text + sizeof r.text - p, "%s%s (%zu bytes)", i ? ", " : "",
                          g_shared[g_used[i]].decl, g_shared[g_used[i]].bytes);
        fail_with(SHARED_LIMIT, r);
    }
}

EMU_NOSAN void shared_index_failure(int array, int dim, long long index, long long extent, int line) {
    Report r = blank_report();
    snprintf(r.text, sizeof r.text, "%s", g_shared[array].name);
    snprintf(r.text2, sizeof r.text2, "%s", g_shared[array].decl);
    r.detail = dim;
    r.value = index;
    r.other_value = extent;
    r.line = line;
    r.element_bytes = (int32_t)g_shared[array].element;
    r.array_bytes = g_shared[array].bytes;
    fail_with(SHARED_INDEX, r);
}

// The variable whose bytes [off, off + n) are, -1 when they touch a redzone or two variables.
EMU_NOSAN static inline int shared_variable_at(size_t off, size_t n) {
    int i = g_granule[off >> 4];
    if (i < 0) return -1;
    const SharedDecl& d = g_shared[i];
    return (off >= d.offset && off + n <= d.offset + d.bytes) ? i : -1;
}

EMU_NOSAN static int nearest_shared_variable(size_t off) {
    int best = -1;
    size_t best_distance = ~(size_t)0;
    for (int i = 0; i < g_nshared; ++i) {
        const SharedDecl& d = g_shared[i];
        size_t distance = off < d.offset ? d.offset - off : (off >= d.offset + d.bytes ? off - d.offset - d.bytes + 1 : 0);
        if (distance < best_distance) { best_distance = distance; best = i; }
    }
    return best;
}

// File-scope __shared__ variables: the linker puts them between these two symbols (see the
// __shared__ macro in cuda_emu.h); they are weak so a module without any still links.
extern "C" char __start_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_emu_shared[] __attribute__((weak, visibility("hidden")));

// Checked mode, at the start of every block: poison what the launch has used so far.
EMU_NOSAN static void poison_shared(size_t dynamic_bytes) {
    if (__start_emu_shared) memset(__start_emu_shared, 0xFF, (size_t)(__stop_emu_shared - __start_emu_shared));
    for (int i = 0; i < g_nused; ++i) memset(shared_base + g_shared[g_used[i]].offset, 0xFF, g_shared[g_used[i]].bytes);
    if (dynamic_bytes) memset(dynamic_shared, 0xFF, dynamic_bytes);
}

EMU_NOSAN static size_t static_shared_bytes() {  // everything registered so far (all kernels)
    size_t total = __start_emu_shared ? (size_t)(__stop_emu_shared - __start_emu_shared) : 0;
    for (int i = 0; i < g_nshared; ++i) total += g_shared[i].bytes;
    return total;
}

}  // namespace emu
