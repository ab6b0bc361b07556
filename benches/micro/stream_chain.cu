// What a persistent engine could gain at the batch-1 step's op boundaries: a chain of
// bandwidth-bound "GEMV-like" ops, each reading its own weights once and needing the whole
// previous op's output (a full dependency, as every projection of a decode layer has), run
//   A: as one kernel per op with programmatic dependent launch (the step today: every block
//      waits for the grid before, then starts asking for its weights), captured in a graph;
//   B: as A, each block copying its first P bytes into shared memory before its PDL wait;
//   C: as one persistent kernel (every block resident; a grid barrier between ops), each block
//      asking for its first P bytes of the next op by bulk copies into shared memory before
//      it arrives at the barrier, so DRAM streams through the boundary.
// The ops are a Flash decode layer's weight reads: q/k/v 55.6 MB, o_proj 67.1 MB, the MoE's
// gate_up 71.3 MB and down 35.7 MB (one token), for LAYERS layers, each op on its own buffer.
// Each op's value is a sum over its weights scaled by the previous op's total (so no op can
// finish before the one ahead has); the three variants must agree on the last op's total.
// Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90a -o /tmp/stream_chain benches/micro/stream_chain.cu && /tmp/stream_chain
// Measured (H200, benches/results/2026-11-27-tail-prefetch-micro.md): A 1.16x the floor, B with
// 80-96 KB (blocks resident only in the tail) 1.08-1.09x, B with 16-48 KB (resident early)
// 1.19-1.25x, C 1.26-1.28x with or without its prefetch.
#include <algorithm>
#include <cstdio>
#include <cuda_runtime.h>
#include <vector>

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s (line %d)\n", #x, cudaGetErrorString(e), __LINE__); return 1; } } while (0)

constexpr int THREADS = 256;
constexpr int LAYERS = 6;
constexpr int OPS = 4 * LAYERS;
constexpr int MAX_BLOCKS = 1024;

struct Chain {
    const uint4* w[OPS];
    size_t bytes[OPS];
};

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ float word_sum(uint4 v) {
    // The low byte of each word, so sums stay exact in float.
    return (float)((v.x & 255u) + (v.y & 255u) + (v.z & 255u) + (v.w & 255u));
}
__device__ __forceinline__ float block_sum(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = 0.f;
    if (threadIdx.x == 0) {
        for (int i = 0; i < THREADS / 32; i++) t += red[i];
        red[THREADS / 32] = t;
    }
    __syncthreads();
    t = red[THREADS / 32];
    __syncthreads();
    return t;
}
// The previous op's total from its blocks' parts (a fixed order, so every block gets the same).
__device__ __forceinline__ float prev_total(const float* parts, int n, float* red) {
    float v = 0.f;
    for (int i = threadIdx.x; i < n; i += THREADS) v += __ldcg(parts + i);
    return block_sum(v, red);
}
// Block b's slice of an op: [lo, hi) in uint4.
__device__ __forceinline__ void slice(size_t bytes, int b, int g, size_t& lo, size_t& hi) {
    size_t n = bytes / 16;
    lo = n * b / g;
    hi = n * (b + 1) / g;
}
// Streams [lo, hi) of w (8 loads of 16 bytes in flight per thread: 32 KB a block).
__device__ __forceinline__ float stream(const uint4* w, size_t lo, size_t hi) {
    float acc = 0.f;
    size_t i = lo + threadIdx.x;
    for (; i + 7 * THREADS < hi; i += 8 * THREADS) {
        uint4 v[8];
#pragma unroll
        for (int j = 0; j < 8; j++) v[j] = ld_stream(w + i + j * THREADS);
#pragma unroll
        for (int j = 0; j < 8; j++) acc += word_sum(v[j]);
    }
    for (; i < hi; i += THREADS) acc += word_sum(ld_stream(w + i));
    return acc;
}

__device__ __forceinline__ void mbar_init(unsigned long long* bar) {
    asm volatile("mbarrier.init.shared.b64 [%0], 1;" ::"r"((unsigned)__cvta_generic_to_shared(bar)));
}
__device__ __forceinline__ void bulk_to_smem(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
    unsigned d = (unsigned)__cvta_generic_to_shared(dst), b = (unsigned)__cvta_generic_to_shared(bar);
    asm volatile("mbarrier.arrive.expect_tx.shared.b64 _, [%0], %1;" ::"r"(b), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(d), "l"(src), "r"(bytes), "r"(b) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
    unsigned b = (unsigned)__cvta_generic_to_shared(bar);
    asm volatile(
        "{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared.b64 p, [%0], %1;\n @!p bra W;\n}" ::"r"(b), "r"(parity)
        : "memory");
}
// The first `pre` bytes of [lo, hi) (16-byte aligned), asked for by thread 0.
__device__ __forceinline__ size_t prefetch(const uint4* w, size_t lo, size_t hi, size_t pre, uint4* smem, unsigned long long* bar) {
    size_t n = hi - lo < pre / 16 ? hi - lo : pre / 16;
    if (threadIdx.x == 0 && n) {
        // The buffer's last reads were the generic proxy's; the copy writes through the async one.
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        bulk_to_smem(smem, w + lo, (unsigned)(n * 16), bar);
    }
    return n;
}
__device__ __forceinline__ float from_smem(const uint4* smem, size_t n) {
    float acc = 0.f;
    for (size_t i = threadIdx.x; i < n; i += THREADS) acc += word_sum(smem[i]);
    return acc;
}

// A and B: op i of the chain; parts[i][b] = its block b's sum times the previous op's total.
__global__ void __launch_bounds__(THREADS) op_kernel(Chain c, int i, float* parts, size_t pre) {
    extern __shared__ uint4 smem[];
    __shared__ float red[THREADS / 32 + 1];
    __shared__ unsigned long long bar;
    size_t lo, hi;
    slice(c.bytes[i], blockIdx.x, gridDim.x, lo, hi);
    size_t n = 0;
    if (pre) {
        if (threadIdx.x == 0) {
            mbar_init(&bar);
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        }
        __syncthreads();
        n = prefetch(c.w[i], lo, hi, pre, smem, &bar);
    }
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    float s = i ? prev_total(parts + (size_t)(i - 1) * MAX_BLOCKS, gridDim.x, red) : 1.f;
    float acc = 0.f;
    if (n) {
        mbar_wait(&bar, 0);
        acc = from_smem(smem, n);
    }
    acc += stream(c.w[i], lo + n, hi);
    float t = block_sum(acc, red);
    if (threadIdx.x == 0) parts[(size_t)i * MAX_BLOCKS + blockIdx.x] = t * (s > 0.f ? 1.f / s : 1.f) + 1.f;
}

// C: every op in one resident grid, a barrier (count[i] reaching the grid) between ops; the next
// op's first `pre` bytes are asked for before arriving at it.
__global__ void __launch_bounds__(THREADS) persistent(Chain c, float* parts, unsigned* count, size_t pre) {
    extern __shared__ uint4 smem[];
    __shared__ float red[THREADS / 32 + 1];
    __shared__ unsigned long long bar;
    if (threadIdx.x == 0) {
        mbar_init(&bar);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    size_t lo, hi, n = 0;
    slice(c.bytes[0], blockIdx.x, gridDim.x, lo, hi);
    if (pre) n = prefetch(c.w[0], lo, hi, pre, smem, &bar);
    for (int i = 0; i < OPS; i++) {
        float s = 1.f;
        if (i) {
            if (threadIdx.x == 0) {
                unsigned v;
                do {
                    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(count + i - 1) : "memory");
                } while (v < gridDim.x);
            }
            __syncthreads();
            s = prev_total(parts + (size_t)(i - 1) * MAX_BLOCKS, gridDim.x, red);
        }
        float acc = 0.f;
        if (n) {
            mbar_wait(&bar, i & 1);
            acc = from_smem(smem, n);
            __syncthreads();  // every thread is done with the buffer before it is refilled
        }
        acc += stream(c.w[i], lo + n, hi);
        float t = block_sum(acc, red);
        n = 0;
        if (i + 1 < OPS) {
            slice(c.bytes[i + 1], blockIdx.x, gridDim.x, lo, hi);
            if (pre) n = prefetch(c.w[i + 1], lo, hi, pre, smem, &bar);
        }
        if (threadIdx.x == 0) {
            parts[(size_t)i * MAX_BLOCKS + blockIdx.x] = t * (s > 0.f ? 1.f / s : 1.f) + 1.f;
            asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(count + i) : "memory");
        }
    }
}

__global__ void fill(unsigned* p, size_t n, unsigned seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = (unsigned)(i * 2654435761u) ^ seed;
}

int main() {
    int sms;
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    const double op_mb[4] = {55.6, 67.1, 71.3, 35.7};
    Chain c;
    size_t total = 0;
    std::vector<void*> bufs;
    for (int i = 0; i < OPS; i++) {
        size_t b = (size_t)(op_mb[i % 4] * 1e6) / 16 * 16;
        void* p;
        CHECK(cudaMalloc(&p, b));
        fill<<<1024, 256>>>((unsigned*)p, b / 4, 77u + i);
        c.w[i] = (const uint4*)p;
        c.bytes[i] = b;
        total += b;
        bufs.push_back(p);
    }
    float* parts;
    unsigned* count;
    CHECK(cudaMalloc(&parts, (size_t)OPS * MAX_BLOCKS * sizeof(float)));
    CHECK(cudaMalloc(&count, OPS * sizeof(unsigned)));
    void* cpy;
    CHECK(cudaMalloc(&cpy, 1u << 30));
    cudaStream_t st;
    CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    CHECK(cudaDeviceSynchronize());
    // Copy bandwidth (read + write of 512 MB), as the project's floors use it.
    std::vector<float> ts;
    for (int r = 0; r < 9; r++) {
        cudaEventRecord(e0, st);
        cudaMemcpyAsync((char*)cpy + (512u << 20), cpy, 512u << 20, cudaMemcpyDeviceToDevice, st);
        cudaEventRecord(e1, st);
        CHECK(cudaEventSynchronize(e1));
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        ts.push_back(ms);
    }
    std::sort(ts.begin(), ts.end());
    const double copy_gbs = 2.0 * (512u << 20) / (ts[4] * 1e-3) / 1e9;
    const double floor_us = total / (copy_gbs * 1e9) * 1e6;
    printf("%d SMs; copy bandwidth %.0f GB/s; %d ops, %.1f MB, floor %.1f us\n", sms, copy_gbs, OPS, total / 1e6, floor_us);
    printf("| variant | blocks | prefetch KB | us (median of 15) | x floor | us per boundary over the floor | last total |\n|---|---|---|---|---|---|---|\n");

    // smem_kb: shared memory a block asks for (at least the prefetch); more keeps the next
    // kernel's blocks off an SM until this kernel's blocks there have left.
    auto run = [&](const char* name, int variant, int per_sm, size_t pre, size_t smem_kb = 0) -> int {
        const int g = sms * per_sm;
        const size_t smem = std::max(pre, smem_kb * 1024);
        CHECK(cudaFuncSetAttribute(op_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 220 * 1024));
        CHECK(cudaFuncSetAttribute(persistent, cudaFuncAttributeMaxDynamicSharedMemorySize, 220 * 1024));
        int fit = 0;
        CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, persistent, THREADS, smem));
        if (variant == 2 && fit < per_sm) {
            printf("| %s | %d | %zu | (only %d blocks fit an SM) | | | |\n", name, g, pre / 1024, fit);
            return 0;
        }
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
        if (variant == 2) {
            persistent<<<g, THREADS, smem, st>>>(c, parts, count, pre);
        } else {
            for (int i = 0; i < OPS; i++) {
                cudaLaunchConfig_t cfg = {};
                cfg.gridDim = g;
                cfg.blockDim = THREADS;
                cfg.dynamicSmemBytes = smem;
                cfg.stream = st;
                cudaLaunchAttribute at[1];
                at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
                at[0].val.programmaticStreamSerializationAllowed = 1;
                cfg.attrs = at;
                cfg.numAttrs = 1;
                CHECK(cudaLaunchKernelEx(&cfg, op_kernel, c, i, parts, variant == 1 ? pre : (size_t)0));
            }
        }
        CHECK(cudaStreamEndCapture(st, &graph));
        CHECK(cudaGraphInstantiate(&exec, graph, 0));
        std::vector<float> t;
        for (int r = 0; r < 18; r++) {
            CHECK(cudaMemsetAsync(count, 0, OPS * sizeof(unsigned), st));
            cudaEventRecord(e0, st);
            CHECK(cudaGraphLaunch(exec, st));
            cudaEventRecord(e1, st);
            CHECK(cudaEventSynchronize(e1));
            float ms;
            cudaEventElapsedTime(&ms, e0, e1);
            if (r >= 3) t.push_back(ms * 1000.f);
        }
        std::sort(t.begin(), t.end());
        float last;
        CHECK(cudaMemcpy(&last, parts + (size_t)(OPS - 1) * MAX_BLOCKS, sizeof(float), cudaMemcpyDeviceToHost));
        const double us = t[t.size() / 2];
        printf("| %s | %d | %zu (%zu KB smem) | %.1f | %.3fx | %.2f | %.6g |\n", name, g, pre / 1024, smem / 1024, us, us / floor_us, (us - floor_us) / OPS, last);
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
        return 0;
    };
    for (int per_sm : {1, 2}) {
        if (run("A: kernel per op, PDL", 0, per_sm, 0)) return 1;
        // Controls: the shared memory of B's 96 KB without its prefetch; B's prefetch sizes
        // around the point (76 KB) past which a third block no longer fits an SM.
        if (per_sm == 2 && run("A, 96 KB of shared memory a block (B's, no prefetch)", 0, per_sm, 0, 96)) return 1;
        if (per_sm == 2 && run("B: kernel per op, first bytes before the PDL wait", 1, per_sm, 64 * 1024)) return 1;
        if (per_sm == 2 && run("B: kernel per op, first bytes before the PDL wait", 1, per_sm, 80 * 1024)) return 1;
        if (per_sm == 2 && run("B, 16 KB prefetched, 96 KB of shared memory", 1, per_sm, 16 * 1024, 96)) return 1;
        if (per_sm == 2 && run("B, 48 KB prefetched, 96 KB of shared memory", 1, per_sm, 48 * 1024, 96)) return 1;
        for (size_t kb : {16, 48, 96}) {
            if (kb * 1024 * per_sm > 200 * 1024) continue;
            if (run("B: kernel per op, first bytes before the PDL wait", 1, per_sm, kb * 1024)) return 1;
        }
        if (run("C: persistent, no prefetch", 2, per_sm, 0)) return 1;
        for (size_t kb : {16, 48, 96, 200}) {
            if (kb * 1024 * per_sm > 210 * 1024) continue;
            if (run("C: persistent, next op's first bytes before the barrier", 2, per_sm, kb * 1024)) return 1;
        }
    }
    return 0;
}
