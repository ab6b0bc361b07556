//! A sequence's output constraint: JSON mode (`json_object`), a guide (a JSON schema, a regex,
//! a choice, a grammar) or a set of allowed tokens (`allowed_token_ids`).
//! Constrained sequences propose no drafts. They sample on the backend under a token mask
//! where it can (`Backend::forward_sampled_masked`), else on the host from full logits.

use peregrine_core::backend::{token_mask_words, TokenMask};

use crate::guided::GuidedConstraint;
use crate::json_mode::JsonConstraint;

pub enum Constraint {
    Json(JsonConstraint),
    Guided(Box<GuidedConstraint>),
    Allowed(AllowedTokens),
}

/// vLLM's `allowed_token_ids`: every other token's logit is -inf, at every step.
pub struct AllowedTokens {
    /// By token id (ids past its end are not allowed).
    allowed: Vec<bool>,
}

impl AllowedTokens {
    pub fn new(ids: &[u32]) -> AllowedTokens {
        let mut allowed = vec![false; ids.iter().max().map_or(0, |&m| m as usize + 1)];
        for &id in ids {
            allowed[id as usize] = true;
        }
        AllowedTokens { allowed }
    }
}

impl Constraint {
    /// Sets the logits of every token that cannot come next to -inf; false if none can.
    pub fn mask(&self, logits: &mut [f32]) -> bool {
        match self {
            Constraint::Json(c) => c.mask(logits),
            Constraint::Guided(c) => c.mask(logits),
            Constraint::Allowed(a) => {
                for (i, l) in logits.iter_mut().enumerate() {
                    if !a.allowed.get(i).copied().unwrap_or(false) {
                        *l = f32::NEG_INFINITY;
                    }
                }
                a.allowed.iter().take(logits.len()).any(|&x| x)
            }
        }
    }

    /// The tokens `mask` leaves over a vocabulary of `vocab`, as a token mask (bit `i % 32` of
    /// word `i / 32`: token `i` may come next) for a backend that masks on its device; None if
    /// none can come next. `mask` is given zeros, so only the constraint decides: a token an
    /// adjustment pushed to -inf stays in the mask (the host path counts it out of "any left").
    pub fn token_mask(&self, vocab: usize) -> Option<TokenMask> {
        // A guide's mask is the matcher's bitmask as it is (no pass over a row of logits).
        if let Constraint::Guided(c) = self {
            if let Some(words) = c.token_words(vocab) {
                return words;
            }
        }
        let mut probe = vec![0f32; vocab];
        if !self.mask(&mut probe) {
            return None;
        }
        let mut words = vec![0u32; token_mask_words(vocab)];
        for (i, l) in probe.iter().enumerate() {
            if *l > f32::NEG_INFINITY {
                words[i / 32] |= 1 << (i % 32);
            }
        }
        Some(words)
    }

    /// Takes the sampled token (one `mask` allowed).
    pub fn advance(&mut self, token: u32) -> Result<(), String> {
        match self {
            Constraint::Json(c) => {
                c.advance(token);
                Ok(())
            }
            Constraint::Guided(c) => c.advance(token),
            Constraint::Allowed(_) => Ok(()),
        }
    }

    /// Whether the output is complete (the sequence then stops, reason `stop`).
    pub fn done(&self) -> bool {
        match self {
            Constraint::Json(c) => c.done(),
            Constraint::Guided(c) => c.done(),
            Constraint::Allowed(_) => false,
        }
    }

    /// The error a sequence ends with when no token can continue its output.
    pub fn stuck(&self) -> &'static str {
        match self {
            Constraint::Json(_) => "JSON mode: no token of the vocabulary can continue the object",
            Constraint::Guided(_) => "guided decoding: no token of the vocabulary can continue a match of the request's grammar",
            Constraint::Allowed(_) => "allowed_token_ids: none of the allowed tokens is in the vocabulary",
        }
    }
}
