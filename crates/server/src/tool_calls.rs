//! Tool calls in a chat completion's output: `<tool_call>` blocks, possibly several, with text
//! around them, each holding one of the two forms Qwen-family chat templates ask for: the
//! Hermes / Qwen2.5 JSON object, or the XML form of MiMo's and Qwen3-Coder's templates (SGLang's
//! and vLLM's `mimo` parser):
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! <tool_call>
//! <function=get_weather>
//! <parameter=city>
//! Paris
//! </parameter>
//! </function>
//! </tool_call>
//! ```
//!
//! XML parameter values are text; where the request's tool declares a parameter of another JSON
//! type (number, boolean, object, ...) the value is read as JSON. The parser runs on text as it
//! streams: text is released as soon as it cannot be the start of `<tool_call>`, a call whole
//! once its closing tag arrives. A block that holds no well-formed call stays text, tags
//! included, so nothing the model wrote is lost.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

pub const OPEN: &str = "<tool_call>";
pub const CLOSE: &str = "</tool_call>";

/// One parsed call: the function's name and its arguments as a JSON string (OpenAI's shape).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub name: String,
    pub arguments: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Call(ToolCall),
}

/// The JSON types each parameter of each declared tool takes (`parameters.properties.*.type`),
/// by function name, for reading XML parameter values.
#[derive(Debug, Default)]
pub struct ToolSchemas(HashMap<String, HashMap<String, Vec<String>>>);

impl ToolSchemas {
    /// From the request's `tools` (already validated: a list of function tools).
    pub fn from_tools(tools: Option<&Value>) -> ToolSchemas {
        let mut by_name = HashMap::new();
        for t in tools.and_then(Value::as_array).into_iter().flatten() {
            let f = &t["function"];
            let Some(name) = f["name"].as_str() else { continue };
            let mut params = HashMap::new();
            for (key, schema) in f["parameters"]["properties"].as_object().into_iter().flatten() {
                let types = match &schema["type"] {
                    Value::String(t) => vec![t.clone()],
                    Value::Array(list) => list.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
                    _ => Vec::new(),
                };
                params.insert(key.clone(), types);
            }
            by_name.insert(name.to_owned(), params);
        }
        ToolSchemas(by_name)
    }

    /// An XML parameter's text as the JSON value its declared type asks for. Text stays text
    /// where the parameter is a string, is not declared, or does not read as its type.
    fn value(&self, function: &str, key: &str, text: &str) -> Value {
        let types = self.0.get(function).and_then(|p| p.get(key));
        let Some(types) = types.filter(|t| !t.is_empty() && !t.iter().any(|t| t == "string")) else {
            return Value::String(text.to_owned());
        };
        let t = text.trim();
        let lowered = t.to_ascii_lowercase();
        let t = if types.iter().any(|t| t == "boolean") && (lowered == "true" || lowered == "false") { lowered.as_str() } else { t };
        serde_json::from_str(t).unwrap_or_else(|_| Value::String(text.to_owned()))
    }
}

/// Streaming parser of one choice's output.
#[derive(Debug, Default)]
pub struct ToolCallParser {
    schemas: Arc<ToolSchemas>,
    /// Text not yet released: a possible start of `<tool_call>`, or a call's body so far.
    buf: String,
    in_call: bool,
    calls: usize,
}

impl ToolCallParser {
    pub fn new(schemas: Arc<ToolSchemas>) -> ToolCallParser {
        ToolCallParser { schemas, ..ToolCallParser::default() }
    }

    /// Feeds the next piece of output; returns what can be released now.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.buf.find(CLOSE) else { break };
                let body = &self.buf[..end];
                match parse_block(body, &self.schemas) {
                    Some(calls) => {
                        self.calls += calls.len();
                        out.extend(calls.into_iter().map(Piece::Call));
                    }
                    None => push_piece(&mut out, Piece::Text(format!("{OPEN}{body}{CLOSE}"))),
                }
                self.buf.drain(..end + CLOSE.len());
                self.in_call = false;
            } else if let Some(start) = self.buf.find(OPEN) {
                push_piece(&mut out, Piece::Text(self.buf[..start].to_owned()));
                self.buf.drain(..start + OPEN.len());
                self.in_call = true;
            } else {
                // Hold back only a tail that could still grow into the opening tag (ASCII, so
                // the cut is a char boundary).
                let keep = partial_tag_len(&self.buf, OPEN);
                let release = self.buf.len() - keep;
                push_piece(&mut out, Piece::Text(self.buf[..release].to_owned()));
                self.buf.drain(..release);
                break;
            }
        }
        out
    }

    /// The end of the output: releases everything held. A call left open (the output stopped
    /// before `</tool_call>`) still counts if its body is a whole call.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        if self.in_call {
            match parse_block(&self.buf, &self.schemas) {
                Some(calls) => {
                    self.calls += calls.len();
                    out.extend(calls.into_iter().map(Piece::Call));
                }
                None => push_piece(&mut out, Piece::Text(format!("{OPEN}{}", self.buf))),
            }
            self.in_call = false;
        } else {
            push_piece(&mut out, Piece::Text(self.buf.clone()));
        }
        self.buf.clear();
        out
    }

    /// Calls released so far.
    pub fn calls(&self) -> usize {
        self.calls
    }
}

/// A whole output split into its text (None when only whitespace is left around the calls, as
/// OpenAI sends `content: null` beside tool calls) and its calls.
pub fn parse_output(text: &str, schemas: Arc<ToolSchemas>) -> (Option<String>, Vec<ToolCall>) {
    let mut p = ToolCallParser::new(schemas);
    let mut pieces = p.push(text);
    pieces.extend(p.finish());
    let mut content = String::new();
    let mut calls = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => content.push_str(&t),
            Piece::Call(c) => calls.push(c),
        }
    }
    let content = if !calls.is_empty() && content.trim().is_empty() { None } else { Some(content) };
    (content, calls)
}

/// Appends a piece, merging neighbouring text and dropping empty text.
fn push_piece(out: &mut Vec<Piece>, piece: Piece) {
    match (out.last_mut(), piece) {
        (_, Piece::Text(t)) if t.is_empty() => {}
        (Some(Piece::Text(prev)), Piece::Text(t)) => prev.push_str(&t),
        (_, p) => out.push(p),
    }
}

/// The length of the longest tail of `s` that is a proper prefix of `tag` (an ASCII tag, so the
/// cut before that tail is a char boundary). Also the reasoning parser's.
pub(crate) fn partial_tag_len(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1)).rev().find(|&n| s.ends_with(&tag[..n])).unwrap_or(0)
}

/// A block's calls: one JSON call, or one or more XML functions. None: not well formed.
fn parse_block(body: &str, schemas: &ToolSchemas) -> Option<Vec<ToolCall>> {
    let body = body.trim();
    if body.starts_with("<function=") {
        parse_xml_functions(body, schemas)
    } else {
        parse_json_call(body).map(|c| vec![c])
    }
}

/// `<function=NAME>` parameters `</function>`, one or more (the last may be left unclosed).
fn parse_xml_functions(body: &str, schemas: &ToolSchemas) -> Option<Vec<ToolCall>> {
    let mut calls = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        rest = rest.strip_prefix("<function=")?;
        let (name, after) = rest.split_once('>')?;
        let name = name.trim();
        if name.is_empty() {
            return None;
        }
        let (inner, after) = after.split_once("</function>").unwrap_or((after, ""));
        let arguments = parse_xml_parameters(inner, name, schemas)?;
        calls.push(ToolCall { name: name.to_owned(), arguments });
        rest = after.trim_start();
    }
    Some(calls)
}

/// `<parameter=KEY>VALUE</parameter>` pairs -> the arguments object, in the order written. A
/// value's one wrapping newline on each side is the form's, not the value's.
fn parse_xml_parameters(inner: &str, function: &str, schemas: &ToolSchemas) -> Option<String> {
    let mut args = Map::new();
    let mut rest = inner.trim();
    while !rest.is_empty() {
        rest = rest.strip_prefix("<parameter=")?;
        let (key, after) = rest.split_once('>')?;
        let key = key.trim();
        if key.is_empty() {
            return None;
        }
        // A value ends at its closing tag, or (left unclosed) where the next parameter starts.
        let end = after.find("</parameter>").unwrap_or(after.len()).min(after.find("<parameter=").unwrap_or(after.len()));
        let raw = &after[..end];
        let raw = raw.strip_prefix('\n').unwrap_or(raw);
        let raw = raw.strip_suffix('\n').unwrap_or(raw);
        args.insert(key.to_owned(), schemas.value(function, key, raw));
        let after = &after[end..];
        rest = after.strip_prefix("</parameter>").unwrap_or(after).trim_start();
    }
    Some(Value::Object(args).to_string())
}

/// `{"name": "...", "arguments": ...}` (or `parameters`) -> a call. Arguments given as an
/// object are serialised; given as a string they are kept as written; absent they are `{}`.
fn parse_json_call(body: &str) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(body.trim()).ok()?;
    let obj = v.as_object()?;
    let name = obj.get("name")?.as_str()?.trim();
    if name.is_empty() {
        return None;
    }
    let arguments = match obj.get("arguments").or_else(|| obj.get("parameters")) {
        None | Some(Value::Null) => "{}".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(a) => a.to_string(),
    };
    Some(ToolCall { name: name.to_owned(), arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> Piece {
        Piece::Call(ToolCall { name: name.into(), arguments: arguments.into() })
    }

    fn text(t: &str) -> Piece {
        Piece::Text(t.into())
    }

    fn no_schemas() -> Arc<ToolSchemas> {
        Arc::new(ToolSchemas::default())
    }

    /// Feeds `parts` one by one and gathers every released piece, merged.
    fn stream(parts: &[&str]) -> (Vec<Piece>, usize) {
        let mut p = ToolCallParser::default();
        let mut all = Vec::new();
        for part in parts {
            for piece in p.push(part) {
                push_piece(&mut all, piece);
            }
        }
        for piece in p.finish() {
            push_piece(&mut all, piece);
        }
        (all, p.calls())
    }

    #[test]
    fn a_whole_output_splits_into_text_and_calls() {
        let out = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"now\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = parse_output(out, no_schemas());
        assert_eq!(content.as_deref(), Some("Let me check.\n\n"));
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert_eq!(args, serde_json::json!({"city": "Paris"}));
        assert_eq!(calls[1], ToolCall { name: "now".into(), arguments: "{}".into() });
    }

    #[test]
    fn only_calls_give_null_content_and_plain_text_stays_text() {
        let (content, calls) = parse_output("<tool_call>{\"name\":\"f\",\"arguments\":\"{\\\"x\\\": 1}\"}</tool_call>\n", no_schemas());
        assert_eq!(content, None);
        assert_eq!(calls, vec![ToolCall { name: "f".into(), arguments: "{\"x\": 1}".into() }]);
        let (content, calls) = parse_output("no calls here, just < and <tool text", no_schemas());
        assert_eq!(content.as_deref(), Some("no calls here, just < and <tool text"));
        assert!(calls.is_empty());
    }

    #[test]
    fn a_block_that_is_not_a_call_stays_text_with_its_tags() {
        for body in ["not json", "[1, 2]", "{\"arguments\": {}}", "{\"name\": \"  \"}", "{\"name\": 3}"] {
            let out = format!("a{OPEN}{body}{CLOSE}b");
            let (content, calls) = parse_output(&out, no_schemas());
            assert!(calls.is_empty(), "{body}");
            assert_eq!(content.as_deref(), Some(out.as_str()), "{body}");
        }
    }

    #[test]
    fn streaming_in_any_cut_gives_the_whole_parse() {
        let out = "Sure <tool_call>\n{\"name\": \"a\", \"arguments\": {\"q\": \"<tool_call>?\"}}\n</tool_call> then <tool_ok>";
        let (whole, n) = stream(&[out]);
        assert_eq!(n, 1);
        assert_eq!(whole, vec![text("Sure "), call("a", "{\"q\":\"<tool_call>?\"}"), text(" then <tool_ok>")]);
        // Every way of cutting the output in two, and one character at a time.
        for cut in (1..out.len()).filter(|&i| out.is_char_boundary(i)) {
            assert_eq!(stream(&[&out[..cut], &out[cut..]]).0, whole, "cut at {cut}");
        }
        let chars: Vec<String> = out.chars().map(String::from).collect();
        let parts: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(stream(&parts).0, whole);
    }

    #[test]
    fn text_is_released_as_soon_as_it_cannot_open_a_call() {
        let mut p = ToolCallParser::default();
        assert_eq!(p.push("hello <tool"), vec![text("hello ")]);
        assert_eq!(p.push("s>"), vec![text("<tools>")]);
        assert_eq!(p.push("<tool_call>{\"name\": \"f\"}"), vec![]);
        assert_eq!(p.push("</tool_call>"), vec![call("f", "{}")]);
        assert_eq!(p.push("ünï <"), vec![text("ünï ")]);
        assert_eq!(p.finish(), vec![text("<")]);
        assert_eq!(p.calls(), 1);
    }

    fn weather_schemas() -> Arc<ToolSchemas> {
        let tools = serde_json::json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
            "tags": {"type": "array"}, "zip": {"type": ["string", "null"]}, "lat": {"type": "number"}}}}}]);
        Arc::new(ToolSchemas::from_tools(Some(&tools)))
    }

    #[test]
    fn xml_calls_read_each_value_as_its_declared_type() {
        let out = "Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n\
                   <parameter=metric>\nTrue\n</parameter>\n<parameter=tags>\n[\"a\", \"b\"]\n</parameter>\n<parameter=zip>\n75001\n</parameter>\n\
                   <parameter=note>\ntwo\nlines\n\n</parameter>\n<parameter=lat>\nnorth\n</parameter>\n</function>\n</tool_call>";
        let (content, calls) = parse_output(out, weather_schemas());
        assert_eq!(content.as_deref(), Some("Checking.\n"));
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "get_weather");
        // In the order written; a string stays a string even where it reads as a number; an
        // undeclared parameter is text, its inner newlines kept; a value that does not read as
        // its type stays text.
        assert_eq!(
            calls[0].arguments,
            r#"{"city":"Paris","days":3,"metric":true,"tags":["a","b"],"zip":"75001","note":"two\nlines\n","lat":"north"}"#
        );
        // Without the declarations every value is text.
        let (_, calls) = parse_output(out, no_schemas());
        let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert_eq!(args["days"], "3");
        assert_eq!(args["metric"], "True");
    }

    #[test]
    fn xml_blocks_with_several_functions_or_loose_tags() {
        let s = no_schemas();
        let (_, calls) = parse_output("<tool_call><function=a><parameter=x>1</parameter></function><function=b></function></tool_call>", s.clone());
        assert_eq!(calls, vec![ToolCall { name: "a".into(), arguments: r#"{"x":"1"}"#.into() }, ToolCall { name: "b".into(), arguments: "{}".into() }]);
        // A parameter left unclosed ends where the next begins; the function may be unclosed too
        // (the block's trailing whitespace is the form's).
        let (_, calls) = parse_output("<tool_call>\n<function=f>\n<parameter=a>x<parameter=b>\ny\n\n</tool_call>", s.clone());
        assert_eq!(calls, vec![ToolCall { name: "f".into(), arguments: r#"{"a":"x","b":"y"}"#.into() }]);
        for bad in ["<function=>x</function>", "<function=f><bogus>1</bogus></function>", "<function=f", "<function=f></function> trailing"] {
            let out = format!("{OPEN}{bad}{CLOSE}");
            let (content, calls) = parse_output(&out, s.clone());
            assert!(calls.is_empty(), "{bad}");
            assert_eq!(content.as_deref(), Some(out.as_str()));
        }
    }

    #[test]
    fn xml_calls_stream_in_any_cut() {
        let out = "a<tool_call>\n<function=get_weather>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>b";
        let whole = {
            let mut p = ToolCallParser::new(weather_schemas());
            let mut all = p.push(out);
            all.extend(p.finish());
            all
        };
        assert_eq!(whole, vec![text("a"), call("get_weather", r#"{"days":2}"#), text("b")]);
        for cut in 1..out.len() {
            let mut p = ToolCallParser::new(weather_schemas());
            let mut all = Vec::new();
            for piece in p.push(&out[..cut]).into_iter().chain(p.push(&out[cut..])).chain(p.finish()) {
                push_piece(&mut all, piece);
            }
            assert_eq!(all, whole, "cut at {cut}");
        }
    }

    #[test]
    fn an_unclosed_call_counts_only_when_its_body_is_whole() {
        let (pieces, n) = stream(&["x<tool_call>{\"name\": \"f\", \"arguments\": {\"a\": [1]}}"]);
        assert_eq!(n, 1);
        assert_eq!(pieces, vec![text("x"), call("f", "{\"a\":[1]}")]);
        let (pieces, n) = stream(&["x<tool_call>{\"name\": \"f\", \"argu"]);
        assert_eq!(n, 0);
        assert_eq!(pieces, vec![text("x<tool_call>{\"name\": \"f\", \"argu")]);
    }
}
