// Is Hopper's FP8 mma.sync (m16n8k32, e4m3 x e4m3 -> f32, C = 0) exact on the operands a
// one-token MXFP4 MoE would give it? A: MXFP4 (e2m1) codes placed in e4m3 bytes as the MoE's
// decode places them (value x 2^-6, the 0.5 code an e4m3 subnormal); B: balanced base-16 digits
// of a fixed-point activation, integers in [-8, 8]. Every product is a multiple of 2^-7 and a
// k32 sum is at most 32 x 6 x 8 x 2^-6 = 24 in magnitude, so an exact sum needs 12 significant
// bits; FP8 MMAs are reported to keep only ~14 bits in their accumulation (DeepSeek-V3), so
// this checks every output's bits against the exact sum over random, extreme and cancelling
// operands, by mma.sync and by wgmma. It also checks the m16n8k32 fragment layouts the MoE
// would rely on. (On sm_90 ptxas lowers the FP8 mma.sync to F2FP unpacks of A and B and F16
// HMMAs; only wgmma has FP8 in hardware.)
//
// Build and run on the GPU machine:
//   nvcc -O3 -gencode arch=compute_90a,code=sm_90a -o /tmp/fp8_mma_exact benches/micro/fp8_mma_exact.cu && /tmp/fp8_mma_exact
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)

// One test: A [16][32] e4m3 bytes (row-major), B [32][8] e4m3 bytes (B[k][n]), D [16][8] f32.
// Lane (g, t) holds A rows g, g + 8 at k 4t..4t+3 and 16 + 4t..; B column g at the same k.
__global__ void mma_tests(const uint8_t* A, const uint8_t* B, float* D, int tests) {
    int test = blockIdx.x;
    if (test >= tests) return;
    int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    const uint8_t* a = A + (size_t)test * 512;
    const uint8_t* b = B + (size_t)test * 256;
    auto word = [](const uint8_t* p) { return (unsigned)p[0] | (unsigned)p[1] << 8 | (unsigned)p[2] << 16 | (unsigned)p[3] << 24; };
    unsigned a0 = word(a + g * 32 + 4 * t), a1 = word(a + (g + 8) * 32 + 4 * t);
    unsigned a2 = word(a + g * 32 + 16 + 4 * t), a3 = word(a + (g + 8) * 32 + 16 + 4 * t);
    uint8_t bb[8];
    for (int i = 0; i < 4; i++) {
        bb[i] = b[(4 * t + i) * 8 + g];
        bb[4 + i] = b[(16 + 4 * t + i) * 8 + g];
    }
    unsigned b0 = word(bb), b1 = word(bb + 4);
    float d0, d1, d2, d3;
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
        : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.f));
    float* d = D + (size_t)test * 128;
    d[g * 8 + 2 * t] = d0;
    d[g * 8 + 2 * t + 1] = d1;
    d[(g + 8) * 8 + 2 * t] = d2;
    d[(g + 8) * 8 + 2 * t + 1] = d3;
}

// The same sums by wgmma (m64n8k32, A from registers, B from shared memory): 4 tests of 16
// rows form one 64-row tile with a common B (the 4 tests of a tile share the first's B).
// B's element (k, n) sits at core k / 16 (128 bytes apart), row n, byte k % 16: two K-major
// 8 x 16-byte core matrices, no swizzle (benches/micro/wgmma_bits.cu's descriptor).
__device__ __forceinline__ unsigned long long smem_desc(const void* p) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(p);
    return (unsigned long long)((addr >> 4) & 0x3fff) | (unsigned long long)(128 >> 4) << 16 | (unsigned long long)(128 >> 4) << 32;
}
__global__ void __launch_bounds__(128) wgmma_tests(const uint8_t* A, const uint8_t* B, float* D, int tiles) {
    __shared__ __align__(128) uint8_t bs[256];
    int tile = blockIdx.x;
    if (tile >= tiles) return;
    int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const uint8_t* a = A + ((size_t)tile * 4 + w) * 512;
    const uint8_t* b = B + (size_t)tile * 4 * 256;
    for (int i = tid; i < 256; i += 128) {
        int k = i / 8, n = i % 8;
        bs[(k / 16) * 128 + n * 16 + (k % 16)] = b[k * 8 + n];
    }
    auto word = [](const uint8_t* p) { return (unsigned)p[0] | (unsigned)p[1] << 8 | (unsigned)p[2] << 16 | (unsigned)p[3] << 24; };
    unsigned a0 = word(a + g * 32 + 4 * t), a1 = word(a + (g + 8) * 32 + 4 * t);
    unsigned a2 = word(a + g * 32 + 16 + 4 * t), a3 = word(a + (g + 8) * 32 + 16 + 4 * t);
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
    float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1;\n}\n"
                 : "+f"(d0), "+f"(d1), "+f"(d2), "+f"(d3)
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(smem_desc(bs)), "r"(0));
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
    float* d = D + ((size_t)tile * 4 + w) * 128;
    d[g * 8 + 2 * t] = d0;
    d[g * 8 + 2 * t + 1] = d1;
    d[(g + 8) * 8 + 2 * t] = d2;
    d[(g + 8) * 8 + 2 * t + 1] = d3;
}

static uint64_t rng_state = 0x243f6a8885a308d3ull;
static uint64_t rnd() {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

// e2m1 code (s e1 e0 m) -> the e4m3 byte the MoE decode makes (value x 2^-6).
static uint8_t code_e4m3(int c) { return (uint8_t)(((c & 8) << 4) | ((c & 7) << 2)); }
static double code_value(int c) {
    static const double mag[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
    return (c & 8 ? -1 : 1) * mag[c & 7] / 64.0;
}
// Integer digit in [-8, 8] -> e4m3.
static uint8_t digit_e4m3(int d) {
    int m = d < 0 ? -d : d;
    uint8_t s = d < 0 ? 0x80 : 0;
    if (m == 0) return s;
    int e = 31 - __builtin_clz(m);                  // 2^e <= m < 2^(e+1)
    int frac = (m << (3 - e)) & 7;                   // 3 mantissa bits (exact for m <= 15)
    return s | (uint8_t)((e + 7) << 3) | (uint8_t)frac;
}

int main() {
    const int tests = 1 << 16;
    std::vector<uint8_t> A((size_t)tests * 512), B((size_t)tests * 256);
    std::vector<int> ac((size_t)tests * 512), bd((size_t)tests * 256);
    for (int t = 0; t < tests; t++) {
        int kind = t % 4;  // 0 random, 1 all extreme, 2 one large term among tiny ones, 3 cancelling
        for (int i = 0; i < 512; i++) {
            int c;
            if (kind == 0) c = rnd() % 16;
            else if (kind == 1) c = (rnd() & 1 ? 8 : 0) | 7;
            else if (kind == 2) c = (i % 32 == (t / 4) % 32) ? 7 | (rnd() & 8) : 1 | (rnd() & 8);
            else c = (i % 2) ? 7 : 15;
            ac[(size_t)t * 512 + i] = c;
            A[(size_t)t * 512 + i] = code_e4m3(c);
        }
        for (int i = 0; i < 256; i++) {
            int d;
            if (kind == 1) d = rnd() & 1 ? 8 : -8;
            else if (kind == 3) d = (i / 8) % 2 ? 8 : 7;
            else d = (int)(rnd() % 17) - 8;
            bd[(size_t)t * 256 + i] = d;
            B[(size_t)t * 256 + i] = digit_e4m3(d);
        }
    }
    // The digit encoding round-trips.
    for (int d = -8; d <= 8; d++) {
        uint8_t v = digit_e4m3(d);
        int e = (v >> 3) & 15, m = v & 7;
        double x = e ? std::ldexp(1.0 + m / 8.0, e - 7) : std::ldexp(m / 8.0, -6);
        if (v & 0x80) x = -x;
        if (x != d) { printf("digit %d encodes as %g\n", d, x); return 1; }
    }
    uint8_t *dA, *dB;
    float* dD;
    CHECK(cudaMalloc(&dA, A.size()));
    CHECK(cudaMalloc(&dB, B.size()));
    CHECK(cudaMalloc(&dD, (size_t)tests * 128 * sizeof(float)));
    CHECK(cudaMemcpy(dA, A.data(), A.size(), cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dB, B.data(), B.size(), cudaMemcpyHostToDevice));
    CHECK(cudaMemset(dD, 0xff, (size_t)tests * 128 * sizeof(float)));  // NaN-poisoned
    mma_tests<<<tests, 32>>>(dA, dB, dD, tests);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    std::vector<float> D((size_t)tests * 128), W((size_t)tests * 128);
    CHECK(cudaMemcpy(D.data(), dD, D.size() * sizeof(float), cudaMemcpyDeviceToHost));
    CHECK(cudaMemset(dD, 0xff, (size_t)tests * 128 * sizeof(float)));
    wgmma_tests<<<tests / 4, 128>>>(dA, dB, dD, tests / 4);
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(W.data(), dD, W.size() * sizeof(float), cudaMemcpyDeviceToHost));
    long wbad = 0;
    for (int t = 0; t < tests; t++) {
        int bt = t - t % 4;  // the tile's B
        for (int r = 0; r < 16; r++)
            for (int c = 0; c < 8; c++) {
                double s = 0;
                for (int k = 0; k < 32; k++) s += code_value(ac[(size_t)t * 512 + r * 32 + k]) * bd[(size_t)bt * 256 + k * 8 + c];
                float got = W[(size_t)t * 128 + r * 8 + c];
                if ((double)got != s && ++wbad <= 3) printf("wgmma test %d row %d col %d: got %.9g want %.9g\n", t, r, c, got, s);
            }
    }
    printf("wgmma m64n8k32 e4m3: %ld outputs, %ld not exact\n", (long)tests * 128, wbad);
    long bad[4] = {0, 0, 0, 0}, n[4] = {0, 0, 0, 0};
    double worst[4] = {0, 0, 0, 0};
    for (int t = 0; t < tests; t++) {
        for (int r = 0; r < 16; r++)
            for (int c = 0; c < 8; c++) {
                double s = 0;
                for (int k = 0; k < 32; k++) s += code_value(ac[(size_t)t * 512 + r * 32 + k]) * bd[(size_t)t * 256 + k * 8 + c];
                float got = D[(size_t)t * 128 + r * 8 + c];
                int kind = t % 4;
                n[kind]++;
                if ((double)got != s) {
                    bad[kind]++;
                    double err = std::fabs((double)got - s);
                    if (!(err <= worst[kind])) worst[kind] = err;
                    if (bad[kind] <= 3) printf("kind %d test %d row %d col %d: got %.9g want %.9g\n", kind, t, r, c, got, s);
                }
            }
    }
    const char* names[4] = {"random codes and digits", "all +-6 x +-8", "one large term, 31 of +-0.5", "cancelling +-6 x 7/8"};
    long total_bad = 0;
    for (int k = 0; k < 4; k++) {
        printf("%-30s %8ld outputs, %ld not exact (largest error %g)\n", names[k], n[k], bad[k], worst[k]);
        total_bad += bad[k];
    }
    printf(total_bad ? "FP8 MMA: NOT EXACT\n" : "FP8 MMA: every output exact\n");
    return total_bad || wbad ? 1 : 0;
}
