// cuda_emu.h -- what a CUDA C kernel sees when minunet's emulator compiles it for the CPU.
//
// minunet's Python side (minunet/emulator/compiler.py) compiles a .cu file as C++17 with g++:
//
//     #include "cuda_emu.h"       <- this file: CUDA's keywords, built-in variables, math, atomics,
//                                    warp collectives (and <mma.h>, <cuda_fp16.h> from include/)
//     #line 1 "conv.cu"
//     ... the .cu text, unchanged except __shared__ declarations (see source.py) ...
//     #include "emu_runtime.h"    <- the launcher: block loop, fibers, guarded buffers, checks
//     ... one small exported entry point per kernel ...
//
// Everything here is ordinary C++; nothing is specific to one kernel. Read it next to the CUDA C
// Programming Guide: each block of definitions names the Guide's section it stands in for.
//
// Two builds of the same text (compiler.py): EMU_CHECKED=1 ("checked" mode: every load and store
// is checked by the runtime, shared-array indices are checked per dimension, one OS thread runs
// the blocks) and EMU_CHECKED=0 ("fast" mode: no checks, blocks spread over the CPU cores, so the
// per-thread state below is thread_local).
#pragma once

#include <float.h>    // FLT_MAX, FLT_MIN, FLT_EPSILON
#include <math.h>     // expf, logf, sqrtf, INFINITY, NAN ... (global namespace, as in CUDA)
#include <stddef.h>
#include <stdint.h>   // uint32_t and friends
#include <stdio.h>    // printf works inside emulated kernels (prints to the process's stdout)
#include <string.h>
#include <type_traits>
#include <utility>

#ifndef EMU_CHECKED
#define EMU_CHECKED 1
#endif
#if EMU_CHECKED
#define EMU_TLS                 // one OS thread runs every block: plain statics are cheapest
#else
#define EMU_TLS thread_local    // blocks run on several OS threads at once
#endif
// The runtime's own code is never instrumented (only the kernel's loads and stores are checked).
#define EMU_NOSAN __attribute__((no_sanitize_thread, no_sanitize_address, noinline))

// ---- Function and variable qualifiers (Guide: "C++ Language Extensions") --------------------
// On the CPU every function is an ordinary function, so the execution-space qualifiers vanish.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)  // checked at launch by the Python side (block size <= the bound)
#define __constant__            // a plain global: fine for constants initialised in the source
#define __grid_constant__

// `#pragma unroll N` (source.py rewrites it to EMU_UNROLL(N); N = 64 when the pragma has none):
// GCC's own unroll pragma in fast mode, where it keeps a thread's accumulator arrays in registers
// as on a GPU; nothing in checked mode, whose build is about checks, not speed.
#define EMU_PRAGMA(text) _Pragma(#text)
#if EMU_CHECKED
#define EMU_UNROLL(n)
#else
#define EMU_UNROLL(n) EMU_PRAGMA(GCC unroll n)
#endif

// `__shared__` memory: one copy per block. source.py rewrites every `__shared__` declaration inside
// a function (arrays and scalars) into an emu::SharedArray holder (below) whose storage lives in
// the runtime's per-block arena; this macro is what is left for declarations at file scope: a
// static in the linker section "emu_shared" that the runtime refills with NaN bytes per block.
#define __shared__ static __attribute__((section("emu_shared")))

// ---- Built-in vector types (Guide: "Built-in Vector Types"), with CUDA's alignments ----------
// A GPU loads and stores a float4 as one 16-byte access, which faults unless the address is a
// multiple of 16 (likewise 8 for float2, int2, ...). GCC would split the copy into four 4-byte
// accesses that need no such alignment, so in checked mode a 2- or 4-component vector is copied
// by emu::vector_copy: one access of the vector's size, checked (alignment, bounds, races) and
// counted by the profiler as such.
namespace emu { void vector_copy(void* to, const void* from, size_t bytes); }
#if EMU_CHECKED
#define EMU_VEC_COPY(name)                                                                          \
    name() = default;                                                                               \
    name(const name& o) { emu::vector_copy(this, &o, sizeof(name)); }                               \
    name& operator=(const name& o) { emu::vector_copy(this, &o, sizeof(name)); return *this; }
#define EMU_VEC2(T, name, align) struct __align__(align) name {                                      \
        T x, y;                                                                                     \
        constexpr name(T x_, T y_) : x(x_), y(y_) {}                                                \
        EMU_VEC_COPY(name)                                                                          \
    };                                                                                              \
    static inline name make_##name(T x, T y) { return name{x, y}; }
#define EMU_VEC4(T, name, align) struct __align__(align) name {                                      \
        T x, y, z, w;                                                                               \
        constexpr name(T x_, T y_, T z_, T w_) : x(x_), y(y_), z(z_), w(w_) {}                      \
        EMU_VEC_COPY(name)                                                                          \
    };                                                                                              \
    static inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
#else
#define EMU_VEC2(T, name, align) struct __align__(align) name { T x, y; }; \
    static inline name make_##name(T x, T y) { return name{x, y}; }
#define EMU_VEC4(T, name, align) struct __align__(align) name { T x, y, z, w; }; \
    static inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
#endif
#define EMU_VEC3(T, name) struct name { T x, y, z; }; \
    static inline name make_##name(T x, T y, T z) { return name{x, y, z}; }
EMU_VEC2(signed char, char2, 2) EMU_VEC3(signed char, char3) EMU_VEC4(signed char, char4, 4)
EMU_VEC2(unsigned char, uchar2, 2) EMU_VEC3(unsigned char, uchar3) EMU_VEC4(unsigned char, uchar4, 4)
EMU_VEC2(short, short2, 4) EMU_VEC3(short, short3) EMU_VEC4(short, short4, 8)
EMU_VEC2(unsigned short, ushort2, 4) EMU_VEC3(unsigned short, ushort3) EMU_VEC4(unsigned short, ushort4, 8)
EMU_VEC2(int, int2, 8) EMU_VEC3(int, int3) EMU_VEC4(int, int4, 16)
EMU_VEC2(unsigned int, uint2, 8) EMU_VEC4(unsigned int, uint4, 16)
EMU_VEC2(long long, longlong2, 16) EMU_VEC2(unsigned long long, ulonglong2, 16)
EMU_VEC2(float, float2, 8) EMU_VEC3(float, float3) EMU_VEC4(float, float4, 16)
EMU_VEC2(double, double2, 16)
#undef EMU_VEC2
#undef EMU_VEC3
#undef EMU_VEC4
#undef EMU_VEC_COPY
struct uint3 { unsigned int x, y, z; };
static inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};

namespace emu {
// ---- The state a CUDA thread reads ------------------------------------------------------------
// The launcher (emu_runtime.h) sets these before it runs each CUDA thread; the fiber scheduler
// sets thread_idx before it switches back to a thread's fiber, so a thread that returns from a
// barrier sees its own index again.
inline EMU_TLS uint3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline EMU_TLS char* dynamic_shared;  // the `extern __shared__` buffer of the running block
inline EMU_TLS char* shared_base;     // this OS thread's arena of static __shared__ variables

// Implemented in the runtime headers.
void syncthreads(int line);
int register_shared(size_t bytes, size_t element_bytes, size_t alignment, const char* name, const char* decl);
size_t shared_offset(int array);
void note_shared_use(int array);
[[noreturn]] void shared_index_failure(int array, int dim, long long index, long long extent, int line);
[[noreturn]] void device_failure(const char* what, const char* file, int line);
void atomic_access(const void* address, size_t bytes, const void* pc);
void note_fence();
}  // namespace emu

// Built-in variables (Guide: "Built-in Variables"): read-only, so `threadIdx.x = 3;` does not
// compile, as in CUDA.
#define threadIdx (static_cast<const uint3&>(emu::thread_idx))
#define blockIdx (static_cast<const uint3&>(emu::block_idx))
#define blockDim (static_cast<const dim3&>(emu::block_dim))
#define gridDim (static_cast<const dim3&>(emu::grid_dim))
static const int warpSize = 32;

namespace emu {
// ---- Static __shared__ variables --------------------------------------------------------------
// source.py rewrites `__shared__ float tile[16][17];` (inside a function) into
//     static emu::SharedArray<float[16][17]> emu_shared_tile{"tile", "float tile[16][17]", 0};
//     auto&& tile = emu_shared_tile.bind();
// The holder is an ordinary function-local static (one per declaration and per template
// instantiation); its constructor, run once, registers the array with the runtime, which gives it
// an offset in every OS thread's shared arena (between 64-byte redzones, refilled with 0xFF bytes
// -- NaN for floats -- at the start of every block). bind() returns, in checked mode, a SharedView
// that checks every index against its own dimension (tile[r][17] of a [16][17] tile is an error
// even though it lands inside row r+1), and in fast mode a plain reference to the storage.
// A scalar (`__shared__ float s;`) becomes `auto&& s = emu_shared_s.bind();`, a plain reference.
struct Index {  // an array index, with the source line of the subscript that produced it
    long long value;
    int line;
    template <class I, class = std::enable_if_t<std::is_integral_v<I> || std::is_enum_v<I>>>
    Index(I i, int l = __builtin_LINE()) : value((long long)i), line(l) {}
};

template <class T> struct SharedView;
template <class E, size_t N>
struct SharedView<E[N]> {
    E* data;
    int array, dim;
    using Element = std::conditional_t<std::is_array_v<E>, SharedView<E>, E&>;
    Element operator[](Index i) const {
        if ((unsigned long long)i.value >= N) shared_index_failure(array, dim, i.value, (long long)N, i.line);
        if constexpr (std::is_array_v<E>) return SharedView<E>{data[i.value], array, dim + 1};
        else return data[i.value];
    }
    // It decays like an array (`float* row = tile[r];`, `f(tile)`, `tile + k`, `*tile`). The
    // conversion is a template so that `tile[i]` picks operator[] above, not the built-in one.
    template <class P, class = std::enable_if_t<std::is_convertible_v<E*, P>>>
    operator P() const { return data; }
    friend E* operator+(const SharedView& v, long long k) { return v.data + k; }
    friend E* operator+(long long k, const SharedView& v) { return v.data + k; }
    friend E* operator-(const SharedView& v, long long k) { return v.data - k; }
    E& operator*() const { return *data; }
};

template <class T>
struct SharedArray {
    int array;
    size_t offset;
    SharedArray(const char* name, const char* decl, size_t align)
        : array(register_shared(sizeof(T), sizeof(std::remove_all_extents_t<T>),
                                align > alignof(T) ? align : (alignof(T) > 16 ? alignof(T) : 16), name, decl)),
          offset(shared_offset(array)) {}
    T* get() const { return reinterpret_cast<T*>(shared_base + offset); }
    decltype(auto) bind() const {
#if EMU_CHECKED
        note_shared_use(array);  // counts toward the kernel's 48 KiB, poisons it at first use
        if constexpr (std::is_array_v<T>) return SharedView<T>{*get(), array, 0};
        else return (*get());
#else
        return (*get());
#endif
    }
};

// `extern __shared__ T s[];` inside a function becomes `T* const s = emu_dynamic_shared<T>();`:
// the launch's dynamic shared buffer (sized by shared_mem=), whose bounds the runtime checks.
template <class T>
struct DynamicShared {  // the same at file scope, where the pointer must be read at every use
    operator T*() const { return reinterpret_cast<T*>(dynamic_shared); }
    T& operator[](long long i) const { return reinterpret_cast<T*>(dynamic_shared)[i]; }
};
}  // namespace emu

template <class T>
static inline T* emu_dynamic_shared() { return reinterpret_cast<T*>(emu::dynamic_shared); }

// ---- Synchronization (Guide: "Synchronization Functions", "Memory Fence Functions") -----------
// A real barrier: the thread's fiber stops here until every thread of the block has arrived. The
// line number lets the runtime report threads that wait at *different* barriers.
#define __syncthreads() (emu::syncthreads(__LINE__))
// (In checked mode a fence also tells the race checker that blocks may be handing data to each
// other through global memory, as in "last block" reductions: it stops reporting global
// read-after-write hazards for the rest of the launch.)
static inline void __threadfence() {
#if EMU_CHECKED
    emu::note_fence();
#endif
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- Warp-level collectives (Guide: "Warp Vote Functions", "Warp Shuffle Functions",
// "__syncwarp()") ---------------------------------------------------------------------------------
// Each call parks the calling thread's fiber until every lane named in `mask` has arrived at the
// same call (source line and function) with the same mask; the scheduler then computes every
// lane's result at once, exactly as the PTX instruction (shfl.sync, vote.sync, bar.warp.sync)
// defines it. A lane outside its own mask, lanes of one mask at different calls, a width that is
// not a power of two: each fails the launch with the lanes and lines. Reading from a lane that
// does not take part (outside the mask, exited, or past the end of a partial warp) is undefined on
// a GPU; here it returns 0xFF bytes (NaN as float, -1 as int), so the mistake shows.
namespace emu {
enum WarpOp : int {
    OP_SHFL_IDX, OP_SHFL_UP, OP_SHFL_DOWN, OP_SHFL_XOR, OP_BALLOT, OP_ANY, OP_ALL, OP_ACTIVEMASK,
    OP_SYNCWARP, OP_WMMA_LOAD, OP_WMMA_STORE, OP_WMMA_MMA,
};
struct WarpCall;
typedef void (*WarpCompute)(WarpCall* const* lanes);  // wmma: computes the whole warp's result
struct WarpCall {               // one lane's arguments, on its fiber's stack while it waits
    int op;
    unsigned mask;
    int width;                  // shuffles: the segment width
    int arg;                    // srcLane / delta / laneMask / predicate / wmma layout
    int size;                   // shuffles: bytes of the value
    int line;                   // the call's source line
    const char* what;           // the function's name, for messages
    uint64_t value, result;     // shuffles: this lane's value in, its result out
    const void* pointer;        // wmma load/store: the matrix pointer ...
    unsigned ldm;               // ... its leading dimension ...
    int kind;                   // ... and an id of the fragment type
    void* fragments[4];         // wmma mma: this lane's d, a, b, c
    WarpCompute compute;
};
uint64_t warp_collective(WarpCall* call);
[[noreturn]] void warp_precondition(const WarpCall* call, const char* problem);  // wmma: pointer, ldm

template <class T>
static inline T shuffle(int op, unsigned mask, T var, int arg, int width, int line, const char* what) {
    static_assert(std::is_trivially_copyable_v<T> && (sizeof(T) == 2 || sizeof(T) == 4 || sizeof(T) == 8),
                  "__shfl_*_sync exchanges 2-, 4- or 8-byte values");
    WarpCall c{};
    c.op = op; c.mask = mask; c.arg = arg; c.width = width; c.size = (int)sizeof(T); c.line = line; c.what = what;
    memcpy(&c.value, &var, sizeof(T));
    warp_collective(&c);
    T out;
    memcpy(&out, &c.result, sizeof(T));
    return out;
}
static inline uint64_t vote(int op, unsigned mask, int predicate, int line, const char* what) {
    WarpCall c{};
    c.op = op; c.mask = mask; c.arg = predicate != 0; c.line = line; c.what = what;
    return warp_collective(&c);
}
}  // namespace emu

template <class T>
static inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, int line = __builtin_LINE()) {
    return emu::shuffle(emu::OP_SHFL_IDX, mask, var, srcLane, width, line, "__shfl_sync");
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = warpSize, int line = __builtin_LINE()) {
    return emu::shuffle(emu::OP_SHFL_UP, mask, var, (int)delta, width, line, "__shfl_up_sync");
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = warpSize, int line = __builtin_LINE()) {
    return emu::shuffle(emu::OP_SHFL_DOWN, mask, var, (int)delta, width, line, "__shfl_down_sync");
}
template <class T>
static inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize, int line = __builtin_LINE()) {
    return emu::shuffle(emu::OP_SHFL_XOR, mask, var, laneMask, width, line, "__shfl_xor_sync");
}
static inline unsigned int __ballot_sync(unsigned mask, int predicate, int line = __builtin_LINE()) {
    return (unsigned int)emu::vote(emu::OP_BALLOT, mask, predicate, line, "__ballot_sync");
}
static inline int __any_sync(unsigned mask, int predicate, int line = __builtin_LINE()) {
    return (int)emu::vote(emu::OP_ANY, mask, predicate, line, "__any_sync");
}
static inline int __all_sync(unsigned mask, int predicate, int line = __builtin_LINE()) {
    return (int)emu::vote(emu::OP_ALL, mask, predicate, line, "__all_sync");
}
// The lanes of this warp that reach this call together: with independent thread scheduling that
// is what "currently active" means (lanes that took another branch are elsewhere).
static inline unsigned int __activemask(int line = __builtin_LINE()) {
    return (unsigned int)emu::vote(emu::OP_ACTIVEMASK, 0xffffffffu, 1, line, "__activemask");
}
// Waits for the lanes in mask, and orders their shared and global memory accesses (the race
// checker treats it like a barrier for those lanes).
static inline void __syncwarp(unsigned mask = 0xffffffffu, int line = __builtin_LINE()) {
    emu::vote(emu::OP_SYNCWARP, mask, 1, line, "__syncwarp");
}

// ---- Integer intrinsics (Guide: "Integer Intrinsics") ----------------------------------------
static inline int __popc(unsigned int x) { return __builtin_popcount(x); }
static inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
static inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
static inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline int __ffsll(long long x) { return __builtin_ffsll(x); }
static inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
    x = ((x >> 8) & 0x00FF00FFu) | ((x & 0x00FF00FFu) << 8);
    return (x >> 16) | (x << 16);
}
static inline int __mul24(int a, int b) { return (int)(((long long)(a << 8 >> 8)) * (b << 8 >> 8)); }
static inline unsigned int __umul24(unsigned int a, unsigned int b) { return (a & 0xFFFFFFu) * (b & 0xFFFFFFu); }
static inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
static inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned int)(((unsigned long long)a * b) >> 32); }

// A failed device-side assert() or __trap() ends the launch with an EmulatorError (on a GPU it
// poisons the whole CUDA context). <assert.h> is included first so a later include cannot undo it.
#include <assert.h>
#undef assert
#define assert(cond) ((cond) ? (void)0 : emu::device_failure("assert(" #cond ") failed", __FILE__, __LINE__))
#define __trap() (emu::device_failure("__trap() called", __FILE__, __LINE__))

// ---- Read-only data cache load (Guide: "Read-Only Data Cache Load Function") ------------------
template <class T>
static inline T __ldg(const T* p) { return *p; }

// ---- Integer and float min/max (CUDA's math_functions.h overloads) ----------------------------
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }
static inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
static inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
static inline unsigned int max(int a, unsigned int b) { return max((unsigned int)a, b); }
static inline unsigned int min(int a, unsigned int b) { return min((unsigned int)a, b); }
static inline unsigned int max(unsigned int a, int b) { return max(a, (unsigned int)b); }
static inline unsigned int min(unsigned int a, int b) { return min(a, (unsigned int)b); }
static inline long long max(long long a, long long b) { return a > b ? a : b; }
static inline long long min(long long a, long long b) { return a < b ? a : b; }
static inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
static inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static inline long max(long a, long b) { return a > b ? a : b; }
static inline long min(long a, long b) { return a < b ? a : b; }
static inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
static inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
static inline float max(float a, float b) { return fmaxf(a, b); }
static inline float min(float a, float b) { return fminf(a, b); }
static inline double max(double a, double b) { return fmax(a, b); }
static inline double min(double a, double b) { return fmin(a, b); }

// ---- Single-precision intrinsics (Guide: "Mathematical Functions", "Intrinsic Functions") ------
// On a GPU the __-prefixed versions are faster and less accurate; here they are the exact libm
// functions, so a kernel may match the NumPy reference more closely on the emulator than on a GPU.
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
// glibc's <math.h> already declares __expf, __logf ... as its own names for expf, logf ..., so
// these are macros rather than functions.
#define __expf expf
#define __logf logf
#define __log2f log2f
#define __log10f log10f
#define __powf powf
#define __sinf sinf
#define __cosf cosf
#define __tanf tanf
static inline float __fdividef(float a, float b) { return a / b; }
static inline float fdividef(float a, float b) { return a / b; }
static inline float __frcp_rn(float x) { return 1.0f / x; }
static inline float __fsqrt_rn(float x) { return sqrtf(x); }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
// Double precision: the _rn forms are plain IEEE operations that a GPU compiler never contracts
// into an FMA, so a kernel can repeat a host computation's rounding step by step.
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
static inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }
// Conversions: _rn rounds to nearest even (lrintf under the default rounding mode), _rz toward
// zero, _rd down, _ru up.
static inline int __float2int_rn(float x) { return (int)lrintf(x); }
static inline int __float2int_rz(float x) { return (int)truncf(x); }
static inline int __float2int_rd(float x) { return (int)floorf(x); }
static inline int __float2int_ru(float x) { return (int)ceilf(x); }
static inline unsigned int __float2uint_rn(float x) { return (unsigned int)llrintf(x); }
static inline unsigned int __float2uint_rz(float x) { return (unsigned int)truncf(x); }
static inline unsigned int __float2uint_rd(float x) { return (unsigned int)floorf(x); }
static inline unsigned int __float2uint_ru(float x) { return (unsigned int)ceilf(x); }
static inline float __int2float_rn(int i) { return (float)i; }
static inline float __uint2float_rn(unsigned int i) { return (float)i; }
static inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
static inline unsigned int __float_as_uint(float x) { unsigned int i; memcpy(&i, &x, 4); return i; }
static inline float __int_as_float(int i) { float x; memcpy(&x, &i, 4); return x; }
static inline float __uint_as_float(unsigned int i) { float x; memcpy(&x, &i, 4); return x; }

// ---- Atomic functions (Guide: "Atomic Functions") ---------------------------------------------
// Real atomic read-modify-writes (GCC's __atomic builtins), because in fast mode blocks run on
// several OS threads at once. Each returns the old value, as in CUDA. In checked mode each is
// bounds- and alignment-checked like any access, but not recorded by the race checker: atomics
// are how threads may update one address without a barrier.
#if EMU_CHECKED
#define EMU_ATOMIC_CHECK(a) emu::atomic_access((a), sizeof(*(a)), __builtin_return_address(0))
#define EMU_ATOMIC EMU_NOSAN static
#else
#define EMU_ATOMIC_CHECK(a) ((void)0)
#define EMU_ATOMIC static inline
#endif
template <class T> EMU_ATOMIC T emu_atomic_add(T* a, T v) {
    EMU_ATOMIC_CHECK(a);
    if constexpr (std::is_integral_v<T>) {
        return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);
    } else {  // float, double: compare-and-swap on the bits
        T old, next;
        __atomic_load(a, &old, __ATOMIC_RELAXED);
        do { next = old + v; } while (!__atomic_compare_exchange(a, &old, &next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
        return old;
    }
}
template <class T, class F> EMU_ATOMIC T emu_atomic_update(T* a, F f) {  // CAS loop: *a = f(*a)
    EMU_ATOMIC_CHECK(a);
    T old, next;
    __atomic_load(a, &old, __ATOMIC_RELAXED);
    do { next = f(old); } while (!__atomic_compare_exchange(a, &old, &next, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return old;
}
static inline float atomicAdd(float* a, float v) { return emu_atomic_add(a, v); }
static inline double atomicAdd(double* a, double v) { return emu_atomic_add(a, v); }
static inline int atomicAdd(int* a, int v) { return emu_atomic_add(a, v); }
static inline unsigned int atomicAdd(unsigned int* a, unsigned int v) { return emu_atomic_add(a, v); }
static inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return emu_atomic_add(a, v); }
static inline int atomicSub(int* a, int v) { return emu_atomic_add(a, -v); }
static inline unsigned int atomicSub(unsigned int* a, unsigned int v) { return emu_atomic_add(a, 0u - v); }
template <class T> static inline T atomicMax(T* a, T v) { return emu_atomic_update(a, [v](T o) { return v > o ? v : o; }); }
template <class T> static inline T atomicMin(T* a, T v) { return emu_atomic_update(a, [v](T o) { return v < o ? v : o; }); }
template <class T> static inline T atomicOr(T* a, T v) { return emu_atomic_update(a, [v](T o) { return o | v; }); }
template <class T> static inline T atomicAnd(T* a, T v) { return emu_atomic_update(a, [v](T o) { return o & v; }); }
template <class T> static inline T atomicXor(T* a, T v) { return emu_atomic_update(a, [v](T o) { return o ^ v; }); }
template <class T> static inline T atomicExch(T* a, T v) { return emu_atomic_update(a, [v](T) { return v; }); }
template <class T> static inline T atomicCAS(T* a, T cmp, T v) { return emu_atomic_update(a, [cmp, v](T o) { return o == cmp ? v : o; }); }
// ((old >= limit) ? 0 : old + 1) and ((old == 0 || old > limit) ? limit : old - 1), as in CUDA.
static inline unsigned int atomicInc(unsigned int* a, unsigned int limit) {
    return emu_atomic_update(a, [limit](unsigned int o) { return o >= limit ? 0u : o + 1; });
}
static inline unsigned int atomicDec(unsigned int* a, unsigned int limit) {
    return emu_atomic_update(a, [limit](unsigned int o) { return (o == 0 || o > limit) ? limit : o - 1; });
}
