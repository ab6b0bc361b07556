// Sampling on the GPU, one block of 1024 threads per logits row, so only token ids come back.
//
// Per row: temperature (<= 0: greedy argmax, ties to the lowest id), top-k, top-p and min-p with
// the host sampler's semantics (crates/engine/src/sampler.rs): top-k keeps the k largest logits
// (ties to the lowest ids), top-p the smallest prefix in descending-probability order (ties to
// the lowest ids) whose mass reaches top_p, min-p the tokens whose probability is at least
// min_p times the largest. The draw is an inverse CDF over the kept tokens in id order with the
// row's uniform u (the engine's per-output-position number, so speculative verification couples
// with plain decoding).
//
// Determinism: probabilities are exp((l - max) / T) in (0, 1], held as u64 fixed point (x 2^32),
// so every sum and histogram is an integer and exact in any order (a token whose weight rounds
// to 0, below 2^-33 of the largest, cannot be drawn). Thresholds are found by radix selection
// over an order-preserving key of the logits (4 passes of 8 bits), then the ties at the
// threshold are resolved by id with a chunked prefix count.

// (PDL_ENTER and the f16 helpers come from kernels/common.cuh, prepended by compile.rs.)

#define ST 1024
#define NW (ST / 32)
// Copies of the radix histogram (each shared by NW / HCOPIES warps).
#define HCOPIES 16

struct RowSampling {
    float temperature;
    int top_k;
    float top_p;
    float min_p;
    double u;
    unsigned adj_start, adj_len;
};

// Bias and penalties of one token (peregrine_core::backend::LogitAdjust).
struct LogitAdjust {
    unsigned token;
    float bias, repetition, subtract;
};

// Applies each row's adjustments to its logits in place, in the host sampler's order: bias,
// repetition penalty (divide positive logits, multiply the others), presence + frequency.
// A row's tokens are distinct. Grid: one block per row.
extern "C" __global__ void adjust_logits(float* __restrict__ logits, int V, const RowSampling* __restrict__ params,
                                         const LogitAdjust* __restrict__ adj) { PDL_ENTER();
    RowSampling p = params[blockIdx.x];
    float* l = logits + (size_t)blockIdx.x * V;
    for (unsigned j = threadIdx.x; j < p.adj_len; j += blockDim.x) {
        LogitAdjust a = adj[p.adj_start + j];
        if (a.token >= (unsigned)V) continue;
        float x = l[a.token] + a.bias;
        if (a.repetition != 1.f) x = x > 0.f ? x / a.repetition : x * a.repetition;
        l[a.token] = x - a.subtract;
    }
}

// Larger float -> larger key; NaN keys are never selected (callers skip non-finite logits).
__device__ __forceinline__ unsigned fkey(float f) {
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// exp((x - max) / T) in u64 fixed point (x 2^32): the largest logit weighs exactly 2^32.
__device__ __forceinline__ unsigned long long weight_of(float x, float m, float inv_t) {
    return (unsigned long long)llrint((double)expf((x - m) * inv_t) * 4294967296.0);
}

// Whether a threshold (key K, ties kept up to id cut) keeps token i of key `key`.
__device__ __forceinline__ bool above(unsigned key, int i, unsigned K, int cut) {
    return key > K || (key == K && i <= cut);
}

// The best (value desc, id asc) of the warp's candidates; every lane gets it.
__device__ __forceinline__ void warp_best(float& v, int& i) {
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        int i2 = __shfl_xor_sync(0xffffffffu, i, o);
        if (v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
    }
}

__device__ __forceinline__ unsigned long long block_sum_u64(unsigned long long v, unsigned long long* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    unsigned long long s = 0;
    for (int i = 0; i < NW; i++) s += sh[i];
    __syncthreads();
    return s;
}

// Exclusive prefix over threads of a per-thread u64 (thread order = id-chunk order).
__device__ __forceinline__ unsigned long long block_exclusive_u64(unsigned long long v, unsigned long long* sh, unsigned long long* total) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    unsigned long long x = v;
    for (int o = 1; o < 32; o <<= 1) {
        unsigned long long y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) sh[w] = x;
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned long long acc = 0;
        for (int i = 0; i < NW; i++) { unsigned long long t = sh[i]; sh[i] = acc; acc += t; }
        sh[NW] = acc;
    }
    __syncthreads();
    unsigned long long r = sh[w] + x - v;
    *total = sh[NW];
    __syncthreads();
    return r;
}

// Radix selection over keys of the finite logits: the key K at which the descending cumulative
// measure (count when weights == 0, else fixed-point mass) first reaches `need`; returns K and
// leaves in *left how much of `need` the tokens with key == K must supply. `hist` receives each
// pass's 256 totals; hlo and hhi (HCOPIES x 256 each, shared) are its per-warp-pair copies.
//
// The leading bytes of the keys fall in a few bins, so threads adding into one histogram
// serialise on them. Each pair of warps adds into its own copy, as 32-bit atomics on a low and a
// high word (the carry out of the low word, seen in the old value, goes to the high one), which
// keeps the u64 sums exact. Top-p over 152k logits on the H100: 0.77 ms per row with 64-bit
// atomics into 8 copies, 0.34 ms so (the step with one histogram cost ~2 ms more).
// TODO(perf): aggregate within a warp before the atomics (most lanes share the leading bin).
template <bool MASS>
__device__ unsigned radix_select(const float* __restrict__ l, int V, unsigned long long need, float m, float inv_t,
                                 unsigned kkey, int kcut, unsigned long long* hist, unsigned* hlo, unsigned* hhi,
                                 unsigned long long* left) {
    unsigned prefix = 0, mask = 0;
    __shared__ unsigned sel;
    __shared__ unsigned long long rem;
    if (threadIdx.x == 0) rem = need;
    unsigned* lo = hlo + ((threadIdx.x >> 5) % HCOPIES) * 256;
    unsigned* hi = hhi + ((threadIdx.x >> 5) % HCOPIES) * 256;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < HCOPIES * 256; b += ST) { hlo[b] = 0u; hhi[b] = 0u; }
        __syncthreads();
        for (int i = threadIdx.x; i < V; i += ST) {
            float x = l[i];
            if (!isfinite(x)) continue;
            unsigned key = fkey(x);
            if ((key & mask) != prefix) continue;
            // Only tokens top-k kept count towards top-p.
            if (MASS && !above(key, i, kkey, kcut)) continue;
            unsigned long long w = MASS ? weight_of(x, m, inv_t) : 1ull;
            int b = (key >> shift) & 255;
            unsigned wl = (unsigned)w, old = atomicAdd(&lo[b], wl);
            unsigned up = (unsigned)(w >> 32) + (old + wl < old ? 1u : 0u);
            if (up) atomicAdd(&hi[b], up);
        }
        __syncthreads();
        for (int b = threadIdx.x; b < 256; b += ST) {
            unsigned long long t = 0;
            for (int c = 0; c < HCOPIES; c++) t += ((unsigned long long)hhi[c * 256 + b] << 32) + hlo[c * 256 + b];
            hist[b] = t;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned long long cum = 0;
            int b = 255;
            for (; b > 0; b--) {
                if (cum + hist[b] >= rem) break;
                cum += hist[b];
            }
            rem -= cum;
            sel = (unsigned)b;
        }
        __syncthreads();
        prefix |= sel << shift;
        mask |= 255u << shift;
    }
    *left = rem;
    return prefix;
}

// The id of the token, among those with key == K in id order, at which the running measure
// (count, or mass when MASS) first reaches `left` (> 0). Chunked by thread for the id order.
template <bool MASS>
__device__ int tie_cut(const float* __restrict__ l, int V, unsigned K, unsigned long long left, float m, float inv_t,
                       unsigned kkey, int kcut, unsigned long long* sh) {
    int chunk = (V + ST - 1) / ST, c0 = threadIdx.x * chunk, c1 = min(V, c0 + chunk);
    unsigned long long mine = 0;
    // Tokens top-k dropped (ties at its threshold past its cut) do not count.
    for (int i = c0; i < c1; i++) {
        float x = l[i];
        if (isfinite(x) && fkey(x) == K && !(K == kkey && i > kcut))
            mine += MASS ? weight_of(x, m, inv_t) : 1ull;
    }
    unsigned long long total;
    unsigned long long base = block_exclusive_u64(mine, sh, &total);
    __shared__ int cut;
    if (threadIdx.x == 0) cut = V - 1;
    __syncthreads();
    if (base < left && base + mine >= left) {
        unsigned long long acc = base;
        for (int i = c0; i < c1; i++) {
            float x = l[i];
            if (isfinite(x) && fkey(x) == K && !(K == kkey && i > kcut)) {
                acc += MASS ? weight_of(x, m, inv_t) : 1ull;
                if (acc >= left) { cut = i; break; }
            }
        }
    }
    __syncthreads();
    return cut;
}

extern "C" __global__ void __launch_bounds__(ST) sample_rows(const float* __restrict__ logits, int V,
                                                             const RowSampling* __restrict__ params, int* __restrict__ out) { PDL_ENTER();
    __shared__ unsigned long long shu[NW + 1];
    __shared__ unsigned long long hist[256];
    __shared__ unsigned hlo[HCOPIES * 256], hhi[HCOPIES * 256];
    const float* l = logits + (size_t)blockIdx.x * V;
    RowSampling p = params[blockIdx.x];
    // Greedy and the max: argmax with ties to the lowest id.
    float best = __int_as_float(0xff800000u);
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < V; i += ST) {
        float x = l[i];
        if (x > best) { best = x; bi = i; }
    }
    warp_best(best, bi);
    __shared__ float wbest[NW];
    __shared__ int wbi[NW];
    __shared__ int argmax_id;
    __shared__ float mx;
    if ((threadIdx.x & 31) == 0) { wbest[threadIdx.x >> 5] = best; wbi[threadIdx.x >> 5] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        float b = wbest[0];
        int id = wbi[0];
        for (int k = 1; k < NW; k++)
            if (wbest[k] > b || (wbest[k] == b && wbi[k] < id)) { b = wbest[k]; id = wbi[k]; }
        argmax_id = id == 0x7fffffff ? 0 : id;
        mx = b;
    }
    __syncthreads();
    if (p.temperature <= 0.f || !isfinite(mx)) {
        if (threadIdx.x == 0) out[blockIdx.x] = argmax_id;
        return;
    }
    float m = mx, inv_t = 1.f / fmaxf(p.temperature, 1e-6f);
    // top-k: keep keys above kkey, and ties at kkey up to id kcut.
    unsigned kkey = 0;
    int kcut = V - 1;
    if (p.top_k > 0 && p.top_k < V) {
        unsigned long long left;
        kkey = radix_select<false>(l, V, (unsigned long long)p.top_k, m, inv_t, 0, V - 1, hist, hlo, hhi, &left);
        kcut = tie_cut<false>(l, V, kkey, left, m, inv_t, 0, V - 1, shu);
    }
    // Fixed-point weights of the top-k set and their total.
    unsigned long long z = 0;
    for (int i = threadIdx.x; i < V; i += ST) {
        float x = l[i];
        if (!isfinite(x)) continue;
        unsigned key = fkey(x);
        if (above(key, i, kkey, kcut)) z += weight_of(x, m, inv_t);
    }
    z = block_sum_u64(z, shu);
    // top-p: the smallest descending prefix whose mass reaches top_p * z.
    unsigned pkey = 0;
    int pcut = V - 1;
    if (p.top_p < 1.f) {
        unsigned long long need = (unsigned long long)ceil((double)p.top_p * (double)z);
        if (need < 1) need = 1;
        unsigned long long left;
        pkey = radix_select<true>(l, V, need, m, inv_t, kkey, kcut, hist, hlo, hhi, &left);
        pcut = tie_cut<true>(l, V, pkey, left, m, inv_t, kkey, kcut, shu);
    }
    // min-p: weight at least min_p times the largest (whose weight is 2^32).
    unsigned long long wmin = p.min_p > 0.f ? (unsigned long long)ceil((double)p.min_p * 4294967296.0) : 0ull;
    // The draw: inverse CDF over the kept tokens in id order.
    int chunk = (V + ST - 1) / ST, c0 = threadIdx.x * chunk, c1 = min(V, c0 + chunk);
    // The weight token i is drawn with: kept by top-k, top-p and min-p, else 0.
    auto drawn = [&](int i) -> unsigned long long {
        float x = l[i];
        if (!isfinite(x)) return 0ull;
        unsigned key = fkey(x);
        if (!above(key, i, kkey, kcut) || !above(key, i, pkey, pcut)) return 0ull;
        unsigned long long w = weight_of(x, m, inv_t);
        return w >= wmin ? w : 0ull;
    };
    unsigned long long mine = 0;
    for (int i = c0; i < c1; i++) mine += drawn(i);
    unsigned long long total;
    unsigned long long base = block_exclusive_u64(mine, shu, &total);
    unsigned long long target = (unsigned long long)(p.u * (double)total);
    if (target >= total) target = total - 1;
    __shared__ int pick;
    if (threadIdx.x == 0) pick = argmax_id;
    __syncthreads();
    if (base <= target && target < base + mine) {
        unsigned long long acc = base;
        for (int i = c0; i < c1; i++) {
            unsigned long long w = drawn(i);
            if (w == 0) continue;
            acc += w;
            if (acc > target) { pick = i; break; }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = pick;
}

// Log-probabilities under the raw logits of each row (the engine's host `logprobs`):
// lse = max + ln(sum exp(l - max)) (the max over non-NaN logits, as f32::max folds; the sum in
// f64); lp[r] = l[chosen[r]] - lse; and, when tops[r] > 0, the tops[r] (<= MAXTOP) largest
// finite logits, descending, ties to the lowest id, as ids and logprobs, with their count.
// tops[r] < 0: the row wants nothing. One block per row. The top list: every thread keeps its
// own best (it scans ids in ascending order, so an equal value never displaces an earlier id),
// then each warp merges its lanes' lists and warp 0 merges the warps' (no histogram atomics,
// unlike the radix selection the sampler's top-k uses).
#define MAXTOP 20

extern "C" __global__ void __launch_bounds__(ST) row_logprobs(const float* __restrict__ logits, int V, const int* __restrict__ chosen,
                                                              const int* __restrict__ tops, float* __restrict__ lp,
                                                              int* __restrict__ top_ids, float* __restrict__ top_lp, int* __restrict__ top_count) { PDL_ENTER();
    __shared__ float wmax[NW];
    __shared__ double wsum[NW];
    __shared__ float cv[NW][MAXTOP];
    __shared__ int ci[NW][MAXTOP];
    const float NEG_INF = __int_as_float(0xff800000u);
    const int NONE = 0x7fffffff;
    int r = blockIdx.x, want = tops[r], lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (want < 0) return;
    const float* l = logits + (size_t)r * V;
    int n = min(want, MAXTOP);
    // One pass: the max, and this thread's n best finite logits.
    float m = NEG_INF;
    float tv[MAXTOP];
    int ti[MAXTOP], cnt = 0;
    for (int i = threadIdx.x; i < V; i += ST) {
        float x = l[i];
        m = fmaxf(m, x);  // fmaxf skips NaN
        if (n == 0 || !isfinite(x) || (cnt == n && !(x > tv[n - 1]))) continue;
        int j = cnt < n ? cnt++ : n - 1;
        for (; j > 0 && tv[j - 1] < x; j--) { tv[j] = tv[j - 1]; ti[j] = ti[j - 1]; }
        tv[j] = x;
        ti[j] = i;
    }
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) wmax[w] = m;
    __syncthreads();
    m = wmax[0];
    for (int k = 1; k < NW; k++) m = fmaxf(m, wmax[k]);
    double s = 0.0;
    for (int i = threadIdx.x; i < V; i += ST) s += (double)expf(l[i] - m);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) wsum[w] = s;
    // Each warp's n best: n rounds over the lanes' list heads.
    int h = 0;
    for (int k = 0; k < n; k++) {
        float v = h < cnt ? tv[h] : NEG_INF;
        int id = h < cnt ? ti[h] : NONE;
        warp_best(v, id);
        if (h < cnt && ti[h] == id) h++;
        if (lane == 0) { cv[w][k] = v; ci[w][k] = id; }
    }
    __syncthreads();
    double total = 0.0;
    for (int k = 0; k < NW; k++) total += wsum[k];
    double lse = (double)m + log(total);
    if (threadIdx.x == 0) lp[r] = (float)((double)l[chosen[r]] - lse);
    if (w != 0) return;
    // Warp 0 merges the warps' lists (lane L reads warp L's, already sorted).
    h = 0;
    int c = 0;
    for (int k = 0; k < n; k++) {
        float v = h < n && lane < NW ? cv[lane][h] : NEG_INF;
        int id = h < n && lane < NW ? ci[lane][h] : NONE;
        warp_best(v, id);
        if (lane < NW && h < n && ci[lane][h] == id) h++;
        if (id == NONE) break;
        if (lane == 0) {
            top_ids[r * MAXTOP + k] = id;
            top_lp[r * MAXTOP + k] = (float)((double)v - lse);
        }
        c++;
    }
    if (lane == 0) top_count[r] = c;
}
