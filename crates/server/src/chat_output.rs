//! A chat choice's output in OpenAI's message fields: the reasoning split off first
//! (`reasoning_content`), then tool calls parsed out of the answer (`tool_calls`), the rest
//! `content`. Streamed, as delta objects; whole, as one message.

use std::sync::Arc;

use peregrine_engine::FinishReason;
use serde_json::{json, Value};

use crate::protocol::Forced;
use crate::reasoning::{self, Part, ReasoningParser};
use crate::tool_calls::{self, Piece, ToolCall, ToolCallParser, ToolSchemas};

/// What a request's chat outputs are parsed for.
#[derive(Debug, Clone, Default)]
pub struct OutputParsing {
    /// Reasoning split off; `Some(true)` where the prompt left a `<think>` block open.
    pub reasoning: Option<bool>,
    /// The reasoning split off is left out of the reply (`include_reasoning: false`).
    pub hide_reasoning: bool,
    /// Tool calls parsed out, with the tools' parameter types.
    pub tools: Option<Arc<ToolSchemas>>,
    /// A forced call: the answer is its JSON (held to it by the request's guide).
    pub forced: Option<Forced>,
    /// `parallel_tool_calls: false`: the first call is kept, any later one dropped (as vLLM
    /// does; a forced `required` list is held to one item by its guide already).
    pub one_call: bool,
}

impl OutputParsing {
    pub fn any(&self) -> bool {
        self.reasoning.is_some() || self.tools.is_some() || self.forced.is_some()
    }

    /// A whole output as the assistant message, and how many tool calls it holds.
    pub fn message(&self, text: &str) -> (Value, usize) {
        let (reasoning, answer) = match self.reasoning {
            Some(opened) => reasoning::split_output(text, opened),
            None => (None, text.to_owned()),
        };
        let (content, calls) = match (&self.forced, &self.tools) {
            // A cut call's JSON (`length`) stays content: nothing is lost.
            (Some(f), _) => match forced_reply(f, &answer) {
                Some((thinking, calls)) => (thinking, calls),
                None => (Some(answer), Vec::new()),
            },
            (None, Some(schemas)) => tool_calls::parse_output(&answer, schemas.clone()),
            (None, None) => (Some(answer), Vec::new()),
        };
        let mut calls = calls;
        if self.one_call {
            calls.truncate(1);
        }
        let mut message = json!({"role": "assistant", "content": content});
        if let Some(r) = reasoning.filter(|_| !self.hide_reasoning) {
            message["reasoning_content"] = json!(r);
        }
        if !calls.is_empty() {
            message["tool_calls"] = calls.iter().map(|c| tool_call_json(c, None)).collect();
        }
        (message, calls.len())
    }

    /// A choice's finish reason: `tool_calls` where the model stopped after calling tools it
    /// chose to call (`auto`, `required`); a named `tool_choice` ends as `stop`, as OpenAI's and
    /// vLLM's do, since the caller asked for that call.
    pub fn finish_reason(&self, f: FinishReason, calls: usize) -> &'static str {
        if calls > 0 && f == FinishReason::Stop && !matches!(self.forced, Some(Forced::Named(_))) {
            "tool_calls"
        } else {
            f.as_str()
        }
    }

    /// The streaming parser of one choice.
    pub fn stream(&self) -> ChoiceStream {
        ChoiceStream {
            reasoning: self.reasoning.map(ReasoningParser::new),
            tools: self.tools.clone().map(ToolCallParser::new),
            forced: self.forced.clone().map(|f| (f, String::new())),
            forced_calls: 0,
            one_call: self.one_call,
            hide_reasoning: self.hide_reasoning,
        }
    }
}

/// A forced call's answer read back: the named function's arguments object, or `required`'s
/// list of `{"name", "parameters"}`; None where it is not whole (cut by `max_tokens`).
fn forced_calls(forced: &Forced, answer: &str) -> Option<Vec<ToolCall>> {
    let v: Value = serde_json::from_str(answer.trim()).ok()?;
    match forced {
        Forced::Named(name) => v.is_object().then(|| vec![ToolCall { name: name.clone(), arguments: v.to_string() }]),
        Forced::Required => v
            .as_array()
            .filter(|calls| !calls.is_empty())?
            .iter()
            .map(|c| Some(ToolCall { name: c.get("name")?.as_str()?.to_owned(), arguments: c.get("parameters").filter(|p| p.is_object())?.to_string() }))
            .collect(),
    }
}

/// A forced reply read back: its calls, and the thinking before them where the prompt opened a
/// thinking block and the reasoning parser is off (the engine lets the model think before the
/// calls' JSON whatever the server's parsers; with the parser on the thinking is split off
/// before this). The thinking stays content, as everything does with the parser off.
fn forced_reply(forced: &Forced, answer: &str) -> Option<(Option<String>, Vec<ToolCall>)> {
    if let Some(calls) = forced_calls(forced, answer) {
        return Some((None, calls));
    }
    let end = answer.rfind("</think>")? + "</think>".len();
    let calls = forced_calls(forced, &answer[end..])?;
    Some((Some(answer[..end].to_owned()), calls))
}

/// OpenAI's tool call object (`index` only in stream deltas), with a fresh id.
pub fn tool_call_json(call: &ToolCall, index: Option<usize>) -> Value {
    let mut v = json!({"id": format!("call_{:024x}", rand::random::<u128>() >> 32), "type": "function",
                       "function": {"name": call.name, "arguments": call.arguments}});
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

/// One streamed choice's parsers.
#[derive(Debug)]
pub struct ChoiceStream {
    reasoning: Option<ReasoningParser>,
    tools: Option<ToolCallParser>,
    /// A forced call and its answer so far: released as calls when the output ends.
    forced: Option<(Forced, String)>,
    forced_calls: usize,
    one_call: bool,
    hide_reasoning: bool,
}

impl ChoiceStream {
    /// The chat deltas the next piece of output releases (`None`: the output ended).
    pub fn deltas(&mut self, text: Option<&str>) -> Vec<Value> {
        let parts = match (&mut self.reasoning, text) {
            (Some(r), Some(t)) => r.push(t),
            (Some(r), None) => r.finish(),
            (None, Some(t)) => vec![Part::Content(t.to_owned())],
            (None, None) => Vec::new(),
        };
        let mut out = Vec::new();
        for part in parts {
            match part {
                Part::Reasoning(_) if self.hide_reasoning => {}
                Part::Reasoning(t) => out.push(json!({"reasoning_content": t})),
                Part::Content(t) => self.answer_deltas(Some(&t), &mut out),
            }
        }
        if text.is_none() {
            self.answer_deltas(None, &mut out);
        }
        out
    }

    /// Tool calls released so far.
    pub fn calls(&self) -> usize {
        self.tools.as_ref().map_or(0, ToolCallParser::calls) + self.forced_calls
    }

    fn answer_deltas(&mut self, text: Option<&str>, out: &mut Vec<Value>) {
        if let Some((forced, answer)) = &mut self.forced {
            match text {
                Some(t) => answer.push_str(t),
                None => match forced_reply(forced, answer) {
                    Some((thinking, mut calls)) => {
                        if let Some(t) = thinking {
                            out.push(json!({"content": t}));
                        }
                        if self.one_call {
                            calls.truncate(1);
                        }
                        self.forced_calls = calls.len();
                        out.extend(calls.iter().enumerate().map(|(i, c)| json!({"tool_calls": [tool_call_json(c, Some(i))]})));
                    }
                    None if !answer.is_empty() => out.push(json!({"content": std::mem::take(answer)})),
                    None => {}
                },
            }
            return;
        }
        let Some(tp) = &mut self.tools else {
            if let Some(t) = text {
                out.push(json!({"content": t}));
            }
            return;
        };
        let mut index = tp.calls();
        let pieces = match text {
            Some(t) => tp.push(t),
            None => tp.finish(),
        };
        for piece in pieces {
            match piece {
                Piece::Text(t) => out.push(json!({"content": t})),
                Piece::Call(_) if self.one_call && index > 0 => {}
                Piece::Call(c) => {
                    out.push(json!({"tool_calls": [tool_call_json(&c, Some(index))]}));
                    index += 1;
                }
            }
        }
    }
}
