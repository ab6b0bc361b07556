// The element-wise and attention kernels of the CUDA forward (f32 activations), mirroring the CPU
// reference (crates/cpu/src/model.rs) operation for operation.

// x[r, :] = table[tok[r], :] (f32 table).
extern "C" __global__ void embed(const float* __restrict__ table, const int* __restrict__ tok, float* __restrict__ x, int H) {
    int r = blockIdx.x;
    for (int i = threadIdx.x; i < H; i += blockDim.x) x[(size_t)r * H + i] = table[(size_t)tok[r] * H + i];
}

__device__ __forceinline__ float block_sum(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    if (l == 0) sh[w] = v;
    __syncthreads();
    float s = 0.f;
    for (int i = 0; i < (blockDim.x + 31) / 32; i++) s += sh[i];
    __syncthreads();
    return s;
}

// HF RMSNorm per row of D: y = w * (x * rsqrt(mean(x^2) + eps)). Rows may be per-head
// (w has D entries, applied to every row).
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ y, int D, float eps) {
    __shared__ float sh[32];
    size_t r = blockIdx.x;
    float s = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) { float v = x[r * D + i]; s += v * v; }
    s = block_sum(s, sh);
    float inv = 1.f / sqrtf(s / D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) y[r * D + i] = w[i] * (x[r * D + i] * inv);
}

// x[r, i] += b[i] (bias), over n rows of D.
extern "C" __global__ void add_bias(float* __restrict__ x, const float* __restrict__ b, int D, int n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)n * D) x[i] += b[i % D];
}

// a[i] += b[i]
extern "C" __global__ void add_inplace(float* __restrict__ a, const float* __restrict__ b, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] += b[i];
}

// Rotate-half RoPE on the first 2*half dims of each head vector of row r (position pos[r]):
// inv_freq[i] = 1 / theta^(2i / rotary_dim), as the CPU reference computes it in f32.
extern "C" __global__ void rope(float* __restrict__ x, const int* __restrict__ pos, int heads, int hd, int half,
                                int rotary_dim, float theta) {
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

// K/V rows into the paged pool: slot[r] = block * block_size + offset; v scaled by vscale.
extern "C" __global__ void kv_write(const float* __restrict__ k, const float* __restrict__ v, float* __restrict__ kc,
                                    float* __restrict__ vc, const long long* __restrict__ slot, int kd, int vd, float vscale) {
    int r = blockIdx.x;
    size_t s = (size_t)slot[r];
    for (int i = threadIdx.x; i < kd; i += blockDim.x) kc[s * kd + i] = k[(size_t)r * kd + i];
    for (int i = threadIdx.x; i < vd; i += blockDim.x) vc[s * vd + i] = v[(size_t)r * vd + i] * vscale;
}

// Paged causal attention, one block (one warp) per (row, head): query row r at position pos[r]
// attends keys lo..pos (lo from the sliding window), with an optional sink logit per head, with
// online softmax. table: the row's sequence block table (tables + seq[r] * max_blocks).
extern "C" __global__ void attention(const float* __restrict__ q, const float* __restrict__ kc, const float* __restrict__ vc,
                                     float* __restrict__ o, const int* __restrict__ pos, const int* __restrict__ seq,
                                     const int* __restrict__ tables, int max_blocks, int block_size, int heads, int kv_heads,
                                     int hd, int vd, int window, float scale, const float* __restrict__ sinks) {
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
        const float* kv = kc + (slot * kv_heads + kvh) * hd;
        float d = 0.f;
        for (int i = lane; i < hd; i += 32) d += qv[i] * kv[i];
        for (int o2 = 16; o2 > 0; o2 >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o2);
        float sc = d * scale;
        float mn = fmaxf(m, sc);
        float corr = __expf(m - mn), pe = __expf(sc - mn);
        l = l * corr + pe;
        const float* vv = vc + (slot * kv_heads + kvh) * vd;
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int i = lane + 32 * c;
            acc[c] = acc[c] * corr + (i < vd ? pe * vv[i] : 0.f);
        }
        m = mn;
    }
    if (sinks) {
        float sc = sinks[h];
        float mn = fmaxf(m, sc);
        float corr = __expf(m - mn);
        l = l * corr + __expf(sc - mn);
#pragma unroll
        for (int c = 0; c < 4; c++) acc[c] *= corr;
    }
    float* ov = o + ((size_t)r * heads + h) * vd;
#pragma unroll
    for (int c = 0; c < 4; c++) {
        int i = lane + 32 * c;
        if (i < vd) ov[i] = acc[c] / l;
    }
}

// a[i] = silu(g[i]) * u[i]
extern "C" __global__ void silu_mul(const float* __restrict__ g, const float* __restrict__ u, float* __restrict__ a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { float x = g[i]; a[i] = x / (1.f + expf(-x)) * u[i]; }
}

// y[j, :] = x[idx[j], :]
extern "C" __global__ void gather_rows(const float* __restrict__ x, const int* __restrict__ idx, float* __restrict__ y, int D) {
    int j = blockIdx.x;
    for (int i = threadIdx.x; i < D; i += blockDim.x) y[(size_t)j * D + i] = x[(size_t)idx[j] * D + i];
}

// y[idx[j], :] += w[j] * x[j, :], for j in order (one launch per expert: rows of one launch are
// distinct tokens, so there are no write conflicts).
extern "C" __global__ void scatter_add_scaled(const float* __restrict__ x, const int* __restrict__ idx, const float* __restrict__ w,
                                              float* __restrict__ y, int D) {
    int j = blockIdx.x;
    for (int i = threadIdx.x; i < D; i += blockDim.x) y[(size_t)idx[j] * D + i] += w[j] * x[(size_t)j * D + i];
}

// y[t, n] = W[n, :] . x[t, :] for f32 W (one warp per (row, token)).
extern "C" __global__ void gemv_f32(const float* __restrict__ W, const float* __restrict__ x, float* __restrict__ y, int N, int K, int T) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= N * T) return;
    int n = warp % N, t = warp / N;
    float s = 0.f;
    for (int k = lane; k < K; k += 32) s += W[(size_t)n * K + k] * x[(size_t)t * K + k];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) y[(size_t)t * N + n] = s;
}

// dst[r, off + j] = src[r, j] for j < D (dst rows of width W): building concatenated features.
extern "C" __global__ void copy_cols(const float* __restrict__ src, float* __restrict__ dst, int D, int W, int off) {
    int r = blockIdx.x;
    for (int j = threadIdx.x; j < D; j += blockDim.x) dst[(size_t)r * W + off + j] = src[(size_t)r * D + j];
}

// x[rows[j], :] = v (e.g. the MASK embedding), then nothing else.
extern "C" __global__ void fill_rows(float* __restrict__ x, const int* __restrict__ rows, const float* __restrict__ v, int D) {
    int j = blockIdx.x;
    for (int i = threadIdx.x; i < D; i += blockDim.x) x[(size_t)rows[j] * D + i] = v[i];
}

// a[i] *= s
extern "C" __global__ void scale(float* __restrict__ a, float s, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) a[i] *= s;
}

// DFlash draft attention, one warp per (block row, head): keys are the drafter's context K/V in
// the paged pool at positions [lo, start) of the row's sequence, then the block's own rows
// (first .. first + nb), at positions start .. start + nb - 1. Visible: kpos <= qpos when causal,
// |qpos - kpos| < window when windowed. Online softmax, optional sinks.
extern "C" __global__ void draft_attention(const float* __restrict__ q, const float* __restrict__ kb, const float* __restrict__ vb,
                                           const float* __restrict__ kc, const float* __restrict__ vc, float* __restrict__ o,
                                           const int* __restrict__ row_seq, const int* __restrict__ row_idx,
                                           const int* __restrict__ seq_start, const int* __restrict__ seq_first,
                                           const int* __restrict__ seq_nb, const int* __restrict__ tables, int max_blocks,
                                           int block_size, int heads, int kv_heads, int hd, int vd, int window, int causal,
                                           float scale, const float* __restrict__ sinks) {
    int r = blockIdx.x, h = blockIdx.y, lane = threadIdx.x;
    int kvh = h / (heads / kv_heads);
    int s = row_seq[r], start = seq_start[s], first = seq_first[s], nb = seq_nb[s];
    int qpos = start + row_idx[r];
    const float* qv = q + ((size_t)r * heads + h) * hd;
    const int* table = tables + (size_t)s * max_blocks;
    float m = __int_as_float(0xff800000u), l = 0.f;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    int lo = window > 0 ? max(0, qpos - window + 1) : 0;
    for (int j = lo; j < start + nb; j++) {
        if (causal && j > qpos) break;
        if (window > 0 && abs(qpos - j) >= window) { if (j > qpos) break; else continue; }
        const float *kv, *vv;
        if (j < start) {
            size_t slot = (size_t)table[j / block_size] * block_size + j % block_size;
            kv = kc + (slot * kv_heads + kvh) * hd;
            vv = vc + (slot * kv_heads + kvh) * vd;
        } else {
            size_t br = (size_t)(first + j - start);
            kv = kb + (br * kv_heads + kvh) * hd;
            vv = vb + (br * kv_heads + kvh) * vd;
        }
        float d = 0.f;
        for (int i = lane; i < hd; i += 32) d += qv[i] * kv[i];
        for (int o2 = 16; o2 > 0; o2 >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o2);
        float sc = d * scale;
        float mn = fmaxf(m, sc);
        float corr = __expf(m - mn), pe = __expf(sc - mn);
        l = l * corr + pe;
#pragma unroll
        for (int c = 0; c < 4; c++) {
            int i = lane + 32 * c;
            acc[c] = acc[c] * corr + (i < vd ? pe * vv[i] : 0.f);
        }
        m = mn;
    }
    if (sinks) {
        float sc = sinks[h];
        float mn = fmaxf(m, sc);
        float corr = __expf(m - mn);
        l = l * corr + __expf(sc - mn);
#pragma unroll
        for (int c = 0; c < 4; c++) acc[c] *= corr;
    }
    float* ov = o + ((size_t)r * heads + h) * vd;
#pragma unroll
    for (int c = 0; c < 4; c++) {
        int i = lane + 32 * c;
        if (i < vd) ov[i] = acc[c] / l;
    }
}
