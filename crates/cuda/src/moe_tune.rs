//! Choosing the MXFP4 MoE decode kernel by measurement. Which ring shapes (two launches may use
//! one for gate_up and another for down), and whether gate_up and down run as one launch or
//! two, is fastest depends on the expert shape and the token count (on the H100 at 1 token:
//! the one-launch 2 x 3 ring for MiMo-V2-Flash experts, two launches with a 3 x 4 ring for
//! MiMo-V2.5-Pro's; `TILED_VARIANTS` lists the rest).
//! Every candidate computes each output with the same arithmetic in the same order, so the
//! choice changes speed only, never results. Tuned once per expert shape at model load, outside
//! any graph capture; the one-token choice is settled when the KV cache is set up, by timing
//! batch-1 steps (`CudaModel::tune_one_token_step`).

use std::collections::HashMap;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use peregrine_core::Result;

use crate::kernels::{Kernels, MoeInput, MoeKernel, MoeLayout, MoeRouting, MoeWeights, TILED_VARIANTS};

/// Token counts tuned one by one (1..=TUNED_TOKENS); above, the decode graphs' row buckets up
/// to `Kernels::moe_tune_tokens` (`Kernels::tuned_counts`); other counts use the default
/// (`MoeKernel::for_tiled`).
pub const TUNED_TOKENS: usize = 8;

/// The largest row bucket tuned by default (`PEREGRINE_MOE_TUNE_TOKENS` sets it, a measurement
/// switch); above `TUNED_TOKENS` the tuned choice serves decode rows only
/// (`Kernels::moe_kernel_rows`). H100, Flash, 18 layers: tuned, the decode steps at 12-32 rows
/// ran the two-launch tiled kernels and took 4-6% less than on the MoE GEMM, at 48 2.3% less,
/// while at 64 the tuner's tiled choice made the step 3.7% slower (it times the tiled kernels
/// without the pairs' sum that the next norm then does over 64 rows;
/// benches/results/2026-11-26-moe-tuned-decode-buckets.md).
pub const TUNED_BUCKETS_MAX: usize = 48;

/// The same where the GPU's peak memory bandwidth is `kernels::FP8_MOE_MIN_BANDWIDTH` or more
/// (the H200): there 64 rows are tuned too, and the tiled kernels the tuner picks made the
/// 18-layer Flash step at batch 64 1.6-1.7% faster than the MoE GEMM (20.534-20.562 against
/// 20.892-20.896 ms, two rounds of separate processes; 48 rows unchanged;
/// benches/results/2026-11-30-h200-moe-tuned-to-64-rows.md).
pub const TUNED_BUCKETS_MAX_FAST_MEMORY: usize = 64;

/// The largest row bucket `tune_moe` measures on a GPU of `peak_bandwidth` bytes/s:
/// `PEREGRINE_MOE_TUNE_TOKENS` if set, else `TUNED_BUCKETS_MAX_FAST_MEMORY` from
/// `kernels::FP8_MOE_MIN_BANDWIDTH` on, else `TUNED_BUCKETS_MAX`.
pub fn tune_tokens_for(peak_bandwidth: f64) -> usize {
    std::env::var("PEREGRINE_MOE_TUNE_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(if peak_bandwidth >= crate::kernels::FP8_MOE_MIN_BANDWIDTH {
        TUNED_BUCKETS_MAX_FAST_MEMORY
    } else {
        TUNED_BUCKETS_MAX
    })
}

/// `Kernels::tuned_counts` for a largest bucket `max`.
pub(crate) fn tuned_counts_up_to(max: usize) -> Vec<usize> {
    (1..=TUNED_TOKENS.min(max.max(1))).chain(crate::graph::ROW_BUCKETS.into_iter().filter(|&t| t > TUNED_TOKENS && t <= max)).collect()
}

/// What a one-token step pays for the tiled kernels beyond their own time, in ms: where the
/// fused kernel runs at one token, the step routes inside it (the router's sums in the o_proj,
/// the post-attention norm in the router, `CudaModel::routes_in_moe_kernel`), while the tiled
/// kernels need that norm, the router GEMV and `moe_route` as launches of their own. The tuner
/// times kernels alone with the routing given, so it adds this to the tiled candidates at one
/// token. H100, Flash, 18 layers: with the tiled kernels chosen at one token the batch-1 step
/// took 2.384-2.399 ms against 2.343-2.345 with the fused kernel (17 MoE layers: ~2.8 us a
/// layer), while alone the tiled kernels were ~1.6 us faster: ~4.4 us a layer in all
/// (benches/results/2026-11-28-moe-lean-stream.md). MiMo-V2.5-Pro's one-token tiled kernels are
/// ~8 us a layer faster alone (83.5 against 74.4% of copy bandwidth) and stay chosen.
/// The choice it gives is a prior: once the KV cache exists, `CudaModel::tune_one_token_step`
/// times the two families' best as whole batch-1 steps and keeps the faster.
pub const ONE_TOKEN_ROUTING_MS: f32 = 0.0045;

/// The time the tuner compares for `kind` measured at `ms` over `tokens` tokens of top-k routing:
/// the tiled kernels at one token pay `ONE_TOKEN_ROUTING_MS` where the fused kernel could route
/// itself (top-k within `MAX_FUSED_TOPK`).
pub fn step_cost_ms(kind: MoeKernel, tokens: usize, top_k: usize, ms: f32) -> f32 {
    let routes_apart = tokens == 1 && top_k <= crate::kernels::MAX_FUSED_TOPK && matches!(kind, MoeKernel::Tiled { .. });
    if routes_apart { ms + ONE_TOKEN_ROUTING_MS } else { ms }
}

/// The fastest fused kernel and the fastest tiled kernel (either ring pairing) at one token in
/// `tune_moe`'s timings, by their time alone; None unless both families ran. A step then
/// decides between them (`CudaModel::tune_one_token_step`).
pub fn one_token_finalists(timings: &[MoeTiming]) -> Option<(MoeKernel, MoeKernel)> {
    let best = |fused: bool| {
        timings
            .iter()
            .filter(|(t, k, ms)| *t == 1 && ms.is_finite() && matches!(k, MoeKernel::Fused { .. }) == fused && matches!(k, MoeKernel::Fused { .. } | MoeKernel::Tiled { .. }))
            .min_by(|a, b| a.2.total_cmp(&b.2))
            .map(|&(_, k, _)| k)
    };
    Some((best(true)?, best(false)?))
}

/// (hidden, intermediate, experts, top-k, tokens) -> the kernel measured fastest.
pub(crate) type MoeChoices = HashMap<(usize, usize, usize, usize, usize), MoeKernel>;

/// One measured candidate: token count, kernel, milliseconds per call.
pub type MoeTiming = (usize, MoeKernel, f32);

impl Kernels {
    /// Times every compiled tiled kernel (two launches and one launch, each ring, then mixed
    /// rings for the best two-launch pair; the MoE GEMM from 2 tokens) on `w` with uniform
    /// random routings of each of `tuned_counts` tokens, and keeps the fastest per token count for
    /// `moe_mxfp4` (as a step pays for it: `step_cost_ms`). Returns every timing (for logs and benches). Row-major weights and
    /// `PEREGRINE_MOE_TUNE=0` tune nothing.
    pub fn tune_moe(&self, w: &MoeWeights, top_k: usize) -> Result<Vec<MoeTiming>> {
        if !matches!(w.layout, MoeLayout::Tiled { .. }) || std::env::var("PEREGRINE_MOE_TUNE").is_ok_and(|v| v == "0") {
            return Ok(Vec::new());
        }
        let (e, h) = (w.num_experts, w.hidden);
        let k_route = top_k.min(e);
        let st = &self.stream;
        let drv = |e: cudarc::driver::DriverError| peregrine_core::Error::Backend(format!("MoE tuning: {e}"));
        let ev = || st.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(drv);
        let (e0, e1) = (ev()?, ev()?);
        // A fixed-seed generator: the same routings every load.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let counts = self.tuned_counts();
        let most = counts.iter().copied().max().unwrap_or(TUNED_TOKENS);
        let x: Vec<f32> = (0..most * h).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
        let x = st.clone_htod(&x).map_err(drv)?;
        // x split as a step's norm writes it for the kernels that read it split (`MoeInput::Split`):
        // candidates are timed as the step runs them, without a split launch of their own.
        let xsplit = self.moe_split_x(&x, most, h)?;
        let mut y: CudaSlice<f32> = st.alloc_zeros(most * h).map_err(drv)?;
        let mut scratch = self.moe_scratch(w, most * k_route)?;
        let mut kinds = Vec::new();
        for &(stages, steps) in TILED_VARIANTS.iter() {
            kinds.push(MoeKernel::tiled(stages, steps));
            kinds.push(MoeKernel::Fused { stages, steps, max_blocks: 0 });
        }
        // The MoE GEMM from 2 tokens (one token keeps the fused kernel that routes itself).
        let gemm_from = if self.gemm_enabled() { 2 } else { usize::MAX };
        let mut timings = Vec::new();
        let mut chosen = Vec::new();
        let mut verify_chosen = Vec::new();
        for &t in &counts {
            // Four routings in turn, so an expert's weights are rarely still in L2.
            let routings = (0..4)
                .map(|_| {
                    let choices: Vec<Vec<(usize, f32)>> = (0..t)
                        .map(|_| {
                            let mut ex: Vec<usize> = (0..e).collect();
                            for j in 0..k_route {
                                let k = j + (next() as usize) % (e - j);
                                ex.swap(j, k);
                            }
                            ex[..k_route].iter().map(|&x| (x, 1.0 / k_route as f32)).collect()
                        })
                        .collect();
                    self.upload_routing(&MoeRouting::new(&choices), e)
                })
                .collect::<Result<Vec<_>>>()?;
            let mut best: Option<(MoeKernel, f32)> = None;
            // Decode rows where the mixed MoE runs (`moe_mixed_at`) are timed in it: a
            // two-launch F16 candidate then takes only the slots of 3+ pairs.
            let mixed = self.moe_mixed_at(w, t);
            let mut measure = |kind: MoeKernel, best: &mut Option<(MoeKernel, f32)>, mixed: bool| -> Result<()> {
                // The tiled kernels as a step runs them: without their combine where the
                // norm after the MoE sums the pairs (`moe_pairs_pay`).
                let leave_pairs = Self::moe_leaves_pairs(w, kind, top_k) && crate::kernels::moe_pairs_pay(top_k, h, t);
                let mut call = |i: usize| {
                    let r = &routings[i % routings.len()];
                    self.moe_mxfp4_run(kind, w, r, &x, MoeInput::Split(&xsplit), &mut scratch, if leave_pairs { None } else { Some(&mut y) }, mixed)
                };
                // A kernel that cannot run this shape (shared memory, top-k) is skipped.
                if call(0).is_err() {
                    return Ok(());
                }
                call(1)?;
                let mut runs = Vec::with_capacity(3);
                for _ in 0..3 {
                    e0.record(st).map_err(drv)?;
                    for i in 0..8 {
                        call(i)?;
                    }
                    e1.record(st).map_err(drv)?;
                    e1.synchronize().map_err(drv)?;
                    runs.push(e0.elapsed_ms(&e1).map_err(drv)? / 8.0);
                }
                runs.sort_by(f32::total_cmp);
                let ms = runs[1];
                timings.push((t, kind, ms));
                let cost = step_cost_ms(kind, t, top_k, ms);
                if best.is_none_or(|(_, b)| cost < b) {
                    *best = Some((kind, cost));
                }
                Ok(())
            };
            // Token counts on FP8 digits (`moe_fp8_at`) stay on the digit rings (`DG_RINGS`) of
            // the fused and two-launch kernels, which agree bit for bit: the other kernels' bits
            // are other, and a choice by timing would make the bits a matter of luck.
            // Rows that may share experts (a verify block's) stay off the digits, whose passes
            // take one pair each: the fastest F16 kernel is kept for them too (from 2 tokens; the
            // tiled kernels on rings that are not digit rings, and the MoE GEMM).
            let digits = self.moe_fp8_at(w, t);
            let mut verify_best: Option<(MoeKernel, f32)> = None;
            for &kind in kinds.iter().chain((t >= gemm_from).then_some(&MoeKernel::Gemm)) {
                if !digits || self.moe_kind_on_digits(kind, w, t) {
                    measure(kind, &mut best, mixed)?;
                } else if t >= 2 && !matches!(kind, MoeKernel::Fused { .. }) {
                    measure(kind, &mut verify_best, false)?;
                }
            }
            verify_chosen.push((t, verify_best.map(|(kind, _)| kind)));
            // The two launches may stream with different rings (gate_up's tiles are twice as
            // long as down's at MiMo-V2 shapes): from the best same-ring pair, the best down ring
            // for its gate_up ring, then the best gate_up ring for that down ring. A gate_up ring
            // whose passes would stage fewer pairs than the same-ring winner's is not tried:
            // uniform routing does not see what that costs where tokens share experts (a verify
            // block's), which is another pass over those experts' weights (H100, Flash 4 / 8
            // tokens all drawn from 16 experts: 68.5 -> 62.0% / 49.3 -> 45.2% of copy bandwidth
            // for +3 / +2 points on uniform routing). What mixed rings gain within that rule:
            // Flash 2 tokens and Pro 2-8 tokens, 1-2.5 points of copy bandwidth
            // (benches/results/2026-11-24-moe-mixed-rings.md).
            if let Some((MoeKernel::Tiled { stages, steps, .. }, _)) = best {
                let pairs = self.moe_tiled_staged_pairs(w, stages, steps, t)?;
                let mut tiled_best: Option<(MoeKernel, f32)> = best;
                for &(ds, dc) in TILED_VARIANTS.iter().filter(|&&d| d != (stages, steps)) {
                    let kind = MoeKernel::Tiled { stages, steps, down_stages: ds, down_steps: dc };
                    if !digits || self.moe_kind_on_digits(kind, w, t) {
                        measure(kind, &mut tiled_best, mixed)?;
                    }
                }
                if let Some((MoeKernel::Tiled { down_stages, down_steps, .. }, _)) = tiled_best {
                    for &(gs, gc) in TILED_VARIANTS.iter().filter(|&&g| g != (stages, steps) && g != (down_stages, down_steps)) {
                        let kind = MoeKernel::Tiled { stages: gs, steps: gc, down_stages, down_steps };
                        if self.moe_tiled_staged_pairs(w, gs, gc, t)? >= pairs && (!digits || self.moe_kind_on_digits(kind, w, t)) {
                            measure(kind, &mut tiled_best, mixed)?;
                        }
                    }
                }
                best = tiled_best;
            }
            if let Some((kind, _)) = best {
                chosen.push((t, kind));
            }
        }
        let mut table = self.moe_choices.lock().map_err(|_| peregrine_core::Error::Backend("MoE choices lock poisoned".into()))?;
        for (t, kind) in chosen {
            table.insert((h, w.inter, e, top_k, t), kind);
        }
        drop(table);
        let mut table = self.moe_verify_choices.lock().map_err(|_| peregrine_core::Error::Backend("MoE choices lock poisoned".into()))?;
        for (t, kind) in verify_chosen {
            match kind {
                Some(kind) => table.insert((h, w.inter, e, top_k, t), kind),
                None => table.remove(&(h, w.inter, e, top_k, t)),
            };
        }
        Ok(timings)
    }

    /// The tuned kernel off the digits for rows that may share experts (`moe_verify_choices`).
    pub fn tuned_verify_moe(&self, w: &MoeWeights, top_k: usize, tokens: usize) -> Option<MoeKernel> {
        let table = self.moe_verify_choices.lock().ok()?;
        table.get(&(w.hidden, w.inter, w.num_experts, top_k, tokens)).copied()
    }

    /// The tuned kernel for this shape and token count, if `tune_moe` measured one.
    pub fn tuned_moe(&self, w: &MoeWeights, top_k: usize, tokens: usize) -> Option<MoeKernel> {
        let table = self.moe_choices.lock().ok()?;
        table.get(&(w.hidden, w.inter, w.num_experts, top_k, tokens)).copied()
    }

    /// Makes `kind` the choice `tuned_moe` gives for `w`'s shape at `tokens` tokens (tests pin
    /// the kernel a path needs).
    pub fn pin_moe(&self, w: &MoeWeights, top_k: usize, tokens: usize, kind: MoeKernel) {
        if let Ok(mut table) = self.moe_choices.lock() {
            table.insert((w.hidden, w.inter, w.num_experts, top_k, tokens), kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tuned_counts_up_to;

    /// At one token the tiled kernels pay for the routing launches a step then needs; the fused
    /// kernel, other token counts and top-k past what the fused kernel routes do not.
    #[test]
    fn one_token_tiled_kernels_pay_for_their_routing() {
        use super::{step_cost_ms, ONE_TOKEN_ROUTING_MS};
        use crate::MoeKernel;
        let tiled = MoeKernel::tiled(3, 4);
        assert_eq!(step_cost_ms(tiled, 1, 8, 0.04), 0.04 + ONE_TOKEN_ROUTING_MS);
        assert_eq!(step_cost_ms(MoeKernel::FUSED, 1, 8, 0.04), 0.04);
        assert_eq!(step_cost_ms(tiled, 2, 8, 0.04), 0.04);
        assert_eq!(step_cost_ms(tiled, 1, 64, 0.04), 0.04);
        assert_eq!(step_cost_ms(MoeKernel::Gemm, 1, 8, 0.04), 0.04);
        // Flash's one-token kernels alone in this session's bench: the tiled 4 x 4 two launches
        // ~1.6 us faster than the fused 2 x 4, which the routing launches outweigh.
        assert!(step_cost_ms(tiled, 1, 8, 0.0440) > step_cost_ms(MoeKernel::FUSED, 1, 8, 0.0456));
    }

    /// The step-level choice at one token starts from the fastest of each family alone; other
    /// token counts, the GEMM and non-finite times do not take part.
    #[test]
    fn one_token_finalists_are_each_familys_fastest() {
        use super::one_token_finalists;
        use crate::MoeKernel;
        let fused = |s| MoeKernel::Fused { stages: s, steps: 4, max_blocks: 0 };
        let t = vec![
            (1, fused(2), 0.046),
            (1, fused(3), 0.045),
            (1, MoeKernel::tiled(3, 4), 0.048),
            (1, MoeKernel::Tiled { stages: 3, steps: 4, down_stages: 2, down_steps: 4 }, 0.047),
            (1, MoeKernel::tiled(4, 4), f32::NAN),
            (1, MoeKernel::Gemm, 0.001),
            (2, MoeKernel::tiled(2, 3), 0.010),
            (2, fused(4), 0.010),
        ];
        assert_eq!(one_token_finalists(&t), Some((fused(3), MoeKernel::Tiled { stages: 3, steps: 4, down_stages: 2, down_steps: 4 })));
        assert_eq!(one_token_finalists(&t[..2]), None);
        assert_eq!(one_token_finalists(&t[2..4]), None);
        assert_eq!(one_token_finalists(&[]), None);
    }

    /// The tuner measures 1-8 tokens one by one, then the decode buckets up to its largest.
    #[test]
    fn tuned_buckets_by_bandwidth() {
        // (PEREGRINE_MOE_TUNE_TOKENS, a measurement switch, overrides both.)
        if std::env::var_os("PEREGRINE_MOE_TUNE_TOKENS").is_none() {
            assert_eq!(super::tune_tokens_for(4.8e12), 64, "an H200 tunes 64 rows too");
            assert_eq!(super::tune_tokens_for(3.35e12), 48, "an H100 tunes up to 48 rows");
        }
    }

    #[test]
    fn tuned_token_counts() {
        assert_eq!(tuned_counts_up_to(32), vec![1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32]);
        assert_eq!(tuned_counts_up_to(8), vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(tuned_counts_up_to(64), vec![1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64]);
        assert_eq!(tuned_counts_up_to(4), vec![1, 2, 3, 4]);
    }
}
