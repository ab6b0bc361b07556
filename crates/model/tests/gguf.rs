//! GGUF: parsing and errors on synthetic files; the real SmolLM2-135M-Instruct file (when
//! scripts/fetch-test-assets.sh fetched it): spec, tensor dequantisation, tokenizer ids equal to
//! HF transformers' (fixture tests/fixtures/smollm2/reference.json).

use std::collections::BTreeMap;
use std::panic::catch_unwind;
use std::path::PathBuf;

use peregrine_model::gguf::{dequantize, spec_from_gguf, GgufFile};

pub fn smollm2() -> Option<PathBuf> {
    let p = std::env::var_os("PEREGRINE_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("skipped: {} not found (run scripts/fetch-test-assets.sh)", p.display());
        None
    }
}

fn synthetic() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&1u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // kv
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend_from_slice(&(x.len() as u64).to_le_bytes());
        b.extend_from_slice(x.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend_from_slice(&8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "w");
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&32u64.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&8u32.to_le_bytes()); // Q8_0
    b.extend_from_slice(&0u64.to_le_bytes());
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for blk in 0..2 {
        b.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        b.extend((0..32).map(|i| (i as i8 - 16 + blk) as u8));
    }
    b
}

#[test]
fn synthetic_file_parses_and_dequantises() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, synthetic()).unwrap();
    let g = GgufFile::open(&p).unwrap();
    assert_eq!(g.meta("general.architecture").unwrap().as_str(), Some("llama"));
    let (w, dims) = g.tensor_f32("w").unwrap();
    assert_eq!(dims, [32, 2]);
    assert_eq!(w[0], -8.0);
    assert_eq!(w[63], 8.0);
}

#[test]
fn bad_files_give_errors_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.gguf");
    std::fs::write(&p, b"GGML0000").unwrap();
    assert!(GgufFile::open(&p).err().unwrap().to_string().contains("bad magic"));
    let full = synthetic();
    std::fs::write(&p, &full[..40]).unwrap();
    assert!(GgufFile::open(&p).err().unwrap().to_string().contains("truncated"));
    // A tensor's data range is checked when the file is opened, not first when it is read.
    std::fs::write(&p, &full[..full.len() - 10]).unwrap();
    let err = GgufFile::open(&p).err().unwrap().to_string();
    assert!(err.contains("tensor `w`") && err.contains("truncated"), "{err}");
    assert!(dequantize(99, &[0; 4], 1).is_err());
}

#[test]
fn q4_1_block_formula() {
    // d = 2, m = -1: value = q * d + m; low nibbles are elements 0..16, high nibbles 16..32.
    let mut blk = Vec::new();
    blk.extend_from_slice(&half::f16::from_f32(2.0).to_le_bytes());
    blk.extend_from_slice(&half::f16::from_f32(-1.0).to_le_bytes());
    blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let v = dequantize(3, &blk, 32).unwrap();
    assert_eq!(v[0], -1.0);
    assert_eq!(v[15], 29.0);
    assert_eq!(v[16], 29.0);
    assert_eq!(v[31], -1.0);
}

#[test]
fn smollm2_spec_and_tokenizer_match_hf() {
    let Some(path) = smollm2() else { return };
    let files = peregrine_model::loader::open_model(path.to_str().unwrap()).unwrap();
    let s = &files.spec;
    assert_eq!((s.layers.len(), s.hidden_size, s.vocab_size), (30, 576, 49152));
    let a = s.layers[0].attention;
    assert_eq!((a.num_heads, a.num_kv_heads, a.head_dim, a.rope.rotary_dim), (9, 3, 64, 64));
    assert!(s.tie_word_embeddings);
    let tok = files.tokenizer.as_ref().unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm2/reference.json")).unwrap(),
    )
    .unwrap();
    for (text, ids) in reference["texts"].as_object().unwrap() {
        let want: Vec<u32> = ids.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, false).unwrap(), want, "ids of {text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), *text);
    }
    // The chat template from the file renders what HF renders.
    let t = peregrine_model::chat_template::ChatTemplate::new(files.chat_template.as_deref().unwrap(), tok.bos_token(), tok.eos_token()).unwrap();
    let msgs = serde_json::json!([{"role": "user", "content": "What is the capital of France?"}]);
    assert_eq!(t.render(&msgs, None, true, &Default::default()).unwrap(), reference["chat_text"].as_str().unwrap());
    for (name, p) in reference["prompts"].as_object().unwrap() {
        let want: Vec<u32> = p["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let text = if name == "chat" { reference["chat_text"].as_str().unwrap().to_owned() } else { tok.decode(&want, false).unwrap() };
        assert_eq!(tok.encode(&text, false).unwrap(), want, "prompt {name}");
    }
}

#[test]
fn a_gguf_file_takes_no_random_weights_or_overrides() {
    use peregrine_model::loader::{open_model_with, LoadOptions};
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, synthetic()).unwrap();
    let mut overrides = serde_json::Map::new();
    overrides.insert("num_hidden_layers".into(), 1.into());
    for opts in [LoadOptions { dummy_weights: Some(0), ..Default::default() }, LoadOptions { dummy_weights: None, config_overrides: Some(overrides) }] {
        let err = open_model_with(p.to_str().unwrap(), &opts).err().expect("refused").to_string();
        assert!(err.contains("config.json model, not a GGUF file"), "{err}");
    }
}

/// Metadata value bytes of GGUF type `ty`.
type Kv = (u32, Vec<u8>);

fn kv_u32(v: u32) -> Kv {
    (4, v.to_le_bytes().to_vec())
}
fn kv_u64(v: u64) -> Kv {
    (10, v.to_le_bytes().to_vec())
}
fn kv_f32(v: f32) -> Kv {
    (6, v.to_le_bytes().to_vec())
}
fn kv_f64(v: f64) -> Kv {
    (12, v.to_le_bytes().to_vec())
}
fn kv_str(v: &str) -> Kv {
    let mut b = (v.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(v.as_bytes());
    (8, b)
}

/// A GGUF v3 file: metadata `kvs` in order, tensor infos (name, dims, ggml type, offset), zero
/// padding to `align`, then `data`.
fn build(kvs: &[(&str, Kv)], tensors: &[(&str, &[u64], u32, u64)], align: usize, data: &[u8]) -> Vec<u8> {
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend_from_slice(&(x.len() as u64).to_le_bytes());
        b.extend_from_slice(x.as_bytes());
    };
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, (ty, v)) in kvs {
        s(&mut b, k);
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(v);
    }
    for (name, dims, ty, off) in tensors {
        s(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| b.extend_from_slice(&d.to_le_bytes()));
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
    }
    while b.len() % align != 0 {
        b.push(0);
    }
    b.extend_from_slice(data);
    b
}

/// `GgufFile::open` on `bytes`, with a panic turned into a test failure that says so.
fn open_bytes(bytes: &[u8]) -> peregrine_core::Result<GgufFile> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, bytes).unwrap();
    catch_unwind(|| GgufFile::open(&p)).expect("open panicked")
}

fn open_err(bytes: &[u8]) -> String {
    match open_bytes(bytes) {
        Ok(_) => panic!("opened a malformed file"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn tensor_sizes_that_overflow_are_errors_not_panics() {
    // 2^62 F32 elements are 2^64 bytes: the byte count wraps (to 0 in release, where the empty
    // slice then passed the length check and `Vec::with_capacity(2^62)` panicked).
    for dims in [&[1u64 << 62][..], &[1 << 32, 1 << 32], &[u64::MAX]] {
        let f = build(&[("general.architecture", kv_str("llama"))], &[("w", dims, 0, 0)], 32, &[]);
        let r = open_bytes(&f).and_then(|g| catch_unwind(|| g.tensor_f32("w").map(|_| ())).expect("tensor_f32 panicked"));
        let err = r.expect_err("a tensor of 2^64 bytes").to_string();
        assert!(err.contains("tensor `w`") && err.contains("overflow"), "{dims:?}: {err}");
    }
    // The same sizes handed to `dequantize` directly: checked before anything is allocated.
    for (ty, n) in [(0, 1usize << 62), (1, usize::MAX), (8, usize::MAX / 32 * 32)] {
        let r = catch_unwind(|| dequantize(ty, &[], n)).unwrap_or_else(|_| panic!("dequantize({ty}, [], {n}) panicked"));
        assert!(r.is_err(), "type {ty}, {n} elements from no bytes");
    }
    // An offset whose end overflows (the offset itself is aligned and fits).
    let hdr = build(&[], &[("w", &[8], 0, 0)], 32, &[]).len() as u64;
    let f = build(&[], &[("w", &[8], 0, (u64::MAX - hdr) & !31)], 32, &[]);
    let err = open_err(&f);
    assert!(err.contains("tensor `w`"), "{err}");
}

/// A `llama` spec that `spec_from_gguf` accepts: 64 wide, 4 heads of 16, 1 layer, vocab 100.
fn llama_meta() -> BTreeMap<&'static str, Kv> {
    BTreeMap::from([
        ("general.architecture", kv_str("llama")),
        ("llama.embedding_length", kv_u32(64)),
        ("llama.attention.head_count", kv_u32(4)),
        ("llama.feed_forward_length", kv_u32(128)),
        ("llama.vocab_size", kv_u32(100)),
        ("llama.block_count", kv_u32(1)),
    ])
}

fn spec_result(meta: &BTreeMap<&'static str, Kv>) -> peregrine_core::Result<peregrine_core::ModelSpec> {
    let kvs: Vec<(&str, Kv)> = meta.iter().map(|(k, v)| (*k, v.clone())).collect();
    let g = open_bytes(&build(&kvs, &[], 32, &[])).unwrap();
    catch_unwind(|| spec_from_gguf(&g)).expect("spec_from_gguf panicked")
}

#[test]
fn spec_from_gguf_rejects_inconsistent_metadata() {
    let spec = spec_result(&llama_meta()).unwrap();
    assert_eq!((spec.layers.len(), spec.layers[0].attention.head_dim, spec.layers[0].attention.rope.rotary_dim), (1, 16, 16));
    let cases: &[(&str, Kv, &str)] = &[
        // RoPE on more dims than a head has read past the head (an index panic on the CPU).
        ("llama.rope.dimension_count", kv_u32(32), "llama.rope.dimension_count"),
        // More KV heads than query heads: a query group of 0, then a division by zero.
        ("llama.attention.head_count_kv", kv_u32(8), "llama.attention.head_count_kv"),
        ("llama.attention.head_count_kv", kv_u32(3), "llama.attention.head_count_kv"),
        // The layer count is bounded before one entry per layer is allocated.
        ("llama.block_count", kv_u32(0), "llama.block_count"),
        ("llama.block_count", kv_u32((1 << 16) + 1), "llama.block_count"),
        ("llama.block_count", kv_u64(1 << 40), "llama.block_count"),
        ("llama.rope.freq_base", kv_f32(0.0), "llama.rope.freq_base"),
        ("llama.rope.freq_base", kv_f32(-1.0), "llama.rope.freq_base"),
        ("llama.rope.freq_base", kv_f32(f32::NAN), "llama.rope.freq_base"),
        ("llama.rope.freq_base", kv_f64(f64::INFINITY), "llama.rope.freq_base"),
        // These `validate` checks, under config.json's names.
        ("llama.attention.layer_norm_rms_epsilon", kv_f32(0.0), "rms_norm_eps"),
        ("llama.attention.layer_norm_rms_epsilon", kv_f32(f32::NAN), "rms_norm_eps"),
        // Finite as f64, infinite as the f32 it is used as.
        ("llama.attention.layer_norm_rms_epsilon", kv_f64(1e300), "rms_norm_eps"),
        ("llama.vocab_size", kv_u32(0), "vocab_size"),
        ("llama.context_length", kv_u32(0), "max_position_embeddings"),
        ("llama.feed_forward_length", kv_u32(0), "intermediate_size"),
        ("tokenizer.ggml.eos_token_id", kv_u32(100), "eos_token_id"),
        // A token id past u32 must not wrap to a valid one (2^32 + 1 -> 1).
        ("tokenizer.ggml.bos_token_id", kv_u64((1 << 32) + 1), "tokenizer.ggml.bos_token_id"),
    ];
    for (key, value, named) in cases {
        let mut meta = llama_meta();
        meta.insert(key, value.clone());
        let err = spec_result(&meta).err().unwrap_or_else(|| panic!("{key} = {value:?} accepted")).to_string();
        assert!(err.contains(named), "{key} = {value:?}: {err}");
    }
}

/// A file whose only metadata is the array `a` of `n` elements of type `ety`, extended with
/// zeros (sparse: no disk) to `len` bytes.
fn array_file(ety: u32, n: u64, len: u64) -> String {
    let mut b = build(&[], &[], 1, &[]);
    b[16..24].copy_from_slice(&1u64.to_le_bytes()); // one key
    b.extend_from_slice(&1u64.to_le_bytes());
    b.push(b'a');
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&ety.to_le_bytes());
    b.extend_from_slice(&n.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, &b).unwrap();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len.max(b.len() as u64)).unwrap();
    let r = catch_unwind(|| GgufFile::open(&p)).expect("open panicked");
    match r {
        Ok(g) => panic!("array of {n} accepted ({:?} elements)", g.meta("a").and_then(|v| v.as_array()).map(<[_]>::len)),
        Err(e) => e.to_string(),
    }
}

#[test]
fn metadata_array_counts_are_bounded_before_values_are_built() {
    // More elements than one array may hold (2^24), though each u8 fits the (sparse) file: it
    // was materialised, 32 bytes of `MetaValue` per byte of file.
    let n = (1 << 24) + 1;
    let err = array_file(0, n, n + 64);
    assert!(err.contains("`a`") && err.contains(&n.to_string()) && err.contains("at most"), "{err}");
    // A string takes at least its 8-byte length: a count only bounded by the bytes left passed.
    let err = array_file(8, 1000, 4000);
    assert!(err.contains("`a`") && err.contains("does not fit"), "{err}");
    // An unknown element type is refused even for an empty array.
    let err = array_file(13, 0, 0);
    assert!(err.contains("`a`") && err.contains("13"), "{err}");
}

#[test]
fn alignment_and_tensor_offsets_are_checked_at_open() {
    let w = |off: u64| [("w", &[8u64][..], 0u32, off)];
    let data = [0u8; 64];
    // A valid alignment other than the default places the data at the next multiple of it.
    let mut f = build(&[("general.alignment", kv_u32(64))], &w(0), 64, &[]);
    f.extend((0..8).flat_map(|i| (i as f32).to_le_bytes()));
    let (v, _) = open_bytes(&f).unwrap().tensor_f32("w").unwrap();
    assert_eq!(v, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
    for (align, shown) in [(kv_u32(0), "0"), (kv_u32(48), "48"), (kv_str("32"), "not an unsigned integer")] {
        let err = open_err(&build(&[("general.alignment", align)], &w(0), 32, &data));
        assert!(err.contains("general.alignment") && err.contains(shown), "{err}");
    }
    // Offsets are relative to the aligned data base and must keep each tensor aligned.
    let err = open_err(&build(&[], &w(1), 32, &data));
    assert!(err.contains("tensor `w`") && err.contains("offset 1") && err.contains("32"), "{err}");
    // The whole data range lies inside the file: 32 bytes from offset 32 end exactly at 64 ...
    assert!(open_bytes(&build(&[], &w(32), 32, &data)).is_ok());
    // ... and from offset 64 they do not.
    let err = open_err(&build(&[], &w(64), 32, &data));
    assert!(err.contains("tensor `w`") && err.contains("end of the file"), "{err}");
    // A name or key given twice is refused rather than the first silently dropped.
    let err = open_err(&build(&[], &[w(0)[0], w(32)[0]], 32, &data));
    assert!(err.contains("`w`") && err.contains("twice"), "{err}");
    let err = open_err(&build(&[("k", kv_u32(1)), ("k", kv_u32(2))], &[], 32, &[]));
    assert!(err.contains("`k`") && err.contains("twice"), "{err}");
}
