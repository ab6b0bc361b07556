//! The chat template of tokenizer_config.json rendered with minijinja and HF semantics:
//! trim_blocks and lstrip_blocks, Python string/dict/list methods (minijinja-contrib's pycompat),
//! a `tojson` that matches Python's `json.dumps` byte for byte (no HTML escaping, `", "`/`": "`
//! separators, insertion order), `raise_exception`, `strftime_now`, and the HF context variables.

use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, ErrorKind};
use peregrine_core::{Error, Result};
use serde_json::{Map, Value};

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: Option<String>,
    eos: Option<String>,
}

/// Instructions a render may run: a template comes with the model (tokenizer_config.json, GGUF
/// metadata), and one that loops without end would hold every chat request. A 20,000-message
/// chat renders well within it (`runaway_templates_run_out_of_fuel`), so it bounds only runaway
/// templates.
pub const RENDER_FUEL: u64 = 100_000_000;

/// The variables `ChatTemplate::render` sets itself.
pub const RESERVED_VARIABLES: &[&str] = &["messages", "tools", "add_generation_prompt", "bos_token", "eos_token"];

impl ChatTemplate {
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(RENDER_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_owned())
            .map_err(|e| Error::Template(format!("cannot parse the chat template: {e:#}")))?;
        Ok(ChatTemplate { env, bos: bos_token.map(str::to_owned), eos: eos_token.map(str::to_owned) })
    }

    /// Renders `messages` (a JSON array of OpenAI-style messages) with optional `tools`;
    /// `extra` (chat_template_kwargs) is merged into the context last (callers refuse
    /// `RESERVED_VARIABLES` in it, as transformers refuses a variable given twice).
    pub fn render(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
        extra: &Map<String, Value>,
    ) -> Result<String> {
        let mut ctx = Map::new();
        ctx.insert("messages".into(), normalize_messages(messages)?);
        ctx.insert("tools".into(), tools.cloned().unwrap_or(Value::Null));
        ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
        ctx.insert("bos_token".into(), self.bos.clone().map(Value::String).unwrap_or(Value::String(String::new())));
        ctx.insert("eos_token".into(), self.eos.clone().map(Value::String).unwrap_or(Value::String(String::new())));
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        let tmpl = self.env.get_template("chat").map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(JValue::from_serialize(Value::Object(ctx))).map_err(|e| {
            // Show the template's own message for raise_exception.
            match e.kind() {
                ErrorKind::InvalidOperation => Error::Template(e.detail().unwrap_or("invalid operation").to_owned()),
                ErrorKind::OutOfFuel => Error::Template(format!("the chat template ran past {RENDER_FUEL} instructions without finishing")),
                _ => Error::Template(format!("{e:#}")),
            }
        })
    }
}

/// `rendered` (the chat rendered without a generation prompt) cut right after the final
/// message's text, so that the model continues that message (transformers'
/// `continue_final_message`, vLLM's too): the last text of the last message, stripped of
/// surrounding whitespace as templates often strip it, must appear in the rendering; everything
/// after its last occurrence (the end-of-turn tokens) goes.
pub fn continue_final_message(rendered: &str, messages: &Value) -> Result<String> {
    let last = messages.as_array().and_then(|m| m.last()).ok_or_else(|| Error::Template("continue_final_message needs a final message".into()))?;
    let text = match &last["content"] {
        Value::String(s) => Some(s.as_str()),
        Value::Array(parts) => parts.iter().rev().find_map(|p| p["text"].as_str()),
        _ => None,
    }
    .ok_or_else(|| Error::Template("continue_final_message is set but the final message has no text to continue".into()))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(Error::Template("continue_final_message is set but the final message is empty (to start a new reply, use add_generation_prompt)".into()));
    }
    match rendered.rfind(text) {
        Some(i) => Ok(rendered[..i + text.len()].to_owned()),
        None => Err(Error::Template("continue_final_message is set but the final message's text does not appear in the chat the template renders".into())),
    }
}

/// transformers 5.17's apply_chat_template hands messages to the template as given: a
/// `tool_calls[].function.arguments` JSON *string* stays a string (Qwen3's template prints it
/// verbatim, an object goes through `tojson`), so nothing is rewritten here.
fn normalize_messages(messages: &Value) -> Result<Value> {
    if !messages.is_array() {
        return Err(Error::Template("messages must be a list".into()));
    }
    Ok(messages.clone())
}

fn raise_exception(msg: String) -> std::result::Result<JValue, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `strftime_now(fmt)`: the current UTC time, with the common strftime fields.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_time(secs, &fmt)
}

pub(crate) fn format_time(secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let wd = DAYS[days.rem_euclid(7) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out += &y.to_string(),
            Some('m') => out += &format!("{m:02}"),
            Some('d') => out += &format!("{d:02}"),
            Some('-') => match chars.next() {
                Some('d') => out += &d.to_string(),
                Some('m') => out += &m.to_string(),
                Some(o) => { out.push_str("%-"); out.push(o) }
                None => out.push_str("%-"),
            },
            Some('B') => out += MONTHS[(m - 1) as usize],
            Some('b') => out += &MONTHS[(m - 1) as usize][..3],
            Some('A') => out += wd,
            Some('a') => out += &wd[..3],
            Some('H') => out += &format!("{:02}", tod / 3600),
            Some('M') => out += &format!("{:02}", tod % 3600 / 60),
            Some('S') => out += &format!("{:02}", tod % 60),
            Some('%') => out.push('%'),
            Some(o) => { out.push('%'); out.push(o) }
            None => out.push('%'),
        }
    }
    out
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent, separators=..., sort_keys=...)`.
fn tojson(value: JValue, kwargs: Kwargs) -> std::result::Result<JValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let (item_sep, key_sep) = match &separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        _ => (if indent.is_some() { ",".to_owned() } else { ", ".to_owned() }, ": ".to_owned()),
    };
    let mut out = String::new();
    python_dumps(&json, indent, &item_sep, &key_sep, sort_keys.unwrap_or(false), 0, &mut out);
    Ok(JValue::from_safe_string(out))
}

fn python_dumps(v: &Value, indent: Option<usize>, item_sep: &str, key_sep: &str, sort: bool, level: usize, out: &mut String) {
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else {
                    out.push_str(&n.to_string());
                }
            } else {
                out.push_str(&n.to_string());
            }
        }
        Value::String(s) => python_str(s, out),
        Value::Array(a) => {
            if a.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                python_dumps(x, indent, item_sep, key_sep, sort, level + 1, out);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(o) => {
            if o.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut keys: Vec<&String> = o.keys().collect();
            if sort {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, level + 1);
                python_str(k, out);
                out.push_str(key_sep);
                python_dumps(&o[*k], indent, item_sep, key_sep, sort, level + 1, out);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

/// A JSON string as Python writes it with ensure_ascii=False.
fn python_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}
