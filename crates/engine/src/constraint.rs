//! A sequence's output constraint: JSON mode (`json_object`) or a JSON schema (`json_schema`).
//! Constrained sequences sample on the host from full logits and propose no drafts.

use crate::json_mode::JsonConstraint;
use crate::schema_mode::SchemaConstraint;

pub enum Constraint {
    Json(JsonConstraint),
    Schema(Box<SchemaConstraint>),
}

impl Constraint {
    /// Sets the logits of every token that cannot come next to -inf; false if none can.
    pub fn mask(&self, logits: &mut [f32]) -> bool {
        match self {
            Constraint::Json(c) => c.mask(logits),
            Constraint::Schema(c) => c.mask(logits),
        }
    }

    /// Takes the sampled token (one `mask` allowed).
    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        match self {
            Constraint::Json(c) => {
                c.advance(token);
                Ok(())
            }
            Constraint::Schema(c) => c.advance(token),
        }
    }

    /// Whether the output is complete (the sequence then stops, reason `stop`).
    pub fn done(&mut self) -> bool {
        match self {
            Constraint::Json(c) => c.done(),
            Constraint::Schema(c) => c.done(),
        }
    }

    /// The error a sequence ends with when no token can continue its output.
    pub fn stuck(&self) -> &'static str {
        match self {
            Constraint::Json(_) => "JSON mode: no token of the vocabulary can continue the object",
            Constraint::Schema(_) => "json_schema: no token of the vocabulary can continue a value the schema accepts",
        }
    }
}
