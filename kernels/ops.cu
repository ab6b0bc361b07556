// The element-wise and attention kernels of the CUDA forward (f32 activations), mirroring the CPU
// reference (crates/cpu/src/model.rs) operation for operation.

// x[r, :] = table[token r, :] (f32 table; row_token below).
// Row-copy kernels run gridDim.y blocks per row: at decode sizes one block per row serialised
// its loads (the H100 spent ~17 us embedding one row of 4096).
// (PDL_ENTER and the f16 helpers come from kernels/common.cuh, block_sum, block_argmax and the
// router from kernels/route.cuh: compile.rs prepends both.)

// The KV pools' element type (kv_t): f32, BF16 bits when compiled with -DKV_BF16, or FP8 e4m3
// bytes with -DKV_FP8 (`--kv-cache-dtype bfloat16 / fp8`: the host builds this file once for
// each type it uses). Pool values are rounded to nearest even as they are written (kv_store; NaN
// stays NaN, FP8 saturates at +-448, as crates/core's KvDtype::round) and widened exactly as they
// are read (kv_val, kv_val4), so a kernel computes in f32 from the same values whichever type
// holds them. KV_VEC: elements in one 16-byte unit of a pool row (the cp.async copies).
#if defined(KV_BF16) && defined(KV_FP8)
#error "one KV pool type a build"
#endif
#if defined(KV_BF16) || defined(KV_FP8)
#define KV_PAIRS  // narrow pools: attention_v2's lanes load their values in pairs (kv_lane_pair)
#ifndef ATT_SPLIT_NARROW
// Narrow pools' values are exact in TF32 (8 and 4 significant bits within its 11), so the
// tensor-core attention kernels leave out their low parts, zero, and the MMAs on them
// (mma_tf32x2). Measurement builds with -DATT_SPLIT_NARROW split them as f32's.
#define KV_TF32_EXACT
#endif
#endif
__device__ __forceinline__ float kv_val(const float* p) { return *p; }
__device__ __forceinline__ float kv_val(const unsigned short* p) { return __uint_as_float((unsigned)*p << 16); }
__device__ __forceinline__ float4 kv_val4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 kv_val4(const unsigned short* p) {
    uint2 u = *reinterpret_cast<const uint2*>(p);
    return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16),
                       __uint_as_float(u.y & 0xffff0000u));
}
__device__ __forceinline__ void kv_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void kv_store(unsigned short* p, float v) {
    unsigned u = __float_as_uint(v);
    *p = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((u >> 16) | 0x40u) : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
#ifdef KV_FP8
// Two e4m3 bytes (low byte first) -> two f32, exactly (every e4m3 value is an f16 normal).
__device__ __forceinline__ float2 kv_fp8x2(unsigned short b) {
    unsigned h;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(b));
    return make_float2(f16_to_f32((unsigned short)(h & 0xffffu)), f16_to_f32((unsigned short)(h >> 16)));
}
__device__ __forceinline__ float kv_val(const unsigned char* p) { return kv_fp8x2(*p).x; }
__device__ __forceinline__ float4 kv_val4(const unsigned char* p) {
    const unsigned u = *reinterpret_cast<const unsigned*>(p);
    const float2 a = kv_fp8x2((unsigned short)(u & 0xffffu)), b = kv_fp8x2((unsigned short)(u >> 16));
    return make_float4(a.x, a.y, b.x, b.y);
}
// (cvt packs its first operand's byte high, its second's low.)
__device__ __forceinline__ void kv_store(unsigned char* p, float v) {
    unsigned short d;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(d) : "f"(0.f), "f"(v));
    *p = (unsigned char)(d & 0xffu);
}
#endif
#if defined(KV_BF16)
typedef unsigned short kv_t;
#define KV_VEC 8
#elif defined(KV_FP8)
typedef unsigned char kv_t;
#define KV_VEC 16
#else
typedef float kv_t;
#define KV_VEC 4
#endif
// v as the pool holds it (the fused decode kernels score their row's new K/V before storing it).
__device__ __forceinline__ float kv_round(float v) {
#ifdef KV_PAIRS
    kv_t b;
    kv_store(&b, v);
    return kv_val(&b);
#else
    return v;
#endif
}
// Element c of a lane's share of a K or V row in attention_v2's warps: lane + 32 c over f32
// pools; over BF16 and FP8 pools pairs, 2 lane + 64 (c / 2) + c % 2, so that each load brings a
// lane two values (lone 2-byte loads left a 32k-token step as long as over f32 pools).
__device__ __forceinline__ int kv_lane_elem(int lane, int c) {
#ifdef KV_PAIRS
    return 64 * (c >> 1) + 2 * lane + (c & 1);
#else
    return lane + 32 * c;
#endif
}
// Elements c and c + 1 (c even) of a lane's share of pool row `row` of `dim` values, 0 past its
// end (dim even over BF16 and FP8 pools).
__device__ __forceinline__ void kv_lane_pair(const kv_t* row, int lane, int c, int dim, float& a, float& b) {
#if defined(KV_BF16)
    const int e = kv_lane_elem(lane, c);
    const unsigned w = e < dim ? *reinterpret_cast<const unsigned*>(row + e) : 0u;
    a = __uint_as_float(w << 16);
    b = __uint_as_float(w & 0xffff0000u);
#elif defined(KV_FP8)
    const int e = kv_lane_elem(lane, c);
    const float2 v = e < dim ? kv_fp8x2(*reinterpret_cast<const unsigned short*>(row + e)) : make_float2(0.f, 0.f);
    a = v.x;
    b = v.y;
#else
    a = lane + 32 * c < dim ? row[lane + 32 * c] : 0.f;
    b = lane + 32 * (c + 1) < dim ? row[lane + 32 * (c + 1)] : 0.f;
#endif
}

// Row r's token: tok[r], or where tok[r] = -(j + 1) (a step chained on the one before it, whose
// sampled ids the host has not seen) row j of the ids at the device address chain[0].
__device__ __forceinline__ int row_token(const int* __restrict__ tok, const unsigned long long* __restrict__ chain, int r) {
    int t = tok[r];
    return t >= 0 ? t : reinterpret_cast<const int*>(chain[0])[-t - 1];
}

extern "C" __global__ void embed(const float* __restrict__ table, const int* __restrict__ tok, const unsigned long long* __restrict__ chain, float* __restrict__ x, int H) { PDL_ENTER();
    int r = blockIdx.x;
    size_t t = row_token(tok, chain, r);
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < H; i += blockDim.x * gridDim.y) x[(size_t)r * H + i] = table[t * H + i];
}

// Rows whose D is a multiple of 4 and at most 4 x NORM_V x blockDim keep their float4s in
// registers between the sum of squares and the scaling (one read of x, 16-byte accesses): the
// element-wise loops took ~17 us per 4096-wide row on the H100, 12% of a decode step.
#define NORM_V 4

__device__ __forceinline__ float sumsq4(float4 v) { return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w; }

__device__ __forceinline__ float4 plus4(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }

__device__ __forceinline__ float4 scale4(float4 w, float4 v, float inv) {
    return make_float4(w.x * (v.x * inv), w.y * (v.y * inv), w.z * (v.z * inv), w.w * (v.w * inv));
}

// What a residual add adds to row r: the rows of a [rows, D] ...
struct RowsAddend {
    const float* __restrict__ a;
    __device__ __forceinline__ float4 at4(size_t r, int c, int D) const { return reinterpret_cast<const float4*>(a + r * D)[c]; }
    __device__ __forceinline__ float at(size_t r, int i, int D) const { return a[r * D + i]; }
    __device__ __forceinline__ float4 add4(size_t r, int c, int D, float4 x) const { return plus4(x, at4(r, c, D)); }
    __device__ __forceinline__ float add1(size_t r, int i, int D, float x) const { return x + at(r, i, D); }
};

// ... or the routed MoE's output of the row, left by its down kernel as one row per routed
// pair (out [pairs, D]): the sum of the row's pairs in ascending pair order (ascending expert)
// from 0.f, exactly as moe.cu's combine_rows sums them into y. `sorted` holds the row's topk
// pair indices in that order (sort_row_pairs). Read past L1: the MoE kernel just wrote them.
// `pre` (or null): rows [rows, D] added to x first, (x + pre) + pairs: the attention output
// whose residual add the post-attention norm left to this one (gemv_f32_norm), the same bits
// as adding it there.
struct PairsAddend {
    const float* __restrict__ out;
    const int* sorted;
    int topk;
    const float* __restrict__ pre;
    __device__ __forceinline__ float4 at4(size_t, int c, int D) const {
        float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int j = 0; j < topk; j++) {
            float4 q = __ldcg(reinterpret_cast<const float4*>(out + (size_t)sorted[j] * D) + c);
            s = make_float4(s.x + q.x, s.y + q.y, s.z + q.z, s.w + q.w);
        }
        return s;
    }
    // at4's sum with the pairs' loads issued 8 at a time before their adds (the same adds in the
    // same order): one L2 round trip per 8 pairs where a thread has nothing else in flight.
    __device__ __forceinline__ float4 at4_ahead(int c, int D) const {
        float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int j0 = 0; j0 < topk; j0 += 8) {
            float4 q[8];
#pragma unroll
            for (int u = 0; u < 8; u++)
                if (j0 + u < topk) q[u] = __ldcg(reinterpret_cast<const float4*>(out + (size_t)sorted[j0 + u] * D) + c);
#pragma unroll
            for (int u = 0; u < 8; u++)
                if (j0 + u < topk) s = plus4(s, q[u]);
        }
        return s;
    }
    __device__ __forceinline__ float at(size_t, int i, int D) const {
        float s = 0.f;
        for (int j = 0; j < topk; j++) s += __ldcg(out + (size_t)sorted[j] * D + i);
        return s;
    }
    __device__ __forceinline__ float4 add4(size_t r, int c, int D, float4 x) const {
        if (pre) x = plus4(x, reinterpret_cast<const float4*>(pre + r * D)[c]);
        return plus4(x, at4(r, c, D));
    }
    __device__ __forceinline__ float add1(size_t r, int i, int D, float x) const {
        if (pre) x += pre[r * D + i];
        return x + at(r, i, D);
    }
};

// Block row r's pairs (tok_pairs [rows, topk], topk <= 32, distinct) in ascending order into sh
// (all threads; blockDim >= topk).
__device__ __forceinline__ const int* sort_row_pairs(const int* __restrict__ tok_pairs, int topk, int* sh) {
    const int* tp = tok_pairs + (size_t)blockIdx.x * topk;
    if ((int)threadIdx.x < topk) {
        int p = tp[threadIdx.x], rank = 0;
        for (int j = 0; j < topk; j++) rank += tp[j] < p;
        sh[rank] = p;
    }
    __syncthreads();
    return sh;
}

// norm_split_scale's estimate of a norm's largest |y| from P = max |w_i x_i| and the inverse RMS:
// P x inv, or 0 (no estimate: the exact reduction) where P < 2^-100, so no product that decides
// the row's largest magnitude is subnormal. (Where some x_i inv underflows, a weight past 2^26
// would be needed for its y_i to matter; the scale is then still a valid split's, only not
// necessarily split_f16's.)
__device__ __forceinline__ float split_estimate(float pm, float inv) { return pm >= 0x1p-100f ? pm * inv : 0.f; }

// The largest |w . v| of a float4 pair (the norm's estimate of its output's largest magnitude,
// before the inverse RMS is known; split_exponent_certain).
__device__ __forceinline__ float max_abs_prod4(float4 w, float4 v) {
    return fmaxf(fmaxf(fabsf(w.x * v.x), fabsf(w.y * v.y)), fmaxf(fabsf(w.z * v.z), fabsf(w.w * v.w)));
}

// block_sum of s (the same bits: the same shuffles, then the warps' sums in warp order, by
// warp 0 alone) and, in the same pass, the block's largest p, left in p. shp: 32 floats of its own.
__device__ __forceinline__ float block_sum_and_max(float s, float& p, float* sh, float* shp) {
    __shared__ float total[2];
    for (int o = 16; o > 0; o >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
        p = fmaxf(p, __shfl_xor_sync(0xffffffffu, p, o));
    }
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    if (l == 0) {
        sh[w] = s;
        shp[w] = p;
    }
    __syncthreads();
    if (w == 0) {
        float t = 0.f, m = 0.f;
        for (int i = 0; i < (int)(blockDim.x + 31) / 32; i++) {
            t += sh[i];
            m = fmaxf(m, shp[i]);
        }
        if (l == 0) {
            total[0] = t;
            total[1] = m;
        }
    }
    __syncthreads();
    p = total[1];
    return total[0];
}

// The register path of one row r of RMSNorm (D % 4 == 0, D <= 4 x NORM_V x blockDim): y = w *
// (x * rsqrt(mean(x^2) + eps)) after the residual add x += a (written back) when ADD; leaves
// the thread's float4s of y in v. EST (a norm that splits y next): *est = P x inv, with P the
// row's largest |w_i x_i|, reduced with the sum of squares (norm_split_scale's estimate).
template <bool ADD, class Addend = RowsAddend, bool EST = false>
__device__ __forceinline__ void norm_row_regs(float* __restrict__ x, Addend a, const float* __restrict__ w,
                                              float* __restrict__ y, int D, float eps, float4 v[NORM_V], float* sh,
                                              float* est = nullptr) {
    size_t r = blockIdx.x;
    float4* x4 = reinterpret_cast<float4*>(x + r * D);
    float4* y4 = reinterpret_cast<float4*>(y + r * D);
    const float4* w4 = reinterpret_cast<const float4*>(w);
    float s = 0.f, pm = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_V; j++) {
        int c = threadIdx.x + j * blockDim.x;
        if (c < D / 4) {
            v[j] = x4[c];
            if (ADD) {
                v[j] = a.add4(r, c, D, v[j]);
                x4[c] = v[j];
            }
            s += sumsq4(v[j]);
            if (EST) pm = fmaxf(pm, max_abs_prod4(w4[c], v[j]));
        }
    }
    if (EST) {
        __shared__ float shp[32];
        s = block_sum_and_max(s, pm, sh, shp);
    } else {
        s = block_sum(s, sh);
    }
    float inv = 1.f / sqrtf(s / D + eps);
    if (EST) *est = split_estimate(pm, inv);
#pragma unroll
    for (int j = 0; j < NORM_V; j++) {
        int c = threadIdx.x + j * blockDim.x;
        if (c < D / 4) {
            v[j] = scale4(w4[c], v[j], inv);
            y4[c] = v[j];
        }
    }
}

// One row r of RMSNorm, y = w * (x * rsqrt(mean(x^2) + eps)), after the residual add x += a
// (written back) when ADD.
template <bool ADD, class Addend = RowsAddend>
__device__ __forceinline__ void norm_row(float* __restrict__ x, Addend a, const float* __restrict__ w,
                                         float* __restrict__ y, int D, float eps) {
    __shared__ float sh[32];
    size_t r = blockIdx.x;
    if ((D & 3) == 0 && D <= 4 * NORM_V * (int)blockDim.x) {
        float4 v[NORM_V];
        norm_row_regs<ADD>(x, a, w, y, D, eps, v, sh);
        return;
    }
    float s = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float v = x[r * D + i];
        if (ADD) {
            v = a.add1(r, i, D, v);
            x[r * D + i] = v;
        }
        s += v * v;
    }
    s = block_sum(s, sh);
    float inv = 1.f / sqrtf(s / D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) y[r * D + i] = w[i] * (x[r * D + i] * inv);
}

// HF RMSNorm per row of D. Rows may be per-head (w has D entries, applied to every row).
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int D, float eps) { PDL_ENTER();
    norm_row<false>(const_cast<float*>(x), RowsAddend{nullptr}, w, y, D, eps);  // x is only read
}

// x[r, i] += b[i] (bias), over n rows of D.
extern "C" __global__ void add_bias(float* __restrict__ x, const float* __restrict__ b, int D, int n) { PDL_ENTER();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n * D) x[i] += b[i % D];
}

// a[i] += b[i]
extern "C" __global__ void add_inplace(float* __restrict__ a, const float* __restrict__ b, int n) { PDL_ENTER();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] += b[i];
}

// Rotate-half RoPE on the first 2*half dims of each head vector of row r (position pos[r]):
// inv_freq[i] = 1 / theta^(2i / rotary_dim), as the CPU reference computes it in f32.
extern "C" __global__ void rope(float* __restrict__ x, const int* __restrict__ pos, int heads, int hd, int half,
                                int rotary_dim, float theta) { PDL_ENTER();
    int r = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
    if (i >= half) return;
    float f = 1.f / powf(theta, (float)(2 * i) / (float)rotary_dim);
    float ang = (float)pos[r] * f, s, c;
    sincosf(ang, &s, &c);
    float* v = x + ((size_t)r * heads + h) * hd;
    float a = v[i], b = v[i + half];
    v[i] = a * c - b * s;
    v[i + half] = b * c + a * s;
}

// The drafter's per-head RMSNorm and RoPE in one launch, a block per (row, head) over q's qh
// heads then k's kh (rows q_stride / k_stride floats apart; w: hd entries each), in place: the
// bits of rms_norm (norm_row_regs' float4 per thread, block_sum, 32 * ceil(hd / 128) threads),
// then of rope. With pools (kc), each k head's block also writes that head of the row's K, as
// rotated, and of V times vscale (v: rows v_stride apart, vhd per head) into slot[row], as
// kv_write does. hd % 4 == 0, hd <= 4 * blockDim.
extern "C" __global__ void head_norm_rope(float* __restrict__ q, const float* __restrict__ qw, int qh, int q_stride,
                                          float* __restrict__ k, const float* __restrict__ kw, int kh, int k_stride,
                                          const float* __restrict__ v, int v_stride, int vhd, kv_t* __restrict__ kc,
                                          kv_t* __restrict__ vc, const long long* __restrict__ slot, float vscale,
                                          const int* __restrict__ pos, int hd, int half, int rotary_dim, float theta,
                                          float eps) { PDL_ENTER();
    __shared__ float sh[32];
    int b = blockIdx.x, heads = qh + kh;
    int r = b / heads, h = b % heads;
    bool is_k = h >= qh;
    if (is_k) h -= qh;
    float* x = is_k ? k + (size_t)r * k_stride + (size_t)h * hd : q + (size_t)r * q_stride + (size_t)h * hd;
    const float4* w4 = reinterpret_cast<const float4*>(is_k ? kw : qw);
    float4* x4 = reinterpret_cast<float4*>(x);
    int c = threadIdx.x;
    float4 val = make_float4(0.f, 0.f, 0.f, 0.f);
    float ss = 0.f;
    if (c < hd / 4) {
        val = x4[c];
        ss = sumsq4(val);
    }
    ss = block_sum(ss, sh);
    float inv = 1.f / sqrtf(ss / hd + eps);
    if (c < hd / 4) x4[c] = scale4(w4[c], val, inv);
    __syncthreads();
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float f = 1.f / powf(theta, (float)(2 * i) / (float)rotary_dim);
        float ang = (float)pos[r] * f, sn, cs;
        sincosf(ang, &sn, &cs);
        float a = x[i], bb = x[i + half];
        x[i] = a * cs - bb * sn;
        x[i + half] = bb * cs + a * sn;
    }
    if (!is_k || kc == nullptr) return;
    __syncthreads();
    size_t sl = (size_t)slot[r];
    for (int i = threadIdx.x; i < hd; i += blockDim.x) kv_store(kc + (sl * kh + h) * hd + i, x[i]);
    const float* vr = v + (size_t)r * v_stride + (size_t)h * vhd;
    for (int i = threadIdx.x; i < vhd; i += blockDim.x) kv_store(vc + (sl * kh + h) * vhd + i, vr[i] * vscale);
}

// K/V rows into the paged pool: slot[r] = block * block_size + offset; v scaled by vscale.
extern "C" __global__ void kv_write(const float* __restrict__ k, const float* __restrict__ v, kv_t* __restrict__ kc,
                                    kv_t* __restrict__ vc, const long long* __restrict__ slot, int kd, int vd, float vscale) { PDL_ENTER();
    int r = blockIdx.x;
    size_t s = (size_t)slot[r];
    for (int i = threadIdx.x; i < kd; i += blockDim.x) kv_store(kc + s * kd + i, k[(size_t)r * kd + i]);
    for (int i = threadIdx.x; i < vd; i += blockDim.x) kv_store(vc + s * vd + i, v[(size_t)r * vd + i] * vscale);
}

// One key of a warp's online softmax over one head (the f32 reference kernels `attention` and
// `draft_attention`): score q.k (lanes split the head dim), then m, l and the lane's V dims
// lane, lane + 32, ... (vd <= 128) rescaled and the key's value added.
// (K, V: the pool's kv_t, or the draft block's own f32 rows.)
template <typename K, typename V>
__device__ __forceinline__ void warp_attend_key(const float* __restrict__ qv, const K* __restrict__ kv,
                                                const V* __restrict__ vv, int lane, int hd, int vd, float scale,
                                                float& m, float& l, float acc[4]) {
    float d = 0.f;
    for (int i = lane; i < hd; i += 32) d += qv[i] * kv_val(kv + i);
    for (int o2 = 16; o2 > 0; o2 >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o2);
    float sc = d * scale;
    float mn = fmaxf(m, sc);
    float corr = __expf(m - mn), pe = __expf(sc - mn);
    l = l * corr + pe;
#pragma unroll
    for (int c = 0; c < 4; c++) {
        int i = lane + 32 * c;
        acc[c] = acc[c] * corr + (i < vd ? pe * kv_val(vv + i) : 0.f);
    }
    m = mn;
}

// Their epilogue: head h's sink logit (if any) joins the softmax, then o = acc / l.
__device__ __forceinline__ void warp_attention_out(const float* __restrict__ sinks, int h, float m, float l, float acc[4],
                                                   float* __restrict__ ov, int lane, int vd) {
    if (sinks) {
        float sc = sinks[h];
        float mn = fmaxf(m, sc);
        float corr = __expf(m - mn);
        l = l * corr + __expf(sc - mn);
#pragma unroll
        for (int c = 0; c < 4; c++) acc[c] *= corr;
    }
#pragma unroll
    for (int c = 0; c < 4; c++) {
        int i = lane + 32 * c;
        if (i < vd) ov[i] = acc[c] / l;
    }
}

// Paged causal attention, one block (one warp) per (row, head): query row r at position pos[r]
// attends keys lo..pos (lo from the sliding window), with an optional sink logit per head, with
// online softmax. table: the row's sequence block table (tables + seq[r] * max_blocks).
extern "C" __global__ void attention(const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc,
                                     float* __restrict__ o, const int* __restrict__ pos, const int* __restrict__ seq,
                                     const int* __restrict__ tables, int max_blocks, int block_size, int heads, int kv_heads,
                                     int hd, int vd, int window, float scale, const float* __restrict__ sinks) { PDL_ENTER();
    int r = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    int kvh = h / (heads / kv_heads);
    const float* qv = q + ((size_t)r * heads + h) * hd;
    const int* table = tables + (size_t)seq[r] * max_blocks;
    int p = pos[r];
    int lo = window > 0 ? max(0, p + 1 - window) : 0;
    float m = __int_as_float(0xff800000u), l = 0.f;  // -inf
    float acc[4] = {0.f, 0.f, 0.f, 0.f};  // vd <= 128: lane owns dims lane, lane+32, ...
    for (int j = lo; j <= p; j++) {
        size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
        warp_attend_key(qv, kc + (slot * kv_heads + kvh) * hd, vc + (slot * kv_heads + kvh) * vd, lane, hd, vd, scale, m, l, acc);
    }
    warp_attention_out(sinks, h, m, l, acc, o + ((size_t)r * heads + h) * vd, lane, vd);
}

// a[r, c] = silu(g[r ld + c]) * u[r ld + c] for the n = rows x I values of a (g and u may be
// one stacked gate_up output, ld = 2 I, u = g + I).
extern "C" __global__ void silu_mul(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ a, int I, int ld, int n) { PDL_ENTER();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        size_t j = (size_t)(i / I) * ld + i % I;
        a[i] = silu_mul_value(g[j], u[j]);
    }
}

// y[j, :] = x[idx[j], :]
extern "C" __global__ void gather_rows(const float* __restrict__ x, const int* __restrict__ idx, float* __restrict__ y, int D) { PDL_ENTER();
    int j = blockIdx.x;
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < D; i += blockDim.x * gridDim.y) y[(size_t)j * D + i] = x[(size_t)idx[j] * D + i];
}

// y[idx[j], :] += w[j] * x[j, :], for j in order (one launch per expert: rows of one launch are
// distinct tokens, so there are no write conflicts).
extern "C" __global__ void scatter_add_scaled(const float* __restrict__ x, const int* __restrict__ idx, const float* __restrict__ w,
                                              float* __restrict__ y, int D) { PDL_ENTER();
    int j = blockIdx.x;
    for (int i = threadIdx.x; i < D; i += blockDim.x) y[(size_t)idx[j] * D + i] += w[j] * x[(size_t)j * D + i];
}

// s + w . v, in the order gemv_f32 and gemv_f32_norm both sum (the same logits).
__device__ __forceinline__ float dot4_acc(float s, float4 w, float4 v) { return s + (w.x * v.x + w.y * v.y + w.z * v.z + w.w * v.w); }

// y[t, n] = W[n, :] . x[t, :] for f32 W (one warp per (row, token)).
// y[t, n] = W[n] . x[t] for f32 W [N, K] (routers, exact-f32 fallbacks): one block per row n.
// When K % 4 == 0 and K <= 16 x blockDim each thread holds its slice of the row in registers and
// reuses it for every token (one warp per (row, token) walking K alone was latency bound: 13.5 us
// for a 256 x 4096 router, 300 GB/s).
// The row is loaded before the wait for the kernel ahead (programmatic dependent launch; weights
// never depend on it), so a router's 4 MB come in while the norm before it runs.
extern "C" __global__ void gemv_f32(const float* __restrict__ W, const float* __restrict__ x, float* __restrict__ y, int N, int K, int T) {
    __shared__ float sh[32];
    int n = blockIdx.x;
    const float* wr = W + (size_t)n * K;
    if ((K & 3) == 0 && K <= 16 * (int)blockDim.x) {
        const float4* w4 = reinterpret_cast<const float4*>(wr);
        float4 w[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int c = threadIdx.x + j * blockDim.x;
            w[j] = c < K / 4 ? __ldg(w4 + c) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        PDL_ENTER();
        for (int t = 0; t < T; t++) {
            const float4* x4 = reinterpret_cast<const float4*>(x + (size_t)t * K);
            float s = 0.f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int c = threadIdx.x + j * blockDim.x;
                if (c < K / 4) s = dot4_acc(s, w[j], x4[c]);
            }
            s = block_sum(s, sh);
            if (threadIdx.x == 0) y[(size_t)t * N + n] = s;
        }
        return;
    }
    PDL_ENTER();
    for (int t = 0; t < T; t++) {
        float s = 0.f;
        for (int k = threadIdx.x; k < K; k += blockDim.x) s += wr[k] * x[(size_t)t * K + k];
        s = block_sum(s, sh);
        if (threadIdx.x == 0) y[(size_t)t * N + n] = s;
    }
}

// gemv_f32's register path for many tokens, with its bits: y[t, n] = W[n] . x[t] for f32 W
// [N, K], K % 4 == 0, blockDim = gemv_f32's for K (the host's gemv_f32_threads), at most 512
// (K <= 8192). gemv_f32 walks the tokens one after another, a block_sum (two barriers)
// each, one block per weight row, so a router of 256 rows took ~15 us at 16 tokens and the
// tiled gemm_f32_nt ~100 us at 32-64 (its 4-8 blocks). Here a block takes F32T_ROWS rows x tt
// tokens (tt <= F32T_TOKENS, the host's choice: fewer where the batch is small, so more blocks
// walk shorter chains of tokens): thread t holds each row's float4s t + B j (j < 4) as
// gemv_f32's thread t does, sums each (row, token) in gemv_f32's order (dot4_acc over j, the
// warp's xor tree) into shared memory, and after one barrier the block adds each pair's warp
// sums in warp order, as block_sum does. Grid (ceil(N / F32T_ROWS), ceil(T / tt)).
#define F32T_ROWS 4
#define F32T_TOKENS 16
extern "C" __global__ void __launch_bounds__(512) gemv_f32_tiles(const float* __restrict__ W, const float* __restrict__ x,
                                                                  float* __restrict__ y, int N, int K, int T, int tt) {
    __shared__ float sh[F32T_ROWS * F32T_TOKENS][32];
    const int tid = threadIdx.x, B = blockDim.x, K4 = K / 4, lane = tid & 31, wp = tid >> 5;
    const int n0 = blockIdx.x * F32T_ROWS, t0 = blockIdx.y * tt, nt = min(tt, T - t0);
    float4 w[F32T_ROWS][4];
#pragma unroll
    for (int r = 0; r < F32T_ROWS; r++) {
        const float4* w4 = reinterpret_cast<const float4*>(W + (size_t)min(n0 + r, N - 1) * K);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int c = tid + j * B;
            w[r][j] = c < K4 ? __ldg(w4 + c) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
    PDL_ENTER();  // (the weights never depend on the kernel ahead)
    // Token i + 1's activations are loaded while token i is summed: one L2 round trip per token
    // in a chain of up to 16 had been most of the kernel's time at 32-64 rows. (Measurement
    // builds: -DF32T_LOAD_IN_TURN loads each token's as it comes, as before; the same bits.)
    float4 v[4], vn[4] = {};
    auto load_x = [&](int i, float4 (&d)[4]) {
        const float4* x4 = reinterpret_cast<const float4*>(x + (size_t)(t0 + i) * K);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int c = tid + j * B;
            d[j] = c < K4 ? x4[c] : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    load_x(0, v);
    for (int i = 0; i < nt; i++) {
#ifdef F32T_LOAD_IN_TURN
        load_x(i, v);
#else
        if (i + 1 < nt) load_x(i + 1, vn);
#endif
#pragma unroll
        for (int r = 0; r < F32T_ROWS; r++) {
            float s = 0.f;
#pragma unroll
            for (int j = 0; j < 4; j++)
                if (tid + j * B < K4) s = dot4_acc(s, w[r][j], v[j]);
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
            if (lane == 0) sh[r * F32T_TOKENS + i][wp] = s;
        }
#ifndef F32T_LOAD_IN_TURN
#pragma unroll
        for (int j = 0; j < 4; j++) v[j] = vn[j];
#endif
    }
    __syncthreads();
    const int warps = (B + 31) / 32;
    for (int p = tid; p < F32T_ROWS * nt; p += B) {
        const int r = p / nt, i = p % nt;
        if (n0 + r >= N) continue;
        float s = 0.f;
        for (int q = 0; q < warps; q++) s += sh[r * F32T_TOKENS + i][q];
        y[(size_t)(t0 + i) * N + n0 + r] = s;
    }
}

// gemv_f32 over the post-attention norm of its input, which every block computes itself:
// xn = RMSNorm(x + a) * nw, with add_rms_norm's arithmetic, so the same xn and the same logits
// as add_rms_norm then gemv_f32. The norm's reduction is reproduced: add_rms_norm runs
// ceil32(K / 4) threads, one float4 each (norm_cfg, K <= 4096), and this block's thread t holds
// float4s t + B j (j < 4, gemv_f32's register path with B = ceil32(K / 16) threads), which are
// that launch's threads t + B j: per j the same warp sums, then the same sequential sum over its
// warps. Block 0 writes xn (the MoE's input). x is not written: the residual add is left to the
// one after the MoE (PairsAddend's `pre`), so no block reads x while another writes it. One
// launch per MoE layer fewer at one token (the norm's). K % 4 == 0, K <= 16 x blockDim, K <= 4096.
// The router row and nw (weights) are loaded before the wait, x and a after it.
extern "C" __global__ void gemv_f32_norm(const float* __restrict__ W, const float* __restrict__ x, const float* __restrict__ a,
                                         const float* __restrict__ nw, float* __restrict__ y, float* __restrict__ xn, int N, int K,
                                         int T, float eps) {
    __shared__ float sh[32];
    int n = blockIdx.x, tid = threadIdx.x, B = blockDim.x;
    const int K4 = K / 4, NT = (K4 + 31) / 32 * 32;  // add_rms_norm's threads
    const float4* w4 = reinterpret_cast<const float4*>(W + (size_t)n * K);
    const float4* nw4 = reinterpret_cast<const float4*>(nw);
    float4 w[4], g[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        int c = tid + j * B;
        w[j] = c < K4 ? __ldg(w4 + c) : make_float4(0.f, 0.f, 0.f, 0.f);
        g[j] = c < K4 ? __ldg(nw4 + c) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    PDL_ENTER();
    for (int t = 0; t < T; t++) {
        const float4* x4 = reinterpret_cast<const float4*>(x + (size_t)t * K);
        const float4* a4 = reinterpret_cast<const float4*>(a + (size_t)t * K);
        float4 v[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int c = tid + j * B;
            v[j] = c < K4 ? plus4(x4[c], a4[c]) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        // add_rms_norm's thread c: s = 0.f (+ sumsq4 of its float4 when c < K / 4); warp sums.
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int c = tid + j * B;
            if (c - (tid & 31) < NT) {  // warp-uniform: the warp's first c is one of its threads
                float q = c < K4 ? 0.f + sumsq4(v[j]) : 0.f;
                for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
                if ((tid & 31) == 0) sh[c >> 5] = q;
            }
        }
        __syncthreads();
        float ss = 0.f;
        for (int i = 0; i < NT / 32; i++) ss += sh[i];
        __syncthreads();
        float inv = 1.f / sqrtf(ss / K + eps);
        float s = 0.f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int c = tid + j * B;
            if (c < K4) {
                float4 e = scale4(g[j], v[j], inv);
                if (n == 0) reinterpret_cast<float4*>(xn + (size_t)t * K)[c] = e;
                s = dot4_acc(s, w[j], e);
            }
        }
        s = block_sum(s, sh);
        if (tid == 0) y[(size_t)t * N + n] = s;
    }
}

// dst[q, off + j] = src[r, j] for j < D (dst rows of width W), q = rows[r] or r without rows:
// building concatenated features (a decode step's straight into its sequences' rings).
extern "C" __global__ void copy_cols(const float* __restrict__ src, float* __restrict__ dst, int D, int W, int off, const int* __restrict__ rows) { PDL_ENTER();
    int r = blockIdx.x;
    size_t q = rows ? rows[r] : r;
    for (int j = threadIdx.x; j < D; j += blockDim.x) dst[q * W + off + j] = src[(size_t)r * D + j];
}

// Runs of the drafter's rings to flush, by value (`RingRuns` in crates/cuda/src/draft_staging.rs):
// run i is count[i] rows from ring row ring0[i], position pos0[i] and pool slot slot0[i] on.
#define RING_RUNS 64
struct RingRuns {
    int n;
    int ring0[RING_RUNS];
    int pos0[RING_RUNS];
    int count[RING_RUNS];
    long long slot0[RING_RUNS];
};

// The runs' rows in order, a block a row: features out of the rings with their positions and
// pool slots, for write_draft_context (no host copy per flush).
extern "C" __global__ void ring_gather(const float* __restrict__ ring, RingRuns R, float* __restrict__ out, int* __restrict__ pos, long long* __restrict__ slots, int D) { PDL_ENTER();
    int r = blockIdx.x, i = 0, first = 0;
    while (i + 1 < R.n && r >= first + R.count[i]) first += R.count[i++];
    int k = r - first;
    if (threadIdx.x == 0) {
        pos[r] = R.pos0[i] + k;
        slots[r] = R.slot0[i] + k;
    }
    for (int j = threadIdx.x; j < D; j += blockDim.x) out[(size_t)r * D + j] = ring[(size_t)(R.ring0[i] + k) * D + j];
}

// x[rows[j], :] = v (e.g. the MASK embedding), then nothing else.
extern "C" __global__ void fill_rows(float* __restrict__ x, const int* __restrict__ rows, const float* __restrict__ v, int D) { PDL_ENTER();
    int j = blockIdx.x;
    for (int i = threadIdx.x; i < D; i += blockDim.x) x[(size_t)rows[j] * D + i] = v[i];
}

// a[i] *= s
extern "C" __global__ void scale(float* __restrict__ a, float s, int n) { PDL_ENTER();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] *= s;
}

// DFlash draft attention, one block per (block row, head): keys are the drafter's context K/V
// in the paged pool at positions [lo, start) of the row's sequence, then the block's own rows
// (first .. first + nb), at positions start .. start + nb - 1. Visible: kpos <= qpos when causal,
// |qpos - kpos| < window when windowed, so the visible keys are one range [lo, hi]. Warp w of
// the block's W takes keys lo + w, lo + w + W, ... with its own online softmax; the warps'
// states then merge in shared memory (in warp order, so the same bits on every run), with the
// sink logit if any. One warp walking the whole context (W = 1, the old form and the same bits)
// paid one dependent round trip per key: ~0.5 us each, most of the demo's draft pass.
constexpr int DRAFT_ATT_MAX_WARPS = 16;
extern "C" __global__ void draft_attention(const float* __restrict__ q, const float* __restrict__ kb, const float* __restrict__ vb,
                                           const kv_t* __restrict__ kc, const kv_t* __restrict__ vc, float* __restrict__ o,
                                           const int* __restrict__ row_seq, const int* __restrict__ row_idx,
                                           const int* __restrict__ seq_start, const int* __restrict__ seq_first,
                                           const int* __restrict__ seq_nb, const int* __restrict__ tables, int max_blocks,
                                           int block_size, int heads, int kv_heads, int hd, int vd, int window, int causal,
                                           float scale, const float* __restrict__ sinks) { PDL_ENTER();
    __shared__ float st_m[DRAFT_ATT_MAX_WARPS], st_l[DRAFT_ATT_MAX_WARPS], st_acc[DRAFT_ATT_MAX_WARPS][128];
    int r = blockIdx.x, h = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int kvh = h / (heads / kv_heads);
    int s = row_seq[r], start = seq_start[s], first = seq_first[s], nb = seq_nb[s];
    int qpos = start + row_idx[r];
    const float* qv = q + ((size_t)r * heads + h) * hd;
    const int* table = tables + (size_t)s * max_blocks;
    float m = __int_as_float(0xff800000u), l = 0.f;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int lo = window > 0 ? max(0, qpos - window + 1) : 0;
    int hi = start + nb - 1;
    if (causal) hi = min(hi, qpos);
    if (window > 0) hi = min(hi, qpos + window - 1);
    for (int j = lo + w; j <= hi; j += nw) {
        if (j < start) {
            size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
            warp_attend_key(qv, kc + (slot * kv_heads + kvh) * hd, vc + (slot * kv_heads + kvh) * vd, lane, hd, vd, scale, m, l, acc);
        } else {
            size_t br = (size_t)(first + j - start);
            warp_attend_key(qv, kb + (br * kv_heads + kvh) * hd, vb + (br * kv_heads + kvh) * vd, lane, hd, vd, scale, m, l, acc);
        }
    }
    if (nw == 1) {
        warp_attention_out(sinks, h, m, l, acc, o + ((size_t)r * heads + h) * vd, lane, vd);
        return;
    }
    if (lane == 0) {
        st_m[w] = m;
        st_l[w] = l;
    }
#pragma unroll
    for (int c = 0; c < 4; c++) {
        int i = lane + 32 * c;
        if (i < vd) st_acc[w][i] = acc[c];
    }
    __syncthreads();
    if (w != 0) return;
    // Warp 0 folds warps 1.. into its state as one more key each would: rescale by the larger
    // maximum (a warp with no keys has m = -inf, l = 0 and adds nothing).
    for (int u = 1; u < nw; u++) {
        float mu = st_m[u];
        if (mu == __int_as_float(0xff800000u)) continue;
        float mn = fmaxf(m, mu);
        float ca = __expf(m - mn), cb = __expf(mu - mn);
        l = l * ca + st_l[u] * cb;
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int i = lane + 32 * c;
            acc[c] = acc[c] * ca + (i < vd ? st_acc[u][i] * cb : 0.f);
        }
        m = mn;
    }
    warp_attention_out(sinks, h, m, l, acc, o + ((size_t)r * heads + h) * vd, lane, vd);
}

// One key of draft_attention_rows for the lane's row: its part of q.k over its dq dims (q in
// registers), summed over the row's 4 lanes (every lane takes part), then, where the key is
// visible to the row, the online softmax and its dv dims of V.
constexpr int DAR_ROWS = 8, DAR_DIMS = 32;
template <typename K, typename V>
__device__ __forceinline__ void rows_attend_key(const float (&qr)[DAR_DIMS], const K* __restrict__ kp, const V* __restrict__ vp,
                                                int dq, int dv, float scale, bool visible, float& m, float& l,
                                                float (&acc)[DAR_DIMS]) {
    float d = 0.f;
#pragma unroll
    for (int i = 0; i < DAR_DIMS; i += 4) {
        if (i < dq) {
            float4 k4 = kv_val4(kp + i);
            d += qr[i] * k4.x + qr[i + 1] * k4.y + qr[i + 2] * k4.z + qr[i + 3] * k4.w;
        }
    }
    d += __shfl_xor_sync(0xffffffffu, d, 1);
    d += __shfl_xor_sync(0xffffffffu, d, 2);
    if (!visible) return;
    float sc = d * scale;
    float mn = fmaxf(m, sc);
    float corr = __expf(m - mn), pe = __expf(sc - mn);
    l = l * corr + pe;
#pragma unroll
    for (int i = 0; i < DAR_DIMS; i += 4) {
        if (i < dv) {
            float4 v4 = kv_val4(vp + i);
            acc[i] = acc[i] * corr + pe * v4.x;
            acc[i + 1] = acc[i + 1] * corr + pe * v4.y;
            acc[i + 2] = acc[i + 2] * corr + pe * v4.z;
            acc[i + 3] = acc[i + 3] * corr + pe * v4.w;
        }
    }
    m = mn;
}

// DFlash draft attention with a block per (sequence, head) over all its block rows (at most
// DAR_ROWS): each visible key's K and V rows are read once for every row of the block, where
// draft_attention reads them once a row. Lanes in groups of 4, group g for block row g: lane t
// holds dims [t dq, (t + 1) dq) of the row's query and of its V accumulator (dq = hd / 4,
// dv = vd / 4, multiples of 4, at most DAR_DIMS). Warps take keys strided over the rows' union
// range [lo(first row), last row] and each row keeps the keys it sees (draft_attention's rule);
// the warps' states merge in warp order in shared memory, with the sink logit.
extern "C" __global__ void __launch_bounds__(256) draft_attention_rows(
    const float* __restrict__ q, const float* __restrict__ kb, const float* __restrict__ vb, const kv_t* __restrict__ kc,
    const kv_t* __restrict__ vc, float* __restrict__ o, const int* __restrict__ seq_start, const int* __restrict__ seq_first,
    const int* __restrict__ seq_nb, const int* __restrict__ tables, int max_blocks, int block_size, int heads, int kv_heads,
    int hd, int vd, int window, int causal, float scale, const float* __restrict__ sinks) { PDL_ENTER();
    constexpr int W = 8;
    __shared__ float st_m[W][DAR_ROWS], st_l[W][DAR_ROWS], st_acc[W][DAR_ROWS][4 * DAR_DIMS];
    int s = blockIdx.x, h = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int g = lane >> 2, t = lane & 3;
    int start = seq_start[s], first = seq_first[s], nb = seq_nb[s];
    bool live = g < nb;
    int qpos = start + g, kvh = h / (heads / kv_heads), dq = hd / 4, dv = vd / 4;
    const int* table = tables + (size_t)s * max_blocks;
    float qr[DAR_DIMS], acc[DAR_DIMS];
    const float* qv = q + ((size_t)(first + (live ? g : 0)) * heads + h) * hd + t * dq;
#pragma unroll
    for (int i = 0; i < DAR_DIMS; i++) {
        qr[i] = i < dq ? qv[i] : 0.f;
        acc[i] = 0.f;
    }
    float m = __int_as_float(0xff800000u), l = 0.f;
    int lo = window > 0 ? max(0, start - window + 1) : 0;
    for (int j = lo + w; j < start + nb; j += W) {
        bool visible = live && (!causal || j <= qpos) && (window <= 0 || abs(qpos - j) < window);
        if (j < start) {
            size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
            rows_attend_key(qr, kc + (slot * kv_heads + kvh) * hd + t * dq, vc + (slot * kv_heads + kvh) * vd + t * dv, dq, dv, scale, visible, m, l, acc);
        } else {
            size_t br = (size_t)(first + j - start);
            rows_attend_key(qr, kb + (br * kv_heads + kvh) * hd + t * dq, vb + (br * kv_heads + kvh) * vd + t * dv, dq, dv, scale, visible, m, l, acc);
        }
    }
    if (live) {
        if (t == 0) {
            st_m[w][g] = m;
            st_l[w][g] = l;
        }
#pragma unroll
        for (int i = 0; i < DAR_DIMS; i++)
            if (i < dv) st_acc[w][g][t * dv + i] = acc[i];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < nb * vd; e += blockDim.x) {
        int gg = e / vd, dd = e % vd;
        float mx = sinks ? sinks[h] : __int_as_float(0xff800000u);
        for (int u = 0; u < W; u++) mx = fmaxf(mx, st_m[u][gg]);
        float den = sinks ? __expf(sinks[h] - mx) : 0.f, num = 0.f;
        for (int u = 0; u < W; u++) {
            float c = __expf(st_m[u][gg] - mx);  // a warp that saw no key: m = -inf, c = 0
            den += st_l[u][gg] * c;
            num += st_acc[u][gg][dd] * c;
        }
        o[((size_t)(first + gg) * heads + h) * vd + dd] = num / den;
    }
}

// x[r, :] = table[token r, :] for a BF16 table (u16 bits).
extern "C" __global__ void embed_bf16(const unsigned short* __restrict__ table, const int* __restrict__ tok, const unsigned long long* __restrict__ chain, float* __restrict__ x, int H) { PDL_ENTER();
    int r = blockIdx.x;
    size_t t = row_token(tok, chain, r);
    for (int i = blockIdx.y * blockDim.x + threadIdx.x; i < H; i += blockDim.x * gridDim.y)
        x[(size_t)r * H + i] = __uint_as_float((unsigned)table[t * H + i] << 16);
}

// The residual add fused with the next RMSNorm: x[r] += a[r]; y[r] = RMSNorm(x[r]) * w (the
// same arithmetic as add_inplace followed by rms_norm).
extern "C" __global__ void add_rms_norm(float* __restrict__ x, const float* __restrict__ a, const float* __restrict__ w,
                                        float* __restrict__ y, int D, float eps) { PDL_ENTER();
    norm_row<true>(x, RowsAddend{a}, w, y, D, eps);
}

// add_rms_norm adding the routed MoE's output straight from its pairs (PairsAddend: out
// [pairs, D], tok_pairs [rows, topk]), so the MoE's down kernel leaves them uncombined: the same
// bits as its combine followed by add_rms_norm.
// (Up to 1024 threads, as norm_cfg launches them: the bound keeps ptxas within 64 registers.)
extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_pairs(float* __restrict__ x, const float* __restrict__ out, const int* __restrict__ tok_pairs,
                                              int topk, const float* __restrict__ pre, const float* __restrict__ w, float* __restrict__ y, int D, float eps) { PDL_ENTER();
    __shared__ int sorted[32];
    norm_row<true>(x, PairsAddend{out, sort_row_pairs(tok_pairs, topk, sorted), topk, pre}, w, y, D, eps);
}

// x[r] += the routed MoE's output of row r from its pairs (the last layer's residual add):
// blocks (row r, grid.y column blocks), a thread per float4 of x where D % 4 == 0, its pairs'
// loads issued 8 at a time (at4_ahead) and added in PairsAddend's order (x + pre, then the
// pairs' sum from zero in ascending pair order), so the same bits. One block walking the row, each element's 8
// loads one after another, took ~16 us of a batch-1 step.
extern "C" __global__ void add_pairs_inplace(float* __restrict__ x, const float* __restrict__ out, const int* __restrict__ tok_pairs,
                                             int topk, const float* __restrict__ pre, int D) { PDL_ENTER();
    __shared__ int sorted[32];
    PairsAddend a{out, sort_row_pairs(tok_pairs, topk, sorted), topk, pre};
    size_t r = blockIdx.x;
    int i0 = blockIdx.y * blockDim.x + threadIdx.x, step = blockDim.x * gridDim.y;
    if (D % 4 != 0) {
        for (int i = i0; i < D; i += step) x[r * D + i] = a.add1(r, i, D, x[r * D + i]);
        return;
    }
    float4* xr = reinterpret_cast<float4*>(x + r * D);
    for (int c = i0; c < D / 4; c += step) {
        float4 v = xr[c];
        if (pre) v = plus4(v, reinterpret_cast<const float4*>(pre + r * D)[c]);
        xr[c] = plus4(v, a.at4_ahead(c, D));
    }
}

// Whether the power of two of a norm's largest |y| is that of est = fl(P x inv), P = max |w_i
// x_i| (reduced with the sum of squares): each y_i = fl(w_i fl(x_i inv)) is within three
// roundings of |w_i x_i| inv and P within one of the largest, so the largest |y_i| lies within
// a relative 2^-22 of est, which fixes its exponent unless est is within 16 ulps of a power of
// two. est must also be normal above 2^-100 and finite (zero, NaN and infinite rows take the
// exact reduction). Block-uniform: every thread holds the same est.
__device__ __forceinline__ bool split_exponent_certain(float est) {
    unsigned b = __float_as_uint(est) & 0x7fffffffu, e = b >> 23, man = b & 0x7fffffu;
#ifdef NORM_SPLIT_EXACT_MAX  // measurement builds: always the second reduction, as before
    return false;
#endif
    return e >= 27u && e < 0xffu && man >= 16u && man <= 0x7fffffu - 16u;
}

// y's power of two for an F16 hi + lo split, from the row v[] a norm holds (all threads): the
// largest magnitude m < 2^ex, scale 2^(14 - ex) (0 or non-finite: none), as split_f16 and the
// MoE's row_scale (moe.cu) compute it; thread 0 writes 2^-s to *inv. Where the estimate `est`
// (>= 0: split_estimate) has a certain exponent (split_exponent_certain), that is the max's,
// without a second block reduction (one barrier and a walk over the warps' maxima on every
// norm's path); the same scale either way.
__device__ __forceinline__ float norm_split_scale(const float4 v[NORM_V], int D, float* sh, float* inv, float est) {
    float m = est;
    if (!split_exponent_certain(est)) {
        m = 0.f;
#pragma unroll
        for (int j = 0; j < NORM_V; j++)
            if ((int)(threadIdx.x + j * blockDim.x) < D / 4)
                m = fmaxf(m, fmaxf(fmaxf(fabsf(v[j].x), fabsf(v[j].y)), fmaxf(fabsf(v[j].z), fabsf(v[j].w))));
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = m;
        __syncthreads();
        m = 0.f;
        for (int i = 0; i < (int)(blockDim.x + 31) / 32; i++) m = fmaxf(m, sh[i]);
    }
    int ex = (m > 0.f && m < __int_as_float(0x7f800000u)) ? (int)((__float_as_uint(m) >> 23) & 0xffu) - 126 : 0;
    int sh_ = min(max(14 - ex, -100), 100);
    if (threadIdx.x == 0) *inv = __int_as_float((unsigned)(127 - sh_) << 23);
    return __int_as_float((unsigned)(sh_ + 127) << 23);
}

// add_rms_norm (ADD false: rms_norm, x only read), then y's F16 hi + lo split: y * 2^s
// (norm_split_scale) handed to store(c, float4 of values 4c .. 4c + 3) for every float4 of the
// row, 2^-s written to inv[r].
template <class Addend, class Store, bool ADD = true>
__device__ __forceinline__ void add_rms_norm_then_split(float* __restrict__ x, Addend a, const float* __restrict__ w,
                                                        float* __restrict__ y, float* __restrict__ inv, int D, float eps, Store store) {
    __shared__ float sh[32];
    float4 v[NORM_V];
    float est;
    norm_row_regs<ADD, Addend, true>(x, a, w, y, D, eps, v, sh, &est);
    float sc = norm_split_scale(v, D, sh, inv + blockIdx.x, est);
#pragma unroll
    for (int j = 0; j < NORM_V; j++) {
        int c = threadIdx.x + j * blockDim.x;
        if (c < D / 4) store(c, make_float4(v[j].x * sc, v[j].y * sc, v[j].z * sc, v[j].w * sc));
    }
}

// F16 hi and lo words of the value pair (a, b), low element first: hi = f16(v), lo = f16(v - hi).
__device__ __forceinline__ void f16x2_hi_lo(float a, float b, unsigned& hi, unsigned& lo) {
    unsigned short ha = f32_to_f16_rn(a), hb = f32_to_f16_rn(b);
    hi = ha | (unsigned)hb << 16;
    lo = f32_to_f16_rn(a - f16_to_f32(ha)) | (unsigned)f32_to_f16_rn(b - f16_to_f32(hb)) << 16;
}

// add_rms_norm that also writes y's F16 hi + lo parts and their inverse scale, exactly as
// split_f16 (interleave 0) would from y, for the FP8 q/k/v GEMV that reads them (one launch
// fewer per layer). Rows whose D is a multiple of 4 and at most 4 x NORM_V x blockDim only.
template <class Addend, bool ADD = true>
__device__ __forceinline__ void add_rms_norm_f16_split(float* __restrict__ x, Addend a, const float* __restrict__ w, float* __restrict__ y,
                                                       unsigned short* __restrict__ yh, unsigned short* __restrict__ yl,
                                                       float* __restrict__ yinv, int D, float eps) {
    size_t r = blockIdx.x;
    auto store = [&](int c, float4 e) {
        uint2 h, l;
        f16x2_hi_lo(e.x, e.y, h.x, l.x);
        f16x2_hi_lo(e.z, e.w, h.y, l.y);
        reinterpret_cast<uint2*>(yh + r * D)[c] = h;
        reinterpret_cast<uint2*>(yl + r * D)[c] = l;
    };
    add_rms_norm_then_split<Addend, decltype(store), ADD>(x, a, w, y, yinv, D, eps, store);
}

// rms_norm that also writes y's F16 split, as add_rms_norm_split does (a layer's input norm
// with no residual add ahead: the first layer's, after the embedding): the bits of rms_norm then
// split_f16.
extern "C" __global__ void rms_norm_split(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                                          unsigned short* __restrict__ yh, unsigned short* __restrict__ yl, float* __restrict__ yinv,
                                          int D, float eps) { PDL_ENTER();
    add_rms_norm_f16_split<RowsAddend, false>(const_cast<float*>(x), RowsAddend{nullptr}, w, y, yh, yl, yinv, D, eps);  // x is only read
}

// A graph step's row data, read from page-locked host memory inside the graph (copy-free steps,
// crates/cuda/src/staged.rs): a copy between two graphs is a stream operation the GPU waits on
// (~10 us of an overlapped batch-1 step, more of one taken alone); a read over PCIe by the
// graph's first kernel is one round trip. The layout goes by value: array a is bytes[a] bytes
// (a multiple of 4) at src + off[a] (16-byte aligned, the slot padded to 16), for dst[a].
struct StagedLayout {
    unsigned long long dst[10];
    unsigned off[10];
    unsigned bytes[10];
    unsigned n;
    unsigned ids_off;  // where in the slot the step's ids go (argmax_final, argmax_unpack)
};

// Copies the arrays of the slot at src to their places, one 16-byte chunk a thread of the grid
// (every load issued before any waits on another: one round trip), and points *ids_host at the
// slot's ids. Loads are .cv: the host rewrites a slot between two steps, so no cached line of it
// may be used.
extern "C" __global__ void fetch_staged(const unsigned char* __restrict__ src, StagedLayout L, unsigned long long* __restrict__ ids_host) { PDL_ENTER();
    const unsigned tid = blockIdx.x * blockDim.x + threadIdx.x, step = gridDim.x * blockDim.x;
    if (tid == 0) *ids_host = reinterpret_cast<unsigned long long>(src + L.ids_off);
    unsigned total = 0;
    for (unsigned a = 0; a < L.n; a++) total += (L.bytes[a] + 15) / 16;
    for (unsigned c = tid; c < total; c += step) {
        unsigned a = 0, first = 0;
        while ((L.bytes[a] + 15) / 16 + first <= c) first += (L.bytes[a++] + 15) / 16;
        const unsigned at = (c - first) * 16;
        const uint4 v = __ldcv(reinterpret_cast<const uint4*>(src + L.off[a] + at));
        unsigned char* d = reinterpret_cast<unsigned char*>(L.dst[a]) + at;
        const unsigned left = L.bytes[a] - at;
        if (left >= 16) {
            *reinterpret_cast<uint4*>(d) = v;
        } else {
            unsigned* w = reinterpret_cast<unsigned*>(d);
            w[0] = v.x;
            if (left > 4) w[1] = v.y;
            if (left > 8) w[2] = v.z;
        }
    }
}

// What the embedding puts in row r in place of the residual (norm_row_regs' "addend", which
// here replaces x rather than adding to it: x is written, never read): token t's row of an f32
// or BF16 table, as embed / embed_bf16 write it.
template <class T>
struct EmbedRow {
    const T* __restrict__ table;
    size_t t;
    __device__ __forceinline__ float4 add4(size_t, int c, int D, float4) const {
        if constexpr (sizeof(T) == 4) {
            return reinterpret_cast<const float4*>(table + t * D)[c];
        } else {
            const uint2 u = reinterpret_cast<const uint2*>(table + t * D)[c];
            return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u), __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
        }
    }
};

// The embedding and the first layer's input norm with its F16 split in one launch, one block a
// row: x[r] = table[token r], then the bits of rms_norm_split over it (embed, then
// rms_norm_split, one launch and one round trip fewer at the head of every decode step).
template <class T>
__device__ __forceinline__ void embed_norm_split(const T* __restrict__ table, const int* __restrict__ tok, const unsigned long long* __restrict__ chain,
                                                 float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y,
                                                 unsigned short* __restrict__ yh, unsigned short* __restrict__ yl, float* __restrict__ yinv, int D, float eps) {
    const size_t t = row_token(tok, chain, blockIdx.x);
    add_rms_norm_f16_split<EmbedRow<T>, true>(x, EmbedRow<T>{table, t}, w, y, yh, yl, yinv, D, eps);
}

extern "C" __global__ void embed_rms_norm_split(const float* __restrict__ table, const int* __restrict__ tok, const unsigned long long* __restrict__ chain,
                                                float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, unsigned short* __restrict__ yh,
                                                unsigned short* __restrict__ yl, float* __restrict__ yinv, int D, float eps) { PDL_ENTER();
    embed_norm_split(table, tok, chain, x, w, y, yh, yl, yinv, D, eps);
}

extern "C" __global__ void embed_rms_norm_split_bf16(const unsigned short* __restrict__ table, const int* __restrict__ tok,
                                                     const unsigned long long* __restrict__ chain, float* __restrict__ x, const float* __restrict__ w,
                                                     float* __restrict__ y, unsigned short* __restrict__ yh, unsigned short* __restrict__ yl,
                                                     float* __restrict__ yinv, int D, float eps) { PDL_ENTER();
    embed_norm_split(table, tok, chain, x, w, y, yh, yl, yinv, D, eps);
}

extern "C" __global__ void add_rms_norm_split(float* __restrict__ x, const float* __restrict__ a, const float* __restrict__ w,
                                              float* __restrict__ y, unsigned short* __restrict__ yh, unsigned short* __restrict__ yl,
                                              float* __restrict__ yinv, int D, float eps) { PDL_ENTER();
    add_rms_norm_f16_split(x, RowsAddend{a}, w, y, yh, yl, yinv, D, eps);
}

// add_rms_norm_split adding the routed MoE's pairs (as add_rms_norm_pairs).
//
// One row of at most one float4 per thread (D <= 4 x blockDim: Flash's 4096 with norm_cfg's 1024
// threads) loads what the MoE did not write before the PDL wait: the residual x, the attention
// output `pre` and the norm weight. (At 2-8 rows it measured within noise, and from 16 rows
// the launches are plain.) x and pre are settled when this kernel starts: the MoE
// ahead lets it launch only once each of its blocks is past its own wait (the fused and gate_up
// kernels; the down kernel's blocks start only after every gate_up block has), so the router and
// the o_proj before it have finished, and x was written by the layer's first norm before them.
// One row's pairs are 0 .. topk - 1 (the pairs of all rows are 0 .. rows x topk - 1, as moe_route
// and the fused routing number them), so a one-row launch sums them in that order without
// reading tok_pairs. The same arithmetic as add_rms_norm_f16_split, in the same order: the same
// bits. -DNORM_PAIRS_LATE keeps the general path for every shape, for measurements.
// Measurement builds only (-DSTEP_TRACE with ops:-DNORM_MARK=k): the one-row path's "past the
// wait" stamp is taken at point k instead: 2 its pairs summed (before the sum of squares), 3 the
// sum of squares reduced, 4 the split's scale reduced.
#if defined(STEP_TRACE) && defined(NORM_MARK)
#define NORM_TRACE_MARK(k)                     \
    do {                                       \
        if (NORM_MARK == (k)) TRACE_PAST_WAIT(); \
    } while (0)
#else
#define NORM_TRACE_MARK(k)
#endif
// BF16: y's BF16 hi + lo parts instead (split_bf16's bits, no scale: the lm_head's input after
// the last layer), yinv unused.
template <bool BF16 = false>
__device__ __forceinline__ void add_rms_norm_split_pairs_one_row(float* __restrict__ x, const float* __restrict__ out, int topk,
                                                             const float* __restrict__ pre, const float* __restrict__ w,
                                                             float* __restrict__ y, unsigned short* __restrict__ yh,
                                                             unsigned short* __restrict__ yl, float* __restrict__ yinv, int D,
                                                             float eps) {
    TRACE_SCOPE_NAMED(BF16 ? "add_rms_norm_pairs_bf16" : "add_rms_norm_split_pairs");
    __shared__ float sh[32];
    const int c = threadIdx.x;
    const bool mine = c < D / 4;
    float4* x4 = reinterpret_cast<float4*>(x);
    float4 v[NORM_V], wv = make_float4(0.f, 0.f, 0.f, 0.f), pv = wv;
    v[0] = wv;
    if (mine) {
        v[0] = __ldcg(x4 + c);
        wv = reinterpret_cast<const float4*>(w)[c];
        if (pre) pv = __ldcg(reinterpret_cast<const float4*>(pre) + c);
    }
    PDL_WAIT();
#ifndef NORM_MARK
    TRACE_PAST_WAIT();
#endif
    PDL_TRIGGER();
    float s = 0.f, pm = 0.f;
    if (mine) {
        if (pre) v[0] = plus4(v[0], pv);
        float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
        // (One row: pair j is its j-th in ascending order.)
        for (int j = 0; j < topk; j++) a = plus4(a, __ldcg(reinterpret_cast<const float4*>(out + (size_t)j * D) + c));
        v[0] = plus4(v[0], a);
        x4[c] = v[0];
        s += sumsq4(v[0]);
        pm = max_abs_prod4(wv, v[0]);
    }
    NORM_TRACE_MARK(2);
    __shared__ float shp[32];
    s = block_sum_and_max(s, pm, sh, shp);
    NORM_TRACE_MARK(3);
    float inv = 1.f / sqrtf(s / D + eps);
    if (mine) {
        v[0] = scale4(wv, v[0], inv);
        reinterpret_cast<float4*>(y)[c] = v[0];
    }
    if (BF16) {
        if (mine) {
            ushort4 hi, lo;
            split_bf16_value(v[0].x, hi.x, lo.x);
            split_bf16_value(v[0].y, hi.y, lo.y);
            split_bf16_value(v[0].z, hi.z, lo.z);
            split_bf16_value(v[0].w, hi.w, lo.w);
            reinterpret_cast<ushort4*>(yh)[c] = hi;
            reinterpret_cast<ushort4*>(yl)[c] = lo;
        }
        return;
    }
    float sc = norm_split_scale(v, D, sh, yinv, split_estimate(pm, inv));
    NORM_TRACE_MARK(4);
    if (mine) {
        uint2 hi, lo;
        f16x2_hi_lo(v[0].x * sc, v[0].y * sc, hi.x, lo.x);
        f16x2_hi_lo(v[0].z * sc, v[0].w * sc, hi.y, lo.y);
        reinterpret_cast<uint2*>(yh)[c] = hi;
        reinterpret_cast<uint2*>(yl)[c] = lo;
    }
}

extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_split_pairs(float* __restrict__ x, const float* __restrict__ out, const int* __restrict__ tok_pairs,
                                                    int topk, const float* __restrict__ pre, const float* __restrict__ w, float* __restrict__ y,
                                                    unsigned short* __restrict__ yh, unsigned short* __restrict__ yl,
                                                    float* __restrict__ yinv, int D, float eps) {
#ifndef NORM_PAIRS_LATE
    if (gridDim.x == 1 && (D & 3) == 0 && D <= 4 * (int)blockDim.x) {
        add_rms_norm_split_pairs_one_row(x, out, topk, pre, w, y, yh, yl, yinv, D, eps);
        return;
    }
#endif
    PDL_ENTER();
    __shared__ int sorted[32];
    add_rms_norm_f16_split(x, PairsAddend{out, sort_row_pairs(tok_pairs, topk, sorted), topk, pre}, w, y, yh, yl, yinv, D, eps);
}

// add_rms_norm_pairs that also writes y's BF16 hi + lo parts, as split_bf16 would from y: the
// last layer's residual add and the final norm in one launch, for a BF16 lm_head over every row
// (add_pairs_inplace, rms_norm and split_bf16 were three latency-bound launches at the end of a
// batch-1 step). The same bits as those three.
extern "C" __global__ void __launch_bounds__(1024) add_rms_norm_pairs_bf16(float* __restrict__ x, const float* __restrict__ out, const int* __restrict__ tok_pairs,
                                                   int topk, const float* __restrict__ pre, const float* __restrict__ w, float* __restrict__ y,
                                                   unsigned short* __restrict__ yh, unsigned short* __restrict__ yl, int D, float eps) {
    if (gridDim.x == 1 && (D & 3) == 0 && D <= 4 * (int)blockDim.x) {
        add_rms_norm_split_pairs_one_row<true>(x, out, topk, pre, w, y, yh, yl, nullptr, D, eps);
        return;
    }
    PDL_ENTER();
    __shared__ int sorted[32];
    norm_row<true>(x, PairsAddend{out, sort_row_pairs(tok_pairs, topk, sorted), topk, pre}, w, y, D, eps);
    __syncthreads();  // the block's y row, written above, read back below
    size_t r = blockIdx.x;
    for (int i = threadIdx.x; i < D; i += blockDim.x) split_bf16_value(y[r * D + i], yh[r * D + i], yl[r * D + i]);
}

// add_rms_norm that also writes y split as the tiled MoE kernels read x (moe.cu's
// moe_split_rows: one routed pair's staged B fragments, stage_b with np = 1): row r at xs + r D
// words, its 2^-s at xinv[r]. Per 16 values q: words [q / 4][half (q & 3) >> 1][8 lanes][4],
// lane t holding the F16 hi (lane 4 + t the lo) of values 16 q + 2 t + {0, 1} at word
// 2 (q & 1) and of 16 q + 2 t + {8, 9} at the next. The MoE then needs no split launch of its
// own (one launch fewer per MoE layer from 2 tokens). Same rows as add_rms_norm_split.
extern "C" __global__ void add_rms_norm_moe_split(float* __restrict__ x, const float* __restrict__ a, const float* __restrict__ w,
                                                  float* __restrict__ y, unsigned* __restrict__ xs, float* __restrict__ xinv, int D,
                                                  float eps) { PDL_ENTER();
    size_t r = blockIdx.x;
    add_rms_norm_then_split(x, RowsAddend{a}, w, y, xinv, D, eps, [&](int c, float4 e) {
        // Values 4 (c & 3) .. + 3 of their 16: two t, of the first 8 or the second.
        int q = c >> 2, t0 = (c & 1) * 2;
        unsigned* base = xs + r * D + ((q >> 2) * 2 + ((q & 3) >> 1)) * 32 + 2 * (q & 1) + ((c >> 1) & 1);
        f16x2_hi_lo(e.x, e.y, base[t0 * 4], base[(4 + t0) * 4]);
        f16x2_hi_lo(e.z, e.w, base[(t0 + 1) * 4], base[(5 + t0) * 4]);
    });
}

// Dim i of a head vector after partial rotate-half RoPE at position p (dims past rotary_dim pass
// through): the one formula rope_kv_write and attention_v2's fused path share, so both give the
// same bits.
// Its two halves: the cosine and sine of dim i (i < 2 half), which need only the position, and
// the rotation of a head vector by them (any i).
__device__ __forceinline__ void rope_coef(int i, int half, int rotary_dim, float theta, float p, float& c, float& sn) {
    int ii = i < half ? i : i - half;
    float f = 1.f / powf(theta, (float)(2 * ii) / (float)rotary_dim);
    sincosf(p * f, &sn, &c);
}
__device__ __forceinline__ float rope_apply(const float* vec, int i, int half, float c, float sn) {
    if (i >= 2 * half) return vec[i];
    int ii = i < half ? i : i - half;
    float a = vec[ii], b = vec[ii + half];
    return i < half ? a * c - b * sn : b * c + a * sn;
}
__device__ __forceinline__ float rope_dim(const float* vec, int i, int half, int rotary_dim, float theta, float p) {
    if (i >= 2 * half) return vec[i];
    float sn, c;
    rope_coef(i, half, rotary_dim, theta, p, c, sn);
    return rope_apply(vec, i, half, c, sn);
}

// Partial RoPE fused with the KV-cache write, gridDim.y blocks per row: q rotated in place; k rotated
// on its way into the paged pool; v scaled by vscale into the pool. Same arithmetic as rope +
// kv_write. The row's position and slot are settled (the step's row data, staged by its first
// kernel or copied before it), so each thread works out its first q and k items' coefficients
// before the wait for the q/k/v projection (rope_coef: the same values rope_dim computes, and
// i and i + half share them); past the wait only the loads, the rotations and the stores are
// left. -DROPE_COEF_AFTER_WAIT works them out after the wait, for measurements.
extern "C" __global__ void rope_kv_write(float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                         kv_t* __restrict__ kc, kv_t* __restrict__ vc, const int* __restrict__ pos,
                                         const long long* __restrict__ slot, int heads, int kv_heads, int hd, int vd,
                                         int half, int rotary_dim, float theta, float vscale) {
    TRACE_SCOPE();
#ifdef ROPE_COEF_AFTER_WAIT
    PDL_WAIT();
    TRACE_PAST_WAIT();
    PDL_TRIGGER();
#endif
    int r = blockIdx.x;
    // gridDim.y blocks share a row (one block per row computed 64 heads' sin/cos alone).
    int j0 = blockIdx.y * blockDim.x + threadIdx.x, stride = blockDim.x * gridDim.y;
    float p = (float)pos[r];
    size_t s = (size_t)slot[r];
    const int kd = kv_heads * hd, ik0 = j0 % hd;
    float cq = 0.f, sq = 0.f, ck = 0.f, sk = 0.f;
    if (j0 < heads * half) rope_coef(j0 % half, half, rotary_dim, theta, p, cq, sq);
    if (j0 < kd && ik0 < 2 * half) rope_coef(ik0, half, rotary_dim, theta, p, ck, sk);
#ifndef ROPE_COEF_AFTER_WAIT
    PDL_WAIT();
    TRACE_PAST_WAIT();
    PDL_TRIGGER();
#endif
    for (int j = j0; j < heads * half; j += stride) {
        int h = j / half, i = j % half;
        float* qv = q + ((size_t)r * heads + h) * hd;
        if (j != j0) rope_coef(i, half, rotary_dim, theta, p, cq, sq);
        float a = rope_apply(qv, i, half, cq, sq), b = rope_apply(qv, i + half, half, cq, sq);
        qv[i] = a;
        qv[i + half] = b;
    }
    TRACE_MARK(0);
    for (int j = j0; j < kd; j += stride) {
        int i = j % hd;
        const float* kv = k + (size_t)r * kd + (j - i);
        if (i >= 2 * half) {
            kv_store(kc + s * kd + j, kv[i]);
            continue;
        }
        if (j != j0) rope_coef(i, half, rotary_dim, theta, p, ck, sk);
        kv_store(kc + s * kd + j, rope_apply(kv, i, half, ck, sk));
    }
    TRACE_MARK(1);
    int vdd = kv_heads * vd;
    for (int j = j0; j < vdd; j += stride) kv_store(vc + s * vdd + j, v[(size_t)r * vdd + j] * vscale);
}


// The first half of grouping P routed pairs by expert: count[e] (ism[0, E)) the pairs of each
// expert, start[e] (ism[E, 2 E)) its first pair, and the used experts ascending in `max_u` slots
// of experts / pair_off (the rest empty). Reads the choices with __ldcg (moe_route wrote them).
__device__ __forceinline__ void group_count_scan(const int* __restrict__ topk_idx, int P, int E, int max_u, int* __restrict__ experts,
                                                 int* __restrict__ pair_off, int* ism) {
    __shared__ int wsum[2][32];
    int* count = ism;
    int* start = ism + E;
    for (int e = threadIdx.x; e < E; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < P; p += blockDim.x) atomicAdd(&count[__ldcg(topk_idx + p)], 1);
    __syncthreads();
    // Each thread owns a contiguous run of experts; a block-wide exclusive scan of (used
    // experts, pairs) over the runs gives every expert its slot and first pair (with one thread
    // walking E the kernel measured ~14 us per layer on the H100, under ncu).
    int per = (E + blockDim.x - 1) / blockDim.x, e0 = min((int)threadIdx.x * per, E), e1 = min(e0 + per, E);
    int used = 0, pairs = 0;
    for (int e = e0; e < e1; e++) { used += count[e] > 0; pairs += count[e]; }
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    int iu = used, ip = pairs;  // inclusive scans within the warp
    for (int o = 1; o < 32; o <<= 1) {
        int a = __shfl_up_sync(0xffffffffu, iu, o), b = __shfl_up_sync(0xffffffffu, ip, o);
        if (lane >= o) { iu += a; ip += b; }
    }
    if (lane == 31) { wsum[0][w] = iu; wsum[1][w] = ip; }
    __syncthreads();
    int bu = 0, bp = 0, tu = 0;
    for (int k = 0; k < nw; k++) {
        if (k < w) { bu += wsum[0][k]; bp += wsum[1][k]; }
        tu += wsum[0][k];
    }
    int u = bu + iu - used, off = bp + ip - pairs;
    for (int e = e0; e < e1; e++) {
        start[e] = off;
        if (count[e] > 0) { experts[u] = e; pair_off[u] = off; u++; off += count[e]; }
    }
    for (int k = tu + threadIdx.x; k < max_u; k += blockDim.x) { experts[k] = 0; pair_off[k] = P; }
    if (threadIdx.x == 0) pair_off[max_u] = P;
}

#define GROUP_CHUNK 1024
// Each expert's pairs in pair order, scattered one thread per pair of a chunk of blockDim.x
// pairs: a pair's place is its expert's start (group_count_scan's, in ism + E), plus that
// expert's pairs in the chunk's earlier warps (per-warp counts in shared memory, `wcount`:
// blockDim.x / 32 x E u16), plus its rank among its warp's lanes of the same expert
// (__match_any_sync). The chunk's per-expert totals use ism's chunk area, so E <= GROUP_CHUNK.
// A thread per expert scanning every chunk (group_pairs' former loop) took 1.1 ms per layer for
// 2048 tokens of top-8 (H100, ncu), and in moe_route's last block made batch-2 / 4 / 8 steps
// 15 / 32 / 68 us slower than this (H200; benches/results/2026-11-29-h200-route-group-scatter.md).
__device__ __forceinline__ void group_scatter(const int* __restrict__ topk_idx, const float* __restrict__ topk_w, int P, int K, int E,
                                              int* __restrict__ pair_tok, float* __restrict__ pair_w, int* __restrict__ tok_pairs, int* ism,
                                              unsigned short* wcount) {
    int* start = ism + E;
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, nw = blockDim.x >> 5;
    for (int c0 = 0; c0 < P; c0 += blockDim.x) {
        __syncthreads();  // the previous chunk's counts are consumed
        for (int i = tid; i < nw * E; i += blockDim.x) wcount[i] = 0;
        __syncthreads();
        int p = c0 + tid, e = p < P ? __ldcg(topk_idx + p) : -1;
        unsigned peers = __match_any_sync(0xffffffffu, e);
        int rank = __popc(peers & ((1u << lane) - 1u));
        if (e >= 0 && rank == 0) wcount[w * E + e] = (unsigned short)__popc(peers);
        __syncthreads();
        // Per expert: counts of the earlier warps, in place (an exclusive scan over warps), and
        // the chunk's total onto start after everyone has read it.
        for (int x = tid; x < E; x += blockDim.x) {
            int run = 0;
            for (int k = 0; k < nw; k++) {
                int c = wcount[k * E + x];
                wcount[k * E + x] = (unsigned short)run;
                run += c;
            }
            ism[2 * E + x % GROUP_CHUNK] = run;  // (E <= GROUP_CHUNK: the chunk area is free here)
        }
        __syncthreads();
        if (e >= 0) {
            int q = start[e] + wcount[w * E + e] + rank;
            pair_tok[q] = p / K;
            pair_w[q] = __ldcg(topk_w + p);
            tok_pairs[p] = q;
        }
        __syncthreads();
        for (int x = tid; x < E; x += blockDim.x) start[x] += ism[2 * E + x];
    }
}

// Groups P routed (token, slot) pairs by expert: per expert its pairs in token order, the used
// experts ascending in `max_u` slots (the rest empty): moe_route's last block, or moe_group.
// `ism` holds 2 E + GROUP_CHUNK ints (counts, starts, the chunks' per-expert totals), then
// group_scatter's blockDim.x / 32 x E u16. Reads the choices with __ldcg (moe_route wrote them).
__device__ __forceinline__ void group_pairs(const int* __restrict__ topk_idx, const float* __restrict__ topk_w, int P, int K, int E,
                                            int max_u, int* __restrict__ experts, int* __restrict__ pair_off, int* __restrict__ pair_tok,
                                            float* __restrict__ pair_w, int* __restrict__ tok_pairs, int* ism) {
    group_count_scan(topk_idx, P, E, max_u, experts, pair_off, ism);
    group_scatter(topk_idx, topk_w, P, K, E, pair_tok, pair_w, tok_pairs, ism, reinterpret_cast<unsigned short*>(ism + 2 * E + GROUP_CHUNK));
}

// The grouping as its own kernel (one block of 1024 threads), for batches too large for
// moe_route's last block to group alone (group_pairs). Dynamic shared memory: (2 E +
// GROUP_CHUNK) ints and 32 E u16.
extern "C" __global__ void __launch_bounds__(1024) moe_group(const int* __restrict__ topk_idx, const float* __restrict__ topk_w, int P,
                                                            int K, int E, int max_u, int* __restrict__ experts,
                                                            int* __restrict__ pair_off, int* __restrict__ pair_tok,
                                                            float* __restrict__ pair_w, int* __restrict__ tok_pairs) {
    PDL_ENTER();
    extern __shared__ int ism[];
    group_pairs(topk_idx, topk_w, P, K, E, max_u, experts, pair_off, pair_tok, pair_w, tok_pairs, ism);
}

// The MoE router (route_token in kernels/route.cuh), one token per block. With `counter` (zero
// between calls), the last block to finish routing also groups every token's pairs by expert
// (one launch for routing and grouping) and resets the counter; a batch of one token is grouped
// by its own block from shared memory (group_one_token), without the counter and group_pairs'
// global round trips. Dynamic shared memory: 2 E + GROUP_CHUNK floats, then blockDim.x / 32 x E
// u16 (group_scatter's counts).
extern "C" __global__ void moe_route(const float* __restrict__ logits, const float* __restrict__ bias, int* __restrict__ topk_idx,
                                     float* __restrict__ topk_w, int E, int K, int softmax, int n_group, int topk_group,
                                     int norm, float scale, unsigned* counter, int max_u, int* __restrict__ experts,
                                     int* __restrict__ pair_off, int* __restrict__ pair_tok, float* __restrict__ pair_w,
                                     int* __restrict__ tok_pairs) { PDL_ENTER();
    extern __shared__ float smem[];
    __shared__ int sel[ROUTE_MAX_K];
    __shared__ float wsel[ROUTE_MAX_K];
    int t = blockIdx.x;
#ifdef STEP_TRACE
    // (-DSTEP_TRACE: points 0 and 1 the scores out and the top K taken, 2 one token grouped.)
    auto stamp = [&](int k) {
        if (k == 17) TRACE_MARK(0);
        if (k == 18) TRACE_MARK(1);
    };
#else
    RouteNoStamp stamp;
#endif
    route_token(logits + (size_t)t * E, bias, E, K, softmax, n_group, topk_group, norm, scale, smem, smem + E, sel, wsel, nullptr, stamp);
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        topk_idx[t * K + k] = sel[k];
        topk_w[t * K + k] = wsel[k];
    }
    if (counter == nullptr) return;
    if (gridDim.x == 1) {
        group_one_token(sel, wsel, K, max_u, experts, pair_off, pair_tok, pair_w, tok_pairs);
        TRACE_MARK(2);
        return;
    }
    // This token's choices published, then counted; the last token's block groups them all.
    if (!block_arrive_last(counter, gridDim.x)) return;
    group_pairs(topk_idx, topk_w, (int)gridDim.x * K, K, E, max_u, experts, pair_off, pair_tok, pair_w, tok_pairs,
                reinterpret_cast<int*>(smem));
}

// moe_route after the o_proj that did the router for T tokens (gemv_mma_bf16_t1_pipe_route in
// gemv.cu): block t takes token t's logits from its fixed-point sums at acc + t tok (copies x E,
// then the flag) and 1 / rms from the o_proj blocks' parts ssq + t nssq (acc_norm_inv, as the
// one-token MoE reads them), then routes and groups as moe_route (counter non-null, T >= 2).
// Block t is the only reader of token t's sums, so it zeroes them once every thread has read
// its share; block 0 also zeroes nzero words at zero_acc (the token-0 sums of the layer before
// that does the router in its o_proj, which a one-token step's fused MoE leaves to the next such
// layer: the sums are zero whenever an o_proj adds into them, whatever the step's token count).
// Dynamic shared memory: moe_route's, then E floats of logits.
extern "C" __global__ void moe_route_acc(unsigned long long* __restrict__ acc, int tok, int copies, const float* __restrict__ ssq,
                                         int nssq, int H, float eps, const float* __restrict__ bias, int* __restrict__ topk_idx,
                                         float* __restrict__ topk_w, int E, int K, int softmax, int n_group, int topk_group,
                                         int norm, float scale, unsigned* counter, int max_u, int* __restrict__ experts,
                                         int* __restrict__ pair_off, int* __restrict__ pair_tok, float* __restrict__ pair_w,
                                         int* __restrict__ tok_pairs, unsigned long long* __restrict__ zero_acc, int nzero, int smem_floats) {
    PDL_ENTER();
    extern __shared__ float smem[];
    __shared__ int sel[ROUTE_MAX_K];
    __shared__ float wsel[ROUTE_MAX_K];
    const int t = blockIdx.x;
    unsigned long long* a = acc + (size_t)t * tok;
    float* lg = smem + smem_floats;
    const float inv = acc_norm_inv(ssq + (size_t)t * nssq, nssq, H, eps);
    const bool bad = __ldcg(a + (size_t)copies * E) != 0ull;
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        unsigned long long v = 0ull;
        for (int c = 0; c < copies; c++) v += __ldcg(a + (size_t)c * E + e);
        lg[e] = acc_logit(v, bad, inv);
    }
    __syncthreads();  // every sum read
    for (int i = threadIdx.x; i <= copies * E; i += blockDim.x) a[i] = 0ull;
    if (t == 0 && zero_acc != nullptr)
        for (int i = threadIdx.x; i < nzero; i += blockDim.x) zero_acc[i] = 0ull;
    route_token(lg, bias, E, K, softmax, n_group, topk_group, norm, scale, smem, smem + E, sel, wsel);
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        topk_idx[t * K + k] = sel[k];
        topk_w[t * K + k] = wsel[k];
    }
    if (!block_arrive_last(counter, gridDim.x)) return;
    group_pairs(topk_idx, topk_w, (int)gridDim.x * K, K, E, max_u, experts, pair_off, pair_tok, pair_w, tok_pairs,
                reinterpret_cast<int*>(smem));
}

// moe_route and moe_route_acc for a decode batch of 2..T tokens in one block (moe_route_block,
// moe_route_acc_block): every thread asks for all its loads at once, warp w routes tokens w,
// w + warps, ... at once, and the block groups every token's pairs from shared memory. The
// multi-block kernels route a token a block, then the last block to arrive reads every choice
// back from L2 and groups them through group_pairs' counts, scans and scatter: at 2-8 rows on
// the H200 moe_route_acc took 8.5-9 us past its wait, most of it after the routing. (A first
// form that loaded a thread's entries one L2 round trip each took 18-31 us at 2-8 tokens.) The
// same choices, weights and grouping, bit for bit: each token's scores, choices and top K are
// route_token's (sigmoid, bias, the register top K, the weights in the same order), and the
// grouping is group_pairs' arrays (experts ascending, each expert's pairs in pair order, the
// empty slots expert 0 with no pairs). Sigmoid routing without groups (n_group <= 1), E <= 512,
// T x K <= blockDim.x (the host checks; the others keep the multi-block kernels).
#define ROUTE_BLOCK_MAX_TOKENS 32  // tokens the one-block routing takes
#define ROUTE_BLOCK_LOGITS 16      // logits a thread of moe_route_block loads at once: T E <= 16 blockDim.x
#define ROUTE_ACC_THREADS 512      // moe_route_acc_block's threads
#define ROUTE_ACC_PAIRS 2          // pairs of (token, expert) entries of a thread of it: T E <= 4 x 512
#define ROUTE_ACC_COPIES 8         // and the sum copies it asks for at once: copies <= 8
#define ROUTE_ACC_PARTS 16         // norm parts a lane asks for at once: nssq <= 16 x 32

// v into the float at p's offset in the shared memory of the cluster's block 0 (the cluster
// helpers: kernels/common.cuh).
__device__ __forceinline__ void st_shared_block0(float* p, float v) {
#if __CUDA_ARCH__ >= 900
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(cluster_shared_addr(p, 0)), "f"(v) : "memory");
#endif
}

// Entry i = t E + e (token t, expert e) of the one-block routing: its score and choice, in this
// block's shared memory or (to_block0) in the cluster's block 0's.
__device__ __forceinline__ void route_block_score(int i, float l, int E, const float* bias_s, float* scores, float* choice, bool to_block0 = false) {
    const float x = route_sigmoid(l);
    const float c = bias_s ? x + bias_s[i % E] : x;
    if (to_block0) {
        st_shared_block0(scores + i, x);
        st_shared_block0(choice + i, c);
    } else {
        scores[i] = x;
        choice[i] = c;
    }
}

// The one-block routing past the scores (scores and choice [T, E] in shared memory, visible to
// the block): each token's top K by a warp, then the grouping. sm: 3 P4 words of shared memory
// on 16 bytes (P4: the T K pairs rounded up to 4). Leaves the grouping in experts / pair_off /
// pair_tok / pair_w / tok_pairs and each token's choices in topk_idx / topk_w (as moe_route).
// mark(k): the kernel's TRACE_MARK (1: top K done, 2: grouped), for -DSTEP_TRACE builds.
template <class Mark>
__device__ __forceinline__ void route_group_block(int T, int E, int K, int norm, float scale, const float* scores, float* choice, int* sm,
                                                  int* __restrict__ topk_idx, float* __restrict__ topk_w, int max_u, int* __restrict__ experts,
                                                  int* __restrict__ pair_off, int* __restrict__ pair_tok, float* __restrict__ pair_w,
                                                  int* __restrict__ tok_pairs, Mark mark) {
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, nw = blockDim.x >> 5, P = T * K, P4 = (P + 3) & ~3;
    int* sel = sm;
    float* wsel = reinterpret_cast<float*>(sel + P4);
    int* opens = reinterpret_cast<int*>(wsel + P4);
    constexpr int NONE = 0x7fffffff;  // past every expert
    for (int i = P + tid; i < P4; i += blockDim.x) sel[i] = NONE;
#if __CUDA_ARCH__ >= 800
    for (int t = w; t < T; t += nw) {
        const float wsum = E <= 256 ? route_top_k_regs<8>(choice + t * E, scores + t * E, E, K, sel + t * K)
                                    : route_top_k_regs<16>(choice + t * E, scores + t * E, E, K, sel + t * K);
        const float denom = route_weight_denom(wsum);
        for (int k = lane; k < K; k += 32) {
            const float v = route_weight(scores[t * E + sel[t * K + k]], norm, denom, scale);
            wsel[t * K + k] = v;
            topk_idx[t * K + k] = sel[t * K + k];
            topk_w[t * K + k] = v;
        }
    }
#endif
    __syncthreads();
    mark(1);
    // Pair p (thread p < P; the other warps skip the loops: with them, a division per zeroed
    // word and 1024 threads the batch-8 launch took 14.7-15.0 us, without 10.0-10.2): its place
    // q among the pairs ordered by (expert, p) and whether it opens its expert's run (opens[p]:
    // its expert if so, else NONE), then, once every pair's is out, how many distinct experts lie
    // below. Four choices a shared-memory load (the padding NONE).
    const int4* sel4 = reinterpret_cast<const int4*>(sel);
    const int4* opens4 = reinterpret_cast<const int4*>(opens);
    int e = NONE, q = 0;
    bool first = false;
    if (tid < P) {
        e = sel[tid];
        int same_below = 0;  // earlier pairs of this expert
        for (int r4 = 0; r4 < P4 / 4; r4++) {
            const int4 v = sel4[r4];
            const int r = 4 * r4;
            q += (v.x < e) + (v.y < e) + (v.z < e) + (v.w < e);
            same_below += (v.x == e && r < tid) + (v.y == e && r + 1 < tid) + (v.z == e && r + 2 < tid) + (v.w == e && r + 3 < tid);
        }
        q += same_below;
        first = same_below == 0;
    }
    if (tid < P4) opens[tid] = first ? e : NONE;
    const int used = __syncthreads_count(first);
    if (tid < P) {
        int u = 0;
        for (int r4 = 0; r4 < P4 / 4; r4++) {
            const int4 o = opens4[r4];
            u += (o.x < e) + (o.y < e) + (o.z < e) + (o.w < e);
        }
        pair_tok[q] = tid / K;
        pair_w[q] = wsel[tid];
        tok_pairs[tid] = q;
        if (first) {
            experts[u] = e;
            pair_off[u] = q;
        }
    }
    for (int s = used + tid; s < max_u; s += blockDim.x) {
        experts[s] = 0;
        pair_off[s] = P;
    }
    if (tid == 0) pair_off[max_u] = P;
    mark(2);
}

// The bias into shared memory before the wait (a weight: no kernel of the step writes it).
__device__ __forceinline__ const float* route_block_bias(const float* __restrict__ bias, int E, float* bias_s) {
    if (!bias) return nullptr;
    for (int e = threadIdx.x; e < E; e += blockDim.x) bias_s[e] = __ldg(bias + e);
    return bias_s;
}

// moe_route of T tokens' logits [T, E] in one block. Dynamic shared memory: route_group_block's
// 3 P4 words, E bias floats, T E scores, T E choices.
extern "C" __global__ void __launch_bounds__(1024) moe_route_block(const float* __restrict__ logits, const float* __restrict__ bias, int T,
                                                                   int* __restrict__ topk_idx, float* __restrict__ topk_w, int E, int K,
                                                                   int norm, float scale, int max_u, int* __restrict__ experts,
                                                                   int* __restrict__ pair_off, int* __restrict__ pair_tok,
                                                                   float* __restrict__ pair_w, int* __restrict__ tok_pairs) {
    extern __shared__ __align__(16) float smem[];
    float* bias_a = smem + 3 * ((T * K + 3) & ~3);  // (route_group_block's words first, on 16 bytes)
    const float* bias_s = route_block_bias(bias, E, bias_a);
    float* scores = bias_a + E;
    float* choice = scores + T * E;
    PDL_ENTER();
    float l[ROUTE_BLOCK_LOGITS];
#pragma unroll
    for (int j = 0; j < ROUTE_BLOCK_LOGITS; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        l[j] = i < T * E ? logits[i] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < ROUTE_BLOCK_LOGITS; j++) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < T * E) route_block_score(i, l[j], E, bias_s, scores, choice);
    }
    __syncthreads();
    TRACE_MARK(0);  // (-DSTEP_TRACE: the scores out)
    route_group_block(T, E, K, norm, scale, scores, choice, reinterpret_cast<int*>(smem), topk_idx, topk_w, max_u, experts,
                      pair_off, pair_tok, pair_w, tok_pairs, [&](int k) { TRACE_MARK(k); });
}

// moe_route_acc of T tokens in one block: token t's logits from its fixed-point sums at acc + t
// tok and 1 / rms from its parts ssq + t nssq (acc_norm_inv's sum in its order, by warp t, every
// part asked for at once), its sums zeroed once read, and the zeroing of zero_acc (see
// moe_route_acc; spread over a cluster's blocks). Dynamic shared memory: as moe_route_block's.
// Launched as a cluster of C blocks (the host's choice; no cluster: C = 1), block r asks for the
// sums of tokens r, r + C, ... and writes their scores into block 0's shared memory, which alone
// goes on past the cluster barrier: one SM asks for 16 KB of sums a token (256 experts, 8
// copies) at ~35-40 GB/s, which held the one-block launch past 4 tokens.
extern "C" __global__ void __launch_bounds__(ROUTE_ACC_THREADS) moe_route_acc_block(
    unsigned long long* __restrict__ acc, int tok, int copies, const float* __restrict__ ssq, int nssq, int H, float eps,
    const float* __restrict__ bias, int T, int* __restrict__ topk_idx, float* __restrict__ topk_w, int E, int K, int norm, float scale,
    int max_u, int* __restrict__ experts, int* __restrict__ pair_off, int* __restrict__ pair_tok, float* __restrict__ pair_w,
    int* __restrict__ tok_pairs, unsigned long long* __restrict__ zero_acc, int nzero) {
    extern __shared__ __align__(16) float smem[];
    __shared__ float inv_s[ROUTE_BLOCK_MAX_TOKENS];
    __shared__ bool bad_s[ROUTE_BLOCK_MAX_TOKENS];
    const int C = (int)cluster_nctarank(), rank = (int)cluster_ctarank();
    // Every block of the cluster has started (its shared memory is there) before any writes to
    // block 0's: this arrive, waited for past the loads.
    if (C > 1) cluster_arrive_relaxed();
    float* bias_a = smem + 3 * ((T * K + 3) & ~3);  // (as moe_route_block's)
    const float* bias_s = route_block_bias(bias, E, bias_a);
    float* scores = bias_a + E;
    float* choice = scores + T * E;
    PDL_ENTER();
    // This block's tokens: local token u is token rank + C u.
    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, TL = (T - rank + C - 1) / C;
    // A thread's local entries i, i + 1 (i = 2 (tid + j blockDim.x): experts e, e + 1 of one
    // token, E and tok even) and every copy of their sums, asked for at once, 16 bytes a load.
    ulonglong2 v[ROUTE_ACC_PAIRS][ROUTE_ACC_COPIES];
#pragma unroll
    for (int j = 0; j < ROUTE_ACC_PAIRS; j++) {
        const int i = 2 * (tid + j * blockDim.x);
        const unsigned long long* a = acc + (size_t)(rank + C * (i / E)) * tok + i % E;
#pragma unroll
        for (int c = 0; c < ROUTE_ACC_COPIES; c++)
            v[j][c] = i < TL * E && c < copies ? __ldcg(reinterpret_cast<const ulonglong2*>(a + (size_t)c * E)) : make_ulonglong2(0ull, 0ull);
    }
    // Warp u: local token u's 1 / rms (acc_norm_inv's sum, its parts asked for at once) and flag.
    if (w < TL) {
        const int t = rank + C * w;
        const float* parts = ssq + (size_t)t * nssq;
        float p[ROUTE_ACC_PARTS];
#pragma unroll
        for (int j = 0; j < ROUTE_ACC_PARTS; j++) p[j] = lane + 32 * j < nssq ? __ldcg(parts + lane + 32 * j) : 0.f;
        const bool bad = __ldcg(acc + (size_t)t * tok + (size_t)copies * E) != 0ull;
        float q = 0.f;
#pragma unroll
        for (int j = 0; j < ROUTE_ACC_PARTS; j++)
            if (lane + 32 * j < nssq) q += p[j];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
        if (lane == 0) {
            inv_s[w] = 1.f / sqrtf(q / H + eps);
            bad_s[w] = bad;
        }
    }
    __syncthreads();  // every sum read, the tokens' 1 / rms and flags out
    if (C > 1) cluster_wait_acquire();
#pragma unroll
    for (int j = 0; j < ROUTE_ACC_PAIRS; j++) {
        const int i = 2 * (tid + j * blockDim.x);
        unsigned long long s0 = 0ull, s1 = 0ull;
#pragma unroll
        for (int c = 0; c < ROUTE_ACC_COPIES; c++) {
            s0 += v[j][c].x;
            s1 += v[j][c].y;
        }
        if (i < TL * E) {
            const int u = i / E, at = (rank + C * u) * E + i % E;
            route_block_score(at, acc_logit(s0, bad_s[u], inv_s[u]), E, bias_s, scores, choice, rank != 0);
            route_block_score(at + 1, acc_logit(s1, bad_s[u], inv_s[u]), E, bias_s, scores, choice, rank != 0);
        }
    }
    for (int u = 0; u < TL; u++)
        for (int i = tid; i <= copies * E; i += blockDim.x) acc[(size_t)(rank + C * u) * tok + i] = 0ull;
    if (zero_acc != nullptr)
        for (int i = rank * blockDim.x + tid; i < nzero; i += C * blockDim.x) zero_acc[i] = 0ull;
    if (C > 1) {
        cluster_arrive_release();  // every token's scores in block 0
        cluster_wait_acquire();
        if (rank != 0) return;
    } else {
        __syncthreads();
    }
    TRACE_MARK(0);  // (-DSTEP_TRACE: the scores out)
    route_group_block(T, E, K, norm, scale, scores, choice, reinterpret_cast<int*>(smem), topk_idx, topk_w, max_u, experts,
                      pair_off, pair_tok, pair_w, tok_pairs, [&](int k) { TRACE_MARK(k); });
}

// Groups a batch's routing by expert on the GPU (as kernels::MoeRouting::new does on the host),
// so the MoE kernels stream each routed expert once: pairs p = t * K + s sorted by (expert, p).
// experts[u] / pair_off[u..u+1] for the used experts ascending, then empty slots up to max_u
// (pair_off = P), so a launch with grid.y = max_u needs no host round trip. One block.
// Dynamic shared memory: 2 * E ints.

// y[r] = argmax of logits row r (ties to the lower index), so greedy decoding brings back only
// ids. Two stages: gridDim.y blocks per row each reduce a slice into part[r, blockIdx.y]
// (one block per row took ~65 us over a vocabulary of 152k), then argmax_final.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int V, float* __restrict__ part_v, int* __restrict__ part_i) { PDL_ENTER();
    __shared__ float sv[32], best_v;
    __shared__ int si[32], best_i;
    const float* l = logits + (size_t)blockIdx.x * V;
    int per = (V + gridDim.y - 1) / gridDim.y, e0 = blockIdx.y * per, e1 = min(e0 + per, V);
    float v = __int_as_float(0xff800000u);
    int i = 0x7fffffff;
    for (int e = e0 + threadIdx.x; e < e1; e += blockDim.x)
        if (l[e] > v) { v = l[e]; i = e; }
    block_argmax(v, i, sv, si, &best_v, &best_i);
    if (threadIdx.x == 0) {
        part_v[blockIdx.x * gridDim.y + blockIdx.y] = best_v;
        part_i[blockIdx.x * gridDim.y + blockIdx.y] = best_i;
    }
}

// out[r] = the best of row r's `parts` partial results; all -inf/NaN: id 0, as the host does.
// ids_host (null: none): a device word holding the host address a graph step's ids also go to
// (fetch_staged writes it; 0: not this step).
extern "C" __global__ void argmax_final(const float* __restrict__ part_v, const int* __restrict__ part_i, int parts, int* __restrict__ out,
                                        const unsigned long long* __restrict__ ids_host) { PDL_ENTER();
    __shared__ float sv[32], best_v;
    __shared__ int si[32], best_i;
    float v = __int_as_float(0xff800000u);
    int i = 0x7fffffff;
    for (int k = threadIdx.x; k < parts; k += blockDim.x) {
        float pv = part_v[blockIdx.x * parts + k];
        int pi = part_i[blockIdx.x * parts + k];
        if (pv > v || (pv == v && pi < i)) { v = pv; i = pi; }
    }
    block_argmax(v, i, sv, si, &best_v, &best_i);
    if (threadIdx.x == 0) {
        const int id = best_i == 0x7fffffff ? 0 : best_i;
        out[blockIdx.x] = id;
        store_host_id(ids_host, blockIdx.x, id);
    }
}

// out[0] = the id in the largest of the argmax keys keys[s * stride], s < slots, into which
// gemv_mma_bf16_t1_argmax folded the lm_head's rows (all 0: no finite or +inf logit, id 0 as
// argmax_final gives); then every key is zeroed for the next call. One warp.
extern "C" __global__ void argmax_unpack(unsigned long long* __restrict__ keys, int slots, int stride, int* __restrict__ out,
                                         const unsigned long long* __restrict__ ids_host) { PDL_ENTER();
    // Every lane's loads (up to 4 keys: slots <= 128, kernels.rs) before any store: one round
    // trip to L2, not one a key.
    unsigned long long k = 0ull, v[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int s = threadIdx.x + 32 * j;
        v[j] = s < slots ? __ldcg(keys + (size_t)s * stride) : 0ull;
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int s = threadIdx.x + 32 * j;
        if (s < slots) keys[(size_t)s * stride] = 0ull;
        k = v[j] > k ? v[j] : k;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long v = __shfl_xor_sync(0xffffffffu, k, o);
        k = v > k ? v : k;
    }
    if (threadIdx.x == 0) {
        const int id = k == 0ull ? 0 : (int)~(unsigned)k;
        out[0] = id;
        store_host_id(ids_host, 0, id);
    }
}


// The fused speculative step (crates/cuda/src/speculate.rs). Verify row s*nb + 1 + j takes
// draft j of sequence s (drafts are [seqs, nb - 1], rows [seqs, nb]).
extern "C" __global__ void place_drafts(const int* __restrict__ drafts, int* __restrict__ tok, int nb, int k) { PDL_ENTER();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < k) tok[(i / (nb - 1)) * nb + 1 + i % (nb - 1)] = drafts[i];
}

// Per sequence s: accepted = the number of leading drafts equal to the target's samples at their
// rows. out[s * 2nb ..]: the nb samples, the nb - 1 drafts, accepted (one copy brings all back).
extern "C" __global__ void accept_drafts(const int* __restrict__ drafts, const int* __restrict__ samples, int nb, int seqs, int* __restrict__ out) { PDL_ENTER();
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= seqs) return;
    const int* d = drafts + (size_t)s * (nb - 1);
    const int* t = samples + (size_t)s * nb;
    int* o = out + (size_t)s * 2 * nb;
    int acc = 0;
    while (acc < nb - 1 && d[acc] == t[acc]) acc++;
    for (int j = 0; j < nb; j++) o[j] = t[j];
    for (int j = 0; j < nb - 1; j++) o[nb + j] = d[j];
    o[2 * nb - 1] = acc;
}

// Synthetic weights (benchmarks without checkpoints): counter-based hashing, so any size fills
// in one pass and the same seed gives the same weights.
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

// kind 0: any byte (MXFP4 codes); 1: lo + h % span (E8M0 scales); 2: FP8 e4m3 with exponent
// field lo..lo+span-1 (never NaN); 3: tiled MXFP4 steps (per STEP_BYTES, STEP_CODE_BYTES as
// kind 0, then the scales as kind 1).
extern "C" __global__ void fill_random_u8(unsigned char* __restrict__ p, unsigned long long n, unsigned long long seed, int kind, int lo, int span) { PDL_ENTER();
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long h = mix64(seed ^ (i * 0x2545f4914f6cdd1dull));
        unsigned char b;
        int k = kind == 3 ? (i % STEP_BYTES < STEP_CODE_BYTES ? 0 : 1) : kind;
        if (k == 0) b = (unsigned char)h;
        else if (k == 1) b = (unsigned char)(lo + (int)(h % (unsigned long long)span));
        else b = (unsigned char)((h & 0x80) | ((lo + (int)((h >> 8) % (unsigned long long)span)) << 3) | ((h >> 16) & 7));
        p[i] = b;
    }
}

// Uniform in [offset - amp, offset + amp): f32, or BF16 bits when bf16 != 0 (p then holds u16).
extern "C" __global__ void fill_random_f(void* __restrict__ p, unsigned long long n, unsigned long long seed, float amp, float offset, int bf16) { PDL_ENTER();
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long h = mix64(seed ^ (i * 0x2545f4914f6cdd1dull));
        float u = (float)(h >> 40) * (1.f / 16777216.f);
        float v = offset + amp * (2.f * u - 1.f);
        if (bf16) ((unsigned short*)p)[i] = (unsigned short)(__float_as_uint(v) >> 16);
        else ((float*)p)[i] = v;
    }
}

// Splits up to which the combine loads every partial state at once (batch-1 decode has 4):
// batch-1 Flash step -0.5% on the H100 (benches/results/2026-11-24-gemv-order-attention-combine.md).
// Measurement builds may restore the three rounds of loads everywhere with -DATT_COMBINE_LOOPS.
#define ATT_COMBINE_MAX 8
// Merges attention_v2's `splits` partial states of (row r, head h) as its epilogue merges
// warps, then the sink logit: o = sum_s acc_s e^(m_s - M) / (sum_s l_s e^(m_s - M) [+ sink]).
// The states are read through L2 (__ldcg): inside attention_v2 other blocks wrote them. Thread
// tid of nthreads (a block, or one warp's lanes) writes o's elements tid, tid + nthreads, ...
__device__ __forceinline__ void attention_combine_head(const float* part_m, const float* part_l, const float* part_acc,
                                                       float* __restrict__ o, int r, int h, int heads, int vd, int splits,
                                                       const float* __restrict__ sinks, unsigned short* __restrict__ oh,
                                                       unsigned short* __restrict__ ol, int tid, int nthreads) {
    const float NEG_INF = __int_as_float(0xff800000u);
    size_t p0 = ((size_t)r * heads + h) * splits;
#ifndef ATT_COMBINE_LOOPS
    if (splits <= ATT_COMBINE_MAX && nthreads >= vd) {
        // Every load first (one round trip to L2 instead of three: the maxima, the sums, the
        // accumulators), then the arithmetic of the loops below in their order: the same bits.
        float ms[ATT_COMBINE_MAX], ls[ATT_COMBINE_MAX], as[ATT_COMBINE_MAX];
        const bool mine = tid < vd;
#pragma unroll
        for (int s = 0; s < ATT_COMBINE_MAX; s++)
            if (s < splits) {
                ms[s] = __ldcg(part_m + p0 + s);
                ls[s] = __ldcg(part_l + p0 + s);
                as[s] = mine ? __ldcg(part_acc + (p0 + s) * vd + tid) : 0.f;
            }
        float M = NEG_INF;
#pragma unroll
        for (int s = 0; s < ATT_COMBINE_MAX; s++)
            if (s < splits) M = fmaxf(M, ms[s]);
        float L = 0.f;
#pragma unroll
        for (int s = 0; s < ATT_COMBINE_MAX; s++)
            if (s < splits) L += ms[s] == NEG_INF ? 0.f : ls[s] * __expf(ms[s] - M);
        if (sinks) {
            float sc = sinks[h];
            float mn = fmaxf(M, sc);
            L = L * __expf(M - mn) + __expf(sc - mn);
            M = mn;
        }
        if (!mine) return;
        float a = 0.f;
#pragma unroll
        for (int s = 0; s < ATT_COMBINE_MAX; s++)
            if (s < splits && ms[s] != NEG_INF) a += as[s] * __expf(ms[s] - M);
        a /= L;
        size_t oi = ((size_t)r * heads + h) * vd + tid;
        o[oi] = a;
        if (oh) split_bf16_value(a, oh[oi], ol[oi]);
        return;
    }
#endif
    float M = NEG_INF;
    for (int s = 0; s < splits; s++) M = fmaxf(M, __ldcg(part_m + p0 + s));
    float L = 0.f;
    for (int s = 0; s < splits; s++) {
        float ms = __ldcg(part_m + p0 + s);
        L += ms == NEG_INF ? 0.f : __ldcg(part_l + p0 + s) * __expf(ms - M);
    }
    if (sinks) {
        float sc = sinks[h];
        float mn = fmaxf(M, sc);
        L = L * __expf(M - mn) + __expf(sc - mn);
        M = mn;
    }
    size_t ob = ((size_t)r * heads + h) * vd;
    for (int i = tid; i < vd; i += nthreads) {
        float a = 0.f;
        for (int s = 0; s < splits; s++) {
            float ms = __ldcg(part_m + p0 + s);
            if (ms != NEG_INF) a += __ldcg(part_acc + (p0 + s) * vd + i) * __expf(ms - M);
        }
        a /= L;
        o[ob + i] = a;
        if (oh) split_bf16_value(a, oh[ob + i], ol[ob + i]);
    }
}

// Paged attention, v2: one block of 8 warps per (row, head, split). Warps split the block's key
// positions (4 at a time each, loads issued together), each keeps its own online softmax, and the
// 8 partial states are merged at the end. With gridDim.z == 1 the block covers the row's whole
// range and writes the output (after the sink logit); with more splits (long contexts, where one
// block per head streamed every position alone) split z covers the z-th part of the range and
// writes its unnormalised state (max, sum, accumulator) for attention_combine. Same semantics as
// `attention`; hd <= 256, vd <= 128.
// Launched with 32 * ATT_WARPS threads. (16 warps of 8 positions, one round of loads for a
// 128-token window, measured no faster at batch 1 on the H100 and 1.7x slower at batch 8: one
// block per SM by registers.)
#define ATT_WARPS 8
#define ATT_UNROLL 4
// Measurement builds only (-DSTEP_TRACE with ops:-DATT_MARK=k): attention_v2_kv_ready's "past
// the wait" stamp is taken at point k of its blocks instead, so step_bench --trace shows when
// the last block got there: 1 its heads' counts seen, 2 q and the new k rotated (the dots
// start), 3 its positions' loop done, 4 its state written or merged, 5 past the wait for the
// projection's grid. Without ATT_MARK a -DSTEP_TRACE build stamps them all: "past the wait" is
// point 1, and TRACE_MARK points 0 / 1 / 2 are points 2 / 3 / 4.
#if defined(STEP_TRACE) && defined(ATT_MARK)
__shared__ unsigned long long att_mark_t;
#define ATT_TRACE_MARKS_INIT()
#define ATT_TRACE_MARK(k)                                                   \
    do {                                                                    \
        if (ATT_MARK == (k) && threadIdx.x == 0) att_mark_t = step_trace_now(); \
    } while (0)
#define ATT_TRACE_MARK_END() TRACE_PAST_WAIT_AT(att_mark_t)
#elif defined(STEP_TRACE)
__shared__ unsigned long long att_marks_t[6];
#define ATT_TRACE_MARKS_INIT()                                   \
    do {                                                         \
        if (threadIdx.x == 0)                                    \
            for (int k_ = 0; k_ < 6; k_++) att_marks_t[k_] = 0;  \
    } while (0)
#define ATT_TRACE_MARK(k)                                        \
    do {                                                         \
        if (threadIdx.x == 0) att_marks_t[k] = step_trace_now(); \
    } while (0)
#define ATT_TRACE_MARK_END()                                     \
    do {                                                         \
        if (att_marks_t[1]) TRACE_PAST_WAIT_AT(att_marks_t[1]);  \
        for (int k_ = 0; k_ < 3; k_++) step_trace_scope_.mark[k_] = att_marks_t[k_ + 2]; \
    } while (0)
#else
#define ATT_TRACE_MARKS_INIT()
#define ATT_TRACE_MARK(k)
#define ATT_TRACE_MARK_END()
#endif
template <bool FUSED, bool ROWS = false, bool READY = false, bool PRELOAD = false, int U = ATT_UNROLL, bool ROUND_LOADS = PRELOAD, int SUBS = 1, bool PRE_ROUND = false>
__device__ __forceinline__ void attention_v2_body(
    const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc, float* __restrict__ o,
    const int* __restrict__ pos, const int* __restrict__ seq, const int* __restrict__ tables, int max_blocks,
    int block_size, int heads, int kv_heads, int hd, int vd, int window, float scale, const float* __restrict__ sinks,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_acc, unsigned short* __restrict__ oh,
    unsigned short* __restrict__ ol, const float* __restrict__ knew, const float* __restrict__ vnew, kv_t* kc_out,
    kv_t* vc_out, const long long* __restrict__ slots, int half, int rotary_dim, float theta, float vscale,
    unsigned* __restrict__ counters, const int* __restrict__ rows = nullptr, const unsigned* ready = nullptr,
    unsigned need_q = 0, unsigned need_kv = 0) {
    static_assert(!READY || FUSED, "the ready counts stand in for the wait on the projection of the new q/k/v");
    static_assert(!PRELOAD || READY, "only the ready kernel has a wait to load across");
    __shared__ float sm_m[ATT_WARPS], sm_l[ATT_WARPS], sm_acc[ATT_WARPS][128];
    // ROWS: block x serves row rows[x] (the rows of a prefill batch that attention_prefill's
    // tiles leave out); else row x.
    int r = ROWS ? rows[blockIdx.x] : blockIdx.x, h = blockIdx.y, lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    int kvh = h / (heads / kv_heads);
    const float* qv = q + ((size_t)r * heads + h) * hd;
    const int* table = tables + (size_t)seq[r] * max_blocks;
    int p = pos[r];
    int lo = window > 0 ? max(0, p + 1 - window) : 0;
    int splits = gridDim.z, chunk = (p - lo + splits) / splits;
    int j_lo = lo + blockIdx.z * chunk, j_hi = min(j_lo + chunk - 1, p);
    const float NEG_INF = __int_as_float(0xff800000u);
    // FUSED (attention_v2_kv; every row the only new token of its sequence): q arrives unrotated,
    // and the row's own position p is scored against its new K and V (RoPE and value scale
    // applied here, exactly as rope_kv_write would store them) in place of what the pool's slot p
    // still holds; this kernel writes slot p at the end. No other row attends to slot p.
    constexpr bool fused = FUSED;
    // The rotated q and new k, the scaled new v and q . k_new, computed once per block into shared
    // memory (one RoPE call site each: inlined per unrolled element they made the kernel 4x larger
    // and slower).
    __shared__ float sm_q[256], sm_k[256], sm_v[128], sm_dnew;
    // READY's preloaded first round of positions (below): K elements lane + 32 c and V
    // elements lane + 32 c of the warp's positions j0_first + u (clamped to j_hi).
    // A warp takes PW positions a round (its rounds ROUND apart), loading U of them at a time;
    // PRE_ROUND: its first round's PW positions preloaded at once (NPRE).
    constexpr int PW = U * SUBS, ROUND = ATT_WARPS * PW, NPRE = PRE_ROUND ? PW : U;
    float kr[NPRE][8], vr0[NPRE][4];
    const int j0_first = j_lo + w * PW;
    // PRELOAD (attention_v2_kv_ready_pre): nothing of the pool's positions depends on the
    // projection still running (earlier steps wrote them; slot p's leftovers are replaced
    // below), nor do the RoPE coefficients of position p: the block loads its warps' first
    // positions and computes them while it waits for its heads, so only q . K, the softmax and
    // the merge remain once they are ready (at batch 1 a 128-token window is one round of
    // positions per warp). -DATT_READY_LATE loads them after the wait, for measurements.
#ifdef ATT_READY_LATE
    constexpr bool early = false;
#else
    constexpr bool early = PRELOAD;
#endif
    const bool preloaded = early && j0_first <= j_hi;
    // Position u's K and V rows (pool slot `slot`) into kr[u], vr0[u].
    auto load_rows = [&](int u, size_t slot) {
        const kv_t* kv = kc + (slot * kv_heads + kvh) * hd;
        const kv_t* vp = vc + (slot * kv_heads + kvh) * vd;
#pragma unroll
        for (int c = 0; c < 8; c += 2) kv_lane_pair(kv, lane, c, hd, kr[u][c], kr[u][c + 1]);
#pragma unroll
        for (int c = 0; c < 4; c += 2) kv_lane_pair(vp, lane, c, vd, vr0[u][c], vr0[u][c + 1]);
    };
    if (preloaded) {
#pragma unroll
        for (int u = 0; u < NPRE; u++) {
            int j = min(j0_first + u, j_hi);
            load_rows(u, (size_t)table[j / block_size] * block_size + j % block_size);
        }
    }
    // ROUND_LOADS (the ready kernels: decode rows behind the projection, where every round of
    // positions is latency): the loop loads U positions' K and V rows at once and asks for the
    // next U positions' block-table entries as soon as they are out; the first entries are asked
    // for here, before the wait for the heads. The other kernels keep the loop that fits them in
    // 64 or 80 registers. For measurements -DATT_LOOP_OLD gives the ready kernels that loop too.
#if defined(ATT_LOOP_OLD)
    constexpr bool round_loads = false;
#else
    constexpr bool round_loads = ROUND_LOADS;
#endif
    int ent[U];
    auto entries_at = [&](int j0) {
#pragma unroll
        for (int u = 0; u < U; u++) ent[u] = table[min(j0 + u, j_hi) / block_size];
    };
    const int first_loaded = preloaded ? (NPRE < PW ? j0_first + U : j0_first + ROUND) : j0_first;
    if (round_loads && first_loaded <= j_hi) entries_at(first_loaded);
    float rc = 1.f, rs = 0.f;  // thread i's RoPE coefficients (i < 2 half; hd <= blockDim)
    if (early && (int)threadIdx.x < 2 * half) rope_coef(threadIdx.x, half, rotary_dim, theta, (float)p, rc, rs);
    if (fused) {
        const float* kn_head = knew + ((size_t)r * kv_heads + kvh) * hd;
        const float* vn_head = vnew + ((size_t)r * kv_heads + kvh) * vd;
        if (READY) {
            // attention_v2_kv_ready: the projection writing q, k and v may still run. Wait for
            // this head's and its KV head's tile counts, then read the rows through L2 (never a
            // cache line loaded before they were written) into shared memory.
            __shared__ float sm_raw[256 + 256 + 128];
            if (threadIdx.x == 0) {
                while (ld_acquire(ready + h) < need_q) __nanosleep(32);
                while (ld_acquire(ready + heads + kvh) < need_kv) __nanosleep(32);
            }
            __syncthreads();
            ATT_TRACE_MARK(1);
            for (int i = threadIdx.x; i < hd; i += blockDim.x) {
                sm_raw[i] = __ldcg(qv + i);
                sm_raw[256 + i] = __ldcg(kn_head + i);
            }
            for (int i = threadIdx.x; i < vd; i += blockDim.x) sm_raw[512 + i] = __ldcg(vn_head + i);
            __syncthreads();
            qv = sm_raw;
            kn_head = sm_raw + 256;
            vn_head = sm_raw + 512;
        }
        if (early) {
            int i = threadIdx.x;
            if (i < hd) {
                sm_q[i] = rope_apply(qv, i, half, rc, rs);
                sm_k[i] = kv_round(rope_apply(kn_head, i, half, rc, rs));
            }
        } else {
            for (int i = threadIdx.x; i < hd; i += blockDim.x) {
                sm_q[i] = rope_dim(qv, i, half, rotary_dim, theta, (float)p);
                sm_k[i] = kv_round(rope_dim(kn_head, i, half, rotary_dim, theta, (float)p));
            }
        }
        // (sm_k, sm_v: the new K and V as the pool will hold them, kv_round.)
        for (int i = threadIdx.x; i < vd; i += blockDim.x) sm_v[i] = kv_round(vn_head[i] * vscale);
        __syncthreads();
        ATT_TRACE_MARK(2);
        qv = sm_q;
    }
    float qr[8];
#pragma unroll
    for (int c = 0; c < 8; c++) qr[c] = (kv_lane_elem(lane, c) < hd) ? qv[kv_lane_elem(lane, c)] : 0.f;
    if (fused && w == 0) {
        // q . k_new, in the order the loop below reduces a pooled key.
        float d = 0.f;
#pragma unroll
        for (int c = 0; c < 8; c++)
            if (kv_lane_elem(lane, c) < hd) d += qr[c] * sm_k[kv_lane_elem(lane, c)];
#pragma unroll
        for (int o2 = 16; o2 > 0; o2 >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o2);
        if (lane == 0) sm_dnew = d;
    }
    if (fused) __syncthreads();
    float m = NEG_INF, l = 0.f;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int j0 = j0_first; j0 <= j_hi; j0 += ROUND) {
        // A round's PW positions, U at a time in their order (the same online softmax updates
        // in the same order whatever U is).
#pragma unroll
        for (int sub = 0; sub < SUBS; sub++) {
            const int jb = j0 + sub * U;
            if (jb > j_hi) break;
            // Its K and V are in kr, vr0 (kr[sub * U + u] where the whole round was preloaded).
            // With PRE_ROUND every load of the first round is preloaded, else only its first.
            const bool first = PRE_ROUND ? preloaded && j0 == j0_first : preloaded && jb == j0_first;
            // (Both indices constant once unrolled: a run-time index would put kr in local memory.)
            const bool shifted = PRE_ROUND && first;
            // round_loads: every load's K and V rows into kr, vr0 at once (one round trip to L2 a
            // load, where the other loop takes three: the table entries, the K rows, then the V
            // rows, which it issues past the dots' shuffles), then the next load's entries. Same
            // values in the same order: the same bits.
            const bool in_regs = first || round_loads;
            if (round_loads && !first) {
#pragma unroll
                for (int u = 0; u < U; u++) load_rows(u, (size_t)ent[u] * block_size + min(jb + u, j_hi) % block_size);
                const int next = sub + 1 < SUBS ? jb + U : j0 + ROUND;
                if (next <= j_hi) entries_at(next);
            }
            float d[U];
            size_t slot[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                int j = min(jb + u, j_hi);
                float s = 0.f;
                if (in_regs) {
#pragma unroll
                    for (int c = 0; c < 8; c++)
                        if (kv_lane_elem(lane, c) < hd) s += qr[c] * (shifted ? kr[(sub * U + u) % NPRE][c] : kr[u][c]);
                } else {
                    slot[u] = (size_t)table[j / block_size] * block_size + j % block_size;
                    const kv_t* kv = kc + (slot[u] * kv_heads + kvh) * hd;
#ifdef KV_PAIRS
#pragma unroll
                    for (int c = 0; c < 8; c += 2)
                        if (kv_lane_elem(lane, c) < hd) {
                            float a, b;
                            kv_lane_pair(kv, lane, c, hd, a, b);
                            s += qr[c] * a;
                            s += qr[c + 1] * b;
                        }
#else
#pragma unroll
                    for (int c = 0; c < 8; c++)
                        if (lane + 32 * c < hd) s += qr[c] * kv[lane + 32 * c];
#endif
                }
                d[u] = s;
            }
#pragma unroll
            for (int o2 = 16; o2 > 0; o2 >>= 1)
#pragma unroll
                for (int u = 0; u < U; u++) d[u] += __shfl_xor_sync(0xffffffffu, d[u], o2);
            float vv[U][4];
#pragma unroll
            for (int u = 0; u < U; u++) {
                if (in_regs) {
#pragma unroll
                    for (int c = 0; c < 4; c++) vv[u][c] = shifted ? vr0[(sub * U + u) % NPRE][c] : vr0[u][c];
                } else {
                    const kv_t* vr = vc + (slot[u] * kv_heads + kvh) * vd;
#pragma unroll
                    for (int c = 0; c < 4; c += 2) kv_lane_pair(vr, lane, c, vd, vv[u][c], vv[u][c + 1]);
                }
                // FUSED: position p's score and value are the new ones (the pool's slot p, read
                // above, holds the previous step's leftovers). Replacing them here, in the order the
                // unfused kernel reads them, keeps its bits. (Scoring p after the loop instead fits
                // 64 registers, not 80, but measured ~9 us slower per call on the H100.)
                if (fused && min(jb + u, j_hi) == p) {
                    d[u] = sm_dnew;
#pragma unroll
                    for (int c = 0; c < 4; c++) vv[u][c] = (kv_lane_elem(lane, c) < vd) ? sm_v[kv_lane_elem(lane, c)] : 0.f;
                }
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                if (jb + u > j_hi) break;
                float sc = d[u] * scale;
                float mn = fmaxf(m, sc);
                float corr = __expf(m - mn), pe = __expf(sc - mn);
                l = l * corr + pe;
#pragma unroll
                for (int c = 0; c < 4; c++) acc[c] = acc[c] * corr + pe * vv[u][c];
                m = mn;
            }
        }
    }
    ATT_TRACE_MARK(3);
    // The new K (rotated) and V (scaled) into the pool, after this block's reads: one block per KV
    // head. (Other blocks may still read slot p's leftovers, which they replace as above.)
    if (fused && h % (heads / kv_heads) == 0 && blockIdx.z == 0) {
        size_t s = (size_t)slots[r];
        for (int i = threadIdx.x; i < hd; i += blockDim.x) kv_store(kc_out + (s * kv_heads + kvh) * hd + i, sm_k[i]);
        for (int i = threadIdx.x; i < vd; i += blockDim.x) kv_store(vc_out + (s * kv_heads + kvh) * vd + i, sm_v[i]);
    }
    if (lane == 0) { sm_m[w] = m; sm_l[w] = l; }
#pragma unroll
    for (int c = 0; c < 4; c++)
        if (kv_lane_elem(lane, c) < vd) sm_acc[w][kv_lane_elem(lane, c)] = acc[c];
    __syncthreads();
    float M = NEG_INF;
    for (int i = 0; i < ATT_WARPS; i++) M = fmaxf(M, sm_m[i]);
    float L = 0.f;
    for (int i = 0; i < ATT_WARPS; i++) L += sm_m[i] == NEG_INF ? 0.f : sm_l[i] * __expf(sm_m[i] - M);
    if (splits > 1) {
        // This split's state, relative to its own max (an empty split: max -inf, sum 0).
        size_t ps = ((size_t)r * heads + h) * splits + blockIdx.z;
        if (threadIdx.x == 0) { part_m[ps] = M; part_l[ps] = L; }
        for (int i = threadIdx.x; i < vd; i += blockDim.x) {
            float a = 0.f;
            for (int k = 0; k < ATT_WARPS; k++)
                if (sm_m[k] != NEG_INF) a += sm_acc[k][i] * __expf(sm_m[k] - M);
            part_acc[ps * vd + i] = a;
        }
        if (!counters) return;  // attention_combine merges the splits
        // The last split of (r, h) to finish merges them all, as attention_combine would (one
        // launch fewer): every split publishes its state, then counts itself in; the counter is
        // zero again for the next call.
        if (!block_arrive_last(counters + (size_t)r * heads + h, (unsigned)splits)) return;
        attention_combine_head(part_m, part_l, part_acc, o, r, h, heads, vd, splits, sinks, oh, ol, threadIdx.x, blockDim.x);
        return;
    }
    float sink_w = 0.f;
    if (sinks) {
        float sc = sinks[h];
        float mn = fmaxf(M, sc);
        float corr = __expf(M - mn);
        L = L * corr;
        sink_w = __expf(sc - mn);
        L += sink_w;
        M = mn;
    }
    size_t ob = ((size_t)r * heads + h) * vd;
    for (int i = threadIdx.x; i < vd; i += blockDim.x) {
        float a = 0.f;
        for (int k = 0; k < ATT_WARPS; k++)
            if (sm_m[k] != NEG_INF) a += sm_acc[k][i] * __expf(sm_m[k] - M);
        a /= L;
        o[ob + i] = a;
        if (oh) split_bf16_value(a, oh[ob + i], ol[ob + i]);  // o_proj's BF16 GEMV input
    }
}

// The two entry points of attention_v2_body, one parameter list.
#define ATTENTION_V2_KERNEL(NAME, FUSED)                                                                                     \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                                                  \
        const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc, float* __restrict__ o,      \
        const int* __restrict__ pos, const int* __restrict__ seq, const int* __restrict__ tables, int max_blocks,            \
        int block_size, int heads, int kv_heads, int hd, int vd, int window, float scale, const float* __restrict__ sinks,   \
        float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_acc,                                \
        unsigned short* __restrict__ oh, unsigned short* __restrict__ ol, const float* __restrict__ knew,                    \
        const float* __restrict__ vnew, kv_t* kc_out, kv_t* vc_out, const long long* __restrict__ slots, int half,         \
        int rotary_dim, float theta, float vscale, unsigned* __restrict__ counters) {                                        \
        PDL_ENTER();                                                                                                         \
        attention_v2_body<FUSED>(q, kc, vc, o, pos, seq, tables, max_blocks, block_size, heads, kv_heads, hd, vd, window,    \
                                 scale, sinks, part_m, part_l, part_acc, oh, ol, knew, vnew, kc_out, vc_out, slots, half,    \
                                 rotary_dim, theta, vscale, counters);                                                       \
    }
// attention_v2 over the pools (q already rotated, the rows' K/V already written).
ATTENTION_V2_KERNEL(attention_v2, false)
// attention_v2 for decode rows with RoPE and the K/V write inside (the fused mode above). It
// takes 80 registers (3 blocks of 256 per SM against attention_v2's 4), so the host uses it only
// while its grid fits one wave: at batch 8 its 512 blocks needed a second and the step was ~2%
// slower than with rope_kv_write.
ATTENTION_V2_KERNEL(attention_v2_kv, true)

// attention_v2_kv launched right behind the q/k/v projection that counts its tiles
// (gemv_mma_fp8_t1_ready, kernels/gemv.cu): no wait for that whole launch; each block waits for
// its own head's counts instead (need_q tiles in ready[h], need_kv in ready[heads + its KV
// head]), so the first heads' attention runs while the projection streams the last heads' rows.
// Its launch follows the projection's every block (PDL), which waited for everything before it.
// Before it exits, every block waits for the projection's grid after all (done by then), so
// this grid finishing implies that one finished, as a kernel's completion does everywhere else
// in a step. ready[heads + kv_heads] counts the blocks out (block_arrive_last): the last zeroes
// every count for the next call; or, with reset_by_next, the launch after it zeroes them once
// past its own wait (the o_proj GEMV: zero_after_wait), and the blocks leave uncounted.
// attention_v2_kv_ready_pre: the same, loading its warps' first round of positions and the
// RoPE coefficients before waiting for its heads (PRELOAD above). Holding them across the wait
// takes registers: the host runs it only where its grid fits one wave (batch 1 and 4: 256
// blocks), capped at 96 so that two of its blocks and an o_proj block share an SM. At 3 blocks
// per SM (80 registers, 32 bytes spilled) the batch-1 step was 0.5% slower than without the
// preload; at 96 or 109 it is 0.3-0.6% faster (benches/results/2026-11-25-attention-preload.md).
// Its first round of 4 positions is preloaded at once (PRE_ROUND), its later rounds loaded 2
// at a time: 16 bytes spilled where 4 at a time spilled 84, the batch-1 step 2.5 us faster in
// 4 of 4 load pairs, batch 4 even (-DATT_PRE_FOURS restores 4 at a time, for measurements).
// attention_v2_kv_ready (where the splits fill a larger wave: 2-3 and 5-6 rows of 64 heads)
// stays at 80 registers, 3 blocks an SM (at 96 its batch 2 / 3 / 5 steps were 55-83 us
// slower), and takes the preload and the round loads 2 positions at a time (SUBS = 2: a warp's
// 4 positions a round in 2 loads, the same positions in the same order as attention_v2_kv's, so
// the same bits): no spills at 80, and batch 5 / 6 steps ~45 us faster than its old loop
// without the preload (which -DATT_READY_OLD restores, for measurements). Its 4 positions
// loaded at once spilled 80 bytes at 80 registers and were slower; 2 a round without the
// preload took 56 registers (4 blocks an SM) and made batch 5 / 6 steps ~236 us slower
// (benches/results/2026-11-29-h200-ready-attention-two-at-a-time.md). -DATT_READY_ONE loads one
// position at a time (the preload one), which with -DATT_READY_MAXREG=64 fits 64 registers
// without spills, 4 blocks an SM, for measurements.
#ifndef ATT_PRE_MAXREG
#define ATT_PRE_MAXREG 96
#endif
#ifndef ATT_READY_MAXREG
#define ATT_READY_MAXREG 80
#endif
#define ATTENTION_V2_KV_READY(NAME, PRELOAD, MAXREG, U, SUBS, PRE_ROUND)                                                       \
    extern "C" __global__ void __maxnreg__(MAXREG) NAME(                                                                       \
        const float* q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc, float* __restrict__ o,                     \
        const int* __restrict__ pos, const int* __restrict__ seq, const int* __restrict__ tables, int max_blocks,              \
        int block_size, int heads, int kv_heads, int hd, int vd, int window, float scale, const float* __restrict__ sinks,     \
        float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_acc, unsigned short* __restrict__ oh, \
        unsigned short* __restrict__ ol, const float* knew, const float* vnew, kv_t* kc_out, kv_t* vc_out,                   \
        const long long* __restrict__ slots, int half, int rotary_dim, float theta, float vscale, unsigned* __restrict__ counters, \
        unsigned* ready, unsigned need_q, unsigned need_kv, int reset_by_next) {                                               \
        TRACE_SCOPE();                                                                                                         \
        ATT_TRACE_MARKS_INIT();                                                                                                \
        PDL_TRIGGER();                                                                                                         \
        attention_v2_body<true, false, true, PRELOAD, U, PRELOAD, SUBS, PRE_ROUND>(q, kc, vc, o, pos, seq, tables, max_blocks, block_size, heads, kv_heads, \
                                                      hd, vd, window, scale, sinks, part_m, part_l, part_acc, oh, ol, knew, vnew, \
                                                      kc_out, vc_out, slots, half, rotary_dim, theta, vscale, counters, nullptr, \
                                                      ready, need_q, need_kv);                                                 \
        ATT_TRACE_MARK(4);                                                                                                     \
        PDL_WAIT();                                                                                                            \
        ATT_TRACE_MARK(5);                                                                                                     \
        /* (The body returns block-uniformly.) With reset_by_next the launch after this one zeroes the counts */               \
        /* (zero_after_wait, kernels/gemv.cu): no count of the blocks out, one round trip to L2 fewer at the end. */           \
        if (!reset_by_next && block_arrive_last(ready + heads + kv_heads, gridDim.x * gridDim.y * gridDim.z) && threadIdx.x == 0) \
            for (int i = 0; i < heads + kv_heads; i++) ready[i] = 0u;                                                          \
        ATT_TRACE_MARK_END();                                                                                                  \
    }
#ifdef ATT_READY_OLD
ATTENTION_V2_KV_READY(attention_v2_kv_ready, false, ATT_READY_MAXREG, ATT_UNROLL, 1, false)
#elif defined(ATT_READY_ONE)
ATTENTION_V2_KV_READY(attention_v2_kv_ready, true, ATT_READY_MAXREG, 1, 4, false)
#else
ATTENTION_V2_KV_READY(attention_v2_kv_ready, true, ATT_READY_MAXREG, 2, 2, false)
#endif
#ifdef ATT_PRE_FOURS
ATTENTION_V2_KV_READY(attention_v2_kv_ready_pre, true, ATT_PRE_MAXREG, ATT_UNROLL, 1, false)
#else
ATTENTION_V2_KV_READY(attention_v2_kv_ready_pre, true, ATT_PRE_MAXREG, 2, 2, true)
#endif

// Decode attention with one warp per head: block (r, y, z) serves heads ATT_WARPS y .. + 7 of
// row r over split z's positions. The block stages the K and V rows of ATT_TILE positions at a
// time in shared memory (cp.async, ATT_STAGES tiles in flight), so heads that share a KV head
// read its cache once per block: attention_v2 gives each head blocks of its own, and at batch
// 64 of Flash shapes (16 heads per KV head, 128 positions) those read ~660 MB of K/V from L2
// per layer for 42-84 MB of cache (125-131 us under ncu; this kernel 61-65 us). Each warp
// scores a tile with lane l taking position l % 16 and half l / 16 of the head dimension (one
// float4 dot product each, halves added by one shuffle), updates its running softmax once per
// tile, and adds the tile's V rows with lane l holding output elements l + 32 c. (A warp
// scoring 4 positions at a time with lane-strided dot products, as attention_v2's warps do,
// issued ~100 instructions per position: 76-78 us, issue-bound.) q is rotated and the rows'
// K/V are in the pools (rope_kv_write ran); hd % 8 == 0, vd % 4 == 0, hd <= 256, vd <= 128.
// Dynamic shared memory: attention_heads_smem on the host (the tiles, rows padded to an odd
// count of 16-byte units so a quarter warp's float4 reads of 8 rows hit distinct banks, then
// the 8 heads' q). With splits (gridDim.z > 1) each warp writes its head's state for
// attention_combine, or with `counters` the last block of (r, y) to finish merges its heads
// (counter r * heads + ATT_WARPS y, zero again after). Same semantics as attention_v2, not the
// same bits.
// (80 registers, 3 blocks per SM; cut for 4, ptxas spills 64 bytes. Three tiles in flight
// measured no faster: 63 against 61 us at batch 64.)
#define ATT_TILE 16
#define ATT_STAGES 2
extern "C" __global__ void __launch_bounds__(256, 3) attention_v2_heads(
    const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc, float* __restrict__ o,
    const int* __restrict__ pos, const int* __restrict__ seq, const int* __restrict__ tables, int max_blocks,
    int block_size, int heads, int kv_heads, int hd, int vd, int window, float scale, const float* __restrict__ sinks,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_acc, unsigned short* __restrict__ oh,
    unsigned short* __restrict__ ol, unsigned* __restrict__ counters) {
    PDL_ENTER();
    constexpr int stages = ATT_STAGES;
    extern __shared__ float4 att_smem[];
    int r = blockIdx.x, lane = threadIdx.x & 31, w = threadIdx.x >> 5, h = blockIdx.y * ATT_WARPS + w;
    bool active = h < heads;
    int group = heads / kv_heads;
    const int* table = tables + (size_t)seq[r] * max_blocks;
    int p = pos[r];
    int lo = window > 0 ? max(0, p + 1 - window) : 0;
    int splits = gridDim.z, chunk = (p - lo + splits) / splits;
    int j_lo = lo + blockIdx.z * chunk, j_hi = min(j_lo + chunk - 1, p);
    const int kq = hd / KV_VEC, rq = (hd + vd) / KV_VEC;  // 16-byte units of a K row, of a K + V row
    const int row = KV_VEC * (rq | 1);                    // elements per staged row (padded: odd units)
    // A block's heads may span KV heads (fewer than 8 heads per KV head): a tile holds, per
    // position, the rows of the KV heads of its first to its last head.
    int kv0 = (blockIdx.y * ATT_WARPS) / group, kv1 = (min(blockIdx.y * ATT_WARPS + ATT_WARPS, heads) - 1) / group;
    int nkv = kv1 - kv0 + 1;  // 1 unless group < ATT_WARPS
    kv_t* tiles = reinterpret_cast<kv_t*>(att_smem);                                   // [stages][ATT_TILE][nkv][row]
    float* sq = reinterpret_cast<float*>(tiles + (size_t)stages * ATT_TILE * nkv * row);  // [ATT_WARPS][hd]
    // Warp w stages positions PW w + a of a tile, lane-strided 16-byte units of their rows;
    // `ent` holds their block-table entries, loaded a tile ahead so the copies never wait.
    constexpr int PW = ATT_TILE / ATT_WARPS;
    auto entries = [&](int t0, int ent[PW]) {
#pragma unroll
        for (int a = 0; a < PW; a++) ent[a] = __ldg(table + min(t0 + PW * w + a, j_hi) / block_size);
    };
    auto stage = [&](int t0, int b, const int ent[PW]) {
        kv_t* t = tiles + (size_t)b * ATT_TILE * nkv * row;
#pragma unroll
        for (int a = 0; a < PW; a++) {
            int jj = PW * w + a, j = t0 + jj;
            if (j > j_hi) break;
            size_t slot = (size_t)ent[a] * block_size + j % block_size;
            for (int kk = 0; kk < nkv; kk++) {
                const kv_t* ks = kc + (slot * kv_heads + kv0 + kk) * hd;
                const kv_t* vs = vc + (slot * kv_heads + kv0 + kk) * vd;
                kv_t* dst = t + ((size_t)jj * nkv + kk) * row;
                for (int c = lane; c < rq; c += 32) cp_async16(dst + KV_VEC * c, c < kq ? ks + KV_VEC * c : vs + KV_VEC * (c - kq));
            }
        }
        cp_async_commit();
    };
    // The first stages - 1 tiles; then each step stages the tile stages - 1 ahead (a commit
    // group each, empty past j_hi, so the wait below is by count).
    int ent[PW];
    for (int i = 0; i < stages - 1; i++) {
        entries(j_lo + i * ATT_TILE, ent);
        stage(j_lo + i * ATT_TILE, i, ent);
    }
    entries(j_lo + (stages - 1) * ATT_TILE, ent);
    // The warp's q, for its lanes' float4 reads.
    int hq = min(h, heads - 1), kk = hq / group - kv0;  // kk: the warp's KV head among the staged
    for (int i = lane; i < hd; i += 32) sq[w * hd + i] = q[((size_t)r * heads + hq) * hd + i];
    __syncwarp();
    const float NEG_INF = __int_as_float(0xff800000u);
    float m = NEG_INF, l = 0.f;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const int jl = lane & (ATT_TILE - 1), half = lane / ATT_TILE, hh = hd / 2;  // position, half of hd
    const float4* qh = reinterpret_cast<const float4*>(sq + w * hd + half * hh);
    TRACE_MARK(0);
    for (int t0 = j_lo, b = 0; t0 <= j_hi; t0 += ATT_TILE, b = b + 1 == stages ? 0 : b + 1) {
        int ta = t0 + (stages - 1) * ATT_TILE;  // the tile asked for now, into the buffer freed last step
        stage(ta, b == 0 ? stages - 1 : b - 1, ent);
        entries(ta + ATT_TILE, ent);  // used a step from now
        cp_async_wait<stages - 1>();
        __syncthreads();  // tile t0 is in buffer b for every warp
        const kv_t* tb = tiles + (size_t)b * ATT_TILE * nkv * row + kk * row;  // position 0's row
        const int nt = min(ATT_TILE, j_hi - t0 + 1);                             // staged positions
        if (active) {
            // Scores: lane (jl, half) takes half of q . k_jl; unstaged positions score -inf.
            const kv_t* kr = tb + (size_t)jl * nkv * row + half * hh;
            float sc = 0.f;
            int i0 = 0;
#ifdef KV_BF16
            // Eight BF16 values a 16-byte read where the half rows are whole 16-byte units.
            if (hh % 8 == 0)
                for (; i0 < hh / 4; i0 += 2) {
                    const uint4 w8 = *reinterpret_cast<const uint4*>(kr + 4 * i0);
                    float4 a4 = qh[i0], b4 = qh[i0 + 1];
                    sc += a4.x * __uint_as_float(w8.x << 16) + a4.y * __uint_as_float(w8.x & 0xffff0000u) +
                          a4.z * __uint_as_float(w8.y << 16) + a4.w * __uint_as_float(w8.y & 0xffff0000u);
                    sc += b4.x * __uint_as_float(w8.z << 16) + b4.y * __uint_as_float(w8.z & 0xffff0000u) +
                          b4.z * __uint_as_float(w8.w << 16) + b4.w * __uint_as_float(w8.w & 0xffff0000u);
                }
#elif defined(KV_FP8)
            // Sixteen FP8 values a 16-byte read where the half rows are whole 16-byte units.
            if (hh % 16 == 0)
                for (; i0 < hh / 4; i0 += 4) {
                    const uint4 w16 = *reinterpret_cast<const uint4*>(kr + 4 * i0);
                    const unsigned wv[4] = {w16.x, w16.y, w16.z, w16.w};
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const float2 lo = kv_fp8x2((unsigned short)(wv[e] & 0xffffu)), hi = kv_fp8x2((unsigned short)(wv[e] >> 16));
                        const float4 a4 = qh[i0 + e];
                        sc += a4.x * lo.x + a4.y * lo.y + a4.z * hi.x + a4.w * hi.y;
                    }
                }
#endif
            for (int i = i0; i < hh / 4; i++) {
                float4 a4 = qh[i], k4 = kv_val4(kr + 4 * i);
                sc += a4.x * k4.x + a4.y * k4.y + a4.z * k4.z + a4.w * k4.w;
            }
            sc += __shfl_xor_sync(0xffffffffu, sc, ATT_TILE);
            sc = jl < nt ? sc * scale : NEG_INF;
            // The running softmax joins the tile's scores.
            float mt = sc;
#pragma unroll
            for (int o2 = ATT_TILE / 2; o2 > 0; o2 >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, o2));
            float mn = fmaxf(m, mt);
            float pe = jl < nt ? __expf(sc - mn) : 0.f, corr = __expf(m - mn);
            float ps = pe;
#pragma unroll
            for (int o2 = ATT_TILE / 2; o2 > 0; o2 >>= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o2);
            l = l * corr + ps;
            m = mn;
#pragma unroll
            for (int c = 0; c < 4; c++) acc[c] *= corr;
            // V: lane holds output elements kv_lane_elem(lane, c) (over BF16 pools in pairs, a
            // 4-byte read each).
            for (int jj = 0; jj < nt; jj++) {
                float pj = __shfl_sync(0xffffffffu, pe, jj);
                const kv_t* vr = tb + (size_t)jj * nkv * row + hd;
#ifdef KV_PAIRS
#pragma unroll
                for (int c = 0; c < 4; c += 2) {
                    float a, b;
                    kv_lane_pair(vr, lane, c, vd, a, b);
                    acc[c] += pj * a;
                    acc[c + 1] += pj * b;
                }
#else
#pragma unroll
                for (int c = 0; c < 4; c++)
                    if (lane + 32 * c < vd) acc[c] += pj * vr[lane + 32 * c];
#endif
            }
        }
        __syncthreads();  // every warp is done with buffer b before it is staged again
    }
    TRACE_MARK(1);
    size_t hb = (size_t)r * heads + h;
    if (splits == 1) {
        if (!active) return;
        // The sink logit joins the softmax: the running max may rise, rescaling the sum and acc.
        float L = l, corr = 1.f;
        if (sinks) {
            float sc = sinks[h];
            float mn = fmaxf(m, sc);
            corr = __expf(m - mn);
            L = L * corr + __expf(sc - mn);
        }
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int i = kv_lane_elem(lane, c);
            if (i < vd) {
                float a = acc[c] * corr / L;
                o[hb * vd + i] = a;
                if (oh) split_bf16_value(a, oh[hb * vd + i], ol[hb * vd + i]);  // o_proj's BF16 GEMV input
            }
        }
        return;
    }
    // This split's state of the warp's head (an empty split: max -inf, sum 0).
    if (active) {
        size_t ps = hb * splits + blockIdx.z;
        if (lane == 0) { part_m[ps] = m; part_l[ps] = l; }
#pragma unroll
        for (int c = 0; c < 4; c++)
            if (kv_lane_elem(lane, c) < vd) part_acc[ps * vd + kv_lane_elem(lane, c)] = acc[c];
    }
    if (!counters) return;  // attention_combine merges the splits
    bool merges = block_arrive_last(counters + (size_t)r * heads + blockIdx.y * ATT_WARPS, (unsigned)splits);
    TRACE_MARK(2);
    if (!merges || !active) return;
    attention_combine_head(part_m, part_l, part_acc, o, r, h, heads, vd, splits, sinks, oh, ol, lane, 32);
}

// attention_v2 over a list of rows (block x serves row rows[x]): in a prefill batch, the rows
// that no attention_prefill tile covers (decode rows of other sequences).
extern "C" __global__ void __launch_bounds__(256) attention_v2_rows(
    const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc, float* __restrict__ o,
    const int* __restrict__ pos, const int* __restrict__ seq, const int* __restrict__ tables, int max_blocks,
    int block_size, int heads, int kv_heads, int hd, int vd, int window, float scale, const float* __restrict__ sinks,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_acc, unsigned short* __restrict__ oh,
    unsigned short* __restrict__ ol, const int* __restrict__ rows) {
    PDL_ENTER();
    attention_v2_body<false, true>(q, kc, vc, o, pos, seq, tables, max_blocks, block_size, heads, kv_heads, hd, vd, window, scale,
                                   sinks, part_m, part_l, part_acc, oh, ol, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 0,
                                   0.f, 0.f, nullptr, rows);
}

// The combine as a launch of its own: block (x, h) merges row x, or (attention_combine_rows)
// row rows[x] of attention_v2_rows' list.
extern "C" __global__ void attention_combine(const float* __restrict__ part_m, const float* __restrict__ part_l,
                                             const float* __restrict__ part_acc, float* __restrict__ o, int heads, int vd,
                                             int splits, const float* __restrict__ sinks, unsigned short* __restrict__ oh,
                                             unsigned short* __restrict__ ol) {
    PDL_ENTER();
    attention_combine_head(part_m, part_l, part_acc, o, blockIdx.x, blockIdx.y, heads, vd, splits, sinks, oh, ol, threadIdx.x, blockDim.x);
}
extern "C" __global__ void attention_combine_rows(const float* __restrict__ part_m, const float* __restrict__ part_l,
                                                  const float* __restrict__ part_acc, float* __restrict__ o, int heads, int vd,
                                                  int splits, const float* __restrict__ sinks, unsigned short* __restrict__ oh,
                                                  unsigned short* __restrict__ ol, const int* __restrict__ rows) {
    PDL_ENTER();
    attention_combine_head(part_m, part_l, part_acc, o, rows[blockIdx.x], blockIdx.y, heads, vd, splits, sinks, oh, ol, threadIdx.x, blockDim.x);
}

// Paged attention for prefill: one block per (query tile, head), a tile being up to PT_Q rows
// of one sequence (tiles[2 t] = first row, tiles[2 t + 1] = row count; the host cuts a batch's
// runs of rows of one sequence). attention_v2 streams every row's keys alone, so a 2048-token
// prompt read its K/V from L2 once per row and head (~170 GB per full layer: 28% of the
// prompt's time); here each key block of PT_K positions, staged in shared memory, serves the
// tile's PT_Q rows. f32 on the CUDA cores, online softmax per row, the same masks (window,
// causal), sinks, value scale (in the pool) and outputs as attention_v2 (o, and its BF16 split
// for o_proj when oh is given); hd % 4 == 0, hd <= 256, vd % 4 == 0, vd <= 128.
// 256 threads: thread (ty, tx) = (tid / 16, tid % 16) owns rows 4 ty .. 4 ty + 3 of the tile,
// score columns tx + 16 b (b < PT_K / 16) of each key block and value columns 4 tx + 64 m (m < 2).
// Dynamic shared memory: Q [PT_Q][hd + 4], K [PT_K][hd + 4], V [PT_K][vd + 4], P [PT_Q][PT_K + 4]
// floats (the +4 puts consecutive rows 16 bytes apart in the banks).
#define PT_Q 64
// A row's softmax state (max M, sum L) with head h's sink logit, if any, joined: L is updated
// and the returned factor rescales the row's accumulator (o = acc * f / L).
__device__ __forceinline__ float sink_rescale(const float* __restrict__ sinks, int h, float M, float& L) {
    if (!sinks) return 1.f;
    float sc = sinks[h], mn = fmaxf(M, sc), f = __expf(M - mn);
    L = L * f + __expf(sc - mn);
    return f;
}
// A prefill tile's key ranges: s_lo[i], s_hi[i] = [lo, p] of row i (lo from the window; rows
// past cnt empty) and, from thread 0, s_range = their union, visible after the caller's next
// __syncthreads.
__device__ __forceinline__ void prefill_tile_ranges(const int* __restrict__ pos, int r0, int cnt, int window, int* s_lo, int* s_hi,
                                                    int* s_range) {
    const int tid = threadIdx.x;
    if (tid < PT_Q) {
        int p = tid < cnt ? pos[r0 + tid] : -1;
        s_lo[tid] = tid < cnt ? (window > 0 ? max(0, p + 1 - window) : 0) : 0x7fffffff;
        s_hi[tid] = p;
    }
    __syncthreads();
    if (tid == 0) {
        int lo = 0x7fffffff, hi = -1;
        for (int i = 0; i < cnt; i++) {
            lo = min(lo, s_lo[i]);
            hi = max(hi, s_hi[i]);
        }
        s_range[0] = lo;
        s_range[1] = hi;
    }
}
// The rows of positions j0 .. j0 + nk of a paged pool (`dim` floats per KV head, head kvh), as
// float4s handed to put(row, float4 index, value) by the block's threads; rows nk .. ROWS get
// zeros.
template <int ROWS, typename Put>
__device__ __forceinline__ void for_pool_rows(const kv_t* __restrict__ pool, int dim, int j0, int nk, const int* __restrict__ table,
                                              int block_size, int kv_heads, int kvh, Put put) {
    const int d4 = dim / 4;
    for (int i = threadIdx.x; i < ROWS * d4; i += blockDim.x) {
        int jj = i / d4, c = i % d4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (jj < nk) {
            int j = j0 + jj;
            size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
            v = kv_val4(pool + (slot * kv_heads + kvh) * dim + 4 * c);
        }
        put(jj, c, v);
    }
}
// Those rows into shared memory rows `pitch` floats apart.
template <int ROWS>
__device__ __forceinline__ void stage_pool_rows(const kv_t* __restrict__ pool, float* dst, int pitch, int dim, int j0, int nk,
                                                const int* __restrict__ table, int block_size, int kv_heads, int kvh) {
    for_pool_rows<ROWS>(pool, dim, j0, nk, table, block_size, kv_heads, kvh,
                        [&](int jj, int c, float4 v) { *reinterpret_cast<float4*>(dst + jj * pitch + 4 * c) = v; });
}
#define PT_K 64  // keys per staged block
__device__ __forceinline__ void attention_prefill_body(
    const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc, float* __restrict__ o,
    const int* __restrict__ pos, const int* __restrict__ seq, const int* __restrict__ tables, int max_blocks,
    int block_size, int heads, int kv_heads, int hd, int vd, int window, float scale, const float* __restrict__ sinks,
    unsigned short* __restrict__ oh, unsigned short* __restrict__ ol, const int* __restrict__ tiles) {
    constexpr int NB = PT_K / 16;  // score columns per thread
    extern __shared__ float4 sm4[];
    float* smem = reinterpret_cast<float*>(sm4);
    const int hp = hd + 4, vp = vd + 4, pp = PT_K + 4;
    float* Qs = smem;
    float* Ks = Qs + PT_Q * hp;
    float* Vs = Ks + PT_K * hp;
    float* Ps = Vs + PT_K * vp;
    __shared__ int s_lo[PT_Q], s_hi[PT_Q], s_range[2];
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15, h = blockIdx.y;
    const int r0 = tiles[2 * blockIdx.x], cnt = tiles[2 * blockIdx.x + 1];
    const int kvh = h / (heads / kv_heads);
    const int* table = tables + (size_t)seq[r0] * max_blocks;
    const float NEG_INF = __int_as_float(0xff800000u);
    prefill_tile_ranges(pos, r0, cnt, window, s_lo, s_hi, s_range);
    // The tile's queries (rows past cnt are zero; their results are not stored).
    const int hd4 = hd / 4;
    for (int i = tid; i < PT_Q * hd4; i += blockDim.x) {
        int row = i / hd4, c = i % hd4;
        float4 v = row < cnt ? reinterpret_cast<const float4*>(q + ((size_t)(r0 + row) * heads + h) * hd)[c] : make_float4(0.f, 0.f, 0.f, 0.f);
        *reinterpret_cast<float4*>(Qs + row * hp + 4 * c) = v;
    }
    __syncthreads();
    const int lo = s_range[0], hi = s_range[1];
    int rlo[4], rhi[4];
#pragma unroll
    for (int a = 0; a < 4; a++) {
        rlo[a] = s_lo[4 * ty + a];
        rhi[a] = s_hi[4 * ty + a];
    }
    float m[4], l[4], acc[4][8];
#pragma unroll
    for (int a = 0; a < 4; a++) {
        m[a] = NEG_INF;
        l[a] = 0.f;
#pragma unroll
        for (int c = 0; c < 8; c++) acc[a][c] = 0.f;
    }
    // Warps whose 8 rows are all past cnt compute nothing (a short last tile). Warp-uniform:
    // the row reductions below shuffle across the whole warp's mask.
    const bool active = 8 * (ty >> 1) < cnt;
    for (int j0 = lo; j0 <= hi; j0 += PT_K) {
        const int nk = min(PT_K, hi - j0 + 1);
        // Stage the key block's K and V rows (paged) in shared memory.
        stage_pool_rows<PT_K>(kc, Ks, hp, hd, j0, nk, table, block_size, kv_heads, kvh);
        stage_pool_rows<PT_K>(vc, Vs, vp, vd, j0, nk, table, block_size, kv_heads, kvh);
        __syncthreads();
        if (active) {
            // Scores of the thread's 4 rows x 4 columns.
            float s[4][NB];
#pragma unroll
            for (int a = 0; a < 4; a++)
#pragma unroll
                for (int b = 0; b < NB; b++) s[a][b] = 0.f;
#pragma unroll 4
            for (int d = 0; d < hd; d += 4) {
                float4 qv[4], kv[NB];
#pragma unroll
                for (int a = 0; a < 4; a++) qv[a] = *reinterpret_cast<const float4*>(Qs + (4 * ty + a) * hp + d);
#pragma unroll
                for (int b = 0; b < NB; b++) kv[b] = *reinterpret_cast<const float4*>(Ks + (tx + 16 * b) * hp + d);
#pragma unroll
                for (int a = 0; a < 4; a++)
#pragma unroll
                    for (int b = 0; b < NB; b++) s[a][b] += qv[a].x * kv[b].x + qv[a].y * kv[b].y + qv[a].z * kv[b].z + qv[a].w * kv[b].w;
            }
            // Online softmax per row: the 16 threads of a row (tx) reduce its block maximum and sum.
#pragma unroll
            for (int a = 0; a < 4; a++) {
                float mx = NEG_INF;
#pragma unroll
                for (int b = 0; b < NB; b++) {
                    int j = j0 + tx + 16 * b;
                    bool vis = j >= rlo[a] && j <= rhi[a];  // (tx + 16 b < nk follows from j <= hi)
                    s[a][b] = vis ? s[a][b] * scale : NEG_INF;
                    mx = fmaxf(mx, s[a][b]);
                }
#pragma unroll
                for (int off = 8; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
                float mn = fmaxf(m[a], mx);
                // A row with nothing visible so far keeps m = -inf (no NaN from -inf - -inf).
                float corr = mn == NEG_INF ? 1.f : __expf(m[a] - mn);
                float sum = 0.f;
#pragma unroll
                for (int b = 0; b < NB; b++) {
                    float pe = s[a][b] == NEG_INF ? 0.f : __expf(s[a][b] - mn);
                    Ps[(4 * ty + a) * pp + tx + 16 * b] = pe;
                    sum += pe;
                }
#pragma unroll
                for (int off = 8; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
                l[a] = l[a] * corr + sum;
                m[a] = mn;
#pragma unroll
                for (int c = 0; c < 8; c++) acc[a][c] *= corr;
            }
        }
        __syncthreads();
        // acc += P V over the block's keys (rows 4 ty + a, value columns 4 tx + 64 mm + i).
#pragma unroll 4
        for (int jj = 0; active && jj < nk; jj++) {
            float pv[4];
#pragma unroll
            for (int a = 0; a < 4; a++) pv[a] = Ps[(4 * ty + a) * pp + jj];
#pragma unroll
            for (int mm = 0; mm < 2; mm++) {
                int c = 4 * tx + 64 * mm;
                if (c < vd) {
                    float4 v = *reinterpret_cast<const float4*>(Vs + jj * vp + c);
#pragma unroll
                    for (int a = 0; a < 4; a++) {
                        acc[a][4 * mm] += pv[a] * v.x;
                        acc[a][4 * mm + 1] += pv[a] * v.y;
                        acc[a][4 * mm + 2] += pv[a] * v.z;
                        acc[a][4 * mm + 3] += pv[a] * v.w;
                    }
                }
            }
        }
        __syncthreads();  // K, V and P are refilled next
    }
    // The sink logit, then the outputs (and o's BF16 split for o_proj).
#pragma unroll
    for (int a = 0; a < 4; a++) {
        int row = 4 * ty + a;
        if (row >= cnt) continue;
        float L = l[a], f = sink_rescale(sinks, h, m[a], L);
        size_t ob = ((size_t)(r0 + row) * heads + h) * vd;
#pragma unroll
        for (int mm = 0; mm < 2; mm++) {
            int c = 4 * tx + 64 * mm;
            if (c >= vd) continue;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float v = acc[a][4 * mm + i] * f / L;
                o[ob + c + i] = v;
                if (oh) split_bf16_value(v, oh[ob + c + i], ol[ob + c + i]);
            }
        }
    }
}

// (Key blocks of 32, two blocks per SM, were faster alone under ncu but slower in a prompt while
// its steps launched with PDL, and were not kept: benches/results/2026-11-24-prefill-gemm.md.)
extern "C" __global__ void __launch_bounds__(256) attention_prefill(
    const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc, float* __restrict__ o,
    const int* __restrict__ pos, const int* __restrict__ seq, const int* __restrict__ tables, int max_blocks,
    int block_size, int heads, int kv_heads, int hd, int vd, int window, float scale, const float* __restrict__ sinks,
    unsigned short* __restrict__ oh, unsigned short* __restrict__ ol, const int* __restrict__ tiles) {
    PDL_ENTER();
    attention_prefill_body(q, kc, vc, o, pos, seq, tables, max_blocks, block_size, heads, kv_heads, hd, vd, window, scale, sinks, oh,
                           ol, tiles);
}

// y[t, n] = W[n] . x[t] for f32 W [N, K] and many rows x [T, K] (a router over a prefill chunk):
// gemv_f32 walks the rows one block per weight row, token after token, and took ~2.5 ms per
// layer for 2048 tokens of a 256 x 4096 router. Tiles of SG_T tokens x SG_N weight rows, K in
// chunks of SG_K through shared memory (the next chunk's loads in flight while this one is
// used); thread (ty, tx) = (tid / 16, tid % 16) owns tokens 4 ty .. 4 ty + 3 and rows
// 4 tx .. 4 tx + 3. 128 threads; grid (ceil(N / SG_N), ceil(T / SG_T)). K % 4 == 0.
#define SG_T 32
#define SG_N 64
#define SG_K 32
extern "C" __global__ void __launch_bounds__(128) gemm_f32_nt(const float* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
                                                              int N, int K, int T) {
    PDL_ENTER();
    __shared__ __align__(16) float xs[SG_K][SG_N + 4];  // (SG_T of each row used; one width for both tiles)
    __shared__ __align__(16) float ws[SG_K][SG_N + 4];
    const int t0 = blockIdx.y * SG_T, n0 = blockIdx.x * SG_N;
    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    // This thread's float4s of a chunk: x rows (SG_T x SG_K / 4 = 256 -> 2 each), W rows (4 each).
    float4 xr[2], wr[4];
    auto load = [&](int k0) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int f = tid + i * 128, r = f / (SG_K / 4), c = 4 * (f % (SG_K / 4));
            xr[i] = t0 + r < T && k0 + c < K ? *reinterpret_cast<const float4*>(x + (size_t)(t0 + r) * K + k0 + c) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            int f = tid + i * 128, r = f / (SG_K / 4), c = 4 * (f % (SG_K / 4));
            wr[i] = n0 + r < N && k0 + c < K ? *reinterpret_cast<const float4*>(W + (size_t)(n0 + r) * K + k0 + c) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    float acc[4][4];
#pragma unroll
    for (int a = 0; a < 4; a++)
#pragma unroll
        for (int b = 0; b < 4; b++) acc[a][b] = 0.f;
    load(0);
    for (int k0 = 0; k0 < K; k0 += SG_K) {
        __syncthreads();  // the previous chunk is used up
        // Float4 i of this thread's share -> column r of rows c .. c + 3 (K-major tiles).
        auto put = [&](float (*dst)[SG_N + 4], int i, float4 v) {
            int f = tid + i * 128, r = f / (SG_K / 4), c = 4 * (f % (SG_K / 4));
            dst[c][r] = v.x;
            dst[c + 1][r] = v.y;
            dst[c + 2][r] = v.z;
            dst[c + 3][r] = v.w;
        };
#pragma unroll
        for (int i = 0; i < 2; i++) put(xs, i, xr[i]);
#pragma unroll
        for (int i = 0; i < 4; i++) put(ws, i, wr[i]);
        __syncthreads();
        if (k0 + SG_K < K) load(k0 + SG_K);
#pragma unroll
        for (int c = 0; c < SG_K; c++) {
            float4 a4 = *reinterpret_cast<const float4*>(&xs[c][4 * ty]);
            float4 b4 = *reinterpret_cast<const float4*>(&ws[c][4 * tx]);
            float av[4] = {a4.x, a4.y, a4.z, a4.w}, bv[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
            for (int a = 0; a < 4; a++)
#pragma unroll
                for (int b = 0; b < 4; b++) acc[a][b] += av[a] * bv[b];
        }
    }
#pragma unroll
    for (int a = 0; a < 4; a++) {
        int t = t0 + 4 * ty + a;
        if (t >= T) continue;
#pragma unroll
        for (int b = 0; b < 4; b++) {
            int n = n0 + 4 * tx + b;
            if (n < N) y[(size_t)t * N + n] = acc[a][b];
        }
    }
}

// Online softmax over the two rows of an m16n8 accumulator fragment (rows g and g + 8, each
// row's scores on the 4 lanes t of a quad), shared by the tensor-core attention kernels.
// softmax_pair_max: the lanes' maxima of this tile's scores (mx) become the quad's, then the
// rows' new maxima mn = max(m, mx) and the factors e^(m - mn) that rescale what the rows hold
// (1 while a row has seen nothing: m = mn = -inf would give NaN).
__device__ __forceinline__ void softmax_pair_max(float m_a, float m_b, float mx_a, float mx_b, float& mn_a, float& mn_b,
                                                 float& corr_a, float& corr_b) {
    const float NEG_INF = __int_as_float(0xff800000u);
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
    }
    mn_a = fmaxf(m_a, mx_a);
    mn_b = fmaxf(m_b, mx_b);
    corr_a = mn_a == NEG_INF ? 1.f : __expf(m_a - mn_a);
    corr_b = mn_b == NEG_INF ? 1.f : __expf(m_b - mn_b);
}
// softmax_pair_rescale: the rows' output accumulators (m16n8 fragments: [0], [1] row g, [2], [3]
// row g + 8) times their corrections.
template <int NC>
__device__ __forceinline__ void softmax_pair_rescale(float (&acc)[NC][4], float corr_a, float corr_b) {
#pragma unroll
    for (int c = 0; c < NC; c++) {
        acc[c][0] *= corr_a;
        acc[c][1] *= corr_a;
        acc[c][2] *= corr_b;
        acc[c][3] *= corr_b;
    }
}
// softmax_pair_sum: the lanes' sums of this tile's e^(s - mn) summed over the quad and added to
// the rows' rescaled sums l; the rows' maxima move to mn.
__device__ __forceinline__ void softmax_pair_sum(float sum_a, float sum_b, float mn_a, float mn_b, float corr_a, float corr_b,
                                                 float& m_a, float& m_b, float& l_a, float& l_b) {
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        sum_a += __shfl_xor_sync(0xffffffffu, sum_a, off);
        sum_b += __shfl_xor_sync(0xffffffffu, sum_b, off);
    }
    l_a = l_a * corr_a + sum_a;
    l_b = l_b * corr_b + sum_b;
    m_a = mn_a;
    m_b = mn_b;
}
// Prefill attention on the tensor cores: the tiles of attention_prefill, two heads of one KV
// head per block (8 warps: warp w serves head 2 blockIdx.y + w / 4, tile rows 16 (w % 4) ..
// + 15), S = Q K^T and O += P V as mma.sync m16n8k8 on TF32 with each f32 operand split into a
// TF32 hi and lo part: hi.hi + hi.lo + lo.hi keeps ~22 bits of every product (the lo.lo term is
// ~2^-22 of it), about what f32 arithmetic gives, without any range scaling (TF32 has f32's
// exponent). The f32 kernel waited on shared memory with 8 warps per SM; here each staged key
// block also serves two heads. Each key block's K and V are staged split (hi and lo); Q is staged
// raw once and split per use; P stays in the registers of S (with the keys of each 8-key group
// in the order that makes S's accumulator layout P's A fragment). Same masks, online softmax per
// row, sinks and outputs as attention_prefill. Heads per KV head even; HD, VD compile-time
// multiples of 8, VD <= 128. Dynamic shared memory (4-byte words): Q [2][64][HD + 4], K hi, lo
// [TK][HD + 4], V hi, lo [TK][VD + 4] (pitches that make every fragment read conflict-free).
#define TK 32  // keys per staged block
// x rounded to TF32, to nearest with ties away from zero: cvt.rna.tf32.f32's bits for every
// finite or infinite x (the carry of the half unit may move the exponent up, as rounding
// does; +-inf stays +-inf). On sm_90 ptxas emulates the cvt with a compare and a select
// more, for NaNs, which lose their payload here (a NaN may become an infinity or zero in hi;
// lo = x - hi is then NaN, so the products stay NaN). Two instructions instead of four, in
// the inner loops of the tensor-core attention kernels. (-DTF32_CVT, measurements only: the cvt.)
__device__ __forceinline__ unsigned tf32_rna(float x) {
#ifdef TF32_CVT
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
#else
    return (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
#endif
}
__device__ __forceinline__ void tf32_split(float x, unsigned& hi, unsigned& lo) {
    hi = tf32_rna(x);
    lo = tf32_rna(x - __uint_as_float(hi));
}
__device__ __forceinline__ void mma_tf32(float d[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// d += a b with both split: the small cross terms first.
__device__ __forceinline__ void mma_tf32x3(float d[4], const unsigned ah[4], const unsigned al[4], unsigned bh0, unsigned bh1,
                                           unsigned bl0, unsigned bl1) {
    mma_tf32(d, al, bh0, bh1);
    mma_tf32(d, ah, bl0, bl1);
    mma_tf32(d, ah, bh0, bh1);
}
// d += a b where b is exact in TF32 (its low part 0): mma_tf32x3 without the term that would
// add a b_lo of zeros, the same sums. Values of BF16 and FP8 pools are exact in TF32 (8 and 4
// significant bits within TF32's 11).
__device__ __forceinline__ void mma_tf32x2(float d[4], const unsigned ah[4], const unsigned al[4], unsigned bh0, unsigned bh1) {
    mma_tf32(d, al, bh0, bh1);
    mma_tf32(d, ah, bh0, bh1);
}
// A fragment (m16n8k8) of rows r, r + 8 and columns c, c + 4 of a row-major f32 tile, split.
__device__ __forceinline__ void load_a_split(const float* base, int pitch, int r, int c, unsigned ah[4], unsigned al[4]) {
    const float* f = base + r * pitch + c;
    tf32_split(f[0], ah[0], al[0]);
    tf32_split(f[8 * pitch], ah[1], al[1]);
    tf32_split(f[4], ah[2], al[2]);
    tf32_split(f[8 * pitch + 4], ah[3], al[3]);
}
// Four 8 x 4-word matrices of shared memory in one instruction: lane i gives the address of
// row i % 8 of matrix i / 8 (16-byte aligned), and lane (g, t) gets word t of row g of matrix m
// in r[m]. The b16 matrices of ldmatrix are 8 x 4 words, so a TF32 m16n8k8 fragment (rows g,
// g + 8 and columns t, t + 4 of a tile) is one load where it was four LDS.32: the prefill
// attention was bound by its shared-memory instruction queue (mio_throttle its largest stall
// after the fixed-latency waits).
__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned r[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// The split A fragment of a row-major f32 tile from one ldmatrix: `addr` is this lane's row of
// the fragment's four 8 x 4 blocks (lane i: row i % 8 + 8 ((i / 8) % 2), column 4 (i / 16) of
// the fragment), so r = the tile's elements (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4), as
// load_a_split reads them.
__device__ __forceinline__ void split_a_ldsm(unsigned addr, unsigned ah[4], unsigned al[4]) {
    unsigned r[4];
    ldsm_x4(addr, r);
#pragma unroll
    for (int i = 0; i < 4; i++) tf32_split(__uint_as_float(r[i]), ah[i], al[i]);
}
// This lane's ldmatrix row address (bytes, shared space) for A fragments of a tile `pitch`
// words a row: rows (i % 8) + 8 ((i / 8) % 2), column 4 (i / 16).
__device__ __forceinline__ unsigned ldsm_a_row(const void* tile, int pitch, int lane) {
    const float* f = reinterpret_cast<const float*>(tile) + ((lane & 7) + 8 * ((lane >> 3) & 1)) * pitch + 4 * (lane >> 4);
    return (unsigned)__cvta_generic_to_shared(f);
}
// A key block's K and V reach shared memory in two halves, so that the next block's global
// loads are in flight while this one computes (one block of 8 warps per SM hides little latency
// by itself): load_pool_rows_regs puts this thread's float4s of the TK rows in registers (thread
// i takes float4 i, i + 256, ... of the rows laid end to end; rows past nk are zero), and
// store_pool_rows_split splits them into TF32 hi and lo rows of shared memory `pitch` words apart.
// (Staging K and V with each hi beside its lo, so a fragment is one 16-byte load, was as exact
// and 16% slower: 255 registers; benches/results/2026-11-25-prefill-attention-staging.md.)
template <int DIM>
struct PoolRowRegs {
    static constexpr int D4 = DIM / 4, N = (TK * D4 + 255) / 256;
    float4 v[N];
};
// Row jj's offset in the pool, in rows of the pool's dim (slot * kv_heads + kvh), for the TK
// positions from j0 (-1 past nk): threads 0..TK-1 each look up one, so the loads below divide by
// block_size once per row instead of once per float4 (the full layer's chunk: 110 -> 96 ms).
__device__ __forceinline__ void pool_row_offsets(long long* rows, int j0, int nk, const int* __restrict__ table, int block_size, int kv_heads, int kvh) {
    int jj = threadIdx.x;
    if (jj < TK) {
        long long r = -1;
        if (jj < nk) {
            int j = j0 + jj;
            r = ((long long)table[j / block_size] * block_size + j % block_size) * kv_heads + kvh;
        }
        rows[jj] = r;
    }
}
template <int DIM>
__device__ __forceinline__ void load_pool_rows_regs(PoolRowRegs<DIM>& r, const kv_t* __restrict__ pool, const long long* rows) {
    constexpr int D4 = PoolRowRegs<DIM>::D4;
#pragma unroll
    for (int e = 0; e < PoolRowRegs<DIM>::N; e++) {
        int i = threadIdx.x + 256 * e, jj = i / D4, c = i % D4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        long long row = i < TK * D4 ? rows[jj] : -1;
        if (row >= 0) v = kv_val4(pool + row * DIM + 4 * c);
        r.v[e] = v;
    }
}
template <int DIM>
__device__ __forceinline__ void store_pool_rows_split(const PoolRowRegs<DIM>& r, unsigned* hi, unsigned* lo, int pitch) {
    constexpr int D4 = PoolRowRegs<DIM>::D4;
#pragma unroll
    for (int e = 0; e < PoolRowRegs<DIM>::N; e++) {
        int i = threadIdx.x + 256 * e, jj = i / D4, c = i % D4;
        if (i < TK * D4) {
            uint4 h, l;
            tf32_split(r.v[e].x, h.x, l.x);
            tf32_split(r.v[e].y, h.y, l.y);
            tf32_split(r.v[e].z, h.z, l.z);
            tf32_split(r.v[e].w, h.w, l.w);
            *reinterpret_cast<uint4*>(hi + jj * pitch + 4 * c) = h;
            *reinterpret_cast<uint4*>(lo + jj * pitch + 4 * c) = l;
        }
    }
}
template <int HD, int VD>
__device__ __forceinline__ void attention_prefill_tc_body(
    const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc, float* __restrict__ o,
    const int* __restrict__ pos, const int* __restrict__ seq, const int* __restrict__ tables, int max_blocks,
    int block_size, int heads, int kv_heads, int window, float scale, const float* __restrict__ sinks,
    unsigned short* __restrict__ oh, unsigned short* __restrict__ ol, const int* __restrict__ tiles) {
    // P stays in registers: the S accumulator holds, in lane (g, t), keys 2 t and 2 t + 1 of rows
    // g and g + 8 of each 8-key group, which is the A fragment of a P V MMA whose k index t means
    // key 2 t and t + 4 key 2 t + 1; V's B fragments are read in that order (rows 2 t, 2 t + 1;
    // VP = 4 mod 32 keeps those loads conflict-free). The same bits as P through shared memory
    // in key order (stop 46's fingerprints), without its stores, barrier and loads.
    constexpr int QP = HD + 4, KP = HD + 4, VP = VD + 4;
    static_assert(VP % 32 == 4, "conflict-free V fragment loads");
    extern __shared__ float4 sm4[];
    float* Qs = reinterpret_cast<float*>(sm4);
    unsigned* Kh = reinterpret_cast<unsigned*>(Qs + 2 * PT_Q * QP);
    unsigned* Kl = Kh + TK * KP;
    unsigned* Vh = Kl + TK * KP;
    unsigned* Vl = Vh + TK * VP;
    __shared__ int s_lo[PT_Q], s_hi[PT_Q], s_range[2];
    const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int h = 2 * blockIdx.y + (w >> 2), rw0 = 16 * (w & 3);
    const int r0 = tiles[2 * blockIdx.x], cnt = tiles[2 * blockIdx.x + 1];
    const int kvh = h / (heads / kv_heads);
    const int* table = tables + (size_t)seq[r0] * max_blocks;
    const float NEG_INF = __int_as_float(0xff800000u);
    prefill_tile_ranges(pos, r0, cnt, window, s_lo, s_hi, s_range);
    // Each warp stages its own 16 query rows of its head (rows past cnt zero) in its part of
    // the Q tile [2 heads][64 rows][HD + 4].
    float* Qw = Qs + ((w >> 2) * PT_Q + rw0) * QP;
    for (int i = lane; i < 16 * (HD / 4); i += 32) {
        int row = i / (HD / 4), c = i % (HD / 4);
        float4 v = rw0 + row < cnt ? reinterpret_cast<const float4*>(q + ((size_t)(r0 + rw0 + row) * heads + h) * HD)[c] : make_float4(0.f, 0.f, 0.f, 0.f);
        *reinterpret_cast<float4*>(Qw + row * QP + 4 * c) = v;
    }
    __syncthreads();  // (s_range too)
    const int lo = s_range[0], hi = s_range[1];
    const int lo_a = s_lo[rw0 + g], hi_a = s_hi[rw0 + g], lo_b = s_lo[rw0 + g + 8], hi_b = s_hi[rw0 + g + 8];
    const bool active = rw0 < cnt;  // warp-uniform
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;
    float acc[VD / 8][4];
#pragma unroll
    for (int c = 0; c < VD / 8; c++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[c][i] = 0.f;
    // Each lane's fragment addresses, fixed for the whole kernel: the loops below add only
    // compile-time offsets and kd (recomputing (8 n + g) KP + 8 kd + t per load cost ~25
    // integer instructions per kd, and the full layer's chunk 3-5%).
    // Q and K fragments come by ldmatrix (ldsm_x4), from this lane's row of each: Q as A
    // fragments (ldsm_a_row); K's lanes 0-7 give rows 8 n + i of Kh at column 8 kd, 8-15 the
    // same at 8 kd + 4, 16-31 the same of Kl, so r = the B fragments' hi b0, b1, lo b0, b1.
    const unsigned q_row = ldsm_a_row(Qw, QP, lane);
    const unsigned k_row = (unsigned)__cvta_generic_to_shared((lane >= 16 ? Kh + TK * KP : Kh) + (lane & 7) * KP + 4 * ((lane >> 3) & 1));
    // V's B fragments stay LDS.32: staging V transposed for ldmatrix (scalar stores) and 16-byte
    // loads of four MMAs' fragments (through a permutation of the output columns) were both
    // slower (benches/results/2026-11-26-prefill-attention-ldmatrix.md).
    const unsigned* vf = Vh + 2 * t * VP + g;     // V rows 8 kj + 2 t (+ 1); column 8 c + g; Vl = Vh + TK VP
    // Key block j0's K and V wait in registers until the block ahead is done with shared
    // memory; the next block's loads are issued before this one's MMAs (the full layer's chunk:
    // 126 -> 110 ms).
    __shared__ long long s_rows[TK];
    PoolRowRegs<HD> kreg;
    PoolRowRegs<VD> vreg;
    if (lo <= hi) {
        pool_row_offsets(s_rows, lo, min(TK, hi - lo + 1), table, block_size, kv_heads, kvh);
        __syncthreads();
        load_pool_rows_regs<HD>(kreg, kc, s_rows);
        load_pool_rows_regs<VD>(vreg, vc, s_rows);
        __syncthreads();  // s_rows is read before the first block rewrites it
    }
    for (int j0 = lo; j0 <= hi; j0 += TK) {
        store_pool_rows_split<HD>(kreg, Kh, Kl, KP);
        store_pool_rows_split<VD>(vreg, Vh, Vl, VP);
        // (s_rows' readers of the block ahead passed the barrier that ended it.)
        if (j0 + TK <= hi) pool_row_offsets(s_rows, j0 + TK, min(TK, hi - j0 - TK + 1), table, block_size, kv_heads, kvh);
        __syncthreads();
        if (j0 + TK <= hi) {
            load_pool_rows_regs<HD>(kreg, kc, s_rows);
            load_pool_rows_regs<VD>(vreg, vc, s_rows);
        }
        if (active) {
            float s[TK / 8][4];
#pragma unroll
            for (int n = 0; n < TK / 8; n++)
#pragma unroll
                for (int i = 0; i < 4; i++) s[n][i] = 0.f;
            // (Unrolled over all of HD instead of 4 steps: the same bits and time, 12% more code;
            // benches/results/2026-11-26-prefill-attention-ldmatrix.md.)
#pragma unroll 4
            for (int kd = 0; kd < HD / 8; kd++) {
                unsigned ah[4], al[4];
                split_a_ldsm(q_row + 32 * kd, ah, al);
#pragma unroll
                for (int n = 0; n < TK / 8; n++) {
                    unsigned kb[4];
                    ldsm_x4(k_row + 4 * (8 * n * KP + 8 * kd), kb);
#ifdef KV_TF32_EXACT
                    mma_tf32x2(s[n], ah, al, kb[0], kb[1]);  // (narrow pools: kb[2], kb[3], the low parts, are 0)
#else
                    mma_tf32x3(s[n], ah, al, kb[0], kb[1], kb[2], kb[3]);
#endif
                }
            }
            // Online softmax of rows a (g) and b (g + 8); a row's TK scores sit on the 4 lanes t.
            float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
            for (int n = 0; n < TK / 8; n++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    int j = j0 + 8 * n + 2 * t + e;
                    s[n][e] = j >= lo_a && j <= hi_a ? s[n][e] * scale : NEG_INF;
                    s[n][2 + e] = j >= lo_b && j <= hi_b ? s[n][2 + e] * scale : NEG_INF;
                    mx_a = fmaxf(mx_a, s[n][e]);
                    mx_b = fmaxf(mx_b, s[n][2 + e]);
                }
            float mn_a, mn_b, corr_a, corr_b;
            softmax_pair_max(m_a, m_b, mx_a, mx_b, mn_a, mn_b, corr_a, corr_b);
            float sum_a = 0.f, sum_b = 0.f;
#pragma unroll
            for (int n = 0; n < TK / 8; n++) {
                float2 pa, pb;
                pa.x = s[n][0] == NEG_INF ? 0.f : __expf(s[n][0] - mn_a);
                pa.y = s[n][1] == NEG_INF ? 0.f : __expf(s[n][1] - mn_a);
                pb.x = s[n][2] == NEG_INF ? 0.f : __expf(s[n][2] - mn_b);
                pb.y = s[n][3] == NEG_INF ? 0.f : __expf(s[n][3] - mn_b);
                sum_a += pa.x + pa.y;
                sum_b += pb.x + pb.y;
                s[n][0] = pa.x;  // (P from here on)
                s[n][1] = pa.y;
                s[n][2] = pb.x;
                s[n][3] = pb.y;
            }
            softmax_pair_sum(sum_a, sum_b, mn_a, mn_b, corr_a, corr_b, m_a, m_b, l_a, l_b);
            // A row whose maximum held has correction 1, and x * 1 is x: past the first key
            // blocks most warps skip the 64 multiplies (attention_gqa_tc does the same).
            if (__any_sync(0xffffffffu, corr_a != 1.f || corr_b != 1.f)) softmax_pair_rescale(acc, corr_a, corr_b);
            // acc += P V over the block's keys, 8 at a time.
#pragma unroll
            for (int kj = 0; kj < TK / 8; kj++) {
                unsigned ah[4], al[4];
                tf32_split(s[kj][0], ah[0], al[0]);
                tf32_split(s[kj][2], ah[1], al[1]);
                tf32_split(s[kj][1], ah[2], al[2]);
                tf32_split(s[kj][3], ah[3], al[3]);
                const unsigned* vk = vf + 8 * kj * VP;
#pragma unroll
                for (int c = 0; c < VD / 8; c++) {
                    const unsigned* vc8 = vk + 8 * c;
#ifdef KV_TF32_EXACT
                    mma_tf32x2(acc[c], ah, al, vc8[0], vc8[VP]);
#else
                    mma_tf32x3(acc[c], ah, al, vc8[0], vc8[VP], vc8[TK * VP], vc8[TK * VP + VP]);
#endif
                }
            }
        }
        __syncthreads();  // K and V are refilled next
    }
    if (!active) return;
    // The sink logit, then the outputs (and o's BF16 split for o_proj): lane (g, t) holds rows
    // g and g + 8, columns 8 c + 2 t and + 1.
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int row = rw0 + g + 8 * half;
        if (row >= cnt) continue;
        float L = half ? l_b : l_a, f = sink_rescale(sinks, h, half ? m_b : m_a, L);
        const size_t ob = ((size_t)(r0 + row) * heads + h) * VD;
#pragma unroll
        for (int c = 0; c < VD / 8; c++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int col = 8 * c + 2 * t + e;
                float v = acc[c][2 * half + e] * f / L;
                o[ob + col] = v;
                if (oh) split_bf16_value(v, oh[ob + col], ol[ob + col]);
            }
        }
    }
}
#define ATTENTION_PREFILL_TC_KERNEL(HD, VD)                                                                                  \
    extern "C" __global__ void __launch_bounds__(256, 1) attention_prefill_tc_d##HD##_v##VD(                                 \
        const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc, float* __restrict__ o,      \
        const int* __restrict__ pos, const int* __restrict__ seq, const int* __restrict__ tables, int max_blocks,            \
        int block_size, int heads, int kv_heads, int window, float scale, const float* __restrict__ sinks,                   \
        unsigned short* __restrict__ oh, unsigned short* __restrict__ ol, const int* __restrict__ tiles) {                  \
        PDL_ENTER();                                                                                                         \
        attention_prefill_tc_body<HD, VD>(q, kc, vc, o, pos, seq, tables, max_blocks, block_size, heads, kv_heads, window,  \
                                          scale, sinks, oh, ol, tiles);                                                      \
    }
// MiMo's attention (K 192, V 128) and two square shapes.
ATTENTION_PREFILL_TC_KERNEL(192, 128)
ATTENTION_PREFILL_TC_KERNEL(128, 128)
ATTENTION_PREFILL_TC_KERNEL(64, 64)

// Decode attention of one KV head's heads on the tensor cores: block (r, kvh, z) serves the
// `group` (<= 16) heads of KV head kvh of row r over split z's positions, the heads as the 16
// rows of mma.sync m16n8k8 (TF32 hi + lo, as attention_prefill_tc: ~f32 products), so each
// position's K and V leave shared memory once per KV head. attention_v2 reads them from L2 once
// per head (16x at Flash's 16 heads per KV head) and attention_v2_heads from shared memory once
// per head's warp, which bounds both by those reads at long contexts (benches/results/
// 2026-11-25-gqa-decode-attention.md). GT_WARPS warps split the block's positions in tiles of
// GT_TK (warp w takes tiles w, w + GT_WARPS, ...), each staging its own tiles raw by cp.async
// (two in flight) and keeping its own online softmax of its 16 rows; the block then merges its
// warps' states. q is rotated and the rows' K/V are in the pools (rope_kv_write ran). Outputs as
// attention_v2_heads: o and its BF16 split, or with splits (gridDim.z > 1) each split's states
// for attention_combine, or with `counters` the last block of (r, kvh) to finish merges its
// heads (counter r * heads + kvh * group, zero again after), or its last `sharers` blocks
// (2 <= sharers <= splits) share that merge. Same semantics as attention_v2,
// not the same bits. HD % 32 == 0, VD % 64 == 0, VD <= 128 (the compiled shapes).
// Measurement builds (outputs wrong; benches/results/2026-11-25-gqa-splits.md): -DGT_NO_STREAM
// gives every warp no tiles (the block's fixed cost), -DGT_NO_COMPUTE stages and waits for the
// tiles but computes nothing, -DGT_HEAD_MAJOR_PROBE reads each sequence's slots as if each KV
// head's positions lay contiguous (step_bench's contiguous tables only), -DGT_NO_MERGE leaves
// out the last block's merge and -DGT_NO_MMA the MMAs.
// Dynamic shared memory (4-byte words, gqa_tc_smem on the host): Q hi, lo (each [HD / 8][32
// lanes][4] in A-fragment order, within [16][HD + 4]), then per warp K [2][GT_TK][HD + 4],
// V [2][GT_TK][VD + 8] and P [16][GT_TK + 4] (conflict-free pitches).
#define GT_TK 8
template <int HD, int VD, int GT_WARPS>
__device__ __forceinline__ void attention_gqa_tc_body(
    const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc, float* __restrict__ o,
    const int* __restrict__ pos, const int* __restrict__ seq, const int* __restrict__ tables, int max_blocks,
    int block_size, int heads, int kv_heads, float scale, const float* __restrict__ sinks,
    float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_acc, unsigned short* __restrict__ oh,
    unsigned short* __restrict__ ol, unsigned* __restrict__ counters, int window, int sharers) {
    constexpr int QP = HD + 4, KP = HD + 4, VP = VD + 8, PP = GT_TK + 4;
    constexpr int WARP_WORDS = 2 * GT_TK * KP + 2 * GT_TK * VP + 16 * PP;
    extern __shared__ float4 gt_smem[];
    unsigned* Qh = reinterpret_cast<unsigned*>(gt_smem);
    unsigned* Ql = Qh + 16 * QP;
    float* warp_area = reinterpret_cast<float*>(Ql + 16 * QP);
    const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int r = blockIdx.x, kvh = blockIdx.y, group = heads / kv_heads, h0 = kvh * group;
    float* Kb = warp_area + w * WARP_WORDS;
    float* Vb = Kb + 2 * GT_TK * KP;
    float* P = Vb + 2 * GT_TK * VP;
    const int* table = tables + (size_t)seq[r] * max_blocks;
    const int p = pos[r];
    const int lo = window > 0 ? max(0, p + 1 - window) : 0;
    const int splits = gridDim.z, chunk = (p - lo + splits) / splits;
    const int j_lo = lo + blockIdx.z * chunk, j_hi = min(j_lo + chunk - 1, p);
    const int tiles = j_hi >= j_lo ? (j_hi - j_lo) / GT_TK + 1 : 0;
#ifndef GT_NO_STREAM
    const int mine = tiles > w ? (tiles - 1 - w) / GT_WARPS + 1 : 0;  // this warp's tiles
#else
    const int mine = 0;
#endif
    // Tile i's (at most two, for blocks of GT_TK positions or more) block-table entries, loaded
    // a tile ahead of its copies: each copy would otherwise wait for its own lookup.
    auto entries = [&](int i, int& e0, int& e1) {
        const int t0 = j_lo + GT_TK * i;
        e0 = __ldg(table + t0 / block_size);
        e1 = __ldg(table + min(t0 + GT_TK - 1, j_hi) / block_size);
    };
    // Tile i (positions j_lo + GT_TK i ..) into buffer b: lanes 8 a .. 8 a + 7 copy positions a
    // and a + 4, 16-byte units q, q + 8, ... of each K row, then of each V row (a quarter warp's
    // 16-byte writes fill one row's 128 contiguous bytes: no bank conflicts; compile-time
    // offsets). Positions past j_hi are zero: their V meets P = 0, which must stay finite.
    static_assert(GT_TK == 8 && HD % 32 == 0 && VD % 32 == 0, "8 positions, rows of whole 128-byte units");
    // The staged rows hold the pool's kv_t (KPT / VPT elements apart: 16-byte aligned, within the
    // f32 rows' words); each lane copies KV_VEC elements per unit, 8 lanes a row.
#if defined(KV_BF16)
    constexpr int KPT = HD + 8, VPT = VD + 8;
#elif defined(KV_FP8)
    constexpr int KPT = HD + 16, VPT = VD + 16;
#else
    constexpr int KPT = KP, VPT = VP;
#endif
    constexpr int RU = 8 * KV_VEC;  // elements a row's 8 lanes copy per unit round
    kv_t* Kt = reinterpret_cast<kv_t*>(Kb);
    kv_t* Vt = reinterpret_cast<kv_t*>(Vb);
    const int pa = lane >> 3, q8 = KV_VEC * (lane & 7);
#ifdef GT_HEAD_MAJOR_PROBE
    const size_t hm_first = (size_t)__ldg(table) * block_size, hm_base = hm_first * kv_heads;
    const size_t hm_rows = (size_t)((p + block_size) / block_size) * block_size;
#endif
    auto stage = [&](int i, int b, int e0, int e1) {
        const int t0 = j_lo + GT_TK * i;
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int jj = pa + 4 * half, j = t0 + jj;
            kv_t* kd = Kt + b * GT_TK * KPT + jj * KPT + q8;
            kv_t* vd = Vt + b * GT_TK * VPT + jj * VPT + q8;
            if (j <= j_hi) {
                const int ent = block_size >= GT_TK ? (j / block_size == t0 / block_size ? e0 : e1) : __ldg(table + j / block_size);
                size_t slot = ((size_t)ent * block_size + j % block_size) * kv_heads + kvh;
#ifdef GT_HEAD_MAJOR_PROBE
                slot = hm_base + (size_t)kvh * hm_rows + ((size_t)ent * block_size + j % block_size - hm_first);
#endif
                const kv_t* ks = kc + slot * HD + q8;
                const kv_t* vs = vc + slot * VD + q8;
                // (HD % RU != 0 only for BF16 and FP8 rows: a round past the row's end copies nothing.)
#pragma unroll
                for (int c = 0; c < HD; c += RU)
                    if (HD % RU == 0 || c + q8 < HD) cp_async16(kd + c, ks + c);
#pragma unroll
                for (int c = 0; c < VD; c += RU)
                    if (VD % RU == 0 || c + q8 < VD) cp_async16(vd + c, vs + c);
            } else {
                const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
                for (int c = 0; c < HD; c += RU)
                    if (HD % RU == 0 || c + q8 < HD) *reinterpret_cast<float4*>(kd + c) = z;
#pragma unroll
                for (int c = 0; c < VD; c += RU)
                    if (VD % RU == 0 || c + q8 < VD) *reinterpret_cast<float4*>(vd + c) = z;
            }
        }
        cp_async_commit();
    };
    int e0 = 0, e1 = 0;
    if (mine > 0) {
        entries(w, e0, e1);
        stage(w, 0, e0, e1);
    }
    if (mine > 1) entries(w + GT_WARPS, e0, e1);
    // The group's q rows split into TF32 hi and lo, in A-fragment order: entry (kd, lane) holds
    // lane (g, t)'s (g, 8 kd + t), (g + 8, ..), (g, 8 kd + t + 4), (g + 8, ..), one 16-byte load
    // each (rows past the group zero). Each thread's loads are issued together, then split: in a
    // loop of load, split, store its QU rounds of L2 latency came one after another, which a
    // block of short span (4 tiles a warp) paid ahead of every tile.
    constexpr int QU = (HD / 8) * 32 / (32 * GT_WARPS);  // entries per thread
    static_assert(QU * 32 * GT_WARPS == (HD / 8) * 32, "whole entries per thread");
    float qx[QU][4];
#pragma unroll
    for (int i = 0; i < QU; i++) {
        const int u = tid + 32 * GT_WARPS * i, kd = u >> 5, fg = (u & 31) >> 2, ft = u & 3, c = 8 * kd + ft;
        auto qv = [&](int row, int col) { return row < group ? q[((size_t)r * heads + h0 + row) * HD + col] : 0.f; };
        qx[i][0] = qv(fg, c);
        qx[i][1] = qv(fg + 8, c);
        qx[i][2] = qv(fg, c + 4);
        qx[i][3] = qv(fg + 8, c + 4);
    }
#pragma unroll
    for (int i = 0; i < QU; i++) {
        const int u = tid + 32 * GT_WARPS * i;
        uint4 hv, lv;
        tf32_split(qx[i][0], hv.x, lv.x);
        tf32_split(qx[i][1], hv.y, lv.y);
        tf32_split(qx[i][2], hv.z, lv.z);
        tf32_split(qx[i][3], hv.w, lv.w);
        reinterpret_cast<uint4*>(Qh)[u] = hv;
        reinterpret_cast<uint4*>(Ql)[u] = lv;
    }
    __syncthreads();
    const float NEG_INF = __int_as_float(0xff800000u);
    float m_a = NEG_INF, m_b = NEG_INF, l_a = 0.f, l_b = 0.f;  // rows (heads) g and g + 8
    float acc[VD / 8][4];
#pragma unroll
    for (int c = 0; c < VD / 8; c++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[c][i] = 0.f;
    for (int k = 0; k < mine; k++) {
        const int b = k & 1, t0 = j_lo + GT_TK * (w + k * GT_WARPS);
        if (k + 1 < mine) {
            stage(w + (k + 1) * GT_WARPS, b ^ 1, e0, e1);
            if (k + 2 < mine) entries(w + (k + 2) * GT_WARPS, e0, e1);
        } else {
            cp_async_commit();  // (an empty group, so the wait below is by count)
        }
        cp_async_wait<1>();
        __syncwarp();  // every lane's copies of tile k have landed
#ifdef GT_NO_COMPUTE
        continue;
#endif
        const kv_t* K = Kt + b * GT_TK * KPT;
        const kv_t* V = Vt + b * GT_TK * VPT;
        // S = Q K^T: rows g, g + 8 (heads), columns 2t, 2t + 1 (positions); two accumulators
        // over alternate 8-wide slices of HD halve the dependent chain of MMAs.
        float s0[4] = {0.f, 0.f, 0.f, 0.f}, s1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kd = 0; kd < HD / 8; kd += 2) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const int c0 = 8 * (kd + e) + t;
                const uint4 qh4 = reinterpret_cast<const uint4*>(Qh)[(kd + e) * 32 + lane], ql4 = reinterpret_cast<const uint4*>(Ql)[(kd + e) * 32 + lane];
                const unsigned ah[4] = {qh4.x, qh4.y, qh4.z, qh4.w};
                const unsigned al[4] = {ql4.x, ql4.y, ql4.z, ql4.w};
#ifdef KV_TF32_EXACT
                // Narrow pools' values are TF32 already: no split, two MMAs.
#ifdef KV_FP8
                // Row g's bytes c0 and c0 + 4 from one 8-byte read, widened together.
                const uint2 w8 = *reinterpret_cast<const uint2*>(K + g * KPT + 8 * (kd + e));
                const float2 kv2 = kv_fp8x2((unsigned short)__byte_perm(w8.x, w8.y, t | ((t + 4) << 4)));
                const unsigned bh0 = __float_as_uint(kv2.x), bh1 = __float_as_uint(kv2.y);
#else
                const unsigned bh0 = __float_as_uint(kv_val(K + g * KPT + c0)), bh1 = __float_as_uint(kv_val(K + g * KPT + c0 + 4));
#endif
#ifndef GT_NO_MMA
                mma_tf32x2(e ? s1 : s0, ah, al, bh0, bh1);
#else
                (e ? s1 : s0)[0] += __uint_as_float(ah[0] ^ al[1] ^ bh0 ^ bh1);  // measurement builds: no MMA
#endif
#else
                unsigned bh0, bl0, bh1, bl1;
                tf32_split(kv_val(K + g * KPT + c0), bh0, bl0);
                tf32_split(kv_val(K + g * KPT + c0 + 4), bh1, bl1);
#ifndef GT_NO_MMA
                mma_tf32x3(e ? s1 : s0, ah, al, bh0, bh1, bl0, bl1);
#else
                (e ? s1 : s0)[0] += __uint_as_float(ah[0] ^ al[1] ^ bh0 ^ bl1);  // measurement builds: no MMA
#endif
#endif
            }
        }
        float s[4];
#pragma unroll
        for (int i = 0; i < 4; i++) s[i] = s0[i] + s1[i];
        // Online softmax of rows a (g) and b (g + 8); a row's 8 scores sit on the 4 lanes t.
        float mx_a = NEG_INF, mx_b = NEG_INF;
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const bool live = t0 + 2 * t + e <= j_hi;
            s[e] = live ? s[e] * scale : NEG_INF;
            s[2 + e] = live ? s[2 + e] * scale : NEG_INF;
            mx_a = fmaxf(mx_a, s[e]);
            mx_b = fmaxf(mx_b, s[2 + e]);
        }
        float mn_a, mn_b, corr_a, corr_b;
        softmax_pair_max(m_a, m_b, mx_a, mx_b, mn_a, mn_b, corr_a, corr_b);
        float2 pa, pb;
        pa.x = s[0] == NEG_INF ? 0.f : __expf(s[0] - mn_a);
        pa.y = s[1] == NEG_INF ? 0.f : __expf(s[1] - mn_a);
        pb.x = s[2] == NEG_INF ? 0.f : __expf(s[2] - mn_b);
        pb.y = s[3] == NEG_INF ? 0.f : __expf(s[3] - mn_b);
        softmax_pair_sum(pa.x + pa.y, pb.x + pb.y, mn_a, mn_b, corr_a, corr_b, m_a, m_b, l_a, l_b);
        *reinterpret_cast<float2*>(P + g * PP + 2 * t) = pa;
        *reinterpret_cast<float2*>(P + (g + 8) * PP + 2 * t) = pb;
        // (A factor of 1 changes nothing: most tiles past the first leave every row's max.)
        if (__any_sync(0xffffffffu, corr_a != 1.f || corr_b != 1.f)) softmax_pair_rescale(acc, corr_a, corr_b);
        __syncwarp();  // the warp's P rows are written
        // acc += P V over the tile's GT_TK (= 8) positions: one k step.
        unsigned ah[4], al[4];
        load_a_split(P, PP, g, t, ah, al);
#pragma unroll
        for (int c = 0; c < VD / 8; c++) {
#ifdef KV_TF32_EXACT
            const unsigned bh0 = __float_as_uint(kv_val(V + t * VPT + 8 * c + g)), bh1 = __float_as_uint(kv_val(V + (t + 4) * VPT + 8 * c + g));
#ifndef GT_NO_MMA
            mma_tf32x2(acc[c], ah, al, bh0, bh1);
#else
            acc[c][0] += __uint_as_float(ah[0] ^ bh0 ^ bh1);
#endif
#else
            unsigned bh0, bl0, bh1, bl1;
            tf32_split(kv_val(V + t * VPT + 8 * c + g), bh0, bl0);
            tf32_split(kv_val(V + (t + 4) * VPT + 8 * c + g), bh1, bl1);
#ifndef GT_NO_MMA
            mma_tf32x3(acc[c], ah, al, bh0, bh1, bl0, bl1);
#else
            acc[c][0] += __uint_as_float(ah[0] ^ bh0 ^ bl1);
#endif
#endif
        }
        __syncwarp();  // buffer b and P are rewritten from the next step
    }
    // The warps' states merged: each warp's rows into shared memory (over the staging buffers),
    // then thread i sums element i of every head in warp order.
    __syncthreads();
    float* Mw = warp_area;               // [GT_WARPS][16]
    float* Lw = Mw + GT_WARPS * 16;      // [GT_WARPS][16]
    float* Aw = Lw + GT_WARPS * 16;      // [GT_WARPS][16][VD + 8] (the pad spreads a warp's stores over the banks)
    constexpr int AP = VD + 8;
    if (t == 0) {
        Mw[w * 16 + g] = m_a;
        Mw[w * 16 + g + 8] = m_b;
        Lw[w * 16 + g] = l_a;
        Lw[w * 16 + g + 8] = l_b;
    }
#pragma unroll
    for (int c = 0; c < VD / 8; c++)
#pragma unroll
        for (int e = 0; e < 2; e++) {
            Aw[(w * 16 + g) * AP + 8 * c + 2 * t + e] = acc[c][e];
            Aw[(w * 16 + g + 8) * AP + 8 * c + 2 * t + e] = acc[c][2 + e];
        }
    __syncthreads();
    for (int u = tid; u < group * VD; u += blockDim.x) {
        const int row = u / VD, col = u % VD, h = h0 + row;
        float M = NEG_INF;
#pragma unroll
        for (int v = 0; v < GT_WARPS; v++) M = fmaxf(M, Mw[v * 16 + row]);
        float L = 0.f, A = 0.f;
        if (M != NEG_INF) {
#pragma unroll
            for (int v = 0; v < GT_WARPS; v++) {
                const float mv = Mw[v * 16 + row];
                if (mv == NEG_INF) continue;
                const float f = __expf(mv - M);
                L += Lw[v * 16 + row] * f;
                A += Aw[(v * 16 + row) * AP + col] * f;
            }
        }
        const size_t hb = (size_t)r * heads + h;
        if (splits == 1) {
            const float f = sink_rescale(sinks, h, M, L);
            const float v = A * f / L;
            o[hb * VD + col] = v;
            if (oh) split_bf16_value(v, oh[hb * VD + col], ol[hb * VD + col]);
        } else {
            const size_t ps = hb * splits + blockIdx.z;
            if (col == 0) {
                part_m[ps] = M;
                part_l[ps] = L;
            }
            part_acc[ps * VD + col] = A;
        }
    }
    if (splits == 1 || !counters) return;  // (attention_combine merges the splits)
    // The merge of the splits. With `sharers` > 1 the last `sharers` blocks of (r, kvh) to
    // arrive share it: sharer k waits until every split has arrived, then merges heads k,
    // k + sharers, ..., so no one SM takes in every split's accumulators (270 KB at Flash's 33
    // splits: ~11 us of the kernel's ~38 at 8192 tokens, benches/results/
    // 2026-11-25-gqa-splits.md). Waiting blocks hold their SMs, so the host passes sharers > 1
    // only where (rows x KV heads) x sharers blocks leave room in one wave for the rest
    // (`gqa_merge_sharers`). Each sharer counts once more when it has seen every arrival; the
    // last of those zeroes the counter. Otherwise the last block merges every head.
    unsigned* cnt = counters + (size_t)r * heads + h0;
    int first = 0, stride = 1;
    if (sharers > 1) {
        __shared__ int sharer;
        __syncthreads();  // the block's partial states are written
        if (tid == 0) {
            unsigned old, seen;
            asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(cnt) : "memory");
            const int k = (int)old - (splits - sharers);
            if (k >= 0) {
                for (;;) {
                    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(cnt) : "memory");
                    if (seen >= (unsigned)splits) break;
                    __nanosleep(32);
                }
                asm volatile("atom.relaxed.gpu.global.add.u32 %0, [%1], 1;" : "=r"(old) : "l"(cnt) : "memory");
                if (old == (unsigned)(splits + sharers - 1)) atomicExch(cnt, 0u);
            }
            sharer = k;
        }
        __syncthreads();
        if (sharer < 0) return;
        first = sharer;
        stride = sharers;
    } else if (!block_arrive_last(cnt, (unsigned)splits)) {
        return;
    }
#ifdef GT_NO_MERGE
    return;  // measurement builds: outputs wrong
#endif
    // The merging block merges its heads' splits with attention_combine_head's arithmetic in
    // its order (the same bits), all threads at once: every state's max and sum into shared
    // memory in one round, each head's M, L and split weights e^(m - M) by one thread, then
    // thread (row, 8 columns) sums its accumulators, GT_TK splits' loads at a time. Its heads
    // are rows first, first + stride, ... of the group (mine of them).
    const int mine_rows = first < group ? (group - first + stride - 1) / stride : 0;
    float* Ms = warp_area;                 // [16][splits] maxima, then weights (-1: empty split)
    float* Ls = Ms + 16 * splits;          // [16][splits] sums
    float* ML = Ls + 16 * splits;          // [16] M, [16] L
#pragma unroll 4
    for (int u = tid; u < group * splits; u += blockDim.x) {
        const size_t ps = ((size_t)r * heads + h0 + u / splits) * splits + u % splits;
        Ms[u] = __ldcg(part_m + ps);
        Ls[u] = __ldcg(part_l + ps);
    }
    __syncthreads();
    // A warp per head: the max over its lanes (exact in any order), the sum by lane 0 in split
    // order, the weights by the lanes.
    for (int i = w; i < mine_rows; i += GT_WARPS) {
        const int row = first + i * stride;
        float* ms = Ms + row * splits;
        const float* ls = Ls + row * splits;
        float M = NEG_INF, L = 0.f;
        for (int z = lane; z < splits; z += 32) M = fmaxf(M, ms[z]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
        if (lane == 0) {
#pragma unroll 8
            for (int z = 0; z < splits; z++) L += ms[z] == NEG_INF ? 0.f : ls[z] * __expf(ms[z] - M);
        }
        L = __shfl_sync(0xffffffffu, L, 0);
        if (sinks) {
            const float sc = sinks[h0 + row], mn = fmaxf(M, sc);
            L = L * __expf(M - mn) + __expf(sc - mn);
            M = mn;
        }
        __syncwarp();  // lane 0 has read the maxima
        for (int z = lane; z < splits; z += 32) ms[z] = ms[z] == NEG_INF ? -1.f : __expf(ms[z] - M);
        if (lane == 0) {
            ML[row] = M;
            ML[16 + row] = L;
        }
    }
    __syncthreads();
    static_assert(VD % 64 == 0, "16 threads of whole float4s per row");
    constexpr int CPT = VD / 16;  // columns per thread (8 at VD 128)
    // 16 threads a row: 8 warps take the group's rows in one round, 4 in two.
    for (int i = tid / 16; i < mine_rows; i += GT_WARPS * 2) {
        const int row = first + i * stride, col0 = (tid % 16) * CPT;
        const float* wts = Ms + row * splits;
        const size_t hb = (size_t)r * heads + h0 + row;
        float a[CPT];
#pragma unroll
        for (int e = 0; e < CPT; e++) a[e] = 0.f;
        for (int z0 = 0; z0 < splits; z0 += GT_TK) {
            float4 v[GT_TK][CPT / 4];
#pragma unroll
            for (int c = 0; c < GT_TK; c++)
                if (z0 + c < splits)
#pragma unroll
                    for (int e = 0; e < CPT / 4; e++) v[c][e] = __ldcg(reinterpret_cast<const float4*>(part_acc + (hb * splits + z0 + c) * VD + col0) + e);
#pragma unroll
            for (int c = 0; c < GT_TK; c++) {
                if (z0 + c >= splits) break;
                const float f = wts[z0 + c];
                if (f < 0.f) continue;
#pragma unroll
                for (int e = 0; e < CPT / 4; e++) {
                    a[4 * e] += v[c][e].x * f;
                    a[4 * e + 1] += v[c][e].y * f;
                    a[4 * e + 2] += v[c][e].z * f;
                    a[4 * e + 3] += v[c][e].w * f;
                }
            }
        }
        const float L = ML[16 + row];
#pragma unroll
        for (int e = 0; e < CPT; e++) {
            const float v = a[e] / L;
            o[hb * VD + col0 + e] = v;
            if (oh) split_bf16_value(v, oh[hb * VD + col0 + e], ol[hb * VD + col0 + e]);
        }
    }
}
#define ATTENTION_GQA_TC_KERNEL(HD, VD, W, NAME)                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * W, 8 / W) NAME(                                                        \
        const float* __restrict__ q, const kv_t* __restrict__ kc, const kv_t* __restrict__ vc, float* __restrict__ o,      \
        const int* __restrict__ pos, const int* __restrict__ seq, const int* __restrict__ tables, int max_blocks,            \
        int block_size, int heads, int kv_heads, int hd, int vd, int window, float scale, const float* __restrict__ sinks,   \
        float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_acc, unsigned short* __restrict__ oh, \
        unsigned short* __restrict__ ol, unsigned* __restrict__ counters, int sharers) {                                     \
        PDL_ENTER();                                                                                                         \
        attention_gqa_tc_body<HD, VD, W>(q, kc, vc, o, pos, seq, tables, max_blocks, block_size, heads, kv_heads, scale,     \
                                         sinks, part_m, part_l, part_acc, oh, ol, counters, window, sharers);                \
    }
// The prefill tensor-core shapes (PREFILL_TC_SHAPES on the host), each in blocks of 8 warps (one
// per SM) and of 4 (two per SM: decode batches whose rows x KV heads pass one wave of 8-warp
// blocks; GQA_TC_WARPS and gqa_tc_for on the host).
// hd and vd are taken only so the host passes attention_v2_heads' argument list; the shapes are
// compile-time.
#define ATTENTION_GQA_TC_KERNELS(HD, VD)                                    \
    ATTENTION_GQA_TC_KERNEL(HD, VD, 8, attention_gqa_tc_d##HD##_v##VD)     \
    ATTENTION_GQA_TC_KERNEL(HD, VD, 4, attention_gqa_tc4_d##HD##_v##VD)
ATTENTION_GQA_TC_KERNELS(192, 128)
ATTENTION_GQA_TC_KERNELS(128, 128)
ATTENTION_GQA_TC_KERNELS(64, 64)
