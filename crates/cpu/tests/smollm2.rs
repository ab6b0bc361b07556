//! The real SmolLM2-135M-Instruct GGUF through the CPU reference against HF transformers loading
//! the same file (tests/fixtures/smollm2, made by tools/smollm2_reference.py). Both dequantise the
//! same Q4_1/Q8_0 weights to f32, so logits agree to f32 rounding. Skips when the GGUF was not
//! fetched (scripts/fetch-test-assets.sh).

use std::path::PathBuf;

use peregrine_core::backend::{Backend, KvConfig, OutputRows, SeqForward};
use peregrine_cpu::CpuModel;
use peregrine_model::checkpoint::Checkpoint;
use peregrine_model::formats::f32_from_le;

#[test]
fn smollm2_logits_and_greedy_continuation_match_hf() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let gguf = std::env::var_os("PEREGRINE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/test-assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if !gguf.is_file() {
        eprintln!("skipped: {} not found (run scripts/fetch-test-assets.sh)", gguf.display());
        return;
    }
    let files = peregrine_model::loader::open_model(gguf.to_str().unwrap()).unwrap();
    let mut m = CpuModel::load(&files.spec, files.weights.as_ref()).unwrap();
    let fx = root.join("tests/fixtures/smollm2");
    let reference: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fx.join("reference.json")).unwrap()).unwrap();
    let logits = Checkpoint::open(&fx.join("reference.safetensors")).unwrap();
    for (name, p) in reference["prompts"].as_object().unwrap() {
        let ids: Vec<u32> = p["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let rows = m.forward_sequence(&ids).unwrap();
        for (which, row) in [("first", &rows[0]), ("last", rows.last().unwrap())] {
            let want = f32_from_le(logits.get(&format!("{name}_{which}_logits")).unwrap().data);
            let scale = want.iter().fold(0f32, |a, x| a.max(x.abs()));
            let err = row.iter().zip(&want).fold(0f32, |a, (x, y)| a.max((x - y).abs())) / scale;
            eprintln!("{name} {which}: max relative logit error {err:e}");
            assert!(err <= 1e-4, "{name} {which}: relative error {err}");
        }
        // Greedy continuation, token by token through the KV cache.
        let want: Vec<u32> = p["greedy"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        let argmax = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a))).unwrap() as u32;
        let mut got = vec![argmax(rows.last().unwrap())];
        let table: Vec<u32> = (0..((ids.len() + want.len()) / 16 + 1) as u32).collect();
        m.init_kv(KvConfig { block_size: 16, num_full_blocks: table.len(), num_swa_blocks: 1 }).unwrap();
        let seq = |tokens: Vec<u32>, start: usize| SeqForward { seq_id: 0, tokens, start_pos: start, full_blocks: table.clone(), swa_blocks: vec![], output: OutputRows::Last };
        m.forward(&[seq(ids.clone(), 0)]).unwrap();
        while got.len() < want.len() {
            let pos = ids.len() + got.len() - 1;
            let out = m.forward(&[seq(vec![*got.last().unwrap()], pos)]).unwrap();
            got.push(argmax(out[0].last().unwrap()));
        }
        assert_eq!(got, want, "{name}: greedy continuation");
    }
}
