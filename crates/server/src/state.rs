//! Shared server state: the engine once the model is loaded, the chat template, and settings.

use std::sync::atomic::{AtomicBool, Ordering};
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
}

#[derive(Clone)]
pub struct AppState {
    pub ready: Arc<OnceLock<Ready>>,
    pub settings: Arc<Settings>,
    /// Set once a shutdown drains: requests in flight run on, new ones are refused.
    draining: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(settings: Settings) -> Self {
        AppState { ready: Arc::new(OnceLock::new()), settings: Arc::new(settings), draining: Arc::new(AtomicBool::new(false)) }
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
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A random request id suffix (ids also seed unseeded sampling, so they must not repeat).
pub fn random_id(prefix: &str) -> String {
    format!("{prefix}-{:032x}", rand::random::<u128>())
}
