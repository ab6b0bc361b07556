//! The DFlash drafter on the GPU, mirroring the CPU one (crates/cpu/src/draft.rs): context K/V
//! written during target forwards into pools indexed like the full-attention group; a draft pass
//! computes only the block `[last, MASK...]`. Drafts are chosen on the host from the draft logits.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use peregrine_core::backend::{DraftForward, NULL_BLOCK};
use peregrine_core::{DraftSpec, Error, Result};
use peregrine_model::dflash::DraftFiles;

use crate::backend::{drv, load_ffn, upload, Attn, CudaModel, Ffn, Mat, Qkv};
use crate::weights::Source;

pub(crate) struct DraftLayer {
    input_norm: CudaSlice<f32>,
    post_norm: CudaSlice<f32>,
    pub(crate) attn: Attn,
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
            layers.push(DraftLayer {
                input_norm: w.vector(st, &format!("{lp}.input_layernorm.weight"), h)?,
                post_norm: w.vector(st, &format!("{lp}.post_attention_layernorm.weight"), h)?,
                attn: Attn {
                    spec: a,
                    // Separate: context rows need only k and v.
                    qkv: Qkv::Separate {
                        q: w.mat(st, &format!("{pa}.q_proj.weight"), a.q_dim(), h)?,
                        k: w.mat(st, &format!("{pa}.k_proj.weight"), a.k_dim(), h)?,
                        v: w.mat(st, &format!("{pa}.v_proj.weight"), a.v_dim(), h)?,
                    },
                    bias: None,
                    q_norm: Some(w.vector(st, &format!("{pa}.q_norm.weight"), a.head_dim)?),
                    k_norm: Some(w.vector(st, &format!("{pa}.k_norm.weight"), a.head_dim)?),
                    o: w.mat(st, &format!("{pa}.o_proj.weight"), h, a.o_dim())?,
                    sinks: if a.sinks { Some(w.vector(st, &format!("{pa}.attention_sink_bias"), a.num_heads)?) } else { None },
                },
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
    /// reads that layer; the last layer is taken after the final norm.
    pub(crate) fn capture(&self, li: usize, x: &CudaSlice<f32>, n: usize, features: &mut Option<CudaSlice<f32>>) -> Result<()> {
        let Some(d) = &self.drafter else { return Ok(()) };
        let h = self.spec.hidden_size;
        let cd = d.spec.context_dim();
        for (ci, _) in d.spec.target_layer_ids.iter().enumerate().filter(|(_, &id)| id == li) {
            if features.is_none() {
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
            let mut b = self.stream.launch_builder(&self.ops.copy_cols);
            b.arg(src).arg(features.as_mut().unwrap()).arg(&hh).arg(&ww).arg(&off);
            unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
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
            let Qkv::Separate { k: wk, v: wv, .. } = &layer.attn.qkv else {
                return Err(Error::Backend("drafter layers keep separate k and v projections".into()));
            };
            let mut k = self.matvec(wk, &ctx, n)?;
            let v = self.matvec(wv, &ctx, n)?;
            k = self.rms_norm(&k, layer.attn.k_norm.as_ref().unwrap(), n * s.num_kv_heads, s.head_dim)?;
            self.rope(&mut k, pos, n, s.num_kv_heads, &s)?;
            self.kv_write(&k, &v, kc, vc, slots, n, &s)?;
        }
        Ok(())
    }

    pub(crate) fn draft_pass(&mut self, batch: &[DraftForward]) -> Result<Vec<Vec<u32>>> {
        let cfg = self.kv_config.ok_or_else(|| Error::Backend("draft before init_kv".into()))?;
        let d = self.drafter.as_ref().ok_or_else(|| Error::Unsupported("no drafter is attached to the CUDA backend".into()))?;
        let (h, vocab, bs) = (self.spec.hidden_size, self.spec.vocab_size, cfg.block_size);
        let max_blocks = batch.iter().map(|x| x.full_blocks.len()).max().unwrap_or(1).max(1);
        let (mut toks, mut row_seq, mut row_idx, mut pos, mut mask_rows) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut seq_start, mut seq_first, mut seq_nb) = (Vec::new(), Vec::new(), Vec::new());
        let mut tables = vec![0i32; batch.len() * max_blocks];
        for (si, x) in batch.iter().enumerate() {
            if x.num_drafts == 0 || x.num_drafts >= d.spec.block_size.max(2) {
                return Err(Error::Backend(format!("sequence {}: {} drafts asked of a drafter with block size {}", x.seq_id, x.num_drafts, d.spec.block_size)));
            }
            if x.last_token as usize >= vocab || x.full_blocks.len() * bs < x.start_pos {
                return Err(Error::Backend(format!("sequence {}: bad draft request", x.seq_id)));
            }
            for (j, &b) in x.full_blocks.iter().enumerate() {
                tables[si * max_blocks + j] = if b == NULL_BLOCK { 0 } else { b as i32 };
            }
            seq_start.push(x.start_pos as i32);
            seq_first.push(toks.len() as i32);
            seq_nb.push((x.num_drafts + 1) as i32);
            for r in 0..=x.num_drafts {
                if r > 0 {
                    mask_rows.push(toks.len() as i32);
                }
                toks.push(if r == 0 { x.last_token as i32 } else { d.spec.mask_token_id as i32 });
                row_seq.push(si as i32);
                row_idx.push(r as i32);
                pos.push((x.start_pos + r) as i32);
            }
        }
        let n = toks.len();
        let st = self.stream.clone();
        let tok_d = upload(&st, &toks)?;
        let mut x = self.embed_rows(&tok_d, n)?;
        let hh = h as i32;
        if let Some(m) = &d.mask_embedding {
            let rows = upload(&st, &mask_rows)?;
            let mut b = st.launch_builder(&self.ops.fill_rows);
            b.arg(&mut x).arg(&rows).arg(m).arg(&hh);
            unsafe { b.launch(LaunchConfig { grid_dim: (mask_rows.len() as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        }
        if d.spec.input_embedding_scale != 1.0 {
            let (sc, nn) = (d.spec.input_embedding_scale, (n * h) as i32);
            let mut b = st.launch_builder(&self.ops.scale);
            b.arg(&mut x).arg(&sc).arg(&nn);
            unsafe { b.launch(LaunchConfig::for_num_elems((n * h) as u32)) }.map_err(drv)?;
        }
        let (pos_d, row_seq_d, row_idx_d) = (upload(&st, &pos)?, upload(&st, &row_seq)?, upload(&st, &row_idx)?);
        let (start_d, first_d, nb_d, tables_d) = (upload(&st, &seq_start)?, upload(&st, &seq_first)?, upload(&st, &seq_nb)?, upload(&st, &tables)?);
        for (layer, (kc, vc)) in d.layers.iter().zip(&self.draft_kv) {
            let a = &layer.attn;
            let s = a.spec;
            let hn = self.rms_norm(&x, &layer.input_norm, n, h)?;
            let (mut q, mut k, mut v) = self.project_qkv(&a.qkv, &hn, n)?;
            q = self.rms_norm(&q, a.q_norm.as_ref().unwrap(), n * s.num_heads, s.head_dim)?;
            k = self.rms_norm(&k, a.k_norm.as_ref().unwrap(), n * s.num_kv_heads, s.head_dim)?;
            self.rope(&mut q, &pos_d, n, s.num_heads, &s)?;
            self.rope(&mut k, &pos_d, n, s.num_kv_heads, &s)?;
            if s.value_scale != 1.0 {
                let (sc, nn) = (s.value_scale, (n * s.v_dim()) as i32);
                let mut b = st.launch_builder(&self.ops.scale);
                b.arg(&mut v).arg(&sc).arg(&nn);
                unsafe { b.launch(LaunchConfig::for_num_elems((n * s.v_dim()) as u32)) }.map_err(drv)?;
            }
            let mut o = self.empty(n * s.o_dim())?;
            let (mb, bsi, hh2, kvh, hd, vd) = (max_blocks as i32, bs as i32, s.num_heads as i32, s.num_kv_heads as i32, s.head_dim as i32, s.v_head_dim as i32);
            let (window, causal, scale) = (s.window().map_or(0, |w| w as i32), layer.causal as i32, s.softmax_scale);
            let mut b = st.launch_builder(&self.ops.draft_attention);
            b.arg(&q).arg(&k).arg(&v).arg(kc).arg(vc).arg(&mut o).arg(&row_seq_d).arg(&row_idx_d).arg(&start_d).arg(&first_d).arg(&nb_d).arg(&tables_d)
                .arg(&mb).arg(&bsi).arg(&hh2).arg(&kvh).arg(&hd).arg(&vd).arg(&window).arg(&causal).arg(&scale);
            match &a.sinks {
                Some(sk) => b.arg(sk),
                None => b.arg(&0u64),
            };
            unsafe { b.launch(LaunchConfig { grid_dim: (n as u32, s.num_heads as u32, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
            let o = self.matvec(&a.o, &o, n)?;
            self.add_inplace(&mut x, &o, n * h)?;
            let hn = self.rms_norm(&x, &layer.post_norm, n, h)?;
            let m = self.ffn(&layer.mlp, &hn, n)?;
            self.add_inplace(&mut x, &m, n * h)?;
        }
        // Block rows 1.. through the target's lm_head; multiplier, soft cap and argmax on the host.
        let want: Vec<i32> = (0..n as i32).filter(|&r| row_idx[r as usize] > 0).collect();
        let idx = upload(&st, &want)?;
        let mut sel = self.empty(want.len() * h)?;
        let mut b = st.launch_builder(&self.ops.gather_rows);
        b.arg(&x).arg(&idx).arg(&mut sel).arg(&hh);
        unsafe { b.launch(LaunchConfig { grid_dim: (want.len() as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
        let normed = self.rms_norm(&sel, &d.norm, want.len(), h)?;
        let logits_d = self.lm_head_logits(&normed, want.len())?;
        let (mult, cap) = (d.spec.output_multiplier, d.spec.final_logit_softcapping);
        let mut out: Vec<Vec<u32>> = batch.iter().map(|x| Vec::with_capacity(x.num_drafts)).collect();
        if mult == 1.0 && cap.is_none() {
            // Plain logits: pick the drafts on the GPU (ties to the lower id, as on the host)
            // and bring back only ids.
            let mut ids = st.alloc_zeros::<i32>(want.len()).map_err(drv)?;
            let v = vocab as i32;
            let mut b = st.launch_builder(&self.ops.argmax_rows);
            b.arg(&logits_d).arg(&v).arg(&mut ids);
            unsafe { b.launch(LaunchConfig { grid_dim: (want.len() as u32, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 }) }.map_err(drv)?;
            for (i, id) in st.clone_dtoh(&ids).map_err(drv)?.into_iter().enumerate() {
                out[row_seq[want[i] as usize] as usize].push(id as u32);
            }
            return Ok(out);
        }
        let logits = st.clone_dtoh(&logits_d).map_err(drv)?;
        for (i, &r) in want.iter().enumerate() {
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
            out[row_seq[r as usize] as usize].push(best.0 as u32);
        }
        Ok(out)
    }
}
