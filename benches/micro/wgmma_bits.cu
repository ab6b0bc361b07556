// Do Hopper's warpgroup MMAs (wgmma.mma_async, A in registers, B in shared memory) give the
// same bits as the mma.sync chains every tensor-core kernel of the project runs? The GEMV and
// GEMM families, the MoE kernels and the tensor-core attention are bit-identical to each other
// because they run the same mma.sync operations in the same order; a wgmma GEMM can join them
// only if each wgmma k-step rounds exactly as the mma.sync k-step it replaces.
//
// Each block is one warpgroup (4 warps). Per tile: a chain of L steps, step s multiplying
// A_s [64 x K] by B_s [K x 8] (K = 16 for F16 / BF16, 8 for TF32) into one f32 accumulator,
// the first step from zero. The wgmma path issues m64n8kK with B_s from shared memory (no
// swizzle, K-major core matrices); the mma.sync path has each warp run m16n8kK on its 16 rows
// of the same operands. Every output's bits are compared, and both against an f64 sum.
//
// Build and run on the GPU machine:
//   nvcc -O3 -gencode arch=compute_90a,code=sm_90a -o /tmp/wgmma_bits benches/micro/wgmma_bits.cu && /tmp/wgmma_bits
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
#include <cuda_runtime.h>

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)

enum Ty { F16 = 0, BF16 = 1, TF32 = 2 };

// Elements are stored as 32-bit words (F16 / BF16 in the low half), row-major:
// A: [tiles][L][64][K], B: [tiles][L][K][8], D: [tiles][64][8].
template <int TY>
struct Shape {
    static constexpr int K = TY == TF32 ? 8 : 16;
    static constexpr int EB = TY == TF32 ? 4 : 2;  // bytes per element
};

__host__ __device__ __forceinline__ int mode_perm(int k) { return ((15 - k) * 7) & 15; }

__device__ __forceinline__ unsigned pack2(unsigned lo, unsigned hi) { return (lo & 0xffffu) | (hi << 16); }

// A fragment of rows r0 .. r0 + 15 (the mma.sync m16n8kK layout; wgmma's per warp).
template <int TY>
__device__ __forceinline__ void a_frag(const unsigned* A, int r0, int lane, unsigned a[4]) {
    const int g = lane >> 2, t = lane & 3, K = Shape<TY>::K;
    if (TY == TF32) {
        a[0] = A[(r0 + g) * K + t];
        a[1] = A[(r0 + g + 8) * K + t];
        a[2] = A[(r0 + g) * K + t + 4];
        a[3] = A[(r0 + g + 8) * K + t + 4];
    } else {
        a[0] = pack2(A[(r0 + g) * K + 2 * t], A[(r0 + g) * K + 2 * t + 1]);
        a[1] = pack2(A[(r0 + g + 8) * K + 2 * t], A[(r0 + g + 8) * K + 2 * t + 1]);
        a[2] = pack2(A[(r0 + g) * K + 2 * t + 8], A[(r0 + g) * K + 2 * t + 9]);
        a[3] = pack2(A[(r0 + g + 8) * K + 2 * t + 8], A[(r0 + g + 8) * K + 2 * t + 9]);
    }
}

// mma.sync m16n8k16's B fragment (F16 / BF16) of lane (g, t) from B [16][ldb], columns n0 ..
__device__ __forceinline__ void b_frag16(const unsigned* B, int ldb, int n0, int g, int t, unsigned& b0, unsigned& b1) {
    b0 = pack2(B[(2 * t) * ldb + n0 + g], B[(2 * t + 1) * ldb + n0 + g]);
    b1 = pack2(B[(2 * t + 8) * ldb + n0 + g], B[(2 * t + 9) * ldb + n0 + g]);
}

// A warp's accumulator fragment d (rows r, r + 8; columns n0 + 2t, + 1) into D [64][ldd].
__device__ __forceinline__ void store_frag(float* D, int ldd, int r, int n0, int t, const float d[4]) {
    D[r * ldd + n0 + 2 * t] = d[0];
    D[r * ldd + n0 + 2 * t + 1] = d[1];
    D[(r + 8) * ldd + n0 + 2 * t] = d[2];
    D[(r + 8) * ldd + n0 + 2 * t + 1] = d[3];
}

template <int TY>
__device__ __forceinline__ void mma_sync_step(float d[4], const unsigned a[4], unsigned b0, unsigned b1, bool acc) {
    float c = 0.f;
    if (TY == F16) {
        if (acc)
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
        else
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c));
    } else if (TY == BF16) {
        if (acc)
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
        else
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c));
    } else {
        if (acc)
            asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                         : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
        else
            asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
                         : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c));
    }
}

template <int TY>
__device__ __forceinline__ void wgmma_step(float d[4], const unsigned a[4], unsigned long long desc, int acc) {
    if (TY == F16)
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n8k16.f32.f16.f16 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1, 0;\n}\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc));
    else if (TY == BF16)
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1, 0;\n}\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc));
    else
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n8k8.f32.tf32.tf32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1;\n}\n"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc));
}

// Shared-memory matrix descriptor: start address, leading (K) and stride (N) byte offsets
// between core matrices (8 rows of 16 bytes), no swizzle. With 8 columns there is one core
// matrix along N and two along K, 128 bytes apart; both offsets are 128, so the two readings
// of the offsets' roles (the documentation's and the one some libraries use) agree.
__device__ __forceinline__ unsigned long long smem_desc(const void* p) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(p);
    unsigned long long d = 0;
    d |= (unsigned long long)((addr >> 4) & 0x3fff);
    d |= (unsigned long long)(128 >> 4) << 16;
    d |= (unsigned long long)(128 >> 4) << 32;
    return d;
}

// One block per tile, 128 threads. mode 0: wgmma, 1: mma.sync.
template <int TY>
__global__ void __launch_bounds__(128) chain(const unsigned* __restrict__ A, const unsigned* __restrict__ B, int L, int mode, float* __restrict__ D) {
    constexpr int K = Shape<TY>::K, EB = Shape<TY>::EB;
    __shared__ __align__(128) unsigned char bs[256];  // K x 8 elements: two 128-byte core matrices along K
    const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const size_t tile = blockIdx.x;
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < L; s++) {
        const unsigned* As = A + (tile * L + s) * 64 * K;
        const unsigned* Bs = B + (tile * L + s) * K * 8;
        unsigned a[4];
        a_frag<TY>(As, 16 * w, lane, a);
        if (mode == 0) {
            __syncthreads();  // the previous step's wgmma has read bs (it waited below)
            // Element (k, n) at core k / (16 / EB), row n, column k % (16 / EB).
            for (int i = tid; i < K * 8; i += 128) {
                int k = i / 8, n = i % 8, per = 16 / EB;
                unsigned char* p = bs + (k / per) * 128 + n * 16 + (k % per) * EB;
                if (EB == 2) *reinterpret_cast<unsigned short*>(p) = (unsigned short)Bs[k * 8 + n];
                else *reinterpret_cast<unsigned*>(p) = Bs[k * 8 + n];
            }
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            __syncthreads();
            asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
            wgmma_step<TY>(d, a, smem_desc(bs), s > 0);
            asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        } else {
            unsigned b0, b1;
            if (TY == TF32) {
                b0 = Bs[t * 8 + g];
                b1 = Bs[(t + 4) * 8 + g];
            } else {
                b_frag16(Bs, 8, 0, g, t, b0, b1);
            }
            mma_sync_step<TY>(d, a, b0, b1, s > 0);
        }
    }
    store_frag(D + tile * 64 * 8, 8, 16 * w + g, 0, t, d);
}

// The same with 64 columns (F16 only): B_s [16 x 64] as 8 x 2 core matrices, the one at (k core
// kc, n group ng) at kc * kofs + ng * nofs; the descriptor's leading offset is `lead` and its
// stride offset `stride` (bytes). The documentation's reading: leading = the K direction.
__device__ __forceinline__ unsigned long long smem_desc2(const void* p, int lead, int stride) {
    unsigned addr = (unsigned)__cvta_generic_to_shared(p);
    return (unsigned long long)((addr >> 4) & 0x3fff) | (unsigned long long)((lead >> 4) & 0x3fff) << 16 |
           (unsigned long long)((stride >> 4) & 0x3fff) << 32;
}
__device__ __forceinline__ void wgmma_n64(float d[32], const unsigned a[4], unsigned long long desc, int acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
                 "{%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc));
}
// mode 0: wgmma, cores laid out K-direction 1024 bytes apart, N 128 (leading = 1024, stride = 128);
// 1: wgmma, cores K 128 apart, N 256 apart (leading = 128, stride = 256): the same reading of
// the offsets (leading = K) on other numbers (the printed label "leading=N-reading" is a
// misnomer kept so the recorded output reads the same); 2: mma.sync per n8 tile. A: [tiles][L][64][16], B: [tiles][L][16][64], D: [tiles][64][64].
__global__ void __launch_bounds__(128) chain64(const unsigned* __restrict__ A, const unsigned* __restrict__ B, int L, int mode, float* __restrict__ D) {
    __shared__ __align__(128) unsigned char bs[2048];
    const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const size_t tile = blockIdx.x;
    float d[32];
#pragma unroll
    for (int i = 0; i < 32; i++) d[i] = 0.f;
    const int kofs = mode == 0 ? 1024 : 128, nofs = mode == 0 ? 128 : 256;
    for (int s = 0; s < L; s++) {
        const unsigned* As = A + (tile * L + s) * 64 * 16;
        const unsigned* Bs = B + (tile * L + s) * 16 * 64;
        unsigned a[4];
        a_frag<F16>(As, 16 * w, lane, a);
        if (mode < 2) {
            __syncthreads();
            for (int i = tid; i < 16 * 64; i += 128) {
                int k = i / 64, n = i % 64;
                *reinterpret_cast<unsigned short*>(bs + (k / 8) * kofs + (n / 8) * nofs + (n % 8) * 16 + (k % 8) * 2) = (unsigned short)Bs[k * 64 + n];
            }
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            __syncthreads();
            asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
            wgmma_n64(d, a, smem_desc2(bs, kofs, nofs), s > 0);
            asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
        } else {
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
                unsigned b0, b1;
                b_frag16(Bs, 64, nt * 8, g, t, b0, b1);
                mma_sync_step<F16>(d + 4 * nt, a, b0, b1, s > 0);
            }
        }
    }
#pragma unroll
    for (int nt = 0; nt < 8; nt++) store_frag(D + tile * 64 * 64, 64, 16 * w + g, nt * 8, t, d + 4 * nt);
}

// Does an mma.sync's result depend on where its 16 products sit along k? mode 0: as given;
// 1: k permuted (the same permutation in A and B) within each step. F16, m16n8k16, one warp
// per 16 rows as above.
__global__ void __launch_bounds__(128) permuted(const unsigned* __restrict__ A, const unsigned* __restrict__ B, int L, int mode, float* __restrict__ D) {
    __shared__ unsigned as[64 * 16], bsm[16 * 8];
    const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const size_t tile = blockIdx.x;
    // a fixed permutation of 0..15 (reverses and interleaves the halves)
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s = 0; s < L; s++) {
        const unsigned* As = A + (tile * L + s) * 64 * 16;
        const unsigned* Bs = B + (tile * L + s) * 16 * 8;
        __syncthreads();
        for (int i = tid; i < 64 * 16; i += 128) {
            int r = i / 16, k = i % 16, kp = mode ? mode_perm(k) : k;
            as[r * 16 + kp] = As[r * 16 + k];
        }
        for (int i = tid; i < 16 * 8; i += 128) {
            int k = i / 8, n = i % 8, kp = mode ? mode_perm(k) : k;
            bsm[kp * 8 + n] = Bs[k * 8 + n];
        }
        __syncthreads();
        unsigned a[4];
        a_frag<F16>(as, 16 * w, lane, a);
        unsigned b0, b1;
        b_frag16(bsm, 8, 0, g, t, b0, b1);
        mma_sync_step<F16>(d, a, b0, b1, s > 0);
    }
    store_frag(D + tile * 64 * 8, 8, 16 * w + g, 0, t, d);
}

// ---------------------------------------------------------------------------------------------
// Host: element generators (bits), the f64 reference, the comparison.

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd() {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static double unif() { return (rnd() >> 11) * (1.0 / 9007199254740992.0); }

static unsigned f32_bits(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static float bits_f32(unsigned u) { float f; memcpy(&f, &u, 4); return f; }

// f32 -> f16 bits, round to nearest even (normal and subnormal range; no overflow in use here).
static unsigned f16_bits(float f) {
    unsigned u = f32_bits(f), sign = (u >> 16) & 0x8000u;
    float a = fabsf(f);
    if (a == 0.f) return sign;
    int e;
    double m = frexp((double)a, &e);  // a = m 2^e, m in [0.5, 1)
    // f16: normal for e - 1 >= -14 (value >= 2^-14), 10 mantissa bits.
    int q = e - 1 >= -14 ? e - 11 : -24;  // quantum 2^q
    double n = std::nearbyint(a / ldexp(1.0, q));
    double v = n * ldexp(1.0, q);
    // re-encode v
    if (v == 0) return sign;
    int ev;
    double mv = frexp(v, &ev);
    if (ev - 1 >= -14) {
        unsigned exp = (unsigned)(ev - 1 + 15), man = (unsigned)llround((mv * 2 - 1) * 1024);
        if (man == 1024) { man = 0; exp++; }
        return sign | (exp << 10) | man;
    }
    return sign | (unsigned)llround(v / ldexp(1.0, -24));
}
static double f16_val(unsigned h) {
    unsigned e = (h >> 10) & 31, m = h & 1023;
    double v = e ? ldexp(1.0 + m / 1024.0, (int)e - 15) : ldexp((double)m, -24);
    return (h & 0x8000u) ? -v : v;
}
static unsigned bf16_bits(float f) {  // round to nearest even
    unsigned u = f32_bits(f);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
static double bf16_val(unsigned h) { return (double)bits_f32(h << 16); }
static unsigned tf32_bits(float f) { return f32_bits(f) & 0xffffe000u; }  // low 13 bits zero
static double tf32_val(unsigned u) { return (double)bits_f32(u); }

static double elem_val(int ty, unsigned v) { return ty == F16 ? f16_val(v) : ty == BF16 ? bf16_val(v) : tf32_val(v); }
static unsigned to_elem(int ty, float f) { return ty == F16 ? f16_bits(f) : ty == BF16 ? bf16_bits(f) : tf32_bits(f); }

// A random value with a random exponent in [lo, hi] and a random sign.
static float wide(int lo, int hi) {
    float m = (float)(1.0 + unif());
    int e = lo + (int)(rnd() % (unsigned)(hi - lo + 1));
    return (rnd() & 1 ? -1.f : 1.f) * ldexpf(m, e);
}

struct Case {
    const char* name;
    int ty, L;
    // fills A [L][64][K] and B [L][K][8] of one tile
    void (*fill)(int ty, int L, unsigned* A, unsigned* B);
};

static int kdim(int ty) { return ty == TF32 ? 8 : 16; }

// Device buffers: inputs uploaded, outputs poisoned (NaN unless written), results read back.
static unsigned* upload(const std::vector<unsigned>& v) {
    unsigned* d;
    CHECK(cudaMalloc(&d, v.size() * 4));
    CHECK(cudaMemcpy(d, v.data(), v.size() * 4, cudaMemcpyHostToDevice));
    return d;
}
static float* poisoned(size_t n) {
    float* d;
    CHECK(cudaMalloc(&d, n * 4));
    CHECK(cudaMemset(d, 0xff, n * 4));
    return d;
}
static std::vector<float> fetch(float* d, size_t n) {
    CHECK(cudaGetLastError());
    CHECK(cudaDeviceSynchronize());
    std::vector<float> v(n);
    CHECK(cudaMemcpy(v.data(), d, n * 4, cudaMemcpyDeviceToHost));
    CHECK(cudaFree(d));
    return v;
}

// Small integers: every order of summation gives the exact result (checks the layouts).
static void fill_exact(int ty, int L, unsigned* A, unsigned* B) {
    int K = kdim(ty);
    for (int i = 0; i < L * 64 * K; i++) A[i] = to_elem(ty, (float)((int)(rnd() % 7) - 3));
    for (int i = 0; i < L * K * 8; i++) B[i] = to_elem(ty, (float)((int)(rnd() % 7) - 3));
}

// The MoE kernels: A = E2M1 values x 2^-6 (decoded MXFP4), B = columns 2j / 2j + 1 the F16 hi / lo
// of pair j's activations scaled so the largest magnitude is just under 2^14.
static void fill_moe(int ty, int L, unsigned* A, unsigned* B) {
    static const float e2m1[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
    int K = kdim(ty);
    for (int i = 0; i < L * 64 * K; i++) A[i] = to_elem(ty, (rnd() & 1 ? -1.f : 1.f) * e2m1[rnd() % 8] * 0.015625f);
    for (int s = 0; s < L; s++)
        for (int j = 0; j < 4; j++) {
            float x[16], m = 0.f;
            for (int k = 0; k < K; k++) { x[k] = (float)(unif() * 2 - 1) * ldexpf(1.f, (int)(rnd() % 6) - 3); m = fmaxf(m, fabsf(x[k])); }
            int ex;
            frexpf(m, &ex);
            float sc = ldexpf(1.f, 14 - ex);
            for (int k = 0; k < K; k++) {
                float v = x[k] * sc;
                unsigned h = f16_bits(v);
                unsigned l = f16_bits(v - (float)f16_val(h));
                B[(s * K + k) * 8 + 2 * j] = h;
                B[(s * K + k) * 8 + 2 * j + 1] = l;
            }
        }
}

// The GEMV / GEMM families: A = FP8 e4m3 weights decoded to F16 (BF16), B = the activations' hi
// part on even steps and lo part on odd steps, columns = tokens.
static void fill_gemv(int ty, int L, unsigned* A, unsigned* B) {
    int K = kdim(ty);
    for (int i = 0; i < L * 64 * K; i++) {
        // e4m3: exponent -6..8, 3 mantissa bits (normals)
        float m = 1.f + (float)(rnd() % 8) / 8.f;
        A[i] = to_elem(ty, (rnd() & 1 ? -1.f : 1.f) * ldexpf(m, (int)(rnd() % 15) - 6));
    }
    for (int s = 0; s < L; s += 2)
        for (int k = 0; k < K; k++)
            for (int n = 0; n < 8; n++) {
                float v = (float)(unif() * 2 - 1) * ldexpf(1.f, (int)(rnd() % 8) + 6);
                unsigned h = to_elem(ty, v);
                unsigned l = to_elem(ty, v - (float)elem_val(ty, h));
                B[(s * K + k) * 8 + n] = h;
                if (s + 1 < L) B[((s + 1) * K + k) * 8 + n] = l;
            }
}

// Anything: wide exponents, so the products' alignment and cancellation vary.
static void fill_wide(int ty, int L, unsigned* A, unsigned* B) {
    int K = kdim(ty);
    int lo = ty == F16 ? -12 : -30, hi = ty == F16 ? 7 : 30;
    for (int i = 0; i < L * 64 * K; i++) A[i] = to_elem(ty, wide(lo, hi));
    for (int i = 0; i < L * K * 8; i++) B[i] = to_elem(ty, wide(lo, hi));
}

// Near cancellation: pairs of products that almost cancel.
static void fill_cancel(int ty, int L, unsigned* A, unsigned* B) {
    int K = kdim(ty);
    for (int s = 0; s < L; s++)
        for (int r = 0; r < 64; r++)
            for (int k = 0; k < K; k++) {
                float v = wide(-4, 4);
                if (k % 2 == 1) v = -bits_f32(f32_bits((float)elem_val(ty, A[(s * 64 + r) * K + k - 1])) ^ (rnd() % 4 == 0 ? 0x2000u : 0u));
                A[(s * 64 + r) * K + k] = to_elem(ty, v);
            }
    for (int s = 0; s < L; s++)
        for (int k = 0; k < K; k++)
            for (int n = 0; n < 8; n++) B[(s * K + k) * 8 + n] = to_elem(ty, k % 2 == 1 ? (float)elem_val(ty, B[(s * K + k - 1) * 8 + n]) : wide(-4, 4));
}

template <int TY>
static void run_case(const Case& c, int tiles) {
    const int K = Shape<TY>::K, L = c.L;
    std::vector<unsigned> A((size_t)tiles * L * 64 * K), B((size_t)tiles * L * K * 8);
    for (int t = 0; t < tiles; t++) c.fill(TY, L, &A[(size_t)t * L * 64 * K], &B[(size_t)t * L * K * 8]);
    unsigned *dA = upload(A), *dB = upload(B);
    float *dW = poisoned((size_t)tiles * 512), *dM = poisoned((size_t)tiles * 512);
    chain<TY><<<tiles, 128>>>(dA, dB, L, 0, dW);
    chain<TY><<<tiles, 128>>>(dA, dB, L, 1, dM);
    std::vector<float> W = fetch(dW, (size_t)tiles * 512), M = fetch(dM, (size_t)tiles * 512);
    size_t differ = 0, nan = 0, exact_w = 0, exact_m = 0;
    double err_w = 0, err_m = 0, max_rel_diff = 0;
    for (int t = 0; t < tiles; t++)
        for (int r = 0; r < 64; r++)
            for (int n = 0; n < 8; n++) {
                double ref = 0, mag = 0;
                for (int s = 0; s < L; s++)
                    for (int k = 0; k < K; k++) {
                        double p = elem_val(TY, A[(((size_t)t * L + s) * 64 + r) * K + k]) * elem_val(TY, B[(((size_t)t * L + s) * K + k) * 8 + n]);
                        ref += p;
                        mag += fabs(p);
                    }
                size_t i = (size_t)t * 512 + r * 8 + n;
                float w = W[i], m = M[i];
                if (std::isnan(w) || std::isnan(m)) nan++;
                if (f32_bits(w) != f32_bits(m)) {
                    differ++;
                    double rd = fabs((double)w - (double)m) / (mag > 0 ? mag : 1);
                    if (rd > max_rel_diff) max_rel_diff = rd;
                }
                if ((double)w == ref) exact_w++;
                if ((double)m == ref) exact_m++;
                if (mag > 0) {
                    err_w = fmax(err_w, fabs((double)w - ref) / mag);
                    err_m = fmax(err_m, fabs((double)m - ref) / mag);
                }
            }
    size_t total = (size_t)tiles * 512;
    printf("%-7s %-12s L=%-3d outputs %8zu  bits differ %8zu  NaN %zu  equal to f64: wgmma %8zu mma.sync %8zu  max |err|/sum|p|: wgmma %.3g mma.sync %.3g  max |diff|/sum|p| %.3g\n",
           TY == F16 ? "f16" : TY == BF16 ? "bf16" : "tf32", c.name, L, total, differ, nan, exact_w, exact_m, err_w, err_m, max_rel_diff);
    CHECK(cudaFree(dA));
    CHECK(cudaFree(dB));
}

// 64 columns: exact small integers, or MoE-like data (A = E2M1 x 2^-6, columns 2j / 2j + 1 the hi / lo
// of pair j). Compares the two descriptor readings and mma.sync.
static void run64(const char* name, bool moe, int tiles, int L) {
    std::vector<unsigned> A((size_t)tiles * L * 64 * 16), B((size_t)tiles * L * 16 * 64);
    static const float e2m1[8] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f};
    for (auto& a : A) a = moe ? f16_bits((rnd() & 1 ? -1.f : 1.f) * e2m1[rnd() % 8] * 0.015625f) : f16_bits((float)((int)(rnd() % 7) - 3));
    for (size_t ts = 0; ts < (size_t)tiles * L; ts++)
        for (int j = 0; j < 32; j++)
            for (int k = 0; k < 16; k++) {
                unsigned* b = &B[ts * 16 * 64 + k * 64 + 2 * j];
                if (!moe) {
                    b[0] = f16_bits((float)((int)(rnd() % 7) - 3));
                    b[1] = f16_bits((float)((int)(rnd() % 7) - 3));
                } else {
                    float v = (float)(unif() * 2 - 1) * ldexpf(1.f, 13);
                    b[0] = f16_bits(v);
                    b[1] = f16_bits(v - (float)f16_val(b[0]));
                }
            }
    unsigned *dA = upload(A), *dB = upload(B);
    std::vector<float> D[3];
    for (int m = 0; m < 3; m++) {
        float* d = poisoned((size_t)tiles * 4096);
        chain64<<<tiles, 128>>>(dA, dB, L, m, d);
        D[m] = fetch(d, (size_t)tiles * 4096);
    }
    size_t diff0 = 0, diff1 = 0, wrong = 0;
    for (size_t t = 0; t < (size_t)tiles; t++)
        for (int r = 0; r < 64; r++)
            for (int n = 0; n < 64; n++) {
                size_t i = t * 4096 + r * 64 + n;
                if (f32_bits(D[0][i]) != f32_bits(D[2][i])) diff0++;
                if (f32_bits(D[1][i]) != f32_bits(D[2][i])) diff1++;
                if (!moe) {
                    double ref = 0;
                    for (int s = 0; s < L; s++)
                        for (int k = 0; k < 16; k++) ref += f16_val(A[((t * L + s) * 64 + r) * 16 + k]) * f16_val(B[((t * L + s) * 16 + k) * 64 + n]);
                    if ((double)D[2][i] != ref) wrong++;
                }
            }
    printf("f16 n64 %-8s L=%d outputs %zu  mma.sync != exact %zu  bits differ from mma.sync: leading=K (1024/128) %zu, leading=N-reading (128/256) %zu\n",
           name, L, (size_t)tiles * 4096, wrong, diff0, diff1);
    CHECK(cudaFree(dA));
    CHECK(cudaFree(dB));
}

// Permuting k inside each mma.sync (the same permutation for A and B): same bits?
static void run_perm(const Case& c, int tiles) {
    const int K = 16, L = c.L;
    std::vector<unsigned> A((size_t)tiles * L * 64 * K), B((size_t)tiles * L * K * 8);
    for (int t = 0; t < tiles; t++) c.fill(F16, L, &A[(size_t)t * L * 64 * K], &B[(size_t)t * L * K * 8]);
    unsigned *dA = upload(A), *dB = upload(B);
    float *d0 = poisoned((size_t)tiles * 512), *d1 = poisoned((size_t)tiles * 512);
    permuted<<<tiles, 128>>>(dA, dB, L, 0, d0);
    permuted<<<tiles, 128>>>(dA, dB, L, 1, d1);
    std::vector<float> X = fetch(d0, (size_t)tiles * 512), Y = fetch(d1, (size_t)tiles * 512);
    size_t differ = 0;
    for (size_t i = 0; i < X.size(); i++) differ += f32_bits(X[i]) != f32_bits(Y[i]);
    printf("f16 k permuted within each mma.sync, %-8s L=%-3d outputs %zu  bits differ %zu\n", c.name, L, X.size(), differ);
    CHECK(cudaFree(dA));
    CHECK(cudaFree(dB));
}

int main() {
    int dev;
    cudaDeviceProp p;
    CHECK(cudaGetDevice(&dev));
    CHECK(cudaGetDeviceProperties(&p, dev));
    printf("%s, sm_%d%d\n", p.name, p.major, p.minor);
    const int tiles = 1024;
    const Case cases[] = {
        {"exact", 0, 4, fill_exact},
        {"moe-k32", 0, 2, fill_moe},
        {"moe-long", 0, 64, fill_moe},
        {"gemv", 0, 64, fill_gemv},
        {"wide", 0, 16, fill_wide},
        {"cancel", 0, 16, fill_cancel},
    };
    for (const Case& c : cases) {
        run_case<F16>(c, tiles);
        if (c.fill != fill_moe) run_case<BF16>(c, tiles);
        if (c.fill != fill_moe && c.fill != fill_gemv) run_case<TF32>(c, tiles);
    }
    run64("exact", false, 256, 2);
    run64("moe-k32", true, 512, 2);
    for (const Case& c : cases) run_perm(c, tiles);
    return 0;
}
