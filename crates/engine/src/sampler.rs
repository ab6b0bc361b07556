//! Host-side sampling: penalties, bias, temperature, top-k/top-p/min-p, seeded draws, logprobs.
//!
//! Logprobs are the log-softmax of the RAW model logits (before bias, penalties and
//! temperature), as vLLM reports them by default.

use peregrine_core::SamplingParams;
use rand::{Rng, SeedableRng};
use rand::rngs::StdRng;

use crate::api::{PromptLogprob, TokenLogprob};

/// A per-request source of randomness indexed by output position: the draw for output token
/// `n` depends only on the seed and `n`. Speculative decoding relies on this: verifying a
/// block samples each position with the number plain decoding would have used there, so a
/// seeded request gives the same tokens with or without speculation (see `engine`).
#[derive(Debug, Clone, Copy)]
pub struct SeqRng {
    seed: u64,
}

impl SeqRng {
    pub fn new(seed: u64) -> Self {
        SeqRng { seed }
    }
    /// A uniform number in [0, 1) for output position `n`.
    pub fn uniform_at(&self, n: u64) -> f64 {
        // A fresh StdRng per position: position streams are independent and well mixed.
        StdRng::seed_from_u64(mix(self.seed, n)).random::<f64>()
    }
}

/// The SplitMix64 finaliser over (seed, n): a well-mixed 64-bit number for the n-th draw of a
/// stream (each output position's, or the server's `--seed` per arrival).
pub fn mix(seed: u64, n: u64) -> u64 {
    let mut z = seed ^ n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Stable 64-bit hash (FNV-1a) used to derive a seed from a request id.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Applies logit_bias, the repetition/presence/frequency penalties and `bad_words`' bans in
/// place. `prompt` and `output` are the token ids seen so far.
pub fn apply_penalties(logits: &mut [f32], p: &SamplingParams, prompt: &[u32], output: &[u32]) {
    for (&id, &b) in &p.logit_bias {
        if let Some(l) = logits.get_mut(id as usize) {
            *l += b;
        }
    }
    if p.repetition_penalty != 1.0 && p.repetition_penalty > 0.0 {
        let mut seen = vec![false; logits.len()];
        for &t in prompt.iter().chain(output) {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        for (l, s) in logits.iter_mut().zip(&seen) {
            if *s {
                *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
            }
        }
    }
    if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
        let mut counts = std::collections::HashMap::<u32, u32>::new();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= p.presence_penalty + p.frequency_penalty * c as f32;
            }
        }
    }
    for t in bad_word_bans(&p.bad_words, output) {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// The tokens `bad_words` bans after `output` (vLLM's rule): each word's last token where the
/// output ends with the tokens before it; a one-token word everywhere.
pub fn bad_word_bans<'a>(bad_words: &'a [Vec<u32>], output: &'a [u32]) -> impl Iterator<Item = u32> + 'a {
    bad_words.iter().filter_map(move |w| {
        let (&last, before) = w.split_last()?;
        output.ends_with(before).then_some(last)
    })
}

/// Argmax, lowest id on ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The probability distribution sampling draws from (after temperature and the top-k, top-p,
/// min-p masks) as (token, prob) pairs sorted by descending probability, lowest id first on ties.
pub fn sampling_distribution(logits: &[f32], p: &SamplingParams) -> Vec<(u32, f64)> {
    let t = p.temperature.max(1e-6) as f64;
    let mut v: Vec<(u32, f64)> =
        logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l as f64 / t)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 && v.len() > p.top_k {
        v.truncate(p.top_k);
    }
    if v.is_empty() {
        return v;
    }
    let max = v[0].1;
    let mut sum = 0.0;
    for e in v.iter_mut() {
        e.1 = (e.1 - max).exp();
        sum += e.1;
    }
    for e in v.iter_mut() {
        e.1 /= sum;
    }
    if p.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (always at least one token).
        let mut acc = 0.0;
        let mut keep = v.len();
        for (i, e) in v.iter().enumerate() {
            acc += e.1;
            if acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        v.truncate(keep);
    }
    if p.min_p > 0.0 {
        let thr = v[0].1 * p.min_p as f64;
        v.retain(|e| e.1 >= thr);
    }
    let s: f64 = v.iter().map(|e| e.1).sum();
    for e in v.iter_mut() {
        e.1 /= s;
    }
    v
}

/// Chooses output token number `n` from processed logits: inverse-CDF sampling of the
/// sampling distribution with the request's uniform for position `n`.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &SeqRng, n: u64) -> u32 {
    if p.is_greedy() {
        return argmax(logits);
    }
    sample_with(logits, p, rng.uniform_at(n))
}

/// Inverse-CDF sampling of the sampling distribution with the uniform number `u` in [0, 1).
pub fn sample_with(logits: &[f32], p: &SamplingParams, u: f64) -> u32 {
    if p.is_greedy() {
        return argmax(logits);
    }
    let dist = sampling_distribution(logits, p);
    let mut acc = 0.0;
    for &(id, pr) in &dist {
        acc += pr;
        if u < acc {
            return id;
        }
    }
    dist.last().map(|e| e.0).unwrap_or_else(|| argmax(logits))
}

/// Log-softmax of raw logits: the chosen token's logprob and the `top` most likely.
pub fn logprobs(raw: &[f32], chosen: u32, top: usize) -> TokenLogprob {
    let max = raw.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64 + raw.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln();
    let lp = |i: usize| (raw[i] as f64 - lse) as f32;
    let mut idx: Vec<usize> = (0..raw.len()).collect();
    let k = top.min(raw.len());
    if k > 0 {
        idx.select_nth_unstable_by(k - 1, |&a, &b| raw[b].total_cmp(&raw[a]).then(a.cmp(&b)));
        idx.truncate(k);
        idx.sort_by(|&a, &b| raw[b].total_cmp(&raw[a]).then(a.cmp(&b)));
    } else {
        idx.clear();
    }
    TokenLogprob {
        token_id: chosen,
        logprob: lp(chosen as usize),
        top: idx.into_iter().map(|i| (i as u32, lp(i))).collect(),
    }
}

/// A prompt token's logprobs (as `logprobs`) with its rank: 1 + the other tokens whose logit is
/// at least its own, so ties count against the token (vLLM's `>=` count). A NaN logit ranks last.
/// Where the token is also among `top`, the server shows its place there instead.
pub fn prompt_logprob(raw: &[f32], chosen: u32, top: usize) -> PromptLogprob {
    let own = raw[chosen as usize];
    let rank = if own.is_nan() {
        raw.len()
    } else {
        1 + raw.iter().enumerate().filter(|&(i, &l)| i != chosen as usize && l >= own).count()
    };
    PromptLogprob { token: logprobs(raw, chosen, top), rank: rank as u32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams { temperature: t, ..Default::default() }
    }

    #[test]
    fn greedy_lowest_id_on_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    }

    #[test]
    fn temperature_follows_softmax_chi_square() {
        let logits = [0.0f32, 1.0, 2.0, 0.5];
        let t = 0.7;
        let rng = SeqRng::new(7);
        let n = 40000;
        let mut counts = [0usize; 4];
        for i in 0..n {
            counts[sample(&logits, &params(t), &rng, i) as usize] += 1;
        }
        let ex: Vec<f64> = logits.iter().map(|&l| (l as f64 / t as f64).exp()).collect();
        let s: f64 = ex.iter().sum();
        let chi: f64 = (0..4).map(|i| {
            let e = n as f64 * ex[i] / s;
            (counts[i] as f64 - e).powi(2) / e
        }).sum();
        // 3 degrees of freedom: p = 0.001 critical value is 16.27.
        assert!(chi < 16.27, "chi-square {chi}, counts {counts:?}");
    }

    #[test]
    fn masks_are_exact() {
        // probs at T=1: proportional to e^l
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let d = sampling_distribution(&logits, &SamplingParams { top_k: 2, ..params(1.0) });
        assert_eq!(d.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 1]);
        let p: Vec<f64> = logits.iter().map(|&l| (l as f64).exp()).collect();
        let s: f64 = p.iter().sum();
        let p0 = p[0] / s;
        let p1 = p[1] / s;
        // top_p just above p0 keeps two tokens, just below keeps one.
        let d = sampling_distribution(&logits, &SamplingParams { top_p: (p0 + 1e-4) as f32, ..params(1.0) });
        assert_eq!(d.len(), 2);
        let d = sampling_distribution(&logits, &SamplingParams { top_p: (p0 - 1e-4) as f32, ..params(1.0) });
        assert_eq!(d.len(), 1);
        assert!((d[0].1 - 1.0).abs() < 1e-12);
        // min_p keeps tokens with prob >= min_p * p_max.
        let ratio = p1 / p0; // e^-1
        let d = sampling_distribution(&logits, &SamplingParams { min_p: (ratio - 1e-3) as f32, ..params(1.0) });
        assert_eq!(d.len(), 2);
        assert!((d[0].1 - p0 / (p0 + p1)).abs() < 1e-9);
    }

    #[test]
    fn penalties_follow_hf_and_openai() {
        let mut l = vec![2.0f32, -2.0, 1.0, 1.0];
        let p = SamplingParams { repetition_penalty: 2.0, presence_penalty: 0.5, frequency_penalty: 0.25, ..params(1.0) };
        let mut bias = p.clone();
        bias.logit_bias.insert(3, 10.0);
        apply_penalties(&mut l, &bias, &[0], &[1, 2, 2]);
        assert_eq!(l[0], 1.0); // positive divided
        assert_eq!(l[1], -4.0 - 0.5 - 0.25); // negative multiplied, then once in output
        assert_eq!(l[2], 0.5 - 0.5 - 0.5); // divided, presence + 2*frequency
        assert_eq!(l[3], 11.0); // bias only
    }

    /// vLLM's rule: a word's last token where the output ends with the tokens before it (a word
    /// longer than the output by more than one token never matches); a one-token word always.
    #[test]
    fn bad_words_ban_a_words_last_token_after_the_rest() {
        let words = vec![vec![7], vec![1, 2, 3], vec![2, 4]];
        let bans = |out: &[u32]| bad_word_bans(&words, out).collect::<Vec<_>>();
        assert_eq!(bans(&[]), [7]);
        assert_eq!(bans(&[2]), [7, 4]);
        assert_eq!(bans(&[5, 1, 2]), [7, 3, 4]);
        assert_eq!(bans(&[1, 2, 5]), [7]);
        assert_eq!(bans(&[1]), [7], "the word's start alone bans nothing");
        let mut l = vec![0.5f32; 8];
        apply_penalties(&mut l, &SamplingParams { bad_words: words.clone(), ..params(1.0) }, &[], &[1, 2]);
        assert_eq!(l.iter().map(|x| x.is_finite()).collect::<Vec<_>>(), [true, true, true, false, false, true, true, false]);
    }

    #[test]
    fn logprobs_are_log_softmax() {
        let raw = [1.0f32, 2.0, 3.0];
        let lp = logprobs(&raw, 0, 2);
        let s: f64 = raw.iter().map(|&x| (x as f64).exp()).sum();
        assert!((lp.logprob as f64 - (1.0 - s.ln())).abs() < 1e-5);
        assert_eq!(lp.top.iter().map(|e| e.0).collect::<Vec<_>>(), vec![2, 1]);
    }

    #[test]
    fn prompt_ranks_count_ties_against_the_token() {
        let raw = [1.0f32, 3.0, 2.0, 3.0, f32::NAN];
        let rank = |t: u32| prompt_logprob(&raw, t, 1).rank;
        assert_eq!((rank(1), rank(3)), (2, 2), "a tie: each counts the other");
        assert_eq!((rank(2), rank(0)), (3, 4));
        assert_eq!(rank(4), 5, "a NaN logit ranks last");
        let p = prompt_logprob(&raw[..4], 2, 1);
        assert_eq!(p.token, logprobs(&raw[..4], 2, 1));
    }
}
