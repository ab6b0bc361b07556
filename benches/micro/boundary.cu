// Cost of a dependent kernel boundary on one GPU: a chain of K small kernels, each reading what
// the one before wrote, captured in a CUDA graph and replayed. Three ways for a kernel to wait
// for the one before: plain stream order, programmatic dependent launch (griddepcontrol.wait:
// the whole grid before has finished), and a counter (the next kernel launches early through
// PDL but waits for the blocks before to count themselves out, as attention_v2_kv_ready waits
// for the q/k/v projection). Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90a -o /tmp/boundary benches/micro/boundary.cu && /tmp/boundary
#include <cstdio>
#include <cuda_runtime.h>

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Block b adds 1 to its slice of x (each element written by the previous kernel).
// mode 0: plain; 1: griddepcontrol.wait then launch_dependents; 2: launch_dependents, then wait
// for counter cin to reach `need` (the blocks before), count this block into cout when done
// (every thread __threadfence, then atomicAdd); 3: as 2, but the block counts itself with one
// thread's red.release.gpu after the block's barrier (no fence by every thread).
__global__ void step(float* x, int per_block, int mode, const unsigned* cin, unsigned need, unsigned* cout) {
    if (mode == 1) asm volatile("griddepcontrol.wait;" ::: "memory");
    if (mode >= 1) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if (mode >= 2 && cin) {
        if (threadIdx.x == 0)
            while (ld_acquire(cin) < need) __nanosleep(32);
        __syncthreads();
    }
    // A dependency on every block before: read a neighbour block's element.
    int nb = (blockIdx.x + 1) % gridDim.x;
    for (int i = threadIdx.x; i < per_block; i += blockDim.x) {
        float v = __ldcg(x + (size_t)nb * per_block + i);
        x[(size_t)blockIdx.x * per_block + i] = v + 1.f;
    }
    if (mode == 2) {
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) atomicAdd(cout, 1u);
    }
    if (mode == 3) {
        __syncthreads();
        if (threadIdx.x == 0) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(cout) : "memory");
    }
}

int main() {
    const int K = 200, per_block = 256;
    float* x;
    unsigned* cnt;
    CHECK(cudaMalloc(&x, 2048 * per_block * sizeof(float)));
    CHECK(cudaMalloc(&cnt, (K + 1) * sizeof(unsigned)));
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0);
    cudaEventCreate(&e1);
    printf("| blocks | wait | us per kernel (median of 9 replays of %d) |\n|---|---|---|\n", K);
    for (int blocks : {132, 264, 528, 848}) {
        for (int mode = 0; mode < 4; mode++) {
            cudaGraph_t g;
            CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
            CHECK(cudaMemsetAsync(cnt, 0, (K + 1) * sizeof(unsigned), s));
            for (int k = 0; k < K; k++) {
                cudaLaunchConfig_t cfg = {};
                cfg.gridDim = dim3(blocks);
                cfg.blockDim = dim3(256);
                cfg.stream = s;
                cudaLaunchAttribute at[1];
                at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
                at[0].val.programmaticStreamSerializationAllowed = 1;
                // The first kernel follows the memset: plain.
                cfg.attrs = at;
                cfg.numAttrs = (mode >= 1 && k > 0) ? 1 : 0;
                const unsigned* cin = k > 0 ? cnt + k - 1 : nullptr;
                CHECK(cudaLaunchKernelEx(&cfg, step, x, per_block, mode, cin, (unsigned)blocks, cnt + k));
            }
            CHECK(cudaStreamEndCapture(s, &g));
            cudaGraphExec_t ge;
            CHECK(cudaGraphInstantiate(&ge, g, 0));
            for (int w = 0; w < 3; w++) CHECK(cudaGraphLaunch(ge, s));
            float t[9];
            for (int r = 0; r < 9; r++) {
                cudaEventRecord(e0, s);
                CHECK(cudaGraphLaunch(ge, s));
                cudaEventRecord(e1, s);
                CHECK(cudaEventSynchronize(e1));
                cudaEventElapsedTime(&t[r], e0, e1);
            }
            for (int i = 0; i < 9; i++)
                for (int j = i + 1; j < 9; j++)
                    if (t[j] < t[i]) { float u = t[i]; t[i] = t[j]; t[j] = u; }
            const char* name[] = {"stream order", "PDL (griddepcontrol.wait)", "PDL launch, counter wait", "PDL launch, counter wait, release by one thread"};
            printf("| %d | %s | %.2f |\n", blocks, name[mode], t[4] * 1000.f / K);
            cudaGraphExecDestroy(ge);
            cudaGraphDestroy(g);
        }
    }
    return 0;
}
