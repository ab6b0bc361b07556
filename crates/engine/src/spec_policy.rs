//! When the engine speculates. A speculative step (draft pass, verify of `k + 1` rows, accept)
//! costs more than a plain decode step and commits `1 + accepted` tokens per sequence; it pays
//! only while that count outgrows the cost ratio. Both sides depend on the backend, the model, the
//! batch and the text: on the CPU a verify row costs nearly a whole step (the demo model's
//! 8-row verify is 3-5x a 1-token step, so its 3 tokens a round lose to plain decoding), on a GPU
//! rows cost little (1.7x on an H200), and a chat prompt to a code drafter accepts little.
//!
//! `Adaptive` measures instead of guessing: it times pure decode steps of each kind per batch
//! bucket (a median of the last few, so a CUDA-graph capture does not count), estimates each
//! sequence's tokens per round from its own verify rounds (shrunk toward the mean of all
//! rounds, so a few short ones do not switch it off), and speculates when the expected
//! tokens per second are higher. Now and then it takes the other kind once, so both estimates
//! stay current (a chat turning to code gets its drafts back): after `PROBE_EVERY` steps, the
//! gap doubling while probes confirm the choice, up to `PROBE_MAX` (a probe of a 6x-slower
//! kind then costs ~2% of the time), and back to `PROBE_EVERY` when the choice changes. Outputs do not
//! depend on the choice: verification samples each position with the random number plain
//! decoding uses there (`sampler::SeqRng`), so only the speed does.

/// When speculative decoding runs, given a drafter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SpeculationMode {
    /// Speculate while it commits tokens faster than plain decoding, as measured.
    #[default]
    Adaptive,
    /// Every eligible decode step drafts (the measurements' and tests' fixed mode).
    Always,
}

impl std::str::FromStr for SpeculationMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "adaptive" => Ok(Self::Adaptive),
            "always" => Ok(Self::Always),
            _ => Err(format!("`{s}` is not a speculation mode (adaptive, always)")),
        }
    }
}

/// Step times kept per kind and bucket; their median is the estimate.
const SAMPLES: usize = 8;
/// Samples of each kind a bucket needs before its choice is measured rather than explored.
const WARM: usize = 3;
/// Steps between probes of the kind not chosen: at first, and at most.
pub const PROBE_EVERY: u32 = 32;
pub const PROBE_MAX: u32 = 8 * PROBE_EVERY;
/// A sequence's rounds lose this share of their weight at each new round (its estimate follows
/// ~10 rounds).
const SEQ_DECAY: f64 = 0.9;
/// Rounds' worth of weight the prior carries in a sequence's estimate: a few short rounds do not
/// outvote it. (An estimate of the last rounds alone, weight 0.3 a round, fell below the break-even
/// after one or two short rounds of a text that pays, and plain steps measure nothing to lift it
/// again before a probe: the demo's greedy code at 1.04x of plain decoding on an H200 where
/// drafting on every step gave 1.20x.)
const PRIOR_ROUNDS: f64 = 8.0;
/// Weight of a new verify round in the prior (~100 rounds: its own noise stays well inside the
/// margin a choice is made by; at 0.05 a dip stuck below the break-even for the same reason).
const PRIOR_ALPHA: f64 = 0.01;

/// The last `SAMPLES` step times of one kind.
#[derive(Clone, Debug, Default)]
struct Times {
    ring: [f64; SAMPLES],
    n: usize,
}

impl Times {
    fn push(&mut self, secs: f64) {
        self.ring[self.n % SAMPLES] = secs;
        self.n += 1;
    }
    fn median(&self) -> f64 {
        let mut v: Vec<f64> = self.ring[..self.n.min(SAMPLES)].to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}

#[derive(Clone, Debug)]
struct Bucket {
    spec: Times,
    plain: Times,
    since_probe: u32,
    /// Steps from one probe to the next.
    gap: u32,
    /// The choice a probe was taken against, until the next decision sees its result.
    probed: Option<bool>,
    /// The last measured choice (a change restarts the gaps).
    last: Option<bool>,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket { spec: Times::default(), plain: Times::default(), since_probe: 0, gap: PROBE_EVERY, probed: None, last: None }
    }
}

/// A sequence's verify rounds, each weighted `SEQ_DECAY` less at every newer one: the tokens
/// they committed and their weight.
#[derive(Clone, Copy, Debug, Default)]
pub struct SeqRounds {
    tokens: f64,
    weight: f64,
}

/// The engine's speculation decisions and the measurements behind them.
#[derive(Debug)]
pub struct SpecPolicy {
    mode: SpeculationMode,
    /// Index: `ceil(log2(decode rows))`.
    buckets: Vec<Bucket>,
    /// Tokens per verify round over every sequence: where a sequence without rounds starts.
    prior: f64,
}

impl SpecPolicy {
    /// `block`: the speculative block size (a new sequence is first assumed to commit half).
    pub fn new(mode: SpeculationMode, block: usize) -> Self {
        SpecPolicy { mode, buckets: Vec::new(), prior: (block as f64 / 2.0).max(1.0) }
    }

    fn bucket(&mut self, rows: usize) -> &mut Bucket {
        let i = rows.max(1).next_power_of_two().trailing_zeros() as usize;
        if self.buckets.len() <= i {
            self.buckets.resize_with(i + 1, Bucket::default);
        }
        &mut self.buckets[i]
    }

    /// A sequence's expected tokens per round: its rounds' mean, shrunk toward the prior by
    /// `PRIOR_ROUNDS` rounds' worth (the prior alone before its first round).
    pub fn expected(&self, rounds: &SeqRounds) -> f64 {
        (rounds.tokens + PRIOR_ROUNDS * self.prior) / (rounds.weight + PRIOR_ROUNDS)
    }

    /// Whether a step of `rows` decoding sequences speculates, when speculating would commit
    /// `spec_tokens` tokens (each sequence's expected tokens per round, capped by its drafts).
    pub fn speculate(&mut self, rows: usize, spec_tokens: f64) -> bool {
        if self.mode == SpeculationMode::Always {
            return true;
        }
        let b = self.bucket(rows);
        if b.spec.n < WARM {
            return true;
        }
        if b.plain.n < WARM {
            return false;
        }
        let best = spec_tokens / b.spec.median() > rows as f64 / b.plain.median();
        if b.probed.take() == Some(best) {
            b.gap = (2 * b.gap).min(PROBE_MAX);
        }
        if b.last != Some(best) {
            b.last = Some(best);
            b.gap = PROBE_EVERY;
            b.since_probe = 0;
        }
        b.since_probe += 1;
        if b.since_probe >= b.gap {
            b.since_probe = 0;
            b.probed = Some(best);
            return !best;
        }
        best
    }

    /// Records how long a step of `rows` decoding sequences (and nothing else) took.
    pub fn record_step(&mut self, rows: usize, speculated: bool, secs: f64) {
        let b = self.bucket(rows);
        if speculated { b.spec.push(secs) } else { b.plain.push(secs) }
    }

    /// Records a sequence's verify round that committed `committed` tokens.
    pub fn record_round(&mut self, rounds: &mut SeqRounds, committed: usize) {
        let c = committed as f64;
        self.prior += PRIOR_ALPHA * (c - self.prior);
        rounds.tokens = SEQ_DECAY * rounds.tokens + c;
        rounds.weight = SEQ_DECAY * rounds.weight + 1.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps the policy through `n` decisions at one row, with a speculative step costing
    /// `spec_secs` and committing `tokens`, a plain one `plain_secs`; returns each choice.
    fn choices(p: &mut SpecPolicy, n: usize, spec_secs: f64, plain_secs: f64, tokens: f64) -> Vec<bool> {
        (0..n)
            .map(|_| {
                let s = p.speculate(1, tokens);
                p.record_step(1, s, if s { spec_secs } else { plain_secs });
                s
            })
            .collect()
    }

    fn run(p: &mut SpecPolicy, n: usize, spec_secs: f64, plain_secs: f64, tokens: f64) -> usize {
        choices(p, n, spec_secs, plain_secs, tokens).into_iter().filter(|&s| s).count()
    }

    /// Where the choices differ from the majority one: the probes.
    fn probes(c: &[bool]) -> Vec<usize> {
        let major = c.iter().filter(|&&s| s).count() * 2 > c.len();
        c.iter().enumerate().filter(|&(_, &s)| s != major).map(|(i, _)| i).collect()
    }

    #[test]
    fn always_speculates_whatever_the_times() {
        let mut p = SpecPolicy::new(SpeculationMode::Always, 8);
        assert_eq!(run(&mut p, 100, 10.0, 1.0, 1.0), 100);
    }

    #[test]
    fn explores_both_kinds_then_keeps_the_faster_and_probes_the_other() {
        // CPU-like: a round costs 6 plain steps and commits 3 tokens.
        let mut p = SpecPolicy::new(SpeculationMode::Adaptive, 8);
        let first: Vec<bool> = (0..2 * WARM)
            .map(|_| {
                let s = p.speculate(1, 3.0);
                p.record_step(1, s, if s { 6.0 } else { 1.0 });
                s
            })
            .collect();
        assert_eq!(first, [true, true, true, false, false, false]);
        // Probes confirming the choice come at doubling gaps, then every PROBE_MAX steps.
        let e = PROBE_EVERY as usize;
        let want = [e - 1, 3 * e - 1, 7 * e - 1, 15 * e - 1, 23 * e - 1, 31 * e - 1];
        let c = choices(&mut p, 32 * e, 6.0, 1.0, 3.0);
        assert_eq!(probes(&c), want);
        assert!(!c[0], "plain decoding is faster");
        // GPU-like: a round costs 1.5 steps and commits 3 tokens: speculation wins, probed alike.
        let mut p = SpecPolicy::new(SpeculationMode::Adaptive, 8);
        let c = choices(&mut p, 2 * WARM + 32 * e, 1.5, 1.0, 3.0);
        assert!(c[2 * WARM]);
        assert_eq!(probes(&c[2 * WARM..]), want);
    }

    #[test]
    fn a_changed_choice_restarts_the_gaps() {
        let mut p = SpecPolicy::new(SpeculationMode::Adaptive, 8);
        let e = PROBE_EVERY as usize;
        choices(&mut p, 2 * WARM + 8 * e, 6.0, 1.0, 3.0);
        // The text turns to what the drafter predicts: 8 tokens a round now.
        let c = choices(&mut p, 8 * e, 6.0, 1.0, 8.0);
        let first = c.iter().position(|&s| s).unwrap();
        assert!(c[first..].iter().filter(|&&s| !s).count() <= 3, "speculates from the first decision that sees 8 tokens");
        assert_eq!(probes(&c[first..]), [e - 1, 3 * e - 1, 7 * e - 1].into_iter().filter(|&i| i < c.len() - first).collect::<Vec<_>>());
    }

    #[test]
    fn a_capture_outlier_does_not_decide() {
        // The first speculative step of a bucket captures a graph (100x); the median ignores it.
        let mut p = SpecPolicy::new(SpeculationMode::Adaptive, 8);
        let mut times = [100.0, 1.5, 1.5].into_iter();
        for _ in 0..WARM {
            assert!(p.speculate(1, 3.0));
            p.record_step(1, true, times.next().unwrap());
        }
        for _ in 0..WARM {
            assert!(!p.speculate(1, 3.0));
            p.record_step(1, false, 1.0);
        }
        assert!(p.speculate(1, 3.0), "3 tokens in 1.5 beat 1 in 1");
    }

    #[test]
    fn buckets_are_measured_apart() {
        let mut p = SpecPolicy::new(SpeculationMode::Adaptive, 8);
        run(&mut p, 2 * WARM, 6.0, 1.0, 3.0);
        assert!(!p.speculate(1, 3.0));
        // 3-4 rows is a new bucket: it explores again.
        assert!(p.speculate(3, 9.0));
        assert!(p.speculate(4, 12.0));
    }

    #[test]
    fn estimates_follow_the_rounds() {
        let mut p = SpecPolicy::new(SpeculationMode::Adaptive, 8);
        let mut r = SeqRounds::default();
        assert_eq!(p.expected(&r), 4.0, "no rounds yet: the prior, half a block");
        p.record_round(&mut r, 1);
        let one = p.expected(&r);
        assert!(one < 4.0 && one > 3.5, "one short round moves the estimate a little: {one}");
        for _ in 0..60 {
            p.record_round(&mut r, 8);
        }
        let e = p.expected(&r);
        assert!(e > 6.0 && e < 8.0, "a run of full rounds takes it most of the way: {e}");
        assert!(p.expected(&SeqRounds::default()) > 4.0, "the prior moves toward what rounds commit");
    }

    /// One sequence after another (128 tokens each) whose rounds commit `draw()` tokens; a round
    /// costs `spec_secs`, a plain step 1. Returns tokens per unit of time.
    fn serve(p: &mut SpecPolicy, tokens: usize, spec_secs: f64, mut draw: impl FnMut() -> usize) -> f64 {
        let (mut done, mut time, mut produced, mut rounds) = (0, 0.0, 0, SeqRounds::default());
        while done < tokens {
            if produced >= 128 {
                (produced, rounds) = (0, SeqRounds::default());
            }
            let c = if p.speculate(1, p.expected(&rounds)) {
                let c = draw();
                p.record_round(&mut rounds, c);
                p.record_step(1, true, spec_secs);
                time += spec_secs;
                c
            } else {
                p.record_step(1, false, 1.0);
                time += 1.0;
                1
            };
            done += c;
            produced += c;
        }
        done as f64 / time
    }

    /// Rounds as a drafter gives them: each draft accepted with probability `accept`, up to 7.
    fn rounds(accept: f64, seed: u64) -> impl FnMut() -> usize {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        move || 1 + (0..7).take_while(|_| r.random::<f64>() < accept).count()
    }

    #[test]
    fn noisy_rounds_that_pay_keep_the_drafter_on_and_ones_that_do_not_keep_it_off() {
        // A round costs 2.4 plain steps (the demo on an H200). At 68% acceptance rounds commit
        // ~3 tokens but one in three commits 1: drafting on every step gives ~1.25 tokens a
        // step's time, and the policy must keep close to it through the short rounds.
        let always = serve(&mut SpecPolicy::new(SpeculationMode::Always, 8), 30_000, 2.4, rounds(0.68, 1));
        let adaptive = serve(&mut SpecPolicy::new(SpeculationMode::Adaptive, 8), 30_000, 2.4, rounds(0.68, 1));
        assert!(always > 1.2, "{always}");
        eprintln!("adaptive {adaptive:.3}, always {always:.3}");
        assert!(adaptive > 0.93 * always, "adaptive {adaptive:.3} against drafting always {always:.3}");
        // At 48% rounds commit ~1.9 tokens: plain decoding (1 a step) wins, and the policy
        // stays within its probes of it.
        let adaptive = serve(&mut SpecPolicy::new(SpeculationMode::Adaptive, 8), 30_000, 2.4, rounds(0.48, 2));
        assert!(adaptive > 0.98, "{adaptive:.3}");
    }

    #[test]
    fn modes_parse() {
        assert_eq!("adaptive".parse(), Ok(SpeculationMode::Adaptive));
        assert_eq!("always".parse(), Ok(SpeculationMode::Always));
        assert!("never".parse::<SpeculationMode>().is_err());
    }
}
