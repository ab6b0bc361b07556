//! config.json -> ModelSpec: the shape presets, HF defaults, quantisation configs, validation
//! errors naming their field, and no panic on mutated configs.

use std::path::PathBuf;

use peregrine_core::{AttentionKind, DType, Error, MlpSpec, QkvLayout, QuantFormat, RouterScoring};
use peregrine_model::config::{load_spec, parse_config};
use serde_json::{json, Value};

fn preset(name: &str) -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs").join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn field_of<T>(r: peregrine_core::Result<T>) -> String {
    match r {
        Err(Error::Config { field, .. }) => field,
        Err(e) => panic!("expected a config error, got {e}"),
        Ok(_) => panic!("expected a config error, got Ok"),
    }
}

#[test]
fn flash_preset_shapes() {
    let s = parse_config(&preset("mimo-v2-flash.json"), None).unwrap();
    assert_eq!(s.num_layers(), 48);
    let full: Vec<usize> =
        (0..48).filter(|&i| s.layers[i].attention.kind == AttentionKind::Full).collect();
    assert_eq!(full, [0, 5, 11, 17, 23, 29, 35, 41, 47]);
    let (f, w) = (&s.layers[0].attention, &s.layers[1].attention);
    assert_eq!((f.num_heads, f.num_kv_heads, w.num_kv_heads), (64, 4, 8));
    assert_eq!(w.kind, AttentionKind::Sliding { window: 128 });
    assert_eq!((f.head_dim, f.v_head_dim), (192, 128));
    assert_eq!((f.rope.rotary_dim, f.rope.theta, w.rope.theta), (64, 5e6, 1e4));
    assert!(!f.sinks && w.sinks);
    assert_eq!(f.value_scale, 0.707);
    assert_eq!(f.softmax_scale, 192f32.powf(-0.5));
    assert_eq!(s.layers[0].mlp, MlpSpec::Dense { intermediate_size: 16384 });
    let MlpSpec::Moe(m) = s.layers[1].mlp else { panic!("layer 1 is MoE") };
    assert_eq!((m.num_experts, m.top_k, m.intermediate_size), (256, 8, 2048));
    assert_eq!(m.scoring, RouterScoring::Sigmoid);
    assert!(m.correction_bias && m.norm_topk_prob);
    assert_eq!(m.routed_scaling_factor, 1.0, "null reads as 1.0");
    assert_eq!(s.quant.linear, QuantFormat::Fp8Block { block_n: 128, block_k: 128 });
    assert_eq!(s.quant.experts, s.quant.linear);
    let p = s.num_parameters() as f64;
    assert!((p / 309e9 - 1.0).abs() < 0.03, "Flash has {p:e} parameters");
}

#[test]
fn pro_preset_shapes() {
    let s = parse_config(&preset("mimo-v2.5-pro.json"), None).unwrap();
    assert_eq!(s.num_layers(), 70);
    let full: Vec<usize> =
        (0..70).filter(|&i| s.layers[i].attention.kind == AttentionKind::Full).collect();
    assert_eq!(full, [0, 7, 15, 23, 31, 39, 47, 55, 62, 69]);
    for l in &s.layers {
        let a = &l.attention;
        assert_eq!((a.num_heads, a.num_kv_heads, a.head_dim, a.v_head_dim), (128, 8, 192, 128));
        assert_eq!(a.qkv_layout, QkvLayout::FusedPerKvHead);
        assert_eq!(a.value_scale, 0.612);
        assert_eq!(a.sinks, a.kind != AttentionKind::Full);
        assert_eq!(a.rope.theta, if a.kind == AttentionKind::Full { 5e6 } else { 1e4 });
    }
    assert_eq!(s.layers[0].mlp, MlpSpec::Dense { intermediate_size: 16384 });
    let MlpSpec::Moe(m) = s.layers[69].mlp else { panic!("layer 69 is MoE") };
    assert_eq!((m.num_experts, m.top_k, m.intermediate_size), (384, 8, 2048));
    assert_eq!(s.quant.experts, QuantFormat::Mxfp4);
    assert_eq!(s.quant.linear, QuantFormat::Fp8Block { block_n: 128, block_k: 128 });
    assert_eq!(s.eos_token_ids, [151645]);
    assert_eq!(s.quant.ignored.len(), 70, "every o_proj stays BF16");
    let p = s.num_parameters() as f64;
    assert!((p / 1.02e12 - 1.0).abs() < 0.03, "Pro has {p:e} parameters");
}

#[test]
fn flash_hf_defaults_from_a_bare_config() {
    let s = parse_config(&json!({"model_type": "mimo_v2_flash"}), None).unwrap();
    assert_eq!((s.num_layers(), s.hidden_size, s.vocab_size), (48, 4096, 152576));
    assert_eq!(s.layers[0].attention.value_scale, 0.707, "HF default when the key is absent");
    assert_eq!(s.layers[0].attention.rope.rotary_dim, 64, "int(192 * 0.334)");
    // Null value scale reads as 1.0 (HF: `attention_value_scale or 1.0` in the attention).
    let s = parse_config(&json!({"model_type": "mimo_v2_flash", "attention_value_scale": null}), None).unwrap();
    assert_eq!(s.layers[0].attention.value_scale, 1.0);
}

#[test]
fn rotary_dim_like_python_int_of_f64_product() {
    // int(128 * 0.3) = 38 (38.4); int(100 * 0.29) = 28 (28.999999999999996); int(16 * 0.334) = 5,
    // odd, which HF rotates as ceil(5/2) = 3 pairs.
    for (hd, f, want) in [(128usize, 0.3f64, 38usize), (100, 0.29, 28), (192, 0.5, 96), (192, 1.0, 192), (16, 0.334, 5)] {
        let cfg = json!({"model_type": "mimo_v2", "num_hidden_layers": 2, "hidden_size": 64,
            "vocab_size": 10, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": hd,
            "intermediate_size": 32, "partial_rotary_factor": f});
        let s = parse_config(&cfg, None).unwrap();
        assert_eq!(s.layers[0].attention.rope.rotary_dim, want, "{hd} * {f}");
        assert_eq!(s.layers[0].attention.rope.rotated_dims(), want.div_ceil(2) * 2);
    }
}

#[test]
fn mimo_v2_defaults_and_aliases() {
    let cfg = json!({"model_type": "mimo_v2", "num_hidden_layers": 12, "hidden_size": 64,
        "vocab_size": 100, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 32, "sliding_window_size": 7, "rms_norm_eps": 1e-6,
        "swa_num_key_value_heads": 4, "eos_token_id": 3});
    let s = parse_config(&cfg, Some(&json!({"eos_token_id": [3, 5]}))).unwrap();
    let full: Vec<usize> = (0..12).filter(|&i| s.layers[i].attention.kind == AttentionKind::Full).collect();
    assert_eq!(full, [0, 5, 11], "default int(i != 0 and i % 6 != 5)");
    assert_eq!(s.layers[1].attention.kind, AttentionKind::Sliding { window: 7 });
    assert_eq!((s.layers[0].attention.num_kv_heads, s.layers[1].attention.num_kv_heads), (2, 4));
    assert!(matches!(s.layers[0].mlp, MlpSpec::Dense { .. }) && matches!(s.layers[1].mlp, MlpSpec::Moe(_)));
    assert!(!s.layers[0].attention.sinks && s.layers[1].attention.sinks);
    assert_eq!(s.rms_norm_eps, 1e-6);
    assert_eq!(s.eos_token_ids, [3, 5]);
    assert_eq!(s.quant, peregrine_core::spec::QuantSpec::unquantized());
}

fn flash_min() -> Value {
    json!({"model_type": "mimo_v2_flash", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 7,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "v_head_dim": 8,
           "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
           "intermediate_size": 24})
}

#[test]
fn hf_defaults_apply() {
    let s = parse_config(&flash_min(), None).unwrap();
    let kinds: Vec<bool> = s.layers.iter().map(|l| l.attention.kind == AttentionKind::Full).collect();
    assert_eq!(kinds, [true, false, false, false, false, true, false]);
    assert_eq!(s.layers[1].attention.num_kv_heads, 4, "SWA layers double the KV heads");
    assert_eq!(s.layers[0].attention.rope.rotary_dim, 5, "int(16 * 0.334)");
    assert_eq!(s.layers[0].attention.rope.rotated_dims(), 6, "HF rotates ceil(5/2) frequency pairs");
    assert!((s.layers[0].attention.value_scale - 0.707).abs() < 1e-7, "absent value scale defaults to 0.707");
    assert_eq!(s.bos_token_id, Some(1));
    let mut c = flash_min();
    c["attention_value_scale"] = Value::Null;
    c["routed_scaling_factor"] = Value::Null;
    c["eos_token_id"] = json!([3, 7]);
    let s = parse_config(&c, Some(&json!({"eos_token_id": [7, 9]}))).unwrap();
    assert_eq!(s.layers[0].attention.value_scale, 1.0, "null value scale means 1.0");
    let MlpSpec::Moe(m) = s.layers[1].mlp else { panic!() };
    assert_eq!(m.routed_scaling_factor, 1.0);
    assert_eq!(s.eos_token_ids, [3, 7, 9]);
}

#[test]
fn flash_missing_sizes_take_hf_defaults_but_mimo_v2_requires_them() {
    let mut c = flash_min();
    c.as_object_mut().unwrap().remove("vocab_size");
    assert_eq!(parse_config(&c, None).unwrap().vocab_size, 152576, "MiMoV2FlashConfig default");
    let mut c = preset("mimo-v2.5-pro.json");
    c.as_object_mut().unwrap().remove("vocab_size");
    assert_eq!(field_of(parse_config(&c, None)), "vocab_size");
}

#[test]
fn dense_llama_family() {
    let base = json!({"num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 100,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "rope_theta": 1e6, "tie_word_embeddings": true});
    for (mt, bias, qk) in [("llama", false, false), ("mistral", false, false), ("qwen2", true, false), ("qwen3", false, true)] {
        let mut c = base.clone();
        c["model_type"] = json!(mt);
        let s = parse_config(&c, None).unwrap();
        let a = &s.layers[1].attention;
        assert_eq!((a.head_dim, a.rope.rotary_dim, a.rope.theta), (16, 16, 1e6), "{mt}");
        assert_eq!((a.qkv_bias, a.qk_norm, a.sinks), (bias, qk, false), "{mt}");
        assert!(s.tie_word_embeddings);
    }
}

/// Sliding windows of dense configs as transformers reads them: Mistral's always (4096 when the
/// key is absent, none when null), Qwen2/Qwen3's only under `use_sliding_window` and from
/// `max_window_layers` on (or as `layer_types` says), Llama's never.
#[test]
fn dense_sliding_windows_follow_transformers() {
    let windows = |mt: &str, extra: Value| {
        let mut c = json!({"model_type": mt, "num_hidden_layers": 3, "hidden_size": 64, "vocab_size": 100,
            "num_attention_heads": 4, "intermediate_size": 128});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        parse_config(&c, None).map(|s| s.layers.iter().map(|l| l.attention.window()).collect::<Vec<_>>())
    };
    assert_eq!(windows("mistral", json!({})).unwrap(), [Some(4096); 3]);
    assert_eq!(windows("mistral", json!({"sliding_window": null})).unwrap(), [None; 3]);
    assert_eq!(windows("mistral", json!({"sliding_window": 128})).unwrap(), [Some(128); 3]);
    assert_eq!(windows("qwen2", json!({"sliding_window": 64})).unwrap(), [None; 3], "off without use_sliding_window");
    assert_eq!(windows("qwen2", json!({"use_sliding_window": true, "sliding_window": 64, "max_window_layers": 1})).unwrap(), [None, Some(64), Some(64)]);
    assert_eq!(windows("qwen2", json!({"use_sliding_window": true, "sliding_window": 64})).unwrap(), [None; 3], "max_window_layers defaults to 28");
    let types = json!({"use_sliding_window": true, "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]});
    assert_eq!(windows("qwen3", types).unwrap(), [Some(64), None, Some(64)]);
    assert_eq!(field_of(windows("qwen3", json!({"layer_types": ["sliding_attention", "full_attention", "full_attention"]}))), "layer_types[0]");
    assert_eq!(field_of(windows("qwen3", json!({"layer_types": ["full_attention"]}))), "layer_types");
    assert_eq!(windows("llama", json!({"use_sliding_window": true, "sliding_window": 64})).unwrap(), [None; 3]);
}

#[test]
fn quantization_configs() {
    let q = |qc: Value| {
        let mut c = preset("mimo-v2-flash.json");
        c["quantization_config"] = qc;
        parse_config(&c, None)
    };
    let s = q(json!({"quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]})).unwrap();
    assert_eq!((s.quant.linear, s.quant.experts), (QuantFormat::Plain(DType::BF16), QuantFormat::Mxfp4));
    assert_eq!(s.quant.ignored, ["router", "lm_head"]);
    let s = q(json!({"quant_method": "fp8", "weight_block_size": [64, 32], "store_dtype": "mxfp4", "ignored_layers": ["o_proj"]})).unwrap();
    assert_eq!((s.quant.linear, s.quant.experts), (QuantFormat::Fp8Block { block_n: 64, block_k: 32 }, QuantFormat::Mxfp4));
    assert_eq!(field_of(q(json!({"quant_method": "awq"}))), "quantization_config.quant_method");
    assert_eq!(field_of(q(json!({"quant_method": "fp8", "weight_block_size": [0, 128]}))), "quantization_config.weight_block_size");
    assert_eq!(field_of(q(json!({"quant_method": "fp8", "store_dtype": "int4"}))), "quantization_config.store_dtype");
}

#[test]
fn invalid_values_name_their_field() {
    let with = |k: &str, v: Value| {
        let mut c = preset("mimo-v2-flash.json");
        c[k] = v;
        parse_config(&c, None)
    };
    assert_eq!(field_of(with("model_type", json!("gpt2"))), "model_type");
    assert_eq!(field_of(with("num_key_value_heads", json!(3))), "num_key_value_heads");
    assert_eq!(field_of(with("num_experts_per_tok", json!(300))), "num_experts_per_tok");
    assert_eq!(field_of(with("n_group", json!(3))), "n_group");
    assert_eq!(field_of(with("topk_group", json!(2))), "topk_group");
    assert_eq!(field_of(with("hidden_size", json!("big"))), "hidden_size");
    assert_eq!(field_of(with("hidden_size", json!(0))), "hidden_size");
    assert_eq!(field_of(with("layer_types", json!(["full_attention"]))), "layer_types");
    assert_eq!(field_of(with("mlp_layer_types", json!([]))), "mlp_layer_types");
    assert_eq!(field_of(with("sliding_window", json!(-4))), "sliding_window");
    assert_eq!(field_of(with("eos_token_id", json!(999_999))), "eos_token_id");
    let mut c = preset("mimo-v2.5-pro.json");
    c["partial_rotary_factor"] = json!(2.0);
    assert_eq!(field_of(parse_config(&c, None)), "partial_rotary_factor");
    // A negative factor would turn RoPE off; a finite f64 eps infinite as an f32; sizes whose
    // products no weight could have; MLP biases nothing reads.
    let mut c = preset("mimo-v2.5-pro.json");
    c["partial_rotary_factor"] = json!(-0.5);
    assert_eq!(field_of(parse_config(&c, None)), "partial_rotary_factor");
    assert_eq!(field_of(with("rms_norm_eps", json!(1e300))), "rms_norm_eps");
    assert_eq!(field_of(with("attention_value_scale", json!(1e300))), "attention_value_scale");
    let dense = |extra: Value| {
        let mut c = json!({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 65536, "vocab_size": 100,
            "num_attention_heads": 4, "intermediate_size": 128});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        parse_config(&c, None)
    };
    assert_eq!(field_of(dense(json!({"num_attention_heads": 65536, "num_key_value_heads": 65536, "head_dim": 65536}))), "num_attention_heads");
    assert_eq!(field_of(dense(json!({"vocab_size": 4294967296u64}))), "vocab_size");
    assert_eq!(field_of(dense(json!({"mlp_bias": true}))), "mlp_bias");
    assert_eq!(field_of(dense(json!({"hidden_size": 63}))), "hidden_size", "63 is not a multiple of 4 heads");
    assert!(dense(json!({"hidden_size": 63, "head_dim": 16})).is_ok(), "head_dim given");
    // A model's own config.json given as a drafter's.
    let mut c = preset("mimo-v2-flash.json");
    c["model_type"] = json!("qwen3");
    assert_eq!(field_of(peregrine_model::config::parse_draft_config(&c)), "dflash_config");
    assert!(dense(json!({})).is_ok());
    let mut c = preset("mimo-v2.5-pro.json");
    c.as_object_mut().unwrap().remove("num_attention_heads");
    assert_eq!(field_of(parse_config(&c, None)), "num_attention_heads");
    let mut c = preset("mimo-v2.5-pro.json");
    c["hybrid_layer_pattern"][3] = json!(2);
    assert_eq!(field_of(parse_config(&c, None)), "hybrid_layer_pattern[3]");
    assert!(matches!(parse_config(&json!([1, 2]), None), Err(Error::Config { .. })));
}

#[test]
fn load_spec_reads_generation_config_eos() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), preset("mimo-v2-flash.json").to_string()).unwrap();
    std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [151645, 151643]}"#).unwrap();
    let s = load_spec(dir.path()).unwrap();
    assert_eq!(s.eos_token_ids, [151645, 151643], "config.json's id, then generation_config.json's new one");
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    assert!(matches!(load_spec(dir.path()), Err(Error::File { .. })));
}

/// Tiny deterministic generator, so the mutation test needs no extra dependency.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn mutant(rng: &mut Lcg) -> Value {
    let vals = [json!(null), json!(0), json!(-1), json!(1), json!(3), json!(1e300), json!(-0.5),
        json!(u64::MAX), json!("x"), json!([]), json!({}), json!([0, 1]), json!(true), json!(0.334), json!(7)];
    vals[(rng.next() % vals.len() as u64) as usize].clone()
}

fn mutate(v: &mut Value, rng: &mut Lcg) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = &keys[(rng.next() % keys.len() as u64) as usize];
            match rng.next() % 4 {
                0 => {
                    m.remove(k);
                }
                1 => mutate(m.get_mut(k).unwrap(), rng),
                _ => *m.get_mut(k).unwrap() = mutant(rng),
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let i = (rng.next() % a.len() as u64) as usize;
            match rng.next() % 3 {
                0 => {
                    a.remove(i);
                }
                1 => mutate(&mut a[i], rng),
                _ => a[i] = mutant(rng),
            }
        }
        _ => *v = mutant(rng),
    }
}

#[test]
fn mutated_configs_never_panic() {
    let mut rng = Lcg(42);
    let bases = [preset("mimo-v2-flash.json"), preset("mimo-v2.5-pro.json"),
        json!({"model_type": "qwen3", "num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 100,
               "num_attention_heads": 4, "intermediate_size": 128})];
    let (mut ok, mut err) = (0, 0);
    for i in 0..3000 {
        let mut c = bases[i % bases.len()].clone();
        for _ in 0..1 + rng.next() % 3 {
            mutate(&mut c, &mut rng);
        }
        let r = std::panic::catch_unwind(|| parse_config(&c, None));
        match r {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(_)) => err += 1,
            Err(_) => panic!("parse_config panicked on {c}"),
        }
    }
    assert!(ok > 100 && err > 100, "mutations exercise both paths: {ok} ok, {err} errors");
}

#[test]
fn dense_llama_config() {
    let c = json!({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": 30,
                   "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
                   "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": true});
    let s = parse_config(&c, None).unwrap();
    let a = s.layers[0].attention;
    assert_eq!((a.head_dim, a.rope.rotary_dim, a.num_kv_heads), (64, 64, 3));
    assert!(s.tie_word_embeddings && !a.sinks && a.kind == AttentionKind::Full);
}

/// `min_device_weight_bytes` is a lower bound of what a backend keeping stored formats holds,
/// whatever formats a checkpoint stores, and a close one where MXFP4 experts dominate: no golden
/// fixture's checkpoint (f32, BF16, FP8 blocks with their scales, MXFP4 with its scale bytes) is
/// smaller, and MiMo-V2-Flash (47 MoE layers of 256 experts) comes to its experts' MXFP4 bytes
/// plus at most two bytes for every other parameter, 164.9 GB: beyond one 141 GB GPU, which the
/// CUDA backend says before loading anything (309 GB as released, with FP8 experts).
#[test]
fn min_device_weight_bytes_bounds_the_stored_formats_from_below() {
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden");
    for name in ["default", "groups", "mxfp4", "fp8", "mimo_v2_fused"] {
        let dir = golden.join(name);
        let spec = load_spec(&dir).unwrap();
        let stored = std::fs::metadata(dir.join("model.safetensors")).unwrap().len() as usize;
        let bound = spec.min_device_weight_bytes();
        assert!(bound > 0 && bound <= stored, "{name}: bound {bound} against {stored} stored bytes");
    }
    let s = parse_config(&preset("mimo-v2-flash.json"), None).unwrap();
    let (mut experts, mut moe_layers) = (0usize, 0);
    for l in &s.layers {
        if let MlpSpec::Moe(m) = l.mlp {
            experts += m.num_experts * 3 * s.hidden_size * m.intermediate_size;
            moe_layers += 1;
        }
    }
    assert_eq!(moe_layers, 47);
    let expert_bytes = experts / 32 * 17; // 16 code bytes and one scale byte per 32
    let bound = s.min_device_weight_bytes();
    assert!(bound > expert_bytes && bound <= expert_bytes + 2 * (s.num_parameters() - experts), "{bound} against experts {expert_bytes}");
    assert_eq!(bound / 1_000_000_000, 164, "{bound}");
}
