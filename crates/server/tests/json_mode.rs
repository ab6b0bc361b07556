//! JSON mode over HTTP (`response_format: {"type": "json_object"}`) on the CPU reference backend
//! and the golden fixture model (random weights, so only the constraint makes its output JSON):
//! a finished output is a JSON object and ends where the object closes; a cut one is a prefix
//! of one; streamed the same; with speculation on too. Schemas (`json_schema`) likewise: a
//! finished output is a value of the schema.

mod common;

use common::Server;
use peregrine_engine::json_mode::JsonState;
use serde_json::{json, Value};

/// The token id of `text` (one token) in the served model's vocabulary.
async fn token(s: &Server, text: &str) -> u64 {
    let (status, r) = s.post("/tokenize", json!({"prompt": text, "add_special_tokens": false})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["count"], 1, "{text:?} is not one token: {r}");
    r["tokens"][0].as_u64().unwrap()
}

/// Whether `text` is a prefix of a JSON object (the automaton's own unit tests check it
/// against serde_json).
fn json_prefix(text: &str) -> bool {
    let mut st = JsonState::default();
    text.bytes().all(|b| st.push(b))
}

/// A streamed chat request's content deltas, joined.
async fn streamed_content(s: &Server, body: Value) -> String {
    let chunks = s.stream("/v1/chat/completions", body).await;
    chunks
        .iter()
        .filter(|c| *c != "[DONE]")
        .filter_map(|c| serde_json::from_str::<Value>(c).ok()?["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect()
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": "Describe a cat as JSON."}], "response_format": {"type": "json_object"}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn outputs_are_json_objects_that_end_where_they_close() {
    let s = Server::start(&["--max-model-len", "512"]).await;
    // Greedy, with the quote and the closing brace pushed up: the object closes within a few
    // tokens, and the output ends right there (no EOS needed; finish_reason stop).
    let quote = token(&s, "\"").await;
    let close = token(&s, "}").await;
    let bias = json!({quote.to_string(): 100, close.to_string(): 50});
    let (status, v) = s.post("/v1/chat/completions", chat(json!({"temperature": 0, "max_tokens": 100, "logit_bias": bias}))).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let obj: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(obj.is_object() && text.trim_start().starts_with('{') && text.ends_with('}'), "{text:?}");
    // Streamed: the same text.
    let mut body = chat(json!({"temperature": 0, "max_tokens": 100, "logit_bias": bias, "stream": true}));
    body["stream"] = json!(true);
    assert_eq!(streamed_content(&s, body).await, text);

    // Sampled, 6 seeds, both routes: every output is a JSON object prefix, whole where it stopped.
    let mut whole = 0;
    for seed in 0..6 {
        let (status, v) = s.post("/v1/chat/completions", chat(json!({"temperature": 1.0, "seed": seed, "max_tokens": 48}))).await;
        assert_eq!(status, 200, "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(json_prefix(text), "seed {seed}: {text:?} is not a JSON object's prefix");
        match v["choices"][0]["finish_reason"].as_str().unwrap() {
            "stop" => {
                assert!(serde_json::from_str::<Value>(text).is_ok_and(|o| o.is_object()), "seed {seed}: {text:?}");
                whole += 1;
            }
            "length" => assert_eq!(v["usage"]["completion_tokens"], 48, "{v}"),
            other => panic!("finish_reason {other}: {v}"),
        }
        let (status, v) = s
            .post("/v1/completions", json!({"prompt": "x = ", "temperature": 1.0, "seed": seed, "max_tokens": 48, "response_format": {"type": "json_object"}}))
            .await;
        assert_eq!(status, 200, "{v}");
        assert!(json_prefix(v["choices"][0]["text"].as_str().unwrap()), "{v}");
    }
    eprintln!("{whole} of 6 sampled outputs closed within 48 tokens");
}

#[tokio::test]
async fn json_mode_and_schemas_with_speculation() {
    // The demo model with its DFlash drafter: JSON-mode requests decode without drafts, beside
    // requests that speculate.
    let s = Server::start_embedded(&["--max-model-len", "512"]).await;
    let (status, v) = s.post("/v1/chat/completions", chat(json!({"temperature": 0.7, "seed": 1, "max_tokens": 40}))).await;
    assert_eq!(status, 200, "{v}");
    assert!(json_prefix(v["choices"][0]["message"]["content"].as_str().unwrap()), "{v}");
    let plain = json!({"prompt": "def f(x):\n", "temperature": 0, "max_tokens": 24});
    let (status, alone) = s.post("/v1/completions", plain.clone()).await;
    assert_eq!(status, 200, "{alone}");
    // Both at once, so they share steps: the plain request's greedy text is what it was alone
    // (its drafts verified beside a sequence that has none), and the JSON one still an object's.
    let json_req = chat(json!({"temperature": 0, "max_tokens": 40}));
    let ((st1, together), (st2, j)) = tokio::join!(s.post("/v1/completions", plain), s.post("/v1/chat/completions", json_req));
    assert_eq!((st1, st2), (200, 200), "{together} {j}");
    assert_eq!(together["choices"][0]["text"], alone["choices"][0]["text"]);
    assert!(json_prefix(j["choices"][0]["message"]["content"].as_str().unwrap()), "{j}");
    // A schema on the same server: a value of it, the drafter idle for that sequence too.
    let schema = json!({"type": "json_schema", "json_schema": {"name": "flag", "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}}});
    // Its value is at most ~10 tokens and 5 gaps of 24 whitespace bytes: it closes within 200.
    let (status, v) = s.post("/v1/chat/completions", chat(json!({"temperature": 0.7, "seed": 1, "max_tokens": 200, "response_format": schema}))).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let o: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    assert!(o["ok"].is_boolean() && o.as_object().unwrap().len() == 1, "{text:?}");
}

/// The schema the golden model's outputs are held to: every kind of constraint the outputs are
/// checked for below.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 5},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pet": {"enum": ["cat", "dog", null]},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "maxItems": 2}
        },
        "required": ["name", "age", "pet", "tags"],
        "additionalProperties": false,
        "$defs": {"tag": {"type": "boolean"}}
    })
}

/// Whether `text` is a whole value of `person_schema`, and why not.
fn check_person(text: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let o = v.as_object().ok_or("not an object")?;
    let ok = o.len() == 4
        && o["name"].as_str().is_some_and(|n| n.chars().count() <= 5)
        && o["age"].as_i64().is_some_and(|a| (0..=120).contains(&a))
        && [json!("cat"), json!("dog"), Value::Null].contains(&o["pet"])
        && o["tags"].as_array().is_some_and(|t| t.len() <= 2 && t.iter().all(Value::is_boolean));
    if ok { Ok(()) } else { Err("a field outside the schema".into()) }
}

#[tokio::test]
async fn json_schema_outputs_are_values_of_the_schema() {
    // The golden fixture model's random weights: only the constraint makes the output fit.
    let s = Server::start(&["--max-model-len", "512"]).await;
    let format = json!({"type": "json_schema", "json_schema": {"name": "person", "schema": person_schema(), "strict": true}});
    let mut whole = 0;
    for seed in 0..6 {
        let body = chat(json!({"temperature": 1.0, "seed": seed, "max_tokens": 160, "response_format": format}));
        let (status, v) = s.post("/v1/chat/completions", body.clone()).await;
        assert_eq!(status, 200, "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
        match v["choices"][0]["finish_reason"].as_str().unwrap() {
            "stop" => {
                check_person(&text).unwrap_or_else(|e| panic!("seed {seed}: {text:?}: {e}"));
                whole += 1;
            }
            "length" => assert_eq!(v["usage"]["completion_tokens"], 160, "{v}"),
            other => panic!("finish_reason {other}: {v}"),
        }
        if seed == 0 {
            // Streamed: the same text.
            let mut body = body;
            body["stream"] = json!(true);
            assert_eq!(streamed_content(&s, body).await, text);
        }
        // The completions route takes the same `response_format`.
        let (status, v) = s
            .post("/v1/completions", json!({"prompt": "x = ", "temperature": 1.0, "seed": seed, "max_tokens": 160, "response_format": format}))
            .await;
        assert_eq!(status, 200, "{v}");
        if v["choices"][0]["finish_reason"] == "stop" {
            check_person(v["choices"][0]["text"].as_str().unwrap()).unwrap_or_else(|e| panic!("completions seed {seed}: {v}: {e}"));
            whole += 1;
        }
    }
    eprintln!("{whole} of 12 schema outputs closed within 160 tokens");
    // Random weights spend tokens on whitespace (at most 24 bytes a gap) and strings; most close.
    assert!(whole >= 6, "only {whole} of 12 outputs closed within 160 tokens");

    // Schemas that cannot be used, and malformed `json_schema` objects: 400s that say why.
    let cases = [
        (json!({"type": "json_schema"}), "needs a `json_schema` object"),
        (json!({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}), "name"),
        (json!({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}), "must be a JSON Schema object"),
        (json!({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes", "schema": {}}}), "strict"),
        (json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}), "cannot be used"),
        (json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}), "cannot be used"),
    ];
    for (format, words) in cases {
        let (status, v) = s.post("/v1/chat/completions", chat(json!({"max_tokens": 8, "response_format": format}))).await;
        assert_eq!(status, 400, "{format}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(words), "{format}: {v}");
    }
    // The server still serves after them.
    let (status, v) = s.post("/v1/chat/completions", chat(json!({"max_tokens": 4, "response_format": {"type": "json_schema", "json_schema": {"name": "any"}}}))).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn vllm_guided_fields_hold_the_output() {
    let s = Server::start(&["--max-model-len", "512"]).await;
    let ask = |extra: Value| {
        let mut body = json!({"prompt": "answer: ", "temperature": 1.0, "max_tokens": 40});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    for seed in 0..4 {
        // A choice: exactly one of the strings, and the output ends there.
        let (status, v) = s.post("/v1/completions", ask(json!({"seed": seed, "guided_choice": ["cat", "dog (big)", "a|b"]}))).await;
        assert_eq!(status, 200, "{v}");
        assert!(["cat", "dog (big)", "a|b"].contains(&v["choices"][0]["text"].as_str().unwrap()), "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        // A regex of fixed length: a whole match, then stop.
        let (status, v) = s.post("/v1/completions", ask(json!({"seed": seed, "guided_regex": "[0-9]{3}-[a-c]{2}"}))).await;
        assert_eq!(status, 200, "{v}");
        let t = v["choices"][0]["text"].as_str().unwrap().as_bytes();
        assert!(t.len() == 6 && t[..3].iter().all(u8::is_ascii_digit) && t[3] == b'-' && t[4..].iter().all(|b| (b'a'..=b'c').contains(b)), "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        // `guided_json` as the schema's JSON text, and `structured_outputs`' form.
        let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false});
        for mut extra in [json!({"guided_json": schema.to_string()}), json!({"structured_outputs": {"json": schema}})] {
            // chat() asks for JSON mode; these requests take the guide instead.
            // At most ~10 tokens and 5 whitespace gaps of 24 bytes: whole within 200 tokens.
            (extra["seed"], extra["temperature"], extra["max_tokens"], extra["response_format"]) = (json!(seed), json!(1.0), json!(200), Value::Null);
            let (status, v) = s.post("/v1/chat/completions", chat(extra.clone())).await;
            assert_eq!(status, 200, "{extra}: {v}");
            let text = v["choices"][0]["message"]["content"].as_str().unwrap();
            assert_eq!(v["choices"][0]["finish_reason"], "stop", "{extra}: {v}");
            let o: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{extra}: {text:?}: {e}"));
            assert!(o["ok"].is_boolean() && o.as_object().unwrap().len() == 1, "{extra}: {text:?}");
        }
        // vLLM's `disable_any_whitespace`: compact JSON, not one byte of whitespace outside strings.
        let compact = json!({"json": {"type": "array", "items": {"type": "integer"}, "maxItems": 4}, "disable_any_whitespace": true});
        let (status, v) = s.post("/v1/completions", ask(json!({"seed": seed, "max_tokens": 60, "structured_outputs": compact}))).await;
        assert_eq!(status, 200, "{v}");
        let text = v["choices"][0]["text"].as_str().unwrap();
        assert!(text.starts_with('[') && !text.bytes().any(|b| b.is_ascii_whitespace()), "{v}");
        let (status, v) = s.post("/v1/completions", ask(json!({"seed": seed, "structured_outputs": {"choice": ["yes", "no"]}}))).await;
        assert_eq!(status, 200, "{v}");
        assert!(["yes", "no"].contains(&v["choices"][0]["text"].as_str().unwrap()), "{v}");
        // A GBNF grammar (`guided_grammar`, as vLLM's clients write them): balanced parentheses
        // around an x, so not a regex; within 40 tokens unless nested 20 deep.
        let gbnf = "# nested\nroot ::= \"(\" root \")\" | x\nx ::= [xX]\n";
        let (status, v) = s.post("/v1/completions", ask(json!({"seed": seed, "guided_grammar": gbnf}))).await;
        assert_eq!(status, 200, "{v}");
        let t = v["choices"][0]["text"].as_str().unwrap();
        let n = t.bytes().take_while(|&b| b == b'(').count();
        if v["choices"][0]["finish_reason"] == "stop" {
            assert!(t.len() == 2 * n + 1 && (t.as_bytes()[n] == b'x' || t.as_bytes()[n] == b'X') && t[n + 1..].bytes().all(|b| b == b')'), "{v}");
        } else {
            assert_eq!(n, t.len(), "a cut output is open parentheses: {v}");
        }
        // Lark (`structured_outputs.grammar`): a word, a dash, digits the model may end after one.
        let lark = "start: (\"yes\" | \"no\") \"-\" NUM\nNUM: /[0-9]{1,4}/\n";
        let (status, v) = s.post("/v1/completions", ask(json!({"seed": seed, "structured_outputs": {"grammar": lark}}))).await;
        assert_eq!(status, 200, "{v}");
        let t = v["choices"][0]["text"].as_str().unwrap();
        let digits = t.strip_prefix("yes-").or_else(|| t.strip_prefix("no-")).unwrap_or_else(|| panic!("{v}"));
        assert!((1..=4).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()), "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    }
    // What cannot be honoured, or is malformed: 400s naming the field.
    let cases = [
        (json!({"guided_grammar": "root ::= word\n"}), "`word`, which is never defined"),
        (json!({"guided_grammar": "root ::= [z-a]"}), "guided_grammar` (GBNF): line 1"),
        (json!({"guided_grammar": "start: missing\n"}), "grammar cannot be used"),
        (json!({"guided_grammar": "root ::= root\n"}), "no output can match the guide"),
        (json!({"guided_grammar": 7}), "must be a grammar string"),
        (json!({"guided_grammar": "root ::= \"a\"", "guided_regex": "a"}), "not several"),
        (json!({"guided_choice": []}), "guided_choice"),
        (json!({"guided_choice": ["a", 1]}), "guided_choice"),
        (json!({"guided_regex": ""}), "guided_regex"),
        (json!({"guided_regex": "(unclosed"}), "regex cannot be used"),
        (json!({"guided_json": "not json"}), "guided_json"),
        (json!({"guided_json": {"type": "object"}, "guided_regex": "a"}), "not several"),
        (json!({"guided_regex": "a", "response_format": {"type": "json_object"}}), "give one"),
        (json!({"structured_outputs": {"grammar": ""}}), "must be a grammar string"),
        (json!({"structured_outputs": {"structural_tag": "{}"}}), "structured_outputs.structural_tag"),
        (json!({"structured_outputs": "json"}), "must be an object"),
        (json!({"structured_outputs": {"json": {}, "disable_any_whitespace": "yes"}}), "must be a boolean"),
    ];
    for (extra, words) in cases {
        let (status, v) = s.post("/v1/completions", ask(extra.clone())).await;
        assert_eq!(status, 400, "{extra}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains(words), "{extra}: {v}");
    }
}

/// A random JSON schema: every kind the compiler reads, a few it refuses, nested to depth 3.
fn random_schema(rng: &mut rand::rngs::StdRng, depth: usize) -> Value {
    use rand::Rng;
    let kinds = ["string", "integer", "number", "boolean", "null", "object", "array", "enum", "anyOf", "ref", "bad", "pattern"];
    let kind = kinds[rng.random_range(0..if depth < 3 { kinds.len() } else { 5 })];
    match kind {
        "object" => {
            let props: serde_json::Map<String, Value> = (0..rng.random_range(0..3)).map(|i| (format!("p{i}"), random_schema(rng, depth + 1))).collect();
            let required: Vec<&String> = props.keys().take(rng.random_range(0..=props.len())).collect();
            json!({"type": "object", "properties": props, "required": required, "additionalProperties": rng.random_bool(0.5)})
        }
        "array" => json!({"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.random_range(0..4)}),
        "enum" => {
            let lists = [json!(["a", "b\"c"]), json!([1, null]), json!([{"x": [1]}])];
            json!({"enum": lists[rng.random_range(0..3)]})
        }
        "anyOf" => json!({"anyOf": [random_schema(rng, depth + 1), random_schema(rng, depth + 1)]}),
        "ref" => {
            let to = ["#/$defs/a", "#", "http://example.com/s.json"][rng.random_range(0..3)];
            json!({"$ref": to})
        }
        "bad" => [json!({"type": 3}), json!({"type": "integer", "multipleOf": 0}), json!({"type": "string", "minLength": 5, "maxLength": 2})][rng.random_range(0..3)].clone(),
        "pattern" => {
            let p = ["^a+$", "(", "[a-", "\\d{2,1}"][rng.random_range(0..4)];
            json!({"type": "string", "pattern": p})
        }
        "integer" => json!({"type": "integer", "minimum": rng.random_range(-5..5), "maximum": rng.random_range(-5..5)}),
        k => json!({"type": k}),
    }
}

/// A random GBNF grammar: `root` and up to three more rules of strings, classes, `.`, groups,
/// repetitions and references (recursive ones, and now and then a mistake: a backwards range, a
/// rule never defined, an unclosed group).
fn random_gbnf(rng: &mut rand::rngs::StdRng) -> String {
    use rand::Rng;
    let rules = rng.random_range(1..=4);
    let name = |k: usize| if k == 0 { "root".to_string() } else { format!("r{k}") };
    let mut g = String::new();
    for k in 0..rules {
        let alts: Vec<String> = (0..rng.random_range(1..=3))
            .map(|_| {
                let items: Vec<String> = (0..rng.random_range(0..=3))
                    .map(|_| {
                        let atom = match rng.random_range(0..12) {
                            0 => "\"a\"".to_string(),
                            1 => "\"b c\"".to_string(),
                            2 => "\"\\n\"".to_string(),
                            3 => "\"é\"".to_string(),
                            4 => "[a-c]".to_string(),
                            5 => "[^x\\]]".to_string(),
                            6 => ".".to_string(),
                            7 => "(\"x\" | [0-9])".to_string(),
                            8 | 9 => name(rng.random_range(0..rules)),
                            10 => ["[z-a]", "ghost", "(\"open\""][rng.random_range(0..3)].to_string(),
                            _ => "\"\"".to_string(),
                        };
                        let rep = ["", "", "*", "+", "?", "{1,3}", "{2,}", "{,2}"][rng.random_range(0..8)];
                        atom + rep
                    })
                    .collect();
                items.join(" ")
            })
            .collect();
        g += &format!("{} ::= {}\n", name(k), alts.join(" | "));
    }
    g
}

#[tokio::test]
async fn random_guides_get_a_reply_or_a_400_and_nothing_else_breaks() {
    use rand::{Rng, SeedableRng};
    let s = Server::start(&["--max-model-len", "512"]).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut seen = std::collections::BTreeMap::new();
    for i in 0..120 {
        let schema = random_schema(&mut rng, 0);
        let (max_tokens, temperature) = ([1, 6, 24][i % 3], [0.0, 1.0][i % 2]);
        let mut body = json!({"max_tokens": max_tokens, "temperature": temperature, "seed": i, "n": 1 + i % 2});
        let regex = ["a+", "[0-9]{3}", "(", "x|", "(a|b)*c", ".{0,3}"][rng.random_range(0..6)];
        let choice = [json!(["a", "b"]), json!([""]), json!(["(", ")"]), json!(["é", "日本"])][rng.random_range(0..4)].clone();
        let (route, field) = match i % 7 {
            0 => ("/v1/chat/completions", json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})),
            1 => ("/v1/completions", json!({"guided_json": schema.to_string()})),
            2 => ("/v1/completions", json!({"guided_regex": regex})),
            3 => ("/v1/completions", json!({"guided_choice": choice})),
            4 => ("/v1/chat/completions", json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}], "tool_choice": "required"})),
            5 => ("/v1/completions", json!({"guided_grammar": random_gbnf(&mut rng)})),
            _ => ("/v1/completions", json!({"structured_outputs": {"json": schema, "disable_any_whitespace": true, "disable_additional_properties": true}})),
        };
        for (k, v) in field.as_object().unwrap() {
            body[k] = v.clone();
        }
        if route.contains("chat") {
            body["messages"] = json!([{"role": "user", "content": "hi"}]);
        } else {
            body["prompt"] = json!("x = ");
        }
        let (status, v) = s.post(route, body.clone()).await;
        assert!(status == 200 || (status == 400 && v["error"]["message"].is_string()), "{body}: {status} {v}");
        if status == 200 && i % 4 == 0 {
            // Streamed as well: every event, then the end.
            body["stream"] = json!(true);
            let chunks = s.stream(route, body.clone()).await;
            assert!(chunks.last().is_some_and(|c| c == "[DONE]") && !chunks.iter().any(|c| c.contains("\"error\"")), "{body}: {chunks:?}");
        }
        *seen.entry(status).or_insert(0) += 1;
    }
    eprintln!("random guides: replies and 400s by status {seen:?}");
    // Both kinds of answer came, and the server still serves plain requests.
    assert!(seen.len() == 2, "{seen:?}");
    let (status, v) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 2})).await;
    assert_eq!(status, 200, "{v}");
}
