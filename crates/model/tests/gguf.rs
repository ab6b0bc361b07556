//! GGUF: parsing and errors on synthetic files; the real SmolLM2-135M-Instruct file (when
//! scripts/fetch-test-assets.sh fetched it): spec, tensor dequantisation, tokenizer ids equal to
//! HF transformers' (fixture tests/fixtures/smollm2/reference.json).

use std::path::PathBuf;

use peregrine_model::gguf::{dequantize, GgufFile};

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
    std::fs::write(&p, &full[..full.len() - 10]).unwrap();
    let g = GgufFile::open(&p).unwrap();
    assert!(g.tensor_f32("w").unwrap_err().to_string().contains("truncated"));
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
