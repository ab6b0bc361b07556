//! Checkpoints (single, sharded, broken), SafetensorsWeights over every stored layout, the HF cache
//! resolver and open_model, on small safetensors files written here.

use std::path::Path;

use half::bf16;
use peregrine_core::Error;
use peregrine_model::checkpoint::Checkpoint;
use peregrine_model::formats::{quantize_mxfp4, E2M1_VALUES};
use peregrine_model::weights::{SafetensorsWeights, WeightSource};
use serde_json::json;

/// (name, dtype, shape, bytes)
type T<'a> = (&'a str, &'a str, Vec<usize>, Vec<u8>);

fn write_st(path: &Path, tensors: &[T]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend_from_slice(bytes);
    }
    let h = serde_json::Value::Object(header).to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

fn f32b(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn bf16b(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect()
}
/// Values exactly representable in bf16, FP8 and (per 32-block) MXFP4 at scale 1.
fn grid(n: usize, seed: usize) -> Vec<f32> {
    // A multiplicative hash, so that rows and experts differ (row-selection bugs show).
    (0..n).map(|i| E2M1_VALUES[((i as u64 * 2654435761 + seed as u64 * 97) >> 9) as usize % 16]).collect()
}
fn tensor_err(r: peregrine_core::Result<impl std::fmt::Debug>) -> String {
    match r {
        Err(Error::Tensor { tensor, .. }) => tensor,
        other => panic!("expected a tensor error, got {other:?}"),
    }
}

#[test]
fn plain_fp8_mxfp4_and_aliases() {
    let dir = tempfile::tempdir().unwrap();
    let (n, k) = (40, 64);
    let w = grid(n * k, 1);
    // FP8: E2M1 grid values are exact in e4m3 (1.5 = 0x3C etc.); encode via a lookup of all codes.
    let fp8_code = |x: f32| (0u8..=255).find(|&c| peregrine_model::formats::fp8_e4m3_to_f32(c) == x).unwrap();
    let fp8: Vec<u8> = w.iter().map(|&x| fp8_code(x)).collect();
    // 32x32 blocks: scales [2, 2] with a partial last row block.
    let scales = [2.0f32, 0.5, 4.0, 0.25];
    let (mb, ms) = quantize_mxfp4(&w, n, k);
    write_st(&dir.path().join("model.safetensors"), &[
        ("a.weight", "BF16", vec![n, k], bf16b(&w)),
        ("q.weight", "F8_E4M3", vec![n, k], fp8),
        ("q.weight_scale_inv", "F32", vec![2, 2], f32b(&scales)),
        ("e.weight", "U8", vec![n, k / 2], mb),
        ("e.weight_scale", "U8", vec![n, k / 32], ms),
        ("model.layers.0.self_attn.sinks", "F32", vec![4], f32b(&[1.0, 2.0, 3.0, 4.0])),
        ("norm.weight", "F16", vec![3], vec![0, 0x3c, 0, 0x40, 0, 0xbc]),
    ]);
    let ws = SafetensorsWeights::new(Checkpoint::open(dir.path()).unwrap(), (32, 32));
    assert_eq!(ws.matrix("a.weight", n, k).unwrap(), w);
    let q = ws.matrix("q.weight", n, k).unwrap();
    for r in 0..n {
        for c in 0..k {
            assert_eq!(q[r * k + c], w[r * k + c] * scales[(r / 32) * 2 + c / 32], "fp8 [{r},{c}]");
        }
    }
    assert_eq!(ws.matrix("e.weight", n, k).unwrap(), w, "MXFP4 exact for grid values");
    assert_eq!(ws.vector("model.layers.0.self_attn.attention_sink_bias", 4).unwrap(), [1.0, 2.0, 3.0, 4.0]);
    assert!(ws.contains("model.layers.0.self_attn.attention_sink_bias"));
    assert_eq!(ws.vector("norm.weight", 3).unwrap(), [1.0, 2.0, -1.0]);
    // Errors name the tensor.
    assert_eq!(tensor_err(ws.matrix("a.weight", k, n)), "a.weight");
    assert_eq!(tensor_err(ws.matrix("missing.weight", 1, 1)), "missing.weight");
    assert_eq!(tensor_err(ws.vector("norm.weight", 4)), "norm.weight");
    assert!(!ws.contains("missing.weight"));
}

#[test]
fn fused_expert_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let (e, i, h) = (3, 4, 64);
    // HF fused float layout: gate_up [E, 2I, H] gate first, down [E, H, I].
    let gate_up = grid(e * 2 * i * h, 2);
    let down = grid(e * h * i, 3);
    // gpt-oss MXFP4: gate_up blocks [E, 2I, H/32, 16] with gate/up rows interleaved.
    let gu2 = grid(e * 2 * i * h, 4);
    let (gb, gs) = quantize_mxfp4(&gu2, e * 2 * i, h);
    let dn2: Vec<f32> = grid(e * 32 * 32, 5);
    let (db, ds) = quantize_mxfp4(&dn2, e * 32, 32);
    write_st(&dir.path().join("model.safetensors"), &[
        ("model.layers.1.mlp.experts.gate_up_proj", "BF16", vec![e, 2 * i, h], bf16b(&gate_up)),
        ("model.layers.1.mlp.experts.down_proj", "F32", vec![e, h, i], f32b(&down)),
        ("model.layers.2.mlp.experts.gate_up_proj_blocks", "U8", vec![e, 2 * i, h / 32, 16], gb),
        ("model.layers.2.mlp.experts.gate_up_proj_scales", "U8", vec![e, 2 * i, h / 32], gs),
        ("model.layers.2.mlp.experts.down_proj_blocks", "U8", vec![e, 32, 1, 16], db),
        ("model.layers.2.mlp.experts.down_proj_scales", "U8", vec![e, 32, 1], ds),
    ]);
    let ws = SafetensorsWeights::new(Checkpoint::open(dir.path()).unwrap(), (128, 128));
    assert_ne!(gate_up[..h], gate_up[h..2 * h], "test data has distinct rows");
    let rows = |m: &[f32], from: usize, n: usize, step: usize, cols: usize| -> Vec<f32> {
        (0..n).flat_map(|r| m[(from + r * step) * cols..(from + r * step + 1) * cols].to_vec()).collect()
    };
    for x in 0..e {
        let p = |proj: &str, l: usize| format!("model.layers.{l}.mlp.experts.{x}.{proj}_proj.weight");
        assert_eq!(ws.matrix(&p("gate", 1), i, h).unwrap(), rows(&gate_up, x * 2 * i, i, 1, h));
        assert_eq!(ws.matrix(&p("up", 1), i, h).unwrap(), rows(&gate_up, x * 2 * i + i, i, 1, h));
        assert_eq!(ws.matrix(&p("down", 1), h, i).unwrap(), down[x * h * i..(x + 1) * h * i]);
        assert_eq!(ws.matrix(&p("gate", 2), i, h).unwrap(), rows(&gu2, x * 2 * i, i, 2, h), "gpt-oss gate = even rows");
        assert_eq!(ws.matrix(&p("up", 2), i, h).unwrap(), rows(&gu2, x * 2 * i + 1, i, 2, h), "gpt-oss up = odd rows");
        assert_eq!(ws.matrix(&p("down", 2), 32, 32).unwrap(), dn2[x * 1024..(x + 1) * 1024]);
    }
    assert_eq!(tensor_err(ws.matrix("model.layers.1.mlp.experts.3.gate_proj.weight", i, h)), "model.layers.1.mlp.experts.gate_up_proj");
    assert_eq!(tensor_err(ws.matrix("model.layers.1.mlp.experts.0.gate_proj.weight", i + 1, h)), "model.layers.1.mlp.experts.gate_up_proj");
}

#[test]
fn broken_checkpoints_name_tensor_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    // Unknown/unsupported dtype.
    write_st(&p, &[("b", "BOOL", vec![2], vec![0, 1])]);
    assert_eq!(tensor_err(Checkpoint::open(&p).map(|_| ())), "b");
    // Truncated data.
    write_st(&p, &[("t", "F32", vec![4], f32b(&[1.0, 2.0, 3.0, 4.0]))]);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
    assert!(matches!(Checkpoint::open(&p), Err(Error::Tensor { .. }) | Err(Error::File { .. })));
    // Garbage header.
    std::fs::write(&p, b"\x05\0\0\0\0\0\0\0{oops").unwrap();
    assert!(matches!(Checkpoint::open(&p), Err(Error::File { path, .. }) if path == p));
    // Sharded: a shard named in the index is missing, then a tensor named but absent.
    let d = dir.path().join("sharded");
    std::fs::create_dir(&d).unwrap();
    write_st(&d.join("model-00001-of-00002.safetensors"), &[("a", "F32", vec![1], f32b(&[1.0]))]);
    let index = |map: serde_json::Value| std::fs::write(d.join("model.safetensors.index.json"), json!({"weight_map": map}).to_string()).unwrap();
    index(json!({"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}));
    match Checkpoint::open(&d) {
        Err(Error::File { path, .. }) => assert!(path.ends_with("model-00002-of-00002.safetensors")),
        other => panic!("{:?}", other.map(|_| ())),
    }
    write_st(&d.join("model-00002-of-00002.safetensors"), &[("c", "BF16", vec![1, 2], bf16b(&[1.0, 2.0]))]);
    assert_eq!(tensor_err(Checkpoint::open(&d).map(|_| ())), "b");
    index(json!({"a": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}));
    let ck = Checkpoint::open(&d).unwrap();
    let c = ck.get("c").unwrap();
    assert_eq!((c.dtype, c.shape), (peregrine_core::DType::BF16, &[1usize, 2][..]));
    assert_eq!(tensor_err(ck.get("zz").map(|_| ())), "zz");
    // A tensor listed under another shard than the one holding it (a stale index).
    index(json!({"a": "model-00002-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}));
    assert_eq!(tensor_err(Checkpoint::open(&d).map(|_| ())), "a");
    // Shards outside the model's directory are not read.
    for outside in ["../elsewhere.safetensors", "/etc/passwd", "./sub/../../x.safetensors"] {
        index(json!({"a": outside}));
        assert!(matches!(Checkpoint::open(&d), Err(Error::File { .. })), "{outside}");
    }
    // One name in two shards.
    write_st(&d.join("model-00002-of-00002.safetensors"), &[("a", "F32", vec![1], f32b(&[2.0])), ("c", "BF16", vec![1, 2], bf16b(&[1.0, 2.0]))]);
    index(json!({"a": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}));
    match Checkpoint::open(&d) {
        Err(Error::Tensor { tensor, message }) => assert!(tensor == "a" && message.contains("in both"), "{message}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

fn tiny_model(dir: &Path) {
    let cfg = json!({"model_type": "qwen3", "num_hidden_layers": 1, "hidden_size": 32, "vocab_size": 8,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64, "eos_token_id": 7});
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    write_st(&dir.join("model.safetensors"), &[
        ("model.embed_tokens.weight", "BF16", vec![8, 32], bf16b(&grid(256, 0))),
        ("model.layers.0.self_attn.qkv_proj.weight", "BF16", vec![64, 32], bf16b(&grid(2048, 1))),
    ]);
}

#[test]
fn hub_cache_and_open_model() {
    let root = tempfile::tempdir().unwrap();
    let repo = root.path().join("models--acme--tiny");
    let snap = repo.join("snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    tiny_model(&snap);
    use peregrine_model::hub::resolve_in;
    // No refs/main: newest snapshot with a config.json; a commit hash as revision.
    assert_eq!(resolve_in(root.path(), "acme/tiny"), Some(snap.clone()));
    assert_eq!(resolve_in(root.path(), "acme/tiny@abc123"), Some(snap.clone()));
    std::fs::create_dir_all(repo.join("snapshots/old")).unwrap();
    std::fs::write(repo.join("snapshots/old/config.json"), "{}").unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc123\n").unwrap();
    assert_eq!(resolve_in(root.path(), "acme/tiny"), Some(snap.clone()), "refs/main wins");
    assert_eq!(resolve_in(root.path(), "acme/other"), None);
    assert_eq!(resolve_in(root.path(), "acme/../x"), None);

    // open_model: directory, .safetensors file, HF id through $HF_HUB_CACHE, missing.
    use peregrine_model::loader::open_model;
    let m = open_model(snap.to_str().unwrap()).unwrap();
    assert_eq!(m.spec.num_layers(), 1);
    assert_eq!(m.spec.eos_token_ids, [7]);
    assert!(m.tokenizer.is_none() && m.chat_template.is_none());
    assert_eq!(m.spec.layers[0].attention.qkv_layout, peregrine_core::QkvLayout::FusedPerKvHead, "inferred from qkv_proj");
    assert_eq!(m.weights.matrix("model.embed_tokens.weight", 8, 32).unwrap(), grid(256, 0));
    let m = open_model(snap.join("model.safetensors").to_str().unwrap()).unwrap();
    assert!(m.weights.contains("model.layers.0.self_attn.qkv_proj.weight"));
    std::env::set_var("HF_HUB_CACHE", root.path());
    let m = open_model("acme/tiny").unwrap();
    assert_eq!(m.dir, snap);
    match open_model("acme/missing") {
        Err(Error::ModelNotFound(id, why)) => {
            assert_eq!(id, "acme/missing");
            assert!(why.contains(&root.path().display().to_string()), "{why}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    assert!(matches!(open_model("/no/such/dir"), Err(Error::ModelNotFound(..))));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(open_model(empty.path().to_str().unwrap()), Err(Error::ModelNotFound(..))));
}
