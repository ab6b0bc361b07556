//! The DFlash drafter on the GPU, mirroring the CPU one (crates/cpu/src/draft.rs): context K/V
//! written during target forwards into pools indexed like the full-attention group; a draft pass
//! computes only the block `[last, MASK...]`. Drafts are chosen on the host from the draft logits.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig};
use peregrine_core::backend::{DraftForward, NULL_BLOCK};
use peregrine_core::{AttentionSpec, DraftSpec, Error, Result};
use peregrine_model::dflash::DraftFiles;

use crate::backend::{drv, load_ffn, stack_rows, upload, Attn, CudaModel, Ffn, Mat, Qkv};
use crate::kv_pool::KvPool;
use crate::weights::Source;

pub(crate) struct DraftLayer {
    input_norm: CudaSlice<f32>,
    post_norm: CudaSlice<f32>,
    pub(crate) attn: Attn,
    /// k's rows then v's, for the context rows (one GEMV); None where they do not stack
    /// (`stack_rows`), and then `attn.qkv` keeps k and v apart for them.
    ctx_kv: Option<Mat>,
    causal: bool,
    mlp: Ffn,
}

pub(crate) struct Drafter {
    pub(crate) spec: DraftSpec,
    fc: Mat,
    hidden_norm: CudaSlice<f32>,
    norm: CudaSlice<f32>,
    pub(crate) layers: Vec<DraftLayer>,
    mask_embedding: Option<CudaSlice<f32>>,
}

impl Drafter {
    /// Whether draft logits are the lm_head's as they are (no multiplier, no soft cap), so the
    /// drafts are their argmax on the GPU.
    pub(crate) fn plain_output(&self) -> bool {
        self.spec.output_multiplier == 1.0 && self.spec.final_logit_softcapping.is_none()
    }

    pub(crate) fn kv_floats_per_token(&self) -> usize {
        self.layers.iter().map(|l| l.attn.spec.k_dim() + l.attn.spec.v_dim()).sum()
    }
}

impl CudaModel {
    /// Attaches a DFlash drafter (before `init_kv`), checked against the target like on the CPU.
    pub fn attach_drafter(&mut self, files: &DraftFiles) -> Result<()> {
        self.attach_drafter_from(&Source::Files(files.weights.as_ref()), &files.spec, &files.prefix, files.mask_embedding.as_deref())
    }

    /// A drafter of `spec`'s shapes with random weights generated on the GPU (benchmarks).
    pub fn attach_synthetic_drafter(&mut self, spec: &DraftSpec, seed: u64) -> Result<()> {
        let synth = self.synthetic_source(seed)?;
        self.attach_drafter_from(&Source::Synthetic(&synth), spec, "", None)
    }

    fn attach_drafter_from(&mut self, w: &Source, s: &DraftSpec, p: &str, mask_embedding: Option<&[f32]>) -> Result<()> {
        if self.kv_config.is_some() {
            return Err(Error::Backend("attach the drafter before the KV cache is allocated".into()));
        }
        let h = s.hidden_size;
        if h != self.spec.hidden_size {
            return Err(Error::config("hidden_size", format!("the drafter's hidden size {h} differs from the target's {}", self.spec.hidden_size)));
        }
        if let Some(&bad) = s.target_layer_ids.iter().find(|&&l| l >= self.spec.layers.len()) {
            return Err(Error::config("dflash_config.target_layer_ids", format!("layer {bad} does not exist in a target of {} layers", self.spec.layers.len())));
        }
        if s.mask_token_id as usize >= self.spec.vocab_size {
            return Err(Error::config("dflash_config.mask_token_id", format!("{} is outside the target vocabulary", s.mask_token_id)));
        }
        if s.layers.iter().any(|l| l.attention.v_head_dim > 128) {
            return Err(Error::Unsupported("drafter V head dim > 128 on the CUDA backend".into()));
        }
        let st = &self.stream;
        let mut layers = Vec::with_capacity(s.layers.len());
        for (i, l) in s.layers.iter().enumerate() {
            let lp = format!("{p}layers.{i}");
            let a = l.attention;
            let pa = format!("{lp}.self_attn");
            let q = w.mat(st, &format!("{pa}.q_proj.weight"), a.q_dim(), h)?;
            let k = w.mat(st, &format!("{pa}.k_proj.weight"), a.k_dim(), h)?;
            let v = w.mat(st, &format!("{pa}.v_proj.weight"), a.v_dim(), h)?;
            // Block rows take q, k and v in one GEMV and context rows k and v in another, where
            // the rows stack and `head_norm_rope` takes the heads; otherwise three matrices
            // serve both.
            let ctx_kv = if head_norm_rope_takes(&a) { stack_rows(st, &[&k, &v])? } else { None };
            let qkv = if ctx_kv.is_some() { Qkv::stack(st, q, k, v)? } else { Qkv::Separate { q, k, v } };
            layers.push(DraftLayer {
                input_norm: w.vector(st, &format!("{lp}.input_layernorm.weight"), h)?,
                post_norm: w.vector(st, &format!("{lp}.post_attention_layernorm.weight"), h)?,
                attn: Attn {
                    spec: a,
                    qkv,
                    bias: None,
                    q_norm: Some(w.vector(st, &format!("{pa}.q_norm.weight"), a.head_dim)?),
                    k_norm: Some(w.vector(st, &format!("{pa}.k_norm.weight"), a.head_dim)?),
                    o: w.mat(st, &format!("{pa}.o_proj.weight"), h, a.o_dim())?,
                    sinks: if a.sinks { Some(w.vector(st, &format!("{pa}.attention_sink_bias"), a.num_heads)?) } else { None },
                },
                ctx_kv,
                causal: l.causal,
                mlp: load_ffn(st, w, &format!("{lp}.mlp"), h, l.intermediate_size)?,
            });
        }
        self.drafter = Some(Drafter {
            fc: w.mat(st, &format!("{p}fc.weight"), h, s.context_dim())?,
            hidden_norm: w.vector(st, &format!("{p}hidden_norm.weight"), h)?,
            norm: w.vector(st, &format!("{p}norm.weight"), h)?,
            layers,
            mask_embedding: mask_embedding.map(|m| upload(st, m)).transpose()?,
            spec: s.clone(),
        });
        Ok(())
    }

    /// Appends target layer `li`'s output (rows of `x`) to the context features when the drafter
    /// reads that layer; the last layer is taken after the final norm. With `ring` (a decode
    /// step that stages the context, crate::draft_staging) row r goes to ring row `ring.0[r]`
    /// of `ring.1` instead.
    pub(crate) fn capture(&self, li: usize, x: &CudaSlice<f32>, n: usize, features: &mut Option<CudaSlice<f32>>, ring: Option<(&CudaSlice<i32>, &CudaSlice<f32>)>) -> Result<()> {
        let Some(d) = &self.drafter else { return Ok(()) };
        let h = self.spec.hidden_size;
        let cd = d.spec.context_dim();
        for (ci, _) in d.spec.target_layer_ids.iter().enumerate().filter(|(_, &id)| id == li) {
            if features.is_none() && ring.is_none() {
                *features = Some(self.zeros(n * cd)?);
            }
            let normed;
            let src = if li + 1 == self.spec.layers.len() {
                normed = self.rms_norm(x, &self.final_norm, n, h)?;
                &normed
            } else {
                x
            };
            let (hh, ww, off) = (h as i32, cd as i32, (ci * h) as i32);
            let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
            let mut b = crate::launch::builder(&self.stream, &self.ops.copy_cols);
            match (ring, features.as_mut()) {
                (Some((rows, buf)), _) => {
                    // The rings are written through a shared reference: only this stream's
                    // kernels touch them.
                    let (p, _g) = buf.device_ptr(&self.stream);
                    b.arg(src).arg(&p).arg(&hh).arg(&ww).arg(&off).arg(rows);
                    unsafe { b.launch(cfg) }.map_err(drv)?;
                }
                (None, Some(f)) => {
                    let no_rows = 0u64;
                    b.arg(src).arg(f).arg(&hh).arg(&ww).arg(&off).arg(&no_rows);
                    unsafe { b.launch(cfg) }.map_err(drv)?;
                }
                (None, None) => return Err(Error::Backend("features captured without a buffer".into())),
            }
        }
        Ok(())
    }

    /// Context K/V of every computed row, from the captured features.
    pub(crate) fn write_draft_context(&self, features: &CudaSlice<f32>, n: usize, pos: &CudaSlice<i32>, slots: &CudaSlice<i64>) -> Result<()> {
        let Some(d) = &self.drafter else { return Ok(()) };
        let h = self.spec.hidden_size;
        let ctx = self.rms_norm(&self.matvec(&d.fc, features, n)?, &d.hidden_norm, n, h)?;
        for (layer, (kc, vc)) in d.layers.iter().zip(&self.draft_kv) {
            let s = layer.attn.spec;
            let kn = layer.attn.k_norm.as_ref().ok_or_else(|| Error::Backend("drafter layers need k norms".into()))?;
            if let Some(kv) = &layer.ctx_kv {
                // k and v in one GEMV, then k's norm and RoPE and both rows' writes in one launch.
                let mut kvr = self.matvec(kv, &ctx, n)?;
                let (kd, stride) = (s.k_dim(), s.k_dim() + s.v_dim());
                let (p, _g) = kvr.device_ptr_mut(&self.stream);
                let heads = HeadRows { q: None, k: (p, kn, stride), v: Some((p + 4 * kd as u64, stride, kc, vc, slots)) };
                self.head_norm_rope(&heads, pos, n, &s)?;
                continue;
            }
            let Qkv::Separate { k: wk, v: wv, .. } = &layer.attn.qkv else {
                return Err(Error::Backend("drafter layers keep separate k and v projections where they do not stack".into()));
            };
            let mut k = self.matvec(wk, &ctx, n)?;
            let v = self.matvec(wv, &ctx, n)?;
            k = self.rms_norm(&k, kn, n * s.num_kv_heads, s.head_dim)?;
            self.rope(&mut k, pos, n, s.num_kv_heads, &s)?;
            self.kv_write(&k, &v, kc, vc, slots, n, &s)?;
        }
        Ok(())
    }

    /// `head_norm_rope`: each row's q heads (when given) and k heads normed by their weights
    /// and rotated at the row's position, in place; with `v`, k's and v's heads go into the
    /// pools at the rows' slots.
    pub(crate) fn head_norm_rope(&self, heads: &HeadRows, pos: &CudaSlice<i32>, n: usize, s: &AttentionSpec) -> Result<()> {
        let (qh, kh) = (if heads.q.is_some() { s.num_heads } else { 0 }, s.num_kv_heads);
        let half = s.rope.rotary_dim.div_ceil(2);
        let (k, kw, k_stride) = heads.k;
        let mut b = crate::launch::builder(&self.stream, &self.ops.head_norm_rope);
        match heads.q {
            Some((q, qw, q_stride)) => b.arg(&q).arg(qw).arg(&(qh as i32)).arg(&(q_stride as i32)),
            None => b.arg(&0u64).arg(&0u64).arg(&0i32).arg(&0i32),
        };
        b.arg(&k).arg(kw).arg(&(kh as i32)).arg(&(k_stride as i32));
        match heads.v {
            Some((v, v_stride, kc, vc, slots)) => b.arg(&v).arg(&(v_stride as i32)).arg(&(s.v_head_dim as i32)).arg(kc).arg(vc).arg(slots),
            None => b.arg(&0u64).arg(&0i32).arg(&0i32).arg(&0u64).arg(&0u64).arg(&0u64),
        };
        let (vs, hd, hf, rd, th, eps) = (s.value_scale, s.head_dim as i32, half as i32, s.rope.rotary_dim as i32, s.rope.theta as f32, self.spec.rms_norm_eps);
        b.arg(&vs).arg(pos).arg(&hd).arg(&hf).arg(&rd).arg(&th).arg(&eps);
        // rms_norm's block for rows of hd (norm_cfg): the same bits.
        let threads = ((s.head_dim / 4).div_ceil(32).clamp(1, 32) * 32) as u32;
        unsafe { b.launch(LaunchConfig { grid_dim: ((n * (qh + kh)) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(())
    }

    pub(crate) fn draft_pass(&mut self, batch: &[DraftForward]) -> Result<Vec<Vec<u32>>> {
        self.graphs.overlap.refuse_while_awaiting()?;
        self.graphs.overlap.break_chain(); // crate::overlap: no chaining across other steps
        let rows = self.draft_rows(batch)?;
        // The context the pass reads: rows waiting in the rings first (crate::draft_staging).
        self.settle_draft_context(batch)?;
        let d = self.drafter.as_ref().ok_or_else(|| Error::Unsupported("no drafter is attached to the CUDA backend".into()))?;
        let plain = d.plain_output();
        let mut out: Vec<Vec<u32>> = batch.iter().map(|x| Vec::with_capacity(x.num_drafts)).collect();
        // Plain logits: drafts are argmax ids picked on the GPU (ties to the lower id, as on
        // the host), through a captured graph when the batch's shape allows.
        if plain {
            if let Some(ids) = self.draft_graph_run(&rows)? {
                for (i, id) in ids.into_iter().enumerate() {
                    out[rows.row_seq[rows.want[i] as usize] as usize].push(id as u32);
                }
                return Ok(out);
            }
        }
        let st = self.stream.clone();
        let meta = DraftMeta::upload(&st, &rows)?;
        let (n, k) = (rows.toks.len(), rows.want.len());
        let vocab = self.spec.vocab_size;
        let mut logits = self.empty(k * vocab)?;
        let mut ids = st.alloc_zeros::<i32>(k).map_err(drv)?;
        self.draft_body(&meta, n, rows.mask_rows.len(), k, &mut logits, &mut ids)?;
        if plain {
            for (i, id) in st.clone_dtoh(&ids).map_err(drv)?.into_iter().enumerate() {
                out[rows.row_seq[rows.want[i] as usize] as usize].push(id as u32);
            }
            return Ok(out);
        }
        // Multiplier and soft cap on the host, then the argmax.
        let d = self.drafter.as_ref().ok_or_else(|| Error::Unsupported("no drafter is attached to the CUDA backend".into()))?;
        let (mult, cap) = (d.spec.output_multiplier, d.spec.final_logit_softcapping);
        let logits = st.clone_dtoh(&logits).map_err(drv)?;
        for (i, &r) in rows.want.iter().enumerate() {
            let row = &logits[i * vocab..(i + 1) * vocab];
            let mut best = (0usize, f32::NEG_INFINITY);
            for (t, &l) in row.iter().enumerate() {
                let mut v = l * mult;
                if let Some(c) = cap {
                    v = c * (v / c).tanh();
                }
                if v > best.1 {
                    best = (t, v);
                }
            }
            out[rows.row_seq[r as usize] as usize].push(best.0 as u32);
        }
        Ok(out)
    }

    /// The block rows of a draft pass: per sequence `[last, MASK x num_drafts]` at positions
    /// start_pos.., with the paging and the rows whose drafts are read (block rows 1..).
    pub(crate) fn draft_rows(&self, batch: &[DraftForward]) -> Result<DraftRows> {
        let cfg = self.kv_config.ok_or_else(|| Error::Backend("draft before init_kv".into()))?;
        let d = self.drafter.as_ref().ok_or_else(|| Error::Unsupported("no drafter is attached to the CUDA backend".into()))?;
        let (vocab, bs) = (self.spec.vocab_size, cfg.block_size);
        let max_blocks = batch.iter().map(|x| x.full_blocks.len()).max().unwrap_or(1).max(1);
        let mut r = DraftRows { tables: vec![0i32; batch.len() * max_blocks], max_blocks, ..Default::default() };
        for (si, x) in batch.iter().enumerate() {
            if x.num_drafts == 0 || x.num_drafts >= d.spec.block_size.max(2) {
                return Err(Error::Backend(format!("sequence {}: {} drafts asked of a drafter with block size {}", x.seq_id, x.num_drafts, d.spec.block_size)));
            }
            if x.last_token as usize >= vocab || x.full_blocks.len() * bs < x.start_pos {
                return Err(Error::Backend(format!("sequence {}: bad draft request", x.seq_id)));
            }
            for (j, &b) in x.full_blocks.iter().enumerate() {
                r.tables[si * max_blocks + j] = if b == NULL_BLOCK { 0 } else { b as i32 };
            }
            r.seq_start.push(x.start_pos as i32);
            r.seq_first.push(r.toks.len() as i32);
            r.seq_nb.push((x.num_drafts + 1) as i32);
            for k in 0..=x.num_drafts {
                if k > 0 {
                    r.mask_rows.push(r.toks.len() as i32);
                    r.want.push(r.toks.len() as i32);
                }
                r.toks.push(if k == 0 { x.last_token as i32 } else { d.spec.mask_token_id as i32 });
                r.row_seq.push(si as i32);
                r.row_idx.push(k as i32);
                r.pos.push((x.start_pos + k) as i32);
            }
        }
        Ok(r)
    }

    /// The draft attention of `n` block rows (`draft_attention_rows` or `draft_attention`): each
    /// row's query against its sequence's context K/V in the pools `kc`, `vc` (blocks of
    /// `block_size` positions) and its block's own rows `k`, `v`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn draft_attend(&self, q: &CudaSlice<f32>, k: &CudaSlice<f32>, v: &CudaSlice<f32>, kc: &KvPool, vc: &KvPool, m: &DraftMeta, block_size: usize, n: usize, s: &AttentionSpec, causal: bool, sinks: Option<&CudaSlice<f32>>) -> Result<CudaSlice<f32>> {
        let mut o = self.empty(n * s.o_dim())?;
        let (mb, bsi, hh2, kvh, hd, vd) = (m.max_blocks as i32, block_size as i32, s.num_heads as i32, s.num_kv_heads as i32, s.head_dim as i32, s.v_head_dim as i32);
        let (window, causal, scale) = (s.window().map_or(0, |w| w as i32), causal as i32, s.softmax_scale);
        let sk = sinks.map_or(0u64, |sk| sk.device_ptr(&self.stream).0);
        // A block per (sequence, head) over all its rows where they fit the row kernel and
        // fill the GPU: below one block an SM its longer chain per key loses to the per-row
        // kernel's 16 warps a row (a Flash-shaped batch-1 draft pass at 2048 tokens 2.34 ms
        // against 1.24, 1.43 with its keys split over blocks; at batch 8 3.16 against 4.27).
        if self.draft_attention_rows && draft_rows_take(s, m.max_nb) && m.seqs * s.num_heads >= self.draft_rows_min_blocks {
            let mut b = crate::launch::builder(&self.stream, &self.ops.draft_attention_rows);
            b.arg(q).arg(k).arg(v).arg(kc).arg(vc).arg(&mut o).arg(&m.seq_start).arg(&m.seq_first).arg(&m.seq_nb).arg(&m.tables)
                .arg(&mb).arg(&bsi).arg(&hh2).arg(&kvh).arg(&hd).arg(&vd).arg(&window).arg(&causal).arg(&scale).arg(&sk);
            unsafe { b.launch(LaunchConfig { grid_dim: (m.seqs as u32, s.num_heads as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
            return Ok(o);
        }
        let mut b = crate::launch::builder(&self.stream, &self.ops.draft_attention);
        b.arg(q).arg(k).arg(v).arg(kc).arg(vc).arg(&mut o).arg(&m.row_seq).arg(&m.row_idx).arg(&m.seq_start).arg(&m.seq_first).arg(&m.seq_nb).arg(&m.tables)
            .arg(&mb).arg(&bsi).arg(&hh2).arg(&kvh).arg(&hd).arg(&vd).arg(&window).arg(&causal).arg(&scale).arg(&sk);
        let warps = self.draft_attention_warps as u32;
        unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, s.num_heads as u32, 1), block_dim: (32 * warps, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        Ok(o)
    }

    /// The draft pass on the GPU with no host round trip (so it can be captured): embedding and
    /// MASK rows, the drafter's layers over [context, block], the final norm and the target's
    /// lm_head on the `k` wanted rows into `logits`, their argmax into `ids`.
    pub(crate) fn draft_body(&self, m: &DraftMeta, n: usize, n_mask: usize, k: usize, logits: &mut CudaSlice<f32>, ids: &mut CudaSlice<i32>) -> Result<()> {
        let d = self.drafter.as_ref().ok_or_else(|| Error::Unsupported("no drafter is attached to the CUDA backend".into()))?;
        let h = self.spec.hidden_size;
        let st = &self.stream;
        let mut x = self.embed_rows(&m.tok, None, n)?;
        let hh = h as i32;
        if let Some(me) = &d.mask_embedding {
            if n_mask > 0 {
                let mut b = crate::launch::builder(st, &self.ops.fill_rows);
                b.arg(&mut x).arg(&m.mask_rows).arg(me).arg(&hh);
                unsafe { b.launch(LaunchConfig { grid_dim: (n_mask as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
            }
        }
        if d.spec.input_embedding_scale != 1.0 {
            let (sc, nn) = (d.spec.input_embedding_scale, (n * h) as i32);
            let mut b = crate::launch::builder(st, &self.ops.scale);
            b.arg(&mut x).arg(&sc).arg(&nn);
            unsafe { b.launch(LaunchConfig::for_num_elems((n * h) as u32)) }.map_err(drv)?;
        }
        let cfg = self.kv_config.ok_or_else(|| Error::Backend("draft before init_kv".into()))?;
        let mut layers = d.layers.iter().zip(&self.draft_kv).peekable();
        let mut hn_next: Option<CudaSlice<f32>> = None;
        while let Some((layer, (kc, vc))) = layers.next() {
            let a = &layer.attn;
            let s = a.spec;
            let (Some(qn), Some(kn)) = (a.q_norm.as_ref(), a.k_norm.as_ref()) else {
                return Err(Error::Backend("drafter layers need q and k norms".into()));
            };
            let hn = match hn_next.take() {
                Some(hn) => hn,
                None => self.rms_norm(&x, &layer.input_norm, n, h)?,
            };
            let (mut q, mut k, mut v) = self.project_qkv(&a.qkv, &hn, None, n)?;
            if head_norm_rope_takes(&s) {
                let (qp, _gq) = q.device_ptr_mut(st);
                let (kp, _gk) = k.device_ptr_mut(st);
                self.head_norm_rope(&HeadRows { q: Some((qp, qn, s.q_dim())), k: (kp, kn, s.k_dim()), v: None }, &m.pos, n, &s)?;
            } else {
                q = self.rms_norm(&q, qn, n * s.num_heads, s.head_dim)?;
                k = self.rms_norm(&k, kn, n * s.num_kv_heads, s.head_dim)?;
                self.rope(&mut q, &m.pos, n, s.num_heads, &s)?;
                self.rope(&mut k, &m.pos, n, s.num_kv_heads, &s)?;
            }
            if s.value_scale != 1.0 {
                let (sc, nn) = (s.value_scale, (n * s.v_dim()) as i32);
                let mut b = crate::launch::builder(st, &self.ops.scale);
                b.arg(&mut v).arg(&sc).arg(&nn);
                unsafe { b.launch(LaunchConfig::for_num_elems((n * s.v_dim()) as u32)) }.map_err(drv)?;
            }
            let o = self.draft_attend(&q, &k, &v, kc, vc, m, cfg.block_size, n, &s, layer.causal, a.sinks.as_ref())?;
            let o = self.matvec(&a.o, &o, n)?;
            let hn = self.add_rms_norm(&mut x, &o, &layer.post_norm, n, h)?;
            let mm = self.ffn(&layer.mlp, &hn, n)?;
            // The residual add with the next layer's input norm (add_rms_norm: the same bits).
            match layers.peek() {
                Some((next, _)) => hn_next = Some(self.add_rms_norm(&mut x, &mm, &next.input_norm, n, h)?),
                None => self.add_inplace(&mut x, &mm, n * h)?,
            }
        }
        let mut sel = self.empty(k * h)?;
        self.gather_rows(&x, &m.want, &mut sel, k, h)?;
        let normed = self.rms_norm(&sel, &d.norm, k, h)?;
        self.lm_head_into(&normed, k, logits)?;
        self.argmax_into(logits, k, ids, None)
    }
}

/// A draft pass's rows on the host.
#[derive(Default)]
pub(crate) struct DraftRows {
    pub(crate) toks: Vec<i32>,
    pub(crate) row_seq: Vec<i32>,
    pub(crate) row_idx: Vec<i32>,
    pub(crate) pos: Vec<i32>,
    pub(crate) mask_rows: Vec<i32>,
    pub(crate) want: Vec<i32>,
    pub(crate) seq_start: Vec<i32>,
    pub(crate) seq_first: Vec<i32>,
    pub(crate) seq_nb: Vec<i32>,
    pub(crate) tables: Vec<i32>,
    pub(crate) max_blocks: usize,
}

/// A draft pass's rows on the GPU.
pub(crate) struct DraftMeta {
    pub(crate) tok: CudaSlice<i32>,
    pub(crate) row_seq: CudaSlice<i32>,
    pub(crate) row_idx: CudaSlice<i32>,
    pub(crate) pos: CudaSlice<i32>,
    pub(crate) mask_rows: CudaSlice<i32>,
    pub(crate) want: CudaSlice<i32>,
    pub(crate) seq_start: CudaSlice<i32>,
    pub(crate) seq_first: CudaSlice<i32>,
    pub(crate) seq_nb: CudaSlice<i32>,
    pub(crate) tables: CudaSlice<i32>,
    pub(crate) max_blocks: usize,
    /// Sequences (padding ones included) and the most block rows one has.
    pub(crate) seqs: usize,
    pub(crate) max_nb: usize,
}

impl DraftMeta {
    pub(crate) fn upload(st: &std::sync::Arc<cudarc::driver::CudaStream>, r: &DraftRows) -> Result<DraftMeta> {
        // Never empty (a zero-length upload is an error).
        let up = |v: &[i32]| upload(st, if v.is_empty() { &[0] } else { v });
        Ok(DraftMeta {
            tok: up(&r.toks)?,
            row_seq: up(&r.row_seq)?,
            row_idx: up(&r.row_idx)?,
            pos: up(&r.pos)?,
            mask_rows: up(&r.mask_rows)?,
            want: up(&r.want)?,
            seq_start: up(&r.seq_start)?,
            seq_first: up(&r.seq_first)?,
            seq_nb: up(&r.seq_nb)?,
            tables: up(&r.tables)?,
            max_blocks: r.max_blocks,
            seqs: r.seq_nb.len(),
            max_nb: r.seq_nb.iter().copied().max().unwrap_or(0) as usize,
        })
    }
}

/// The rows `head_norm_rope` takes, as device pointers and row strides in floats: q's (with
/// its norm weight), k's (with its), and for context rows v's with the pools and slots K and V
/// go to.
pub(crate) struct HeadRows<'a> {
    pub(crate) q: Option<(u64, &'a CudaSlice<f32>, usize)>,
    pub(crate) k: (u64, &'a CudaSlice<f32>, usize),
    pub(crate) v: Option<(u64, usize, &'a KvPool, &'a KvPool, &'a CudaSlice<i64>)>,
}

/// Whether `draft_attention_rows` takes blocks of at most `max_nb` rows of this attention: four
/// lanes a row, each holding a quarter of q and of the V accumulator in float4s (DAR_ROWS,
/// DAR_DIMS in ops.cu).
pub(crate) fn draft_rows_take(s: &AttentionSpec, max_nb: usize) -> bool {
    (1..=8).contains(&max_nb) && s.head_dim.is_multiple_of(16) && s.v_head_dim.is_multiple_of(16) && s.head_dim <= 128 && s.v_head_dim <= 128
}

/// Whether `head_norm_rope` takes heads of this attention: rms_norm's register path (whole
/// float4s, one a thread of at most 1024).
fn head_norm_rope_takes(s: &AttentionSpec) -> bool {
    s.head_dim.is_multiple_of(4) && s.head_dim <= 4096
}
