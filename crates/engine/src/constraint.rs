//! A sequence's output constraint: JSON mode (`json_object`) or a guide (a JSON schema, a regex,
//! a choice).
//! Constrained sequences sample on the host from full logits and propose no drafts.

use crate::guided::GuidedConstraint;
use crate::json_mode::JsonConstraint;

pub enum Constraint {
    Json(JsonConstraint),
    Guided(Box<GuidedConstraint>),
}

impl Constraint {
    /// Sets the logits of every token that cannot come next to -inf; false if none can.
    pub fn mask(&self, logits: &mut [f32]) -> bool {
        match self {
            Constraint::Json(c) => c.mask(logits),
            Constraint::Guided(c) => c.mask(logits),
        }
    }

    /// Takes the sampled token (one `mask` allowed).
    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        match self {
            Constraint::Json(c) => {
                c.advance(token);
                Ok(())
            }
            Constraint::Guided(c) => c.advance(token),
        }
    }

    /// Whether the output is complete (the sequence then stops, reason `stop`).
    pub fn done(&self) -> bool {
        match self {
            Constraint::Json(c) => c.done(),
            Constraint::Guided(c) => c.done(),
        }
    }

    /// The error a sequence ends with when no token can continue its output.
    pub fn stuck(&self) -> &'static str {
        match self {
            Constraint::Json(_) => "JSON mode: no token of the vocabulary can continue the object",
            Constraint::Guided(_) => "guided decoding: no token of the vocabulary can continue a match of the request's grammar",
        }
    }
}
