//! Attention on `CudaModel`: the q/k/v projection, RoPE with the KV-cache write, and the
//! decode and prefill attention kernels with the splits and block shapes that fill the GPU.

use super::*;

/// Rows of split decode attention whose splits merge inside the kernel: the arrival counters
/// cover this many rows x heads (at least 64 heads), every decode graph's bucket.
pub(super) const MERGE_IN_ATTENTION_ROWS: usize = 64;

/// Warps (heads) per block of `attention_v2_heads` (ATT_WARPS in kernels/ops.cu).
const ATT_WARPS: usize = 8;

/// Decode rows from which `attention_v2_heads` serves attention without the K/V write inside
/// (`CudaModel::attn_heads_min_rows`).
pub(super) const ATTN_HEADS_MIN_ROWS: usize = 8;

/// Decode rows, and positions in the block tables, from which `attention_gqa_tc` serves decode
/// attention without the K/V write inside (`CudaModel::attn_tc_min_rows`, `attn_tc_min_span`).
/// From 16 rows at any span: at 128 positions (Flash shapes, H100) its forms beat
/// `attention_v2_heads` at batch 16-64 (steps -0.5 to -1.6%) and lost at batch 8 (+0.2 to +1.4%;
/// benches/results/2026-11-26-gqa-decode-short-spans.md).
pub(super) const ATTN_TC_MIN_ROWS: usize = 16;
pub(super) const ATTN_TC_MIN_SPAN: usize = 2048;
/// Blocks of each (row, KV head) of `attention_gqa_tc` that share the merge of its splits
/// (`CudaModel::attn_merge_sharers`).
pub(super) const GT_MERGE_SHARERS: usize = 4;

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
pub(super) const ATTN_TC_SPLIT: usize = 2048;

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
    pub(super) f32: CudaFunction,
    pub(super) tc: Vec<CudaFunction>,
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

/// Rows of a layer's stacked q/k/v projection: a ready attention runs only behind one of
/// exactly these (`Kernels::qkv_ready_takes`).
fn stacked_qkv_rows(s: &AttentionSpec) -> usize {
    s.q_dim() + s.k_dim() + s.v_dim()
}

/// Whether a layer's attention runs `attention_v2` (8 warps per head over the positions), not
/// the one-warp kernel: unless its K head is wider than v2 holds.
pub(super) fn uses_attention_v2(s: &AttentionSpec) -> bool {
    s.head_dim <= 256
}

/// Positions of K/V `attention_v2_heads` stages per tile (ATT_TILE in kernels/ops.cu).
const ATT_TILE: usize = 16;

/// Tiles of K/V `attention_v2_heads` keeps in flight (ATT_STAGES in kernels/ops.cu).
const ATT_STAGES: usize = 2;

/// Dynamic shared memory an `attention_v2_heads` block may ask for (opted into at load).
pub(super) const ATT_HEADS_MAX_SMEM: usize = 96 * 1024;

/// Dynamic shared memory of an `attention_v2_heads` block for `s` over pools of type `kv`, if
/// `s` suits it: its tiles in flight of the K + V rows of every KV head its 8 heads read (each
/// row padded to an odd count of 16-byte units), then the 8 heads' f32 q; head dims of whole
/// float4 halves, K and V rows of whole 16-byte units, the limits of attention_v2 (hd <= 256,
/// vd <= 128), and at most `ATT_HEADS_MAX_SMEM`.
pub(crate) fn attention_heads_smem(s: &AttentionSpec, kv: KvDtype) -> Option<usize> {
    let group = s.num_heads / s.num_kv_heads.max(1);
    if group == 0 {
        return None;
    }
    let kv_per_block = (0..s.num_heads.div_ceil(ATT_WARPS))
        .map(|y| ((y * ATT_WARPS + ATT_WARPS).min(s.num_heads) - 1) / group - y * ATT_WARPS / group + 1)
        .max()?;
    let unit = 16 / kv.size();  // elements per 16-byte unit (KV_VEC)
    let row = unit * (((s.head_dim + s.v_head_dim) / unit) | 1);
    let bytes = ATT_STAGES * ATT_TILE * kv_per_block * row * kv.size() + ATT_WARPS * s.head_dim * 4;
    let whole_units = s.head_dim.is_multiple_of(unit.max(8)) && s.v_head_dim.is_multiple_of(unit);
    (whole_units && s.head_dim <= 256 && s.v_head_dim <= 128 && bytes <= ATT_HEADS_MAX_SMEM).then_some(bytes)
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

impl CudaModel {
    /// The kernel each stacked FP8 q/k/v projection of `t` rows would run as the ready
    /// projection (`Kernels::qkv_ready_kernel`), by its rows, once per distinct pair. The choice
    /// follows the loaded kernels' occupancy, so a build under measurement defines with other
    /// registers may pick another kernel: `step_bench --ab defines:` prints both.
    pub fn qkv_ready_kernels(&self, t: usize) -> Vec<(usize, crate::kernels::QkvReady)> {
        let mut out = Vec::new();
        for l in &self.layers {
            if let Qkv::Stacked { m: Mat { m: GpuMatrix::Fp8 { .. }, .. }, rows } = &l.attn.qkv {
                let n: usize = rows.iter().sum();
                let choice = (n, self.kernels.qkv_ready_kernel(n, t));
                if !out.contains(&choice) {
                    out.push(choice);
                }
            }
        }
        out
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
        let no_tc = self.gqa_tc_for(&s, meta.max_blocks, meta.block_size, n).is_none();
        let ready_shape = kv_in_attention && v2 && no_tc && self.qkv_ready_at(li, n);
        let splits = self.attn_splits(&s, meta.max_blocks, meta.block_size, n, ready_shape);
        let kv_fused = kv_in_attention && v2 && n * s.num_heads * splits <= self.attention_fused_wave(ready_shape) && no_tc;
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
                    Some(res) => self.route_bufs(li, res).and_then(|rb| self.kernels.gemv_bf16_presplit_route(w, &oh, &ol, &mut y, a.o.n, a.o.k, n, zero, &rb)),
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

    /// Whether layer `li`'s q/k/v projection of `rows` decode rows runs the ready kernel
    /// (`qkv_ready_at`, the attention writing the K/V itself) in one wave of its blocks
    /// (`Kernels::qkv_ready_waves`).
    pub(crate) fn qkv_ready_one_wave(&self, li: usize, rows: usize) -> bool {
        self.attention_takes_kv(li) && self.qkv_ready_at(li, rows) && self.kernels.qkv_ready_waves(stacked_qkv_rows(&self.layers[li].attn.spec), rows) <= 1
    }

    /// Layers whose attention of `rows` decode rows would start heads as their projection
    /// finishes them (`qkv_ready_at`, where the attention writes the K/V itself); for tests.
    pub fn qkv_ready_layers(&self, rows: usize) -> usize {
        (0..self.layers.len()).filter(|&l| self.attention_takes_kv(l) && self.qkv_ready_at(l, rows)).count()
    }

    /// Layers whose ready attention of `rows` decode rows over block tables `max_blocks` wide
    /// runs as `attention_v2_kv_ready_pre` (the splits of `attn_splits`, the choice `attend`
    /// makes); for tests. 0 before `init_kv`.
    pub fn preloading_attention_layers(&self, rows: usize, max_blocks: usize) -> usize {
        let Some(cfg) = self.kv_config else { return 0 };
        (0..self.layers.len())
            .filter(|&l| {
                let s = &self.layers[l].attn.spec;
                let ready = self.attention_takes_kv(l) && self.qkv_ready_at(l, rows) && self.gqa_tc_for(s, max_blocks, cfg.block_size, rows).is_none();
                let splits = self.attn_splits(s, max_blocks, cfg.block_size, rows, ready);
                ready && self.runs_ready_pre(s, rows, splits)
            })
            .count()
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

    /// One wave of the kernel a decode attention with the K/V write inside runs: for a `ready`
    /// one (behind a projection counting its tiles) `attention_v2_kv_ready`, whose loop may
    /// take fewer registers than `attention_v2_kv`'s (`attn_ready_own_wave`).
    fn attention_fused_wave(&self, ready: bool) -> usize {
        if ready && self.attn_ready_own_wave {
            self.attention_ready_wave
        } else {
            self.attention_kv_wave
        }
    }

    /// Whether a ready attention `s` of `rows` rows in `splits` splits runs as
    /// `attention_v2_kv_ready_pre`: while that is on, its grid fits one wave of it and the q/k/v
    /// projection ahead of it fits one wave of its own kernel (`Kernels::qkv_ready_waves`).
    /// Behind a projection of two waves the preloading kernel was slower: MiMo-V2.5-Pro's 128
    /// heads at 2 rows (1696 tiles of q/k/v) 26-29 us a step in every round of three processes on
    /// the H200, while Flash's one-wave projections gain from it at 1 and 4 rows
    /// (benches/results/2026-11-30-h200-defaults-sweep.md).
    fn runs_ready_pre(&self, s: &AttentionSpec, rows: usize, splits: usize) -> bool {
        self.attention_ready_pre && rows * s.num_heads * splits <= self.attention_ready_pre_wave && self.kernels.qkv_ready_waves(stacked_qkv_rows(s), rows) <= 1
    }

    /// Blocks per (row, head) of `attention_v2` for `rows` rows (`attention_splits`), as the
    /// block tables allow, so a graph captured for a table width and row bucket keeps its count.
    /// A `ready` attention fills its own kernel's wave (`attention_fused_wave`). With
    /// `attn_ready_pre_fill` (off by default) one whose splits would leave the wave of
    /// `attention_v2_kv_ready_pre` (4 positions a warp preloaded, 2 in `attention_v2_kv_ready`)
    /// takes as many as fit that wave instead, where that is enough: batch 2 and 3 of 64 heads
    /// in 2 and 1 splits instead of 3 and 2.
    fn attn_splits(&self, s: &AttentionSpec, max_blocks: usize, block_size: usize, rows: usize, ready: bool) -> usize {
        let span = s.window().map_or(max_blocks * block_size, |w| w.min(max_blocks * block_size));
        let row_heads = rows * s.num_heads;
        let splits = attention_splits(span, self.attn_split, self.attn_fill.then_some(self.attention_fused_wave(ready)), row_heads);
        if ready && self.attn_ready_pre_fill && !self.runs_ready_pre(s, rows, splits) {
            let pre = attention_splits(span, self.attn_split, self.attn_fill.then_some(self.attention_ready_pre_wave), row_heads);
            if self.runs_ready_pre(s, rows, pre) {
                return pre;
            }
        }
        splits
    }

    /// Blocks per (row, block of 8 heads) of `attention_v2_heads` for `rows` rows, whose
    /// blocks take `smem` bytes: as for `attention_v2`, its blocks counted per 8 heads and
    /// filling its own wave.
    fn attn_heads_splits(&self, s: &AttentionSpec, max_blocks: usize, block_size: usize, rows: usize, smem: usize) -> Result<usize> {
        let span = s.window().map_or(max_blocks * block_size, |w| w.min(max_blocks * block_size));
        let wave = self.ops.attention_v2_heads.occupancy_max_active_blocks_per_multiprocessor(256, smem, None).map_err(drv)? as usize * self.sm_count;
        Ok(attention_splits(span, self.attn_split, self.attn_fill.then_some(wave), rows * s.num_heads.div_ceil(ATT_WARPS)).min(self.attn_heads_max_splits))
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
    pub(crate) fn attend(&self, q: &CudaSlice<f32>, kc: &KvPool, vc: &KvPool, pos: &CudaSlice<i32>, seq: &CudaSlice<i32>, tables: &CudaSlice<i32>, max_blocks: usize, block_size: usize, n: usize, s: &AttentionSpec, sinks: Option<&CudaSlice<f32>>, v2: bool, bf16_split: bool, mut fresh: Option<FreshKv>, prefill: Option<&PrefillRows>) -> Result<(CudaSlice<f32>, Option<Bf16Split>)> {
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
        let heads_smem = attention_heads_smem(s, self.kv_dtype);
        // Or, where gqa_tc_for says so, the heads of each KV head on the tensor cores.
        let gqa_tc = if v2 && fresh.is_none() && rows.is_none() { self.gqa_tc_for(s, max_blocks, block_size, n) } else { None };
        let gqa_tc_wave = gqa_tc.as_ref().map(|tc| self.gqa_tc_wave(s, tc)).transpose()?;
        let per_head_warps = gqa_tc.is_none() && v2 && fresh.is_none() && rows.is_none() && n >= self.attn_heads_min_rows && heads_smem.is_some();
        let heads_smem = heads_smem.unwrap_or(0);
        let splits = match (v2, per_head_warps, gqa_tc_wave) {
            (true, _, Some(wave)) => self.gqa_tc_splits(s, wave, max_blocks, block_size, n),
            (false, _, _) => 1,
            (true, true, None) => self.attn_heads_splits(s, max_blocks, block_size, n, heads_smem)?,
            (true, false, None) => self.attn_splits(s, max_blocks, block_size, n, fresh.as_ref().is_some_and(|f| f.ready.is_some())),
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
            (None, (true, true, _)) if fresh.as_ref().is_some_and(|f| f.ready.is_some()) && self.runs_ready_pre(s, n, splits) => &self.ops.attention_v2_kv_ready_pre,
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
    pub(crate) fn rope_kv_write(&self, q: &mut CudaSlice<f32>, k: &CudaSlice<f32>, v: &CudaSlice<f32>, kc: &KvPool, vc: &KvPool, pos: &CudaSlice<i32>, slots: &CudaSlice<i64>, n: usize, s: &AttentionSpec) -> Result<()> {
        let half = s.rope.rotary_dim.div_ceil(2);
        let (hh, kvh, hd, vd, hf, rd, th, vs) = (s.num_heads as i32, s.num_kv_heads as i32, s.head_dim as i32, s.v_head_dim as i32, half as i32, s.rope.rotary_dim as i32, s.rope.theta as f32, s.value_scale);
        let mut b = crate::launch::builder(&self.stream, &self.ops.rope_kv_write);
        b.arg(q).arg(k).arg(v).arg(kc).arg(vc).arg(pos).arg(slots).arg(&hh).arg(&kvh).arg(&hd).arg(&vd).arg(&hf).arg(&rd).arg(&th).arg(&vs);
        // Enough blocks per row for about one rotated q pair per thread (at most 32).
        let per_row = (s.num_heads * half).max(s.num_kv_heads * s.head_dim).div_ceil(256).clamp(1, 32) as u32;
        unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, per_row, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    /// K/V rows into paged pools (V times the value scale).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn kv_write(&self, k: &CudaSlice<f32>, v: &CudaSlice<f32>, kc: &KvPool, vc: &KvPool, slots: &CudaSlice<i64>, n: usize, s: &AttentionSpec) -> Result<()> {
        let (kd, vd, vs) = (s.k_dim() as i32, s.v_dim() as i32, s.value_scale);
        let mut b = crate::launch::builder(&self.stream, &self.ops.kv_write);
        b.arg(k).arg(v).arg(kc).arg(vc).arg(slots).arg(&kd).arg(&vd).arg(&vs);
        unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
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
    use peregrine_core::{AttentionKind, AttentionSpec, KvDtype, QkvLayout, RopeSpec};

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

    fn attention_heads_smem_f32(s: &AttentionSpec) -> Option<usize> {
        attention_heads_smem(s, KvDtype::F32)
    }

    #[test]
    fn one_warp_per_head_attention_takes_shapes_whose_tiles_fit() {
        // Flash: one KV head per block, rows of 320 floats padded to 324 (81 float4s), two
        // tiles of 16, then 8 heads' q of 192.
        assert_eq!(attention_heads_smem_f32(&spec(64, 4, 192, 128)), Some((2 * 16 * 324 + 8 * 192) * 4));
        assert_eq!(attention_heads_smem_f32(&spec(64, 8, 192, 128)), Some((2 * 16 * 324 + 8 * 192) * 4));
        // Four heads per KV head: a block stages two KV heads (rows of 256 floats padded to 260).
        assert_eq!(attention_heads_smem_f32(&spec(8, 2, 128, 128)), Some((2 * 16 * 2 * 260 + 8 * 128) * 4));
        // Two heads per KV head: four KV heads a block; rows of 80 floats (20 float4s) padded to 84.
        assert_eq!(attention_heads_smem_f32(&spec(12, 6, 48, 32)), Some((2 * 16 * 4 * 84 + 8 * 48) * 4));
        // Multi-head attention of 128-wide heads: eight KV heads a block, past the 96 KiB.
        assert_eq!(attention_heads_smem_f32(&spec(32, 32, 128, 128)), None);
        // Head dims that are not whole float4 halves, V not whole float4s, past attention_v2's limits.
        assert_eq!(attention_heads_smem_f32(&spec(8, 1, 100, 128)), None);
        assert_eq!(attention_heads_smem_f32(&spec(8, 1, 128, 126)), None);
        assert_eq!(attention_heads_smem_f32(&spec(8, 1, 320, 64)), None);
        assert_eq!(attention_heads_smem_f32(&spec(8, 1, 128, 256)), None);
    }

    #[test]
    fn one_warp_per_head_attention_over_bf16_pools_stages_half_the_bytes() {
        let f32 = |s: &AttentionSpec| attention_heads_smem(s, KvDtype::F32);
        let bf16 = |s: &AttentionSpec| attention_heads_smem(s, KvDtype::Bf16);
        // Flash: rows of 320 BF16 values (40 units, padded to 41: 328 values), q stays f32.
        assert_eq!(bf16(&spec(64, 4, 192, 128)), Some(2 * 16 * 328 * 2 + 8 * 192 * 4));
        assert!(bf16(&spec(64, 4, 192, 128)) < f32(&spec(64, 4, 192, 128)));
        // Rows of 80 values: 10 units, padded to 11 (88 values), four KV heads a block.
        assert_eq!(bf16(&spec(12, 6, 48, 32)), Some(2 * 16 * 4 * 88 * 2 + 8 * 48 * 4));
        // V of whole float4s but not of whole 8-value units: f32 pools only.
        assert!(f32(&spec(8, 1, 128, 124)).is_some());
        assert_eq!(bf16(&spec(8, 1, 128, 124)), None);
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
