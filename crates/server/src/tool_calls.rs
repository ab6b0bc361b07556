//! Tool calls in a chat completion's output, in the Hermes / Qwen form that Qwen-family chat
//! templates (MiMo's vocabulary family) ask for:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! possibly several, with text around them. The parser runs on text as it streams: text is
//! released as soon as it cannot be the start of `<tool_call>`, a call whole once its closing tag
//! arrives. A block that does not hold a JSON object with a string `name` stays text, tags
//! included, so nothing the model wrote is lost.

use serde_json::Value;

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

/// Streaming parser of one choice's output.
#[derive(Debug, Default)]
pub struct ToolCallParser {
    /// Text not yet released: a possible start of `<tool_call>`, or a call's body so far.
    buf: String,
    in_call: bool,
    calls: usize,
}

impl ToolCallParser {
    /// Feeds the next piece of output; returns what can be released now.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.in_call {
                let Some(end) = self.buf.find(CLOSE) else { break };
                let piece = self.close(end);
                self.buf.drain(..end + CLOSE.len());
                self.in_call = false;
                push_piece(&mut out, piece);
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
            let piece = match parse_call(&self.buf) {
                Some(c) => {
                    self.calls += 1;
                    Piece::Call(c)
                }
                None => Piece::Text(format!("{OPEN}{}", self.buf)),
            };
            push_piece(&mut out, piece);
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

    /// The call whose body is `buf[..end]`, or the block as text if it is not one.
    fn close(&mut self, end: usize) -> Piece {
        let body = &self.buf[..end];
        match parse_call(body) {
            Some(c) => {
                self.calls += 1;
                Piece::Call(c)
            }
            None => Piece::Text(format!("{OPEN}{body}{CLOSE}")),
        }
    }
}

/// A whole output split into its text (None when only whitespace is left around the calls, as
/// OpenAI sends `content: null` beside tool calls) and its calls.
pub fn parse_output(text: &str) -> (Option<String>, Vec<ToolCall>) {
    let mut p = ToolCallParser::default();
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

/// The length of the longest tail of `s` that is a proper prefix of `tag`.
fn partial_tag_len(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1)).rev().find(|&n| s.ends_with(&tag[..n])).unwrap_or(0)
}

/// `{"name": "...", "arguments": ...}` (or `parameters`) -> a call. Arguments given as an
/// object are serialised; given as a string they are kept as written; absent they are `{}`.
fn parse_call(body: &str) -> Option<ToolCall> {
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
        let (content, calls) = parse_output(out);
        assert_eq!(content.as_deref(), Some("Let me check.\n\n"));
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        let args: Value = serde_json::from_str(&calls[0].arguments).unwrap();
        assert_eq!(args, serde_json::json!({"city": "Paris"}));
        assert_eq!(calls[1], ToolCall { name: "now".into(), arguments: "{}".into() });
    }

    #[test]
    fn only_calls_give_null_content_and_plain_text_stays_text() {
        let (content, calls) = parse_output("<tool_call>{\"name\":\"f\",\"arguments\":\"{\\\"x\\\": 1}\"}</tool_call>\n");
        assert_eq!(content, None);
        assert_eq!(calls, vec![ToolCall { name: "f".into(), arguments: "{\"x\": 1}".into() }]);
        let (content, calls) = parse_output("no calls here, just < and <tool text");
        assert_eq!(content.as_deref(), Some("no calls here, just < and <tool text"));
        assert!(calls.is_empty());
    }

    #[test]
    fn a_block_that_is_not_a_call_stays_text_with_its_tags() {
        for body in ["not json", "[1, 2]", "{\"arguments\": {}}", "{\"name\": \"  \"}", "{\"name\": 3}"] {
            let out = format!("a{OPEN}{body}{CLOSE}b");
            let (content, calls) = parse_output(&out);
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
