//! Shared server state: the engine once the model is loaded, the chat template, and settings.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use peregrine_engine::EngineHandle;
use peregrine_model::chat_template::ChatTemplate;

use crate::error::ApiError;
use crate::generation_defaults::SamplingDefaults;

/// Everything that exists once the model is loaded.
pub struct Ready {
    pub engine: EngineHandle,
    pub template: Option<ChatTemplate>,
    pub model_name: String,
    pub created: u64,
    /// What requests leave unset, from the model's generation_config.json.
    pub sampling_defaults: SamplingDefaults,
}

pub struct Settings {
    pub api_key: Option<String>,
    pub always_include_usage: bool,
    /// Parse `<tool_call>` blocks of chat outputs into `tool_calls` (requests with tools).
    pub parse_tool_calls: bool,
    /// Split `<think>` reasoning from chat answers into `reasoning_content`.
    pub parse_reasoning: bool,
    /// Log each request (method, path, status, time) at info level.
    pub access_log: bool,
    /// `--seed`: unseeded requests sample from seeds made of this and their arrival number.
    pub seed: Option<u64>,
}

#[derive(Clone)]
pub struct AppState {
    pub ready: Arc<OnceLock<Ready>>,
    pub settings: Arc<Settings>,
    /// Set once a shutdown drains: requests in flight run on, new ones are refused.
    draining: Arc<AtomicBool>,
    /// Requests between the drain check and the engine's own count (`Submitting`).
    submitting: Arc<AtomicUsize>,
    /// Generation requests without a seed taken so far (their arrival numbers, under `--seed`).
    arrivals: Arc<AtomicU64>,
}

/// A request on its way into the engine, counted from before it checked for a drain until the
/// engine counts its sequences (`EngineHandle::unfinished`): a drain that reads this count and
/// then the engine's misses no request that saw no drain.
pub struct Submitting(Arc<AtomicUsize>);

impl Drop for Submitting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AppState {
    pub fn new(settings: Settings) -> Self {
        AppState {
            ready: Arc::new(OnceLock::new()),
            settings: Arc::new(settings),
            draining: Arc::new(AtomicBool::new(false)),
            submitting: Arc::new(AtomicUsize::new(0)),
            arrivals: Arc::new(AtomicU64::new(0)),
        }
    }
    /// Under `--seed`, the sampling seed of the next request that has none of its own: the
    /// server's seed mixed with the request's arrival number (the sampler's `mix`), so a
    /// restarted server sent the same requests in the same order samples the same. A request
    /// with a seed is one the engine keeps reproducible (it decodes plainly where drafting would
    /// make its text follow step timing), which an engine-id hash would not give.
    pub fn arrival_seed(&self) -> Option<u64> {
        let seed = self.settings.seed?;
        Some(peregrine_engine::sampler::mix(seed, self.arrivals.fetch_add(1, Ordering::Relaxed)))
    }
    pub fn ready(&self) -> Result<&Ready, ApiError> {
        self.ready.get().ok_or_else(ApiError::loading)
    }
    /// From now on generation requests get a 503 and /health fails (so a load balancer stops
    /// sending any), while those already submitted run to their end.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
    /// Counts a request about to be submitted, or None once a drain began. Counted before the
    /// check (both SeqCst, as the drain sets its flag before reading the count), so either this
    /// sees the drain or the drain sees this.
    pub fn start_submit(&self) -> Option<Submitting> {
        self.submitting.fetch_add(1, Ordering::SeqCst);
        let counted = Submitting(self.submitting.clone());
        (!self.draining()).then_some(counted)
    }
    /// Requests between their drain check and the engine's count.
    pub fn submitting(&self) -> usize {
        self.submitting.load(Ordering::SeqCst)
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A random request id suffix (ids also seed unseeded sampling, so they must not repeat).
pub fn random_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request counted on its way in holds the count until it is dropped; once a drain began,
    /// none is let in and none stays counted.
    #[test]
    fn submits_are_counted_until_the_engine_has_them_and_refused_once_draining() {
        let state = AppState::new(Settings { api_key: None, always_include_usage: false, parse_tool_calls: false, parse_reasoning: false, access_log: false, seed: None });
        let a = state.start_submit().expect("not draining");
        let b = state.start_submit().expect("not draining");
        assert_eq!(state.submitting(), 2);
        drop(a);
        assert_eq!(state.submitting(), 1);
        state.start_draining();
        assert!(state.start_submit().is_none(), "let in while draining");
        assert_eq!(state.submitting(), 1, "a refused submit stays counted");
        drop(b);
        assert_eq!(state.submitting(), 0);
    }
}
