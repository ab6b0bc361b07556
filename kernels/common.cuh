// Shared by every kernel file: compile.rs puts this in front of each before NVRTC compiles it
// (NVRTC is given no include paths).

// Programmatic dependent launch (crates/cuda/src/launch.rs): wait until the kernel before this
// one in the stream has finished and its writes are visible, then let the next kernel's blocks
// be scheduled. Every kernel starts with it (moe.cu's down kernels place the wait later).
#if __CUDA_ARCH__ >= 900
#define PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#define PDL_TRIGGER() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#else
#define PDL_WAIT()
#define PDL_TRIGGER()
#endif
#define PDL_ENTER()    \
    do {               \
        PDL_WAIT();    \
        PDL_TRIGGER(); \
    } while (0)

// A counter read with acquire semantics: writes made before its release are visible after it.
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// f32 <-> f16 (round to nearest even), as bits.
__device__ __forceinline__ unsigned short f32_to_f16_rn(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}

__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// f32 -> bf16 (round to nearest even), as bits; and a value's BF16 hi + lo parts (hi = bf16(v),
// lo = bf16(v - hi)), the form the BF16 tensor-core GEMV reads.
__device__ __forceinline__ unsigned short f32_to_bf16_rn(float v) {
    unsigned u = __float_as_uint(v);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

__device__ __forceinline__ void split_bf16_value(float v, unsigned short& hi, unsigned short& lo) {
    hi = f32_to_bf16_rn(v);
    lo = f32_to_bf16_rn(v - __uint_as_float((unsigned)hi << 16));
}

// 16-byte asynchronous copies global -> shared (cp.async, L2 only) and their groups.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Wait until at most N of this thread's groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// A tiled MXFP4 step (crates/cuda/src/mxfp4_tiles.rs, TILE_STEP_BYTES): 512 bytes of codes,
// then 32 of scales. moe.cu streams them; ops.cu's synthetic fill writes them.
#define STEP_BYTES 544
#define STEP_CODE_BYTES 512
