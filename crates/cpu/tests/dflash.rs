//! The DFlash drafter against the PyPI `dflash` reference (tools/golden/make_dflash_fixture.py):
//! over the golden `default` target, greedy speculative generation must reproduce every round's
//! draft tokens, every acceptance length and the output, exactly.

use std::path::{Path, PathBuf};

use peregrine_core::backend::{Backend, DraftForward, KvConfig, OutputRows, SeqForward};
use peregrine_cpu::CpuModel;
use peregrine_model::dflash::open_drafter;
use peregrine_model::loader::open_model;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
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

struct Run {
    output: Vec<u32>,
    acceptance: Vec<usize>,
    drafts: Vec<Vec<u32>>,
}

/// `dflash_generate` (greedy) through the Backend API.
fn generate(m: &mut CpuModel, prompt: &[u32], max_new: usize, block: usize) -> Run {
    let bs = 16;
    let max_length = prompt.len() + max_new;
    let nblocks = (max_length + block).div_ceil(bs);
    m.init_kv(KvConfig { block_size: bs, num_full_blocks: nblocks, num_swa_blocks: nblocks }).unwrap();
    let table: Vec<u32> = (0..nblocks as u32).collect();
    let fwd = |m: &mut CpuModel, tokens: Vec<u32>, start: usize, output| {
        m.forward(&[SeqForward { seq_id: 1, tokens, start_pos: start, full_blocks: table.clone(), swa_blocks: table.clone(), output }])
            .unwrap()
            .remove(0)
    };
    let lg = fwd(m, prompt.to_vec(), 0, OutputRows::Last);
    let mut out = prompt.to_vec();
    out.push(argmax(lg.last().unwrap()));
    let mut start = prompt.len();
    let (mut acceptance, mut drafts) = (Vec::new(), Vec::new());
    while start + 1 < max_length {
        let verify = block.min(max_length - start);
        let mut ids = vec![out[start]];
        if verify > 1 {
            let d = m
                .draft(&[DraftForward { seq_id: 1, last_token: out[start], start_pos: start, num_drafts: verify - 1, full_blocks: table.clone() }])
                .unwrap()
                .remove(0);
            assert_eq!(d.len(), verify - 1);
            ids.extend(&d);
            drafts.push(d);
        }
        let lg = fwd(m, ids.clone(), start, OutputRows::All);
        let post: Vec<u32> = (0..lg.rows).map(|r| argmax(lg.row(r))).collect();
        let acc = (1..ids.len()).take_while(|&i| ids[i] == post[i - 1]).count();
        out.truncate(start + 1);
        out.extend(&ids[1..=acc]);
        out.push(post[acc]);
        let produced = (acc + 1).min(max_length - start - 1);
        start += produced;
        acceptance.push(produced);
    }
    out.truncate((start + 1).min(max_length));
    Run { output: out[prompt.len()..].to_vec(), acceptance, drafts }
}

fn check(name: &str) -> usize {
    let dir = root().join("tests/fixtures/dflash").join(name);
    let reference: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    // The random drafters sit beside their reference over the golden target; the trained one's
    // reference names the committed demo pair.
    let target = reference["target"].as_str().unwrap_or("tests/fixtures/golden/default");
    let drafter = reference["drafter"].as_str().map_or(dir.clone(), |d| root().join(d));
    let files = open_model(root().join(target).to_str().unwrap()).unwrap();
    let mut m = CpuModel::load(&files.spec, files.weights.as_ref()).unwrap();
    let draft = open_drafter(&drafter).unwrap();
    m.attach_drafter(&draft).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
    let max_new = reference["max_new_tokens"].as_u64().unwrap() as usize;
    let block = reference["block_size"].as_u64().unwrap() as usize;
    assert_eq!(block, draft.spec.block_size);
    let mut rounds = 0;
    for (ci, case) in reference["cases"].as_array().unwrap().iter().enumerate() {
        let run = generate(&mut m, &ids(&case["prompt"]), max_new, block);
        let want_drafts: Vec<Vec<u32>> = case["drafts"].as_array().unwrap().iter().map(ids).collect();
        for (r, (got, want)) in run.drafts.iter().zip(&want_drafts).enumerate() {
            assert_eq!(got, want, "{name} case {ci}: drafts of round {r}");
        }
        assert_eq!(run.drafts.len(), want_drafts.len(), "{name} case {ci}: rounds");
        let want_acc: Vec<usize> = case["acceptance_lengths"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(run.acceptance, want_acc, "{name} case {ci}: acceptance lengths");
        assert_eq!(run.output, ids(&case["output"]), "{name} case {ci}: output");
        rounds += run.drafts.len();
    }
    assert!(rounds > 50, "{name}: only {rounds} draft rounds checked");
    rounds
}

#[test]
fn random_drafter_with_mask_embedding_matches_reference() {
    check("random");
}

#[test]
fn sliding_causal_drafter_matches_reference() {
    check("swa");
}

/// The trained demo drafter over the demo model: multi-token acceptances, exactly as the reference.
#[test]
fn trained_demo_drafter_matches_reference() {
    check("trained");
}

#[test]
fn drafter_config_errors_name_the_field() {
    let dir = root().join("tests/fixtures/dflash/random");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    cfg["dflash_config"]["target_layer_ids"] = serde_json::json!([1, 9]);
    let tmp = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "mask_embedding.pt"] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let files = open_model(root().join("tests/fixtures/golden/default").to_str().unwrap()).unwrap();
    let mut m = CpuModel::load(&files.spec, files.weights.as_ref()).unwrap();
    let err = m.attach_drafter(&open_drafter(tmp.path()).unwrap()).expect_err("layer 9 of 7 must be refused").to_string();
    assert!(err.contains("target_layer_ids") && err.contains('9'), "{err}");
    cfg["dflash_config"]["target_layer_ids"] = serde_json::json!([1, 4, 6]);
    cfg["hidden_size"] = serde_json::json!(32);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let err = match open_drafter(tmp.path()) {
        Err(e) => e.to_string(),
        Ok(d) => m.attach_drafter(&d).expect_err("a hidden size mismatch must be refused").to_string(),
    };
    assert!(err.contains("hidden") || err.contains("shape"), "{err}");
    // A mask embedding of the wrong width is refused with the file named.
    cfg["hidden_size"] = serde_json::json!(64);
    cfg["dflash_config"]["mask_token_id"] = serde_json::json!(3);
    std::fs::write(tmp.path().join("config.json"), cfg.to_string()).unwrap();
    let err = open_drafter(tmp.path()).err().expect("a mask id mismatch must be refused").to_string();
    assert!(err.contains("mask_embedding.pt") && err.contains("mask_token_id"), "{err}");
}
