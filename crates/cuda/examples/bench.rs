//! Decode-kernel bandwidth on the GPU: the device's copy bandwidth, then the BF16/FP8/MXFP4
//! GEMV and the MXFP4 MoE decode (MiMo-V2-Flash and MiMo-V2.5-Pro expert shapes, uniform random
//! routing, 1..64 tokens): bytes each must move and the fraction of the copy bandwidth reached.
//! CUDA-event timing, warm-up, median of the runs.
//!
//!     cargo run --release -p peregrine-cuda --example bench

use cudarc::driver::sys::CUevent_flags;
use peregrine_cuda::kernels::{MoeInput, MoeLayout, MoeWeights};
use peregrine_cuda::trace::MOE_TRACE_SLOTS;
use peregrine_cuda::{probe, Kernels, MoeKernel, MoeRouting};
use rand::{Rng, SeedableRng};

fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(f32::total_cmp);
    v[v.len() / 2]
}

/// Decode-kernel bandwidth on the GPU: copy bandwidth, plain reads, the GEMVs and the MXFP4 MoE
/// decode at MiMo-V2-Flash and MiMo-V2.5-Pro shapes, as fractions of the copy bandwidth. It takes
/// no arguments; environment variables pick what runs.
#[derive(clap::Parser)]
#[command(after_help = "Environment:
  PEREGRINE_BENCH_ONLY=moe|gemv|read|sample|prefill-moe|prefill-gemm|load   one section (load: compile the kernels only)
  PEREGRINE_BENCH_MOE_TOKENS=1,2,8   the MoE's decode token counts only (default 1, 2, 4, 8, 16, 64 and prefill sizes)
  PEREGRINE_BENCH_READ_SPANS=1,2,8   plain reads over fresh pages of that many GiB
  PEREGRINE_BENCH_MOE_LAYERS=L       one token, each call on the next of L layers' experts
  PEREGRINE_BENCH_MOE_ACC=1          the step's one-token kernel (routing from the o_proj's sums) beside the routed one
  PEREGRINE_BENCH_SWEEP=1            the pipelined kernels' K splits at 1, 8 and 64 tokens
  PEREGRINE_TRACE_DUMP=DIR           with a -DMOE_TRACE build: raw stamps of 8 fused-kernel calls, one CSV per shape
  PEREGRINE_KERNEL_DEFINES=\"-DX\"     kernels built with measurement defines (PEREGRINE_KERNEL_DEFINES_IN=moe: that file only)")]
struct Args {}

fn main() {
    <Args as clap::Parser>::parse();
    let g = match probe(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let mut k = Kernels::load(&g).unwrap();
    println!("GPU {} sm_{}{}, {:.1} GiB", g.name, g.capability.0, g.capability.1, g.total_memory as f64 / (1u64 << 30) as f64);
    let s = &g.stream;
    let ev = || g.ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
    let (e0, e1) = (ev(), ev());
    // Median milliseconds of `f` over `runs` timed runs after 3 warm-ups.
    let time = |runs: usize, f: &mut dyn FnMut(usize)| -> f32 {
        for i in 0..3 {
            f(i);
        }
        let mut t = Vec::with_capacity(runs);
        for i in 0..runs {
            e0.record(s).unwrap();
            f(i);
            e1.record(s).unwrap();
            e1.synchronize().unwrap();
            t.push(e0.elapsed_ms(&e1).unwrap());
        }
        median(t)
    };
    // Median milliseconds per call of `f` over 20 calls issued back to back between two events
    // (7 such runs after 3 warm-up calls): no host launch latency in the number, as in a decode
    // step's graph, where each launch follows the one before.
    let time_b2b = |f: &mut dyn FnMut(usize)| -> f32 {
        for i in 0..3 {
            f(i);
        }
        let mut t = Vec::with_capacity(7);
        for _ in 0..7 {
            e0.record(s).unwrap();
            for i in 0..20 {
                f(i);
            }
            e1.record(s).unwrap();
            e1.synchronize().unwrap();
            t.push(e0.elapsed_ms(&e1).unwrap() / 20.0);
        }
        median(t)
    };
    let sms = g.ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).unwrap() as usize;

    // Copy bandwidth: read + write of 2 GiB.
    let n = 2usize << 30;
    let src = s.alloc_zeros::<u8>(n).unwrap();
    let mut dst = s.alloc_zeros::<u8>(n).unwrap();
    let ms = time(20, &mut |_| s.memcpy_dtod(&src, &mut dst).unwrap());
    let copy_bw = 2.0 * n as f64 / (ms as f64 * 1e-3);
    println!("copy: 2 GiB device-to-device in {ms:.3} ms = {:.0} GB/s (read + write)", copy_bw / 1e9);
    drop(src);
    drop(dst);

    // PEREGRINE_BENCH_ONLY=moe skips the sampling and GEMV sections, =gemv all but GEMV,
    // =sample all but sampling,
    // =read all but the plain reads below, =load everything (compiles the kernels, e.g. to fill
    // the cache for a measurement build before timing).
    let only = std::env::var("PEREGRINE_BENCH_ONLY").unwrap_or_default();
    if only == "load" {
        return;
    }
    if only.is_empty() || only == "moe" || only == "read" {
        plain_reads(&g, sms, copy_bw, &time_b2b);
    }
    // PEREGRINE_BENCH_READ_SPANS=1,2,8,48 (GiB): plain reads over fresh pages (read_spans).
    if let Ok(v) = std::env::var("PEREGRINE_BENCH_READ_SPANS") {
        let spans: Vec<usize> = v.split(',').filter_map(|t| t.trim().parse().ok()).collect();
        read_spans(&g, sms, copy_bw, &time_b2b, &spans);
    }
    if only == "read" {
        return;
    }
    // =prefill-gemm: only the dense projections at prompt sizes, on mma.sync and on wgmma.
    if only.is_empty() || only == "prefill-gemm" {
        prefill_gemm(&g, &mut k, &time);
    }
    if only == "prefill-gemm" {
        return;
    }
    // =prefill-moe: only the MoE at prefill sizes (tiled kernels against the MoE GEMM).
    let (only_moe, only_gemv, only_prefill_moe) = (only == "moe" || only == "prefill-moe", only == "gemv", only == "prefill-moe");
    // Sampling and logprobs over a MiMo-sized vocabulary: ids come back, logits stay.
    // =sample: only this section.
    if only == "sample" || (!only_moe && !only_gemv) {
        sampling(&k, s, &time);
    }
    if only == "sample" {
        return;
    }

    // Random bytes for weights (never zeros: they can run faster than real data).
    let mut wrng = rand::rngs::StdRng::seed_from_u64(7);
    let mut random_bytes = |n: usize| -> Vec<u8> {
        let mut v = vec![0u8; n];
        wrng.fill(&mut v[..]);
        v
    };
    // GEMV: matrices much larger than the 50 MB L2.
    if !only_moe {
        let (rows, cols) = (16384usize, 8192usize);
        // (128 tokens of up to 16384 columns: MiMo-V2.5-Pro's o_proj below)
        let x = s.clone_htod(&random_bytes(128 * 16384).iter().map(|&b| b as f32 / 128.0 - 1.0).collect::<Vec<_>>()).unwrap();
        let mut y = s.alloc_zeros::<f32>(128 * rows).unwrap();
        println!("\nGEMV {rows}x{cols}: tokens, weight bytes, ms, GB/s, fraction of copy bandwidth");
        {
            // BF16 of uniform values in (-1, 1): random sign, exponent 119..126, mantissa.
            let w = s.clone_htod(&random_bytes(2 * rows * cols).chunks(2).map(|b| ((b[1] as u16 & 0x80) << 8) | ((119 + (b[1] as u16 & 7)) << 7) | (b[0] as u16 & 0x7f)).collect::<Vec<_>>()).unwrap();
            for t in [1usize, 2, 4, 8, 16, 64] {
                let ms = time_b2b(&mut |_| k.gemv_bf16(&w, &x, &mut y, rows, cols, t).unwrap());
                let ms_alone = time(20, &mut |_| k.gemv_bf16(&w, &x, &mut y, rows, cols, t).unwrap());
                let ms0 = time(20, &mut |_| k.gemv_bf16_simt(&w, &x, &mut y, rows, cols, t).unwrap());
                let b = (rows * cols * 2) as f64;
                println!("bf16   T={t:<2} {:>10.1} MB {ms:8.3} ms {:7.0} GB/s {:5.1}%  (tensor cores, back to back; alone {:.1}%; CUDA-core kernel alone: {:.1}%)", b / 1e6, b / (ms as f64 * 1e-3) / 1e9, 100.0 * b / (ms as f64 * 1e-3) / copy_bw, 100.0 * b / (ms_alone as f64 * 1e-3) / copy_bw, 100.0 * b / (ms0 as f64 * 1e-3) / copy_bw);
            }
        }
        {
            // Random e4m3 bytes, NaN (0x7f / 0xff) excluded.
            let w = s.clone_htod(&random_bytes(rows * cols).iter().map(|&b| if b & 0x7f == 0x7f { b ^ 1 } else { b }).collect::<Vec<_>>()).unwrap();
            let sc = s.clone_htod(&vec![1.0f32; rows / 128 * cols / 128]).unwrap();
            for t in [1usize, 2, 4, 8, 16, 64] {
                let ms = time_b2b(&mut |_| k.gemv_fp8(&w, &sc, &x, &mut y, rows, cols, t).unwrap());
                let ms_alone = time(20, &mut |_| k.gemv_fp8(&w, &sc, &x, &mut y, rows, cols, t).unwrap());
                let ms0 = time(20, &mut |_| k.gemv_fp8_simt(&w, &sc, &x, &mut y, rows, cols, t).unwrap());
                let b = (rows * cols) as f64 + (rows / 128 * cols / 128 * 4) as f64;
                println!("fp8    T={t:<2} {:>10.1} MB {ms:8.3} ms {:7.0} GB/s {:5.1}%  (tensor cores, back to back; alone {:.1}%; CUDA-core kernel alone: {:.1}%)", b / 1e6, b / (ms as f64 * 1e-3) / 1e9, 100.0 * b / (ms as f64 * 1e-3) / copy_bw, 100.0 * b / (ms_alone as f64 * 1e-3) / copy_bw, 100.0 * b / (ms0 as f64 * 1e-3) / copy_bw);
            }
        }
        {
            let (rows, cols) = (32768usize, 8192usize);
            let w = s.clone_htod(&random_bytes(rows * cols / 2)).unwrap();
            let sc = s.clone_htod(&random_bytes(rows * cols / 32).iter().map(|b| 118 + b % 8).collect::<Vec<_>>()).unwrap();
            let mut y = s.alloc_zeros::<f32>(8 * rows).unwrap();
            for t in [1usize, 2, 4, 8] {
                let b = (rows * cols / 2 + rows * cols / 32) as f64;
                let ms1 = time(20, &mut |_| k.gemv_mxfp4_v1(&w, &sc, &x, &mut y, rows, cols, t).unwrap());
                let ms = time(20, &mut |_| k.gemv_mxfp4(&w, &sc, &x, &mut y, rows, cols, t).unwrap());
                println!("mxfp4  T={t:<2} {:>10.1} MB {ms:8.3} ms {:7.0} GB/s {:5.1}%  ({rows}x{cols}; one-row-per-warp v1: {:.1}%)", b / 1e6, b / (ms as f64 * 1e-3) / 1e9, 100.0 * b / (ms as f64 * 1e-3) / copy_bw, 100.0 * b / (ms1 as f64 * 1e-3) / copy_bw);
            }
        }
        // The decode steps' own shapes: MiMo-V2-Flash's stacked FP8 q/k/v projection (13568 x
        // 4096, 55.6 MB) and BF16 o_proj (4096 x 8192, 67 MB), MiMo-V2.5-Pro's (27136 x 6144, 167
        // MB; 6144 x 16384, 201 MB) at the batches where the wgmma GEMM's block height is chosen,
        // and the lm_head (BF16, 152064 x 4096, 1.25 GB). Two copies of the weights in turn where
        // one fits the 50 MB L2 several times over, so a call never finds the previous one's bytes
        // there.
        println!("\nGEMV, decode shapes (back to back on activations split ahead; from 16 tokens also the wgmma GEMM in blocks of 256 / 128 / 64 rows, forced):");
        // % of copy bandwidth of the wgmma GEMM at each block height, and whether each gave the
        // default's bits (the same arithmetic per row, whatever runs it).
        let wg_rows = |k: &mut Kernels, t: usize, y: &mut cudarc::driver::CudaSlice<f32>, b: f64, run: &mut dyn FnMut(&Kernels, usize, &mut cudarc::driver::CudaSlice<f32>)| -> String {
            if t < 16 || !k.has_dense_gemm_wgmma() {
                return String::new();
            }
            run(k, 0, y);
            let base = s.clone_dtoh(y).unwrap();
            // What the environment set (`PEREGRINE_GEMM_WGMMA`, `_WG_ROWS`, `_WG_SPLIT`), put back
            // after the forced cells so the next lines' default is still the one asked for.
            let before = (k.set_dense_gemm_wgmma(None), k.set_dense_wg_rows(None).unwrap(), k.set_dense_wg_k_splits(None).unwrap());
            let mut cells = Vec::new();
            for rows in peregrine_cuda::kernels::DENSE_WG_ROWS {
                let mut by_split = Vec::new();
                for splits in peregrine_cuda::kernels::DENSE_WG_SPLITS {
                    k.set_dense_gemm_wgmma(Some(true));
                    k.set_dense_wg_rows(Some(rows)).unwrap();
                    k.set_dense_wg_k_splits(Some(splits)).unwrap();
                    let ms = time_b2b(&mut |i| run(k, i, y));
                    run(k, 0, y);  // (the timed calls alternate weight copies)
                    let same = s.clone_dtoh(y).unwrap().iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits());
                    by_split.push(format!("{:.1}%{}", 100.0 * b / (ms as f64 * 1e-3) / copy_bw, if same { "" } else { " BITS DIFFER" }));
                }
                cells.push(by_split.join(" "));
            }
            k.set_dense_gemm_wgmma(before.0);
            k.set_dense_wg_rows(before.1).unwrap();
            k.set_dense_wg_k_splits(before.2).unwrap();
            format!("; wgmma 256 / 128 / 64 rows, K in 1 2 4 8 splits: {}", cells.join(" / "))
        };
        drop(y);
        let e4m3 = |b: &u8| if b & 0x7f == 0x7f { b ^ 1 } else { *b };
        let bf16 = |b: &[u8]| ((b[1] as u16 & 0x80) << 8) | ((119 + (b[1] as u16 & 7)) << 7) | (b[0] as u16 & 0x7f);
        // (what, rows, cols, FP8 (else BF16), weight copies, token counts)
        type Shape<'a> = (&'a str, usize, usize, bool, usize, &'a [usize]);
        let shapes: [Shape; 7] = [
            ("q/k/v", 13568, 4096, true, 2, &[1, 2, 4, 8, 16, 32, 48, 64, 96, 128]),
            ("o_proj", 4096, 8192, false, 2, &[1, 2, 4, 8, 16, 32, 48, 64, 96, 128]),
            // Flash's dense MLP (layer 0): gate and up stacked, and the down projection.
            ("dense gate_up", 32768, 4096, true, 1, &[1, 2, 4, 8]),
            ("dense down", 4096, 16384, true, 2, &[1, 2, 4, 8]),
            ("Pro q/k/v", 27136, 6144, true, 2, &[16, 32, 48, 64, 96]),
            ("Pro o_proj", 6144, 16384, false, 2, &[16, 32, 48, 64, 96]),
            ("lm_head", 152064, 4096, false, 1, &[1, 8, 16, 32, 64, 96, 128]),
        ];
        for (what, rows, cols, fp8, copies, tokens) in shapes {
            let mut y = s.alloc_zeros::<f32>(128 * rows).unwrap();
            // FP8 with unit block scales, or BF16 of uniform values in (-1, 1)
            let (w8, wb): (Vec<_>, Vec<_>) = if fp8 {
                ((0..copies).map(|_| s.clone_htod(&random_bytes(rows * cols).iter().map(e4m3).collect::<Vec<_>>()).unwrap()).collect(), Vec::new())
            } else {
                (Vec::new(), (0..copies).map(|_| s.clone_htod(&random_bytes(2 * rows * cols).chunks(2).map(bf16).collect::<Vec<_>>()).unwrap()).collect())
            };
            let sc = s.clone_htod(&vec![1.0f32; rows.div_ceil(128) * cols / 128]).unwrap();
            let b = if fp8 { (rows * cols) as f64 + (rows.div_ceil(128) * cols / 128 * 4) as f64 } else { (rows * cols * 2) as f64 };
            for &t in tokens {
                // The activations split once, ahead of the timed calls, as a step's norm or
                // silu_mul_split writes them for the GEMV after it.
                let split8 = fp8.then(|| k.split_f16(&x, t, cols, false).unwrap());
                let split16 = (!fp8).then(|| k.split_bf16(&x, t * cols).unwrap());
                let mut run = |k: &Kernels, i: usize, y: &mut cudarc::driver::CudaSlice<f32>| match (&split8, &split16) {
                    (Some(x8), _) => k.gemv_fp8_presplit(&w8[i % copies], &sc, x8, y, rows, cols, t).unwrap(),
                    (_, Some((xh, xl, _))) => k.gemv_bf16_presplit(&wb[i % copies], xh, xl, y, rows, cols, t, None).unwrap(),
                    _ => unreachable!(),
                };
                let ms = time_b2b(&mut |i| run(&k, i, &mut y));
                // The same with x split inside each call (gemv_fp8 / gemv_bf16 from f32 x: one
                // more launch; the form this line timed up to stop 66).
                let with_split = if t <= 8 {
                    let ms = time_b2b(&mut |i| {
                        if fp8 {
                            k.gemv_fp8(&w8[i % copies], &sc, &x, &mut y, rows, cols, t).unwrap()
                        } else {
                            k.gemv_bf16(&wb[i % copies], &x, &mut y, rows, cols, t).unwrap()
                        }
                    });
                    format!("; x split in the call {:.1}%", 100.0 * b / (ms as f64 * 1e-3) / copy_bw)
                } else {
                    String::new()
                };
                // A measurement build (-DGWG_TRACE): where the default runs the wgmma GEMM, its
                // per-stage stamps of one more call.
                if matches!(t, 32 | 64) && k.gwg_trace().unwrap().is_some() {
                    run(&k, 0, &mut y);
                    print_gwg_trace(&format!("{what} T={t}"), &k.gwg_trace().unwrap().unwrap());
                }
                let mut wg = wg_rows(&mut k, t, &mut y, b, &mut run);
                // Up to 8 tokens, the one-tile kernels without the K block loaded ahead too (the
                // pipelined kernels run where their grid fits one wave).
                if t <= 8 {
                    k.set_gemv_pipe(false);
                    let off = time_b2b(&mut |i| run(&k, i, &mut y));
                    k.set_gemv_pipe(true);
                    wg.push_str(&format!("; no pipe {:.1}%", 100.0 * b / (off as f64 * 1e-3) / copy_bw));
                }
                wg.push_str(&with_split);
                let format = if fp8 { "fp8 " } else { "bf16" };
                println!("{format}   T={t:<3} {:>10.1} MB {ms:8.3} ms {:7.0} GB/s {:5.1}%  ({rows}x{cols}, {what}{wg})", b / 1e6, b / (ms as f64 * 1e-3) / 1e9, 100.0 * b / (ms as f64 * 1e-3) / copy_bw);
            }
        }
        // The q/k/v projection as a decode step of 1-8 rows runs it (`gemv_qkv_ready`, the
        // attention's heads counted as their tiles finish): MiMo-V2-Flash's full-attention
        // layers (4 KV heads, 13568 x 4096) and sliding-window layers (8 KV heads, 14848 x 4096).
        println!("\nq/k/v projection as the decode step runs it (gemv_qkv_ready; back to back; beside: the same without the K block ahead):");
        let (heads, hd, vd, cols) = (64usize, 192usize, 128usize, 4096usize);
        let x = s.clone_htod(&random_bytes(8 * cols).iter().map(|&b| b as f32 / 128.0 - 1.0).collect::<Vec<_>>()).unwrap();
        for (what, kv_heads) in [("full attention", 4usize), ("sliding window", 8)] {
            let n = [heads * hd, kv_heads * hd, kv_heads * vd];
            let rows: usize = n.iter().sum();
            let w: Vec<_> = (0..2).map(|_| s.clone_htod(&random_bytes(rows * cols).iter().map(e4m3).collect::<Vec<_>>()).unwrap()).collect();
            let wp: Vec<_> = w.iter().map(|w| cudarc::driver::DevicePtr::device_ptr(w, s).0).collect();
            let sc = s.clone_htod(&vec![1.0f32; rows.div_ceil(128) * cols / 128]).unwrap();
            let ready = s.alloc_zeros::<u32>(heads + kv_heads + 1).unwrap();
            let mut ys: Vec<_> = n.iter().map(|r| s.alloc_zeros::<f32>(8 * r).unwrap()).collect();
            let b = (rows * cols) as f64 + (rows.div_ceil(128) * cols / 128 * 4) as f64;
            for t in [1usize, 2, 4, 8] {
                let split = k.split_f16(&x, t, cols, false).unwrap();
                let mut run = |k: &Kernels, i: usize| {
                    let [y0, y1, y2] = &mut ys[..] else { unreachable!() };
                    k.gemv_qkv_ready(wp[i % 2], &sc, &split, [y0, y1, y2], n, cols, t, &ready, heads, hd, vd).unwrap()
                };
                let kernel = k.qkv_ready_kernel(rows, t);
                let ms = time_b2b(&mut |i| run(&k, i));
                k.set_qkv_pipe(Some(false));
                let off = time_b2b(&mut |i| run(&k, i));
                k.set_qkv_pipe(None);
                let pct = |ms: f32| 100.0 * b / (ms as f64 * 1e-3) / copy_bw;
                // At one token, the other pipelined form too (forced, though it may not fit one wave).
                let other = if t == 1 {
                    k.set_qkv_pipe(Some(true));
                    k.set_qkv_pipe_shuffle(Some(kernel != peregrine_cuda::kernels::QkvReady::PipeShuffled));
                    let other = k.qkv_ready_kernel(rows, t).name();
                    let ms = time_b2b(&mut |i| run(&k, i));
                    k.set_qkv_pipe(None);
                    k.set_qkv_pipe_shuffle(None);
                    format!("; {other} {:.1}%", pct(ms))
                } else {
                    String::new()
                };
                println!("fp8    T={t:<3} {:>10.1} MB {ms:8.3} ms {:7.0} GB/s {:5.1}%  ({rows}x{cols}, {what}, {}; no K block ahead {:.1}%{other})", b / 1e6, b / (ms as f64 * 1e-3) / 1e9, pct(ms), kernel.name(), pct(off));
            }
        }
    }
    if only_gemv {
        return;
    }

    // MXFP4 MoE decode, one layer, on random codes and scales (never zeros: they can run
    // faster than real data). Random bytes are valid codes in both layouts.
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut random = |n: usize, lo: u8, span: u8| -> Vec<u8> {
        let mut v = vec![0u8; n];
        for c in v.chunks_mut(8) {
            let r: u64 = rng.random();
            for (i, b) in c.iter_mut().enumerate() {
                let x = (r >> (8 * i)) as u8;
                *b = if span == 0 { x } else { lo + x % span };
            }
        }
        v
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    for (name, e, h, i, top_k) in [("MiMo-V2-Flash", 256usize, 4096usize, 2048usize, 8usize), ("MiMo-V2.5-Pro", 384, 6144, 2048, 8)] {
        let (cn, sn) = (e * i * h / 2, e * i * h / 32);
        let up = |v: Vec<u8>| s.clone_htod(&v).unwrap();
        let w = MoeWeights {
            layout: MoeLayout::RowMajor {
                gate: up(random(cn, 0, 0)),
                gate_s: up(random(sn, 118, 8)),
                up: up(random(cn, 0, 0)),
                up_s: up(random(sn, 118, 8)),
                down: up(random(cn, 0, 0)),
                down_s: up(random(sn, 118, 8)),
            },
            num_experts: e,
            hidden: h,
            inter: i,
        };
        let wt = MoeWeights {
            layout: MoeLayout::Tiled { gate_up: up(tile_steps(random(2 * cn, 0, 0), random(2 * sn, 118, 8))), down: up(tile_steps(random(cn, 0, 0), random(sn, 118, 8))) },
            num_experts: e,
            hidden: h,
            inter: i,
        };
        let t0 = std::time::Instant::now();
        let tuned = k.tune_moe(&wt, top_k).unwrap();
        println!("\nMoE MXFP4 decode, {name}: {e} experts, hidden {h}, expert intermediate {i}, top-{top_k}, uniform routing");
        println!("(kernels tuned in {:.2} s over {} candidates; the default below is the tuned choice at {:?} tokens)", t0.elapsed().as_secs_f64(), tuned.len(), k.tuned_counts());
        println!("tokens  experts  bytes(MB)       ms     GB/s  of copy bw   (the default kernel, 20 calls back to back between events)");
        let x = s.clone_htod(&(0..64 * h).map(|_| rng.random::<f32>() - 0.5).collect::<Vec<_>>()).unwrap();
        let mut y = s.alloc_zeros::<f32>(64 * h).unwrap();
        let mut scratch = k.moe_scratch(&w, 64 * top_k).unwrap();
        // PEREGRINE_BENCH_MOE_TOKENS=1,2: only those decode sizes, and no prefill sizes.
        let tokens_env: Option<Vec<usize>> = std::env::var("PEREGRINE_BENCH_MOE_TOKENS").ok().map(|v| v.split(',').filter_map(|t| t.trim().parse().ok()).collect());
        let decode_tokens: &[usize] = match &tokens_env {
            Some(t) => t,
            None if only_prefill_moe => &[],
            None => &[1, 2, 4, 8, 16, 64],
        };
        for &t in decode_tokens {
            // Fresh routing per run, so experts are not served from L2.
            let routings: Vec<_> = (0..23)
                .map(|_| routing_from_pool(&mut rng, t, 0..e, top_k))
                .collect();
            let dev: Vec<_> = routings.iter().map(|r| k.upload_routing(r, e).unwrap()).collect();
            let used = routings.iter().map(|r| r.experts.len()).sum::<usize>() as f64 / routings.len() as f64;
            let b = used * w.expert_bytes() as f64;
            let pct = |ms: f32| 100.0 * b / (ms as f64 * 1e-3) / copy_bw;
            // One call at a time (synchronised after each, so the first launch's host latency
            // is in the number), then back to back.
            let mut alone = |kind: MoeKernel, w: &MoeWeights| time(20, &mut |run| k.moe_mxfp4_with(kind, w, &dev[run % dev.len()], &x, MoeInput::Settled, &mut scratch, &mut y).unwrap());
            let default = k.moe_kernel(&wt, t, top_k);
            let ms_alone = alone(default, &wt);
            let ms2 = alone(MoeKernel::TensorCore, &w);
            let ms3 = alone(MoeKernel::PIPELINED, &w);
            let mut run = |kind: MoeKernel, w: &MoeWeights| time_b2b(&mut |run| k.moe_mxfp4_with(kind, w, &dev[run % dev.len()], &x, MoeInput::Settled, &mut scratch, &mut y).unwrap());
            let ms = run(default, &wt);
            let mut kinds: Vec<(String, MoeKernel)> = Vec::new();
            for &(stages, steps) in peregrine_cuda::kernels::TILED_VARIANTS.iter() {
                kinds.push((format!("two launches {stages}x{steps}"), MoeKernel::tiled(stages, steps)));
                kinds.push((format!("fused {stages}x{steps}"), MoeKernel::Fused { stages, steps, max_blocks: 0 }));
                kinds.push((format!("fused {stages}x{steps} on {sms} blocks"), MoeKernel::Fused { stages, steps, max_blocks: sms }));
            }
            let variants: Vec<String> = kinds.into_iter().map(|(name, kind)| format!("{name} {:.1}%", pct(run(kind, &wt)))).collect();
            // The pipelined kernels' K splits (warps sharing a 16-row tile), gate_up x down.
            if std::env::var("PEREGRINE_BENCH_SWEEP").is_ok() && [1, 8, 64].contains(&t) {
                let mut line = format!("  sweep T={t}: split gate_up/down -> % of copy bw:");
                for gu in [1usize, 2, 4, 8] {
                    for dn in [1usize, 2, 4, 8] {
                        line += &format!(" {gu}/{dn}={:.1}", pct(run(MoeKernel::Pipelined { gate_up_split: gu, down_split: dn }, &w)));
                    }
                }
                println!("{line}");
            }
            // A measurement build of the kernels (PEREGRINE_KERNEL_DEFINES=-DMOE_TRACE): where
            // one fused call's time goes, from its blocks' %globaltimer stamps.
            if t == 1 && k.moe_trace().unwrap().is_some() {
                for stages in [2usize, 4] {
                    let kind = MoeKernel::Fused { stages, steps: 4, max_blocks: 0 };
                    for _ in 0..6 {
                        k.moe_mxfp4_with(kind, &wt, &dev[0], &x, MoeInput::Settled, &mut scratch, &mut y).unwrap();
                    }
                    s.synchronize().unwrap();
                    print_moe_trace(&format!("{name}, {t} token(s), fused {stages}x4, the last of 6 calls back to back"), &k.moe_trace().unwrap().unwrap(), i, routings[0].experts.len());
                }
                // PEREGRINE_TRACE_DUMP=DIR: the raw stamps of 8 separate calls of the fused 2x4
                // kernel (each the last of 3 back to back, a fresh routing each), one CSV per
                // shape, to see whether the same SMs are slow in every call.
                if let Ok(dir) = std::env::var("PEREGRINE_TRACE_DUMP") {
                    let mut csv = String::from("call,block,sm,stamp_us...\n");
                    for call in 0..8 {
                        for j in 0..3 {
                            k.moe_mxfp4_with(MoeKernel::FUSED, &wt, &dev[(call * 3 + j) % dev.len()], &x, MoeInput::Settled, &mut scratch, &mut y).unwrap();
                        }
                        s.synchronize().unwrap();
                        let tr = k.moe_trace().unwrap().unwrap();
                        let t0 = tr.chunks(MOE_TRACE_SLOTS).filter(|b| b[2] != 0).map(|b| b[2]).min().unwrap_or(0);
                        for (bi, b) in tr.chunks(MOE_TRACE_SLOTS).enumerate().filter(|(_, b)| b[2] != 0) {
                            let stamps: Vec<String> = b[1..].iter().map(|&v| if v == 0 { String::new() } else { format!("{:.2}", (v as f64 - t0 as f64) / 1e3) }).collect();
                            csv += &format!("{call},{bi},{},{}\n", b[0], stamps.join(","));
                        }
                    }
                    std::fs::write(format!("{dir}/trace-{}.csv", name.replace(['.', ' '], "_")), csv).unwrap();
                }
            }
            // PEREGRINE_BENCH_MOE_LAYERS=L (one token, the first shape): the same calls as a
            // step makes them, each on the next of L layers' experts (copies of these), so the
            // calls' pages span L x the expert bytes as in a model instead of one layer's.
            if t == 1 && name == "MiMo-V2-Flash" {
                if let Some(layers) = std::env::var("PEREGRINE_BENCH_MOE_LAYERS").ok().and_then(|v| v.parse::<usize>().ok()) {
                    moe_over_layers(&k, s, &wt, &dev, &x, top_k, layers, b, copy_bw, &time_b2b, &mut scratch);
                }
                if std::env::var("PEREGRINE_BENCH_MOE_ACC").is_ok() {
                    moe_acc_against_given(&k, s, &wt, &dev, &x, top_k, b, copy_bw, &time_b2b, &mut rng);
                }
            }
            println!(
                "{t:>6} {used:>8.1} {:>10.1} {ms:>8.3} {:>8.0} {:>9.1}%   ({default:?}; back to back: {}; alone: the same {:.1}%, row-major tensor cores {:.1}%, pipelined {:.1}%)",
                b / 1e6,
                b / (ms as f64 * 1e-3) / 1e9,
                pct(ms),
                variants.join(", "),
                pct(ms_alone),
                pct(ms2),
                pct(ms3)
            );
            // As a step runs it from 2 tokens: x split by the norm that wrote it, so the kernels
            // that read x split need no split launch of their own (MoeInput::Split).
            if k.moe_reads_split(&wt, t, top_k) {
                let sp = k.moe_split_x(&x, t, h).unwrap();
                let ms = time_b2b(&mut |run| k.moe_mxfp4_with(default, &wt, &dev[run % dev.len()], &x, MoeInput::Split(&sp), &mut scratch, &mut y).unwrap());
                println!("{t:>6} {used:>8.1} {:>10.1} {ms:>8.3} {:>8.0} {:>9.1}%   (the same, x split by its producer as in a step)", b / 1e6, b / (ms as f64 * 1e-3) / 1e9, pct(ms));
            }
            // As a step runs it, as decode rows (the mixed form where `moe_mixed_at` holds): where
            // the norm after the MoE sums the routed pairs (`moe_pairs_pay`), the same kernel
            // without its combine; else combined, where the mixed form runs (Pro).
            let pairs = Kernels::moe_leaves_pairs(&wt, default, top_k) && peregrine_cuda::kernels::moe_pairs_pay(top_k, h, t);
            let mixed = k.moe_mixed_at(&wt, t) && matches!(default, MoeKernel::Tiled { .. });
            if pairs || mixed {
                let sp = k.moe_reads_split(&wt, t, top_k).then(|| k.moe_split_x(&x, t, h).unwrap());
                let input = sp.as_ref().map_or(MoeInput::Settled, MoeInput::Split);
                let ms = match pairs {
                    true => time_b2b(&mut |run| k.moe_mxfp4_decode_pairs(default, &wt, &dev[run % dev.len()], &x, input, &mut scratch).unwrap()),
                    false => time_b2b(&mut |run| k.moe_mxfp4_decode(default, &wt, &dev[run % dev.len()], &x, input, &mut scratch, &mut y).unwrap()),
                };
                let form = match (pairs, mixed) {
                    (true, false) => "the pairs left to the norm after it, no combine",
                    (true, true) => "the pairs left to the norm after it, no combine, the small slots on digits",
                    _ => "decode rows, the small slots on digits, combined",
                };
                println!("{t:>6} {used:>8.1} {:>10.1} {ms:>8.3} {:>8.0} {:>9.1}%   (as in a step: {form})", b / 1e6, b / (ms as f64 * 1e-3) / 1e9, pct(ms));
                // PEREGRINE_BENCH_MOE_GRIDS=N,N,..: the same on at most N blocks each (the fused
                // kernel's grid; by default as many as are resident).
                if let (true, MoeKernel::Fused { stages, steps, .. }, Ok(grids)) = (pairs, default, std::env::var("PEREGRINE_BENCH_MOE_GRIDS")) {
                    for n in grids.split(',').filter_map(|v| v.trim().parse::<usize>().ok()) {
                        let kind = MoeKernel::Fused { stages, steps, max_blocks: n };
                        let ms = time_b2b(&mut |run| k.moe_mxfp4_pairs(kind, &wt, &dev[run % dev.len()], &x, input, &mut scratch).unwrap());
                        println!("{t:>6} {used:>8.1} {:>10.1} {ms:>8.3} {:>8.0} {:>9.1}%   (the same on at most {n} blocks)", b / 1e6, b / (ms as f64 * 1e-3) / 1e9, pct(ms));
                    }
                }
            }
            // Routing that shares experts between tokens (as consecutive tokens of one text
            // often do): every token draws its top-k from the same pool of 2 x top-k experts (a
            // fresh pool per run: an expert holds ~T/2 pairs, and passes that stage fewer pairs
            // than that stream its weights again) or of 4 x top-k (~T/4 pairs), against the MoE
            // GEMM on the same routings.
            if [4usize, 8, 16].contains(&t) {
                for pool in [2 * top_k, 4 * top_k] {
                    let pools: Vec<_> = (0..23)
                        .map(|_| {
                            let base = rng.random_range(0..e - pool);
                            routing_from_pool(&mut rng, t, base..base + pool, top_k)
                        })
                        .collect();
                    let pdev: Vec<_> = pools.iter().map(|r| k.upload_routing(r, e).unwrap()).collect();
                    let pused = pools.iter().map(|r| r.experts.len()).sum::<usize>() as f64 / pools.len() as f64;
                    let pb = pused * w.expert_bytes() as f64;
                    let pms = time_b2b(&mut |run| k.moe_mxfp4_with(default, &wt, &pdev[run % pdev.len()], &x, MoeInput::Settled, &mut scratch, &mut y).unwrap());
                    let gms = time_b2b(&mut |run| k.moe_mxfp4_with(MoeKernel::Gemm, &wt, &pdev[run % pdev.len()], &x, MoeInput::Settled, &mut scratch, &mut y).unwrap());
                    // The two-launch kernels (8 tokens' tuned rings above 8, where the GEMM is
                    // the default).
                    let tk = if matches!(default, MoeKernel::Tiled { .. }) { default } else { k.moe_kernel(&wt, 8, top_k) };
                    let tms = if tk == default { pms } else { time_b2b(&mut |run| k.moe_mxfp4_with(tk, &wt, &pdev[run % pdev.len()], &x, MoeInput::Settled, &mut scratch, &mut y).unwrap()) };
                    let ppct = |ms: f32| 100.0 * pb / (ms as f64 * 1e-3) / copy_bw;
                    println!(
                        "{t:>6} {pused:>8.1} {:>10.1} {pms:>8.3} {:>8.0} {:>9.1}%   (clustered routing: every token's experts from one pool of {pool}; {default:?}; {tk:?} {:.1}%, MoE GEMM {:.1}%)",
                        pb / 1e6,
                        pb / (pms as f64 * 1e-3) / 1e9,
                        ppct(pms),
                        ppct(tms),
                        ppct(gms)
                    );
                }
            }
        }
        drop(scratch);
        if tokens_env.is_some() {
            continue;
        }
        moe_prefill_bench(&k, s, &wt, name, top_k, copy_bw, &time, &mut rng);
    }
}

/// Median milliseconds of a closure over a number of timed runs (`time` in main).
type Timer<'a> = dyn Fn(usize, &mut dyn FnMut(usize)) -> f32 + 'a;

/// The MoE at prefill sizes: the two-launch tiled kernels (2 x 4 ring) against the MoE GEMM,
/// uniform routing (a fresh one per call) and, at 16 tokens, every token's experts drawn from
/// one pool of 2 top-k (the routing of a verify block whose tokens share experts). Reports
/// milliseconds per call and the useful arithmetic rate: 2 x 3 x H x I flops per routed pair
/// (the MMAs do twice that: hi and lo columns), against the copy bandwidth for the bytes.
#[allow(clippy::too_many_arguments)]
fn moe_prefill_bench(k: &Kernels, s: &std::sync::Arc<cudarc::driver::CudaStream>, wt: &MoeWeights, name: &str, top_k: usize, copy_bw: f64, time: &Timer, rng: &mut dyn rand::RngCore) {
    let (e, h, i) = (wt.num_experts, wt.hidden, wt.inter);
    let max_t = 2048usize;
    let x = s.clone_htod(&(0..max_t * h).map(|_| rng.random::<f32>() - 0.5).collect::<Vec<_>>()).unwrap();
    let mut y = s.alloc_zeros::<f32>(max_t * h).unwrap();
    let mut scratch = k.moe_scratch(wt, max_t * top_k).unwrap();
    println!("\nMoE at prefill sizes, {name} (ms per call, median of 9 after warm-up; useful TFLOP/s = 6 H I per pair; bytes = distinct experts):");
    println!("| tokens | routing | experts | pairs per expert | tiled 2x4 ms | GEMM ms | GEMM / tiled | GEMM TFLOP/s | GEMM % of copy bw | default |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut line = |rng: &mut dyn rand::RngCore, t: usize, what: &str, pool: std::ops::Range<usize>| {
        let routings: Vec<_> = (0..5).map(|_| routing_from_pool(rng, t, pool.clone(), top_k)).collect();
        let dev: Vec<_> = routings.iter().map(|r| k.upload_routing(r, e).unwrap()).collect();
        let used = routings.iter().map(|r| r.experts.len()).sum::<usize>() as f64 / routings.len() as f64;
        let mut run = |kind: MoeKernel| time(9, &mut |c| k.moe_mxfp4_with(kind, wt, &dev[c % dev.len()], &x, MoeInput::Settled, &mut scratch, &mut y).unwrap());
        let (tiled, gemm) = (run(MoeKernel::TILED), run(MoeKernel::Gemm));
        let flops = (t * top_k) as f64 * 6.0 * (h * i) as f64;
        let bytes = used * wt.expert_bytes() as f64;
        println!(
            "| {t} | {what} | {used:.1} | {:.1} | {tiled:.3} | {gemm:.3} | {:.2}x | {:.1} | {:.1}% | {:?} |",
            (t * top_k) as f64 / used,
            gemm / tiled,
            flops / (gemm as f64 * 1e-3) / 1e12,
            100.0 * bytes / (gemm as f64 * 1e-3) / copy_bw,
            k.moe_kernel(wt, t, top_k)
        );
    };
    for t in [16usize, 32, 64, 128, 256, 512, 1024, 2048] {
        line(rng, t, "uniform", 0..e);
    }
    for t in [8usize, 16] {
        let base = rng.random_range(0..e - 2 * top_k);
        line(rng, t, "pool of 2 top-k", base..base + 2 * top_k);
    }
}

/// Routing of `t` tokens, each to `top_k` distinct experts drawn uniformly from `pool`, with
/// equal weights.
/// Plain reads of the byte counts the MoE moves (kernels of the bench's own, compiled here): the
/// most any one launch reading that many bytes can reach, back to back, against which the MoE's
/// fraction of copy bandwidth is read. Two ways to read: every thread loading 16-byte words
/// (8 blocks of 256 per SM), and the MoE kernels' structure without their math (8 warps per
/// block, 2 per SM, each warp's ring of 2 stages of 2176 bytes filled by bulk copies).
const READ_PROBE_CU: &str = r#"
extern "C" __global__ void fill(unsigned* p, unsigned long long n) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n; i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned v = (unsigned)i * 2654435761u;
        p[i] = v ^ (v >> 15) ^ 0x5bd1e995u;
    }
}
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
// Block b reads its contiguous share of n16 16-byte words, 4 per thread in flight.
extern "C" __global__ void read_v4(const uint4* __restrict__ p, unsigned long long n16, unsigned* out) {
    unsigned long long per = (n16 + gridDim.x - 1) / gridDim.x, b = blockIdx.x * per, e = min(n16, b + per);
    unsigned acc = 0;
    for (unsigned long long i = b + threadIdx.x; i < e; i += 4ull * blockDim.x) {
        uint4 v[4];
#pragma unroll
        for (int u = 0; u < 4; u++) {
            unsigned long long j = i + (unsigned long long)u * blockDim.x;
            v[u] = j < e ? ld_stream(p + j) : make_uint4(0u, 0u, 0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < 4; u++) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
    }
    if (acc == 0x9e3779b9u) out[0] = acc;
}
#define CH 2176
// Warp w of block b streams its contiguous share of the n / CH chunks through a ring of two
// CH-byte stages in shared memory (one lane asks for each by cp.async.bulk, all wait on its
// mbarrier), reading one word per lane of each. With `split`, a stage is two copies as the MoE's
// rings ask for them: 2048 bytes of codes from the first 16/17 of the range, 128 of scales from
// the rest.
extern "C" __global__ void read_bulk(const unsigned char* __restrict__ p, unsigned long long n, unsigned* out, int split) {
    extern __shared__ __align__(128) unsigned char ring[];
    __shared__ unsigned long long bars[2 * 32];
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    unsigned char* r = ring + w * 2 * CH;
    unsigned long long* bar = bars + 2 * w;
    unsigned long long chunks = n / CH, warps = (unsigned long long)gridDim.x * nw, per = (chunks + warps - 1) / warps;
    unsigned long long c0 = ((unsigned long long)blockIdx.x * nw + w) * per, c1 = min(chunks, c0 + per);
    auto issue = [&](unsigned long long c) {
        int sl = (int)((c - c0) & 1);
        unsigned d = (unsigned)__cvta_generic_to_shared(r + sl * CH), b = (unsigned)__cvta_generic_to_shared(bar + sl);
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(CH) : "memory");
        if (split) {
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(d), "l"(p + c * 2048), "r"(2048), "r"(b) : "memory");
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(d + 2048), "l"(p + chunks * 2048 + c * 128), "r"(128), "r"(b) : "memory");
        } else {
            asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(d), "l"(p + c * CH), "r"(CH), "r"(b) : "memory");
        }
    };
    if (lane == 0) {
        for (int i = 0; i < 2; i++) {
            unsigned b = (unsigned)__cvta_generic_to_shared(bar + i);
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(b) : "memory");
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (unsigned long long c = c0; c < min(c1, c0 + 2); c++) issue(c);
    }
    __syncwarp();
    unsigned acc = 0;
    for (unsigned long long c = c0; c < c1; c++) {
        int sl = (int)((c - c0) & 1);
        unsigned b = (unsigned)__cvta_generic_to_shared(bar + sl), ph = (unsigned)(((c - c0) >> 1) & 1);
        asm volatile("{.reg .pred q;\nW_%=:\nmbarrier.try_wait.parity.shared::cta.b64 q, [%0], %1;\n@!q bra W_%=;}" ::"r"(b), "r"(ph) : "memory");
        acc ^= reinterpret_cast<const unsigned*>(r + sl * CH)[lane];
        __syncwarp();
        if (lane == 0 && c + 2 < c1) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            issue(c + 2);
        }
    }
    if (acc == 0x9e3779b9u) out[0] = acc;
}
// The one-token fused MoE's work (MiMo-V2-Flash) without its math: 256 items of 8 tiles of 16
// stages, then 256 of 8 tiles of 8 stages (2176 bytes each, the gate_up and down tiles), block
// b taking items b and b + grid; each warp streams its tile of each item through its ring, which
// runs on from one item into the next. sync: 0 nothing between a block's items, 1 a block
// barrier, 2 a fence, a barrier and a count first (as a gate_up item counts itself done).
extern "C" __global__ void read_items(const unsigned char* __restrict__ p, unsigned long long n, unsigned* out, int sync) {
    extern __shared__ __align__(128) unsigned char ring[];
    __shared__ unsigned long long bars[2 * 32];
    int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
    unsigned char* r = ring + w * 2 * CH;
    unsigned long long* bar = bars + 2 * w;
    const int items = 512, half = 256;
    const unsigned long long big = 16ull * CH * 8, small = 8ull * CH * 8;  // bytes per item
    if (half * (big + small) > n || 2 * (int)gridDim.x < items) __trap();  // (the caller's bytes, and every item taken)
    int n0 = blockIdx.x, n1 = blockIdx.x + gridDim.x;
    int k0 = n0 < items ? (n0 < half ? 16 : 8) : 0, k1 = n1 < items ? (n1 < half ? 16 : 8) : 0, total = k0 + k1;
    auto addr = [&](int c) -> const unsigned char* {
        int it = c < k0 ? n0 : n1, j = c < k0 ? c : c - k0, k = it < half ? 16 : 8;
        unsigned long long at = it < half ? (unsigned long long)it * big : half * big + (unsigned long long)(it - half) * small;
        return p + at + (unsigned long long)(w * k + j) * CH;
    };
    auto issue = [&](int c) {
        unsigned d = (unsigned)__cvta_generic_to_shared(r + (c & 1) * CH), b = (unsigned)__cvta_generic_to_shared(bar + (c & 1));
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b), "r"(CH) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(d), "l"(addr(c)), "r"(CH), "r"(b) : "memory");
    };
    if (lane == 0) {
        for (int i = 0; i < 2; i++) {
            unsigned b = (unsigned)__cvta_generic_to_shared(bar + i);
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(b) : "memory");
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        for (int c = 0; c < min(total, 2); c++) issue(c);
    }
    __syncwarp();
    unsigned acc = 0;
    for (int c = 0; c < total; c++) {
        if (c == k0 && sync) {
            if (sync == 2) {
                __threadfence();
                __syncthreads();
                if (threadIdx.x == 0) atomicAdd(out + 1, 1u);
            }
            __syncthreads();
        }
        unsigned b = (unsigned)__cvta_generic_to_shared(bar + (c & 1)), ph = (unsigned)((c >> 1) & 1);
        asm volatile("{.reg .pred q;\nW_%=:\nmbarrier.try_wait.parity.shared::cta.b64 q, [%0], %1;\n@!q bra W_%=;}" ::"r"(b), "r"(ph) : "memory");
        acc ^= reinterpret_cast<const unsigned*>(r + (c & 1) * CH)[lane];
        __syncwarp();
        if (lane == 0 && c + 2 < total) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            issue(c + 2);
        }
    }
    if (acc == 0x9e3779b9u) out[0] = acc;
}
"#;

/// Milliseconds per call of a closure timed back to back (main's `time_b2b`).
type TimeB2b<'a> = &'a dyn Fn(&mut dyn FnMut(usize)) -> f32;
/// `time`: median milliseconds of a closure over the given runs.
type Time<'a> = &'a dyn Fn(usize, &mut dyn FnMut(usize)) -> f32;

/// The read probes' kernels (READ_PROBE_CU above).
struct ReadProbe {
    fill: cudarc::driver::CudaFunction,
    read_v4: cudarc::driver::CudaFunction,
    read_bulk: cudarc::driver::CudaFunction,
    read_items: cudarc::driver::CudaFunction,
}

impl ReadProbe {
    fn load(g: &peregrine_cuda::device::Gpu) -> ReadProbe {
        let (m, _) = peregrine_cuda::compile::load(&g.ctx, "read_probe", READ_PROBE_CU, peregrine_cuda::device::nvrtc_arch(g.capability)).unwrap();
        let f = |name: &str| m.load_function(name).unwrap();
        ReadProbe { fill: f("fill"), read_v4: f("read_v4"), read_bulk: f("read_bulk"), read_items: f("read_items") }
    }

    /// A buffer of `n` bytes of non-zero words, and its device address.
    fn filled(&self, g: &peregrine_cuda::device::Gpu, sms: usize, n: usize) -> (cudarc::driver::CudaSlice<u8>, u64) {
        use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
        let s = &g.stream;
        let mut buf = s.alloc_zeros::<u8>(n).unwrap();
        let words = (n / 4) as u64;
        unsafe { s.launch_builder(&self.fill).arg(&mut buf).arg(&words).launch(LaunchConfig { grid_dim: (4 * sms as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }) }.unwrap();
        let base = buf.device_ptr(s).0;
        (buf, base)
    }
}

/// % of copy bandwidth of probe `f` reading `bytes` a call on `blocks` blocks of 256 threads
/// (`smem` bytes of shared memory; arguments at, `n_arg`, out, then `extra` if any), 20 calls
/// back to back, each at the next offset of a buffer of `n` bytes at `base`.
#[allow(clippy::too_many_arguments)]
fn read_rate(s: &std::sync::Arc<cudarc::driver::CudaStream>, f: &cudarc::driver::CudaFunction, base: u64, n: usize, bytes: usize, blocks: usize, smem: u32, n_arg: u64, extra: Option<i32>, out: &mut cudarc::driver::CudaSlice<u32>, copy_bw: f64, time_b2b: TimeB2b) -> f64 {
    use cudarc::driver::{LaunchConfig, PushKernelArg};
    let slots = n / bytes;
    let ms = time_b2b(&mut |i| {
        let at = base + ((i % slots) * bytes) as u64;
        let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: smem };
        let mut b = s.launch_builder(f);
        b.arg(&at).arg(&n_arg).arg(&mut *out);
        if let Some(extra) = &extra {
            b.arg(extra);
        }
        unsafe { b.launch(cfg) }.unwrap();
    });
    100.0 * bytes as f64 / (ms as f64 * 1e-3) / copy_bw
}

fn plain_reads(g: &peregrine_cuda::device::Gpu, sms: usize, copy_bw: f64, time_b2b: TimeB2b) {
    let s = &g.stream;
    let p = ReadProbe::load(g);
    let n = 2usize << 30;
    let (_buf, base) = p.filled(g, sms, n);
    let mut out = s.alloc_zeros::<u32>(2).unwrap();
    println!("\nplain reads, one launch per call, 20 calls back to back (offsets rotate through 2 GiB): MB, then % of copy bandwidth");
    println!("|   MB | 16-byte loads, 8 x 256 threads per SM | bulk-copy rings, 2 x 8 warps per SM | the same, codes and scales apart | bulk-copy rings, 4 x 8 warps per SM |");
    println!("|---|---|---|---|---|");
    // 107 and 160 MB: one token's experts of MiMo-V2-Flash and MiMo-V2.5-Pro.
    for mb in [32usize, 64, 107, 160, 256, 512, 1024] {
        let bytes = mb * 1_000_000 / 2176 * 2176;
        let mut cell = |f: &cudarc::driver::CudaFunction, blocks: usize, smem: u32, n_arg: u64, extra: Option<i32>| read_rate(s, f, base, n, bytes, blocks, smem, n_arg, extra, &mut out, copy_bw, time_b2b);
        let v4 = cell(&p.read_v4, 8 * sms, 0, (bytes / 16) as u64, None);
        let b2 = cell(&p.read_bulk, 2 * sms, 8 * 2 * 2176, bytes as u64, Some(0));
        let b2s = cell(&p.read_bulk, 2 * sms, 8 * 2 * 2176, bytes as u64, Some(1));
        let b4 = cell(&p.read_bulk, 4 * sms, 8 * 2 * 2176, bytes as u64, Some(0));
        println!("| {mb:>4} | {v4:.1}% | {b2:.1}% | {b2s:.1}% | {b4:.1}% |");
        if mb == 107 && 2 * sms >= 256 {
            // The same bytes in the one-token fused MoE's items (Flash), on its grid (2 blocks
            // per SM: each takes its items b and b + grid, so 512 items need 256 blocks).
            let items: Vec<String> = (0..3).map(|sync| format!("{:.1}%", cell(&p.read_items, 2 * sms, 8 * 2 * 2176, bytes as u64, Some(sync)))).collect();
            println!("|  107 as the 1-token MoE's items: nothing between items {}, a block barrier {}, fence + barrier + count {} |", items[0], items[1], items[2]);
        }
    }
}

/// The one-token MoE as a step runs it (the pairs left to the norm), each call on the next of
/// `layers` copies of `wt` against every call on `wt`, alternating three times: whether the
/// pages a model's experts span (18 layers of Flash: 61 GB) cost what one layer's (3.4 GB) do.
/// Then the same calls on scratch of other addresses (`main`: the bench's own; fresh ones;
/// one of `main`'s buffers swapped for a fresh one's): one process read 72% and 81% in two rows,
/// which these showed to be a transient, not the addresses.
#[allow(clippy::too_many_arguments)]
fn moe_over_layers(k: &Kernels, s: &std::sync::Arc<cudarc::driver::CudaStream>, wt: &MoeWeights, dev: &[peregrine_cuda::kernels::DeviceRouting], x: &cudarc::driver::CudaSlice<f32>, top_k: usize, layers: usize, bytes: f64, copy_bw: f64, time_b2b: TimeB2b, main: &mut peregrine_cuda::kernels::MoeScratch) {
    use cudarc::driver::DevicePtr;
    let MoeLayout::Tiled { gate_up, down } = &wt.layout else { return };
    let copies: Vec<MoeWeights> = (1..layers)
        .map(|_| MoeWeights { layout: MoeLayout::Tiled { gate_up: s.clone_dtod(gate_up).unwrap(), down: s.clone_dtod(down).unwrap() }, num_experts: wt.num_experts, hidden: wt.hidden, inter: wt.inter })
        .collect();
    let all: Vec<&MoeWeights> = std::iter::once(wt).chain(copies.iter()).collect();
    let kind = k.moe_kernel(wt, 1, top_k);
    let mut scratch = k.moe_scratch(wt, top_k).unwrap();
    let pct = |ms: f32| 100.0 * bytes / (ms as f64 * 1e-3) / copy_bw;
    let mut one = Vec::new();
    let mut many = Vec::new();
    for _ in 0..3 {
        one.push(pct(time_b2b(&mut |run| k.moe_mxfp4_pairs(kind, wt, &dev[run % dev.len()], x, MoeInput::Settled, &mut scratch).unwrap())));
        many.push(pct(time_b2b(&mut |run| k.moe_mxfp4_pairs(kind, all[run % all.len()], &dev[run % dev.len()], x, MoeInput::Settled, &mut scratch).unwrap())));
    }
    let f = |v: &[f64]| v.iter().map(|p| format!("{p:.1}%")).collect::<Vec<_>>().join(" / ");
    println!("  1 token as in a step ({kind:?}), three rounds: one layer's experts {}; each call on the next of {layers} layers' ({:.1} GB) {}", f(&one), layers as f64 * (gate_up.len() + down.len()) as f64 / 1e9, f(&many));
    drop(copies);
    let mut big = k.moe_scratch(wt, 64 * top_k).unwrap();
    let at = |sc: &peregrine_cuda::kernels::MoeScratch| format!("h {:#x} out {:#x} counters {:#x}", sc.h.device_ptr(s).0, sc.out.device_ptr(s).0, sc.counters.device_ptr(s).0);
    println!("  scratch addresses: main {}; fresh 8 pairs {}; fresh 512 pairs {}", at(main), at(&scratch), at(&big));
    let rate = |sc: &mut peregrine_cuda::kernels::MoeScratch| pct(time_b2b(&mut |run| k.moe_mxfp4_pairs(kind, wt, &dev[run % dev.len()], x, MoeInput::Settled, sc).unwrap()));
    for round in 0..3 {
        let a = rate(main);
        let b = rate(&mut scratch);
        let c = rate(&mut big);
        std::mem::swap(&mut main.counters, &mut scratch.counters);
        let d = rate(main);
        std::mem::swap(&mut main.counters, &mut scratch.counters);
        std::mem::swap(&mut main.h, &mut scratch.h);
        let e = rate(main);
        std::mem::swap(&mut main.h, &mut scratch.h);
        std::mem::swap(&mut main.out, &mut scratch.out);
        let g = rate(main);
        std::mem::swap(&mut main.out, &mut scratch.out);
        println!("  round {round}: main {a:.1}%, fresh 8 {b:.1}%, fresh 512 {c:.1}%, main with fresh counters {d:.1}%, with fresh h {e:.1}%, with fresh out {g:.1}%");
    }
}

/// The one-token MoE of a step (`moe_fused_acc`: routing itself from the o_proj's fixed-point
/// logit sums, x staged as the post-attention norm's output) against the same kernel on a
/// routing given (`moe_fused_bulk`, the rows above), alternating three times: whether the step's
/// ~5 us a layer over the bench's rate are the routing prologue's.
#[allow(clippy::too_many_arguments)]
fn moe_acc_against_given(k: &Kernels, s: &std::sync::Arc<cudarc::driver::CudaStream>, wt: &MoeWeights, dev: &[peregrine_cuda::kernels::DeviceRouting], x: &cudarc::driver::CudaSlice<f32>, top_k: usize, bytes: f64, copy_bw: f64, time_b2b: TimeB2b, rng: &mut dyn rand::RngCore) {
    use cudarc::driver::DevicePtr;
    use peregrine_core::spec::{MoeSpec, RouterScoring};
    let (e, h) = (wt.num_experts, wt.hidden);
    let spec = MoeSpec { num_experts: e, top_k, intermediate_size: wt.inter, scoring: RouterScoring::Sigmoid, correction_bias: false, n_group: 1, topk_group: 1, norm_topk_prob: true, routed_scaling_factor: 1.0 };
    let copies = 8;
    // 23 sets of sums: copy 0 random logits in [-4, 4) x 2^40, the other copies and the flag 0.
    let accs: Vec<cudarc::driver::CudaSlice<u64>> = (0..23)
        .map(|_| {
            let mut v = vec![0u64; copies * e + 1];
            for a in v.iter_mut().take(e) {
                *a = ((rng.random::<f64>() * 8.0 - 4.0) * (1u64 << 40) as f64) as i64 as u64;
            }
            s.clone_htod(&v).unwrap()
        })
        .collect();
    let ssq = s.clone_htod(&vec![16.0f32; h / 16]).unwrap();  // sum h / 16 x 16 = H: 1 / rms ~ 1
    let unused = s.alloc_zeros::<f32>(h).unwrap();
    let kind = k.moe_kernel(wt, 1, top_k);
    let mut scratch = k.moe_scratch(wt, top_k).unwrap();
    let mut tok_pairs = s.alloc_zeros::<i32>(top_k).unwrap();
    let pct = |ms: f32| 100.0 * bytes / (ms as f64 * 1e-3) / copy_bw;
    let routes: Vec<peregrine_cuda::kernels::RouteInOproj> = accs
        .iter()
        .map(|a| peregrine_cuda::kernels::RouteInOproj { res: &unused, norm: &unused, router: &unused, experts: e, acc: a.device_ptr(s).0, copies, ssq: &ssq, hg: x, tok: copies * e + 1 })
        .collect();
    let mut given = Vec::new();
    let mut acc = Vec::new();
    for _ in 0..3 {
        given.push(pct(time_b2b(&mut |run| k.moe_mxfp4_pairs(kind, wt, &dev[run % dev.len()], x, MoeInput::Settled, &mut scratch).unwrap())));
        acc.push(pct(time_b2b(&mut |run| k.moe_mxfp4_acc_pairs(kind, &spec, wt, &routes[run % routes.len()], 1e-5, None, &mut scratch, &mut tok_pairs, 0, 0).unwrap())));
    }
    let f = |v: &[f64]| v.iter().map(|p| format!("{p:.1}%")).collect::<Vec<_>>().join(" / ");
    println!("  1 token ({kind:?}), three rounds: routing given (moe_fused_bulk) {}; routing from the o_proj's sums, x as the norm's output (moe_fused_acc, as a step runs it) {}", f(&given), f(&acc));
    // A measurement build (-DMOE_TRACE): where each kernel's time goes, the last of 6 calls.
    if k.moe_trace().unwrap().is_some() {
        for _ in 0..6 {
            k.moe_mxfp4_pairs(kind, wt, &dev[0], x, MoeInput::Settled, &mut scratch).unwrap();
        }
        s.synchronize().unwrap();
        print_moe_trace("routing given (moe_fused_bulk), the last of 6 calls", &k.moe_trace().unwrap().unwrap(), wt.inter, top_k);
        for r in routes.iter().take(6) {
            k.moe_mxfp4_acc_pairs(kind, &spec, wt, r, 1e-5, None, &mut scratch, &mut tok_pairs, 0, 0).unwrap();
        }
        s.synchronize().unwrap();
        print_moe_trace("routing from the o_proj's sums (moe_fused_acc), the last of 6 calls", &k.moe_trace().unwrap().unwrap(), wt.inter, top_k);
    }
}

/// Plain reads of 107 MB as the one-token MoE's items (`read_items`), each call at the next
/// offset of a span of S GiB, for S in `spans`: whether reading fresh pages costs bandwidth.
fn read_spans(g: &peregrine_cuda::device::Gpu, sms: usize, copy_bw: f64, time_b2b: TimeB2b, spans: &[usize]) {
    let s = &g.stream;
    let p = ReadProbe::load(g);
    let bytes = 107_000_000 / 2176 * 2176;
    let mut out = s.alloc_zeros::<u32>(2).unwrap();
    println!("\nplain reads of 107 MB, each call at the next offset of a span (20 calls back to back), % of copy bandwidth: span GiB, as the MoE's items, 16-byte loads");
    for &gib in spans {
        let n = gib << 30;
        let (buf, base) = p.filled(g, sms, n);
        let items = read_rate(s, &p.read_items, base, n, bytes, 2 * sms, 8 * 2 * 2176, bytes as u64, Some(0), &mut out, copy_bw, time_b2b);
        let v4 = read_rate(s, &p.read_v4, base, n, bytes, 8 * sms, 0, (bytes / 16) as u64, None, &mut out, copy_bw, time_b2b);
        println!("| {gib:>3} | {items:.1}% | {v4:.1}% |");
        drop(buf);
    }
}

/// Tiled MXFP4 bytes from codes and scales: each step's 512 code bytes, then its 32 scales.
fn tile_steps(codes: Vec<u8>, scales: Vec<u8>) -> Vec<u8> {
    codes.chunks(512).zip(scales.chunks(32)).flat_map(|(c, s)| c.iter().chain(s).copied()).collect()
}

fn routing_from_pool(rng: &mut (impl Rng + ?Sized), t: usize, pool: std::ops::Range<usize>, top_k: usize) -> MoeRouting {
    let choices: Vec<Vec<(usize, f32)>> = (0..t)
        .map(|_| {
            let mut ex: Vec<usize> = pool.clone().collect();
            for j in 0..top_k {
                let kk = rng.random_range(j..ex.len());
                ex.swap(j, kk);
            }
            ex[..top_k].iter().map(|&x| (x, 1.0 / top_k as f32)).collect()
        })
        .collect();
    MoeRouting::new(&choices)
}

/// The wgmma GEMM's per-stage stamps (kernels/gemv.cu's GWG_TRACE layout: per block its
/// %globaltimer start, cycles in all, SM, then 4 cycle stamps per stage), as mean cycles per
/// stage between them over every stage past the first of every block.
fn print_gwg_trace(what: &str, tr: &[u32]) {
    const STAGES: usize = 64;
    let per = 4 + 4 * STAGES;
    let blocks: Vec<&[u32]> = tr.chunks(per).filter(|b| b[1] != 0).collect();
    if blocks.is_empty() {
        println!("  gwg trace {what}: no wgmma GEMM blocks");
        return;
    }
    let (mut sums, mut n, mut first, mut tail) = ([0f64; 4], 0usize, 0f64, 0f64);
    let mut totals: Vec<u32> = Vec::new();
    let mut sms = std::collections::BTreeMap::<u32, usize>::new();
    for b in &blocks {
        let st = |p: usize, k: usize| b[4 + 4 * p + k] as f64;
        let used = (0..STAGES).take_while(|&p| b[4 + 4 * p + 3] != 0).count();
        first += st(0, 0);
        for p in 1..used {
            sums[0] += st(p, 0) - st(p - 1, 3);
            sums[1] += st(p, 1) - st(p, 0);
            sums[2] += st(p, 2) - st(p, 1);
            sums[3] += st(p, 3) - st(p, 2);
            n += 1;
        }
        if used > 0 {
            tail += b[1] as f64 - st(used - 1, 3);
        }
        totals.push(b[1]);
        *sms.entry(b[2]).or_default() += 1;
    }
    totals.sort_unstable();
    let starts: Vec<u32> = blocks.iter().map(|b| b[0]).collect();
    let (s0, s1) = (starts.iter().min().unwrap(), starts.iter().max().unwrap());
    let nb = blocks.len() as f64;
    let n = n.max(1) as f64;
    println!(
        "  gwg trace {what}: {} blocks on {} SMs, starts spread {:.1} us; cycles per block min / median / max {} / {} / {}; first data {:.0}; per stage: wait for data {:.0}, barrier {:.0}, issue {:.0}, MMAs {:.0}; after the last stage {:.0}",
        blocks.len(), sms.len(), s1.wrapping_sub(*s0) as f64 / 1e3, totals[0], totals[totals.len() / 2], totals[totals.len() - 1],
        first / nb, sums[0] / n, sums[1] / n, sums[2] / n, sums[3] / n, tail / nb
    );
}

/// Percentiles of the fused MoE kernel's trace stamps (kernels/moe.cu, MOE_TRACE), in us after
/// the first block got past its wait for the kernel ahead (`trace::moe_trace_report`): `inter`
/// the experts' intermediate size, `slots` the call's expert slots.
fn print_moe_trace(what: &str, tr: &[u64], inter: usize, slots: usize) {
    print!("{}", peregrine_cuda::trace::moe_trace_report(what, tr, inter, slots));
}

/// Sampling and logprobs on the GPU over MiMo-V2-Flash's vocabulary, 1 and 64 rows per call (the
/// rows in parallel), on two kinds of logits: "flat" (uniform in +-8: top-p 0.95 keeps most of
/// the vocabulary, the sampler's worst case) and "peaked" (a normal spread with a few dozen
/// tokens 8-16 above it, like a language model's). Milliseconds per call, the parameter upload
/// included. Each cell's ids over 64 rows with uniforms spread over [0, 1) are hashed (FNV-1a),
/// so two builds can be shown to draw the same tokens.
fn sampling(k: &Kernels, s: &std::sync::Arc<cudarc::driver::CudaStream>, time: &Timer) {
    use peregrine_core::backend::RowSampling;
    let v = 152_576usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    // A normal deviate (Box-Muller).
    let normal = |rng: &mut rand::rngs::StdRng| -> f32 {
        let (a, b): (f32, f32) = (rng.random::<f32>().max(1e-12), rng.random());
        (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
    };
    let cases: [(&str, f32, i32, f32, f32); 6] =
        [("greedy", 0.0, 0, 1.0, 0.0), ("T=0.8", 0.8, 0, 1.0, 0.0), ("T=0.8, top-p 0.95", 0.8, 0, 0.95, 0.0), ("T=0.8, top-k 50", 0.8, 50, 1.0, 0.0), ("T=1, top-k 40, top-p 0.9, min-p 0.05", 1.0, 40, 0.9, 0.05), ("T=0.6, top-p 0.8", 0.6, 0, 0.8, 0.0)];
    let by = match k.sample_blocks_per_row() {
        1 => "one block per row".to_string(),
        n => format!("a cluster of {n} blocks per row"),
    };
    println!("\nsampling on the GPU, vocabulary {v}, {by} (ms per call, rows in parallel; ids hash over 64 rows):");
    println!("| logits | rows | {} | logprobs (top 5) |", cases.iter().map(|c| c.0).collect::<Vec<_>>().join(" | "));
    println!("|---|---|{}---|", "---|".repeat(cases.len()));
    for kind in ["flat", "peaked"] {
        let rows_max = 64usize;
        let host: Vec<f32> = (0..rows_max)
            .flat_map(|_| {
                let mut row: Vec<f32> = (0..v).map(|_| if kind == "flat" { (rng.random::<f32>() - 0.5) * 16.0 } else { 2.0 * normal(&mut rng) }).collect();
                if kind == "peaked" {
                    for j in 0..40 {
                        row[(j * 3803 + 17) % v] = 8.0 + 8.0 * (j as f32 / 40.0);
                    }
                }
                row
            })
            .collect();
        let logits = s.clone_htod(&host).unwrap();
        let mut hashes = Vec::new();
        for rows in [1usize, 64] {
            let mut cells = Vec::new();
            for &(_, t, top_k, top_p, min_p) in &cases {
                let p = |u: f64| RowSampling { temperature: t, top_k, top_p, min_p, u, adj_start: 0, adj_len: 0 };
                let params = vec![p(0.37); rows];
                cells.push(time(10, &mut |_| drop(k.sample_rows(&logits, v, &params).unwrap())));
                if rows == 64 {
                    let spread: Vec<RowSampling> = (0..64).map(|r| p((r as f64 * 0.618_034).fract())).collect();
                    let ids = s.clone_dtoh(&k.sample_rows(&logits, v, &spread).unwrap()).unwrap();
                    hashes.push(ids.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &id| (h ^ id as u32 as u64).wrapping_mul(0x100_0000_01b3)));
                }
            }
            let chosen = s.alloc_zeros::<i32>(rows).unwrap();
            let lp = time(10, &mut |_| drop(k.row_logprobs(&logits, v, &chosen, &vec![Some(5); rows]).unwrap()));
            println!("| {kind} | {rows} | {} | {lp:.3} |", cells.iter().map(|c| format!("{c:.3}")).collect::<Vec<_>>().join(" | "));
        }
        println!("| {kind} | ids hash | {} | |", hashes.iter().map(|h| format!("{h:016x}")).collect::<Vec<_>>().join(" | "));
        // A measurement build (-DSAMPLE_TRACE): one row's phases, cycles since the previous stamp.
        if k.sample_trace().unwrap().is_some() {
            for &(name, t, top_k, top_p, min_p) in &cases {
                let p = [RowSampling { temperature: t, top_k, top_p, min_p, u: 0.37, adj_start: 0, adj_len: 0 }];
                for _ in 0..2 {
                    drop(s.clone_dtoh(&k.sample_rows(&logits, v, &p).unwrap()).unwrap());
                }
                let tr = k.sample_trace().unwrap().unwrap();
                let stamps: Vec<(u64, u64)> = tr.iter().take_while(|&&w| w != 0).map(|&w| (w >> 48, w & 0xffff_ffff_ffff)).collect();
                let first = stamps.first().map_or(0, |s| s.1);
                let cells: Vec<String> = stamps.windows(2).map(|w| format!("{}:{}", w[1].0, w[1].1.wrapping_sub(w[0].1))).collect();
                println!("sample trace, {kind}, {name}: {} cycles in all; phase:cycles since the last stamp {}", stamps.last().map_or(0, |s| s.1.wrapping_sub(first)), cells.join(" "));
            }
        }
    }
}

/// The dense projections of a MiMo-V2-Flash layer at prompt sizes (the stacked FP8 q/k/v,
/// 13568 x 4096, and the BF16 o_proj, 4096 x 8192): the GEMM on mma.sync (`gemm_mma_*`) against
/// wgmma (`gemm_wg_*`, with its `gemm_wg_split`), each call one split and one GEMM as the model
/// runs it; useful TFLOP/s count 2 N K T. The two must agree in every bit.
fn prefill_gemm(g: &peregrine_cuda::device::Gpu, k: &mut Kernels, time: Time) {
    let s = &g.stream;
    if !k.has_dense_gemm_wgmma() {
        println!("\nprefill GEMM: no wgmma on this GPU");
        return;
    }
    let mut r = rand::rngs::StdRng::seed_from_u64(11);
    let tmax = 4096usize;
    let x = s.clone_htod(&(0..tmax * 8192).map(|_| r.random_range(-1.0f32..1.0)).collect::<Vec<_>>()).unwrap();
    println!("\nprefill GEMM (Flash shapes): matrix, tokens, mma.sync ms, wgmma ms, useful TFLOP/s mma.sync / wgmma, ratio");
    let (qr, qk) = (13568usize, 4096usize);
    let e4m3 = |b: u8| if b & 0x7f == 0x7f { b ^ 1 } else { b };
    let w8 = s.clone_htod(&(0..qr * qk).map(|_| e4m3(r.random())).collect::<Vec<_>>()).unwrap();
    let sc = s.clone_htod(&(0..qr.div_ceil(128) * qk / 128).map(|_| r.random_range(0.5f32..2.0)).collect::<Vec<_>>()).unwrap();
    let (or, ok) = (4096usize, 8192usize);
    let wb = s.clone_htod(&(0..or * ok).map(|_| half::bf16::from_f32(r.random_range(-0.05f32..0.05)).to_bits()).collect::<Vec<_>>()).unwrap();
    let mut y = s.alloc_zeros::<f32>(tmax * qr).unwrap();
    // (Below 256 tokens the first column is the GEMV tiles the token count takes.)
    for t in [64usize, 128, 192, 256, 512, 1024, 2048, 4096] {
        for (name, n, kk) in [("q/k/v fp8", qr, qk), ("o_proj bf16", or, ok)] {
            let run = |k: &Kernels, y: &mut cudarc::driver::CudaSlice<f32>| {
                if n == qr {
                    k.gemv_fp8(&w8, &sc, &x, y, n, kk, t).unwrap()
                } else {
                    k.gemv_bf16(&wb, &x, y, n, kk, t).unwrap()
                }
            };
            let mut ms = [0f32; 2];
            let mut bits = Vec::new();
            let before = k.set_dense_gemm_wgmma(None);  // the environment's, put back after
            for (i, wg) in [false, true].into_iter().enumerate() {
                k.set_dense_gemm_wgmma(Some(wg));
                ms[i] = time(10, &mut |_| run(k, &mut y));
                bits.push(s.clone_dtoh(&y.slice(..t * n)).unwrap());
            }
            k.set_dense_gemm_wgmma(before);
            let same = bits[0].iter().zip(&bits[1]).all(|(a, b)| a.to_bits() == b.to_bits());
            let tf = |ms: f32| 2.0 * (n * kk * t) as f64 / (ms as f64 * 1e-3) / 1e12;
            println!("{name:<12} T={t:<5} {:8.3} {:8.3} {:6.1} / {:6.1} TFLOP/s  {:.2}x{}", ms[0], ms[1], tf(ms[0]), tf(ms[1]), ms[0] / ms[1], if same { "" } else { "  BITS DIFFER" });
        }
    }
}
