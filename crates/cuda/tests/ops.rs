//! The model-level GPU operations: the router and token/expert grouping kernels against the CPU
//! reference (`peregrine_cpu::model::route`, `MoeRouting::new`) on fresh random logits, and
//! synthetic-weight models (greedy ids on the GPU equal the argmax of the returned logits; a
//! prefill equals the same tokens decoded one by one). They say `skipped:` and pass only on a
//! machine with no GPU at all (no driver, or no device) and without `PEREGRINE_REQUIRE_GPU`; a GPU
//! that cannot be opened (a context lost to an earlier test) fails them (`probe_for_tests`).
//! scripts/gpu-check.sh runs them on the GPU machine with the variable set.

use std::path::Path;

use peregrine_core::backend::{Backend, KvConfig, OutputRows, SeqForward};
use peregrine_core::{ModelSpec, MoeSpec, RouterScoring};
use peregrine_cuda::kernels::{MoeInput, MoeWeights};
use peregrine_cuda::{probe_for_tests, CudaModel, Kernels, MoeKernel, MoeRouting};
use rand::{Rng, SeedableRng};

fn rng() -> rand::rngs::StdRng {
    let seed: u64 = std::env::var("PEREGRINE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("seed {seed} (PEREGRINE_TEST_SEED reproduces it)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn spec_of(fixture: &str) -> ModelSpec {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden").join(fixture);
    peregrine_model::config::load_spec(&dir).expect("fixture config")
}

fn argmax_of(v: &[f32]) -> u32 {
    v.iter().enumerate().fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &x)| if x > bv { (i, x) } else { (bi, bv) }).0 as u32
}

fn synthetic(spec: &ModelSpec) -> Option<CudaModel> {
    let g = probe_for_tests(0)?;
    Some(CudaModel::synthetic(g, spec, 7).expect("synthetic model"))
}

/// A MoE layer's router: experts, top-k, expert intermediate size, scoring, correction bias,
/// groups (count, kept), normalised weights, scale.
#[allow(clippy::too_many_arguments)]
fn moe_spec(num_experts: usize, top_k: usize, intermediate_size: usize, scoring: RouterScoring, correction_bias: bool, n_group: usize, topk_group: usize, norm_topk_prob: bool, routed_scaling_factor: f32) -> MoeSpec {
    MoeSpec { num_experts, top_k, intermediate_size, scoring, correction_bias, n_group, topk_group, norm_topk_prob, routed_scaling_factor }
}

/// The GPU's routing choices `got` for one token are the CPU reference's `want`, in its order,
/// and weigh the same to 1e-6, except that experts whose selection scores (the CPU's: sigmoid or
/// softmax, plus the bias) lie within 1e-6 of each other may trade places: the GPU's `expf`
/// differs from the host's `exp` by an ulp or two, which can reorder scores two ulps apart (a
/// Flash-sized router met one such pair, 0x3f72ef75 and 0x3f72ef77, in a few thousand tokens).
/// Each position's choice must score as the reference's choice there does, and none may repeat.
/// Returns how many positions held another (near-tied) expert.
fn assert_choices_match(what: &str, spec: &MoeSpec, logits: &[f32], bias: Option<&[f32]>, got: &[(usize, f32)], want: &[(usize, f32)]) -> usize {
    let mut scores: Vec<f32> = match spec.scoring {
        RouterScoring::Sigmoid => logits.iter().map(|&l| peregrine_cpu::ops::sigmoid(l)).collect(),
        RouterScoring::Softmax => {
            let mut s = logits.to_vec();
            peregrine_cpu::ops::softmax_in_place(&mut s);
            s
        }
    };
    if let Some(b) = bias {
        scores.iter_mut().zip(b).for_each(|(s, b)| *s += b);
    }
    assert_eq!(got.len(), want.len(), "{what}: choices {got:?} against {want:?}");
    let mut distinct: Vec<usize> = got.iter().map(|c| c.0).collect();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), got.len(), "{what}: an expert chosen twice: {got:?}");
    let mut traded = 0;
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        if g.0 != w.0 {
            let (sg, sw) = (scores[g.0], scores[w.0]);
            assert!((sg - sw).abs() <= 1e-6, "{what}: choice {k} is expert {} (score {sg:e}) where the CPU reference chose {} ({sw:e}): {got:?} against {want:?}", g.0, w.0);
            traded += 1;
        }
        assert!(g.1.is_finite() && (g.1 - w.1).abs() <= 1e-6 * w.1.abs().max(1.0), "{what}: choice {k}'s weight {} against {}", g.1, w.1);
    }
    traded
}

#[test]
fn router_and_grouping_match_the_cpu_reference() {
    let Some(mut model) = synthetic(&spec_of("default")) else { return };
    let mut r = rng();
    let moe = |experts, top_k, scoring, bias, n_group, topk_group, norm, scale| moe_spec(experts, top_k, 64, scoring, bias, n_group, topk_group, norm, scale);
    let fused_max = model.fused_group_max();
    let cases = [
        ("flash", moe(256, 8, RouterScoring::Sigmoid, true, 1, 1, true, 1.0)),
        ("pro", moe(384, 8, RouterScoring::Sigmoid, true, 1, 1, true, 1.0)),
        ("deepseek groups", moe(256, 8, RouterScoring::Sigmoid, true, 8, 4, true, 2.5)),
        ("softmax", moe(16, 4, RouterScoring::Softmax, false, 1, 1, false, 1.0)),
        ("softmax groups", moe(64, 6, RouterScoring::Softmax, false, 4, 2, true, 1.0)),
        // The most experts the grouping kernel takes (its per-warp counts fill 64 KB).
        ("1024 experts", moe(1024, 8, RouterScoring::Sigmoid, true, 1, 1, true, 1.0)),
        // More choices than a warp has lanes (moe_route's block-wide grouping of one token).
        ("40 of 64", moe(64, 40, RouterScoring::Sigmoid, true, 1, 1, true, 1.0)),
    ];
    for (name, spec) in cases {
        // Grouped by the routing launch's last block up to the model's fused_group_max tokens,
        // else by moe_group; 64 and 300 tokens both ways (`widen`: the routing launch groups
        // them too, in several chunks).
        for (n, widen) in [(1usize, false), (3, false), (8, false), (64, false), (64, true), (300, false), (300, true)] {
            model.set_fused_group_max(if widen { n } else { fused_max });
            let in_route = n <= model.fused_group_max();
            let logits: Vec<f32> = (0..n * spec.num_experts).map(|_| (r.random::<f32>() - 0.5) * 6.0).collect();
            let bias: Option<Vec<f32>> = spec.correction_bias.then(|| (0..spec.num_experts).map(|_| (r.random::<f32>() - 0.5) * 0.2).collect());
            let (got, routing) = model.route_on_gpu(&spec, &logits, bias.as_deref()).expect("GPU routing");
            let want: Vec<Vec<(usize, f32)>> = logits
                .chunks(spec.num_experts)
                .map(|l| peregrine_cpu::model::route(&spec, l, bias.as_deref()))
                .collect();
            let mut traded = 0;
            for (t, ((g, w), l)) in got.iter().zip(&want).zip(logits.chunks(spec.num_experts)).enumerate() {
                traded += assert_choices_match(&format!("{name} n={n} token {t}"), &spec, l, bias.as_deref(), g, w);
            }
            if traded > 0 {
                eprintln!("{name} n={n}: {traded} choices near-tied with the reference's and traded");
            }
            // The grouping of the GPU's own choices (the same as the reference's but for near ties).
            let host = MoeRouting::new(&got);
            assert_eq!(routing.experts, host.experts, "{name} n={n} (grouped in the routing launch: {in_route}): grouped experts");
            assert_eq!(routing.pair_off, host.pair_off, "{name} n={n} (routing launch {in_route}): pair offsets");
            assert_eq!(routing.pair_tok, host.pair_tok, "{name} n={n} (routing launch {in_route}): pair tokens");
            assert_eq!(routing.tok_pairs, host.tok_pairs, "{name} n={n} (routing launch {in_route}): token pairs");
            for (a, b) in routing.pair_w.iter().zip(&host.pair_w) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{name} n={n}: pair weight {a} vs {b}");
            }
        }
        eprintln!("{name}: routing as the CPU reference (near-tied choices aside)");
    }
    model.set_fused_group_max(fused_max);
    // Ties (logits of three values, some -inf: sigmoid 0) choose the lower index, as the host
    // does, in the register top-K (256 and 384 experts) and the scan (1024).
    for (name, spec) in [("flash", cases[0].1), ("pro", cases[1].1), ("1024 experts", cases[5].1)] {
        for bias_on in [false, true] {
            let logits: Vec<f32> = (0..8 * spec.num_experts).map(|_| [-1.0f32, 0.0, 1.0, f32::NEG_INFINITY][r.random_range(0..4usize)]).collect();
            let bias: Option<Vec<f32>> = bias_on.then(|| (0..spec.num_experts).map(|e| [0.0f32, 0.5][e % 2]).collect());
            let (got, _) = model.route_on_gpu(&spec, &logits, bias.as_deref()).expect("GPU routing of ties");
            for (t, (g, l)) in got.iter().zip(logits.chunks(spec.num_experts)).enumerate() {
                let w = peregrine_cpu::model::route(&spec, l, bias.as_deref());
                assert_eq!(g.iter().map(|c| c.0).collect::<Vec<_>>(), w.iter().map(|c| c.0).collect::<Vec<_>>(), "{name} ties, bias {bias_on}, token {t}: chosen experts");
                assert!(g.iter().zip(&w).all(|(a, b)| (a.1 - b.1).abs() <= 1e-6 * b.1.abs().max(1.0)), "{name} ties, bias {bias_on}, token {t}: weights");
            }
        }
        eprintln!("{name}: ties and -inf logits routed as the CPU reference");
    }
    // NaN logits (a diverged model) leave fewer than K candidates: one token's routing repeats
    // the fallback expert, and its grouping (group_one_token, in the routing block) is the host
    // grouping of the same choices: only real experts, every pair accounted for once.
    // (Flash's 256 experts and Pro's 384: route_top_k_regs with 8 and 16 choices a lane.)
    for (spec, nan_at) in [cases[0].1, cases[1].1].into_iter().flat_map(|s| [(s, vec![0usize]), (s, (0..s.num_experts).collect::<Vec<_>>())]) {
        let mut logits: Vec<f32> = (0..spec.num_experts).map(|_| (r.random::<f32>() - 0.5) * 6.0).collect();
        for &i in &nan_at {
            logits[i] = f32::NAN;
        }
        let (got, routing) = model.route_on_gpu(&spec, &logits, None).expect("GPU routing of NaN logits");
        assert!(routing.experts.iter().all(|&e| (e as usize) < spec.num_experts), "NaN logits, {} experts: experts {:?}", spec.num_experts, routing.experts);
        assert_eq!(routing.pair_off.last().copied(), Some(spec.top_k as i32), "NaN logits ({} NaN of {}): pair offsets {:?}", nan_at.len(), spec.num_experts, routing.pair_off);
        assert!(routing.pair_off.windows(2).all(|w| w[0] < w[1]), "NaN logits, {} experts: every used expert has pairs: {:?}", spec.num_experts, routing.pair_off);
        let mut seen = routing.tok_pairs.clone();
        seen.sort();
        assert_eq!(seen, (0..spec.top_k as i32).collect::<Vec<_>>(), "NaN logits, {} experts: every pair in exactly one slot", spec.num_experts);
        let host = MoeRouting::new(&got);
        assert_eq!((&routing.experts, &routing.pair_off, &routing.pair_tok, &routing.tok_pairs), (&host.experts, &host.pair_off, &host.pair_tok, &host.tok_pairs), "NaN logits ({} NaN of {}): grouping", nan_at.len(), spec.num_experts);
        assert!(routing.pair_w.iter().zip(&host.pair_w).all(|(a, b)| a.to_bits() == b.to_bits()), "NaN logits, {} experts: pair weights", spec.num_experts);
    }
}

/// The routing launch of a decode batch in one block (`moe_route_block`: a warp routes each
/// token, the block groups every pair from shared memory) gives what the block-a-token launch
/// gives (its last block grouping from L2), bit for bit: the choices, their weights and the
/// grouping, over 2-32 tokens of Flash's and Pro's routers, without a bias, unnormalised and
/// scaled, on random logits, ties (logits of four values, -inf among them) and NaN logits (a
/// token with one, a token with all: the fallback expert repeated); the choices are the CPU
/// reference's where the logits are finite (near-tied ones may trade places:
/// `assert_choices_match`) and the grouping is the host's of the same choices.
#[test]
fn routing_in_one_block_equals_the_block_a_token_launch() {
    let Some(mut model) = synthetic(&spec_of("default")) else { return };
    let mut r = rng();
    let before = model.set_route_block_tokens(32);
    let cases = [
        ("flash", moe_spec(256, 8, 64, RouterScoring::Sigmoid, true, 1, 1, true, 1.0)),
        ("pro", moe_spec(384, 8, 64, RouterScoring::Sigmoid, true, 1, 1, true, 1.0)),
        ("no bias", moe_spec(256, 8, 64, RouterScoring::Sigmoid, false, 1, 1, true, 1.0)),
        ("7 of 40, unnormalised, scaled", moe_spec(40, 7, 64, RouterScoring::Sigmoid, true, 1, 1, false, 2.5)),
    ];
    for (name, spec) in cases {
        for n in [2usize, 3, 5, 8, 16, 32] {
            assert!(model.routes_in_one_block(&spec, n), "{name}: {n} tokens not routed in one block");
            for form in ["random", "ties", "nan"] {
                let e = spec.num_experts;
                let mut logits: Vec<f32> = match form {
                    "ties" => (0..n * e).map(|_| [-1.0f32, 0.0, 1.0, f32::NEG_INFINITY][r.random_range(0..4usize)]).collect(),
                    _ => (0..n * e).map(|_| (r.random::<f32>() - 0.5) * 6.0).collect(),
                };
                if form == "nan" {
                    logits[r.random_range(0..e)] = f32::NAN;
                    logits[e..2 * e].fill(f32::NAN);
                }
                let bias: Option<Vec<f32>> = spec.correction_bias.then(|| (0..e).map(|_| (r.random::<f32>() - 0.5) * 0.2).collect());
                model.set_route_block_tokens(1);
                let (want, want_r) = model.route_on_gpu(&spec, &logits, bias.as_deref()).expect("routing, a block a token");
                model.set_route_block_tokens(32);
                let (got, got_r) = model.route_on_gpu(&spec, &logits, bias.as_deref()).expect("routing in one block");
                let what = format!("{name}, {n} tokens, {form}");
                let bits = |c: &Vec<Vec<(usize, f32)>>| c.iter().map(|t| t.iter().map(|&(x, w)| (x, w.to_bits())).collect::<Vec<_>>()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{what}: choices and weights");
                assert_eq!(
                    (&got_r.experts, &got_r.pair_off, &got_r.pair_tok, &got_r.tok_pairs),
                    (&want_r.experts, &want_r.pair_off, &want_r.pair_tok, &want_r.tok_pairs),
                    "{what}: grouping"
                );
                assert_eq!(got_r.pair_w.iter().map(|w| w.to_bits()).collect::<Vec<_>>(), want_r.pair_w.iter().map(|w| w.to_bits()).collect::<Vec<_>>(), "{what}: pair weights");
                let host = MoeRouting::new(&got);
                assert_eq!((&got_r.experts, &got_r.pair_off, &got_r.pair_tok, &got_r.tok_pairs), (&host.experts, &host.pair_off, &host.pair_tok, &host.tok_pairs), "{what}: the host's grouping");
                for (t, (g, l)) in got.iter().zip(logits.chunks(e)).enumerate() {
                    if l.iter().all(|v| !v.is_nan()) {
                        let w = peregrine_cpu::model::route(&spec, l, bias.as_deref());
                        if assert_choices_match(&format!("{what}, token {t}: the CPU reference's experts"), &spec, l, bias.as_deref(), g, &w) > 0 {
                            eprintln!("{what}, token {t}: near-tied choices traded against the CPU reference");
                        }
                    } else if l.iter().all(|v| v.is_nan()) {
                        assert!(g.iter().all(|c| c.0 == 0), "{what}, token {t}: all NaN logits choose the fallback expert 0: {g:?}");
                    }
                }
            }
        }
        eprintln!("{name}: one-block routing identical to the block-a-token launch at 2-32 tokens");
    }
    // Softmax scores and groups keep the block-a-token launch.
    assert!(!model.routes_in_one_block(&moe_spec(16, 4, 64, RouterScoring::Softmax, false, 1, 1, false, 1.0), 4));
    assert!(!model.routes_in_one_block(&moe_spec(256, 8, 64, RouterScoring::Sigmoid, true, 8, 4, true, 2.5), 4));
    assert!(!model.routes_in_one_block(&cases[0].1, 1), "one token keeps its own grouping");
    model.set_route_block_tokens(before);
}

/// One token routed inside the fused MoE kernel (`moe_mxfp4_routed`: every block runs the
/// router and groups the choices itself) equals the routing kernel followed by the fused
/// kernel, bit for bit: each router form, each compiled ring, the widest grid and a 3-block one
/// (blocks then run many items), NaN logits (the fallback expert repeated); the kernel's
/// counters come back to zero. Left uncombined (`moe_mxfp4_routed_pairs`), its pairs sum to
/// the same bits.
#[test]
fn moe_routed_inside_the_fused_kernel_equals_routing_then_moe() {
    let Some(model) = synthetic(&spec_of("default")) else { return };
    let g = model.gpu();
    let mut kern = Kernels::load(g).expect("kernels compile and load");
    let mut r = rng();
    let (h, i) = (512usize, 256usize);
    let moe = |experts, top_k, scoring, bias, n_group, topk_group, norm, scale| moe_spec(experts, top_k, i, scoring, bias, n_group, topk_group, norm, scale);
    // Flash's 256 experts and Pro's 384 (route_top_k_regs' 8 and 16 choices a lane), groups of
    // 256 (the masked choices -inf), and ties (logits of four values, no bias: dozens of equal
    // choices, the lower index first; the fused kernel groups them by warp 0's shuffles).
    let cases = [
        ("sigmoid + bias", moe(64, 8, RouterScoring::Sigmoid, true, 1, 1, true, 1.0), false, false),
        ("Flash's 256 experts", moe(256, 8, RouterScoring::Sigmoid, true, 1, 1, true, 1.0), false, false),
        ("Pro's 384 experts", moe(384, 8, RouterScoring::Sigmoid, true, 1, 1, true, 1.0), false, false),
        ("ties among 256", moe(256, 8, RouterScoring::Sigmoid, false, 1, 1, true, 1.0), false, true),
        ("groups", moe(64, 8, RouterScoring::Sigmoid, true, 8, 4, true, 2.5), false, false),
        ("groups of 256", moe(256, 8, RouterScoring::Sigmoid, true, 8, 4, true, 2.5), false, false),
        ("softmax", moe(16, 4, RouterScoring::Softmax, false, 1, 1, false, 1.0), false, false),
        ("softmax groups", moe(64, 6, RouterScoring::Softmax, false, 4, 2, true, 1.0), false, false),
        ("NaN logits", moe(16, 4, RouterScoring::Sigmoid, false, 1, 1, true, 1.0), true, false),
    ];
    // The tiled family's math, then one token's FP8 digit math (sm_90a: these shapes take it).
    for fp8 in [false, true] {
        kern.set_moe_fp8(fp8);
        for (name, spec, nan, ties) in cases {
            let e = spec.num_experts;
            let bytes = |r: &mut rand::rngs::StdRng, n: usize| -> Vec<u8> { (0..n).map(|_| r.random()).collect() };
            let scales = |r: &mut rand::rngs::StdRng, n: usize| -> Vec<u8> { (0..n).map(|_| r.random_range(118..128)).collect() };
            let (gate, gate_s, up, up_s) = (bytes(&mut r, e * i * h / 2), scales(&mut r, e * i * h / 32), bytes(&mut r, e * i * h / 2), scales(&mut r, e * i * h / 32));
            let (down, down_s) = (bytes(&mut r, e * h * i / 2), scales(&mut r, e * h * i / 32));
            let w = MoeWeights::upload(&g.stream, true, &gate, &gate_s, &up, &up_s, &down, &down_s, e, h, i).unwrap();
            let mut logits: Vec<f32> = if ties {
                (0..e).map(|_| [-1.0f32, 0.0, 0.5, 1.0][r.random_range(0..4usize)]).collect()
            } else {
                (0..e).map(|_| (r.random::<f32>() - 0.5) * 6.0).collect()
            };
            if nan {
                // One NaN, then all: fewer than K candidates repeat the fallback expert.
                logits[3] = f32::NAN;
            }
            let bias: Option<Vec<f32>> = spec.correction_bias.then(|| (0..e).map(|_| (r.random::<f32>() - 0.5) * 0.2).collect());
            let x: Vec<f32> = (0..h).map(|_| r.random::<f32>() - 0.5).collect();
            let up_f = |v: &[f32]| g.stream.clone_htod(v).unwrap();
            let (xd, bd) = (up_f(&x), bias.as_deref().map(up_f));
            let mut all_nan = logits.clone();
            all_nan.iter_mut().for_each(|v| *v = f32::NAN);
            let runs: Vec<Vec<f32>> = if nan { vec![logits, all_nan] } else { vec![logits] };
            for lg in runs {
                let ld2 = up_f(&lg);
                let (_, routing) = model.route_on_gpu(&spec, &lg, bias.as_deref()).expect("GPU routing");
                let dr = kern.upload_routing(&routing, e).unwrap();
                let mut scratch = kern.moe_scratch(&w, spec.top_k).unwrap();
                for &(stages, steps) in peregrine_cuda::kernels::TILED_VARIANTS.iter() {
                    for max_blocks in [0, 3] {
                        let kind = MoeKernel::Fused { stages, steps, max_blocks };
                        let mut want = g.stream.clone_htod(&vec![f32::NAN; h]).unwrap();
                        kern.moe_mxfp4_with(kind, &w, &dr, &xd, MoeInput::Settled, &mut scratch, &mut want).unwrap();
                        let mut got = g.stream.clone_htod(&vec![f32::NAN; h]).unwrap();
                        kern.moe_mxfp4_routed(kind, &spec, &w, &ld2, bd.as_ref(), &xd, MoeInput::Settled, &mut scratch, &mut got).unwrap();
                        // x staged after the wait (as for x from the launch just before) gives the same bits.
                        let mut fresh = g.stream.clone_htod(&vec![f32::NAN; h]).unwrap();
                        kern.moe_mxfp4_routed(kind, &spec, &w, &ld2, bd.as_ref(), &xd, MoeInput::Fresh, &mut scratch, &mut fresh).unwrap();
                        let fresh = g.stream.clone_dtoh(&fresh).unwrap();
                        let (want, got) = (g.stream.clone_dtoh(&want).unwrap(), g.stream.clone_dtoh(&got).unwrap());
                        if !lg.iter().any(|v| v.is_nan()) {
                            assert!(want.iter().all(|v| v.is_finite()), "{name}: the reference MoE output is finite");
                        }
                        assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} ({kind:?}): routed in the kernel differs from routing then the kernel");
                        assert!(fresh.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} ({kind:?}): routed with x staged after the wait differs");
                        assert!(g.stream.clone_dtoh(&scratch.counters).unwrap().iter().all(|&c| c == 0), "{name} ({kind:?}): counters left non-zero");
                        // Left as pairs: the token's K pair indices, each pair's weighted output,
                        // which summed in ascending pair order from 0 are the combine's bits.
                        let k = spec.top_k;
                        let mut tok_pairs = g.stream.clone_htod(&vec![-1i32; k]).unwrap();
                        let poison = vec![f32::NAN; scratch.out.len()];
                        g.stream.memcpy_htod(&poison, &mut scratch.out).unwrap();
                        kern.moe_mxfp4_routed_pairs(kind, &spec, &w, &ld2, bd.as_ref(), &xd, MoeInput::Settled, &mut scratch, &mut tok_pairs).unwrap();
                        let mut tp = g.stream.clone_dtoh(&tok_pairs).unwrap();
                        let out = g.stream.clone_dtoh(&scratch.out).unwrap();
                        tp.sort_unstable();
                        assert_eq!(tp, (0..k as i32).collect::<Vec<_>>(), "{name} ({kind:?}): the token's pair indices");
                        let summed: Vec<f32> = (0..h).map(|c| tp.iter().fold(0f32, |acc, &p| acc + out[p as usize * h + c])).collect();
                        assert!(summed.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} ({kind:?}): the pairs left uncombined do not sum to the combine");
                        assert!(g.stream.clone_dtoh(&scratch.counters).unwrap().iter().all(|&c| c == 0), "{name} ({kind:?}): counters left non-zero after the pairs run");
                    }
                    // The two-launch kernels over the same routing: one token's x is staged before
                    // their wait too, and a slot holding several pairs (the repeated fallback expert
                    // of all-NaN logits) restages them; every tiled kernel gives the same bits.
                    let kind = MoeKernel::tiled(stages, steps);
                    let mut tiled = g.stream.clone_htod(&vec![f32::NAN; h]).unwrap();
                    kern.moe_mxfp4_with(kind, &w, &dr, &xd, MoeInput::Settled, &mut scratch, &mut tiled).unwrap();
                    let mut fused = g.stream.clone_htod(&vec![f32::NAN; h]).unwrap();
                    kern.moe_mxfp4_routed(MoeKernel::Fused { stages, steps, max_blocks: 0 }, &spec, &w, &ld2, bd.as_ref(), &xd, MoeInput::Settled, &mut scratch, &mut fused).unwrap();
                    let (tiled, fused) = (g.stream.clone_dtoh(&tiled).unwrap(), g.stream.clone_dtoh(&fused).unwrap());
                    if kern.moe_fp8_for(&w) {
                        // Other bits, as close: NaN logits give NaN outputs in both.
                        let scale = tiled.iter().filter(|v| v.is_finite()).fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                        let worst = tiled.iter().zip(&fused).map(|(a, b)| if a.is_nan() && b.is_nan() { 0.0 } else { (a - b).abs() / scale }).fold(0f32, f32::max);
                        assert!(worst < 1e-5, "{name} ({kind:?}): the FP8 digit fused kernel is {worst:.2e} off the two launches (relative to their largest output)");
                    } else {
                        assert!(tiled.iter().zip(&fused).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} ({kind:?}): two launches differ from the routed fused kernel");
                    }
                }
            }
            eprintln!("{name}: routed inside the fused kernel, bit-identical (FP8 digits {})", kern.moe_fp8_for(&w));
        }
    }
    kern.set_moe_fp8(true);
    // A kernel other than the fused one is refused, not run.
    let spec = cases[0].1;
    let e = spec.num_experts;
    let zeros = |n: usize| vec![0u8; n];
    let w = MoeWeights::upload(&g.stream, true, &zeros(e * i * h / 2), &zeros(e * i * h / 32), &zeros(e * i * h / 2), &zeros(e * i * h / 32), &zeros(e * h * i / 2), &zeros(e * h * i / 32), e, h, i).unwrap();
    let mut scratch = kern.moe_scratch(&w, spec.top_k).unwrap();
    let (ld, xd) = (g.stream.clone_htod(&vec![0f32; e]).unwrap(), g.stream.clone_htod(&vec![0f32; h]).unwrap());
    let mut y = g.stream.clone_htod(&vec![0f32; h]).unwrap();
    assert!(kern.moe_mxfp4_routed(MoeKernel::TILED, &spec, &w, &ld, None, &xd, MoeInput::Settled, &mut scratch, &mut y).is_err());
}

/// The one-token MoE after the o_proj that did its router (`moe_mxfp4_acc_pairs`: logits from
/// fixed-point sums, x staged as g h times the norm's 1 / rms) equals the routed kernel on
/// those logits and x, bit for bit: with eps 0 and sums of squares of 4 H the norm's 1 / rms
/// is 0.5 exactly, and sums that are multiples of 2^-10 give their logits exactly, so both
/// kernels stage the same fragments. Each compiled ring, the widest grid and a 3-block one
/// (blocks then run several gate_up items), Flash's hidden size, and NaN logits (the fallback
/// expert repeated: a pass of several pairs); the counters come back to zero.
#[test]
fn moe_after_the_oproj_router_equals_the_routed_kernel() {
    use cudarc::driver::DevicePtr;
    let Some(model) = synthetic(&spec_of("default")) else { return };
    let g = model.gpu();
    let st = &g.stream;
    let mut kern = Kernels::load(g).expect("kernels compile and load");
    let mut r = rng();
    for (name, h, i, e, k, nan) in [("H 512", 512usize, 256usize, 64usize, 8usize, false), ("H 4096", 4096, 256, 32, 8, false), ("NaN logits", 512, 256, 16, 4, true)] {
        let spec = moe_spec(e, k, i, RouterScoring::Sigmoid, true, 1, 1, true, 1.0);
        let bytes = |r: &mut rand::rngs::StdRng, n: usize| -> Vec<u8> { (0..n).map(|_| r.random()).collect() };
        let scales = |r: &mut rand::rngs::StdRng, n: usize| -> Vec<u8> { (0..n).map(|_| r.random_range(118..128)).collect() };
        let (gate, gate_s, up, up_s) = (bytes(&mut r, e * i * h / 2), scales(&mut r, e * i * h / 32), bytes(&mut r, e * i * h / 2), scales(&mut r, e * i * h / 32));
        let (down, down_s) = (bytes(&mut r, e * h * i / 2), scales(&mut r, e * h * i / 32));
        let w = MoeWeights::upload(st, true, &gate, &gate_s, &up, &up_s, &down, &down_s, e, h, i).unwrap();
        // Logits k 2^-10 (|k| <= 4096) as sums x 2^40; the kernel's logit is sum 2^-40 x 0.5.
        let units: Vec<i64> = (0..e).map(|_| r.random_range(-4096i64..=4096)).collect();
        let mut sums: Vec<u64> = units.iter().map(|&q| (q << 30) as u64).collect();
        sums.push(0);  // the overflow flag
        let mut logits: Vec<f32> = units.iter().map(|&q| q as f32 * (-11f32).exp2()).collect();
        if nan {
            // A set flag makes every logit NaN: the fallback expert fills every slot.
            *sums.last_mut().unwrap() = 1;
            logits.iter_mut().for_each(|v| *v = f32::NAN);
        }
        let bias: Vec<f32> = (0..e).map(|_| (r.random::<f32>() - 0.5) * 0.2).collect();
        let hg: Vec<f32> = (0..h).map(|_| r.random::<f32>() - 0.5).collect();
        let x: Vec<f32> = hg.iter().map(|v| v * 0.5).collect();
        let (acc, ssq) = (st.clone_htod(&sums).unwrap(), st.clone_htod(&vec![64f32; h / 16]).unwrap());
        let (hgd, xd, ld, bd) = (st.clone_htod(&hg).unwrap(), st.clone_htod(&x).unwrap(), st.clone_htod(&logits).unwrap(), st.clone_htod(&bias).unwrap());
        let route = peregrine_cuda::kernels::RouteInOproj { res: &hgd, norm: &hgd, router: &hgd, experts: e, acc: acc.device_ptr(st).0, copies: 1, ssq: &ssq, hg: &hgd, tok: e + 1 };
        let mut scratch = kern.moe_scratch(&w, k).unwrap();
        // The tiled family's math and one token's FP8 digit math (sm_90a): each agrees with itself.
        for fp8 in [false, true] {
            kern.set_moe_fp8(fp8);
            for &(stages, steps) in peregrine_cuda::kernels::TILED_VARIANTS.iter() {
                for max_blocks in [0, 3] {
                    let kind = MoeKernel::Fused { stages, steps, max_blocks };
                    let mut run = |acc_path: bool| -> (Vec<i32>, Vec<f32>) {
                        let mut tok_pairs = st.clone_htod(&vec![-1i32; k]).unwrap();
                        st.memcpy_htod(&vec![f32::NAN; scratch.out.len()], &mut scratch.out).unwrap();
                        if acc_path {
                            kern.moe_mxfp4_acc_pairs(kind, &spec, &w, &route, 0.0, Some(&bd), &mut scratch, &mut tok_pairs, 0, 0).unwrap();
                        } else {
                            kern.moe_mxfp4_routed_pairs(kind, &spec, &w, &ld, Some(&bd), &xd, MoeInput::Fresh, &mut scratch, &mut tok_pairs).unwrap();
                        }
                        assert!(st.clone_dtoh(&scratch.counters).unwrap().iter().all(|&c| c == 0), "{name} ({kind:?}, after the o_proj's router {acc_path}): counters left non-zero");
                        (st.clone_dtoh(&tok_pairs).unwrap(), st.clone_dtoh(&scratch.out).unwrap()[..k * h].to_vec())
                    };
                    let (want_tp, want) = run(false);
                    let (got_tp, got) = run(true);
                    if !nan {
                        assert!(want.iter().all(|v| v.is_finite()), "{name} ({kind:?}): the routed kernel's pairs are finite");
                    }
                    assert_eq!(got_tp, want_tp, "{name} ({kind:?}): the token's pair indices");
                    let bad = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                    assert_eq!(bad, 0, "{name} ({kind:?}, FP8 digits {fp8}): {bad} of {} pair values differ from the routed kernel's", want.len());
                }
            }
        }
        eprintln!("{name}: the MoE after the o_proj's router equals the routed kernel, bit for bit (FP8 digits {})", kern.moe_fp8_for(&w));
    }
}

fn kv(model: &mut CudaModel, blocks: usize) -> usize {
    let bs = 16;
    model.init_kv(KvConfig { block_size: bs, num_full_blocks: blocks, num_swa_blocks: blocks }).expect("KV cache");
    bs
}

fn seq(id: u64, tokens: Vec<u32>, start_pos: usize, blocks: &[u32], output: OutputRows) -> SeqForward {
    SeqForward { seq_id: id, tokens, start_pos, full_blocks: blocks.to_vec(), swa_blocks: blocks.to_vec(), output }
}

/// One token's MoE on FP8 digits through the whole model (where it is the default: sm_90a at 4
/// TB/s of peak bandwidth and more, the H200; skipped elsewhere): a synthetic model with
/// experts wide enough for it (H and I 256) decodes the same tokens with the digit form and
/// with the F16 form; every step's logits agree within 1e-5 of their scale, and some bits
/// differ (the digit form ran).
#[test]
fn one_token_moe_on_fp8_digits_decodes_as_the_f16_form() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden/default");
    let wide = serde_json::json!({"hidden_size": 256, "moe_intermediate_size": 256});
    let spec = peregrine_model::config::load_spec_with(&dir, wide.as_object()).expect("fixture config");
    let Some(mut model) = synthetic(&spec) else { return };
    if !model.moe_fp8() {
        eprintln!("skipped: one token's MoE does not run on FP8 digits on this GPU");
        return;
    }
    let bs = kv(&mut model, 64);
    let mut r = rng();
    let prompt: Vec<u32> = (0..24).map(|_| r.random_range(0..spec.vocab_size as u32)).collect();
    let vocab = spec.vocab_size;
    let run = |model: &mut CudaModel, id: u64, blocks: &[u32], feed: Option<&[u32]>| -> (Vec<Vec<f32>>, Vec<u32>) {
        let first = model.forward(&[seq(id, prompt.clone(), 0, blocks, OutputRows::Last)]).unwrap().remove(0);
        let mut tok = feed.map_or_else(|| argmax_of(&first.data[..vocab]), |f| f[0]);
        let (mut logits, mut toks) = (Vec::new(), vec![tok]);
        for i in 0..12 {
            let out = model.forward(&[seq(id, vec![tok], prompt.len() + i, blocks, OutputRows::Last)]).unwrap().remove(0);
            logits.push(out.data[..vocab].to_vec());
            tok = feed.map_or_else(|| argmax_of(&out.data[..vocab]), |f| f[i + 1]);
            toks.push(tok);
        }
        (logits, toks)
    };
    let blocks_a: Vec<u32> = (0..48usize.div_ceil(bs) as u32).collect();
    let blocks_b: Vec<u32> = blocks_a.iter().map(|b| b + 10).collect();
    let (digits, toks) = run(&mut model, 1, &blocks_a, None);
    model.set_moe_fp8(false);
    assert!(!model.moe_fp8());
    let (f16, _) = run(&mut model, 2, &blocks_b, Some(&toks));
    let mut differ = 0;
    for (i, (a, b)) in digits.iter().zip(&f16).enumerate() {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale;
        assert!(a.iter().all(|v| v.is_finite()) && worst < 1e-5, "step {i}: the FP8 digit MoE's logits are {worst:.2e} of their scale from the F16 form's");
        differ += a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    }
    assert!(differ > 0, "the FP8 digit form gave the F16 form's bits at every step: it did not run");
    eprintln!("FP8 digit MoE through the model: 12 steps within 1e-5 of the F16 form, {differ} logits differ in some bit");
}

/// Synthetic models of fixture shapes (MXFP4 experts on the grouped path, sliding windows,
/// sinks, K head dim != V head dim): the logits of a prefill equal those of the same tokens
/// decoded one at a time, and greedy ids on the GPU equal the argmax of the returned logits.
#[test]
fn synthetic_models_prefill_equals_decode_and_argmax_on_gpu() {
    for fixture in ["mxfp4", "groups", "mimo_v2_fused"] {
        let spec = spec_of(fixture);
        let Some(mut model) = synthetic(&spec) else { return };
        let bs = kv(&mut model, 64);
        let mut r = rng();
        let len: usize = 40;
        let toks: Vec<u32> = (0..len).map(|_| r.random_range(0..spec.vocab_size as u32)).collect();
        let blocks_a: Vec<u32> = (0..len.div_ceil(bs) as u32).collect();
        let blocks_b: Vec<u32> = (0..len.div_ceil(bs) as u32).map(|b| b + 10).collect();
        let prefill = model.forward(&[seq(1, toks.clone(), 0, &blocks_a, OutputRows::All)]).unwrap().remove(0);
        let vocab = spec.vocab_size;
        let mut worst = 0f32;
        for (p, &t) in toks.iter().enumerate() {
            let step = model.forward(&[seq(2, vec![t], p, &blocks_b, OutputRows::Last)]).unwrap().remove(0);
            let (a, b) = (&prefill.data[p * vocab..(p + 1) * vocab], &step.data[..vocab]);
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            for (x, y) in a.iter().zip(b) {
                assert!(x.is_finite() && y.is_finite(), "{fixture}: non-finite logits at position {p}");
                worst = worst.max((x - y).abs() / scale);
            }
        }
        eprintln!("{fixture}: prefill vs one-by-one decode, max relative difference {worst:.2e}");
        assert!(worst < 1e-4, "{fixture}: prefill and decode differ by {worst:.2e}");
        // Two sequences in one batch (9 rows: a padded graph bucket): the graph replay equals
        // the eager step, and greedy ids on the GPU = argmax of the host logits.
        let batch = [seq(1, vec![toks[0]], len, &(0..4).collect::<Vec<_>>(), OutputRows::Last), seq(2, toks[..8].to_vec(), len, &(10..14).collect::<Vec<_>>(), OutputRows::All)];
        model.set_cuda_graphs(false);
        let eager = model.forward(&batch).unwrap();
        model.set_cuda_graphs(true);
        let logits = model.forward(&batch).unwrap();
        assert!(model.cuda_graphs() >= 2, "{fixture}: decode steps did not use CUDA graphs ({} captured)", model.cuda_graphs());
        for (g, e) in logits.iter().zip(&eager) {
            let scale = e.data.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let worst = g.data.iter().zip(&e.data).fold(0f32, |m, (a, b)| m.max((a - b).abs() / scale));
            assert!(g.data.len() == e.data.len() && worst < 1e-5, "{fixture}: graph replay differs from the eager step by {worst:.2e}");
        }
        let ids = model.forward_argmax(&batch).unwrap();
        for (l, g) in logits.iter().zip(&ids) {
            let want: Vec<u32> = l
                .data
                .chunks(vocab)
                .map(|row| row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32)
                .collect();
            assert_eq!(g, &want, "{fixture}: GPU argmax");
        }
    }
}

/// A decode step of ten sequences (one new token each: the kernels of 8+ rows, among them
/// `attention_v2_heads`) gives each sequence the logits it gets decoded alone (the one-row
/// kernels), eagerly and as a graph replay.
#[test]
fn a_decode_batch_equals_each_sequence_decoded_alone() {
    let spec = spec_of("mimo_v2_fused");
    let Some(mut model) = synthetic(&spec) else { return };
    let bs = kv(&mut model, 256);
    let mut r = rng();
    let vocab = spec.vocab_size;
    // Ten sequences of 20-60 tokens, prefilled, each on blocks of its own.
    let seqs: Vec<(Vec<u32>, Vec<u32>)> = (0..10u32)
        .map(|i| {
            let len = r.random_range(20..60usize);
            let toks: Vec<u32> = (0..len).map(|_| r.random_range(0..vocab as u32)).collect();
            let blocks: Vec<u32> = (0..(len + 1).div_ceil(bs) as u32).map(|b| 20 * i + b).collect();
            (toks, blocks)
        })
        .collect();
    for (i, (toks, blocks)) in seqs.iter().enumerate() {
        model.forward(&[seq(i as u64, toks[..toks.len() - 1].to_vec(), 0, blocks, OutputRows::Last)]).unwrap();
    }
    let step = |i: usize| {
        let (toks, blocks) = &seqs[i];
        seq(i as u64, vec![toks[toks.len() - 1]], toks.len() - 1, blocks, OutputRows::Last)
    };
    let alone: Vec<Vec<f32>> = (0..seqs.len()).map(|i| model.forward(&[step(i)]).unwrap().remove(0).data).collect();
    for graphs in [false, true] {
        model.set_cuda_graphs(graphs);
        let batch: Vec<SeqForward> = (0..seqs.len()).map(step).collect();
        // Twice under graphs: the capture, then a replay.
        for _ in 0..1 + graphs as usize {
            let out = model.forward(&batch).unwrap();
            for (i, (o, a)) in out.iter().zip(&alone).enumerate() {
                let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                let worst = o.data.iter().zip(a).fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale));
                assert!(o.data.len() == vocab && worst < 1e-4, "sequence {i} (graphs {graphs}): the batch's logits differ from its own step's by {worst:.2e}");
            }
        }
    }
}

/// The mxfp4 fixture's model with experts the tiled kernels take (the fixture's 64 x 32 are
/// below their tiles: hidden 256, 16 experts of 128, top-8), synthetic, with 128 KV blocks;
/// None without a GPU.
fn tiled_moe_model() -> Option<(ModelSpec, CudaModel)> {
    synthetic_resized("tests/fixtures/golden/mxfp4/config.json", &[("hidden_size", 256), ("moe_intermediate_size", 128), ("intermediate_size", 256), ("n_routed_experts", 16), ("num_experts_per_tok", 8)])
}

/// A synthetic model of the config.json at `config` (from the repository root) with the
/// `sizes` given, and 128 KV blocks; None without a GPU.
fn synthetic_resized(config: &str, sizes: &[(&str, usize)]) -> Option<(ModelSpec, CudaModel)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(config);
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for &(k, v) in sizes {
        cfg[k] = serde_json::json!(v);
    }
    // Per-layer lists (MiMo-V2.5-Pro's hybrid_layer_pattern, moe_layer_freq) cut to the layers.
    let layers = cfg["num_hidden_layers"].as_u64().unwrap_or(0) as usize;
    for k in ["hybrid_layer_pattern", "moe_layer_freq"] {
        if let Some(list) = cfg[k].as_array_mut() {
            list.truncate(layers);
        }
    }
    let spec = peregrine_model::config::parse_config(&cfg, None).expect("config");
    let mut model = synthetic(&spec)?;
    kv(&mut model, 128);
    Some((spec, model))
}

/// The tiled MoE leaving its routed pairs for the residual add after it to sum gives the same
/// logits, bit for bit, as its down kernel combining them: decode batches of 1 to 8 rows (the
/// two-launch tiled kernels pinned at each size, the fused one at 1 row too), eager and as a
/// CUDA graph, on a synthetic model whose experts take the tiled layout.
#[test]
fn moe_pairs_summed_by_the_norm_equal_the_combine_in_the_moe() {
    let Some((spec, mut model)) = tiled_moe_model() else { return };
    let mut r = rng();
    let vocab = spec.vocab_size;
    for rows in 1..=8usize {
        assert!(model.pin_moe_kernel(rows, MoeKernel::TILED), "the synthetic model has stacked MXFP4 experts");
    }
    for rows in 1..=8usize {
        let toks: Vec<u32> = (0..rows).map(|_| r.random_range(0..vocab as u32)).collect();
        let batch: Vec<SeqForward> = (0..rows).map(|s| seq(s as u64, vec![toks[s]], 0, &[(s * 8) as u32], OutputRows::Last)).collect();
        let got = logits_by_combine(&mut model, &batch, &format!("{rows} rows"));
        for g in &got[1..] {
            assert_eq!(g, &got[0], "{rows} rows: logits differ with the combine in the norm");
        }
        eprintln!("{rows} rows: combine in the norm = combine in the MoE, eager and graphed ({} pair calls so far)", model.moe_pairs_calls());
    }
    // The fused kernel leaves its pairs too, with the same bits: at one token routing inside
    // it (moe_mxfp4_routed_pairs), at 2-3 tokens after moe_route.
    for rows in 1..=3usize {
        assert!(model.pin_moe_kernel(rows, MoeKernel::FUSED));
        let batch: Vec<SeqForward> = (0..rows).map(|s| seq(s as u64, vec![3 + s as u32], 1, &[(s * 8) as u32], OutputRows::Last)).collect();
        let got = logits_by_combine(&mut model, &batch, &format!("fused MoE, {rows} rows"));
        // Eager against eager and graph against graph (at position 1 a graph's attention may
        // split differently from the eager step's: the two agree within 1e-5, not bit for bit).
        assert_eq!(got[1], got[0], "fused MoE, {rows} rows, eager: logits differ with the combine in the norm");
        assert_eq!(got[2], got[3], "fused MoE, {rows} rows, graphed: logits differ with the combine in the norm");
        let scale = got[0].iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let worst = got[0].iter().zip(&got[3]).fold(0f32, |m, (a, b)| m.max((a - b).abs() / scale));
        eprintln!("fused MoE, {rows} rows: combine in the norm = combine in the MoE (eager against graph: {worst:.1e})");
    }
}

/// The router computing the post-attention norm itself at one token (`norm_in_router`: the
/// fused MoE leaving its pairs, the residual add after it adding the attention output) gives
/// the logits of the norm's own launch, bit for bit, eager and graphed, over a few decode steps
/// (the residual carried from step to step through the KV cache).
#[test]
fn router_computing_the_norm_equals_the_norm_launch() {
    let Some((spec, mut model)) = tiled_moe_model() else { return };
    assert!(model.pin_moe_kernel(1, MoeKernel::FUSED));
    model.set_moe_combine_in_norm(true);
    let moe_layers = spec.layers.iter().filter(|l| matches!(l.mlp, peregrine_core::spec::MlpSpec::Moe(_))).count();
    assert!(moe_layers > 0);
    model.set_norm_in_router(true);
    // (The router in the o_proj, which changes the logits' rounding, has a test of its own.)
    model.set_route_in_oproj(false);
    assert_eq!(model.norm_in_router_layers(1), moe_layers, "every MoE layer leaves its norm to the router at one token");
    assert_eq!(model.norm_in_router_layers(2), 0, "only one token does");
    let mut r = rng();
    let toks: Vec<u32> = (0..4).map(|_| r.random_range(0..spec.vocab_size as u32)).collect();
    let mut got: Vec<Vec<Vec<f32>>> = Vec::new();
    for (in_router, graphs) in [(false, false), (true, false), (true, true), (false, true)] {
        model.set_norm_in_router(in_router);
        model.set_cuda_graphs(graphs);
        let steps: Vec<Vec<f32>> = toks
            .iter()
            .enumerate()
            .map(|(p, &t)| model.forward(&[seq(0, vec![t], p, &[0], OutputRows::Last)]).unwrap().into_iter().flat_map(|l| l.data).collect())
            .collect();
        assert!(steps.iter().flatten().all(|v| v.is_finite()), "norm in router {in_router}, graphs {graphs}: non-finite logits");
        got.push(steps);
    }
    assert_eq!(got[1], got[0], "eager: logits differ with the norm in the router");
    assert_eq!(got[2], got[3], "graphed: logits differ with the norm in the router");
    eprintln!("{moe_layers} MoE layers: the router's norm = the norm's launch over {} steps, eager and graphed", toks.len());
}

/// The one-token o_proj doing its MoE's router (`route_in_oproj`: each block adds its rows' part
/// of every expert's logit as a fixed-point integer, the MoE takes the norm's 1 / rms from the
/// blocks' sums of squares and norms x as it stages it) gives the logits of the router's own
/// launch up to f32 rounding, over a few decode steps; it gives the same bits when run again
/// (the integer sums do not depend on the blocks' order) and as a CUDA graph.
#[test]
fn router_in_the_oproj_matches_the_router_launch() {
    let Some((spec, mut model)) = fp8_attention_model() else { return };
    assert!(model.pin_moe_kernel(1, MoeKernel::FUSED));
    model.set_moe_combine_in_norm(true);
    model.set_norm_in_router(true);
    model.set_route_in_oproj(true);
    let moe_layers = spec.layers.iter().filter(|l| matches!(l.mlp, peregrine_core::spec::MlpSpec::Moe(_))).count();
    assert!(moe_layers >= 2, "the test model needs two MoE layers");
    assert_eq!(model.route_in_oproj_layers(1), moe_layers, "every MoE layer's o_proj does its router at one token");
    assert_eq!(model.route_in_oproj_layers(2), 0, "past one token only an MoE on FP8 digit rows takes it, not these 128-wide experts");
    let mut r = rng();
    let toks: Vec<u32> = (0..4).map(|_| r.random_range(0..spec.vocab_size as u32)).collect();
    let mut got: Vec<Vec<f32>> = Vec::new();
    for (in_oproj, graphs) in [(false, false), (true, false), (true, false), (true, true), (false, true)] {
        model.set_route_in_oproj(in_oproj);
        model.set_cuda_graphs(graphs);
        let steps: Vec<f32> = toks
            .iter()
            .enumerate()
            .flat_map(|(p, &t)| model.forward(&[seq(0, vec![t], p, &[0], OutputRows::Last)]).unwrap().into_iter().flat_map(|l| l.data))
            .collect();
        assert!(steps.iter().all(|v| v.is_finite()), "router in the o_proj {in_oproj}, graphs {graphs}: non-finite logits");
        got.push(steps);
    }
    assert_eq!(got[1], got[2], "the router in the o_proj: the same step twice gave other bits");
    assert_runs_close(&got, 0, &[(0, 1), (4, 3)], "router in the o_proj against its launch");
}

/// Past one token, the o_proj doing its MoE's router (`route_in_oproj_at` from 2 up to
/// `route_oproj_rows` decode rows, where the MoE runs the two-launch kernels on FP8 digits: the
/// routing launch reads the o_proj's sums, `moe_route_acc`, and x's digit rows come from its g h
/// and norm parts, `moe_digit_rows_acc`) gives the logits of the norm's and the router's own
/// launches up to f32 rounding, over decode steps of 3, 2, 1, 3 and 2 sequences (the one-token
/// step's fused MoE leaves its sums for the next such layer to zero, so the steps after it
/// check that every token's sums are zero again when an o_proj adds into them); the same bits
/// when run again, as CUDA graphs, and with the routing launch a block a token instead of one
/// block for the batch. Skipped where the MoE does not run on FP8 digits.
#[test]
fn router_in_the_oproj_past_one_token_matches_the_router_launch() {
    let Some((spec, mut model, moe_layers, digit_ring)) = oproj_router_model(&[("moe_intermediate_size", 256)], 4) else { return };
    let mut r = rng();
    let toks: Vec<u32> = (0..16).map(|_| r.random_range(0..spec.vocab_size as u32)).collect();
    // (sequence, position) of each step's rows; sequence s in KV block s.
    let steps: [&[(u64, usize)]; 5] = [&[(0, 0), (1, 0), (2, 0)], &[(0, 1), (1, 1)], &[(0, 2)], &[(0, 3), (1, 2), (2, 1)], &[(1, 3), (2, 2)]];
    // One token on the fused kernel (its o_proj does the router too, and its MoE leaves the
    // token-0 sums to the next such layer's to zero) or on the tiled one (router launched).
    for (one_token, one_token_layers) in [(MoeKernel::FUSED, moe_layers), (digit_ring, 0)] {
        assert!(model.pin_moe_kernel(1, one_token));
        model.set_route_oproj_rows(8);
        assert_eq!(model.route_in_oproj_layers(1), one_token_layers, "{one_token:?}: o_projs doing the router at one row");
        for rows in [2, 3] {
            assert_eq!(model.route_in_oproj_layers(rows), moe_layers, "{one_token:?}: every MoE layer's o_proj does its router at {rows} rows");
        }
        model.set_route_oproj_rows(1);
        assert_eq!(model.route_in_oproj_layers(2), 0, "route_oproj_rows 1: one token only");
        let mut got: Vec<Vec<f32>> = Vec::new();
        // The last run routes a block a token (`moe_route_acc`), the others in one block or
        // cluster (the defaults).
        let (block_tokens, cluster_tokens) = (model.route_block_tokens(), model.route_cluster_tokens());
        assert!(block_tokens.max(cluster_tokens) >= 3 && model.routes_oproj_sums_in_one_block(&first_moe_spec(&spec), 3), "the routing of 2-3 tokens from the o_proj's sums runs in one block or cluster by default");
        for (rows, graphs, block) in [(1, false, block_tokens), (8, false, block_tokens), (8, false, block_tokens), (8, true, block_tokens), (1, true, block_tokens), (8, false, 1)] {
            model.set_route_oproj_rows(rows);
            model.set_route_block_tokens(block);
            model.set_route_cluster_tokens(if block == 1 { 1 } else { cluster_tokens });
            model.set_cuda_graphs(graphs);
            let mut logits = Vec::new();
            for step in steps {
                let batch: Vec<SeqForward> = step.iter().map(|&(s, p)| seq(s, vec![toks[4 * s as usize + p]], p, &[s as u32], OutputRows::Last)).collect();
                logits.extend(model.forward(&batch).unwrap().into_iter().flat_map(|l| l.data));
            }
            assert!(logits.iter().all(|v| v.is_finite()), "{one_token:?}, route_oproj_rows {rows}, graphs {graphs}: non-finite logits");
            got.push(logits);
        }
        assert_eq!(got[1], got[2], "{one_token:?}: the router in the o_proj past one token gave other bits for the same steps");
        assert_eq!(got[1], got[5], "{one_token:?}: routing the o_proj's sums in one block or cluster gave other bits than a block a token");
        model.set_route_block_tokens(block_tokens);
        model.set_route_cluster_tokens(cluster_tokens);
        assert_runs_close(&got, 0, &[(0, 1), (4, 3), (1, 3)], &format!("{one_token:?}: router in the o_proj past one token against its launch"));
    }
}

/// The routing launch over the o_proj's sums in one block (`moe_route_acc_block`: a thread's four
/// (token, expert) entries of 512 and their 8 copies asked for at once at 8 rows of 256
/// experts), and in a cluster of a block per token (each writing its token's scores into block
/// 0's shared memory; by default at 3-8 rows, so the cluster runs at 8 and 5 rows and one block at
/// 2), gives the bits of a block a token (`moe_route_acc`), eager and graphed (a graph's step may
/// differ from an eager one in other kernels' plans, so graphed runs are compared with each
/// other), at 8, 5 and 2 decode rows, and the logits of the router's own launch within f32
/// rounding. Skipped where the MoE does not run on FP8 digits.
#[test]
fn routing_the_oprojs_sums_in_one_block_equals_a_block_a_token() {
    let Some((spec, mut model, moe_layers, _)) = oproj_router_model(&[("moe_intermediate_size", 256), ("n_routed_experts", 256)], 8) else { return };
    model.set_route_oproj_rows(8);
    for rows in [2, 5, 8] {
        assert_eq!(model.route_in_oproj_layers(rows), moe_layers, "every MoE layer's o_proj does its router at {rows} rows");
    }
    // (One block up to 8 tokens here, whatever the default: the kernel is what is tested.)
    let block_tokens = 8;
    let before = model.set_route_block_tokens(block_tokens);
    assert!(model.routes_oproj_sums_in_one_block(&first_moe_spec(&spec), 8), "8 rows of 256 experts are routed in one block from the o_proj's sums");
    let mut r = rng();
    let toks: Vec<u32> = (0..32).map(|_| r.random_range(0..spec.vocab_size as u32)).collect();
    // Decode steps of 8 sequences (positions 0-2), then 5 of them, then 2; sequence s in KV block s.
    let mut steps: Vec<Vec<(u64, usize)>> = (0..3).map(|p| (0..8).map(|s| (s, p)).collect()).collect();
    steps.push((0..5).map(|s| (s, 3)).collect());
    steps.push((0..2).map(|s| (s, 4)).collect());
    // A cluster of a block per token (Hopper: the FP8 digits' GPUs), or one block.
    let cluster = model.route_cluster_tokens();
    assert!(cluster >= 8, "the routing over the o_proj's sums of up to 8 tokens is a cluster by default");
    for rows in [3, 5, 8] {
        assert_eq!(model.oproj_sums_routing_blocks(&first_moe_spec(&spec), rows), Some(rows), "{rows} rows: a cluster of a block a token");
    }
    assert_eq!(model.oproj_sums_routing_blocks(&first_moe_spec(&spec), 2), Some(1), "2 rows: one block");
    model.set_route_cluster_tokens(1);
    assert_eq!(model.oproj_sums_routing_blocks(&first_moe_spec(&spec), 8), Some(1), "route_cluster_tokens 1: one block");
    let mut got: Vec<Vec<f32>> = Vec::new();
    // (route_oproj_rows, route_block_tokens, route_cluster_tokens, graphs): a cluster, a block a
    // token, the same graphed, the router's launch, one block, one block graphed.
    let runs = [(8, block_tokens, cluster, false), (8, 1, 1, false), (8, block_tokens, cluster, true), (8, 1, 1, true), (1, block_tokens, cluster, false), (8, block_tokens, 1, false), (8, block_tokens, 1, true)];
    for (oproj_rows, block, cluster_tokens, graphs) in runs {
        model.set_route_oproj_rows(oproj_rows);
        model.set_route_block_tokens(block);
        model.set_route_cluster_tokens(cluster_tokens);
        model.set_cuda_graphs(graphs);
        let mut logits = Vec::new();
        for step in &steps {
            let batch: Vec<SeqForward> = step.iter().map(|&(s, p)| seq(s, vec![toks[4 * s as usize + p]], p, &[s as u32], OutputRows::Last)).collect();
            logits.extend(model.forward(&batch).unwrap().into_iter().flat_map(|l| l.data));
        }
        assert!(logits.iter().all(|v| v.is_finite()), "route_oproj_rows {oproj_rows}, route_block_tokens {block}, route_cluster_tokens {cluster_tokens}, graphs {graphs}: non-finite logits");
        got.push(logits);
    }
    model.set_route_block_tokens(before);
    model.set_route_cluster_tokens(cluster);
    assert_eq!(got[0], got[1], "routing the o_proj's sums in a cluster gave other bits than a block a token");
    assert_eq!(got[2], got[3], "graphed, routing the o_proj's sums in a cluster gave other bits than a block a token");
    assert_eq!(got[5], got[1], "routing the o_proj's sums in one block gave other bits than a block a token");
    assert_eq!(got[6], got[3], "graphed, routing the o_proj's sums in one block gave other bits than a block a token");
    assert_runs_close(&got, 4, &[(0, 4), (2, 4)], "routing the o_proj's sums in one block against the router's launch");
}

/// Asserts that each pair (i, j) of runs in `got` gives logits within 1e-4 of run `of`'s largest
/// magnitude of each other (f32 rounding, not bits), and prints how close (`what`: the comparison).
fn assert_runs_close(got: &[Vec<f32>], of: usize, pairs: &[(usize, usize)], what: &str) {
    let scale = got[of].iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for &(i, j) in pairs {
        let worst = got[i].iter().zip(&got[j]).fold(0f32, |m, (a, b)| m.max((a - b).abs() / scale));
        assert!(worst < 1e-4, "{what} ({i}, {j}): logits {worst:.1e} of their scale apart");
        eprintln!("{what} ({i}, {j}): {worst:.1e} of the logits' scale");
    }
}

/// `fp8_attention_model_with(more)` set up for its o_proj to do its MoE's router past one
/// token: the two-launch MoE on FP8 digits pinned at 2 up to `max_rows` rows, its pairs left to
/// the norm after it, the norm in the router; with the count of MoE layers and the digit ring.
/// None without a GPU or (saying so) where the MoE does not run on FP8 digits.
fn oproj_router_model(more: &[(&str, usize)], max_rows: usize) -> Option<(ModelSpec, CudaModel, usize, MoeKernel)> {
    let (spec, mut model) = fp8_attention_model_with(more)?;
    if !model.moe_fp8() {
        eprintln!("skipped: the MoE does not run on FP8 digits on this GPU");
        return None;
    }
    let digit_ring = MoeKernel::Tiled { stages: 2, steps: 4, down_stages: 2, down_steps: 4 };
    for t in 2..=max_rows {
        assert!(model.pin_moe_kernel(t, digit_ring));
    }
    model.set_moe_combine_in_norm(true);
    model.set_norm_in_router(true);
    model.set_route_in_oproj(true);
    let moe_layers = spec.layers.iter().filter(|l| matches!(l.mlp, peregrine_core::spec::MlpSpec::Moe(_))).count();
    Some((spec, model, moe_layers, digit_ring))
}

/// The router of `spec`'s first MoE layer.
fn first_moe_spec(spec: &ModelSpec) -> MoeSpec {
    spec.layers.iter().find_map(|l| if let peregrine_core::spec::MlpSpec::Moe(m) = &l.mlp { Some(*m) } else { None }).expect("a MoE layer")
}

/// A synthetic model of MiMo-V2-Flash's form at test size whose attention can start heads as
/// the q/k/v projection finishes them: hidden 256, 8 heads over 4 KV heads of 32 (FP8 q/k/v in
/// whole 128-row scale blocks, stacked), 16 tiled experts of 128, top-8; 3 layers, 128 KV
/// blocks; None without a GPU.
fn fp8_attention_model() -> Option<(ModelSpec, CudaModel)> {
    fp8_attention_model_with(&[])
}

/// `fp8_attention_model` with the config values `more` set as well.
fn fp8_attention_model_with(more: &[(&str, usize)]) -> Option<(ModelSpec, CudaModel)> {
    let mut sizes = vec![
        ("num_hidden_layers", 3),
        ("vocab_size", 512),
        ("hidden_size", 256),
        ("intermediate_size", 256),
        ("num_attention_heads", 8),
        ("num_key_value_heads", 4),
        ("head_dim", 32),
        ("v_head_dim", 32),
        ("n_routed_experts", 16),
        ("num_experts_per_tok", 8),
        ("moe_intermediate_size", 128),
        ("eos_token_id", 2),
    ];
    sizes.extend_from_slice(more);
    synthetic_resized("configs/mimo-v2-flash.json", &sizes)
}

/// Decode attention starting each head as soon as the q/k/v projection has counted its rows in
/// (`gemv_mma_fp8_t1_ready`; `attention_v2_kv_ready_pre`, its warps' first round of 4 K/V rows
/// loaded before its heads are ready, or `attention_v2_kv_ready`, the first 2 of them; both load a
/// later round's 4 positions in two loads) gives the logits of attention waiting for the whole
/// projection (`attention_v2_kv`, 4 positions a round in one), bit for bit, eager and graphed, over
/// 4 decode steps of 1-3 sequences after a 100-token prompt each (so a warp's positions take more
/// than the one round the preload covers, the last one partial); the counters are zero again after
/// every step, whether the o_proj after the attention zeroes them (with the preloading kernel here)
/// or the attention's last block does (without). Flash's sliding window of 128, then one of 21
/// (fewer positions than a round of the block's warps, the last warp's one position alone in its
/// load of two).
#[test]
fn attention_starting_heads_as_projected_equals_waiting_for_the_projection() {
    for window in [None, Some(21)] {
        let more = window.map(|w| ("sliding_window", w));
        let Some((spec, model)) = fp8_attention_model_with(more.as_slice()) else { return };
        starting_heads_as_projected_equals_waiting(&spec, model, window);
    }
}

fn starting_heads_as_projected_equals_waiting(spec: &ModelSpec, mut model: CudaModel, window: Option<usize>) {
    let layers = spec.layers.len();
    let win = window.map_or_else(|| "window 128".to_string(), |w| format!("window {w}"));
    model.set_qkv_ready(true);
    assert_eq!(model.qkv_ready_layers(1), layers, "{win}: every layer's attention starts heads as projected at one row");
    assert_eq!(model.qkv_ready_layers(16), 0, "{win}: not past the one-tile GEMV's 8 tokens");
    let mut r = rng();
    for rows in 1..=3usize {
        const PROMPT: usize = 100;
        let prompts: Vec<Vec<u32>> = (0..rows).map(|_| (0..PROMPT).map(|_| r.random_range(0..spec.vocab_size as u32)).collect()).collect();
        let toks: Vec<Vec<u32>> = (0..4).map(|_| (0..rows).map(|_| r.random_range(0..spec.vocab_size as u32)).collect()).collect();
        // Sequence s holds blocks 8 s .. 8 s + 7 (128 positions of 16).
        let blocks = |s: usize| (0..8).map(|b| (s * 8 + b) as u32).collect::<Vec<u32>>();
        let mut got: Vec<Vec<Vec<f32>>> = Vec::new();
        for (ready, preload, graphs) in [(false, false, false), (true, true, false), (true, false, false), (true, true, true), (true, false, true), (false, false, true)] {
            model.set_qkv_ready(ready);
            model.set_attention_preload(preload);
            model.set_attn_reset_by_next(preload);
            model.set_cuda_graphs(graphs);
            let prompt: Vec<SeqForward> = (0..rows).map(|s| seq(s as u64, prompts[s].clone(), 0, &blocks(s), OutputRows::Last)).collect();
            model.forward(&prompt).unwrap();
            let mut steps = Vec::new();
            for (p, ts) in toks.iter().enumerate() {
                let batch: Vec<SeqForward> = (0..rows).map(|s| seq(s as u64, vec![ts[s]], PROMPT + p, &blocks(s), OutputRows::Last)).collect();
                let logits: Vec<f32> = model.forward(&batch).unwrap().into_iter().flat_map(|l| l.data).collect();
                assert!(logits.iter().all(|v| v.is_finite()), "{win}, {rows} rows, ready {ready}, preload {preload}, graphs {graphs}: non-finite logits");
                assert!(model.qkv_ready_counters().unwrap().iter().all(|&c| c == 0), "{win}, {rows} rows, ready {ready}, preload {preload}, graphs {graphs}: counters left non-zero");
                steps.push(logits);
            }
            got.push(steps);
        }
        assert_eq!(got[1], got[0], "{win}, {rows} rows, eager: logits differ with heads started as projected (K/V preloaded)");
        assert_eq!(got[2], got[0], "{win}, {rows} rows, eager: logits differ with heads started as projected");
        assert_eq!(got[3], got[5], "{win}, {rows} rows, graphed: logits differ with heads started as projected (K/V preloaded)");
        assert_eq!(got[4], got[5], "{win}, {rows} rows, graphed: logits differ with heads started as projected");
        eprintln!("{win}, {rows} rows: heads started as projected (K/V preloaded or not) = after the projection, {layers} layers, 4 steps after {PROMPT} tokens, eager and graphed");
    }
}

/// A ready attention of 2-3 decode rows of 64 heads split to fit the preloading kernel's wave
/// (`attention_v2_kv_ready_pre`, which then runs: 2 / 1 splits on a 132-SM GPU) gives the logits
/// of the same rows split to fill the other ready kernel's wave (3 / 2 splits), within f32
/// rounding (the splits merge in another order), over 4 decode steps after a 100-token prompt
/// each, eager and graphed.
#[test]
fn ready_attention_split_for_the_preloading_kernel_decodes_as_split_to_fill() {
    let sizes = [("num_hidden_layers", 2), ("vocab_size", 512), ("hidden_size", 256), ("intermediate_size", 256), ("num_attention_heads", 64), ("num_key_value_heads", 4), ("head_dim", 32), ("v_head_dim", 32), ("n_routed_experts", 16), ("num_experts_per_tok", 8), ("moe_intermediate_size", 128), ("eos_token_id", 2)];
    let Some((spec, mut model)) = synthetic_resized("configs/mimo-v2-flash.json", &sizes) else { return };
    let layers = spec.layers.len();
    let mut r = rng();
    const PROMPT: usize = 100;
    for rows in 2..=3usize {
        let prompts: Vec<Vec<u32>> = (0..rows).map(|_| (0..PROMPT).map(|_| r.random_range(0..spec.vocab_size as u32)).collect()).collect();
        let toks: Vec<Vec<u32>> = (0..4).map(|_| (0..rows).map(|_| r.random_range(0..spec.vocab_size as u32)).collect()).collect();
        // Sequence s holds blocks 8 s .. 8 s + 7 (128 positions of 16).
        let blocks = |s: usize| (0..8).map(|b| (s * 8 + b) as u32).collect::<Vec<u32>>();
        let mut got: Vec<Vec<Vec<f32>>> = Vec::new();
        for (fit_pre, graphs) in [(true, false), (false, false), (true, true), (false, true)] {
            model.set_attn_ready_pre_fill(fit_pre);
            model.set_cuda_graphs(graphs);
            if fit_pre {
                assert_eq!(model.preloading_attention_layers(rows, 8), layers, "{rows} rows: the preloading kernel should run in every layer");
            }
            let prompt: Vec<SeqForward> = (0..rows).map(|s| seq(s as u64, prompts[s].clone(), 0, &blocks(s), OutputRows::Last)).collect();
            model.forward(&prompt).unwrap();
            let mut steps = Vec::new();
            for (p, ts) in toks.iter().enumerate() {
                let batch: Vec<SeqForward> = (0..rows).map(|s| seq(s as u64, vec![ts[s]], PROMPT + p, &blocks(s), OutputRows::Last)).collect();
                steps.push(model.forward(&batch).unwrap().into_iter().flat_map(|l| l.data).collect::<Vec<f32>>());
                assert!(model.qkv_ready_counters().unwrap().iter().all(|&c| c == 0), "{rows} rows, fit {fit_pre}, graphs {graphs}: counters left non-zero");
            }
            got.push(steps);
        }
        for (a, b, what) in [(0, 1, "eager"), (2, 3, "graphed")] {
            for (step, (x, y)) in got[a].iter().zip(&got[b]).enumerate() {
                let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
                let worst = x.iter().zip(y).fold(0f32, |m, (u, v)| if u.is_finite() { m.max((u - v).abs() / scale) } else { f32::INFINITY });
                assert!(worst < 1e-4, "{rows} rows, {what}, step {step}: split for the preloading kernel differs by {worst:.2e}");
            }
        }
        eprintln!("{rows} rows: split for the preloading kernel ({} of {layers} layers with it split to fill) = split to fill, 4 steps after {PROMPT} tokens, eager and graphed", {
            model.set_attn_ready_pre_fill(false);
            let n = model.preloading_attention_layers(rows, 8);
            model.set_attn_ready_pre_fill(true);
            n
        });
    }
}

/// The preloading ready attention (`attention_v2_kv_ready_pre`) runs only behind a q/k/v
/// projection of one wave: MiMo-V2.5-Pro's 128 heads of 192 + 8 KV heads (1696 tiles of 16
/// rows, past one wave of any of its kernels: at most 9 blocks an SM) at 2 rows never take it,
/// though their grid (256 blocks, one split) is the one Flash-form heads at 4 rows take it with
/// in every layer; the decode steps stay finite and leave the counters at zero. Likewise the
/// input norm after each MLP drains the SMs only ahead of the two-wave projections
/// (`drains_after_mlp`).
#[test]
fn the_preloading_attention_runs_only_behind_a_one_wave_projection() {
    let small = [("num_hidden_layers", 2), ("vocab_size", 512), ("hidden_size", 256), ("intermediate_size", 256), ("n_routed_experts", 16), ("num_experts_per_tok", 8), ("moe_intermediate_size", 128), ("eos_token_id", 2)];
    let flash_heads = [("num_attention_heads", 64), ("num_key_value_heads", 4), ("head_dim", 32), ("v_head_dim", 32)];
    let Some((spec, model)) = synthetic_resized("configs/mimo-v2-flash.json", &[&small[..], &flash_heads[..]].concat()) else { return };
    assert_eq!(model.preloading_attention_layers(4, 8), spec.layers.len(), "Flash-form heads at 4 rows (256 blocks, one-wave projection): the preloading kernel in every layer");
    assert_eq!(model.drained_after_mlp_layers(4), 0, "Flash-form heads at 4 rows: no input norm after an MLP drains the SMs ahead of a one-wave projection");
    let Some((spec, mut model)) = synthetic_resized("configs/mimo-v2.5-pro.json", &small) else { return };
    assert_eq!(model.qkv_ready_layers(2), spec.layers.len(), "Pro-form heads at 2 rows: every layer's attention starts heads as projected");
    assert_eq!(model.preloading_attention_layers(2, 8), 0, "Pro-form heads at 2 rows (a two-wave projection): no layer preloads");
    assert_eq!(model.drained_after_mlp_layers(2), spec.layers.len() - 1, "Pro-form heads at 2 rows: every input norm after an MLP drains the SMs ahead of the two-wave projection");
    assert_eq!(model.drained_after_mlp_layers(1), 0, "one row: no drain after the MLP");
    let mut r = rng();
    let blocks = |s: usize| (0..8).map(|b| (s * 8 + b) as u32).collect::<Vec<u32>>();
    let prompt: Vec<SeqForward> = (0..2).map(|s| seq(s as u64, (0..20).map(|_| r.random_range(0..spec.vocab_size as u32)).collect(), 0, &blocks(s), OutputRows::Last)).collect();
    model.forward(&prompt).unwrap();
    for p in 0..2 {
        let batch: Vec<SeqForward> = (0..2).map(|s| seq(s as u64, vec![r.random_range(0..spec.vocab_size as u32)], 20 + p, &blocks(s), OutputRows::Last)).collect();
        let logits: Vec<f32> = model.forward(&batch).unwrap().into_iter().flat_map(|l| l.data).collect();
        assert!(logits.iter().all(|v| v.is_finite()), "Pro-form heads, step {p}: non-finite logits");
        assert!(model.qkv_ready_counters().unwrap().iter().all(|&c| c == 0), "Pro-form heads, step {p}: counters left non-zero");
    }
    eprintln!("preloading attention and no drain after the MLP: every layer behind Flash-form one-wave projections at 4 rows, none behind Pro-form two-wave ones at 2");
}

/// Decode steps of 48 and 64 rows launch under PDL again (`PEREGRINE_PLAIN_TO_ROWS`, 48 by
/// default): their logits are the plain launches' (every launch waiting for the whole grid
/// ahead), eager and graphed, and a 32-row step keeps launching plainly either way.
#[test]
fn pdl_at_48_and_64_rows_gives_the_plain_launches_logits() {
    let Some((spec, mut model)) = fp8_attention_model() else { return };
    let mut r = rng();
    let default = model.plain_to_rows();
    for rows in [32usize, 48, 64] {
        let batch: Vec<SeqForward> = (0..rows).map(|s| seq(s as u64, vec![r.random_range(0..spec.vocab_size as u32)], 3, &[s as u32], OutputRows::Last)).collect();
        for graphs in [false, true] {
            model.set_cuda_graphs(graphs);
            let mut logits = Vec::new();
            for plain_to in [default, 99] {
                model.set_plain_to_rows(plain_to);
                logits.push(model.forward(&batch).unwrap().into_iter().flat_map(|l| l.data).collect::<Vec<f32>>());
                if graphs {
                    assert!(model.graph_node_kinds(&batch).unwrap().is_some(), "{rows} rows: a decode batch replays a graph");
                }
            }
            model.set_plain_to_rows(default);
            let (pdl, plain) = (&logits[0], &logits[1]);
            let scale = plain.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let worst = pdl.iter().zip(plain).fold(0f32, |m, (a, b)| m.max((a - b).abs() / scale));
            assert!(pdl.len() == rows * spec.vocab_size && pdl.len() == plain.len() && pdl.iter().all(|v| v.is_finite()) && worst < 1e-5, "{rows} rows (graphs {graphs}): the default launches' logits differ from plain launches' by {worst:.2e}");
            eprintln!("{rows} rows (graphs {graphs}): within {worst:.1e} of plain launches");
        }
    }
}

/// A captured decode step is kernel nodes only: its buffers come from the capture pool and
/// its zeroed ones from a kernel, since a memory node or a memset between two kernels would
/// cost them their programmatic edge (crates/cuda/src/alloc.rs). Its logits match the eager
/// step's, and graphs of other sizes captured and replayed since (the pool's memory is shared
/// between graphs) leave a replay's logits bit for bit as they were: the FP8-attention
/// (Flash-form) model at 1-3 decode rows, the tiled-MoE model at 1, 2 and 8.
#[test]
fn captured_steps_are_kernels_only_and_replay_the_eager_step() {
    for (what, rows_set, model) in [("fp8 attention", vec![1usize, 2, 3], fp8_attention_model()), ("tiled MoE", vec![1, 2, 8], tiled_moe_model())] {
        let Some((spec, mut model)) = model else { return };
        let mut r = rng();
        let mut first: Vec<(Vec<SeqForward>, Vec<f32>)> = Vec::new();
        for &rows in &rows_set {
            let batch: Vec<SeqForward> = (0..rows).map(|s| seq(s as u64, vec![r.random_range(0..spec.vocab_size as u32)], 3, &[(s * 8) as u32], OutputRows::Last)).collect();
            model.set_cuda_graphs(false);
            let eager: Vec<f32> = model.forward(&batch).unwrap().into_iter().flat_map(|l| l.data).collect();
            model.set_cuda_graphs(true);
            let graphed: Vec<f32> = model.forward(&batch).unwrap().into_iter().flat_map(|l| l.data).collect();
            let kinds = model.graph_node_kinds(&batch).unwrap().expect("a decode batch replays a graph");
            assert_eq!(kinds.non_kernel(), 0, "{what}, {rows} rows: the captured step holds other nodes than kernels: {kinds:?}");
            let scale = eager.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let worst = graphed.iter().zip(&eager).fold(0f32, |m, (a, b)| m.max((a - b).abs() / scale));
            assert!(graphed.len() == eager.len() && graphed.iter().all(|v| v.is_finite()) && worst < 1e-5, "{what}, {rows} rows: graph replay differs from the eager step by {worst:.2e}");
            eprintln!("{what}, {rows} rows: {kinds:?}, graph within {worst:.1e} of eager");
            first.push((batch, graphed));
        }
        for (batch, want) in &first {
            let again: Vec<f32> = model.forward(batch).unwrap().into_iter().flat_map(|l| l.data).collect();
            assert_eq!(&again, want, "{what}, {} rows: a replay after the other graphs' captures and replays differs", batch.len());
        }
    }
}

/// Every captured decode graph writes its logits into one shared buffer (crate::shared_logits):
/// graphs of several row buckets and two block-table widths hold one buffer of the largest
/// bucket's logits, and each replay, interleaved with the others', still brings back the eager
/// step's logits for its own rows. A batch past the largest bucket runs eagerly and leaves the
/// buffer as it was.
#[test]
fn decode_graphs_share_one_logits_buffer_and_each_replay_reads_its_own() {
    let Some((spec, mut model)) = fp8_attention_model() else { return };
    let mut r = rng();
    let vocab = spec.vocab_size;
    // (rows, blocks in each table): tables of 1 block take the 8-wide graphs, of 9 the 16-wide.
    // Every sequence has blocks of its own (101 of the 128), so no step writes K/V another reads.
    let shapes = [(1usize, 1usize), (3, 1), (2, 9), (7, 9), (16, 1)];
    let mut next_block = 0u32;
    let batches: Vec<Vec<SeqForward>> = shapes
        .iter()
        .map(|&(rows, nb)| {
            (0..rows)
                .map(|s| {
                    let blocks: Vec<u32> = (next_block..next_block + nb as u32).collect();
                    next_block += nb as u32;
                    seq(s as u64, vec![r.random_range(0..vocab as u32)], 3 + 16 * (nb - 1), &blocks, OutputRows::Last)
                })
                .collect()
        })
        .collect();
    model.set_cuda_graphs(false);
    let eager: Vec<Vec<f32>> = batches.iter().map(|b| model.forward(b).unwrap().into_iter().flat_map(|l| l.data).collect()).collect();
    model.set_cuda_graphs(true);
    assert_eq!((model.cuda_graphs(), model.graph_logits_bytes()), (0, 0));
    // Twice through, in another order the second time: every graph is captured on the first
    // pass and replayed between the others' replays on the second.
    let order: Vec<usize> = (0..batches.len()).chain((0..batches.len()).rev()).collect();
    for (pass, &i) in order.iter().enumerate() {
        let got: Vec<f32> = model.forward(&batches[i]).unwrap().into_iter().flat_map(|l| l.data).collect();
        let scale = eager[i].iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let worst = got.iter().zip(&eager[i]).fold(0f32, |m, (a, b)| m.max((a - b).abs() / scale));
        assert!(got.len() == eager[i].len() && got.iter().all(|v| v.is_finite()) && worst < 1e-5, "shape {:?} (call {pass}): the graph's logits differ from the eager step's by {worst:.2e}", shapes[i]);
    }
    assert_eq!(model.cuda_graphs(), shapes.len(), "one graph per shape");
    assert_eq!(model.graph_logits_bytes(), 64 * vocab * 4, "the graphs hold one buffer of 64 rows' logits between them");
    // 65 rows: no bucket holds them, so they run eagerly and the shared buffer is untouched.
    let big: Vec<SeqForward> = (0..65).map(|s| seq(s as u64, vec![r.random_range(0..vocab as u32)], 3, &[s as u32], OutputRows::Last)).collect();
    model.forward(&big).unwrap();
    assert_eq!((model.cuda_graphs(), model.graph_logits_bytes()), (shapes.len(), 64 * vocab * 4));
}

/// A capture that fails (as one out of memory does) costs only its own shape's graph: that
/// shape runs eagerly, with the eager step's logits, and is not captured again; graphs captured
/// before keep replaying and new shapes are still captured; once the KV pools are set again
/// (the graphs dropped with them) the shape is captured.
#[test]
fn a_failed_capture_runs_its_shape_eagerly_and_keeps_the_other_graphs() {
    let Some((spec, mut model)) = fp8_attention_model() else { return };
    let mut r = rng();
    let vocab = spec.vocab_size as u32;
    // Sequences with blocks of their own: 1, 3 and 2 rows.
    let mut next = 0u32;
    let mut batch = |rows: usize| -> Vec<SeqForward> {
        (0..rows)
            .map(|s| {
                next += 1;
                seq(s as u64, vec![r.random_range(0..vocab)], 3, &[next], OutputRows::Last)
            })
            .collect()
    };
    let (a, b, c) = (batch(1), batch(3), batch(2));
    let logits = |m: &mut CudaModel, batch: &[SeqForward]| -> Vec<f32> { m.forward(batch).unwrap().into_iter().flat_map(|l| l.data).collect() };
    let close = |got: &[f32], want: &[f32], what: &str| {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let worst = got.iter().zip(want).fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale));
        assert!(got.len() == want.len() && got.iter().all(|v| v.is_finite()) && worst < 1e-5, "{what}: {worst:.2e} from the eager step");
    };
    model.set_cuda_graphs(false);
    let eager: Vec<Vec<f32>> = [&a, &b, &c].iter().map(|x| logits(&mut model, x)).collect();
    model.set_cuda_graphs(true);
    let a_graph = logits(&mut model, &a);
    close(&a_graph, &eager[0], "1 row, captured");
    assert_eq!(model.cuda_graphs(), 1);
    // The 3-row capture fails: that step runs eagerly, and so does the next of its shape (a
    // second capture would succeed and count).
    model.fail_next_capture();
    close(&logits(&mut model, &b), &eager[1], "3 rows, capture failed");
    let err = model.graph_node_kinds(&b).unwrap_err().to_string();
    assert!(err.contains("fail_next_capture"), "{err}");
    close(&logits(&mut model, &b), &eager[1], "3 rows again");
    assert_eq!(model.cuda_graphs(), 1, "the failed shape is not captured again");
    // The 1-row graph still replays (the same bits), and a new shape is captured.
    assert_eq!(logits(&mut model, &a), a_graph, "the 1-row graph's replay after the failure");
    close(&logits(&mut model, &c), &eager[2], "2 rows, captured after the failure");
    assert_eq!(model.cuda_graphs(), 2);
    assert!(model.graph_node_kinds(&c).unwrap().is_some());
    // New KV pools drop the graphs and the failure with them: the shape is captured.
    kv(&mut model, 128);
    assert_eq!(model.cuda_graphs(), 0);
    close(&logits(&mut model, &b), &eager[1], "3 rows, captured with new pools");
    assert_eq!(model.cuda_graphs(), 1);
}

/// The logits of `batch` with the routed combine in the MoE and in the norm after it, eager
/// and graphed, in the order (MoE, eager), (norm, eager), (norm, graph), (MoE, graph). Eager
/// steps leave the MoE's pairs to the norm exactly when asked (a replayed graph runs no host
/// code, so it is not counted).
fn logits_by_combine(model: &mut CudaModel, batch: &[SeqForward], what: &str) -> Vec<Vec<f32>> {
    let mut got = Vec::new();
    for (combine_in_norm, graphs) in [(false, false), (true, false), (true, true), (false, true)] {
        model.set_moe_combine_in_norm(combine_in_norm);
        model.set_cuda_graphs(graphs);
        let before = model.moe_pairs_calls();
        let logits: Vec<f32> = model.forward(batch).unwrap().into_iter().flat_map(|l| l.data).collect();
        assert!(logits.iter().all(|v| v.is_finite()), "{what}: non-finite logits");
        if !graphs {
            assert_eq!(model.moe_pairs_calls() > before, combine_in_norm, "{what}: pairs left to the norm only when asked");
        }
        got.push(logits);
    }
    got
}

/// A synthetic model of the "default" fixture's shapes with the random DFlash fixture's drafter
/// attached, and three sequences (block tables of 8 blocks) whose 20, 33 and 7 random tokens of
/// context are computed; None without a GPU.
#[allow(clippy::type_complexity)]
fn drafted_model_with_context() -> Option<(CudaModel, peregrine_core::DraftSpec, Vec<Vec<u32>>, [usize; 3])> {
    let spec = spec_of("default");
    let mut model = synthetic(&spec)?;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dflash/random/config.json");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir).unwrap()).unwrap();
    let dspec = peregrine_model::config::parse_draft_config(&cfg).unwrap();
    model.attach_synthetic_drafter(&dspec, 9).unwrap();
    kv(&mut model, 64);
    let mut r = rng();
    let tables: Vec<Vec<u32>> = (0..3u32).map(|s| (0..8).map(|b| s * 8 + b).collect()).collect();
    let lens = [20usize, 33, 7];
    for (i, &len) in lens.iter().enumerate() {
        let toks: Vec<u32> = (0..len).map(|_| r.random_range(0..spec.vocab_size as u32)).collect();
        model.forward(&[seq(i as u64, toks, 0, &tables[i], OutputRows::Last)]).unwrap();
    }
    Some((model, dspec, tables, lens))
}

/// The draft pass replayed from a captured graph equals the eager pass (synthetic target and
/// drafter, two sequences with context, and a padded bucket of three).
#[test]
fn draft_graph_equals_the_eager_draft_pass() {
    use peregrine_core::backend::DraftForward;
    let Some((mut model, dspec, tables, lens)) = drafted_model_with_context() else { return };
    let nd = dspec.block_size - 1;
    for seqs in [2usize, 3] {
        let batch: Vec<DraftForward> = (0..seqs)
            .map(|i| DraftForward { seq_id: i as u64, last_token: 5 + i as u32, start_pos: lens[i], num_drafts: nd, full_blocks: tables[i].clone() })
            .collect();
        model.set_cuda_graphs(false);
        let eager = model.draft(&batch).unwrap();
        model.set_cuda_graphs(true);
        let before = model.cuda_graphs();
        let graphed = model.draft(&batch).unwrap();
        let again = model.draft(&batch).unwrap();
        assert!(model.cuda_graphs() > before, "{seqs} sequences: the draft pass was not captured");
        assert_eq!(graphed, eager, "{seqs} sequences: graph replay drafts differ from the eager pass");
        assert_eq!(again, eager, "{seqs} sequences: second replay differs");
        assert!(eager.iter().all(|d| d.len() == nd));
    }
}

/// The step as data: one Attention and one Mlp per layer in order, the drafter's captures at its
/// target layers, the gather only when some rows are asked for, and logits then argmax last; the
/// attention writes the new K/V itself only in decode plans (one new token per sequence).
#[test]
fn the_step_is_a_plan_of_operations() {
    use peregrine_cuda::step::{Act, NormWeight, Op};
    let spec = spec_of("default");
    let Some(mut model) = synthetic(&spec) else { return };
    let nl = spec.layers.len();
    let plan = model.step_plan(4, None, true);
    eprintln!("{} operations: {:?}", plan.len(), plan);
    let kv_in_attention = |p: &[Op]| p.iter().filter(|o| matches!(o, Op::Attention { kv_in_attention: true, .. })).count();
    assert_eq!(kv_in_attention(&plan), nl, "a decode plan's attention writes the new K/V itself");
    assert_eq!(kv_in_attention(&model.step_plan(4, None, false)), 0, "rows that read each other's new K/V keep the separate write");
    assert_eq!(plan.first(), Some(&Op::EmbedNorm { rows: 4 }));
    assert_eq!(plan.last(), Some(&Op::Argmax { rows: 4 }));
    // A graph that samples: the same operations, the argmax replaced by the sampler.
    let sampled = model.sampled_step_plan(4, true);
    assert_eq!(sampled.last(), Some(&Op::Sample { rows: 4 }));
    assert_eq!(sampled[..sampled.len() - 1], plan[..plan.len() - 1]);
    assert!(!sampled.iter().any(|o| matches!(o, Op::Argmax { .. })));
    let layers_of = |p: &[Op], attn: bool| -> Vec<usize> {
        p.iter()
            .filter_map(|o| match *o {
                Op::Attention { layer, .. } if attn => Some(layer),
                Op::Mlp { layer, .. } if !attn => Some(layer),
                _ => None,
            })
            .collect()
    };
    assert_eq!(layers_of(&plan, true), (0..nl).collect::<Vec<_>>());
    assert_eq!(layers_of(&plan, false), (0..nl).collect::<Vec<_>>());
    assert!(!plan.iter().any(|o| matches!(o, Op::CaptureFeatures { .. } | Op::DraftContext { .. } | Op::GatherRows { .. })));
    // Every row's logits: the last residual add carries the final norm (one launch).
    let finals = |p: &[Op]| p.iter().filter(|o| matches!(o, Op::Norm { dst: Act::Final, .. } | Op::AddNorm { dst: Act::Final, .. })).copied().collect::<Vec<_>>();
    assert_eq!(finals(&plan), [Op::AddNorm { add: Act::MlpOut, dst: Act::Final, weight: NormWeight::Final, rows: 4 }]);
    assert!(!plan.iter().any(|o| matches!(o, Op::Add { .. })));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dflash/random/config.json");
    let dspec = peregrine_model::config::parse_draft_config(&serde_json::from_slice(&std::fs::read(dir).unwrap()).unwrap()).unwrap();
    model.attach_synthetic_drafter(&dspec, 1).unwrap();
    let plan = model.step_plan(6, Some(2), false);
    let captured: Vec<usize> = plan.iter().filter_map(|o| if let Op::CaptureFeatures { layer, .. } = *o { Some(layer) } else { None }).collect();
    let mut want = dspec.target_layer_ids.clone();
    want.sort();
    want.dedup();
    assert_eq!(captured, want);
    let pos = |f: &dyn Fn(&Op) -> bool| plan.iter().position(f).unwrap();
    assert!(pos(&|o| matches!(o, Op::DraftContext { rows: 6 })) < pos(&|o| matches!(o, Op::GatherRows { rows: 2 })));
    assert_eq!(plan.last(), Some(&Op::Argmax { rows: 2 }));
    // Gathered rows: the residual add alone, the final norm over the gathered rows.
    assert_eq!(finals(&plan), [Op::Norm { src: Act::Selected, dst: Act::Final, weight: NormWeight::Final, rows: 2 }]);
    assert_eq!(plan.iter().filter(|o| matches!(o, Op::Add { add: Act::MlpOut, rows: 6 })).count(), 1);
    let none = model.step_plan(6, Some(0), false);
    assert!(!none.iter().any(|o| matches!(o, Op::LmHead { .. } | Op::Argmax { .. })));
}

/// The fused speculative step (draft, verify and accept in one captured graph) equals the two
/// calls it replaces (draft, then a verify forward with the drafts in place, then the host's
/// acceptance), greedy and sampled with bias, eagerly and from the graph, for one sequence and
/// for three (a padded bucket).
#[test]
fn fused_speculative_step_equals_the_two_call_path() {
    use peregrine_core::backend::{accepted_prefix, speculate_in_two_calls, LogitAdjust, RowSampling, SpecSampling};
    let Some((mut model, dspec, tables, lens)) = drafted_model_with_context() else { return };
    let mut r = rng();
    let nb = dspec.block_size;
    let mask = dspec.mask_token_id;
    for seqs in [1usize, 3] {
        let batch: Vec<SeqForward> = (0..seqs)
            .map(|i| seq(i as u64, std::iter::once(5 + i as u32).chain(std::iter::repeat_n(mask, nb - 1)).collect(), lens[i], &tables[i], OutputRows::All))
            .collect();
        let rows: Vec<RowSampling> = (0..seqs * nb)
            .map(|_| RowSampling { temperature: 0.8, top_k: 0, top_p: 0.95, min_p: 0.0, u: r.random::<f64>(), adj_start: 0, adj_len: 2 })
            .collect();
        let adjust = [LogitAdjust { token: 3, bias: 4.0, repetition: 1.0, subtract: 0.0 }, LogitAdjust { token: 11, bias: -2.0, repetition: 1.0, subtract: 0.0 }];
        for (what, sampling) in [("greedy", SpecSampling::Greedy), ("sampled", SpecSampling::Sampled { rows: &rows, adjust: &adjust })] {
            model.set_cuda_graphs(false);
            let two = speculate_in_two_calls(&mut model, &batch, sampling).unwrap().expect("two calls");
            let eager = model.forward_speculative(&batch, sampling).unwrap().expect("a fused step");
            model.set_cuda_graphs(true);
            let before = model.cuda_graphs();
            let graphed = model.forward_speculative(&batch, sampling).unwrap().expect("a fused step");
            let again = model.forward_speculative(&batch, sampling).unwrap().expect("a fused step");
            assert!(model.cuda_graphs() > before, "{seqs} sequences, {what}: the fused step was not captured");
            assert_eq!(eager, two, "{seqs} sequences, {what}: the eager fused step differs from the two calls");
            assert_eq!(graphed, two, "{seqs} sequences, {what}: the fused graph differs from the two calls");
            assert_eq!(again, two, "{seqs} sequences, {what}: the second replay differs");
            for s in &graphed {
                assert_eq!((s.drafts.len(), s.ids.len()), (nb - 1, nb));
                assert_eq!(s.accepted, accepted_prefix(&s.drafts, &s.ids), "{what}: accepted count");
            }
            eprintln!("{seqs} sequences, {what}: accepted {:?}", graphed.iter().map(|s| s.accepted).collect::<Vec<_>>());
        }
    }
}
