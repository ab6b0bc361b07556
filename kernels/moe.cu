// MXFP4 MoE decode over "tiled" expert weights: the layout crates/cuda/src/mxfp4_tiles.rs
// writes at load time (still 4.25 bits per weight), built so that the bandwidth-bound 1..8-token
// decode spends as few instructions per weight as possible.
//
// Why: the row-major kernels in gemv.cu reached 36% of copy bandwidth at 1 token because they
// issued ~5.5 lane instructions per weight (4-byte loads, E2M1 decoded with bit moves into f16,
// split kernels for the activations). Streaming 4.25-bit weights at ~85% of an H100's 3 TB/s
// leaves an SM ~6 lane instructions per weight at full issue, so the decode must cost far less.
//
// Layout (per expert, per matrix of R rows x K columns, R % 16 == 0, K % 64 == 0):
// [R/16 row tiles][K/64 steps][STEP_BYTES = 512 bytes of codes, then 32 of scales], so a run of
// a tile's steps is one contiguous copy (with the scales in an array of their own, a ring's
// stage was two bulk copies, 2048 and 128 bytes: plain reads asking for their bytes that way
// lost ~1 point of copy bandwidth on the H100, benches/results/2026-11-24-moe-ceilings.md).
//   codes:  [32 lanes][16 bytes]: lane l = 4g + t holds, for the
//           four m16n8k16 MMAs s = 0..3 of the step, one 32-bit word of 8 codes: its A fragment
//           (rows g and g+8, k = 16s + 2t + {0, 1, 8, 9}). Byte j holds rows g and g + 8 at k =
//           16s + 2t + (j & 1) + 8 (j >> 1): row g's code in bits {7: sign, 4..2: e1 e0 m}, which
//           IS the e4m3 byte of its value x 2^-6, row g + 8's in bits {5: sign, 6: e1, 1: e0,
//           0: m}. So a word decodes with one AND plus four shifts/ands into row g's and row
//           g + 8's four e4m3 bytes (each an FP8 wgmma A register as it is), and four
//           cvt.rn.f16x2.e4m3x2 (exact) for the F16 MMAs.
//   scales: [8 groups g][4 bytes]: E8M0 of (row g, k32 block 2j), (g, 2j+1),
//           (g+8, 2j), (g+8, 2j+1) for step j.
// Gate and up are interleaved: row tile r holds gate rows 8r..8r+7 then up rows 8r..8r+7, so
// one lane ends with a gate and an up value of the same intermediate row and fuses the SiLU.
//
// Each block stages the f32 activations of up to NP routed pairs in shared memory as B
// fragments: F16 hi + lo of x * 2^s (a power of two per row puts the row's largest magnitude
// just under 2^14), hi and lo as two of the MMA's 8 columns, so one MMA covers both and the
// products stay exact. Each warp streams one 16-row tile over all of K through a shared-memory
// ring filled by bulk copies, and applies each 32-block's E8M0 scale to the MMA's partial sums.
// No split kernels, no reduction between warps.
//
// E8M0 scales become f32 with a shift and a mask: 1..254 exactly; 0 (2^-127) becomes 0 and
// 255 (NaN) becomes +inf, so a NaN scale still gives a non-finite output.

// (PDL_ENTER and the f16 helpers come from kernels/common.cuh, the router from kernels/route.cuh:
// compile.rs prepends both.)

// The file is compiled in parts at once (compile.rs's MOE_PARTS, each `-DMOE_PART=k` a build of
// its own): NVRTC compiles a program on one core, and the whole file took 46 s on a 2-core
// machine, the pole of a first start on a new GPU type. A part holds only its kernels, each
// compiled to the same SASS as in the whole file, which `scripts/kernel-report.sh
// --check-moe-parts` checks: a kernel that alone in its part uses a device function's static
// __shared__ (gate_up_unit_last's) gets other code, so each part keeps two or more split
// kernels or none. Without MOE_PART (tools/kernel_report.py, the kernel tests' sources) the file
// is whole.
#ifdef MOE_PART
#define MOE_IN_PART(k) (MOE_PART == (k))
#else
#define MOE_IN_PART(k) 1
#endif

#define TW 8  // warps per block, one 16-row tile each
// Blocks per SM the tiled kernels' register budget is cut for (measurement builds may ask for
// more with PEREGRINE_KERNEL_DEFINES=-DMOE_MIN_BLOCKS=3).
#ifndef MOE_MIN_BLOCKS
#define MOE_MIN_BLOCKS 2
#endif
#define NP 4  // routed pairs per pass (MMA columns: hi and lo of each)

// Measurement builds only, to bound what each part of the tiled kernels costs (outputs are
// wrong): -DMOE_NO_MATH streams the weights through the rings without reading them (no decode,
// no MMA), -DMOE_NO_WAIT lets down units start without waiting for their slot's gate_up units,
// -DMOE_NO_STAGE stages no activations (-DMOE_DOWN_NO_STAGE: the fused kernel's down passes
// none), -DMOE_NO_COMBINE leaves out the down blocks' routed
// combine (their count, fence and the last block's sum into y), and -DMOE_NO_SYNC leaves out
// the fused kernel's block barriers, fences and counts between items (and its combine).
// `cuda-bench` also times plain reads of the same bytes.
#ifdef MOE_NO_SYNC
// Without the barriers a pass's staging races the previous pass's readers, and without the
// counts a down item waiting for its slot would wait for ever.
#if !defined(MOE_NO_STAGE) || !defined(MOE_NO_WAIT)
#error "MOE_NO_SYNC needs MOE_NO_STAGE and MOE_NO_WAIT"
#endif
#define ITEM_SYNC()
#else
#define ITEM_SYNC() __syncthreads()
#endif

// Measurement builds only (PEREGRINE_KERNEL_DEFINES=-DMOE_TRACE): the fused kernel stamps
// %globaltimer at fixed points of each block's work into moe_trace (MOE_TRACE_SLOTS per block,
// the first MOE_TRACE_BLOCKS blocks; Kernels::moe_trace reads it). Slot 0: the SM; 1: entry;
// 2: past the wait for the kernel ahead; per item i < 2 at 3 + 5i: start, past the wait for
// gate_up (down items), activations staged, weights streamed (all warps), item done; 13: exit;
// 14: the start of a block's later items; in the routed kernels 15: the routing's loads in
// (moe_fused_acc's logits written), 16: the experts chosen and grouped (route_token returned),
// 17-20: route_token's phases (its stamp).
#define MOE_TRACE_BLOCKS 512
#define MOE_TRACE_SLOTS 21
#ifdef MOE_TRACE
__device__ unsigned long long moe_trace[MOE_TRACE_BLOCKS * MOE_TRACE_SLOTS];
#define TRACE(slot)                                                                      \
    do {                                                                                 \
        if (threadIdx.x == 0 && blockIdx.x < MOE_TRACE_BLOCKS) {                        \
            unsigned long long t_;                                                       \
            asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                     \
            moe_trace[blockIdx.x * MOE_TRACE_SLOTS + (slot)] = t_;                       \
        }                                                                                \
    } while (0)
#define TRACE_SM()                                                                       \
    do {                                                                                 \
        if (threadIdx.x == 0 && blockIdx.x < MOE_TRACE_BLOCKS) {                        \
            unsigned sm_;                                                                \
            asm volatile("mov.u32 %0, %%smid;" : "=r"(sm_));                            \
            moe_trace[blockIdx.x * MOE_TRACE_SLOTS] = sm_;                               \
        }                                                                                \
    } while (0)
#else
#define TRACE(slot)
#define TRACE_SM()
#endif

// The kernels' dynamic shared memory (the rings the bulk copies fill, the staged fragments)
// starts on a 128-byte line. As uint4 it started wherever the static shared memory ended (the
// decode kernels' 16-112 bytes past a line): one more static variable (16 bytes) moved the one-token MoE's
// rings from 64 to 80 bytes past a line and cost the batch-1 Flash step 2%, and on whole lines
// the step ran 1.3% faster than at 64 (benches/results/2026-11-27-moe-smem-lines.md).
// -DMOE_DSM_ALIGN=16 (measurement builds) gives back the uint4 placement.
#ifndef MOE_DSM_ALIGN
#define MOE_DSM_ALIGN 128
#endif

// Four e4m3 bytes -> two f16x2 (low byte first in each), exactly.
__device__ __forceinline__ void e4m3x4_to_f16x2x2(unsigned e, unsigned& lo, unsigned& hi) {
    asm("{.reg .b16 l, h; mov.b32 {l, h}, %2; cvt.rn.f16x2.e4m3x2 %0, l; cvt.rn.f16x2.e4m3x2 %1, h;}"
        : "=r"(lo), "=r"(hi)
        : "r"(e));
}

// A tiled word's codes as e4m3 bytes (each value x 2^-6): rows g (ra) and g + 8 (rb) at one k16
// half, the FP8 wgmma's A registers as they are and what tile_decode converts to f16.
__device__ __forceinline__ void digits_a(unsigned w, unsigned& ra, unsigned& rb) {
    ra = w & 0x9C9C9C9Cu;
    rb = ((w << 2) & 0x8C8C8C8Cu) | ((w >> 2) & 0x10101010u);
}

// One tiled word (8 codes) -> the A fragment a0..a3 of one MMA, each value x 2^-6.
// Measurement builds only (outputs are wrong), bounding what a cheaper decode could give:
// -DMOE_DECODE_FREE feeds the word itself to the MMA (no decode at all), -DMOE_DECODE_NO_CVT
// keeps the five integer operations and leaves out the four conversions.
__device__ __forceinline__ void tile_decode(unsigned w, unsigned a[4]) {
#if defined(MOE_DECODE_FREE)
    a[0] = a[1] = a[2] = a[3] = w;
    return;
#endif
    unsigned ea, eb;
    digits_a(w, ea, eb);
#if defined(MOE_DECODE_NO_CVT)
    a[0] = a[2] = ea;
    a[1] = a[3] = eb;
    return;
#endif
    // ea: row g at k 2t, 2t + 1 (a0), 2t + 8, 2t + 9 (a2); eb: row g + 8 (a1, a3).
    e4m3x4_to_f16x2x2(ea, a[0], a[2]);
    e4m3x4_to_f16x2x2(eb, a[1], a[3]);
}

// d = A B (C = 0) and d += A B, m16n8k16 f16 -> f32.
__device__ __forceinline__ void mma_zero(float d[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(0.f));
}
__device__ __forceinline__ void mma_acc(float d[4], const unsigned a[4], unsigned b0, unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}


// Hi and lo F16 words of the pairs (a, b): hi = f16(v), lo = f16(v - hi).
__device__ __forceinline__ void split2(float a, float b, unsigned& hi, unsigned& lo) {
    unsigned short ha = f32_to_f16_rn(a), hb = f32_to_f16_rn(b);
    unsigned short la = f32_to_f16_rn(a - f16_to_f32(ha)), lb = f32_to_f16_rn(b - f16_to_f32(hb));
    hi = (unsigned)ha | ((unsigned)hb << 16);
    lo = (unsigned)la | ((unsigned)lb << 16);
}

// One staging item: x values 16q + 2t + {0, 1} (v0) and + {8, 9} (v1) of pair j, scaled by
// s, split into hi and lo and stored as the B fragments of its column pair (layout at stage_b;
// L = 8 np lanes).
// WG: one row (L = 8, j = 0) in the wgmma GEMM's layout instead: per 64-k step, 16-byte units
// [MMA m][c][h] (c = 0: k 16m .. 16m + 7, c = 1: the next 8; h = 0 hi, 1 lo), word t of a unit
// holding k + 2t, + 1, so a unit is one core-matrix row of moe_gemm_chunk_wg's B.
template <bool WG = false>
__device__ __forceinline__ void stage_item(unsigned* frag, int L, int j, int q, int t, float2 v0, float2 v1, float s) {
    unsigned h0, l0, h1, l1;
    split2(v0.x * s, v0.y * s, h0, l0);
    split2(v1.x * s, v1.y * s, h1, l1);
    if (WG) {
        unsigned* u = frag + (size_t)(q >> 2) * 64 + (q & 3) * 16 + t;
        u[0] = h0;
        u[4] = l0;
        u[8] = h1;
        u[12] = l1;
        return;
    }
    int ks = q >> 2, sub = q & 3, half = sub >> 1, i0 = (sub & 1) * 2;
    unsigned* base = frag + (size_t)(ks * 2 + half) * L * 4;
    unsigned* ph = base + (4 * (2 * j) + t) * 4 + i0;
    unsigned* pl = base + (4 * (2 * j + 1) + t) * 4 + i0;
    ph[0] = h0;
    ph[1] = h1;
    pl[0] = l0;
    pl[1] = l1;
}

// The FP8 digit form of one token's activations (the one-token fused kernel's wgmma math,
// moe_fused's DG): each value v = x 2^s (|v| < 4, row_scale<true>) as eight balanced base-16
// digits, v ~ sum of D_d 16^-d with D_d = rint of what is left times 16^d, integers in [-8, 8]
// (exact in e4m3; the first in [-4, 4]). Eight digits keep 30 bits below the row's largest
// magnitude. The digits are the eight columns of an m64n8k32 e4m3 wgmma's B, K-major without
// swizzle: one 8 x 16-byte core matrix (digit d's row at 16 d) per 16 values of k, core matrix
// q at DG_CORE q bytes (the descriptor's leading offset). The MMA's k order is the A fragment's
// (a0: row g, k 4t..4t+3), which digits_a builds from a tiled word's bytes: hardware k 4t + i
// of core matrix q holds logical k 16 q + 2t + (i & 1) + 8 (i >> 1), exactly the values of one
// staging item (q, t). So item (q, t) writes one word per digit: its four values' digit d at
// word DG_CORE / 4 q + 4 d + t. Core matrices 144 bytes apart instead of 128 put a warp's 8
// consecutive q in 8 different groups of 4 banks: its stores are conflict-free (128 apart:
// 8-way conflicts, ~2000 cycles of the shared-memory port a block's staging of 4096 values).
// Every k32 sum of code (x 2^-6) times digit is then a multiple of 2^-7 below 24 in magnitude,
// which the FP8 wgmma adds exactly (benches/micro/fp8_mma_exact.cu: 16.8 M outputs).
__device__ __forceinline__ unsigned e4m3x4(float a, float b, float c, float d) {
    unsigned w;
    // cvt's first source goes to the upper byte of each pair.
    asm("{.reg .b16 l, h; cvt.rn.satfinite.e4m3x2.f32 l, %2, %1; cvt.rn.satfinite.e4m3x2.f32 h, %4, %3; mov.b32 %0, {l, h};}"
        : "=r"(w)
        : "f"(a), "f"(b), "f"(c), "f"(d));
    return w;
}
// Measurement builds only (outputs wrong): -DMOE_DG_NO_STAGE_MATH stores zeros without
// computing digits.
#define DG_CORE 144  // bytes from one core matrix of staged digits to the next (16 values of k; DG_CORE_BYTES in kernels/moe.rs)
__device__ __forceinline__ void stage_item_digits(unsigned* frag, int q, int t, float2 v0, float2 v1, float s) {
    float a = v0.x * s, b = v0.y * s, c = v1.x * s, d = v1.y * s;
    unsigned* u = frag + (size_t)q * (DG_CORE / 4) + t;
#ifdef MOE_DG_NO_STAGE_MATH
#pragma unroll
    for (int i = 0; i < 8; i++) u[4 * i] = 0u;
    return;
#endif
    // rint by adding and taking away 1.5 x 2^23 (exact for |v| < 2^22, ties to even as rintf):
    // two adds on the FMA pipe instead of a rounding conversion, a quarter-rate instruction,
    // with the e4m3 conversions the digit staging's bound (the batch-1 step's fused MoE stages
    // after its routing, so its staging is exposed there).
    const float C = 12582912.f;
    auto rnd = [C](float v) { return __fadd_rn(__fadd_rn(v, C), -C); };
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const float da = rnd(a), db = rnd(b), dc = rnd(c), dd = rnd(d);
        u[4 * i] = e4m3x4(da, db, dc, dd);
        // What is left is exact (|v - rint v| <= 1/2), and so is its scaling by 16.
        a = (a - da) * 16.f;
        b = (b - db) * 16.f;
        c = (c - dc) * 16.f;
        d = (d - dd) * 16.f;
    }
}

// Pair j's power-of-two scale from its warps' largest magnitudes red[w * NP + j]: m < 2^ex;
// scale by 2^(14 - ex) (0 or non-finite: no scaling), as split_f16 does; inv undoes it.
// DG (the FP8 digit staging, stage_item_digits): the largest magnitude just under 4 instead, and
// every finite row scaled that far down (a factor of 2^-126 at most, still a normal float).
// (row_scale_of: the same pair of scales into registers, for threads that each need them.)
template <bool DG = false>
__device__ __forceinline__ void row_scale_of(const float* red, int j, float& scale, float& inv) {
    float m = 0.f;
    for (int i = 0; i < TW; i++) m = fmaxf(m, red[i * NP + j]);
    int ex = (m > 0.f && m < __int_as_float(0x7f800000u)) ? (int)((__float_as_uint(m) >> 23) & 0xffu) - 126 : 0;
    int sh = DG ? min(max(2 - ex, -126), 100) : min(max(14 - ex, -100), 100);
    scale = __int_as_float((unsigned)(sh + 127) << 23);
    inv = __int_as_float((unsigned)(127 - sh) << 23);
}
template <bool DG = false>
__device__ __forceinline__ void row_scale(const float* red, int j, float* scale, float* inv) {
    row_scale_of<DG>(red, j, scale[j], inv[j]);
}

// One row's staging items held in registers (stage_b's one-row path): thread `me` of `n` takes
// items me, me + n, ... (R of them at most; item (q, t) is the values 16 q + 2 t + {0, 1, 8, 9}).
template <int R>
struct RowItems {
    float2 v0[R], v1[R];
};
// Loads this thread's items of row xr (q16 = K / 16 groups) and returns their largest magnitude.
template <int R>
__device__ __forceinline__ float row_items_load(const float* __restrict__ xr, int q16, int me, int n, RowItems<R>& r) {
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < R; i++) {
        int it = me + i * n;
        r.v0[i] = r.v1[i] = make_float2(0.f, 0.f);
        if (it < q16 * 4) {
            const float* p = xr + 16 * (it >> 2) + 2 * (it & 3);
            r.v0[i] = __ldcg(reinterpret_cast<const float2*>(p));
            r.v1[i] = __ldcg(reinterpret_cast<const float2*>(p + 8));
        }
        m = fmaxf(m, fmaxf(fmaxf(fabsf(r.v0[i].x), fabsf(r.v0[i].y)), fmaxf(fabsf(r.v1[i].x), fabsf(r.v1[i].y))));
    }
    return m;
}
// Stages the items row_items_load gave this thread, times s, as one row's B fragments (DG: its
// FP8 digits; the caller fences them for the wgmmas).
template <int R, bool WG, bool DG>
__device__ __forceinline__ void row_items_stage(unsigned* frag, int q16, int me, int n, const RowItems<R>& r, float s) {
#pragma unroll
    for (int i = 0; i < R; i++) {
        int it = me + i * n;
        if (it < q16 * 4) {
            if (DG)
                stage_item_digits(frag, it >> 2, it & 3, r.v0[i], r.v1[i], s);
            else
                stage_item<WG>(frag, 8, 0, it >> 2, it & 3, r.v0[i], r.v1[i], s);
        }
    }
}

#define STAGE_REGS 8  // items per thread a one-row staging keeps in registers (K <= 8192)
#define ACC_STAGE_REGS 8  // the same for moe_fused_acc's staging by 6 warps while warp 0 routes (H <= 6144)
// Stages rows rows[0..np) of x (f32, K each) as B fragments in `frag` and their 2^-s in inv.
// Fragment layout (uint4 units): [K/64 steps][2 halves][8 np lanes], lane 4g + t of column
// g = 2j + part (part 0 = hi, 1 = lo of pair j); half h holds MMAs 2h and 2h+1 as {b0, b1, b0, b1}.
// Lanes >= 8 np read no fragment (their columns are zero).
// NORM: the staged values are x * ninv (the fused MoE whose router ran in the o_proj stages the
// post-attention norm g h * inv from g h: moe_fused_acc_*), as the row's maximum and its power
// of two scale times ninv: 2^s (x ninv) = x (2^s ninv) exactly (barring subnormals), so the
// same bits as staging x * ninv, and no multiply per value.
// DG: one row (np = 1) as FP8 digits (stage_item_digits; DG_CORE K / 16 bytes), fenced for the wgmmas that
// read them.
template <bool WG = false, bool NORM = false, bool DG = false>
__device__ __forceinline__ void stage_b(const float* __restrict__ x, const int* rows, int np, int K, unsigned* frag,
                                        float* red, float* scale, float* inv, float ninv = 0.f) {
#ifdef MOE_NO_STAGE
    if (threadIdx.x < NP) inv[threadIdx.x] = 1.f;
    __syncthreads();
    return;
#endif
    int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
    const int q16 = K / 16;
    if (np == 1 && q16 * 4 <= STAGE_REGS * (int)blockDim.x) {
        // One routed pair (every pass of a 1-token step): the row is read once. Each thread
        // loads the values its items convert and their largest magnitude, then converts from
        // registers once the block's maximum is known. Reading x twice put a second global
        // round trip, queued behind the rings' first weight copies, into every item's start
        // (the fused kernel's trace: ~7 us from start to staged). Same values, same maximum,
        // same split as the general path below.
        RowItems<STAGE_REGS> r;
        float m = row_items_load(x + (size_t)rows[0] * K, q16, tid, (int)blockDim.x, r);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (lane == 0) red[w * NP] = NORM ? m * ninv : m;
        __syncthreads();
        if (tid == 0) row_scale<DG>(red, 0, scale, inv);
        __syncthreads();
        float s = NORM ? scale[0] * ninv : scale[0];
        row_items_stage<STAGE_REGS, WG, DG>(frag, q16, tid, (int)blockDim.x, r, s);
        if (DG) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the digits, seen by wgmma
        __syncthreads();
        return;
    }
    for (int j = 0; j < np; j++) {
        const float4* xr = reinterpret_cast<const float4*>(x + (size_t)rows[j] * K);
        float m = 0.f;
        for (int i = tid; i < K / 4; i += blockDim.x) {
            float4 v = __ldcg(xr + i);
            m = fmaxf(m, fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w))));
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if (lane == 0) red[w * NP + j] = NORM ? m * ninv : m;
    }
    __syncthreads();
    if (tid < np) row_scale<DG>(red, tid, scale, inv);
    __syncthreads();
    int L = 8 * np, items = np * q16 * 4;
    for (int it = tid; it < items; it += blockDim.x) {
        int t = it & 3, q = (it >> 2) % q16, j = (it >> 2) / q16;
        const float* xr = x + (size_t)rows[j] * K + 16 * q + 2 * t;
        float2 v0 = __ldcg(reinterpret_cast<const float2*>(xr)), v1 = __ldcg(reinterpret_cast<const float2*>(xr + 8));
        float s = NORM ? scale[j] * ninv : scale[j];
        if (DG)
            stage_item_digits(frag, q, t, v0, v1, s);  // (np = 1)
        else
            stage_item<WG>(frag, L, j, q, t, v0, v1, s);
    }
    if (DG) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    __syncthreads();
}

// A block's staging state in shared memory (stage_b's reduction, the rows' scales, the rows).
struct StageSmem {
    float red[TW * NP], scale[NP], inv[NP];
    int rows[NP];
};

// Where the tiled kernels stage activations: in dynamic shared memory after the TW warps' rings
// of `ring` bytes each.
__device__ __forceinline__ uint4* staged_frag(int ring) {
    extern __shared__ __align__(MOE_DSM_ALIGN) uint4 dsm[];
    return dsm + TW * ring / 16;
}

// One token's activations staged before the kernel waits for the one ahead (PDL), when the host
// says x is settled (`settled`, Kernels' MoeInput::Settled): written at least two launches back
// (the norm, then the router GEMV, then moe_route when routing is a launch of its own). Every
// kernel before this one waits for its own predecessor before it lets the next one launch, so by
// the time any block of this kernel runs, the norm has finished and its writes are visible (x is
// read through L2, __ldcg). Staging then overlaps the kernel ahead instead of queueing behind
// this kernel's first weight copies (the fused kernel's trace: ~5 us from an item's start to its
// activations staged). x from the launch just before (not settled) is staged after the wait.
// Returns whether `frag` holds x's row 0 as a one-pair pass (np = 1) would stage it.
// -DMOE_STAGE_LATE keeps the old order (staging after the wait), for measurements.
template <bool DG = false>
__device__ __forceinline__ bool stage_token_early(const float* __restrict__ x, int T, int K, uint4* frag, StageSmem& ss, int settled) {
#ifdef MOE_STAGE_LATE
    (void)x; (void)T; (void)K; (void)frag; (void)ss; (void)settled;
    return false;
#else
    if (T != 1 || !settled) return false;
    const int row0[1] = {0};
    stage_b<false, false, DG>(x, row0, 1, K, reinterpret_cast<unsigned*>(frag), ss.red, ss.scale, ss.inv);
    return true;
#endif
}

// Rows of activations a pass over K may stage: the host sizes the shared memory for the rings
// (ring_bytes) and min(tokens, NP) rows of the wider of H and I (4 K bytes each). An expert
// slot holding more pairs than that (a repeated expert, when fewer than top-k experts could be
// chosen: NaN logits) takes more passes instead of staging past the end.
// (DG: one row a pass, DG_CORE K / 16 bytes of digits; the host sizes for it.)
template <bool DG = false>
__device__ __forceinline__ int pass_rows(int K, int ring_bytes) {
    if (DG) return 1;
    unsigned dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
    return max(1, min(NP, (int)((dyn - (unsigned)ring_bytes) / (4u * (unsigned)K))));
}

__device__ __forceinline__ float e8m0_bits(unsigned v) { return __uint_as_float(v & 0x7f800000u); }

// tile_math's arithmetic for 32 values of k of a tile whose A fragments are decoded already
// (the MoE GEMM, which reuses them for several column tiles): A fragments a0 (k 0..15) and a1
// (k 16..31) against B words b (b.x, b.y then b.z, b.w) summed from zero, then scaled into acc
// by the 32-block's E8M0 scales: f_g for row g (acc[0..1]), f_g8 for row g + 8 (acc[2..3]).
__device__ __forceinline__ void mma_k32_scaled(float acc[4], const unsigned a0[4], const unsigned a1[4], uint4 b, float f_g, float f_g8) {
    float tp[4];
    mma_zero(tp, a0, b.x, b.y);
    mma_acc(tp, a1, b.z, b.w);
    acc[0] += f_g * tp[0];
    acc[1] += f_g * tp[1];
    acc[2] += f_g8 * tp[2];
    acc[3] += f_g8 * tp[3];
}

// A warp streams its 16-row tile through its own shared-memory ring of NS stages of CS steps
// (CS tile steps of STEP_BYTES each, as they lie in the tiles), filled by the bulk-copy engine
// (cp.async.bulk, completing on an mbarrier): one lane asks for a whole stage, so bytes in
// flight cost neither registers nor per-lane load instructions. (A register ring of 4-8 steps
// per warp, and 2 or 4 warps sharing a tile's K, measured slower at every token count on the
// H100.) `seq` counts the stages this warp has used before (the barriers' phases run on across
// passes).
__device__ __forceinline__ void mbar_init(unsigned long long* bar) {
    unsigned a = (unsigned)__cvta_generic_to_shared(bar);
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(a) : "memory");
}
__device__ __forceinline__ unsigned smem_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
// Waits for phase `parity` of the mbarrier at shared-window address a.
__device__ __forceinline__ void mbar_wait_at(unsigned a, unsigned parity) {
    asm volatile(
        "{.reg .pred p;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT_%=;}" ::"r"(a),
        "r"(parity)
        : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) { mbar_wait_at(smem_addr(bar), parity); }
__device__ __forceinline__ void bulk_load(void* smem, const void* gmem, unsigned bytes, unsigned long long* bar) {
    unsigned d = (unsigned)__cvta_generic_to_shared(smem), b = (unsigned)__cvta_generic_to_shared(bar);
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(d), "l"(gmem), "r"(bytes), "r"(b)
                 : "memory");
}
// The L2 policy of a weight stage's copy: evict_first where this call reads those bytes for the
// last time (`once`), so the MoE's stream of weights, larger than L2, does not push out what is
// read again (its own h and outputs, the activations, the K/V cache, the kernels' code), else
// evict_normal. Batch-1 Flash step -0.7 to -1.0%, batch 8 -1.8 to -2.0% (benches/results/
// 2026-11-27-moe-evict-first.md). Not on the GEMVs' loads: a line there serves several warps'
// requests, and with evict_first the step was 4% slower. -DMOE_WEIGHTS_EVICT_NORMAL
// (measurements): evict_normal everywhere.
__device__ __forceinline__ unsigned long long l2_weights_policy(bool once) {
    unsigned long long p;
#ifndef MOE_WEIGHTS_EVICT_NORMAL
    if (once)
        asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    else
#endif
        asm("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(p));
    return p;
}
// A weight stage's copy, with l2_weights_policy(once).
__device__ __forceinline__ void bulk_load_weights(void* smem, const void* gmem, unsigned bytes, unsigned long long* bar, bool once) {
    unsigned d = (unsigned)__cvta_generic_to_shared(smem), b = (unsigned)__cvta_generic_to_shared(bar);
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(d),
                 "l"(gmem), "r"(bytes), "r"(b), "l"(l2_weights_policy(once))
                 : "memory");
}
__device__ __forceinline__ void mbar_expect(unsigned long long* bar, unsigned bytes) {
    unsigned a = (unsigned)__cvta_generic_to_shared(bar);
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(a), "r"(bytes) : "memory");
}

// Stage j (of this pass) of a warp's ring: one lane asks for it, one copy (a tile's steps are
// contiguous, each its codes and then its scales). once: the pass is the call's last over
// this tile (l2_weights_policy). The streaming loop's bulk_issue_at does the same from
// shared-window addresses; the prologue going through it instead (2ec596a) moved every tiled
// kernel's register allocation and measured slower in one process (batch-1 / 2 Flash steps
// +0.8 / +5.1 us, 10 / 9 of 10 rounds; benches/results/2026-11-28-issue-6-status.md), so this
// copy stays.
template <int NS, int CS>
__device__ __forceinline__ void bulk_issue(int j, int seq, const unsigned char* __restrict__ wt, int KS, unsigned char* ring,
                                           unsigned long long* bars, bool once) {
    int slot = (seq + j) % NS, steps = min(CS, KS - j * CS);
    mbar_expect(bars + slot, steps * STEP_BYTES);
    bulk_load_weights(ring + slot * CS * STEP_BYTES, wt + (size_t)j * CS * STEP_BYTES, steps * STEP_BYTES, bars + slot, once);
}

// The first NS stages of a pass, asked for before the activations are staged; stages below
// `from` were already asked for by the previous pass (the ring runs on across passes).
template <int NS, int CS>
__device__ __forceinline__ void bulk_prologue(int seq, const unsigned char* __restrict__ wt, int KS, unsigned char* ring,
                                              unsigned long long* bars, bool once, int from = 0) {
    int nst = (KS + CS - 1) / CS;
    if ((threadIdx.x & 31) == 0)
        for (int j = from; j < min(NS, nst); j++) bulk_issue<NS, CS>(j, seq, wt, KS, ring, bars, once);
}

// Stage j of a pass into ring slot `slot` (one lane asks), as bulk_issue.
template <int CS>
__device__ __forceinline__ void bulk_issue_at(int j, unsigned slot, const unsigned char* __restrict__ wt, int KS, unsigned ring_s, unsigned bars_s,
                                              bool once) {
    unsigned bytes = (unsigned)min(CS, KS - j * CS) * STEP_BYTES, bar = bars_s + 8u * slot;
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
                     ring_s + slot * (unsigned)(CS * STEP_BYTES)),
                 "l"(wt + (size_t)j * CS * STEP_BYTES), "r"(bytes), "r"(bar), "l"(l2_weights_policy(once))
                 : "memory");
}
// Four words of shared memory at the shared-window address a (volatile: kept after the stage's
// barrier wait, which is volatile too).
__device__ __forceinline__ uint4 lds128(unsigned a) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(a));
    return v;
}
__device__ __forceinline__ unsigned lds32(unsigned a) {
    unsigned v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a));
    return v;
}
// One step (64 values of K) of a lane: its 16 bytes of codes `wv` (four MMAs' A fragments), its
// group's scale word `sv`, the staged B fragments b01 (k's first 32 values) and b23 (the next);
// the E8M0 scale of each 32-block multiplies that block's partial sums: acc[0..1] row g, acc[2..3]
// row g + 8. (It decodes each word just before its MMA, so it spells out mma_k32_scaled's
// arithmetic in place: calling it, all four words decoded first, changed the decode kernels' code.)
// Measurement builds only (outputs are wrong), splitting what the math costs beyond the decode:
// -DMOE_ONE_MMA leaves out each 32-block's second MMA (and its word's decode), -DMOE_NO_SCALE
// adds the partial sums unscaled (no E8M0 extraction, FADDs for the FFMAs).
#ifdef MOE_NO_SCALE
#define SCALE_OF(v) 1.0f
#else
#define SCALE_OF(v) e8m0_bits(v)
#endif
__device__ __forceinline__ void tile_math(uint4 wv, unsigned sv, uint4 b01, uint4 b23, float acc[4]) {
    unsigned a[4];
    float tp[4];
    tile_decode(wv.x, a);
    mma_zero(tp, a, b01.x, b01.y);
#ifndef MOE_ONE_MMA
    tile_decode(wv.y, a);
    mma_acc(tp, a, b01.z, b01.w);
#endif
    float f0 = SCALE_OF(sv << 23), f1 = SCALE_OF(sv << 7);  // (g, 2k), (g + 8, 2k)
    acc[0] += f0 * tp[0];
    acc[1] += f0 * tp[1];
    acc[2] += f1 * tp[2];
    acc[3] += f1 * tp[3];
    tile_decode(wv.z, a);
    mma_zero(tp, a, b23.x, b23.y);
#ifndef MOE_ONE_MMA
    tile_decode(wv.w, a);
    mma_acc(tp, a, b23.z, b23.w);
#endif
    f0 = SCALE_OF(sv << 15);  // (g, 2k + 1)
    f1 = SCALE_OF(sv >> 1);   // (g + 8, 2k + 1)
    acc[0] += f0 * tp[0];
    acc[1] += f0 * tp[1];
    acc[2] += f1 * tp[2];
    acc[3] += f1 * tp[3];
}


#ifdef __CUDA_ARCH_FEAT_SM90_ALL
// The one-token fused kernel's steps on FP8 warpgroup MMAs (moe_fused's DG). A block's warps
// stream row tiles rt = TW grp + w of one item at the same k, so each warpgroup's four tiles
// are one 64-row m64n8k32 e4m3 tile. A word's two e4m3 halves (digits_a's five integer
// operations, no conversions) are A registers as they are (a0/a2: row g, a1/a3: row g + 8;
// hardware k 4t + i holds logical k 2t + (i & 1) + 8 (i >> 1), as the tiled layout puts the
// codes and stage_item_digits lays out B), and each k32 block is one MMA against the digits from
// zero (its sum exact), scaled into acc by the block's E8M0 scale as tile_math does. A step's
// two MMAs are asynchronous: the previous step's sums are scaled while they run.
// acc: rows g and g + 8, digits 2t and 2t + 1 (tile_store_digits adds the digits up).
__device__ __forceinline__ void wg_e4m3_k32(float d[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned long long desc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1;\n}\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));
}
// The same over two pairs' digits (m64n16k32): d[0..3] the first pair's eight columns, d[4..7]
// the second's, as m64n8k32 gives each alone (the columns of an MMA are independent).
__device__ __forceinline__ void wg_e4m3_k32_n16(float d[8], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned long long desc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, p, 1, 1;\n}\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3]), "=f"(d[4]), "=f"(d[5]), "=f"(d[6]), "=f"(d[7])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc));
}
// Pins the registers of asynchronous MMA results in program order.
__device__ __forceinline__ void wg_pin16(float d[16]) {
#pragma unroll
    for (int i = 0; i < 16; i++) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void wg_pin8(float d[8]) {
#pragma unroll
    for (int i = 0; i < 8; i++) asm volatile("" : "+f"(d[i])::"memory");
}
// One step's two k32 MMAs into tp (block 0: tp[0..3], block 1: tp[4..7]); bdesc: the step's
// digits (block 1 two core matrices on).
// A step's four words as the A registers of its two k32 MMAs (digits_a of each word).
struct StepA {
    unsigned r[8];
};
__device__ __forceinline__ StepA digits_a_step(uint4 wv) {
    StepA a;
    digits_a(wv.x, a.r[0], a.r[1]);
    digits_a(wv.y, a.r[2], a.r[3]);
    digits_a(wv.z, a.r[4], a.r[5]);
    digits_a(wv.w, a.r[6], a.r[7]);
    return a;
}
__device__ __forceinline__ void digits_step_issue(uint4 wv, unsigned bdesc_lo, float tp[8]) {
    const StepA a = digits_a_step(wv);
    wg_fence();
    wg_e4m3_k32(tp, a.r[0], a.r[1], a.r[2], a.r[3], wg_desc_of(bdesc_lo, 128));
    wg_e4m3_k32(tp + 4, a.r[4], a.r[5], a.r[6], a.r[7], wg_desc_of(bdesc_lo + 2 * DG_CORE / 16, 128));
    wg_commit();
}
// digits_step_issue over two pairs' digit rows, `pstride` bytes apart (the descriptor's stride
// between 8-column groups): block 0 into tp[0..7], block 1 into tp[8..15], each pair's four
// results as digits_step_issue gives them.
__device__ __forceinline__ void digits_step_issue2(uint4 wv, unsigned bdesc_lo, unsigned pstride, float tp[16]) {
    const StepA a = digits_a_step(wv);
    wg_fence();
    wg_e4m3_k32_n16(tp, a.r[0], a.r[1], a.r[2], a.r[3], wg_desc_of(bdesc_lo, pstride));
    wg_e4m3_k32_n16(tp + 8, a.r[4], a.r[5], a.r[6], a.r[7], wg_desc_of(bdesc_lo + 2 * DG_CORE / 16, pstride));
    wg_commit();
}
// CSC: the step's activation chunk has its own power-of-two scale cs (a down pass over h staged
// as digits by the gate_up items, gate_up_chunk_digits), folded into the blocks' scales: both
// are powers of two, so the products are exact.
template <bool CSC = false>
__device__ __forceinline__ void digits_step_scale(const float tp[8], unsigned sv, float acc[4], float cs = 1.f) {
    float f0 = e8m0_bits(sv << 23), f1 = e8m0_bits(sv << 7);  // (g, 2k), (g + 8, 2k)
    if (CSC) {
        f0 *= cs;
        f1 *= cs;
    }
    acc[0] += f0 * tp[0];
    acc[1] += f0 * tp[1];
    acc[2] += f1 * tp[2];
    acc[3] += f1 * tp[3];
    f0 = e8m0_bits(sv << 15);  // (g, 2k + 1)
    f1 = e8m0_bits(sv >> 1);   // (g + 8, 2k + 1)
    if (CSC) {
        f0 *= cs;
        f1 *= cs;
    }
    acc[0] += f0 * tp[4];
    acc[1] += f0 * tp[5];
    acc[2] += f1 * tp[6];
    acc[3] += f1 * tp[7];
}
// digits_step_scale for the two pairs of digits_step_issue2 (pair j's sums at tp[4 j] and
// tp[8 + 4 j], its chunk scale cs[j]): each pair's arithmetic is digits_step_scale's, in its order.
template <bool CSC = false>
__device__ __forceinline__ void digits_step_scale2(const float tp[16], unsigned sv, float acc[8], const float cs[2]) {
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const float b[8] = {tp[4 * j], tp[4 * j + 1], tp[4 * j + 2], tp[4 * j + 3], tp[8 + 4 * j], tp[9 + 4 * j], tp[10 + 4 * j], tp[11 + 4 * j]};
        digits_step_scale<CSC>(b, sv, acc + 4 * j, cs[j]);
    }
}
#define MOE_DG_MATH 1
#else
#define MOE_DG_MATH 0
#endif

// Streams the warp's current pass (wt, KS steps). As its last NS stages are consumed, the
// freed slots are refilled with the first stages of the warp's next pass (nwt, nKS; nKS = 0:
// none), so the ring never drains between passes; returns how many were asked for. once /
// nonce: each pass is the call's last over its tile (bulk_issue).
// frag holds L / 8 pairs' B fragments, interleaved as stage_b stages them, or (rowstride > 0)
// row after row.
// -DMOE_TILED_EARLY=0 gives the tiled kernels the late refill back (measurements).
#ifndef MOE_TILED_EARLY
#define MOE_TILED_EARLY true
#endif
// EARLY: a stage's words go to registers and its slot is refilled before the stage's decode and
// MMAs, so a slot waits for its loads, not for CS steps of math (more bytes in flight per warp).
// The tiled kernels (2+ tokens) take it: Flash 2-16 tokens +1 point of copy bandwidth, clustered
// routings up to +17 (benches/results/2026-11-27-moe-early-refill.md). The fused one-token
// kernel does not: its 2 x 4 ring then spills, and the batch-1 step was 0.7% slower. (The warp
// sync below orders every lane's reads of the slot before lane 0's refill, as without EARLY.)
// The loop is lean in instructions (the one-token fused kernel's steps were issue- and
// dependency-bound under ncu: 133 warp instructions per 544-byte step, issue slots 59% busy):
// the ring slot and barrier phase run as counters, the rings', barriers' and fragments' shared-
// window addresses are taken once and stepped by constants, and lanes past the pairs' columns
// (lane >= L) load lane & 7's B words instead of zeroing registers and skipping their loads.
// Same arithmetic in the same order, so the same bits (benches/results/2026-11-28-moe-lean-stream.md).
// DG: frag holds one row's FP8 digits (stage_item_digits) and the math runs on wgmma
// (digits_step_issue); every warp of the block streams a tile of the same K.
// CSC (DG only): step k's activation chunk scale is the float at shared-window address csc + 4 k
// (digits_step_scale's CSC).
// NPD (DG only, 1 or 2): pairs a pass multiplies, their digit rows K / 16 core matrices apart
// in frag, acc holding 4 NPD sums (pair j's at acc + 4 j), pair j's chunk scales DG_CINV_STRIDE
// j bytes past csc (digits_step_issue2).
#define DG_CINV_STRIDE 256  // bytes from one pair's chunk scales to the next in shared memory (DG_MAX_CHUNKS floats)
template <int NS, int CS, bool EARLY = false, bool DG = false, bool CSC = false, int NPD = 1>
__device__ __forceinline__ int tile_stream_bulk(const unsigned char* __restrict__ wt, int KS, const uint4* frag, int L, float acc[4],
                                                unsigned char* ring, unsigned long long* bars, int& seq, bool once,
                                                const unsigned char* nwt = nullptr, int nKS = 0, bool nonce = true, int rowstride = 0,
                                                unsigned csc = 0u) {
    constexpr unsigned STAGE = CS * STEP_BYTES;
    int lane = threadIdx.x & 31, g = lane >> 2;
    // Step k's B words of this lane: fa + k * fstep, then + half for k's second half. Lanes past
    // the pairs' columns (lane >= L) read lane & 7's words: they feed only output columns 2 np .. 7
    // of the MMA, which no store reads, and reading words other lanes read costs no wavefront.
    int src = lane < L ? lane : lane & 7;
    if (rowstride) {
        // Rows staged one after another (rowstride uint4s apart, each as a one-pair pass stages
        // it): lane 8 j + i reads lane i of row j's fragments.
        src = lane < L ? (lane >> 3) * rowstride + (lane & 7) : lane & 7;
        L = 8;
    }
    const unsigned half = 16u * (unsigned)L, fstep = 2u * half, ring_s = smem_addr(ring), bars_s = smem_addr(bars);
    unsigned fa = smem_addr(frag + src);
    const unsigned wl = 16u * lane, sl = 512u + 4u * g;  // this lane's codes and scale word in a step
#if MOE_DG_MATH
    // DG: the digits' descriptor (low word) at the pass's first step; a step is 4 core matrices.
    const unsigned dga0 = DG ? wg_desc_lo(frag, DG_CORE) : 0u;
    if (DG && KS % CS) __trap();  // (never launched so: DG_RINGS)
#endif
    int nst = (KS + CS - 1) / CS, nnst = (nKS + CS - 1) / CS, pre = 0;
    unsigned slot = (unsigned)seq % NS, phase = ((unsigned)seq / NS) & 1u, pslot = (unsigned)(seq + nst) % NS;
    for (int j = 0; j < nst; j++) {
        mbar_wait_at(bars_s + 8u * slot, phase);
        const unsigned stage = ring_s + slot * STAGE;
        uint4 wvs[CS];
        unsigned svs[CS];
        if (EARLY) {
#pragma unroll
            for (int c = 0; c < CS; c++) {
                wvs[c] = lds128(stage + c * STEP_BYTES + wl);
                svs[c] = lds32(stage + c * STEP_BYTES + sl);
            }
        } else if (DG && NPD == 2) {
#if MOE_DG_MATH && !defined(MOE_NO_MATH)
            // digits_step_issue2 / digits_step_scale2 in the one-pair loop's order below.
            const unsigned bd = dga0 + (unsigned)(j * CS) * (4 * DG_CORE / 16), pstride = (unsigned)KS * 4u * DG_CORE;
            float tp[CS][16];
            const unsigned cst = csc + 4u * (unsigned)(j * CS);
            auto chunk_scales = [&](int c, float cs[2]) {
                cs[0] = CSC ? __uint_as_float(lds32(cst + 4u * c)) : 1.f;
                cs[1] = CSC ? __uint_as_float(lds32(cst + DG_CINV_STRIDE + 4u * c)) : 1.f;
            };
#pragma unroll
            for (int c = 0; c < CS; c++) {
                svs[c] = lds32(stage + c * STEP_BYTES + sl);
                digits_step_issue2(lds128(stage + c * STEP_BYTES + wl), bd + (unsigned)c * (4 * DG_CORE / 16), pstride, tp[c]);
                wg_pin16(tp[c]);
                if (c >= 1) {
                    float cs[2];
                    chunk_scales(c - 1, cs);
                    wg_wait<1>();
                    wg_pin16(tp[c - 1]);
                    digits_step_scale2<CSC>(tp[c - 1], svs[c - 1], acc, cs);
                }
            }
            float cs[2];
            chunk_scales(CS - 1, cs);
            wg_wait<0>();
            wg_pin16(tp[CS - 1]);
            digits_step_scale2<CSC>(tp[CS - 1], svs[CS - 1], acc, cs);
#endif
        } else if (DG) {
#if MOE_DG_MATH && !defined(MOE_NO_MATH)
            // Every stage is whole (the host runs these rings only where CS divides each pass's
            // steps, DG_RINGS): no step is skipped, so no branch or select per step, which the
            // streaming, bound by instructions issued, pays for.
            const unsigned bd = dga0 + (unsigned)(j * CS) * (4 * DG_CORE / 16);
            float tp[CS][8];
            // CSC: step c's chunk scale, loaded while its MMAs run (one register at a time).
            const unsigned cst = csc + 4u * (unsigned)(j * CS);
#pragma unroll
            for (int c = 0; c < CS; c++) {
                svs[c] = lds32(stage + c * STEP_BYTES + sl);
                digits_step_issue(lds128(stage + c * STEP_BYTES + wl), bd + (unsigned)c * (4 * DG_CORE / 16), tp[c]);
                wg_pin8(tp[c]);
                if (c >= 1) {
                    const float cs = CSC ? __uint_as_float(lds32(cst + 4u * (c - 1))) : 1.f;
                    wg_wait<1>();
                    wg_pin8(tp[c - 1]);
                    digits_step_scale<CSC>(tp[c - 1], svs[c - 1], acc, cs);
                }
            }
            const float cs = CSC ? __uint_as_float(lds32(cst + 4u * (CS - 1))) : 1.f;
            wg_wait<0>();
            wg_pin8(tp[CS - 1]);
            digits_step_scale<CSC>(tp[CS - 1], svs[CS - 1], acc, cs);
#endif
        } else {
#pragma unroll
            for (int c = 0; c < CS; c++) {
#ifndef MOE_NO_MATH
                if (j * CS + c < KS)
                    tile_math(lds128(stage + c * STEP_BYTES + wl), lds32(stage + c * STEP_BYTES + sl), lds128(fa + c * fstep),
                              lds128(fa + c * fstep + half), acc);
#endif
            }
        }
        __syncwarp();  // every lane has read the stage before it is refilled
        // Stage q (counted over passes) may be asked for once stage q - NS has been read: this slot.
        if (j + NS < nst) {
            if (lane == 0) {
                asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
                bulk_issue_at<CS>(j + NS, slot, wt, KS, ring_s, bars_s, once);
            }
        } else {
            // The next pass's stages in order; with a pass shorter than the ring several at once.
            if (lane == 0 && pre < nnst && nst + pre - NS <= j) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            while (pre < nnst && nst + pre - NS <= j) {
                if (lane == 0) bulk_issue_at<CS>(pre, pslot, nwt, nKS, ring_s, bars_s, nonce);
                pre++;
                pslot = pslot + 1 == NS ? 0u : pslot + 1;
            }
        }
        if (EARLY) {
#pragma unroll
            for (int c = 0; c < CS; c++) {
#ifndef MOE_NO_MATH
                if (j * CS + c < KS) tile_math(wvs[c], svs[c], lds128(fa + c * fstep), lds128(fa + c * fstep + half), acc);
#endif
            }
        }
        fa += CS * fstep;
        if (++slot == NS) {
            slot = 0;
            phase ^= 1u;
        }
    }
    seq += nst;
    return pre;
}

// The routed-combine of the down kernel, done by the last block to finish each group of rows
// (a per-group arrival counter; the block that brings it to the number of used expert slots
// sums, then resets it for the next call): y[t, n] = sum of out[p, n] over token t's pairs in
// ascending pair order, i.e. ascending expert, as the CPU reference and moe_combine do.
#define MAX_FUSED_TOPK 32
#define COMBINE_CHUNK 32
__device__ __forceinline__ void combine_rows(const float* __restrict__ out, const int* __restrict__ tok_pairs, float* __restrict__ y,
                                             int H, int n0, int rows, int T, int topk) {
    __shared__ int sorted[COMBINE_CHUNK * MAX_FUSED_TOPK];
    for (int c0 = 0; c0 < T; c0 += COMBINE_CHUNK) {
        int ct = min(COMBINE_CHUNK, T - c0);
        __syncthreads();
        // Each of a token's pairs goes to its rank among the token's pairs.
        for (int i = threadIdx.x; i < ct * topk; i += blockDim.x) {
            int t = i / topk, s = i % topk;
            const int* tp = tok_pairs + (size_t)(c0 + t) * topk;
            int p = tp[s], rank = 0;
            for (int j = 0; j < topk; j++) rank += tp[j] < p;
            sorted[t * topk + rank] = p;
        }
        __syncthreads();
        for (int i = threadIdx.x; i < ct * rows; i += blockDim.x) {
            int t = i / rows, n = n0 + i % rows;
            float acc = 0.f;
            for (int j = 0; j < topk; j++) acc += __ldcg(out + (size_t)sorted[t * topk + j] * H + n);
            y[(size_t)(c0 + t) * H + n] = acc;
        }
    }
}

// A lane's results of one pass for pair p: rows g and g + 8 of 16-row tile rt. For gate_up they
// are the gate and up of one intermediate row: h[p, 8 rt + g] = silu(gate) * up. For down,
// out[p, 16 rt + g (+ 8)] times the pair's routing weight. `inv` undoes the activation scale.
__device__ __forceinline__ void tile_store(bool gate_up, const float acc[4], float inv, float* __restrict__ y, int ldy, int p,
                                           int rt, const float* __restrict__ pair_w) {
    int g = (threadIdx.x & 31) >> 2;
    float f = inv * 64.f;  // and the decode's 2^-6
    float r0 = (acc[0] + acc[1]) * f, r1 = (acc[2] + acc[3]) * f;
    if (gate_up) {
        y[(size_t)p * ldy + rt * 8 + g] = r0 / (1.f + __expf(-r0)) * r1;
    } else {
        float pw = pair_w[p];
        y[(size_t)p * ldy + rt * 16 + g] = r0 * pw;
        y[(size_t)p * ldy + rt * 16 + g + 8] = r1 * pw;
    }
}

// The digit form's (DG) rows g, g + 8 of a tile: lane t holds them at digits 2t, 2t + 1; each row
// is the digits' sums weighted by 16^-d, added over the quad in a fixed order (every lane of the
// warp calls this; every lane gets the sums).
__device__ __forceinline__ void digit_rows(const float acc[4], float& r0, float& r1) {
    const int t = threadIdx.x & 3;
    const float w0 = __int_as_float((127 - 8 * t) << 23), w1 = w0 * 0.0625f;  // 16^-2t, 16^-(2t+1)
    r0 = acc[0] * w0 + acc[1] * w1;
    r1 = acc[2] * w0 + acc[3] * w1;
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
        r0 += __shfl_xor_sync(0xffffffffu, r0, o);
        r1 += __shfl_xor_sync(0xffffffffu, r1, o);
    }
}

// tile_store for the digit form: digit_rows, then stored as tile_store stores one pair's results.
__device__ __forceinline__ void tile_store_digits(bool gate_up, const float acc[4], float inv, float* __restrict__ y, int ldy, int p,
                                                  int rt, const float* __restrict__ pair_w) {
    const int t = threadIdx.x & 3;
    float r0, r1;
    digit_rows(acc, r0, r1);
    const float row[4] = {r0, 0.f, r1, 0.f};
    if (t == 0) tile_store(gate_up, row, inv, y, ldy, p, rt, pair_w);
}

// The digit MoE's h, handed from gate_up to down as digits (the fused kernel's items; the
// two-launch digit kernels' blocks do the same with each block's chunk, moe_tiled's DG). Each
// gate_up item holds one 64-value chunk of its pair's h (its 8 warps' 8 rows each): it stages that chunk as FP8
// digits itself, from the chunk's own largest magnitude, into the pair's digit row in global
// memory (dg_row_bytes: the digits as the down pass's descriptor reads them, then one inverse
// scale per chunk), before it counts itself done. A down pass then copies its row to shared
// memory with one bulk copy past its slot's wait, instead of loading h, reducing the row's
// largest magnitude over the block (two barriers) and converting 2048 values after the wait;
// the chunk scales enter its math per step (digits_step_scale's CSC). A scale per 64 values is
// at least as accurate as one per row. (-DMOE_DG_STAGE_H: the fused kernel's down passes stage
// h as floats themselves, with a scale per row, for measurements.)
#ifdef MOE_DG_STAGE_H
#define DG_H_DIGITS false
#else
#define DG_H_DIGITS true
#endif
#define DG_MAX_CHUNKS 64  // I / 64 at most (Kernels::moe_fp8_for: I <= 4096)
static_assert(DG_CINV_STRIDE == 4 * DG_MAX_CHUNKS, "two pairs' chunk scales lie DG_MAX_CHUNKS floats apart");
// Bytes of one pair's digit row of h: I / 16 core matrices of DG_CORE bytes, then I / 64 floats
// (dg_row_floats in kernels/moe.rs counts the same in floats).
__device__ __forceinline__ unsigned dg_row_bytes(int I) { return (unsigned)(I / 16 * DG_CORE + I / 64 * 4); }
// Bytes of one token's row of x as digits (moe_digit_rows; dg_x_row_bytes in kernels/moe.rs):
// the K / 16 core matrices a one-pair pass stages, then the row's inverse scale, padded to 16.
__device__ __forceinline__ unsigned dg_x_row_bytes(int K) { return (unsigned)(K / 16 * DG_CORE + 16); }

// A gate_up pass of the digit MoE, in place of tile_store_digits: lane t == 0 of each quad puts
// its row's h (tile_store's value) at hv[8 w + g] and the warp its largest magnitude at
// red[w NP] (row_scale_of's layout), for gate_up_chunk_digits past the block's barrier.
__device__ __forceinline__ void gate_up_chunk_values(const float acc[4], float inv, float* hv, float* red) {
    const int lane = threadIdx.x & 31, t = lane & 3, w = threadIdx.x >> 5;
    float r0, r1;
    digit_rows(acc, r0, r1);
    float m = 0.f;
    if (t == 0) {
        const float f = inv * 64.f, a = (r0 + 0.f) * f, b = (r1 + 0.f) * f;  // tile_store's arithmetic
        const float v = a / (1.f + __expf(-a)) * b;
        hv[8 * w + (lane >> 2)] = v;
        m = fabsf(v);
    }
#pragma unroll
    for (int o = 4; o < 32; o <<= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    if (lane == 0) red[w * NP] = m;
}
// Threads 0..15 stage chunk grp (the 64 values gate_up_chunk_values left) as the 16 staging
// items (q, t) of stage_item_digits into a pair's digit row, scaled as row_scale_of<true>
// scales a row from the chunk's largest magnitude; thread 0 writes the inverse scale.
__device__ __forceinline__ void gate_up_chunk_digits(const float* hv, const float* red, unsigned char* row, int I, int grp) {
    const int tid = threadIdx.x;
    if (tid >= 16) return;
    float sc, inv;
    row_scale_of<true>(red, 0, sc, inv);
    const int q = tid >> 2, t = tid & 3;
    const float* v = hv + 16 * q + 2 * t;
    stage_item_digits(reinterpret_cast<unsigned*>(row), 4 * grp + q, t, make_float2(v[0], v[1]), make_float2(v[8], v[9]), sc);
    if (tid == 0) reinterpret_cast<float*>(row + I / 16 * DG_CORE)[grp] = inv;
}
// The digit rows of h (dg_row_bytes each) of np consecutive pairs (from `row`), asked for by one
// thread onto `bar` on one expect: pair j's digits dg rows on in frag, its chunk scales
// DG_MAX_CHUNKS floats on in cinv (tile_stream_bulk's NPD; np = 1: a down pass's one row). The
// rows were written through the generic proxy (the slot's gate_up, acquired by the caller's
// wait) and are read here by the async one.
__device__ __forceinline__ void fetch_h_digit_rows(const unsigned char* row, int np, int I, uint4* frag, float* cinv, unsigned long long* bar) {
    asm volatile("fence.proxy.async.global;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    mbar_expect(bar, (unsigned)np * dg_row_bytes(I));
    const unsigned dg = (unsigned)(I / 16 * DG_CORE);
    for (int j = 0; j < np; j++) {
        const unsigned char* r = row + (size_t)j * dg_row_bytes(I);
        bulk_load(reinterpret_cast<unsigned char*>(frag) + j * dg, r, dg, bar);
        bulk_load(cinv + j * DG_MAX_CHUNKS, r + dg, (unsigned)(I / 64 * 4), bar);
    }
}

// After a block's down outputs for row group grp (TW x 16 rows of H): counted on counters[grp];
// the block that brings it to the number of used expert slots (of U) sums the group's rows of
// every token (combine_rows) and resets the counter.
__device__ __forceinline__ void combine_if_last(unsigned* counters, int grp, const int* __restrict__ pair_off, int U,
                                                const float* __restrict__ out, const int* __restrict__ tok_pairs,
                                                float* __restrict__ y, int H, int T, int topk) {
#ifdef MOE_NO_COMBINE
    return;
#endif
    int used = 0;
    for (int i = 0; i < U; i++) used += pair_off[i] < pair_off[i + 1];
    // This block's outputs published, then counted; the last of the group's blocks sums them.
    if (!block_arrive_last(counters + grp, (unsigned)used)) return;
    int n0 = grp * TW * 16;
    combine_rows(out, tok_pairs, y, H, n0, min(TW * 16, H - n0), T, topk);
}

// The per-slot hand-off from gate_up to down (the fused kernel's items, the two-launch kernels'
// blocks), on two counters per expert slot that are zero between calls. A gate_up unit counts
// itself done once its h is written (every thread of the block calls this).
__device__ __forceinline__ void gate_up_unit_done(unsigned* done) {
    block_release_add(done);  // this unit's h is visible to whoever acquires the count
}

// A down unit's first thread waits for all `gate_up_units` of its slot, then counts itself past
// the wait; the last of the slot's `down_units` resets both counters for the next call.
__device__ __forceinline__ void down_unit_wait(unsigned* done, unsigned* passed, unsigned gate_up_units, unsigned down_units) {
#ifndef MOE_NO_WAIT
    while (ld_acquire(done) < gate_up_units) __nanosleep(64);
#endif
    if (atomicAdd(passed, 1u) + 1 == down_units) {
        *done = 0u;
        *passed = 0u;
    }
}

// gate_up_unit_done for a unit that must know whether it was the slot's last of `units`; the
// last one sees every other unit's h.
__device__ __forceinline__ bool gate_up_unit_last(unsigned* done, unsigned units) {
    __shared__ int last;
    __threadfence();  // this unit's h is visible before it is counted
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(done, 1u) + 1 == units;
    __syncthreads();
    if (last) __threadfence();
    return last;
}

// Row p of y [rows, K] split as stage_b stages one pair (moe_split_rows' layout): xs + p K,
// its 2^-s at inv[p]. Every thread of the block calls it.
template <bool WG = false>
__device__ __forceinline__ void split_row(const float* __restrict__ y, int p, int K, unsigned* __restrict__ xs, float* __restrict__ inv,
                                          StageSmem& ss) {
    const int row[1] = {p};
    stage_b<WG>(y, row, 1, K, xs + (size_t)p * K, ss.red, ss.scale, ss.inv);
    if (threadIdx.x == 0) inv[p] = ss.inv[0];
}

// GATE_UP: W = interleaved gate/up tiles [E][I/8][H/64], x [T, H] rows by pair_tok, writes
//          h[p, i] = silu(gate_e x) * (up_e x) for i = 8 r + g.
// else:    W = down tiles [E][H/16][I/64], x = h [pairs, I], writes out[p, n] = pair_w[p] *
//          down_e h_p, and with `counters` also the combine into y [T, H].
// Grid: (ceil(tiles / TW), expert slots); dynamic shared memory TW x NS x CS x STEP_BYTES of
// rings, then K * 4 * min(NP, max pairs) bytes of staged activations.
// slot_done / slot_passed (per expert slot, zero between calls; null: the down kernel waits for
// the whole gate_up grid instead): gate_up blocks count themselves done per slot, down blocks
// wait for their slot's count and the last one past the wait resets both.
// DG: the FP8 digit math of the fused digit kernel, bit for bit (Kernels::moe_fp8_at: sm_90a,
// H and I multiples of 256, DG_RINGS): one pair a pass (NPD = 2: up to two pairs of the slot, their
// digit rows one after another in frag, tile_stream_bulk's NPD), x staged as digits, gate_up writing h
// as the pairs' digit rows (gate_up_chunk_digits) and down copying its pair's row (no SPLIT).
// xd (DG gate_up, 2+ tokens): x as digit rows (moe_digit_rows one launch ahead, dg_x_row_bytes
// each), copied in by a bulk copy per pass instead of staged: the staging after the wait cost
// the blocks of the multi-wave grid ~8-14 points of copy bandwidth (H200, 2-8 tokens).
// np_min / np_max: the block takes its slot only if the slot holds np_min..np_max pairs (its
// other blocks leave at once, before counting anything), so two kernel families can share one
// routing, each taking the slots it streams fastest (Kernels::moe_mixed_at: digit passes for
// slots of 1-2 pairs, F16 passes of up to 4 for the rest). 1 and 0x7fffffff take every slot.
template <bool GATE_UP, int NS, int CS, bool SPLIT, bool DG = false, int NPD = 1>
__device__ __forceinline__ void moe_tiled(const unsigned char* __restrict__ W, const int* __restrict__ experts, const int* __restrict__ pair_off,
                                          const int* __restrict__ pair_tok, const float* __restrict__ pair_w,
                                          const float* __restrict__ x, float* __restrict__ y, int K, int tiles, int ldy,
                                          unsigned* counters, const int* __restrict__ tok_pairs, float* __restrict__ comb, int T,
                                          int topk, int x_settled, unsigned* slot_done, unsigned* slot_passed,
                                          const unsigned* __restrict__ xs = nullptr, const float* __restrict__ xinv = nullptr,
                                          unsigned* __restrict__ hs = nullptr, float* __restrict__ hinv = nullptr,
                                          const unsigned char* __restrict__ xd = nullptr, int np_min = 1, int np_max = 0x7fffffff) {
    constexpr int RING = NS * CS * STEP_BYTES;  // bytes per warp
    extern __shared__ __align__(MOE_DSM_ALIGN) uint4 dsm[];
    uint4* frag = staged_frag(RING);
    __shared__ unsigned long long bars[TW * NS];
    __shared__ StageSmem ss;
    // gate_up waits for the kernel ahead here, after staging one token's x (the down kernel
    // waits later, after asking for its weights).
    TRACE_SCOPE_NAMED(GATE_UP ? "moe_tiled gate_up" : "moe_tiled down");
    bool staged = false;
    if (GATE_UP) {
        staged = !SPLIT && xd == nullptr && stage_token_early<DG>(x, T, K, frag, ss, x_settled);
        PDL_WAIT();
        TRACE_PAST_WAIT();
        PDL_TRIGGER();
    }
    int u = blockIdx.y;
    int pb = pair_off[u], pe = pair_off[u + 1];
    if (pb >= pe) return;  // an unused expert slot (the whole block leaves)
    if (pe - pb < np_min || pe - pb > np_max) return;  // another launch's slot
    size_t e = (size_t)experts[u];
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
    int rt = blockIdx.x * TW + w, KS = K / 64;
    bool active = rt < tiles;
    size_t tile = (e * tiles + (active ? rt : 0)) * KS;  // the warp's tile, in steps
    const unsigned char* wt = W + tile * STEP_BYTES;
    unsigned char* ring = reinterpret_cast<unsigned char*>(dsm) + w * RING;
    unsigned long long* wbars = bars + w * NS;
    int seq = 0;
    // SPLIT: the rows come split already (x by moe_split_rows one launch ahead; h by the last
    // gate_up block of the slot, split_row), row r at xs + r K with its 2^-s at xinv[r]: a
    // pass's rows land in `frag` by bulk copies on xbar, asked for with the weights (down: once
    // past its wait), so no block stages after the wait: every block of a multi-wave grid paid
    // that round trip while its ring sat full. (A template parameter: the same code with
    // run-time checks cost the one-token kernels, which never split, up to 4 points.)
    __shared__ unsigned long long xbar;
    int xpass = 0;
    // DG: a gate_up pass's chunk of h and its warps' largest magnitudes (ss.red); a down pass's
    // chunk scales, copied with its digit row on xbar.
    __shared__ float hv[DG ? NPD * TW * 8 : 1];
    __shared__ __align__(16) float cinv[DG ? NPD * DG_MAX_CHUNKS : 4];
    if (lane == 0)
        for (int i = 0; i < NS; i++) mbar_init(wbars + i);
    if ((SPLIT || DG) && threadIdx.x == 0) mbar_init(&xbar);  // (thread 0 uses it first; others past the pass's barrier)
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncwarp();
#ifdef MOE_DG_ONE_PASS
    // Measurement builds only (outputs wrong): a digit block makes one pass over its tiles
    // whatever its slot's pairs, multiplying only the first pair's digits, which bounds what
    // passes over every pair of a slot at once (wgmma columns for several pairs) could read.
    const int cap = DG ? max(1, pe - pb) : pass_rows<DG>(K, TW * RING);
#else
    const int cap = DG ? NPD : pass_rows<DG>(K, TW * RING);
#endif
    const unsigned dg_rows = (unsigned)(K / 16 * DG_CORE);  // DG: one pair's digits in frag
    if (DG && NPD > 1) {
        unsigned dyn;  // the host sizes the rings and NPD digit rows (kernels/moe.rs)
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(dyn));
        if (dyn < (unsigned)(TW * RING) + NPD * dg_rows) __trap();
    }
    for (int p0 = pb; p0 < pe; p0 += cap) {
        int np = min(cap, pe - p0);
#ifdef MOE_DG_ONE_PASS
        if ((int)threadIdx.x < min(np, NP)) ss.rows[threadIdx.x] = GATE_UP ? pair_tok[p0 + threadIdx.x] : p0 + threadIdx.x;
#else
        if ((int)threadIdx.x < np) ss.rows[threadIdx.x] = GATE_UP ? pair_tok[p0 + threadIdx.x] : p0 + threadIdx.x;
#endif
        // The pass's split rows, asked for by thread 0 (the previous pass's readers are past
        // the barrier that ends it).
        auto fetch_rows = [&]() {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            mbar_expect(&xbar, (unsigned)(np * K * 4));
            for (int j = 0; j < np; j++) {
                const int r = GATE_UP ? pair_tok[p0 + j] : p0 + j;
                bulk_load(frag + (size_t)j * (K / 4), xs + (size_t)r * K, (unsigned)(K * 4), &xbar);
            }
        };
        if (SPLIT && GATE_UP && threadIdx.x == 0) fetch_rows();
        if (DG && GATE_UP && xd != nullptr && threadIdx.x == 0) {
            // The pass's token's digit row (np = 1; the kernel waited for moe_digit_rows above)
            // and its inverse scale.
            // (NPD: the pass's np tokens' rows one after another.)
            asm volatile("fence.proxy.async.global;" ::: "memory");
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            mbar_expect(&xbar, (unsigned)np * dg_rows);
            for (int j = 0; j < np; j++) {
                const unsigned char* row = xd + (size_t)pair_tok[p0 + j] * dg_x_row_bytes(K);
                bulk_load(reinterpret_cast<unsigned char*>(frag) + j * dg_rows, row, dg_rows, &xbar);
                ss.inv[j] = __ldcg(reinterpret_cast<const float*>(row + dg_rows));
            }
        }
        const bool once = p0 + cap >= pe;  // the block's last pass over its tiles
        if (active) bulk_prologue<NS, CS>(seq, wt, KS, ring, wbars, once);
        // The down kernel may be launched while gate_up still runs (programmatic dependent
        // launch): its weights are asked for above, h only after gate_up has finished. With
        // `slot_done` a block waits only for its own slot's gate_up blocks (gate_up counts them
        // there), so the slots finished first fill the GPU while the last gate_up blocks drain.
        // Every gate_up block has started by the time any down block runs (the down kernel is
        // launched only once each has passed its launch_dependents), so the wait always ends.
        if (!GATE_UP) {
            if (slot_done == nullptr) {
                PDL_WAIT();
                TRACE_PAST_WAIT();
            } else if (p0 == pb && threadIdx.x == 0) {
                // With split rows the slot's last gate_up block counts once more once it has
                // written them.
                const unsigned gu_blocks = (unsigned)((K / 8 + TW - 1) / TW) + SPLIT;  // K = I: I / 8 gate_up tiles
                down_unit_wait(slot_done + u, slot_passed + u, gu_blocks, gridDim.x);
                TRACE_PAST_WAIT();
                // (They were written through the generic proxy; the bulk copies read through
                // the async one.)
                if (SPLIT) asm volatile("fence.proxy.async.global;" ::: "memory");
            }
            if (SPLIT && threadIdx.x == 0) fetch_rows();
            // DG: the pass's np digit rows (1 where NPD is, as a constant).
            if (DG && threadIdx.x == 0)
                fetch_h_digit_rows(reinterpret_cast<const unsigned char*>(x) + (size_t)p0 * dg_row_bytes(K), NPD == 1 ? 1 : np, K, frag, cinv, &xbar);
        }
        __syncthreads();
        float inv = 0.f;  // SPLIT: the 2^-s of the lane's pair (lanes t < np)
        if (SPLIT) {
            if (t < np) inv = __ldcg(xinv + (GATE_UP ? ss.rows[t] : p0 + t));
            mbar_wait(&xbar, xpass & 1);
            xpass++;
        } else if (DG && (!GATE_UP || xd != nullptr)) {
            mbar_wait(&xbar, xpass & 1);
            xpass++;
        } else if (!(staged && np == 1)) {
            // The early staging holds one pair; a slot with more (a repeated expert) restages.
            stage_b<false, false, DG>(x, ss.rows, np, K, reinterpret_cast<unsigned*>(frag), ss.red, ss.scale, ss.inv);
        }
        staged = false;
        float acc[4 * NPD];
#pragma unroll
        for (int i = 0; i < 4 * NPD; i++) acc[i] = 0.f;
        if constexpr (DG) {
            // (Every warp has a tile: the host runs DG where the tiles fill the blocks.)
            // A pass of one pair keeps the one-pair math (n8): on the H200 the digit kernels are
            // bound by their math, and two-pair steps for one pair cost a slot with a single pair
            // (most of them at 16 tokens) what the second read saves elsewhere.
            if (NPD == 2 && np == 2)
                tile_stream_bulk<NS, CS, false, DG, !GATE_UP, NPD>(wt, KS, frag, 8, acc, ring, wbars, seq, once, nullptr, 0, true, 0, smem_addr(cinv));
            else
                tile_stream_bulk<NS, CS, false, DG, !GATE_UP, 1>(wt, KS, frag, 8, acc, ring, wbars, seq, once, nullptr, 0, true, 0, smem_addr(cinv));
#pragma unroll
            for (int j = 0; j < NPD; j++) {
                if (j >= np) break;
                if (GATE_UP)
                    gate_up_chunk_values(acc + 4 * j, ss.inv[j], hv + j * TW * 8, ss.red + j);
                else
                    tile_store_digits(false, acc + 4 * j, 1.f, y, ldy, p0 + j, rt, pair_w);
            }
        } else {
            if (active) tile_stream_bulk<NS, CS, MOE_TILED_EARLY>(wt, KS, frag, 8 * np, acc, ring, wbars, seq, once, nullptr, 0, true, SPLIT ? K / 4 : 0);
            if (active && t < np) tile_store(GATE_UP, acc, SPLIT ? inv : ss.inv[t], y, ldy, p0 + t, rt, pair_w);
        }
        __syncthreads();  // every warp is done with the fragments before the next pass restages
        // DG: the pass's chunk of h as digits into its pair's row, before the block counts
        // itself done (gate_up_unit_done's barrier and release, or the grid's end, publish it).
        if (DG && GATE_UP)
            for (int j = 0; j < np; j++)
                gate_up_chunk_digits(hv + j * TW * 8, ss.red + j, reinterpret_cast<unsigned char*>(y) + (size_t)(p0 + j) * dg_row_bytes(ldy), ldy, blockIdx.x);
    }
    if (GATE_UP) {
        if (slot_done == nullptr) return;
        if (!SPLIT || hs == nullptr) {
            gate_up_unit_done(slot_done + u);
        } else if (gate_up_unit_last(slot_done + u, gridDim.x)) {
            // The slot's last gate_up block splits its pairs' h rows for the down blocks, then
            // counts once more: they wait for that count.
            for (int p = pb; p < pe; p++) split_row(y, p, ldy, hs, hinv, ss);
            asm volatile("fence.proxy.async.global;" ::: "memory");
            __threadfence();
            __syncthreads();
            if (threadIdx.x == 0) atomicAdd(slot_done + u, 1u);
        }
        return;
    }
    if (counters == nullptr) return;
    combine_if_last(counters, blockIdx.x, pair_off, gridDim.y, y, tok_pairs, comb, ldy, T, topk);
}

// One launch for the whole routed MLP (gate_up, then down with the combine) on a grid that is
// resident at once (the host sizes it by occupancy). An item is one expert slot's group of TW
// row tiles; all gate_up items come before all down items. A down item's weights are asked
// for before it waits for its slot's gate_up items; each warp's ring runs on from one pass to
// the next, so it does not drain at the boundary between gate_up and down as between two
// launches. counters: [H/16/TW] combine arrivals per down row group, then per slot the
// gate_up items done and the down items past their wait (the last one resets both). y null:
// no combine; the weighted pair outputs in out are the residual add's to sum (ops.cu).

// Item n's (is down, slot, row group); gu_items = U x gate_up groups.
__device__ __forceinline__ void fused_item(int n, int gu_items, int gug, int dg, bool& down, int& slot, int& grp) {
    down = n >= gu_items;
    int m = down ? n - gu_items : n, per = down ? dg : gug;
    slot = m / per;
    grp = m % per;
}

// NORM: x is g h, staged as the post-attention norm g h * ninv (stage_b's NORM; h by 1).
// DG: the FP8 digit math (one row a pass staged as digits, tile_stream_bulk's DG, summed by
// tile_store_digits): the host launches it only on sm_90a with H and I multiples of 256
// (Kernels::moe_fp8_for), so every item's row tiles fill the block, since a warpgroup's four
// warps multiply together, and every pass is whole stages of the DG_RINGS rings.
template <int NS, int CS, bool NORM = false, bool DG = false>
__device__ __forceinline__ void moe_fused(const unsigned char* __restrict__ Wg, const unsigned char* __restrict__ Wd,
                                          const int* __restrict__ experts, const int* __restrict__ pair_off,
                                          const int* __restrict__ pair_tok, const float* __restrict__ pair_w,
                                          const float* __restrict__ x, float* __restrict__ h, float* __restrict__ out, int H,
                                          int I, int U, unsigned* counters, const int* __restrict__ tok_pairs,
                                          float* __restrict__ y, int T, int topk, StageSmem& ss, bool x_staged,
                                          float ninv = 0.f) {
    constexpr int RING = NS * CS * STEP_BYTES;
    extern __shared__ __align__(MOE_DSM_ALIGN) uint4 dsm[];
    uint4* frag = staged_frag(RING);
    __shared__ unsigned long long bars[TW * NS];
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
    const int gu_tiles = I / 8, d_tiles = H / 16;  // 16-row tiles (gate_up rows interleaved)
    const int gug = (gu_tiles + TW - 1) / TW, dg = (d_tiles + TW - 1) / TW;
    const int gu_items = U * gug, items = gu_items + U * dg;
    unsigned* done = counters + dg;      // per slot: gate_up items finished
    unsigned* passed = counters + dg + U;  // per slot: down items past their wait
    unsigned char* ring = reinterpret_cast<unsigned char*>(dsm) + w * RING;
    unsigned long long* wbars = bars + w * NS;
    // DG with h as digits (DG_H_DIGITS): a gate_up pass's chunk of h and the warps' largest
    // magnitudes (ss.red) for gate_up_chunk_digits; a down pass's chunk scales, copied with its
    // digits on hbar (phase hpass). The digit rows lie in h (dg_row_bytes each).
    constexpr bool HD = DG && DG_H_DIGITS;
    __shared__ float hv[HD ? TW * 8 : 1];
    __shared__ __align__(16) float cinv[HD ? DG_MAX_CHUNKS : 4];
    __shared__ unsigned long long hbar;
    unsigned char* hd = reinterpret_cast<unsigned char*>(h);
    int hpass = 0;
    if (lane == 0)
        for (int i = 0; i < NS; i++) mbar_init(wbars + i);
    if (HD && threadIdx.x == 0) mbar_init(&hbar);  // (thread 0 arms it first; the others wait past an item barrier)
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncwarp();
    int seq = 0, pre = 0;  // the warp's stages so far; stages of its next pass already asked for
    // This warp's tile of item n: its first step, and the count of steps (0 when the warp has
    // no tile there).
    auto seg = [&](int n, const unsigned char*& wt) -> int {
        bool down;
        int slot, grp;
        fused_item(n, gu_items, gug, dg, down, slot, grp);
        int rt = grp * TW + w, tiles = down ? d_tiles : gu_tiles, KS = (down ? I : H) / 64;
        if (rt >= tiles || pair_off[slot] >= pair_off[slot + 1]) return 0;
        size_t tile = ((size_t)experts[slot] * tiles + rt) * KS;
        wt = (down ? Wd : Wg) + tile * STEP_BYTES;
        return KS;
    };
    // Block b takes items b, b + grid, b + 2 grid, ...: every gate_up item comes before any
    // down item in each block's list, so a block waiting in a down item waits only for gate_up
    // items of blocks that do not wait, and the host keeps the whole grid resident at once.
    // (Blocks taking items from a queue was slower at 1 token and is not kept; see
    // benches/results/2026-11-23-moe-fused.md.)
    for (int n = blockIdx.x; n < items; n += gridDim.x) {
        int nn = n + (int)gridDim.x;
        const int ti = (n - (int)blockIdx.x) / (int)gridDim.x < 2 ? 3 + 5 * ((n - (int)blockIdx.x) / (int)gridDim.x) : 14;  // trace slots
        (void)ti;
        TRACE(ti);
        bool down;
        int slot, grp;
        fused_item(n, gu_items, gug, dg, down, slot, grp);
        int pb = pair_off[slot], pe = pair_off[slot + 1];
        const unsigned char* wt = nullptr;
        int KS = seg(n, wt), rt = grp * TW + w;
        const int cap = pass_rows<DG>(down ? I : H, TW * RING);
        for (int p0 = pb; p0 < pe; p0 += cap) {  // no passes for an unused expert slot
            int np = min(cap, pe - p0);
            if ((int)threadIdx.x < np) ss.rows[threadIdx.x] = down ? p0 + threadIdx.x : pair_tok[p0 + threadIdx.x];
            const bool once = p0 + cap >= pe;  // the last pass over this item's tiles
            if (KS) bulk_prologue<NS, CS>(seq, wt, KS, ring, wbars, once, pre);
#ifdef MOE_TRACE_PROLOGUE  // measurement builds: the "activations staged" stamp right after warp 0's copies are issued
            if (ti < 14 && p0 == pb) TRACE(ti + 2);
#endif
            // The warp's next pass: this tile again for the slot's next pairs, else its tile of
            // the block's next item (whose first pass is its last when its slot fits one).
            const unsigned char* nwt = wt;
            int nKS = KS;
            bool nonce = p0 + 2 * cap >= pe;
            if (once) {
                nKS = 0;
                if (nn < items) {
                    nKS = seg(nn, nwt);
                    bool ndown;
                    int nslot, ngrp;
                    fused_item(nn, gu_items, gug, dg, ndown, nslot, ngrp);
                    nonce = pair_off[nslot + 1] - pair_off[nslot] <= pass_rows<DG>(ndown ? I : H, TW * RING);
                }
            }
            if (down && p0 == pb && threadIdx.x == 0) {
                // h of this slot is complete when all its gate_up items are (the weights are
                // already on their way).
                down_unit_wait(done + slot, passed + slot, (unsigned)gug, (unsigned)dg);
            }
            ITEM_SYNC();
            if (ti < 14 && p0 == pb) TRACE(ti + 1);
            // x staged before the wait (or while warp 0 routed: moe_fused_acc) serves the block's
            // first gate_up pass if it has one pair.
#ifdef MOE_DOWN_NO_STAGE  // measurement builds: down passes keep whatever frag holds
            if (down) {
                if (threadIdx.x < NP) ss.inv[threadIdx.x] = 1.f;
                __syncthreads();
            } else
#endif
            if (HD && down) {
#ifndef MOE_NO_STAGE
                // The pass's digit row (np = 1), onto fragments and chunk scales the previous pass
                // read (past the item barrier above).
                if (threadIdx.x == 0) fetch_h_digit_rows(hd + (size_t)p0 * dg_row_bytes(I), 1, I, frag, cinv, &hbar);
                mbar_wait(&hbar, hpass & 1);
                hpass++;
#endif
            } else if (!(x_staged && !down && np == 1)) {
                stage_b<false, NORM, DG>(down ? h : x, ss.rows, np, down ? I : H, reinterpret_cast<unsigned*>(frag), ss.red, ss.scale,
                                         ss.inv, down ? 1.f : ninv);
            }
            x_staged = false;
#ifndef MOE_TRACE_PROLOGUE
            if (ti < 14 && p0 == pb) TRACE(ti + 2);
#endif
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
            pre = 0;
            if (KS) {
                if (HD && down)
                    pre = tile_stream_bulk<NS, CS, false, DG, true>(wt, KS, frag, 8, acc, ring, wbars, seq, once, nwt, nKS, nonce, 0, smem_addr(cinv));
                else
                    pre = tile_stream_bulk<NS, CS, false, DG>(wt, KS, frag, 8 * np, acc, ring, wbars, seq, once, nwt, nKS, nonce);
            }
            if (HD && !down) {
                if (KS) gate_up_chunk_values(acc, ss.inv[0], hv, ss.red);
            } else if (DG) {
                // (HD: the chunk scales are in acc already.)
                if (KS) tile_store_digits(!down, acc, HD ? 1.f : ss.inv[0], down ? out : h, down ? H : I, p0, rt, pair_w);
            } else if (KS && t < np) {
                tile_store(!down, acc, ss.inv[t], down ? out : h, down ? H : I, p0 + t, rt, pair_w);
            }
            ITEM_SYNC();  // every warp is done with the fragments before the next pass restages
            // HD: the pass's chunk of h as digits into its pair's row, before the item counts
            // itself done (gate_up_unit_done's barrier and release publish these stores).
            if (HD && !down && KS) gate_up_chunk_digits(hv, ss.red, hd + (size_t)p0 * dg_row_bytes(I), I, grp);
            if (ti < 14) TRACE(ti + 3);
        }
        if (pb >= pe) continue;  // an unused expert slot
#ifdef MOE_NO_SYNC
        continue;
#endif
        if (down) {
            // y null: the pairs stay uncombined for the residual add after the MoE to sum.
            if (y) combine_if_last(counters, grp, pair_off, U, out, tok_pairs, y, H, T, topk);
        } else {
            gate_up_unit_done(done + slot);
        }
        if (ti < 14) TRACE(ti + 4);
    }
    TRACE(13);
}

// The routed fused kernels' common part: every block routes its token from `logits` (shared
// or global memory) by route_token, warp 0 grouping the choices (K <= MAX_FUSED_TOPK <= 32),
// block 0 writes the token's pair indices when the pairs are left (y null), then moe_fused runs
// on that routing. scores: 2 E floats of the rings' shared memory (free again past
// route_token's closing barrier). idle(): route_token's, for the warps that do not route.
template <int NS, int CS, bool NORM, bool DG = false, class Idle = RouteNoIdle>
__device__ __forceinline__ void route_then_moe(const float* logits, const float* __restrict__ bias, int E, int K, int softmax,
                                               int n_group, int topk_group, int norm, float scale, float* scores,
                                               const unsigned char* __restrict__ Wg, const unsigned char* __restrict__ Wd,
                                               const float* __restrict__ x, float* __restrict__ h, float* __restrict__ out, int H,
                                               int I, int U, unsigned* counters, float* __restrict__ y, int* __restrict__ tok_pairs_out,
                                               StageSmem& ss, bool staged, float ninv, Idle idle = Idle()) {
    __shared__ int sel[MAX_FUSED_TOPK], experts[MAX_FUSED_TOPK], pair_off[MAX_FUSED_TOPK + 1], pair_tok[MAX_FUSED_TOPK],
        tok_pairs[MAX_FUSED_TOPK];
    __shared__ float wsel[MAX_FUSED_TOPK], pair_w[MAX_FUSED_TOPK];
    static_assert(MAX_FUSED_TOPK <= 32, "group_one_token_warp holds one choice a lane");
    const OneTokenGroups groups = {experts, pair_off, pair_tok, pair_w, tok_pairs, U};
    route_token(logits, bias, E, K, softmax, n_group, topk_group, norm, scale, scores, scores + E, sel, wsel, &groups,
                [](int slot) { TRACE(slot); }, idle);
    TRACE(16);
    // y null: the pairs are left to the residual add after the MoE, which needs to know them.
    if (!y && blockIdx.x == 0 && (int)threadIdx.x < K) tok_pairs_out[threadIdx.x] = tok_pairs[threadIdx.x];
    // The rings' bulk copies (async proxy) will land where the scores were written (generic).
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    moe_fused<NS, CS, NORM, DG>(Wg, Wd, experts, pair_off, pair_tok, pair_w, x, h, out, H, I, U, counters, tok_pairs, y, 1, K, ss, staged,
                                ninv);
}

// The fused kernel for one token that routes it itself: every block runs the router on the
// token's logits (route_token, the code moe_route runs, so the same experts and weights bit for
// bit) and groups the choices itself (group_one_token_warp), then runs moe_fused on that
// routing. The routing launch and its global round trips leave a batch-1 step; each block reads
// E logits and biases (L2), and the scores' scratch is the ring's shared memory (2 E floats,
// before any copy lands there). U = min(K, E) expert slots; K <= MAX_FUSED_TOPK. y null: the
// pairs stay uncombined, and block 0 writes the token's pair indices to tok_pairs_out [K].
template <int NS, int CS, bool DG = false>
__device__ __forceinline__ void moe_fused_routed(const float* __restrict__ logits, const float* __restrict__ bias, int E, int K,
                                                 int softmax, int n_group, int topk_group, int norm, float scale,
                                                 const unsigned char* __restrict__ Wg, const unsigned char* __restrict__ Wd,
                                                 const float* __restrict__ x, float* __restrict__ h, float* __restrict__ out,
                                                 int H, int I, int U, unsigned* counters, float* __restrict__ y, int x_settled,
                                                 int* __restrict__ tok_pairs_out) {
    extern __shared__ __align__(MOE_DSM_ALIGN) uint4 dsm[];
    __shared__ StageSmem ss;
    bool staged = stage_token_early<DG>(x, 1, H, staged_frag(NS * CS * STEP_BYTES), ss, x_settled);
    PDL_ENTER();
    TRACE(2);
    route_then_moe<NS, CS, false, DG>(logits, bias, E, K, softmax, n_group, topk_group, norm, scale, reinterpret_cast<float*>(dsm), Wg, Wd,
                                  x, h, out, H, I, U, counters, y, tok_pairs_out, ss, staged, 0.f);
}

// moe_fused_routed after the o_proj that did the router (gemv_mma_bf16_t1_pipe_route in
// gemv.cu): the logits come as fixed-point sums in `copies` copies, acc[c E + e] (x 2^40;
// acc[copies E] nonzero: NaN logits), and the post-attention norm's sum of squares as the o_proj
// blocks' parts ssq[nssq]. Every warp sums ssq in the same order (lane l: parts l, l + 32, ...,
// then the xor tree), so every thread holds the same 1 / rms without a barrier; each thread
// adds its experts' copies (integers: any order) and writes their logits (sum * 2^-40 * inv) to
// shared memory, which route_then_moe routes as moe_fused_routed does. hg is g h (the norm's
// weight times h = x + a), staged as hg * inv (NORM). zero_acc [nzero] (or null): the previous
// such layer's accumulators, zeroed by block 0 past the wait (every block of that layer's MoE
// has read them, and the o_proj that adds into them next runs after this kernel). Shared
// scratch before the rings: scores, choices, logits and the bias, E floats each.
template <int NS, int CS, bool DG = false>
__device__ __forceinline__ void moe_fused_acc(const unsigned long long* __restrict__ acc, int copies, const float* __restrict__ ssq,
                                              int nssq, float eps, const float* __restrict__ bias, int E, int K, int softmax,
                                              int n_group, int topk_group, int norm, float scale,
                                              const unsigned char* __restrict__ Wg, const unsigned char* __restrict__ Wd,
                                              const float* __restrict__ hg, float* __restrict__ h, float* __restrict__ out, int H,
                                              int I, int U, unsigned* counters, float* __restrict__ y, int* __restrict__ tok_pairs_out,
                                              unsigned long long* __restrict__ zero_acc, int nzero) {
    extern __shared__ __align__(MOE_DSM_ALIGN) uint4 dsm[];
    __shared__ StageSmem ss;
    float* scores = reinterpret_cast<float*>(dsm);
    float* logits = scores + 2 * E;
    // The correction bias is a weight, so it is read before the wait: routing then finds it in
    // shared memory instead of paying an L2 round trip between the logits and the first weight
    // copy. (Each thread reads back its own e's in route_token, and a barrier comes first.)
    float* bias_s = bias ? scores + 3 * E : nullptr;
    if (bias)
        for (int e = threadIdx.x; e < E; e += blockDim.x) bias_s[e] = __ldg(bias + e);
    PDL_ENTER();
    TRACE(2);
    // Every load of the routing is asked for at once: the flag, this thread's expert's sum
    // copies (held in registers where there are at most ACC_HELD of them and an expert a thread)
    // and the norm's parts. One L2 round trip instead of two; integer sums, so the same bits.
    constexpr int ACC_HELD = 8;
    const bool held = copies <= ACC_HELD && E <= (int)blockDim.x;
    const int e0 = threadIdx.x;
    unsigned long long part[ACC_HELD];
    if (held && e0 < E) {
#pragma unroll
        for (int c = 0; c < ACC_HELD; c++) part[c] = c < copies ? __ldcg(acc + (size_t)c * E + e0) : 0ull;
    }
    const bool bad = __ldcg(acc + (size_t)copies * E) != 0ull;
    // hg's row is asked for in the same round trip, by six of the warps that do not route (warp
    // 0 takes the top K alone): they stage it while warp 0 routes (route_token's idle), so the
    // first gate_up pass finds it staged instead of reading and converting it after the
    // routing, behind its first weight copies. Warp 4 stages nothing: it shares warp 0's
    // scheduler (warp w issues on quarter w % 4), whose top K is the routing's longest phase
    // (all seven warps staging, -DMOE_ACC_STAGE_SEVEN: the H200's batch-1 step 4-8 us slower in
    // single-load A/Bs, which code placement alone can move by as much: not re-measured in load
    // pairs, benches/results/2026-11-28-kernel-code-placement.md).
    // Same values, same maximum, same scale: stage_b's bits. (-DMOE_ACC_STAGE_AFTER keeps the
    // old order, for measurements: benches/results/2026-11-28-moe-acc-stage-while-routing.md.)
    static_assert(TW == 8, "the stagers are warps 1-3 and 5-7");
#ifdef MOE_ACC_STAGE_SEVEN  // measurement builds: warp 4 stages too
    const int wq = (int)threadIdx.x >> 5, q16 = H / 16, others = 32 * (TW - 1);
    const int me = wq == 0 ? -1 : (int)threadIdx.x - 32;
#else
    const int wq = (int)threadIdx.x >> 5, q16 = H / 16, others = 32 * (TW - 2);
    const int me = wq % 4 == 0 ? -1 : (int)threadIdx.x - 32 * (1 + wq / 4);
#endif
#ifdef MOE_ACC_STAGE_AFTER
    const bool early = false;
#else
    const bool early = q16 * 4 <= ACC_STAGE_REGS * others;
#endif
    RowItems<ACC_STAGE_REGS> row;
    float hm = 0.f;
    if (early && me >= 0) hm = row_items_load(hg, q16, me, others, row);
    const float inv = acc_norm_inv(ssq, nssq, H, eps);
    if (early) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) hm = fmaxf(hm, __shfl_xor_sync(0xffffffffu, hm, o));
        if ((threadIdx.x & 31) == 0) ss.red[(threadIdx.x >> 5) * NP] = hm * inv;  // warps 0 and 4: 0
    }
    auto logit = [&](unsigned long long v) { return acc_logit(v, bad, inv); };
    if (held) {
        if (e0 < E) {
            unsigned long long v = 0ull;
#pragma unroll
            for (int c = 0; c < ACC_HELD; c++) v += part[c];
            logits[e0] = logit(v);
        }
    } else {
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            unsigned long long v = 0ull;
            for (int c = 0; c < copies; c++) v += __ldcg(acc + (size_t)c * E + e);
            logits[e] = logit(v);
        }
    }
    if (zero_acc && blockIdx.x == 0)
        for (int i = threadIdx.x; i < nzero; i += blockDim.x) zero_acc[i] = 0ull;
    __syncthreads();
    TRACE(15);
    // Staged as stage_b<false, true, DG> stages a one-pair pass (its row_scale from the warps'
    // maxima, times 1 / rms), into the fragments past the rings (the routing's scratch is in the
    // rings). route_then_moe's fence after route_token's closing barrier and moe_fused's item
    // barrier come before the first wgmma reads them.
    auto stage = [&]() {
        if (!early || me < 0) return;
        float sc, si;
        row_scale_of<DG>(ss.red, 0, sc, si);
        if (me == 0) ss.inv[0] = si;
        row_items_stage<ACC_STAGE_REGS, false, DG>(reinterpret_cast<unsigned*>(staged_frag(NS * CS * STEP_BYTES)), q16, me, others, row,
                                                   sc * inv);
    };
    route_then_moe<NS, CS, true, DG>(logits, bias_s, E, K, softmax, n_group, topk_group, norm, scale, scores, Wg, Wd, hg, h, out, H, I, U,
                                 counters, y, tok_pairs_out, ss, early, inv, stage);
}

// The fused kernels of ring NS x CS: SFX _bulk on F16 MMAs (every ring), _dg with the FP8
// digit math (moe_fused's DG; the rings whose CS divides the steps of every pass the host gives
// them, kernels::DG_RINGS; launched for one token on sm_90a only, where they are built:
// elsewhere they trap).
#if MOE_DG_MATH
#define DG_GUARD(DG)
#else
#define DG_GUARD(DG) if (DG) __trap()
#endif
#define MOE_FUSED(NS, CS, SFX, DG)                                                                                       \
    extern "C" __global__ void __launch_bounds__(256, MOE_MIN_BLOCKS) moe_fused##SFX##_n##NS##_c##CS(                     \
        const unsigned char* __restrict__ Wg, const unsigned char* __restrict__ Wd, const int* __restrict__ experts,      \
        const int* __restrict__ pair_off,                                                                                \
        const int* __restrict__ pair_tok, const float* __restrict__ pair_w, const float* __restrict__ x,                 \
        float* __restrict__ h, float* __restrict__ out, int H, int I, int U, unsigned* counters,                         \
        const int* __restrict__ tok_pairs, float* __restrict__ y, int T, int topk, int x_settled) {                      \
        DG_GUARD(DG);                                                                                                    \
        TRACE_SM();                                                                                                      \
        TRACE(1);                                                                                                        \
        __shared__ StageSmem ss;                                                                                         \
        bool staged = stage_token_early<DG>(x, T, H, staged_frag(NS * CS * STEP_BYTES), ss, x_settled);                             \
        PDL_ENTER();                                                                                                     \
        TRACE(2);                                                                                                        \
        moe_fused<NS, CS, false, DG>(Wg, Wd, experts, pair_off, pair_tok, pair_w, x, h, out, H, I, U, counters, tok_pairs,  \
                          y, T, topk, ss, staged);                                                                       \
    }                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, MOE_MIN_BLOCKS) moe_fused_routed##SFX##_n##NS##_c##CS(               \
        const float* __restrict__ logits, const float* __restrict__ bias, int E, int K, int softmax, int n_group,        \
        int topk_group, int norm, float scale, const unsigned char* __restrict__ Wg, const unsigned char* __restrict__ Wd, \
        const float* __restrict__ x,                                                                                     \
        float* __restrict__ h, float* __restrict__ out, int H, int I, int U, unsigned* counters, float* __restrict__ y,  \
        int x_settled, int* __restrict__ tok_pairs_out) {                                                                \
        DG_GUARD(DG);                                                                                                    \
        TRACE_SM();                                                                                                      \
        TRACE(1);                                                                                                        \
        moe_fused_routed<NS, CS, DG>(logits, bias, E, K, softmax, n_group, topk_group, norm, scale, Wg, Wd, x, h, out, \
                                 H, I, U, counters, y, x_settled, tok_pairs_out);                                        \
    }                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, MOE_MIN_BLOCKS) moe_fused_acc##SFX##_n##NS##_c##CS(                 \
        const unsigned long long* __restrict__ acc, int copies, const float* __restrict__ ssq, int nssq, float eps,      \
        const float* __restrict__ bias, int E, int K, int softmax, int n_group, int topk_group, int norm, float scale,    \
        const unsigned char* __restrict__ Wg, const unsigned char* __restrict__ Wd, const float* __restrict__ hg,       \
        float* __restrict__ h, float* __restrict__ out, int H, int I, int U, unsigned* counters, float* __restrict__ y,  \
        int* __restrict__ tok_pairs_out, unsigned long long* zero_acc, int nzero) {                                      \
        DG_GUARD(DG);                                                                                                    \
        TRACE_SM();                                                                                                      \
        TRACE(1);                                                                                                        \
        moe_fused_acc<NS, CS, DG>(acc, copies, ssq, nssq, eps, bias, E, K, softmax, n_group, topk_group, norm, scale, Wg, Wd, \
                              hg, h, out, H, I, U, counters, y, tok_pairs_out, zero_acc, nzero);                         \
    }

// Ring shapes: NS stages of CS steps. The _split_ kernels read their rows split already (moe_tiled's SPLIT).
#define MOE_BULK(NS, CS)                                                                                                 \
    extern "C" __global__ void __launch_bounds__(256, MOE_MIN_BLOCKS) moe_gate_up_bulk_n##NS##_c##CS(                    \
        const unsigned char* __restrict__ W, const int* __restrict__ experts,                                           \
        const int* __restrict__ pair_off, const int* __restrict__ pair_tok, const float* __restrict__ x,                 \
        float* __restrict__ h, int H, int I, int T, int x_settled, unsigned* slots, int np_min, int np_max) {            \
        moe_tiled<true, NS, CS, false>(W, experts, pair_off, pair_tok, nullptr, x, h, H, I / 8, I, nullptr, nullptr,  \
                                       nullptr, T, 0, x_settled, slots, nullptr, nullptr, nullptr, nullptr, nullptr,     \
                                       nullptr, np_min, np_max);                                                         \
    }                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, MOE_MIN_BLOCKS) moe_down_bulk_n##NS##_c##CS(                       \
        const unsigned char* __restrict__ W, const int* __restrict__ experts,                                           \
        const int* __restrict__ pair_off, const float* __restrict__ pair_w, const float* __restrict__ h,                 \
        float* __restrict__ out, int H, int I, unsigned* counters, const int* __restrict__ tok_pairs,                    \
        float* __restrict__ y, int T, int topk, unsigned* slots, int np_min, int np_max) { PDL_TRIGGER();                \
        moe_tiled<false, NS, CS, false>(W, experts, pair_off, nullptr, pair_w, h, out, I, H / 16, H, counters, tok_pairs,\
                                        y, T, topk, 0, slots, slots ? slots + gridDim.y : nullptr, nullptr, nullptr,     \
                                        nullptr, nullptr, nullptr, np_min, np_max);                                      \
    }                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, MOE_MIN_BLOCKS) moe_gate_up_split_n##NS##_c##CS(                   \
        const unsigned char* __restrict__ W, const int* __restrict__ experts,                                           \
        const int* __restrict__ pair_off, const int* __restrict__ pair_tok, float* __restrict__ h, int H, int I,         \
        unsigned* slots, const unsigned* __restrict__ xs, const float* __restrict__ xinv, unsigned* __restrict__ hs,     \
        float* __restrict__ hinv, int np_min, int np_max) {                                                              \
        moe_tiled<true, NS, CS, true>(W, experts, pair_off, pair_tok, nullptr, nullptr, h, H, I / 8, I, nullptr,      \
                                      nullptr, nullptr, 0, 0, 0, slots, nullptr, xs, xinv, hs, hinv, nullptr, np_min,    \
                                      np_max);                                                                           \
    }                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, MOE_MIN_BLOCKS) moe_down_split_n##NS##_c##CS(                      \
        const unsigned char* __restrict__ W, const int* __restrict__ experts,                                           \
        const int* __restrict__ pair_off, const float* __restrict__ pair_w, float* __restrict__ out, int H, int I,       \
        unsigned* counters, const int* __restrict__ tok_pairs, float* __restrict__ y, int T, int topk, unsigned* slots,  \
        const unsigned* __restrict__ hs, const float* __restrict__ hinv, int np_min, int np_max) { PDL_TRIGGER();       \
        moe_tiled<false, NS, CS, true>(W, experts, pair_off, nullptr, pair_w, nullptr, out, I, H / 16, H, counters,   \
                                       tok_pairs, y, T, topk, 0, slots, slots + gridDim.y, hs, hinv, nullptr, nullptr,   \
                                       nullptr, np_min, np_max);                                                         \
    }                                                                                                                    \
    MOE_FUSED(NS, CS, _bulk, false)
#if MOE_IN_PART(0)
MOE_BULK(2, 4)
MOE_BULK(4, 2)
#endif
#if MOE_IN_PART(1)
MOE_BULK(3, 4)
MOE_BULK(4, 4)
#endif
#if MOE_IN_PART(2)
MOE_BULK(3, 3)
MOE_BULK(2, 6)
MOE_BULK(2, 3)
#endif

// The fused and two-launch kernels with the FP8 digit math, on the rings of kernels::DG_RINGS
// (the bulk kernels' arguments).
// The two-launch kernels of ring NS x CS on digits whose passes take up to NPD pairs of a slot
// (moe_tiled's NPD): SFX dg (one pair) or dg2 (two).
#define MOE_TILED_DG_PASS(NS, CS, SFX, NPD)                                                                              \
    extern "C" __global__ void __launch_bounds__(256, MOE_MIN_BLOCKS) moe_gate_up_##SFX##_n##NS##_c##CS(                 \
        const unsigned char* __restrict__ W, const int* __restrict__ experts,                                           \
        const int* __restrict__ pair_off, const int* __restrict__ pair_tok, const float* __restrict__ x,                 \
        float* __restrict__ h, int H, int I, int T, int x_settled, unsigned* slots,                                      \
        const unsigned char* __restrict__ xd, int np_min, int np_max) {                                                  \
        DG_GUARD(true);                                                                                                  \
        moe_tiled<true, NS, CS, false, true, NPD>(W, experts, pair_off, pair_tok, nullptr, x, h, H, I / 8, I, nullptr, \
                                                  nullptr, nullptr, T, 0, x_settled, slots, nullptr, nullptr, nullptr,   \
                                                  nullptr, nullptr, xd, np_min, np_max);                                 \
    }                                                                                                                    \
    extern "C" __global__ void __launch_bounds__(256, MOE_MIN_BLOCKS) moe_down_##SFX##_n##NS##_c##CS(                    \
        const unsigned char* __restrict__ W, const int* __restrict__ experts,                                           \
        const int* __restrict__ pair_off, const float* __restrict__ pair_w, const float* __restrict__ h,                 \
        float* __restrict__ out, int H, int I, unsigned* counters, const int* __restrict__ tok_pairs,                    \
        float* __restrict__ y, int T, int topk, unsigned* slots, int np_min, int np_max) { PDL_TRIGGER();                \
        DG_GUARD(true);                                                                                                  \
        moe_tiled<false, NS, CS, false, true, NPD>(W, experts, pair_off, nullptr, pair_w, h, out, I, H / 16, H,       \
                                                   counters, tok_pairs, y, T, topk, 0, slots,                            \
                                                   slots ? slots + gridDim.y : nullptr, nullptr, nullptr, nullptr,       \
                                                   nullptr, nullptr, np_min, np_max);                                    \
    }
#define MOE_TILED_DG(NS, CS)                                                                                             \
    MOE_TILED_DG_PASS(NS, CS, dg, 1)                                                                                     \
    MOE_FUSED(NS, CS, _dg, true)
#if MOE_IN_PART(1)
MOE_TILED_DG(4, 4)
#endif
#if MOE_IN_PART(3)
MOE_TILED_DG(2, 4)
MOE_TILED_DG(4, 2)
MOE_TILED_DG(3, 4)
#endif

// The two-launch digit kernels whose passes take two pairs of a slot at once (moe_tiled's NPD):
// an expert holding several pairs (from ~16 rows on) is streamed once per two of them instead of
// once a pair, on m64n16k32 wgmmas (a pass of one pair on the one-pair math); the same bits as
// the one-pair kernels (each pair's columns
// and arithmetic are theirs). Dynamic shared memory: the rings, then two digit rows of K / 16
// core matrices (kernels::moe.rs sizes it).
#if MOE_IN_PART(1)
MOE_TILED_DG_PASS(4, 4, dg2, 2)
#endif
#if MOE_IN_PART(3)
MOE_TILED_DG_PASS(2, 4, dg2, 2)
MOE_TILED_DG_PASS(4, 2, dg2, 2)
MOE_TILED_DG_PASS(3, 4, dg2, 2)
#endif

// Everything below (the row splits and the prefill GEMMs) is part 0's.
#if MOE_IN_PART(0)

// ---------------------------------------------------------------------------------------------
// MoE GEMM for prefill-sized batches: many pairs per expert.
//
// Why: the kernels above stage at most NP = 4 pairs per pass and stream the expert's weights
// again for every pass, so a 2048-token prompt (~64 pairs per expert) re-streamed each expert
// ~16 times and its MoE ran at a few % of the tensor cores (69% of the prompt's time). Here a
// block takes 16 row tiles of one expert slot (one per warp) and 32 pairs at a time; each weight
// fragment it decodes feeds 8 n-tiles of MMAs. (Two tiles per warp on 8 warps, each staged
// activation fragment read once for both, measured equal at 2048 tokens and slower below on the
// H100: 255 registers, two warps per scheduler left the per-32-block scaling's MMA -> MMA ->
// FFMA chains waiting, ncu's first stall reason "wait"; benches/results/2026-11-24-prefill-gemm.md.)
//
// Same bits as the kernels above: each pair's row is split by moe_split_rows exactly as stage_b
// stages it (the row's power of two, then stage_item into a one-pair fragment: 256 bytes per
// 64 values of K), the MMAs, E8M0 scaling and accumulation order per column are tile_math's,
// and the epilogue is tile_store; MMA columns are independent, so the 32-pair tiles give what
// 4-pair passes gave.
//
// Per chunk of 32 pairs the block walks K in chunks of GEMM_KC steps through GEMM_STAGES
// shared-memory stages filled by cp.async: the pairs' split rows, then the 16 tiles' codes and
// scales (plain 16-byte copies: the work is bound by the MMAs, not by bytes in flight).
#define GEMM_NT 8                        // n8 tiles (4 pairs each) per chunk of pairs
#define GEMM_PAIRS (4 * GEMM_NT)         // pairs per chunk
#define GEMM_KC 4                        // steps of 64 K per stage
#define GEMM_STAGES 2
#define GEMM_TILES 16                    // row tiles per block, one per warp (512 threads)
#define GEMM_THREADS (32 * GEMM_TILES)
#define GEMM_B_BYTES (GEMM_PAIRS * GEMM_KC * 256)
#define GEMM_W_BYTES (GEMM_TILES * GEMM_KC * STEP_BYTES)
#define GEMM_STAGE_BYTES (GEMM_B_BYTES + GEMM_W_BYTES)
// The wgmma GEMM's row tiles per block (moe_gemm_wg_*): four warpgroups of four tiles, as the
// mma.sync GEMM (B read from L2 once per 256 rows). At 128 registers a thread ptxas spills a few
// bytes; three warpgroups (12 tiles, 150 registers, no spills) measured 3-6% slower on the H100.
// The host reads the count from the kernel's block size.
#ifndef MOE_WG_TILES
#define MOE_WG_TILES 16
#endif
#define WG_THREADS (32 * MOE_WG_TILES)
// The wgmma GEMM's B staging from a table of the chunk's row addresses (moe_gemm_chunk_wg), where
// the block's threads cover whole groups of 4 rows per pass; else (and in measurement builds
// with MOE_WG_STAGE_INDEXED, the form before 2026-11-26) each copy's address from its index.
#if !defined(MOE_WG_STAGE_INDEXED) && MOE_WG_TILES % 8 == 0
#define MOE_WG_ROWP 1
#else
#define MOE_WG_ROWP 0
#endif
#define WG_STAGES 3  // chunks of GEMM_KC steps in shared memory (kernels.rs: GEMM_WG_STAGES)
#define WG_STAGE_BYTES (GEMM_B_BYTES + MOE_WG_TILES * GEMM_KC * STEP_BYTES)

// rows x [rows, K] f32 -> xs [rows][K/64 steps][256 bytes]: each row staged by stage_b as one
// pair (row_scale's power of two, stage_item's layout with L = 8 lanes) into global memory, and
// inv[row] = 2^-s. One block of TW warps per row; K % 64 == 0.
extern "C" __global__ void __launch_bounds__(256) moe_split_rows(const float* __restrict__ x, int K, unsigned* __restrict__ xs,
                                                                 float* __restrict__ inv) {
    PDL_ENTER();
    __shared__ StageSmem ss;
    split_row(x, blockIdx.x, K, xs, inv, ss);
}

// rows x [rows, K] f32 -> xd [rows][dg_x_row_bytes(K)]: each row as the FP8 digit kernels'
// one-pair pass stages it (stage_b's DG: digits, then the row's inverse scale), for the
// two-launch digit gate_up (moe_tiled's xd). One block of TW warps per row; K % 256 == 0;
// dg_x_row_bytes(K) of dynamic shared memory.
// The row is staged before the wait for the kernel ahead: x is settled when this launch's
// blocks start (its writer, the norm or the router, is two or more launches back, and the
// routing launch in between lets this one start only once past its own wait: MoeInput). The
// digits go to shared memory and to xd only past the wait, as every step kernel writes (a
// step's buffers may reuse memory the kernel ahead still reads: crate::alloc). What is left
// past the wait is the copy of one row (37 KB for Flash). -DMOE_DIGIT_ROWS_AFTER_WAIT stages
// after the wait, for measurements.
// NORM (moe_digit_rows_acc): row t is x_t * inv_t, x = g h as the o_proj that did the router
// wrote it for T tokens (gemv_mma_bf16_t1_pipe_route) and inv_t from its blocks' parts ssq +
// t nssq (acc_norm_inv): stage_b's NORM, the digits of the post-attention norm's output.
// (Settled as x is: the o_proj is two launches back, moe_route_acc between.)
template <bool NORM>
__device__ __forceinline__ void digit_rows_body(const float* __restrict__ x, int K, unsigned char* __restrict__ xd,
                                                const float* __restrict__ ssq, int nssq, float eps) {
    uint4* dsm = staged_frag(0);  // (the dynamic shared memory, declared where the MoE kernels declare it)
    __shared__ StageSmem ss;
    TRACE_SCOPE_NAMED(NORM ? "moe_digit_rows_acc" : "moe_digit_rows");
#ifdef MOE_DIGIT_ROWS_AFTER_WAIT
    PDL_WAIT();
    TRACE_PAST_WAIT();
#endif
    PDL_TRIGGER();
    const int row[1] = {(int)blockIdx.x};
    const unsigned bytes = dg_x_row_bytes(K);
    const float ninv = NORM ? acc_norm_inv(ssq + (size_t)blockIdx.x * nssq, nssq, K, eps) : 0.f;
    stage_b<false, NORM, true>(x, row, 1, K, reinterpret_cast<unsigned*>(dsm), ss.red, ss.scale, ss.inv, ninv);
    if (threadIdx.x == 0) *reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(dsm) + K / 16 * DG_CORE) = ss.inv[0];
    __syncthreads();  // (stage_b ended with one: this one is for the scale)
#ifndef MOE_DIGIT_ROWS_AFTER_WAIT
    PDL_WAIT();
    TRACE_PAST_WAIT();
#endif
    uint4* r = reinterpret_cast<uint4*>(xd + (size_t)blockIdx.x * bytes);
    for (unsigned i = threadIdx.x; i < bytes / 16; i += blockDim.x) r[i] = dsm[i];
}
extern "C" __global__ void __launch_bounds__(256) moe_digit_rows(const float* __restrict__ x, int K, unsigned char* __restrict__ xd) {
    digit_rows_body<false>(x, K, xd, nullptr, 0, 0.f);
}
extern "C" __global__ void __launch_bounds__(256) moe_digit_rows_acc(const float* __restrict__ hg, int K, unsigned char* __restrict__ xd,
                                                                      const float* __restrict__ ssq, int nssq, float eps) {
    digit_rows_body<true>(hg, K, xd, ssq, nssq, eps);
}

// The same split in the wgmma GEMM's layout (stage_item's WG): the same values, other places.
extern "C" __global__ void __launch_bounds__(256) moe_split_rows_wg(const float* __restrict__ x, int K, unsigned* __restrict__ xs,
                                                                    float* __restrict__ inv) {
    PDL_ENTER();
    __shared__ StageSmem ss;
    split_row<true>(x, blockIdx.x, K, xs, inv, ss);
}

// One chunk of up to 4 NT pairs (rows[0 .. np)) of expert e against the block's tiles rt0 ..
// rt0 + bt (warp w: tile rt0 + w): K in chunks of GEMM_KC steps through GEMM_STAGES shared-memory stages filled by
// cp.async, then the epilogue. NT is a compile-time count of n-tiles so the inner loop is
// straight-line code the compiler can interleave (with a run-time bound each n-tile was its own
// basic block: its B loads, 8 dependent MMAs and their scaling serialised, 2 warps per
// scheduler to hide them). Columns of n-tiles past np compute on stale staged rows and are not
// stored (MMA columns are independent).
template <bool GATE_UP, int NT>
__device__ __forceinline__ void moe_gemm_chunk(const unsigned char* __restrict__ W, size_t e,
                                               const int* rows, int np, int p0, const float* __restrict__ pair_w,
                                               const unsigned* __restrict__ xs, const float* __restrict__ inv, float* __restrict__ y,
                                               int K, int tiles, int ldy, int rt0, int bt) {
    extern __shared__ __align__(MOE_DSM_ALIGN) uint4 dsm[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(dsm);
    const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int KS = K / 64, nkc = (KS + GEMM_KC - 1) / GEMM_KC;
    // Stage c (K chunk c) into buffer c % GEMM_STAGES: the pairs' split rows, the tiles' steps
    // k0 .. k0 + kc (codes and scales). The rows in units of 16 bytes at compile-time strides
    // (a row's GEMM_KC steps are 16 GEMM_KC units), so a thread's share costs shifts, not
    // divisions; each warp copies its own tile's contiguous steps. Units past the last step
    // are skipped.
    const unsigned char* wtile = W + (e * tiles + rt0 + w) * KS * STEP_BYTES + lane * 16;  // this warp's tile (w < bt)
    const int rows_units = 4 * NT * 16 * GEMM_KC;  // the n-tiles' rows (stale ones past np too: in bounds, unused)
    auto issue = [&](int c) {
        unsigned char* st = smem + (c % GEMM_STAGES) * GEMM_STAGE_BYTES;
        const int k0 = c * GEMM_KC, kc = min(GEMM_KC, KS - k0);
#pragma unroll
        for (int i0 = 0; i0 < rows_units; i0 += GEMM_THREADS) {
            int i = i0 + tid, j = i / (16 * GEMM_KC), o = i % (16 * GEMM_KC);
            if (j < np && o < 16 * kc)
                cp_async16(st + j * (GEMM_KC * 256) + o * 16, reinterpret_cast<const unsigned char*>(xs + (size_t)rows[j] * K) + k0 * 256 + o * 16);
        }
        // Warp r copies tile r's steps (codes and scales, STEP_BYTES each, contiguous in the
        // tiles and here).
        unsigned char* sw = st + GEMM_B_BYTES;
        if (w < bt) {
            const unsigned char* wsrc = wtile + (size_t)k0 * STEP_BYTES;
            unsigned char* wdst = sw + w * (GEMM_KC * STEP_BYTES) + lane * 16;
            const int units = kc * (STEP_BYTES / 16);
#pragma unroll
            for (int i = 0; i < (GEMM_KC * STEP_BYTES / 16 + 31) / 32; i++)
                if (lane + 32 * i < units) cp_async16(wdst + 512 * i, wsrc + 512 * i);
        }
    };
    const int lt = w < bt ? w : 0;  // a warp past the block's tiles computes tile 0 and stores nothing
    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[n][i] = 0.f;
    issue(0);
    cp_async_commit();
    for (int c = 0; c < nkc; c++) {
        if (c + 1 < nkc) issue(c + 1);
        cp_async_commit();  // (an empty group past the last chunk)
        cp_async_wait<1>();
        __syncthreads();
        const unsigned char* st = smem + (c % GEMM_STAGES) * GEMM_STAGE_BYTES;
        const unsigned char* sw = st + GEMM_B_BYTES + lt * (GEMM_KC * STEP_BYTES);
        const int kc = min(GEMM_KC, KS - c * GEMM_KC);
        for (int kk = 0; kk < kc; kk++) {
            // The warp's row tile: codes decoded once for all n-tiles, E8M0 scales of the
            // step's two 32-blocks for rows g and g + 8.
            unsigned a[4][4];
            const uint4 wv = reinterpret_cast<const uint4*>(sw + kk * STEP_BYTES)[lane];
            const unsigned sv = reinterpret_cast<const unsigned*>(sw + kk * STEP_BYTES + 512)[g];
            tile_decode(wv.x, a[0]);
            tile_decode(wv.y, a[1]);
            tile_decode(wv.z, a[2]);
            tile_decode(wv.w, a[3]);
            const float f0 = e8m0_bits(sv << 23), f1 = e8m0_bits(sv << 7);   // (g, 2k), (g + 8, 2k)
            const float f2 = e8m0_bits(sv << 15), f3 = e8m0_bits(sv >> 1);  // (g, 2k + 1), (g + 8, 2k + 1)
#pragma unroll
            for (int n = 0; n < NT; n++) {
                // Lane (g, t) reads column g of n-tile n: pair 4n + g/2, hi (g even) or lo.
                const uint4* bp = reinterpret_cast<const uint4*>(st + (4 * n + (g >> 1)) * (GEMM_KC * 256) + kk * 256 + (g & 1) * 64 + t * 16);
                uint4 b01 = bp[0], b23 = bp[8];  // halves 0 and 1 (128 bytes apart)
                // tile_math's arithmetic, in its order.
                mma_k32_scaled(acc[n], a[0], a[1], b01, f0, f1);
                mma_k32_scaled(acc[n], a[2], a[3], b23, f2, f3);
            }
        }
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
    if (w >= bt) return;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        int j = 4 * n + t;
        if (j < np) tile_store(GATE_UP, acc[n], inv[rows[j]], y, ldy, p0 + j, rt0 + w, pair_w);
    }
}

// ---------------------------------------------------------------------------------------------
// The same GEMM on Hopper's warpgroup MMAs (sm_90a): moe_gemm_wg_*.
//
// Why: at a 2048-token prompt the MoE GEMM was 57% of the prefill's kernel time at ~107 TFLOP/s
// of useful work: each warp issued, per 64 k, 32 mma.sync, 16 shared-memory B loads, the decode
// and 64 FFMAs of the E8M0 scaling. wgmma.mma_async m64nNk16 takes a warpgroup's four row tiles
// at once with B straight from shared memory. H100: as fast or faster from 512 tokens (Pro even at
// 512, Flash 7%; 10-17% at 1024-2048, ~124 TFLOP/s at 2048), as fast or slower below, where the weights' bytes bound it (the host's rule,
// GEMM_WGMMA_MIN_TOKENS). Still far from the tensor cores' rate: the block shape's bytes (the
// weights streamed once per 32 pairs, the pairs' rows from L2 once per 256 rows) and one barrier
// per 4 steps are what a faster form would change.
//
// Same bits: on the H100, wgmma chains with A in registers give mma.sync's bits for the same
// operands in the same logical places (benches/micro/wgmma_bits.cu: F16, BF16 and TF32 chains,
// MoE, GEMV and adversarial data, 0 of ~7 M outputs differ), and the A fragments are tile_decode's
// (wgmma's per-warp register fragment is mma.sync's). Each k32 block's two products are summed
// from zero into tp and scaled into acc exactly as mma_k32_scaled does, column by column.
//
// B: per 64-k step, MMA m (k 16m .. 16m + 15) as two 8 x 16-byte core matrices along K per 8
// columns, [m][c][n group][column][16 bytes], no swizzle; column 2j + h is pair j's hi (h = 0)
// or lo. A core row holds logical k 8c .. 8c + 7 (k 16m + 8c .. + 7 of the step), which
// moe_split_rows_wg writes as one 16-byte unit, so the staging copies 16 bytes at a time.
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
// moe_gemm_chunk on wgmma: the same stages and epilogue; warp w still copies and decodes tile
// rt0 + w, and warpgroup w / 4 multiplies its four tiles by the chunk's 8 NT columns.
template <bool GATE_UP, int NT>
__device__ __forceinline__ void moe_gemm_chunk_wg(const unsigned char* __restrict__ W, size_t e,
                                                  const int* rows, const unsigned** rowp, int np, int p0, const float* __restrict__ pair_w,
                                                  const unsigned* __restrict__ xs, const float* __restrict__ inv, float* __restrict__ y,
                                                  int K, int tiles, int ldy, int rt0, int bt) {
    extern __shared__ __align__(MOE_DSM_ALIGN) uint4 dsm[];
    unsigned char* smem = reinterpret_cast<unsigned char*>(dsm);
    const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31, g = lane >> 2;
    const int KS = K / 64, nkc = (KS + GEMM_KC - 1) / GEMM_KC;
    constexpr unsigned CORE_K = NT * 128;  // bytes between the two core matrices along K
    constexpr int MMA_B = 2 * CORE_K;      // one MMA's B: 16 k x 8 NT columns
    const unsigned char* wtile = W + (e * tiles + rt0 + w) * KS * STEP_BYTES + lane * 16;
    // Unit u (0..15) of a row's step in moe_split_rows_wg's layout is [m][c][h]: one core-matrix
    // row, to (m, c), column 2 (j % 4) + h of n group j / 4.
#if MOE_WG_ROWP
    // Thread tid copies unit u = tid % 16 of step ku = tid / 16 % 4 of rows j = RPI it + tid / 64:
    // its destination moves by a constant per it and its source by a row, so each copy costs a
    // shared load of the row's address and two adds. Computed per copy from tid, the addresses
    // took ~360 instructions a stage (~90 per step, against the step's 139).
    constexpr int RPI = WG_THREADS / 64;  // rows per pass of the block's threads (a multiple of 4)
    if (tid < np) rowp[tid] = xs + (size_t)rows[tid] * K;
    __syncthreads();
    const int ku = (tid >> 4) & 3, jt = tid >> 6;
    const unsigned bdst = (ku * 4 + ((tid >> 2) & 3)) * MMA_B + ((tid >> 1) & 1) * CORE_K + (jt >> 2) * 128 + (2 * (jt & 3) + (tid & 1)) * 16;
    const int bsrc = ku * 64 + (tid & 15) * 4;
#endif
    auto issue = [&](int c) {
        unsigned char* st = smem + (c % WG_STAGES) * WG_STAGE_BYTES;
        const int k0 = c * GEMM_KC, kc = min(GEMM_KC, KS - k0);
#if MOE_WG_ROWP
        if (ku < kc) {
#pragma unroll
            for (int it = 0; it < (4 * NT + RPI - 1) / RPI; it++)
                if (RPI * it + jt < np) cp_async16(st + bdst + 32 * RPI * it, rowp[RPI * it + jt] + k0 * 64 + bsrc);
        }
#else
#pragma unroll
        for (int i0 = 0; i0 < 4 * NT * GEMM_KC * 16; i0 += WG_THREADS) {
            const int i = i0 + tid, u = i & 15, j = i >> 6, kk = (i >> 4) & 3;
            if (j < np && kk < kc)
                cp_async16(st + (kk * 4 + (u >> 2)) * MMA_B + ((u >> 1) & 1) * CORE_K + (j >> 2) * 128 + (2 * (j & 3) + (u & 1)) * 16,
                           xs + (size_t)rows[j] * K + (k0 + kk) * 64 + u * 4);
        }
#endif
        unsigned char* sw = st + GEMM_B_BYTES;
        if (w < bt) {
            const unsigned char* wsrc = wtile + (size_t)k0 * STEP_BYTES;
            unsigned char* wdst = sw + w * (GEMM_KC * STEP_BYTES) + lane * 16;
            const int units = kc * (STEP_BYTES / 16);
#pragma unroll
            for (int i = 0; i < (GEMM_KC * STEP_BYTES / 16 + 31) / 32; i++)
                if (lane + 32 * i < units) cp_async16(wdst + 512 * i, wsrc + 512 * i);
        }
    };
    static_assert(GEMM_KC == 4, "the B staging's index arithmetic takes 4 steps per stage");
    const int lt = w < bt ? w : 0;  // a warp past the block's tiles computes tile 0 and stores nothing
    // A step's two k32 blocks are issued together, block 0 into tp0 and block 1 into tp1; block
    // 0 is scaled into acc while block 1 runs (the order into acc is tile_math's: block 0, then
    // block 1, step by step). Carrying blocks across steps made ptxas serialise the MMAs.
    float acc[4 * NT], tp0[4 * NT], tp1[4 * NT];
#pragma unroll
    for (int i = 0; i < 4 * NT; i++) acc[i] = tp0[i] = tp1[i] = 0.f;
    // Pins tp's registers in program order around the asynchronous MMAs (they read and write
    // them after the issuing instruction).
    auto pin = [](float* v) {
#pragma unroll
        for (int i = 0; i < 4 * NT; i++) asm volatile("" : "+f"(v[i])::"memory");
    };
    auto scale_into = [&](const float* tp, float fg, float fg8) {
#pragma unroll
        for (int n = 0; n < NT; n++) {
            acc[4 * n] += fg * tp[4 * n];
            acc[4 * n + 1] += fg * tp[4 * n + 1];
            acc[4 * n + 2] += fg8 * tp[4 * n + 2];
            acc[4 * n + 3] += fg8 * tp[4 * n + 3];
        }
    };
    // WG_STAGES - 1 chunks in flight ahead of the one multiplied; a stage is refilled once every
    // warp has passed the barrier after finishing it.
#pragma unroll
    for (int p = 0; p < WG_STAGES - 1; p++) {
        if (p < nkc) issue(p);
        cp_async_commit();  // (empty groups past the last chunk keep the wait's count)
    }
    for (int c = 0; c < nkc; c++) {
        cp_async_wait<WG_STAGES - 2>();
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // the copies, seen by wgmma
        __syncthreads();
#ifdef MOE_WG_NO_LOAD  // measurement builds only (outputs wrong): after the first stages, no loads
        if (false)
#endif
        if (c + WG_STAGES - 1 < nkc) issue(c + WG_STAGES - 1);
        cp_async_commit();
        const unsigned char* st = smem + (c % WG_STAGES) * WG_STAGE_BYTES;
        const unsigned char* sw = st + GEMM_B_BYTES + lt * (GEMM_KC * STEP_BYTES);
        const int kc = min(GEMM_KC, KS - c * GEMM_KC);
        // k32 block hb (MMAs 2 hb, 2 hb + 1) of step kk from A fragments a0, a1 into tp; the
        // descriptors from the stage's, advanced in 16-byte units.
        const unsigned dlo = wg_desc_lo(st, CORE_K);
        auto block = [&](float* tp, const unsigned a0[4], const unsigned a1[4], int kk, int hb) {
            const unsigned lo = dlo + (kk * 4 + 2 * hb) * (MMA_B >> 4);
            pin(tp);
            wg_fence();
            wg_mma<NT>(tp, a0, wg_desc_of(lo, 128), 0);
            wg_mma<NT>(tp, a1, wg_desc_of(lo + (MMA_B >> 4), 128), 1);
            wg_commit();
            pin(tp);
        };
#ifdef MOE_WG_NO_MMA  // measurement builds only (outputs wrong): the loads and barriers alone
        continue;
#endif
        for (int kk = 0; kk < kc; kk++) {
            unsigned a[4][4];
            const uint4 wv = reinterpret_cast<const uint4*>(sw + kk * STEP_BYTES)[lane];
            const unsigned sv = reinterpret_cast<const unsigned*>(sw + kk * STEP_BYTES + 512)[g];
            tile_decode(wv.x, a[0]);
            tile_decode(wv.y, a[1]);
            block(tp0, a[0], a[1], kk, 0);
            tile_decode(wv.z, a[2]);
            tile_decode(wv.w, a[3]);
            block(tp1, a[2], a[3], kk, 1);
            const float f0 = e8m0_bits(sv << 23), f1 = e8m0_bits(sv << 7);   // (g, 2k), (g + 8, 2k)
            const float f2 = e8m0_bits(sv << 15), f3 = e8m0_bits(sv >> 1);  // (g, 2k + 1), (g + 8, 2k + 1)
            wg_wait<1>();  // block 0
            pin(tp0);
            scale_into(tp0, f0, f1);
            wg_wait<0>();  // block 1
            pin(tp1);
            scale_into(tp1, f2, f3);
        }
    }
    if (w >= bt) return;
    const int t = lane & 3;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        int j = 4 * n + t;
        if (j < np) tile_store(GATE_UP, acc + 4 * n, inv[rows[j]], y, ldy, p0 + j, rt0 + w, pair_w);
    }
}
#endif

// GATE_UP: W = interleaved gate/up tiles [E][I/8][H/64], xs = moe_split_rows of x [T, H] (rows
//          by pair_tok), writes h[p, i] = silu(gate_e x) * (up_e x) for i = 8 r + g.
// else:    W = down tiles [E][H/16][I/64], xs = moe_split_rows of h [pairs, I] (row p for pair
//          p), writes out[p, n] = pair_w[p] * down_e h_p (moe_combine then sums each token's).
// Grid: (ceil(tiles / GEMM_TILES), expert slots); GEMM_THREADS threads; GEMM_STAGES x
// GEMM_STAGE_BYTES of dynamic shared memory. A chunk of np pairs runs the n-tile count of 1, 2,
// 4 or 8 that covers it (WG: any count from 1 to 8, ceil(np / 4)).
//
// WG (the wgmma kernels): grid.x is (tile groups) x cb, and the cb blocks of a tile group, adjacent
// in launch order, take the slot's chunks c, c + cb, ... (chunks of equal size in whole n-tiles,
// at most GEMM_PAIRS, the last one shorter): they run side by side, so the tiles' weights come
// from DRAM about once for all the slot's pairs and from L2 for the others, where one block took
// every chunk in turn and streamed them from DRAM per chunk. Chunks are independent columns: the
// same bits.
template <bool GATE_UP, bool WG = false>
__device__ __forceinline__ void moe_gemm(const unsigned char* __restrict__ W, const int* __restrict__ experts, const int* __restrict__ pair_off,
                                         const int* __restrict__ pair_tok, const float* __restrict__ pair_w,
                                         const unsigned* __restrict__ xs, const float* __restrict__ inv, float* __restrict__ y,
                                         int K, int tiles, int ldy, int cb = 1) {
    __shared__ int rows[GEMM_PAIRS];
    __shared__ const unsigned* rowp[GEMM_PAIRS];  // (WG: the chunk's split rows' addresses)
    int u = blockIdx.y;
    int pb = pair_off[u], pe = pair_off[u + 1];
    if (pb >= pe) return;  // an unused expert slot
    size_t e = (size_t)experts[u];
    const int tid = threadIdx.x;
    constexpr int BT = WG ? MOE_WG_TILES : GEMM_TILES;
    const int grp = WG ? blockIdx.x / cb : blockIdx.x;
    const int rt0 = grp * BT, bt = min(BT, tiles - rt0);  // the block's tiles
    // The slot's chunks: WG: nch of `size` pairs, this block's first and its stride.
    int size = GEMM_PAIRS, first = pb, stride = GEMM_PAIRS;
    if (WG) {
        const int nch = (pe - pb + GEMM_PAIRS - 1) / GEMM_PAIRS, c = blockIdx.x % cb;
        size = (pe - pb + nch - 1) / nch;
#ifndef MOE_WG_POW2_CHUNKS  // (measurement builds: the chunks and n-tile counts before 2026-11-26)
        size = (size + 3) & ~3;  // whole n-tiles: only the slot's last chunk has a partial one
#endif
        first = pb + c * size;
        stride = cb * size;
    }
    for (int p0 = first; p0 < pe; p0 += stride) {
        const int np = min(size, pe - p0);
        __syncthreads();  // the previous chunk is done with rows and the stages
        if (tid < np) rows[tid] = GATE_UP ? pair_tok[p0 + tid] : p0 + tid;
        __syncthreads();
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
        if (WG) {
            // Every n-tile count (wgmma takes N in steps of 8): a chunk computes at most 3
            // pairs it does not store, where counts of 1, 2, 4, 8 wasted ~20% of a 2048-token
            // prompt's MMAs and scaling (chunks of 17-24 pairs ran 32).
#define WG_CHUNK(NT) moe_gemm_chunk_wg<GATE_UP, NT>(W, e, rows, rowp, np, p0, pair_w, xs, inv, y, K, tiles, ldy, rt0, bt)
            int nt = (np + 3) / 4;
#ifdef MOE_WG_POW2_CHUNKS
            nt = nt <= 1 ? 1 : nt <= 2 ? 2 : nt <= 4 ? 4 : 8;
#endif
            switch (nt) {
                case 1: WG_CHUNK(1); break;
                case 2: WG_CHUNK(2); break;
                case 3: WG_CHUNK(3); break;
                case 4: WG_CHUNK(4); break;
                case 5: WG_CHUNK(5); break;
                case 6: WG_CHUNK(6); break;
                case 7: WG_CHUNK(7); break;
                default: WG_CHUNK(8); break;
            }
#undef WG_CHUNK
            continue;
        }
#endif
        if (np <= 4) moe_gemm_chunk<GATE_UP, 1>(W, e, rows, np, p0, pair_w, xs, inv, y, K, tiles, ldy, rt0, bt);
        else if (np <= 8) moe_gemm_chunk<GATE_UP, 2>(W, e, rows, np, p0, pair_w, xs, inv, y, K, tiles, ldy, rt0, bt);
        else if (np <= 16) moe_gemm_chunk<GATE_UP, 4>(W, e, rows, np, p0, pair_w, xs, inv, y, K, tiles, ldy, rt0, bt);
        else moe_gemm_chunk<GATE_UP, 8>(W, e, rows, np, p0, pair_w, xs, inv, y, K, tiles, ldy, rt0, bt);
    }
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 1) moe_gemm_gate_up(const unsigned char* __restrict__ W,
                                                                             const int* __restrict__ experts, const int* __restrict__ pair_off,
                                                                             const int* __restrict__ pair_tok, const unsigned* __restrict__ xs,
                                                                             const float* __restrict__ inv, float* __restrict__ h, int H, int I) {
    PDL_ENTER();
    moe_gemm<true>(W, experts, pair_off, pair_tok, nullptr, xs, inv, h, H, I / 8, I);
}

extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 1) moe_gemm_down(const unsigned char* __restrict__ W,
                                                                          const int* __restrict__ experts, const int* __restrict__ pair_off,
                                                                          const float* __restrict__ pair_w, const unsigned* __restrict__ hs,
                                                                          const float* __restrict__ inv, float* __restrict__ out, int H, int I) {
    PDL_ENTER();
    moe_gemm<false>(W, experts, pair_off, nullptr, pair_w, hs, inv, out, I, H / 16, H);
}

// The same two kernels on wgmma (moe_gemm_chunk_wg; the host runs them on sm_90a only: built for
// another GPU they would run the mma.sync chunks, on moe_split_rows' layout).
extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) moe_gemm_wg_gate_up(const unsigned char* __restrict__ W,
                                                                                const int* __restrict__ experts, const int* __restrict__ pair_off,
                                                                                const int* __restrict__ pair_tok, const unsigned* __restrict__ xs,
                                                                                const float* __restrict__ inv, float* __restrict__ h, int H, int I, int cb) {
    PDL_ENTER();
    moe_gemm<true, true>(W, experts, pair_off, pair_tok, nullptr, xs, inv, h, H, I / 8, I, cb);
}

extern "C" __global__ void __launch_bounds__(WG_THREADS, 1) moe_gemm_wg_down(const unsigned char* __restrict__ W,
                                                                             const int* __restrict__ experts, const int* __restrict__ pair_off,
                                                                             const float* __restrict__ pair_w, const unsigned* __restrict__ hs,
                                                                             const float* __restrict__ inv, float* __restrict__ out, int H, int I, int cb) {
    PDL_ENTER();
    moe_gemm<false, true>(W, experts, pair_off, nullptr, pair_w, hs, inv, out, I, H / 16, H, cb);
}
#endif  // MOE_IN_PART(0)
