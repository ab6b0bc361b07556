//! A reasoning model's thinking, split from its answer: `<think>...</think>` at the start of a
//! chat reply (or the template having opened the block at the end of the prompt, as thinking
//! modes of Qwen3-family templates do) goes to `reasoning_content`, what follows `</think>` to
//! `content` (SGLang's and vLLM's `qwen3` reasoning parser, the one MiMo's README serves with).
//! A reply that does not open with `<think>` is all content. Streams: text is released as soon
//! as it cannot be part of a tag.

use crate::tool_calls::partial_tag_len;

pub const THINK_OPEN: &str = "<think>";
pub const THINK_CLOSE: &str = "</think>";

#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Reasoning(String),
    Content(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Nothing but whitespace or a prefix of `<think>` seen yet.
    Start,
    Reasoning,
    /// Past `</think>`: its following whitespace is still being dropped.
    AfterThink,
    Content,
}

/// Streaming splitter of one choice's output.
#[derive(Debug)]
pub struct ReasoningParser {
    state: State,
    buf: String,
}

impl ReasoningParser {
    /// `opened_by_prompt`: the rendered prompt ends inside an open `<think>` block.
    pub fn new(opened_by_prompt: bool) -> ReasoningParser {
        ReasoningParser { state: if opened_by_prompt { State::Reasoning } else { State::Start }, buf: String::new() }
    }

    /// Whether a rendered prompt leaves a `<think>` block open for the reply.
    pub fn prompt_opens_thinking(prompt: &str) -> bool {
        prompt.trim_end().ends_with(THINK_OPEN)
    }

    /// Feeds the next piece of output; returns what can be released now.
    pub fn push(&mut self, text: &str) -> Vec<Part> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Start => {
                    let lead = self.buf.trim_start();
                    if let Some(rest) = lead.strip_prefix(THINK_OPEN) {
                        self.buf = rest.to_owned();
                        self.state = State::Reasoning;
                    } else if THINK_OPEN.starts_with(lead) {
                        break; // whitespace or a part of the opening tag: undecided
                    } else {
                        self.state = State::Content;
                    }
                }
                State::Reasoning => match self.buf.find(THINK_CLOSE) {
                    Some(end) => {
                        push_part(&mut out, Part::Reasoning(self.buf[..end].to_owned()));
                        self.buf.drain(..end + THINK_CLOSE.len());
                        self.state = State::AfterThink;
                    }
                    None => {
                        let release = self.buf.len() - partial_tag_len(&self.buf, THINK_CLOSE);
                        push_part(&mut out, Part::Reasoning(self.buf[..release].to_owned()));
                        self.buf.drain(..release);
                        break;
                    }
                },
                State::AfterThink => {
                    let lead = self.buf.trim_start().len();
                    self.buf.drain(..self.buf.len() - lead);
                    if self.buf.is_empty() {
                        break;
                    }
                    self.state = State::Content;
                }
                State::Content => {
                    push_part(&mut out, Part::Content(std::mem::take(&mut self.buf)));
                    break;
                }
            }
        }
        out
    }

    /// The end of the output: releases everything held (an unclosed block is all reasoning).
    pub fn finish(&mut self) -> Vec<Part> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.buf);
        match self.state {
            State::Reasoning => push_part(&mut out, Part::Reasoning(rest)),
            State::AfterThink => {}
            State::Start | State::Content => push_part(&mut out, Part::Content(rest)),
        }
        out
    }
}

/// A whole output as (reasoning, content); reasoning None where the reply did not think.
pub fn split_output(text: &str, opened_by_prompt: bool) -> (Option<String>, String) {
    let mut p = ReasoningParser::new(opened_by_prompt);
    let thought = p.state == State::Reasoning;
    let mut parts = p.push(text);
    parts.extend(p.finish());
    let mut reasoning: Option<String> = thought.then(String::new);
    let mut content = String::new();
    for part in parts {
        match part {
            Part::Reasoning(t) => reasoning.get_or_insert_with(String::new).push_str(&t),
            Part::Content(t) => content.push_str(&t),
        }
    }
    (reasoning, content)
}

fn push_part(out: &mut Vec<Part>, part: Part) {
    match (out.last_mut(), part) {
        (_, Part::Reasoning(t) | Part::Content(t)) if t.is_empty() => {}
        (Some(Part::Reasoning(prev)), Part::Reasoning(t)) => prev.push_str(&t),
        (Some(Part::Content(prev)), Part::Content(t)) => prev.push_str(&t),
        (_, p) => out.push(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(parts: &[&str], opened: bool) -> Vec<Part> {
        let mut p = ReasoningParser::new(opened);
        let mut all = Vec::new();
        for part in parts.iter().map(|t| p.push(t)).collect::<Vec<_>>().into_iter().flatten().chain(p.finish()) {
            push_part(&mut all, part);
        }
        all
    }

    #[test]
    fn thinking_then_answer() {
        let out = "<think>\nThe user greets me.\n</think>\n\nHello!";
        assert_eq!(split_output(out, false), (Some("\nThe user greets me.\n".into()), "Hello!".into()));
        // Opened by the prompt: the reply starts inside the block.
        assert_eq!(split_output("Greeting.</think>Hi", true), (Some("Greeting.".into()), "Hi".into()));
        // Cut before </think>: all reasoning, no content.
        assert_eq!(split_output("  <think>still thinking", false), (Some("still thinking".into()), String::new()));
        assert_eq!(split_output("", true), (Some(String::new()), String::new()));
    }

    #[test]
    fn replies_without_thinking_are_all_content() {
        for out in ["Hello <think> there", "<thin", "  ", "", "</think> stray", "x<think>y</think>"] {
            assert_eq!(split_output(out, false), (None, out.to_owned()), "{out:?}");
        }
    }

    #[test]
    fn streaming_in_any_cut_gives_the_whole_split() {
        for (out, opened) in [("\n<think>a < b </thin k></think>\n \nanswer </think>", false), ("r1 </think>ans", true), ("plain <think>", false)] {
            let whole = stream(&[out], opened);
            for cut in 1..out.len() {
                assert_eq!(stream(&[&out[..cut], &out[cut..]], opened), whole, "{out:?} cut at {cut}");
            }
            let chars: Vec<String> = out.chars().map(String::from).collect();
            assert_eq!(stream(&chars.iter().map(String::as_str).collect::<Vec<_>>(), opened), whole, "{out:?} by chars");
        }
        assert_eq!(
            stream(&["\n<think>a < b </thin k></think>\n \nanswer </think>"], false),
            vec![Part::Reasoning("a < b </thin k>".into()), Part::Content("answer </think>".into())]
        );
    }

    #[test]
    fn text_is_released_as_soon_as_it_cannot_be_a_tag() {
        let mut p = ReasoningParser::new(false);
        assert_eq!(p.push(" <th"), vec![]);
        assert_eq!(p.push("ink>plan"), vec![Part::Reasoning("plan".into())]);
        assert_eq!(p.push(" more </thi"), vec![Part::Reasoning(" more ".into())]);
        assert_eq!(p.push("nk>\n"), vec![]);
        assert_eq!(p.push("\nAnswer"), vec![Part::Content("Answer".into())]);
        assert_eq!(p.finish(), vec![]);
        let mut p = ReasoningParser::new(false);
        assert_eq!(p.push("<tx"), vec![Part::Content("<tx".into())]);
        assert!(ReasoningParser::prompt_opens_thinking("<|im_start|>assistant\n<think>\n"));
        assert!(!ReasoningParser::prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n"));
    }
}
