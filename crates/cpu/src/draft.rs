//! The DFlash drafter on the CPU (REFERENCE.md §3, PyPI `dflash` `DFlashDraftModel`).
//!
//! Context K/V: every target forward turns each computed position's target features into the
//! drafter's per-layer K/V and writes them into the full-attention pages (`write_context`), so
//! they are shared by prefix caching and rolled back with the target's own K/V. A draft pass
//! (`draft`) then only computes the block `[last, MASK...]`: its K/V live in temporaries and
//! are dropped.

use peregrine_core::backend::{DraftForward, NULL_BLOCK};
use peregrine_core::{DraftSpec, Error, KvDtype, ModelSpec, Result};
use peregrine_model::dflash::DraftFiles;
use rayon::prelude::*;

use crate::model::{load_attention, load_expert, Attention, Expert, LayerKv};
use crate::ops::{self, dot, matmul, rms_norm};

struct DraftLayer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    attn: Attention,
    causal: bool,
    mlp: Expert,
}

pub(crate) struct Drafter {
    pub spec: DraftSpec,
    fc: Vec<f32>,
    hidden_norm: Vec<f32>,
    norm: Vec<f32>,
    layers: Vec<DraftLayer>,
    mask_embedding: Option<Vec<f32>>,
}

impl Drafter {
    pub(crate) fn load(target: &ModelSpec, files: &DraftFiles) -> Result<Drafter> {
        let s = &files.spec;
        let h = s.hidden_size;
        if h != target.hidden_size {
            return Err(Error::config(
                "hidden_size",
                format!("the drafter's hidden size {h} differs from the target's {}: it must share the target's embedding", target.hidden_size),
            ));
        }
        if let Some(&bad) = s.target_layer_ids.iter().find(|&&l| l >= target.layers.len()) {
            return Err(Error::config(
                "dflash_config.target_layer_ids",
                format!("layer {bad} does not exist in a target of {} layers", target.layers.len()),
            ));
        }
        if s.mask_token_id as usize >= target.vocab_size {
            return Err(Error::config(
                "dflash_config.mask_token_id",
                format!("{} is outside the target vocabulary of {}", s.mask_token_id, target.vocab_size),
            ));
        }
        let w = files.weights.as_ref();
        let p = &files.prefix;
        let mut layers = Vec::with_capacity(s.layers.len());
        for (i, l) in s.layers.iter().enumerate() {
            let lp = format!("{p}layers.{i}");
            layers.push(DraftLayer {
                input_norm: w.vector(&format!("{lp}.input_layernorm.weight"), h)?,
                post_norm: w.vector(&format!("{lp}.post_attention_layernorm.weight"), h)?,
                attn: load_attention(w, &format!("{lp}.self_attn"), &l.attention, h)?,
                causal: l.causal,
                mlp: load_expert(w, &format!("{lp}.mlp"), h, l.intermediate_size)?,
            });
        }
        Ok(Drafter {
            fc: w.matrix(&format!("{p}fc.weight"), h, s.context_dim())?,
            hidden_norm: w.vector(&format!("{p}hidden_norm.weight"), h)?,
            norm: w.vector(&format!("{p}norm.weight"), h)?,
            layers,
            mask_embedding: files.mask_embedding.clone(),
            spec: s.clone(),
        })
    }

    /// Floats of context K+V per position, summed over the drafter's layers.
    pub fn kv_floats_per_token(&self) -> usize {
        self.layers.iter().map(|l| l.attn.spec.k_dim() + l.attn.spec.v_dim()).sum()
    }

    pub(crate) fn alloc_kv(&self, slots: usize) -> Vec<LayerKv> {
        self.layers
            .iter()
            .map(|l| LayerKv { k: vec![0.0; slots * l.attn.spec.k_dim()], v: vec![0.0; slots * l.attn.spec.v_dim()] })
            .collect()
    }

    /// q or k of one row: per-head RMSNorm then RoPE at `pos`.
    fn norm_rope(&self, a: &Attention, x: &mut [f32], heads: usize, pos: usize, norm: Option<&Vec<f32>>) {
        let hd = a.spec.head_dim;
        for hh in 0..heads {
            let v = &mut x[hh * hd..(hh + 1) * hd];
            if let Some(w) = norm {
                let c = v.to_vec();
                ops::rms_norm_row(&c, w, self.spec.rms_norm_eps, v);
            }
            ops::apply_rope(v, pos, &a.inv_freq);
        }
    }

    /// Projects target features (`n` rows of `context_dim`) to context K/V and writes them at
    /// the given slots (one per row).
    pub(crate) fn write_context(&self, features: &[f32], positions: &[usize], slots: &[usize], kv: &mut [LayerKv], dtype: KvDtype) {
        let h = self.spec.hidden_size;
        let n = positions.len();
        let ctx = rms_norm(&matmul(features, n, &self.fc, h, self.spec.context_dim()), &self.hidden_norm, self.spec.rms_norm_eps);
        for (layer, pool) in self.layers.iter().zip(kv.iter_mut()) {
            let a = &layer.attn;
            let s = a.spec;
            let mut k = matmul(&ctx, n, &a.k, s.k_dim(), h);
            let mut v = matmul(&ctx, n, &a.v, s.v_dim(), h);
            for r in 0..n {
                self.norm_rope(a, &mut k[r * s.k_dim()..(r + 1) * s.k_dim()], s.num_kv_heads, positions[r], a.k_norm.as_ref());
                if s.value_scale != 1.0 {
                    v[r * s.v_dim()..(r + 1) * s.v_dim()].iter_mut().for_each(|x| *x *= s.value_scale);
                }
                pool.write(slots[r], &k[r * s.k_dim()..(r + 1) * s.k_dim()], &v[r * s.v_dim()..(r + 1) * s.v_dim()], dtype);
            }
        }
    }

    /// Greedy drafts for each request. `embed` is the target's embedding, `head` its lm_head.
    pub(crate) fn draft(
        &self,
        batch: &[DraftForward],
        kv: &[LayerKv],
        block_size: usize,
        embed: &[f32],
        head: &[f32],
        vocab: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let h = self.spec.hidden_size;
        // Rows: for each request, its block of 1 + num_drafts tokens.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        let mut x = Vec::new();
        for (bi, d) in batch.iter().enumerate() {
            if d.num_drafts == 0 || d.num_drafts >= self.spec.block_size.max(2) {
                return Err(Error::Backend(format!(
                    "sequence {}: {} drafts asked of a drafter with block size {}",
                    d.seq_id, d.num_drafts, self.spec.block_size
                )));
            }
            if d.last_token as usize >= vocab {
                return Err(Error::Backend(format!("token id {} outside the vocabulary of {vocab}", d.last_token)));
            }
            if d.full_blocks.len() * block_size < d.start_pos {
                return Err(Error::Backend(format!("sequence {}: block table shorter than the context", d.seq_id)));
            }
            for r in 0..=d.num_drafts {
                rows.push((bi, r));
                let row: &[f32] = match (&self.mask_embedding, r) {
                    (_, 0) => &embed[d.last_token as usize * h..(d.last_token as usize + 1) * h],
                    (Some(m), _) => m,
                    (None, _) => {
                        let t = self.spec.mask_token_id as usize;
                        &embed[t * h..(t + 1) * h]
                    }
                };
                x.extend(row.iter().map(|v| v * self.spec.input_embedding_scale));
            }
        }
        let n = rows.len();
        for (li, layer) in self.layers.iter().enumerate() {
            let o = self.attention(li, layer, &x, &rows, batch, &kv[li], block_size)?;
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let hn = rms_norm(&x, &layer.post_norm, self.spec.rms_norm_eps);
            let m = expert(&layer.mlp, &hn, n, h);
            x.iter_mut().zip(&m).for_each(|(a, b)| *a += b);
        }
        // Drafts come from block rows 1.. through the target's lm_head.
        let want: Vec<usize> = rows.iter().enumerate().filter(|(_, r)| r.1 > 0).map(|(i, _)| i).collect();
        let mut sel = Vec::with_capacity(want.len() * h);
        for &r in &want {
            sel.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let normed = rms_norm(&sel, &self.norm, self.spec.rms_norm_eps);
        let mut logits = matmul(&normed, want.len(), head, vocab, h);
        let m = self.spec.output_multiplier;
        for l in logits.iter_mut() {
            *l *= m;
            if let Some(c) = self.spec.final_logit_softcapping {
                *l = c * (*l / c).tanh();
            }
        }
        let mut out: Vec<Vec<u32>> = batch.iter().map(|d| Vec::with_capacity(d.num_drafts)).collect();
        for (i, &r) in want.iter().enumerate() {
            out[rows[r].0].push(argmax(&logits[i * vocab..(i + 1) * vocab]));
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        _li: usize,
        layer: &DraftLayer,
        x: &[f32],
        rows: &[(usize, usize)],
        batch: &[DraftForward],
        pool: &LayerKv,
        bs: usize,
    ) -> Result<Vec<f32>> {
        let h = self.spec.hidden_size;
        let n = rows.len();
        let a = &layer.attn;
        let s = a.spec;
        let (hd, vd) = (s.head_dim, s.v_head_dim);
        let hn = rms_norm(x, &layer.input_norm, self.spec.rms_norm_eps);
        let mut q = matmul(&hn, n, &a.q, s.q_dim(), h);
        let mut k = matmul(&hn, n, &a.k, s.k_dim(), h);
        let mut v = matmul(&hn, n, &a.v, s.v_dim(), h);
        for (r, &(bi, ti)) in rows.iter().enumerate() {
            let pos = batch[bi].start_pos + ti;
            self.norm_rope(a, &mut q[r * s.q_dim()..(r + 1) * s.q_dim()], s.num_heads, pos, a.q_norm.as_ref());
            self.norm_rope(a, &mut k[r * s.k_dim()..(r + 1) * s.k_dim()], s.num_kv_heads, pos, a.k_norm.as_ref());
            if s.value_scale != 1.0 {
                v[r * s.v_dim()..(r + 1) * s.v_dim()].iter_mut().for_each(|x| *x *= s.value_scale);
            }
        }
        // First row of each request's block.
        let mut first = vec![0usize; batch.len()];
        for (r, &(bi, ti)) in rows.iter().enumerate() {
            if ti == 0 {
                first[bi] = r;
            }
        }
        let group = s.num_heads / s.num_kv_heads;
        let window = s.window();
        let mut out = vec![0f32; n * s.o_dim()];
        out.par_chunks_mut(vd).enumerate().try_for_each(|(idx, o)| -> Result<()> {
            let (r, hq) = (idx / s.num_heads, idx % s.num_heads);
            let (bi, ti) = rows[r];
            let d = &batch[bi];
            let qpos = d.start_pos + ti;
            let kvh = hq / group;
            let qh = &q[(r * s.num_heads + hq) * hd..(r * s.num_heads + hq + 1) * hd];
            // Keys are context positions 0..start and block positions start..=start+num_drafts.
            let visible = |kpos: usize| {
                (!layer.causal || kpos <= qpos)
                    && window.is_none_or(|w| qpos.abs_diff(kpos) < w)
            };
            let mut scores = Vec::new();
            let mut vals: Vec<&[f32]> = Vec::new();
            let lo = window.map_or(0, |w| qpos.saturating_sub(w - 1));
            for kpos in lo..d.start_pos {
                if !visible(kpos) {
                    continue;
                }
                let b = d.full_blocks[kpos / bs];
                if b == NULL_BLOCK {
                    return Err(Error::Backend(format!("sequence {}: no KV block for context position {kpos}", d.seq_id)));
                }
                let slot = b as usize * bs + kpos % bs;
                let kj = &pool.k[(slot * s.num_kv_heads + kvh) * hd..(slot * s.num_kv_heads + kvh + 1) * hd];
                scores.push(dot(qh, kj) * s.softmax_scale);
                vals.push(&pool.v[(slot * s.num_kv_heads + kvh) * vd..(slot * s.num_kv_heads + kvh + 1) * vd]);
            }
            for j in 0..=d.num_drafts {
                if !visible(d.start_pos + j) {
                    continue;
                }
                let rj = first[bi] + j;
                let kj = &k[(rj * s.num_kv_heads + kvh) * hd..(rj * s.num_kv_heads + kvh + 1) * hd];
                scores.push(dot(qh, kj) * s.softmax_scale);
                vals.push(&v[(rj * s.num_kv_heads + kvh) * vd..(rj * s.num_kv_heads + kvh + 1) * vd]);
            }
            if let Some(sinks) = &a.sinks {
                scores.push(sinks[hq]);
            }
            ops::softmax_in_place(&mut scores);
            for (p, vj) in scores.iter().zip(&vals) {
                for (x, y) in o.iter_mut().zip(vj.iter()) {
                    *x += p * y;
                }
            }
            Ok(())
        })?;
        Ok(matmul(&out, n, &a.o, h, s.o_dim()))
    }
}

fn expert(e: &Expert, x: &[f32], n: usize, h: usize) -> Vec<f32> {
    crate::model::expert_forward(e, x, n, h)
}

/// Argmax, lowest id on ties (torch.argmax's choice).
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
