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

// FP4 E2M1 code -> float with bit operations (a lookup table in constant memory would serialise
// when lanes index it differently): codes 0..7 = {0, .5, 1, 1.5, 2, 3, 4, 6}, bit 3 = sign.
__device__ __forceinline__ float e2m1_to_f32(unsigned c) {
    unsigned e = (c >> 1) & 3u, m = c & 1u;
    unsigned bits = e ? (((e + 126u) << 23) | (m << 22)) : (m ? 0x3f000000u : 0u);
    return __int_as_float(bits | ((c & 8u) << 28));
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
                                     float* __restrict__ y, int N, int K, int T) {
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
                                    const float* __restrict__ x, float* __restrict__ y, int N, int K, int T) {
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
    float sc = e8m0_to_f32(scale_byte);
    unsigned u[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int b = 0; b < 4; b++) {
            unsigned byte = (u[i] >> (8 * b)) & 255u;
            w[8 * i + 2 * b] = e2m1_to_f32(byte & 15u) * sc;  // low nibble: even element
            w[8 * i + 2 * b + 1] = e2m1_to_f32(byte >> 4) * sc;
        }
}

// W MXFP4 [N, K/2] bytes + E8M0 scales [N, K/32]; K % 1024 == 0 not required: K % 32 == 0.
extern "C" __global__ void gemv_mxfp4(const unsigned char* __restrict__ W, const unsigned char* __restrict__ S,
                                      const float* __restrict__ x, float* __restrict__ y, int N, int K, int T) {
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
                                             float* __restrict__ h, int H, int I) {
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
                                          float* __restrict__ out, int H, int I) {
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

// MoE decode, phase 3: y[t, n] = sum over t's pairs (in slot order) of out[p, n]; deterministic.
// tok_pairs[t * topk + s] is the pair index of token t's slot s. Grid: (ceil(H / 256), T).
extern "C" __global__ void moe_combine(const float* __restrict__ out, const int* __restrict__ tok_pairs,
                                       float* __restrict__ y, int H, int topk) {
    int n = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (n >= H) return;
    float s = 0.f;
    for (int k = 0; k < topk; k++) s += out[(size_t)tok_pairs[t * topk + k] * H + n];
    y[(size_t)t * H + n] = s;
}
