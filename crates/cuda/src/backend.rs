//! `CudaModel`: the whole MiMo-V2 / Llama-style forward on one GPU, implementing
//! `peregrine_core::Backend`. f32 activations; the operations of the CPU reference in its order,
//! with the residual add fused into the next RMSNorm and RoPE fused with the KV-cache write;
//! weights in their stored formats where a kernel exists for them (MXFP4, FP8 blocks, BF16), f32
//! otherwise. MXFP4 experts are stacked per layer and run by the grouped MoE kernels, with the
//! router and the token/expert grouping on the GPU, so a forward has no host round trip before
//! the logits. Weights come from a checkpoint or are synthetic (see `weights.rs`).

use std::sync::Arc;

use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, LaunchConfig};
use peregrine_core::backend::{split_logits, Backend, KvBlockBytes, KvConfig, LogitAdjust, Logits, RowLogprobs, RowSampling, SampledRows, SeqForward, NULL_BLOCK};
use peregrine_core::{AttentionKind, AttentionSpec, Error, MlpSpec, ModelSpec, MoeSpec, QkvLayout, Result, RouterScoring};
use peregrine_model::weights::WeightSource;

use crate::compile;
use crate::device::{nvrtc_arch, Gpu};
use crate::draft::Drafter;
use crate::kernels::{DeviceRouting, F16Split, Kernels, MoeInput, MoeKernel, MoeRouting, MoeSplit, MoeWeights};
use crate::graph::Graphs;
use crate::weights::{Embed, Source, Synthetic};

/// Activations as their BF16 hi and lo parts (the BF16 tensor-core GEMV's input).
pub(crate) type Bf16Split = (CudaSlice<u16>, CudaSlice<u16>);

/// Up to this many tokens, `moe_route`'s last block also groups the pairs (one launch).
const FUSED_GROUP_MAX_TOKENS: usize = 8;

pub(crate) fn drv(e: cudarc::driver::DriverError) -> Error {
    Error::Backend(format!("CUDA: {e}"))
}

/// A weight matrix [n, k] on the GPU, in the format it was stored in when a kernel reads it.
pub(crate) enum GpuMatrix {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
    Fp8 { w: CudaSlice<u8>, s: CudaSlice<f32> },
    Mxfp4 { w: CudaSlice<u8>, s: CudaSlice<u8> },
}

pub(crate) struct Mat {
    pub(crate) m: GpuMatrix,
    pub(crate) n: usize,
    pub(crate) k: usize,
}

/// The q, k and v projections: three matrices, or one with their rows stacked (one launch
/// and one read of the activations; when all three share a tensor-core format). One per layer:
/// the size difference between the variants does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Qkv {
    Separate { q: Mat, k: Mat, v: Mat },
    Stacked { m: Mat, rows: [usize; 3] },
}

/// Matrices with their rows stacked into one (first's rows, then the next's), where the
/// tensor-core GEMV can run them as one: all FP8 with whole 128-row scale blocks before the
/// last, or all BF16, with one K, K % 128 == 0. None otherwise. The copies are made on the GPU.
pub(crate) fn stack_rows(st: &Arc<CudaStream>, parts: &[&Mat]) -> Result<Option<Mat>> {
    let Some(first) = parts.first() else { return Ok(None) };
    let (kk, n) = (first.k, parts.iter().map(|p| p.n).sum());
    if kk % 128 != 0 || parts.iter().any(|p| p.k != kk) {
        return Ok(None);
    }
    fn cat<T: cudarc::driver::DeviceRepr>(st: &Arc<CudaStream>, parts: &[&CudaSlice<T>]) -> Result<CudaSlice<T>> {
        let mut out = unsafe { st.alloc::<T>(parts.iter().map(|p| p.len()).sum()) }.map_err(drv)?;
        let mut off = 0;
        for p in parts {
            st.memcpy_dtod(*p, &mut out.slice_mut(off..off + p.len())).map_err(drv)?;
            off += p.len();
        }
        Ok(out)
    }
    let whole_blocks = parts[..parts.len() - 1].iter().all(|p| p.n.is_multiple_of(128));
    let fp8: Option<Vec<_>> = parts.iter().map(|p| if let GpuMatrix::Fp8 { w, s } = &p.m { Some((w, s)) } else { None }).collect();
    let bf16: Option<Vec<_>> = parts.iter().map(|p| if let GpuMatrix::Bf16(w) = &p.m { Some(w) } else { None }).collect();
    let m = match (fp8, bf16) {
        (Some(f), _) if whole_blocks => {
            let (ws, ss): (Vec<_>, Vec<_>) = f.into_iter().unzip();
            GpuMatrix::Fp8 { w: cat(st, &ws)?, s: cat(st, &ss)? }
        }
        (_, Some(b)) => GpuMatrix::Bf16(cat(st, &b)?),
        _ => return Ok(None),
    };
    Ok(Some(Mat { m, n, k: kk }))
}

impl Qkv {
    /// Stacks q, k and v when the tensor-core GEMV can run them as one (`stack_rows`).
    fn stack(st: &Arc<CudaStream>, q: Mat, k: Mat, v: Mat) -> Result<Qkv> {
        let rows = [q.n, k.n, v.n];
        Ok(match stack_rows(st, &[&q, &k, &v])? {
            Some(m) => Qkv::Stacked { m, rows },
            None => Qkv::Separate { q, k, v },
        })
    }
}

pub(crate) struct Attn {
    pub(crate) spec: AttentionSpec,
    pub(crate) qkv: Qkv,
    pub(crate) bias: Option<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)>,
    pub(crate) q_norm: Option<CudaSlice<f32>>,
    pub(crate) k_norm: Option<CudaSlice<f32>>,
    pub(crate) o: Mat,
    pub(crate) sinks: Option<CudaSlice<f32>>,
}

pub(crate) struct Ffn {
    pub(crate) gate_up: GateUp,
    pub(crate) down: Mat,
}

/// A dense MLP's gate and up projections: two matrices, or one with up's rows after gate's
/// (`stack_rows`): one GEMV launch and one split of x instead of two each.
pub(crate) enum GateUp {
    Separate { gate: Mat, up: Mat },
    Stacked { m: Mat, i: usize },
}

#[allow(clippy::large_enum_variant)]
pub(crate) enum Experts {
    /// MXFP4 experts stacked for the grouped MoE kernels (routing stays on the GPU).
    Stacked(MoeWeights),
    /// Any other format: one GEMV chain per routed expert, routed on the host.
    PerExpert(Vec<Ffn>),
}

#[allow(clippy::large_enum_variant)]
pub(crate) enum Mlp {
    Dense(Ffn),
    Moe {
        spec: MoeSpec,
        router: Mat,
        /// The correction bias on the GPU, and on the host for the per-expert path.
        bias: Option<(CudaSlice<f32>, Vec<f32>)>,
        experts: Experts,
    },
}

pub(crate) struct Layer {
    pub(crate) input_norm: CudaSlice<f32>,
    pub(crate) post_norm: CudaSlice<f32>,
    attn: Attn,
    pub(crate) mlp: Mlp,
    swa: bool,
}

/// Default of `CudaModel::drain_after_mlp_rows`. Not at one row: the GEMVs after the MoE then
/// run in its shared-memory carveout, which costs them little when they stream one row (stop 33
/// measured the loss at 4 and 8 rows). H100, Flash-shaped step, batch-1 replay, two rounds each:
/// draining the next op 2.620-2.627 ms, the second (the pairs norm under PDL, the q/k/v
/// projection drained) 2.594-2.616, none 2.592 / 2.592 (against 2.594 / 2.603 in the same call);
/// at 2-8 rows the later drain was within noise or slower (batch 4 +0.2-0.3%)
/// (benches/results/2026-11-25-dynamic-moe-drain-later.md).
const DRAIN_AFTER_MLP_ROWS: usize = 2;
/// Copies of the router's fixed-point sums the one-token o_proj spreads its blocks' adds over
/// (`route_in_oproj`): with one, all 256 of Flash's blocks added into each expert's word at the
/// o_proj's end.
const ROUTE_ACC_COPIES: usize = 8;
/// Default of `CudaModel::plain_from_rows`.
const PLAIN_FROM_ROWS: usize = 16;

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
    scatter_add_scaled: CudaFunction,
    gemv_f32: CudaFunction,
    gemv_f32_tiles: CudaFunction,
    gemv_f32_norm: CudaFunction,
    pub(crate) copy_cols: CudaFunction,
    pub(crate) fill_rows: CudaFunction,
    pub(crate) scale: CudaFunction,
    pub(crate) draft_attention: CudaFunction,
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

/// ops.cu's kernels, compiled (or from the cache) and loaded.
fn load_ops(gpu: &Gpu) -> Result<Ops> {
    let (ptx, _) = compile::ptx("ops", compile::OPS_CU, nvrtc_arch(gpu.capability))?;
    let m = gpu.ctx.load_module(ptx).map_err(drv)?;
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
        scatter_add_scaled: f("scatter_add_scaled")?,
        gemv_f32: f("gemv_f32")?,
        gemv_f32_tiles: f("gemv_f32_tiles")?,
        gemv_f32_norm: f("gemv_f32_norm")?,
        copy_cols: f("copy_cols")?,
        fill_rows: f("fill_rows")?,
        scale: f("scale")?,
        draft_attention: f("draft_attention")?,
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
    /// Per layer: K and V pools [slots, kv_heads, dim].
    kv: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
    pub(crate) kv_config: Option<KvConfig>,
    pub(crate) drafter: Option<Drafter>,
    /// The drafter's context K/V per drafter layer, indexed like the full-attention group.
    pub(crate) draft_kv: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
    /// Captured decode-step graphs.
    pub(crate) graphs: Graphs,
    /// The MoE kernels' counters, shared by every layer (they are zero again after each call),
    /// sized for all expert slots at load so graphs keep a fixed address. Taken out while a
    /// layer runs.
    moe_counters: std::sync::Mutex<Option<CudaSlice<u32>>>,
    /// The routing kernel's arrival counter (zero between calls, it resets itself).
    route_counter: CudaSlice<u32>,
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
    /// A one-token MoE whose router computes the post-attention norm itself (`norm_in_router`;
    /// `PEREGRINE_NORM_IN_ROUTER=0` keeps the norm's launch, for comparison; tests flip it).
    norm_in_router: bool,
    /// Where the router computes the norm at one token, the o_proj before it does the router
    /// instead (`route_in_oproj_at`; `PEREGRINE_ROUTE_IN_OPROJ=0` keeps the router's launch, for
    /// comparison; tests flip it).
    route_in_oproj: bool,
    /// Per layer, `route_acc_stride` u64: the fixed-point logit sums the o_proj adds into and
    /// its MoE reads, in `route_acc_copies` copies, then a flag word (zero between: the next
    /// such layer's MoE zeroes them, cyclically); then the o_proj blocks' sums of squares of h
    /// [H / 16] and the norm's weight times h [H] (one layer's at a time).
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
    /// Steps with prompt chunks launch with PDL too (`PEREGRINE_PREFILL_PDL=1`; by default they
    /// launch plainly, see `launch::PlainLaunches`).
    pub(crate) prefill_pdl: bool,
    /// From this many rows, the op after an MLP launches without PDL (crate::launch::plain_next);
    /// PEREGRINE_DRAIN_AFTER_MLP_ROWS sets it (measurements).
    pub(crate) drain_after_mlp_rows: usize,
    /// Which op after an MLP launches without PDL (1: the next); PEREGRINE_DRAIN_AFTER_MLP_OPS
    /// sets it (measurements).
    pub(crate) drain_after_mlp_op: usize,
    /// From this many rows a step launches without PDL at all; PEREGRINE_PLAIN_FROM_ROWS sets
    /// it (measurements).
    pub(crate) plain_from_rows: usize,
}

/// Rows of split decode attention whose splits merge inside the kernel: the arrival counters
/// cover this many rows x heads (at least 64 heads), every decode graph's bucket.
const MERGE_IN_ATTENTION_ROWS: usize = 64;

/// Warps (heads) per block of `attention_v2_heads` (ATT_WARPS in kernels/ops.cu).
const ATT_WARPS: usize = 8;

/// Decode rows from which `attention_v2_heads` serves attention without the K/V write inside
/// (`CudaModel::attn_heads_min_rows`).
const ATTN_HEADS_MIN_ROWS: usize = 8;

/// Decode rows, and positions in the block tables, from which `attention_gqa_tc` serves decode
/// attention without the K/V write inside (`CudaModel::attn_tc_min_rows`, `attn_tc_min_span`).
/// From 16 rows at any span: at 128 positions (Flash shapes, H100) its forms beat
/// `attention_v2_heads` at batch 16-64 (steps -0.5 to -1.6%) and lost at batch 8 (+0.2 to +1.4%;
/// benches/results/2026-11-26-gqa-decode-short-spans.md).
const ATTN_TC_MIN_ROWS: usize = 16;
const ATTN_TC_MIN_SPAN: usize = 2048;
/// Blocks of each (row, KV head) of `attention_gqa_tc` that share the merge of its splits
/// (`CudaModel::attn_merge_sharers`).
const GT_MERGE_SHARERS: usize = 4;

/// Sharers of each (row, KV head)'s merge in `attention_gqa_tc` (`groups` = rows x KV heads):
/// the last `wanted` blocks to arrive each merge some heads, waiting for the rest, so their
/// `groups x sharers` waiting blocks must leave at least one block of the wave free (any split
/// not yet started then still finds an SM). 1: the last block merges alone.
pub(crate) fn gqa_merge_sharers(wanted: usize, groups: usize, splits: usize, wave: usize) -> usize {
    let room = wave.saturating_sub(1) / groups.max(1);
    let s = wanted.min(splits).min(room);
    if s >= 2 { s } else { 1 }
}

/// Positions of the block tables per split of `attention_gqa_tc` (`CudaModel::attn_tc_split`).
/// Its blocks fill an SM each (one per SM by shared memory) and paid ~15 us of fixed cost besides
/// their tiles (the start, and at batch 1 the last block's merge of 33 splits, before the merge
/// was shared), so at 512 its grids ran 2, 4 and 8 waves at batches 2, 4 and 8 (8192 tokens,
/// tables 16384 wide in graphs); at 2048 they run one or two
/// (benches/results/2026-11-25-gqa-splits.md). Batch 1 splits to fill one wave either way.
const ATTN_TC_SPLIT: usize = 2048;

/// Warps per block of the compiled forms of `attention_gqa_tc` (`attention_gqa_tc_d..`,
/// `attention_gqa_tc4_d..`: the template's GT_WARPS in kernels/ops.cu) and positions per tile
/// (GT_TK). 8 warps fit one block per SM, 4 two.
pub(crate) const GQA_TC_WARPS: [usize; 2] = [8, 4];
const GT_TK: usize = 8;

/// Warps per block of `attention_gqa_tc` for `groups` (rows x KV heads) where one wave holds
/// `wave8` blocks of 8 warps: 8 while the groups fit that wave, else 4 (two blocks per SM).
/// H100, Flash shapes at 128 positions (benches/results/2026-11-26-gqa-decode-short-spans.md):
/// 8 warps at 64-128 groups (batch 16, batch 32's full layers) took 17-21 us against 22-29 in
/// 4; from 256 groups a second wave of 8-warp blocks cost more than the smaller blocks (batch
/// 64: 30 / 50 us in 4 warps for the full / sliding layers, against 40 / 63 in 8).
pub(crate) fn gqa_tc_warps_for(groups: usize, wave8: usize) -> usize {
    if groups <= wave8 { GQA_TC_WARPS[0] } else { GQA_TC_WARPS[1] }
}

/// The form of `attention_gqa_tc` a decode attention runs (`CudaModel::gqa_tc_for`).
pub(crate) struct GqaTc<'a> {
    pub(crate) kernel: &'a CudaFunction,
    /// Warps per block (a `GQA_TC_WARPS` entry).
    pub(crate) warps: usize,
}

/// `attention_gqa_tc`'s dynamic shared memory in blocks of `warps` warps (4-byte words): Q hi
/// and lo (in A-fragment order, each within [16][hd + 4]), then per warp K [2][GT_TK][hd + 4],
/// V [2][GT_TK][vd + 8] and P [16][GT_TK + 4]; the warps' merge ([warps][16] maxima and sums,
/// [warps][16][vd + 8] accumulators) reuses the warps' part.
pub(crate) fn gqa_tc_smem(hd: usize, vd: usize, warps: usize) -> usize {
    let per_warp = warps * (2 * GT_TK * (hd + 4) + 2 * GT_TK * (vd + 8) + 16 * (GT_TK + 4));
    let merge = warps * 16 * (2 + vd + 8);
    4 * (2 * 16 * (hd + 4) + per_warp.max(merge))
}

/// Blocks per (row, head) of decode attention over `span` positions, for `row_heads` (rows x
/// heads) of them: a span longer than twice `split` is split `split` positions per block (at
/// most 64 blocks). With `fill` (one wave of `attention_v2_kv`, in blocks), rows x heads blocks
/// that leave most SMs idle (a decode step of one or two sequences) are split further, as long
/// as the grid still fits that wave and each block keeps 32 positions of the span: at batch 1
/// on the H100 (Flash shapes, 64 heads, 128 positions: 4 splits, 256 blocks) the attention and
/// its combine launch took the 18-layer step from 2.916 to 2.817 ms; batch 4 and up are not
/// split (benches/results/2026-11-23-attention-fill-moe-trace.md).
pub(crate) fn attention_splits(span: usize, split: usize, fill: Option<usize>, row_heads: usize) -> usize {
    let by_len = if span > 2 * split { span.div_ceil(split) } else { 1 };
    let by_fill = fill.map_or(1, |wave| (wave / row_heads.max(1)).min(span / 32));
    by_len.max(by_fill).clamp(1, 64)
}

pub(crate) fn upload<T: cudarc::driver::DeviceRepr>(s: &Arc<CudaStream>, v: &[T]) -> Result<CudaSlice<T>> {
    s.clone_htod(v).map_err(drv)
}

/// MiMo-V2.5-Pro's fused `qkv_proj` (rows grouped per KV head: [Q of its heads | K | V]) split
/// into q, k and v as exact f32 (a 128-row FP8 scale block may straddle K and V, so the split is
/// done after decoding, as the CPU reference does).
fn split_fused_qkv(s: &Arc<CudaStream>, w: &dyn WeightSource, pa: &str, a: &AttentionSpec, h: usize) -> Result<(Mat, Mat, Mat)> {
    let fused = w.matrix(&format!("{pa}.qkv_proj.weight"), a.q_dim() + a.k_dim() + a.v_dim(), h)?;
    let qpg = a.num_heads / a.num_kv_heads * a.head_dim;
    let group = qpg + a.head_dim + a.v_head_dim;
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for g in 0..a.num_kv_heads {
        let base = g * group * h;
        q.extend_from_slice(&fused[base..base + qpg * h]);
        k.extend_from_slice(&fused[base + qpg * h..base + (qpg + a.head_dim) * h]);
        v.extend_from_slice(&fused[base + (qpg + a.head_dim) * h..base + group * h]);
    }
    let m = |d: Vec<f32>, n: usize| -> Result<Mat> { Ok(Mat { m: GpuMatrix::F32(upload(s, &d)?), n, k: h }) };
    Ok((m(q, a.q_dim())?, m(k, a.k_dim())?, m(v, a.v_dim())?))
}

pub(crate) fn load_ffn(s: &Arc<CudaStream>, w: &Source, p: &str, h: usize, i: usize) -> Result<Ffn> {
    let (gate, up) = (w.mat(s, &format!("{p}.gate_proj.weight"), i, h)?, w.mat(s, &format!("{p}.up_proj.weight"), i, h)?);
    let stack = std::env::var("PEREGRINE_FFN_STACK").map_or(true, |v| v != "0");
    let gate_up = match if stack { stack_rows(s, &[&gate, &up])? } else { None } {
        Some(m) => GateUp::Stacked { m, i },
        None => GateUp::Separate { gate, up },
    };
    Ok(Ffn { gate_up, down: w.mat(s, &format!("{p}.down_proj.weight"), h, i)? })
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
        let ops = load_ops(&gpu)?;
        let m = ops.module.clone();
        let f = |n: &str| m.load_function(n).map_err(|e| Error::Backend(format!("kernel {n}: {e}")));
        let sms = gpu.ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(drv)? as usize;
        let attention_kv_wave = ops.attention_v2_kv.occupancy_max_active_blocks_per_multiprocessor(256, 0, None).map_err(drv)? as usize * sms;
        let attention_ready_pre_wave = ops.attention_v2_kv_ready_pre.occupancy_max_active_blocks_per_multiprocessor(256, 0, None).map_err(drv)? as usize * sms;
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
                    if ms.n_group > 64 || ms.num_experts > 4096 || ms.top_k > 64 {
                        return Err(Error::Unsupported(format!("{} experts in {} groups, top-{}, on the CUDA backend (at most 4096, 64, 64)", ms.num_experts, ms.n_group, ms.top_k)));
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
            None
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
        let route_acc_stride = layers.iter().filter_map(|l| if let Mlp::Moe { spec, .. } = &l.mlp { Some(route_acc_copies * spec.num_experts + 1) } else { None }).max().unwrap_or(1);
        let route_acc = s.alloc_zeros::<u64>(layers.len().max(1) * route_acc_stride).map_err(drv)?;
        let argmax_key = s.alloc_zeros::<u64>(crate::kernels::ARGMAX_KEY_SLOTS * crate::kernels::ARGMAX_KEY_STRIDE).map_err(drv)?;
        let route_ssq = s.alloc_zeros::<f32>(h.div_ceil(16)).map_err(drv)?;
        let route_hg = s.alloc_zeros::<f32>(h).map_err(drv)?;
        let model = CudaModel {
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
            kv_config: None,
            drafter: None,
            draft_kv: Vec::new(),
            graphs: Graphs::new(capturable, spec.vocab_size),
            moe_counters: std::sync::Mutex::new(moe_counters),
            route_counter,
            attn_split: std::env::var("PEREGRINE_ATTN_SPLIT").ok().and_then(|v| v.parse().ok()).filter(|&v: &usize| v >= 32).unwrap_or(512),
            attn_tc_split: std::env::var("PEREGRINE_ATTN_TC_SPLIT").ok().and_then(|v| v.parse().ok()).filter(|&v: &usize| v >= 32).unwrap_or(ATTN_TC_SPLIT),
            attn_merge_sharers: std::env::var("PEREGRINE_ATTN_MERGE_SHARERS").ok().and_then(|v| v.parse().ok()).filter(|&v: &usize| v >= 1).unwrap_or(GT_MERGE_SHARERS),
            kv_in_attention: std::env::var("PEREGRINE_KV_IN_ATTENTION").map_or(true, |v| v != "0"),
            moe_norm_split: std::env::var("PEREGRINE_MOE_NORM_SPLIT").map_or(true, |v| v != "0"),
            norm_split_first: std::env::var("PEREGRINE_NORM_SPLIT_FIRST").map_or(true, |v| v != "0"),
            attention_kv_wave,
            attention_ready_pre_wave,
            attention_ready_pre: std::env::var("PEREGRINE_ATTN_READY_PRE").map_or(true, |v| v != "0"),
            attn_reset_by_next: std::env::var("PEREGRINE_ATTN_RESET_BY_NEXT").map_or(true, |v| v != "0"),
            sm_count: sms,
            attn_heads_min_rows: std::env::var("PEREGRINE_ATTN_HEADS_MIN_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(ATTN_HEADS_MIN_ROWS),
            attn_tc_min_rows: std::env::var("PEREGRINE_ATTN_TC_MIN_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(ATTN_TC_MIN_ROWS),
            attn_tc_min_span: std::env::var("PEREGRINE_ATTN_TC_MIN_SPAN").ok().and_then(|v| v.parse().ok()).unwrap_or(ATTN_TC_MIN_SPAN),
            attn_tc_warps: std::env::var("PEREGRINE_ATTN_TC_WARPS").ok().and_then(|v| v.parse().ok()).filter(|w| GQA_TC_WARPS.contains(w)),
            attn_counters,
            merge_in_attention: std::env::var("PEREGRINE_ATTN_MERGE_IN_KERNEL").map_or(true, |v| v != "0"),
            qkv_ready: std::env::var("PEREGRINE_QKV_READY").map_or(true, |v| v != "0"),
            ready_counters,
            attn_fill: std::env::var("PEREGRINE_ATTN_FILL").map_or(true, |v| v != "0"),
            route_in_moe: std::env::var("PEREGRINE_MOE_ROUTE_IN_KERNEL").map_or(true, |v| v != "0"),
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
            prefill_pdl: std::env::var("PEREGRINE_PREFILL_PDL").is_ok_and(|v| v == "1"),
            drain_after_mlp_rows: std::env::var("PEREGRINE_DRAIN_AFTER_MLP_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(DRAIN_AFTER_MLP_ROWS),
            drain_after_mlp_op: std::env::var("PEREGRINE_DRAIN_AFTER_MLP_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(1),
            plain_from_rows: std::env::var("PEREGRINE_PLAIN_FROM_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(PLAIN_FROM_ROWS),
        };
        // The MoE decode kernel per token count, measured on the first MoE layer's experts
        // (every MoE layer of a model has the same shapes).
        if let Some((w, top_k)) = model.first_moe() {
            let t0 = std::time::Instant::now();
            if !model.kernels.tune_moe(w, top_k)?.is_empty() {
                let chosen: Vec<String> = model.moe_kernel_choices().iter().map(|(t, k)| format!("{t}: {k:?}")).collect();
                tracing::info!("MoE kernels tuned in {:.2} s: {}", t0.elapsed().as_secs_f64(), chosen.join(", "));
            }
        }
        Ok(model)
    }

    /// The first layer with stacked (GPU-routed) experts: its weights and top-k.
    fn first_moe(&self) -> Option<(&MoeWeights, usize)> {
        self.layers.iter().find_map(|l| match &l.mlp {
            Mlp::Moe { spec, experts: Experts::Stacked(w), .. } => Some((w, spec.top_k)),
            _ => None,
        })
    }

    /// For benchmarks: every kernel compiled again under `defines` (measurement defines, as
    /// `PEREGRINE_KERNEL_DEFINES` would give them), with this model's MoE tuning, for
    /// `swap_kernel_set`. Settings derived from ops.cu's occupancy at load stay the model's.
    pub fn load_kernel_set(&self, defines: &str) -> Result<KernelSet> {
        let (kernels, ops) = compile::with_defines(defines, || -> Result<_> { Ok((Kernels::load(&self.gpu)?, load_ops(&self.gpu)?)) })?;
        let choices = self.kernels.moe_choices.lock().unwrap_or_else(|e| e.into_inner()).clone();
        *kernels.moe_choices.lock().unwrap_or_else(|e| e.into_inner()) = choices;
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
        let (ptx, _) = compile::ptx("ops", compile::OPS_CU, nvrtc_arch(self.gpu.capability))?;
        let m = self.gpu.ctx.load_module(ptx).map_err(drv)?;
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
            synth.fill_floats(&st, k, 1.0, 0.0)?;
            synth.fill_floats(&st, v, 1.0, 0.0)?;
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

    /// The MoE decode kernel chosen per token count (`moe_tune::tuned_counts`) for this
    /// model's experts, as `tune_moe` measured at load; empty when nothing was tuned.
    pub fn moe_kernel_choices(&self) -> Vec<(usize, crate::MoeKernel)> {
        let Some((w, top_k)) = self.first_moe() else { return Vec::new() };
        crate::moe_tune::tuned_counts().iter().filter_map(|&t| self.kernels.tuned_moe(w, top_k, t).map(|k| (t, k))).collect()
    }

    pub(crate) fn zeros(&self, n: usize) -> Result<CudaSlice<f32>> {
        self.kernels.zeros(n)
    }

    /// An uninitialised buffer, for outputs a kernel writes in full (saves a memset per op).
    pub(crate) fn empty(&self, n: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: every caller passes it to a kernel that writes all `n` elements before reads.
        unsafe { self.kernels.alloc.alloc::<f32>(n) }
    }

    pub(crate) fn matvec(&self, m: &Mat, x: &CudaSlice<f32>, t: usize) -> Result<CudaSlice<f32>> {
        let mut y = self.empty(t * m.n)?;
        self.matvec_into(m, x, t, &mut y)?;
        Ok(y)
    }

    pub(crate) fn matvec_into(&self, m: &Mat, x: &CudaSlice<f32>, t: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        match &m.m {
            GpuMatrix::Bf16(w) => self.kernels.gemv_bf16(w, x, y, m.n, m.k, t),
            GpuMatrix::Fp8 { w, s } => self.kernels.gemv_fp8(w, s, x, y, m.n, m.k, t),
            GpuMatrix::Mxfp4 { w, s } => self.kernels.gemv_mxfp4(w, s, x, y, m.n, m.k, t),
            GpuMatrix::F32(w) => self.gemv_f32_into(w, m.n, m.k, x, t, y),
        }
    }

    /// f32 weights (routers, exact fallbacks): `gemv_f32` at one row; from 2 rows up to
    /// `F32_TILES_MAX_ROWS` (where K % 4 == 0 and gemv_f32's block is at most 512 threads)
    /// `gemv_f32_tiles`, which gives gemv_f32's bits, so a router's logits of a token do not
    /// depend on the batch (decode and verify blocks alike); above, the tiled `gemm_f32_nt`
    /// from `GEMM_F32_MIN_ROWS` rows when K % 4 == 0 (a prefill chunk: gemv_f32 walks the rows one
    /// block per weight row, token after token, ~2.5 ms per layer for 2048 tokens of
    /// MiMo-V2-Flash's router).
    fn gemv_f32_into(&self, w: &CudaSlice<f32>, n: usize, k: usize, x: &CudaSlice<f32>, t: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        let (ni, ki, tt) = (n as i32, k as i32, t as i32);
        let threads = gemv_f32_threads(k);
        if self.f32_tiles && (2..F32_TILES_MAX_ROWS).contains(&t) && k.is_multiple_of(4) && threads <= 512 {
            // Tokens per block: 4 below 32 rows (16 rows: 64 blocks walking 16 tokens each were no
            // faster than gemv_f32), else F32_TILES_TOKENS.
            let per = if t < GEMM_F32_MIN_ROWS { 4 } else { F32_TILES_TOKENS };
            let mut b = crate::launch::builder(&self.stream, &self.ops.gemv_f32_tiles);
            let pi = per as i32;
            b.arg(w).arg(x).arg(y).arg(&ni).arg(&ki).arg(&tt).arg(&pi);
            let grid = (n.div_ceil(F32_TILES_ROWS) as u32, t.div_ceil(per) as u32, 1);
            unsafe { b.launch(LaunchConfig { grid_dim: grid, block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
            return Ok(());
        }
        if t >= GEMM_F32_MIN_ROWS && k.is_multiple_of(4) {
            let mut b = crate::launch::builder(&self.stream, &self.ops.gemm_f32_nt);
            b.arg(w).arg(x).arg(y).arg(&ni).arg(&ki).arg(&tt);
            unsafe { b.launch(LaunchConfig { grid_dim: (n.div_ceil(64) as u32, t.div_ceil(32) as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
            return Ok(());
        }
        let mut b = crate::launch::builder(&self.stream, &self.ops.gemv_f32);
        b.arg(w).arg(x).arg(y).arg(&ni).arg(&ki).arg(&tt);
        let threads = if k.is_multiple_of(4) { gemv_f32_threads(k) } else { 256 };
        unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    /// logits = router(xn) with xn = RMSNorm(x + a) * w computed by every block of the router
    /// (`gemv_f32_norm`), and xn: the bits of `add_rms_norm` then `matvec`, with x not written
    /// (the caller leaves x + a to the residual add after the MoE). Routers `router_takes_norm`
    /// accepts only.
    pub(crate) fn router_normed(&self, router: &Mat, x: &CudaSlice<f32>, a: &CudaSlice<f32>, w: &CudaSlice<f32>, t: usize) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
        let (GpuMatrix::F32(wr), true) = (&router.m, router_takes_norm(router, t)) else {
            return Err(Error::Backend(format!("router_normed: a {}x{} router at {t} rows does not take the norm", router.n, router.k)));
        };
        let k = router.k;
        if x.len() < t * k || a.len() < t * k || w.len() < k {
            return Err(Error::Backend(format!("router_normed: inputs hold fewer than {t} rows of {k}")));
        }
        let (mut y, mut xn) = (self.empty(t * router.n)?, self.empty(t * k)?);
        let (ni, ki, tt, eps) = (router.n as i32, k as i32, t as i32, self.spec.rms_norm_eps);
        let mut b = crate::launch::builder(&self.stream, &self.ops.gemv_f32_norm);
        b.arg(wr).arg(x).arg(a).arg(w).arg(&mut y).arg(&mut xn).arg(&ni).arg(&ki).arg(&tt).arg(&eps);
        // gemv_f32's threads: the kernel reproduces norm_cfg's reduction from them.
        let threads = gemv_f32_threads(k);
        unsafe { b.launch(LaunchConfig { grid_dim: (router.n as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok((y, xn))
    }

    pub(crate) fn rms_norm(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, rows: usize, d: usize) -> Result<CudaSlice<f32>> {
        let mut y = self.empty(rows * d)?;
        self.rms_norm_into(x, w, &mut y, rows, d)?;
        Ok(y)
    }

    fn rms_norm_into(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, y: &mut CudaSlice<f32>, rows: usize, d: usize) -> Result<()> {
        let (dd, eps) = (d as i32, self.spec.rms_norm_eps);
        let mut b = crate::launch::builder(&self.stream, &self.ops.rms_norm);
        b.arg(x).arg(w).arg(y).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
        Ok(())
    }

    pub(crate) fn add_inplace(&self, a: &mut CudaSlice<f32>, b2: &CudaSlice<f32>, n: usize) -> Result<()> {
        let nn = n as i32;
        let mut b = crate::launch::builder(&self.stream, &self.ops.add_inplace);
        b.arg(a).arg(b2).arg(&nn);
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(drv)?;
        Ok(())
    }

    /// A dense MLP, down(silu(gate(x)) * up(x)), over `t` rows of x. Stacked gate and up run
    /// as one GEMV; an FP8 down then reads silu x up split by `silu_mul_split_f16` (one launch
    /// for `silu_mul` and the down GEMV's own split). The bits of the separate launches.
    pub(crate) fn ffn(&self, f: &Ffn, x: &CudaSlice<f32>, t: usize) -> Result<CudaSlice<f32>> {
        self.ffn_split(f, x, None, t)
    }

    /// `ffn`, with x's F16 split when the norm ahead wrote it (`wants_dense_split`).
    pub(crate) fn ffn_split(&self, f: &Ffn, x: &CudaSlice<f32>, x_split: Option<&F16Split>, t: usize) -> Result<CudaSlice<f32>> {
        let a = match &f.gate_up {
            GateUp::Stacked { m, i } => {
                let gu = match (&m.m, x_split) {
                    (GpuMatrix::Fp8 { w, s }, Some(split)) => {
                        let mut gu = self.empty(t * m.n)?;
                        self.kernels.gemv_fp8_presplit(w, s, split, &mut gu, m.n, m.k, t)?;
                        gu
                    }
                    _ => self.matvec(m, x, t)?,
                };
                if let (GpuMatrix::Fp8 { w, s }, true) = (&f.down.m, Kernels::silu_split_takes(*i) && f.down.k.is_multiple_of(128)) {
                    let a = self.kernels.silu_mul_split_f16(&gu, t, *i)?;
                    let mut y = self.empty(t * f.down.n)?;
                    self.kernels.gemv_fp8_presplit(w, s, &a, &mut y, f.down.n, f.down.k, t)?;
                    return Ok(y);
                }
                self.silu_mul(&gu.slice(..), &gu.slice(*i..), t, *i, 2 * *i)?
            }
            GateUp::Separate { gate, up } => {
                let (g, u) = (self.matvec(gate, x, t)?, self.matvec(up, x, t)?);
                self.silu_mul(&g.slice(..), &u.slice(..), t, gate.n, gate.n)?
            }
        };
        self.matvec(&f.down, &a, t)
    }

    /// [rows, i] silu(g) * u, row r of g and u starting at r x `ld`.
    pub(crate) fn silu_mul(&self, g: &CudaView<f32>, u: &CudaView<f32>, rows: usize, i: usize, ld: usize) -> Result<CudaSlice<f32>> {
        let n = rows * i;
        if g.len() < (rows.max(1) - 1) * ld + i || u.len() < (rows.max(1) - 1) * ld + i {
            return Err(Error::Backend(format!("silu_mul: inputs hold fewer than {rows} rows of {i} ({ld} apart)")));
        }
        let mut a = self.empty(n)?;
        let (ii, ld, nn) = (i as i32, ld as i32, n as i32);
        let mut b = crate::launch::builder(&self.stream, &self.ops.silu_mul);
        b.arg(g).arg(u).arg(&mut a).arg(&ii).arg(&ld).arg(&nn);
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(drv)?;
        Ok(a)
    }

    /// Whether layer `li`'s attention kernel can apply RoPE and write the new K/V itself (the
    /// v2 kernel, for decode rows: `Op::Attention::kv_in_attention`).
    pub(crate) fn attention_takes_kv(&self, li: usize) -> bool {
        self.kv_in_attention && uses_attention_v2(&self.layers[li].attn.spec)
    }

    /// `hn_split`: hn's F16 split when the norm wrote it (`wants_f16_split`); `kv_in_attention`:
    /// the attention kernel rotates q and k and writes the pool (decode rows only).
    /// `res` (where `route_in_oproj_at`): the residual, for the o_proj that does the router.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention(&self, li: usize, hn: &CudaSlice<f32>, hn_split: Option<&F16Split>, n: usize, meta: &RowMeta, kv_in_attention: bool, res: Option<&CudaSlice<f32>>) -> Result<CudaSlice<f32>> {
        let l = &self.layers[li];
        let a = &l.attn;
        let s = a.spec;
        let v2 = uses_attention_v2(&s);
        // The fused kernel holds fewer blocks per SM than attention_v2: only while its grid fits
        // one wave is it the faster of the two (a second wave cost more than the launch saved).
        let splits = self.attn_splits(&s, meta.max_blocks, meta.block_size, n);
        let kv_fused = kv_in_attention && v2 && n * s.num_heads * splits <= self.attention_kv_wave && self.gqa_tc_for(&s, meta.max_blocks, meta.block_size, n).is_none();
        // A BF16 o_proj on the tensor-core path reads the attention's own BF16 split of o.
        let presplit = v2 && a.o.k.is_multiple_of(128) && matches!(a.o.m, GpuMatrix::Bf16(_));
        // Each head's attention may start as soon as the projection has written its rows.
        let ready = kv_fused && self.qkv_ready_at(li, n);
        let (mut q, mut k, mut v, ready) = match (&a.qkv, hn_split) {
            (Qkv::Stacked { m: Mat { m: GpuMatrix::Fp8 { w, s: sc }, k: kk, .. }, rows }, Some(split)) if ready => {
                let (mut q, mut k, mut v) = (self.empty(n * rows[0])?, self.empty(n * rows[1])?, self.empty(n * rows[2])?);
                let bufs = self.attend_bufs(n, &s, presplit, Some(splits))?;
                let wp = w.device_ptr(&self.stream).0;
                self.kernels.gemv_qkv_ready(wp, sc, split, [&mut q, &mut k, &mut v], *rows, *kk, n, &self.ready_counters, s.num_heads, s.head_dim, s.v_head_dim)?;
                // The BF16 o_proj over the attention's own split follows it directly and zeroes
                // the counters (`zero_after_wait`).
                let counts = ReadyCounts { counters: &self.ready_counters, need_q: (s.head_dim / 16) as u32, need_kv: ((s.head_dim + s.v_head_dim) / 16) as u32, reset_by_next: presplit && self.attn_reset_by_next && self.kernels.bf16_presplit_zeroes(n, a.o.n), bufs: Some(bufs) };
                (q, k, v, Some(counts))
            }
            _ => {
                let (q, k, v) = self.project_qkv(&a.qkv, hn, hn_split, n)?;
                (q, k, v, None)
            }
        };
        if let Some((bq, bk, bv)) = &a.bias {
            for (t, bb, d) in [(&mut q, bq, s.q_dim()), (&mut k, bk, s.k_dim()), (&mut v, bv, s.v_dim())] {
                let (dd, nn) = (d as i32, n as i32);
                let mut b = crate::launch::builder(&self.stream, &self.ops.add_bias);
                b.arg(&mut *t).arg(bb).arg(&dd).arg(&nn);
                unsafe { b.launch(LaunchConfig::for_num_elems((n * d) as u32)) }.map_err(drv)?;
            }
        }
        if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
            q = self.rms_norm(&q, qn, n * s.num_heads, s.head_dim)?;
            k = self.rms_norm(&k, kn, n * s.num_kv_heads, s.head_dim)?;
        }
        let (kc, vc) = &self.kv[li];
        let slots = if l.swa { &meta.swa_slots } else { &meta.full_slots };
        let fresh = if kv_fused {
            Some(FreshKv { k: &k, v: &v, slots, ready })
        } else {
            self.rope_kv_write(&mut q, &k, &v, kc, vc, &meta.pos, slots, n, &s)?;
            None
        };
        let tables = if l.swa { &meta.swa_tables } else { &meta.full_tables };
        let prefill = if fresh.is_none() { meta.prefill.as_ref() } else { None };
        let counted = fresh.as_ref().is_some_and(|f| f.ready.is_some());
        let reset_by_next = fresh.as_ref().and_then(|f| f.ready.as_ref()).is_some_and(|r| r.reset_by_next);
        // The projection counted its tiles and no kernel will zero them: zero them behind it
        // (stream order), or the next step's attention would not wait.
        let zero_counters = || {
            let (p, _g) = self.ready_counters.device_ptr(&self.stream);
            // SAFETY: the counters' own allocation, on this stream, as u32 zeros.
            let _ = unsafe { cudarc::driver::result::memset_d8_async(p, 0, self.ready_counters.len() * std::mem::size_of::<u32>(), self.stream.cu_stream()) };
        };
        let (o, split) = match self.attend(&q, kc, vc, &meta.pos, &meta.seq, tables, meta.max_blocks, meta.block_size, n, &s, a.sinks.as_ref(), v2, presplit, fresh, prefill) {
            Ok(r) => r,
            Err(e) if counted => {
                zero_counters();
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        match (&a.o.m, split) {
            (GpuMatrix::Bf16(w), Some((oh, ol))) => {
                let mut y = self.empty(n * a.o.n)?;
                let zero = reset_by_next.then_some(&self.ready_counters);
                let r = match res {
                    Some(res) => self.route_bufs(li, res).and_then(|rb| self.kernels.gemv_bf16_presplit_route(w, &oh, &ol, &mut y, a.o.n, a.o.k, zero, &rb)),
                    None => self.kernels.gemv_bf16_presplit(w, &oh, &ol, &mut y, a.o.n, a.o.k, n, zero),
                };
                if r.is_err() && reset_by_next {
                    zero_counters();
                }
                r.map(|_| y)
            }
            _ if res.is_some() => Err(Error::Backend(format!("layer {li}: the o_proj that does the router is the BF16 one over the attention's split"))),
            _ => {
                if reset_by_next {
                    // (Not reached: a BF16 split o_proj is what reset_by_next was set for.)
                    zero_counters();
                }
                self.matvec(&a.o, &o, n)
            }
        }
    }

    /// Whether layer `li`'s attention of `rows` decode rows starts each head as soon as the
    /// q/k/v projection has written its rows (`qkv_ready`): a stacked FP8 projection over the
    /// norm's F16 split in shapes `Kernels::qkv_ready_takes`, nothing (bias, q/k norms) between
    /// it and the attention. `attention` also needs the K/V write inside the attention.
    fn qkv_ready_at(&self, li: usize, rows: usize) -> bool {
        let a = &self.layers[li].attn;
        let s = &a.spec;
        self.qkv_ready
            && a.bias.is_none()
            && a.q_norm.is_none()
            && a.k_norm.is_none()
            && self.wants_f16_split(li)
            && matches!(&a.qkv, Qkv::Stacked { m, rows: r } if matches!(m.m, GpuMatrix::Fp8 { .. }) && self.kernels.qkv_ready_takes(*r, s.num_heads, s.head_dim, s.v_head_dim, m.k, rows))
    }

    /// Layers whose attention of `rows` decode rows would start heads as their projection
    /// finishes them (`qkv_ready_at`, where the attention writes the K/V itself); for tests.
    pub fn qkv_ready_layers(&self, rows: usize) -> usize {
        (0..self.layers.len()).filter(|&l| self.attention_takes_kv(l) && self.qkv_ready_at(l, rows)).count()
    }

    /// Layers whose decode attention of `rows` rows over block tables `max_blocks` wide runs
    /// on the tensor cores (`attention_gqa_tc`, `gqa_tc_for`); for tests. 0 before `init_kv`.
    pub fn tensor_core_decode_layers(&self, rows: usize, max_blocks: usize) -> usize {
        let Some(cfg) = self.kv_config else { return 0 };
        self.layers.iter().filter(|l| self.gqa_tc_for(&l.attn.spec, max_blocks, cfg.block_size, rows).is_some()).count()
    }

    /// Sets whether attention starts heads as their projection finishes them (`qkv_ready`; on
    /// by default), for tests comparing the two (the same bits). Captured step graphs are
    /// dropped.
    pub fn set_qkv_ready(&mut self, on: bool) {
        self.qkv_ready = on;
        self.graphs.clear();
    }

    /// Sets whether the ready attention loads its first K/V rows before waiting for its heads
    /// where its grid fits one wave (`attention_v2_kv_ready_pre`; on by default), for tests
    /// comparing the two (the same bits). Captured step graphs are dropped.
    pub fn set_attention_preload(&mut self, on: bool) {
        self.attention_ready_pre = on;
        self.graphs.clear();
    }

    /// Sets whether the o_proj after a ready attention zeroes its counters (`reset_by_next`; on
    /// by default) or the attention's last block does, for tests covering both. Captured step
    /// graphs are dropped.
    pub fn set_attn_reset_by_next(&mut self, on: bool) {
        self.attn_reset_by_next = on;
        self.graphs.clear();
    }

    /// The counters the ready projection and attention share (all zero between calls).
    pub fn qkv_ready_counters(&self) -> Result<Vec<u32>> {
        self.stream.clone_dtoh(&self.ready_counters).map_err(drv)
    }

    /// Blocks per (row, head) of `attention_v2` for `rows` rows (`attention_splits`), as the
    /// block tables allow, so a graph captured for a table width and row bucket keeps its count.
    fn attn_splits(&self, s: &AttentionSpec, max_blocks: usize, block_size: usize, rows: usize) -> usize {
        let span = s.window().map_or(max_blocks * block_size, |w| w.min(max_blocks * block_size));
        attention_splits(span, self.attn_split, self.attn_fill.then_some(self.attention_kv_wave), rows * s.num_heads)
    }

    /// Blocks per (row, block of 8 heads) of `attention_v2_heads` for `rows` rows, whose
    /// blocks take `smem` bytes: as for `attention_v2`, its blocks counted per 8 heads and
    /// filling its own wave.
    fn attn_heads_splits(&self, s: &AttentionSpec, max_blocks: usize, block_size: usize, rows: usize, smem: usize) -> Result<usize> {
        let span = s.window().map_or(max_blocks * block_size, |w| w.min(max_blocks * block_size));
        let wave = self.ops.attention_v2_heads.occupancy_max_active_blocks_per_multiprocessor(256, smem, None).map_err(drv)? as usize * self.sm_count;
        Ok(attention_splits(span, self.attn_split, self.attn_fill.then_some(wave), rows * s.num_heads.div_ceil(ATT_WARPS)))
    }

    /// The tensor-core GQA kernel that serves decode attention of `n` rows without the K/V write
    /// inside, if any: one is compiled for `s`'s head dims, its heads per KV head fit the MMA's
    /// 16 rows, and the rows or the table width reach `attn_tc_min_rows` / `attn_tc_min_span`
    /// (by the row bucket and the table width only, so a captured graph keeps its kernel).
    /// Its blocks are of 8 warps while the rows x KV heads fit one wave of them, else of 4
    /// (`gqa_tc_warps_for`); `attn_tc_warps` forces either.
    pub(crate) fn gqa_tc_for(&self, s: &AttentionSpec, max_blocks: usize, block_size: usize, n: usize) -> Option<GqaTc<'_>> {
        let i = PREFILL_TC_SHAPES.iter().position(|&d| d == (s.head_dim, s.v_head_dim))?;
        let fits = s.num_kv_heads > 0 && s.num_heads.is_multiple_of(s.num_kv_heads) && s.num_heads / s.num_kv_heads <= 16;
        let span = s.window().map_or(max_blocks * block_size, |w| w.min(max_blocks * block_size));
        let wanted = n >= self.attn_tc_min_rows || span >= self.attn_tc_min_span;
        if !(fits && wanted && uses_attention_v2(s)) {
            return None;
        }
        let forms = &self.ops.attention_gqa_tc[i];
        let warps = self.attn_tc_warps.unwrap_or_else(|| {
            // (The occupancy query fails only on a broken context, which the launch reports.)
            let wave8 = self.gqa_tc_wave(s, &GqaTc { kernel: &forms[0], warps: GQA_TC_WARPS[0] }).unwrap_or(self.sm_count);
            gqa_tc_warps_for(n * s.num_kv_heads, wave8)
        });
        let form = GQA_TC_WARPS.iter().position(|&w| w == warps)?;
        Some(GqaTc { kernel: &forms[form], warps })
    }

    /// Blocks of `attention_gqa_tc` resident at once on the device (one wave).
    fn gqa_tc_wave(&self, s: &AttentionSpec, tc: &GqaTc) -> Result<usize> {
        let smem = gqa_tc_smem(s.head_dim, s.v_head_dim, tc.warps);
        Ok(tc.kernel.occupancy_max_active_blocks_per_multiprocessor((32 * tc.warps) as u32, smem, None).map_err(drv)? as usize * self.sm_count)
    }

    /// Blocks per (row, KV head) of `attention_gqa_tc` for `n` rows: as for `attention_v2`,
    /// filling one `wave` of its own blocks.
    fn gqa_tc_splits(&self, s: &AttentionSpec, wave: usize, max_blocks: usize, block_size: usize, n: usize) -> usize {
        let span = s.window().map_or(max_blocks * block_size, |w| w.min(max_blocks * block_size));
        attention_splits(span, self.attn_tc_split, self.attn_fill.then_some(wave), n * s.num_kv_heads)
    }

    /// Paged attention of `n` query rows over the K/V pools (`attention_v2`, or the one-warp
    /// `attention` when `v2` is false): row r at position pos[r] of sequence seq[r], whose
    /// block table is `tables[seq[r] * max_blocks..]`.
    #[allow(clippy::too_many_arguments)]
    /// With `bf16_split` (v2 only) the kernels also write o's BF16 hi + lo parts, which the
    /// o_proj tensor-core GEMV reads directly (no split kernel). With `fresh` (v2 only; decode
    /// rows) q is unrotated and the rows' new K/V are not yet in the pools: the kernel applies
    /// RoPE, scores each row's own position against its new K/V and writes them to the pools.
    /// With `prefill` (a batch with prompt chunks; v2 only, not with `fresh`), its tiles run
    /// `attention_prefill` and its other rows `attention_v2_rows`.
    pub(crate) fn attend(&self, q: &CudaSlice<f32>, kc: &CudaSlice<f32>, vc: &CudaSlice<f32>, pos: &CudaSlice<i32>, seq: &CudaSlice<i32>, tables: &CudaSlice<i32>, max_blocks: usize, block_size: usize, n: usize, s: &AttentionSpec, sinks: Option<&CudaSlice<f32>>, v2: bool, bf16_split: bool, mut fresh: Option<FreshKv>, prefill: Option<&PrefillRows>) -> Result<(CudaSlice<f32>, Option<Bf16Split>)> {
        if fresh.is_some() && !v2 {
            return Err(Error::Backend("the one-warp attention kernel cannot write the new K/V itself".into()));
        }
        let prefill = prefill.filter(|_| v2 && fresh.is_none() && s.head_dim.is_multiple_of(4) && s.v_head_dim.is_multiple_of(4) && s.v_head_dim <= 128);
        let given = fresh.as_mut().and_then(|f| f.ready.as_mut()).map(|r| r.bufs.take());
        let (mut o, mut split, given_parts) = match given {
            Some(Some(AttendBufs { o, split, parts: Some(parts) })) => (o, split, Some(parts)),
            Some(_) => return Err(Error::Backend("attention behind a ready projection: its buffers were not allocated ahead".into())),
            None => {
                let b = self.attend_bufs(n, s, v2 && bf16_split, None)?;
                (b.o, b.split, None)
            }
        };
        let (mb, bs, hh, kvh, hd, vd) = (max_blocks as i32, block_size as i32, s.num_heads as i32, s.num_kv_heads as i32, s.head_dim as i32, s.v_head_dim as i32);
        let window = s.window().map_or(0, |w| w as i32);
        let scale = s.softmax_scale;
        if let Some(pf) = prefill {
            let pa = &self.ops.attention_prefill;
            if let Some(kernel) = pa.tensor_core_kernel(s) {
                // Two heads of one KV head per block.
                let mut b = crate::launch::builder(&self.stream, kernel);
                b.arg(q).arg(kc).arg(vc).arg(&mut o).arg(pos).arg(seq).arg(tables).arg(&mb).arg(&bs).arg(&hh).arg(&kvh).arg(&window).arg(&scale);
                b.arg_or_null(sinks).arg_or_null(split.as_mut().map(|s| &mut s.0)).arg_or_null(split.as_mut().map(|s| &mut s.1));
                b.arg(&pf.tiles);
                let smem = prefill_attention_tc_smem(s.head_dim, s.v_head_dim) as u32;
                unsafe { b.launch(LaunchConfig { grid_dim: (pf.num_tiles as u32, (s.num_heads / 2) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem }) }.map_err(drv)?;
            } else {
                let mut b = crate::launch::builder(&self.stream, &pa.f32);
                b.arg(q).arg(kc).arg(vc).arg(&mut o).arg(pos).arg(seq).arg(tables).arg(&mb).arg(&bs).arg(&hh).arg(&kvh).arg(&hd).arg(&vd).arg(&window).arg(&scale);
                b.arg_or_null(sinks).arg_or_null(split.as_mut().map(|s| &mut s.0)).arg_or_null(split.as_mut().map(|s| &mut s.1));
                b.arg(&pf.tiles);
                let smem = prefill_attention_smem(s.head_dim, s.v_head_dim) as u32;
                unsafe { b.launch(LaunchConfig { grid_dim: (pf.num_tiles as u32, s.num_heads as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem }) }.map_err(drv)?;
            }
            if pf.num_rest == 0 {
                return Ok((o, split));
            }
        }
        // The rows attention_v2 serves: all, or a prefill batch's rows outside its tiles.
        let (grid_rows, rows) = match prefill {
            Some(pf) => (pf.num_rest, Some(&pf.rest)),
            None => (n, None),
        };
        // Decode rows whose K/V are in the pools: one warp per head from attn_heads_min_rows,
        // for the shapes it takes (attention_heads_smem).
        let heads_smem = attention_heads_smem(s);
        // Or, where gqa_tc_for says so, the heads of each KV head on the tensor cores.
        let gqa_tc = if v2 && fresh.is_none() && rows.is_none() { self.gqa_tc_for(s, max_blocks, block_size, n) } else { None };
        let gqa_tc_wave = gqa_tc.as_ref().map(|tc| self.gqa_tc_wave(s, tc)).transpose()?;
        let per_head_warps = gqa_tc.is_none() && v2 && fresh.is_none() && rows.is_none() && n >= self.attn_heads_min_rows && heads_smem.is_some();
        let heads_smem = heads_smem.unwrap_or(0);
        let splits = match (v2, per_head_warps, gqa_tc_wave) {
            (true, _, Some(wave)) => self.gqa_tc_splits(s, wave, max_blocks, block_size, n),
            (false, _, _) => 1,
            (true, true, None) => self.attn_heads_splits(s, max_blocks, block_size, n, heads_smem)?,
            (true, false, None) => self.attn_splits(s, max_blocks, block_size, n),
        };
        let (mut pm, mut pl, mut pa) = match given_parts {
            Some((splits_given, parts)) if splits_given == splits => parts,
            Some((g, _)) => return Err(Error::Backend(format!("attention buffers allocated for {g} splits, the launch has {splits}"))),
            None => self.attend_parts(n, s, splits)?,
        };
        // The last split of each (row, head) merges them (no combine launch) while the counters
        // cover the rows; a prefill batch's row list keeps attention_combine_rows.
        let merge_in_kernel = self.merge_in_attention && splits > 1 && rows.is_none() && n * s.num_heads <= self.attn_counters.len();
        let counters = merge_in_kernel.then_some(&self.attn_counters);
        let kernel = match (&gqa_tc, (v2, fresh.is_some(), rows.is_some())) {
            (Some(tc), _) => tc.kernel,
            (None, _) if per_head_warps => &self.ops.attention_v2_heads,
            // Its first round of K/V rows loaded while it waits for its heads, where its grid
            // fits one wave at the registers that takes (batch 1).
            (None, (true, true, _)) if fresh.as_ref().is_some_and(|f| f.ready.is_some()) && self.attention_ready_pre && n * s.num_heads * splits <= self.attention_ready_pre_wave => &self.ops.attention_v2_kv_ready_pre,
            (None, (true, true, _)) if fresh.as_ref().is_some_and(|f| f.ready.is_some()) => &self.ops.attention_v2_kv_ready,
            (None, (true, true, _)) => &self.ops.attention_v2_kv,
            (None, (true, false, true)) => &self.ops.attention_v2_rows,
            (None, (true, false, false)) => &self.ops.attention_v2,
            (None, (false, _, _)) => &self.ops.attention,
        };
        let mut b = crate::launch::builder(&self.stream, kernel);
        b.arg(q).arg(kc).arg(vc).arg(&mut o).arg(pos).arg(seq).arg(tables).arg(&mb).arg(&bs).arg(&hh).arg(&kvh).arg(&hd).arg(&vd).arg(&window).arg(&scale);
        b.arg_or_null(sinks);
        if v2 {
            b.arg(&mut pm).arg(&mut pl).arg(&mut pa).arg_or_null(split.as_mut().map(|s| &mut s.0)).arg_or_null(split.as_mut().map(|s| &mut s.1));
        }
        if let Some(wave) = gqa_tc_wave {
            let sharers = match counters {
                Some(_) => gqa_merge_sharers(self.attn_merge_sharers, n * s.num_kv_heads, splits, wave) as i32,
                None => 1,
            };
            b.arg_or_null(counters).arg(&sharers);
        } else if per_head_warps {
            b.arg_or_null(counters);
        } else if v2 {
            let (half, rd, th, vs) = (s.rope.rotary_dim.div_ceil(2) as i32, s.rope.rotary_dim as i32, s.rope.theta as f32, s.value_scale);
            match (&fresh, rows) {
                (Some(f), _) => {
                    b.arg(f.k).arg(f.v).arg(kc).arg(vc).arg(f.slots);
                }
                (None, Some(rows)) => {
                    b.arg(rows);
                }
                (None, None) => {
                    b.arg(&0u64).arg(&0u64).arg(&0u64).arg(&0u64).arg(&0u64);
                }
            }
            if rows.is_none() {
                b.arg(&half).arg(&rd).arg(&th).arg(&vs).arg_or_null(counters);
            }
            if let Some(r) = fresh.as_ref().and_then(|f| f.ready.as_ref()) {
                b.arg(r.counters).arg(&r.need_q).arg(&r.need_kv).arg(&(r.reset_by_next as i32));
            }
        }
        // 32 x ATT_WARPS for attention_v2 and attention_v2_heads, 32 x the form's warps for attention_gqa_tc.
        let threads = match &gqa_tc {
            Some(tc) => 32 * tc.warps as u32,
            None if v2 => 256,
            None => 32,
        };
        let (head_blocks, smem) = match &gqa_tc {
            Some(tc) => (s.num_kv_heads, gqa_tc_smem(s.head_dim, s.v_head_dim, tc.warps)),
            _ if per_head_warps => (s.num_heads.div_ceil(ATT_WARPS), heads_smem),
            _ => (s.num_heads, 0),
        };
        unsafe { b.launch(LaunchConfig { grid_dim: (grid_rows as u32, head_blocks as u32, splits as u32), block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 }) }.map_err(drv)?;
        if splits > 1 && !merge_in_kernel {
            let sp = splits as i32;
            let mut b = crate::launch::builder(&self.stream, if rows.is_some() { &self.ops.attention_combine_rows } else { &self.ops.attention_combine });
            b.arg(&pm).arg(&pl).arg(&pa).arg(&mut o).arg(&hh).arg(&vd).arg(&sp);
            b.arg_or_null(sinks).arg_or_null(split.as_mut().map(|s| &mut s.0)).arg_or_null(split.as_mut().map(|s| &mut s.1));
            if let Some(rows) = rows {
                b.arg(rows);
            }
            unsafe { b.launch(LaunchConfig { grid_dim: (grid_rows as u32, s.num_heads as u32, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        }
        Ok((o, split))
    }

    /// `attend`'s outputs for `n` rows (o, and its BF16 split with `bf16_split`), and with
    /// `splits` the split states too. `attend` allocates them itself, except behind a ready
    /// projection, which allocates them before it launches: the attention writes them while
    /// the projection still runs, so no buffer the projection reads may be handed back to them
    /// (the capture pool reuses a dropped buffer at once, crate::alloc), and eagerly an
    /// allocation between the two launches would cut their programmatic edge.
    fn attend_bufs(&self, n: usize, s: &AttentionSpec, bf16_split: bool, splits: Option<usize>) -> Result<AttendBufs> {
        let o = self.empty(n * s.o_dim())?;
        let split = if bf16_split {
            // Written in full by the attention kernels.
            let alloc = || unsafe { self.kernels.alloc.alloc::<u16>(n * s.o_dim()) };
            Some((alloc()?, alloc()?))
        } else {
            None
        };
        let parts = splits.map(|sp| Ok::<_, Error>((sp, self.attend_parts(n, s, sp)?))).transpose()?;
        Ok(AttendBufs { o, split, parts })
    }

    /// The split states of attention over `splits` blocks per (row, head): maxima, sums and
    /// accumulators (one element each when not split).
    fn attend_parts(&self, n: usize, s: &AttentionSpec, splits: usize) -> Result<SplitStates> {
        let parts = n * s.num_heads * splits;
        Ok(if splits > 1 { (self.empty(parts)?, self.empty(parts)?, self.empty(parts * s.v_head_dim)?) } else { (self.empty(1)?, self.empty(1)?, self.empty(1)?) })
    }

    /// Rotate-half RoPE of `heads` head vectors per row at the rows' positions.
    pub(crate) fn rope(&self, t: &mut CudaSlice<f32>, pos: &CudaSlice<i32>, n: usize, heads: usize, s: &AttentionSpec) -> Result<()> {
        let half = s.rope.rotary_dim.div_ceil(2);
        if half == 0 {
            return Ok(());
        }
        let (hh, hd, hf, rd, th) = (heads as i32, s.head_dim as i32, half as i32, s.rope.rotary_dim as i32, s.rope.theta as f32);
        let mut b = crate::launch::builder(&self.stream, &self.ops.rope);
        b.arg(t).arg(pos).arg(&hh).arg(&hd).arg(&hf).arg(&rd).arg(&th);
        unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, heads as u32, 1), block_dim: (half.next_multiple_of(32) as u32, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    /// q, k and v [n, rows] of the rows `x`.
    /// q, k and v of rows `x`; `x_split` (x's F16 split) is used by a stacked FP8 projection.
    pub(crate) fn project_qkv(&self, qkv: &Qkv, x: &CudaSlice<f32>, x_split: Option<&F16Split>, n: usize) -> Result<(CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>)> {
        match qkv {
            Qkv::Separate { q, k, v } => Ok((self.matvec(q, x, n)?, self.matvec(k, x, n)?, self.matvec(v, x, n)?)),
            Qkv::Stacked { m, rows } => {
                let (mut q, mut k, mut v) = (self.empty(n * rows[0])?, self.empty(n * rows[1])?, self.empty(n * rows[2])?);
                let (w, s) = match &m.m {
                    GpuMatrix::Fp8 { w, s } => (w.device_ptr(&self.stream).0, Some(s)),
                    GpuMatrix::Bf16(w) => (w.device_ptr(&self.stream).0, None),
                    _ => return Err(Error::Backend("stacked q/k/v must be FP8 or BF16".into())),
                };
                self.kernels.gemv_split3(w, s, x, x_split, [&mut q, &mut k, &mut v], *rows, m.k, n)?;
                Ok((q, k, v))
            }
        }
    }

    /// RoPE of q (in place) and k fused with the KV-cache write (V times the value scale).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rope_kv_write(&self, q: &mut CudaSlice<f32>, k: &CudaSlice<f32>, v: &CudaSlice<f32>, kc: &CudaSlice<f32>, vc: &CudaSlice<f32>, pos: &CudaSlice<i32>, slots: &CudaSlice<i64>, n: usize, s: &AttentionSpec) -> Result<()> {
        let half = s.rope.rotary_dim.div_ceil(2);
        let (hh, kvh, hd, vd, hf, rd, th, vs) = (s.num_heads as i32, s.num_kv_heads as i32, s.head_dim as i32, s.v_head_dim as i32, half as i32, s.rope.rotary_dim as i32, s.rope.theta as f32, s.value_scale);
        let mut b = crate::launch::builder(&self.stream, &self.ops.rope_kv_write);
        b.arg(q).arg(k).arg(v).arg(kc).arg(vc).arg(pos).arg(slots).arg(&hh).arg(&kvh).arg(&hd).arg(&vd).arg(&hf).arg(&rd).arg(&th).arg(&vs);
        // Enough blocks per row for about one rotated q pair per thread (at most 32).
        let per_row = (s.num_heads * half).max(s.num_kv_heads * s.head_dim).div_ceil(256).clamp(1, 32) as u32;
        unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, per_row, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    /// `x += a` then `RMSNorm(x) * w` in one kernel (the residual add fused with the next norm).
    pub(crate) fn add_rms_norm(&self, x: &mut CudaSlice<f32>, a: &CudaSlice<f32>, w: &CudaSlice<f32>, rows: usize, d: usize) -> Result<CudaSlice<f32>> {
        let mut y = self.empty(rows * d)?;
        let (dd, eps) = (d as i32, self.spec.rms_norm_eps);
        let mut b = crate::launch::builder(&self.stream, &self.ops.add_rms_norm);
        b.arg(x).arg(a).arg(w).arg(&mut y).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
        Ok(y)
    }

    /// Whether layer `li`'s q/k/v GEMV reads F16-split activations that `add_rms_norm_split`
    /// can write (a stacked FP8 projection, and a row the norm keeps in registers).
    pub(crate) fn wants_f16_split(&self, li: usize) -> bool {
        self.norm_holds_row() && matches!(&self.layers[li].attn.qkv, Qkv::Stacked { m, .. } if matches!(m.m, GpuMatrix::Fp8 { .. }))
    }

    /// Whether layer `li`'s dense MLP reads its input split (FP8 gate and up stacked), which the
    /// norm ahead then writes (`add_rms_norm_split`, as for the q/k/v projection).
    pub(crate) fn wants_dense_split(&self, li: usize) -> bool {
        self.norm_holds_row() && matches!(&self.layers[li].mlp, Mlp::Dense(Ffn { gate_up: GateUp::Stacked { m: Mat { m: GpuMatrix::Fp8 { .. }, .. }, .. }, .. }))
    }

    /// Whether the norms keep a row in registers (NORM_V = 4 float4s per thread), which their
    /// split-writing forms need.
    fn norm_holds_row(&self) -> bool {
        let d = self.spec.hidden_size;
        d.is_multiple_of(4) && d <= 4 * 4 * norm_cfg(1, d).block_dim.0 as usize
    }

    /// Whether layer `li`'s MoE of `rows` rows reads its input split (`Kernels::moe_reads_split_rows`)
    /// and the norm ahead can write it (`add_rms_norm_moe_split`): from 2 rows on the tiled
    /// kernels, the MoE GEMM. `decode`: the rows are decode rows (`Op::Mlp`'s).
    pub(crate) fn wants_moe_split(&self, li: usize, rows: usize, decode: bool) -> bool {
        self.moe_norm_split && self.norm_holds_row() && matches!(&self.layers[li].mlp, Mlp::Moe { spec, experts: Experts::Stacked(w), .. } if self.kernels.moe_reads_split_rows(w, rows, spec.top_k, decode))
    }

    /// `add_rms_norm`, also writing y split as the MoE kernels read x (`MoeSplit`), exactly as
    /// their own split launch (`moe_split_rows`) would.
    pub(crate) fn add_rms_norm_moe_split(&self, x: &mut CudaSlice<f32>, a: &CudaSlice<f32>, w: &CudaSlice<f32>, rows: usize, d: usize) -> Result<(CudaSlice<f32>, MoeSplit)> {
        let mut y = self.empty(rows * d)?;
        // Both written in full by the kernel.
        let mut xs = unsafe { self.kernels.alloc.alloc::<u32>(rows * d) }?;
        let mut inv = self.empty(rows)?;
        let (dd, eps) = (d as i32, self.spec.rms_norm_eps);
        let mut b = crate::launch::builder(&self.stream, &self.ops.add_rms_norm_moe_split);
        b.arg(x).arg(a).arg(w).arg(&mut y).arg(&mut xs).arg(&mut inv).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
        Ok((y, MoeSplit { xs, inv }))
    }

    /// The F16 split (hi, lo, inverse scales) of `rows` rows of `d` that a norm kernel writes
    /// in full.
    fn split_outputs(&self, rows: usize, d: usize) -> Result<F16Split> {
        // SAFETY: every word is written by the kernel the caller launches before any read.
        let (yh, yl) = unsafe { (self.kernels.alloc.alloc::<u16>(rows * d)?, self.kernels.alloc.alloc::<u16>(rows * d)?) };
        Ok((yh, yl, self.empty(rows)?))
    }

    /// `add_rms_norm`, also writing y's F16 split exactly as `split_f16` would.
    pub(crate) fn add_rms_norm_split(&self, x: &mut CudaSlice<f32>, a: &CudaSlice<f32>, w: &CudaSlice<f32>, rows: usize, d: usize) -> Result<(CudaSlice<f32>, F16Split)> {
        let mut y = self.empty(rows * d)?;
        let (mut yh, mut yl, mut yinv) = self.split_outputs(rows, d)?;
        let (dd, eps) = (d as i32, self.spec.rms_norm_eps);
        let mut b = crate::launch::builder(&self.stream, &self.ops.add_rms_norm_split);
        b.arg(x).arg(a).arg(w).arg(&mut y).arg(&mut yh).arg(&mut yl).arg(&mut yinv).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
        Ok((y, (yh, yl, yinv)))
    }

    /// `rms_norm` that also writes y's F16 split (`split_f16`'s bits), for a layer whose input
    /// norm has no residual add ahead (the first, after the embedding). Shapes
    /// `norm_holds_row` takes.
    pub(crate) fn rms_norm_split(&self, x: &CudaSlice<f32>, w: &CudaSlice<f32>, rows: usize, d: usize) -> Result<(CudaSlice<f32>, F16Split)> {
        if !(d.is_multiple_of(4) && d <= 4 * 4 * norm_cfg(1, d).block_dim.0 as usize) || x.len() < rows * d || w.len() < d {
            return Err(Error::Backend(format!("rms_norm_split: {rows} rows of {d} is not a shape it takes (or x / w are short)")));
        }
        let mut y = self.empty(rows * d)?;
        let (mut yh, mut yl, mut yinv) = self.split_outputs(rows, d)?;
        let (dd, eps) = (d as i32, self.spec.rms_norm_eps);
        let mut b = crate::launch::builder(&self.stream, &self.ops.rms_norm_split);
        b.arg(x).arg(w).arg(&mut y).arg(&mut yh).arg(&mut yl).arg(&mut yinv).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
        Ok((y, (yh, yl, yinv)))
    }

    /// The embeddings of `n` rows' tokens (as `embed_rows`) and their RMSNorm by `w` with its F16
    /// split (as `rms_norm_split` over them) in one launch: (x, y, split). Rows the norm keeps
    /// in registers only (`wants_f16_split`).
    pub(crate) fn embed_rms_norm_split(&self, tok: &CudaSlice<i32>, chain: Option<&CudaSlice<u64>>, w: &CudaSlice<f32>, n: usize) -> Result<(CudaSlice<f32>, CudaSlice<f32>, F16Split)> {
        let d = self.spec.hidden_size;
        if !(d.is_multiple_of(4) && d <= 4 * 4 * norm_cfg(1, d).block_dim.0 as usize) || w.len() < d || tok.len() < n {
            return Err(Error::Backend(format!("embed_rms_norm_split: {n} rows of {d} is not a shape it takes (or tok / w are short)")));
        }
        let mut x = self.empty(n * d)?;
        let mut y = self.empty(n * d)?;
        let (mut yh, mut yl, mut yinv) = self.split_outputs(n, d)?;
        let (dd, eps) = (d as i32, self.spec.rms_norm_eps);
        let mut b = crate::launch::builder(&self.stream, match &self.embed {
            Embed::F32(_) => &self.ops.embed_rms_norm_split,
            Embed::Bf16(_) => &self.ops.embed_rms_norm_split_bf16,
        });
        match &self.embed {
            Embed::F32(t) => b.arg(t),
            Embed::Bf16(t) => b.arg(t),
        };
        b.arg(tok).arg_or_null(chain).arg(&mut x).arg(w).arg(&mut y).arg(&mut yh).arg(&mut yl).arg(&mut yinv).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(n, d)) }.map_err(drv)?;
        Ok((x, y, (yh, yl, yinv)))
    }

    /// `add_rms_norm` (`split`: `add_rms_norm_split`) adding the routed MoE's output from its
    /// pairs: the same bits as combining them first.
    pub(crate) fn add_rms_norm_pairs(&self, x: &mut CudaSlice<f32>, pairs: &MoePairs, w: &CudaSlice<f32>, rows: usize, d: usize, split: bool) -> Result<(CudaSlice<f32>, Option<F16Split>)> {
        pairs.check(rows, d)?;
        let MoePairs { out, tok_pairs, topk, pre } = pairs;
        let mut y = self.empty(rows * d)?;
        let (dd, eps, k) = (d as i32, self.spec.rms_norm_eps, *topk as i32);
        if !split {
            let mut b = crate::launch::builder(&self.stream, &self.ops.add_rms_norm_pairs);
            b.arg(x).arg(out).arg(tok_pairs).arg(&k).arg_or_null(pre.as_ref()).arg(w).arg(&mut y).arg(&dd).arg(&eps);
            unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
            return Ok((y, None));
        }
        let (mut yh, mut yl, mut yinv) = self.split_outputs(rows, d)?;
        let mut b = crate::launch::builder(&self.stream, &self.ops.add_rms_norm_split_pairs);
        b.arg(x).arg(out).arg(tok_pairs).arg(&k).arg_or_null(pre.as_ref()).arg(w).arg(&mut y).arg(&mut yh).arg(&mut yl).arg(&mut yinv).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
        Ok((y, Some((yh, yl, yinv))))
    }

    /// `add_rms_norm_pairs` that also writes y's BF16 hi + lo parts (`split_bf16`'s bits): the
    /// last layer's residual add and the final norm in one launch, for an lm_head that reads
    /// them (`lm_head_takes_split`).
    pub(crate) fn add_rms_norm_pairs_bf16(&self, x: &mut CudaSlice<f32>, pairs: &MoePairs, w: &CudaSlice<f32>, rows: usize, d: usize) -> Result<(CudaSlice<f32>, Bf16Split)> {
        pairs.check(rows, d)?;
        if x.len() < rows * d || w.len() < d {
            return Err(Error::Backend(format!("add_rms_norm_pairs_bf16: x or w shorter than {rows} rows of {d}")));
        }
        let MoePairs { out, tok_pairs, topk, pre } = pairs;
        let mut y = self.empty(rows * d)?;
        // SAFETY: the kernel writes every word of both before any read.
        let (mut yh, mut yl) = unsafe { (self.kernels.alloc.alloc::<u16>(rows * d)?, self.kernels.alloc.alloc::<u16>(rows * d)?) };
        let (dd, eps, k) = (d as i32, self.spec.rms_norm_eps, *topk as i32);
        let mut b = crate::launch::builder(&self.stream, &self.ops.add_rms_norm_pairs_bf16);
        b.arg(x).arg(out).arg(tok_pairs).arg(&k).arg_or_null(pre.as_ref()).arg(w).arg(&mut y).arg(&mut yh).arg(&mut yl).arg(&dd).arg(&eps);
        unsafe { b.launch(norm_cfg(rows, d)) }.map_err(drv)?;
        Ok((y, (yh, yl)))
    }

    /// x += the routed MoE's output from its pairs, `rows` rows of `d`.
    pub(crate) fn add_pairs_inplace(&self, x: &mut CudaSlice<f32>, pairs: &MoePairs, rows: usize, d: usize) -> Result<()> {
        pairs.check(rows, d)?;
        if x.len() < rows * d {
            return Err(Error::Backend(format!("add_pairs_inplace: x holds fewer than {rows} rows")));
        }
        let MoePairs { out, tok_pairs, topk, pre } = pairs;
        let (dd, k) = (d as i32, *topk as i32);
        let mut b = crate::launch::builder(&self.stream, &self.ops.add_pairs_inplace);
        b.arg(x).arg(out).arg(tok_pairs).arg(&k).arg_or_null(pre.as_ref()).arg(&dd);
        // A thread per float4 of a row (per element where d % 4 != 0), 256 a block.
        let col_blocks = if d.is_multiple_of(4) { d / 4 } else { d }.div_ceil(256).max(1) as u32;
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, col_blocks, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    /// Embedding rows of the token ids `tok` [n].
    /// The embeddings of `n` rows' tokens (`tok`; a negative entry -(j + 1) is row j of the ids
    /// at the device address `chain` holds: a step chained on the one before it).
    pub(crate) fn embed_rows(&self, tok: &CudaSlice<i32>, chain: Option<&CudaSlice<u64>>, n: usize) -> Result<CudaSlice<f32>> {
        let h = self.spec.hidden_size;
        let mut x = self.empty(n * h)?;
        let hh = h as i32;
        let mut b = crate::launch::builder(&self.stream, match &self.embed {
            Embed::F32(_) => &self.ops.embed,
            Embed::Bf16(_) => &self.ops.embed_bf16,
        });
        match &self.embed {
            Embed::F32(t) => b.arg(t),
            Embed::Bf16(t) => b.arg(t),
        };
        b.arg(tok);
        match chain {
            Some(c) => b.arg(c),
            None => b.arg(&0u64), // no step to chain on: a null address, never read
        };
        b.arg(&mut x).arg(&hh);
        unsafe { b.launch(row_copy_cfg(n, h)) }.map_err(drv)?;
        Ok(x)
    }

    /// y[j] = x[idx[j]] for `rows` rows of `d`.
    pub(crate) fn gather_rows(&self, x: &CudaSlice<f32>, idx: &CudaSlice<i32>, y: &mut CudaSlice<f32>, rows: usize, d: usize) -> Result<()> {
        let dd = d as i32;
        let mut b = crate::launch::builder(&self.stream, &self.ops.gather_rows);
        b.arg(x).arg(idx).arg(y).arg(&dd);
        unsafe { b.launch(row_copy_cfg(rows, d)) }.map_err(drv)?;
        Ok(())
    }

    /// ids[r] = the argmax of logits row r (ties to the lower id; all -inf/NaN: 0) for `rows`
    /// rows of the vocabulary: partial maxima over slices of ~2048 by many blocks, then one
    /// small block per row.
    pub(crate) fn argmax_into(&self, logits: &CudaSlice<f32>, rows: usize, ids: &mut CudaSlice<i32>, ids_host: Option<&CudaSlice<u64>>) -> Result<()> {
        self.argmax_rows_into(logits, rows, self.spec.vocab_size, ids, ids_host)
    }

    /// `argmax_into` over rows of `v` logits.
    /// `ids_host`: the ids also go to the host slot it points at (a copy-free graph step:
    /// crate::staged).
    pub(crate) fn argmax_rows_into(&self, logits: &CudaSlice<f32>, rows: usize, v: usize, ids: &mut CudaSlice<i32>, ids_host: Option<&CudaSlice<u64>>) -> Result<()> {
        let parts = v.div_ceil(2048).clamp(1, 128);
        let mut part_v = self.empty(rows * parts)?;
        // SAFETY: argmax_rows writes every (row, part) of both.
        let mut part_i = unsafe { self.kernels.alloc.alloc::<i32>(rows * parts) }?;
        let (vi, pi) = (v as i32, parts as i32);
        let mut b = crate::launch::builder(&self.stream, &self.ops.argmax_rows);
        b.arg(logits).arg(&vi).arg(&mut part_v).arg(&mut part_i);
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, parts as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        let mut b = crate::launch::builder(&self.stream, &self.ops.argmax_final);
        b.arg(&part_v).arg(&part_i).arg(&pi).arg(ids).arg_or_null(ids_host);
        unsafe { b.launch(LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    /// The lm_head (or the tied embedding) as a BF16 matrix [n, k] whose tensor-core GEMV reads
    /// its input as BF16 hi + lo parts (K % 128 == 0), so the final norm may hand it them split;
    /// None for other formats.
    fn lm_head_bf16(&self) -> Option<(&CudaSlice<u16>, usize, usize)> {
        let m = match (&self.lm_head, &self.embed) {
            (Some(Mat { m: GpuMatrix::Bf16(w), n, k }), _) => (w, *n, *k),
            (None, Embed::Bf16(t)) => (t, self.spec.vocab_size, self.spec.hidden_size),
            _ => return None,
        };
        m.2.is_multiple_of(128).then_some(m)
    }

    /// Whether the lm_head reads the final norm's BF16 split (`lm_head_split_into`).
    pub(crate) fn lm_head_takes_split(&self) -> bool {
        self.lm_head_bf16().is_some()
    }

    /// `lm_head_into` over final-normed rows given as their BF16 hi + lo parts (the same bits as
    /// splitting them here). Only where `lm_head_takes_split`.
    pub(crate) fn lm_head_split_into(&self, (xh, xl): &Bf16Split, rows: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        let (w, n, k) = self.lm_head_bf16().ok_or_else(|| Error::Backend("lm_head_split_into: the lm_head does not read a BF16 split".into()))?;
        self.kernels.gemv_bf16_presplit(w, xh, xl, y, n, k, rows, None)
    }

    /// Whether `lm_head_split_argmax_into` takes `rows` rows (one: the lm_head's one-tile GEMV
    /// folds the argmax), unless turned off.
    pub(crate) fn lm_head_argmax_takes(&self, rows: usize) -> bool {
        self.lm_head_argmax && self.lm_head_bf16().is_some_and(|(_, n, k)| self.kernels.bf16_argmax_takes(rows, n, k))
    }

    /// `lm_head_split_into` of one row (`lm_head_argmax_takes`) that also folds its argmax into
    /// the model's argmax keys, which `argmax_unpack_into` must read next.
    pub(crate) fn lm_head_split_argmax_into(&self, (xh, xl): &Bf16Split, y: &mut CudaSlice<f32>) -> Result<()> {
        let (w, n, k) = self.lm_head_bf16().ok_or_else(|| Error::Backend("lm_head_split_argmax_into: the lm_head does not read a BF16 split".into()))?;
        self.kernels.gemv_bf16_presplit_argmax(w, xh, xl, y, n, k, &self.argmax_key)
    }

    /// ids[0] = the id in the argmax keys the lm_head folded (`lm_head_split_argmax_into`), and
    /// the keys zeroed for the next step.
    pub(crate) fn argmax_unpack_into(&self, ids: &mut CudaSlice<i32>, ids_host: Option<&CudaSlice<u64>>) -> Result<()> {
        let (slots, stride) = (crate::kernels::ARGMAX_KEY_SLOTS as i32, crate::kernels::ARGMAX_KEY_STRIDE as i32);
        let mut b = crate::launch::builder(&self.stream, &self.ops.argmax_unpack);
        b.arg(&self.argmax_key).arg(&slots).arg(&stride).arg(ids).arg_or_null(ids_host);
        unsafe { b.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    /// Logits [rows, vocab] of final-normed hidden rows through the lm_head (or the tied
    /// embedding), into `y`.
    pub(crate) fn lm_head_into(&self, normed: &CudaSlice<f32>, rows: usize, y: &mut CudaSlice<f32>) -> Result<()> {
        let (vocab, h) = (self.spec.vocab_size, self.spec.hidden_size);
        match (&self.lm_head, &self.embed) {
            (Some(m), _) => self.matvec_into(m, normed, rows, y),
            (None, Embed::F32(t)) => self.gemv_f32_into(t, vocab, h, normed, rows, y),
            (None, Embed::Bf16(t)) => self.kernels.gemv_bf16(t, normed, y, vocab, h, rows),
        }
    }


    /// K/V rows into paged pools (V times the value scale).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn kv_write(&self, k: &CudaSlice<f32>, v: &CudaSlice<f32>, kc: &CudaSlice<f32>, vc: &CudaSlice<f32>, slots: &CudaSlice<i64>, n: usize, s: &AttentionSpec) -> Result<()> {
        let (kd, vd, vs) = (s.k_dim() as i32, s.v_dim() as i32, s.value_scale);
        let mut b = crate::launch::builder(&self.stream, &self.ops.kv_write);
        b.arg(k).arg(v).arg(kc).arg(vc).arg(slots).arg(&kd).arg(&vd).arg(&vs);
        unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    /// The routed MLP of rows `hn` [n, H] -> [n, H], or (where the tiled kernels run and
    /// `moe_leaves_pairs_here`) its routed pairs for the residual add after it to sum (`MlpOut::Pairs`).
    /// `hn_split`: hn split by the norm that wrote it (`wants_moe_split`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn moe(&self, spec: &MoeSpec, router: &Mat, bias: Option<&(CudaSlice<f32>, Vec<f32>)>, experts: &Experts, hn: &CudaSlice<f32>, hn_split: Option<&MoeSplit>, n: usize, decode: bool) -> Result<MlpOut> {
        let logits = self.matvec(router, hn, n)?;
        // hn was written before this call, and the router launched on it since: by the expert
        // kernels it is settled (staged while the router still runs).
        let input = hn_split.map_or(MoeInput::Settled, MoeInput::Split);
        match experts {
            Experts::Stacked(w) => self.moe_stacked(spec, &logits, bias.map(|b| &b.0), w, hn, input, n, decode),
            Experts::PerExpert(e) => self.moe_per_expert(spec, &logits, bias.map(|b| b.1.as_slice()), e, hn, n).map(MlpOut::Rows),
        }
    }

    /// Whether layer `li`'s post-attention norm at `rows` rows is left to its MoE's router
    /// (`moe_after_attention`): one token whose MoE routes inside the fused kernel and leaves
    /// its pairs, so the residual add after it can add the attention output too. Saves the
    /// norm's launch per MoE layer: the batch-1 Flash step -0.6% on the H100
    /// (benches/results/2026-11-24-norm-in-router.md).
    pub(crate) fn norm_in_router(&self, li: usize, rows: usize) -> bool {
        let Some(Mlp::Moe { spec, router, experts: Experts::Stacked(w), .. }) = self.layers.get(li).map(|l| &l.mlp) else { return false };
        if !self.norm_in_router || router.k != self.spec.hidden_size || !router_takes_norm(router, rows) {
            return false;
        }
        let kind = self.kernels.moe_kernel(w, rows, spec.top_k);
        self.routes_in_moe_kernel(w, rows, kind) && self.moe_leaves_pairs_here(spec, w, kind)
    }

    /// Whether `moe_stacked` routes `n` rows inside the MoE kernel `kind` (`moe_mxfp4_routed`):
    /// one token on the fused kernel over tiled weights, unless `route_in_moe` is off.
    fn routes_in_moe_kernel(&self, w: &MoeWeights, n: usize, kind: MoeKernel) -> bool {
        n == 1 && self.route_in_moe && matches!(kind, MoeKernel::Fused { .. }) && w.is_tiled()
    }

    /// The MoE of layer `li` over RMSNorm(x + attn) with the post-attention norm's weight `nw`,
    /// which its router computes (`router_normed`), where `norm_in_router`. x is not written:
    /// the pairs carry attn (`MoePairs::pre`) for the residual add after the MoE (where
    /// `norm_in_router` holds, `moe_stacked` leaves pairs: the same predicates decide both).
    pub(crate) fn moe_after_attention(&self, li: usize, x: &CudaSlice<f32>, attn: CudaSlice<f32>, nw: &CudaSlice<f32>, rows: usize) -> Result<MlpOut> {
        let Some(Mlp::Moe { spec, router, bias, experts: Experts::Stacked(w) }) = self.layers.get(li).map(|l| &l.mlp) else {
            return Err(Error::Backend(format!("layer {li} has no stacked MoE to take its post-attention norm")));
        };
        if self.route_in_oproj_at(li, rows) {
            // The o_proj did the router over x + attn (`attention` with `res`).
            let r = self.route_bufs(li, x)?;
            let kind = self.kernels.moe_kernel_rows(w, rows, spec.top_k, true);
            let prev = self.route_prev_layer(li).ok_or_else(|| Error::Backend(format!("layer {li}: no other layer's router in its o_proj")))?;
            let zero = self.route_acc_ptr(prev);
            let mut tok_pairs = unsafe { self.kernels.alloc.alloc::<i32>(spec.top_k) }?;
            let eps = self.spec.rms_norm_eps;
            let out = self.with_moe_scratch(w, spec.top_k, |scratch| self.kernels.moe_mxfp4_acc_pairs(kind, spec, w, &r, eps, bias.as_ref().map(|b| &b.0), scratch, &mut tok_pairs, zero, self.route_acc_stride))?;
            self.moe_pairs_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(MlpOut::Pairs(MoePairs { out, tok_pairs, topk: spec.top_k, pre: Some(attn) }));
        }
        let (logits, xn) = self.router_normed(router, x, &attn, nw, rows)?;
        // xn comes from the launch just before the experts: staged after their wait.
        match self.moe_stacked(spec, &logits, bias.as_ref().map(|b| &b.0), w, &xn, MoeInput::Fresh, rows, true)? {
            MlpOut::Pairs(mut p) => {
                p.pre = Some(attn);
                Ok(MlpOut::Pairs(p))
            }
            MlpOut::Rows(_) => Err(Error::Backend(format!("layer {li}: the MoE combined its pairs where its post-attention norm was left to the router"))),
        }
    }

    /// Whether layer `li`'s o_proj at `rows` rows does its MoE's router (`route_in_oproj`):
    /// one token where the router would compute the norm (`norm_in_router`), the o_proj the
    /// BF16 one over the attention's split on the pipelined kernel (`oproj_route_takes`), an f32
    /// router over the hidden size, and at least one other layer doing the same (the MoE of
    /// each zeroes the previous one's accumulators: `route_prev_layer`).
    pub(crate) fn route_in_oproj_at(&self, li: usize, rows: usize) -> bool {
        // (route_prev_layer looks back from li - 1: usually one check, not one per layer.)
        rows == 1 && self.route_in_oproj && self.route_oproj_shape(li) && self.route_prev_layer(li).is_some()
    }

    fn route_oproj_shape(&self, li: usize) -> bool {
        let Some(l) = self.layers.get(li) else { return false };
        let (a, Mlp::Moe { spec, router, .. }) = (&l.attn, &l.mlp) else { return false };
        let h = self.spec.hidden_size;
        self.route_in_oproj
            && uses_attention_v2(&a.spec)
            && matches!(a.o.m, GpuMatrix::Bf16(_))
            && matches!(router.m, GpuMatrix::F32(_))
            && a.o.n == h
            && router.k == h
            && router.n == spec.num_experts
            && self.route_acc_copies * spec.num_experts < self.route_acc_stride
            && self.kernels.oproj_route_takes(a.o.n, a.o.k, router.n)
            && self.norm_in_router(li, 1)
    }

    /// The layer before `li` (cyclically) whose o_proj does the router: its accumulators are
    /// zeroed by `li`'s MoE.
    fn route_prev_layer(&self, li: usize) -> Option<usize> {
        let n = self.layers.len();
        (1..n).map(|d| (li + n - d) % n).find(|&l| self.route_oproj_shape(l))
    }

    fn route_acc_ptr(&self, li: usize) -> u64 {
        self.route_acc.device_ptr(&self.stream).0 + (li * self.route_acc_stride * std::mem::size_of::<u64>()) as u64
    }

    /// The buffers of layer `li`'s router in its o_proj over residual `res`.
    fn route_bufs<'a>(&'a self, li: usize, res: &'a CudaSlice<f32>) -> Result<crate::kernels::RouteInOproj<'a>> {
        let l = &self.layers[li];
        let (Mlp::Moe { router: Mat { m: GpuMatrix::F32(wr), n, .. }, .. }, true) = (&l.mlp, self.route_oproj_shape(li)) else {
            return Err(Error::Backend(format!("layer {li}'s o_proj does not take its router")));
        };
        Ok(crate::kernels::RouteInOproj { res, norm: &l.post_norm, router: wr, experts: *n, acc: self.route_acc_ptr(li), copies: self.route_acc_copies, ssq: &self.route_ssq, hg: &self.route_hg })
    }

    /// Zeroes every layer's router accumulators and the argmax keys (after a step that may have
    /// stopped between an o_proj adding into them and its MoE's reading them, or between the
    /// lm_head folding the argmax and its unpacking).
    pub(crate) fn zero_step_accumulators(&self) {
        for buf in [&self.route_acc, &self.argmax_key] {
            let (p, _g) = buf.device_ptr(&self.stream);
            // SAFETY: the buffer's own allocation, on this stream.
            let _ = unsafe { cudarc::driver::result::memset_d8_async(p, 0, buf.len() * std::mem::size_of::<u64>(), self.stream.cu_stream()) };
        }
    }

    /// The copies of the router's fixed-point sums a one-token o_proj spreads its blocks' adds
    /// over (`ROUTE_ACC_COPIES`, `PEREGRINE_ROUTE_ACC_COPIES` at load).
    pub fn route_acc_copies(&self) -> usize {
        self.route_acc_copies
    }

    /// For benchmarks: sets `route_acc_copies`, from 1 up to what the accumulators were sized
    /// for at load. Captured step graphs are dropped and every accumulator zeroed (the flag
    /// word moves with the count).
    pub fn set_route_acc_copies(&mut self, copies: usize) -> Result<()> {
        let experts = self.layers.iter().filter_map(|l| if let Mlp::Moe { spec, .. } = &l.mlp { Some(spec.num_experts) } else { None }).max().unwrap_or(0);
        if copies == 0 || copies * experts >= self.route_acc_stride {
            return Err(Error::Backend(format!("{copies} copies of the router's sums: from 1 up to {} (as loaded)", self.route_acc_copies.max((self.route_acc_stride - 1) / experts.max(1)))));
        }
        self.stream.synchronize().map_err(drv)?;
        self.route_acc_copies = copies;
        self.zero_step_accumulators();
        self.graphs.clear();
        Ok(())
    }

    /// How many layers do their MoE's router in the o_proj at `rows` rows; for tests.
    pub fn route_in_oproj_layers(&self, rows: usize) -> usize {
        (0..self.layers.len()).filter(|&l| self.route_in_oproj_at(l, rows)).count()
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

    /// Sets whether the one-token lm_head prefetches its first K blocks into L2 before its wait
    /// (`Kernels::set_lm_head_prefetch`), for measurements. Captured step graphs are dropped.
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

    /// Forces whether the tiled MoE leaves its routed pairs to the norm after it (by default
    /// where `kernels::moe_pairs_pay`); for tests comparing the two (the same bits). Captured step graphs
    /// are dropped.
    pub fn set_moe_combine_in_norm(&mut self, on: bool) {
        self.moe_combine_in_norm = Some(on);
        self.graphs.clear();
    }

    /// Pins the MoE decode kernel of `tokens` tokens (every MoE layer of a model has the same
    /// expert shapes); false when the model has no stacked MoE.
    pub fn pin_moe_kernel(&self, tokens: usize, kind: MoeKernel) -> bool {
        self.first_moe().map(|(w, top_k)| self.kernels.pin_moe(w, top_k, tokens, kind)).is_some()
    }

    /// How many MoE calls have left their pairs to the norm after them.
    pub fn moe_pairs_calls(&self) -> usize {
        self.moe_pairs_calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the MoE on `kind` leaves its routed pairs to the norm after it: a kernel that can
    /// (`Kernels::moe_leaves_pairs`), where that pays (`kernels::moe_pairs_pay`) or is forced.
    fn moe_leaves_pairs_here(&self, spec: &MoeSpec, w: &MoeWeights, kind: MoeKernel) -> bool {
        Kernels::moe_leaves_pairs(w, kind, spec.top_k) && self.moe_combine_in_norm.unwrap_or_else(|| crate::kernels::moe_pairs_pay(spec.top_k, w.hidden))
    }

    /// Router, grouping and the grouped MXFP4 kernels, all on the GPU: no host round trip. One
    /// token on the fused kernel is routed inside it (`route_in_moe`); the tiled kernels may
    /// leave their pairs to the norm after them (`MlpOut::Pairs`).
    #[allow(clippy::too_many_arguments)]
    /// `decode`: the rows are decode rows (`Kernels::moe_kernel_rows`).
    #[allow(clippy::too_many_arguments)]
    fn moe_stacked(&self, spec: &MoeSpec, logits: &CudaSlice<f32>, bias: Option<&CudaSlice<f32>>, w: &MoeWeights, hn: &CudaSlice<f32>, input: MoeInput, n: usize, decode: bool) -> Result<MlpOut> {
        let kind = self.kernels.moe_kernel_rows(w, n, spec.top_k, decode);
        let leave_pairs = self.moe_leaves_pairs_here(spec, w, kind);
        if self.routes_in_moe_kernel(w, n, kind) {
            if leave_pairs {
                // Written by the kernel's first block.
                let mut tok_pairs = unsafe { self.kernels.alloc.alloc::<i32>(spec.top_k) }?;
                let out = self.with_moe_scratch(w, spec.top_k, |scratch| self.kernels.moe_mxfp4_routed_pairs(kind, spec, w, logits, bias, hn, input, scratch, &mut tok_pairs))?;
                self.moe_pairs_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(MlpOut::Pairs(MoePairs { out, tok_pairs, topk: spec.top_k, pre: None }));
            }
            let mut y = self.empty(n * self.spec.hidden_size)?;
            self.with_moe_scratch(w, spec.top_k, |scratch| self.kernels.moe_mxfp4_routed(kind, spec, w, logits, bias, hn, input, scratch, &mut y))?;
            return Ok(MlpOut::Rows(y));
        }
        let (r, _, _) = self.route_device(spec, logits, bias, n)?;
        if leave_pairs {
            let out = self.with_moe_scratch(w, r.num_pairs, |scratch| self.kernels.moe_mxfp4_pairs(kind, w, &r, hn, input, scratch))?;
            self.moe_pairs_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(MlpOut::Pairs(MoePairs { out, tok_pairs: r.tok_pairs, topk: spec.top_k, pre: None }));
        }
        let mut y = self.empty(n * self.spec.hidden_size)?;
        self.with_moe_scratch(w, r.num_pairs, |scratch| self.kernels.moe_mxfp4_with(kind, w, &r, hn, input, scratch, &mut y))?;
        Ok(MlpOut::Rows(y))
    }

    /// Runs `f` on MoE scratch for `pairs` routed pairs around the model's counters (zero
    /// between calls; kept unless this layer needs more of them); returns the scratch's pair
    /// outputs.
    fn with_moe_scratch(&self, w: &MoeWeights, pairs: usize, f: impl FnOnce(&mut crate::kernels::MoeScratch) -> Result<()>) -> Result<CudaSlice<f32>> {
        let mut slot = self.moe_counters.lock().map_err(|_| Error::Backend("MoE counters lock poisoned".into()))?;
        let kept = slot.take_if(|c| c.len() >= Kernels::moe_counters(w, pairs));
        drop(slot);
        let was_kept = kept.is_some();
        let mut scratch = match kept {
            Some(c) => self.kernels.moe_scratch_with(w, pairs, c)?,
            None => self.kernels.moe_scratch(w, pairs)?,
        };
        let run = f(&mut scratch);
        if was_kept {
            *self.moe_counters.lock().map_err(|_| Error::Backend("MoE counters lock poisoned".into()))? = Some(scratch.counters);
        }
        run.map(|()| scratch.out)
    }

    /// The router and the token/expert grouping (`moe_route`, one launch) of `n` rows of
    /// router logits. The routing lists `min(n * top_k, E)` expert slots; the unused ones are
    /// empty, so launches need no host round trip. Also returns the per-token choices.
    fn route_device(&self, spec: &MoeSpec, logits: &CudaSlice<f32>, bias: Option<&CudaSlice<f32>>, n: usize) -> Result<(DeviceRouting, CudaSlice<i32>, CudaSlice<f32>)> {
        let (e, k) = (spec.num_experts, spec.top_k);
        let p = n * k;
        let (st, al) = (&self.stream, &self.kernels.alloc);
        let mut topk_idx = unsafe { al.alloc::<i32>(p) }?; // written in full by moe_route
        let mut topk_w = self.empty(p)?;
        let max_u = p.min(e);
        let mut r = DeviceRouting {
            // All written in full by the grouping.
            experts: unsafe { al.alloc::<i32>(max_u) }?,
            pair_off: unsafe { al.alloc::<i32>(max_u + 1) }?,
            pair_tok: unsafe { al.alloc::<i32>(p) }?,
            pair_w: self.empty(p)?,
            tok_pairs: unsafe { al.alloc::<i32>(p) }?,
            num_experts_used: max_u,
            num_pairs: p,
            num_tokens: n,
            top_k: k,
        };
        // Decode-sized batches: one launch, every token's routing, then the last block to finish
        // groups the pairs by expert (the arrival counter comes back to zero). Larger ones
        // (prefill chunks) group in a separate 1024-thread kernel: one 256-thread block took
        // 44 us per layer for 64 tokens under ncu.
        let fused = n <= FUSED_GROUP_MAX_TOKENS;
        let (ei, ki, sm, ng, tg, norm, sc, mu, pi) = (e as i32, k as i32, matches!(spec.scoring, RouterScoring::Softmax) as i32, spec.n_group as i32, spec.topk_group as i32, spec.norm_topk_prob as i32, spec.routed_scaling_factor, max_u as i32, p as i32);
        let mut b = crate::launch::builder(st, &self.ops.moe_route);
        b.arg(logits);
        match bias {
            Some(bb) => b.arg(bb),
            None => b.arg(&0u64),
        };
        b.arg(&mut topk_idx).arg(&mut topk_w).arg(&ei).arg(&ki).arg(&sm).arg(&ng).arg(&tg).arg(&norm).arg(&sc);
        // The model's counter: no memset per layer (the kernel leaves it at zero).
        if fused {
            b.arg(&self.route_counter);
        } else {
            b.arg(&0u64);
        }
        b.arg(&mu).arg(&mut r.experts).arg(&mut r.pair_off).arg(&mut r.pair_tok).arg(&mut r.pair_w).arg(&mut r.tok_pairs);
        // Shared memory: scores and choices (2 E floats) while routing; counts, starts and a
        // chunk of 1024 choices (GROUP_CHUNK in ops.cu) while grouping.
        let smem = (4 * (2 * e + 1024)) as u32;
        unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem }) }.map_err(drv)?;
        if !fused {
            // moe_group also keeps a u16 count per warp (32) and expert; its per-expert totals
            // share the chunk's area, so E <= 1024 (its shared memory is sized for that at load).
            if e > 1024 {
                return Err(Error::Backend(format!("the MoE grouping kernel takes at most 1024 experts, not {e}")));
            }
            let mut b = crate::launch::builder(st, &self.ops.moe_group);
            b.arg(&topk_idx).arg(&topk_w).arg(&pi).arg(&ki).arg(&ei).arg(&mu).arg(&mut r.experts).arg(&mut r.pair_off).arg(&mut r.pair_tok).arg(&mut r.pair_w).arg(&mut r.tok_pairs);
            unsafe { b.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: smem + (2 * 32 * e) as u32 }) }.map_err(drv)?;
        }
        Ok((r, topk_idx, topk_w))
    }

    /// The GPU router and grouping on host logits [n, E], brought back: each token's (expert,
    /// weight) choices and the grouping (for the kernel tests against the CPU reference).
    #[allow(clippy::type_complexity)]
    pub fn route_on_gpu(&self, spec: &MoeSpec, logits: &[f32], bias: Option<&[f32]>) -> Result<(Vec<Vec<(usize, f32)>>, MoeRouting)> {
        let (e, k) = (spec.num_experts, spec.top_k);
        let n = logits.len() / e;
        let st = &self.stream;
        let bias_d = bias.map(|b| upload(st, b)).transpose()?;
        let (r, idx, w) = self.route_device(spec, &upload(st, logits)?, bias_d.as_ref(), n)?;
        let (idx, w) = (st.clone_dtoh(&idx).map_err(drv)?, st.clone_dtoh(&w).map_err(drv)?);
        let choices = (0..n).map(|t| (0..k).map(|s| (idx[t * k + s] as usize, w[t * k + s])).collect()).collect();
        let get = |d: &CudaSlice<i32>, len: usize| -> Result<Vec<i32>> { Ok(st.clone_dtoh(d).map_err(drv)?[..len].to_vec()) };
        let pair_off = get(&r.pair_off, r.num_experts_used + 1)?;
        let used = pair_off.iter().position(|&o| o as usize == r.num_pairs).unwrap_or(r.num_experts_used).min(r.num_experts_used);
        let routing = MoeRouting {
            experts: get(&r.experts, used)?,
            pair_off: pair_off[..=used].to_vec(),
            pair_tok: get(&r.pair_tok, r.num_pairs)?,
            pair_w: st.clone_dtoh(&r.pair_w).map_err(drv)?[..r.num_pairs].to_vec(),
            tok_pairs: get(&r.tok_pairs, r.num_pairs)?,
            top_k: k,
        };
        Ok((choices, routing))
    }

    /// Experts in other formats: routed on the host, one GEMV chain per routed expert.
    fn moe_per_expert(&self, spec: &MoeSpec, logits: &CudaSlice<f32>, bias: Option<&[f32]>, experts: &[Ffn], hn: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<f32>> {
        let h = self.spec.hidden_size;
        let logits = self.stream.clone_dtoh(logits).map_err(drv)?;
        let mut per_expert: Vec<Vec<(i32, f32)>> = vec![Vec::new(); spec.num_experts];
        for t in 0..n {
            for (e, wgt) in peregrine_cpu::model::route(spec, &logits[t * spec.num_experts..(t + 1) * spec.num_experts], bias) {
                per_expert[e].push((t as i32, wgt));
            }
        }
        let mut y = self.zeros(n * h)?;
        let hh = h as i32;
        for (e, toks) in per_expert.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
            let idx = upload(&self.stream, &toks.iter().map(|x| x.0).collect::<Vec<_>>())?;
            let wts = upload(&self.stream, &toks.iter().map(|x| x.1).collect::<Vec<_>>())?;
            let mut xs = self.zeros(toks.len() * h)?;
            self.gather_rows(hn, &idx, &mut xs, toks.len(), h)?;
            let out = self.ffn(&experts[e], &xs, toks.len())?;
            let mut b = crate::launch::builder(&self.stream, &self.ops.scatter_add_scaled);
            b.arg(&out).arg(&idx).arg(&wts).arg(&mut y).arg(&hh);
            unsafe { b.launch(LaunchConfig { grid_dim: (toks.len() as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        }
        Ok(y)
    }
}

/// Row copies (embedding, gathers): 256 threads, enough blocks per row for one element each
/// (at most 64).
fn row_copy_cfg(rows: usize, d: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, d.div_ceil(256).clamp(1, 64) as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// A layer's MLP output: rows [n, H], or the routed MoE's pairs left uncombined for the
/// residual add after it to sum.
pub(crate) enum MlpOut {
    Rows(CudaSlice<f32>),
    Pairs(MoePairs),
}

/// The routed MoE's pairs left uncombined: `out` [pairs, H], each pair's weighted output, and
/// `tok_pairs` [n, topk], each row's pairs. `pre` [n, H]: rows the residual add adds before the
/// pairs, (x + pre) + pairs: the attention output, when the router computed the post-attention
/// norm itself and left that residual add to this one (`moe_after_attention`).
pub(crate) struct MoePairs {
    pub(crate) out: CudaSlice<f32>,
    pub(crate) tok_pairs: CudaSlice<i32>,
    pub(crate) topk: usize,
    pub(crate) pre: Option<CudaSlice<f32>>,
}

impl MoePairs {
    /// The pair-summing kernels' bounds for `rows` rows of `d`: topk <= 32 distinct pairs per
    /// row (ops.cu's `sorted[32]`), inside the buffers.
    fn check(&self, rows: usize, d: usize) -> Result<()> {
        let topk = self.topk;
        let pre_fits = self.pre.as_ref().is_none_or(|p| p.len() >= rows * d);
        if (1..=32).contains(&topk) && self.tok_pairs.len() >= rows * topk && self.out.len() >= rows * topk * d && pre_fits {
            return Ok(());
        }
        Err(Error::Backend(format!("MoE pairs: top-{topk} of {rows} rows of {d} do not fit the buffers")))
    }
}

/// Threads of `gemv_f32` (and `gemv_f32_norm`) for rows of `k` (k % 4 == 0): one block per row,
/// up to four float4s of it per thread (the kernels' register path), whole warps.
fn gemv_f32_threads(k: usize) -> usize {
    (k / 4).div_ceil(4).div_ceil(32).clamp(1, 32) * 32
}

/// Whether `gemv_f32_norm` takes router `m` at `t` rows: f32 weights in gemv_f32's register path
/// (K % 4 == 0, K <= 4096, below the GEMM's rows) whose K norm_cfg runs one float4 per thread.
pub(crate) fn router_takes_norm(m: &Mat, t: usize) -> bool {
    matches!(m.m, GpuMatrix::F32(_)) && m.k.is_multiple_of(4) && m.k <= 4096 && (1..GEMM_F32_MIN_ROWS).contains(&t)
}

/// One block per row of `d`: a thread per float4 (the norm kernels' register path, whole
/// warps, at most 1024), or 256 threads for rows that are not a multiple of 4.
fn norm_cfg(rows: usize, d: usize) -> LaunchConfig {
    // One float4 per thread: 512 or 256 threads holding 2 or 4 each made the batch-1 step
    // 0.2% / 2.3% slower (benches/results/2026-11-24-moe-pairs-one-token.md).
    let threads = if d.is_multiple_of(4) { (d / 4).div_ceil(32).clamp(1, 32) * 32 } else { 256 };
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }
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

/// Rows from which an f32 matrix is applied by the tiled `gemm_f32_nt` (`gemv_f32_into`).
pub(crate) const GEMM_F32_MIN_ROWS: usize = 32;
/// Rows up to which (exclusive) an f32 matrix is applied by `gemv_f32_tiles` (`gemv_f32_into`).
pub(crate) const F32_TILES_MAX_ROWS: usize = 128;
/// `gemv_f32_tiles`' block: weight rows x at most this many tokens (F32T_ROWS, F32T_TOKENS in
/// ops.cu).
const F32_TILES_ROWS: usize = 4;
const F32_TILES_TOKENS: usize = 16;

/// Query rows per `attention_prefill` tile (PT_Q in ops.cu).
pub(crate) const PREFILL_TILE: usize = 64;
/// Shortest run of one sequence's rows taken in tiles. A tile's block walks the run's whole key
/// range alone, so a few rows over a long context (a verify block) are faster on
/// attention_v2, which splits the range over many blocks.
pub(crate) const PREFILL_TILE_MIN: usize = 32;

/// (K head dim, V head dim) of the compiled tensor-core prefill attention kernels
/// (`attention_prefill_tc_d{hd}_v{vd}`); other shapes take the f32 kernels.
pub(crate) const PREFILL_TC_SHAPES: [(usize, usize); 3] = [(192, 128), (128, 128), (64, 64)];

/// The prefill attention kernels: the f32 one, and the tensor-core ones per `PREFILL_TC_SHAPES`
/// entry, used where a layer's shape has one and its heads per KV head are even (two heads per
/// block), unless `tensor_cores` is off (`PEREGRINE_PREFILL_ATTN=f32`).
pub(crate) struct PrefillAttention {
    f32: CudaFunction,
    tc: Vec<CudaFunction>,
    pub(crate) tensor_cores: bool,
}

impl PrefillAttention {
    /// The tensor-core kernel for attention `s`, if one serves it.
    fn tensor_core_kernel(&self, s: &AttentionSpec) -> Option<&CudaFunction> {
        let even_group = s.num_kv_heads > 0 && s.num_heads.is_multiple_of(s.num_kv_heads) && (s.num_heads / s.num_kv_heads).is_multiple_of(2);
        let i = PREFILL_TC_SHAPES.iter().position(|&d| d == (s.head_dim, s.v_head_dim))?;
        (self.tensor_cores && even_group).then(|| &self.tc[i])
    }
}

/// The tensor-core prefill attention kernel's dynamic shared memory (TK = 32 keys per block,
/// two heads' 64 query rows): Q [2][64][hd + 4], K hi and lo [32][hd + 4], V hi and lo
/// [32][vd + 4] words (P stays in registers).
pub(crate) fn prefill_attention_tc_smem(hd: usize, vd: usize) -> usize {
    4 * (2 * PREFILL_TILE * (hd + 4) + 2 * 32 * (hd + 4) + 2 * 32 * (vd + 4))
}

/// `attention_prefill`'s dynamic shared memory for K head dim `hd` and V head dim `vd`: Q and K
/// [64][hd + 4], V [64][vd + 4] and P [64][68] floats (64 keys per staged block).
pub(crate) fn prefill_attention_smem(hd: usize, vd: usize) -> usize {
    4 * PREFILL_TILE * (2 * (hd + 4) + (vd + 4) + (PREFILL_TILE + 4))
}

/// The tiles and the remaining rows of a batch (`PrefillRows`) from its rows' sequences and
/// positions; None when no run is long enough.
pub(crate) fn prefill_tiles(seq: &[i32], pos: &[i32]) -> Option<(Vec<i32>, Vec<i32>)> {
    let (mut tiles, mut rest) = (Vec::new(), Vec::new());
    let mut r = 0;
    while r < seq.len() {
        let mut e = r + 1;
        while e < seq.len() && seq[e] == seq[r] && pos[e] == pos[e - 1] + 1 {
            e += 1;
        }
        if e - r >= PREFILL_TILE_MIN {
            for t0 in (r..e).step_by(PREFILL_TILE) {
                tiles.extend([t0 as i32, (e - t0).min(PREFILL_TILE) as i32]);
            }
        } else {
            rest.extend((r..e).map(|x| x as i32));
        }
        r = e;
    }
    (!tiles.is_empty()).then_some((tiles, rest))
}

/// Whether a layer's attention runs `attention_v2` (8 warps per head over the positions), not
/// the one-warp kernel: unless its K head is wider than v2 holds.
fn uses_attention_v2(s: &AttentionSpec) -> bool {
    s.head_dim <= 256
}

/// Positions of K/V `attention_v2_heads` stages per tile (ATT_TILE in kernels/ops.cu).
const ATT_TILE: usize = 16;

/// Tiles of K/V `attention_v2_heads` keeps in flight (ATT_STAGES in kernels/ops.cu).
const ATT_STAGES: usize = 2;

/// Dynamic shared memory an `attention_v2_heads` block may ask for (opted into at load).
const ATT_HEADS_MAX_SMEM: usize = 96 * 1024;

/// Dynamic shared memory of an `attention_v2_heads` block for `s`, if `s` suits it: its tiles
/// in flight of the K + V rows of every KV head its 8 heads read (each row padded to an odd
/// count of 16-byte units), then the 8 heads' q; head dims of whole float4 halves, V of whole
/// float4s, the limits of attention_v2 (hd <= 256, vd <= 128), and at most
/// `ATT_HEADS_MAX_SMEM`.
pub(crate) fn attention_heads_smem(s: &AttentionSpec) -> Option<usize> {
    let group = s.num_heads / s.num_kv_heads.max(1);
    if group == 0 {
        return None;
    }
    let kv_per_block = (0..s.num_heads.div_ceil(ATT_WARPS))
        .map(|y| ((y * ATT_WARPS + ATT_WARPS).min(s.num_heads) - 1) / group - y * ATT_WARPS / group + 1)
        .max()?;
    let row = 4 * (((s.head_dim + s.v_head_dim) / 4) | 1);
    let bytes = (ATT_STAGES * ATT_TILE * kv_per_block * row + ATT_WARPS * s.head_dim) * 4;
    (s.head_dim.is_multiple_of(8) && s.v_head_dim.is_multiple_of(4) && s.head_dim <= 256 && s.v_head_dim <= 128 && bytes <= ATT_HEADS_MAX_SMEM).then_some(bytes)
}

/// A decode step's new K and V rows (before RoPE and the value scale) and their pool slots, for
/// `attend` to write.
pub(crate) struct FreshKv<'a> {
    pub(crate) k: &'a CudaSlice<f32>,
    pub(crate) v: &'a CudaSlice<f32>,
    pub(crate) slots: &'a CudaSlice<i64>,
    /// The projection launched just before counts its tiles here (`Kernels::gemv_qkv_ready`):
    /// the attention waits for each head's counts instead of the whole launch.
    pub(crate) ready: Option<ReadyCounts<'a>>,
}

/// Tile counts a q/k/v projection leaves for `attention_v2_kv_ready`: a head's q rows are
/// written when `counters[head]` reaches `need_q`, a KV head's k and v rows when
/// `counters[heads + kv head]` reaches `need_kv`.
pub(crate) struct ReadyCounts<'a> {
    pub(crate) counters: &'a CudaSlice<u32>,
    pub(crate) need_q: u32,
    pub(crate) need_kv: u32,
    /// The launch after the attention zeroes the counters (the o_proj GEMV's
    /// `zero_after_wait`), so its blocks leave without counting themselves out.
    pub(crate) reset_by_next: bool,
    /// The attention's outputs, allocated before the projection (`CudaModel::attend_bufs`;
    /// `attend` takes them).
    pub(crate) bufs: Option<AttendBufs>,
}

/// Split attention's per-split maxima, sums and accumulators.
pub(crate) type SplitStates = (CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>);

/// `attend`'s output buffers: o, its BF16 split, and (splits, split states).
pub(crate) struct AttendBufs {
    pub(crate) o: CudaSlice<f32>,
    pub(crate) split: Option<Bf16Split>,
    pub(crate) parts: Option<(usize, SplitStates)>,
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
}

impl CudaModel {
    fn kv_bytes_per_block(&self, block_size: usize) -> KvBlockBytes {
        let mut b = KvBlockBytes { full: 0, swa: 0 };
        for l in &self.layers {
            let per = block_size * (l.attn.spec.k_dim() + l.attn.spec.v_dim()) * 4;
            if l.swa { b.swa += per } else { b.full += per }
        }
        if let Some(d) = &self.drafter {
            b.full += block_size * d.kv_floats_per_token() * 4;
        }
        b
    }

    fn init_kv_pools(&mut self, config: KvConfig) -> Result<()> {
        self.graphs.clear();
        self.kv.clear();
        self.draft_kv.clear();
        // One scratch block past the last of each pool: padding rows of graph replays use it.
        let (full, swa) = (config.num_full_blocks + 1, config.num_swa_blocks + 1);
        let bytes: usize = self
            .layers
            .iter()
            .map(|l| (if l.swa { swa } else { full }) * config.block_size * (l.attn.spec.k_dim() + l.attn.spec.v_dim()) * 4)
            .sum::<usize>()
            + self.drafter.as_ref().map_or(0, |d| full * config.block_size * d.kv_floats_per_token() * 4);
        let (free, total) = self.gpu.ctx.mem_get_info().map_err(drv)?;
        if bytes > free {
            return Err(Error::Backend(format!(
                "the KV cache needs {bytes} bytes but the GPU has {free} of {total} free after the weights; lower --kv-cache-memory, or leave it out to size the cache by --gpu-memory-utilization"
            )));
        }
        for l in &self.layers {
            let slots = (if l.swa { swa } else { full }) * config.block_size;
            let s = &l.attn.spec;
            self.kv.push((self.zeros(slots * s.k_dim())?, self.zeros(slots * s.v_dim())?));
        }
        if let Some(d) = &self.drafter {
            let slots = full * config.block_size;
            for l in &d.layers {
                let s = &l.attn.spec;
                self.draft_kv.push((self.zeros(slots * s.k_dim())?, self.zeros(slots * s.v_dim())?));
            }
        }
        self.kv_config = Some(config);
        Ok(())
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
        // Its graph may overwrite the ids a chained step would read (crate::overlap).
        self.graphs.overlap.break_chain();
        let rows = self.host_rows(batch)?;
        let n = rows.toks.len();
        if n == 0 {
            return Ok((Fetched::empty(&rows.counts, self.spec.vocab_size), rows.counts));
        }
        let k = rows.want.len();
        if let Out::Sample(p, _) | Out::SampleLogprobs(p, _, _) = out {
            if p.len() != k {
                return Err(Error::Backend(format!("{} sampling rows for {k} output rows", p.len())));
            }
        }
        let vocab = self.spec.vocab_size;
        // Sampled without adjustments: the graph that samples (its ids are the samples).
        let in_graph = match out {
            Out::Sample(p, adj) if self.graph_samples(adj) => Some(p),
            _ => None,
        };
        if let Some(mut g) = self.graph_for(&rows, in_graph)? {
            let out = if in_graph.is_some() { Out::Argmax } else { out };
            // A copy-free graph wrote its ids into the host slot (crate::staged).
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
            return Ok((fetched?, rows.counts));
        }
        let st = self.stream.clone();
        let (meta, idx) = self.upload_rows(&rows)?;
        let mut logits = self.zeros(k * vocab)?;
        let mut ids = st.alloc_zeros::<i32>(k.max(1)).map_err(drv)?;
        self.step_body(&meta, n, Some((&idx, k)), rows.one_per_seq, &mut logits, &mut ids)?;
        Ok((fetch(&self.kernels, &st, out, &rows.counts, vocab, &mut logits, &ids)?, rows.counts))
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
}

/// What a forward brought back: logits per sequence, or ids (with logprobs when asked).
#[derive(Default)]
struct Fetched {
    logits: Vec<Logits>,
    ids: Vec<i32>,
    logprobs: Vec<Option<RowLogprobs>>,
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
        Out::SampleLogprobs(p, adj, top) => {
            let (ids, logprobs) = kern.sample_rows_with_logprobs(logits, vocab, p, adj, top)?;
            Fetched { ids, logprobs, ..Default::default() }
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

    fn forward_speculative(&mut self, batch: &[SeqForward], sampling: peregrine_core::backend::SpecSampling) -> Result<Option<Vec<peregrine_core::backend::SpecRows>>> {
        self.speculate(batch, sampling)
    }

    fn enqueue_decode(&mut self, batch: &[SeqForward], chain: &[Option<usize>], sampling: Option<(&[RowSampling], &[LogitAdjust])>) -> Result<bool> {
        self.enqueue_decode_step(batch, chain, sampling)
    }

    fn collect_decode(&mut self) -> Result<Vec<u32>> {
        self.collect_decode_step()
    }

    fn name(&self) -> &str {
        "cuda"
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
mod split_tests {
    use super::attention_splits;

    /// One wave of attention_v2_kv on the H100: 3 blocks on each of 132 SMs.
    const WAVE: Option<usize> = Some(396);

    #[test]
    fn decode_attention_of_few_rows_is_split_to_fill_the_gpu_within_one_wave() {
        // Flash shapes at batch 1: 64 heads over a 128-position window -> 4 blocks of 32.
        assert_eq!(attention_splits(128, 512, WAVE, 64), 4);
        // Batch 2: 128 row-heads, 3 splits (384 blocks) still fit the wave; batch 4 and up not split.
        assert_eq!(attention_splits(128, 512, WAVE, 128), 3);
        assert_eq!(attention_splits(128, 512, WAVE, 256), 1);
        assert_eq!(attention_splits(128, 512, WAVE, 8 * 64), 1);
        for row_heads in [1usize, 4, 64, 100, 200, 396] {
            let s = attention_splits(4096, 512, WAVE, row_heads);
            assert!(s == 8 || s * row_heads <= 396, "{row_heads} row-heads: {s} splits overflow the wave");
        }
        // Never below 32 positions per block, never more than 64 blocks per (row, head).
        assert_eq!(attention_splits(40, 512, WAVE, 1), 1);
        assert_eq!(attention_splits(96, 512, WAVE, 1), 3);
        assert_eq!(attention_splits(1 << 20, 512, WAVE, 1), 64);
    }

    /// attention_gqa_tc's grids on the H100 at Flash shapes (4 KV heads, one block per SM: a wave
    /// of 132) with 8192 tokens of context (tables 16384 wide in graphs): batch 1 fills one wave,
    /// batches 2-8 take one or two, where the 512-position split took 2, 4 and 8 (256 blocks per
    /// two rows).
    #[test]
    fn tensor_core_decode_attention_grids_stay_within_two_waves() {
        use super::ATTN_TC_SPLIT;
        let wave = 132;
        assert_eq!(attention_splits(16384, ATTN_TC_SPLIT, Some(wave), 4), 33);
        for batch in [2usize, 4, 8] {
            let row_heads = 4 * batch;
            let blocks = row_heads * attention_splits(16384, ATTN_TC_SPLIT, Some(wave), row_heads);
            assert!(blocks <= 2 * wave, "batch {batch}: {blocks} blocks");
            assert_eq!(row_heads * attention_splits(16384, 512, Some(wave), row_heads), 256 * batch / 2, "batch {batch}");
        }
    }

    /// The waiting sharers of a merge never fill the wave: at Flash shapes (one block per SM,
    /// 132) batches 1-8 share, larger batches (or one split) merge in the last block alone.
    #[test]
    fn merge_sharers_leave_room_in_the_wave() {
        use super::gqa_merge_sharers;
        let wave = 132;
        assert_eq!(gqa_merge_sharers(4, 4, 33, wave), 4);
        assert_eq!(gqa_merge_sharers(4, 32, 8, wave), 4);
        assert_eq!(gqa_merge_sharers(4, 64, 8, wave), 2);
        assert_eq!(gqa_merge_sharers(4, 128, 8, wave), 1);
        assert_eq!(gqa_merge_sharers(4, 4, 1, wave), 1);
        assert_eq!(gqa_merge_sharers(4, 4, 3, wave), 3);
        assert_eq!(gqa_merge_sharers(1, 4, 33, wave), 1);
        for groups in 1..400 {
            for splits in 1..70 {
                let s = gqa_merge_sharers(4, groups, splits, wave);
                assert!((1..=4).contains(&s) && s <= splits, "{groups} groups, {splits} splits: {s}");
                assert!(s == 1 || groups * s < wave, "{groups} groups x {s} sharers fill the wave");
            }
        }
    }

    #[test]
    fn long_spans_split_by_length_with_or_without_filling() {
        assert_eq!(attention_splits(1024, 512, None, 64), 1);
        assert_eq!(attention_splits(1025, 512, None, 64), 3);
        assert_eq!(attention_splits(8192, 512, None, 64), 16);
        assert_eq!(attention_splits(8192, 512, WAVE, 64), 16);
        assert_eq!(attention_splits(128, 512, None, 64), 1);
        assert_eq!(attention_splits(1 << 20, 512, None, 8), 64);
    }
}

#[cfg(test)]
mod heads_attention_tests {
    use super::{attention_heads_smem, gqa_tc_smem};
    use peregrine_core::spec::RopeStyle;
    use peregrine_core::{AttentionKind, AttentionSpec, QkvLayout, RopeSpec};

    /// attention_gqa_tc's shared memory: Q hi + lo, then per warp two K and V tiles and P. The
    /// largest compiled shape fits an H100 block (227 KB) in 8 warps, and two and three blocks
    /// of an H100 SM (228 KB, 1 KB reserved per block) in 4 and 2, as the forms' launch bounds
    /// promise.
    #[test]
    fn gqa_tc_shared_memory() {
        for (w, per_sm) in super::GQA_TC_WARPS.into_iter().zip([1, 2]) {
            assert_eq!(gqa_tc_smem(192, 128, w), 4 * (2 * 16 * 196 + w * (2 * 8 * 196 + 2 * 8 * 136 + 16 * 12)));
            assert_eq!(gqa_tc_smem(64, 64, w), 4 * (2 * 16 * 68 + w * (2 * 8 * 68 + 2 * 8 * 72 + 16 * 12)));
            assert!(gqa_tc_smem(128, 128, w) >= 4 * (2 * 16 * 132 + w * 16 * 138), "the warps' merge fits");
            assert!(per_sm * (gqa_tc_smem(192, 128, w) + 1024) <= 228 * 1024, "{w} warps: {per_sm} blocks per SM");
        }
        assert!(gqa_tc_smem(192, 128, 8) <= 227 * 1024);
    }

    /// attention_gqa_tc's blocks are of 8 warps while rows x KV heads fit one wave of them (one
    /// block per SM), else of 4: Flash at batch 16 (64 / 128 groups) and batch 32's full layers
    /// (128) keep 8, batch 32's sliding layers (256) and batch 64 (256 / 512) take 4.
    #[test]
    fn tensor_core_decode_attention_takes_smaller_blocks_past_one_wave() {
        use super::gqa_tc_warps_for;
        let wave8 = 132;
        for (groups, warps) in [(4, 8), (64, 8), (128, 8), (132, 8), (133, 4), (256, 4), (512, 4)] {
            assert_eq!(gqa_tc_warps_for(groups, wave8), warps, "{groups} groups");
        }
    }

    fn spec(heads: usize, kv_heads: usize, hd: usize, vd: usize) -> AttentionSpec {
        AttentionSpec {
            kind: AttentionKind::Full,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: hd,
            v_head_dim: vd,
            rope: RopeSpec { theta: 10_000.0, rotary_dim: 64, style: RopeStyle::NeoX },
            sinks: false,
            value_scale: 1.0,
            softmax_scale: 0.1,
            qkv_layout: QkvLayout::Separate,
            qkv_bias: false,
            qk_norm: false,
        }
    }

    #[test]
    fn one_warp_per_head_attention_takes_shapes_whose_tiles_fit() {
        // Flash: one KV head per block, rows of 320 floats padded to 324 (81 float4s), two
        // tiles of 16, then 8 heads' q of 192.
        assert_eq!(attention_heads_smem(&spec(64, 4, 192, 128)), Some((2 * 16 * 324 + 8 * 192) * 4));
        assert_eq!(attention_heads_smem(&spec(64, 8, 192, 128)), Some((2 * 16 * 324 + 8 * 192) * 4));
        // Four heads per KV head: a block stages two KV heads (rows of 256 floats padded to 260).
        assert_eq!(attention_heads_smem(&spec(8, 2, 128, 128)), Some((2 * 16 * 2 * 260 + 8 * 128) * 4));
        // Two heads per KV head: four KV heads a block; rows of 80 floats (20 float4s) padded to 84.
        assert_eq!(attention_heads_smem(&spec(12, 6, 48, 32)), Some((2 * 16 * 4 * 84 + 8 * 48) * 4));
        // Multi-head attention of 128-wide heads: eight KV heads a block, past the 96 KiB.
        assert_eq!(attention_heads_smem(&spec(32, 32, 128, 128)), None);
        // Head dims that are not whole float4 halves, V not whole float4s, past attention_v2's limits.
        assert_eq!(attention_heads_smem(&spec(8, 1, 100, 128)), None);
        assert_eq!(attention_heads_smem(&spec(8, 1, 128, 126)), None);
        assert_eq!(attention_heads_smem(&spec(8, 1, 320, 64)), None);
        assert_eq!(attention_heads_smem(&spec(8, 1, 128, 256)), None);
    }
}

#[cfg(test)]
mod prefill_tile_tests {
    use super::{prefill_tiles, PREFILL_TILE_MIN};

    #[test]
    fn decode_batches_make_no_tiles() {
        // One row per sequence, and a verify block shorter than PREFILL_TILE_MIN.
        assert_eq!(prefill_tiles(&[0, 1, 2], &[500, 7, 9]), None);
        let n = PREFILL_TILE_MIN as i32 - 1;
        assert_eq!(prefill_tiles(&vec![0; n as usize], &(100..100 + n).collect::<Vec<_>>()), None);
    }

    #[test]
    fn runs_of_one_sequence_are_cut_into_tiles_and_the_rest_listed() {
        // seq 0: 130 rows from 0 (tiles 64 + 64 + 2); seq 1: one decode row; seq 2: 40 rows,
        // then a gap in its positions starts a second run of 3 (too short: listed).
        let mut seq = vec![0; 130];
        let mut pos: Vec<i32> = (0..130).collect();
        seq.push(1);
        pos.push(999);
        seq.extend([2; 43]);
        pos.extend((10..50).chain(60..63));
        let (tiles, rest) = prefill_tiles(&seq, &pos).unwrap();
        assert_eq!(tiles, vec![0, 64, 64, 64, 128, 2, 131, 40]);
        assert_eq!(rest, vec![130, 171, 172, 173]);
        // Every row is in exactly one tile or the rest.
        let mut covered: Vec<i32> = tiles.chunks(2).flat_map(|t| t[0]..t[0] + t[1]).chain(rest).collect();
        covered.sort();
        assert_eq!(covered, (0..seq.len() as i32).collect::<Vec<_>>());
    }

    #[test]
    fn a_sequence_change_ends_a_run_even_at_the_next_position() {
        let seq = [[0; 40], [1; 40]].concat();
        let pos: Vec<i32> = (0..80).collect();
        assert_eq!(prefill_tiles(&seq, &pos).unwrap(), (vec![0, 40, 40, 40], vec![]));
    }
}
