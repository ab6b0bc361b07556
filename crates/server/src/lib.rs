//! The OpenAI-compatible HTTP front end (axum): request validation, the OpenAI wire format with
//! SSE streaming, Prometheus metrics, and the `peregrine` binary's startup.

pub mod chat_output;
pub mod cli;
pub mod default_model;
pub mod error;
pub mod generation_defaults;
pub mod messages;
pub mod protocol;
pub mod reasoning;
pub mod responses;
pub mod routes;
pub mod state;
pub mod tool_calls;
