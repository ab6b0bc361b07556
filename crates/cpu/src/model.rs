//! The exact f32 forward of the whole MiMo-V2 stack (and Llama-style dense stacks), read only
//! from `ModelSpec`, with a paged two-group KV cache (see `peregrine_core::backend`).

use peregrine_core::backend::{Backend, DraftForward, KvBlockBytes, KvConfig, Logits, OutputRows, SeqForward, NULL_BLOCK};
use peregrine_core::{AttentionKind, KvDtype, DraftSpec, AttentionSpec, Error, MlpSpec, ModelSpec, MoeSpec, QkvLayout, Result, RouterScoring};
use peregrine_model::dflash::DraftFiles;
use peregrine_model::weights::WeightSource;
use rayon::prelude::*;

use crate::draft::Drafter;
use crate::ops::{self, dot, matmul, rms_norm, silu};

pub(crate) struct Attention {
    pub(crate) spec: AttentionSpec,
    pub(crate) q: Vec<f32>,
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
    q_bias: Option<Vec<f32>>,
    k_bias: Option<Vec<f32>>,
    v_bias: Option<Vec<f32>>,
    pub(crate) q_norm: Option<Vec<f32>>,
    pub(crate) k_norm: Option<Vec<f32>>,
    pub(crate) o: Vec<f32>,
    pub(crate) sinks: Option<Vec<f32>>,
    pub(crate) inv_freq: Vec<f32>,
}

pub(crate) struct Expert {
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

enum Mlp {
    Dense(Expert),
    Moe { spec: MoeSpec, router: Vec<f32>, bias: Option<Vec<f32>>, experts: Vec<Expert> },
}

struct Layer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    attn: Attention,
    mlp: Mlp,
    /// Which KV group the layer's cache lives in, and its index inside that group.
    swa: bool,
    group_index: usize,
}

/// One layer's K and V pools: `[blocks * block_size, kv_heads, dim]`.
pub(crate) struct LayerKv {
    pub(crate) k: Vec<f32>,
    pub(crate) v: Vec<f32>,
}

impl LayerKv {
    /// Slot `slot`'s K and V rows, rounded to `dtype` as a GPU pool of that type holds them
    /// (the pools stay f32 here: the reference keeps one attention path).
    pub(crate) fn write(&mut self, slot: usize, k: &[f32], v: &[f32], dtype: KvDtype) {
        let (kd, vd) = (k.len(), v.len());
        for (dst, &x) in self.k[slot * kd..(slot + 1) * kd].iter_mut().zip(k) {
            *dst = dtype.round(x);
        }
        for (dst, &x) in self.v[slot * vd..(slot + 1) * vd].iter_mut().zip(v) {
            *dst = dtype.round(x);
        }
    }
}

pub struct CpuModel {
    spec: ModelSpec,
    embed: Vec<f32>,
    lm_head: Option<Vec<f32>>,
    final_norm: Vec<f32>,
    layers: Vec<Layer>,
    kv: Vec<LayerKv>,
    kv_config: Option<KvConfig>,
    /// What the K/V pools round their values to (`set_kv_dtype`).
    kv_dtype: KvDtype,
    drafter: Option<Drafter>,
    /// The drafter's context K/V, one pool per drafter layer, indexed like the full group.
    draft_kv: Vec<LayerKv>,
}

pub(crate) fn load_expert(w: &dyn WeightSource, p: &str, h: usize, i: usize) -> Result<Expert> {
    Ok(Expert {
        gate: w.matrix(&format!("{p}.gate_proj.weight"), i, h)?,
        up: w.matrix(&format!("{p}.up_proj.weight"), i, h)?,
        down: w.matrix(&format!("{p}.down_proj.weight"), h, i)?,
    })
}

pub(crate) fn load_attention(w: &dyn WeightSource, p: &str, a: &AttentionSpec, h: usize) -> Result<Attention> {
    let (qd, kd, vd) = (a.q_dim(), a.k_dim(), a.v_dim());
    let (q, k, v) = match a.qkv_layout {
        QkvLayout::Separate => (
            w.matrix(&format!("{p}.q_proj.weight"), qd, h)?,
            w.matrix(&format!("{p}.k_proj.weight"), kd, h)?,
            w.matrix(&format!("{p}.v_proj.weight"), vd, h)?,
        ),
        QkvLayout::FusedPerKvHead => {
            // Rows grouped per KV head g: [q rows of its query heads | K rows | V rows].
            let fused = w.matrix(&format!("{p}.qkv_proj.weight"), qd + kd + vd, h)?;
            let qpg = a.num_heads / a.num_kv_heads * a.head_dim;
            let group = qpg + a.head_dim + a.v_head_dim;
            let (mut q, mut k, mut v) = (Vec::with_capacity(qd * h), Vec::with_capacity(kd * h), Vec::with_capacity(vd * h));
            for g in 0..a.num_kv_heads {
                let base = g * group * h;
                q.extend_from_slice(&fused[base..base + qpg * h]);
                k.extend_from_slice(&fused[base + qpg * h..base + (qpg + a.head_dim) * h]);
                v.extend_from_slice(&fused[base + (qpg + a.head_dim) * h..base + group * h]);
            }
            (q, k, v)
        }
    };
    let bias = |name: &str, n: usize| -> Result<Option<Vec<f32>>> {
        if !a.qkv_bias {
            return Ok(None);
        }
        w.vector(&format!("{p}.{name}.bias"), n).map(Some)
    };
    let (q_bias, k_bias, v_bias) = match a.qkv_layout {
        QkvLayout::Separate => (bias("q_proj", qd)?, bias("k_proj", kd)?, bias("v_proj", vd)?),
        QkvLayout::FusedPerKvHead if a.qkv_bias => {
            return Err(Error::Unsupported("bias on a fused qkv_proj".into()));
        }
        QkvLayout::FusedPerKvHead => (None, None, None),
    };
    Ok(Attention {
        spec: *a,
        q,
        k,
        v,
        q_bias,
        k_bias,
        v_bias,
        q_norm: if a.qk_norm { Some(w.vector(&format!("{p}.q_norm.weight"), a.head_dim)?) } else { None },
        k_norm: if a.qk_norm { Some(w.vector(&format!("{p}.k_norm.weight"), a.head_dim)?) } else { None },
        o: w.matrix(&format!("{p}.o_proj.weight"), h, a.o_dim())?,
        sinks: if a.sinks { Some(w.vector(&format!("{p}.attention_sink_bias"), a.num_heads)?) } else { None },
        inv_freq: ops::rope_inv_freq(a.rope.theta, a.rope.rotary_dim),
    })
}

impl CpuModel {
    /// Expands every weight to f32 (the reference favours clarity over memory).
    pub fn load(spec: &ModelSpec, w: &dyn WeightSource) -> Result<CpuModel> {
        let h = spec.hidden_size;
        let embed = w.matrix("model.embed_tokens.weight", spec.vocab_size, h)?;
        let lm_head = if spec.tie_word_embeddings && !w.contains("lm_head.weight") {
            None
        } else {
            Some(w.matrix("lm_head.weight", spec.vocab_size, h)?)
        };
        let (mut n_full, mut n_swa) = (0, 0);
        let mut layers = Vec::with_capacity(spec.layers.len());
        for (i, ls) in spec.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let attn = load_attention(w, &format!("{p}.self_attn"), &ls.attention, h)?;
            let mlp = match ls.mlp {
                MlpSpec::Dense { intermediate_size } => Mlp::Dense(load_expert(w, &format!("{p}.mlp"), h, intermediate_size)?),
                MlpSpec::Moe(m) => {
                    let router = w.matrix(&format!("{p}.mlp.gate.weight"), m.num_experts, h)?;
                    let bias = if m.correction_bias {
                        Some(w.vector(&format!("{p}.mlp.gate.e_score_correction_bias"), m.num_experts)?)
                    } else {
                        None
                    };
                    let experts = (0..m.num_experts)
                        .into_par_iter()
                        .map(|e| load_expert(w, &format!("{p}.mlp.experts.{e}"), h, m.intermediate_size))
                        .collect::<Result<Vec<_>>>()?;
                    Mlp::Moe { spec: m, router, bias, experts }
                }
            };
            let swa = matches!(ls.attention.kind, AttentionKind::Sliding { .. });
            let group_index = if swa { n_swa } else { n_full };
            if swa { n_swa += 1 } else { n_full += 1 }
            layers.push(Layer {
                input_norm: w.vector(&format!("{p}.input_layernorm.weight"), h)?,
                post_norm: w.vector(&format!("{p}.post_attention_layernorm.weight"), h)?,
                attn,
                mlp,
                swa,
                group_index,
            });
        }
        Ok(CpuModel {
            spec: spec.clone(),
            embed,
            lm_head,
            final_norm: w.vector("model.norm.weight", h)?,
            layers,
            kv: Vec::new(),
            kv_config: None,
            kv_dtype: KvDtype::F32,
            drafter: None,
            draft_kv: Vec::new(),
        })
    }

    /// Attaches a DFlash drafter. Call before `init_kv`: its context K/V take room in every
    /// full-attention block.
    pub fn attach_drafter(&mut self, files: &DraftFiles) -> Result<()> {
        if self.kv_config.is_some() {
            return Err(Error::Backend("attach the drafter before the KV cache is allocated".into()));
        }
        self.drafter = Some(Drafter::load(&self.spec, files)?);
        Ok(())
    }

    fn per_token_kv_floats(a: &AttentionSpec) -> usize {
        a.num_kv_heads * (a.head_dim + a.v_head_dim)
    }

    /// Runs one sequence from position 0 through a private KV cache and returns every
    /// position's logits (tests and tools; the engine uses [`Backend::forward`]).
    pub fn forward_sequence(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
        let bs = 16;
        let blocks = tokens.len().div_ceil(bs).max(1);
        self.init_kv(KvConfig { block_size: bs, num_full_blocks: blocks, num_swa_blocks: blocks })?;
        let table: Vec<u32> = (0..blocks as u32).collect();
        let out = self.forward(&[SeqForward {
            seq_id: 0,
            tokens: tokens.to_vec(),
            start_pos: 0,
            full_blocks: table.clone(),
            swa_blocks: table,
            output: OutputRows::All,
        }])?;
        let v = self.spec.vocab_size;
        Ok(out[0].data.chunks(v).map(<[f32]>::to_vec).collect())
    }

    fn attention_layer(&mut self, li: usize, x: &[f32], batch: &[SeqForward], rows: &[(usize, usize)]) -> Result<Vec<f32>> {
        let h = self.spec.hidden_size;
        let n = rows.len();
        let layer = &self.layers[li];
        let a = &layer.attn;
        let s = a.spec;
        let hn = rms_norm(x, &layer.input_norm, self.spec.rms_norm_eps);
        let mut q = matmul(&hn, n, &a.q, s.q_dim(), h);
        let mut k = matmul(&hn, n, &a.k, s.k_dim(), h);
        let mut v = matmul(&hn, n, &a.v, s.v_dim(), h);
        for (t, b) in [(&mut q, &a.q_bias), (&mut k, &a.k_bias), (&mut v, &a.v_bias)] {
            if let Some(b) = b {
                for row in t.chunks_mut(b.len()) {
                    row.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                }
            }
        }
        let hd = s.head_dim;
        let vd = s.v_head_dim;
        let bs = self.kv_config.map(|c| c.block_size).unwrap_or(16);
        // Per-head q/k norm, RoPE, value scale.
        for (r, &(si, ti)) in rows.iter().enumerate() {
            let pos = batch[si].start_pos + ti;
            for hq in 0..s.num_heads {
                let qh = &mut q[(r * s.num_heads + hq) * hd..(r * s.num_heads + hq + 1) * hd];
                if let Some(w) = &a.q_norm {
                    let c = qh.to_vec();
                    ops::rms_norm_row(&c, w, self.spec.rms_norm_eps, qh);
                }
                ops::apply_rope(qh, pos, &a.inv_freq);
            }
            for hk in 0..s.num_kv_heads {
                let kh = &mut k[(r * s.num_kv_heads + hk) * hd..(r * s.num_kv_heads + hk + 1) * hd];
                if let Some(w) = &a.k_norm {
                    let c = kh.to_vec();
                    ops::rms_norm_row(&c, w, self.spec.rms_norm_eps, kh);
                }
                ops::apply_rope(kh, pos, &a.inv_freq);
            }
            if s.value_scale != 1.0 {
                v[r * s.v_dim()..(r + 1) * s.v_dim()].iter_mut().for_each(|x| *x *= s.value_scale);
            }
        }
        // Write K/V into the pages.
        let kv_index = self.kv_slot(li);
        let swa = layer.swa;
        {
            let pool = &mut self.kv[kv_index];
            for (r, &(si, ti)) in rows.iter().enumerate() {
                let seq = &batch[si];
                let pos = seq.start_pos + ti;
                let slot = slot_of(seq, swa, pos, bs)?;
                pool.write(slot, &k[r * s.k_dim()..(r + 1) * s.k_dim()], &v[r * s.v_dim()..(r + 1) * s.v_dim()], self.kv_dtype);
            }
        }
        // Attention per (row, head), in parallel.
        let pool = &self.kv[kv_index];
        let a = &self.layers[li].attn;
        let group = s.num_heads / s.num_kv_heads;
        let window = s.window();
        let mut out = vec![0f32; n * s.o_dim()];
        out.par_chunks_mut(vd).enumerate().try_for_each(|(idx, o)| -> Result<()> {
            let (r, hq) = (idx / s.num_heads, idx % s.num_heads);
            let (si, ti) = rows[r];
            let seq = &batch[si];
            let pos = seq.start_pos + ti;
            let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let kvh = hq / group;
            let qh = &q[(r * s.num_heads + hq) * hd..(r * s.num_heads + hq + 1) * hd];
            let mut scores = Vec::with_capacity(pos + 2 - lo);
            let mut slots = Vec::with_capacity(pos + 1 - lo);
            for j in lo..=pos {
                let slot = slot_of(seq, swa, j, bs)?;
                let kj = &pool.k[(slot * s.num_kv_heads + kvh) * hd..(slot * s.num_kv_heads + kvh + 1) * hd];
                scores.push(dot(qh, kj) * s.softmax_scale);
                slots.push(slot);
            }
            if let Some(sinks) = &a.sinks {
                scores.push(sinks[hq]);
            }
            ops::softmax_in_place(&mut scores);
            for (p, slot) in scores.iter().zip(&slots) {
                let vj = &pool.v[(slot * s.num_kv_heads + kvh) * vd..(slot * s.num_kv_heads + kvh + 1) * vd];
                for (x, y) in o.iter_mut().zip(vj) {
                    *x += p * y;
                }
            }
            Ok(())
        })?;
        Ok(matmul(&out, n, &a.o, h, s.o_dim()))
    }

    fn kv_slot(&self, li: usize) -> usize {
        let l = &self.layers[li];
        let n_full = self.layers.iter().filter(|l| !l.swa).count();
        if l.swa { n_full + l.group_index } else { l.group_index }
    }

    fn mlp_layer(&self, li: usize, x: &[f32], n: usize) -> Vec<f32> {
        let h = self.spec.hidden_size;
        let layer = &self.layers[li];
        let hn = rms_norm(x, &layer.post_norm, self.spec.rms_norm_eps);
        match &layer.mlp {
            Mlp::Dense(e) => expert_forward(e, &hn, n, h),
            Mlp::Moe { spec, router, bias, experts } => {
                let logits = matmul(&hn, n, router, spec.num_experts, h);
                let choices: Vec<Vec<(usize, f32)>> =
                    logits.chunks(spec.num_experts).map(|l| route(spec, l, bias.as_deref())).collect();
                // Group the (token, weight) pairs by expert so each expert runs as one matmul.
                let mut per_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); spec.num_experts];
                for (t, c) in choices.iter().enumerate() {
                    for &(e, wgt) in c {
                        per_expert[e].push((t, wgt));
                    }
                }
                // Per routed expert: its (token, weight) pairs and their outputs.
                #[allow(clippy::type_complexity)]
                let partial: Vec<(Vec<(usize, f32)>, Vec<f32>)> = per_expert
                    .into_par_iter()
                    .enumerate()
                    .filter(|(_, toks)| !toks.is_empty())
                    .map(|(e, toks)| {
                        let xs: Vec<f32> = toks.iter().flat_map(|&(t, _)| hn[t * h..(t + 1) * h].iter().copied()).collect();
                        let y = expert_forward(&experts[e], &xs, toks.len(), h);
                        (toks, y)
                    })
                    .collect();
                let mut out = vec![0f32; n * h];
                for (toks, y) in partial {
                    for (i, &(t, wgt)) in toks.iter().enumerate() {
                        for (o, v) in out[t * h..(t + 1) * h].iter_mut().zip(&y[i * h..(i + 1) * h]) {
                            *o += v * wgt;
                        }
                    }
                }
                out
            }
        }
    }
}

/// Physical slot (block * block_size + offset) of position `pos` in the layer's group.
fn slot_of(seq: &SeqForward, swa: bool, pos: usize, bs: usize) -> Result<usize> {
    let table = if swa { &seq.swa_blocks } else { &seq.full_blocks };
    match table.get(pos / bs) {
        Some(&b) if b != NULL_BLOCK => Ok(b as usize * bs + pos % bs),
        _ => Err(Error::Backend(format!(
            "sequence {}: no {} KV block for position {pos}",
            seq.seq_id,
            if swa { "sliding-window" } else { "full-attention" }
        ))),
    }
}

pub(crate) fn expert_forward(e: &Expert, x: &[f32], n: usize, h: usize) -> Vec<f32> {
    let i = e.gate.len() / h;
    let g = matmul(x, n, &e.gate, i, h);
    let u = matmul(x, n, &e.up, i, h);
    let act: Vec<f32> = g.iter().zip(&u).map(|(g, u)| silu(*g) * u).collect();
    matmul(&act, n, &e.down, h, i)
}

/// The router of one token: chosen experts and their weights (HF `MiMoV2FlashTopkRouter`).
pub fn route(m: &MoeSpec, logits: &[f32], bias: Option<&[f32]>) -> Vec<(usize, f32)> {
    let ne = m.num_experts;
    let scores: Vec<f32> = match m.scoring {
        RouterScoring::Sigmoid => logits.iter().map(|&l| ops::sigmoid(l)).collect(),
        RouterScoring::Softmax => {
            let mut s = logits.to_vec();
            ops::softmax_in_place(&mut s);
            s
        }
    };
    let mut choice: Vec<f32> = match bias {
        Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
        None => scores.clone(),
    };
    if m.n_group > 1 {
        let per = ne / m.n_group;
        let group_score: Vec<f32> = (0..m.n_group)
            .map(|g| {
                let mut v = choice[g * per..(g + 1) * per].to_vec();
                v.sort_by(|a, b| b.total_cmp(a));
                v[0] + v[1]
            })
            .collect();
        let keep = top_indices(&group_score, m.topk_group);
        for g in 0..m.n_group {
            if !keep.contains(&g) {
                choice[g * per..(g + 1) * per].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
            }
        }
    }
    let chosen = top_indices(&choice, m.top_k);
    let mut weights: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
    if m.norm_topk_prob {
        let denom = weights.iter().sum::<f32>() + 1e-20;
        weights.iter_mut().for_each(|w| *w /= denom);
    }
    chosen.into_iter().zip(weights).map(|(e, w)| (e, w * m.routed_scaling_factor)).collect()
}

/// Indices of the `k` largest values; ties go to the lower index.
fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

impl Backend for CpuModel {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn kv_block_bytes(&self, block_size: usize) -> KvBlockBytes {
        let mut b = KvBlockBytes { full: 0, swa: 0 };
        for l in &self.layers {
            let per = block_size * Self::per_token_kv_floats(&l.attn.spec) * 4;
            if l.swa { b.swa += per } else { b.full += per }
        }
        if let Some(d) = &self.drafter {
            b.full += block_size * d.kv_floats_per_token() * 4;
        }
        b
    }

    fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// Either type: BF16 pools stay f32 here, their values rounded as a GPU's BF16 pool rounds
    /// them, so the CPU reference checks a BF16 cache's numbers (not its memory).
    fn set_kv_dtype(&mut self, dtype: KvDtype) -> Result<()> {
        self.kv_dtype = dtype;
        Ok(())
    }

    fn init_kv(&mut self, config: KvConfig) -> Result<()> {
        let mut kv = Vec::with_capacity(self.layers.len());
        for swa in [false, true] {
            for l in self.layers.iter().filter(|l| l.swa == swa) {
                let blocks = if swa { config.num_swa_blocks } else { config.num_full_blocks };
                let slots = blocks * config.block_size;
                let s = &l.attn.spec;
                kv.push(LayerKv { k: vec![0.0; slots * s.k_dim()], v: vec![0.0; slots * s.v_dim()] });
            }
        }
        self.kv = kv;
        self.draft_kv = match &self.drafter {
            Some(d) => d.alloc_kv(config.num_full_blocks * config.block_size),
            None => Vec::new(),
        };
        self.kv_config = Some(config);
        Ok(())
    }

    /// The argmax of the logits `forward` computes (the CPU has no cheaper way, but answering
    /// lets the engine's greedy-ids path run, and be tested, everywhere).
    fn forward_greedy(&mut self, batch: &[SeqForward]) -> Result<Option<Vec<Vec<u32>>>> {
        Ok(Some(peregrine_core::backend::argmax_rows(&self.forward(batch)?)))
    }

    fn forward(&mut self, batch: &[SeqForward]) -> Result<Vec<Logits>> {
        if self.kv_config.is_none() {
            return Err(Error::Backend("forward before init_kv".into()));
        }
        let h = self.spec.hidden_size;
        let v = self.spec.vocab_size;
        // Flatten the batch: row r is token ti of sequence si.
        let mut rows = Vec::new();
        for (si, s) in batch.iter().enumerate() {
            for ti in 0..s.tokens.len() {
                rows.push((si, ti));
            }
        }
        let n = rows.len();
        let mut x = Vec::with_capacity(n * h);
        for &(si, ti) in &rows {
            let t = batch[si].tokens[ti] as usize;
            if t >= v {
                return Err(Error::Backend(format!("token id {t} outside the vocabulary of {v}")));
            }
            x.extend_from_slice(&self.embed[t * h..(t + 1) * h]);
        }
        // Target features for the drafter's context: (layer, row-major [n, h]) per target layer id.
        let capture: Vec<usize> = self.drafter.as_ref().map(|d| d.spec.target_layer_ids.clone()).unwrap_or_default();
        let mut captured: Vec<Option<Vec<f32>>> = vec![None; capture.len()];
        let last = self.layers.len() - 1;
        for li in 0..self.layers.len() {
            let o = self.attention_layer(li, &x, batch, &rows)?;
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let m = self.mlp_layer(li, &x, n);
            x.iter_mut().zip(&m).for_each(|(a, b)| *a += b);
            for (c, &id) in captured.iter_mut().zip(&capture) {
                if id == li {
                    // The last layer's feature is taken after the final norm (HF hidden_states[-1]).
                    *c = Some(if li == last { rms_norm(&x, &self.final_norm, self.spec.rms_norm_eps) } else { x.clone() });
                }
            }
        }
        if let Some(d) = &self.drafter {
            let cd = d.spec.context_dim();
            let mut features = vec![0f32; n * cd];
            for (ci, c) in captured.iter().enumerate() {
                let c = c.as_ref().expect("every target layer id was checked against the target at attach time");
                for r in 0..n {
                    features[r * cd + ci * h..r * cd + (ci + 1) * h].copy_from_slice(&c[r * h..(r + 1) * h]);
                }
            }
            let bs = self.kv_config.map(|c| c.block_size).unwrap_or(16);
            let positions: Vec<usize> = rows.iter().map(|&(si, ti)| batch[si].start_pos + ti).collect();
            let slots = rows
                .iter()
                .zip(&positions)
                .map(|(&(si, _), &p)| slot_of(&batch[si], false, p, bs))
                .collect::<Result<Vec<_>>>()?;
            d.write_context(&features, &positions, &slots, &mut self.draft_kv, self.kv_dtype);
        }
        // Logits only for the rows asked for.
        let (want, counts) = peregrine_core::backend::output_rows(batch);
        let mut sel_x = Vec::with_capacity(want.len() * h);
        for &r in &want {
            sel_x.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let normed = rms_norm(&sel_x, &self.final_norm, self.spec.rms_norm_eps);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = matmul(&normed, want.len(), head, v, h);
        Ok(peregrine_core::backend::split_logits(&logits, &counts, v))
    }

    fn name(&self) -> &str {
        "cpu"
    }

    fn draft_spec(&self) -> Option<&DraftSpec> {
        self.drafter.as_ref().map(|d| &d.spec)
    }

    fn draft(&mut self, batch: &[DraftForward]) -> Result<Vec<Vec<u32>>> {
        let Some(d) = &self.drafter else {
            return Err(Error::Unsupported("no drafter is attached to the CPU backend".into()));
        };
        let Some(cfg) = self.kv_config else {
            return Err(Error::Backend("draft before init_kv".into()));
        };
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        d.draft(batch, &self.draft_kv, cfg.block_size, &self.embed, head, self.spec.vocab_size)
    }
}
