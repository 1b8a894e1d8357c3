// cuda_emu.h -- what a CUDA C kernel sees when minunet's emulator compiles it for the CPU.
//
// minunet's Python side (minunet/emulator/compiler.py) compiles a .cu file as C++17 with g++:
//
//     #include "cuda_emu.h"       <- this file: CUDA's keywords, built-in variables, math, atomics
//     #line 1 "conv.cu"
//     ... the .cu text, unchanged except `extern __shared__` declarations (see below) ...
//     #include "emu_runtime.h"    <- the launcher: block loop, fibers, guarded buffers, faults
//     ... one small exported entry point per kernel ...
//
// Everything here is ordinary C++; nothing is specific to one kernel. Read it next to the CUDA C
// Programming Guide: each block of definitions names the Guide's section it stands in for.
#pragma once

#include <float.h>    // FLT_MAX, FLT_MIN, FLT_EPSILON
#include <math.h>     // expf, logf, sqrtf, INFINITY, NAN ... (global namespace, as in CUDA)
#include <stddef.h>
#include <stdint.h>   // uint32_t and friends
#include <stdio.h>    // printf works inside emulated kernels (prints to the process's stdout)
#include <string.h>
#include <type_traits>
#include <utility>

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

// `__shared__` memory: one copy per block. Blocks run one after another, so a *static* variable is
// exactly one copy per block. Arrays are rewritten by compiler.py into emu::SharedArray (below),
// whose storage the runtime hands out from one arena that it fills with 0xFF bytes (a NaN for
// floats) at the start of each block, so reading a slot no thread wrote shows up as NaN instead of
// a stale value. Other __shared__ variables (scalars) get the section attribute: the linker puts
// them between __start_emu_shared / __stop_emu_shared and the runtime poisons that range too.
// (GCC ignores the section attribute on the static locals of a *template* function, which is why
// arrays, the ones that matter, do not rely on it.)
// `extern __shared__ T name[];` (dynamic shared memory, sized by `shared_mem` at launch) is
// rewritten by compiler.py into a pointer to a runtime buffer, see emu_dynamic_shared() below.
#define __shared__ static __attribute__((section("emu_shared")))

// ---- Built-in vector types and variables (Guide: "Built-in Vector Types", "Built-in Variables")
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
    constexpr operator uint3() const { return uint3{x, y, z}; }
};
struct __align__(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
static inline float2 make_float2(float x, float y) { return float2{x, y}; }
static inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline int2 make_int2(int x, int y) { return int2{x, y}; }
static inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

namespace emu {
// The launcher (emu_runtime.h) writes these before it runs each CUDA thread. In the fiber mode a
// thread that returns from __syncthreads() sees its own index again, because the scheduler sets
// thread_idx before it switches back to that thread's fiber.
inline uint3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline char* dynamic_shared;  // the `extern __shared__` buffer of the current launch

// Implemented in emu_runtime.h.
void syncthreads(int line);
void* allocate_shared(size_t bytes, size_t element_bytes, size_t alignment, const char* name);
[[noreturn]] void device_failure(const char* what, const char* file, int line);
}  // namespace emu

// Read-only references: `threadIdx.x = 3;` is a compile error, as in CUDA.
static const uint3& threadIdx = emu::thread_idx;
static const uint3& blockIdx = emu::block_idx;
static const dim3& blockDim = emu::block_dim;
static const dim3& gridDim = emu::grid_dim;
static const int warpSize = 32;

namespace emu {
// compiler.py rewrites `__shared__ float tile[16][17];` into
//     static emu::SharedArray<float[16][17]> emu_shared_tile{"tile"}; auto& tile = *emu_shared_tile.value;
// The holder is an ordinary static (one per declaration, and one per template instantiation); its
// constructor, run once when a thread first reaches the declaration, asks the runtime for the
// storage. The runtime places every array 64 bytes (a redzone) from the next and knows its name
// and bounds: an access that lands in a redzone (tile[16][0], tile[-1][0]) fails the launch with
// the array's name.
template <class T>
struct SharedArray {
    T* value;
    explicit SharedArray(const char* name)
        : value(static_cast<T*>(allocate_shared(sizeof(T), sizeof(std::remove_all_extents_t<T>),
                                                alignof(T) > 16 ? alignof(T) : 16, name))) {}
};
}  // namespace emu

template <class T>
static inline T* emu_dynamic_shared() { return reinterpret_cast<T*>(emu::dynamic_shared); }

// ---- Synchronization (Guide: "Synchronization Functions") -------------------------------------
// A real barrier: the thread's fiber stops here until every thread of the block has arrived. The
// line number lets the runtime report threads that wait at *different* barriers.
#define __syncthreads() (emu::syncthreads(__LINE__))
static inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
static inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// Warp-level primitives need 32 threads in lock step, which this emulator does not model: using
// one is a compile error that names it, rather than a silently wrong answer.
template <class... A> void __shfl_sync(A...) = delete;
template <class... A> void __shfl_down_sync(A...) = delete;
template <class... A> void __shfl_up_sync(A...) = delete;
template <class... A> void __shfl_xor_sync(A...) = delete;
template <class... A> void __ballot_sync(A...) = delete;
template <class... A> void __syncwarp(A...) = delete;

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
// The emulator runs one CUDA thread at a time, so a read-modify-write is atomic by construction.
// Each returns the old value, as in CUDA. Their loads and stores are bounds-checked like any other.
template <class T> static inline T emu_atomic_add(T* a, T v) { T old = *a; *a = old + v; return old; }
static inline float atomicAdd(float* a, float v) { return emu_atomic_add(a, v); }
static inline double atomicAdd(double* a, double v) { return emu_atomic_add(a, v); }
static inline int atomicAdd(int* a, int v) { return emu_atomic_add(a, v); }
static inline unsigned int atomicAdd(unsigned int* a, unsigned int v) { return emu_atomic_add(a, v); }
static inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return emu_atomic_add(a, v); }
static inline int atomicSub(int* a, int v) { return emu_atomic_add(a, -v); }
static inline unsigned int atomicSub(unsigned int* a, unsigned int v) { return emu_atomic_add(a, 0u - v); }
template <class T> static inline T emu_atomic_max(T* a, T v) { T old = *a; if (v > old) *a = v; return old; }
template <class T> static inline T emu_atomic_min(T* a, T v) { T old = *a; if (v < old) *a = v; return old; }
static inline int atomicMax(int* a, int v) { return emu_atomic_max(a, v); }
static inline unsigned int atomicMax(unsigned int* a, unsigned int v) { return emu_atomic_max(a, v); }
static inline int atomicMin(int* a, int v) { return emu_atomic_min(a, v); }
static inline unsigned int atomicMin(unsigned int* a, unsigned int v) { return emu_atomic_min(a, v); }
template <class T> static inline T atomicExch(T* a, T v) { T old = *a; *a = v; return old; }
template <class T> static inline T atomicCAS(T* a, T cmp, T v) { T old = *a; if (old == cmp) *a = v; return old; }
template <class T> static inline T atomicOr(T* a, T v) { T old = *a; *a = old | v; return old; }
template <class T> static inline T atomicAnd(T* a, T v) { T old = *a; *a = old & v; return old; }
template <class T> static inline T atomicXor(T* a, T v) { T old = *a; *a = old ^ v; return old; }
