//! GGUF (v2/v3) models: metadata, tensors (F32, F16, BF16, Q4_0, Q4_1, Q8_0 — dequantised exactly
//! as llama.cpp / the `gguf` package do), a `ModelSpec` for `llama`-architecture files, a
//! [`WeightSource`] under HF names (undoing llama.cpp's Q/K row permutation), and the tokenizer
//! and chat template stored in the metadata.

use std::collections::{BTreeMap, HashMap};
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

/// Little-endian reader with bounds checks: a truncated file is an error, never a panic.
struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
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
                if n > (self.data.len() - self.pos) as u64 {
                    return Err(format!("array of {n} elements does not fit the file"));
                }
                let mut v = Vec::with_capacity(n as usize);
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

/// Dequantises `n` elements of type `ty` from `data` (llama.cpp's formulas, in f32).
pub fn dequantize(ty: u32, data: &[u8], n: usize) -> std::result::Result<Vec<f32>, String> {
    let (be, bb, name) = block_layout(ty).ok_or_else(|| format!("unsupported ggml tensor type {ty}"))?;
    if !n.is_multiple_of(be) || data.len() != n / be * bb {
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
        let mut c = Cursor { data: &mmap, pos: 0 };
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
            metadata.insert(key, v);
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
        let align = metadata.get("general.alignment").and_then(MetaValue::as_u64).unwrap_or(32).max(1) as usize;
        let base = c.pos.div_ceil(align) * align;
        let mut tensors = HashMap::new();
        for (name, dims, ty, off) in infos {
            let offset = base.checked_add(off as usize).ok_or("tensor offset overflow")?;
            tensors.insert(name, TensorInfo { ggml_type: ty, dims, offset });
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
        let n = t.dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d as usize)).ok_or_else(|| Error::tensor(name, "size overflow"))?;
        let (be, bb, _) = block_layout(t.ggml_type).ok_or_else(|| Error::tensor(name, format!("unsupported ggml type {}", t.ggml_type)))?;
        if n % be != 0 {
            return Err(Error::tensor(name, format!("{n} elements are not whole blocks of {be}")));
        }
        let bytes = n / be * bb;
        let data = self.mmap.get(t.offset..t.offset + bytes).ok_or_else(|| Error::tensor(name, "data past the end of the file (truncated?)"))?;
        Ok((dequantize(t.ggml_type, data, n).map_err(|e| Error::tensor(name, e))?, t.dims.clone()))
    }
}

/// The dense Llama stack described by a `llama`-architecture GGUF.
pub fn spec_from_gguf(g: &GgufFile) -> Result<ModelSpec> {
    let arch = g.meta("general.architecture").and_then(MetaValue::as_str).unwrap_or("");
    if arch != "llama" {
        return Err(Error::config("general.architecture", format!("unsupported GGUF architecture `{arch}` (supported: llama)")));
    }
    let h = g.meta_u("llama.embedding_length")?;
    let heads = g.meta_u("llama.attention.head_count")?;
    let kv = g.meta("llama.attention.head_count_kv").and_then(MetaValue::as_u64).map_or(heads, |v| v as usize);
    if heads == 0 || kv == 0 || h % heads != 0 {
        return Err(Error::config("llama.attention.head_count", "inconsistent with embedding_length"));
    }
    let head_dim = h / heads;
    let vocab = match g.meta("llama.vocab_size").and_then(MetaValue::as_u64) {
        Some(v) => v as usize,
        None => g.meta("tokenizer.ggml.tokens").and_then(MetaValue::as_array).map(<[MetaValue]>::len).ok_or_else(|| Error::config("llama.vocab_size", "missing"))?,
    };
    let rot = g.meta("llama.rope.dimension_count").and_then(MetaValue::as_u64).map_or(head_dim, |v| v as usize);
    let attention = AttentionSpec {
        kind: AttentionKind::Full,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        v_head_dim: head_dim,
        rope: RopeSpec { theta: g.meta("llama.rope.freq_base").and_then(MetaValue::as_f64).unwrap_or(10_000.0), rotary_dim: rot, style: RopeStyle::NeoX },
        sinks: false,
        value_scale: 1.0,
        softmax_scale: (head_dim as f32).powf(-0.5),
        qkv_layout: QkvLayout::Separate,
        qkv_bias: false,
        qk_norm: false,
    };
    let ffn = g.meta_u("llama.feed_forward_length")?;
    let id = |k: &str| g.meta(k).and_then(MetaValue::as_u64).map(|v| v as u32);
    Ok(ModelSpec {
        model_type: "gguf:llama".into(),
        vocab_size: vocab,
        hidden_size: h,
        rms_norm_eps: g.meta("llama.attention.layer_norm_rms_epsilon").and_then(MetaValue::as_f64).unwrap_or(1e-5) as f32,
        max_position_embeddings: g.meta_u("llama.context_length").unwrap_or(4096),
        tie_word_embeddings: !g.contains("output.weight"),
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        pad_token_id: id("tokenizer.ggml.padding_token_id"),
        layers: (0..g.meta_u("llama.block_count")?).map(|_| LayerSpec { attention, mlp: MlpSpec::Dense { intermediate_size: ffn } }).collect(),
        quant: QuantSpec::unquantized(),
    })
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
