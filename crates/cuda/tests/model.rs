//! The CUDA backend against the CPU reference on the golden fixtures: logits of a whole prompt
//! (prefill), then 64 greedy tokens decoded one by one through the paged KV cache, identical.
//! Without a GPU these tests say `skipped:` and pass (scripts/gpu-check.sh runs them).

use std::path::Path;

use peregrine_core::backend::{Backend, KvConfig, OutputRows, SeqForward};
use peregrine_cpu::CpuModel;
use peregrine_cuda::{probe, CudaModel};
use peregrine_model::loader::open_model;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden").join(name).display().to_string()
}

fn argmax(v: &[f32]) -> u32 {
    let mut b = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[b] {
            b = i;
        }
    }
    b as u32
}

fn step(m: &mut dyn Backend, tokens: Vec<u32>, start: usize, table: &[u32], output: OutputRows) -> Vec<f32> {
    m.forward(&[SeqForward { seq_id: 1, tokens, start_pos: start, full_blocks: table.to_vec(), swa_blocks: table.to_vec(), output }])
        .unwrap()
        .remove(0)
        .data
}

#[test]
fn golden_fixtures_match_the_cpu_backend() {
    if let Err(e) = probe(0) {
        eprintln!("skipped: {e}");
        return;
    }
    for name in ["default", "groups", "mxfp4", "fp8"] {
        let files = open_model(&fixture(name)).unwrap();
        let mut cpu = CpuModel::load(&files.spec, files.weights.as_ref()).unwrap();
        let mut gpu = CudaModel::load(probe(0).unwrap(), &files.spec, files.weights.as_ref()).unwrap();
        let prompt: Vec<u32> = (0..40u32).map(|i| 7 + (i * 37) % 500).collect();
        let n_new = 64;
        let bs = 16;
        let blocks = (prompt.len() + n_new + bs).div_ceil(bs);
        let cfg = KvConfig { block_size: bs, num_full_blocks: blocks, num_swa_blocks: blocks };
        cpu.init_kv(cfg).unwrap();
        gpu.init_kv(cfg).unwrap();
        let table: Vec<u32> = (0..blocks as u32).rev().collect(); // not the identity, on purpose
        let a = step(&mut cpu, prompt.clone(), 0, &table, OutputRows::All);
        let b = step(&mut gpu, prompt.clone(), 0, &table, OutputRows::All);
        assert_eq!(a.len(), b.len());
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale;
        assert!(b.iter().all(|v| v.is_finite()), "{name}: non-finite GPU logits");
        eprintln!("{name}: prefill logits max |gpu - cpu| / max |cpu| = {err:.2e}");
        assert!(err < 1e-4, "{name}: relative error {err:.2e}");
        // Greedy decode, token by token.
        let vocab = files.spec.vocab_size;
        let (mut tc, mut tg) = (argmax(&a[a.len() - vocab..]), argmax(&b[b.len() - vocab..]));
        let (mut out_c, mut out_g) = (vec![tc], vec![tg]);
        for i in 0..n_new - 1 {
            let p = prompt.len() + i;
            tc = argmax(&step(&mut cpu, vec![tc], p, &table, OutputRows::Last));
            tg = argmax(&step(&mut gpu, vec![tg], p, &table, OutputRows::Last));
            out_c.push(tc);
            out_g.push(tg);
        }
        assert_eq!(out_g, out_c, "{name}: greedy tokens differ");
        eprintln!("{name}: 64 greedy tokens identical");
    }
}

#[test]
fn unsupported_layouts_are_refused_clearly() {
    let Ok(gpu) = probe(0) else {
        eprintln!("skipped: no GPU");
        return;
    };
    let files = open_model(&fixture("mimo_v2_fused")).unwrap();
    let err = CudaModel::load(gpu, &files.spec, files.weights.as_ref()).err().expect("fused qkv is not supported yet").to_string();
    assert!(err.contains("fused qkv"), "{err}");
}
