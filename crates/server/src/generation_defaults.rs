//! Sampling defaults from the model's `generation_config.json` (vLLM's `--generation-config
//! auto`): what a request leaves unset is what the model's authors recommend (MiMo's: a
//! temperature and top_p), instead of temperature 1. The fields are vLLM's: `temperature`,
//! `top_p`, `top_k`, `min_p`, `repetition_penalty`, and `max_new_tokens` as a cap on requests
//! without `max_tokens`. Like vLLM, `do_sample` is not read.

use serde_json::Value;

use crate::protocol::{self, CommonParams};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingDefaults {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    /// `max_new_tokens`: the completion length of a request without `max_tokens` (at most what
    /// its context leaves).
    pub max_tokens: Option<usize>,
}

impl SamplingDefaults {
    /// The defaults a generation_config.json holds, each checked as a request's field would be;
    /// a field that a request could not send is left out, and named in the returned warnings.
    pub fn from_generation_config(g: &Value, vocab_size: usize) -> (SamplingDefaults, Vec<String>) {
        let mut d = SamplingDefaults::default();
        let mut warnings = Vec::new();
        let mut check = |field: &str, c: CommonParams| match protocol::plan(&c, None, vocab_size, false) {
            Ok(_) => true,
            Err(e) => {
                warnings.push(format!("generation_config.json `{field}` ignored: {}", e.message));
                false
            }
        };
        let float = |k: &str| g.get(k).and_then(Value::as_f64);
        if let Some(t) = float("temperature") {
            d.temperature = check("temperature", CommonParams { temperature: Some(t), ..Default::default() }).then_some(t);
        }
        if let Some(p) = float("top_p") {
            d.top_p = check("top_p", CommonParams { top_p: Some(p), ..Default::default() }).then_some(p);
        }
        if let Some(k) = g.get("top_k").and_then(Value::as_i64) {
            d.top_k = check("top_k", CommonParams { top_k: Some(k), ..Default::default() }).then_some(k);
        }
        if let Some(p) = float("min_p") {
            d.min_p = check("min_p", CommonParams { min_p: Some(p), ..Default::default() }).then_some(p);
        }
        if let Some(p) = float("repetition_penalty") {
            d.repetition_penalty = check("repetition_penalty", CommonParams { repetition_penalty: Some(p), ..Default::default() }).then_some(p);
        }
        match g.get("max_new_tokens") {
            None | Some(Value::Null) => {}
            Some(v) => match v.as_u64().filter(|&n| n >= 1) {
                Some(n) => d.max_tokens = Some(n as usize),
                None => warnings.push(format!("generation_config.json `max_new_tokens` ignored: must be an integer >= 1, got {v}")),
            },
        }
        (d, warnings)
    }

    pub fn is_empty(&self) -> bool {
        *self == SamplingDefaults::default()
    }

    /// Fills the sampling fields a request left unset.
    pub fn apply(&self, c: &mut CommonParams) {
        c.temperature = c.temperature.or(self.temperature);
        c.top_p = c.top_p.or(self.top_p);
        c.top_k = c.top_k.or(self.top_k);
        c.min_p = c.min_p.or(self.min_p);
        c.repetition_penalty = c.repetition_penalty.or(self.repetition_penalty);
    }

    /// "temperature=0.8 top_p=0.95", for the start-up log.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut add = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                parts.push(format!("{k}={v}"));
            }
        };
        add("temperature", self.temperature.map(|v| v.to_string()));
        add("top_p", self.top_p.map(|v| v.to_string()));
        add("top_k", self.top_k.map(|v| v.to_string()));
        add("min_p", self.min_p.map(|v| v.to_string()));
        add("repetition_penalty", self.repetition_penalty.map(|v| v.to_string()));
        add("max_new_tokens", self.max_tokens.map(|v| v.to_string()));
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_the_fields_vllm_reads_and_checks_them_as_requests() {
        let g = json!({"do_sample": true, "temperature": 0.8, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                       "repetition_penalty": 1.05, "max_new_tokens": 256, "eos_token_id": [1, 2]});
        let (d, w) = SamplingDefaults::from_generation_config(&g, 1000);
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            d,
            SamplingDefaults { temperature: Some(0.8), top_p: Some(0.95), top_k: Some(20), min_p: Some(0.0), repetition_penalty: Some(1.05), max_tokens: Some(256) }
        );
        assert_eq!(d.describe(), "temperature=0.8 top_p=0.95 top_k=20 min_p=0 repetition_penalty=1.05 max_new_tokens=256");
        let (d, w) = SamplingDefaults::from_generation_config(&json!({"eos_token_id": 2}), 1000);
        assert!(d.is_empty() && w.is_empty());
    }

    #[test]
    fn fields_a_request_could_not_send_are_left_out_with_a_warning() {
        let g = json!({"temperature": 7.0, "top_p": 0.0, "top_k": -5, "max_new_tokens": 0, "min_p": 0.1});
        let (d, w) = SamplingDefaults::from_generation_config(&g, 1000);
        assert_eq!(d, SamplingDefaults { min_p: Some(0.1), ..Default::default() });
        assert_eq!(w.len(), 4, "{w:?}");
        for field in ["temperature", "top_p", "top_k", "max_new_tokens"] {
            assert!(w.iter().any(|m| m.contains(&format!("`{field}`"))), "{field}: {w:?}");
        }
    }

    #[test]
    fn a_request_s_own_fields_win() {
        let d = SamplingDefaults { temperature: Some(0.6), top_p: Some(0.9), top_k: Some(20), ..Default::default() };
        let mut c = CommonParams { temperature: Some(0.0), ..Default::default() };
        d.apply(&mut c);
        assert_eq!((c.temperature, c.top_p, c.top_k, c.min_p), (Some(0.0), Some(0.9), Some(20), None));
    }
}
