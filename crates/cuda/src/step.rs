//! The forward step described as data: an ordered list of operations over named activations,
//! built for a step's shape (`CudaModel::step_plan`) and executed by `CudaModel::execute`. The
//! eager path and the CUDA-graph capture both run a plan; a persistent engine would interpret the
//! same list. Weights are named by layer, not by pointer, so a plan holds for any device that
//! holds (a shard of) the model.

use std::fmt;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice};
use peregrine_core::backend::SeqForward;
use peregrine_core::{Error, Result};

use crate::backend::{drv, Bf16Split, CudaModel, Mlp, MlpOut, MoePairs, RowMeta};

/// The activations a step passes between operations (each [rows, width]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// The residual stream [rows, hidden].
    Hidden,
    /// The input of the next attention (normed residual).
    AttnIn,
    /// The input of the next MLP (normed residual).
    MlpIn,
    /// o_proj's output.
    AttnOut,
    /// The MLP's output (or, from the tiled MoE, its routed pairs, which only the residual add
    /// after it reads: `MlpOut::Pairs`).
    MlpOut,
    /// The rows whose logits are asked for.
    Selected,
    /// Selected after the final norm.
    Final,
}

const ACTS: usize = 7;

/// Which RMSNorm weight an operation applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormWeight {
    Input(usize),
    PostAttention(usize),
    Final,
}

/// One operation of a step. `rows` is the number of rows it processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Hidden = the embeddings of the step's tokens.
    Embed { rows: usize },
    /// Embed, then AttnIn = RMSNorm(Hidden) * the first layer's input norm: one launch where the
    /// norm writes the F16 split its q/k/v projection reads (`embed_rms_norm_split`), else two.
    EmbedNorm { rows: usize },
    /// dst = RMSNorm(src) * weight.
    Norm { src: Act, dst: Act, weight: NormWeight, rows: usize },
    /// Hidden += add, then dst = RMSNorm(Hidden) * weight (one kernel).
    AddNorm { add: Act, dst: Act, weight: NormWeight, rows: usize },
    /// Hidden += add.
    Add { add: Act, rows: usize },
    /// AttnOut = o_proj(attention) of layer `layer` over src: q/k/v projections, bias, q/k norms,
    /// RoPE fused with the paged K/V write, paged attention with its window and sinks. With
    /// `kv_in_attention` (every row is its sequence's only new token, so no row reads another's
    /// new K/V) the attention kernel may apply RoPE and write the pool itself, one launch fewer:
    /// it does while its grid fits one wave of the GPU (small decode batches).
    Attention { layer: usize, src: Act, rows: usize, kv_in_attention: bool },
    /// MlpOut = the layer's dense MLP, or its MoE (router, grouping, experts, combine; the
    /// tiled MoE may leave the combine to the residual add after it). `decode`: every row is its
    /// sequence's only new token; above 8 rows only such rows take the MoE kernel tuned for
    /// their count (`Kernels::moe_kernel_rows`: a verify block's tokens may share experts).
    Mlp { layer: usize, src: Act, rows: usize, decode: bool },
    /// The drafter reads this layer: its output (after the final norm for the last layer) joins
    /// the context features.
    CaptureFeatures { layer: usize, rows: usize },
    /// The drafter's context K/V of every row, from the features; in a step whose rows carry
    /// ring rows (`RowMeta::stage`), the features staged there instead (crate::draft_staging).
    DraftContext { rows: usize },
    /// Selected = Hidden at the asked-for rows.
    GatherRows { rows: usize },
    /// logits = lm_head(src) (or the tied embedding).
    LmHead { src: Act, rows: usize },
    /// ids = argmax of each logits row.
    Argmax { rows: usize },
    /// ids = each logits row sampled on the GPU with its parameters, which a decode graph that
    /// samples takes with its row data (`RowMeta::sampling`): in place of Argmax, so a sampled
    /// step is one graph like a greedy one (`CudaModel::sampled_step_plan`).
    Sample { rows: usize },
}

impl Op {
    /// The rows it processes.
    pub fn rows(&self) -> usize {
        match *self {
            Op::Embed { rows }
            | Op::EmbedNorm { rows }
            | Op::Norm { rows, .. }
            | Op::AddNorm { rows, .. }
            | Op::Add { rows, .. }
            | Op::Attention { rows, .. }
            | Op::Mlp { rows, .. }
            | Op::CaptureFeatures { rows, .. }
            | Op::DraftContext { rows }
            | Op::GatherRows { rows }
            | Op::LmHead { rows, .. }
            | Op::Argmax { rows }
            | Op::Sample { rows } => rows,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

impl CudaModel {
    /// The operations of a forward over `rows` rows; `out_rows` Some(k): logits for k gathered
    /// rows (None: for every row; Some(0): none); `decode`: every row is the only new token of
    /// its sequence.
    pub fn step_plan(&self, rows: usize, out_rows: Option<usize>, decode: bool) -> Vec<Op> {
        let nl = self.layers.len();
        let mut ops = if self.embed_norm_fused { vec![Op::EmbedNorm { rows }] } else { vec![Op::Embed { rows }, Op::Norm { src: Act::Hidden, dst: Act::AttnIn, weight: NormWeight::Input(0), rows }] };
        let drafted = |li: usize| self.drafter.as_ref().is_some_and(|d| d.spec.target_layer_ids.contains(&li));
        for li in 0..nl {
            ops.push(Op::Attention { layer: li, src: Act::AttnIn, rows, kv_in_attention: decode && self.attention_takes_kv(li) });
            ops.push(Op::AddNorm { add: Act::AttnOut, dst: Act::MlpIn, weight: NormWeight::PostAttention(li), rows });
            ops.push(Op::Mlp { layer: li, src: Act::MlpIn, rows, decode });
            if li + 1 < nl {
                ops.push(Op::AddNorm { add: Act::MlpOut, dst: Act::AttnIn, weight: NormWeight::Input(li + 1), rows });
            } else if out_rows.is_none() && self.final_norm_fused {
                // Every row's logits: the final norm goes with the last residual add (one launch;
                // the features and the drafter's context read Hidden, which it writes too).
                ops.push(Op::AddNorm { add: Act::MlpOut, dst: Act::Final, weight: NormWeight::Final, rows });
            } else {
                ops.push(Op::Add { add: Act::MlpOut, rows });
            }
            if drafted(li) {
                ops.push(Op::CaptureFeatures { layer: li, rows });
            }
        }
        if self.drafter.is_some() {
            ops.push(Op::DraftContext { rows });
        }
        let k = match out_rows {
            Some(0) => return ops,
            None if self.final_norm_fused => rows,
            None => {
                ops.push(Op::Norm { src: Act::Hidden, dst: Act::Final, weight: NormWeight::Final, rows });
                rows
            }
            Some(k) => {
                ops.push(Op::GatherRows { rows: k });
                ops.push(Op::Norm { src: Act::Selected, dst: Act::Final, weight: NormWeight::Final, rows: k });
                k
            }
        };
        ops.push(Op::LmHead { src: Act::Final, rows: k });
        ops.push(Op::Argmax { rows: k });
        ops
    }

    /// The plan of a decode graph that samples its rows (every row's logits; `decode` as in
    /// `step_plan`): `step_plan`'s, ending in Sample instead of Argmax (so its lm_head does not
    /// fold the argmax).
    pub fn sampled_step_plan(&self, rows: usize, decode: bool) -> Vec<Op> {
        let mut ops = self.step_plan(rows, None, decode);
        if let Some(last @ Op::Argmax { .. }) = ops.last_mut() {
            *last = Op::Sample { rows: last.rows() };
        }
        ops
    }

    /// Runs a plan on the GPU with no host round trip (so it can be captured): `meta` holds the
    /// rows' tokens, positions and paging, `out_idx` the asked-for rows (for GatherRows), and
    /// `logits`/`ids` receive LmHead's and Argmax's results.
    pub(crate) fn execute(&self, ops: &[Op], meta: &RowMeta, out_idx: Option<&CudaSlice<i32>>, logits: &mut CudaSlice<f32>, ids: &mut CudaSlice<i32>) -> Result<()> {
        self.execute_marked(ops, meta, out_idx, logits, ids, None)
    }

    /// `execute`, recording a timing event on the stream before every operation and after the
    /// last when `marks` is given (so `marks[i]..marks[i + 1]` is operation i).
    fn execute_marked(&self, ops: &[Op], meta: &RowMeta, out_idx: Option<&CudaSlice<i32>>, logits: &mut CudaSlice<f32>, ids: &mut CudaSlice<i32>, marks: Option<&mut Vec<CudaEvent>>) -> Result<()> {
        let r = self.execute_ops(ops, meta, out_idx, logits, ids, marks);
        if r.is_err() {
            // An o_proj may have added into router accumulators that no MoE read (or the
            // lm_head into argmax keys not unpacked).
            self.zero_step_accumulators();
        }
        r
    }

    fn execute_ops(&self, ops: &[Op], meta: &RowMeta, out_idx: Option<&CudaSlice<i32>>, logits: &mut CudaSlice<f32>, ids: &mut CudaSlice<i32>, mut marks: Option<&mut Vec<CudaEvent>>) -> Result<()> {
        let mark = |marks: &mut Option<&mut Vec<CudaEvent>>| -> Result<()> {
            if let Some(m) = marks.as_deref_mut() {
                m.push(self.stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv)?);
            }
            Ok(())
        };
        // A batch with prompt chunks launches plainly (`PlainLaunches`), unless
        // PEREGRINE_PREFILL_PDL=1 (measurements).
        // So does a step of `plain_from_rows` rows up to `plain_to_rows`: its kernels are
        // multi-wave grids (and GEMMs with up to 200 KB of shared memory per block), whose early
        // blocks under PDL hold SMs in the wrong shared-memory carveout, as after the MLP below.
        // At 48-64 rows PDL measured faster again (`launches_plainly`).
        let many_rows = ops.first().is_some_and(|op| self.launches_plainly(op.rows()));
        let _plain = ((meta.prefill.is_some() && !self.prefill_pdl) || many_rows).then(crate::launch::PlainLaunches::new);
        let h = self.spec.hidden_size;
        let mut acts: [Option<CudaSlice<f32>>; ACTS] = Default::default();
        // The F16 split of AttnIn, when the norm that wrote AttnIn also split it; MlpIn split as
        // the MoE reads it, or as a dense MLP does (`dense_split`), likewise.
        let mut attn_split = None;
        let mut mlp_split = None;
        let mut dense_split = None;
        // MlpOut held as the routed MoE's pairs (`MlpOut::Pairs`) rather than in acts: the
        // residual add after the MoE sums them.
        let mut mlp_pairs: Option<MoePairs> = None;
        // Final's BF16 split, when the norm that wrote Final split it for the lm_head.
        let mut final_split: Option<Bf16Split> = None;
        // The post-attention norm left to the MoE's router (`norm_in_router`): AttnOut, for the
        // Mlp op of that layer, which reads the residual and it.
        let mut norm_left: Option<(usize, CudaSlice<f32>)> = None;
        let mut features = None;
        // A decode step that stages the drafter's context: each row's ring row, and the rings
        // (crate::draft_staging).
        let ring = match (&meta.stage, &self.draft_staging) {
            (Some(rows), Some(s)) => Some((rows, &s.rows)),
            _ => None,
        };
        let norm_weight = |w: NormWeight| match w {
            NormWeight::Input(l) => &self.layers[l].input_norm,
            NormWeight::PostAttention(l) => &self.layers[l].post_norm,
            NormWeight::Final => &self.final_norm,
        };
        // Ops since the last MLP (usize::MAX: none yet).
        let mut since_mlp = usize::MAX;
        // The plan's MoE rows are decode rows (the norm ahead of a MoE writes the split its
        // kernel reads, which depends on it).
        let decode = ops.iter().any(|op| matches!(op, Op::Mlp { decode: true, .. }));
        // Whether layer l's post-attention norm is left to the router: at one row where
        // `norm_in_router`; past one row, where the o_proj does the router
        // (`route_in_oproj_at`, which `norm_in_router` then is), only in decode steps: verify
        // rows keep their own MoE kernels (`moe_kernel_rows`).
        let router_takes_norm = |l: usize, rows: usize| (rows == 1 || decode) && self.norm_in_router(l, rows);
        // The lm_head folded the argmax into the model's keys (`lm_head_split_argmax_into`): the
        // Argmax right after it unpacks them.
        let mut argmax_folded = false;
        // A copy-free graph's first kernel brings its row data from the slot it is pointed at
        // (crate::staged; slot 0 until then), and its argmax writes the ids back there.
        // (Folding these copies into the embedding measured slower: benches/results/
        // 2026-11-27-copy-free-steps.md.)
        let ids_host = meta.staged.as_ref().map(|s| &s.ids_host);
        if let Some(s) = &meta.staged {
            self.fetch_staged(s, 0)?;
        }
        for (i, &op) in ops.iter().enumerate() {
            mark(&mut marks)?;
            // The `drain_after_mlp_op`-th op after an MLP (the next) starts on drained SMs
            // (crate::launch::plain_next) where `drains_after_mlp`.
            since_mlp = since_mlp.saturating_add(1);
            if since_mlp == self.drain_after_mlp_op && self.drains_after_mlp(&op) {
                crate::launch::plain_next();
            }
            if matches!(op, Op::Mlp { .. }) {
                since_mlp = 0;
            }
            if norm_left.is_some() && !matches!(op, Op::Mlp { src: Act::MlpIn, .. }) {
                return Err(Error::Backend(format!("step plan: {op} runs between a post-attention norm left to the router and its MLP")));
            }
            match op {
                Op::Embed { rows } => acts[Act::Hidden as usize] = Some(self.embed_rows(&meta.tok, meta.chain.as_ref(), rows)?),
                Op::EmbedNorm { rows } => {
                    let w = norm_weight(NormWeight::Input(0));
                    let (x, y) = if self.norm_split_first && self.wants_f16_split(0) {
                        let (x, y, sp) = self.embed_rms_norm_split(&meta.tok, meta.chain.as_ref(), w, rows)?;
                        attn_split = Some(sp);
                        (x, y)
                    } else {
                        let x = self.embed_rows(&meta.tok, meta.chain.as_ref(), rows)?;
                        let y = self.rms_norm(&x, w, rows, h)?;
                        attn_split = None;
                        (x, y)
                    };
                    acts[Act::Hidden as usize] = Some(x);
                    acts[Act::AttnIn as usize] = Some(y);
                }
                Op::Norm { src, dst, weight, rows } => {
                    let x = acts[src as usize].as_ref().ok_or_else(|| Error::Backend(format!("step plan reads {src:?} before writing it")))?;
                    if dst == Act::AttnIn {
                        attn_split = None;
                    }
                    // A layer input whose q/k/v GEMV reads F16-split activations gets them from
                    // the norm, as from add_rms_norm_split (the first layer's, after the embedding).
                    let y = match weight {
                        NormWeight::Input(l) if self.norm_split_first && dst == Act::AttnIn && self.wants_f16_split(l) => {
                            let (y, sp) = self.rms_norm_split(x, norm_weight(weight), rows, h)?;
                            attn_split = Some(sp);
                            y
                        }
                        _ => self.rms_norm(x, norm_weight(weight), rows, h)?,
                    };
                    acts[dst as usize] = Some(y);
                }
                Op::AddNorm { add: Act::MlpOut, dst, weight, rows } if mlp_pairs.is_some() => {
                    let pairs = mlp_pairs.take().ok_or_else(|| Error::Backend("step plan: MoE pairs gone".into()))?;
                    let mut x = acts[Act::Hidden as usize].take().ok_or_else(|| Error::Backend("step plan adds to the residual before the embedding".into()))?;
                    if dst == Act::AttnIn {
                        attn_split = None;
                    }
                    let y = if dst == Act::Final && self.lm_head_takes_split() {
                        // The last residual add and the final norm, split for the lm_head.
                        self.add_rms_norm_pairs_bf16(&mut x, &pairs, norm_weight(weight), rows, h).map(|(y, sp)| {
                            final_split = Some(sp);
                            y
                        })
                    } else {
                        let split = matches!(weight, NormWeight::Input(l) if dst == Act::AttnIn && self.wants_f16_split(l));
                        self.add_rms_norm_pairs(&mut x, &pairs, norm_weight(weight), rows, h, split).map(|(y, sp)| {
                            if sp.is_some() {
                                attn_split = sp;
                            }
                            y
                        })
                    };
                    acts[Act::Hidden as usize] = Some(x);
                    acts[dst as usize] = Some(y?);
                }
                Op::AddNorm { add: Act::AttnOut, dst: Act::MlpIn, weight: NormWeight::PostAttention(l), rows } if router_takes_norm(l, rows) => {
                    // The router computes this norm, and the residual add after the MoE adds
                    // AttnOut (one launch fewer).
                    let a = acts[Act::AttnOut as usize].take().ok_or_else(|| Error::Backend("step plan reads AttnOut before writing it".into()))?;
                    acts[Act::MlpIn as usize] = None;
                    mlp_split = None;
                    norm_left = Some((l, a));
                }
                Op::AddNorm { add, dst, weight, rows } => {
                    let mut x = acts[Act::Hidden as usize].take().ok_or_else(|| Error::Backend("step plan adds to the residual before the embedding".into()))?;
                    let a = acts[add as usize].as_ref().ok_or_else(|| Error::Backend(format!("step plan reads {add:?} before writing it")))?;
                    // A layer input whose q/k/v GEMV reads F16-split activations gets them
                    // from the norm (one launch fewer).
                    // An MoE that reads its input split gets it from the norm too (its own
                    // split launch saved).
                    if dst == Act::AttnIn {
                        attn_split = None;
                    }
                    if dst == Act::MlpIn {
                        mlp_split = None;
                        dense_split = None;
                    }
                    let y = match weight {
                        NormWeight::Input(l) if dst == Act::AttnIn && self.wants_f16_split(l) => self.add_rms_norm_split(&mut x, a, norm_weight(weight), rows, h).map(|(y, sp)| {
                            attn_split = Some(sp);
                            y
                        }),
                        NormWeight::PostAttention(l) if dst == Act::MlpIn && self.wants_moe_split(l, rows, decode) => self.add_rms_norm_moe_split(&mut x, a, norm_weight(weight), rows, h).map(|(y, sp)| {
                            mlp_split = Some(sp);
                            y
                        }),
                        // A dense MLP's stacked FP8 gate and up read it as the q/k/v GEMV does.
                        NormWeight::PostAttention(l) if dst == Act::MlpIn && self.wants_dense_split(l) => self.add_rms_norm_split(&mut x, a, norm_weight(weight), rows, h).map(|(y, sp)| {
                            dense_split = Some(sp);
                            y
                        }),
                        _ => self.add_rms_norm(&mut x, a, norm_weight(weight), rows, h),
                    };
                    acts[Act::Hidden as usize] = Some(x);
                    acts[dst as usize] = Some(y?);
                }
                Op::Add { add: Act::MlpOut, rows } if mlp_pairs.is_some() => {
                    let pairs = mlp_pairs.take().ok_or_else(|| Error::Backend("step plan: MoE pairs gone".into()))?;
                    let mut x = acts[Act::Hidden as usize].take().ok_or_else(|| Error::Backend("step plan adds to the residual before the embedding".into()))?;
                    let r = self.add_pairs_inplace(&mut x, &pairs, rows, h);
                    acts[Act::Hidden as usize] = Some(x);
                    r?;
                }
                Op::Add { add, rows } => {
                    let mut x = acts[Act::Hidden as usize].take().ok_or_else(|| Error::Backend("step plan adds to the residual before the embedding".into()))?;
                    let r = self.add_inplace(&mut x, acts[add as usize].as_ref().ok_or_else(|| Error::Backend(format!("step plan reads {add:?} before writing it")))?, rows * h);
                    acts[Act::Hidden as usize] = Some(x);
                    r?;
                }
                Op::Attention { layer, src, rows, kv_in_attention } => {
                    let split = if src == Act::AttnIn { attn_split.take() } else { None };
                    // The o_proj may do the MoE's router too, over the residual.
                    let res = if (rows == 1 || decode) && self.route_in_oproj_at(layer, rows) { Some(acts[Act::Hidden as usize].as_ref().ok_or_else(|| Error::Backend("step plan runs attention before the embedding".into()))?) } else { None };
                    let o = self.attention(layer, acts[src as usize].as_ref().ok_or_else(|| Error::Backend(format!("step plan reads {src:?} before writing it")))?, split.as_ref(), rows, meta, kv_in_attention, res)?;
                    acts[Act::AttnOut as usize] = Some(o);
                }
                Op::Mlp { layer, src, rows, decode } => {
                    let m = if let Some((l, a)) = norm_left.take() {
                        // The router computes the norm over the residual and AttnOut.
                        if l != layer {
                            return Err(Error::Backend(format!("step plan: layer {l}'s post-attention norm left to layer {layer}'s MLP")));
                        }
                        let x = acts[Act::Hidden as usize].as_ref().ok_or_else(|| Error::Backend("step plan runs an MLP before the embedding".into()))?;
                        self.moe_after_attention(layer, x, a, &self.layers[layer].post_norm, rows)?
                    } else {
                        let x = acts[src as usize].as_ref().ok_or_else(|| Error::Backend(format!("step plan reads {src:?} before writing it")))?;
                        let split = if src == Act::MlpIn { mlp_split.take() } else { None };
                        // The MoE may leave its pairs: only the residual adds after it read MlpOut.
                        match &self.layers[layer].mlp {
                            Mlp::Dense(f) => MlpOut::Rows(self.ffn_split(f, x, if src == Act::MlpIn { dense_split.take() } else { None }.as_ref(), rows)?),
                            Mlp::Moe { spec, router, bias, experts } => self.moe(spec, router, bias.as_ref(), experts, x, split.as_ref(), rows, decode)?,
                        }
                    };
                    match m {
                        MlpOut::Rows(m) => {
                            mlp_pairs = None;
                            acts[Act::MlpOut as usize] = Some(m);
                        }
                        MlpOut::Pairs(pairs) => {
                            acts[Act::MlpOut as usize] = None;
                            mlp_pairs = Some(pairs);
                        }
                    }
                }
                Op::CaptureFeatures { layer, rows } => {
                    let x = acts[Act::Hidden as usize].as_ref().ok_or_else(|| Error::Backend("step plan captures before the embedding".into()))?;
                    self.capture(layer, x, rows, &mut features, ring)?;
                }
                // A decode step that stages the context captured straight into the rings.
                Op::DraftContext { rows } => {
                    if let (Some(f), None) = (&features, ring) {
                        self.write_draft_context(f, rows, &meta.pos, &meta.full_slots)?;
                    }
                }
                Op::GatherRows { rows } => {
                    let idx = out_idx.ok_or_else(|| Error::Backend("step plan gathers rows without their indices".into()))?;
                    let x = acts[Act::Hidden as usize].as_ref().ok_or_else(|| Error::Backend("step plan gathers before the embedding".into()))?;
                    let mut sel = self.empty(rows * h)?;
                    self.gather_rows(x, idx, &mut sel, rows, h)?;
                    acts[Act::Selected as usize] = Some(sel);
                }
                Op::LmHead { src, rows } => {
                    let x = acts[src as usize].as_ref().ok_or_else(|| Error::Backend(format!("step plan reads {src:?} before writing it")))?;
                    match final_split.take() {
                        Some(sp) if src == Act::Final && ops.get(i + 1) == Some(&Op::Argmax { rows }) && self.lm_head_argmax_takes(rows) => {
                            self.lm_head_split_argmax_into(&sp, logits)?;
                            argmax_folded = true;
                        }
                        Some(sp) if src == Act::Final => self.lm_head_split_into(&sp, rows, logits)?,
                        _ => self.lm_head_into(x, rows, logits)?,
                    }
                }
                Op::Argmax { .. } if argmax_folded => {
                    argmax_folded = false;
                    self.argmax_unpack_into(ids, ids_host)?;
                }
                Op::Argmax { rows } => self.argmax_into(logits, rows, ids, ids_host)?,
                Op::Sample { rows } => {
                    let params = meta.sampling.as_ref().ok_or_else(|| Error::Backend("step plan samples without its rows' parameters".into()))?;
                    self.kernels.sample_step_rows(logits, self.spec.vocab_size, rows, params, ids, ids_host)?;
                }
            }
        }
        if norm_left.is_some() {
            return Err(Error::Backend("step plan: a post-attention norm left to the router has no MLP after it".into()));
        }
        mark(&mut marks)
    }

    /// What an eager forward of `batch` runs on: its rows' metadata and output rows, its plan,
    /// and buffers for its logits and ids (`probe_routing`, `profile_plan`).
    fn eager_forward(&self, batch: &[SeqForward]) -> Result<EagerForward> {
        let rows = self.host_rows(batch)?;
        let (n, k) = (rows.toks.len(), rows.want.len());
        let (meta, idx) = self.upload_rows(&rows)?;
        let plan = self.step_plan(n, Some(k), rows.one_per_seq);
        let logits = self.zeros(k.max(1) * self.spec.vocab_size)?;
        let ids = self.stream.alloc_zeros::<i32>(k.max(1)).map_err(drv)?;
        Ok(EagerForward { meta, idx, plan, logits, ids })
    }

    /// The experts each grouped routing of one eager forward of `batch` chose: per MoE call (in
    /// layer order) its rows' top-k expert ids, [rows * top_k]. The one-token fused kernel routes
    /// inside itself and is not seen here; from 2 rows every MoE layer is. For checking how the
    /// routing a benchmark's weights give compares with the uniform routing its floors assume.
    pub fn probe_routing(&mut self, batch: &[SeqForward]) -> Result<Vec<Vec<i32>>> {
        let EagerForward { meta, idx, plan, mut logits, mut ids } = self.eager_forward(batch)?;
        *self.routing_probe.lock().map_err(|_| Error::Backend("routing probe lock poisoned".into()))? = Some(Vec::new());
        let run = self.execute_marked(&plan, &meta, Some(&idx), &mut logits, &mut ids, None);
        let seen = self.routing_probe.lock().map_err(|_| Error::Backend("routing probe lock poisoned".into()))?.take().unwrap_or_default();
        run?;
        self.stream.synchronize().map_err(drv)?;
        Ok(seen)
    }

    /// Where a forward's time goes: runs `batch` eagerly `reps` times (after one warm-up) with
    /// CUDA events around every operation of its plan and returns each operation with its median
    /// time in ms. Eager launches, so the sum exceeds a graph replay by the launch gaps.
    pub fn profile_plan(&mut self, batch: &[SeqForward], reps: usize) -> Result<Vec<(Op, f32)>> {
        let st = self.stream.clone();
        let EagerForward { meta, idx, plan, mut logits, mut ids } = self.eager_forward(batch)?;
        let mut times: Vec<Vec<f32>> = vec![Vec::new(); plan.len()];
        for rep in 0..=reps {
            let mut marks = Vec::with_capacity(plan.len() + 1);
            self.execute_marked(&plan, &meta, Some(&idx), &mut logits, &mut ids, Some(&mut marks))?;
            st.synchronize().map_err(drv)?;
            if rep > 0 {
                for (i, t) in times.iter_mut().enumerate() {
                    t.push(marks[i].elapsed_ms(&marks[i + 1]).map_err(drv)?);
                }
            }
        }
        Ok(plan
            .into_iter()
            .zip(times)
            .map(|(op, mut t)| {
                t.sort_by(f32::total_cmp);
                (op, t.get(t.len() / 2).copied().unwrap_or(0.0))
            })
            .collect())
    }
}

/// What `CudaModel::eager_forward` sets up for one eager forward.
struct EagerForward {
    meta: RowMeta,
    idx: CudaSlice<i32>,
    plan: Vec<Op>,
    logits: CudaSlice<f32>,
    ids: CudaSlice<i32>,
}
