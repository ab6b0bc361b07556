// Does a programmatic dependent launch survive stream capture when something other than a kernel
// sits between two kernels? A long 1-block kernel A (triggers its dependents at once, then
// spins) and a kernel B launched with PDL that stamps %globaltimer at entry, before its
// griddepcontrol.wait. Between them in the captured stream: nothing, a stream-ordered
// allocation (cudaMallocAsync, a graph memory node), a free of an earlier allocation, or a
// memset. B's entry before A's end means B was launched early (the programmatic edge held).
// Build and run on the GPU machine:
//   nvcc -O3 -arch=sm_90a -o /tmp/pdl_edges benches/micro/pdl_edges.cu && /tmp/pdl_edges
#include <cstdio>
#include <cuda_runtime.h>

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); return 1; } } while (0)

__device__ unsigned long long now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// A: trigger, spin ~20 us, record its end.
__global__ void a_kernel(unsigned long long* t) {
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    unsigned long long t0 = now();
    while (now() - t0 < 20000) {}
    if (threadIdx.x == 0) t[0] = now();
}

// B: stamp entry, then wait for A.
__global__ void b_kernel(unsigned long long* t) {
    unsigned long long e = now();
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    if (threadIdx.x == 0) {
        t[1] = e;
        t[2] = now();
    }
}

static cudaError_t launch(void (*k)(unsigned long long*), unsigned long long* t, cudaStream_t s) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(1);
    cfg.blockDim = dim3(32);
    cfg.stream = s;
    cudaLaunchAttribute attr;
    attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr.val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = 1;
    return cudaLaunchKernelEx(&cfg, k, t);
}

int main() {
    cudaStream_t s;
    CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    unsigned long long* t;
    CHECK(cudaMalloc(&t, 64));
    const char* names[] = {"nothing", "cudaMallocAsync", "cudaFreeAsync (of an earlier allocation)", "cudaMemsetAsync", "eager, nothing (no graph)"};
    for (int mode = 0; mode < 5; mode++) {
        cudaGraphExec_t exec = nullptr;
        void* early = nullptr;
        auto body = [&]() -> int {
            if (mode == 2) CHECK(cudaMallocAsync(&early, 256, s));
            CHECK(launch(a_kernel, t, s));
            void* p = nullptr;
            if (mode == 1) CHECK(cudaMallocAsync(&p, 256, s));
            if (mode == 2) CHECK(cudaFreeAsync(early, s));
            if (mode == 3) CHECK(cudaMemsetAsync(t + 4, 0, 8, s));
            CHECK(launch(b_kernel, t, s));
            if (mode == 1) CHECK(cudaFreeAsync(p, s));
            return 0;
        };
        if (mode < 4) {
            cudaGraph_t g;
            CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
            if (body()) return 1;
            CHECK(cudaStreamEndCapture(s, &g));
            CHECK(cudaGraphInstantiate(&exec, g, 0));
        }
        double sum = 0;
        for (int i = 0; i < 6; i++) {
            if (mode < 4) CHECK(cudaGraphLaunch(exec, s));
            else if (body()) return 1;
            CHECK(cudaStreamSynchronize(s));
            unsigned long long h[3];
            CHECK(cudaMemcpy(h, t, sizeof h, cudaMemcpyDeviceToHost));
            if (i >= 1) sum += ((double)h[1] - (double)h[0]) / 1e3;
        }
        printf("%-45s B entered %+8.2f us after A ended (mean of 5 replays; negative: launched early)\n", names[mode], sum / 5);
    }
    return 0;
}
