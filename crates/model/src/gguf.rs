//! GGUF (v2/v3) models: metadata, tensors (F32, F16, BF16, Q4_0, Q4_1, Q8_0 — dequantised exactly
//! as llama.cpp / the `gguf` package do), a `ModelSpec` for `llama`-architecture files, a
//! [`WeightSource`] under HF names (undoing llama.cpp's Q/K row permutation), and the tokenizer
//! and chat template stored in the metadata.

use std::collections::{btree_map, hash_map, BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use peregrine_core::spec::{QuantSpec, RopeStyle};
use peregrine_core::{
    AttentionKind, AttentionSpec, Error, LayerSpec, MlpSpec, ModelSpec, QkvLayout, Result, RopeSpec,
};
use serde_json::{json, Value as Json};

use crate::loader::ModelFiles;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::Uint(v) => Some(v),
            MetaValue::Int(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::Float(v) => Some(v),
            MetaValue::Uint(v) => Some(v as f64),
            MetaValue::Int(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

struct TensorInfo {
    ggml_type: u32,
    /// GGUF order: dims[0] is the innermost (contiguous) one.
    dims: Vec<u64>,
    offset: usize,
}

pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub metadata: BTreeMap<String, MetaValue>,
    tensors: HashMap<String, TensorInfo>,
}

/// Elements one metadata array may hold (real vocabularies and merge lists are under 2^20).
const MAX_ARRAY_LEN: u64 = 1 << 24;
/// Elements all metadata arrays may hold together: each costs a 32-byte `MetaValue` for as little
/// as one byte of file, so this bounds the memory a file can make the parser use (2 GiB).
const MAX_META_ELEMENTS: u64 = 1 << 26;

/// Little-endian reader with bounds checks: a truncated file is an error, never a panic.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    /// Array elements still allowed (of MAX_META_ELEMENTS).
    elements_left: u64,
}

/// Fewest bytes one metadata value of type `ty` takes in the file (a string or array: its header).
fn min_encoded_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => return None,
    })
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or("unexpected end of file (truncated?)")?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let n = usize::try_from(self.u64()?).map_err(|_| "string too long")?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "string is not UTF-8".into())
    }
    fn value(&mut self, ty: u32, depth: usize) -> std::result::Result<MetaValue, String> {
        Ok(match ty {
            0 => MetaValue::Uint(u64::from(self.u8()?)),
            1 => MetaValue::Int(i64::from(self.u8()? as i8)),
            2 => MetaValue::Uint(u64::from(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))),
            3 => MetaValue::Int(i64::from(i16::from_le_bytes(self.take(2)?.try_into().unwrap()))),
            4 => MetaValue::Uint(u64::from(self.u32()?)),
            5 => MetaValue::Int(i64::from(self.u32()? as i32)),
            6 => MetaValue::Float(f64::from(f32::from_le_bytes(self.take(4)?.try_into().unwrap()))),
            7 => MetaValue::Bool(self.u8()? != 0),
            8 => MetaValue::Str(self.string()?),
            9 => {
                if depth > 4 {
                    return Err("arrays nested too deeply".into());
                }
                let ety = self.u32()?;
                let n = self.u64()?;
                // The count is the file's word: bound it by the bytes left and by the caps before
                // building values, and reserve nothing from it.
                let min = min_encoded_size(ety).ok_or_else(|| format!("array of unknown element type {ety}"))?;
                let left = (self.data.len() - self.pos) as u64;
                if n > left / min {
                    return Err(format!("array of {n} elements of type {ety} does not fit the {left} bytes left ({min} or more each)"));
                }
                if n > MAX_ARRAY_LEN {
                    return Err(format!("array of {n} elements (at most {MAX_ARRAY_LEN})"));
                }
                self.elements_left = self.elements_left.checked_sub(n).ok_or_else(|| format!("metadata arrays hold more than {MAX_META_ELEMENTS} elements in all"))?;
                let mut v = Vec::new();
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::Uint(self.u64()?),
            11 => MetaValue::Int(self.u64()? as i64),
            12 => MetaValue::Float(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            t => return Err(format!("unknown metadata value type {t}")),
        })
    }
}

/// Elements per block and bytes per block of a ggml type.
fn block_layout(ty: u32) -> Option<(usize, usize, &'static str)> {
    Some(match ty {
        0 => (1, 4, "F32"),
        1 => (1, 2, "F16"),
        2 => (32, 18, "Q4_0"),
        3 => (32, 20, "Q4_1"),
        8 => (32, 34, "Q8_0"),
        30 => (1, 2, "BF16"),
        _ => return None,
    })
}

fn f16_at(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Element and byte counts of a tensor of `dims` and ggml type `ty`. The dims come from the file:
/// checked arithmetic, so a huge one is an error rather than a wrapped (small) size.
fn tensor_size(dims: &[u64], ty: u32) -> std::result::Result<(usize, usize), String> {
    let n = dims.iter().try_fold(1usize, |a, &d| usize::try_from(d).ok().and_then(|d| a.checked_mul(d))).ok_or_else(|| format!("dims {dims:?}: element count overflows"))?;
    let (be, bb, name) = block_layout(ty).ok_or_else(|| format!("unsupported ggml type {ty}"))?;
    if !n.is_multiple_of(be) {
        return Err(format!("{n} elements are not whole {name} blocks of {be}"));
    }
    let bytes = (n / be).checked_mul(bb).ok_or_else(|| format!("dims {dims:?}: byte size of {n} {name} elements overflows"))?;
    Ok((n, bytes))
}

/// Dequantises `n` elements of type `ty` from `data` (llama.cpp's formulas, in f32).
pub fn dequantize(ty: u32, data: &[u8], n: usize) -> std::result::Result<Vec<f32>, String> {
    let (be, bb, name) = block_layout(ty).ok_or_else(|| format!("unsupported ggml tensor type {ty}"))?;
    // Checked before `n` sizes an allocation: `n / be * bb` can wrap to `data.len()`.
    if !n.is_multiple_of(be) || (n / be).checked_mul(bb) != Some(data.len()) {
        return Err(format!("{name}: {} bytes do not hold {n} elements", data.len()));
    }
    let mut out = Vec::with_capacity(n);
    match ty {
        0 => out.extend(data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        1 => out.extend(data.chunks_exact(2).map(f16_at)),
        30 => out.extend(data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
        2 | 3 => {
            for blk in data.chunks_exact(bb) {
                let d = f16_at(&blk[0..2]);
                let (m, qs) = if ty == 3 { (f16_at(&blk[2..4]), &blk[4..20]) } else { (0.0, &blk[2..18]) };
                let mut vals = [0f32; 32];
                for (j, &q) in qs.iter().enumerate() {
                    let (lo, hi) = ((q & 0x0f) as f32, (q >> 4) as f32);
                    if ty == 3 {
                        vals[j] = d * lo + m;
                        vals[j + 16] = d * hi + m;
                    } else {
                        vals[j] = (lo - 8.0) * d;
                        vals[j + 16] = (hi - 8.0) * d;
                    }
                }
                out.extend_from_slice(&vals);
            }
        }
        8 => {
            for blk in data.chunks_exact(bb) {
                let d = f16_at(&blk[0..2]);
                out.extend(blk[2..34].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
        _ => unreachable!("checked by block_layout"),
    }
    Ok(out)
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let f = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
        // SAFETY: read-only mapping of a model file; see checkpoint.rs.
        let mmap = unsafe { Mmap::map(&f) }.map_err(|e| Error::file(path, e))?;
        Self::parse(path, mmap).map_err(|m| Error::file(path, m))
    }

    fn parse(path: &Path, mmap: Mmap) -> std::result::Result<GgufFile, String> {
        let mut c = Cursor { data: &mmap, pos: 0, elements_left: MAX_META_ELEMENTS };
        if c.take(4)? != b"GGUF" {
            return Err("not a GGUF file (bad magic)".into());
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!("unsupported GGUF version {version}"));
        }
        let n_tensors = c.u64()?;
        let n_kv = c.u64()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0).map_err(|e| format!("metadata `{key}`: {e}"))?;
            // As llama.cpp: a repeated key is an error, not a silent choice of the last one.
            match metadata.entry(key) {
                btree_map::Entry::Vacant(e) => e.insert(v),
                btree_map::Entry::Occupied(e) => return Err(format!("metadata `{}` appears twice", e.key())),
            };
        }
        let mut infos = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()?;
            if nd > 4 {
                return Err(format!("tensor `{name}`: {nd} dimensions"));
            }
            let dims = (0..nd).map(|_| c.u64()).collect::<std::result::Result<Vec<_>, _>>()?;
            let ty = c.u32()?;
            let off = c.u64()?;
            infos.push((name, dims, ty, off));
        }
        // As llama.cpp: 0 or a non-power of two is a corrupt file, not a value to round.
        let align = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() => usize::try_from(a).map_err(|_| format!("metadata `general.alignment`: {a} is too large"))?,
                Some(a) => return Err(format!("metadata `general.alignment`: {a} is not a nonzero power of two")),
                None => return Err(format!("metadata `general.alignment`: {v:?} is not an unsigned integer")),
            },
        };
        let base = c.pos.checked_next_multiple_of(align).ok_or("tensor data base overflows")?;
        let mut tensors = HashMap::new();
        for (name, dims, ty, off) in infos {
            // Checked here, not first when the tensor is read: a corrupt offset fails the load
            // instead of reading other bytes as weights.
            if off % align as u64 != 0 {
                return Err(format!("tensor `{name}`: offset {off} is not a multiple of the alignment {align}"));
            }
            let offset = usize::try_from(off).ok().and_then(|o| base.checked_add(o)).ok_or_else(|| format!("tensor `{name}`: offset {off} overflows"))?;
            // A type this reader cannot size is an error only if the tensor is read.
            let end = match block_layout(ty) {
                Some(_) => {
                    let (_, bytes) = tensor_size(&dims, ty).map_err(|e| format!("tensor `{name}`: {e}"))?;
                    offset.checked_add(bytes).ok_or_else(|| format!("tensor `{name}`: offset {off} + {bytes} bytes overflows"))?
                }
                None => offset,
            };
            if end > mmap.len() {
                return Err(format!("tensor `{name}`: data {offset}..{end} past the end of the file ({} bytes; truncated?)", mmap.len()));
            }
            match tensors.entry(name) {
                hash_map::Entry::Vacant(e) => e.insert(TensorInfo { ggml_type: ty, dims, offset }),
                hash_map::Entry::Occupied(e) => return Err(format!("tensor `{}` appears twice", e.key())),
            };
        }
        Ok(GgufFile { path: path.to_path_buf(), mmap, metadata, tensors })
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn meta_u(&self, key: &str) -> Result<usize> {
        self.meta(key).and_then(MetaValue::as_u64).map(|v| v as usize).ok_or_else(|| Error::config(key, "missing or not an integer in the GGUF metadata"))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor dequantised to f32, with its GGUF dims (innermost first).
    pub fn tensor_f32(&self, name: &str) -> Result<(Vec<f32>, Vec<u64>)> {
        let t = self.tensors.get(name).ok_or_else(|| Error::tensor(name, format!("missing from {}", self.path.display())))?;
        let (n, bytes) = tensor_size(&t.dims, t.ggml_type).map_err(|e| Error::tensor(name, e))?;
        let data = t
            .offset
            .checked_add(bytes)
            .and_then(|end| self.mmap.get(t.offset..end))
            .ok_or_else(|| Error::tensor(name, "data past the end of the file (truncated?)"))?;
        Ok((dequantize(t.ggml_type, data, n).map_err(|e| Error::tensor(name, e))?, t.dims.clone()))
    }
}

/// The dense Llama stack described by a `llama`-architecture GGUF.
pub fn spec_from_gguf(g: &GgufFile) -> Result<ModelSpec> {
    let arch = g.meta("general.architecture").and_then(MetaValue::as_str).unwrap_or("");
    if arch != "llama" {
        return Err(Error::config("general.architecture", format!("unsupported GGUF architecture `{arch}` (supported: llama)")));
    }
    let n_layers = g.meta_u("llama.block_count")?;
    // Bounded before the per-layer vector is built from it.
    // (config.json's bound on num_hidden_layers: the spec allocates one entry per layer.)
    if n_layers == 0 || n_layers > crate::config::MAX_LAYERS {
        return Err(Error::config("llama.block_count", format!("{n_layers} layers (expected 1 to {})", crate::config::MAX_LAYERS)));
    }
    let h = g.meta_u("llama.embedding_length")?;
    let heads = g.meta_u("llama.attention.head_count")?;
    let kv = g.meta("llama.attention.head_count_kv").and_then(MetaValue::as_u64).map_or(heads, |v| v as usize);
    if heads == 0 || kv == 0 || h % heads != 0 {
        return Err(Error::config("llama.attention.head_count", "inconsistent with embedding_length"));
    }
    // `validate` checks these too, but under config.json's names; a GGUF user needs the key.
    // Query heads are grouped by KV head: more KV heads than query heads is a group of 0.
    if !heads.is_multiple_of(kv) {
        return Err(Error::config("llama.attention.head_count_kv", format!("{kv} KV heads do not divide the {heads} query heads")));
    }
    let head_dim = h / heads;
    let vocab = match g.meta("llama.vocab_size").and_then(MetaValue::as_u64) {
        Some(v) => v as usize,
        None => g.meta("tokenizer.ggml.tokens").and_then(MetaValue::as_array).map(<[MetaValue]>::len).ok_or_else(|| Error::config("llama.vocab_size", "missing"))?,
    };
    let rot = g.meta("llama.rope.dimension_count").and_then(MetaValue::as_u64).map_or(head_dim, |v| v as usize);
    if rot > head_dim {
        return Err(Error::config("llama.rope.dimension_count", format!("{rot} rotated dims exceed the head dim {head_dim}")));
    }
    // `validate` refuses a base <= 0 or NaN but lets an infinite one through.
    let theta = g.meta("llama.rope.freq_base").and_then(MetaValue::as_f64).unwrap_or(10_000.0);
    if !(theta.is_finite() && theta > 0.0) {
        return Err(Error::config("llama.rope.freq_base", format!("{theta} is not a positive finite number")));
    }
    let attention = AttentionSpec {
        kind: AttentionKind::Full,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        v_head_dim: head_dim,
        rope: RopeSpec { theta, rotary_dim: rot, style: RopeStyle::NeoX },
        sinks: false,
        value_scale: 1.0,
        softmax_scale: (head_dim as f32).powf(-0.5),
        qkv_layout: QkvLayout::Separate,
        qkv_bias: false,
        qk_norm: false,
    };
    let ffn = g.meta_u("llama.feed_forward_length")?;
    // A token id past u32 is an error, not wrapped to some valid id.
    let id = |k: &str| -> Result<Option<u32>> {
        g.meta(k).and_then(MetaValue::as_u64).map(|v| u32::try_from(v).map_err(|_| Error::config(k, format!("token id {v} is out of range")))).transpose()
    };
    let spec = ModelSpec {
        model_type: "gguf:llama".into(),
        vocab_size: vocab,
        hidden_size: h,
        rms_norm_eps: g.meta("llama.attention.layer_norm_rms_epsilon").and_then(MetaValue::as_f64).unwrap_or(1e-5) as f32,
        max_position_embeddings: g.meta_u("llama.context_length").unwrap_or(4096),
        tie_word_embeddings: !g.contains("output.weight"),
        bos_token_id: id("tokenizer.ggml.bos_token_id")?,
        eos_token_ids: id("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
        pad_token_id: id("tokenizer.ggml.padding_token_id")?,
        layers: (0..n_layers).map(|_| LayerSpec { attention, mlp: MlpSpec::Dense { intermediate_size: ffn } }).collect(),
        quant: QuantSpec::unquantized(),
    };
    // The checks a config.json spec gets: positive sizes, eos/bos inside the vocabulary, ...
    crate::config::validate(&spec)?;
    Ok(spec)
}

/// GGUF tensors under HF names.
pub struct GgufWeights {
    file: GgufFile,
    heads: usize,
    kv_heads: usize,
}

/// HF name -> (GGUF name, heads to un-permute for q/k).
fn gguf_name(name: &str) -> Option<(String, Option<bool>)> {
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some((f.to_owned(), None));
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (l, part) = rest.split_once('.')?;
    let (g, perm) = match part {
        "input_layernorm.weight" => ("attn_norm.weight", None),
        "post_attention_layernorm.weight" => ("ffn_norm.weight", None),
        "self_attn.q_proj.weight" => ("attn_q.weight", Some(true)),
        "self_attn.k_proj.weight" => ("attn_k.weight", Some(false)),
        "self_attn.v_proj.weight" => ("attn_v.weight", None),
        "self_attn.o_proj.weight" => ("attn_output.weight", None),
        "mlp.gate_proj.weight" => ("ffn_gate.weight", None),
        "mlp.up_proj.weight" => ("ffn_up.weight", None),
        "mlp.down_proj.weight" => ("ffn_down.weight", None),
        _ => return None,
    };
    Some((format!("blk.{l}.{g}"), perm))
}

impl GgufWeights {
    pub fn new(file: GgufFile, spec: &ModelSpec) -> Self {
        let a = spec.layers.first().map(|l| l.attention);
        GgufWeights { file, heads: a.map_or(1, |a| a.num_heads), kv_heads: a.map_or(1, |a| a.num_kv_heads) }
    }
}

/// llama.cpp stores q/k rows of each head interleaved ([i][2]) for its rotary convention; HF's
/// rotate-half wants [2][i]: hf[h*hd + t*hd/2 + i] = gguf[h*hd + 2*i + t].
fn unpermute(w: &[f32], heads: usize, rows: usize, cols: usize) -> Vec<f32> {
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for t in 0..2 {
            for i in 0..half {
                let dst = h * hd + t * half + i;
                let src = h * hd + 2 * i + t;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

impl WeightSource for GgufWeights {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
        let (g, perm) = gguf_name(name).ok_or_else(|| Error::tensor(name, "no GGUF counterpart"))?;
        let (w, dims) = self.file.tensor_f32(&g)?;
        if dims.len() != 2 || dims[0] as usize != cols || dims[1] as usize != rows {
            return Err(Error::tensor(&g, format!("dims {dims:?}, expected [{cols}, {rows}]")));
        }
        Ok(match perm {
            Some(true) => unpermute(&w, self.heads, rows, cols),
            Some(false) => unpermute(&w, self.kv_heads, rows, cols),
            None => w,
        })
    }
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let (g, _) = gguf_name(name).ok_or_else(|| Error::tensor(name, "no GGUF counterpart"))?;
        let (w, _) = self.file.tensor_f32(&g)?;
        if w.len() != len {
            return Err(Error::tensor(&g, format!("{} elements, expected {len}", w.len())));
        }
        Ok(w)
    }
    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|(g, _)| self.file.contains(&g))
    }
}

/// The tokenizer stored in the metadata (`tokenizer.ggml.model` "gpt2": byte-level BPE).
pub fn tokenizer_from_gguf(g: &GgufFile) -> Result<Tokenizer> {
    let model = g.meta("tokenizer.ggml.model").and_then(MetaValue::as_str).unwrap_or("");
    if model != "gpt2" {
        return Err(Error::Tokenizer(format!("GGUF tokenizer model `{model}` is not supported (gpt2 byte-level BPE only)")));
    }
    let strs = |key: &str| -> Result<Vec<&str>> {
        g.meta(key)
            .and_then(MetaValue::as_array)
            .ok_or_else(|| Error::Tokenizer(format!("GGUF metadata `{key}` missing")))?
            .iter()
            .map(|v| v.as_str().ok_or_else(|| Error::Tokenizer(format!("`{key}` holds a non-string"))))
            .collect()
    };
    let tokens = strs("tokenizer.ggml.tokens")?;
    let merges = strs("tokenizer.ggml.merges")?;
    let types: Vec<u64> = g.meta("tokenizer.ggml.token_type").and_then(MetaValue::as_array).map(|a| a.iter().filter_map(MetaValue::as_u64).collect()).unwrap_or_default();
    let vocab: serde_json::Map<String, Json> = tokens.iter().enumerate().map(|(i, t)| ((*t).to_owned(), json!(i))).collect();
    // Control (3) and user-defined (4) tokens are added tokens, matched before BPE.
    let added: Vec<Json> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3) | Some(4)))
        .map(|(i, t)| json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": types[i] == 3}))
        .collect();
    let pre = g.meta("tokenizer.ggml.pre").and_then(MetaValue::as_str).unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        // SmolLM splits digits one by one before the GPT-2 byte-level split.
        "smollm" => json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]}),
        _ => byte_level.clone(),
    };
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": pre_tokenizer, "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    let mut t = Tokenizer::from_bytes(tj.to_string().as_bytes())?;
    let tok_str = |key: &str| g.meta(key).and_then(MetaValue::as_u64).and_then(|i| tokens.get(i as usize)).map(|s| (*s).to_owned());
    let add_bos = matches!(g.meta("tokenizer.ggml.add_bos_token"), Some(MetaValue::Bool(true)));
    t.set_special_tokens(tok_str("tokenizer.ggml.bos_token_id"), tok_str("tokenizer.ggml.eos_token_id"), add_bos);
    t.set_chat_template(g.meta("tokenizer.chat_template").and_then(MetaValue::as_str).map(str::to_owned));
    Ok(t)
}

/// Everything the server needs from one `.gguf` file.
pub fn open_gguf(path: &Path) -> Result<ModelFiles> {
    let file = GgufFile::open(path)?;
    let spec = spec_from_gguf(&file)?;
    let tokenizer = tokenizer_from_gguf(&file)?;
    let chat_template = tokenizer.chat_template().map(str::to_owned);
    Ok(ModelFiles {
        dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        weights: Arc::new(GgufWeights::new(file, &spec)),
        spec,
        tokenizer_json: None,
        tokenizer_config: None,
        tokenizer: Some(tokenizer),
        chat_template,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_elements_are_capped_across_the_metadata() {
        // Two arrays of 3 u8: the second one passes the 5 left.
        let mut b = Vec::new();
        for _ in 0..2 {
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&3u64.to_le_bytes());
            b.extend_from_slice(&[1, 2, 3]);
        }
        let mut c = Cursor { data: &b, pos: 0, elements_left: 5 };
        assert_eq!(c.value(9, 0).unwrap(), MetaValue::Array(vec![MetaValue::Uint(1), MetaValue::Uint(2), MetaValue::Uint(3)]));
        assert!(c.value(9, 0).unwrap_err().contains("in all"));
    }
}
