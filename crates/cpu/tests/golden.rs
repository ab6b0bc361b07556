//! Golden tests: the CPU reference against HF transformers' float32 eager logits on small random
//! MiMo-V2 models (fixtures made by tools/golden/make_fixtures.py, committed under
//! tests/fixtures/golden/). Error measure, per prompt: max |ours - HF| / max |HF| over all
//! positions and vocabulary entries; the bound is 1e-4.

use std::path::PathBuf;

use peregrine_core::backend::{Backend, KvConfig, OutputRows, SeqForward};
use peregrine_core::DType;
use peregrine_cpu::CpuModel;
use peregrine_model::checkpoint::Checkpoint;
use peregrine_model::formats::f32_from_le;
use peregrine_model::loader::open_model;

const BOUND: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden").join(name)
}

struct Golden {
    prompts: Vec<Vec<u32>>,
    logits: Vec<Vec<f32>>,
}

fn golden(name: &str) -> Golden {
    let ck = Checkpoint::open(&fixture(name).join("golden.safetensors")).unwrap();
    let mut g = Golden { prompts: vec![], logits: vec![] };
    for i in 0.. {
        let Ok(t) = ck.get(&format!("tokens_{i}")) else { break };
        assert_eq!(t.dtype, DType::I64);
        g.prompts.push(t.data.chunks(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect());
        g.logits.push(f32_from_le(ck.get(&format!("logits_{i}")).unwrap().data));
    }
    assert!(!g.prompts.is_empty());
    g
}

fn load(name: &str) -> CpuModel {
    let files = open_model(fixture(name).to_str().unwrap()).unwrap();
    CpuModel::load(&files.spec, files.weights.as_ref()).unwrap()
}

fn rel_err(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(ours.len(), reference.len());
    assert!(ours.iter().all(|x| x.is_finite()), "non-finite logits");
    let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = ours.iter().zip(reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// One prefill forward over each prompt.
fn check_prefill(name: &str) -> f32 {
    let g = golden(name);
    let mut m = load(name);
    let mut worst = 0f32;
    for (p, want) in g.prompts.iter().zip(&g.logits) {
        let got: Vec<f32> = m.forward_sequence(p).unwrap().concat();
        let e = rel_err(&got, want);
        assert!(e <= BOUND, "{name}: prefill relative error {e} > {BOUND}");
        worst = worst.max(e);
    }
    eprintln!("{name}: prefill max relative error {worst:e}");
    worst
}

fn seq(id: u64, tokens: &[u32], start: usize, table: &[u32], output: OutputRows) -> SeqForward {
    SeqForward { seq_id: id, tokens: tokens.to_vec(), start_pos: start, full_blocks: table.to_vec(), swa_blocks: table.to_vec(), output }
}

/// Runs `prompt` through the paged cache in chunks of the given sizes (cycled) and returns
/// every position's logits.
fn chunked(m: &mut CpuModel, prompt: &[u32], sizes: &[usize], table: &[u32]) -> Vec<f32> {
    let mut out = Vec::new();
    let (mut pos, mut i) = (0, 0);
    while pos < prompt.len() {
        let n = sizes[i % sizes.len()].min(prompt.len() - pos);
        let r = m.forward(&[seq(1, &prompt[pos..pos + n], pos, table, OutputRows::All)]).unwrap();
        assert_eq!(r[0].rows, n);
        out.extend_from_slice(&r[0].data);
        pos += n;
        i += 1;
    }
    out
}

fn check_decode_and_chunks(name: &str) {
    let g = golden(name);
    let mut m = load(name);
    let bs = 8;
    m.init_kv(KvConfig { block_size: bs, num_full_blocks: 64, num_swa_blocks: 64 }).unwrap();
    // Scattered, non-contiguous physical blocks.
    let table: Vec<u32> = (0..16u32).map(|i| (i * 7 + 3) % 64).collect();
    for (p, want) in g.prompts.iter().zip(&g.logits) {
        let e1 = rel_err(&chunked(&mut m, p, &[1], &table), want);
        assert!(e1 <= BOUND, "{name}: token-by-token relative error {e1}");
        let e2 = rel_err(&chunked(&mut m, p, &[5, 3, 11, 1, 7], &table), want);
        assert!(e2 <= BOUND, "{name}: chunked prefill relative error {e2}");
        eprintln!("{name}: decode {e1:e}, chunked {e2:e}");
    }
}

/// Two sequences in one batch with different chunk lengths and their own blocks.
fn check_mixed_batch(name: &str) {
    let g = golden(name);
    assert!(g.prompts.len() >= 2);
    let mut m = load(name);
    m.init_kv(KvConfig { block_size: 4, num_full_blocks: 64, num_swa_blocks: 64 }).unwrap();
    let ta: Vec<u32> = (0..16).map(|i| 2 * i).collect();
    let tb: Vec<u32> = (0..16).map(|i| 2 * i + 1).collect();
    let (a, b) = (&g.prompts[0], &g.prompts[1]);
    // A prefills 20 tokens while B prefills 6; then A decodes one by one while B prefills the rest.
    let r = m.forward(&[seq(1, &a[..20], 0, &ta, OutputRows::All), seq(2, &b[..6], 0, &tb, OutputRows::All)]).unwrap();
    let (mut la, mut lb) = (r[0].data.clone(), r[1].data.clone());
    let mut pa = 20;
    let r = m.forward(&[seq(2, &b[6..], 6, &tb, OutputRows::All), seq(1, &a[20..21], 20, &ta, OutputRows::All)]).unwrap();
    lb.extend_from_slice(&r[0].data);
    la.extend_from_slice(&r[1].data);
    pa += 1;
    while pa < a.len() {
        let r = m.forward(&[seq(1, &a[pa..pa + 1], pa, &ta, OutputRows::Last)]).unwrap();
        la.extend_from_slice(&r[0].data);
        pa += 1;
    }
    let (ea, eb) = (rel_err(&la, &g.logits[0]), rel_err(&lb, &g.logits[1]));
    assert!(ea <= BOUND && eb <= BOUND, "{name}: mixed batch errors {ea} {eb}");
}

#[test]
fn default_layer_pattern_matches_hf() {
    check_prefill("default");
    check_decode_and_chunks("default");
    check_mixed_batch("default");
}

#[test]
fn group_limited_routing_matches_hf() {
    check_prefill("groups");
    check_decode_and_chunks("groups");
}

#[test]
fn mxfp4_experts_match_hf() {
    check_prefill("mxfp4");
    check_decode_and_chunks("mxfp4");
}

#[test]
fn fp8_block_weights_with_partial_blocks_match_hf() {
    check_prefill("fp8");
    check_decode_and_chunks("fp8");
}

/// MiMo-V2.5-Pro's `mimo_v2` config with a fused qkv_proj is the same model as `default`.
#[test]
fn fused_qkv_mimo_v2_layout_gives_identical_logits() {
    let g = golden("default");
    let mut split = load("default");
    let mut fused = load("mimo_v2_fused");
    for p in &g.prompts {
        let a = split.forward_sequence(p).unwrap().concat();
        let b = fused.forward_sequence(p).unwrap().concat();
        assert_eq!(a, b, "fused qkv logits differ from split qkv");
    }
    check_prefill("mimo_v2_fused");
}
