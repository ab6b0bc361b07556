// Block reductions and the MoE router of one token, shared by ops.cu (moe_route) and moe.cu (the
// fused MoE kernel that routes its one token itself): compile.rs puts this file after
// common.cuh in front of both, so the two paths choose the same experts with the same weights,
// bit for bit, and group one token's choices the same way (by warp 0 in the fused kernel, by the
// whole block in moe_route; a test compares them).

// Sum of v over the block (every thread gets it); sh holds one float per warp. Warp 0 alone
// adds the warps' sums (in warp order) and hands the total over: when every thread walked them,
// a 1024-thread block issued ~64 instructions a thread there, 8 warps to a scheduler, on the
// path of a one-block norm.
__device__ __forceinline__ float block_sum(float v, float* sh) {
    __shared__ float total;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    if (l == 0) sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float s = 0.f;
        for (int i = 0; i < (blockDim.x + 31) / 32; i++) s += sh[i];
        if (l == 0) total = s;
    }
    __syncthreads();
    return total;
}

// The largest v over the block and its i (ties to the lower i) into *out_v, *out_i.
__device__ __forceinline__ void block_argmax(float v, int i, float* sv, int* si, float* out_v, int* out_i) {
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(0xffffffffu, v, o);
        int i2 = __shfl_xor_sync(0xffffffffu, i, o);
        if (v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
    }
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    if (l == 0) { sv[w] = v; si[w] = i; }
    __syncthreads();
    if (threadIdx.x == 0) {
        float bv = sv[0];
        int bi = si[0];
        for (int k = 1; k < (int)(blockDim.x + 31) / 32; k++)
            if (sv[k] > bv || (sv[k] == bv && si[k] < bi)) { bv = sv[k]; bi = si[k]; }
        *out_v = bv;
        *out_i = bi;
    }
    __syncthreads();
}

// A choice as an unsigned key in the same order: NaN 0 (never chosen), -0 as +0 (they compare
// equal), every other float above 0 (-inf included, as the scan can choose it).
__device__ __forceinline__ unsigned route_key(float v) {
    unsigned u = __float_as_uint(v);
    if (v != v) return 0u;
    if ((u << 1) == 0u) u = 0u;
    return (u >> 31) ? ~u : (u | 0x80000000u);
}

#if __CUDA_ARCH__ >= 800
// route_token's top K by warp 0 with its E <= 32 J choices in registers: lane l holds choice
// l + 32 j as its key (route_key). A round takes each lane's largest key by a tree of adjacent
// pairs (the right one only if larger, so ties keep the lower j), then two warp reductions
// (redux): the largest key, and among the lanes holding it the lowest index, whose lane drops
// it. The scan below it in route_token reads every choice from shared memory and takes two
// shuffles per step of a 5-step tree in each of the K rounds (in moe_route this form made
// batches 2-8 0.3-1.9% faster; in the fused one-token MoE, once the grouping had left the
// block's path, batch 1 0.2-1% faster, within ~0.5% of no top K at all). The same choices in
// the same order (so the same sum of the chosen scores): largest first, ties to the lower
// index, NaN never, expert 0 once no candidate is left. Returns that sum. J a power of two.
template <int J>
__device__ __forceinline__ float route_top_k_regs(const float* choice, const float* scores, int E, int K, int* sel) {
    const int lane = threadIdx.x & 31;
    unsigned c[J];
#pragma unroll
    for (int j = 0; j < J; j++) c[j] = lane + 32 * j < E ? route_key(choice[lane + 32 * j]) : 0u;
    float wsum = 0.f;
    for (int k = 0; k < K; k++) {
        unsigned tk[J];
        int tj[J];
#pragma unroll
        for (int j = 0; j < J; j++) {
            tk[j] = c[j];
            tj[j] = j;
        }
#pragma unroll
        for (int h = 1; h < J; h *= 2)
#pragma unroll
            for (int j = 0; j < J; j += 2 * h)
                if (tk[j + h] > tk[j]) {
                    tk[j] = tk[j + h];
                    tj[j] = tj[j + h];
                }
        const unsigned m = __reduce_max_sync(0xffffffffu, tk[0]);
        int i = 0;  // no candidate left (NaN logits): expert 0
#ifdef ROUTE_TOPK_FREE
        i = k;
#else
        if (m != 0u) {
            i = (int)__reduce_min_sync(0xffffffffu, tk[0] == m ? (unsigned)(lane + 32 * tj[0]) : 0xffffffffu);
            const bool mine = (i & 31) == lane;
#pragma unroll
            for (int j = 0; j < J; j++) c[j] = mine && j == (i >> 5) ? 0u : c[j];
        }
#endif
        wsum += scores[i];
        if (lane == 0) sel[k] = i;
    }
    __syncwarp();
    return wsum;
}
#endif

// Where group_one_token_warp writes (group_one_token's arrays, max_u slots).
struct OneTokenGroups {
    int* experts;
    int* pair_off;
    int* pair_tok;
    float* pair_w;
    int* tok_pairs;
    int max_u;
};

// group_one_token by one warp, for K <= 32 choices: lane k holds choice k (sel[k], visible to
// the warp) and its weight w, and finds its pair's place, whether it opens its expert's run and
// how many distinct experts lie below it from the other lanes' choices by shuffles, so no
// thread walks the K x K comparisons through shared memory. The same arrays, the same values.
// (The block-wide form, each thread a loop of dependent shared-memory loads, plus its barrier,
// put ~2 us on the fused one-token MoE's path to its first weight copy. A form holding two
// choices a lane, for K <= 64, cost the fused kernel most of that again by its schedule alone:
// benches/results/2026-11-26-route-group-warp.md.)
__device__ __forceinline__ void group_one_token_warp(const int* sel, float w, int K, const OneTokenGroups& out) {
    const int lane = threadIdx.x & 31;
    const int e = lane < K ? sel[lane] : 0x7fffffff;
    int q = 0;            // the pair's place: choices (expert, slot) below this one
    bool first = true;    // no earlier slot holds this expert
    unsigned below = 0u;  // the lanes whose expert is below this one
    // One pass of independent shuffles (unrolled, so they overlap) gives the place, whether the
    // lane opens its expert's run and which lanes hold smaller experts; the count of distinct
    // experts below is then the popcount of those lanes that open a run. (A second loop of
    // shuffles over the lanes that open, one a step, and the first loop not unrolled:
    // -DROUTE_GROUP_TWO_LOOPS, for measurements.)
#ifndef ROUTE_GROUP_TWO_LOOPS
#pragma unroll 8
#endif
    for (int j = 0; j < K; j++) {
        const int ej = __shfl_sync(0xffffffffu, e, j);
        q += ej < e || (ej == e && j < lane);
        first &= !(ej == e && j < lane);
        below |= (unsigned)(ej < e) << j;
    }
    const unsigned opens = __ballot_sync(0xffffffffu, lane < K && first);
#ifdef ROUTE_GROUP_TWO_LOOPS
    int u = 0;
    for (unsigned m = opens; m != 0u; m &= m - 1u) u += __shfl_sync(0xffffffffu, e, __ffs(m) - 1) < e;
#else
    const int u = __popc(opens & below);  // distinct experts below this one
#endif
    const int used = __popc(opens);
    if (lane < K) {
        out.pair_tok[q] = 0;
        out.pair_w[q] = w;
        out.tok_pairs[lane] = q;
        if (first) {
            out.experts[u] = e;
            out.pair_off[u] = q;
        }
    }
    for (int s = used + lane; s < out.max_u; s += 32) {
        out.experts[s] = 0;
        out.pair_off[s] = K;
    }
    if (lane == 0) out.pair_off[out.max_u] = K;
}

#define ROUTE_MAX_K 64  // experts per token the router takes (checked at load)

// The router done by the o_proj (gemv_mma_bf16_t1_pipe_route in gemv.cu) leaves, per token, the
// post-attention norm's sum of squares of h as the o_proj blocks' parts[0..n) and the logits as
// fixed-point sums (x 2^40) in copies. acc_norm_inv: 1 / rms from the parts, every warp summing
// them in the same order (lane l: parts l, l + 32, ..., then the xor tree), so every thread of
// every kernel reading them (the fused one-token MoE, moe_route_acc, moe_digit_rows_acc) holds the
// same bits without a barrier. acc_logit: one expert's logit from its summed copies, NaN where
// the o_proj flagged a part it could not hold (`bad`).
__device__ __forceinline__ float acc_norm_inv(const float* __restrict__ parts, int n, int H, float eps) {
    float q = 0.f;
    for (int i = threadIdx.x & 31; i < n; i += 32) q += __ldcg(parts + i);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) q += __shfl_xor_sync(0xffffffffu, q, o);
    return 1.f / sqrtf(q / H + eps);
}
__device__ __forceinline__ float acc_logit(unsigned long long v, bool bad, float inv) {
    return bad ? __int_as_float(0x7fc00000) : (float)((double)(long long)v * 0x1p-40) * inv;
}

// route_token's phases for a measurement build's trace (the fused MoE passes its TRACE): none.
struct RouteNoStamp {
    __device__ void operator()(int) const {}
};
// Work for the threads outside warp 0 while warp 0 takes the top K (route_token's `idle`): none.
struct RouteNoIdle {
    __device__ void operator()() const {}
};

// A sigmoid router's score of logit l, and a chosen expert's weight from its score: over the
// chosen scores' sum denom when norm, times scale. route_token and the one-block routing in
// ops.cu take both from here, so their scores and weights are the same bits.
__device__ __forceinline__ float route_sigmoid(float l) { return 1.f / (1.f + expf(-l)); }
__device__ __forceinline__ float route_weight(float score, int norm, float denom, float scale) {
    if (norm) score /= denom;
    return score * scale;
}
// The denominator of route_weight from the chosen scores' sum (+1e-20: no division by zero).
__device__ __forceinline__ float route_weight_denom(float wsum) { return wsum + 1e-20f; }

// The MoE router of one token, by the whole block (HF MiMoV2FlashTopkRouter / DeepSeek-V3
// noaux_tc, as peregrine_cpu::model::route): scores = sigmoid (or softmax) of the logits l[0..E);
// the choice adds the correction bias; with n_group > 1 only the topk_group best groups (by the
// sum of their top-2) compete; top-K by choice, ties to the lower index; weights = chosen
// unbiased scores, normalised to sum 1 (+1e-20) when norm, times scale. Writes sel[k] (the
// expert) and wsel[k] (its weight) in choice order, visible to the whole block on return; with
// `groups` (K <= 32) also their grouping there (group_one_token_warp). scores, choice: E
// floats each of shared memory. The top K with the choices in registers (route_top_k_regs)
// where E allows, else (and with -DROUTE_TOPK_SCAN, for measurements) by a scan. stamp(slot):
// thread 0 marks its phases (17: scores, 18: top K, 19: weights, 20: grouped) for a trace.
// idle(): what the other warps do meanwhile (they would wait at the closing barrier; the fused
// one-token MoE stages its activations there).
template <class Stamp = RouteNoStamp, class Idle = RouteNoIdle>
__device__ __forceinline__ void route_token(const float* __restrict__ l, const float* __restrict__ bias, int E, int K, int softmax,
                                            int n_group, int topk_group, int norm, float scale, float* scores, float* choice,
                                            int* sel, float* wsel, const OneTokenGroups* groups = nullptr, Stamp stamp = Stamp(),
                                            Idle idle = Idle()) {
    __shared__ float sv[32], sh[32], best_v;
    __shared__ int si[32], best_i, keep[64];
    const float NEG_INF = __int_as_float(0xff800000u);
    if (softmax) {
        float m = NEG_INF;
        for (int e = threadIdx.x; e < E; e += blockDim.x) m = fmaxf(m, l[e]);
        block_argmax(m, 0, sv, si, &best_v, &best_i);
        m = best_v;
        float s = 0.f;
        for (int e = threadIdx.x; e < E; e += blockDim.x) { float x = expf(l[e] - m); scores[e] = x; s += x; }
        s = block_sum(s, sh);
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            float x = scores[e] / s;
            scores[e] = x;
            choice[e] = bias ? x + bias[e] : x;
        }
    } else {
        // The logit and the bias are loaded together (one round trip, not two).
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            float x = route_sigmoid(l[e]);
            scores[e] = x;
            choice[e] = bias ? x + bias[e] : x;
        }
    }
    __syncthreads();
    stamp(17);
    if (n_group > 1) {
        int per = E / n_group;
        if (threadIdx.x == 0) {
            // Group scores (top-2 sums), then the topk_group best groups, ties to the lower index.
            float gs[64];
            for (int g = 0; g < n_group; g++) {
                float a = NEG_INF, b = NEG_INF;
                for (int e = g * per; e < (g + 1) * per; e++) {
                    float c = choice[e];
                    if (c > a) { b = a; a = c; } else if (c > b) b = c;
                }
                gs[g] = a + b;
                keep[g] = 0;
            }
            for (int k = 0; k < topk_group; k++) {
                int bi = -1;
                for (int g = 0; g < n_group; g++)
                    if (!keep[g] && (bi < 0 || gs[g] > gs[bi])) bi = g;
                keep[bi] = 1;
            }
        }
        __syncthreads();
        for (int e = threadIdx.x; e < E; e += blockDim.x)
            if (!keep[e / per]) choice[e] = NEG_INF;
        __syncthreads();
    }
    // The top K by one warp, shuffles only (K block-wide argmax rounds, two barriers each, made
    // moe_route ~11 us per layer on the H100 under ncu). Largest choice, ties to the lower index.
    if (threadIdx.x < 32) {
        float wsum = 0.f;
#if __CUDA_ARCH__ >= 800 && !defined(ROUTE_TOPK_SCAN)  // (-DROUTE_TOPK_SCAN: the scan, for measurements)
        if (E <= 256) {
            wsum = route_top_k_regs<8>(choice, scores, E, K, sel);
        } else if (E <= 512) {
            wsum = route_top_k_regs<16>(choice, scores, E, K, sel);
        } else
#endif
        for (int k = 0; k < K; k++) {
            float v = NEG_INF;
            int i = 0x7fffffff;
#ifdef ROUTE_TOPK_FREE  // measurement builds only (wrong routing): the choice costs nothing
            i = k;
#else
            for (int e = threadIdx.x; e < E; e += 32)
                if (choice[e] > v || (choice[e] == v && e < i)) { v = choice[e]; i = e; }
            for (int o = 16; o > 0; o >>= 1) {
                float v2 = __shfl_xor_sync(0xffffffffu, v, o);
                int i2 = __shfl_xor_sync(0xffffffffu, i, o);
                if (v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
            }
#endif
            if (i >= E) i = 0;  // fewer than K candidates (K > E, NaN logits): expert 0, never out of bounds
            wsum += scores[i];
            if (threadIdx.x == 0) {
                sel[k] = i;
                choice[i] = __int_as_float(0x7fc00000u);  // NaN: compares false, never chosen again
            }
            __syncwarp();
        }
        stamp(18);
        float denom = route_weight_denom(wsum), mine = 0.f;
        for (int k = threadIdx.x; k < K; k += 32) {
            mine = route_weight(scores[sel[k]], norm, denom, scale);
            wsel[k] = mine;
        }
        // With groups (K <= 32), warp 0 groups the choices too, before the barrier below, so the
        // block's grouping (group_one_token) and its barrier leave the path to the first
        // weight copy (lane k holds choice k's weight).
        stamp(19);
        if (groups) group_one_token_warp(sel, mine, K, *groups);
        stamp(20);
    } else {
        idle();
    }
    __syncthreads();
}

// The grouping of one token's K <= ROUTE_MAX_K choices (sel, wsel from route_token) by expert,
// by the whole block (moe_route; the fused kernel has group_one_token_warp), as group_pairs
// does for a batch: pairs sorted by (expert, slot), the used experts ascending in the first of
// `max_u` slots (the rest empty: expert 0, no pairs). A repeated expert (the fallback when
// fewer than K experts can be chosen) gets one slot with all its pairs. Any threads; sel and
// wsel must be visible to them; K <= ROUTE_MAX_K.
__device__ __forceinline__ void group_one_token(const int* sel, const float* wsel, int K, int max_u, int* __restrict__ experts,
                                                int* __restrict__ pair_off, int* __restrict__ pair_tok, float* __restrict__ pair_w,
                                                int* __restrict__ tok_pairs) {
    int used = 0;  // distinct experts chosen
    for (int j = 0; j < K; j++) {
        bool first = true;
        for (int i = 0; i < j; i++) first &= sel[i] != sel[j];
        used += first;
    }
    for (int k = threadIdx.x; k < K; k += blockDim.x) {
        int e = sel[k], q = 0, u = 0;
        bool first = true;
        for (int j = 0; j < K; j++) {
            q += sel[j] < e || (sel[j] == e && j < k);  // the pair's place
            if (j < k && sel[j] == e) first = false;
            bool fj = true;  // slot j opens its expert's run
            for (int i = 0; i < j; i++) fj &= sel[i] != sel[j];
            u += fj && sel[j] < e;  // distinct experts below e
        }
        pair_tok[q] = 0;
        pair_w[q] = wsel[k];
        tok_pairs[k] = q;
        if (first) {
            experts[u] = e;
            pair_off[u] = q;
        }
    }
    for (int u = used + threadIdx.x; u < max_u; u += blockDim.x) {
        experts[u] = 0;
        pair_off[u] = K;
    }
    if (threadIdx.x == 0) pair_off[max_u] = K;
}
