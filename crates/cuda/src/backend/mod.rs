//! `CudaModel`: the whole MiMo-V2 / Llama-style forward on one GPU, implementing
//! `peregrine_core::Backend`. f32 activations; the operations of the CPU reference in its order,
//! with the residual add fused into the next RMSNorm and RoPE fused with the KV-cache write;
//! weights in their stored formats where a kernel exists for them (MXFP4, FP8 blocks, BF16), f32
//! otherwise. MXFP4 experts are stacked per layer and run by the grouped MoE kernels, with the
//! router and the token/expert grouping on the GPU, so a forward has no host round trip before
//! the logits. Weights come from a checkpoint or are synthetic (see `weights.rs`).
//!
//! This module holds the model (`CudaModel`: loading, switches, the forward's entry points and
//! `Backend`); its operations live by family in `layers` (the weights per layer), `dense`
//! (projections, norms, embedding, lm_head), `attention` and `moe`.

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, LaunchConfig};
use peregrine_core::backend::{split_logits, Backend, KeptRows, KvBlockBytes, KvConfig, LogitAdjust, Logits, MaskSource, TokenMask, RowLogprobs, RowSampling, SampledRows, SeqForward, NULL_BLOCK};
use peregrine_core::{AttentionKind, AttentionSpec, Error, KvDtype, MlpSpec, ModelSpec, MoeSpec, QkvLayout, Result, RouterScoring};
use peregrine_model::weights::WeightSource;

use crate::compile;
use crate::device::{nvrtc_arch, Gpu};
use crate::draft::Drafter;
use crate::kernels::{DeviceRouting, F16Split, Kernels, MoeInput, MoeKernel, MoeRouting, MoeSplit, MoeWeights, ROUTE_OPROJ_MAX_ROWS};
use crate::graph::Graphs;
use crate::kv_pool::KvPool;
use crate::weights::{Embed, Source, Synthetic};

mod attention;
mod dense;
mod layers;
mod moe;

pub(crate) use attention::*;
pub(crate) use dense::*;
pub(crate) use layers::*;
pub(crate) use moe::*;

/// Activations as their BF16 hi and lo parts (the BF16 tensor-core GEMV's input).
pub(crate) type Bf16Split = (CudaSlice<u16>, CudaSlice<u16>);

pub(crate) fn drv(e: cudarc::driver::DriverError) -> Error {
    Error::Backend(format!("CUDA: {e}"))
}

/// Default of `CudaModel::drain_after_mlp_rows`. Not at one row: the GEMVs after the MoE then
/// run in its shared-memory carveout, which costs them little when they stream one row (stop 33
/// measured the loss at 4 and 8 rows). H100, Flash-shaped step, batch-1 replay, two rounds each:
/// draining the next op 2.620-2.627 ms, the second (the pairs norm under PDL, the q/k/v
/// projection drained) 2.594-2.616, none 2.592 / 2.592 (against 2.594 / 2.603 in the same call);
/// at 2-8 rows the later drain was within noise or slower (batch 4 +0.2-0.3%)
/// (benches/results/2026-11-25-dynamic-moe-drain-later.md).
const DRAIN_AFTER_MLP_ROWS: usize = 2;
/// Default of `CudaModel::plain_from_rows`.
const PLAIN_FROM_ROWS: usize = 16;
/// Default of `CudaModel::plain_to_rows`: PDL again from 48 rows. On the H200 every launch
/// under PDL made a Flash-shaped step 99-152 us shorter at 48 rows and 43-80 us at 64 (in 8-10
/// of 10 rounds in each of four processes), MiMo-V2.5-Pro's even to 72 us shorter at 48 and
/// 32-68 us at 64, while at 16 and 32 rows PDL stays 81-732 us slower
/// (benches/results/2026-11-30-h200-pdl-from-48-rows.md).
const PLAIN_TO_ROWS: usize = 48;

/// Whether a decode step of `rows` rows launches without PDL: from `from` rows up to `to`
/// (exclusive), and past the largest graph bucket (`CudaModel::launches_plainly`).
fn launches_plainly(rows: usize, from: usize, to: usize) -> bool {
    let largest = crate::graph::ROW_BUCKETS[crate::graph::ROW_BUCKETS.len() - 1];
    rows >= from && (rows < to || rows > largest)
}

pub(crate) struct Ops {
    pub(crate) embed: CudaFunction,
    rms_norm: CudaFunction,
    add_bias: CudaFunction,
    add_inplace: CudaFunction,
    rope: CudaFunction,
    kv_write: CudaFunction,
    attention: CudaFunction,
    silu_mul: CudaFunction,
    pub(crate) gather_rows: CudaFunction,
    pub(crate) ring_gather: CudaFunction,
    scatter_add_scaled: CudaFunction,
    gemv_f32: CudaFunction,
    gemv_f32_tiles: CudaFunction,
    gemv_f32_norm: CudaFunction,
    pub(crate) copy_cols: CudaFunction,
    pub(crate) fill_rows: CudaFunction,
    pub(crate) scale: CudaFunction,
    pub(crate) draft_attention: CudaFunction,
    pub(crate) head_norm_rope: CudaFunction,
    pub(crate) draft_attention_rows: CudaFunction,
    embed_bf16: CudaFunction,
    add_rms_norm: CudaFunction,
    add_rms_norm_split: CudaFunction,
    rms_norm_split: CudaFunction,
    embed_rms_norm_split: CudaFunction,
    embed_rms_norm_split_bf16: CudaFunction,
    add_rms_norm_moe_split: CudaFunction,
    add_rms_norm_pairs: CudaFunction,
    add_rms_norm_split_pairs: CudaFunction,
    add_rms_norm_pairs_bf16: CudaFunction,
    add_pairs_inplace: CudaFunction,
    rope_kv_write: CudaFunction,
    moe_route: CudaFunction,
    /// `moe_route` over the sums of an o_proj that did the router (2+ tokens).
    moe_route_acc: CudaFunction,
    /// `moe_route` and `moe_route_acc` of a decode batch in one block (`CudaModel::route_one_block`).
    moe_route_block: CudaFunction,
    moe_route_acc_block: CudaFunction,
    /// The dynamic shared memory those two may take on this GPU (`moe::ROUTE_BLOCK_MAX_SMEM`
    /// where it allows that, else the 48 KB every GPU does).
    route_block_smem: usize,
    /// Whether `moe_route_acc_block` runs as a cluster of `moe::ROUTE_CLUSTER_MAX_TOKENS` blocks
    /// here (Hopper, asked of the occupancy API with the most shared memory such a launch takes).
    route_cluster_fits: bool,
    moe_group: CudaFunction,
    argmax_rows: CudaFunction,
    argmax_final: CudaFunction,
    argmax_unpack: CudaFunction,
    pub(crate) fetch_staged: CudaFunction,
    attention_v2: CudaFunction,
    attention_v2_kv: CudaFunction,
    attention_v2_kv_ready: CudaFunction,
    attention_v2_kv_ready_pre: CudaFunction,
    attention_v2_heads: CudaFunction,
    /// `attention_gqa_tc_d{hd}_v{vd}` and `attention_gqa_tc4_d{hd}_v{vd}` per
    /// `PREFILL_TC_SHAPES` entry, in `GQA_TC_WARPS` order (`CudaModel::gqa_tc_for`).
    attention_gqa_tc: Vec<[CudaFunction; 2]>,
    attention_combine: CudaFunction,
    pub(crate) attention_prefill: PrefillAttention,
    attention_v2_rows: CudaFunction,
    attention_combine_rows: CudaFunction,
    gemm_f32_nt: CudaFunction,
    pub(crate) place_drafts: CudaFunction,
    pub(crate) accept_drafts: CudaFunction,
    /// ops.cu's module (for `step_trace`).
    module: Arc<cudarc::driver::CudaModule>,
}

/// ops.cu's build for KV pools of `kv` (kernels/ops.cu's kv_t).
fn ops_variant(kv: KvDtype) -> &'static [&'static str] {
    match kv {
        KvDtype::F32 => &[],
        KvDtype::Bf16 => compile::OPS_KV_BF16,
        KvDtype::Fp8E4m3 => compile::OPS_KV_FP8,
    }
}

/// ops.cu's kernels for KV pools of type `kv` (its `kv_t`), compiled (or from the cache) and
/// loaded.
fn load_ops(gpu: &Gpu, kv: KvDtype) -> Result<Ops> {
    let (m, _) = compile::load_variant(&gpu.ctx, "ops", compile::OPS_CU, nvrtc_arch(gpu.capability), ops_variant(kv))?;
    let f = |n: &str| m.load_function(n).map_err(|e| Error::Backend(format!("kernel {n}: {e}")));
    Ok(Ops {
        embed: f("embed")?,
        rms_norm: f("rms_norm")?,
        add_bias: f("add_bias")?,
        add_inplace: f("add_inplace")?,
        rope: f("rope")?,
        kv_write: f("kv_write")?,
        attention: f("attention")?,
        silu_mul: f("silu_mul")?,
        gather_rows: f("gather_rows")?,
        ring_gather: f("ring_gather")?,
        scatter_add_scaled: f("scatter_add_scaled")?,
        gemv_f32: f("gemv_f32")?,
        gemv_f32_tiles: f("gemv_f32_tiles")?,
        gemv_f32_norm: f("gemv_f32_norm")?,
        copy_cols: f("copy_cols")?,
        fill_rows: f("fill_rows")?,
        scale: f("scale")?,
        draft_attention: f("draft_attention")?,
        head_norm_rope: f("head_norm_rope")?,
        draft_attention_rows: f("draft_attention_rows")?,
        embed_bf16: f("embed_bf16")?,
        add_rms_norm: f("add_rms_norm")?,
        add_rms_norm_split: f("add_rms_norm_split")?,
        rms_norm_split: f("rms_norm_split")?,
        embed_rms_norm_split: f("embed_rms_norm_split")?,
        embed_rms_norm_split_bf16: f("embed_rms_norm_split_bf16")?,
        add_rms_norm_moe_split: f("add_rms_norm_moe_split")?,
        add_rms_norm_pairs: f("add_rms_norm_pairs")?,
        add_rms_norm_split_pairs: f("add_rms_norm_split_pairs")?,
        add_rms_norm_pairs_bf16: f("add_rms_norm_pairs_bf16")?,
        add_pairs_inplace: f("add_pairs_inplace")?,
        rope_kv_write: f("rope_kv_write")?,
        moe_route: f("moe_route")?,
        moe_route_acc: f("moe_route_acc")?,
        moe_route_block: f("moe_route_block")?,
        moe_route_acc_block: f("moe_route_acc_block")?,
        route_block_smem: {
            // Where the GPU allows less, batches past 48 KB keep the multi-block kernels.
            let allows = |n: &str| f(n).is_ok_and(|k| k.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, moe::ROUTE_BLOCK_MAX_SMEM as i32).is_ok());
            if allows("moe_route_block") && allows("moe_route_acc_block") { moe::ROUTE_BLOCK_MAX_SMEM } else { 48 * 1024 }
        },
        route_cluster_fits: gpu.capability.0 >= 9 && {
            let t = moe::ROUTE_CLUSTER_MAX_TOKENS;
            let smem = moe::route_block_smem_bytes(moe::ROUTE_BLOCK_MAX_EXPERTS, moe::ROUTE_BLOCK_MAX_K, t);
            crate::launch::max_active_clusters(&gpu.stream, &f("moe_route_acc_block")?, t as u32, moe::ROUTE_ACC_THREADS as u32, smem as u32).is_some_and(|n| n >= 1)
        },
        moe_group: {
            let k = f("moe_group")?;
            // Up to 1024 experts: (2 E + 1024) ints and 32 E u16 of shared memory (76 KB).
            let _ = k.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 80 * 1024);
            k
        },
        argmax_rows: f("argmax_rows")?,
        argmax_final: f("argmax_final")?,
        argmax_unpack: f("argmax_unpack")?,
        fetch_staged: f("fetch_staged")?,
        attention_v2: f("attention_v2")?,
        attention_v2_kv: f("attention_v2_kv")?,
        attention_v2_kv_ready: f("attention_v2_kv_ready")?,
        attention_v2_kv_ready_pre: f("attention_v2_kv_ready_pre")?,
        attention_v2_heads: {
            // Best effort, as below: a GPU with less shared memory fails at launch.
            let k = f("attention_v2_heads")?;
            let _ = k.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, ATT_HEADS_MAX_SMEM as i32);
            k
        },
        attention_gqa_tc: PREFILL_TC_SHAPES
            .iter()
            .map(|&(hd, vd)| {
                let form = |warps: usize| {
                    // Best effort, as above.
                    let k = f(&format!("attention_gqa_tc{}_d{hd}_v{vd}", if warps == 8 { String::new() } else { warps.to_string() }))?;
                    let _ = k.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, gqa_tc_smem(hd, vd, warps) as i32);
                    Ok::<_, Error>(k)
                };
                Ok([form(GQA_TC_WARPS[0])?, form(GQA_TC_WARPS[1])?])
            })
            .collect::<Result<_>>()?,
        attention_combine: f("attention_combine")?,
        attention_prefill: {
            // Q, K, V and P tiles of up to 184 KB (f32, K head dim 256) and 199 KB (tensor
            // cores, K head dim 192). Best effort: a GPU with less shared memory fails at
            // launch instead.
            let with_smem = |name: &str, bytes: usize| -> Result<CudaFunction> {
                let k = f(name)?;
                let _ = k.set_attribute(cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32);
                Ok(k)
            };
            PrefillAttention {
                f32: with_smem("attention_prefill", prefill_attention_smem(256, 128))?,
                tc: PREFILL_TC_SHAPES.iter().map(|&(hd, vd)| with_smem(&format!("attention_prefill_tc_d{hd}_v{vd}"), prefill_attention_tc_smem(hd, vd))).collect::<Result<_>>()?,
                tensor_cores: std::env::var("PEREGRINE_PREFILL_ATTN").map_or(true, |v| v != "f32"),
            }
        },
        attention_v2_rows: f("attention_v2_rows")?,
        attention_combine_rows: f("attention_combine_rows")?,
        gemm_f32_nt: f("gemm_f32_nt")?,
        place_drafts: f("place_drafts")?,
        accept_drafts: f("accept_drafts")?,
        module: m.clone(),
    })
}

/// A second build of every kernel (`CudaModel::load_kernel_set`), for in-process A/Bs.
pub struct KernelSet {
    kernels: Kernels,
    ops: Ops,
}

pub struct CudaModel {
    pub(crate) spec: ModelSpec,
    gpu: Gpu,
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) kernels: Kernels,
    pub(crate) ops: Ops,
    pub(crate) embed: Embed,
    pub(crate) lm_head: Option<Mat>,
    pub(crate) final_norm: CudaSlice<f32>,
    pub(crate) layers: Vec<Layer>,
    /// Per layer: K and V pools [slots, kv_heads, dim], of type `kv_dtype`.
    kv: Vec<(KvPool, KvPool)>,
    /// The pools' element type (`Backend::set_kv_dtype`); `ops` is its build of ops.cu.
    kv_dtype: KvDtype,
    pub(crate) kv_config: Option<KvConfig>,
    pub(crate) drafter: Option<Drafter>,
    /// The drafter's context K/V per drafter layer, indexed like the full-attention group.
    pub(crate) draft_kv: Vec<(KvPool, KvPool)>,
    /// Decode steps stage the drafter's context features instead of writing its K/V
    /// (crate::draft_staging; `PEREGRINE_DRAFT_CONTEXT_DEFERRED=0`: every step writes them).
    pub(crate) draft_context_deferred: bool,
    /// Their rings, from `init_kv` when a drafter is attached and deferral is on.
    pub(crate) draft_staging: Option<crate::draft_staging::DraftStaging>,
    /// Captured decode-step graphs.
    pub(crate) graphs: Graphs,
    /// The MoE kernels' counters, shared by every layer (they are zero again after each call),
    /// sized for all expert slots at load so graphs keep a fixed address. Taken out while a
    /// layer runs.
    moe_counters: std::sync::Mutex<Option<CudaSlice<u32>>>,
    /// The routing kernel's arrival counter (zero between calls, it resets itself).
    route_counter: CudaSlice<u32>,
    /// Warps of each (row, head) block of the DFlash draft attention, splitting its keys
    /// (`PEREGRINE_DRAFT_ATTENTION_WARPS`, 1-16, default 16; 1: one warp walks every key).
    pub(crate) draft_attention_warps: usize,
    /// The draft attention runs a block per (sequence, head) over all its block rows where
    /// they fit (`draft_attention_rows`; `PEREGRINE_DRAFT_ATTENTION_ROWS=0`: a block per row).
    pub(crate) draft_attention_rows: bool,
    /// ... from this many (sequence, head) blocks (the SM count; tests pin 0).
    pub(crate) draft_rows_min_blocks: usize,
    /// Positions per split of decode attention (`PEREGRINE_ATTN_SPLIT`, default 512): ranges
    /// longer than twice this are split over several blocks per (row, head).
    attn_split: usize,
    /// Positions of the block tables per split of `attention_gqa_tc` (`PEREGRINE_ATTN_TC_SPLIT`,
    /// default `ATTN_TC_SPLIT`).
    attn_tc_split: usize,
    /// Blocks of each (row, KV head) of `attention_gqa_tc` sharing its merge
    /// (`PEREGRINE_ATTN_MERGE_SHARERS`, default `GT_MERGE_SHARERS`; 1: the last block alone).
    pub(crate) attn_merge_sharers: usize,
    /// Decode attention applies RoPE and writes the new K/V itself (`PEREGRINE_KV_IN_ATTENTION=0`
    /// keeps the separate `rope_kv_write` launch, for comparison).
    kv_in_attention: bool,
    /// The norm ahead of an MoE that reads its input split writes the split
    /// (`wants_moe_split`; `PEREGRINE_MOE_NORM_SPLIT=0` leaves it to the MoE's own launch, for
    /// comparison).
    moe_norm_split: bool,
    /// A layer's input norm with no residual add ahead (the first layer's) writes the F16 split
    /// its q/k/v GEMV reads (`rms_norm_split`), so that layer's projection feeds the ready
    /// attention as the others do (`PEREGRINE_NORM_SPLIT_FIRST=0`: `rms_norm`, the projection
    /// splitting x itself).
    pub(crate) norm_split_first: bool,
    /// Blocks of `attention_v2_kv` resident at once on the whole GPU (one wave).
    attention_kv_wave: usize,
    /// The same for `attention_v2_kv_ready_pre`, which runs in place of `attention_v2_kv_ready`
    /// where its grid fits, while `attention_ready_pre` (`PEREGRINE_ATTN_READY_PRE=0` turns it
    /// off, for measurements; tests set it).
    attention_ready_pre_wave: usize,
    attention_ready_pre: bool,
    /// The same for `attention_v2_kv_ready`. A ready attention (behind a projection counting
    /// its tiles) fills and must fit this wave, not `attention_v2_kv`'s, while
    /// `attn_ready_own_wave` (on by default; step-bench's `--ab ready-wave` turns it off): the
    /// two kernels hold different registers once the ready one's loop differs.
    attention_ready_wave: usize,
    attn_ready_own_wave: bool,
    /// A ready attention whose splits, filling `attention_v2_kv_ready`'s wave, would leave
    /// `attention_v2_kv_ready_pre`'s takes as many as fit the latter's instead, so that the
    /// preloading kernel runs (batch 2-3 of 64 heads; `attn_splits`). Off by default: since
    /// `attention_v2_kv_ready` preloads too, filling its wave is even at batch 2 and ~25 us a
    /// step faster at 3 on the H200 (benches/results/2026-11-29-h200-ready-attention-two-at-a-time.md);
    /// step-bench's `--ab pre-fill` turns it on, tests set it.
    attn_ready_pre_fill: bool,
    /// The o_proj after a ready attention zeroes its counters (`ReadyCounts::reset_by_next`);
    /// `PEREGRINE_ATTN_RESET_BY_NEXT=0` leaves it to the attention's last block, for
    /// measurements; tests set it.
    attn_reset_by_next: bool,
    /// The GPU's SMs.
    sm_count: usize,
    /// Decode rows from which attention without the K/V write inside runs one warp per head
    /// (`attention_v2_heads`, the heads of a KV head in one block) instead of a block per head
    /// (`PEREGRINE_ATTN_HEADS_MIN_ROWS`; tests set it to compare the two).
    pub(crate) attn_heads_min_rows: usize,
    /// At most this many splits of `attention_v2_heads`' position range (`usize::MAX`: as
    /// `attention_splits` fills the wave); step-bench's `--ab heads-splits:N` sets it.
    pub(crate) attn_heads_max_splits: usize,
    /// Decode attention without the K/V write inside runs the heads of each KV head on the
    /// tensor cores (`attention_gqa_tc`, shapes `gqa_tc_for` takes) from this many rows
    /// (`PEREGRINE_ATTN_TC_MIN_ROWS`) or from this many positions in the block tables
    /// (`PEREGRINE_ATTN_TC_MIN_SPAN`), whichever comes first; tests set them.
    pub(crate) attn_tc_min_rows: usize,
    pub(crate) attn_tc_min_span: usize,
    /// Warps per block of `attention_gqa_tc` (a `GQA_TC_WARPS` entry), where forced
    /// (`PEREGRINE_ATTN_TC_WARPS`; tests set it); None: the rule in `gqa_tc_for`.
    pub(crate) attn_tc_warps: Option<usize>,
    /// Arrival counters of split decode attention, one per (row, head) of up to
    /// `MERGE_IN_ATTENTION_ROWS` rows (zero between calls: the kernel resets them). With them
    /// the last split of each (row, head) merges the splits, and no `attention_combine` runs.
    pub(crate) attn_counters: CudaSlice<u32>,
    /// Split attention merges inside the kernel (`PEREGRINE_ATTN_MERGE_IN_KERNEL=0` launches
    /// `attention_combine`, for comparison; tests flip it to compare the two).
    pub(crate) merge_in_attention: bool,
    /// Decode attention with the K/V write inside starts each head as soon as the fused FP8
    /// q/k/v projection before it has written that head's rows (`Kernels::gemv_qkv_ready`,
    /// `attention_v2_kv_ready`) instead of after the whole projection
    /// (`PEREGRINE_QKV_READY=0` waits for the launch, for comparison; tests flip it).
    pub(crate) qkv_ready: bool,
    /// The projection's tile counts per q head and KV head, then the attention's blocks out
    /// (zero between calls: the attention's last block zeroes them).
    ready_counters: CudaSlice<u32>,
    /// Decode attention of few rows is split over more blocks to fill the GPU
    /// (`attn_splits`; `PEREGRINE_ATTN_FILL=0` turns it off, for comparison).
    attn_fill: bool,
    /// A one-token MoE on the fused kernel routes inside that kernel (`moe_mxfp4_routed`; no
    /// `moe_route` launch). `PEREGRINE_MOE_ROUTE_IN_KERNEL=0` keeps the routing launch, for
    /// comparison.
    route_in_moe: bool,
    /// Up to this many tokens `moe_route`'s last block groups the pairs (`moe::FUSED_GROUP_MAX_TOKENS`;
    /// `set_fused_group_max`, for measurements); above, `moe_group` is a launch of its own.
    fused_group_max: usize,
    /// Up to this many tokens (from 2) the routing launch is one block that routes every token
    /// and groups them (`route_one_block`; `moe::ROUTE_BLOCK_TOKENS`, `PEREGRINE_ROUTE_BLOCK_TOKENS`;
    /// 1: the multi-block kernels only).
    route_block_tokens: usize,
    /// Up to this many tokens (from `moe::ROUTE_CLUSTER_MIN_TOKENS`) the routing launch over the
    /// o_proj's sums is one cluster of a block per token on Hopper (`route_one_block`;
    /// `moe::ROUTE_CLUSTER_TOKENS`, `PEREGRINE_ROUTE_CLUSTER_TOKENS`; below 3: none).
    route_cluster_tokens: usize,
    /// A one-token MoE whose router computes the post-attention norm itself (`norm_in_router`;
    /// `PEREGRINE_NORM_IN_ROUTER=0` keeps the norm's launch, for comparison; tests flip it).
    norm_in_router: bool,
    /// Where the router computes the norm at one token, the o_proj before it does the router
    /// instead (`route_in_oproj_at`; `PEREGRINE_ROUTE_IN_OPROJ=0` keeps the router's launch, for
    /// comparison; tests flip it).
    route_in_oproj: bool,
    /// Up to this many decode rows (from 2) the o_proj does the router too where the MoE runs
    /// the two-launch digit kernels (`route_in_oproj_at`; `PEREGRINE_ROUTE_OPROJ_ROWS`, at most
    /// `ROUTE_OPROJ_MAX_ROWS`; 1: one token only).
    route_oproj_rows: usize,
    /// Per layer and token (up to `ROUTE_OPROJ_MAX_ROWS`), `route_acc_stride` u64: the
    /// fixed-point logit sums the o_proj adds into and its MoE reads, in `route_acc_copies`
    /// copies, then a flag word (zero between: one token's are zeroed by the next such layer's
    /// MoE, cyclically, more tokens' by their routing launch: `moe_route_acc`); then the o_proj
    /// blocks' sums of squares of h [T, H / 16] and the norm's weight times h [T, H] (one
    /// layer's at a time).
    route_acc: CudaSlice<u64>,
    /// The argmax keys a one-token lm_head folds its logits into (`gemv_bf16_presplit_argmax`);
    /// zero between steps (`argmax_unpack` zeroes them, a failed step too).
    pub(crate) argmax_key: CudaSlice<u64>,
    /// Whether a one-token BF16 lm_head over the final norm's split folds the argmax
    /// (`PEREGRINE_LM_HEAD_ARGMAX=0` keeps argmax_rows, for comparison).
    lm_head_argmax: bool,
    /// Benchmarks only (`shift_step_buffers`): memory held in the capture pool and the stream's
    /// pool so that graphs captured next place their buffers elsewhere.
    placement_hold: Option<(CudaSlice<u8>, CudaSlice<u8>)>,
    /// Whether a plan of every row's logits adds the last residual and norms it in one launch
    /// (`PEREGRINE_FINAL_NORM_FUSED=0` keeps the add and the norm apart, for comparison).
    pub(crate) final_norm_fused: bool,
    /// Whether decode graphs read their row data from mapped host memory and write their ids
    /// back there (crate::staged; `PEREGRINE_COPY_FREE_ROWS=0` copies each array before the
    /// graph and the ids after it, for comparison).
    pub(crate) copy_free_rows: bool,
    /// Whether a sampled decode step without logit adjustments samples inside its graph
    /// (`Op::Sample`; `PEREGRINE_GRAPH_SAMPLING=0` samples after the greedy graph, for
    /// comparison).
    pub(crate) graph_sampling: bool,
    /// Whether a plan starts with the embedding and the first input norm as one operation
    /// (`Op::EmbedNorm`; `PEREGRINE_EMBED_NORM_FUSED=0` keeps them two, for comparison).
    pub(crate) embed_norm_fused: bool,
    route_acc_copies: usize,
    route_acc_stride: usize,
    route_ssq: CudaSlice<f32>,
    route_hg: CudaSlice<f32>,
    /// f32 matrices (routers) over 2 to `F32_TILES_MAX_ROWS` - 1 rows run `gemv_f32_tiles`
    /// (`gemv_f32_into`; `PEREGRINE_F32_TILES=0` keeps gemv_f32 / gemm_f32_nt, for comparison;
    /// tests flip it).
    pub(crate) f32_tiles: bool,
    /// Whether the tiled MoE leaves its routed pairs for the norm after it to sum
    /// (`MlpOut::Pairs`): None where `kernels::moe_pairs_pay` says so, Some to force it (tests).
    moe_combine_in_norm: Option<bool>,
    /// MoE calls that left their pairs to the norm (tests check the path ran).
    moe_pairs_calls: std::sync::atomic::AtomicUsize,
    /// While `probe_routing` runs: each grouped routing's expert choices ([rows, top_k]),
    /// brought back after its launch (eager only: it synchronises the stream).
    pub(crate) routing_probe: std::sync::Mutex<Option<Vec<Vec<i32>>>>,
    /// Steps with prompt chunks launch with PDL too (`PEREGRINE_PREFILL_PDL=1`; by default they
    /// launch plainly, see `launch::PlainLaunches`).
    pub(crate) prefill_pdl: bool,
    /// From this many rows, the op after an MLP launches without PDL (crate::launch::plain_next);
    /// PEREGRINE_DRAIN_AFTER_MLP_ROWS sets it (measurements).
    pub(crate) drain_after_mlp_rows: usize,
    /// Which op after an MLP launches without PDL (1: the next); PEREGRINE_DRAIN_AFTER_MLP_OPS
    /// sets it (measurements).
    pub(crate) drain_after_mlp_op: usize,
    /// Whether that op drains the SMs even where the q/k/v projection after it is the ready
    /// kernel in one wave (`CudaModel::drains_after_mlp`); PEREGRINE_DRAIN_BEFORE_ONE_WAVE=1
    /// (measurements).
    pub(crate) drain_before_one_wave: bool,
    /// From this many rows a step launches without PDL at all; PEREGRINE_PLAIN_FROM_ROWS sets
    /// it (measurements).
    pub(crate) plain_from_rows: usize,
    /// ... up to this many rows (exclusive), and again past the largest graph bucket; between
    /// the two, PDL again. PEREGRINE_PLAIN_TO_ROWS sets it (measurements).
    pub(crate) plain_to_rows: usize,
    /// The fastest fused and the fastest tiled MoE kernel at one token as `tune_moe` timed them
    /// alone, until `init_kv` times batch-1 steps on each (`tune_one_token_step`).
    pub(crate) one_token_finalists: Option<(crate::MoeKernel, crate::MoeKernel)>,
    /// What that step timing measured: ms per batch-1 step on the fused and on the tiled
    /// finalist (medians of the rounds), and the kernel kept.
    pub(crate) one_token_step_ms: Option<(f32, f32, crate::MoeKernel)>,
}

pub(crate) fn upload<T: cudarc::driver::DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> Result<CudaSlice<T>> {
    s.clone_htod(v).map_err(drv)
}

/// Per-row data of one forward, on the GPU.
pub(crate) struct RowMeta {
    pub(crate) tok: CudaSlice<i32>,
    pub(crate) pos: CudaSlice<i32>,
    pub(crate) seq: CudaSlice<i32>,
    pub(crate) full_slots: CudaSlice<i64>,
    pub(crate) swa_slots: CudaSlice<i64>,
    pub(crate) full_tables: CudaSlice<i32>,
    pub(crate) swa_tables: CudaSlice<i32>,
    /// Graphs: where the device address of the ids that a chained step's negative `tok` entries
    /// index is written (see `embed_rows`). Eager steps never chain.
    pub(crate) chain: Option<CudaSlice<u64>>,
    /// Copy-free graphs: the slots in mapped host memory the graph's first kernel reads these
    /// arrays from (crate::staged).
    pub(crate) staged: Option<crate::staged::StagedRows>,
    /// Graphs that sample on the GPU (`Op::Sample`): each row's sampling parameters, written
    /// with the rest of the row data.
    pub(crate) sampling: Option<CudaSlice<crate::kernels::DeviceRowSampling>>,
    /// Steps that stage the drafter's context features: each row's ring row (HostRows::stage).
    pub(crate) stage: Option<CudaSlice<i32>>,
    pub(crate) max_blocks: usize,
    pub(crate) block_size: usize,
    /// A batch with prompt chunks: the rows attention takes in tiles (`attention_prefill`), and
    /// the rest (None for decode batches and graphs).
    pub(crate) prefill: Option<PrefillRows>,
}

/// A batch's rows as `attention_prefill` takes them: runs of at least `PREFILL_TILE_MIN` rows of
/// one sequence at consecutive positions, cut into tiles of up to `PREFILL_TILE` rows
/// ([first row, count] pairs), and the rows no tile covers (decode rows of other sequences),
/// which `attention_v2_rows` serves.
pub(crate) struct PrefillRows {
    pub(crate) tiles: CudaSlice<i32>,
    pub(crate) num_tiles: usize,
    pub(crate) rest: CudaSlice<i32>,
    pub(crate) num_rest: usize,
}

/// The rows of a batch and their paging metadata, on the host.
pub(crate) struct HostRows {
    pub(crate) toks: Vec<i32>,
    pub(crate) pos: Vec<i32>,
    pub(crate) seq: Vec<i32>,
    pub(crate) full_slots: Vec<i64>,
    pub(crate) swa_slots: Vec<i64>,
    /// Per sequence, `max_blocks` entries each.
    pub(crate) full_tables: Vec<i32>,
    pub(crate) swa_tables: Vec<i32>,
    pub(crate) max_blocks: usize,
    /// Rows whose logits are asked for, and how many belong to each sequence.
    pub(crate) want: Vec<usize>,
    pub(crate) counts: Vec<usize>,
    /// Every sequence brings exactly one new token (a decode step).
    pub(crate) one_per_seq: bool,
    /// A chained step (crate::overlap): the device address of the ids its negative `toks`
    /// entries index.
    pub(crate) chain: Option<u64>,
    /// A decode step that stages the drafter's context features: each row's ring row
    /// (crate::draft_staging; None: the step writes the context K/V itself).
    pub(crate) stage: Option<Vec<i32>>,
}

impl CudaModel {
    /// Uploads the weights. Running out of GPU memory is reported with the numbers.
    pub fn load(gpu: Gpu, spec: &ModelSpec, w: &dyn WeightSource) -> Result<CudaModel> {
        Self::build(gpu, spec, None, Some(w))
    }

    /// A model of `spec`'s shapes with random weights generated on the GPU, in the formats a
    /// checkpoint would hold (MXFP4 experts, FP8 block linear layers when the config quantises
    /// them, BF16 o_proj, embedding and lm_head, f32 routers): for benchmarks without checkpoints.
    /// Random routers spread tokens about uniformly over the experts.
    pub fn synthetic(gpu: Gpu, spec: &ModelSpec, seed: u64) -> Result<CudaModel> {
        Self::build(gpu, spec, Some(seed), None)
    }

    fn build(gpu: Gpu, spec: &ModelSpec, seed: Option<u64>, w: Option<&dyn WeightSource>) -> Result<CudaModel> {
        let (free0, total) = gpu.ctx.mem_get_info().map_err(drv)?;
        // A model that cannot fit is refused before anything is loaded (a checkpoint of hundreds
        // of GB would otherwise stream until the GPU runs out).
        let need = spec.min_device_weight_bytes();
        if need > free0 {
            return Err(Error::Backend(format!(
                "the weights of this {}-parameter model take at least {need} bytes ({:.1} GB) on the GPU, and GPU {} has {free0} of {total} bytes free: use a larger GPU or `--device cpu` (a load test can take fewer layers: --load-format dummy --hf-overrides '{{\"num_hidden_layers\": N}}'; tensor parallelism across GPUs is not built yet)",
                spec.num_parameters(),
                need as f64 / 1e9,
                gpu.ctx.ordinal()
            )));
        }
        Self::load_inner(gpu, spec, seed, w).map_err(|e| {
            if e.to_string().contains("OUT_OF_MEMORY") {
                Error::Backend(format!(
                    "the GPU ran out of memory while loading the weights of a {}-parameter model: {free0} of {total} bytes were free (run with `--device cpu`, or use a larger GPU)",
                    spec.num_parameters()
                ))
            } else {
                e
            }
        })
    }

    fn load_inner(gpu: Gpu, spec: &ModelSpec, seed: Option<u64>, files: Option<&dyn WeightSource>) -> Result<CudaModel> {
        let s = gpu.stream.clone();
        let kernels = Kernels::load(&gpu)?;
        let ops = load_ops(&gpu, KvDtype::F32)?;
        let m = ops.module.clone();
        let f = |n: &str| m.load_function(n).map_err(|e| Error::Backend(format!("kernel {n}: {e}")));
        let sms = gpu.ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(drv)? as usize;
        let [attention_kv_wave, attention_ready_pre_wave, attention_ready_wave] = attention_waves(&ops, sms)?;
        let synth = seed.map(|seed| -> Result<Synthetic> { Ok(Synthetic::new(f("fill_random_u8")?, f("fill_random_f")?, spec.quant.linear, seed)) }).transpose()?;
        let w = match (files, &synth) {
            (Some(w), _) => Source::Files(w),
            (None, Some(sy)) => Source::Synthetic(sy),
            (None, None) => return Err(Error::Backend("no weights".into())),
        };
        let h = spec.hidden_size;
        let mut layers = Vec::with_capacity(spec.layers.len());
        for (li, ls) in spec.layers.iter().enumerate() {
            let a = ls.attention;
            if a.v_head_dim > 128 {
                return Err(Error::Unsupported(format!("V head dim {} > 128 on the CUDA backend", a.v_head_dim)));
            }
            let p = format!("model.layers.{li}");
            let pa = format!("{p}.self_attn");
            let bias = if a.qkv_bias {
                Some((
                    w.vector(&s, &format!("{pa}.q_proj.bias"), a.q_dim())?,
                    w.vector(&s, &format!("{pa}.k_proj.bias"), a.k_dim())?,
                    w.vector(&s, &format!("{pa}.v_proj.bias"), a.v_dim())?,
                ))
            } else {
                None
            };
            let (q, k, v) = match (a.qkv_layout, &w) {
                (QkvLayout::FusedPerKvHead, Source::Files(fw)) => split_fused_qkv(&s, *fw, &pa, &a, h)?,
                _ => (
                    w.mat(&s, &format!("{pa}.q_proj.weight"), a.q_dim(), h)?,
                    w.mat(&s, &format!("{pa}.k_proj.weight"), a.k_dim(), h)?,
                    w.mat(&s, &format!("{pa}.v_proj.weight"), a.v_dim(), h)?,
                ),
            };
            let attn = Attn {
                spec: a,
                qkv: Qkv::stack(&s, q, k, v)?,
                bias,
                q_norm: if a.qk_norm { Some(w.vector(&s, &format!("{pa}.q_norm.weight"), a.head_dim)?) } else { None },
                k_norm: if a.qk_norm { Some(w.vector(&s, &format!("{pa}.k_norm.weight"), a.head_dim)?) } else { None },
                o: w.mat(&s, &format!("{pa}.o_proj.weight"), h, a.o_dim())?,
                sinks: if a.sinks { Some(w.vector(&s, &format!("{pa}.attention_sink_bias"), a.num_heads)?) } else { None },
            };
            let mlp = match ls.mlp {
                MlpSpec::Dense { intermediate_size } => Mlp::Dense(load_ffn(&s, &w, &format!("{p}.mlp"), h, intermediate_size)?),
                MlpSpec::Moe(ms) => {
                    // (The token grouping, moe_group, takes at most 1024 experts: a model with
                    // more would load and then fail every prompt of two tokens or more.)
                    if ms.n_group > 64 || ms.num_experts > 1024 || ms.top_k > 64 {
                        return Err(Error::Unsupported(format!("{} experts in {} groups, top-{}, on the CUDA backend (at most 1024, 64, 64)", ms.num_experts, ms.n_group, ms.top_k)));
                    }
                    let bias = if ms.correction_bias {
                        let name = format!("{p}.mlp.gate.e_score_correction_bias");
                        let host = match &w {
                            Source::Files(fw) => fw.vector(&name, ms.num_experts)?,
                            Source::Synthetic(_) => Vec::new(),
                        };
                        Some((w.vector(&s, &name, ms.num_experts)?, host))
                    } else {
                        None
                    };
                    let experts = match w.experts_mxfp4(&s, &format!("{p}.mlp.experts"), ms.num_experts, h, ms.intermediate_size)? {
                        Some(stacked) => Experts::Stacked(stacked),
                        None => Experts::PerExpert(
                            (0..ms.num_experts)
                                .map(|e| load_ffn(&s, &w, &format!("{p}.mlp.experts.{e}"), h, ms.intermediate_size))
                                .collect::<Result<_>>()?,
                        ),
                    };
                    Mlp::Moe { spec: ms, router: w.mat(&s, &format!("{p}.mlp.gate.weight"), ms.num_experts, h)?, bias, experts }
                }
            };
            layers.push(Layer {
                input_norm: w.vector(&s, &format!("{p}.input_layernorm.weight"), h)?,
                post_norm: w.vector(&s, &format!("{p}.post_attention_layernorm.weight"), h)?,
                attn,
                mlp,
                swa: matches!(a.kind, AttentionKind::Sliding { .. }),
            });
        }
        let embed = w.embed(&s, spec.vocab_size, h)?;
        let lm_head = if spec.tie_word_embeddings && !(matches!(w, Source::Files(_)) && w.contains("lm_head.weight")) {
            match &embed {
                // The tensor-core lm_head reads tiles (tc_tiles), the embedding lookup rows: a
                // tiled copy of the table for it.
                Embed::Bf16(t) if crate::tc_tiles::tiled(h) => {
                    let rows = s.clone_dtoh(t).map_err(drv)?;
                    Some(Mat { m: GpuMatrix::Bf16(upload(&s, &crate::tc_tiles::tile(&rows, spec.vocab_size, h))?), n: spec.vocab_size, k: h })
                }
                _ => None,
            }
        } else {
            Some(w.mat(&s, "lm_head.weight", spec.vocab_size, h)?)
        };
        let final_norm = w.vector(&s, "model.norm.weight", h)?;
        s.synchronize().map_err(drv)?;
        // A step can be captured when nothing in it needs the host.
        let capturable = layers.iter().all(|l| !matches!(l.mlp, Mlp::Moe { experts: Experts::PerExpert(_), .. }));
        let counters = layers
            .iter()
            .filter_map(|l| match &l.mlp {
                Mlp::Moe { experts: Experts::Stacked(w), .. } => Some(Kernels::moe_counters(w, usize::MAX)),
                _ => None,
            })
            .max();
        let moe_counters = counters.map(|n| s.alloc_zeros::<u32>(n)).transpose().map_err(drv)?;
        let route_counter = s.alloc_zeros::<u32>(1).map_err(drv)?;
        let max_heads = spec.layers.iter().map(|l| l.attention.num_heads).max().unwrap_or(1);
        let attn_counters = s.alloc_zeros::<u32>(MERGE_IN_ATTENTION_ROWS * max_heads.max(64)).map_err(drv)?;
        let ready_len = spec.layers.iter().map(|l| l.attention.num_heads + l.attention.num_kv_heads + 1).max().unwrap_or(1);
        let ready_counters = s.alloc_zeros::<u32>(ready_len).map_err(drv)?;
        // Copies of the router's sums the o_proj spreads its adds over (PEREGRINE_ROUTE_ACC_COPIES).
        let route_acc_copies = std::env::var("PEREGRINE_ROUTE_ACC_COPIES").ok().and_then(|v| v.parse().ok()).filter(|&c: &usize| (1..=64).contains(&c)).unwrap_or(ROUTE_ACC_COPIES);
        // (Even, so every token's sums start on 16 bytes: the one-block routing reads them 16 bytes a load.)
        let route_acc_stride = layers.iter().filter_map(|l| if let Mlp::Moe { spec, .. } = &l.mlp { Some((route_acc_copies * spec.num_experts + 1).next_multiple_of(2)) } else { None }).max().unwrap_or(2);
        let route_acc = s.alloc_zeros::<u64>(layers.len().max(1) * ROUTE_OPROJ_MAX_ROWS * route_acc_stride).map_err(drv)?;
        let argmax_key = s.alloc_zeros::<u64>(crate::kernels::ARGMAX_KEY_SLOTS * crate::kernels::ARGMAX_KEY_STRIDE).map_err(drv)?;
        let route_ssq = s.alloc_zeros::<f32>(ROUTE_OPROJ_MAX_ROWS * h.div_ceil(16)).map_err(drv)?;
        let route_hg = s.alloc_zeros::<f32>(ROUTE_OPROJ_MAX_ROWS * h).map_err(drv)?;
        let mut model = CudaModel {
            spec: spec.clone(),
            final_norm,
            stream: s,
            gpu,
            kernels,
            ops,
            embed,
            lm_head,
            layers,
            kv: Vec::new(),
            kv_dtype: KvDtype::F32,
            kv_config: None,
            drafter: None,
            draft_kv: Vec::new(),
            draft_context_deferred: std::env::var("PEREGRINE_DRAFT_CONTEXT_DEFERRED").map_or(true, |v| v != "0"),
            draft_staging: None,
            graphs: Graphs::new(capturable, spec.vocab_size),
            moe_counters: std::sync::Mutex::new(moe_counters),
            route_counter,
            draft_attention_rows: std::env::var("PEREGRINE_DRAFT_ATTENTION_ROWS").map_or(true, |v| v != "0"),
            draft_rows_min_blocks: sms,
            draft_attention_warps: std::env::var("PEREGRINE_DRAFT_ATTENTION_WARPS").ok().and_then(|v| v.parse().ok()).filter(|&v: &usize| (1..=16).contains(&v)).unwrap_or(16),
            attn_split: std::env::var("PEREGRINE_ATTN_SPLIT").ok().and_then(|v| v.parse().ok()).filter(|&v: &usize| v >= 32).unwrap_or(512),
            attn_tc_split: std::env::var("PEREGRINE_ATTN_TC_SPLIT").ok().and_then(|v| v.parse().ok()).filter(|&v: &usize| v >= 32).unwrap_or(ATTN_TC_SPLIT),
            attn_merge_sharers: std::env::var("PEREGRINE_ATTN_MERGE_SHARERS").ok().and_then(|v| v.parse().ok()).filter(|&v: &usize| v >= 1).unwrap_or(GT_MERGE_SHARERS),
            kv_in_attention: std::env::var("PEREGRINE_KV_IN_ATTENTION").map_or(true, |v| v != "0"),
            moe_norm_split: std::env::var("PEREGRINE_MOE_NORM_SPLIT").map_or(true, |v| v != "0"),
            norm_split_first: std::env::var("PEREGRINE_NORM_SPLIT_FIRST").map_or(true, |v| v != "0"),
            attention_kv_wave,
            attention_ready_pre_wave,
            attention_ready_wave,
            attn_ready_own_wave: true,
            attention_ready_pre: std::env::var("PEREGRINE_ATTN_READY_PRE").map_or(true, |v| v != "0"),
            attn_ready_pre_fill: false,
            attn_reset_by_next: std::env::var("PEREGRINE_ATTN_RESET_BY_NEXT").map_or(true, |v| v != "0"),
            sm_count: sms,
            attn_heads_min_rows: std::env::var("PEREGRINE_ATTN_HEADS_MIN_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(ATTN_HEADS_MIN_ROWS),
            attn_heads_max_splits: usize::MAX,
            attn_tc_min_rows: std::env::var("PEREGRINE_ATTN_TC_MIN_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(ATTN_TC_MIN_ROWS),
            attn_tc_min_span: std::env::var("PEREGRINE_ATTN_TC_MIN_SPAN").ok().and_then(|v| v.parse().ok()).unwrap_or(ATTN_TC_MIN_SPAN),
            attn_tc_warps: std::env::var("PEREGRINE_ATTN_TC_WARPS").ok().and_then(|v| v.parse().ok()).filter(|w| GQA_TC_WARPS.contains(w)),
            attn_counters,
            merge_in_attention: std::env::var("PEREGRINE_ATTN_MERGE_IN_KERNEL").map_or(true, |v| v != "0"),
            qkv_ready: std::env::var("PEREGRINE_QKV_READY").map_or(true, |v| v != "0"),
            ready_counters,
            attn_fill: std::env::var("PEREGRINE_ATTN_FILL").map_or(true, |v| v != "0"),
            route_in_moe: std::env::var("PEREGRINE_MOE_ROUTE_IN_KERNEL").map_or(true, |v| v != "0"),
            fused_group_max: moe::FUSED_GROUP_MAX_TOKENS,
            route_block_tokens: std::env::var("PEREGRINE_ROUTE_BLOCK_TOKENS").ok().and_then(|v| v.parse().ok()).map_or(moe::ROUTE_BLOCK_TOKENS, |t: usize| t.clamp(1, moe::ROUTE_BLOCK_MAX_TOKENS)),
            route_cluster_tokens: std::env::var("PEREGRINE_ROUTE_CLUSTER_TOKENS").ok().and_then(|v| v.parse().ok()).map_or(moe::ROUTE_CLUSTER_TOKENS, |t: usize| t.clamp(1, moe::ROUTE_CLUSTER_MAX_TOKENS)),
            route_oproj_rows: std::env::var("PEREGRINE_ROUTE_OPROJ_ROWS").ok().and_then(|v| v.parse().ok()).map_or(moe::ROUTE_OPROJ_ROWS, |r: usize| r.clamp(1, ROUTE_OPROJ_MAX_ROWS)),
            norm_in_router: std::env::var("PEREGRINE_NORM_IN_ROUTER").map_or(true, |v| v != "0"),
            route_in_oproj: std::env::var("PEREGRINE_ROUTE_IN_OPROJ").map_or(true, |v| v != "0"),
            route_acc,
            argmax_key,
            lm_head_argmax: std::env::var("PEREGRINE_LM_HEAD_ARGMAX").map_or(true, |v| v != "0"),
            placement_hold: None,
            final_norm_fused: std::env::var("PEREGRINE_FINAL_NORM_FUSED").map_or(true, |v| v != "0"),
            copy_free_rows: std::env::var("PEREGRINE_COPY_FREE_ROWS").map_or(true, |v| v != "0"),
            graph_sampling: std::env::var("PEREGRINE_GRAPH_SAMPLING").map_or(true, |v| v != "0"),
            embed_norm_fused: std::env::var("PEREGRINE_EMBED_NORM_FUSED").map_or(true, |v| v != "0"),
            route_acc_copies,
            route_acc_stride,
            route_ssq,
            route_hg,
            f32_tiles: std::env::var("PEREGRINE_F32_TILES").map_or(true, |v| v != "0"),
            moe_combine_in_norm: None,
            moe_pairs_calls: std::sync::atomic::AtomicUsize::new(0),
            routing_probe: std::sync::Mutex::new(None),
            prefill_pdl: std::env::var("PEREGRINE_PREFILL_PDL").is_ok_and(|v| v == "1"),
            drain_after_mlp_rows: std::env::var("PEREGRINE_DRAIN_AFTER_MLP_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(DRAIN_AFTER_MLP_ROWS),
            drain_after_mlp_op: std::env::var("PEREGRINE_DRAIN_AFTER_MLP_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(1),
            drain_before_one_wave: std::env::var("PEREGRINE_DRAIN_BEFORE_ONE_WAVE").is_ok_and(|v| v != "0"),
            plain_from_rows: std::env::var("PEREGRINE_PLAIN_FROM_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(PLAIN_FROM_ROWS),
            plain_to_rows: std::env::var("PEREGRINE_PLAIN_TO_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(PLAIN_TO_ROWS),
            one_token_finalists: None,
            one_token_step_ms: None,
        };
        // The MoE decode kernel per token count, measured on the first MoE layer's experts
        // (every MoE layer of a model has the same shapes).
        let mut finalists = None;
        if let Some((w, top_k)) = model.first_moe() {
            let t0 = std::time::Instant::now();
            let timings = model.kernels.tune_moe(w, top_k)?;
            if !timings.is_empty() {
                let chosen: Vec<String> = model.moe_kernel_choices().iter().map(|(t, k)| format!("{t}: {k:?}")).collect();
                tracing::info!("MoE kernels tuned in {:.2} s: {}", t0.elapsed().as_secs_f64(), chosen.join(", "));
            }
            finalists = crate::moe_tune::one_token_finalists(&timings);
        }
        model.one_token_finalists = finalists;
        Ok(model)
    }

    /// The first layer with stacked (GPU-routed) experts: its weights and top-k.
    pub(crate) fn first_moe(&self) -> Option<(&MoeWeights, usize)> {
        self.layers.iter().find_map(|l| match &l.mlp {
            Mlp::Moe { spec, experts: Experts::Stacked(w), .. } => Some((w, spec.top_k)),
            _ => None,
        })
    }

    /// For benchmarks: every kernel loaded again (compiled, unless the kernel cache has it) under
    /// `defines` (measurement defines, as `PEREGRINE_KERNEL_DEFINES` gives them; None: the
    /// defines the model was loaded with), with this model's MoE tuning and capture pool, for
    /// `swap_kernel_set`. Settings derived from ops.cu's occupancy at load stay the model's.
    /// Where a load's code lies moves a step's time by up to ~1%
    /// (benches/results/2026-11-28-kernel-code-placement.md).
    pub fn load_kernel_set(&self, defines: Option<&str>) -> Result<KernelSet> {
        let load = || -> Result<_> { Ok((Kernels::load(&self.gpu)?, load_ops(&self.gpu, self.kv_dtype)?)) };
        let (mut kernels, ops) = match defines {
            Some(d) => compile::with_defines(d, load)?,
            None => load()?,
        };
        let choices = self.kernels.moe_choices.lock().unwrap_or_else(|e| e.into_inner()).clone();
        *kernels.moe_choices.lock().unwrap_or_else(|e| e.into_inner()) = choices;
        let verify = self.kernels.moe_verify_choices.lock().unwrap_or_else(|e| e.into_inner()).clone();
        *kernels.moe_verify_choices.lock().unwrap_or_else(|e| e.into_inner()) = verify;
        kernels.alloc = self.kernels.alloc.clone();
        Ok(KernelSet { kernels, ops })
    }

    /// Exchanges the model's kernels with `set`'s (`load_kernel_set`); captured step graphs are
    /// dropped.
    pub fn swap_kernel_set(&mut self, set: &mut KernelSet) {
        std::mem::swap(&mut self.kernels, &mut set.kernels);
        std::mem::swap(&mut self.ops, &mut set.ops);
        self.graphs.clear();
    }

    /// Random-weight generation for `attach_synthetic_drafter`.
    pub(crate) fn synthetic_source(&self, seed: u64) -> Result<Synthetic> {
        let (m, _) = compile::load(&self.gpu.ctx, "ops", compile::OPS_CU, nvrtc_arch(self.gpu.capability))?;
        let f = |n: &str| m.load_function(n).map_err(|e| Error::Backend(format!("kernel {n}: {e}")));
        Ok(Synthetic::new(f("fill_random_u8")?, f("fill_random_f")?, self.spec.quant.linear, seed))
    }

    /// Overwrites every K/V pool of the target model with values uniform in [-1, 1), for
    /// benchmarks of long contexts: the attention's time depends on the bytes it reads, not on
    /// their values, and a prefill of 32k tokens per sequence would cost minutes.
    pub fn fill_kv_random(&mut self, seed: u64) -> Result<()> {
        let synth = self.synthetic_source(seed)?;
        let st = self.gpu.stream.clone();
        for (k, v) in &mut self.kv {
            for pool in [k, v] {
                match pool {
                    KvPool::F32(p) => synth.fill_floats(&st, p, 1.0, 0.0)?,
                    KvPool::Bf16(p) => synth.fill_bf16(&st, p, 1.0, 0.0)?,
                    KvPool::Fp8(p) => synth.fill_fp8(&st, p)?,
                }
            }
        }
        st.synchronize().map_err(drv)
    }

    /// The fused MoE kernel's stamps from its last call (`Kernels::moe_trace`), then zeroed: only
    /// in a measurement build (`-DMOE_TRACE`), else None.
    pub fn moe_trace(&self) -> Result<Option<Vec<u64>>> {
        self.kernels.moe_trace()
    }

    /// Every kernel block's step-trace stamps since the last call, then cleared: only in a
    /// measurement build of the kernels (`PEREGRINE_KERNEL_DEFINES=-DSTEP_TRACE`), else None.
    pub fn step_trace(&self) -> Result<Option<crate::trace::StepTrace>> {
        self.kernels.step_trace(&[&self.ops.module])
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// What `init_kv` measured choosing the one-token MoE kernel as a step (`tune_one_token_step`):
    /// ms per batch-1 step with the fused and with the tiled finalist, and the kernel kept; None
    /// where it did not run (no MoE, one family only, graphs off, `PEREGRINE_MOE_STEP_TUNE=0`).
    pub fn one_token_step_ms(&self) -> Option<(f32, f32, crate::MoeKernel)> {
        self.one_token_step_ms
    }

    /// The MoE decode kernel chosen per token count (`Kernels::tuned_counts`) for this
    /// model's experts, as `tune_moe` measured at load; empty when nothing was tuned.
    pub fn moe_kernel_choices(&self) -> Vec<(usize, crate::MoeKernel)> {
        let Some((w, top_k)) = self.first_moe() else { return Vec::new() };
        self.kernels.tuned_counts().into_iter().filter_map(|t| self.kernels.tuned_moe(w, top_k, t).map(|k| (t, k))).collect()
    }

    /// For benchmarks: holds `bytes` of the capture pool and of the stream's pool (0: none), so
    /// that the graphs captured next place their buffers at other addresses (the same kernels);
    /// drops the captured graphs.
    pub fn shift_step_buffers(&mut self, bytes: usize) -> Result<()> {
        self.placement_hold = None;
        self.graphs.clear();
        if bytes > 0 {
            let alloc = &self.kernels.alloc;
            alloc.prepare()?;
            // SAFETY: held, never read or written.
            let pool = alloc.while_capturing(|| unsafe { alloc.alloc::<u8>(bytes) })?;
            let stream = unsafe { self.stream.alloc::<u8>(bytes) }.map_err(drv)?;
            self.placement_hold = Some((pool, stream));
        }
        Ok(())
    }

    /// Sets whether the step's tail is fused (`final_norm_fused` and `lm_head_argmax`, both on
    /// by default), for benchmarks comparing the two. Captured step graphs are dropped.
    pub fn set_step_tail_fused(&mut self, on: bool) {
        self.final_norm_fused = on;
        self.lm_head_argmax = on;
        self.graphs.clear();
    }

    /// Sets whether a plan starts with `Op::EmbedNorm` (`embed_norm_fused`, on by default), for
    /// benchmarks and tests comparing the two. Captured step graphs are dropped.
    pub fn set_embed_norm_fused(&mut self, on: bool) {
        self.embed_norm_fused = on;
        self.graphs.clear();
    }

    /// Up to how many decode rows the o_proj does the router (`route_oproj_rows`).
    pub fn route_oproj_rows(&self) -> usize {
        self.route_oproj_rows
    }

    /// Sets up to how many decode rows the o_proj does the router (`route_oproj_rows`; 1: one
    /// token only), for measurements and tests comparing the two; returns the setting before.
    /// Captured step graphs are dropped.
    pub fn set_route_oproj_rows(&mut self, rows: usize) -> usize {
        self.graphs.clear();
        std::mem::replace(&mut self.route_oproj_rows, rows.clamp(1, ROUTE_OPROJ_MAX_ROWS))
    }

    /// Sets up to how many tokens the routing launch's last block groups the pairs
    /// (`fused_group_max`), for measurements. Captured step graphs are dropped.
    pub fn set_fused_group_max(&mut self, tokens: usize) {
        self.fused_group_max = tokens;
        self.graphs.clear();
    }

    /// Sets the decode rows from which `attention_gqa_tc` serves decode attention
    /// (`attn_tc_min_rows`, `PEREGRINE_ATTN_TC_MIN_ROWS`), for measurements. Captured step
    /// graphs are dropped.
    pub fn set_attn_tc_min_rows(&mut self, rows: usize) {
        self.attn_tc_min_rows = rows;
        self.graphs.clear();
    }

    /// Sets the decode rows from which a step launches without PDL at all (`plain_from_rows`,
    /// `PEREGRINE_PLAIN_FROM_ROWS`), for measurements. Captured step graphs are dropped.
    pub fn set_plain_from_rows(&mut self, rows: usize) {
        self.plain_from_rows = rows;
        self.graphs.clear();
    }

    /// The decode rows from which a step launches without PDL at all.
    pub fn plain_from_rows(&self) -> usize {
        self.plain_from_rows
    }

    /// Sets the decode rows up to which (exclusive) a step from `plain_from_rows` rows
    /// launches without PDL (`plain_to_rows`, `PEREGRINE_PLAIN_TO_ROWS`), for measurements.
    /// Captured step graphs are dropped.
    pub fn set_plain_to_rows(&mut self, rows: usize) {
        self.plain_to_rows = rows;
        self.graphs.clear();
    }

    /// The decode rows up to which (exclusive) a step launches without PDL.
    pub fn plain_to_rows(&self) -> usize {
        self.plain_to_rows
    }

    /// Whether a step of `rows` rows launches without PDL at all: from `plain_from_rows` up to
    /// `plain_to_rows`, and past the largest graph bucket (rows PDL was not measured at).
    pub(crate) fn launches_plainly(&self, rows: usize) -> bool {
        launches_plainly(rows, self.plain_from_rows, self.plain_to_rows)
    }

    /// Sets the rows from which the op after each MLP launches on drained SMs
    /// (`drain_after_mlp_rows`, `PEREGRINE_DRAIN_AFTER_MLP_ROWS`), for measurements. Captured
    /// step graphs are dropped.
    pub fn set_drain_after_mlp_rows(&mut self, rows: usize) {
        self.drain_after_mlp_rows = rows;
        self.graphs.clear();
    }

    /// The rows from which the op after each MLP launches on drained SMs.
    pub fn drain_after_mlp_rows(&self) -> usize {
        self.drain_after_mlp_rows
    }

    /// Sets whether the op after an MLP drains the SMs before a one-wave ready q/k/v projection
    /// too (`drain_before_one_wave`, `PEREGRINE_DRAIN_BEFORE_ONE_WAVE`), for measurements.
    /// Captured step graphs are dropped.
    pub fn set_drain_before_one_wave(&mut self, on: bool) {
        self.drain_before_one_wave = on;
        self.graphs.clear();
    }

    /// Whether the op after an MLP drains the SMs before a one-wave ready q/k/v projection too.
    pub fn drain_before_one_wave(&self) -> bool {
        self.drain_before_one_wave
    }

    /// Whether `op`, the `drain_after_mlp_op`-th after an MLP, launches on drained SMs: from
    /// `drain_after_mlp_rows` rows, unless it is the input norm of a layer whose q/k/v
    /// projection runs the ready kernel in one wave (`qkv_ready_one_wave`; likely, not traced,
    /// one wave has no second for the MoE's carveout to slow). Without the drain there, Flash's
    /// 2 / 4 / 8-row steps ran 5-8 us shorter (H200; 3-11 us at 2 / 4 in four earlier
    /// processes), while MiMo-V2.5-Pro's two-wave projections at 2 / 8 rows ran 12-58 us longer
    /// without it (benches/results/2026-11-30-h200-drain-before-two-waves.md).
    pub(crate) fn drains_after_mlp(&self, op: &crate::step::Op) -> bool {
        if op.rows() < self.drain_after_mlp_rows {
            return false;
        }
        match *op {
            crate::step::Op::AddNorm { weight: crate::step::NormWeight::Input(l), rows, .. } if !self.drain_before_one_wave => !self.qkv_ready_one_wave(l, rows),
            _ => true,
        }
    }

    /// Layers whose input norm after the MLP ahead launches on drained SMs at `rows` decode
    /// rows (`drains_after_mlp`); for tests.
    pub fn drained_after_mlp_layers(&self, rows: usize) -> usize {
        (1..self.layers.len()).filter(|&l| self.drains_after_mlp(&crate::step::Op::AddNorm { add: crate::step::Act::MlpOut, dst: crate::step::Act::AttnIn, weight: crate::step::NormWeight::Input(l), rows })).count()
    }

    /// Sets whether a ready attention splits to fit `attention_v2_kv_ready_pre`'s wave where
    /// that lets the preloading kernel run (`attn_ready_pre_fill`; off by default), for
    /// measurements and tests. Captured step graphs are dropped.
    pub fn set_attn_ready_pre_fill(&mut self, on: bool) {
        self.attn_ready_pre_fill = on;
        self.graphs.clear();
    }

    /// Sets whether a ready attention fills and must fit `attention_v2_kv_ready`'s own wave
    /// (`attn_ready_own_wave`; on by default) or `attention_v2_kv`'s, for measurements. Captured
    /// step graphs are dropped.
    pub fn set_attn_ready_own_wave(&mut self, on: bool) {
        self.attn_ready_own_wave = on;
        self.graphs.clear();
    }

    /// Whether a ready attention fills and must fit its own kernel's wave (`attn_ready_own_wave`).
    pub fn attn_ready_own_wave(&self) -> bool {
        self.attn_ready_own_wave
    }

    /// Whether a ready attention splits to fit the preloading kernel's wave where that lets it
    /// run (`attn_ready_pre_fill`).
    pub fn attn_ready_pre_fill(&self) -> bool {
        self.attn_ready_pre_fill
    }

    /// Caps the splits of `attention_v2_heads`' position range, for measurements (usize::MAX:
    /// the default rule). Captured step graphs are dropped.
    pub fn set_attn_heads_max_splits(&mut self, splits: usize) {
        self.attn_heads_max_splits = splits.max(1);
        self.graphs.clear();
    }

    /// The decode rows from which `attention_gqa_tc` serves decode attention.
    pub fn attn_tc_min_rows(&self) -> usize {
        self.attn_tc_min_rows
    }

    /// Sets up to how many tokens the routing launch is one block (`route_block_tokens`; 1: the
    /// multi-block kernels only), for measurements and tests comparing the two; returns the
    /// setting before. Captured step graphs are dropped.
    pub fn set_route_block_tokens(&mut self, tokens: usize) -> usize {
        self.graphs.clear();
        std::mem::replace(&mut self.route_block_tokens, tokens.clamp(1, moe::ROUTE_BLOCK_MAX_TOKENS))
    }

    /// Up to how many tokens the routing launch is one block (`route_block_tokens`).
    pub fn route_block_tokens(&self) -> usize {
        self.route_block_tokens
    }

    /// Sets up to how many tokens the routing launch over the o_proj's sums is a cluster of a
    /// block per token (`route_cluster_tokens`; below 3: none, `route_block_tokens` decides), for
    /// measurements and tests; returns the setting before. Captured step graphs are dropped.
    pub fn set_route_cluster_tokens(&mut self, tokens: usize) -> usize {
        self.graphs.clear();
        std::mem::replace(&mut self.route_cluster_tokens, tokens.clamp(1, moe::ROUTE_CLUSTER_MAX_TOKENS))
    }

    /// Up to how many tokens the routing over the o_proj's sums is a cluster (`route_cluster_tokens`).
    pub fn route_cluster_tokens(&self) -> usize {
        self.route_cluster_tokens
    }

    /// Up to how many tokens the routing launch's last block groups the pairs.
    pub fn fused_group_max(&self) -> usize {
        self.fused_group_max
    }

    /// Sets whether the one-token lm_head prefetches its first K blocks into L2 before its wait
    /// (`Kernels::set_lm_head_prefetch`; off by default), for measurements. Captured step graphs are dropped.
    pub fn set_lm_head_prefetch(&mut self, on: bool) {
        self.kernels.set_lm_head_prefetch(on);
        self.graphs.clear();
    }

    /// Sets whether decode graphs are copy-free (`copy_free_rows`, on by default), for
    /// benchmarks and tests comparing the two. Captured step graphs are dropped.
    pub fn set_copy_free_rows(&mut self, on: bool) {
        self.copy_free_rows = on;
        self.graphs.clear();
    }

    /// Sets whether sampled decode steps sample inside their graph (`graph_sampling`, on by
    /// default), for benchmarks and tests comparing the two. Captured step graphs are dropped.
    pub fn set_graph_sampling(&mut self, on: bool) {
        self.graph_sampling = on;
        self.graphs.clear();
    }

    /// The row data of slot `slot` of `s` (mapped host memory; a graph's node is pointed at each
    /// launch's own slot later) copied into the buffers its layout names, and its ids word
    /// pointed at the slot's ids (`fetch_staged`): a copy-free graph's first kernel.
    pub(crate) fn fetch_staged(&self, s: &crate::staged::StagedRows, slot: usize) -> Result<()> {
        let mut b = crate::launch::builder(&self.stream, &self.ops.fetch_staged);
        b.arg(&s.src(slot)).arg_struct(&s.layout).arg(&s.ids_host);
        unsafe { b.launch(LaunchConfig { grid_dim: (4, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    /// Sets whether a one-token lm_head folds the argmax (`lm_head_argmax`, on by default), for
    /// benchmarks. Captured step graphs are dropped.
    pub fn set_lm_head_argmax(&mut self, on: bool) {
        self.lm_head_argmax = on;
        self.graphs.clear();
    }

    /// Sets whether the one-token o_proj does its MoE's router (`route_in_oproj`; on by
    /// default), for tests comparing the two. Captured step graphs are dropped.
    pub fn set_route_in_oproj(&mut self, on: bool) {
        self.route_in_oproj = on;
        self.graphs.clear();
    }

    /// How many layers leave their post-attention norm to the router at `rows` rows.
    pub fn norm_in_router_layers(&self, rows: usize) -> usize {
        (0..self.layers.len()).filter(|&l| self.norm_in_router(l, rows)).count()
    }

    /// Sets whether a one-token MoE's router computes the post-attention norm (`norm_in_router`;
    /// on by default), for tests comparing the two (the same bits). Captured step graphs are
    /// dropped.
    pub fn set_norm_in_router(&mut self, on: bool) {
        self.norm_in_router = on;
        self.graphs.clear();
    }
}

/// Blocks of `attention_v2_kv`, `attention_v2_kv_ready_pre` and `attention_v2_kv_ready` resident
/// at once on the whole GPU (one wave of each), by `ops`' occupancy.
fn attention_waves(ops: &Ops, sms: usize) -> Result<[usize; 3]> {
    let wave = |f: &CudaFunction| -> Result<usize> { Ok(f.occupancy_max_active_blocks_per_multiprocessor(256, 0, None).map_err(drv)? as usize * sms) };
    Ok([wave(&ops.attention_v2_kv)?, wave(&ops.attention_v2_kv_ready_pre)?, wave(&ops.attention_v2_kv_ready)?])
}

/// Whether attention of these head dims can keep BF16 or FP8 pools: attention_v2's warps load
/// their values in pairs (kernels/ops.cu's kv_lane_pair), so K and V head dims must be even.
fn narrow_pools_fit(head_dim: usize, v_head_dim: usize) -> bool {
    head_dim.is_multiple_of(2) && v_head_dim.is_multiple_of(2)
}

impl CudaModel {
    /// What `--kv-cache-dtype auto` means on this backend, from the model's spec alone (before
    /// loading; a drafter is checked by [`CudaModel::auto_kv_dtype`]): BF16, the checkpoints'
    /// precision (vLLM's `auto` is the model's dtype), so twice the cached tokens of f32 and half
    /// a long context's reads; f32 where a head dim is odd.
    pub fn auto_kv_dtype_for(spec: &ModelSpec) -> KvDtype {
        if spec.layers.iter().all(|l| narrow_pools_fit(l.attention.head_dim, l.attention.v_head_dim)) {
            KvDtype::Bf16
        } else {
            KvDtype::F32
        }
    }

    /// `--kv-cache-dtype auto` for the loaded model and its drafter: as
    /// [`CudaModel::auto_kv_dtype_for`], f32 if any attention (the drafter's too) has an odd head dim.
    pub fn auto_kv_dtype(&self) -> KvDtype {
        if self.narrow_pools_misfit().is_none() {
            KvDtype::Bf16
        } else {
            KvDtype::F32
        }
    }

    /// The first attention (the model's, then the drafter's) whose head dims cannot keep BF16 or
    /// FP8 pools.
    fn narrow_pools_misfit(&self) -> Option<AttentionSpec> {
        let mut dims = self.layers.iter().map(|l| l.attn.spec).chain(self.drafter.iter().flat_map(|d| d.layers.iter().map(|l| l.attn.spec)));
        dims.find(|s| !narrow_pools_fit(s.head_dim, s.v_head_dim))
    }

    /// Before loading: the K/V pools will be `dtype`, so the load's `compile::prepare` compiles
    /// ops.cu's build for it with the other kernel files (at once, on a first start on a new GPU
    /// type) instead of `use_kv_dtype` compiling it alone afterwards.
    pub fn expect_kv_dtype(dtype: KvDtype) {
        let variant = ops_variant(dtype);
        if !variant.is_empty() {
            compile::prepare_variant("ops", variant);
        }
    }

    /// The K/V pools' element type from the next `init_kv` on: ops.cu's build for it loaded (its
    /// PTX compiled unless cached: `kernel-report.sh --fill-cache DIR -DKV_BF16 --defines-in
    /// ops` fills it) and the attention waves taken from its occupancy. Pools held until then are
    /// dropped (they were the other type): `forward` before the next `init_kv` is an error.
    pub fn use_kv_dtype(&mut self, dtype: KvDtype) -> Result<()> {
        if dtype == self.kv_dtype {
            return Ok(());
        }
        if let Some(s) = self.narrow_pools_misfit().filter(|_| dtype != KvDtype::F32) {
            return Err(Error::Unsupported(format!("{dtype} KV pools need even head dims on the CUDA backend; this model has K {} and V {}", s.head_dim, s.v_head_dim)));
        }
        let ops = load_ops(&self.gpu, dtype)?;
        [self.attention_kv_wave, self.attention_ready_pre_wave, self.attention_ready_wave] = attention_waves(&ops, self.sm_count)?;
        self.ops = ops;
        self.kv_dtype = dtype;
        self.graphs.clear();
        self.kv.clear();
        self.draft_kv.clear();
        self.draft_staging = None;
        self.kv_config = None;
        Ok(())
    }

    fn kv_bytes_per_block(&self, block_size: usize) -> KvBlockBytes {
        let (mut b, e) = (KvBlockBytes { full: 0, swa: 0 }, self.kv_dtype.size());
        for l in &self.layers {
            let per = block_size * (l.attn.spec.k_dim() + l.attn.spec.v_dim()) * e;
            if l.swa { b.swa += per } else { b.full += per }
        }
        if let Some(d) = &self.drafter {
            b.full += block_size * d.kv_floats_per_token() * e;
        }
        b
    }

    fn init_kv_pools(&mut self, config: KvConfig) -> Result<()> {
        self.graphs.clear();
        self.kv.clear();
        self.draft_kv.clear();
        // One scratch block past the last of each pool: padding rows of graph replays use it.
        let (full, swa) = (config.num_full_blocks + 1, config.num_swa_blocks + 1);
        let per_block = self.kv_bytes_per_block(config.block_size);
        let bytes = full * per_block.full + swa * per_block.swa + self.draft_staging_bytes(config.block_size);
        let (free, total) = self.gpu.ctx.mem_get_info().map_err(drv)?;
        if bytes > free {
            return Err(Error::Backend(format!(
                "the KV cache needs {bytes} bytes but the GPU has {free} of {total} free after the weights; lower --kv-cache-memory, or leave it out to size the cache by --gpu-memory-utilization"
            )));
        }
        let (st, dt) = (&self.stream, self.kv_dtype);
        for l in &self.layers {
            let slots = (if l.swa { swa } else { full }) * config.block_size;
            let s = &l.attn.spec;
            self.kv.push((KvPool::zeros(st, dt, slots * s.k_dim())?, KvPool::zeros(st, dt, slots * s.v_dim())?));
        }
        if let Some(d) = &self.drafter {
            let slots = full * config.block_size;
            for l in &d.layers {
                let s = &l.attn.spec;
                self.draft_kv.push((KvPool::zeros(st, dt, slots * s.k_dim())?, KvPool::zeros(st, dt, slots * s.v_dim())?));
            }
        }
        self.draft_staging = self.alloc_draft_staging(config.block_size)?;
        self.kv_config = Some(config);
        self.tune_one_token_step()
    }

    /// Flattens `batch` into rows with their positions, KV slots and block tables, checking
    /// token ids and that every position has its KV block.
    pub(crate) fn host_rows(&self, batch: &[SeqForward]) -> Result<HostRows> {
        let cfg = self.kv_config.ok_or_else(|| Error::Backend("forward before init_kv".into()))?;
        let (vocab, bs) = (self.spec.vocab_size, cfg.block_size);
        let max_blocks = batch.iter().map(|s| s.full_blocks.len().max(s.swa_blocks.len())).max().unwrap_or(1).max(1);
        let (want, counts) = peregrine_core::backend::output_rows(batch);
        let mut r = HostRows {
            toks: Vec::new(),
            pos: Vec::new(),
            seq: Vec::new(),
            full_slots: Vec::new(),
            swa_slots: Vec::new(),
            full_tables: vec![0i32; batch.len() * max_blocks],
            swa_tables: vec![0i32; batch.len() * max_blocks],
            max_blocks,
            want,
            counts,
            one_per_seq: batch.iter().all(|s| s.tokens.len() == 1),
            chain: None,
            stage: None,
        };
        let any_swa = self.layers.iter().any(|l| l.swa);
        for (si, s) in batch.iter().enumerate() {
            for (j, &b) in s.full_blocks.iter().enumerate() {
                r.full_tables[si * max_blocks + j] = if b == NULL_BLOCK { 0 } else { b as i32 };
            }
            for (j, &b) in s.swa_blocks.iter().enumerate() {
                r.swa_tables[si * max_blocks + j] = if b == NULL_BLOCK { 0 } else { b as i32 };
            }
            for (ti, &t) in s.tokens.iter().enumerate() {
                if t as usize >= vocab {
                    return Err(Error::Backend(format!("token id {t} outside the vocabulary of {vocab}")));
                }
                let p = s.start_pos + ti;
                let slot = |table: &[u32], group: &str| match table.get(p / bs) {
                    Some(&b) if b != NULL_BLOCK => Ok(b as i64 * bs as i64 + (p % bs) as i64),
                    _ => Err(Error::Backend(format!("sequence {}: no {group} KV block for position {p}", s.seq_id))),
                };
                r.full_slots.push(slot(&s.full_blocks, "full-attention")?);
                r.swa_slots.push(if any_swa { slot(&s.swa_blocks, "sliding-window")? } else { 0 });
                r.toks.push(t as i32);
                r.pos.push(p as i32);
                r.seq.push(si as i32);
            }
        }
        Ok(r)
    }

    /// A batch's rows on the GPU for an eager step, and the indices of the asked-for rows.
    pub(crate) fn upload_rows(&self, rows: &HostRows) -> Result<(RowMeta, CudaSlice<i32>)> {
        let st = &self.stream;
        let meta = RowMeta {
            tok: upload(st, &rows.toks)?,
            pos: upload(st, &rows.pos)?,
            seq: upload(st, &rows.seq)?,
            full_slots: upload(st, &rows.full_slots)?,
            swa_slots: upload(st, &rows.swa_slots)?,
            full_tables: upload(st, &rows.full_tables)?,
            swa_tables: upload(st, &rows.swa_tables)?,
            chain: None,
            staged: None,
            sampling: None,
            stage: rows.stage.as_deref().map(|v| upload(st, v)).transpose()?,
            max_blocks: rows.max_blocks,
            block_size: self.kv_config.map_or(1, |c| c.block_size),
            prefill: match prefill_tiles(&rows.seq, &rows.pos) {
                Some((tiles, rest)) => Some(PrefillRows { num_tiles: tiles.len() / 2, tiles: upload(st, &tiles)?, num_rest: rest.len(), rest: upload(st, &rest.iter().copied().chain([0]).collect::<Vec<_>>())? }),
                None => None,
            },
        };
        let idx = upload(st, &rows.want.iter().map(|&r| r as i32).chain([0]).collect::<Vec<_>>())?; // never empty
        Ok((meta, idx))
    }

    /// One forward step on the GPU with no host round trip (so it can be captured as a CUDA
    /// graph): the embedding, every layer, the drafter's context K/V, then the final norm and
    /// lm_head of the rows `out_rows` (every row when None) into `logits` [rows, vocab] and their
    /// argmax into `ids`.
    /// `decode`: every row is its sequence's only new token.
    pub(crate) fn step_body(&self, meta: &RowMeta, n: usize, out_rows: Option<(&CudaSlice<i32>, usize)>, decode: bool, logits: &mut CudaSlice<f32>, ids: &mut CudaSlice<i32>) -> Result<()> {
        let plan = self.step_plan(n, out_rows.map(|o| o.1), decode);
        self.execute(&plan, meta, out_rows.map(|o| o.0), logits, ids)
    }

    /// Runs `batch` (through a captured graph when it qualifies) and brings back, for the
    /// asked-for rows, what `out` says: logits, argmax ids or ids sampled on the GPU; with the
    /// per-sequence row counts.
    fn run(&mut self, batch: &[SeqForward], out: Out) -> Result<(Fetched, Vec<usize>)> {
        self.graphs.overlap.refuse_while_awaiting()?;
        // Its graph may overwrite the ids a chained step would read (crate::overlap).
        self.graphs.overlap.break_chain();
        let mut rows = self.host_rows(batch)?;
        let n = rows.toks.len();
        if n == 0 {
            return Ok((Fetched::empty(&rows.counts, self.spec.vocab_size), rows.counts));
        }
        let k = rows.want.len();
        if let Out::Sample(p, _) | Out::SampleLogprobs(p, _, _) | Out::SampleKeeping(p, _, _) | Out::SampleMasked(p, _, _) = out {
            if p.len() != k {
                return Err(Error::Backend(format!("{} sampling rows for {k} output rows", p.len())));
            }
        }
        // Decode rows stage the drafter's context; a block they fill is flushed after the step
        // (crate::draft_staging).
        let after = self.stage_draft_context(batch, &mut rows)?;
        let fetched = self.forgetting_staged_on_error(batch, |m| m.run_rows(&rows, out, &after))?;
        Ok((fetched, rows.counts))
    }

    /// `run`'s step over its rows, then `after` (the drafter's rings to flush): before the
    /// step's ids are read where they wait in a copy-free graph's slot (so the GPU has the
    /// flush queued behind the graph), after its results otherwise (their copies would wait
    /// for it).
    fn run_rows(&mut self, rows: &HostRows, out: Out, after: &crate::draft_staging::Flush) -> Result<Fetched> {
        let (n, k) = (rows.toks.len(), rows.want.len());
        let vocab = self.spec.vocab_size;
        // Sampled without adjustments: the graph that samples (its ids are the samples).
        let in_graph = match out {
            Out::Sample(p, adj) if self.graph_samples(adj) => Some(p),
            _ => None,
        };
        if let Some(mut g) = self.graph_for(rows, in_graph)? {
            let out = if in_graph.is_some() { Out::Argmax } else { out };
            // A copy-free graph wrote its ids into the host slot (crate::staged).
            let by_slot = matches!((&out, g.staged(), g.slot), (Out::Argmax, Some(_), Some(_)));
            if by_slot {
                if let Err(e) = self.flush_draft_context(after) {
                    self.graphs.put_back(g);
                    return Err(e);
                }
            }
            let slot_ids = match (&out, g.staged(), g.slot) {
                (Out::Argmax, Some(s), Some(slot)) => Some(s.slots.ids(slot, k)),
                _ => None,
            };
            let fetched = match (out, slot_ids) {
                (_, Some(ids)) => ids.map(|ids| Fetched { ids, ..Default::default() }),
                (Out::Logits, None) if k > 0 => g.fetch_logits(&mut self.graphs.host_logits, &self.stream, &rows.counts, vocab).map(|logits| Fetched { logits, ..Default::default() }),
                (out, None) => fetch(&self.kernels, &self.stream, out, &rows.counts, vocab, &mut g.logits, &g.ids),
            };
            self.graphs.put_back(g);
            if !by_slot {
                self.flush_draft_context(after)?;
            }
            return fetched;
        }
        let st = self.stream.clone();
        let (meta, idx) = self.upload_rows(rows)?;
        let mut logits = self.zeros(k * vocab)?;
        let mut ids = st.alloc_zeros::<i32>(k.max(1)).map_err(drv)?;
        self.step_body(&meta, n, Some((&idx, k)), rows.one_per_seq, &mut logits, &mut ids)?;
        let fetched = fetch(&self.kernels, &st, out, &rows.counts, vocab, &mut logits, &ids)?;
        self.flush_draft_context(after)?;
        Ok(fetched)
    }

    /// Greedy decoding without logits on the host: the argmax token of every asked-for row
    /// (ties to the lower id), per sequence.
    pub fn forward_argmax(&mut self, batch: &[SeqForward]) -> Result<Vec<Vec<u32>>> {
        let (f, counts) = self.run(batch, Out::Argmax)?;
        Ok(per_sequence(f.ids, &counts))
    }

    /// Sampling on the GPU: one token id per asked-for row, drawn with that row's parameters
    /// after its logit adjustments (bias, penalties).
    pub fn forward_sample(&mut self, batch: &[SeqForward], rows: &[RowSampling], adjust: &[LogitAdjust]) -> Result<Vec<Vec<u32>>> {
        let (f, counts) = self.run(batch, Out::Sample(rows, adjust))?;
        Ok(per_sequence(f.ids, &counts))
    }

    /// `forward_sample` for the sequences whose `keep` entry is false; the kept sequences' rows
    /// come back as their raw logits (copied before the sampler adjusts rows in place).
    pub fn forward_sample_keeping(&mut self, batch: &[SeqForward], rows: &[RowSampling], adjust: &[LogitAdjust], keep: &[bool]) -> Result<Vec<KeptRows>> {
        if keep.len() != batch.len() {
            return Err(Error::Backend(format!("{} keep entries for {} sequences", keep.len(), batch.len())));
        }
        let (f, counts) = self.run(batch, Out::SampleKeeping(rows, adjust, keep))?;
        let mut ids = f.ids.into_iter().map(|t| t as u32);
        let mut kept = f.kept.into_iter();
        Ok(counts
            .iter()
            .map(|&c| {
                let seq_ids: Vec<u32> = ids.by_ref().take(c).collect();
                match kept.next().flatten() {
                    Some(l) => KeptRows::Logits(l),
                    None => KeptRows::Ids(seq_ids),
                }
            })
            .collect())
    }

    /// `forward_sample` with rows held to token masks (`Backend::forward_sampled_masked`):
    /// `masks` is called once the step is enqueued, and a row's refused tokens are -inf after
    /// its adjustments.
    pub fn forward_sample_masked(&mut self, batch: &[SeqForward], rows: &[RowSampling], adjust: &[LogitAdjust], masks: MaskSource) -> Result<Vec<Vec<u32>>> {
        let (f, counts) = self.run(batch, Out::SampleMasked(rows, adjust, masks))?;
        Ok(per_sequence(f.ids, &counts))
    }

    /// `forward_sample` with the raw logits' logprobs of the rows whose `top` entry is Some(n):
    /// the sampled token's and the n most likely (computed on the GPU; only they come back).
    pub fn forward_sample_logprobs(&mut self, batch: &[SeqForward], rows: &[RowSampling], adjust: &[LogitAdjust], top: &[Option<u32>]) -> Result<SampledRows> {
        if top.len() != rows.len() {
            return Err(Error::Backend(format!("{} logprobs entries for {} sampling rows", top.len(), rows.len())));
        }
        let (f, counts) = self.run(batch, Out::SampleLogprobs(rows, adjust, top))?;
        let mut it = f.ids.into_iter().map(|t| t as u32).zip(f.logprobs);
        Ok(counts.iter().map(|&c| it.by_ref().take(c).collect()).collect())
    }
}

/// What a forward brings back for the asked-for rows.
#[derive(Clone, Copy)]
enum Out<'a> {
    Logits,
    Argmax,
    Sample(&'a [RowSampling], &'a [LogitAdjust]),
    /// Sample, with the raw logits' logprobs of the rows whose entry is Some(top).
    SampleLogprobs(&'a [RowSampling], &'a [LogitAdjust], &'a [Option<u32>]),
    /// Sample, and bring back the raw logits of the sequences whose entry is true.
    SampleKeeping(&'a [RowSampling], &'a [LogitAdjust], &'a [bool]),
    /// Sample with the rows held to the token masks the source gives once the step is
    /// enqueued (the host builds them while the GPU runs it).
    SampleMasked(&'a [RowSampling], &'a [LogitAdjust], MaskSource<'a>),
}

/// What a forward brought back: logits per sequence, or ids (with logprobs when asked).
#[derive(Default)]
struct Fetched {
    logits: Vec<Logits>,
    ids: Vec<i32>,
    logprobs: Vec<Option<RowLogprobs>>,
    /// `SampleKeeping`: per sequence, its raw logits where kept.
    kept: Vec<Option<Logits>>,
}

impl Fetched {
    /// No rows asked for (`counts` all zero): every sequence's logits empty.
    fn empty(counts: &[usize], vocab: usize) -> Fetched {
        Fetched { logits: split_logits(&[], counts, vocab), ..Default::default() }
    }
}

/// Brings back what `out` asks for of the first `counts.iter().sum()` rows of a step's logits /
/// argmax ids (`counts`: the asked-for rows of each sequence).
fn fetch(kern: &Kernels, st: &Arc<CudaStream>, out: Out, counts: &[usize], vocab: usize, logits: &mut CudaSlice<f32>, ids: &CudaSlice<i32>) -> Result<Fetched> {
    let k = counts.iter().sum::<usize>();
    Ok(match out {
        // Nothing asked for (a prefill chunk): still wait for the step to finish.
        _ if k == 0 => {
            st.synchronize().map_err(drv)?;
            Fetched::empty(counts, vocab)
        }
        Out::Logits => Fetched { logits: split_logits(&st.clone_dtoh(&logits.slice(..k * vocab)).map_err(drv)?, counts, vocab), ..Default::default() },
        Out::Argmax => Fetched { ids: st.clone_dtoh(&ids.slice(..k)).map_err(drv)?, ..Default::default() },
        Out::Sample(p, adj) => Fetched { ids: st.clone_dtoh(&kern.sample_rows_adjusted(logits, vocab, p, adj)?).map_err(drv)?, ..Default::default() },
        Out::SampleMasked(p, adj, masks) => {
            // Asked for only now: the step is on the stream, and the host builds the masks
            // while the GPU computes it.
            let m = masks();
            if m.len() != k {
                return Err(Error::Backend(format!("{} token masks for {k} output rows", m.len())));
            }
            Fetched { ids: st.clone_dtoh(&kern.sample_rows_masked(logits, vocab, p, adj, &m)?).map_err(drv)?, ..Default::default() }
        }
        Out::SampleLogprobs(p, adj, top) => {
            let (ids, logprobs) = kern.sample_rows_with_logprobs(logits, vocab, p, adj, top)?;
            Fetched { ids, logprobs, ..Default::default() }
        }
        Out::SampleKeeping(p, adj, keep) => {
            // The kept rows first: the sampler adjusts rows in place.
            let mut kept = Vec::with_capacity(counts.len());
            let mut at = 0;
            for (&c, &k) in counts.iter().zip(keep) {
                kept.push(match k && c > 0 {
                    true => Some(Logits { rows: c, data: st.clone_dtoh(&logits.slice(at * vocab..(at + c) * vocab)).map_err(drv)? }),
                    false => None,
                });
                at += c;
            }
            let ids = st.clone_dtoh(&kern.sample_rows_adjusted(logits, vocab, p, adj)?).map_err(drv)?;
            Fetched { ids, kept, ..Default::default() }
        }
    })
}

fn per_sequence(ids: Vec<i32>, counts: &[usize]) -> Vec<Vec<u32>> {
    let mut it = ids.into_iter().map(|t| t as u32);
    counts.iter().map(|&c| it.by_ref().take(c).collect()).collect()
}

impl Backend for CudaModel {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn kv_block_bytes(&self, block_size: usize) -> KvBlockBytes {
        self.kv_bytes_per_block(block_size)
    }

    fn init_kv(&mut self, config: KvConfig) -> Result<()> {
        self.init_kv_pools(config)
    }

    fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    fn set_kv_dtype(&mut self, dtype: KvDtype) -> Result<()> {
        self.use_kv_dtype(dtype)
    }

    fn forward(&mut self, batch: &[SeqForward]) -> Result<Vec<Logits>> {
        Ok(self.run(batch, Out::Logits)?.0.logits)
    }

    fn forward_greedy(&mut self, batch: &[SeqForward]) -> Result<Option<Vec<Vec<u32>>>> {
        self.forward_argmax(batch).map(Some)
    }

    fn forward_sampled(&mut self, batch: &[SeqForward], rows: &[RowSampling], adjust: &[LogitAdjust]) -> Result<Option<Vec<Vec<u32>>>> {
        self.forward_sample(batch, rows, adjust).map(Some)
    }

    fn forward_sampled_logprobs(&mut self, batch: &[SeqForward], rows: &[RowSampling], adjust: &[LogitAdjust], top: &[Option<u32>]) -> Result<Option<SampledRows>> {
        self.forward_sample_logprobs(batch, rows, adjust, top).map(Some)
    }

    fn forward_sampled_keeping(&mut self, batch: &[SeqForward], rows: &[RowSampling], adjust: &[LogitAdjust], keep: &[bool]) -> Result<Option<Vec<KeptRows>>> {
        self.forward_sample_keeping(batch, rows, adjust, keep).map(Some)
    }

    fn forward_sampled_masked(&mut self, batch: &[SeqForward], rows: &[RowSampling], adjust: &[LogitAdjust], masks: MaskSource) -> Result<Option<Vec<Vec<u32>>>> {
        self.forward_sample_masked(batch, rows, adjust, masks).map(Some)
    }

    fn forward_speculative(&mut self, batch: &[SeqForward], sampling: peregrine_core::backend::SpecSampling) -> Result<Option<Vec<peregrine_core::backend::SpecRows>>> {
        self.speculate(batch, sampling)
    }

    fn enqueue_decode(&mut self, batch: &[SeqForward], chain: &[Option<usize>], sampling: Option<(&[RowSampling], &[LogitAdjust])>) -> Result<bool> {
        self.enqueue_decode_step(batch, chain, sampling)
    }

    fn enqueue_decode_deferred(&mut self, batch: &[SeqForward], chain: &[Option<usize>]) -> Result<bool> {
        self.enqueue_decode_deferred_step(batch, chain)
    }

    fn sample_enqueued(&mut self, rows: &[RowSampling], adjust: &[LogitAdjust], masks: Vec<Option<TokenMask>>) -> Result<()> {
        self.sample_enqueued_step(rows, adjust, masks)
    }

    fn collect_decode(&mut self) -> Result<Vec<u32>> {
        self.collect_decode_step()
    }

    fn name(&self) -> &str {
        "cuda"
    }

    /// A verify block's rows run the multi-row attention, MoE and GEMV tiles, a decode row the
    /// one-token kernels: their sums round apart in the last bits.
    fn rows_compute_alike(&self) -> bool {
        false
    }

    fn draft_spec(&self) -> Option<&peregrine_core::DraftSpec> {
        self.drafter.as_ref().map(|d| &d.spec)
    }

    fn draft(&mut self, batch: &[peregrine_core::backend::DraftForward]) -> Result<Vec<Vec<u32>>> {
        self.draft_pass(batch)
    }

    /// A sticky error (an illegal address, a trapped kernel) poisons the context, and every later
    /// call, synchronizing included, returns it; a step's own failure (an allocation that did not
    /// fit) leaves the stream synchronizing, so the backend stays healthy.
    fn check_health(&mut self) -> Result<()> {
        self.stream.synchronize().map_err(|e| Error::Backend(format!("the GPU context is lost ({e}); restart the server")))
    }

    fn device_memory(&mut self) -> Result<Option<peregrine_core::backend::DeviceMemory>> {
        // Frees enqueued on the stream land once it has run them.
        self.stream.synchronize().map_err(drv)?;
        let (free, total) = self.gpu.ctx.mem_get_info().map_err(drv)?;
        Ok(Some(peregrine_core::backend::DeviceMemory { free, total }))
    }

    fn hold_freed_memory(&mut self, on: bool) -> Result<()> {
        crate::alloc::hold_freed_memory(&self.stream, on)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_steps_launch_plainly_only_between_the_measured_row_counts() {
        let plain: Vec<usize> = crate::graph::ROW_BUCKETS.into_iter().filter(|&r| launches_plainly(r, PLAIN_FROM_ROWS, PLAIN_TO_ROWS)).collect();
        assert_eq!(plain, [16, 24, 32]);
        // Past the largest bucket (rows PDL was not measured at) plainly again.
        assert!(launches_plainly(65, PLAIN_FROM_ROWS, PLAIN_TO_ROWS) && launches_plainly(512, PLAIN_FROM_ROWS, PLAIN_TO_ROWS));
        // With `to` past the largest bucket, every step from `from` rows on (the rule before).
        assert!((16..=100).all(|r| launches_plainly(r, 16, 99) == (r >= 16)));
        assert!(!(1..16).any(|r| launches_plainly(r, 16, 99)));
    }

    #[test]
    fn auto_kv_dtype_is_bf16_where_every_head_dim_is_even() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut spec = peregrine_model::config::load_spec_file(&dir.join("mimo-v2-flash.json"), None, None).unwrap();
        assert_eq!(CudaModel::auto_kv_dtype_for(&spec), KvDtype::Bf16);
        let last = spec.layers.len() - 1;
        spec.layers[last].attention.v_head_dim = 129;
        assert_eq!(CudaModel::auto_kv_dtype_for(&spec), KvDtype::F32, "one odd V head dim");
        spec.layers[last].attention.v_head_dim = 128;
        spec.layers[0].attention.head_dim = 191;
        assert_eq!(CudaModel::auto_kv_dtype_for(&spec), KvDtype::F32, "one odd K head dim");
    }
}
