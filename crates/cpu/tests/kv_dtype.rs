//! BF16 KV pools on the CPU reference (`Backend::set_kv_dtype`, `--kv-cache-dtype bfloat16`):
//! the pools stay f32 here, their values rounded as a GPU's BF16 pool holds them, so the GPU's
//! BF16 path has a reference to match (crates/cuda/tests/model.rs). On the trained demo model
//! the rounding moves the logits a little and only a little (the golden fixtures' random models
//! amplify it tens of times more: 14% of their largest logit, against 0.35% here at 40 tokens).

use peregrine_core::backend::{Backend, KvConfig, OutputRows, SeqForward};
use peregrine_core::KvDtype;
use peregrine_cpu::CpuModel;
use peregrine_model::loader::open_model;

fn demo(dtype: KvDtype) -> CpuModel {
    let files = open_model(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/peregrine-mimo-tiny")).unwrap();
    let mut m = CpuModel::load(&files.spec, files.weights.as_ref()).unwrap();
    m.set_kv_dtype(dtype).unwrap();
    assert_eq!(m.kv_dtype(), dtype);
    m.init_kv(KvConfig { block_size: 8, num_full_blocks: 32, num_swa_blocks: 32 }).unwrap();
    m
}

/// Logits of every prompt position, fed in chunks of `sizes` (cycled).
fn logits(m: &mut CpuModel, prompt: &[u32], sizes: &[usize]) -> Vec<f32> {
    let table: Vec<u32> = (0..32u32).map(|i| (i * 5 + 2) % 32).collect();
    let (mut out, mut pos) = (Vec::new(), 0);
    for &n in sizes.iter().cycle() {
        if pos >= prompt.len() {
            break;
        }
        let n = n.min(prompt.len() - pos);
        let seq = SeqForward { seq_id: 1, tokens: prompt[pos..pos + n].to_vec(), start_pos: pos, full_blocks: table.clone(), swa_blocks: table.clone(), output: OutputRows::All };
        out.extend(m.forward(&[seq]).unwrap().remove(0).data);
        pos += n;
    }
    out
}

fn rel(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
}

/// Mean |a - b| over mean |a|: how far the logits moved on the whole.
fn mean_rel(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum();
    diff / a.iter().map(|x| x.abs()).sum::<f32>()
}

/// Greedy choices of each position's logits.
fn argmaxes(v: &[f32], vocab: usize) -> Vec<usize> {
    v.chunks(vocab).map(|r| r.iter().enumerate().fold(0, |b, (i, &x)| if x > r[b] { i } else { b })).collect()
}

#[test]
fn bf16_pools_move_the_demo_models_logits_a_little_and_the_same_in_chunks() {
    let prompt: Vec<u32> = (0..60u32).map(|i| 5 + (i * 41) % 700).collect();
    let f32_pools = logits(&mut demo(KvDtype::F32), &prompt, &[60]);
    let one_by_one = logits(&mut demo(KvDtype::Bf16), &prompt, &[1]);
    let chunks = logits(&mut demo(KvDtype::Bf16), &prompt, &[7, 1, 13, 4]);
    let vocab = f32_pools.len() / prompt.len();
    let (moved, chunking) = (mean_rel(&f32_pools, &one_by_one), rel(&one_by_one, &chunks));
    let (a, b) = (argmaxes(&f32_pools, vocab), argmaxes(&one_by_one, vocab));
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    eprintln!("BF16 pools against f32 pools: logits moved {moved:.2e} (mean, relative), largest {:.2e}, greedy token the same at {same} of {} positions; chunked against one by one {chunking:.2e}", rel(&f32_pools, &one_by_one), prompt.len());
    assert!(moved > 1e-5 && moved < 1e-2, "BF16 pools moved the logits by {moved:.2e} on average");
    assert!(same * 10 >= prompt.len() * 9, "BF16 pools changed the greedy token at {} of {} positions", prompt.len() - same, prompt.len());
    assert!(chunking < 1e-5, "BF16 pools: chunked prefill differs from token by token by {chunking:.2e}");
    // Memory is the GPU's saving: the reference's pools stay f32.
    assert_eq!(demo(KvDtype::F32).kv_block_bytes(16), demo(KvDtype::Bf16).kv_block_bytes(16));
}

/// FP8 pools (`--kv-cache-dtype fp8`): e4m3's 3 mantissa bits (steps 2^5 coarser than BF16's
/// 8) move the demo model's logits ~15x as far as BF16 pools do (4.7e-2 against 3.2e-3 on
/// average, none of its K or V saturated), still leaving most greedy choices as they were;
/// chunked prefill holds the same values as token by token.
#[test]
fn fp8_pools_move_the_demo_models_logits_further_than_bf16_and_the_same_in_chunks() {
    let prompt: Vec<u32> = (0..60u32).map(|i| 5 + (i * 41) % 700).collect();
    let f32_pools = logits(&mut demo(KvDtype::F32), &prompt, &[60]);
    let bf16 = logits(&mut demo(KvDtype::Bf16), &prompt, &[60]);
    let one_by_one = logits(&mut demo(KvDtype::Fp8E4m3), &prompt, &[1]);
    let chunks = logits(&mut demo(KvDtype::Fp8E4m3), &prompt, &[7, 1, 13, 4]);
    let vocab = f32_pools.len() / prompt.len();
    let (moved, moved_bf16, chunking) = (mean_rel(&f32_pools, &one_by_one), mean_rel(&f32_pools, &bf16), rel(&one_by_one, &chunks));
    let (a, b) = (argmaxes(&f32_pools, vocab), argmaxes(&one_by_one, vocab));
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    eprintln!("FP8 pools against f32 pools: logits moved {moved:.2e} (BF16 {moved_bf16:.2e}), largest {:.2e}, greedy token the same at {same} of {} positions; chunked against one by one {chunking:.2e}", rel(&f32_pools, &one_by_one), prompt.len());
    assert!(moved > 4.0 * moved_bf16 && moved < 0.1, "FP8 pools moved the logits by {moved:.2e} on average (BF16 {moved_bf16:.2e})");
    assert!(same * 10 >= prompt.len() * 8, "FP8 pools changed the greedy token at {} of {} positions", prompt.len() - same, prompt.len());
    assert!(chunking < 1e-5, "FP8 pools: chunked prefill differs from token by token by {chunking:.2e}");
}
