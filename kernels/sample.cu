// Sampling on the GPU, so only token ids come back: a cluster of 8 blocks per logits row on
// Hopper and later (each block a slice of the vocabulary), one block of 1024 threads elsewhere.
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

// Measurement builds only (PEREGRINE_KERNEL_DEFINES=-DSAMPLE_TRACE): thread 0 of row 0's first
// block stamps clock64 at each phase of its sample (phase id in the top 16 bits), so the bench
// can say where a call's time goes (Kernels::sample_trace; cuda-bench's sampling section).
#ifdef SAMPLE_TRACE
#define SAMPLE_TRACE_CAP 64
__device__ unsigned long long sample_trace[SAMPLE_TRACE_CAP];
__device__ unsigned sample_trace_n;
#define SAMPLE_STAMP(id)                                                                          \
    do {                                                                                          \
        if (trace_me && sample_trace_n < SAMPLE_TRACE_CAP)                                        \
            sample_trace[sample_trace_n++] = ((unsigned long long)(id) << 48) | (clock64() & 0xffffffffffffull); \
    } while (0)
#else
#define SAMPLE_STAMP(id)
#endif

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

// Holds each row to its token mask (a constrained sequence's allowed tokens, built on the host
// while the step ran): a refused token's logit becomes -inf, after adjust_logits and before the
// sampler. `at[r]`: the first word of row r's mask in `words` (bit i % 32 of word i / 32 set
// where token i may be sampled), or -1 for a row without one. Grid: (blocks of MASK_SPAN
// tokens, rows), so a row's ~150k tokens take one short pass of many blocks, not one block's
// ~150 dependent rounds (tens of microseconds on the step's critical path).
#define MASK_SPAN 1024
extern "C" __global__ void mask_logits(float* __restrict__ logits, int V, const int* __restrict__ at,
                                       const unsigned* __restrict__ words) { PDL_ENTER();
    int a = at[blockIdx.y];
    if (a < 0) return;
    float* l = logits + (size_t)blockIdx.y * V;
    const unsigned* w = words + a;
    // A warp takes one word's 32 tokens: one broadcast load, one coalesced store.
    int end = min(V, (int)(blockIdx.x + 1) * MASK_SPAN);
    for (int t = blockIdx.x * MASK_SPAN + threadIdx.x; t < end; t += blockDim.x)
        if (!((w[t >> 5] >> (t & 31)) & 1u)) l[t] = __int_as_float(0xff800000u);  // -inf
}

// Larger float -> larger key; NaN keys are never selected (callers skip non-finite logits).
__device__ __forceinline__ unsigned fkey(float f) {
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// exp((x - max) / T) in u64 fixed point (x 2^32), rounded to nearest (ties to even): the largest
// logit weighs exactly 2^32. e x 2^32 is exact in f32 as in f64 (e <= 1, a power-of-two scale),
// so one f32 -> s64 conversion gives the bits llrint((double)e * 2^32) gave, without two
// quarter-rate f64 conversions and an f64 multiply per token (-DSAMPLE_WEIGHT_F64: that form).
__device__ __forceinline__ unsigned long long weight_of(float x, float m, float inv_t) {
#ifdef SAMPLE_WEIGHT_F64
    return (unsigned long long)llrint((double)expf((x - m) * inv_t) * 4294967296.0);
#else
    return (unsigned long long)__float2ll_rn(expf((x - m) * inv_t) * 4294967296.f);
#endif
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

// Exclusive prefix over the block's threads of a per-thread u64 (thread order = id-chunk order);
// *total gets the block's sum. sh: NT / 32 + 1 words.
template <int NT>
__device__ __forceinline__ unsigned long long block_exclusive_u64(unsigned long long v, unsigned long long* sh, unsigned long long* total) {
    constexpr int nw = NT / 32;
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
        for (int i = 0; i < nw; i++) { unsigned long long t = sh[i]; sh[i] = acc; acc += t; }
        sh[nw] = acc;
    }
    __syncthreads();
    unsigned long long r = sh[w] + x - v;
    *total = sh[nw];
    __syncthreads();
    return r;
}

// A row is sampled by a cluster of CL blocks (CL = 1: one block), block `rank` holding the
// tokens [s0, s0 + n) of it, read from `l` (its slice staged in shared memory, or the logits).
// Every cross-block quantity (the max, histograms, tie counts, the draw's mass) is a sum or a
// max of per-block values that each block publishes in its own shared memory and every block
// reads from all, in rank order (distributed shared memory), so all blocks take the same
// decisions and the result is the one-block result: all sums are exact integers.
struct Slice {
    const float* l;
    int s0, n;
    unsigned rank;
};

// A pass's loops issue SCAN_ILP loads before using any: one block per SM has too few warps to
// hide a load's latency behind other warps, and a pass of one load, a few operations and a
// dependent branch per token ran at ~160 cycles a token per thread (SAMPLE_TRACE; -DSAMPLE_ILP=1
// gives the one-at-a-time loops back, for measurements). Every token is visited in the same
// order as before, so every sum, histogram and choice is the same.
#ifndef SAMPLE_ILP
#define SAMPLE_ILP 8
#endif

// f(i, l[i]) for i = threadIdx.x, + NT, ... < n, in that order.
template <int NT, class F>
__device__ __forceinline__ void scan_strided(const float* l, int n, F&& f) {
    int i = threadIdx.x;
    for (; i + (SAMPLE_ILP - 1) * NT < n; i += SAMPLE_ILP * NT) {
        float x[SAMPLE_ILP];
#pragma unroll
        for (int u = 0; u < SAMPLE_ILP; u++) x[u] = l[i + u * NT];
#pragma unroll
        for (int u = 0; u < SAMPLE_ILP; u++) f(i + u * NT, x[u]);
    }
    for (; i < n; i += NT) f(i, l[i]);
}

// f(i, l[i]) for i in [c0, c1), in order.
template <class F>
__device__ __forceinline__ void scan_chunk(const float* l, int c0, int c1, F&& f) {
    int i = c0;
    for (; i + SAMPLE_ILP <= c1; i += SAMPLE_ILP) {
        float x[SAMPLE_ILP];
#pragma unroll
        for (int u = 0; u < SAMPLE_ILP; u++) x[u] = l[i + u];
#pragma unroll
        for (int u = 0; u < SAMPLE_ILP; u++) f(i + u, x[u]);
    }
    for (; i < c1; i++) f(i, l[i]);
}

// The first i in [c0, c1) at which acc + the running sum of w(i, l[i]) over [c0, i] exceeds
// `target` (reaches it when `reach`), counting only nonzero weights; -1 if none. Weights are
// computed SAMPLE_ILP at a time, ahead of the running sum.
template <class W>
__device__ __forceinline__ int scan_chunk_until(const float* l, int c0, int c1, unsigned long long acc, unsigned long long target, bool reach,
                                                W&& w) {
    for (int i = c0; i < c1; i += SAMPLE_ILP) {
        unsigned long long ws[SAMPLE_ILP];
#pragma unroll
        for (int u = 0; u < SAMPLE_ILP; u++) ws[u] = i + u < c1 ? w(i + u, l[i + u]) : 0ull;
#pragma unroll
        for (int u = 0; u < SAMPLE_ILP; u++) {
            if (ws[u] == 0ull) continue;
            acc += ws[u];
            if (reach ? acc >= target : acc > target) return i + u;
        }
    }
    return -1;
}

// Copies of a block's radix histogram (warp w adds into copy w % HCOPIES).
#define HCOPIES 16

template <int NT>
struct SampleShared {
    // Per-block values published for the cluster, in two halves used in turn: a block may write
    // the next exchange's while another still reads this one's (a cluster barrier lies between
    // an exchange and the one after the next).
    unsigned long long xch[2][256];
    unsigned hlo[HCOPIES * 256], hhi[HCOPIES * 256];
    unsigned long long warp[NT / 32 + 1];
    float wbest[NT / 32];
    int wbi[NT / 32];
    unsigned sel;
    unsigned long long rem;
    int cut;
};

// All threads of the cluster meet; shared-memory writes before it are visible to every block
// after it (for CL = 1, a block barrier). (The cluster helpers: kernels/common.cuh.)
template <int CL>
__device__ __forceinline__ void cluster_sync() {
    if constexpr (CL > 1) {
        cluster_arrive_release();
        cluster_wait_acquire();
    } else {
        __syncthreads();
    }
}

// This block's rank in its cluster (0 for CL = 1, where no cluster instruction is emitted).
template <int CL>
__device__ __forceinline__ unsigned cluster_rank() {
    if constexpr (CL > 1) return cluster_ctarank();
    return 0;
}

// Block `rank`'s value of this block's shared word *p.
template <int CL>
__device__ __forceinline__ unsigned long long cluster_read(const unsigned long long* p, unsigned rank) {
    if constexpr (CL > 1) {
        unsigned long long v;
        asm volatile("ld.shared::cluster.u64 %0, [%1];" : "=l"(v) : "r"(cluster_shared_addr(p, rank)) : "memory");
        return v;
    } else {
        return *p;
    }
}

// Adds v (< 2^63) into a histogram bin held as a low and a high 32-bit word (the carry out of
// the low word, seen in its old value, goes to the high one), which keeps the u64 sums exact.
__device__ __forceinline__ void hist_add(unsigned* lo, unsigned* hi, unsigned b, unsigned long long v) {
    unsigned vl = (unsigned)v, old = atomicAdd(&lo[b], vl);
    unsigned up = (unsigned)(v >> 32) + (old + vl < old ? 1u : 0u);
    if (up) atomicAdd(&hi[b], up);
}

// Radix selection over keys of the finite logits: the key K at which the descending cumulative
// measure (count when !MASS, else fixed-point mass) first reaches `need`; returns K and leaves in
// *left how much of `need` the tokens with key == K must supply. With frac >= 0 (top-p) `need`
// is max(1, ceil(frac * the total measure)), known after the first pass.
//
// The leading bytes of the keys fall in a few bins, so threads adding into one histogram
// serialise on them: each warp adds into its own copy (pairs of warps in a block of 1024
// threads). Top-p over 152k logits on the H100: 0.77 ms per row with 64-bit atomics into 8
// copies, 0.31 ms so in one block of 1024 threads. Adding a warp's tokens of one bin together
// first (__match_any_sync, then __reduce_add_sync) took twice as long again.
template <int CL, int NT, bool MASS>
__device__ unsigned radix_select(const Slice& s, double frac, unsigned long long need, float m, float inv_t, unsigned kkey,
                                 int kcut, SampleShared<NT>& sh, unsigned& ph, unsigned long long* left, bool trace_me = false) {
    const int lane = threadIdx.x & 31;
    unsigned prefix = 0, mask = 0;
    unsigned long long rem = need;
    unsigned* lo = sh.hlo + ((threadIdx.x >> 5) % HCOPIES) * 256;
    unsigned* hi = sh.hhi + ((threadIdx.x >> 5) % HCOPIES) * 256;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < HCOPIES * 256; b += NT) { sh.hlo[b] = 0u; sh.hhi[b] = 0u; }
        __syncthreads();
        scan_strided<NT>(s.l, s.n, [&](int i, float x) {
            if (!isfinite(x)) return;
            unsigned key = fkey(x);
            if ((key & mask) != prefix) return;
            // Only tokens top-k kept count towards top-p.
            if (MASS && !above(key, s.s0 + i, kkey, kcut)) return;
            // A count is one add whose old value nobody waits for (its sums stay far below 2^32):
            // top-k's first pass ~6.3k cycles a block against ~12.9k through hist_add's carry.
            // (Weights keep the carry: their low and high halves as two adds read slower.)
            if (MASS) hist_add(lo, hi, (key >> shift) & 255u, weight_of(x, m, inv_t));
            else atomicAdd(&lo[(key >> shift) & 255u], 1u);
        });
        SAMPLE_STAMP(10 + (24 - shift) / 8);
        __syncthreads();
        SAMPLE_STAMP(20 + (24 - shift) / 8);
        unsigned long long* mine = sh.xch[ph & 1];
        ph++;
        for (int b = threadIdx.x; b < 256; b += NT) {
            unsigned long long t = 0;
            for (int c = 0; c < HCOPIES; c++) t += ((unsigned long long)sh.hhi[c * 256 + b] << 32) + sh.hlo[c * 256 + b];
            mine[b] = t;
        }
        SAMPLE_STAMP(30 + (24 - shift) / 8);
        cluster_sync<CL>();
        SAMPLE_STAMP(40 + (24 - shift) / 8);
        // Thread b < 256: bin b's total over the cluster and S = the sum over bins >= b.
        unsigned long long tot = 0, S = 0;
        if (threadIdx.x < 256) {
            for (unsigned r = 0; r < CL; r++) tot += cluster_read<CL>(mine + threadIdx.x, r);
            S = tot;
            for (int o = 1; o < 32; o <<= 1) {
                unsigned long long y = __shfl_down_sync(0xffffffffu, S, o);
                if (lane + o < 32) S += y;
            }
            if (lane == 0) sh.warp[threadIdx.x >> 5] = S;
        }
        __syncthreads();
        if (shift == 24 && frac >= 0.0) {
            unsigned long long z = 0;
            for (int w = 0; w < 8; w++) z += sh.warp[w];
            rem = (unsigned long long)ceil(frac * (double)z);
            if (rem < 1) rem = 1;
        }
        if (threadIdx.x < 256) {
            for (int w = (threadIdx.x >> 5) + 1; w < 8; w++) S += sh.warp[w];
            // The highest bin b >= 1 whose suffix reaches rem, else bin 0; rem loses the bins above.
            unsigned long long above_b = S - tot;
            if ((threadIdx.x == 0 || S >= rem) && above_b < rem) {
                sh.sel = threadIdx.x;
                sh.rem = rem - above_b;
            }
        }
        __syncthreads();
        SAMPLE_STAMP(50 + (24 - shift) / 8);
        prefix |= sh.sel << shift;
        mask |= 255u << shift;
        rem = sh.rem;
    }
    *left = rem;
    return prefix;
}

// The tie cut at key K: the id, among the tokens with key == K in id order, at which the running
// measure (count, or mass when MASS) first reaches `left` (> 0); tokens top-k dropped (ties at its
// threshold past its cut) do not count. Returned as this block sees it: the cut itself in the
// block that holds it, V - 1 (every tie kept) in blocks before it, -1 (none) in blocks after.
// Chunked by thread for the id order.
template <int CL, int NT, bool MASS>
__device__ int tie_cut(const Slice& s, int V, unsigned K, unsigned long long left, float m, float inv_t, unsigned kkey, int kcut,
                       SampleShared<NT>& sh, unsigned& ph, bool trace_me = false) {
    // Odd chunks keep a warp's strided reads of a staged slice off shared-memory bank conflicts.
    int chunk = ((s.n + NT - 1) / NT) | 1, c0 = min(s.n, (int)threadIdx.x * chunk), c1 = min(s.n, c0 + chunk);
    auto counted = [&](int i, float x) { return isfinite(x) && fkey(x) == K && !(K == kkey && s.s0 + i > kcut); };
    auto measure = [&](int i, float x) -> unsigned long long { return counted(i, x) ? (MASS ? weight_of(x, m, inv_t) : 1ull) : 0ull; };
    unsigned long long mine = 0;
    scan_chunk(s.l, c0, c1, [&](int i, float x) { mine += measure(i, x); });
    SAMPLE_STAMP(60);
    unsigned long long block_total;
    unsigned long long base = block_exclusive_u64<NT>(mine, sh.warp, &block_total);
    unsigned long long* pub = sh.xch[ph & 1];
    ph++;
    if (threadIdx.x == 0) pub[0] = block_total;
    SAMPLE_STAMP(61);
    cluster_sync<CL>();
    SAMPLE_STAMP(62);
    // The cut lies in the first block whose running total reaches `left`.
    unsigned long long before = 0;
    unsigned holder = CL;
    for (unsigned r = 0; r < CL; r++) {
        unsigned long long t = cluster_read<CL>(pub, r);
        if (holder == CL) {
            if (before + t >= left) holder = r;
            else before += t;
        }
    }
    if (s.rank < holder) return V - 1;
    if (s.rank > holder) return -1;
    if (threadIdx.x == 0) sh.cut = V - 1;
    __syncthreads();
    unsigned long long b0 = before + base;
    if (b0 < left && b0 + mine >= left) {
        const int i = scan_chunk_until(s.l, c0, c1, b0, left, true, measure);
        if (i >= 0) sh.cut = s.s0 + i;
    }
    __syncthreads();
    SAMPLE_STAMP(63);
    return sh.cut;
}

// A logit and its id as one word for the cluster: the value's bits above the id.
__device__ __forceinline__ unsigned long long pack_top(float v, int id) { return ((unsigned long long)__float_as_uint(v) << 32) | (unsigned)id; }
__device__ __forceinline__ float top_value(unsigned long long e) { return __uint_as_float((unsigned)(e >> 32)); }
__device__ __forceinline__ int top_id(unsigned long long e) { return (int)(unsigned)e; }

// One row's sample by a cluster of CL blocks of NT threads; `stage` (shared, the block's slice)
// when `staged`. Every block reaches the same cluster barriers and ends on one, so no block
// leaves while another may still read its shared memory.
// The id goes to out[row] and, in a copy-free graph step, into its host slot (store_host_id).
template <int CL, int NT>
__device__ void sample_row(const float* __restrict__ logits, int V, const RowSampling* __restrict__ params, int* __restrict__ out,
                           const unsigned long long* __restrict__ ids_host, int row, float* stage, bool staged, SampleShared<NT>& sh) {
#ifdef SAMPLE_TRACE
    const bool trace_me = row == 0 && cluster_rank<CL>() == 0 && threadIdx.x == 0;
    if (trace_me) sample_trace_n = 0;
#else
    const bool trace_me = false;
#endif
    SAMPLE_STAMP(1);
    auto emit = [&](int id) {
        out[row] = id;
        store_host_id(ids_host, row, id);
    };
    const int lane = threadIdx.x & 31;
    unsigned ph = 0;
    unsigned rank = cluster_rank<CL>();
    int per = (V + CL - 1) / CL, s0 = min(V, (int)rank * per), n = min(V, s0 + per) - s0;
    const float* g = logits + (size_t)row * V + s0;
    Slice s = {staged ? stage : g, s0, n, rank};
    RowSampling p = params[row];
    // Greedy and the max: argmax with ties to the lowest id (staging the slice on the way).
    float best = __int_as_float(0xff800000u);
    int bi = 0x7fffffff;
    scan_strided<NT>(g, n, [&](int i, float x) {
        if (staged) stage[i] = x;
        if (x > best) { best = x; bi = s0 + i; }
    });
    SAMPLE_STAMP(2);
    warp_best(best, bi);
    if (lane == 0) { sh.wbest[threadIdx.x >> 5] = best; sh.wbi[threadIdx.x >> 5] = bi; }
    __syncthreads();
    SAMPLE_STAMP(3);
    unsigned long long* pub = sh.xch[ph & 1];
    ph++;
    if (threadIdx.x == 0) {
        float b = sh.wbest[0];
        int id = sh.wbi[0];
        for (int k = 1; k < NT / 32; k++)
            if (sh.wbest[k] > b || (sh.wbest[k] == b && sh.wbi[k] < id)) { b = sh.wbest[k]; id = sh.wbi[k]; }
        pub[0] = pack_top(b, id);
    }
    SAMPLE_STAMP(4);
    cluster_sync<CL>();
    SAMPLE_STAMP(5);
    float mx = __int_as_float(0xff800000u);
    int am = 0x7fffffff;
    for (unsigned r = 0; r < CL; r++) {
        unsigned long long v = cluster_read<CL>(pub, r);
        float b = top_value(v);
        int id = top_id(v);
        if (b > mx || (b == mx && id < am)) { mx = b; am = id; }
    }
    int argmax_id = am == 0x7fffffff ? 0 : am;
    if (p.temperature <= 0.f || !isfinite(mx)) {
        if (rank == 0 && threadIdx.x == 0) emit(argmax_id);
        cluster_sync<CL>();
        return;
    }
    float m = mx, inv_t = 1.f / fmaxf(p.temperature, 1e-6f);
    // top-k: keep keys above kkey, and ties at kkey up to id kcut.
    unsigned kkey = 0;
    int kcut = V - 1;
    if (p.top_k > 0 && p.top_k < V) {
        unsigned long long left;
        kkey = radix_select<CL, NT, false>(s, -1.0, (unsigned long long)p.top_k, m, inv_t, 0, V - 1, sh, ph, &left, trace_me);
        kcut = tie_cut<CL, NT, false>(s, V, kkey, left, m, inv_t, 0, V - 1, sh, ph, trace_me);
    }
    // top-p: the smallest descending prefix whose mass reaches top_p times the mass top-k kept.
    unsigned pkey = 0;
    int pcut = V - 1;
    if (p.top_p < 1.f) {
        unsigned long long left;
        pkey = radix_select<CL, NT, true>(s, (double)p.top_p, 0, m, inv_t, kkey, kcut, sh, ph, &left, trace_me);
        pcut = tie_cut<CL, NT, true>(s, V, pkey, left, m, inv_t, kkey, kcut, sh, ph, trace_me);
    }
    // min-p: weight at least min_p times the largest (whose weight is 2^32).
    unsigned long long wmin = p.min_p > 0.f ? (unsigned long long)ceil((double)p.min_p * 4294967296.0) : 0ull;
    // The draw: inverse CDF over the kept tokens in id order.
    int chunk = ((n + NT - 1) / NT) | 1, c0 = min(n, (int)threadIdx.x * chunk), c1 = min(n, c0 + chunk);
    // The weight token s0 + i is drawn with: kept by top-k, top-p and min-p, else 0.
    auto drawn = [&](int i, float x) -> unsigned long long {
        if (!isfinite(x)) return 0ull;
        unsigned key = fkey(x);
        if (!above(key, s0 + i, kkey, kcut) || !above(key, s0 + i, pkey, pcut)) return 0ull;
        unsigned long long w = weight_of(x, m, inv_t);
        return w >= wmin ? w : 0ull;
    };
    SAMPLE_STAMP(70);
    unsigned long long mine = 0;
    scan_chunk(s.l, c0, c1, [&](int i, float x) { mine += drawn(i, x); });
    SAMPLE_STAMP(71);
    unsigned long long block_total;
    unsigned long long base = block_exclusive_u64<NT>(mine, sh.warp, &block_total);
    pub = sh.xch[ph & 1];
    ph++;
    if (threadIdx.x == 0) pub[0] = block_total;
    SAMPLE_STAMP(72);
    cluster_sync<CL>();
    SAMPLE_STAMP(73);
    unsigned long long before = 0, total = 0;
    for (unsigned r = 0; r < CL; r++) {
        unsigned long long t = cluster_read<CL>(pub, r);
        if (r < rank) before += t;
        total += t;
    }
    SAMPLE_STAMP(74);
    unsigned long long target = (unsigned long long)(p.u * (double)total);
    if (target >= total) target = total - 1;
    // Nothing kept (cannot happen: the largest logit weighs 2^32): the argmax.
    if (total == 0) {
        if (rank == 0 && threadIdx.x == 0) emit(argmax_id);
    } else if (before + base <= target && target < before + base + mine) {
        const int i = scan_chunk_until(s.l, c0, c1, before + base, target, false, drawn);
        if (i >= 0) emit(s0 + i);
    }
    SAMPLE_STAMP(75);
    cluster_sync<CL>();
    SAMPLE_STAMP(76);
}

// One block of 1024 threads per row (any GPU).
// ids_host (null: none): a device word holding the host address a graph step's ids also go to.
extern "C" __global__ void __launch_bounds__(ST) sample_rows(const float* __restrict__ logits, int V,
                                                             const RowSampling* __restrict__ params, int* __restrict__ out,
                                                             const unsigned long long* __restrict__ ids_host) { PDL_ENTER();
    __shared__ SampleShared<ST> sh;
    sample_row<1, ST>(logits, V, params, out, ids_host, blockIdx.x, nullptr, false, sh);
}

#if __CUDA_ARCH__ >= 900
// A cluster of SAMPLE_CLUSTER blocks per row (Hopper on): grid (SAMPLE_CLUSTER, rows); each block
// stages its slice of the row in dynamic shared memory when `staged` (the host gives it room for
// ceil(V / SAMPLE_CLUSTER) floats), else reads it from the logits at every pass. The host reads
// the cluster's width from the kernel (-DSAMPLE_CLUSTER=16, a non-portable size, for measurements).
#ifndef SAMPLE_CLUSTER
#define SAMPLE_CLUSTER 8
#endif
#define SAMPLE_CLUSTER_THREADS 512
extern "C" __global__ void __cluster_dims__(SAMPLE_CLUSTER, 1, 1) __launch_bounds__(SAMPLE_CLUSTER_THREADS)
    sample_rows_cluster(const float* __restrict__ logits, int V, const RowSampling* __restrict__ params, int* __restrict__ out, int staged,
                        const unsigned long long* __restrict__ ids_host) {
    PDL_ENTER();
    extern __shared__ float stage[];
    __shared__ SampleShared<SAMPLE_CLUSTER_THREADS> sh;
    sample_row<SAMPLE_CLUSTER, SAMPLE_CLUSTER_THREADS>(logits, V, params, out, ids_host, blockIdx.y, stage, staged != 0, sh);
}
#endif

// Log-probabilities under the raw logits of each row (the engine's host `logprobs`):
// lse = max + ln(sum exp(l - max)) (the max over non-NaN logits, as f32::max folds; the sum in
// f64); lp[r] = l[chosen[r]] - lse; and, when tops[r] > 0, the tops[r] (<= MAXTOP) largest
// finite logits, descending, ties to the lowest id, as ids and logprobs, with their count.
// tops[r] < 0: the row wants nothing. One block, or a cluster of blocks each holding a slice of
// the vocabulary, per row. The top list: every thread keeps its own best (it scans ids in
// ascending order, so an equal value never displaces an earlier id), then each warp merges its
// lanes' lists, warp 0 the warps', and rank 0's warp 0 the blocks' (no histogram atomics,
// unlike the radix selection the sampler's top-k uses).
#define MAXTOP 20

template <int CL, int NT>
__device__ void logprobs_row(const float* __restrict__ logits, int V, const int* __restrict__ chosen, const int* __restrict__ tops,
                             float* __restrict__ lp, int* __restrict__ top_ids, float* __restrict__ top_lp, int* __restrict__ top_count, int r) {
    constexpr int nw = NT / 32;
    __shared__ float wmax[nw];
    __shared__ double wsum[nw];
    __shared__ float cv[nw][MAXTOP];
    __shared__ int ci[nw][MAXTOP];
    // What the block publishes for the cluster: its max, its sum, its top list.
    __shared__ unsigned long long pub[2 + MAXTOP];
    const float NEG_INF = __int_as_float(0xff800000u);
    const int NONE = 0x7fffffff;
    int want = tops[r], lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    if (want < 0) return;
    unsigned rank = cluster_rank<CL>();
    int per = (V + CL - 1) / CL, s0 = min(V, (int)rank * per), s1 = min(V, s0 + per);
    const float* l = logits + (size_t)r * V;
    int n = min(want, MAXTOP);
    // One pass over the slice: the max, and this thread's n best finite logits.
    float m = NEG_INF;
    float tv[MAXTOP];
    int ti[MAXTOP], cnt = 0;
    for (int i = s0 + threadIdx.x; i < s1; i += NT) {
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
    if (w == 0) {
        // Warp 0 merges the warps' lists (lane L reads warp L's, already sorted).
        h = 0;
        for (int k = 0; k < n; k++) {
            float v = h < n && lane < nw ? cv[lane][h] : NEG_INF;
            int id = h < n && lane < nw ? ci[lane][h] : NONE;
            warp_best(v, id);
            if (lane < nw && h < n && ci[lane][h] == id) h++;
            if (lane == 0) pub[2 + k] = pack_top(v, id);
        }
        if (lane == 0) {
            float bm = wmax[0];
            for (int k = 1; k < nw; k++) bm = fmaxf(bm, wmax[k]);
            pub[0] = __float_as_uint(bm);
        }
    }
    cluster_sync<CL>();
    m = NEG_INF;
    for (unsigned q = 0; q < CL; q++) m = fmaxf(m, __uint_as_float((unsigned)cluster_read<CL>(pub, q)));
    double s = 0.0;
    for (int i = s0 + threadIdx.x; i < s1; i += NT) s += (double)expf(l[i] - m);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) wsum[w] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        double bs = 0.0;
        for (int k = 0; k < nw; k++) bs += wsum[k];
        pub[1] = __double_as_longlong(bs);
    }
    cluster_sync<CL>();
    if (rank == 0) {
        double total = 0.0;
        for (unsigned q = 0; q < CL; q++) total += __longlong_as_double(cluster_read<CL>(pub + 1, q));
        double lse = (double)m + log(total);
        if (threadIdx.x == 0) lp[r] = (float)((double)l[chosen[r]] - lse);
        if (w == 0) {
            // Warp 0 merges the blocks' lists (lane L reads block L's).
            h = 0;
            int c = 0;
            for (int k = 0; k < n; k++) {
                unsigned long long e = h < n && lane < CL ? cluster_read<CL>(pub + 2 + h, lane) : pack_top(NEG_INF, NONE);
                float v = top_value(e);
                int id = top_id(e);
                warp_best(v, id);
                if (lane < CL && h < n && top_id(e) == id) h++;
                if (id == NONE) break;
                if (lane == 0) {
                    top_ids[r * MAXTOP + k] = id;
                    top_lp[r * MAXTOP + k] = (float)((double)v - lse);
                }
                c++;
            }
            if (lane == 0) top_count[r] = c;
        }
    }
    // No block leaves while rank 0 may still read its lists.
    cluster_sync<CL>();
}

extern "C" __global__ void __launch_bounds__(ST) row_logprobs(const float* __restrict__ logits, int V, const int* __restrict__ chosen,
                                                              const int* __restrict__ tops, float* __restrict__ lp,
                                                              int* __restrict__ top_ids, float* __restrict__ top_lp, int* __restrict__ top_count) {
    PDL_ENTER();
    logprobs_row<1, ST>(logits, V, chosen, tops, lp, top_ids, top_lp, top_count, blockIdx.x);
}

#if __CUDA_ARCH__ >= 900
// A cluster of SAMPLE_CLUSTER blocks per row: grid (SAMPLE_CLUSTER, rows).
extern "C" __global__ void __cluster_dims__(SAMPLE_CLUSTER, 1, 1) __launch_bounds__(SAMPLE_CLUSTER_THREADS)
    row_logprobs_cluster(const float* __restrict__ logits, int V, const int* __restrict__ chosen, const int* __restrict__ tops, float* __restrict__ lp,
                         int* __restrict__ top_ids, float* __restrict__ top_lp, int* __restrict__ top_count) {
    PDL_ENTER();
    logprobs_row<SAMPLE_CLUSTER, SAMPLE_CLUSTER_THREADS>(logits, V, chosen, tops, lp, top_ids, top_lp, top_count, blockIdx.y);
}
#endif
