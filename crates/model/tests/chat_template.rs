//! Chat template rendering with HF semantics (ChatML / SmolLM2-style template, tojson,
//! raise_exception).

use peregrine_core::Error;
use peregrine_model::chat_template::ChatTemplate;
use serde_json::{json, Map};

const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn chatml_renders_like_hf() {
    let t = ChatTemplate::new(CHATML, None, Some("<|im_end|>")).unwrap();
    let msgs = json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]);
    let out = t.render(&msgs, None, true, &Map::new()).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>assistant\n"
    );
    let out = t.render(&json!([{"role": "system", "content": "S"}]), None, false, &Map::new()).unwrap();
    assert_eq!(out, "<|im_start|>system\nS<|im_end|>\n");
}

#[test]
fn trim_and_lstrip_blocks() {
    let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}\n";
    let t = ChatTemplate::new(src, None, None).unwrap();
    let out = t.render(&json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]), None, false, &Map::new()).unwrap();
    assert_eq!(out, "U:a\nU:b\n");
}

#[test]
fn tojson_matches_python_json_dumps() {
    let t = ChatTemplate::new("{{ tools | tojson }}|{{ tools[0] | tojson(indent=2) }}", None, None).unwrap();
    let tools = json!([{"name": "f<&>", "z": 1, "a": [1.0, "é\n"], "e": {}}]);
    let out = t.render(&json!([]), Some(&tools), false, &Map::new()).unwrap();
    assert_eq!(
        out,
        "[{\"name\": \"f<&>\", \"z\": 1, \"a\": [1.0, \"é\\n\"], \"e\": {}}]|{\n  \"name\": \"f<&>\",\n  \"z\": 1,\n  \"a\": [\n    1.0,\n    \"é\\n\"\n  ],\n  \"e\": {}\n}"
    );
}

#[test]
fn pycompat_methods_and_extra_kwargs() {
    let src = "{{ messages[0].content.strip().upper() }}{% if enable_thinking is defined and not enable_thinking %}|nothink{% endif %}{{ bos_token }}";
    let t = ChatTemplate::new(src, Some("<s>"), None).unwrap();
    let mut extra = Map::new();
    extra.insert("enable_thinking".into(), json!(false));
    let out = t.render(&json!([{"role": "user", "content": "  hi  "}]), None, false, &extra).unwrap();
    assert_eq!(out, "HI|nothink<s>");
}

#[test]
fn tool_call_arguments_string_passes_through_like_hf() {
    let src = "{% for m in messages %}{% for c in m.tool_calls %}{% if c.function.arguments is string %}{{ c.function.arguments }}{% else %}{{ c.function.arguments | tojson }}{% endif %};{% endfor %}{% endfor %}";
    let t = ChatTemplate::new(src, None, None).unwrap();
    let msgs = json!([{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
        {"type": "function", "function": {"name": "g", "arguments": {"x": 1}}}]}]);
    assert_eq!(t.render(&msgs, None, false, &Map::new()).unwrap(), "{\"x\":1};{\"x\": 1};");
}

#[test]
fn raise_exception_is_a_template_error() {
    let t = ChatTemplate::new("{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok", None, None).unwrap();
    assert_eq!(t.render(&json!([{"role": "user", "content": "x"}]), None, false, &Map::new()).unwrap(), "ok");
    match t.render(&json!([{"role": "system", "content": "x"}]), None, false, &Map::new()) {
        Err(Error::Template(msg)) => assert!(msg.contains("first message must be user"), "{msg}"),
        other => panic!("expected Error::Template, got {:?}", other.map(|_| ())),
    }
    assert!(matches!(ChatTemplate::new("{% if %}", None, None), Err(Error::Template(_))));
}

/// Qwen3's real template against transformers' apply_chat_template (tools/chat_template_reference.py).
#[test]
fn qwen3_template_matches_transformers() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!("{dir}/qwen3_tokenizer_config.json")).unwrap()).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!("{dir}/qwen3_reference.json")).unwrap()).unwrap();
    let t = ChatTemplate::new(cfg["chat_template"].as_str().unwrap(), None, cfg["eos_token"].as_str()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 7);
    for case in cases {
        let tools = case["tools"].as_array().map(|_| &case["tools"]);
        let extra = case["chat_template_kwargs"].as_object().unwrap();
        let out = t.render(&case["messages"], tools, case["add_generation_prompt"].as_bool().unwrap(), extra).unwrap();
        assert_eq!(out, case["expected"].as_str().unwrap(), "case {}", case["name"]);
    }
}

/// `continue_final_message`: the chat rendered without a generation prompt, cut after the last
/// message's text (as transformers cuts it: the stripped text's last occurrence), so that the
/// end-of-turn tokens go and the model continues the message; a list of parts continues its
/// last text; a final message the rendering lacks, or an empty one, is an error.
#[test]
fn continue_final_message_cuts_after_the_final_text() {
    use peregrine_model::chat_template::continue_final_message;
    let t = ChatTemplate::new(CHATML, None, Some("<|im_end|>")).unwrap();
    let msgs = json!([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is "}]);
    let rendered = t.render(&msgs, None, false, &Map::new()).unwrap();
    let cut = continue_final_message(&rendered, &msgs).unwrap();
    assert!(cut.ends_with("<|im_start|>assistant\nThe answer is") && rendered.starts_with(&cut), "{cut:?}");
    // The same text earlier in the chat: the last occurrence is the final message's.
    let msgs = json!([{"role": "user", "content": "Say yes"}, {"role": "assistant", "content": "yes"}, {"role": "user", "content": "again"}, {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}]);
    let parts_template = ChatTemplate::new("{% for m in messages %}<{{ m.role }}>{% if m.content is string %}{{ m.content }}{% else %}{{ m.content[0].text }}{% endif %}</{{ m.role }}>{% endfor %}", None, None).unwrap();
    let rendered = parts_template.render(&msgs, None, false, &Map::new()).unwrap();
    assert_eq!(continue_final_message(&rendered, &msgs).unwrap(), "<user>Say yes</user><assistant>yes</assistant><user>again</user><assistant>yes");
    for (bad, why) in [
        (json!([{"role": "assistant", "content": "  "}]), "empty"),
        (json!([{"role": "assistant", "content": [{"type": "image_url"}]}]), "no text"),
        (json!([{"role": "assistant", "content": "not rendered"}]), "does not appear"),
    ] {
        let e = continue_final_message("<assistant>something else", &bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

/// A template that loops without end (here 10^10 iterations) fails after its budget of
/// instructions instead of holding the request, while a long real conversation renders.
#[test]
fn runaway_templates_run_out_of_fuel() {
    let t = ChatTemplate::new("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}", None, None).unwrap();
    let start = std::time::Instant::now();
    match t.render(&json!([{"role": "user", "content": "Hi"}]), None, true, &Map::new()) {
        Err(Error::Template(m)) => assert!(m.contains("instructions"), "{m}"),
        other => panic!("expected the fuel error, got {other:?}"),
    }
    assert!(start.elapsed() < std::time::Duration::from_secs(30), "{:?}", start.elapsed());
    let t = ChatTemplate::new(CHATML, None, Some("<|im_end|>")).unwrap();
    let long: Vec<_> = (0..20_000).map(|i| json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": format!("turn {i}")})).collect();
    assert!(t.render(&json!(long), None, true, &Map::new()).unwrap().ends_with("<|im_start|>assistant\n"));
}
