//! The MoE layer on `CudaModel`: the router (alone, in the o_proj, or inside the one-token MoE
//! kernel), the token/expert grouping and the MXFP4 expert kernels, and their pair outputs.

use super::*;

/// Up to this many tokens, `moe_route`'s last block also groups the pairs (one launch); above,
/// `moe_group` is a launch of its own. H200, Flash, 18 layers: with a thread per pair
/// (`group_scatter`), grouping in the routing launch up to 32 tokens took the batch-12 / 16 / 24 /
/// 32 steps +14 / -27 / -28 / -48 us against `moe_group`'s launch (`step-bench --ab group:32`);
/// with the former thread per expert scanning every pair it had cost +139 to +241 us
/// (benches/results/2026-11-29-h200-route-group-scatter.md).
pub(super) const FUSED_GROUP_MAX_TOKENS: usize = 32;

/// Up to this many tokens (from 2) the routing launch is one block that routes every token, a
/// warp a token, and groups the pairs from shared memory (`moe_route_block`,
/// `moe_route_acc_block` in kernels/ops.cu; `CudaModel::route_one_block`), instead of a block a
/// token and the last one to arrive grouping from L2. H200, Flash, 18 layers (`step-bench --ab
/// route-block:1`, B a block a token): batch 2 / 3 / 4 42 / 38 / 26 us a step faster over the
/// o_proj's sums, 23 / 18 / 10 over the router's logits. Past 4 the one SM asking for every
/// token's sums holds it (16 KB a token, ~35-40 GB/s): batch 5 / 6 14 / 6 us slower, 7 even, 8 22
/// us faster in one run (17-27 slower with 8-byte loads), 12 / 16 20-31 slower
/// (benches/results/2026-11-29-h200-routing-in-one-block.md). Over the o_proj's sums on Hopper,
/// `ROUTE_CLUSTER_TOKENS` takes them first. `PEREGRINE_ROUTE_BLOCK_TOKENS` sets it (1: the
/// multi-block kernels only).
pub(super) const ROUTE_BLOCK_TOKENS: usize = 4;

/// From `ROUTE_CLUSTER_MIN_TOKENS` up to this many tokens the routing launch over the o_proj's
/// sums on Hopper is one cluster of a block per token (`moe_route_acc_block`;
/// `CudaModel::route_one_block`): each block asks for its token's sums and writes its scores into
/// block 0's shared memory, which routes and groups them all as the one-block launch does. One
/// block alone asks for every token's 16 KB of sums at ~35-40 GB/s. H200, Flash, 18 layers
/// (`step-bench --ab route-cluster:1`, B one block up to 4 tokens, then a block a token; two
/// runs): batch 3 / 4 5 / 17 us a step faster, 5 / 6 / 7 / 8 30-35 / 28-30 / 35-39 / 24-25 (and
/// 29 / 32 / - / 57 faster than one block), batch 2 2-4 us slower, so it starts at 3
/// (benches/results/2026-11-29-h200-routing-cluster.md). `PEREGRINE_ROUTE_CLUSTER_TOKENS` sets it
/// (below 3: none; then `route_block_tokens` decides).
pub(super) const ROUTE_CLUSTER_TOKENS: usize = 8;

/// The fewest tokens that cluster takes: at 2 one block was 2-4 us a step faster (10 of 10
/// rounds, two runs).
pub(super) const ROUTE_CLUSTER_MIN_TOKENS: usize = 3;

/// The most tokens of that cluster: its blocks (the portable cluster size).
pub(super) const ROUTE_CLUSTER_MAX_TOKENS: usize = 8;

/// The one-block routing's largest expert count (its register top K) and threads over the
/// o_proj's sums (`ROUTE_ACC_THREADS` in kernels/ops.cu).
pub(super) const ROUTE_BLOCK_MAX_EXPERTS: usize = 512;
pub(super) const ROUTE_ACC_THREADS: usize = 512;

/// The largest top K the load-time check of the routing cluster assumes (`ROUTE_MAX_K` in
/// kernels/route.cuh).
pub(super) const ROUTE_BLOCK_MAX_K: usize = 64;

/// The dynamic shared memory of the one-block routing of `n` tokens of `e` experts, top `k`:
/// route_group_block's 3 P4 words, the bias, the scores and the choices.
pub(super) fn route_block_smem_bytes(e: usize, k: usize, n: usize) -> usize {
    4 * (e + 2 * n * e + 3 * (n * k).next_multiple_of(4))
}

/// The most tokens the one-block routing takes (`ROUTE_BLOCK_MAX_TOKENS` in kernels/ops.cu).
pub(super) const ROUTE_BLOCK_MAX_TOKENS: usize = 32;

/// The dynamic shared memory the one-block routing kernels may take (set at load, best effort).
pub(super) const ROUTE_BLOCK_MAX_SMEM: usize = 128 * 1024;

/// Up to this many decode rows (from 2) the o_proj does the router too where the MoE runs the
/// two-launch digit kernels (`route_multi_rows`).
pub(super) const ROUTE_OPROJ_ROWS: usize = 8;

/// Copies of the router's fixed-point sums the one-token o_proj spreads its blocks' adds over
/// (`route_in_oproj`): with one, all 256 of Flash's blocks added into each expert's word at the
/// o_proj's end.
pub(super) const ROUTE_ACC_COPIES: usize = 8;

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
    pub(super) fn check(&self, rows: usize, d: usize) -> Result<()> {
        let topk = self.topk;
        let pre_fits = self.pre.as_ref().is_none_or(|p| p.len() >= rows * d);
        if (1..=32).contains(&topk) && self.tok_pairs.len() >= rows * topk && self.out.len() >= rows * topk * d && pre_fits {
            return Ok(());
        }
        Err(Error::Backend(format!("MoE pairs: top-{topk} of {rows} rows of {d} do not fit the buffers")))
    }
}

/// Where `route_device` takes a batch's router logits from.
#[derive(Clone, Copy)]
enum RouteSource<'a> {
    /// Logits [n, E] (the router GEMV's).
    Logits(&'a CudaSlice<f32>),
    /// The o_proj's fixed-point sums and norm parts (`gemv_bf16_presplit_route` of n tokens):
    /// `moe_route_acc`, which also zeroes `nzero` u64 at `zero` (the previous such layer's
    /// token-0 sums).
    Acc { r: &'a crate::kernels::RouteInOproj<'a>, eps: f32, zero: u64, nzero: usize },
}

/// Whether `gemv_f32_norm` takes router `m` at `t` rows: f32 weights in gemv_f32's register path
/// (K % 4 == 0, K <= 4096, below the GEMM's rows) whose K norm_cfg runs one float4 per thread.
pub(crate) fn router_takes_norm(m: &Mat, t: usize) -> bool {
    matches!(m.m, GpuMatrix::F32(_)) && m.k.is_multiple_of(4) && m.k <= 4096 && (1..GEMM_F32_MIN_ROWS).contains(&t)
}

impl CudaModel {
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
    /// (benches/results/2026-11-24-norm-in-router.md). Past one token, where the o_proj does
    /// the router (`route_in_oproj_at`).
    pub(crate) fn norm_in_router(&self, li: usize, rows: usize) -> bool {
        if rows >= 2 {
            // Only the o_proj doing the router takes the norm past one token.
            return self.route_in_oproj_at(li, rows);
        }
        let Some(Mlp::Moe { spec, router, experts: Experts::Stacked(w), .. }) = self.layers.get(li).map(|l| &l.mlp) else { return false };
        if !self.norm_in_router || router.k != self.spec.hidden_size || !router_takes_norm(router, rows) {
            return false;
        }
        let kind = self.kernels.moe_kernel(w, rows, spec.top_k);
        self.routes_in_moe_kernel(w, rows, kind) && self.moe_leaves_pairs_here(spec, w, kind, rows)
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
            let eps = self.spec.rms_norm_eps;
            if rows >= 2 {
                // The routing launch reads the sums, the digit rows launch the norm's parts and
                // g h, and the two-launch digit kernels take those rows (`route_multi_rows`).
                // It also zeroes the token-0 sums of the layer before that takes the router in
                // its o_proj, which a one-token step's fused MoE may have left for the next one
                // (`route_prev_layer`): whether one token runs that kernel now or not (the tuner
                // times both at setup), every layer's sums are zero when its o_proj adds.
                let (zero, nzero) = self.route_prev_fit(li).map_or((0, 0), |p| (self.route_acc_ptr(p), self.route_acc_stride));
                let src = RouteSource::Acc { r: &r, eps, zero, nzero };
                let (routing, _, _) = self.route_device(spec, src, bias.as_ref().map(|b| &b.0), rows)?;
                let xd = self.kernels.digit_rows_acc(&r, rows, self.spec.hidden_size, eps)?;
                let out = self.with_moe_scratch(w, routing.num_pairs, |scratch| self.kernels.moe_mxfp4_pairs(kind, w, &routing, r.hg, MoeInput::Digits(&xd), scratch))?;
                self.moe_pairs_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(MlpOut::Pairs(MoePairs { out, tok_pairs: routing.tok_pairs, topk: spec.top_k, pre: Some(attn) }));
            }
            let prev = self.route_prev_layer(li).ok_or_else(|| Error::Backend(format!("layer {li}: no other layer's router in its o_proj")))?;
            let zero = self.route_acc_ptr(prev);
            let mut tok_pairs = unsafe { self.kernels.alloc.alloc::<i32>(spec.top_k) }?;
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
    /// one token where the router would compute the norm (`norm_in_router`), or 2 up to
    /// `route_oproj_rows` decode rows whose MoE runs the two-launch digit kernels
    /// (`route_multi_rows`); the o_proj the BF16 one over the attention's split on the
    /// pipelined kernel (`oproj_route_takes`), an f32 router over the hidden size, and at least
    /// one other layer doing the same at one token (its MoE zeroes the previous such layer's
    /// accumulators: `route_prev_layer`).
    pub(crate) fn route_in_oproj_at(&self, li: usize, rows: usize) -> bool {
        if rows >= 2 {
            return self.route_in_oproj && self.route_multi_rows(li, rows) && self.route_oproj_fits(li);
        }
        // (route_prev_layer looks back from li - 1: usually one check, not one per layer.)
        rows == 1 && self.route_in_oproj && self.route_oproj_shape(li) && self.route_prev_layer(li).is_some()
    }

    /// Whether layer `li`'s MoE at `rows` (2 up to `route_oproj_rows`) decode rows takes its
    /// routing and input from the o_proj: the two-launch kernels on FP8 digits, leaving their
    /// pairs, which then read x as digit rows written from the o_proj's g h and norm parts
    /// (`moe_digit_rows_acc`) after a routing launch over its sums (`moe_route_acc`). The
    /// post-attention norm and the router GEMV are two launches fewer a layer.
    fn route_multi_rows(&self, li: usize, rows: usize) -> bool {
        if !(2..=self.route_oproj_rows.min(ROUTE_OPROJ_MAX_ROWS)).contains(&rows) || rows > self.fused_group_max {
            return false;
        }
        let Some(Mlp::Moe { spec, experts: Experts::Stacked(w), .. }) = self.layers.get(li).map(|l| &l.mlp) else { return false };
        let kind = self.kernels.moe_kernel_rows(w, rows, spec.top_k, true);
        matches!(kind, MoeKernel::Tiled { .. }) && self.kernels.moe_kind_on_digits(kind, w, rows) && self.moe_leaves_pairs_here(spec, w, kind, rows)
    }

    /// Whether layer `li`'s o_proj at one token does the router where `route_in_oproj_at`'s
    /// other conditions hold: `route_oproj_fits`, and the router computes the norm.
    fn route_oproj_shape(&self, li: usize) -> bool {
        self.route_oproj_fits(li) && self.norm_in_router(li, 1)
    }

    /// Whether layer `li`'s o_proj and router are the shapes `gemv_bf16_presplit_route` takes.
    fn route_oproj_fits(&self, li: usize) -> bool {
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
    }

    /// The layer before `li` (cyclically) whose o_proj does the router at one token: its
    /// accumulators are zeroed by `li`'s MoE.
    fn route_prev_layer(&self, li: usize) -> Option<usize> {
        let n = self.layers.len();
        (1..n).map(|d| (li + n - d) % n).find(|&l| self.route_oproj_shape(l))
    }

    /// The layer before `li` (cyclically) whose o_proj may do the router (`route_oproj_fits`):
    /// `route_prev_layer` whenever one token's MoE is the fused kernel, since every MoE layer of
    /// a model has the same expert and router shapes (`pin_moe_kernel`), so the layers that fit
    /// are the ones the fused path takes, whichever kernel one token runs now.
    fn route_prev_fit(&self, li: usize) -> Option<usize> {
        let n = self.layers.len();
        (1..n).map(|d| (li + n - d) % n).find(|&l| self.route_oproj_fits(l))
    }

    /// Layer `li`'s sums: `ROUTE_OPROJ_MAX_ROWS` tokens' of `route_acc_stride` u64 each.
    fn route_acc_ptr(&self, li: usize) -> u64 {
        self.route_acc.device_ptr(&self.stream).0 + (li * ROUTE_OPROJ_MAX_ROWS * self.route_acc_stride * std::mem::size_of::<u64>()) as u64
    }

    /// The buffers of layer `li`'s router in its o_proj over residual `res`.
    pub(super) fn route_bufs<'a>(&'a self, li: usize, res: &'a CudaSlice<f32>) -> Result<crate::kernels::RouteInOproj<'a>> {
        let l = &self.layers[li];
        let (Mlp::Moe { router: Mat { m: GpuMatrix::F32(wr), n, .. }, .. }, true) = (&l.mlp, self.route_oproj_fits(li)) else {
            return Err(Error::Backend(format!("layer {li}'s o_proj does not take its router")));
        };
        Ok(crate::kernels::RouteInOproj { res, norm: &l.post_norm, router: wr, experts: *n, acc: self.route_acc_ptr(li), copies: self.route_acc_copies, ssq: &self.route_ssq, hg: &self.route_hg, tok: self.route_acc_stride })
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

    /// Forces whether the tiled MoE leaves its routed pairs to the norm after it (by default
    /// where `kernels::moe_pairs_pay`); for tests comparing the two (the same bits). Captured step graphs
    /// are dropped.
    pub fn set_moe_combine_in_norm(&mut self, on: bool) {
        self.moe_combine_in_norm = Some(on);
        self.graphs.clear();
    }

    /// Whether the MoE may run on FP8 digits (`Kernels::moe_fp8_for` of its experts; one token,
    /// and up to `moe_fp8_tokens` decode rows: `Kernels::moe_fp8_at`).
    pub fn moe_fp8(&self) -> bool {
        self.first_moe().is_some_and(|(w, _)| self.kernels.moe_fp8_for(w))
    }

    /// Turns the FP8 digit MoE on or off (`Kernels::set_moe_fp8`), for tests comparing
    /// it with the F16 form. Captured step graphs are dropped.
    pub fn set_moe_fp8(&mut self, on: bool) {
        self.kernels.set_moe_fp8(on);
        self.graphs.clear();
    }

    /// Rows up to which the MoE may run on FP8 digits (`Kernels::moe_fp8_at`).
    pub fn moe_fp8_tokens(&self) -> usize {
        self.kernels.moe_fp8_tokens()
    }

    /// Sets the rows up to which the MoE may run on FP8 digits (`Kernels::set_moe_fp8_tokens`:
    /// the kernels tuned at load keep their choice) and drops the graphs; returns the setting
    /// before.
    pub fn set_moe_fp8_tokens(&mut self, tokens: usize) -> Result<usize> {
        self.graphs.clear();
        self.kernels.set_moe_fp8_tokens(tokens)
    }

    /// Decode rows from which the mixed MoE may run (`Kernels::moe_mixed_at`).
    pub fn moe_mixed_from(&self) -> usize {
        self.kernels.moe_mixed_from()
    }

    /// Sets the decode rows from which the mixed MoE may run (`usize::MAX`: never) and drops
    /// the graphs; returns the setting before.
    pub fn set_moe_mixed_from(&mut self, tokens: usize) -> usize {
        self.graphs.clear();
        self.kernels.set_moe_mixed_from(tokens)
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

    /// Whether the MoE of `rows` rows on `kind` leaves its routed pairs to the norm after it: a
    /// kernel that can (`Kernels::moe_leaves_pairs`), where that pays (`kernels::moe_pairs_pay`)
    /// or is forced.
    fn moe_leaves_pairs_here(&self, spec: &MoeSpec, w: &MoeWeights, kind: MoeKernel, rows: usize) -> bool {
        Kernels::moe_leaves_pairs(w, kind, spec.top_k) && self.moe_combine_in_norm.unwrap_or_else(|| crate::kernels::moe_pairs_pay(spec.top_k, w.hidden, rows))
    }

    /// Router, grouping and the grouped MXFP4 kernels, all on the GPU: no host round trip. One
    /// token on the fused kernel is routed inside it (`route_in_moe`); the tiled kernels may
    /// leave their pairs to the norm after them (`MlpOut::Pairs`).
    /// `decode`: the rows are decode rows (`Kernels::moe_kernel_rows`).
    #[allow(clippy::too_many_arguments)]
    fn moe_stacked(&self, spec: &MoeSpec, logits: &CudaSlice<f32>, bias: Option<&CudaSlice<f32>>, w: &MoeWeights, hn: &CudaSlice<f32>, input: MoeInput, n: usize, decode: bool) -> Result<MlpOut> {
        let kind = self.kernels.moe_kernel_rows(w, n, spec.top_k, decode);
        let leave_pairs = self.moe_leaves_pairs_here(spec, w, kind, n);
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
        let (r, _, _) = self.route_device(spec, RouteSource::Logits(logits), bias, n)?;
        if leave_pairs {
            // Decode rows may run the mixed form (`Kernels::moe_mixed_at`), verify blocks not.
            let out = self.with_moe_scratch(w, r.num_pairs, |scratch| self.kernels.moe_mxfp4_run(kind, w, &r, hn, input, scratch, None, decode))?;
            self.moe_pairs_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(MlpOut::Pairs(MoePairs { out, tok_pairs: r.tok_pairs, topk: spec.top_k, pre: None }));
        }
        let mut y = self.empty(n * self.spec.hidden_size)?;
        self.with_moe_scratch(w, r.num_pairs, |scratch| self.kernels.moe_mxfp4_run(kind, w, &r, hn, input, scratch, Some(&mut y), decode))?;
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
    fn route_device(&self, spec: &MoeSpec, src: RouteSource, bias: Option<&CudaSlice<f32>>, n: usize) -> Result<(DeviceRouting, CudaSlice<i32>, CudaSlice<f32>)> {
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
        // groups the pairs by expert (the arrival counter comes back to zero), or where
        // `route_one_block` takes them one block routing every token and grouping them. Larger ones
        // (prefill chunks) group in a separate 1024-thread kernel: one 256-thread block took
        // 44 us per layer for 64 tokens under ncu.
        let fused = n <= self.fused_group_max;
        let (ei, ki, sm, ng, tg, norm, sc, mu, pi) = (e as i32, k as i32, matches!(spec.scoring, RouterScoring::Softmax) as i32, spec.n_group as i32, spec.topk_group as i32, spec.norm_topk_prob as i32, spec.routed_scaling_factor, max_u as i32, p as i32);
        // Shared memory: scores and choices (2 E floats) while routing; counts, starts and the
        // chunks' per-expert totals (2 E + 1024 ints: GROUP_CHUNK in ops.cu), then a u16 count
        // per warp (8) and expert, while grouping; from the o_proj's sums, then E logits.
        let route_smem = 4 * (2 * e + 1024) + 2 * 8 * e;
        let h = self.spec.hidden_size;
        if let RouteSource::Acc { r, .. } = src {
            if !(fused && n <= ROUTE_OPROJ_MAX_ROWS && r.experts == e && r.ssq.len() >= n * (h / 16) && r.tok > r.copies * e) {
                return Err(Error::Backend(format!("moe_route_acc: {n} tokens of {e} experts do not fit the o_proj's sums")));
            }
        }
        // The grouping (group_scatter in ops.cu, in moe_route's last block or moe_group) keeps
        // its per-expert totals in the chunk's area, so E <= 1024 (moe_group's shared memory is
        // sized for that at load).
        if e > 1024 {
            return Err(Error::Backend(format!("the MoE grouping takes at most 1024 experts, not {e}")));
        }
        let acc = match src {
            RouteSource::Acc { r, .. } => Some((r.copies, h / 16, r.tok)),
            RouteSource::Logits(_) => None,
        };
        if let Some((threads, smem, blocks)) = self.route_one_block(spec, acc, n) {
            let (ti, ei, ki, norm, sc, mu) = (n as i32, e as i32, k as i32, spec.norm_topk_prob as i32, spec.routed_scaling_factor, max_u as i32);
            let mut b = match src {
                RouteSource::Logits(logits) => {
                    let mut b = crate::launch::builder(st, &self.ops.moe_route_block);
                    b.arg(logits);
                    b
                }
                RouteSource::Acc { r, eps, .. } => {
                    let (tok, ci, nssq, hi) = (r.tok as i32, r.copies as i32, (h / 16) as i32, h as i32);
                    let mut b = crate::launch::builder(st, &self.ops.moe_route_acc_block);
                    b.arg(&r.acc).arg(&tok).arg(&ci).arg(r.ssq).arg(&nssq).arg(&hi).arg(&eps);
                    b
                }
            };
            match bias {
                Some(bb) => b.arg(bb),
                None => b.arg(&0u64),
            };
            b.arg(&ti).arg(&mut topk_idx).arg(&mut topk_w).arg(&ei).arg(&ki).arg(&norm).arg(&sc);
            b.arg(&mu).arg(&mut r.experts).arg(&mut r.pair_off).arg(&mut r.pair_tok).arg(&mut r.pair_w).arg(&mut r.tok_pairs);
            if let RouteSource::Acc { zero, nzero, .. } = src {
                let nz = nzero as i32;
                b.arg(&zero).arg(&nz);
            }
            b.cluster(blocks as u32);
            unsafe { b.launch(LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: smem as u32 }) }.map_err(drv)?;
            self.record_routing(&topk_idx)?;
            return Ok((r, topk_idx, topk_w));
        }
        let (mut b, smem) = match src {
            RouteSource::Logits(logits) => {
                let mut b = crate::launch::builder(st, &self.ops.moe_route);
                b.arg(logits);
                (b, route_smem)
            }
            RouteSource::Acc { r, eps, .. } => {
                let (tok, ci, nssq, hi) = (r.tok as i32, r.copies as i32, (h / 16) as i32, h as i32);
                let mut b = crate::launch::builder(st, &self.ops.moe_route_acc);
                b.arg(&r.acc).arg(&tok).arg(&ci).arg(r.ssq).arg(&nssq).arg(&hi).arg(&eps);
                (b, route_smem + 4 * e)
            }
        };
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
        if let RouteSource::Acc { zero, nzero, .. } = src {
            // (The logits follow moe_route's shared memory.)
            let (nz, floats) = (nzero as i32, (route_smem / 4) as i32);
            b.arg(&zero).arg(&nz).arg(&floats);
        }
        unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem as u32 }) }.map_err(drv)?;
        if !fused {
            let mut b = crate::launch::builder(st, &self.ops.moe_group);
            b.arg(&topk_idx).arg(&topk_w).arg(&pi).arg(&ki).arg(&ei).arg(&mu).arg(&mut r.experts).arg(&mut r.pair_off).arg(&mut r.pair_tok).arg(&mut r.pair_w).arg(&mut r.tok_pairs);
            // (its 32 warps' counts in place of moe_route's 8)
            let group_smem = (4 * (2 * e + 1024) + 2 * 32 * e) as u32;
            unsafe { b.launch(LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: group_smem }) }.map_err(drv)?;
        }
        self.record_routing(&topk_idx)?;
        Ok((r, topk_idx, topk_w))
    }

    /// Brings a routing's per-token choices back where `probe_routing` is on (step-bench).
    fn record_routing(&self, topk_idx: &CudaSlice<i32>) -> Result<()> {
        let mut probe = self.routing_probe.lock().map_err(|_| Error::Backend("routing probe lock poisoned".into()))?;
        if let Some(seen) = probe.as_mut() {
            seen.push(self.stream.clone_dtoh(topk_idx).map_err(drv)?);
        }
        Ok(())
    }

    /// Whether the routing launch of `n` tokens' logits under `spec` is one block
    /// (`route_one_block`; for tests).
    pub fn routes_in_one_block(&self, spec: &MoeSpec, n: usize) -> bool {
        self.route_one_block(spec, None, n).is_some()
    }

    /// Whether the routing launch over the o_proj's sums of `n` tokens under `spec` is one block
    /// (`route_one_block`; for tests).
    pub fn routes_oproj_sums_in_one_block(&self, spec: &MoeSpec, n: usize) -> bool {
        self.oproj_sums_routing_blocks(spec, n).is_some()
    }

    /// The blocks of the one-block routing launch over the o_proj's sums of `n` tokens under
    /// `spec` (more than 1: a cluster), or None where that launch is a block a token (for tests).
    pub fn oproj_sums_routing_blocks(&self, spec: &MoeSpec, n: usize) -> Option<usize> {
        self.route_one_block(spec, Some((self.route_acc_copies, self.spec.hidden_size / 16, self.route_acc_stride)), n).map(|(_, _, blocks)| blocks)
    }

    /// The threads, dynamic shared memory and blocks (a cluster where more than 1) of the one-block
    /// routing of `n` tokens from logits or (`acc`: `Some((copies, norm parts, words a token))`)
    /// the o_proj's sums (`moe_route_block`, `moe_route_acc_block`), where it serves them: 2 up to
    /// `route_block_tokens` tokens, sigmoid
    /// scores without groups, at most 512 experts (the register top K), every pair a thread,
    /// Ampere or newer (the top K's warp reductions), within the shared memory the GPU allows them
    /// (`Ops::route_block_smem`). A thread asks
    /// for all its loads at once: from logits a warp a token, at least 8 (16 logits a thread at
    /// most); from the sums 512 threads, each with at most 2 pairs of entries (16-byte loads: an
    /// even E and token stride) of at most 8 copies and a lane with at most 16 norm parts
    /// (ROUTE_ACC_* in kernels/ops.cu). Over the sums on Hopper, `ROUTE_CLUSTER_MIN_TOKENS` up to
    /// `route_cluster_tokens` tokens are a cluster of a block per token (those bounds per block).
    fn route_one_block(&self, spec: &MoeSpec, acc: Option<(usize, usize, usize)>, n: usize) -> Option<(usize, usize, usize)> {
        let (e, k) = (spec.num_experts, spec.top_k);
        let threads = if acc.is_some() { ROUTE_ACC_THREADS } else { 32 * n.max(8) };
        let smem = route_block_smem_bytes(e, k, n);
        let cluster = acc.is_some() && self.ops.route_cluster_fits && (ROUTE_CLUSTER_MIN_TOKENS..=self.route_cluster_tokens).contains(&n);
        let blocks = if cluster { n } else { 1 };
        let block_tokens = n / blocks;
        let loads_fit = match acc {
            Some((copies, parts, tok)) => block_tokens * e <= 4 * threads && e % 2 == 0 && tok % 2 == 0 && copies <= 8 && parts <= 16 * 32 && block_tokens <= threads / 32,
            None => n * e <= 16 * threads,
        };
        let takes = (cluster || (2..=self.route_block_tokens).contains(&n))
            && n <= self.fused_group_max
            && matches!(spec.scoring, RouterScoring::Sigmoid)
            && spec.n_group <= 1
            && (1..=ROUTE_BLOCK_MAX_EXPERTS).contains(&e)
            && n * k <= threads
            && loads_fit
            && self.gpu.capability.0 >= 8
            && smem <= self.ops.route_block_smem;
        takes.then_some((threads, smem, blocks))
    }

    /// The GPU router and grouping on host logits [n, E], brought back: each token's (expert,
    /// weight) choices and the grouping (for the kernel tests against the CPU reference).
    #[allow(clippy::type_complexity)]
    pub fn route_on_gpu(&self, spec: &MoeSpec, logits: &[f32], bias: Option<&[f32]>) -> Result<(Vec<Vec<(usize, f32)>>, MoeRouting)> {
        let (e, k) = (spec.num_experts, spec.top_k);
        let n = logits.len() / e;
        let st = &self.stream;
        let bias_d = bias.map(|b| upload(st, b)).transpose()?;
        let (r, idx, w) = self.route_device(spec, RouteSource::Logits(&upload(st, logits)?), bias_d.as_ref(), n)?;
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
