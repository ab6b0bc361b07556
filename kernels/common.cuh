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

// Thread-block clusters (Hopper; sample.cu's sampler, ops.cu's routing): this block's rank in
// its cluster and the cluster's blocks (0 and 1 before Hopper or without a cluster launch); the
// cluster barrier in halves: arrive with release (this block's earlier stores, its stores to
// other blocks' shared memory too, are seen by every block past the wait) or relaxed (only that
// this block has started, so its shared memory may be written), then wait with acquire; and the
// address in block `rank`'s shared memory of this block's shared pointer p (mapa).
__device__ __forceinline__ unsigned cluster_ctarank() {
    unsigned r = 0;
#if __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
#endif
    return r;
}
__device__ __forceinline__ unsigned cluster_nctarank() {
    unsigned n = 1;
#if __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(n));
#endif
    return n;
}
__device__ __forceinline__ void cluster_arrive_release() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_arrive_relaxed() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait_acquire() {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ unsigned cluster_shared_addr(const void* p, unsigned rank) {
    unsigned ra = 0, a = (unsigned)__cvta_generic_to_shared(p);
#if __CUDA_ARCH__ >= 900
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(ra) : "r"(a), "r"(rank));
#endif
    return ra;
}

// Measurement builds only (PEREGRINE_KERNEL_DEFINES=-DSTEP_TRACE): every block's thread 0 stamps
// %globaltimer when the kernel starts, once past its PDL wait and when it leaves the kernel's
// scope, with its launch's %gridid and the kernel's name, into step_trace (one array per module;
// Kernels::step_trace reads and clears them all). Launches are told apart by gridid, so a graph
// replay's timeline (PDL overlap included) comes out kernel by kernel: step_bench --trace.
#ifdef STEP_TRACE
// Records per module (104 bytes each, 104 MB a module in these builds): step_bench --trace of
// Flash's batch-16 step overflowed 262144 (stop 92; moe.cu alone stamps 8192 blocks a MoE layer,
// ~139 K a replay).
#define STEP_TRACE_CAP (1 << 20)
struct StepTraceRec {
    unsigned long long grid, enter, waited, exit;
    unsigned long long mark[3];  // TRACE_MARK points inside the block (0: not reached)
    unsigned sm, block;
    char name[40];
};
__device__ StepTraceRec step_trace[STEP_TRACE_CAP];
__device__ unsigned step_trace_n;
__device__ __forceinline__ unsigned long long step_trace_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
struct StepTraceScope {
    const char* name;
    unsigned long long enter, waited, mark[3] = {0, 0, 0};
    __device__ explicit StepTraceScope(const char* n) : name(n) { enter = waited = step_trace_now(); }
    __device__ void past_wait() { waited = step_trace_now(); }
    __device__ ~StepTraceScope() {
        if (threadIdx.x | threadIdx.y | threadIdx.z) return;
        unsigned i = atomicAdd(&step_trace_n, 1u);
        if (i >= STEP_TRACE_CAP) return;
        StepTraceRec& r = step_trace[i];
        unsigned long long g;
        unsigned sm;
        asm volatile("mov.u64 %0, %%gridid;" : "=l"(g));
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        r.grid = g;
        r.enter = enter;
        r.waited = waited;
        r.exit = step_trace_now();
        for (int k = 0; k < 3; k++) r.mark[k] = mark[k];
        r.sm = sm;
        r.block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
        int k = 0;
        for (; k < 39 && name[k]; k++) r.name[k] = name[k];
        for (; k < 40; k++) r.name[k] = 0;
    }
};
// A kernel's trace scope: declared at the top of its body (PDL_ENTER does it), it records when
// the body is left.
#define TRACE_SCOPE() StepTraceScope step_trace_scope_(__func__)
#define TRACE_SCOPE_NAMED(n) StepTraceScope step_trace_scope_(n)
#define TRACE_PAST_WAIT() step_trace_scope_.past_wait()
// A kernel's "past the wait" stamp set to time t instead (a point inside the kernel, for
// measurements: see ATT_MARK in ops.cu).
#define TRACE_PAST_WAIT_AT(t) (step_trace_scope_.waited = (t))
// Point k (0-2) of a block's work, for measurements: step_bench --trace prints when the blocks
// of each launch that marks got there, and PEREGRINE_TRACE_CSV writes every block's stamps.
#define TRACE_MARK(k) (step_trace_scope_.mark[k] = step_trace_now())
#define PDL_ENTER()   \
    TRACE_SCOPE();    \
    PDL_WAIT();       \
    TRACE_PAST_WAIT(); \
    PDL_TRIGGER()
#else
#define TRACE_SCOPE()
#define TRACE_SCOPE_NAMED(n)
#define TRACE_PAST_WAIT()
#define TRACE_PAST_WAIT_AT(t)
#define TRACE_MARK(k)
#define PDL_ENTER()    \
    do {               \
        PDL_WAIT();    \
        PDL_TRIGGER(); \
    } while (0)
#endif

// A counter read with acquire semantics: writes made before its release are visible after it.
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Block arrival counts: one thread orders the block's writes, after the block's barrier, instead
// of a __threadfence by every thread (the pattern CUTLASS's semaphores use). With the q/k/v
// projection's counts, the attention merges and the MoE's gate_up -> down hand-off in this form
// the batch-1 and batch-2 Flash steps ran 1.7% faster, batch 4 0.6%, batch 8 0.3%; the MoE's
// combine (Pro) 0.2-0.8%
// (benches/results/2026-11-24-heads-as-projected.md). -DARRIVE_FENCE_ALL puts the fences back,
// for measurements.

// Counts the calling block into *c (every thread calls it) with release semantics: the block's
// barrier orders every thread's earlier stores before thread 0's release add, so a reader that
// acquires the count sees them.
__device__ __forceinline__ void block_release_add(unsigned* c) {
#ifdef ARRIVE_FENCE_ALL
    __threadfence();
#endif
    __syncthreads();
    if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(c) : "memory");
}

// Counts the calling block into *c (every thread calls it) and tells every thread whether the
// block was the last of `total` to arrive; the last one zeroes *c for the next call. The block's
// barrier orders every thread's earlier stores before thread 0's acq_rel add, which publishes
// them; in the last block, that add's acquire and the barrier after it order the reads that
// follow after every other block's publication.
__device__ __forceinline__ bool block_arrive_last(unsigned* c, unsigned total) {
    __shared__ bool last;
#ifdef ARRIVE_FENCE_ALL
    __threadfence();
#endif
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned old;
        asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(c) : "memory");
        last = old == total - 1;
        if (last) *c = 0u;
    }
    __syncthreads();
#ifdef ARRIVE_FENCE_ALL
    if (last) __threadfence();
#endif
    return last;
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

// silu(g) * u: silu_mul's value, shared with silu_mul_split_f16 so both give the same bits.
__device__ __forceinline__ float silu_mul_value(float g, float u) { return g / (1.f + expf(-g)) * u; }

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

// A graph step's id r also into the host slot *ids_host points at (fetch_staged in ops.cu),
// written through: the host reads it once the step's event has completed. (The argmax kernels
// and the sampler write their ids so.)
__device__ __forceinline__ void store_host_id(const unsigned long long* __restrict__ ids_host, int r, int id) {
    if (ids_host == nullptr) return;
    const unsigned long long h = *ids_host;
    if (h != 0ull) __stwt(reinterpret_cast<int*>(h) + r, id);
}
