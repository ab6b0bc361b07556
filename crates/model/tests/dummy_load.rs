//! Random weights for a config without its checkpoint (`LoadOptions::dummy_weights`) and config
//! overrides (`LoadOptions::config_overrides`), on the golden fixture's config.

use peregrine_model::loader::{open_model, open_model_with, LoadOptions};
use serde_json::{json, Value};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/golden/default");

/// A directory holding only the fixture's config.json.
fn config_only() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(format!("{FIXTURE}/config.json"), dir.path().join("config.json")).unwrap();
    dir
}

fn overrides(v: Value) -> Option<serde_json::Map<String, Value>> {
    match v {
        Value::Object(m) => Some(m),
        _ => unreachable!(),
    }
}

#[test]
fn a_config_alone_opens_with_random_weights_and_the_stand_in_tokenizer() {
    let dir = config_only();
    let path = dir.path().to_str().unwrap();
    assert!(open_model(path).is_err(), "without random weights a config needs its checkpoint");
    let m = open_model_with(path, &LoadOptions { dummy_weights: Some(0), ..Default::default() }).unwrap();
    let real = open_model(FIXTURE).unwrap();
    assert_eq!(m.spec.num_layers(), real.spec.num_layers());
    assert_eq!(m.spec.vocab_size, real.spec.vocab_size);
    let t = m.tokenizer.as_ref().expect("the stand-in tokenizer");
    assert_eq!(t.vocab_size(), m.spec.vocab_size);
    assert_eq!(t.eos_token_ids(), vec![m.spec.eos_token_ids[0]]);
    assert!(m.chat_template.is_none());
    let h = m.spec.hidden_size;
    let e = m.weights.matrix("model.embed_tokens.weight", m.spec.vocab_size, h).unwrap();
    assert_eq!(e.len(), m.spec.vocab_size * h);
    assert!(e.iter().any(|&v| v != 0.0) && e.iter().all(|v| v.is_finite()));
    // The config directory's own tokenizer is kept when there is one.
    let m = open_model_with(FIXTURE, &LoadOptions { dummy_weights: Some(0), ..Default::default() }).unwrap();
    assert_eq!(m.tokenizer.unwrap().vocab_size(), real.tokenizer.unwrap().vocab_size());
    assert!(m.weights.matrix("model.embed_tokens.weight", m.spec.vocab_size, h).unwrap() != real.weights.matrix("model.embed_tokens.weight", m.spec.vocab_size, h).unwrap());
}

#[test]
fn overrides_replace_config_fields_and_fewer_layers_keep_the_first() {
    let real = open_model(FIXTURE).unwrap();
    assert!(real.spec.num_layers() > 2);
    let opts = LoadOptions { dummy_weights: None, config_overrides: overrides(json!({"num_hidden_layers": 2, "rms_norm_eps": 1e-3})) };
    let m = open_model_with(FIXTURE, &opts).unwrap();
    assert_eq!(m.spec.num_layers(), 2);
    for i in 0..2 {
        assert_eq!(m.spec.layers[i].attention.window(), real.spec.layers[i].attention.window(), "layer {i} keeps its attention");
        assert_eq!(format!("{:?}", m.spec.layers[i].mlp), format!("{:?}", real.spec.layers[i].mlp), "layer {i} keeps its MLP");
    }
    assert_eq!(m.spec.rms_norm_eps, 1e-3);
    let (h, o) = (m.spec.hidden_size, m.spec.layers[1].attention.o_dim());
    let w = m.weights.matrix("model.layers.1.self_attn.o_proj.weight", h, o).unwrap();
    assert_eq!(w, real.weights.matrix("model.layers.1.self_attn.o_proj.weight", h, o).unwrap(), "the checkpoint's weights");
    // More layers than the config's per-layer lists describe: the lists' length is checked.
    let opts = LoadOptions { dummy_weights: Some(0), config_overrides: overrides(json!({"num_hidden_layers": real.spec.num_layers() + 1})) };
    let err = open_model_with(FIXTURE, &opts).err().expect("a longer model than its layer lists").to_string();
    assert!(err.contains("layer_types"), "{err}");
    let opts = LoadOptions { dummy_weights: Some(0), config_overrides: overrides(json!({"num_hidden_layers": "two"})) };
    let err = open_model_with(FIXTURE, &opts).err().expect("a non-integer layer count").to_string();
    assert!(err.contains("num_hidden_layers"), "{err}");
}

#[test]
fn a_config_file_of_any_name_opens_with_random_weights_only() {
    let flash = concat!(env!("CARGO_MANIFEST_DIR"), "/../../configs/mimo-v2-flash.json");
    let err = open_model(flash).err().expect("a named config without random weights").to_string();
    assert!(err.contains("random weights"), "{err}");
    let m = open_model_with(flash, &LoadOptions { dummy_weights: Some(1), ..Default::default() }).unwrap();
    assert_eq!((m.spec.num_layers(), m.spec.vocab_size, m.spec.hidden_size), (48, 152576, 4096));
    assert_eq!(m.tokenizer.as_ref().unwrap().vocab_size(), 152576, "the stand-in tokenizer");
    assert!(m.chat_template.is_none() && m.tokenizer_json.is_none());
    let opts = LoadOptions { dummy_weights: Some(1), config_overrides: overrides(json!({"num_hidden_layers": 18})) };
    let m = open_model_with(flash, &opts).unwrap();
    assert_eq!(m.spec.num_layers(), 18);
    let full = m.spec.layers.iter().filter(|l| l.attention.window().is_none()).count();
    assert_eq!(full, 4, "the first 18 of Flash's layers hold 4 full-attention ones");
}
