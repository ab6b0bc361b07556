//! Whole decode steps of a MiMo-V2-Flash-shaped model with synthetic weights on one GPU (as many
//! layers as fit), against the byte floor: every weight byte a step must stream once (attention
//! FP8 + BF16 o_proj, f32 routers, the dense MLP, the distinct MXFP4 experts the batch routes
//! to, lm_head) plus the KV cache it reads, at the device's measured copy bandwidth.
//! Reports per batch size the median step time and output tokens/s, the cost of verifying
//! 1..8 tokens of one sequence relative to a 1-token step, the cost of a DFlash draft pass
//! (a synthetic drafter of the MiMo-V2.5-Pro drafter's layout at Flash's hidden size), and with
//! `--prefill N,..` the time of one N-token prefill (`--only-prefill`: nothing else; with
//! `--profile-range` one more prefill between cuProfilerStart/Stop, for
//! `ncu --profile-from-start off`).
//!
//!     cargo run --release -p peregrine-cuda --example step_bench -- \
//!         --config configs/mimo-v2-flash.json [--layers N] [--batches 1,8,32,64] [--context 128]
//!
//! The layers kept are those that fit with their KV cache; sliding-window layers get a ring of
//! blocks per sequence (their window and the longest write), so contexts of 32k-128k tokens fit.

use std::time::Instant;

use clap::Parser;
use cudarc::driver::sys::CUevent_flags;
use peregrine_core::backend::{Backend, KvConfig, OutputRows, RowSampling, SeqForward};
use peregrine_core::{KvDtype, MlpSpec, ModelSpec};
use peregrine_cuda::step::Op;
use peregrine_cuda::{probe, CudaModel, MoeKernel};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "configs/mimo-v2-flash.json")]
    config: String,
    /// Decoder layers to keep (default: as many as fit in 85% of the free memory).
    #[arg(long)]
    layers: Option<usize>,
    #[arg(long, default_value = "1,8,32,64", value_delimiter = ',')]
    batches: Vec<usize>,
    /// Tokens of context each sequence holds before the timed steps. Up to 8192 they are
    /// prefilled; past that the K/V pools are random and only the last 64 tokens prefilled.
    #[arg(long, default_value_t = 128)]
    context: usize,
    #[arg(long, default_value_t = 15)]
    steps: usize,
    /// Draft layers of the synthetic drafter (0: no drafter benchmark).
    #[arg(long, default_value_t = 5)]
    draft_layers: usize,
    /// Prompt lengths to time as one prefill each (one sequence, one forward, the last row's
    /// logits; e.g. 512,2048). The KV cache is sized for the longest.
    #[arg(long, value_delimiter = ',')]
    prefill: Vec<usize>,
    /// Time only the prefills (no decode steps, verify or draft passes; e.g. under a profiler).
    #[arg(long)]
    only_prefill: bool,
    /// Bracket one more forward of the longest prompt with cuProfilerStart/Stop (for
    /// `ncu --profile-from-start off`).
    #[arg(long)]
    profile_range: bool,
    /// With kernels built for it (`PEREGRINE_KERNEL_DEFINES=-DSTEP_TRACE`): one graph replay per
    /// batch, kernel by kernel, from the blocks' own %globaltimer stamps (PDL overlap included).
    #[arg(long)]
    trace: bool,
    /// An in-process A/B of the decode-step graph: `tail` (A the fused step tail, B unfused:
    /// `set_step_tail_fused`), `argmax` (A the lm_head folding the argmax, B argmax_rows after
    /// it: `set_lm_head_argmax`) or `shift:BYTES` (A as is, B with its buffers placed BYTES
    /// further on: `shift_step_buffers`). Per batch, graphs of both, replayed `--steps` times each in
    /// turn for `--ab-rounds` rounds; `fetch`: A the copy-free graph, B the graph whose row data
    /// is copied in (`set_copy_free_rows`; replays write no inputs, so B is the step without
    /// `fetch_staged`); `embed`: A the embedding and first norm in one launch, B in two
    /// (`set_embed_norm_fused`); `prefetch`: A the lm_head asking L2 for its first K blocks
    /// before its wait, B not (`set_lm_head_prefetch`); `group:N`: A the grouping by the routing
    /// launch up to the loaded count (32 tokens), B up to N (`set_fused_group_max`); `oproj-rows:N`:
    /// A the o_proj doing its MoE's router up to the loaded count of decode rows (8), B up to N
    /// (`set_route_oproj_rows`; 1: one token only); `route-block:N`: A the routing launch in one
    /// block up to the loaded count of tokens (4), B up to N (`set_route_block_tokens`; 1: a
    /// block a token); `route-cluster:N`: A that launch over the o_proj's sums a cluster of a block
    /// a token up to the loaded count of tokens (8), B up to N (`set_route_cluster_tokens`; 1:
    /// none). `rows` times
    /// the engine's steps instead (host-timed, as the table above: overlapped, then one at a
    /// time), A copy-free, B copying the row data and ids (`set_copy_free_rows`), in turn per
    /// round. `defines:DEFINES` loads every
    /// kernel afresh in `--ab-loads` pairs, A as the model was loaded and B under measurement
    /// defines (`-DX -DY`, as `PEREGRINE_KERNEL_DEFINES` takes them; `load_kernel_set`), the
    /// load order alternating, a row per pair, then the mean over pairs; `defines:` with none is
    /// an A/A. One pair is not enough: where a load's code lies moves the step by up to ~1% (A/A
    /// pairs read -12 to +20 us at batch 1 on H200s, every round, the sign following the load
    /// order within a process, or ~0 on some machines:
    /// benches/results/2026-11-28-kernel-code-placement.md). A pair whose
    /// builds would run different q/k/v kernels (chosen by occupancy at load) says so in a row
    /// of its own. `copies:N`: A the router's sums in the
    /// loaded count of copies, B in N (`set_route_acc_copies`). `moe-grid:N`: A the one-token
    /// fused MoE as chosen, B the same kernel on at most N blocks. `fp8`: A one token's MoE on
    /// FP8 digits (the default on sm_90a), B the same ring on F16 MMAs. `attn-tc-rows:N`: A the
    /// decode attention kernels as loaded, B the tensor-core GQA kernel from N rows. `mixed:N`:
    /// A the MoE as loaded, B the mixed MoE from N decode rows (`set_moe_mixed_from`).
    /// `plain-from:N`: A as loaded, B every launch of a step without PDL from N rows
    /// (`set_plain_from_rows`), `plain-to:N` up to N rows, exclusive (`set_plain_to_rows`).
    /// `drain-from:N`: A as loaded, B the op after each MLP on drained
    /// SMs from N rows (`set_drain_after_mlp_rows`).
    /// `combine-in-norm`: A the tiled MoE combining its pairs itself, B leaving them to the norm
    /// after it (`set_moe_combine_in_norm`; by default the pairs go to the norm where
    /// `kernels::moe_pairs_pay`; the kernels tuned at load kept).
    /// `digits-to:N`: A the MoE as loaded, B on FP8 digits up to N rows and mixed from N + 1
    /// (`set_moe_fp8_tokens`, `set_moe_mixed_from`; the kernels tuned at load kept, so B's F16
    /// half runs the rings tuned for digits; rows taken off the digits also leave the paths
    /// that need them, such as the o_proj doing the router at 2-8 rows).
    /// `heads-splits:N`: A `attention_v2_heads` split to fill the wave, B into at most N.
    /// `pre-fill`: A the ready attention's splits as loaded (by default filling
    /// `attention_v2_kv_ready`'s wave), B the other rule (fitting the wave of
    /// `attention_v2_kv_ready_pre` where that lets it run).
    /// `ready-wave`: A the ready attention filling and fitting `attention_v2_kv_ready`'s own
    /// wave, B `attention_v2_kv`'s (the same where the two take the same registers).
    /// `preload`: A the ready attention by default, B without `attention_v2_kv_ready_pre`
    /// (`attention_v2_kv_ready` wherever the attention is ready, its splits filling its wave).
    /// `drain-one-wave`: A the op after each MLP on drained SMs except before a one-wave ready
    /// q/k/v projection (the default), B drained there too (`set_drain_before_one_wave`).
    /// `chain`: the engine's overlapped steps, A with their tokens read from the step ahead's
    /// ids, B given (host-timed as the table above), and how many distinct ids the chained
    /// steps sample.
    #[arg(long)]
    ab: Vec<String>,
    #[arg(long, default_value_t = 15)]
    ab_rounds: usize,
    /// Pairs of fresh kernel loads a `defines:` A/B measures (see `--ab`); an even count
    /// cancels the load order.
    #[arg(long, default_value_t = 2)]
    ab_loads: usize,
    /// The KV pools' element type (`--kv-cache-dtype` of the server): float32, bfloat16 or fp8. The
    /// floor counts the K/V bytes of that type.
    #[arg(long, default_value = "float32")]
    kv_cache_dtype: KvDtype,
}

/// One graph replay of `batch` (after three untraced ones), launch by launch and summed per
/// kernel: µs from the first block's start; "exposed" is how far each launch moved the end of
/// the timeline (peregrine_cuda::trace::exposed_ns).
fn print_trace(model: &mut CudaModel, batch: &[SeqForward]) {
    use peregrine_cuda::trace::{exposed_ns, launches};
    model.set_cuda_graphs(true);
    model.graph_replay_ms(batch, 3).expect("graph replay");
    if model.step_trace().expect("step trace").is_none() {
        println!("\n(--trace: these kernels carry no stamps; build them with PEREGRINE_KERNEL_DEFINES=-DSTEP_TRACE)");
        return;
    }
    let ms = model.graph_replay_ms(batch, 1).expect("graph replay").unwrap_or(0.0);
    let trace = model.step_trace().expect("step trace").unwrap_or_default();
    assert_eq!(trace.dropped, 0, "more blocks than the stamp arrays hold");
    let stamps = trace.stamps;
    let l = launches(&stamps);
    let exposed = exposed_ns(&l);
    let t0 = l.first().map_or(0, |l| l.start);
    let us = |t: u64| t.saturating_sub(t0) as f64 / 1e3;
    println!("\nbatch {}: one graph replay ({ms:.3} ms by events), {} launches, {} blocks stamped:", batch.len(), l.len(), stamps.len());
    println!("| # | kernel | blocks | start us | first past wait | last past wait | end | exposed us |");
    println!("|---|---|---|---|---|---|---|---|");
    for (i, (x, e)) in l.iter().zip(&exposed).enumerate() {
        println!("| {i} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |", x.kernel, x.blocks, us(x.start), us(x.first_waited), us(x.last_waited), us(x.end), *e as f64 / 1e3);
    }
    // Per kernel: launches, exposed, first start to last end, and first block past its wait to
    // the last end (a streaming kernel's bytes over the last give its rate inside the step, with
    // no launch ramp: its blocks were resident and waiting).
    let mut kinds: Vec<(String, usize, f64, f64, f64)> = Vec::new();
    for (x, e) in l.iter().zip(&exposed) {
        let (exp, dur, run) = (*e as f64 / 1e3, (x.end - x.start) as f64 / 1e3, x.end.saturating_sub(x.first_waited) as f64 / 1e3);
        match kinds.iter_mut().find(|k| k.0 == x.kernel) {
            Some(k) => {
                k.1 += 1;
                k.2 += exp;
                k.3 += dur;
                k.4 += run;
            }
            None => kinds.push((x.kernel.clone(), 1, exp, dur, run)),
        }
    }
    print_trace_marks(&stamps, &l, t0, batch.len());
    kinds.sort_by(|a, b| b.2.total_cmp(&a.2));
    let total: f64 = exposed.iter().sum::<u64>() as f64 / 1e3;
    println!("\nper kernel (exposed us sum to {total:.1}, first start to last end, first past its wait to last end):");
    println!("| kernel | launches | exposed us | share | mean exposed | mean start to end | mean past wait to end |");
    println!("|---|---|---|---|---|---|---|");
    for (name, n, exp, dur, run) in kinds {
        println!("| {name} | {n} | {exp:.1} | {:.1}% | {:.2} | {:.2} | {:.2} |", 100.0 * exp / total.max(1e-9), exp / n as f64, dur / n as f64, run / n as f64);
    }
}

/// The launches whose blocks stamped `TRACE_MARK` points: for each point, when the first block,
/// the median one and the last got there (us from the replay's start). With
/// `PEREGRINE_TRACE_CSV=DIR`, every block's stamps of the replay to DIR/batch-N.csv.
fn print_trace_marks(stamps: &[peregrine_cuda::trace::BlockStamp], l: &[peregrine_cuda::trace::LaunchSpan], t0: u64, batch: usize) {
    let runs = peregrine_cuda::trace::last_runs(stamps);
    let index: std::collections::HashMap<u64, usize> = l.iter().enumerate().map(|(i, x)| (x.grid, i)).collect();
    let us = |t: u64| t.saturating_sub(t0) as f64 / 1e3;
    let mut by_grid: std::collections::HashMap<u64, Vec<&peregrine_cuda::trace::BlockStamp>> = Default::default();
    for s in &runs {
        by_grid.entry(s.grid).or_default().push(s);
    }
    let mut rows = Vec::new();
    for (i, x) in l.iter().enumerate() {
        let blocks = by_grid.get(&x.grid).map_or(&[][..], |v| &v[..]);
        let mut cells = Vec::new();
        for k in 0..3 {
            let mut t: Vec<u64> = blocks.iter().map(|s| s.marks[k]).filter(|&m| m > 0).collect();
            t.sort_unstable();
            cells.push(match t.len() {
                0 => "-".to_string(),
                n => format!("{:.1} / {:.1} / {:.1} ({n})", us(t[0]), us(t[n / 2]), us(t[n - 1])),
            });
        }
        if cells.iter().any(|c| c != "-") {
            rows.push(format!("| {i} | {} | {:.1} | {} | {} | {} | {:.1} |", x.kernel, us(x.last_waited), cells[0], cells[1], cells[2], us(x.end)));
        }
    }
    if !rows.is_empty() {
        println!("\nTRACE_MARK points (us: first / median / last block, and how many blocks got there):");
        println!("| # | kernel | last past wait | mark 0 | mark 1 | mark 2 | end |");
        println!("|---|---|---|---|---|---|---|");
        for r in rows {
            println!("{r}");
        }
    }
    if let Ok(dir) = std::env::var("PEREGRINE_TRACE_CSV") {
        let mut out = String::from("launch,kernel,block,sm,enter_ns,waited_ns,exit_ns,mark0_ns,mark1_ns,mark2_ns\n");
        let rel = |t: u64| if t == 0 { -1 } else { t.saturating_sub(t0) as i64 };
        for s in &runs {
            let Some(&i) = index.get(&s.grid) else { continue };
            out += &format!("{i},{},{},{},{},{},{},{},{},{}\n", s.kernel, s.block, s.sm, rel(s.enter), rel(s.waited), rel(s.exit), rel(s.marks[0]), rel(s.marks[1]), rel(s.marks[2]));
        }
        let path = std::path::Path::new(&dir).join(format!("batch-{batch}.csv"));
        std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, out)).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

/// One `--ab` table row: each setting's median ms per replay, and the rounds' B - A, whose
/// median (us) it returns.
fn print_ab_row(what: &str, batch: usize, a: &[f32], b: &[f32]) -> f64 {
    let diff: Vec<f64> = a.iter().zip(b).map(|(x, y)| (y - x) as f64 * 1e3).collect();
    let slower = diff.iter().filter(|&&d| d > 0.0).count();
    let med = |v: &[f32]| median(v.iter().map(|&x| x as f64).collect());
    let d = median(diff.clone());
    println!("| {what} | {batch} | {:.4} | {:.4} | {d:.1} | {slower} of {} |", med(a), med(b), diff.len());
    d
}

fn gpu_sync(model: &CudaModel) {
    model.gpu().stream.synchronize().unwrap();
}

const BS: usize = 16;
/// Tokens per forward of a sequence's context before the timed steps.
const CONTEXT_CHUNK: usize = 64;
/// Contexts up to this many tokens are prefilled whole; longer ones are random K/V but for
/// their last chunk (`CudaModel::fill_kv_random`).
const PREFILLED_CONTEXT: usize = 8192;

/// As the engine decodes: each step started before the one ahead of it is collected, its tokens
/// read on the GPU from that step's ids (Backend::enqueue_decode); the median gap in ms between
/// consecutive collects over `steps` steps (after 3). Greedy, or sampled with `sampling(i)` for
/// step i (its graph captured already).
fn overlapped_ms(model: &mut CudaModel, decode_batch: &dyn Fn(usize) -> Vec<SeqForward>, b: usize, steps: usize, sampling: Option<&dyn Fn(usize) -> Vec<RowSampling>>) -> f64 {
    overlapped_steps_ms(model, decode_batch, b, steps, sampling, true)
}

/// `overlapped_ms`, with each step's tokens read from the step ahead's ids (`chained`) or
/// given.
fn overlapped_steps_ms(model: &mut CudaModel, decode_batch: &dyn Fn(usize) -> Vec<SeqForward>, b: usize, steps: usize, sampling: Option<&dyn Fn(usize) -> Vec<RowSampling>>, chained: bool) -> f64 {
    let chain: Vec<Option<usize>> = (0..b).map(|r| chained.then_some(r)).collect();
    let rows = |i: usize| sampling.map(|f| f(i));
    fn with(r: &Option<Vec<RowSampling>>) -> Option<(&[RowSampling], &[peregrine_core::backend::LogitAdjust])> {
        r.as_ref().map(|r| (&r[..], &[][..]))
    }
    let r0 = rows(0);
    assert!(model.enqueue_decode(&decode_batch(0), &vec![None; b], with(&r0)).unwrap(), "batch {b}: the decode step did not overlap");
    let mut t = Vec::new();
    let mut last = Instant::now();
    for i in 1..steps + 4 {
        let ri = rows(i);
        assert!(model.enqueue_decode(&decode_batch(i), &chain, with(&ri)).unwrap(), "batch {b}: a chained step did not start");
        model.collect_decode().unwrap();
        if i > 3 {
            t.push(last.elapsed().as_secs_f64() * 1e3);
        }
        last = Instant::now();
    }
    model.collect_decode().unwrap();
    median(t)
}

/// Chained steps `chained_ids` runs before counting.
const CHAINED_STEPS: usize = 8;

/// Distinct ids among a step's rows from the given tokens, and after `CHAINED_STEPS` chained
/// steps (a synthetic model's argmax may fold many rows onto a few tokens, and so onto the
/// same experts).
fn chained_ids(model: &mut CudaModel, decode_batch: &dyn Fn(usize) -> Vec<SeqForward>, b: usize) -> (usize, usize) {
    let distinct = |ids: Vec<u32>| ids.into_iter().collect::<std::collections::HashSet<_>>().len();
    let chain: Vec<Option<usize>> = (0..b).map(Some).collect();
    assert!(model.enqueue_decode(&decode_batch(0), &vec![None; b], None).unwrap(), "batch {b}: the decode step did not overlap");
    let given = distinct(model.collect_decode().unwrap());
    assert!(model.enqueue_decode(&decode_batch(0), &vec![None; b], None).unwrap(), "batch {b}: the decode step did not overlap");
    for i in 1..=CHAINED_STEPS {
        assert!(model.enqueue_decode(&decode_batch(i), &chain, None).unwrap(), "batch {b}: a chained step did not start");
        model.collect_decode().unwrap();
    }
    (given, distinct(model.collect_decode().unwrap()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Bytes of one layer's attention weights (FP8 q/k/v with block scales, BF16 o_proj).
fn attention_bytes(spec: &ModelSpec, li: usize) -> f64 {
    let h = spec.hidden_size as f64;
    let a = spec.layers[li].attention;
    let fp8 = |n: f64, k: f64| n * k + (n / 128.0).ceil() * (k / 128.0).ceil() * 4.0;
    fp8(a.q_dim() as f64, h) + fp8(a.k_dim() as f64, h) + fp8(a.v_dim() as f64, h) + a.o_dim() as f64 * h * 2.0
}

/// Bytes of one layer's weights other than the routed experts, and of one routed expert, in
/// the formats the synthetic model uses.
fn layer_bytes(spec: &ModelSpec, li: usize) -> (f64, f64) {
    let h = spec.hidden_size as f64;
    let l = &spec.layers[li];
    let fp8 = |n: f64, k: f64| n * k + (n / 128.0).ceil() * (k / 128.0).ceil() * 4.0;
    let mut shared = attention_bytes(spec, li) + 2.0 * h * 4.0;
    let mut expert = 0.0;
    match l.mlp {
        MlpSpec::Dense { intermediate_size } => shared += 3.0 * fp8(intermediate_size as f64, h),
        MlpSpec::Moe(m) => {
            shared += m.num_experts as f64 * h * 4.0;
            expert = 3.0 * h * m.intermediate_size as f64 * (0.5 + 1.0 / 32.0);
        }
    }
    (shared, expert)
}

/// Expected distinct experts of E that B tokens with top-k uniform routing touch.
fn distinct_experts(e: usize, k: usize, b: usize) -> f64 {
    e as f64 * (1.0 - (1.0 - k as f64 / e as f64).powi(b as i32))
}

/// How the routing of one eager step compares with the uniform routing the floors assume: per
/// MoE layer the distinct experts, the pairs sharing an expert and the most pairs on one.
fn print_routing(spec: &ModelSpec, b: usize, layers: &[Vec<i32>]) {
    let Some(m) = spec.layers.iter().find_map(|l| match l.mlp {
        MlpSpec::Moe(m) => Some(m),
        MlpSpec::Dense { .. } => None,
    }) else {
        return;
    };
    let expect = distinct_experts(m.num_experts, m.top_k, b);
    let (mut distinct, mut shared, mut most) = (Vec::new(), Vec::new(), Vec::new());
    for ids in layers {
        let mut count = vec![0usize; m.num_experts];
        for &e in ids {
            if let Some(c) = count.get_mut(e as usize) {
                *c += 1;
            }
        }
        distinct.push(count.iter().filter(|&&c| c > 0).count());
        shared.push(count.iter().filter(|&&c| c > 1).sum::<usize>());
        most.push(count.iter().copied().max().unwrap_or(0));
    }
    let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
    println!(
        "routing of this batch-{b} step ({} MoE layers, {} pairs each): distinct experts a layer {:.1} (uniform routing: {expect:.1}; per layer {distinct:?}), pairs on a shared expert {:.1} a layer, the most pairs on one expert {:.1} a layer (per layer {most:?})",
        layers.len(),
        b * m.top_k,
        mean(&distinct),
        mean(&shared),
        mean(&most)
    );
}

struct Floor {
    bytes: f64,
}

fn floor(spec: &ModelSpec, tokens: usize, seqs: usize, context: usize, kv: KvDtype) -> Floor {
    let mut bytes = spec.vocab_size as f64 * spec.hidden_size as f64 * 2.0; // lm_head (BF16)
    for li in 0..spec.layers.len() {
        let (shared, expert) = layer_bytes(spec, li);
        bytes += shared;
        if let MlpSpec::Moe(m) = spec.layers[li].mlp {
            bytes += expert * distinct_experts(m.num_experts, m.top_k, tokens);
        }
        let a = spec.layers[li].attention;
        let span = a.window().map_or(context, |w| w.min(context)) as f64;
        bytes += seqs as f64 * span * (a.k_dim() + a.v_dim()) as f64 * kv.size() as f64; // the KV read
    }
    Floor { bytes }
}

fn main() {
    let args = Args::parse();
    let gpu = match probe(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let text = std::fs::read_to_string(&args.config).expect("config");
    let mut spec = peregrine_model::config::parse_config(&serde_json::from_str(&text).expect("json"), None).expect("config parses");
    let (free, total) = gpu.ctx.mem_get_info().unwrap();
    println!("GPU {} sm_{}{}, {:.1} of {:.1} GiB free", gpu.name, gpu.capability.0, gpu.capability.1, free as f64 / 1073741824.0, total as f64 / 1073741824.0);

    // Copy bandwidth: device-to-device copies of 1 GiB (read + write), median of 10.
    let ev = || gpu.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
    let (e0, e1) = (ev(), ev());
    let copy_bw = {
        let n = 1usize << 30;
        let a = gpu.stream.alloc_zeros::<u8>(n).unwrap();
        let mut b = gpu.stream.alloc_zeros::<u8>(n).unwrap();
        let mut t = Vec::new();
        for i in 0..13 {
            e0.record(&gpu.stream).unwrap();
            gpu.stream.memcpy_dtod(&a, &mut b).unwrap();
            e1.record(&gpu.stream).unwrap();
            e1.synchronize().unwrap();
            if i >= 3 {
                t.push(e0.elapsed_ms(&e1).unwrap() as f64);
            }
        }
        2.0 * n as f64 / (median(t) / 1e3)
    };
    println!("copy bandwidth: {:.0} GB/s", copy_bw / 1e9);

    // KV blocks. Decode sequences get tables for the context and the steps (and verify
    // blocks); the prompts of --prefill run as one more sequence with a table of their own, so
    // long prompts neither multiply the KV cache by the batch nor widen the decode steps' tables
    // (which set their attention splits). Sliding-window layers read only their window, so each
    // decode sequence's sliding-window table maps its blocks onto a ring of blocks holding the
    // window and the longest write (a context chunk or the steps), and long contexts fit.
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    // Decode steps write positions context .. context + 7, verify passes up to context + 8.
    if args.context + 9 > spec.max_position_embeddings {
        eprintln!("--context {} leaves no room for the steps within the model's {} positions (at most {})", args.context, spec.max_position_embeddings, spec.max_position_embeddings.saturating_sub(9));
        std::process::exit(2);
    }
    let per_seq_blocks = (args.context + args.steps + 16).div_ceil(BS) + 1;
    let window = spec.layers.iter().filter_map(|l| l.attention.window()).max().unwrap_or(0);
    let swa_ring = per_seq_blocks.min((window + CONTEXT_CHUNK.max(args.steps + 16)).div_ceil(BS) + 2);
    let prompt_blocks = args.prefill.iter().copied().max().map_or(0, |n| n.div_ceil(BS) + 1);
    let full_blocks = max_batch * per_seq_blocks + prompt_blocks + 1;
    let swa_blocks = max_batch * swa_ring + prompt_blocks + 1;

    // As many layers as fit in 85% of the free memory with their KV cache, leaving the
    // activations room.
    let fixed = spec.vocab_size as f64 * spec.hidden_size as f64 * 4.0 + 6e9;
    let layer_weights: Vec<f64> = (0..spec.layers.len())
        .map(|li| {
            let (s, e) = layer_bytes(&spec, li);
            s + e * match spec.layers[li].mlp {
                MlpSpec::Moe(m) => m.num_experts as f64,
                MlpSpec::Dense { .. } => 0.0,
            }
        })
        .collect();
    let layer_kv = |li: usize| {
        let a = spec.layers[li].attention;
        let kv_blocks = if a.window().is_some() { swa_blocks } else { full_blocks };
        ((kv_blocks + 1) * BS * (a.k_dim() + a.v_dim()) * args.kv_cache_dtype.size()) as f64
    };
    let fit = {
        let mut used = fixed;
        layer_weights.iter().enumerate().take_while(|&(li, &w)| {
            used += w + layer_kv(li);
            used < free as f64 * 0.85
        }).count()
    };
    let layers = args.layers.unwrap_or(fit).min(spec.layers.len());
    spec.layers.truncate(layers);
    let weight_bytes: f64 = layer_weights[..layers].iter().sum::<f64>() + fixed - 6e9;
    println!("model: {} layers of {} ({} full-attention), {:.1} GB of weights", layers, args.config, spec.layers.iter().filter(|l| l.attention.window().is_none()).count(), weight_bytes / 1e9);

    let t0 = Instant::now();
    let mut model = CudaModel::synthetic(gpu, &spec, 1).expect("synthetic weights");
    println!("synthetic weights generated (and the MoE kernels tuned) in {:.1} s", t0.elapsed().as_secs_f64());
    let choices: Vec<String> = model.moe_kernel_choices().iter().map(|(t, k)| format!("{t}: {k:?}")).collect();
    println!("MoE kernel per token count (measured at load): {}", choices.join(", "));
    let draft_spec = (args.draft_layers > 0).then(|| {
        // The MiMo-V2.5-Pro drafter's layout (head_dim 128, 8 KV heads, partial rotary 0.5,
        // non-causal window 1024 with sinks, block 8) at Flash's hidden size.
        let h = spec.hidden_size;
        let ids: Vec<usize> = (0..5).map(|i| i * (layers - 1) / 4).collect();
        let cfg = serde_json::json!({
            "hidden_size": h, "intermediate_size": 4 * h, "num_hidden_layers": args.draft_layers,
            "num_attention_heads": h / 128, "num_key_value_heads": 8, "head_dim": 128,
            "rms_norm_eps": 1e-6, "vocab_size": spec.vocab_size, "max_position_embeddings": 65536,
            "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "sliding_window": 1024,
            "layer_types": vec!["sliding_attention"; args.draft_layers], "use_sliding_window": true,
            "attention_value_scale": 0.612, "add_swa_attention_sink_bias": true, "is_causal": false,
            "dflash_config": {"block_size": 8, "mask_token_id": 1, "target_layer_ids": ids}
        });
        peregrine_model::config::parse_draft_config(&cfg).expect("draft config")
    });
    if let Some(d) = &draft_spec {
        model.attach_synthetic_drafter(d, 2).expect("synthetic drafter");
    }
    model.use_kv_dtype(args.kv_cache_dtype).expect("KV pool type");
    println!("KV pools: {}", args.kv_cache_dtype);
    model.init_kv(KvConfig { block_size: BS, num_full_blocks: full_blocks, num_swa_blocks: swa_blocks }).expect("KV cache");
    if let Some((fused_ms, tiled_ms, kept)) = model.one_token_step_ms() {
        println!("one-token MoE kernel timed as batch-1 steps at KV setup: fused finalist {fused_ms:.4} ms, tiled finalist {tiled_ms:.4} ms; kept {kept:?}");
    }
    let table = |s: usize| -> Vec<u32> { (0..per_seq_blocks).map(|b| (s * per_seq_blocks + b) as u32).collect() };
    let swa_table = |s: usize| -> Vec<u32> { (0..per_seq_blocks).map(|b| (s * swa_ring + b % swa_ring) as u32).collect() };
    let seqf = |s: usize, tokens: Vec<u32>, start: usize, output| SeqForward { seq_id: s as u64, tokens, start_pos: start, full_blocks: table(s), swa_blocks: swa_table(s), output };
    let prompt_table: Vec<u32> = (0..prompt_blocks).map(|b| (max_batch * per_seq_blocks + b) as u32).collect();
    let prompt_swa: Vec<u32> = (0..prompt_blocks).map(|b| (max_batch * swa_ring + b) as u32).collect();
    let prompt = |tokens: Vec<u32>| SeqForward { seq_id: max_batch as u64, tokens, start_pos: 0, full_blocks: prompt_table.clone(), swa_blocks: prompt_swa.clone(), output: OutputRows::Last };
    let tok = |s: usize, p: usize| ((s * 7919 + p * 104_729) % (spec.vocab_size - 8) + 8) as u32;

    // Every sequence's context: up to PREFILLED_CONTEXT tokens prefilled in chunks; a longer
    // context is random K/V with only its last chunk prefilled.
    let prefilled = if args.context > PREFILLED_CONTEXT {
        model.fill_kv_random(7).expect("random K/V");
        args.context - CONTEXT_CHUNK
    } else {
        0
    };
    if prefilled > 0 {
        println!("context: positions 0..{prefilled} random K/V, the last {CONTEXT_CHUNK} prefilled");
    }
    for s in 0..max_batch {
        for c0 in (prefilled..args.context).step_by(CONTEXT_CHUNK) {
            let c1 = (c0 + CONTEXT_CHUNK).min(args.context);
            model.forward(&[seqf(s, (c0..c1).map(|p| tok(s, p)).collect(), c0, OutputRows::None)]).unwrap();
        }
    }

    let batches: &[usize] = if args.only_prefill { &[] } else { &args.batches };
    println!("\n| batch | eager step ms (ids only) | graph step ms (logits to host) | graph step ms (sampled on the GPU) | graph step ms (sampled, 5 logprobs on the GPU) | graph step ms (ids only) | overlapped step ms (ids only) | tokens/s (overlapped) | floor GB | floor ms | step / floor | overlapped / floor |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    #[derive(Clone, Copy)]
    enum Bring {
        Ids,
        Logits,
        Sampled,
        Logprobs,
    }
    for &b in batches {
        // Decode step i of every sequence (positions cycle over 8, so the context stays put).
        let decode_batch = |i: usize| -> Vec<SeqForward> { (0..b).map(|s| seqf(s, vec![tok(s, args.context + i)], args.context + i % 8, OutputRows::Last)).collect() };
        let step = |i: usize, bring: Bring, model: &mut CudaModel| {
            let batch = decode_batch(i);
            match bring {
                Bring::Ids => drop(model.forward_argmax(&batch).unwrap()),
                Bring::Logits => drop(model.forward(&batch).unwrap()),
                Bring::Sampled | Bring::Logprobs => {
                    let rows: Vec<RowSampling> = (0..b).map(|s| RowSampling { temperature: 0.8, top_k: 0, top_p: 0.95, min_p: 0.0, u: ((s * 37 + i) % 100) as f64 / 100.0, adj_start: 0, adj_len: 0 }).collect();
                    if matches!(bring, Bring::Sampled) {
                        drop(model.forward_sample(&batch, &rows, &[]).unwrap());
                    } else {
                        drop(model.forward_sample_logprobs(&batch, &rows, &[], &vec![Some(5); b]).unwrap());
                    }
                }
            }
        };
        let mut timed = |bring: Bring, graphs: bool| {
            model.set_cuda_graphs(graphs);
            for i in 0..3 {
                step(i, bring, &mut model);
            }
            let mut t = Vec::new();
            for i in 0..args.steps {
                let t0 = Instant::now();
                step(i, bring, &mut model);
                t.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            median(t)
        };
        let (eager_ms, logits_ms, sampled_ms, lp_ms, ids_ms) = (timed(Bring::Ids, false), timed(Bring::Logits, true), timed(Bring::Sampled, true), timed(Bring::Logprobs, true), timed(Bring::Ids, true));
        // As the engine decodes: each step started before the one ahead of it is collected, its
        // tokens read on the GPU from that step's ids (Backend::enqueue_decode); the median gap
        // between consecutive collects.
        let overlapped_ms = overlapped_ms(&mut model, &decode_batch, b, args.steps, None);
        let f = floor(&spec, b, b, args.context, args.kv_cache_dtype);
        let floor_ms = f.bytes / copy_bw * 1e3;
        println!("| {b} | {eager_ms:.3} | {logits_ms:.3} | {sampled_ms:.3} | {lp_ms:.3} | {ids_ms:.3} | {overlapped_ms:.3} | {:.0} | {:.2} | {floor_ms:.3} | {:.2}x | {:.2}x |", b as f64 / (overlapped_ms / 1e3), f.bytes / 1e9, ids_ms / floor_ms, overlapped_ms / floor_ms);
    }

    println!("({} CUDA graphs captured)", model.cuda_graphs());

    // With a drafter, a decode step stages the drafter's context and the step that fills a KV
    // block writes it for the whole block (crate::draft_staging; PEREGRINE_DRAFT_CONTEXT_DEFERRED=0:
    // every step writes its own): the steps above repeat 8 positions of one block and never
    // fill it, so this times steps over a whole block, the write included.
    if draft_spec.is_some() && !batches.is_empty() {
        println!("\n| batch | graph step ms over a whole block of {BS} positions, per step (ids only; the drafter's context written as the engine's steps write it) |");
        println!("|---|---|");
        model.set_cuda_graphs(true);
        for &b in batches {
            let block = |model: &mut CudaModel| {
                for i in 0..BS {
                    let batch: Vec<SeqForward> = (0..b).map(|s| seqf(s, vec![tok(s, args.context + i)], args.context + i, OutputRows::Last)).collect();
                    drop(model.forward_argmax(&batch).unwrap());
                }
            };
            block(&mut model);
            let t: Vec<f64> = (0..args.steps.max(3)).map(|_| {
                let t0 = Instant::now();
                block(&mut model);
                t0.elapsed().as_secs_f64() * 1e3 / BS as f64
            }).collect();
            println!("| {b} | {:.3} |", median(t));
        }
    }

    // Sampled steps: sampled inside the decode graph (`Op::Sample`, the default) against the
    // greedy graph with the sampler launched after it (PEREGRINE_GRAPH_SAMPLING=0), each alone
    // and overlapped as the engine runs them; greedy overlapped beside them.
    println!("\n| batch | sampling | graph step ms, sampled in the graph | graph step ms, sampler after the graph | overlapped ms, in the graph | overlapped ms, after the graph | overlapped ms, greedy |");
    println!("|---|---|---|---|---|---|---|");
    for &b in batches {
        let decode_batch = |i: usize| -> Vec<SeqForward> { (0..b).map(|s| seqf(s, vec![tok(s, args.context + i)], args.context + i % 8, OutputRows::Last)).collect() };
        for (name, temperature, top_p) in [("T 0.8, top-p 0.95", 0.8f32, 0.95f32), ("T 1", 1.0, 1.0)] {
            let sampling = |i: usize| -> Vec<RowSampling> { (0..b).map(|s| RowSampling { temperature, top_k: 0, top_p, min_p: 0.0, u: ((s * 37 + i) % 100) as f64 / 100.0, adj_start: 0, adj_len: 0 }).collect() };
            let mut cells = Vec::new();
            for in_graph in [true, false] {
                model.set_graph_sampling(in_graph);
                model.set_cuda_graphs(true);
                let mut t = Vec::new();
                for i in 0..args.steps + 3 {
                    let t0 = Instant::now();
                    drop(model.forward_sample(&decode_batch(i), &sampling(i), &[]).unwrap());
                    if i >= 3 {
                        t.push(t0.elapsed().as_secs_f64() * 1e3);
                    }
                }
                cells.push(median(t));
            }
            for in_graph in [true, false] {
                model.set_graph_sampling(in_graph);
                // Captures the graph the overlapped steps replay.
                drop(model.forward_sample(&decode_batch(0), &sampling(0), &[]).unwrap());
                cells.push(overlapped_ms(&mut model, &decode_batch, b, args.steps, Some(&sampling)));
            }
            model.set_graph_sampling(true);
            drop(model.forward_argmax(&decode_batch(0)).unwrap());
            cells.push(overlapped_ms(&mut model, &decode_batch, b, args.steps, None));
            println!("| {b} | {name} | {} |", cells.iter().map(|c| format!("{c:.3}")).collect::<Vec<_>>().join(" | "));
        }
    }

    // The graph alone: replays back to back on the GPU against the whole step's wall time
    // (the difference is the host's share: inputs copied in, the launch, ids copied back).
    println!("\n| batch | graph replay ms (GPU, back to back) |");
    println!("|---|---|");
    for &b in batches.iter() {
        let batch: Vec<SeqForward> = (0..b).map(|s| seqf(s, vec![tok(s, args.context)], args.context, OutputRows::Last)).collect();
        model.set_cuda_graphs(true);
        if let Some(ms) = model.graph_replay_ms(&batch, args.steps).expect("graph replay") {
            println!("| {b} | {ms:.3} |");
        }
        // A measurement build (-DMOE_TRACE): the last replay's last fused MoE call, block by
        // block (the one-token MoE as the step runs it).
        if let (1, Some(tr)) = (b, model.moe_trace().expect("MoE trace")) {
            let (inter, slots) = spec.layers.iter().find_map(|l| if let MlpSpec::Moe(m) = l.mlp { Some((m.intermediate_size, m.top_k)) } else { None }).unwrap_or((0, 0));
            print!("{}", peregrine_cuda::trace::moe_trace_report("the last layer's MoE of the last batch-1 replay", &tr, inter, slots));
        }
        if let Some(kinds) = model.graph_node_kinds(&batch).expect("graph nodes") {
            if kinds.non_kernel() > 0 {
                println!("(batch {b}: the graph holds nodes other than kernels, which break PDL: {:?})", kinds.0);
            }
        }
    }

    if !args.ab.is_empty() {
        println!("\n| A/B | batch | A ms, median | B ms, median | B - A per round, median us | rounds B slower |");
        println!("|---|---|---|---|---|---|");
        for what in &args.ab {
            if what == "rows" {
                // The engine's steps, copy-free (A) or copying (B), in turn per round: overlapped,
                // then one at a time (ids to the host).
                for &b in batches {
                    let decode_batch = |i: usize| -> Vec<SeqForward> { (0..b).map(|s| seqf(s, vec![tok(s, args.context + i)], args.context + i % 8, OutputRows::Last)).collect() };
                    model.set_cuda_graphs(true);
                    let (mut ov, mut one) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
                    for _ in 0..args.ab_rounds {
                        for copy_free in [true, false] {
                            model.set_copy_free_rows(copy_free);
                            for i in 0..3 {
                                drop(model.forward_argmax(&decode_batch(i)).unwrap());
                            }
                            let o = overlapped_ms(&mut model, &decode_batch, b, args.steps, None);
                            let mut t = Vec::new();
                            for i in 0..args.steps {
                                let t0 = Instant::now();
                                drop(model.forward_argmax(&decode_batch(i)).unwrap());
                                t.push(t0.elapsed().as_secs_f64() * 1e3);
                            }
                            let (ov, one) = if copy_free { (&mut ov.0, &mut one.0) } else { (&mut ov.1, &mut one.1) };
                            ov.push(o);
                            one.push(median(t));
                        }
                    }
                    model.set_copy_free_rows(true);
                    for (name, (a, bb)) in [("rows (overlapped)", ov), ("rows (one at a time)", one)] {
                        let diff: Vec<f64> = a.iter().zip(&bb).map(|(x, y)| (y - x) * 1e3).collect();
                        let slower = diff.iter().filter(|&&d| d > 0.0).count();
                        println!("| {name} | {b} | {:.4} | {:.4} | {:.1} | {slower} of {} |", median(a), median(bb), median(diff.clone()), diff.len());
                    }
                }
                continue;
            }
            if what == "chain" {
                // The engine's overlapped steps with their tokens read from the step ahead's ids
                // (A, as the engine runs them) or given (B, each step's own tokens, as the
                // replays and one-at-a-time steps take them), in turn per round: whether the
                // tokens a synthetic model samples change what a step costs (its routing).
                for &b in batches {
                    let decode_batch = |i: usize| -> Vec<SeqForward> { (0..b).map(|s| seqf(s, vec![tok(s, args.context + i)], args.context + i % 8, OutputRows::Last)).collect() };
                    model.set_cuda_graphs(true);
                    for i in 0..3 {
                        drop(model.forward_argmax(&decode_batch(i)).unwrap());
                    }
                    let (mut a, mut bb) = (Vec::new(), Vec::new());
                    for _ in 0..args.ab_rounds {
                        a.push(overlapped_ms(&mut model, &decode_batch, b, args.steps, None));
                        bb.push(overlapped_steps_ms(&mut model, &decode_batch, b, args.steps, None, false));
                    }
                    let diff: Vec<f64> = a.iter().zip(&bb).map(|(x, y)| (y - x) * 1e3).collect();
                    let slower = diff.iter().filter(|&&d| d > 0.0).count();
                    println!("| chain | {b} | {:.4} | {:.4} | {:.1} | {slower} of {} |", median(a), median(bb), median(diff.clone()), diff.len());
                    let (given, chained) = chained_ids(&mut model, &decode_batch, b);
                    println!("(batch {b}: {given} distinct ids sampled from the given tokens, {chained} after {CHAINED_STEPS} chained steps)");
                }
                continue;
            }
            // Per batch, one graph captured under each setting (A: set(false), B: set(true)),
            // replayed in turn.
            // Returns each batch's median B - A (us).
            let ab_as = |model: &mut CudaModel, label: &str, set: &dyn Fn(&mut CudaModel, bool)| -> Vec<(usize, f64)> {
                let mut diffs = Vec::new();
                for &b in batches {
                    let batch: Vec<SeqForward> = (0..b).map(|s| seqf(s, vec![tok(s, args.context)], args.context, OutputRows::Last)).collect();
                    model.set_cuda_graphs(true);
                    if let Some((a, bb)) = model.graph_ab_ms(&batch, args.steps, args.ab_rounds, set).expect("A/B replays") {
                        diffs.push((b, print_ab_row(label, b, &a, &bb)));
                    }
                }
                diffs
            };
            let ab = |model: &mut CudaModel, set: &dyn Fn(&mut CudaModel, bool)| {
                ab_as(model, what, set);
            };
            if let Some(defines) = what.strip_prefix("defines:") {
                // Pairs of fresh loads of every kernel, A as the model was loaded and B under
                // these measurement defines (the model's MoE tuning and capture pool), loaded in
                // turn, A first in odd pairs and B first in even ones. Where a load's code lies
                // moves the step by up to ~1%: within a process one position in the pair read
                // up to ~20 us faster in every pair, the later on one machine, the earlier on
                // another (benches/results/2026-11-28-kernel-code-placement.md,
                // 2026-11-28-h200-moe-handoff-bounds.md). One
                // pair measures the load order as much as the defines; the mean over pairs of
                // both orders does not.
                let mut per_batch: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
                for pair in 1..=args.ab_loads.max(1) {
                    let load = |d: Option<&str>| model.load_kernel_set(d).expect("kernels loaded");
                    let (mut a, b) = if pair % 2 == 1 {
                        let a = load(None);
                        (a, load(Some(defines)))
                    } else {
                        let b = load(Some(defines));
                        (load(None), b)
                    };
                    model.swap_kernel_set(&mut a); // a now holds the model's own set
                    let alt = std::cell::RefCell::new(b);
                    let on_b = std::cell::Cell::new(false);
                    let swap_to = |m: &mut CudaModel, on: bool| {
                        if on != on_b.get() {
                            m.swap_kernel_set(&mut alt.borrow_mut());
                            on_b.set(on);
                        }
                    };
                    // A build with other registers may pick another q/k/v kernel at load
                    // (by occupancy): then the pair compares kernels, not just the defines.
                    let qkv = |m: &CudaModel| batches.iter().map(|&t| m.qkv_ready_kernels(t)).collect::<Vec<_>>();
                    let qkv_a = qkv(&model);
                    swap_to(&mut model, true);
                    let qkv_b = qkv(&model);
                    swap_to(&mut model, false);
                    for ((&t, qkv_a), qkv_b) in batches.iter().zip(qkv_a).zip(qkv_b) {
                        if qkv_a != qkv_b {
                            println!("| {what} (load pair {pair}): the q/k/v kernels differ, A {qkv_a:?}, B {qkv_b:?} (PEREGRINE_QKV_READY4 / _PIPE / _PIPE_SHUFFLE pin them) | {t} | | | | |");
                        }
                    }
                    for (batch, d) in ab_as(&mut model, &format!("{what} (load pair {pair})"), &swap_to) {
                        per_batch.entry(batch).or_default().push(d);
                    }
                    swap_to(&mut model, false);
                    model.swap_kernel_set(&mut a);
                }
                for (batch, d) in per_batch {
                    let each: Vec<String> = d.iter().map(|x| format!("{x:.1}")).collect();
                    let mean = d.iter().sum::<f64>() / d.len() as f64;
                    println!("| {what}: mean of {} load pairs | {batch} | | | {mean:.1} (pairs {}) | |", d.len(), each.join(", "));
                }
                continue;
            }
            if what == "fp8" {
                // A one token's MoE as loaded (FP8 digits where `moe_fp8` holds), B the same
                // ring on F16 MMAs (set_moe_fp8 drops the graphs).
                if !model.moe_fp8() {
                    println!("| {what} | - | one token's MoE is not on FP8 digits here | | | |");
                    continue;
                }
                ab(&mut model, &|m, on| m.set_moe_fp8(!on));
                continue;
            }
            if let Some(n) = what.strip_prefix("moe-grid:") {
                // A the one-token MoE kernel as chosen, B the same fused kernel on at most n
                // blocks (its grid is otherwise as many blocks as are resident). Pinning does not
                // drop the graphs captured under the other kernel; shift_step_buffers(0) does.
                let n: usize = n.parse().expect("--ab moe-grid:N");
                let chosen = model.moe_kernel_choices().into_iter().find(|&(t, _)| t == 1).map(|(_, k)| k);
                let Some(a @ MoeKernel::Fused { stages, steps, .. }) = chosen else {
                    println!("| {what} | - | the one-token MoE is not the fused kernel ({chosen:?}) | | | |");
                    continue;
                };
                let b = MoeKernel::Fused { stages, steps, max_blocks: n };
                ab(&mut model, &|m, on| {
                    m.pin_moe_kernel(1, if on { b } else { a });
                    m.shift_step_buffers(0).expect("graphs dropped");
                });
                continue;
            }
            // A count setting as loaded (A) against n (B): `--ab NAME:N`.
            type Get = fn(&CudaModel) -> usize;
            type Set = fn(&mut CudaModel, usize);
            let counts: [(&str, Get, Set); 9] = [
                // the grouping in the routing launch's last block up to n tokens
                ("group:", CudaModel::fused_group_max, |m, n| m.set_fused_group_max(n)),
                // the o_proj doing the router up to n rows (1: one token only)
                ("oproj-rows:", CudaModel::route_oproj_rows, |m, n| { m.set_route_oproj_rows(n); }),
                // the routing launch in one block up to n tokens (1: a block a token)
                ("route-block:", CudaModel::route_block_tokens, |m, n| { m.set_route_block_tokens(n); }),
                // the routing over the o_proj's sums a cluster up to n tokens (1: none)
                ("route-cluster:", CudaModel::route_cluster_tokens, |m, n| { m.set_route_cluster_tokens(n); }),
                // the tensor-core GQA decode attention from n rows
                ("attn-tc-rows:", CudaModel::attn_tc_min_rows, |m, n| m.set_attn_tc_min_rows(n)),
                // the mixed MoE (slots of 1-2 pairs on digits) from n decode rows
                ("mixed:", CudaModel::moe_mixed_from, |m, n| { m.set_moe_mixed_from(n); }),
                // every launch of a step without PDL from n rows
                ("plain-from:", CudaModel::plain_from_rows, |m, n| m.set_plain_from_rows(n)),
                // ... up to n rows (exclusive)
                ("plain-to:", CudaModel::plain_to_rows, |m, n| m.set_plain_to_rows(n)),
                // the op after each MLP on drained SMs from n rows
                ("drain-from:", CudaModel::drain_after_mlp_rows, |m, n| m.set_drain_after_mlp_rows(n)),
            ];
            if let Some(&(prefix, get, set)) = counts.iter().find(|(p, ..)| what.starts_with(p)) {
                let n: usize = what[prefix.len()..].parse().unwrap_or_else(|_| panic!("--ab {prefix}N"));
                let base = get(&model);
                ab(&mut model, &|m, on| set(m, if on { n } else { base }));
                continue;
            }
            if what == "combine-in-norm" {
                ab(&mut model, &|m, on| m.set_moe_combine_in_norm(on));
                continue;
            }
            if let Some(n) = what.strip_prefix("digits-to:") {
                let n: usize = n.parse().expect("--ab digits-to:N");
                let (fp8, mixed) = (model.moe_fp8_tokens(), model.moe_mixed_from());
                ab(&mut model, &|m, on| {
                    m.set_moe_fp8_tokens(if on { n } else { fp8 }).expect("digit rows");
                    m.set_moe_mixed_from(if on { n + 1 } else { mixed });
                });
                continue;
            }
            if let Some(n) = what.strip_prefix("heads-splits:") {
                // A the heads kernel's splits as the wave asks, B at most n.
                let n: usize = n.parse().expect("--ab heads-splits:N");
                ab(&mut model, &|m, on| m.set_attn_heads_max_splits(if on { n } else { usize::MAX }));
                continue;
            }
            if what == "pre-fill" {
                // A the ready attention's splits as loaded, B under the other rule
                // (attn_ready_pre_fill toggled).
                let base = model.attn_ready_pre_fill();
                ab(&mut model, &|m, on| m.set_attn_ready_pre_fill(if on { !base } else { base }));
                continue;
            }
            if what == "drain-one-wave" {
                // A the default (no drain before a one-wave ready q/k/v projection), B drained
                // there too.
                let base = model.drain_before_one_wave();
                ab(&mut model, &|m, on| m.set_drain_before_one_wave(on || base));
                for &b in batches {
                    println!("(batch {b}: the input norm after an MLP drains the SMs in {} of {} layers)", model.drained_after_mlp_layers(b), spec.layers.len() - 1);
                }
                continue;
            }
            if what == "preload" {
                // A the ready attention by default (the preloading kernel where its grid fits),
                // B attention_v2_kv_ready in place of the preloading kernel.
                ab(&mut model, &|m, on| m.set_attention_preload(!on));
                continue;
            }
            if what == "ready-wave" {
                // A the ready attention judged by its own kernel's wave, B by attention_v2_kv's.
                let base = model.attn_ready_own_wave();
                ab(&mut model, &|m, on| m.set_attn_ready_own_wave(if on { !base } else { base }));
                continue;
            }
            if let Some(n) = what.strip_prefix("copies:") {
                // A the router's sums in the loaded count of copies, B in n.
                let n: usize = n.parse().expect("--ab copies:N");
                let base = model.route_acc_copies();
                ab(&mut model, &|m, on| m.set_route_acc_copies(if on { n } else { base }).expect("router sum copies"));
                continue;
            }
            let shift = match what.strip_prefix("shift:") {
                Some(n) => Some(n.parse::<usize>().expect("--ab shift:BYTES")),
                None if ["tail", "argmax", "fetch", "embed", "prefetch"].contains(&what.as_str()) => None,
                None => panic!("--ab takes tail, argmax, fetch, embed, prefetch, rows, fp8, shift:BYTES, copies:N, group:N, oproj-rows:N, route-block:N, route-cluster:N, moe-grid:N, attn-tc-rows:N, mixed:N, plain-from:N, plain-to:N, drain-from:N, drain-one-wave, chain, combine-in-norm, digits-to:N, heads-splits:N, pre-fill, ready-wave, preload or defines:DEFINES, not {what}"),
            };
            ab(&mut model, &|m, on| match shift {
                Some(n) => m.shift_step_buffers(if on { n } else { 0 }).expect("buffers shifted"),
                None if what == "argmax" => m.set_lm_head_argmax(!on),
                None if what == "fetch" => m.set_copy_free_rows(!on),
                None if what == "embed" => m.set_embed_norm_fused(!on),
                None if what == "prefetch" => m.set_lm_head_prefetch(!on),
                None => m.set_step_tail_fused(!on),
            });
        }
        model.shift_step_buffers(0).expect("buffers back");
    }

    if args.trace {
        for &b in batches {
            let batch: Vec<SeqForward> = (0..b).map(|s| seqf(s, vec![tok(s, args.context)], args.context, OutputRows::Last)).collect();
            print_trace(&mut model, &batch);
        }
    }

    // Where a step's time goes: CUDA events around every operation of the plan (eager), with
    // each kind's share of the byte floor.
    for &b in batches {
        let batch: Vec<SeqForward> = (0..b).map(|s| seqf(s, vec![tok(s, args.context)], args.context, OutputRows::Last)).collect();
        let prof = model.profile_plan(&batch, args.steps).expect("profile");
        let mut kinds: Vec<(&str, f64, f64)> = Vec::new();
        let mut add = |name: &'static str, ms: f64, bytes: f64| match kinds.iter_mut().find(|k| k.0 == name) {
            Some(k) => {
                k.1 += ms;
                k.2 += bytes;
            }
            None => kinds.push((name, ms, bytes)),
        };
        for (op, ms) in prof {
            let ms = ms as f64;
            match op {
                Op::Attention { layer, .. } => {
                    let a = spec.layers[layer].attention;
                    let span = a.window().map_or(args.context, |w| w.min(args.context)) as f64;
                    let kv = b as f64 * span * (a.k_dim() + a.v_dim()) as f64 * args.kv_cache_dtype.size() as f64;
                    let w = attention_bytes(&spec, layer);
                    add(if a.window().is_some() { "attention (sliding window)" } else { "attention (full)" }, ms, w + kv);
                }
                Op::Mlp { layer, .. } => match spec.layers[layer].mlp {
                    MlpSpec::Moe(m) => {
                        let (_, expert) = layer_bytes(&spec, layer);
                        add("MoE (router, grouping, experts, combine)", ms, m.num_experts as f64 * spec.hidden_size as f64 * 4.0 + expert * distinct_experts(m.num_experts, m.top_k, b));
                    }
                    MlpSpec::Dense { intermediate_size } => {
                        let (i, h) = (intermediate_size as f64, spec.hidden_size as f64);
                        add("dense MLP", ms, 3.0 * (i * h + (i / 128.0).ceil() * (h / 128.0).ceil() * 4.0))
                    }
                },
                Op::Norm { .. } | Op::AddNorm { .. } | Op::Add { .. } => add("norms and residual adds", ms, 0.0),
                Op::LmHead { .. } => add("lm_head and argmax", ms, spec.vocab_size as f64 * spec.hidden_size as f64 * 2.0),
                Op::Argmax { .. } | Op::Sample { .. } | Op::GatherRows { .. } => add("lm_head and argmax", ms, 0.0),
                Op::CaptureFeatures { .. } | Op::DraftContext { .. } => add("drafter context (features, fc, K/V)", ms, 0.0),
                Op::Embed { .. } | Op::EmbedNorm { .. } => add("embedding", ms, 0.0),
            }
        }
        let total: f64 = kinds.iter().map(|k| k.1).sum();
        println!("\nwhere a batch-{b} step goes (eager, CUDA events around each operation, median of {} runs; sum {total:.3} ms):", args.steps);
        println!("| operations | ms | share | floor ms | ms / floor |");
        println!("|---|---|---|---|---|");
        for (name, ms, bytes) in kinds {
            let fl = bytes / copy_bw * 1e3;
            let ratio = if fl > 0.0 { format!("{:.2}x", ms / fl) } else { "-".into() };
            println!("| {name} | {ms:.3} | {:.1}% | {fl:.3} | {ratio} |", 100.0 * ms / total);
        }
        if b > 1 {
            print_routing(&spec, b, &model.probe_routing(&batch).expect("routing probe"));
        }
    }
    // Prefill: one prompt in one forward (eager: prompts are not captured), sequence 0's
    // blocks from position 0, after a warm-up call. The floor counts weight bytes only (every
    // expert is touched at these lengths); prefill is bound by compute and attention instead.
    if !args.prefill.is_empty() {
        println!("\nprefill (one sequence, the whole prompt in one forward, the last row's logits, ids only, eager):");
        println!("| prompt tokens | ms | prompt tokens/s | weight-byte floor ms |");
        println!("|---|---|---|---|");
        for &n in &args.prefill {
            let mut ts = Vec::new();
            for i in 0..4 {
                let batch = [prompt((0..n).map(|p| tok(0, p + i)).collect())];
                let t0 = Instant::now();
                model.forward_argmax(&batch).unwrap();
                if i >= 1 {
                    ts.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            let ms = median(ts);
            let floor_ms = floor(&spec, n, 1, 0, args.kv_cache_dtype).bytes / copy_bw * 1e3;
            println!("| {n} | {ms:.1} | {:.0} | {floor_ms:.3} |", n as f64 / (ms / 1e3));
        }
        // Where the longest prompt's time goes (CUDA events around each operation).
        let n = args.prefill.iter().copied().max().unwrap_or(0);
        let batch = [prompt((0..n).map(|p| tok(0, p)).collect())];
        // Under a profiler started with its collection off (ncu --profile-from-start off), one
        // more forward of the longest prompt is what it sees: every kernel of one prefill.
        if args.profile_range {
            gpu_sync(&model);
            unsafe { cudarc::driver::sys::cuProfilerStart() };
            model.forward_argmax(&batch).unwrap();
            gpu_sync(&model);
            unsafe { cudarc::driver::sys::cuProfilerStop() };
        }
        let mut groups: Vec<(&str, f64)> = Vec::new();
        for (op, ms) in model.profile_plan(&batch, 2).expect("profile") {
            let name = match op {
                Op::Attention { .. } => "attention (q/k/v, RoPE, K/V write, attention, o_proj)",
                Op::Mlp { layer, .. } if matches!(spec.layers[layer].mlp, MlpSpec::Moe(_)) => "MoE (router, grouping, experts, combine)",
                Op::Mlp { .. } => "dense MLP",
                _ => "norms, embedding, lm_head, argmax",
            };
            match groups.iter_mut().find(|g| g.0 == name) {
                Some(g) => g.1 += ms as f64,
                None => groups.push((name, ms as f64)),
            }
        }
        let total: f64 = groups.iter().map(|g| g.1).sum();
        println!("\nwhere a {n}-token prefill goes (eager, CUDA events around each operation; sum {total:.1} ms):");
        for (name, ms) in groups {
            println!("| {name} | {ms:.1} ms | {:.1}% |", 100.0 * ms / total);
        }
    }

    if args.only_prefill {
        return;
    }
    println!("\nverify cost (one sequence, T tokens with logits for all, ids only, graphs):");
    println!("| T | step ms | relative to T=1 | floor ms | step / floor |");
    println!("|---|---|---|---|---|");
    let mut base = 0.0;
    for t in 1..=8usize {
        let mut ts = Vec::new();
        for i in 0..(args.steps + 3) {
            let batch = [seqf(0, (0..t).map(|j| tok(0, j + i)).collect(), args.context, OutputRows::All)];
            let t0 = Instant::now();
            model.forward_argmax(&batch).unwrap();
            if i >= 3 {
                ts.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        let ms = median(ts);
        if t == 1 {
            base = ms;
        }
        let floor_ms = floor(&spec, t, 1, args.context, args.kv_cache_dtype).bytes / copy_bw * 1e3;
        println!("| {t} | {ms:.3} | {:.2}x | {floor_ms:.3} | {:.2}x |", ms / base, ms / floor_ms);
    }

    if let Some(d) = &draft_spec {
        let drafter_bytes: f64 = d.layers.iter().map(|l| {
            let a = l.attention;
            let h = d.hidden_size as f64;
            let fp8 = |n: f64, k: f64| n * k + (n / 128.0).ceil() * (k / 128.0).ceil() * 4.0;
            fp8(a.q_dim() as f64, h) + fp8(a.k_dim() as f64, h) + fp8(a.v_dim() as f64, h) + a.o_dim() as f64 * h * 2.0 + 3.0 * fp8(l.intermediate_size as f64, h)
        }).sum::<f64>()
            + d.hidden_size as f64 * d.context_dim() as f64
            + spec.vocab_size as f64 * spec.hidden_size as f64 * 2.0;
        println!("\ndraft pass (block {}, {} layers, target lm_head over {} rows per sequence):", d.block_size, d.layers.len(), d.block_size - 1);
        println!("| batch | draft ms | floor ms | draft / floor | draft / 1-token target step |");
        println!("|---|---|---|---|---|");
        for &b in &args.batches {
            let fwd: Vec<peregrine_core::backend::DraftForward> = (0..b)
                .map(|s| peregrine_core::backend::DraftForward { seq_id: s as u64, last_token: tok(s, args.context), start_pos: args.context, num_drafts: d.block_size - 1, full_blocks: table(s) })
                .collect();
            let mut ts = Vec::new();
            for i in 0..(args.steps + 3) {
                let t0 = Instant::now();
                model.draft(&fwd).unwrap();
                if i >= 3 {
                    ts.push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
            let ms = median(ts);
            let floor_ms = drafter_bytes / copy_bw * 1e3;
            println!("| {b} | {ms:.3} | {floor_ms:.3} | {:.2}x | {:.2}x |", ms / floor_ms, ms / base);
        }
    }
}
