//! The decode kernels against the CPU reference on fresh random inputs (the seed is printed).
//! Outputs are poisoned with NaN before every launch and a NaN anywhere fails. The GPU tests say
//! `skipped:` and pass only on a machine with no GPU at all (no driver, or no device) and without
//! `PEREGRINE_REQUIRE_GPU`; a GPU that cannot be opened (a context lost to an earlier test) fails
//! them (`probe_for_tests`). scripts/gpu-check.sh runs them on the GPU machine with the variable
//! set. NVRTC compilation is checked wherever libnvrtc loads (no GPU needed).

use peregrine_cuda::{probe, probe_for_tests, Gpu, Kernels, MoeKernel, MoeRouting};
use peregrine_cuda::kernels::{MoeInput, MoeWeights, QkvReady};
use peregrine_cuda::tc_tiles::laid_out;
use peregrine_model::formats::{dequant_fp8_block, dequant_mxfp4, fp8_e4m3_to_f32};
use rand::{Rng, SeedableRng};

fn gpu() -> Option<(Gpu, Kernels)> {
    let g = probe_for_tests(0)?;
    let k = Kernels::load(&g).expect("kernels compile and load");
    Some((g, k))
}

fn rng() -> rand::rngs::StdRng {
    let seed: u64 = std::env::var("PEREGRINE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("seed {seed} (PEREGRINE_TEST_SEED reproduces it)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn randn(r: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.random::<f32>() * 2.0 - 1.0).collect()
}

/// BF16 weights uniform in (-0.5, 0.5), as bits.
fn random_bf16(r: &mut impl Rng, n: usize) -> Vec<u16> {
    (0..n).map(|_| half::bf16::from_f32(r.random::<f32>() - 0.5).to_bits()).collect()
}

/// FP8 e4m3 weights [n, k] (finite codes only) and their 128 x 128 block scales.
fn random_fp8(r: &mut impl Rng, n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
    let w = (0..n * k).map(|_| loop { let b: u8 = r.random(); if fp8_e4m3_to_f32(b).is_finite() { break b } }).collect();
    let sc = (0..n.div_ceil(128) * (k / 128)).map(|_| 0.01 + r.random::<f32>() * 0.1).collect();
    (w, sc)
}

/// out[t, n] = sum_k w[n, k] x[t, k] in f64.
fn reference(w: &[f32], x: &[f32], n: usize, k: usize, t: usize) -> Vec<f32> {
    let mut y = vec![0f32; t * n];
    for ti in 0..t {
        for ni in 0..n {
            y[ti * n + ni] = (0..k).map(|i| w[ni * k + i] as f64 * x[ti * k + i] as f64).sum::<f64>() as f32;
        }
    }
    y
}

fn assert_close(name: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{name}: element {i} is {g} (want {w})");
        worst = worst.max((g - w).abs() / scale);
    }
    eprintln!("{name}: max |gpu - cpu| / max |cpu| = {worst:.2e}");
    assert!(worst < 1e-5, "{name}: relative error {worst:.2e}");
}

fn poisoned(g: &Gpu, n: usize) -> cudarc::driver::CudaSlice<f32> {
    g.stream.clone_htod(&vec![f32::NAN; n]).unwrap()
}

#[test]
fn nvrtc_compiles_the_kernels() {
    // SAFETY: only tries to dlopen libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        eprintln!("skipped: libnvrtc not found");
        return;
    }
    let src = peregrine_cuda::compile::GEMV_CU;
    let opts = cudarc::nvrtc::CompileOptions { arch: Some("sm_90a"), options: vec!["--std=c++17".into()], ..Default::default() };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).expect("gemv.cu compiles for sm_90a");
    let text = ptx.to_src();
    let ops = cudarc::nvrtc::compile_ptx_with_opts(
        peregrine_cuda::compile::OPS_CU,
        cudarc::nvrtc::CompileOptions { arch: Some("sm_90a"), options: vec!["--std=c++17".into()], ..Default::default() },
    )
    .expect("ops.cu compiles for sm_90a")
    .to_src();
    for k in ["embed", "rms_norm", "add_bias", "add_inplace", "rope", "kv_write", "attention", "silu_mul", "gather_rows", "scatter_add_scaled", "gemv_f32", "copy_cols", "fill_rows", "scale", "draft_attention", "embed_bf16", "add_rms_norm", "rope_kv_write", "moe_route", "moe_group", "argmax_rows", "argmax_final", "fill_random_u8", "fill_random_f", "attention_v2", "attention_combine", "place_drafts", "accept_drafts"] {
        assert!(ops.contains(&format!(".entry {k}")), "kernel {k} missing from the PTX");
    }
    let sample = cudarc::nvrtc::compile_ptx_with_opts(
        peregrine_cuda::compile::SAMPLE_CU,
        cudarc::nvrtc::CompileOptions { arch: Some("sm_90a"), options: vec!["--std=c++17".into()], ..Default::default() },
    )
    .expect("sample.cu compiles for sm_90a")
    .to_src();
    for k in ["sample_rows", "sample_rows_cluster", "adjust_logits", "mask_logits", "row_logprobs"] {
        assert!(sample.contains(&format!(".entry {k}")), "kernel {k} missing from the PTX");
    }
    let moe = cudarc::nvrtc::compile_ptx_with_opts(
        peregrine_cuda::compile::MOE_CU,
        cudarc::nvrtc::CompileOptions { arch: Some("sm_90a"), options: vec!["--std=c++17".into()], ..Default::default() },
    )
    .expect("moe.cu compiles for sm_90a")
    .to_src();
    for (n, c) in peregrine_cuda::kernels::TILED_VARIANTS {
        for k in [format!("moe_gate_up_bulk_n{n}_c{c}"), format!("moe_down_bulk_n{n}_c{c}"), format!("moe_fused_bulk_n{n}_c{c}"), format!("moe_fused_routed_bulk_n{n}_c{c}")] {
            assert!(moe.contains(&format!(".entry {k}")), "moe.cu lacks {k}");
        }
    }
    for k in ["gemv_bf16", "gemv_fp8", "gemv_mxfp4", "gemv_mxfp4_t1", "gemv_mxfp4_t2", "gemv_mxfp4_t4", "gemv_mxfp4_t8", "moe_gate_up_mxfp4", "moe_down_mxfp4", "moe_gate_up_mxfp4_v2", "moe_down_mxfp4_v2", "moe_combine", "split_bf16", "gemv_mma_fp8_t1", "gemv_mma_fp8_t2_r4", "gemv_mma_bf16_t1", "gemv_mma_bf16_t2_r2", "gemv_mma_bf16_t1_pipe", "gemv_mma_fp8_t1_pipe", "split_f16", "silu_mul_split_f16", "moe_gate_up_mma", "moe_down_mma", "moe_gate_up_pipe_s1", "moe_gate_up_pipe_s2", "moe_gate_up_pipe_s4", "moe_gate_up_pipe_s8", "moe_down_pipe_s1", "moe_down_pipe_s2", "moe_down_pipe_s4", "moe_down_pipe_s8", "gemm_wg_split", "gemm_wg_fp8", "gemm_wg_bf16", "gemm_wg_combine"] {
        assert!(text.contains(&format!(".entry {k}")), "kernel {k} missing from the PTX");
    }
}

#[test]
fn gemv_kernels_match_the_cpu_reference() {
    let Some((g, mut kern)) = gpu() else { return };
    eprintln!("GPU: {} (sm_{}{})", g.name, g.capability.0, g.capability.1);
    let mut r = rng();
    // 19205 rows: more 16-row tiles (1201, the last partial) than the tensor-core GEMV keeps
    // resident at once (~500-700 blocks on an H100), so a second wave of blocks runs.
    for &(n, k) in &[(200usize, 256usize), (513, 1024), (2048, 4096), (72, 96), (16 * 1200 + 5, 256)] {
        // 1..11: one tensor-core pass of 8/16 tokens; 40, 130: 64-token passes with a tail.
        for &t in &[1usize, 3, 8, 11, 40, 130] {
            let x = randn(&mut r, t * k);
            let xd = g.stream.clone_htod(&x).unwrap();
            // BF16
            let wb = random_bf16(&mut r, n * k);
            let wf: Vec<f32> = wb.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
            let want = reference(&wf, &x, n, k, t);
            let wbd = g.stream.clone_htod(&laid_out(wb.clone(), n, k)).unwrap();
            every_gemv_tile(&mut kern, &format!("bf16 {n}x{k} T={t}"), &want, |kern| {
                let mut y = poisoned(&g, t * n);
                kern.gemv_bf16(&wbd, &xd, &mut y, n, k, t).unwrap();
                g.stream.clone_dtoh(&y).unwrap()
            });
            if t <= 11 {
                let mut y = poisoned(&g, t * n);
                kern.gemv_bf16_simt(&g.stream.clone_htod(&wb).unwrap(), &xd, &mut y, n, k, t).unwrap();
                assert_close(&format!("bf16 (CUDA cores) {n}x{k} T={t}"), &g.stream.clone_dtoh(&y).unwrap(), &want);
            }
            // FP8 block
            if k % 128 == 0 {
                let (w8, sc) = random_fp8(&mut r, n, k);
                let wf = dequant_fp8_block(&w8, &sc, n, k, 128, 128);
                let want = reference(&wf, &x, n, k, t);
                let (w8d, scd) = (g.stream.clone_htod(&laid_out(w8.clone(), n, k)).unwrap(), g.stream.clone_htod(&sc).unwrap());
                every_gemv_tile(&mut kern, &format!("fp8 {n}x{k} T={t}"), &want, |kern| {
                    let mut y = poisoned(&g, t * n);
                    kern.gemv_fp8(&w8d, &scd, &xd, &mut y, n, k, t).unwrap();
                    g.stream.clone_dtoh(&y).unwrap()
                });
                if t <= 11 {
                    let mut y = poisoned(&g, t * n);
                    kern.gemv_fp8_simt(&g.stream.clone_htod(&w8).unwrap(), &g.stream.clone_htod(&sc).unwrap(), &xd, &mut y, n, k, t).unwrap();
                    assert_close(&format!("fp8 (CUDA cores) {n}x{k} T={t}"), &g.stream.clone_dtoh(&y).unwrap(), &want);
                }
            }
            // MXFP4
            let w4: Vec<u8> = (0..n * k / 2).map(|_| r.random()).collect();
            let s4: Vec<u8> = (0..n * k / 32).map(|_| r.random_range(115..135)).collect();
            let wf = dequant_mxfp4(&w4, &s4, n, k);
            let mut y = poisoned(&g, t * n);
            kern.gemv_mxfp4(&g.stream.clone_htod(&w4).unwrap(), &g.stream.clone_htod(&s4).unwrap(), &xd, &mut y, n, k, t).unwrap();
            assert_close(&format!("mxfp4 {n}x{k} T={t}"), &g.stream.clone_dtoh(&y).unwrap(), &reference(&wf, &x, n, k, t));
        }
    }
}

/// Runs a tensor-core GEMV with the default tile for its token count and then with every tile
/// shape forced, each with and without the one-tile kernels that load a K block ahead
/// (`set_gemv_pipe`, taken where the grid fits one wave of them) and the GEMM on mma.sync and on
/// wgmma (`set_dense_gemm_wgmma`, where the GPU has it, in blocks of each of `DENSE_WG_ROWS`
/// rows, whole and split over K in each of `DENSE_WG_SPLITS`): each must match the CPU and give
/// the default's bits (a tile or a split only changes which block computes a row's parts, not
/// the row's arithmetic).
fn every_gemv_tile(kern: &mut Kernels, what: &str, want: &[f32], mut run: impl FnMut(&Kernels) -> Vec<f32>) {
    kern.force_gemv_tile(None).unwrap();
    let base = run(kern);
    assert_close(what, &base, want);
    // (on wgmma, block rows, K splits): off, or on at each block height, whole; and once (the
    // wgmma GEMM runs whatever tile is forced) in each number of K splits
    let mut wgmma = vec![(false, None, None)];
    let mut split = Vec::new();
    if kern.has_dense_gemm_wgmma() {
        for &r in &peregrine_cuda::kernels::DENSE_WG_ROWS {
            wgmma.push((true, Some(r), Some(1)));
            split.extend(peregrine_cuda::kernels::DENSE_WG_SPLITS[1..].iter().map(|&s| (true, Some(r), Some(s))));
        }
    }
    let tiles = std::iter::once(None).chain(peregrine_cuda::kernels::MMA_GEMV_TILES.iter().map(|&t| Some(t)));
    for tile in tiles {
        kern.force_gemv_tile(tile).unwrap();
        for pipe in [true, false] {
            kern.set_gemv_pipe(pipe);
            let splits_too = if tile.is_none() && pipe { &split[..] } else { &[] };
            for &(wg, rows, splits) in wgmma.iter().chain(splits_too) {
                kern.set_dense_gemm_wgmma(Some(wg));
                kern.set_dense_wg_rows(rows).unwrap();
                kern.set_dense_wg_k_splits(splits).unwrap();
                let got = run(kern);
                assert!(got.iter().zip(&base).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: tile {tile:?} (pipelined one-tile kernel {pipe}, GEMM on wgmma {wg}, block rows {rows:?}, K splits {splits:?}) differs from the default in some bit");
            }
        }
    }
    kern.set_dense_gemm_wgmma(None);
    kern.set_dense_wg_rows(None).unwrap();
    kern.set_dense_wg_k_splits(None).unwrap();
    kern.set_gemv_pipe(true);
    kern.force_gemv_tile(None).unwrap();
}

/// One GEMV over stacked q/k/v rows writing three outputs (FP8 and BF16).
#[test]
fn stacked_qkv_gemv_matches_the_cpu_reference() {
    use cudarc::driver::DevicePtr;
    let Some((g, mut kern)) = gpu() else { return };
    let mut r = rng();
    let (rows, k) = ([256usize, 128, 72], 512usize);
    let n: usize = rows.iter().sum();
    // 260 tokens: the GEMM (gemm_mma_*) writes the three outputs; each token count also runs as
    // the wgmma GEMM (gemm_wg*, where the GPU has it) at each block height, which must write them
    // with the same bits (456 rows: partial blocks of 256, 128 and 64).
    // (wgmma, block rows, K splits); 512 columns are 4 K blocks, so the later splits of 4 and 8
    // have no K blocks at all and must still leave their classes' zeros.
    let wgmma: Vec<(Option<bool>, Option<usize>, Option<usize>)> = if kern.has_dense_gemm_wgmma() {
        let on = peregrine_cuda::kernels::DENSE_WG_ROWS.iter().flat_map(|&r| peregrine_cuda::kernels::DENSE_WG_SPLITS.iter().map(move |&s| (Some(true), Some(r), Some(s))));
        std::iter::once((Some(false), None, None)).chain(on).collect()
    } else {
        vec![(None, None, None)]
    };
    for &t in &[1usize, 5, 70, 260] {
        let x = randn(&mut r, t * k);
        let xd = g.stream.clone_htod(&x).unwrap();
        let (w8, sc) = random_fp8(&mut r, n, k);
        let wb = random_bf16(&mut r, n * k);
        let cases: [(&str, Vec<f32>, bool); 2] = [
            ("fp8", dequant_fp8_block(&w8, &sc, n, k, 128, 128), true),
            ("bf16", wb.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect(), false),
        ];
        for (name, wf, fp8) in cases {
            let want = reference(&wf, &x, n, k, t);
            // (the stacked rows tiled as one matrix: the parts before the last are whole tiles)
            let (w8d, scd, wbd) = (g.stream.clone_htod(&laid_out(w8.clone(), n, k)).unwrap(), g.stream.clone_htod(&sc).unwrap(), g.stream.clone_htod(&laid_out(wb.clone(), n, k)).unwrap());
            let wp = if fp8 { w8d.device_ptr(&g.stream).0 } else { wbd.device_ptr(&g.stream).0 };
            let mut first: Option<Vec<Vec<f32>>> = None;
            for &(wg, wg_rows, splits) in &wgmma {
                kern.set_dense_gemm_wgmma(wg);
                kern.set_dense_wg_rows(wg_rows).unwrap();
                kern.set_dense_wg_k_splits(splits).unwrap();
                let (mut y0, mut y1, mut y2) = (poisoned(&g, t * rows[0]), poisoned(&g, t * rows[1]), poisoned(&g, t * rows[2]));
                kern.gemv_split3(wp, fp8.then_some(&scd), &xd, None, [&mut y0, &mut y1, &mut y2], rows, k, t).unwrap();
                let got: Vec<Vec<f32>> = [y0, y1, y2].iter().map(|y| g.stream.clone_dtoh(y).unwrap()).collect();
                let mut off = 0;
                for (i, part_got) in got.iter().enumerate() {
                    let part: Vec<f32> = (0..t).flat_map(|ti| want[ti * n + off..ti * n + off + rows[i]].to_vec()).collect();
                    assert_close(&format!("stacked {name} part {i} T={t} (wgmma {wg:?}, block rows {wg_rows:?}, K splits {splits:?})"), part_got, &part);
                    off += rows[i];
                }
                match &first {
                    None => first = Some(got),
                    Some(f) => assert!(f.iter().flatten().zip(got.iter().flatten()).all(|(a, b)| a.to_bits() == b.to_bits()), "stacked {name} T={t}: the wgmma GEMM's bits ({wg_rows:?}-row blocks, {splits:?} K splits) differ from the mma.sync kernels'"),
                }
            }
            kern.set_dense_gemm_wgmma(None);
            kern.set_dense_wg_rows(None).unwrap();
            kern.set_dense_wg_k_splits(None).unwrap();
        }
    }
}

/// The q/k/v projection that feeds the ready attention (`gemv_qkv_ready`), in blocks of 8 warps
/// and in blocks of 4 warps summing two K classes each (`set_qkv_ready4`), those with their next
/// K block loaded ahead too (`set_qkv_pipe`; at one token the activations shuffled between
/// lanes), gives the stacked
/// GEMV's bits on the same split input (`gemv_split3`), matches the CPU, and counts each
/// finished 16-row tile into its head's counter. K of 5 K blocks (warps with an empty class),
/// 8, and 32 (MiMo's 4096); 1-4 and 8 tokens.
#[test]
fn ready_qkv_projection_gives_the_stacked_gemvs_bits() {
    use cudarc::driver::DevicePtr;
    let Some((g, mut kern)) = gpu() else { return };
    let mut r = rng();
    let (heads, kv_heads, hd, vd) = (4usize, 2usize, 64usize, 32usize);
    let rows = [heads * hd, kv_heads * hd, kv_heads * vd];
    let n: usize = rows.iter().sum();
    for k in [640usize, 1024, 4096] {
        let (w8, sc) = random_fp8(&mut r, n, k);
        let wf = dequant_fp8_block(&w8, &sc, n, k, 128, 128);
        let (w8d, scd) = (g.stream.clone_htod(&laid_out(w8.clone(), n, k)).unwrap(), g.stream.clone_htod(&sc).unwrap());
        let wp = w8d.device_ptr(&g.stream).0;
        for t in [1usize, 2, 3, 4, 8] {
            assert!(kern.qkv_ready_takes(rows, heads, hd, vd, k, t), "{k} x {t}: a shape the ready projection takes");
            let x = randn(&mut r, t * k);
            let xd = g.stream.clone_htod(&x).unwrap();
            let split = kern.split_f16(&xd, t, k, false).unwrap();
            let read = |ys: &[cudarc::driver::CudaSlice<f32>; 3]| -> Vec<Vec<f32>> { ys.iter().map(|y| g.stream.clone_dtoh(y).unwrap()).collect() };
            let mut plain = [poisoned(&g, t * rows[0]), poisoned(&g, t * rows[1]), poisoned(&g, t * rows[2])];
            {
                let [y0, y1, y2] = &mut plain;
                kern.gemv_split3(wp, Some(&scd), &xd, Some(&split), [y0, y1, y2], rows, k, t).unwrap();
            }
            let plain = read(&plain);
            let want = reference(&wf, &x, n, k, t);
            let mut off = 0;
            for (i, got) in plain.iter().enumerate() {
                let part: Vec<f32> = (0..t).flat_map(|ti| want[ti * n + off..ti * n + off + rows[i]].to_vec()).collect();
                assert_close(&format!("stacked fp8 q/k/v part {i}, K {k}, T={t}"), got, &part);
                off += rows[i];
            }
            for (four, pipe, shuffle) in [(false, false, false), (true, false, false), (true, true, false), (true, true, true)] {
                kern.set_qkv_ready4(Some(four));
                kern.set_qkv_pipe(Some(pipe));
                kern.set_qkv_pipe_shuffle(Some(shuffle));
                let want_kernel = match (four, pipe, shuffle && t == 1) {
                    (false, _, _) => QkvReady::Warps8,
                    (true, false, _) => QkvReady::Warps4,
                    (true, true, false) => QkvReady::Pipe,
                    (true, true, true) => QkvReady::PipeShuffled,
                };
                assert_eq!(kern.qkv_ready_kernel(n, t), want_kernel);
                let ready = g.stream.alloc_zeros::<u32>(heads + kv_heads + 1).unwrap();
                let mut ys = [poisoned(&g, t * rows[0]), poisoned(&g, t * rows[1]), poisoned(&g, t * rows[2])];
                {
                    let [y0, y1, y2] = &mut ys;
                    kern.gemv_qkv_ready(wp, &scd, &split, [y0, y1, y2], rows, k, t, &ready, heads, hd, vd).unwrap();
                }
                let got = read(&ys);
                for (i, (a, b)) in got.iter().zip(&plain).enumerate() {
                    assert!(a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()), "K {k}, T={t}, {want_kernel:?}: part {i} differs from the stacked GEMV in some bit");
                }
                let mut counts = vec![(hd / 16) as u32; heads];
                counts.extend(std::iter::repeat_n(((hd + vd) / 16) as u32, kv_heads));
                counts.push(0);
                assert_eq!(g.stream.clone_dtoh(&ready).unwrap(), counts, "K {k}, T={t}, {want_kernel:?}: tiles counted per head");
            }
        }
    }
    // By default the 4-warp form runs only where the 8-warp grid needs a second wave: these
    // 28 tiles fit one (on any GPU), 50 000 (800 000 rows) do not.
    kern.set_qkv_ready4(None);
    // Unforced, a pipe runs where the tiles fit one wave of it, the 7-block one where it fits:
    // 28 tiles fit both on any GPU, 924 < 7 x SMs <= 8 x SMs: only the 8-block one's (an H100's
    // 132 SMs: 924 and 1056; an H200 has as many), 800 000 rows neither.
    kern.set_qkv_pipe(None);
    kern.set_qkv_pipe_shuffle(None);
    kern.set_qkv_ready4(Some(true));
    for t in [1usize, 2] {
        assert_eq!(kern.qkv_ready_kernel(n, t), QkvReady::Pipe, "{n} rows, {t} tokens: one wave of the 7-block pipe");
        assert_eq!(kern.qkv_ready_kernel(800_000, t), QkvReady::Warps4, "800 000 rows, {t} tokens: no wave of a pipe");
    }
    let sms = g.ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).unwrap() as usize;
    let between = (7 * sms + 1) * 16;
    assert_eq!(kern.qkv_ready_kernel(between, 1), QkvReady::PipeShuffled, "{between} rows, one token: one wave of the 8-block shuffled pipe only");
    assert_eq!(kern.qkv_ready_kernel(between, 2), QkvReady::Warps4, "{between} rows, two tokens: no wave of the 7-block pipe");
    kern.set_qkv_ready4(None);
    assert!(!kern.qkv_ready4_takes(n), "{n} rows in blocks of 8 warps fit one wave");
    assert!(kern.qkv_ready4_takes(800_000), "800 000 rows in blocks of 8 warps need more than one wave");
}

#[test]
fn mxfp4_moe_decode_matches_the_cpu_reference() {
    let Some((g, mut kern)) = gpu() else { return };
    // The tiled family's bits first (one token's FP8 digit kernels have their own, below).
    kern.set_moe_fp8(false);
    let mut r = rng();
    // The second shape splits K unevenly over the pipelined kernels' 8 warps (9 and 5 steps).
    // The third is as wide as MiMo-V2.5-Pro's x (6144): four staged rows would leave room for
    // one block per SM, so passes stage fewer and experts with more pairs take more passes.
    for (e, h, i, top_k) in [(16usize, 512usize, 256usize, 4usize), (8, 576, 320, 3), (6, 6144, 64, 2)] {
        let bytes = |r: &mut rand::rngs::StdRng, n: usize| -> Vec<u8> { (0..n).map(|_| r.random()).collect() };
        let scales = |r: &mut rand::rngs::StdRng, n: usize| -> Vec<u8> { (0..n).map(|_| r.random_range(118..128)).collect() };
        let (gate, gate_s, up, up_s) = (bytes(&mut r, e * i * h / 2), scales(&mut r, e * i * h / 32), bytes(&mut r, e * i * h / 2), scales(&mut r, e * i * h / 32));
        let (down, down_s) = (bytes(&mut r, e * h * i / 2), scales(&mut r, e * h * i / 32));
        let w = MoeWeights::upload(&g.stream, false, &gate, &gate_s, &up, &up_s, &down, &down_s, e, h, i).unwrap();
        // The same experts in the tiled layout (re-laid out on the host, as the loader does).
        let wt = MoeWeights::upload(&g.stream, true, &gate, &gate_s, &up, &up_s, &down, &down_s, e, h, i).unwrap();
        // The default for tiled weights becomes the measured fastest kernel per token count.
        if h == 6144 {
            let np = kern.moe_tiled_staged_pairs(&wt, 2, 4, 8).unwrap();
            assert!((1..4).contains(&np), "a 6144-wide x should stage fewer than 4 pairs per pass to keep two blocks per SM, stages {np}");
            // Two digit rows of so wide an x leave room for one gate_up block an SM: one pair a
            // digit pass (Pro's 6-8 row steps were 4-5% slower with two).
            let pairs_before = kern.set_moe_fp8_pairs_from(1);
            assert!(!kern.moe_two_pairs_at(&wt, 8), "a 6144-wide x should take one pair a digit pass");
            kern.set_moe_fp8_pairs_from(pairs_before);
        }
        let timings = kern.tune_moe(&wt, top_k).unwrap();
        assert!(timings.iter().all(|&(_, _, ms)| ms.is_finite() && ms > 0.0), "MoE tuning timings: {timings:?}");
        for t in kern.tuned_counts() {
            assert!(kern.tuned_moe(&wt, top_k, t).is_some(), "no MoE kernel tuned for {t} tokens");
        }
        // A step's MoE takes the tuned kernel for decode rows; above 8 rows, rows that share
        // sequences (a verify block) keep the default (the MoE GEMM where it is built).
        if std::env::var("PEREGRINE_MOE_KERNEL").is_err() {
            for t in kern.tuned_counts() {
                let (decode, verify) = (kern.moe_kernel_rows(&wt, t, top_k, true), kern.moe_kernel_rows(&wt, t, top_k, false));
                assert_eq!(Some(decode), kern.tuned_moe(&wt, top_k, t), "{t} decode rows");
                if t <= peregrine_cuda::moe_tune::TUNED_TOKENS {
                    assert_eq!(verify, decode, "{t} verify rows");
                } else {
                    assert!(verify == MoeKernel::for_tiled(t, top_k) || verify == MoeKernel::TILED, "{t} verify rows: {verify:?}");
                }
            }
        }
        let deq = |b: &[u8], s: &[u8], ex: usize, rows: usize, cols: usize| {
            dequant_mxfp4(&b[ex * rows * cols / 2..(ex + 1) * rows * cols / 2], &s[ex * rows * cols / 32..(ex + 1) * rows * cols / 32], rows, cols)
        };
        // 160 tokens give every expert 40-60 pairs: the MoE GEMM's chunks of 32 pairs, the
        // last one partial, and (its default from 8 pairs per expert) the default at 40 and 160.
        // The last case gives expert j a set number of pairs (1, 5, 9, ... 29 and 33-97): the
        // wgmma GEMM's every n-tile count (1-8) in single chunks, and slots of 2-4 chunks.
        let mut counts: Vec<usize> = [1usize, 5, 9, 13, 17, 21, 25, 29, 33, 47, 65, 97].iter().cycle().take(e).copied().collect();
        while counts.iter().sum::<usize>() % top_k != 0 {
            counts[0] += 1;
        }
        let counted_t = counts.iter().sum::<usize>() / top_k;
        assert!(counts.iter().all(|&c| c <= counted_t), "every expert's pairs on distinct tokens");
        // And 8 tokens whose experts hold 8, 4, 4, 3, 3, 2, ... pairs: the two-pair digit passes
        // over slots of 3-8 pairs (a last pass of one, passes of two).
        let mut counts8: Vec<usize> = [8usize, 4, 4, 3, 3, 2, 2].into_iter().chain(std::iter::repeat(1)).take(e).collect();
        while counts8.iter().sum::<usize>() > 8 * top_k {
            let last = counts8.iter().rposition(|&c| c > 0).expect("a count");
            counts8[last] -= 1;
        }
        assert_eq!(counts8.iter().sum::<usize>(), 8 * top_k, "8 tokens' pairs counted");
        for (t, counted) in [(1usize, None), (2, None), (5, None), (8, Some(&counts8)), (16, None), (40, None), (160, None), (counted_t, Some(&counts))] {
            let x = randn(&mut r, t * h);
            // Distinct experts per token; with 40 tokens of 4 among 16 experts some share 10+ tokens.
            let choices: Vec<Vec<(usize, f32)>> = if let Some(counts) = counted {
                // Expert ids in order, each repeated by its count; token i takes places i, i + t,
                // ...: distinct experts, since no expert's run is longer than t.
                let ids: Vec<usize> = counts.iter().enumerate().flat_map(|(j, &c)| std::iter::repeat_n(j, c)).collect();
                (0..t).map(|ti| (0..top_k).map(|m| (ids[ti + m * t], r.random::<f32>())).collect()).collect()
            } else {
                (0..t)
                    .map(|_| {
                        let mut ex: Vec<usize> = (0..e).collect();
                        for j in 0..top_k {
                            let k = r.random_range(j..e);
                            ex.swap(j, k);
                        }
                        ex[..top_k].iter().map(|&x| (x, r.random::<f32>())).collect()
                    })
                    .collect()
            };
            let routing = MoeRouting::new(&choices);
            let dr = kern.upload_routing(&routing, e).unwrap();
            let mut scratch = kern.moe_scratch(&w, t * top_k).unwrap();
            let xd = g.stream.clone_htod(&x).unwrap();
            let mut y = poisoned(&g, t * h);
            kern.moe_mxfp4(&w, &dr, &xd, MoeInput::Settled, &mut scratch, &mut y).unwrap();
            let mut y1 = poisoned(&g, t * h);
            kern.moe_mxfp4_with(MoeKernel::V1, &w, &dr, &xd, MoeInput::Settled, &mut scratch, &mut y1).unwrap();
            let mut y2 = poisoned(&g, t * h);
            kern.moe_mxfp4_with(MoeKernel::V2, &w, &dr, &xd, MoeInput::Settled, &mut scratch, &mut y2).unwrap();
            let mut y3 = poisoned(&g, t * h);
            kern.moe_mxfp4_with(MoeKernel::TensorCore, &w, &dr, &xd, MoeInput::Settled, &mut scratch, &mut y3).unwrap();
            let mut yt = poisoned(&g, t * h);
            kern.moe_mxfp4(&wt, &dr, &xd, MoeInput::Settled, &mut scratch, &mut yt).unwrap();
            // Every compiled ring, each twice: the counters (the fused combine's, the fused
            // kernel's waits) must come back to zero after a call.
            let mut yt_all = Vec::new();
            // The fused kernel as wide as fits, and on 1 and 3 blocks (each block then runs many items,
            // gate_up then down, with its ring running on between them).
            // The MoE GEMM (any token count) as well.
            let kinds = peregrine_cuda::kernels::TILED_VARIANTS.iter().flat_map(|&(stages, steps)| {
                [MoeKernel::tiled(stages, steps), MoeKernel::Fused { stages, steps, max_blocks: 0 }, MoeKernel::Fused { stages, steps, max_blocks: 1 }, MoeKernel::Fused { stages, steps, max_blocks: 3 }]
            }).chain([MoeKernel::Gemm]);
            // Two launches with different rings for gate_up and down (each ring once as either).
            let v = peregrine_cuda::kernels::TILED_VARIANTS;
            let mixed = (0..v.len()).map(|j| MoeKernel::Tiled { stages: v[j].0, steps: v[j].1, down_stages: v[(j + 3) % v.len()].0, down_steps: v[(j + 3) % v.len()].1 });
            let kinds = kinds.chain(mixed);
            for kind in kinds {
                for _ in 0..2 {
                    let mut yv = poisoned(&g, t * h);
                    kern.moe_mxfp4_with(kind, &wt, &dr, &xd, MoeInput::Settled, &mut scratch, &mut yv).unwrap();
                    yt_all.push((format!("{kind:?}"), yv));
                }
            }
            // The MoE GEMM on mma.sync and, on Hopper, on wgmma: the same bits.
            for wgmma in [false, true] {
                let before = kern.set_moe_gemm_wgmma(Some(wgmma));
                assert_eq!(kern.moe_gemm_on_wgmma(t * top_k, e), wgmma && kern.has_moe_gemm_wgmma());
                let mut yv = poisoned(&g, t * h);
                kern.moe_mxfp4_with(MoeKernel::Gemm, &wt, &dr, &xd, MoeInput::Settled, &mut scratch, &mut yv).unwrap();
                yt_all.push((format!("Gemm, wgmma {}", kern.moe_gemm_on_wgmma(t * top_k, e)), yv));
                kern.set_moe_gemm_wgmma(before);
            }
            // From 2 tokens the two-launch kernels read x (and, with the per-slot wait, h) split
            // once; the paths that stage them in the kernels instead (PEREGRINE_MOE_PRESPLIT=0,
            // =x) give the same bits.
            if t >= 2 {
                let (load_x, load_h) = kern.set_moe_presplit(false, false);
                for (split_x, split_h) in [(false, false), (true, false)] {
                    kern.set_moe_presplit(split_x, split_h);
                    for &(stages, steps) in peregrine_cuda::kernels::TILED_VARIANTS.iter() {
                        let kind = MoeKernel::tiled(stages, steps);
                        let mut yv = poisoned(&g, t * h);
                        kern.moe_mxfp4_with(kind, &wt, &dr, &xd, MoeInput::Settled, &mut scratch, &mut yv).unwrap();
                        yt_all.push((format!("{kind:?}, split x {split_x}, split h {split_h}"), yv));
                    }
                }
                kern.set_moe_presplit(load_x, load_h);
            }
            // x split by its producer (MoeInput::Split, as the norm ahead writes it in a step):
            // the kernels that read x split take it instead of splitting x themselves, the
            // others read x; the same bits either way. Given the split of another x2, the
            // kernels that read a split must give x2's bits (they read the split, not x) and
            // the others x's. A split of too few rows is refused.
            if t >= 2 {
                let sp = kern.moe_split_x(&xd, t, h).unwrap();
                let x2d = g.stream.clone_htod(&randn(&mut r, t * h)).unwrap();
                let sp2 = kern.moe_split_x(&x2d, t, h).unwrap();
                let v = peregrine_cuda::kernels::TILED_VARIANTS;
                // The MoE GEMM twice: on mma.sync it reads x split; on wgmma (the default on
                // Hopper) it splits x itself, into that kernel's layout.
                let kinds = [(kern.moe_kernel(&wt, t, top_k), true), (MoeKernel::Gemm, false), (MoeKernel::Gemm, true), (MoeKernel::tiled(v[0].0, v[0].1), true), (MoeKernel::Fused { stages: v[0].0, steps: v[0].1, max_blocks: 0 }, true)];
                // (What moe_kind_reads_split says of each kind is checked below against what it does.)
                let wgmma_default = kern.set_moe_gemm_wgmma(Some(false));
                assert!(kern.moe_kind_reads_split(MoeKernel::Gemm, &wt, t, top_k), "the MoE GEMM on mma.sync reads x split");
                kern.set_moe_gemm_wgmma(Some(true));
                assert_eq!(kern.moe_kind_reads_split(MoeKernel::Gemm, &wt, t, top_k), !kern.has_moe_gemm_wgmma(), "the MoE GEMM on wgmma splits x itself");
                for (kind, wgmma) in kinds {
                    kern.set_moe_gemm_wgmma(Some(wgmma));
                    let mut yv = poisoned(&g, t * h);
                    kern.moe_mxfp4_with(kind, &wt, &dr, &xd, MoeInput::Split(&sp), &mut scratch, &mut yv).unwrap();
                    yt_all.push((format!("{kind:?} (wgmma {wgmma}), x split by its producer"), yv));
                    let mut y_other = poisoned(&g, t * h);
                    kern.moe_mxfp4_with(kind, &wt, &dr, &xd, MoeInput::Split(&sp2), &mut scratch, &mut y_other).unwrap();
                    if kern.moe_kind_reads_split(kind, &wt, t, top_k) {
                        let mut y2 = poisoned(&g, t * h);
                        kern.moe_mxfp4_with(kind, &wt, &dr, &x2d, MoeInput::Settled, &mut scratch, &mut y2).unwrap();
                        let (a, b) = (g.stream.clone_dtoh(&y_other).unwrap(), g.stream.clone_dtoh(&y2).unwrap());
                        assert!(a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()), "moe mxfp4 ({kind:?}) T={t}: given another x's split, it must compute from that split");
                    } else {
                        yt_all.push((format!("{kind:?} (wgmma {wgmma}), another x's split (not read)"), y_other));
                    }
                }
                kern.set_moe_gemm_wgmma(Some(false));
                let short = kern.moe_split_x(&xd, t - 1, h).unwrap();
                let mut yv = poisoned(&g, t * h);
                assert!(kern.moe_mxfp4_with(MoeKernel::Gemm, &wt, &dr, &xd, MoeInput::Split(&short), &mut scratch, &mut yv).is_err(), "a split x of {} rows for {t} tokens is refused", t - 1);
                kern.set_moe_gemm_wgmma(wgmma_default);
            }
            let mut yt4 = poisoned(&g, t * h);
            // A kernel that does not read the layout is refused, not run.
            assert!(kern.moe_mxfp4_with(MoeKernel::TensorCore, &wt, &dr, &xd, MoeInput::Settled, &mut scratch, &mut yt4).is_err());
            // CPU: for each token and slot, down(silu(gate x) * up x) * weight, summed in slot order.
            let mut want = vec![0f32; t * h];
            for (ti, c) in choices.iter().enumerate() {
                let xt = &x[ti * h..(ti + 1) * h];
                for &(ex, wgt) in c {
                    let gx = reference(&deq(&gate, &gate_s, ex, i, h), xt, i, h, 1);
                    let ux = reference(&deq(&up, &up_s, ex, i, h), xt, i, h, 1);
                    let act: Vec<f32> = gx.iter().zip(&ux).map(|(a, b)| a / (1.0 + (-a).exp()) * b).collect();
                    let d = reference(&deq(&down, &down_s, ex, h, i), &act, h, i, 1);
                    for (o, v) in want[ti * h..(ti + 1) * h].iter_mut().zip(d) {
                        *o += v * wgt;
                    }
                }
            }
            assert_close(&format!("moe mxfp4 (default) {h}x{i} T={t}"), &g.stream.clone_dtoh(&y).unwrap(), &want);
            assert_close(&format!("moe mxfp4 (v1) T={t}"), &g.stream.clone_dtoh(&y1).unwrap(), &want);
            assert_close(&format!("moe mxfp4 (v2) T={t}"), &g.stream.clone_dtoh(&y2).unwrap(), &want);
            assert_close(&format!("moe mxfp4 (tensor cores, registers) {h}x{i} T={t}"), &g.stream.clone_dtoh(&y3).unwrap(), &want);
            assert_close(&format!("moe mxfp4 (tiled, default) {h}x{i} T={t}"), &g.stream.clone_dtoh(&yt).unwrap(), &want);
            // Every tiled kernel does the same arithmetic in the same order (which is what lets
            // the tuner choose among them freely): bit-identical outputs.
            let yt_host = g.stream.clone_dtoh(&yt).unwrap();
            for (kind, yv) in &yt_all {
                let yv = g.stream.clone_dtoh(yv).unwrap();
                assert_close(&format!("moe mxfp4 ({kind}) {h}x{i} T={t}"), &yv, &want);
                assert!(yv.iter().zip(&yt_host).all(|(a, b)| a.to_bits() == b.to_bits()), "moe mxfp4 ({kind}) {h}x{i} T={t} differs from the default in some bit");
            }
            assert_eq!(g.stream.clone_dtoh(&scratch.counters).unwrap().iter().filter(|&&c| c != 0).count(), 0, "combine counters left non-zero");
            // The MoE on FP8 digits (sm_90a, H and I multiples of 256), up to 8 tokens, first the fused kernel
            // (a pass stages one pair; at 5 tokens of 4 among 16 experts slots hold several):
            // each of its rings, the widest grid and 1 and 3 blocks, twice each, and x from
            // the launch just before: as close to the CPU as the tiled family, the same bits
            // among themselves, the counters back to zero. Each token's row is the bits of that
            // token run alone (its pairs are computed and combined as they are alone). A NaN in
            // one token's x reaches every output of that token and no other's.
            kern.set_moe_fp8(true);
            let fp8_tokens = kern.set_moe_fp8_tokens(peregrine_cuda::moe_tune::TUNED_TOKENS).unwrap();
            if t <= peregrine_cuda::moe_tune::TUNED_TOKENS && kern.moe_fp8_at(&wt, t) {
                let mut first: Option<Vec<f32>> = None;
                for &(stages, steps) in peregrine_cuda::kernels::DG_RINGS.iter() {
                    for max_blocks in [0, 1, 3] {
                        let kind = MoeKernel::Fused { stages, steps, max_blocks };
                        for _ in 0..2 {
                            let mut yv = poisoned(&g, t * h);
                            kern.moe_mxfp4_with(kind, &wt, &dr, &xd, MoeInput::Settled, &mut scratch, &mut yv).unwrap();
                            let yv = g.stream.clone_dtoh(&yv).unwrap();
                            assert_close(&format!("moe mxfp4 ({kind:?}, FP8 digits) {h}x{i} T={t}"), &yv, &want);
                            assert!(g.stream.clone_dtoh(&scratch.counters).unwrap().iter().all(|&c| c == 0), "{kind:?} (FP8 digits) T={t}: counters left non-zero");
                            match &first {
                                None => first = Some(yv),
                                Some(f) => assert!(f.iter().zip(&yv).all(|(a, b)| a.to_bits() == b.to_bits()), "moe mxfp4 ({kind:?}, FP8 digits) {h}x{i} T={t}: differs from the first ring's bits"),
                            }
                        }
                    }
                    let kind = MoeKernel::Fused { stages, steps, max_blocks: 0 };
                    let mut out1 = poisoned(&g, t * h);
                    let mut chained = poisoned(&g, t * h);
                    kern.moe_mxfp4_with(kind, &wt, &dr, &xd, MoeInput::Settled, &mut scratch, &mut out1).unwrap();
                    kern.moe_mxfp4_with(kind, &wt, &dr, &out1, MoeInput::Fresh, &mut scratch, &mut chained).unwrap();
                    let mut again = poisoned(&g, t * h);
                    kern.moe_mxfp4_with(kind, &wt, &dr, &out1, MoeInput::Settled, &mut scratch, &mut again).unwrap();
                    let (chained, again) = (g.stream.clone_dtoh(&chained).unwrap(), g.stream.clone_dtoh(&again).unwrap());
                    assert!(again.iter().all(|v| v.is_finite()), "{kind:?} (FP8 digits) T={t} of a MoE output is finite");
                    assert!(chained.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()), "{kind:?} (FP8 digits) T={t}: x from the launch just before differs from the same x settled");
                }
                let first = first.expect("the digit rings ran");
                // Tuned with digits on: decode rows take digit kernels, rows that may share
                // experts (a verify block's) the fastest kernel off them, from 2 tokens.
                if t == 1 && std::env::var("PEREGRINE_MOE_KERNEL").is_err() {
                    kern.tune_moe(&wt, top_k).unwrap();
                    for tt in 2..=peregrine_cuda::moe_tune::TUNED_TOKENS {
                        let (decode, verify) = (kern.moe_kernel_rows(&wt, tt, top_k, true), kern.moe_kernel_rows(&wt, tt, top_k, false));
                        assert!(kern.moe_kind_on_digits(decode, &wt, tt), "{tt} decode rows on digits: {decode:?}");
                        assert!(!kern.moe_kind_on_digits(verify, &wt, tt), "{tt} verify rows off the digits: {verify:?}");
                    }
                    kern.set_moe_fp8(false);
                    kern.tune_moe(&wt, top_k).unwrap();
                    for tt in 1..=peregrine_cuda::moe_tune::TUNED_TOKENS {
                        assert_eq!(kern.moe_kernel_rows(&wt, tt, top_k, false), kern.moe_kernel_rows(&wt, tt, top_k, true), "{tt} rows, digits off: verify rows as decode rows");
                    }
                    kern.set_moe_fp8(true);
                }
                // The two-launch kernels on digits: the same bits, on every digit ring and with
                // gate_up and down on different rings, with a pair a pass and with two pairs of
                // a slot a pass (from 2 tokens slots hold several pairs here: 4 of 16 experts; at
                // 8 tokens 1-4 and 8).
                let dgr = peregrine_cuda::kernels::DG_RINGS;
                for pairs_from in [usize::MAX, 1] {
                    let pairs_before = kern.set_moe_fp8_pairs_from(pairs_from);
                    assert_eq!(kern.moe_two_pairs_at(&wt, t), pairs_from == 1, "{h}x{i} T={t}: two pairs a pass from {pairs_from} tokens (two-pair blocks of a {h}-wide x fit two to an SM)");
                    for j in 0..dgr.len() {
                        for (gu_ring, down_ring) in [(dgr[j], dgr[j]), (dgr[j], dgr[(j + 1) % dgr.len()])] {
                            let kind = MoeKernel::Tiled { stages: gu_ring.0, steps: gu_ring.1, down_stages: down_ring.0, down_steps: down_ring.1 };
                            assert!(kern.moe_kind_on_digits(kind, &wt, t), "{kind:?} runs on digits at {t} tokens");
                            assert!(!kern.moe_kind_reads_split(kind, &wt, t, top_k), "{kind:?} on digits stages x itself");
                            for _ in 0..2 {
                                let mut yv = poisoned(&g, t * h);
                                kern.moe_mxfp4_with(kind, &wt, &dr, &xd, MoeInput::Settled, &mut scratch, &mut yv).unwrap();
                                let yv = g.stream.clone_dtoh(&yv).unwrap();
                                assert!(yv.iter().zip(&first).all(|(a, b)| a.to_bits() == b.to_bits()), "moe mxfp4 ({kind:?}, FP8 digits, two pairs a pass from {pairs_from} tokens) {h}x{i} T={t}: differs from the fused digit kernel's bits");
                                assert!(g.stream.clone_dtoh(&scratch.counters).unwrap().iter().all(|&c| c == 0), "{kind:?} (FP8 digits, two pairs from {pairs_from}) T={t}: counters left non-zero");
                            }
                        }
                    }
                    kern.set_moe_fp8_pairs_from(pairs_before);
                }
                // A ring that is not a digit ring is not on the digits (it keeps the F16 form).
                let f16_ring = peregrine_cuda::kernels::TILED_VARIANTS.iter().copied().find(|r| !dgr.contains(r)).expect("an F16-only ring");
                assert!(!kern.moe_kind_on_digits(MoeKernel::tiled(f16_ring.0, f16_ring.1), &wt, t));
                if t > 1 {
                    let mut one_scratch = kern.moe_scratch(&w, top_k).unwrap();
                    for (ti, c) in choices.iter().enumerate() {
                        let dr1 = kern.upload_routing(&MoeRouting::new(std::slice::from_ref(c)), e).unwrap();
                        let x1 = g.stream.clone_htod(&x[ti * h..(ti + 1) * h]).unwrap();
                        let mut y1 = poisoned(&g, h);
                        kern.moe_mxfp4_with(MoeKernel::FUSED, &wt, &dr1, &x1, MoeInput::Settled, &mut one_scratch, &mut y1).unwrap();
                        let y1 = g.stream.clone_dtoh(&y1).unwrap();
                        assert!(y1.iter().zip(&first[ti * h..(ti + 1) * h]).all(|(a, b)| a.to_bits() == b.to_bits()), "FP8 digits {h}x{i}: token {ti} of {t} differs from the same token alone");
                    }
                }
                let nan_tok = t / 2;
                let mut xn = x.clone();
                xn[nan_tok * h + h / 3] = f32::NAN;
                let xnd = g.stream.clone_htod(&xn).unwrap();
                let mut yv = poisoned(&g, t * h);
                g.stream.memcpy_htod(&vec![0f32; t * h], &mut yv).unwrap();
                kern.moe_mxfp4_with(MoeKernel::FUSED, &wt, &dr, &xnd, MoeInput::Settled, &mut scratch, &mut yv).unwrap();
                let yv = g.stream.clone_dtoh(&yv).unwrap();
                for (ti, row) in yv.chunks(h).enumerate() {
                    if ti == nan_tok {
                        assert!(row.iter().all(|v| v.is_nan()), "a NaN in token {ti}'s x must reach every output of that token (FP8 digits, T={t})");
                    } else {
                        assert!(row.iter().all(|v| v.is_finite()), "a NaN in token {nan_tok}'s x reached token {ti} (FP8 digits, T={t})");
                    }
                }
                assert!(g.stream.clone_dtoh(&scratch.counters).unwrap().iter().all(|&c| c == 0), "FP8 digits, NaN x, T={t}: counters left non-zero");
                eprintln!("moe mxfp4 (FP8 digits) {h}x{i} T={t}: every ring and grid within the tolerance, bit-identical, each token as alone");
            } else if t <= peregrine_cuda::moe_tune::TUNED_TOKENS {
                eprintln!("moe mxfp4 {h}x{i} T={t}: FP8 digits not run (GPU or shape)");
            }
            kern.set_moe_fp8_tokens(fp8_tokens).unwrap();
            kern.set_moe_fp8(false);
            // x written by the launch just before (`MoeInput::Fresh`): one call's output is the
            // next one's input, launched back to back, so the second call's blocks may start
            // while the first still writes; it must wait before staging x, and give the bits
            // of the same call on a finished x.
            if t == 1 {
                for &(stages, steps) in peregrine_cuda::kernels::TILED_VARIANTS.iter() {
                    for kind in [MoeKernel::tiled(stages, steps), MoeKernel::Fused { stages, steps, max_blocks: 0 }] {
                        let mut first = poisoned(&g, h);
                        let mut second = poisoned(&g, h);
                        kern.moe_mxfp4_with(kind, &wt, &dr, &xd, MoeInput::Settled, &mut scratch, &mut first).unwrap();
                        kern.moe_mxfp4_with(kind, &wt, &dr, &first, MoeInput::Fresh, &mut scratch, &mut second).unwrap();
                        let chained = g.stream.clone_dtoh(&second).unwrap();
                        let mut again = poisoned(&g, h);
                        kern.moe_mxfp4_with(kind, &wt, &dr, &first, MoeInput::Settled, &mut scratch, &mut again).unwrap();
                        let again = g.stream.clone_dtoh(&again).unwrap();
                        assert!(again.iter().all(|v| v.is_finite()), "moe mxfp4 ({kind:?}) of a MoE output is finite");
                        assert!(chained.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()), "moe mxfp4 ({kind:?}): x from the launch just before (Fresh) differs from the same x settled");
                    }
                }
            }
            // The mixed MoE of decode rows (`moe_mixed_at`): slots of up to two pairs (one where
            // two pairs a digit pass are off) on the digit kernels, the others on the F16 kind,
            // each half on its own h. Every pair's output is the bits of the run that takes its
            // slot's kind for every slot: the digit kernels' for the small slots, the F16
            // kernels' for the others (at 8 tokens slots of 8, 4, 4, 3, 3, 2, 2 and 1 pairs; at
            // 16, 4 of 16 experts a token).
            kern.set_moe_fp8(true);
            if (t == 8 || t == 16) && kern.moe_fp8_for(&wt) {
                let fp8_tokens = kern.set_moe_fp8_tokens(t).unwrap();
                let mixed_before = kern.set_moe_mixed_from(2);
                for pairs_from in [1, usize::MAX] {
                    let pairs_before = kern.set_moe_fp8_pairs_from(pairs_from);
                    let npd = if kern.moe_two_pairs_at(&wt, t) { 2 } else { 1 };
                    assert_eq!(npd, if pairs_from == 1 { 2 } else { 1 }, "{h}x{i} T={t}: two pairs a digit pass from {pairs_from} tokens");
                    let mut pair_rows = |digits: bool, mixed: bool| -> Vec<f32> {
                        kern.set_moe_fp8_tokens(if digits { t } else { 1 }).unwrap();
                        assert_eq!(kern.moe_mixed_at(&wt, t), !digits, "{h}x{i} T={t}: mixed where the digits do not run");
                        let mut sc = kern.moe_scratch(&w, t * top_k).unwrap();
                        g.stream.memcpy_htod(&vec![f32::NAN; t * top_k * h], &mut sc.out).unwrap();
                        if mixed {
                            kern.moe_mxfp4_decode_pairs(MoeKernel::TILED, &wt, &dr, &xd, MoeInput::Settled, &mut sc).unwrap();
                        } else {
                            kern.moe_mxfp4_pairs(MoeKernel::TILED, &wt, &dr, &xd, MoeInput::Settled, &mut sc).unwrap();
                        }
                        assert!(g.stream.clone_dtoh(&sc.counters).unwrap().iter().all(|&c| c == 0), "T={t} (digits {digits}, mixed {mixed}): counters left non-zero");
                        g.stream.clone_dtoh(&sc.out).unwrap()
                    };
                    let (on_digits, on_f16, mixed) = (pair_rows(true, false), pair_rows(false, false), pair_rows(false, true));
                    let again = pair_rows(false, true);
                    assert!(mixed.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()), "mixed MoE {h}x{i} T={t}: a second call differs");
                    // Combined (`moe_mxfp4_decode`): each token's pairs summed in ascending pair
                    // order from zero, as moe_combine and the fused combine sum them.
                    let mut sc = kern.moe_scratch(&w, t * top_k).unwrap();
                    let mut yc = poisoned(&g, t * h);
                    kern.moe_mxfp4_decode(MoeKernel::TILED, &wt, &dr, &xd, MoeInput::Settled, &mut sc, &mut yc).unwrap();
                    let yc = g.stream.clone_dtoh(&yc).unwrap();
                    for ti in 0..t {
                        let mut pairs = routing.tok_pairs[ti * top_k..(ti + 1) * top_k].to_vec();
                        pairs.sort_unstable();
                        for n in 0..h {
                            let sum = pairs.iter().fold(0f32, |acc, &p| acc + mixed[p as usize * h + n]);
                            assert_eq!(yc[ti * h + n].to_bits(), sum.to_bits(), "mixed MoE {h}x{i} T={t}, combined: token {ti} row {n}");
                        }
                    }
                    assert!(g.stream.clone_dtoh(&sc.counters).unwrap().iter().all(|&c| c == 0), "T={t} (mixed, combined): counters left non-zero");
                    let (mut small, mut big) = (0, 0);
                    for s in 0..routing.experts.len() {
                        let (pb, pe) = (routing.pair_off[s] as usize, routing.pair_off[s + 1] as usize);
                        let want = if pe - pb <= npd { &on_digits } else { &on_f16 };
                        if pe - pb <= npd { small += 1 } else { big += 1 }
                        for p in pb..pe {
                            let (got, want) = (&mixed[p * h..(p + 1) * h], &want[p * h..(p + 1) * h]);
                            assert!(got.iter().all(|v| v.is_finite()), "mixed MoE {h}x{i} T={t}: pair {p} (slot of {} pairs) not written", pe - pb);
                            assert!(got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "mixed MoE {h}x{i} T={t} (digit passes of {npd}): pair {p} (slot of {} pairs) differs from its kind's bits", pe - pb);
                        }
                    }
                    // (At 16 tokens of 4 among 16 experts a slot of one pair may not occur.)
                    assert!(big > 0 && (small > 0 || t != 8), "T={t}: both kinds of slot ({small} of 1-{npd} pairs, {big} of more)");
                    kern.set_moe_fp8_pairs_from(pairs_before);
                    eprintln!("moe mxfp4 mixed {h}x{i} T={t}, digit passes of {npd}: {small} slots on digits, {big} on F16, each pair its kind's bits");
                }
                kern.set_moe_fp8_tokens(fp8_tokens).unwrap();
                kern.set_moe_mixed_from(mixed_before);
            }
            kern.set_moe_fp8(false);
            // Every K split of the pipelined kernels (the default is one of them).
            for (gate_up_split, down_split) in [(1, 8), (2, 4), (4, 2), (8, 1)] {
                let mut y4 = poisoned(&g, t * h);
                kern.moe_mxfp4_with(MoeKernel::Pipelined { gate_up_split, down_split }, &w, &dr, &xd, MoeInput::Settled, &mut scratch, &mut y4).unwrap();
                assert_close(&format!("moe mxfp4 (pipelined, splits {gate_up_split}/{down_split}) {h}x{i} T={t}"), &g.stream.clone_dtoh(&y4).unwrap(), &want);
            }
        }
    }
}

#[test]
fn routing_groups_pairs_by_expert() {
    let r = MoeRouting::new(&[vec![(3, 0.5), (1, 0.25)], vec![(1, 1.0), (7, 2.0)]]);
    assert_eq!(r.experts, vec![1, 3, 7]);
    assert_eq!(r.pair_off, vec![0, 2, 3, 4]);
    assert_eq!(r.pair_tok, vec![0, 1, 0, 1]);
    assert_eq!(r.pair_w, vec![0.25, 1.0, 0.5, 2.0]);
    // token 0: slot 0 -> expert 3 (pair 2), slot 1 -> expert 1 (pair 0)
    assert_eq!(r.tok_pairs, vec![2, 0, 1, 3]);
}

#[test]
fn probe_without_a_driver_says_what_to_do() {
    // SAFETY: only tries to dlopen libcuda.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!("skipped: this machine has a driver");
        return;
    }
    let err = probe(0).err().expect("no driver, no GPU").to_string();
    assert!(err.contains("--device cpu"), "{err}");
}

/// The host sampler's distribution (crates/engine/src/sampler.rs, `sampling_distribution`):
/// (token, probability) after temperature, top-k, top-p and min-p, ties to the lowest id.
fn host_distribution(logits: &[f32], t: f32, top_k: usize, top_p: f32, min_p: f32) -> Vec<(u32, f64)> {
    let t = t.max(1e-6) as f64;
    let mut v: Vec<(u32, f64)> = logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (i as u32, l as f64 / t)).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if top_k > 0 && v.len() > top_k {
        v.truncate(top_k);
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
    if top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = v.len();
        for (i, e) in v.iter().enumerate() {
            acc += e.1;
            if acc >= top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        v.truncate(keep);
    }
    if min_p > 0.0 {
        let thr = v[0].1 * min_p as f64;
        v.retain(|e| e.1 >= thr);
    }
    let s: f64 = v.iter().map(|e| e.1).sum();
    v.iter().map(|&(i, p)| (i, p / s)).collect()
}

/// Sampling on the GPU: with stratified uniforms u = (i + 0.5) / N every token is drawn
/// N * p times to within 2 (p from the host sampler's distribution), nothing outside the host's
/// kept set is ever drawn (top-k and top-p ties at the threshold included), greedy rows are the
/// argmax, and the same inputs give the same ids.
#[test]
fn sampling_on_the_gpu_matches_the_host_distribution() {
    use peregrine_core::backend::RowSampling;
    let Some((g, kern)) = gpu() else { return };
    let mut r = rng();
    for &v in &[1000usize, 152_576] {
        let mut logits: Vec<f32> = (0..v).map(|_| (r.random::<f32>() - 0.5) * 12.0).collect();
        // Ties at the top: 10 tokens share the largest logit, so top-k 5 keeps the 5 lowest ids.
        for j in 0..10 {
            logits[(j * 37 + 11) % v] = 9.0;
        }
        let cases: [(f32, usize, f32, f32); 7] =
            [(1.0, 0, 1.0, 0.0), (0.7, 50, 1.0, 0.0), (1.0, 0, 0.9, 0.0), (1.3, 0, 1.0, 0.05), (0.5, 20, 0.8, 0.02), (1.0, 5, 1.0, 0.0), (2.0, 12, 0.5, 0.0)];
        for (t, k, p, mp) in cases {
            let want = host_distribution(&logits, t, k, p, mp);
            let n = 4096usize;
            let per = 128usize;
            let rows_d = g.stream.clone_htod(&logits.repeat(per)).unwrap();
            let mut counts = std::collections::HashMap::<u32, usize>::new();
            let mut first = Vec::new();
            for c in 0..n / per {
                let params: Vec<RowSampling> = (0..per)
                    .map(|i| RowSampling { temperature: t, top_k: k as i32, top_p: p, min_p: mp, u: ((c * per + i) as f64 + 0.5) / n as f64, adj_start: 0, adj_len: 0 })
                    .collect();
                let ids = g.stream.clone_dtoh(&kern.sample_rows(&rows_d, v, &params).unwrap()).unwrap();
                if c == 0 {
                    let again = g.stream.clone_dtoh(&kern.sample_rows(&rows_d, v, &params).unwrap()).unwrap();
                    assert_eq!(ids, again, "V={v} {t}/{k}/{p}/{mp}: not deterministic");
                    first = ids.clone();
                }
                for id in ids {
                    *counts.entry(id as u32).or_default() += 1;
                }
            }
            let kept: std::collections::HashMap<u32, f64> = want.iter().copied().collect();
            for (&id, &c) in &counts {
                assert!(kept.contains_key(&id), "V={v} T={t} k={k} p={p} min_p={mp}: drew token {id} ({c} times), outside the host's kept set of {}", kept.len());
            }
            let mut worst = 0f64;
            for (&id, &pr) in &kept {
                let d = (*counts.get(&id).unwrap_or(&0) as f64 - pr * n as f64).abs();
                worst = worst.max(d);
            }
            eprintln!("V={v} T={t} top_k={k} top_p={p} min_p={mp}: {} kept, {} drawn, max |count - N p| = {worst:.2}", kept.len(), counts.len());
            assert!(worst <= 2.0, "V={v} T={t} k={k} p={p} min_p={mp}: a count is {worst:.2} from N p");
            assert!(!first.is_empty());
        }
        // Greedy rows: the argmax, ties to the lowest id (token 11 holds the first 9.0).
        let rows_d = g.stream.clone_htod(&logits).unwrap();
        let ids = g.stream.clone_dtoh(&kern.sample_rows(&rows_d, v, &[RowSampling { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, u: 0.3, adj_start: 0, adj_len: 0 }]).unwrap()).unwrap();
        assert_eq!(ids, vec![11], "V={v}: greedy row");
    }
}

/// The cluster sampler (8 blocks per row, each a slice of the vocabulary, on Hopper) draws
/// exactly the tokens the one-block sampler draws: vocabularies smaller than the cluster, odd,
/// MiMo-sized (slices staged in shared memory) and past the staging limit (slices read from
/// global memory; 400k tokens need 200 KB per block); flat and peaked logits with ties at the top and at top-k/top-p thresholds,
/// NaN and infinities; every parameter set over 96 uniforms each.
#[test]
fn the_cluster_sampler_draws_what_the_one_block_sampler_draws() {
    use peregrine_core::backend::RowSampling;
    let Some((g, kern)) = gpu() else { return };
    let off = std::env::var("PEREGRINE_SAMPLE_CLUSTER").is_ok_and(|v| v == "0");
    if off || g.capability.0 < 9 {
        assert_eq!(kern.sample_blocks_per_row(), 1, "the cluster sampler loaded where it is off or unsupported");
        eprintln!("no cluster sampler on this GPU (PEREGRINE_SAMPLE_CLUSTER=0 or before Hopper): nothing to compare");
        return;
    }
    assert!(kern.sample_blocks_per_row() > 1, "Hopper or later: the cluster sampler must load");
    let mut r = rng();
    let cases: [(f32, i32, f32, f32); 10] = [
        (0.0, 0, 1.0, 0.0),
        (1.0, 0, 1.0, 0.0),
        (0.7, 50, 1.0, 0.0),
        (1.0, 0, 0.9, 0.0),
        (1.3, 0, 1.0, 0.05),
        (0.5, 20, 0.8, 0.02),
        (1.0, 5, 1.0, 0.0),
        (2.0, 12, 0.5, 0.0),
        (0.8, 0, 0.95, 0.0),
        (1.0, 1000, 0.99, 0.001),
    ];
    for v in [5usize, 1001, 152_576, 400_003] {
        let rows = 96usize;
        let mut logits = Vec::with_capacity(rows * v);
        for row in 0..rows {
            let peaked = row % 2 == 1;
            let mut l: Vec<f32> = (0..v).map(|_| if peaked { (r.random::<f32>() - 0.5) * 4.0 } else { (r.random::<f32>() - 0.5) * 12.0 }).collect();
            // Ties: a run of equal values at the top and a block of equal values lower down
            // (so thresholds fall inside ties), quantised logits on some rows.
            let top = if peaked { 14.0 } else { 9.0 };
            for j in 0..v.min(10) {
                l[(j * 37 + 11 + row) % v] = top;
            }
            for j in 0..v.min(300) {
                l[(j * 131 + 7 * row) % v] = 2.5;
            }
            if row % 3 == 0 {
                l.iter_mut().for_each(|x| *x = (*x * 4.0).round() / 4.0);
            }
            if row % 5 == 0 && v > 4 {
                l[r.random_range(0..v)] = f32::NAN;
                l[r.random_range(0..v)] = f32::NEG_INFINITY;
            }
            logits.extend(l);
        }
        let d = g.stream.clone_htod(&logits).unwrap();
        for (t, k, p, mp) in cases {
            let params: Vec<RowSampling> = (0..rows).map(|i| RowSampling { temperature: t, top_k: k, top_p: p, min_p: mp, u: (i as f64 * 0.618_034 + 0.01).fract(), adj_start: 0, adj_len: 0 }).collect();
            let one = g.stream.clone_dtoh(&kern.sample_rows_on(&d, v, &params, false).unwrap()).unwrap();
            let cl = g.stream.clone_dtoh(&kern.sample_rows_on(&d, v, &params, true).unwrap()).unwrap();
            for row in 0..rows {
                assert!((0..v as i32).contains(&one[row]), "V={v} {t}/{k}/{p}/{mp} row {row}: id {} out of range", one[row]);
                assert_eq!(cl[row], one[row], "V={v} T={t} top_k={k} top_p={p} min_p={mp} row {row} (u {}): the cluster sampler drew {}, one block {}", params[row].u, cl[row], one[row]);
            }
            let distinct: std::collections::HashSet<i32> = one.iter().copied().collect();
            eprintln!("V={v} T={t} top_k={k} top_p={p} min_p={mp}: {rows} rows identical, {} distinct ids", distinct.len());
        }
    }
}

/// Logit adjustments (bias, repetition, presence/frequency) on the GPU equal the host's
/// arithmetic bit for bit, per row, ignoring ids past the vocabulary.
#[test]
fn logit_adjustments_match_the_host() {
    use peregrine_core::backend::{LogitAdjust, RowSampling};
    let Some((g, kern)) = gpu() else { return };
    let mut r = rng();
    let (v, rows) = (1000usize, 3usize);
    let logits: Vec<f32> = (0..rows * v).map(|_| (r.random::<f32>() - 0.5) * 8.0).collect();
    let mut adjust = Vec::new();
    let mut params = Vec::new();
    for _ in 0..rows {
        let start = adjust.len();
        let mut ids: Vec<u32> = (0..40).map(|_| r.random_range(0..v as u32 + 5)).collect();
        ids.sort();
        ids.dedup();
        for t in ids {
            adjust.push(LogitAdjust { token: t, bias: r.random::<f32>() - 0.5, repetition: if r.random::<bool>() { 1.3 } else { 1.0 }, subtract: r.random::<f32>() * 0.5 });
        }
        params.push(RowSampling { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, u: 0.5, adj_start: start as u32, adj_len: (adjust.len() - start) as u32 });
    }
    let mut want = logits.clone();
    for (ri, p) in params.iter().enumerate() {
        for a in &adjust[p.adj_start as usize..(p.adj_start + p.adj_len) as usize] {
            if a.token as usize >= v {
                continue;
            }
            let x = &mut want[ri * v + a.token as usize];
            *x += a.bias;
            if a.repetition != 1.0 {
                *x = if *x > 0.0 { *x / a.repetition } else { *x * a.repetition };
            }
            *x -= a.subtract;
        }
    }
    let mut d = g.stream.clone_htod(&logits).unwrap();
    let ids = g.stream.clone_dtoh(&kern.sample_rows_adjusted(&mut d, v, &params, &adjust).unwrap()).unwrap();
    let got = g.stream.clone_dtoh(&d).unwrap();
    assert_eq!(got, want, "adjusted logits differ from the host's");
    for (ri, id) in ids.iter().enumerate() {
        let row = &want[ri * v..(ri + 1) * v];
        let best = (0..v).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        assert_eq!(*id as usize, best, "row {ri}: greedy after adjustments");
    }
}

/// Token masks on the GPU (`sample_rows_masked`): after the adjustments, a refused token's logit
/// is -inf and every other logit keeps its bits, for vocabularies of 33 tokens (a partial last
/// word), 1000 and MiMo's 152,576, rows without a mask, with a random half, a few tokens, or
/// every token allowed; the greedy rows draw the best allowed token, the sampled ones what the
/// sampler draws from the host-masked logits (always an allowed token). A mask of the wrong
/// length is refused.
#[test]
fn token_masks_match_the_host() {
    use peregrine_core::backend::{token_mask_allows, token_mask_words, LogitAdjust, RowSampling};
    let Some((g, kern)) = gpu() else { return };
    let mut r = rng();
    for v in [33usize, 1000, 152_576] {
        let rows = 5usize;
        let words = token_mask_words(v);
        let logits: Vec<f32> = (0..rows * v).map(|_| (r.random::<f32>() - 0.5) * 8.0).collect();
        let mut masks: Vec<Option<Vec<u32>>> = vec![None; rows];
        masks[1] = Some((0..words).map(|_| r.random::<u32>()).collect());
        let mut few = vec![0u32; words];
        for _ in 0..3 {
            let t = r.random_range(0..v);
            few[t / 32] |= 1 << (t % 32);
        }
        masks[2] = Some(few.clone());
        masks[3] = Some(vec![u32::MAX; words]);
        masks[4] = Some(few);
        // Row 1 has adjustments too (one on a refused token, which stays -inf).
        let adjust: Vec<LogitAdjust> = (0..6).map(|i| LogitAdjust { token: (i * 7) as u32 % v as u32, bias: 1.5, repetition: 1.2, subtract: 0.25 }).collect();
        let params: Vec<RowSampling> = (0..rows)
            .map(|i| {
                let (t, adj_len) = match i {
                    1 => (0.0, adjust.len() as u32),
                    4 => (0.8, 0),
                    _ => (0.0, 0),
                };
                RowSampling { temperature: t, top_k: 0, top_p: 1.0, min_p: 0.0, u: 0.37, adj_start: 0, adj_len }
            })
            .collect();
        let mut want = logits.clone();
        for (ri, p) in params.iter().enumerate() {
            let row = &mut want[ri * v..(ri + 1) * v];
            for a in &adjust[..p.adj_len as usize] {
                let x = &mut row[a.token as usize];
                *x += a.bias;
                *x = if *x > 0.0 { *x / a.repetition } else { *x * a.repetition };
                *x -= a.subtract;
            }
            if let Some(m) = &masks[ri] {
                for (i, x) in row.iter_mut().enumerate() {
                    if !token_mask_allows(m, i as u32) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mut d = g.stream.clone_htod(&logits).unwrap();
        let ids = g.stream.clone_dtoh(&kern.sample_rows_masked(&mut d, v, &params, &adjust, &masks).unwrap()).unwrap();
        let got = g.stream.clone_dtoh(&d).unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "V={v}: row {} token {}: {a} against the host's {b}", i / v, i % v);
        }
        let host_drawn = g.stream.clone_dtoh(&kern.sample_rows(&g.stream.clone_htod(&want).unwrap(), v, &params).unwrap()).unwrap();
        for (ri, &id) in ids.iter().enumerate() {
            let row = &want[ri * v..(ri + 1) * v];
            assert!(row[id as usize].is_finite(), "V={v} row {ri}: drew refused token {id}");
            if params[ri].temperature == 0.0 {
                let best = (0..v).fold(0, |b, i| if row[i] > row[b] { i } else { b });
                assert_eq!(id as usize, best, "V={v} row {ri}: greedy under the mask");
            }
            assert_eq!(id, host_drawn[ri], "V={v} row {ri}: the masked draw against the draw from host-masked logits");
        }
        let mut short = masks.clone();
        short[1] = Some(vec![0; words + 1]);
        let Err(err) = kern.sample_rows_masked(&mut d, v, &params, &[], &short) else { panic!("a mask of the wrong length was taken") };
        let err = err.to_string();
        assert!(err.contains("token mask of"), "{err}");
        eprintln!("V={v}: masked logits bit for bit, draws under the masks");
    }
}

/// The host's `logprobs` (crates/engine/src/sampler.rs) on one row: the chosen token's logprob
/// and the `top` most likely, descending, ties to the lower id.
fn host_logprobs(raw: &[f32], chosen: usize, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = raw.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64 + raw.iter().map(|&l| ((l - max) as f64).exp()).sum::<f64>().ln();
    let lp = |i: usize| (raw[i] as f64 - lse) as f32;
    let mut idx: Vec<usize> = (0..raw.len()).collect();
    idx.sort_by(|&a, &b| raw[b].total_cmp(&raw[a]).then(a.cmp(&b)));
    (lp(chosen), idx[..top.min(raw.len())].iter().map(|&i| (i as u32, lp(i))).collect())
}

/// A GPU logprob (f32) against the host's (f64, rounded to f32): within 1e-6 plus two f32 ulps
/// of the value (the GPU's f32 log-sum-exp and subtraction each round). An absolute 1e-6 alone
/// is under one ulp past 16, where these rows' rarest tokens lie: a one-ulp difference,
/// -16.54869 against -16.548689, failed it on the H100.
fn logprob_close(gpu: f32, host: f32) -> bool {
    let ulp = f32::from_bits(host.abs().to_bits() + 1) - host.abs();
    (gpu - host).abs() <= 1e-6 + 2.0 * ulp
}

/// Logprobs on the GPU equal the host's on fresh random logits with ties at the top (ids exactly,
/// values within 1e-6 and two ulps), for 0, 1, 5 and 20 alternatives and a row that wants none, vocabularies
/// smaller than 20 tokens to MiMo's (one block per row, or a cluster's slices); sampling with
/// logprobs leaves the raw logits untouched (adjustments go to a copy) and draws what
/// `sample_rows_adjusted` draws.
#[test]
fn logprobs_on_the_gpu_match_the_host() {
    use peregrine_core::backend::{LogitAdjust, RowSampling};
    let Some((g, kern)) = gpu() else { return };
    let mut r = rng();
    // 13: fewer tokens than the 20 asked for, and than the cluster's blocks have room for.
    for v in [13usize, 5000, 152_064] {
        let rows = 5;
        let mut logits: Vec<f32> = (0..rows * v).map(|_| (r.random::<f32>() - 0.5) * 12.0).collect();
        for row in 0..rows {
            // Ties: several tokens share the row's largest value, one of them the chosen one.
            let top = (0..v).map(|i| logits[row * v + i]).fold(f32::MIN, f32::max) + 1.0;
            for _ in 0..4 {
                let i = r.random_range(0..v);
                logits[row * v + i] = top;
            }
        }
        let chosen: Vec<i32> = (0..rows).map(|_| r.random_range(0..v as i32)).collect();
        let tops = [Some(0u32), Some(1), Some(5), Some(20), None];
        let d = g.stream.clone_htod(&logits).unwrap();
        let cd = g.stream.clone_htod(&chosen).unwrap();
        let got = kern.row_logprobs(&d, v, &cd, &tops).unwrap();
        for row in 0..rows {
            let Some(n) = tops[row] else {
                assert!(got[row].is_none(), "row {row} asked for nothing");
                continue;
            };
            let g = got[row].as_ref().expect("logprobs");
            let (lp, top) = host_logprobs(&logits[row * v..(row + 1) * v], chosen[row] as usize, n as usize);
            assert!(lp.is_finite() && logprob_close(g.logprob, lp), "V={v} row {row}: chosen logprob {} vs host {lp}", g.logprob);
            assert_eq!(g.top.iter().map(|t| t.0).collect::<Vec<_>>(), top.iter().map(|t| t.0).collect::<Vec<_>>(), "V={v} row {row}: top ids");
            for (a, b) in g.top.iter().zip(&top) {
                assert!(logprob_close(a.1, b.1), "V={v} row {row}: top logprob {} vs host {}", a.1, b.1);
            }
        }
        // Sampling with logprobs: the raw logits stay, the draw is the adjusted one.
        let params: Vec<RowSampling> = (0..rows).map(|i| RowSampling { temperature: 0.8, top_k: 0, top_p: 0.9, min_p: 0.0, u: r.random(), adj_start: 0, adj_len: if i % 2 == 0 { 2 } else { 0 } }).collect();
        let adjust = [LogitAdjust { token: 7, bias: 30.0, repetition: 1.0, subtract: 0.0 }, LogitAdjust { token: 9, bias: -3.0, repetition: 1.2, subtract: 0.1 }];
        let (ids, lps) = kern.sample_rows_with_logprobs(&d, v, &params, &adjust, &tops).unwrap();
        assert_eq!(g.stream.clone_dtoh(&d).unwrap(), logits, "V={v}: sampling with logprobs changed the raw logits");
        let mut copy = g.stream.clone_htod(&logits).unwrap();
        let want = g.stream.clone_dtoh(&kern.sample_rows_adjusted(&mut copy, v, &params, &adjust).unwrap()).unwrap();
        assert_eq!(ids, want, "V={v}: draws with and without logprobs differ");
        assert_eq!(ids[0], 7, "V={v}: a bias of +30 decides row 0's draw");
        for row in 0..rows {
            if let (Some(n), Some(lp)) = (tops[row], &lps[row]) {
                let (want_lp, want_top) = host_logprobs(&logits[row * v..(row + 1) * v], ids[row] as usize, n as usize);
                assert!(logprob_close(lp.logprob, want_lp) && lp.top.len() == want_top.len(), "V={v} row {row}: logprobs of the draw");
            }
        }
    }
}
