//! Qwen3's byte-level BPE tokenizer against HF token ids, and the incremental detokeniser.
//! tokenizer.json (11 MB) is not committed: scripts/fetch-test-assets.sh puts it in
//! target/test-assets/qwen3/ (or set PEREGRINE_QWEN3_TOKENIZER_DIR); without it tests skip.

use std::path::PathBuf;
use std::sync::Arc;

use peregrine_model::tokenizer::{IncrementalDecoder, Tokenizer};

fn fixture() -> serde_json::Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat/qwen3_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn qwen3() -> Option<Tokenizer> {
    let dir = std::env::var_os("PEREGRINE_QWEN3_TOKENIZER_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-assets/qwen3")
    });
    let file = dir.join("tokenizer.json");
    if !file.exists() {
        eprintln!("skipped: {} absent (run scripts/fetch-test-assets.sh)", file.display());
        return None;
    }
    let cfg_path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat/qwen3_tokenizer_config.json");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(cfg_path).unwrap()).unwrap();
    Some(Tokenizer::from_file(&file).unwrap().with_config(&cfg).unwrap())
}

#[test]
fn encode_matches_hf_and_roundtrips() {
    let Some(tok) = qwen3() else { return };
    for e in fixture()["encodings"].as_array().unwrap() {
        let text = e["text"].as_str().unwrap();
        let want: Vec<u32> = e["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), text);
    }
}

#[test]
fn special_tokens_and_template() {
    let Some(tok) = qwen3() else { return };
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    let eos = tok.token_to_id("<|im_end|>").unwrap();
    assert_eq!(tok.eos_token_ids(), vec![eos]);
    assert!(tok.is_special(eos));
    assert!(!tok.is_special(tok.encode("hello", false).unwrap()[0]));
    assert_eq!(tok.id_to_token(eos).as_deref(), Some("<|im_end|>"));
    assert!(tok.vocab_size() > eos as usize);
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
    let ids = tok.encode("a<|im_end|>b", false).unwrap();
    assert_eq!(tok.decode(&ids, true).unwrap(), "ab");
}

/// Tiny deterministic PRNG (no extra dependency).
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn incremental_decode_equals_full_decode() {
    let Some(tok) = qwen3() else { return };
    let tok = Arc::new(tok);
    // Ids from multi-byte text (split emoji / CJK bytes) plus random vocabulary ids.
    let pool = tok.encode("東京は晴れ 🌤️ 👨‍👩‍👧 naïve café Ünïcödé 中文测试 😀😃", false).unwrap();
    let byte_tokens: Vec<u32> = (0..tok.vocab_size() as u32)
        .filter(|&i| tok.decode(&[i], false).map(|s| s.contains('\u{FFFD}')).unwrap_or(false))
        .take(400)
        .collect();
    assert!(!byte_tokens.is_empty(), "expected tokens holding partial UTF-8 characters");
    let prompt = tok.encode("The answer:", false).unwrap();
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..200 {
        let n = 1 + (next(&mut s) % 40) as usize;
        let ids: Vec<u32> = (0..n)
            .map(|_| match next(&mut s) % 3 {
                0 => pool[(next(&mut s) as usize) % pool.len()],
                1 => byte_tokens[(next(&mut s) as usize) % byte_tokens.len()],
                _ => (next(&mut s) % 150_000) as u32,
            })
            .collect();
        let skip = round % 2 == 0;
        let mut dec = IncrementalDecoder::new(tok.clone(), &prompt, skip);
        let mut got = String::new();
        let full = tok.decode(&ids, skip).unwrap();
        for &id in &ids {
            let piece = dec.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}') || full.contains('\u{FFFD}'), "round {round}: {piece:?}");
            got += &piece;
        }
        got += &dec.flush();
        assert_eq!(got, full, "round {round}: ids {ids:?}");
    }
}
