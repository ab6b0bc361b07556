// Decode-time matrix-vector kernels over weights in their stored formats (BF16, FP8 e4m3 with
// 128x128 block scales, MXFP4 with E8M0 scales per 32), for T <= MAXT tokens at once, plus the
// MXFP4 MoE decode (gate+up with SiLU fused, down, routing-weighted combine).
//
// Layout: one warp per output row; each lane streams 16-byte chunks of the row (coalesced across
// the warp), decodes them in registers and accumulates T dot products in f32; a warp shuffle
// reduces. Activations x are f32 [T, K] and are read through the read-only cache (they are
// small and shared by every row). Outputs are f32 [T, N].
//
// Compiled at run time by NVRTC (no headers needed: formats are decoded with bit operations).

// (PDL_ENTER and the f16 helpers come from kernels/common.cuh, prepended by compile.rs.)

#define MAXT 8
#define WARPS 8

__device__ __forceinline__ float bf16_to_f32(unsigned short v) { return __int_as_float(((unsigned)v) << 16); }

__device__ __forceinline__ float e4m3_to_f32(unsigned v) {
    unsigned s = (v & 0x80u) << 24, e = (v >> 3) & 15u, m = v & 7u;
    if (e == 15u && m == 7u) return __int_as_float(0x7fc00000u);
    if (e == 0u) { float f = (float)m * 0.001953125f; return s ? -f : f; }  // m * 2^-9
    return __int_as_float(s | ((e + 120u) << 23) | (m << 20));
}

__device__ __forceinline__ float e8m0_to_f32(unsigned e) {
    if (e == 255u) return __int_as_float(0x7fc00000u);
    return e ? __int_as_float(e << 23) : __int_as_float(0x00400000u);
}

// e8m0_to_f32(e) * 2^14 (undoing the F16 decode's 2^-14) as selects, not branches: two of
// them per 32-group sat in the MoE kernels' inner loop. e = 0 gives 2^-113, still a normal
// float; 241..254 overflow to inf as the product would.
__device__ __forceinline__ float e8m0_x16384(unsigned e) {
    return __int_as_float(e <= 240u ? (e + 14u) << 23 : (e == 255u ? 0x7fc00000u : 0x7f800000u));
}

// FP4 E2M1 code -> float with bit operations (a lookup table in constant memory would serialise
// when lanes index it differently): codes 0..7 = {0, .5, 1, 1.5, 2, 3, 4, 6}, bit 3 = sign.
__device__ __forceinline__ float e2m1_to_f32(unsigned c) {
    unsigned e = (c >> 1) & 3u, m = c & 1u;
    unsigned bits = e ? (((e + 126u) << 23) | (m << 22)) : (m ? 0x3f000000u : 0u);
    return __int_as_float(bits | ((c & 8u) << 28));
}

// Eight MXFP4 codes (one u32, element j in nibble j) -> eight floats equal to the E2M1 values
// times 2^-14, in ~3 instructions per value: each pair of nibbles is moved into the sign and
// exponent/mantissa bits of an f16 pair (E2M1 [s e1 e0 m] -> f16 with exponent e and mantissa m,
// which is the value scaled by 2^-14, subnormal 0.5 included), then converted. Callers fold
// 2^14 into the block scale. Pairs: (0,4) (1,5) (2,6) (3,7).
__device__ __forceinline__ void mxfp4_decode8(unsigned u, float w[8]) {
    unsigned a = ((u & 0x00070007u) << 9) | ((u & 0x00080008u) << 12);
    unsigned b = ((u & 0x00700070u) << 5) | ((u & 0x00800080u) << 8);
    unsigned c = ((u & 0x07000700u) << 1) | ((u & 0x08000800u) << 4);
    unsigned d = ((u & 0x70007000u) >> 3) | (u & 0x80008000u);
    asm("{.reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h;}" : "=f"(w[0]), "=f"(w[4]) : "r"(a));
    asm("{.reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h;}" : "=f"(w[1]), "=f"(w[5]) : "r"(b));
    asm("{.reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h;}" : "=f"(w[2]), "=f"(w[6]) : "r"(c));
    asm("{.reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h;}" : "=f"(w[3]), "=f"(w[7]) : "r"(d));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Accumulate one lane's 32 consecutive weights w[0..32) against x[t][k0..k0+32) for t < T.
__device__ __forceinline__ void fma32(float acc[MAXT], const float w[32], const float* __restrict__ x, int K, int k0, int T) {
#pragma unroll
    for (int t = 0; t < MAXT; t++) {
        if (t < T) {
            const float4* xv = reinterpret_cast<const float4*>(x + (size_t)t * K + k0);
            float a = 0.f;
#pragma unroll
            for (int j = 0; j < 8; j++) {
                float4 q = __ldg(xv + j);
                a += w[4 * j] * q.x + w[4 * j + 1] * q.y + w[4 * j + 2] * q.z + w[4 * j + 3] * q.w;
            }
            acc[t] += a;
        }
    }
}

// y[t, n] = sum_k W[n, k] x[t, k]; W bf16 [N, K], K % 256 == 0.
extern "C" __global__ void gemv_bf16(const unsigned short* __restrict__ W, const float* __restrict__ x,
                                     float* __restrict__ y, int N, int K, int T) { PDL_ENTER();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int n = blockIdx.x * WARPS + warp;
    if (n >= N) return;
    float acc[MAXT] = {0.f};
    const uint4* row = reinterpret_cast<const uint4*>(W + (size_t)n * K);
    // Each lane takes 4 uint4 (32 bf16) per step: 32 lanes x 64 B = 2 KB per warp step.
    for (int c = lane * 4; c < K / 8; c += 128) {
        uint4 q[4];
#pragma unroll
        for (int j = 0; j < 4; j++) q[j] = __ldg(row + c + j);
        float w[32];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            unsigned u[4] = {q[j].x, q[j].y, q[j].z, q[j].w};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                w[8 * j + 2 * i] = __int_as_float(u[i] << 16);
                w[8 * j + 2 * i + 1] = __int_as_float(u[i] & 0xffff0000u);
            }
        }
        fma32(acc, w, x, K, c * 8, T);
    }
#pragma unroll
    for (int t = 0; t < MAXT; t++) {
        if (t < T) {
            float s = warp_sum(acc[t]);
            if (lane == 0) y[(size_t)t * N + n] = s;
        }
    }
}

// W e4m3 [N, K] with f32 scales [ceil(N/128), K/128] (scale_inv, multiplied); K % 512 == 0.
extern "C" __global__ void gemv_fp8(const unsigned char* __restrict__ W, const float* __restrict__ scales,
                                    const float* __restrict__ x, float* __restrict__ y, int N, int K, int T) { PDL_ENTER();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int n = blockIdx.x * WARPS + warp;
    if (n >= N) return;
    float acc[MAXT] = {0.f};
    const uint4* row = reinterpret_cast<const uint4*>(W + (size_t)n * K);
    const float* srow = scales + (size_t)(n / 128) * (K / 128);
    // Each lane takes 2 uint4 (32 weights) per step; 32 consecutive weights share one scale.
    for (int c = lane * 2; c < K / 16; c += 64) {
        uint4 q0 = __ldg(row + c), q1 = __ldg(row + c + 1);
        float sc = __ldg(srow + (c * 16) / 128);
        unsigned u[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
        float w[32];
#pragma unroll
        for (int i = 0; i < 8; i++)
#pragma unroll
            for (int b = 0; b < 4; b++) w[4 * i + b] = e4m3_to_f32((u[i] >> (8 * b)) & 255u) * sc;
        fma32(acc, w, x, K, c * 16, T);
    }
#pragma unroll
    for (int t = 0; t < MAXT; t++) {
        if (t < T) {
            float s = warp_sum(acc[t]);
            if (lane == 0) y[(size_t)t * N + n] = s;
        }
    }
}

// One MXFP4 row segment: 16 packed bytes = 32 weights sharing one E8M0 scale.
__device__ __forceinline__ void mxfp4_chunk(uint4 q, unsigned scale_byte, float w[32]) {
    float sc = e8m0_x16384(scale_byte);
    unsigned u[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        mxfp4_decode8(u[i], w + 8 * i);
#pragma unroll
        for (int j = 0; j < 8; j++) w[8 * i + j] *= sc;
    }
}

// W MXFP4 [N, K/2] bytes + E8M0 scales [N, K/32]; K % 1024 == 0 not required: K % 32 == 0.
extern "C" __global__ void gemv_mxfp4(const unsigned char* __restrict__ W, const unsigned char* __restrict__ S,
                                      const float* __restrict__ x, float* __restrict__ y, int N, int K, int T) { PDL_ENTER();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int n = blockIdx.x * WARPS + warp;
    if (n >= N) return;
    float acc[MAXT] = {0.f};
    const uint4* row = reinterpret_cast<const uint4*>(W + (size_t)n * (K / 2));
    const unsigned char* srow = S + (size_t)n * (K / 32);
    for (int c = lane; c < K / 32; c += 32) {
        float w[32];
        mxfp4_chunk(__ldg(row + c), __ldg(srow + c), w);
        fma32(acc, w, x, K, c * 32, T);
    }
#pragma unroll
    for (int t = 0; t < MAXT; t++) {
        if (t < T) {
            float s = warp_sum(acc[t]);
            if (lane == 0) y[(size_t)t * N + n] = s;
        }
    }
}

// MoE decode, phase 1: for each routed (token, slot) pair p, h[p, i] = silu(gate_e[i]·x_t) * up_e[i]·x_t.
// Pairs are grouped by expert: expert u owns pairs pair_off[u]..pair_off[u+1] (pair_tok gives the
// token); each warp streams one row of gate and up of expert experts[u] ONCE for all its tokens
// (chunks of MAXT). Grid: (ceil(I / WARPS), U).
extern "C" __global__ void moe_gate_up_mxfp4(const unsigned char* __restrict__ Wg, const unsigned char* __restrict__ Sg,
                                             const unsigned char* __restrict__ Wu, const unsigned char* __restrict__ Su,
                                             const int* __restrict__ experts, const int* __restrict__ pair_off,
                                             const int* __restrict__ pair_tok, const float* __restrict__ x,
                                             float* __restrict__ h, int H, int I) { PDL_ENTER();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int i = blockIdx.x * WARPS + warp, u = blockIdx.y;
    if (i >= I) return;
    size_t e = (size_t)experts[u];
    const uint4* g = reinterpret_cast<const uint4*>(Wg + (e * I + i) * (H / 2));
    const uint4* up = reinterpret_cast<const uint4*>(Wu + (e * I + i) * (H / 2));
    const unsigned char* sg = Sg + (e * I + i) * (H / 32);
    const unsigned char* su = Su + (e * I + i) * (H / 32);
    for (int p0 = pair_off[u]; p0 < pair_off[u + 1]; p0 += MAXT) {
        int np = min(MAXT, pair_off[u + 1] - p0);
        float ag[MAXT] = {0.f}, au[MAXT] = {0.f};
        for (int c = lane; c < H / 32; c += 32) {
            float wg[32], wu[32];
            mxfp4_chunk(__ldg(g + c), __ldg(sg + c), wg);
            mxfp4_chunk(__ldg(up + c), __ldg(su + c), wu);
#pragma unroll
            for (int t = 0; t < MAXT; t++) {
                if (t < np) {
                    const float4* xv = reinterpret_cast<const float4*>(x + (size_t)pair_tok[p0 + t] * H + c * 32);
                    float a = 0.f, b = 0.f;
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        float4 q = __ldg(xv + j);
                        a += wg[4 * j] * q.x + wg[4 * j + 1] * q.y + wg[4 * j + 2] * q.z + wg[4 * j + 3] * q.w;
                        b += wu[4 * j] * q.x + wu[4 * j + 1] * q.y + wu[4 * j + 2] * q.z + wu[4 * j + 3] * q.w;
                    }
                    ag[t] += a;
                    au[t] += b;
                }
            }
        }
#pragma unroll
        for (int t = 0; t < MAXT; t++) {
            if (t < np) {
                float a = warp_sum(ag[t]), b = warp_sum(au[t]);
                if (lane == 0) h[(size_t)(p0 + t) * I + i] = a / (1.f + __expf(-a)) * b;
            }
        }
    }
}

// MoE decode, phase 2: out[p, n] = pair_w[p] * down_e[n]·h[p]; grid (ceil(H / WARPS), U).
extern "C" __global__ void moe_down_mxfp4(const unsigned char* __restrict__ Wd, const unsigned char* __restrict__ Sd,
                                          const int* __restrict__ experts, const int* __restrict__ pair_off,
                                          const float* __restrict__ pair_w, const float* __restrict__ h,
                                          float* __restrict__ out, int H, int I) { PDL_ENTER();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int n = blockIdx.x * WARPS + warp, u = blockIdx.y;
    if (n >= H) return;
    size_t e = (size_t)experts[u];
    const uint4* d = reinterpret_cast<const uint4*>(Wd + (e * H + n) * (I / 2));
    const unsigned char* sd = Sd + (e * H + n) * (I / 32);
    for (int p0 = pair_off[u]; p0 < pair_off[u + 1]; p0 += MAXT) {
        int np = min(MAXT, pair_off[u + 1] - p0);
        float acc[MAXT] = {0.f};
        for (int c = lane; c < I / 32; c += 32) {
            float w[32];
            mxfp4_chunk(__ldg(d + c), __ldg(sd + c), w);
            fma32(acc, w, h + (size_t)p0 * I, I, c * 32, np);
        }
#pragma unroll
        for (int t = 0; t < MAXT; t++) {
            if (t < np) {
                float s = warp_sum(acc[t]);
                if (lane == 0) out[(size_t)(p0 + t) * H + n] = s * pair_w[p0 + t];
            }
        }
    }
}

// MoE decode, phase 3: y[t, n] = sum over t's pairs of out[p, n], in ascending pair order
// (pairs are grouped by ascending expert, so this is the CPU reference's expert order);
// deterministic. tok_pairs[t * topk + s] is the pair index of token t's slot s.
// Grid: (ceil(H / 256), T).
extern "C" __global__ void moe_combine(const float* __restrict__ out, const int* __restrict__ tok_pairs,
                                       float* __restrict__ y, int H, int topk) { PDL_ENTER();
    // The token's pair indices in ascending order, once per block (each thread used to find
    // them again with topk scans of tok_pairs, one dependent round trip per slot).
    __shared__ int raw[64], order[64];
    int n = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (topk <= 64 && (int)blockDim.x >= topk) {
        if ((int)threadIdx.x < topk) raw[threadIdx.x] = tok_pairs[t * topk + threadIdx.x];
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int k = 0; k < topk; k++) {
                int p = raw[k], j = k;
                for (; j > 0 && order[j - 1] > p; j--) order[j] = order[j - 1];
                order[j] = p;
            }
        }
        __syncthreads();
        if (n >= H) return;
        float s = 0.f;
        for (int k = 0; k < topk; k++) s += out[(size_t)order[k] * H + n];
        y[(size_t)t * H + n] = s;
        return;
    }
    if (n >= H) return;
    float s = 0.f;
    int last = -1;
    for (int k = 0; k < topk; k++) {
        int next = 0x7fffffff;
        for (int j = 0; j < topk; j++) {
            int p = tok_pairs[t * topk + j];
            if (p > last && p < next) next = p;
        }
        s += out[(size_t)next * H + n];
        last = next;
    }
    y[(size_t)t * H + n] = s;
}

// ---------------------------------------------------------------------------------------------
// MXFP4 GEMV, v2: each warp computes R rows for a compile-time T tokens, so the activations a
// lane loads (32 per chunk and token) serve R rows instead of one; the weights of the R rows are
// loaded before any use (R x 16 bytes in flight per lane).
template <int T, int R>
__device__ __forceinline__ void mxfp4_rows_acc(const unsigned char* __restrict__ W, const unsigned char* __restrict__ S,
                                               const float* __restrict__ x, const int xrow[T],
                                               int n0, int N, int K, float acc[R][T]) {
    int lane = threadIdx.x & 31;
    float part[R][T];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < T; t++) acc[r][t] = part[r][t] = 0.f;
    const int chunks = K / 32;
    for (int c = lane; c < chunks; c += 32) {
        uint4 q[R];
        unsigned sb[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            int n = min(n0 + r, N - 1);
            q[r] = __ldg(reinterpret_cast<const uint4*>(W + (size_t)n * (K / 2)) + c);
            sb[r] = __ldg(S + (size_t)n * chunks + c);
        }
#pragma unroll
        for (int sub = 0; sub < 4; sub++) {
            float xv[T][8];
#pragma unroll
            for (int t = 0; t < T; t++) {
                const float4* xp = reinterpret_cast<const float4*>(x + (size_t)xrow[t] * K + c * 32 + sub * 8);
                float4 a = __ldg(xp), b = __ldg(xp + 1);
                xv[t][0] = a.x; xv[t][1] = a.y; xv[t][2] = a.z; xv[t][3] = a.w;
                xv[t][4] = b.x; xv[t][5] = b.y; xv[t][6] = b.z; xv[t][7] = b.w;
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                unsigned u = sub == 0 ? q[r].x : sub == 1 ? q[r].y : sub == 2 ? q[r].z : q[r].w;
                float w[8];
                mxfp4_decode8(u, w);
#pragma unroll
                for (int t = 0; t < T; t++) {
                    float a = part[r][t];
#pragma unroll
                    for (int j = 0; j < 8; j++) a += w[j] * xv[t][j];
                    part[r][t] = a;
                }
            }
        }
        // The block scale (and the decode's 2^14) once per 32 weights.
#pragma unroll
        for (int r = 0; r < R; r++) {
            float sc = e8m0_x16384(sb[r]);
#pragma unroll
            for (int t = 0; t < T; t++) {
                acc[r][t] += part[r][t] * sc;
                part[r][t] = 0.f;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < T; t++) acc[r][t] = warp_sum(acc[r][t]);
}

template <int T, int R>
__device__ __forceinline__ void mxfp4_rows(const unsigned char* __restrict__ W, const unsigned char* __restrict__ S,
                                           const float* __restrict__ x, float* __restrict__ y,
                                           int n0, int N, int K, int T_valid) {
    int xrow[T];
#pragma unroll
    for (int t = 0; t < T; t++) xrow[t] = min(t, T_valid - 1);
    float acc[R][T];
    mxfp4_rows_acc<T, R>(W, S, x, xrow, n0, N, K, acc);
    if ((threadIdx.x & 31) == 0)
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int t = 0; t < T; t++)
                if (n0 + r < N && t < T_valid) y[(size_t)t * N + n0 + r] = acc[r][t];
}

#define GEMV_MXFP4_V2(T, R)                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) gemv_mxfp4_t##T(const unsigned char* __restrict__ W,          \
        const unsigned char* __restrict__ S, const float* __restrict__ x, float* __restrict__ y, int N, int K,      \
        int T_valid) { PDL_ENTER();                                                                                               \
        int n0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * R;                                                      \
        if (n0 >= N) return;                                                                                         \
        mxfp4_rows<T, R>(W, S, x, y, n0, N, K, T_valid);                                                            \
    }
GEMV_MXFP4_V2(1, 4)
GEMV_MXFP4_V2(2, 4)
GEMV_MXFP4_V2(4, 4)
GEMV_MXFP4_V2(8, 4)

// MoE decode v2: the same phases as above, with RM rows per warp and a compile-time token count
// per expert (1, 2, 4 or 8 pairs per pass).
#define RM 4

template <int T>
__device__ __forceinline__ void moe_gate_up_pass(const unsigned char* Wg, const unsigned char* Sg, const unsigned char* Wu,
                                                 const unsigned char* Su, const int* pair_tok, int p0, int np,
                                                 const float* x, float* h, int i0, int H, int I) {
    int xrow[T];
#pragma unroll
    for (int t = 0; t < T; t++) xrow[t] = pair_tok[p0 + min(t, np - 1)];
    float g[RM][T], u[RM][T];
    mxfp4_rows_acc<T, RM>(Wg, Sg, x, xrow, i0, I, H, g);
    mxfp4_rows_acc<T, RM>(Wu, Su, x, xrow, i0, I, H, u);
    if ((threadIdx.x & 31) == 0)
#pragma unroll
        for (int r = 0; r < RM; r++)
#pragma unroll
            for (int t = 0; t < T; t++)
                if (i0 + r < I && t < np) h[(size_t)(p0 + t) * I + i0 + r] = g[r][t] / (1.f + __expf(-g[r][t])) * u[r][t];
}

extern "C" __global__ void __launch_bounds__(256) moe_gate_up_mxfp4_v2(
    const unsigned char* __restrict__ Wg, const unsigned char* __restrict__ Sg, const unsigned char* __restrict__ Wu,
    const unsigned char* __restrict__ Su, const int* __restrict__ experts, const int* __restrict__ pair_off,
    const int* __restrict__ pair_tok, const float* __restrict__ x, float* __restrict__ h, int H, int I) { PDL_ENTER();
    int i0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * RM, u = blockIdx.y;
    if (i0 >= I) return;
    size_t e = (size_t)experts[u];
    const unsigned char* wg = Wg + e * I * (H / 2);
    const unsigned char* sg = Sg + e * I * (H / 32);
    const unsigned char* wu = Wu + e * I * (H / 2);
    const unsigned char* su = Su + e * I * (H / 32);
    for (int p0 = pair_off[u]; p0 < pair_off[u + 1]; p0 += 8) {
        int np = min(8, pair_off[u + 1] - p0);
        if (np == 1) moe_gate_up_pass<1>(wg, sg, wu, su, pair_tok, p0, np, x, h, i0, H, I);
        else if (np == 2) moe_gate_up_pass<2>(wg, sg, wu, su, pair_tok, p0, np, x, h, i0, H, I);
        else if (np <= 4) moe_gate_up_pass<4>(wg, sg, wu, su, pair_tok, p0, np, x, h, i0, H, I);
        else moe_gate_up_pass<8>(wg, sg, wu, su, pair_tok, p0, np, x, h, i0, H, I);
    }
}

template <int T>
__device__ __forceinline__ void moe_down_pass(const unsigned char* Wd, const unsigned char* Sd, const float* pair_w,
                                              int p0, int np, const float* h, float* out, int n0, int H, int I) {
    int xrow[T];
#pragma unroll
    for (int t = 0; t < T; t++) xrow[t] = p0 + min(t, np - 1);
    float acc[RM][T];
    mxfp4_rows_acc<T, RM>(Wd, Sd, h, xrow, n0, H, I, acc);
    if ((threadIdx.x & 31) == 0)
#pragma unroll
        for (int r = 0; r < RM; r++)
#pragma unroll
            for (int t = 0; t < T; t++)
                if (n0 + r < H && t < np) out[(size_t)(p0 + t) * H + n0 + r] = acc[r][t] * pair_w[p0 + t];
}

extern "C" __global__ void __launch_bounds__(256) moe_down_mxfp4_v2(
    const unsigned char* __restrict__ Wd, const unsigned char* __restrict__ Sd, const int* __restrict__ experts,
    const int* __restrict__ pair_off, const float* __restrict__ pair_w, const float* __restrict__ h,
    float* __restrict__ out, int H, int I) { PDL_ENTER();
    int n0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * RM, u = blockIdx.y;
    if (n0 >= H) return;
    size_t e = (size_t)experts[u];
    const unsigned char* wd = Wd + e * H * (I / 2);
    const unsigned char* sd = Sd + e * H * (I / 32);
    for (int p0 = pair_off[u]; p0 < pair_off[u + 1]; p0 += 8) {
        int np = min(8, pair_off[u + 1] - p0);
        if (np == 1) moe_down_pass<1>(wd, sd, pair_w, p0, np, h, out, n0, H, I);
        else if (np == 2) moe_down_pass<2>(wd, sd, pair_w, p0, np, h, out, n0, H, I);
        else if (np <= 4) moe_down_pass<4>(wd, sd, pair_w, p0, np, h, out, n0, H, I);
        else moe_down_pass<8>(wd, sd, pair_w, p0, np, h, out, n0, H, I);
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core GEMV for BF16 and FP8 weights (any T; 8*NT tokens per pass), K % 128 == 0.
// mma.sync m16n8k16 (bf16 in, f32 accumulate): A = 16 weight rows (FP8 expanded to BF16
// exactly), B = 8 tokens of x. x is f32, so it is split into hi + lo BF16 parts (split_bf16)
// and each tile takes two MMAs: products are exact and x keeps ~16 mantissa bits, which keeps
// the result within ~1e-5 of f32 arithmetic. The dot product does not care about the order of
// k, so each lane owns 16 consecutive k of a 64-k chunk (one 16-byte load per row for FP8): mma
// step s uses the lane's elements s*4..s*4+3 as the fragment's k pairs {2q,2q+1} and {2q+8,2q+9},
// for A and B alike. Block: 8 warps on the same 16 rows, splitting K in 128-wide blocks (FP8's
// scale blocks, applied per block), reduced through shared memory in a fixed order.


// p[0..n) = 0: a buffer zeroed inside a captured step by a kernel, not a memset (a memset node
// breaks the programmatic edge between the kernels around it; crates/cuda/src/alloc.rs).
extern "C" __global__ void zero_words(unsigned* __restrict__ p, unsigned long long n) { PDL_ENTER();
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x)
        p[i] = 0u;
}

// x [n] f32 -> xh = bf16(x), xl = bf16(x - xh).
extern "C" __global__ void split_bf16(const float* __restrict__ x, unsigned short* __restrict__ xh, unsigned short* __restrict__ xl, int n) { PDL_ENTER();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float v = x[i];
    split_bf16_value(v, xh[i], xl[i]);
}

// Two FP8 e4m3 (low byte = first element) -> two F16 (low half = first), exactly (one
// instruction on sm_89+; every e4m3 value is an f16 normal).
__device__ __forceinline__ unsigned fp8x2_to_f16x2(unsigned v) {
#if __CUDA_ARCH__ >= 890
    unsigned h;
    unsigned short s = (unsigned short)v;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(s));
    return h;
#else
    unsigned short lo, hi;
    float a = e4m3_to_f32(v & 0xffu), b = e4m3_to_f32((v >> 8) & 0xffu);
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(lo) : "f"(a));
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(hi) : "f"(b));
    return (unsigned)lo | ((unsigned)hi << 16);
#endif
}

__device__ __forceinline__ void mma_f16(float c[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}


// x [rows, K] f32 -> F16 hi + lo parts of x * 2^s(row), with the power of two chosen per row so
// its largest magnitude lands below 2^14 (no overflow, small rows kept in the normal range);
// inv[row] = 2^-s(row) undoes it in the GEMV's epilogue. interleave: within each aligned group of
// 8, store elements in the order 0,4,1,5,2,6,3,7 (the pairing the MXFP4 decode produces).
// One block per row. When K % 8 == 0 and K <= 8 x blockDim each thread keeps its 8 elements in
// registers between the max and the split and stores 16 bytes at a time (the element-wise loop
// took ~8 us for one row of 4096 on the H100, as long as a layer's attention projections).
__device__ __forceinline__ void split_pair(float v, unsigned short& h, unsigned short& l) {
    h = f32_to_f16_rn(v);
    l = f32_to_f16_rn(v - f16_to_f32(h));
}

// The largest of every thread's m over the block (every thread gets it; `sh` holds 32 floats).
__device__ __forceinline__ float block_max(float m, float* sh) {
    __shared__ float row_max;
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        m = threadIdx.x < (blockDim.x + 31) / 32 ? sh[threadIdx.x] : 0.f;
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (threadIdx.x == 0) row_max = m;
    }
    __syncthreads();
    return row_max;
}

// The power of two a row of largest magnitude m is scaled by before its F16 split (m x s < 2^14;
// 0 or non-finite m: no scaling), and its inverse, which thread 0 stores at *inv.
__device__ __forceinline__ float split_scale(float m, float* inv) {
    int ex = (m > 0.f && m < __int_as_float(0x7f800000u)) ? (int)((__float_as_uint(m) >> 23) & 0xffu) - 126 : 0;
    int sh_ = min(max(14 - ex, -100), 100);
    if (threadIdx.x == 0) *inv = __int_as_float((unsigned)(127 - sh_) << 23);
    return __int_as_float((unsigned)(sh_ + 127) << 23);
}

// 8 values x s split into F16 hi + lo, stored 16 bytes each at xh and xl (`interleave`: in the
// order 0,4,1,5,2,6,3,7).
__device__ __forceinline__ void split_store8(const float v[8], float s, bool interleave, unsigned short* xh, unsigned short* xl) {
    unsigned short h[8], l[8];
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int d = interleave ? (i < 4 ? 2 * i : 2 * (i - 4) + 1) : i;
        split_pair(v[i] * s, h[d], l[d]);
    }
    *reinterpret_cast<uint4*>(xh) = make_uint4(h[0] | (unsigned)h[1] << 16, h[2] | (unsigned)h[3] << 16, h[4] | (unsigned)h[5] << 16, h[6] | (unsigned)h[7] << 16);
    *reinterpret_cast<uint4*>(xl) = make_uint4(l[0] | (unsigned)l[1] << 16, l[2] | (unsigned)l[3] << 16, l[4] | (unsigned)l[5] << 16, l[6] | (unsigned)l[7] << 16);
}

extern "C" __global__ void __launch_bounds__(1024) split_f16(const float* __restrict__ x, unsigned short* __restrict__ xh, unsigned short* __restrict__ xl,
                                     float* __restrict__ inv, int K, int interleave) { PDL_ENTER();
    __shared__ float sh[32];
    size_t r = blockIdx.x;
    const float* xr = x + r * K;
    bool vec = (K & 7) == 0 && K <= 8 * (int)blockDim.x;
    float v[8];
    float m = 0.f;
    if (vec) {
        int c = threadIdx.x * 8;
        if (c < K) {
            float4 a = *reinterpret_cast<const float4*>(xr + c), b = *reinterpret_cast<const float4*>(xr + c + 4);
            v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
#pragma unroll
            for (int i = 0; i < 8; i++) m = fmaxf(m, fabsf(v[i]));
        }
    } else {
        for (int k = threadIdx.x; k < K; k += blockDim.x) m = fmaxf(m, fabsf(xr[k]));
    }
    float s = split_scale(block_max(m, sh), inv + r);
    if (vec) {
        int c = threadIdx.x * 8;
        if (c < K) split_store8(v, s, interleave, xh + r * K + c, xl + r * K + c);
        return;
    }
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        int j = k & 7, d = interleave ? (k & ~7) + (j < 4 ? 2 * j : 2 * (j - 4) + 1) : k;
        split_pair(xr[k] * s, xh[r * K + d], xl[r * K + d]);
    }
}

// A dense MLP's a = silu(gate) * up, F16-split for its FP8 down projection: silu_mul's values
// (silu_mul_value) split as split_f16 splits them (no interleave), so the bits of the two
// launches in one. Row r's gate is y[r * ld, + I) and its up the I values after it (the stacked
// gate_up GEMV's output, ld = 2 I). One block per row, each thread holding up to
// SILU_SPLIT_GROUPS groups of 8 values in registers between the max and the split (split_f16
// holds one, so at Flash's I = 16384 it ran its element-wise loop: ~6 us for one row).
// I % 8 == 0 and I <= 8 x SILU_SPLIT_GROUPS x blockDim (the host checks).
#define SILU_SPLIT_GROUPS 4
extern "C" __global__ void __launch_bounds__(1024) silu_mul_split_f16(const float* __restrict__ y, int ld, int I, unsigned short* __restrict__ xh,
                                                                  unsigned short* __restrict__ xl, float* __restrict__ inv) { PDL_ENTER();
    __shared__ float sh[32];
    size_t r = blockIdx.x;
    const float* gr = y + r * ld;
    float v[SILU_SPLIT_GROUPS][8];
    float m = 0.f;
#pragma unroll
    for (int j = 0; j < SILU_SPLIT_GROUPS; j++) {
        int c = (threadIdx.x + j * blockDim.x) * 8;
        if (c < I) {
            float4 g0 = *reinterpret_cast<const float4*>(gr + c), g1 = *reinterpret_cast<const float4*>(gr + c + 4);
            float4 u0 = *reinterpret_cast<const float4*>(gr + I + c), u1 = *reinterpret_cast<const float4*>(gr + I + c + 4);
            float g[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w}, u[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
#pragma unroll
            for (int i = 0; i < 8; i++) {
                v[j][i] = silu_mul_value(g[i], u[i]);
                m = fmaxf(m, fabsf(v[j][i]));
            }
        }
    }
    float s = split_scale(block_max(m, sh), inv + r);
#pragma unroll
    for (int j = 0; j < SILU_SPLIT_GROUPS; j++) {
        int c = (threadIdx.x + j * blockDim.x) * 8;
        if (c < I) split_store8(v[j], s, false, xh + r * I + c, xl + r * I + c);
    }
}

// Two FP8 e4m3 (low byte = first element) -> two BF16 (low half = first), exactly.
__device__ __forceinline__ unsigned fp8x2_to_bf16x2(unsigned v) {
#if __CUDA_ARCH__ >= 890
    unsigned h;
    unsigned short s = (unsigned short)v;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(s));
    // f16 normal -> bf16: exponent rebias (+112), mantissa >> 3 (e4m3 values are f16 normals).
    unsigned t = (h >> 3) & 0x0fff0fffu;
    unsigned add = ((t & 0xffffu) ? 0x3800u : 0u) | ((t >> 16) ? 0x38000000u : 0u);
    return (t + add) | (h & 0x80008000u);
#else
    unsigned lo = __float_as_uint(e4m3_to_f32(v & 0xffu)) >> 16, hi = __float_as_uint(e4m3_to_f32((v >> 8) & 0xffu)) >> 16;
    return lo | (hi << 16);
#endif
}

__device__ __forceinline__ void mma_bf16(float c[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// A fragments of one 16-row tile for a lane's 16 consecutive k of a 64-k chunk: w0 / w1 hold
// rows g and g + 8 (FP8: 16 bytes each in v[0]; BF16: 32 bytes each in v[0..1]), decoded into
// the MMA's F16 (FP8) or BF16 registers a0 (row g) and a1 (row g + 8), 8 each.
template <bool FP8>
__device__ __forceinline__ void mma_a_frags(const uint4 w0[2], const uint4 w1[2], unsigned a0[8], unsigned a1[8]) {
    if (FP8) {
        unsigned u0[4] = {w0[0].x, w0[0].y, w0[0].z, w0[0].w}, u1[4] = {w1[0].x, w1[0].y, w1[0].z, w1[0].w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            a0[2 * i] = fp8x2_to_f16x2(u0[i] & 0xffffu);
            a0[2 * i + 1] = fp8x2_to_f16x2(u0[i] >> 16);
            a1[2 * i] = fp8x2_to_f16x2(u1[i] & 0xffffu);
            a1[2 * i + 1] = fp8x2_to_f16x2(u1[i] >> 16);
        }
    } else {
        a0[0] = w0[0].x; a0[1] = w0[0].y; a0[2] = w0[0].z; a0[3] = w0[0].w; a0[4] = w0[1].x; a0[5] = w0[1].y; a0[6] = w0[1].z; a0[7] = w0[1].w;
        a1[0] = w1[0].x; a1[1] = w1[0].y; a1[2] = w1[0].z; a1[3] = w1[0].w; a1[4] = w1[1].x; a1[5] = w1[1].y; a1[6] = w1[1].z; a1[7] = w1[1].w;
    }
}

// One tile's MMAs over a lane's 16 k: for each 4-k step, the hi part then the lo part of the
// activations (bh, bl: 16 halves of the lane's token) into C. Every tensor-core GEMV and GEMM
// path runs this order, so they give the same bits.
template <bool FP8>
__device__ __forceinline__ void mma_k16(float C[4], const unsigned a0[8], const unsigned a1[8], const unsigned bh[8], const unsigned bl[8]) {
#pragma unroll
    for (int s = 0; s < 4; s++) {
        if (FP8) {  // F16 weights and F16 hi/lo activations
            mma_f16(C, a0[2 * s], a1[2 * s], a0[2 * s + 1], a1[2 * s + 1], bh[2 * s], bh[2 * s + 1]);
            mma_f16(C, a0[2 * s], a1[2 * s], a0[2 * s + 1], a1[2 * s + 1], bl[2 * s], bl[2 * s + 1]);
        } else {
            mma_bf16(C, a0[2 * s], a1[2 * s], a0[2 * s + 1], a1[2 * s + 1], bh[2 * s], bh[2 * s + 1]);
            mma_bf16(C, a0[2 * s], a1[2 * s], a0[2 * s + 1], a1[2 * s + 1], bl[2 * s], bl[2 * s + 1]);
        }
    }
}

// Output row n, token t of a tensor-core GEMV or GEMM, times the activations' inverse scale:
// rows [0, N0) go to y, [N0, N0 + N1) to y1, the rest to y2 (a fused q/k/v projection writes
// q, k and v as separate [T, rows] arrays).
__device__ __forceinline__ void store_out(float v, const float* __restrict__ xinv, float* __restrict__ y, float* __restrict__ y1,
                                          float* __restrict__ y2, int N0, int N1, int N, int n, int t) {
    if (xinv) v *= xinv[t];
    if (n < N0) y[(size_t)t * N0 + n] = v;
    else if (n < N0 + N1) y1[(size_t)t * N1 + (n - N0)] = v;
    else y2[(size_t)t * (N - N0 - N1) + (n - N0 - N1)] = v;
}

// A weight load of gemv_mma: read once, so how it asks the caches matters. H = 1: not kept in
// L1 (L1::no_allocate); 2: L2 asked for the 256 bytes around it (L2::256B: each instruction of
// a warp reads part of 8 rows' lines, the rest of them a moment later); 3: both; 0: __ldg.
// One-wave kernels (PIPE) read fastest with 3, many-wave ones (the lm_head) with 2: see
// benches/results/2026-11-27-gemv-load-hints.md. GEMV_LD_PIPE / GEMV_LD_WAVES override them.
#ifndef GEMV_LD_PIPE
#define GEMV_LD_PIPE 3
#endif
#ifndef GEMV_LD_WAVES
#define GEMV_LD_WAVES 2
#endif
template <int H>
__device__ __forceinline__ uint4 ld_weights(const uint4* p) {
    uint4 v;
    if (H == 1)
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    else if (H == 2)
        asm("ld.global.nc.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    else if (H == 3)
        asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
            : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
            : "l"(p));
    else
        v = __ldg(p);
    return v;
}

// 16 halves (32 bytes) as 8 B registers.
__device__ __forceinline__ void b_regs(uint4 x0, uint4 x1, unsigned b[8]) {
    b[0] = x0.x; b[1] = x0.y; b[2] = x0.z; b[3] = x0.w; b[4] = x1.x; b[5] = x1.y; b[6] = x1.z; b[7] = x1.w;
}

#define MMA_WARPS 8

// Logit v of row n as a key whose unsigned order is argmax_rows' choice: the larger value, then
// the lower row (the low word holds ~n); -0 as +0 (they compare equal). -inf and NaN never win
// there (its scan takes only v > the best so far, from -inf), so they get 0, "none"
// (argmax_unpack: id 0, as argmax_final gives a row without a finite or +inf logit).
__device__ __forceinline__ unsigned long long argmax_key(float v, int n) {
    if (!(v > __int_as_float(0xff800000u))) return 0ull;
    unsigned u = v == 0.f ? 0u : __float_as_uint(v);
    unsigned o = (u >> 31) ? ~u : (u | 0x80000000u);
    return ((unsigned long long)o << 32) | (unsigned)~(unsigned)n;
}

// The weights are in the tensor-core tile layout (crates/cuda/src/tc_tiles.rs): each warp load
// of a lane's fragment pieces reads 512 contiguous bytes. Row-major, each read 8 rows x 64 bytes
// (FP8) or 8 rows x 4 pieces of 16 bytes 32 apart (BF16), the rows K apart: on an H200 the
// GEMVs alone read 3-11 points of copy bandwidth less, the batch-8 step's q/k/v took 24.0 us a
// launch against 20.7 and its o_proj 21.6 against 18.0
// (benches/results/2026-11-29-h200-tc-tile-layout.md). The lanes' registers are what they were
// row-major, so the bits are too.
//
// Measurement builds only (PEREGRINE_KERNEL_DEFINES, outputs wrong): -DGEMV_NO_MATH keeps the
// loads and drops the decode and the MMAs of the FP8 kernels, the pipelined one-token q/k/v's
// (XSH) included; BF16 keeps its math (without it, half of its loads were dead code:
// benches/results/2026-11-28-h200-moe-handoff-bounds.md;
// benches/results/2026-11-24-gemv-order-attention-combine.md).
//
// R row tiles of 16 per block: each activation fragment a lane loads serves R tiles. At 16-64
// tokens one tile per block read the whole [T, K] hi + lo activations per 16 rows (1 MB per
// tile at 64 tokens), from L2, which bounded those GEMVs; every row's sum is the same as with
// R = 1 (each warp still takes K blocks w, w + 8, ... and the warps reduce in order).
//
// READY (gemv_mma_fp8_t1_ready: a fused q/k/v projection feeding attention_v2_kv_ready, R = 1):
// the row tiles of k and v (rows [N0, N)) run first, then q's in head order, and each block
// counts its finished tile into ready[]: q rows of head h into ready[h], k and v rows of KV head
// j into ready[heads + j] (hd-row q and k heads, vd-row v heads; the host checks that no tile
// straddles two). The attention blocks of a head start as soon as its counts are complete,
// while the projection still streams the later heads' rows (no launch boundary between them).
//
// PIPE (gemv_mma_{bf16,fp8}_t1_pipe, R = 1): each warp loads its next K block's weights (and
// activations, and FP8 scale) while it computes the current one, so a warp keeps up to two K
// blocks (8 KB BF16, 4 KB FP8) in flight instead of one. More registers (88 BF16, 72 FP8 on the
// H100), so fewer blocks per SM: the host runs it only where the grid fits one wave of it (the
// o_proj at decode: 256 tiles, where the 64-register kernel also had only 2 of its 4 possible
// blocks per SM and so half the bytes in flight of a GEMV with a full grid; likewise a dense
// MLP's FP8 down, 4096 rows; the decode q/k/v projection in blocks of 4 warps, whose "next K
// block" crosses from one of a warp's K classes to the next). Same loads, same arithmetic in the
// same order: the same bits.
//
// KEEP (one tile, one token group): the values of the block's 16 rows also go to keep[16 x 8]
// (shared memory; row r of token t at keep[8 r + t]), as stored, for the caller's epilogue
// (gemv_mma_bf16_t1_pipe_route).
//
// ARGMAX (one tile, one token: gemv_mma_bf16_t1_argmax, the lm_head of a batch-1 step): each
// warp of the epilogue folds its rows' values as argmax_key's (value, index) key into one of
// `slots` keys (amax[s * stride], a line each) by a 64-bit atomic max, so argmax_unpack alone
// follows the lm_head (argmax_rows read the logits back from L2 and argmax_final merged its
// slices: ~7 us at the end of a batch-1 step). The slots spread the ~38k atomics of Flash's
// lm_head over 64 L2 lines instead of one word (not measured apart: what made the kernel slow in
// some processes was its schedule, see gemv_mma_bf16_t1_argmax).
template <int NT, int R, bool FP8, bool READY = false, bool PIPE = false, int CW = 1, bool XSH = false, bool KEEP = false,
          bool ARGMAX = false>
__device__ __forceinline__ void gemv_mma(const unsigned char* __restrict__ W, const float* __restrict__ S,
                                         const unsigned short* __restrict__ XH, const unsigned short* __restrict__ XL,
                                         const float* __restrict__ xinv, float* __restrict__ y, float* __restrict__ y1,
                                         float* __restrict__ y2, int N0, int N1, int N, int K, int T,
                                         unsigned* __restrict__ ready = nullptr, int heads = 0, int hd = 0, int vd = 0,
                                         float* keep = nullptr, unsigned long long* amax = nullptr, int slots = 1, int stride = 0) {
    static_assert(!KEEP || (R == 1 && !READY), "the kept rows are one tile's");
    static_assert(!ARGMAX || (R == 1 && NT == 1 && !READY), "the fused argmax is one token's, over one tile a block");
    static_assert(!READY || R == 1, "the ready counts are per 16-row tile");
    static_assert(!PIPE || R == 1, "the pipelined GEMV is a one-tile kernel");
    static_assert(CW == 1 || (R == 1 && NT == 1 && MMA_WARPS % CW == 0), "K classes per warp: one-tile, one-token-group kernels");
    __shared__ float red[MMA_WARPS][16 * NT * 8];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    // R > 1: the blocks of one row group over its token groups are adjacent in launch order
    // (grid.x), so they run together and all but the first find the weights in L2. R = 1 (the
    // decode path up to 8 tokens) keeps token groups on grid.y and no division.
    int nb, t0;
    if (READY) {
        int kv_tiles = (N - N0) / 16, b = blockIdx.x;
        nb = (b < kv_tiles ? N0 / 16 + b : b - kv_tiles) * 16;
        t0 = blockIdx.y * NT * 8;
    } else if (R == 1) {
        nb = blockIdx.x * 16;
        t0 = blockIdx.y * NT * 8;
    } else {
        const int ny = (T + NT * 8 - 1) / (NT * 8);
        nb = (blockIdx.x / ny) * 16 * R;
        t0 = (blockIdx.x % ny) * NT * 8;
    }
    constexpr int LDH = PIPE ? GEMV_LD_PIPE : GEMV_LD_WAVES;  // how the weights are loaded (ld_weights)
    // Each row tile's first bytes for this lane in the tensor-core tile layout (tc_tiles.rs):
    // per 16-row tile, K x 16 x ESIZE bytes, each 64-k chunk CH = 16 x 64 x ESIZE of them in
    // which the lane's pieces of rows g and g + 8 are warp loads i = 0, 1, .. at i x 512 + 16
    // lane. Tiles past N (an R-tile kernel's last row group) read the last one: loaded, never
    // stored.
    constexpr int CH = FP8 ? 1024 : 2048;
    const unsigned char* tile0[R];
#pragma unroll
    for (int rt = 0; rt < R; rt++) tile0[rt] = W + (size_t)min(nb / 16 + rt, (N + 15) / 16 - 1) * K * 16 * (FP8 ? 1 : 2) + lane * 16;
    int KB = K / 128;
    float acc[R][NT][4];
#pragma unroll
    for (int rt = 0; rt < R; rt++)
#pragma unroll
        for (int tt = 0; tt < NT; tt++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[rt][tt][i] = 0.f;
    // BF16 rows g and g + 8 of row tile rt at columns k .. k + 15 (k: the chunk's + 16 q): warp
    // loads 0, 1 row g's two 16-byte pieces, 2, 3 row g + 8's.
    auto bf16_rows = [&](int rt, int k, uint4 w0[2], uint4 w1[2]) {
        const unsigned char* tb = tile0[rt] + (size_t)(k >> 6) * CH;
        w0[0] = ld_weights<LDH>(reinterpret_cast<const uint4*>(tb)); w0[1] = ld_weights<LDH>(reinterpret_cast<const uint4*>(tb + 512));
        w1[0] = ld_weights<LDH>(reinterpret_cast<const uint4*>(tb + 1024)); w1[1] = ld_weights<LDH>(reinterpret_cast<const uint4*>(tb + 1536));
    };
    // FP8 rows g and g + 8 of row tile rt at columns k .. k + 15 (in [0] of each): warp loads 0, 1.
    auto fp8_rows = [&](int rt, int k, uint4 w0[2], uint4 w1[2]) {
        const unsigned char* tb = tile0[rt] + (size_t)(k >> 6) * CH;
        w0[0] = ld_weights<LDH>(reinterpret_cast<const uint4*>(tb));
        w1[0] = ld_weights<LDH>(reinterpret_cast<const uint4*>(tb + 512));
    };
    auto tile_rows = [&](int rt, int k, uint4 w0[2], uint4 w1[2]) {
        if (FP8) fp8_rows(rt, k, w0, w1);
        else bf16_rows(rt, k, w0, w1);
    };
    // PIPE: a K block's weights of both 64-k chunks and its activations (hi, lo; NT == 1), loaded
    // one K block ahead: each chunk's slots are refilled with the next K block's once its MMAs
    // have been issued. The activations come from L2, and waiting for them inside the iteration
    // put an L2 round trip on every K block's path (its FP8 scale's, below, was another).
    static_assert(!PIPE || NT == 1, "the pipelined GEMV is a one-token-group kernel");
    static_assert(!XSH || (PIPE && FP8), "shuffled activations are the pipelined FP8 GEMV's");
    uint4 pw0[2][2], pw1[2][2], px[2][4];
    // XSH (one token, T == 1: the host checks): a K block's activations, hi and lo of 128
    // halves, are 512 bytes, 16 a lane (lane l: piece l & 15 of hi, or of lo from lane 16), so
    // a lane holds this K block's and the next's in 8 registers instead of PIPE's 32, and the
    // lanes of token 0 (g == 0) gather their B fragments by shuffles.
    uint4 xcur = make_uint4(0u, 0u, 0u, 0u), xnext = xcur;
    auto x_piece = [&](int kb) {
        const unsigned short* src = (lane >> 4 ? XL : XH) + (size_t)t0 * K + kb * 128 + (lane & 15) * 8;
        return __ldg(reinterpret_cast<const uint4*>(src));
    };
    // Token t0 + g's activations (hi, then lo: 16 halves each) at columns k .. k + 15, zero past T.
    auto x_ahead = [&](int k, uint4 xv[4]) {
        if (t0 + g < T) {
            const uint4* ph = reinterpret_cast<const uint4*>(XH + (size_t)(t0 + g) * K + k);
            const uint4* pl = reinterpret_cast<const uint4*>(XL + (size_t)(t0 + g) * K + k);
            xv[0] = __ldg(ph); xv[1] = __ldg(ph + 1); xv[2] = __ldg(pl); xv[3] = __ldg(pl + 1);
        } else {
#pragma unroll
            for (int i = 0; i < 4; i++) xv[i] = make_uint4(0u, 0u, 0u, 0u);
        }
    };
    if (PIPE && w < KB) {
#pragma unroll
        for (int c = 0; c < 2; c++) {
            tile_rows(0, w * 128 + c * 64 + q * 16, pw0[c], pw1[c]);
            if (!XSH) x_ahead(w * 128 + c * 64 + q * 16, px[c]);
        }
        if (XSH) xnext = x_piece(w);
    }
    // FP8: the scale of each K block is asked for one K block ahead, with the weights (an R-tile
    // block's rows lie inside one 128-row scale block: 16 R divides 128). Loaded where it is
    // used, after the block's MMAs, it put an L2 round trip on every K block's path.
    const float* srow = FP8 ? S + (size_t)(nb / 128) * KB : nullptr;
    float psc = FP8 && w < KB ? srow[w] : 0.f;
    // The K class this warp sums: K blocks cls, cls + MMA_WARPS, ... With CW > 1 (blocks of
    // MMA_WARPS / CW warps) a warp sums classes w, w + MMA_WARPS / CW, ... one after the other,
    // each into its own slot of red, so the block adds the same MMA_WARPS sums in the same order.
    // C fragment: c0 (row g, token 2q), c1 (g, 2q+1), c2 (g+8, 2q), c3 (g+8, 2q+1) of tile tt,
    // into red[slot] (which holds one row tile's sums per K class).
    auto to_red = [&](int slot, const float (&a)[NT][4]) {
#pragma unroll
        for (int tt = 0; tt < NT; tt++)
#pragma unroll
            for (int i = 0; i < 4; i++) red[slot][(g + (i >> 1) * 8) * (NT * 8) + tt * 8 + 2 * q + (i & 1)] = a[tt][i];
    };
    int cls = w;
    for (int ci = 0; ci < CW; ci++) {
        if (ci > 0) {
            to_red(cls, acc[0]);
#pragma unroll
            for (int tt = 0; tt < NT; tt++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[0][tt][i] = 0.f;
            cls += MMA_WARPS / CW;
        }
        for (int kb = cls; kb < KB; kb += MMA_WARPS) {
            // The K block after this one: the class's next, else the next class's first.
            const int nkb = kb + MMA_WARPS < KB ? kb + MMA_WARPS : (ci + 1 < CW ? cls + MMA_WARPS / CW : KB);
            const bool ahead = PIPE && nkb < KB;
            if (XSH) {
                xcur = xnext;
                if (ahead) xnext = x_piece(nkb);
            }
            const float nsc = FP8 && nkb < KB ? srow[nkb] : 0.f;
            float part[R][NT][4];
#pragma unroll
            for (int rt = 0; rt < R; rt++)
#pragma unroll
                for (int tt = 0; tt < NT; tt++)
#pragma unroll
                    for (int i = 0; i < 4; i++) part[rt][tt][i] = 0.f;
#pragma unroll
            for (int c = 0; c < 2; c++) {
                if (XSH) {
                    // mma_a_frags and mma_k16 step by step (the same MMAs in the same order), so
                    // only one 4-k step's fragments are live. B words 2s, 2s + 1 of this lane:
                    // words (2s) & 3, (2s + 1) & 3 of pieces sa + (2s >> 2) (hi), + 16 (lo).
                    const int sa = c * 8 + q * 2;
                    const unsigned xv[4] = {xcur.x, xcur.y, xcur.z, xcur.w};
                    const unsigned u0[4] = {pw0[c][0].x, pw0[c][0].y, pw0[c][0].z, pw0[c][0].w};
                    const unsigned u1[4] = {pw1[c][0].x, pw1[c][0].y, pw1[c][0].z, pw1[c][0].w};
#pragma unroll
                    for (int st = 0; st < 4; st++) {
                        const int wa = 2 * st, wb = 2 * st + 1;
                        unsigned h0 = __shfl_sync(0xffffffffu, xv[wa & 3], sa + (wa >> 2));
                        unsigned h1 = __shfl_sync(0xffffffffu, xv[wb & 3], sa + (wb >> 2));
                        unsigned l0 = __shfl_sync(0xffffffffu, xv[wa & 3], sa + 16 + (wa >> 2));
                        unsigned l1 = __shfl_sync(0xffffffffu, xv[wb & 3], sa + 16 + (wb >> 2));
                        if (g != 0) h0 = h1 = l0 = l1 = 0u;
#ifdef GEMV_NO_MATH
                        part[0][0][0] += __uint_as_float((u0[st] ^ u1[st] ^ h0 ^ h1 ^ l0 ^ l1) & 0x3fffffffu);
                        continue;
#endif
                        const unsigned a00 = fp8x2_to_f16x2(u0[st] & 0xffffu), a01 = fp8x2_to_f16x2(u0[st] >> 16);
                        const unsigned a10 = fp8x2_to_f16x2(u1[st] & 0xffffu), a11 = fp8x2_to_f16x2(u1[st] >> 16);
                        mma_f16(part[0][0], a00, a10, a01, a11, h0, h1);
                        mma_f16(part[0][0], a00, a10, a01, a11, l0, l1);
                    }
                    if (ahead) tile_rows(0, nkb * 128 + c * 64 + q * 16, pw0[c], pw1[c]);
                    continue;
                }
                int k = kb * 128 + c * 64 + q * 16;
                unsigned a0[R][8], a1[R][8];
#pragma unroll
                for (int rt = 0; rt < R; rt++) {
                    uint4 w0[2], w1[2];
                    if (PIPE) {
                        w0[0] = pw0[c][0]; w0[1] = pw0[c][1]; w1[0] = pw1[c][0]; w1[1] = pw1[c][1];
                    } else if (FP8) {
                        fp8_rows(rt, k, w0, w1);
                    } else {
                        bf16_rows(rt, k, w0, w1);
                    }
#ifdef GEMV_NO_MATH
                    if (!FP8) {  // (BF16 keeps its math: dropping it would drop half its loads)
                        mma_a_frags<FP8>(w0, w1, a0[rt], a1[rt]);
                        continue;
                    }
                    a0[rt][0] = w0[0].x; a0[rt][1] = w0[0].y; a0[rt][2] = w0[0].z; a0[rt][3] = w0[0].w;
                    a1[rt][0] = w1[0].x; a1[rt][1] = w1[0].y; a1[rt][2] = w1[0].z; a1[rt][3] = w1[0].w;
#pragma unroll
                    for (int i = 4; i < 8; i++) a0[rt][i] = a1[rt][i] = 0u;
#else
                    mma_a_frags<FP8>(w0, w1, a0[rt], a1[rt]);
#endif
                }
#pragma unroll
                for (int tt = 0; tt < NT; tt++) {
                    int t = t0 + tt * 8 + g;
                    unsigned bh[8], bl[8];
                    if (PIPE) {
                        b_regs(px[c][0], px[c][1], bh);
                        b_regs(px[c][2], px[c][3], bl);
                    } else if (t < T) {
                        const uint4* ph = reinterpret_cast<const uint4*>(XH + (size_t)t * K + k);
                        const uint4* pl = reinterpret_cast<const uint4*>(XL + (size_t)t * K + k);
                        b_regs(__ldg(ph), __ldg(ph + 1), bh);
                        b_regs(__ldg(pl), __ldg(pl + 1), bl);
                    } else {
#pragma unroll
                        for (int i = 0; i < 8; i++) { bh[i] = 0u; bl[i] = 0u; }
                    }
#ifdef GEMV_NO_MATH
                    // Measurement only (wrong results): the loads kept alive, no decode, no MMA.
                    if (!FP8) {
#pragma unroll
                        for (int rt = 0; rt < R; rt++) mma_k16<FP8>(acc[rt][tt], a0[rt], a1[rt], bh, bl);
                        continue;
                    }
#pragma unroll
                    for (int rt = 0; rt < R; rt++) {
                        unsigned xx = bh[0] ^ bl[0];
#pragma unroll
                        for (int i = 0; i < 8; i++) xx ^= a0[rt][i] ^ a1[rt][i];
                        part[rt][tt][0] += __uint_as_float(xx & 0x3fffffffu);
                    }
#else
#pragma unroll
                    for (int rt = 0; rt < R; rt++) mma_k16<FP8>(FP8 ? part[rt][tt] : acc[rt][tt], a0[rt], a1[rt], bh, bl);
#endif
                }
                if (ahead) {  // this chunk's slots, for the next K block
                    tile_rows(0, nkb * 128 + c * 64 + q * 16, pw0[c], pw1[c]);
                    if (!XSH) x_ahead(nkb * 128 + c * 64 + q * 16, px[c]);
                }
            }
            if (FP8) {
#pragma unroll
                for (int rt = 0; rt < R; rt++) {
#pragma unroll
                    for (int tt = 0; tt < NT; tt++)
#pragma unroll
                        for (int i = 0; i < 4; i++) acc[rt][tt][i] += psc * part[rt][tt][i];
                }
            }
            psc = nsc;
        }
    }
    // One row tile at a time through the shared buffer (it holds one tile's K classes).
#pragma unroll
    for (int rt = 0; rt < R; rt++) {
        if (rt > 0) __syncthreads();  // the previous tile's sums have been read
        to_red(cls, acc[rt]);
        __syncthreads();
        unsigned long long key = 0ull;  // ARGMAX: this thread's (value, row) key, 0 for none
        for (int e = threadIdx.x; e < 16 * NT * 8; e += blockDim.x) {
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < MMA_WARPS; i++) s += red[i][e];
            int n = nb + rt * 16 + e / (NT * 8), t = t0 + e % (NT * 8);
            if (n < N && t < T) store_out(s, xinv, y, y1, y2, N0, N1, N, n, t);
            if (KEEP && n < N && t < T) keep[(n - nb) * 8 + (t - t0)] = xinv ? s * xinv[t] : s;
            if (ARGMAX && n < N && t == 0) key = argmax_key(xinv ? s * xinv[t] : s, n);
        }
        if (ARGMAX && w < 16 * 8 / 32) {  // the warps holding the tile's 128 entries, whole
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                unsigned long long other = __shfl_xor_sync(0xffffffffu, key, o);
                key = other > key ? other : key;
            }
            if (lane == 0 && key != 0ull) atomicMax(amax + (size_t)((blockIdx.x * (16 * 8 / 32) + w) % slots) * stride, key);
        }
    }
    if (READY)  // the block's stores, then the tile's count (the attention acquires it)
        block_release_add(ready + (nb < N0 ? nb / hd : heads + (nb < N0 + N1 ? (nb - N0) / hd : (nb - N0 - N1) / vd)));
}

// The tensor-core GEMV's arithmetic as a GEMM, for many tokens (prefill): a block of 8 warps
// takes 128 rows x 64 tokens, each warp 32 rows x 32 tokens (2 x 4 MMA tiles), with the
// weights and the activations' hi + lo parts of each 64-k chunk staged in shared memory by
// cp.async, GEMMT_STAGES chunks in flight. gemv_mma split K over a block's 8 warps, so every
// block read all of its tokens' activations (4 bytes per element) per 16-64 rows from L2, which
// bounded it. The bits are gemv_mma's: its warp w summed K blocks w, w + 8, ... (each FP8
// block's MMAs into a zeroed part, then acc += scale x part) and the block added the 8 warp sums
// in order; here every warp visits the K blocks in that order (class w = 0..7, then its
// blocks), keeps one class sum at a time and adds it to the total, and every MMA sees the same
// fragments in the same order.
#define GEMMT_ROWS 128
#define GEMMT_TOKENS 64
#define GEMMT_STAGES 2
#define GEMMT_XROW 144  // bytes per token per 64-k chunk in shared memory (128 + 16: no bank conflicts)
template <bool FP8>
struct GemmTile {
    static constexpr int WROW = FP8 ? 64 : 144;  // a stage's weight bytes per row (the tiles take 64 / 128)
    static constexpr int WUNITS = FP8 ? 4 : 8;   // 16-byte units of a row's chunk
    static constexpr int W_BYTES = GEMMT_ROWS * WROW;
    static constexpr int X_BYTES = GEMMT_TOKENS * GEMMT_XROW;
    static constexpr int STAGE = W_BYTES + 2 * X_BYTES;
};
template <bool FP8, int STAGES = GEMMT_STAGES>
__device__ __forceinline__ void gemm_mma(const unsigned char* __restrict__ W, const float* __restrict__ S,
                                         const unsigned short* __restrict__ XH, const unsigned short* __restrict__ XL,
                                         const float* __restrict__ xinv, float* __restrict__ y, float* __restrict__ y1,
                                         float* __restrict__ y2, int N0, int N1, int N, int K, int T) {
    using G = GemmTile<FP8>;
    extern __shared__ __align__(128) uint4 dsm[];  // rings on whole lines (moe.cu: MOE_DSM_ALIGN)
    unsigned char* smem = reinterpret_cast<unsigned char*>(dsm);
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, q = lane & 3;
    const int wm = w & 3, wn = w >> 2;  // the warp's 32 rows and 32 tokens of the block's 128 x 64
    const int nb = blockIdx.x * GEMMT_ROWS, t0 = blockIdx.y * GEMMT_TOKENS;
    const int KB = K / 128, NC = 2 * KB;
    // Each thread's 16-byte units of a stage, at the first chunk (a chunk adds its offset): the
    // weights' 128 rows, then the activations' 64 tokens (clamped to T - 1), hi and lo. Offsets
    // from the block's bases, computed once: per chunk the address arithmetic had kept the
    // integer pipe busier than the tensor pipe. The weights come as the block's 8 row tiles of
    // the chunk in the tensor-core tile layout (tc_tiles.rs: CH contiguous bytes each), copied as
    // they lie: thread tid copies unit tid % TU of tiles tid / TU + TSTEP u (tiles past N read
    // the last: loaded, never stored).
    constexpr int ESIZE = FP8 ? 1 : 2, TU = 16 * G::WUNITS, CH = 16 * TU;  // a tile chunk's units, bytes
    constexpr int NWU = GEMMT_ROWS / 16 * TU / 256, TSTEP = 256 / TU;
    static_assert(GEMMT_ROWS / 16 * CH <= G::W_BYTES, "a stage's weights hold its row tiles");
    const int tile_base = nb / 16, ntiles = (N + 15) / 16;
    const unsigned char* wbase = W + (size_t)tile_base * K * 16 * ESIZE + (tid % TU) * 16;
    const unsigned char* hbase = reinterpret_cast<const unsigned char*>(XH + (size_t)t0 * K) + (tid % 8) * 16;
    const unsigned char* lbase = reinterpret_cast<const unsigned char*>(XL + (size_t)t0 * K) + (tid % 8) * 16;
    unsigned wofs[NWU], xofs[2];
#pragma unroll
    for (int u = 0; u < NWU; u++) wofs[u] = (unsigned)(min(tile_base + tid / TU + TSTEP * u, ntiles - 1) - tile_base) * K * 16 * ESIZE;
#pragma unroll
    for (int u = 0; u < 2; u++) xofs[u] = (unsigned)(min(t0 + tid / 8 + 32 * u, T - 1) - t0) * K * 2;
    // The deep kernels (decode batches, often fewer than 64 tokens a tile) leave token rows past
    // T unloaded instead of copying token T - 1 into them: every block re-reading those same
    // lines crowded one place of L2. (Their columns' MMA results are never stored.)
    constexpr bool skip_past_t = STAGES != GEMMT_STAGES;
    bool xload[2] = {!skip_past_t || t0 + tid / 8 < T, !skip_past_t || t0 + tid / 8 + 32 < T};
    const int wdst = (tid / TU) * CH + (tid % TU) * 16;
    const int xdst = G::W_BYTES + (tid / 8) * GEMMT_XROW + (tid % 8) * 16;
    // Chunks in the visiting order: k offsets of K block (class w, j-th) = w + 8 j, halves 0, 1.
    auto next_k = [&](int k) {
        if (!(k & 64)) return k + 64;
        int kb = (k >> 7) + 8;
        return kb * 128 < K ? kb * 128 : ((kb & 7) + 1) * 128;  // else the next class's first block
    };
    int k_issue = 0;
    auto issue = [&](int p) {
        if (p < NC) {
            unsigned char* st = smem + (p % STAGES) * G::STAGE;
#pragma unroll
            for (int u = 0; u < NWU; u++) cp_async16(st + wdst + u * TSTEP * CH, wbase + wofs[u] + (size_t)(k_issue >> 6) * CH);
#pragma unroll
            for (int u = 0; u < 2; u++)
                if (xload[u]) {
                    cp_async16(st + xdst + u * 32 * GEMMT_XROW, hbase + xofs[u] + k_issue * 2);
                    cp_async16(st + xdst + u * 32 * GEMMT_XROW + G::X_BYTES, lbase + xofs[u] + k_issue * 2);
                }
            k_issue = next_k(k_issue);
        }
        cp_async_commit();  // empty groups past the end keep the wait's count
    };
    float total[2][4][4], acc[2][4][4], part[2][4][4];
#pragma unroll
    for (int a = 0; a < 2; a++)
#pragma unroll
        for (int b = 0; b < 4; b++)
#pragma unroll
            for (int i = 0; i < 4; i++) total[a][b][i] = acc[a][b][i] = part[a][b][i] = 0.f;
#pragma unroll
    for (int p = 0; p < STAGES - 1; p++) issue(p);
    // K blocks left in the current class (K >= 128). Deriving the class's end from k_cur instead
    // made ptxas spill 360 bytes in the FP8 kernel (scripts/kernel-report.sh), so it is counted.
    int cls = 0, left = (KB + 7) / 8;
    int k_cur = 0;                     // chunk p's k offset
    for (int p = 0; p < NC; p++, k_cur = next_k(k_cur)) {
        cp_async_wait<STAGES - 2>();  // chunk p has landed (this thread's copies)
        __syncthreads();                    // everyone's copies; chunk p - 1's stage is free
        issue(p + STAGES - 1);
        const unsigned char* st = smem + (p % STAGES) * G::STAGE;
        // A fragments of the warp's two row tiles: rows g and g + 8, this lane's 16 k (its tile
        // chunk's warp loads 0, 1 (FP8) or 0-3 (BF16), 512 bytes apart).
        unsigned a0[2][8], a1[2][8];
#pragma unroll
        for (int mt = 0; mt < 2; mt++) {
            const uint4* r0 = reinterpret_cast<const uint4*>(st + (wm * 2 + mt) * CH + lane * 16);
            uint4 w0[2] = {r0[0], r0[32]}, w1[2] = {r0[FP8 ? 32 : 64], r0[FP8 ? 32 : 96]};
            mma_a_frags<FP8>(w0, w1, a0[mt], a1[mt]);
        }
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
            // B fragments: token (wn * 32 + nt * 8 + g), this lane's 16 k, hi and lo.
            const uint4* xb = reinterpret_cast<const uint4*>(st + G::W_BYTES + (wn * 32 + nt * 8 + g) * GEMMT_XROW + q * 32);
            const uint4* xl = reinterpret_cast<const uint4*>(reinterpret_cast<const unsigned char*>(xb) + G::X_BYTES);
            unsigned bh[8], bl[8];
            b_regs(xb[0], xb[1], bh);
            b_regs(xl[0], xl[1], bl);
#pragma unroll
            for (int mt = 0; mt < 2; mt++) mma_k16<FP8>(FP8 ? part[mt][nt] : acc[mt][nt], a0[mt], a1[mt], bh, bl);
        }
        if (p & 1) {
            // The K block is complete: FP8 scales it into the class sum (as gemv_mma's warp).
            if (FP8) {
                const int kb = k_cur >> 7;
#pragma unroll
                for (int mt = 0; mt < 2; mt++) {
                    // Each 16-row tile lies inside one 128-row scale block (16 divides 128).
                    float sc = S[(size_t)(min(nb + wm * 32 + mt * 16, N - 1) / 128) * KB + kb];
#pragma unroll
                    for (int nt = 0; nt < 4; nt++)
#pragma unroll
                        for (int i = 0; i < 4; i++) {
                            acc[mt][nt][i] += sc * part[mt][nt][i];
                            part[mt][nt][i] = 0.f;
                        }
                }
            }
            if (--left == 0) {
                // The class is done: the block reduction's next terms (warps 0..7 in order; the
                // empty classes of K < 1024 add their zero sums too).
                do {
#pragma unroll
                    for (int mt = 0; mt < 2; mt++)
#pragma unroll
                        for (int nt = 0; nt < 4; nt++)
#pragma unroll
                            for (int i = 0; i < 4; i++) {
                                total[mt][nt][i] += acc[mt][nt][i];
                                acc[mt][nt][i] = 0.f;
                            }
                    cls++;
                    left = KB > cls ? (KB - cls + 7) / 8 : 0;
                } while (cls < 8 && left == 0);
            }
        }
    }
    // C fragment: c0 (row g, token 2q), c1 (g, 2q + 1), c2 (g + 8, 2q), c3 (g + 8, 2q + 1).
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < 4; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                int n = nb + wm * 32 + mt * 16 + g + (i >> 1) * 8, t = t0 + wn * 32 + nt * 8 + 2 * q + (i & 1);
                if (n < N && t < T) store_out(total[mt][nt][i], xinv, y, y1, y2, N0, N1, N, n, t);
            }
}
// The one-tile tensor-core GEMV launched right after a ready attention that leaves its counters
// to the next launch (attention_v2_kv_ready's reset_by_next, the o_proj): block 0 zeroes them
// after its work, past its PDL wait, so when the attention's grid has finished; nothing reads
// them until the next layer's projection (null: nothing to zero). The attention's blocks then
// leave without counting themselves out. (At the end, not the start: fewer registers live.
// Block 0 always has work, so it gets here.) The other GEMVs and the GEMMs share the launch's
// parameter list and ignore them.
__device__ __forceinline__ void zero_after_wait(unsigned* zero, int nzero) {
    if (zero != nullptr && blockIdx.x == 0 && blockIdx.y == 0)
        for (int i = threadIdx.x; i < nzero; i += blockDim.x) zero[i] = 0u;
}

// gemm_mma_{fp8,bf16}: two chunks in flight, two blocks per SM. gemm_mma_deep_{fp8,bf16}: for
// decode batches of 64-127 tokens whose tiles number about one per SM (q/k/v at 64 tokens: 106),
// one block per SM with 6 (FP8) or 5 (BF16) chunks in flight (the stages are what bounds a lone
// block's bandwidth).
#define GEMM_MMA_KERNEL(NAME, IS_FP8, MIN_BLOCKS, STAGES)                                                                 \
    extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS) NAME(                                                   \
        const unsigned char* __restrict__ W, const float* __restrict__ S, const unsigned short* __restrict__ XH,          \
        const unsigned short* __restrict__ XL, const float* __restrict__ xinv, float* __restrict__ y,                     \
        float* __restrict__ y1, float* __restrict__ y2, int N0, int N1, int N, int K, int T, unsigned* zero, int nzero) { \
        PDL_ENTER();                                                                                                      \
        gemm_mma<IS_FP8, STAGES>(W, S, XH, XL, xinv, y, y1, y2, N0, N1, N, K, T);                                         \
        (void)zero;                                                                                                       \
        (void)nzero;                                                                                                      \
    }
GEMM_MMA_KERNEL(gemm_mma_fp8, true, 2, GEMMT_STAGES)
GEMM_MMA_KERNEL(gemm_mma_bf16, false, 2, GEMMT_STAGES)
GEMM_MMA_KERNEL(gemm_mma_deep_fp8, true, 1, 6)
GEMM_MMA_KERNEL(gemm_mma_deep_bf16, false, 1, 5)

// ---------------------------------------------------------------------------------------------
// The dense GEMM on Hopper's warpgroup MMAs (sm_90a): gemm_wg_split, then gemm_wg_{fp8,bf16}.
//
// Why: gemm_mma's 128 x 64 tiles read 384 (FP8) / 512 (BF16) bytes from L2 per k for 8192
// products (the activations' hi + lo are 4 bytes an element), and ncu put L2 at ~75% and the
// tensor pipe at 37% with every warp loading its own B fragments. A block of four warpgroups
// here takes 256 rows x 64 tokens: 512 / 768 bytes per k for 16384 products, and wgmma reads
// B from shared memory itself, shared by the four warpgroups. H100, Flash shapes, split
// included: the FP8 q/k/v 1.7-2.1x and the BF16 o_proj 1.25-1.75x as fast as gemm_mma at
// 256-4096 tokens (~215 / ~160 useful TFLOP/s at 2048; benches/results/2026-11-26-dense-gemm-wgmma.md).
//
// The same bits as gemm_mma (and so as every GEMV tile): K blocks of 128 visited class by class
// (blocks w, w + 8, ... for w = 0..7), each 64-k half as four MMAs over k {16 q + 4 s + j},
// the hi part then the lo part; an FP8 block summed from zero (its first MMA writes A B) and
// scaled into acc, each class's acc added into total. A is mma_a_frags' fragment (wgmma's
// per-warp register fragment is mma.sync's), so wgmma's logical k inside an MMA is mma.sync's;
// wgmma chains give mma.sync's bits (benches/micro/wgmma_bits.cu).
//
// B (gemm_wg_split's layout): per 64-token tile and 64-k chunk 16 KB, [s][h][c][n / 8][n % 8]
// of 16-byte units (no swizzle): the unit (s, h, c, n) holds part h (0 hi, 1 lo) of token n at
// k 16 t + 4 s + 2 c + e, t = 0..3, e = 0..1, which are logical k 8 c + 2 t + e of MMA s (the
// places of mma_k16's B fragments). So MMA s of part h is one descriptor: core matrices 1 KB
// apart along K, 128 bytes along N.
// A block takes ROWS rows (256, 128 or 64: four, two or one warpgroups of 64 rows, 2 ROWS
// threads) x 64 tokens. The smaller blocks are for decode batches of 32-127 tokens, where 256-row
// blocks leave most SMs idle (q/k/v: 53 blocks, o_proj: 16); they stream the same B per block,
// so they read more from L2 per weight byte. Every row's arithmetic is the same in each.
#define GWG_TOKENS 64
#define GWG_XCHUNK 16384  // bytes of one 64-token tile's 64-k chunk, hi and lo
// 64-k halves per pipeline stage: a whole K block (2), or one half with twice the stages in the
// same shared memory (1: more bytes in flight, a barrier per half). H100, 2048 tokens, same call:
// BF16 (o_proj, 2 stages of 96 KB: its loads alone took nearly its whole time) 0.99 -> 0.86 ms
// with halves; FP8 (then 3 stages of 64 KB, totals in registers) 1.14 -> 1.24 ms, so it keeps
// whole blocks.
#ifndef GWG_HS_FP8
#define GWG_HS_FP8 2
#endif
#ifndef GWG_HS_BF16
#define GWG_HS_BF16 1
#endif
// FP8: the class totals in shared memory (64 KB, 2 stages instead of 3) instead of 32 registers,
// so both halves' A fragments fit and a stage's MMAs are waited for once, as BF16's. H100, same
// call: q/k/v at 2048 tokens 1.14 -> 1.01 ms (1024: 0.64 -> 0.54); with 5 stages of 64 k instead,
// 1.19 ms.
#ifndef GWG_FP8_TOTAL_SMEM
#define GWG_FP8_TOTAL_SMEM 1
#endif
template <bool FP8, int ROWS>
struct GemmWg {
    static constexpr int THREADS = 2 * ROWS;
    static constexpr int WROW = FP8 ? 64 : 144;  // a half's weight bytes per row (the tiles take 64 / 128)
    static constexpr int WUNITS = FP8 ? 4 : 8;   // 16-byte units of a row's half
    static constexpr int W_HALF = ROWS * WROW;
    static constexpr int HALF = W_HALF + GWG_XCHUNK;  // a half's weights, then its B
    static constexpr int HS = FP8 ? GWG_HS_FP8 : GWG_HS_BF16;  // halves per stage
    static constexpr int STAGE = HS * HALF;
    static constexpr bool TSM = FP8 && GWG_FP8_TOTAL_SMEM;  // totals in shared memory
    static constexpr int STAGES = TSM ? (HS == 2 ? 2 : 5) : (FP8 ? 3 : 2) * 2 / HS;  // 192 / 208 KB
    static constexpr int TOTAL_OFF = STAGES * STAGE;
    static constexpr int SMEM = TOTAL_OFF + (TSM ? THREADS * 32 * 4 : 0);  // at most kernels.rs' dense_wg_smem(ROWS)
    static constexpr int XUNITS = HS * GWG_XCHUNK / (16 * THREADS);    // B units a thread copies per stage
};

// x's hi + lo parts [T, K] (K % 64 == 0) into gemm_wg's B layout, [ceil(T / 64)][K / 64][16 KB];
// tokens past T are zeros (their columns are never stored). Thread: (tile, chunk, part, token).
extern "C" __global__ void __launch_bounds__(256) gemm_wg_split(const unsigned short* __restrict__ XH, const unsigned short* __restrict__ XL,
                                                                uint4* __restrict__ xw, int K, int T) {
    PDL_ENTER();
    const int KC = K / 64;
    const long long id = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int n = (int)(id & 63), h = (int)((id >> 6) & 1);
    const long long tc = id >> 7;  // tile * KC + chunk
    const int tile = (int)(tc / KC), kc = (int)(tc % KC);
    if (tile >= (T + GWG_TOKENS - 1) / GWG_TOKENS) return;
    const int tok = tile * GWG_TOKENS + n;
    unsigned wd[32];
    if (tok < T) {
        const uint4* src = reinterpret_cast<const uint4*>((h ? XL : XH) + (size_t)tok * K + kc * 64);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            uint4 v = src[i];
            wd[4 * i] = v.x; wd[4 * i + 1] = v.y; wd[4 * i + 2] = v.z; wd[4 * i + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 32; i++) wd[i] = 0u;
    }
    uint4* dst = xw + (size_t)tc * (GWG_XCHUNK / 16) + (n >> 3) * 8 + (n & 7);
#pragma unroll
    for (int s = 0; s < 4; s++)
#pragma unroll
        for (int c = 0; c < 2; c++)  // word 8 t + 2 s + c holds k 16 t + 4 s + 2 c, + 1
            dst[((s * 2 + h) * 2 + c) * 64] = make_uint4(wd[2 * s + c], wd[8 + 2 * s + c], wd[16 + 2 * s + c], wd[24 + 2 * s + c]);
}

// Measurement builds only (PEREGRINE_KERNEL_DEFINES=-DGWG_TRACE): thread 0 of each gemm_wg block
// (the first GWG_TRACE_BLOCKS) stamps clock() per stage p < GWG_TRACE_STAGES as cycles from the
// block's start: its copies landed, past the barrier, next copies issued, MMAs done. Slot 0 of
// a block holds its %globaltimer start (low 32 bits), slot 1 its cycles in all, slot 2 its SM.
#ifdef GWG_TRACE
#define GWG_TRACE_BLOCKS 1024
#define GWG_TRACE_STAGES 64
__device__ unsigned gwg_trace[GWG_TRACE_BLOCKS * (4 + 4 * GWG_TRACE_STAGES)];
#define GWG_STAMP(p, k)                                                                                    \
    do {                                                                                                   \
        if (tid == 0 && gwg_b < GWG_TRACE_BLOCKS && (p) < GWG_TRACE_STAGES)                               \
            gwg_trace[gwg_b * (4 + 4 * GWG_TRACE_STAGES) + 4 + 4 * (p) + (k)] = (unsigned)clock64() - gwg_t0; \
    } while (0)
#else
#define GWG_STAMP(p, k)
#endif

#ifdef __CUDA_ARCH_FEAT_SM90_ALL
template <bool FP8, int ROWS, bool KS>
__device__ __forceinline__ void gemm_wg(const unsigned char* __restrict__ W, const float* __restrict__ S, const uint4* __restrict__ xw,
                                        const float* __restrict__ xinv, float* __restrict__ y, float* __restrict__ y1,
                                        float* __restrict__ y2, int N0, int N1, int N, int K, int T, float* __restrict__ csum) {
    using G = GemmWg<FP8, ROWS>;
    constexpr int THREADS = G::THREADS;
    constexpr int STAGES = G::STAGES, ESIZE = FP8 ? 1 : 2;
    extern __shared__ __align__(128) uint4 dsm[];  // rings on whole lines (moe.cu: MOE_DSM_ALIGN)
    unsigned char* smem = reinterpret_cast<unsigned char*>(dsm);
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, g = lane >> 2, q = lane & 3;
    const int wrow = 16 * w;  // the warp's 16 rows of the block's ROWS (warpgroup w / 4: rows 64 (w / 4) ..)
#ifdef GWG_TRACE
    const unsigned gwg_b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z), gwg_t0 = (unsigned)clock64();
    if (tid == 0 && gwg_b < GWG_TRACE_BLOCKS) {
        unsigned long long gt;
        unsigned sm;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(gt));
        asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
        gwg_trace[gwg_b * (4 + 4 * GWG_TRACE_STAGES)] = (unsigned)gt;
        gwg_trace[gwg_b * (4 + 4 * GWG_TRACE_STAGES) + 2] = sm;
    }
#endif
    // Token tiles are the grid's fast index: the blocks running at once share a few row tiles'
    // weights (read from DRAM about once) and read the activations from L2.
    const int nb = blockIdx.y * ROWS, tile = blockIdx.x;
    constexpr int HS = G::HS;
    // Split K (KS, the _ks kernels: gridDim.z = NS of 2, 4 or 8): block z takes the K classes
    // [c0, c1), and gemm_wg_combine adds the splits' class sums in class order (see there). The
    // kernels without keep their code (the 256-row FP8 kernel spilled 40 more bytes with it).
    const int KB = K / 128;  // K blocks
    const int NS = KS ? (int)gridDim.z : 1, z = KS ? (int)blockIdx.z : 0, c0 = 8 * z / NS, c1 = 8 * (z + 1) / NS;
    auto class_blocks = [&](int c) { return c < KB ? (KB - c + 7) / 8 : 0; };
    int nkb = KB;
    if (KS) {
        nkb = 0;
        for (int c = c0; c < c1; c++) nkb += class_blocks(c);
    }
    const int NU = nkb * 2 / HS;  // stages' worth of halves
    // The weights in the tensor-core tile layout (tc_tiles.rs: per row tile and 64-k chunk CH
    // contiguous bytes of TU units), copied as they lie, the block's ROWS / 16 tiles of a half one
    // after another: thread tid copies unit tid % TU of half (tid / TU) % HS of tiles
    // tid / (TU HS) + TSTEP u (tiles past N read the last: loaded, never stored).
    constexpr int TU = 16 * G::WUNITS, CH = 16 * TU;
    static_assert((THREADS / TU) % HS == 0 && ROWS / 16 * CH <= G::W_HALF, "a thread's units lie in one half; a half holds its tiles");
    constexpr int NWU = ROWS / 16 * HS * TU / THREADS, TSTEP = THREADS / (TU * HS);
    const int whalf = (tid / TU) % HS, tile_base = nb / 16, ntiles = (N + 15) / 16;
    const unsigned char* wbase = W + (size_t)tile_base * K * 16 * ESIZE + whalf * CH + (tid % TU) * 16;
    unsigned wofs[NWU];
#pragma unroll
    for (int u = 0; u < NWU; u++) wofs[u] = (unsigned)(min(tile_base + tid / (TU * HS) + TSTEP * u, ntiles - 1) - tile_base) * K * 16 * ESIZE;
    const int wdst = whalf * G::HALF + (tid / (TU * HS)) * CH + (tid % TU) * 16;
    // B: a K block's two 16 KB chunks are adjacent in xw; XUNITS units a thread.
    const unsigned char* xbase = reinterpret_cast<const unsigned char*>(xw) + (size_t)tile * (K / 64) * GWG_XCHUNK + tid * 16;
    auto next_kb = [&](int kb) {
        const int nk = kb + 8;
        return nk < KB ? nk : (kb & 7) + 1;  // else the next class's first block
    };
    int kb_issue = c0, half_issue = 0;  // (HS = 1: the half of kb_issue that comes next)
    auto issue = [&](int p) {
#ifdef GWG_NO_LOAD  // measurement builds only (outputs wrong): after the first stages, no loads
        if (p >= STAGES) p = NU;
#endif
        if (p < NU) {
            unsigned char* st = smem + (p % STAGES) * G::STAGE;
            const int chunk = kb_issue * 2 + half_issue;  // the stage's first 64-k chunk
#pragma unroll
            for (int u = 0; u < NWU; u++) cp_async16(st + wdst + u * TSTEP * CH, wbase + wofs[u] + (size_t)chunk * CH);
#pragma unroll
            for (int u = 0; u < G::XUNITS; u++) {
                const int o = tid * 16 + u * THREADS * 16;  // byte of the stage's B
                cp_async16(st + (o / GWG_XCHUNK) * G::HALF + G::W_HALF + o % GWG_XCHUNK,
                           xbase + (size_t)chunk * GWG_XCHUNK + u * THREADS * 16);
            }
            if (HS == 2 || half_issue) kb_issue = next_kb(kb_issue);
            if (HS == 1) half_issue ^= 1;
        }
        cp_async_commit();  // empty groups past the end keep the wait's count
    };
    float total[32], acc[32], part[32];
#pragma unroll
    for (int i = 0; i < 32; i++) total[i] = acc[i] = part[i] = 0.f;
    float* tsm = reinterpret_cast<float*>(smem + G::TOTAL_OFF);  // (TSM) total[i] of thread t at [i][t]
    {
        unsigned dyn;  // the host's size (kernels.rs: DENSE_WG_SMEM) must cover this form's
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
        if (dyn < (unsigned)G::SMEM) asm volatile("trap;");
    }
    if (G::TSM) {
#pragma unroll
        for (int i = 0; i < 32; i++) tsm[i * THREADS + tid] = 0.f;
    }
    auto pin = [](float* v) {
#pragma unroll
        for (int i = 0; i < 32; i++) asm volatile("" : "+f"(v[i])::"memory");
    };
#pragma unroll
    for (int p = 0; p < STAGES - 1; p++) issue(p);
    int cls = c0, left = class_blocks(c0);
    // Where a class sum goes: split 0 adds its classes into total (as the unsplit kernel does all
    // eight), a later split stores each of its own (slot c - 8 / NS + 1 of csum, [slot][tile][64
    // tokens][N rows]) for gemm_wg_combine.
    auto part_at = [&](int slot, int i) -> float& {
        const int n = nb + wrow + g + ((i >> 1) & 1) * 8, tt = 8 * (i >> 2) + 2 * q + (i & 1);
        return csum[((size_t)(slot * gridDim.x + tile) * GWG_TOKENS + tt) * N + n];
    };
    auto sink = [&](int c, int i) {
        const int n = nb + wrow + g + ((i >> 1) & 1) * 8;
        if (z == 0) {
            if (G::TSM) tsm[i * THREADS + tid] += acc[i];
            else total[i] += acc[i];
        } else if (n < N) {
            part_at(c - 8 / NS + 1, i) = acc[i];
        }
    };
    // K block kb is complete (its MMAs waited for): FP8 scales it into the class sum, and a
    // class's last block adds the class into total (the empty classes of K < 1024 add zeros).
    auto finish = [&](int kb) {
        if (FP8) {
            // The warpgroup's 64 rows lie in one 128-row scale block.
            const float sc = S[(size_t)(min(nb + wrow, N - 1) / 128) * KB + kb];
#pragma unroll
            for (int i = 0; i < 32; i++) acc[i] += sc * part[i];
        }
        if (--left == 0) {
            do {
#pragma unroll
                for (int i = 0; i < 32; i++) {
                    sink(cls, i);
                    acc[i] = 0.f;
                }
                cls++;
                left = class_blocks(cls);
            } while (cls < c1 && left == 0);
        }
    };
    // K block p's MMAs: each 64-k half's A fragments, then its four MMAs of hi and lo (FP8: into
    // part, from zero at the block's first MMA; BF16: into acc), then the wait for them, so the
    // A registers are free again (the other warpgroups' MMAs fill the tensor pipe meanwhile).
    // FP8 with its totals in registers (three accumulator sets) waits after each half, so only one
    // half's A is held.
    auto multiply = [&](int p) {
#ifdef GWG_NO_MMA  // measurement builds only (outputs wrong): the loads alone
        return;
#endif
        const unsigned char* st = smem + (p % STAGES) * G::STAGE;
        float* C = FP8 ? part : acc;
        unsigned a0[2][8], a1[2][8];
#pragma unroll
        for (int hf = 0; hf < HS; hf++) {
            const int gh = HS == 2 ? hf : p & 1;  // the half of the K block
            const int ha = FP8 && !G::TSM ? 0 : hf;  // the A registers this half uses
            // the warp's row tile (wrow / 16 = w) of the half: warp loads 0, 1 (FP8) or 0-3 (BF16)
            const uint4* r0 = reinterpret_cast<const uint4*>(st + hf * G::HALF + w * CH + lane * 16);
            uint4 w0[2] = {r0[0], r0[32]}, w1[2] = {r0[FP8 ? 32 : 64], r0[FP8 ? 32 : 96]};
            mma_a_frags<FP8>(w0, w1, a0[ha], a1[ha]);
            pin(C);
            wg_fence();
#pragma unroll
            for (int s = 0; s < 4; s++) {
                const unsigned a[4] = {a0[ha][2 * s], a1[ha][2 * s], a0[ha][2 * s + 1], a1[ha][2 * s + 1]};
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const unsigned long long d = wg_desc(st + hf * G::HALF + G::W_HALF + (s * 2 + h) * 2048, 1024, 128);
                    if (FP8) wg_mma<8>(C, a, d, gh + s + h > 0);
                    else wg_mma_bf16_n64(C, a, d, 1);
                }
            }
            wg_commit();
            if ((FP8 && !G::TSM) || hf == HS - 1) {
                wg_wait<0>();
                pin(C);
            }
        }
    };
    int kb = c0;  // (the block whose MMAs finish next)
    for (int p = 0; p < NU; p++) {
        cp_async_wait<STAGES - 2>();                                   // stage p landed (this thread's copies)
        GWG_STAMP(p, 0);
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the copies, seen by wgmma
        __syncthreads();  // block p is everyone's; every warpgroup is done with block p - 1's stage
        GWG_STAMP(p, 1);
        issue(p + STAGES - 1);
        GWG_STAMP(p, 2);
        multiply(p);
        GWG_STAMP(p, 3);
        if (HS == 2 || (p & 1)) {
            finish(kb);
            kb = next_kb(kb);
        }
    }
    // A split past its K (no K blocks at all) still owes its classes' zeros.
    if (z > 0 && nkb == 0)
        for (; cls < c1; cls++)
#pragma unroll
            for (int i = 0; i < 32; i++) sink(cls, i);
#ifdef GWG_TRACE
    if (tid == 0 && gwg_b < GWG_TRACE_BLOCKS) gwg_trace[gwg_b * (4 + 4 * GWG_TRACE_STAGES) + 1] = (unsigned)clock64() - gwg_t0;
#endif
    if (z > 0) return;
    // C fragment of n-group i: (row g, token 8 i + 2 q), (g, + 1), (g + 8, 8 i + 2 q), (g + 8, + 1).
#pragma unroll
    for (int i = 0; i < 32; i++) {
        const int n = nb + wrow + g + ((i >> 1) & 1) * 8, t = tile * GWG_TOKENS + 8 * (i >> 2) + 2 * q + (i & 1);
        const float v = G::TSM ? tsm[i * THREADS + tid] : total[i];
        if (n >= N) continue;
        if (NS > 1) part_at(0, i) = v;  // (every token of the tile: the combine reads only t < T)
        else if (t < T) store_out(v, xinv, y, y1, y2, N0, N1, N, n, t);
    }
}
#endif

// gemm_wg_{fp8,bf16} (256 rows), gemm_wg{128,64}_{fp8,bf16}: grid (ceil(T / 64), ceil(N / ROWS),
// S), 2 ROWS threads, at least GemmWg<FP8, ROWS>::SMEM bytes of dynamic shared memory (the kernel
// traps otherwise); xw from gemm_wg_split. 64-row blocks fit two per SM. S = 1 stores y (csum
// unused); the _ks kernels split K by class over S of 2, 4 or 8 and leave (9 - 8 / S) x
// ceil(T / 64) x 64 x N class sums in csum for gemm_wg_combine. The host runs them on sm_90a
// only (built for another GPU they trap).
#define GEMM_WG_KERNEL(NAME, IS_FP8, ROWS, MIN_BLOCKS, KS)                                                                \
    extern "C" __global__ void __launch_bounds__(2 * ROWS, MIN_BLOCKS) NAME(                                              \
        const unsigned char* __restrict__ W, const float* __restrict__ S, const uint4* __restrict__ xw,                  \
        const float* __restrict__ xinv, float* __restrict__ y, float* __restrict__ y1, float* __restrict__ y2, int N0,    \
        int N1, int N, int K, int T, float* __restrict__ csum) {                                                         \
        PDL_ENTER();                                                                                                      \
        GEMM_WG_BODY(IS_FP8, ROWS, KS)                                                                                    \
    }
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
#define GEMM_WG_BODY(IS_FP8, ROWS, KS) gemm_wg<IS_FP8, ROWS, KS>(W, S, xw, xinv, y, y1, y2, N0, N1, N, K, T, csum);
#else
#define GEMM_WG_BODY(IS_FP8, ROWS, KS) asm volatile("trap;");
#endif
GEMM_WG_KERNEL(gemm_wg_fp8, true, 256, 1, false)
GEMM_WG_KERNEL(gemm_wg_bf16, false, 256, 1, false)
GEMM_WG_KERNEL(gemm_wg128_fp8, true, 128, 1, false)
GEMM_WG_KERNEL(gemm_wg128_bf16, false, 128, 1, false)
GEMM_WG_KERNEL(gemm_wg64_fp8, true, 64, 2, false)
GEMM_WG_KERNEL(gemm_wg64_bf16, false, 64, 2, false)
GEMM_WG_KERNEL(gemm_wg_fp8_ks, true, 256, 1, true)
GEMM_WG_KERNEL(gemm_wg_bf16_ks, false, 256, 1, true)
GEMM_WG_KERNEL(gemm_wg128_fp8_ks, true, 128, 1, true)
GEMM_WG_KERNEL(gemm_wg128_bf16_ks, false, 128, 1, true)
GEMM_WG_KERNEL(gemm_wg64_fp8_ks, true, 64, 2, true)
GEMM_WG_KERNEL(gemm_wg64_bf16_ks, false, 64, 2, true)

// The wgmma GEMM split over K (grid.z = S > 1): its first split left the running total of
// classes 0 .. 8 / S - 1 in slot 0 of csum, each later split the sum of each of its classes
// (class c in slot c - 8 / S + 1), [slot][tile][64 tokens][N]. Adding the later classes to slot
// 0 in class order is the unsplit kernel's chain (total += class sum, class by class), so the
// same bits. One thread per output, rows fastest.
extern "C" __global__ void __launch_bounds__(256) gemm_wg_combine(const float* __restrict__ csum, const float* __restrict__ xinv,
                                                                  float* __restrict__ y, float* __restrict__ y1, float* __restrict__ y2,
                                                                  int N0, int N1, int N, int T, int S) {
    PDL_ENTER();
    const long long id = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (id >= (long long)N * T) return;
    const int n = (int)(id % N), t = (int)(id / N), tiles = (T + GWG_TOKENS - 1) / GWG_TOKENS;
    const size_t slot = (size_t)tiles * GWG_TOKENS * N;
    const float* p = csum + (size_t)t * N + n;  // slot 0's [tile][token in tile][n] is [t][n]
    float v = p[0];
    for (int s = 1; s <= 8 - 8 / S; s++) v += p[s * slot];
    store_out(v, xinv, y, y1, y2, N0, N1, N, n, t);
}

// gemv_mma_{fp8,bf16}_t<NT> (one row tile per block) and ..._t<NT>_r<R>. Only the one-tile
// kernels zero counters (ZERO; the others take the parameters and ignore them: Kernels refuses
// them there): zero_after_wait in the multi-tile kernels moved their registers and cost the
// batch 16-64 steps 1.4-1.7%.
#define GEMV_MMA(NT, R, SUFFIX, ZERO)                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) gemv_mma_fp8_t##NT##SUFFIX(                                        \
        const unsigned char* __restrict__ W, const float* __restrict__ S, const unsigned short* __restrict__ XH,          \
        const unsigned short* __restrict__ XL, const float* __restrict__ xinv, float* __restrict__ y,                     \
        float* __restrict__ y1, float* __restrict__ y2,                                                                   \
        int N0, int N1, int N, int K, int T, unsigned* zero, int nzero) { PDL_ENTER();                                    \
        gemv_mma<NT, R, true>(W, S, XH, XL, xinv, y, y1, y2, N0, N1, N, K, T);                                            \
        if (ZERO) zero_after_wait(zero, nzero);                                                                           \
    }                                                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) gemv_mma_bf16_t##NT##SUFFIX(                                       \
        const unsigned char* __restrict__ W, const float* __restrict__ S, const unsigned short* __restrict__ XH,          \
        const unsigned short* __restrict__ XL, const float* __restrict__ xinv, float* __restrict__ y,                     \
        float* __restrict__ y1, float* __restrict__ y2,                                                                   \
        int N0, int N1, int N, int K, int T, unsigned* zero, int nzero) { PDL_ENTER();                                    \
        gemv_mma<NT, R, false>(W, S, XH, XL, xinv, y, y1, y2, N0, N1, N, K, T);                                           \
        if (ZERO) zero_after_wait(zero, nzero);                                                                           \
    }
// gemv_mma_bf16_t1 of one token that also folds its rows into the argmax keys amax (ARGMAX
// above; argmax_unpack turns them into the id and zeroes them for the next call).
// Its parameters are gemv_mma_bf16_t1's, run-time T and xinv included (the host passes T = 1):
// with T = 1 and no xinv as constants, ptxas scheduled the weight loads otherwise (56 registers
// against 64), and that kernel ran ~24 us slower than gemv_mma_bf16_t1 over Flash's lm_head in
// most processes.
extern "C" __global__ void __launch_bounds__(256) gemv_mma_bf16_t1_argmax(
    const unsigned char* __restrict__ W, const float* __restrict__ S, const unsigned short* __restrict__ XH,
    const unsigned short* __restrict__ XL, const float* __restrict__ xinv, float* __restrict__ y, float* __restrict__ y1,
    float* __restrict__ y2, int N0, int N1, int N, int K, int T, unsigned long long* __restrict__ amax, int slots, int stride) {
    PDL_ENTER();
    gemv_mma<1, 1, false, false, false, 1, false, false, true>(W, S, XH, XL, xinv, y, y1, y2, N0, N1, N, K, T, nullptr, 0, 0, 0, nullptr,
                                                               amax, slots, stride);
}
// gemv_mma_bf16_t1_argmax asking L2, before its PDL wait, for the first K block of each of its
// warps (the 32 KB of its tile's first 16 chunks): the blocks resident while the final norm ahead
// runs (one block reading and writing what L2 holds) fill DRAM's idle window with their first
// loads: at most ~1 us a batch-1 step on the H100, in 4 of 5 processes (within their spread;
// benches/results/2026-11-27-copy-free-steps.md). Off by default since: on the H200 the batch-1
// step was 8-9 us slower with it, in every round of four processes
// (benches/results/2026-11-30-h200-defaults-sweep.md); PEREGRINE_LM_HEAD_PREFETCH=1 runs it.
extern "C" __global__ void __launch_bounds__(256) gemv_mma_bf16_t1_argmax_pf(
    const unsigned char* __restrict__ W, const float* __restrict__ S, const unsigned short* __restrict__ XH,
    const unsigned short* __restrict__ XL, const float* __restrict__ xinv, float* __restrict__ y, float* __restrict__ y1,
    float* __restrict__ y2, int N0, int N1, int N, int K, int T, unsigned long long* __restrict__ amax, int slots, int stride) {
    if (threadIdx.x < min(16, K / 64)) {  // the tile's first 16 chunks of 2 KB (tc_tiles.rs)
        const unsigned char* p = W + (size_t)blockIdx.x * K * 32 + threadIdx.x * 2048;
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(2048) : "memory");
    }
    PDL_ENTER();
    gemv_mma<1, 1, false, false, false, 1, false, false, true>(W, S, XH, XL, xinv, y, y1, y2, N0, N1, N, K, T, nullptr, 0, 0, 0, nullptr,
                                                               amax, slots, stride);
}
// gemv_mma_{bf16,fp8}_t1 with the next K block's weights loaded ahead (PIPE above); they zero
// counters as the one-tile kernels do.
#define GEMV_MMA_PIPE(FORMAT, FP8)                                                                                        \
    extern "C" __global__ void __launch_bounds__(256) gemv_mma_##FORMAT##_t1_pipe(                                      \
        const unsigned char* __restrict__ W, const float* __restrict__ S, const unsigned short* __restrict__ XH,          \
        const unsigned short* __restrict__ XL, const float* __restrict__ xinv, float* __restrict__ y,                     \
        float* __restrict__ y1, float* __restrict__ y2, int N0, int N1, int N, int K, int T, unsigned* zero, int nzero) { \
        PDL_ENTER();                                                                                                      \
        gemv_mma<1, 1, FP8, false, true>(W, S, XH, XL, xinv, y, y1, y2, N0, N1, N, K, T);                                 \
        zero_after_wait(zero, nzero);                                                                                     \
    }
GEMV_MMA_PIPE(bf16, false)
GEMV_MMA_PIPE(fp8, true)

// The decode o_proj of T <= 8 tokens (gemv_mma_bf16_t1_pipe) that also does its MoE's router, so
// no norm and no router launch sit between it and the MoE (route_in_oproj on the host). The
// router is linear and the post-attention norm's 1 / rms is one scalar a token:
// logits[t, e] = inv_t * sum_k W[e, k] g[k] h[t, k] with h = res + o (the residual add),
// inv_t = 1 / sqrt(mean(h_t^2) + eps). So each block, once its 16 rows of o are summed, forms h of
// its rows, writes g h (hg [T, N]: the MoE stages x = hg * inv from it, so it reads no weights of
// the norm in its path) and each token's sum of squares of h over its rows (ssq[t gridDim.x +
// block], in row order), and adds its part of every expert's dot product over those rows into
// token t's sums at acc + t tok as a fixed-point integer (x 2^40, red.global.add.u64): integer
// sums do not depend on the blocks' order, so the logits are the same bits from run to run.
// Block b adds into copy b % copies of the E sums (acc[t tok + c E + e]; the reader adds the
// copies up), so fewer blocks' reds meet at one address at the o_proj's end. A part that is not
// finite or not below 2^22 sets acc[t tok + copies E] instead (the reader then sees NaN logits,
// as the router would give). One token is read by the fused MoE (moe_fused_acc_*), more by
// moe_route_acc and moe_digit_rows_acc (ops.cu, moe.cu); each sums ssq in acc_norm_inv's order.
// acc must be zero on entry (its readers zero it: see there). The router's columns of the
// block's rows (W [E, N] f32, 64 bytes per expert) are copied to shared memory before the wait
// (weights), the residual's rows loaded after it. 16 E * 4 bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(256) gemv_mma_bf16_t1_pipe_route(
    const unsigned char* __restrict__ W, const float* __restrict__ S, const unsigned short* __restrict__ XH,
    const unsigned short* __restrict__ XL, const float* __restrict__ xinv, float* __restrict__ y, float* __restrict__ y1,
    float* __restrict__ y2, int N0, int N1, int N, int K, int T, unsigned* zero, int nzero, const float* __restrict__ res,
    const float* __restrict__ g, const float* __restrict__ Wr, int E, unsigned long long* __restrict__ acc, int copies,
    float* __restrict__ ssq, float* __restrict__ hg, int tok) {
    __shared__ float keep[16 * 8], hgs[16 * 8];  // row r of token t at 8 r + t
    extern __shared__ __align__(128) float4 wr_sh[];  // [E][4]: expert e's columns nb .. nb + 15
    const int nb = blockIdx.x * 16, tid = threadIdx.x;
    for (int i = tid; i < E * 4; i += blockDim.x) cp_async16(wr_sh + i, Wr + (size_t)(i >> 2) * N + nb + (i & 3) * 4);
    cp_async_commit();
    // Thread 8 r + t (of the first 128) holds row r of token t.
    const int rr = tid >> 3, tt = tid & 7;
    const bool held = tid < 16 * 8 && tt < T && nb + rr < N;  // (the host keeps N % 16 == 0)
    const float gr = held ? __ldg(g + nb + rr) : 0.f;
    PDL_ENTER();
    const float xr = held ? __ldcg(res + (size_t)tt * N + nb + rr) : 0.f;
    gemv_mma<1, 1, false, false, true, 1, false, true>(W, S, XH, XL, xinv, y, y1, y2, N0, N1, N, K, T, nullptr, 0, 0, 0, keep);
    zero_after_wait(zero, nzero);
    cp_async_wait<0>();
    __syncthreads();  // keep[] and every thread's copies
    if (held) {
        const float h = xr + keep[tid];  // the norm's x + a
        hgs[tid] = gr * h;
        hg[(size_t)tt * N + nb + rr] = hgs[tid];
        keep[tid] = h;
    }
    __syncthreads();
    if (tid < T) {
        float s = 0.f;
#pragma unroll
        for (int r = 0; r < 16; r++) s += keep[8 * r + tid] * keep[8 * r + tid];
        ssq[(size_t)tid * gridDim.x + blockIdx.x] = s;
    }
    for (int e = tid; e < E; e += blockDim.x) {
        float4 w[4];
#pragma unroll
        for (int j = 0; j < 4; j++) w[j] = wr_sh[e * 4 + j];
        for (int t = 0; t < T; t++) {
            float p = 0.f;
#pragma unroll
            for (int j = 0; j < 4; j++)
                p += w[j].x * hgs[8 * (4 * j) + t] + w[j].y * hgs[8 * (4 * j + 1) + t] + w[j].z * hgs[8 * (4 * j + 2) + t] +
                     w[j].w * hgs[8 * (4 * j + 3) + t];
            unsigned long long* mine = acc + (size_t)t * tok;
            if (fabsf(p) < 0x1p22f) atomicAdd(mine + (size_t)(blockIdx.x % copies) * E + e, (unsigned long long)__float2ll_rn(p * 0x1p40f));
            else atomicOr(mine + (size_t)copies * E, 1ull);
        }
    }
}

// The q/k/v projection feeding attention_v2_kv_ready (READY above): the kernel's name, its
// __launch_bounds__ (threads[, blocks per SM]), then gemv_mma's PIPE, CW and XSH.
#define GEMV_MMA_READY(NAME, BOUNDS, PIPE, CW, XSH)                                                                        \
    extern "C" __global__ void __launch_bounds__ BOUNDS NAME(                                                             \
        const unsigned char* __restrict__ W, const float* __restrict__ S, const unsigned short* __restrict__ XH,          \
        const unsigned short* __restrict__ XL, const float* __restrict__ xinv, float* __restrict__ y,                     \
        float* __restrict__ y1, float* __restrict__ y2, int N0, int N1, int N, int K, int T, unsigned* __restrict__ ready, \
        int heads, int hd, int vd) {                                                                                      \
        PDL_ENTER();                                                                                                      \
        gemv_mma<1, 1, true, true, PIPE, CW, XSH>(W, S, XH, XL, xinv, y, y1, y2, N0, N1, N, K, T, ready, heads, hd, vd);   \
    }
// Blocks of 8 warps, one K class each.
GEMV_MMA_READY(gemv_mma_fp8_t1_ready, (256), false, 1, false)
// Blocks of 4 warps, each summing two K classes (CW = 2): the same bits, 9 blocks per SM
// instead of 4 (56 registers), so the decode q/k/v projection's tiles fit one wave.
GEMV_MMA_READY(gemv_mma_fp8_t1_ready4, (128), false, 2, false)
// ..._ready4 with its next K block loaded ahead (PIPE; across its two K classes): two K blocks
// in flight per warp. Capped at 72 registers, so 7 blocks fit an SM (the host runs it where the
// tiles fit one wave of it). Same bits.
GEMV_MMA_READY(gemv_mma_fp8_t1_ready4_pipe, (128, 7), true, 2, false)
// ..._ready4_pipe for one token, its activations ahead shuffled between lanes (XSH above): 64
// registers, so 8 blocks fit an SM. Same bits.
GEMV_MMA_READY(gemv_mma_fp8_t1_ready4_pipe1, (128, 8), true, 2, true)
// Measured on the H100 and not kept (benches/results/2026-11-23-gemv-row-tiles.md): one row
// tile of 16, 32 or 64 tokens per block (the activations read from L2 once per 16 rows bound
// them at 16-64 tokens), 2 row tiles of 8 or 32 tokens; FP8 2 x 2 and BF16 2 x 4 are compiled
// because the macro makes both formats.
GEMV_MMA(1, 1, , true)
GEMV_MMA(2, 2, _r2, false)
GEMV_MMA(2, 4, _r4, false)

// ---------------------------------------------------------------------------------------------
// MXFP4 MoE decode on tensor cores. Per block: 16 rows of one routed expert, 8 warps splitting
// K in 64-wide chunks, up to 8 of the expert's (token, slot) pairs per pass as the MMA's 8
// columns. E2M1 codes become F16 (value x 2^-14, exact) with the bit moves of mxfp4_decode8,
// pairing elements (0,4) (1,5) (2,6) (3,7) of each lane's 8; the activations were split into
// F16 hi + lo (per-row power-of-two scale) and stored in that same order, so each B register is
// one 32-bit load. Each lane's 8 elements share one E8M0 scale, applied to the partial sums of
// its 32-group (rows g and g+8 have their own scales). K % 64 == 0.

// The four f16x2 words of mxfp4_decode8 (codes of u, element j in nibble j): (0,4) (1,5) (2,6) (3,7).
__device__ __forceinline__ void mxfp4_f16x4(unsigned u, unsigned r[4]) {
    r[0] = ((u & 0x00070007u) << 9) | ((u & 0x00080008u) << 12);
    r[1] = ((u & 0x00700070u) << 5) | ((u & 0x00800080u) << 8);
    r[2] = ((u & 0x07000700u) << 1) | ((u & 0x08000800u) << 4);
    r[3] = ((u & 0x70007000u) >> 3) | (u & 0x80008000u);
}

// Accumulates one 32-group of rows (g, g+8) of W (MXFP4 codes, row stride K/2 bytes) against
// the lane's B words (hi, lo), scaled by the rows' E8M0 scales.
__device__ __forceinline__ void mxfp4_mma_group(const unsigned char* __restrict__ W, const unsigned char* __restrict__ S,
                                                int r0, int r1, int K, int kg, int q, uint4 bh, uint4 bl, float acc[4]) {
    unsigned w0 = __ldg(reinterpret_cast<const unsigned*>(W + (size_t)r0 * (K / 2) + kg * 16 + q * 4));
    unsigned w1 = __ldg(reinterpret_cast<const unsigned*>(W + (size_t)r1 * (K / 2) + kg * 16 + q * 4));
    float s0 = e8m0_x16384(__ldg(S + (size_t)r0 * (K / 32) + kg));
    float s1 = e8m0_x16384(__ldg(S + (size_t)r1 * (K / 32) + kg));
    unsigned a[4], b[4];
    mxfp4_f16x4(w0, a);
    mxfp4_f16x4(w1, b);
    float part[4] = {0.f, 0.f, 0.f, 0.f};
    mma_f16(part, a[0], b[0], a[1], b[1], bh.x, bh.y);
    mma_f16(part, a[0], b[0], a[1], b[1], bl.x, bl.y);
    mma_f16(part, a[2], b[2], a[3], b[3], bh.z, bh.w);
    mma_f16(part, a[2], b[2], a[3], b[3], bl.z, bl.w);
    acc[0] += s0 * part[0];
    acc[1] += s0 * part[1];
    acc[2] += s1 * part[2];
    acc[3] += s1 * part[3];
}

// The lane's B words for column token row `xr` (or zeros when xr < 0) at 32-group kg.
__device__ __forceinline__ void mma_b_words(const unsigned short* __restrict__ XH, const unsigned short* __restrict__ XL,
                                            int xr, int K, int kg, int q, uint4& bh, uint4& bl) {
    if (xr >= 0) {
        bh = __ldg(reinterpret_cast<const uint4*>(XH + (size_t)xr * K + kg * 32 + q * 8));
        bl = __ldg(reinterpret_cast<const uint4*>(XL + (size_t)xr * K + kg * 32 + q * 8));
    } else {
        bh = make_uint4(0u, 0u, 0u, 0u);
        bl = bh;
    }
}

// h[p, i] = silu(gate_e x_t) * (up_e x_t) for the pairs p = (token t, expert e) of routed slot u.
// At least 4 blocks per SM (<= 64 registers): occupancy, not the MMA, limits this kernel at
// decode sizes (measured on the H100: 33% -> 36% of bandwidth at 1 token, 47% -> 50% at 8).
extern "C" __global__ void __launch_bounds__(256, 4) moe_gate_up_mma(
    const unsigned char* __restrict__ Wg, const unsigned char* __restrict__ Sg, const unsigned char* __restrict__ Wu,
    const unsigned char* __restrict__ Su, const int* __restrict__ experts, const int* __restrict__ pair_off,
    const int* __restrict__ pair_tok, const unsigned short* __restrict__ XH, const unsigned short* __restrict__ XL,
    const float* __restrict__ xinv, float* __restrict__ h, int H, int I) { PDL_ENTER();
    __shared__ float red[MMA_WARPS][2][128];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    int i0 = blockIdx.x * 16, u = blockIdx.y;
    int r0 = min(i0 + g, I - 1), r1 = min(i0 + g + 8, I - 1);
    size_t e = (size_t)experts[u];
    const unsigned char* wg = Wg + e * I * (H / 2);
    const unsigned char* sg = Sg + e * I * (H / 32);
    const unsigned char* wu = Wu + e * I * (H / 2);
    const unsigned char* su = Su + e * I * (H / 32);
    for (int p0 = pair_off[u]; p0 < pair_off[u + 1]; p0 += 8) {
        int np = min(8, pair_off[u + 1] - p0);
        int xr = g < np ? pair_tok[p0 + g] : -1;
        float accg[4] = {0.f, 0.f, 0.f, 0.f}, accu[4] = {0.f, 0.f, 0.f, 0.f};
        for (int kg = 2 * w; kg < H / 32; kg += 2 * MMA_WARPS) {
#pragma unroll
            for (int j = 0; j < 2; j++) {
                uint4 bh, bl;
                mma_b_words(XH, XL, xr, H, kg + j, q, bh, bl);
                mxfp4_mma_group(wg, sg, r0, r1, H, kg + j, q, bh, bl, accg);
                mxfp4_mma_group(wu, su, r0, r1, H, kg + j, q, bh, bl, accu);
            }
        }
        // C fragment: c0 (row g, col 2q), c1 (g, 2q+1), c2 (g+8, 2q), c3 (g+8, 2q+1).
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int idx = (g + (i >> 1) * 8) * 8 + 2 * q + (i & 1);
            red[w][0][idx] = accg[i];
            red[w][1][idx] = accu[i];
        }
        __syncthreads();
        if (threadIdx.x < 128) {
            int row = threadIdx.x >> 3, col = threadIdx.x & 7;
            if (col < np && i0 + row < I) {
                float gs = 0.f, us = 0.f;
#pragma unroll
                for (int k = 0; k < MMA_WARPS; k++) { gs += red[k][0][threadIdx.x]; us += red[k][1][threadIdx.x]; }
                float sc = xinv[pair_tok[p0 + col]];
                gs *= sc;
                us *= sc;
                h[(size_t)(p0 + col) * I + i0 + row] = gs / (1.f + __expf(-gs)) * us;
            }
        }
        __syncthreads();
    }
}

// out[p, n] = pair_w[p] * (down_e h_p)[n] for the pairs of routed slot u (h split like x, one
// row per pair).
extern "C" __global__ void __launch_bounds__(256) moe_down_mma(
    const unsigned char* __restrict__ Wd, const unsigned char* __restrict__ Sd, const int* __restrict__ experts,
    const int* __restrict__ pair_off, const float* __restrict__ pair_w, const unsigned short* __restrict__ HH,
    const unsigned short* __restrict__ HL, const float* __restrict__ hinv, float* __restrict__ out, int H, int I) { PDL_ENTER();
    __shared__ float red[MMA_WARPS][128];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    int n0 = blockIdx.x * 16, u = blockIdx.y;
    int r0 = min(n0 + g, H - 1), r1 = min(n0 + g + 8, H - 1);
    size_t e = (size_t)experts[u];
    const unsigned char* wd = Wd + e * H * (I / 2);
    const unsigned char* sd = Sd + e * H * (I / 32);
    for (int p0 = pair_off[u]; p0 < pair_off[u + 1]; p0 += 8) {
        int np = min(8, pair_off[u + 1] - p0);
        int xr = g < np ? p0 + g : -1;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        for (int kg = 2 * w; kg < I / 32; kg += 2 * MMA_WARPS) {
#pragma unroll
            for (int j = 0; j < 2; j++) {
                uint4 bh, bl;
                mma_b_words(HH, HL, xr, I, kg + j, q, bh, bl);
                mxfp4_mma_group(wd, sd, r0, r1, I, kg + j, q, bh, bl, acc);
            }
        }
#pragma unroll
        for (int i = 0; i < 4; i++) red[w][(g + (i >> 1) * 8) * 8 + 2 * q + (i & 1)] = acc[i];
        __syncthreads();
        if (threadIdx.x < 128) {
            int row = threadIdx.x >> 3, col = threadIdx.x & 7;
            if (col < np && n0 + row < H) {
                float s = 0.f;
#pragma unroll
                for (int k = 0; k < MMA_WARPS; k++) s += red[k][threadIdx.x];
                out[(size_t)(p0 + col) * H + n0 + row] = s * hinv[p0 + col] * pair_w[p0 + col];
            }
        }
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------------------------
// MXFP4 MoE decode, pipelined. Same MMA layout and arithmetic as moe_gate_up_mma/moe_down_mma,
// but each warp streams its 16-row tile through a private ring of PIPE shared-memory stages with
// cp.async (16 bytes per lane, 32 contiguous bytes per row), so up to PIPE - 1 steps of weights
// are in flight per warp without holding registers: the register-loaded kernels were latency
// bound (ncu: 31% DRAM, stalls on L1 loads, occupancy capped by registers). A step is 64 values
// of K (two 32-groups, 32 bytes per row); each warp takes a contiguous range of steps. The E8M0
// scales of the next step are loaded into registers one step ahead.

#define PIPE 4
#define SROW 48  // bytes per row in a stage: 32 of codes + 16 of padding (conflict-free reads)

// (cp_async16 and cp_async_commit come from kernels/common.cuh.)
__device__ __forceinline__ void cp_async_wait_pipe() { cp_async_wait<PIPE - 1>(); }

// Accumulates rows (g, g+8) of the 16-row tiles at i0 of NM matrices W[m] (MXFP4, K columns,
// `rows` rows) over steps [s0, s1) against the B words of column token row xr (< 0: zeros).
template <int NM>
__device__ __forceinline__ void mxfp4_tile_pipe(const unsigned char* const* W, const unsigned char* const* S, unsigned char* ring,
                                                int i0, int rows, int K, int s0, int s1, int xr, const unsigned short* __restrict__ XH,
                                                const unsigned short* __restrict__ XL, float acc[NM][4]) {
    int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    int crow = min(i0 + (lane >> 1), rows - 1), half = lane & 1;
    int r0 = min(i0 + g, rows - 1), r1 = min(i0 + g + 8, rows - 1);
    size_t rb = K / 2, sb = K / 32;
    int n = s1 - s0;
    const int STAGE = NM * 16 * SROW;
#pragma unroll
    for (int p = 0; p < PIPE - 1; p++) {
        if (p < n) {
#pragma unroll
            for (int m = 0; m < NM; m++)
                cp_async16(ring + p * STAGE + m * 16 * SROW + (lane >> 1) * SROW + half * 16, W[m] + crow * rb + (size_t)(s0 + p) * 32 + half * 16);
        }
        cp_async_commit();
    }
    unsigned short sc[NM][2];
#pragma unroll
    for (int m = 0; m < NM; m++) {
        sc[m][0] = n > 0 ? __ldg(reinterpret_cast<const unsigned short*>(S[m] + r0 * sb + 2 * s0)) : 0;
        sc[m][1] = n > 0 ? __ldg(reinterpret_cast<const unsigned short*>(S[m] + r1 * sb + 2 * s0)) : 0;
    }
    for (int it = 0; it < n; it++) {
        int nx = it + PIPE - 1;
        if (nx < n) {
            unsigned char* st = ring + (nx % PIPE) * STAGE;
#pragma unroll
            for (int m = 0; m < NM; m++)
                cp_async16(st + m * 16 * SROW + (lane >> 1) * SROW + half * 16, W[m] + crow * rb + (size_t)(s0 + nx) * 32 + half * 16);
        }
        cp_async_commit();
        unsigned short scn[NM][2];
        bool more = it + 1 < n;
#pragma unroll
        for (int m = 0; m < NM; m++) {
            scn[m][0] = more ? __ldg(reinterpret_cast<const unsigned short*>(S[m] + r0 * sb + 2 * (s0 + it + 1))) : 0;
            scn[m][1] = more ? __ldg(reinterpret_cast<const unsigned short*>(S[m] + r1 * sb + 2 * (s0 + it + 1))) : 0;
        }
        uint4 bh[2], bl[2];
#pragma unroll
        for (int j = 0; j < 2; j++) mma_b_words(XH, XL, xr, K, 2 * (s0 + it) + j, q, bh[j], bl[j]);
        cp_async_wait_pipe();
        __syncwarp();
        const unsigned char* st = ring + (it % PIPE) * STAGE;
#pragma unroll
        for (int m = 0; m < NM; m++) {
#pragma unroll
            for (int j = 0; j < 2; j++) {
                unsigned w0 = *reinterpret_cast<const unsigned*>(st + m * 16 * SROW + g * SROW + j * 16 + q * 4);
                unsigned w1 = *reinterpret_cast<const unsigned*>(st + m * 16 * SROW + (g + 8) * SROW + j * 16 + q * 4);
                float f0 = e8m0_x16384((sc[m][0] >> (8 * j)) & 0xffu);
                float f1 = e8m0_x16384((sc[m][1] >> (8 * j)) & 0xffu);
                unsigned a[4], b[4];
                mxfp4_f16x4(w0, a);
                mxfp4_f16x4(w1, b);
                float part[4] = {0.f, 0.f, 0.f, 0.f};
                mma_f16(part, a[0], b[0], a[1], b[1], bh[j].x, bh[j].y);
                mma_f16(part, a[0], b[0], a[1], b[1], bl[j].x, bl[j].y);
                mma_f16(part, a[2], b[2], a[3], b[3], bh[j].z, bh[j].w);
                mma_f16(part, a[2], b[2], a[3], b[3], bl[j].z, bl[j].w);
                acc[m][0] += f0 * part[0];
                acc[m][1] += f0 * part[1];
                acc[m][2] += f1 * part[2];
                acc[m][3] += f1 * part[3];
            }
        }
        __syncwarp();  // every lane has read this stage before a later step overwrites it
#pragma unroll
        for (int m = 0; m < NM; m++) { sc[m][0] = scn[m][0]; sc[m][1] = scn[m][1]; }
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
}

// Warp kw's contiguous range of the K/64 steps, when `split` warps share a tile's K.
__device__ __forceinline__ void warp_steps(int K, int kw, int split, int& s0, int& s1) {
    int total = K / 64, per = (total + split - 1) / split;
    s0 = min(kw * per, total);
    s1 = min(s0 + per, total);
}

// h[p, i] = silu(gate_e x_t) * (up_e x_t), as moe_gate_up_mma. A block holds 8 / SPLIT tiles of
// 16 rows; SPLIT warps share each tile's K (fewer, longer-lived warps per tile when SPLIT is
// small; more blocks when it is large).
template <int SPLIT>
__device__ __forceinline__ void gate_up_pipe(const unsigned char* __restrict__ Wg, const unsigned char* __restrict__ Sg,
                                             const unsigned char* __restrict__ Wu, const unsigned char* __restrict__ Su,
                                             const int* __restrict__ experts, const int* __restrict__ pair_off,
                                             const int* __restrict__ pair_tok, const unsigned short* __restrict__ XH,
                                             const unsigned short* __restrict__ XL, const float* __restrict__ xinv,
                                             float* __restrict__ h, int H, int I) {
    constexpr int TILES = MMA_WARPS / SPLIT;
    __shared__ __align__(16) unsigned char smem[MMA_WARPS * PIPE * 2 * 16 * SROW];
    float(*red)[2][128] = reinterpret_cast<float(*)[2][128]>(smem);
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    int tile = w / SPLIT, kw = w % SPLIT;
    int i0 = (blockIdx.x * TILES + tile) * 16, u = blockIdx.y;
    size_t e = (size_t)experts[u];
    const unsigned char* W[2] = {Wg + e * I * (H / 2), Wu + e * I * (H / 2)};
    const unsigned char* S[2] = {Sg + e * I * (H / 32), Su + e * I * (H / 32)};
    unsigned char* ring = smem + w * PIPE * 2 * 16 * SROW;
    int s0, s1;
    warp_steps(H, kw, SPLIT, s0, s1);
    for (int p0 = pair_off[u]; p0 < pair_off[u + 1]; p0 += 8) {
        int np = min(8, pair_off[u + 1] - p0);
        int xr = g < np ? pair_tok[p0 + g] : -1;
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
        mxfp4_tile_pipe<2>(W, S, ring, i0, I, H, s0, s1, xr, XH, XL, acc);
        __syncthreads();  // every warp is done with its ring before it becomes the reduction buffer
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int idx = (g + (i >> 1) * 8) * 8 + 2 * q + (i & 1);
            red[w][0][idx] = acc[0][i];
            red[w][1][idx] = acc[1][i];
        }
        __syncthreads();
        for (int ent = threadIdx.x; ent < TILES * 128; ent += blockDim.x) {
            int t = ent >> 7, el = ent & 127, row = el >> 3, col = el & 7;
            int r = (blockIdx.x * TILES + t) * 16 + row;
            if (col < np && r < I) {
                float gs = 0.f, us = 0.f;
#pragma unroll
                for (int k = 0; k < SPLIT; k++) { gs += red[t * SPLIT + k][0][el]; us += red[t * SPLIT + k][1][el]; }
                float sc = xinv[pair_tok[p0 + col]];
                gs *= sc;
                us *= sc;
                h[(size_t)(p0 + col) * I + r] = gs / (1.f + __expf(-gs)) * us;
            }
        }
        __syncthreads();
    }
}

// out[p, n] = pair_w[p] * (down_e h_p)[n], as moe_down_mma; tiles as gate_up_pipe.
template <int SPLIT>
__device__ __forceinline__ void down_pipe(const unsigned char* __restrict__ Wd, const unsigned char* __restrict__ Sd,
                                          const int* __restrict__ experts, const int* __restrict__ pair_off,
                                          const float* __restrict__ pair_w, const unsigned short* __restrict__ HH,
                                          const unsigned short* __restrict__ HL, const float* __restrict__ hinv,
                                          float* __restrict__ out, int H, int I) {
    constexpr int TILES = MMA_WARPS / SPLIT;
    __shared__ __align__(16) unsigned char smem[MMA_WARPS * PIPE * 16 * SROW];
    float(*red)[128] = reinterpret_cast<float(*)[128]>(smem);
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    int tile = w / SPLIT, kw = w % SPLIT;
    int n0 = (blockIdx.x * TILES + tile) * 16, u = blockIdx.y;
    size_t e = (size_t)experts[u];
    const unsigned char* W[1] = {Wd + e * H * (I / 2)};
    const unsigned char* S[1] = {Sd + e * H * (I / 32)};
    unsigned char* ring = smem + w * PIPE * 16 * SROW;
    int s0, s1;
    warp_steps(I, kw, SPLIT, s0, s1);
    for (int p0 = pair_off[u]; p0 < pair_off[u + 1]; p0 += 8) {
        int np = min(8, pair_off[u + 1] - p0);
        int xr = g < np ? p0 + g : -1;
        float acc[1][4] = {{0.f, 0.f, 0.f, 0.f}};
        mxfp4_tile_pipe<1>(W, S, ring, n0, H, I, s0, s1, xr, HH, HL, acc);
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 4; i++) red[w][(g + (i >> 1) * 8) * 8 + 2 * q + (i & 1)] = acc[0][i];
        __syncthreads();
        for (int ent = threadIdx.x; ent < TILES * 128; ent += blockDim.x) {
            int t = ent >> 7, el = ent & 127, row = el >> 3, col = el & 7;
            int r = (blockIdx.x * TILES + t) * 16 + row;
            if (col < np && r < H) {
                float s = 0.f;
#pragma unroll
                for (int k = 0; k < SPLIT; k++) s += red[t * SPLIT + k][el];
                out[(size_t)(p0 + col) * H + r] = s * hinv[p0 + col] * pair_w[p0 + col];
            }
        }
        __syncthreads();
    }
}

#define MOE_PIPE(SPLIT)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256, 4) moe_gate_up_pipe_s##SPLIT(                                      \
        const unsigned char* __restrict__ Wg, const unsigned char* __restrict__ Sg, const unsigned char* __restrict__ Wu, \
        const unsigned char* __restrict__ Su, const int* __restrict__ experts, const int* __restrict__ pair_off,         \
        const int* __restrict__ pair_tok, const unsigned short* __restrict__ XH, const unsigned short* __restrict__ XL,   \
        const float* __restrict__ xinv, float* __restrict__ h, int H, int I) { PDL_ENTER();                                          \
        gate_up_pipe<SPLIT>(Wg, Sg, Wu, Su, experts, pair_off, pair_tok, XH, XL, xinv, h, H, I);                         \
    }                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, 4) moe_down_pipe_s##SPLIT(                                         \
        const unsigned char* __restrict__ Wd, const unsigned char* __restrict__ Sd, const int* __restrict__ experts,     \
        const int* __restrict__ pair_off, const float* __restrict__ pair_w, const unsigned short* __restrict__ HH,       \
        const unsigned short* __restrict__ HL, const float* __restrict__ hinv, float* __restrict__ out, int H, int I) { PDL_ENTER();  \
        down_pipe<SPLIT>(Wd, Sd, experts, pair_off, pair_w, HH, HL, hinv, out, H, I);                                    \
    }
MOE_PIPE(1)
MOE_PIPE(2)
MOE_PIPE(4)
MOE_PIPE(8)
