//! The model's element-wise and attention kernels one by one against the CPU reference on fresh
//! random inputs (the seed is printed; PEREGRINE_TEST_SEED reproduces it). Outputs start
//! poisoned with NaN where a kernel writes into an existing buffer, and NaN never passes.
//! They say `skipped:` and pass only on a machine with no GPU at all (no driver, or no device)
//! and without `PEREGRINE_REQUIRE_GPU`; a GPU that cannot be opened (a context lost to an earlier
//! test) fails them (`probe_for_tests`). scripts/gpu-check.sh runs them with the variable set.

use cudarc::driver::CudaSlice;
use peregrine_core::spec::RopeStyle;
use peregrine_core::{AttentionKind, AttentionSpec, KvDtype, QkvLayout, RopeSpec};
use peregrine_cpu::ops;
use rand::{Rng, SeedableRng};

use crate::backend::{Bf16Split, CudaModel, FreshKv, MoePairs};
use crate::kv_pool::KvPool;
use crate::probe_for_tests;

fn model() -> Option<CudaModel> {
    let gpu = probe_for_tests(0)?;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden/default");
    let spec = peregrine_model::config::load_spec(&dir).expect("fixture config");
    Some(CudaModel::synthetic(gpu, &spec, 3).expect("synthetic model"))
}

fn rng() -> rand::rngs::StdRng {
    let seed: u64 = std::env::var("PEREGRINE_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("seed {seed} (PEREGRINE_TEST_SEED reproduces it)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// FNV-1a over the values' bits. With PEREGRINE_TEST_SEED fixed, two builds of a kernel give
/// the same bits exactly when the fingerprints a test prints agree (a measurement build
/// against the default, say).
fn bits_fingerprint(v: &[f32]) -> u64 {
    v.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| (h ^ x.to_bits() as u64).wrapping_mul(0x100_0000_01b3))
}

fn randn(r: &mut impl Rng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| (r.random::<f32>() * 2.0 - 1.0) * amp).collect()
}

fn close(name: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{name}: element {i} is {g} (want {w})");
        worst = worst.max((g - w).abs() / scale);
    }
    eprintln!("{name}: max |gpu - cpu| / max |cpu| = {worst:.2e}");
    assert!(worst <= tol, "{name}: relative error {worst:.2e}");
}

fn attn_spec(heads: usize, kv_heads: usize, hd: usize, vd: usize, rotary: usize, window: Option<usize>, sinks: bool) -> AttentionSpec {
    AttentionSpec {
        kind: window.map_or(AttentionKind::Full, |w| AttentionKind::Sliding { window: w }),
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hd,
        v_head_dim: vd,
        rope: RopeSpec { theta: 10_000.0, rotary_dim: rotary, style: RopeStyle::NeoX },
        sinks,
        value_scale: 0.707,
        softmax_scale: (hd as f32).powf(-0.5),
        qkv_layout: QkvLayout::Separate,
        qkv_bias: false,
        qk_norm: false,
    }
}

/// RMSNorm in f64 (the CPU backend's f32 version sums sequentially, so it carries ~sqrt(d) ulps
/// of its own error).
fn rms_norm_f64(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    x.chunks(w.len())
        .flat_map(|r| {
            let ms = r.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / r.len() as f64;
            let inv = 1.0 / (ms + eps as f64).sqrt();
            r.iter().zip(w).map(move |(&v, &g)| (g as f64 * v as f64 * inv) as f32).collect::<Vec<_>>()
        })
        .collect()
}

/// The argmax of each row as the host takes it: the lowest index of the largest value; NaN is
/// never the largest; all -inf/NaN: 0.
fn argmax_host(row: &[f32]) -> i32 {
    let mut best: Option<(f32, usize)> = None;
    for (i, &v) in row.iter().enumerate() {
        if v > best.map_or(f32::NEG_INFINITY, |b| b.0) {
            best = Some((v, i));
        }
    }
    best.map_or(0, |b| b.1 as i32)
}

/// Over many blocks per row (a 152k vocabulary takes 75), with the largest value twice in
/// different blocks, NaNs, -inf, and rows of nothing else.
#[test]
fn argmax_matches_the_host() {
    let Some(m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    for (rows, v) in [(1usize, 152_064usize), (3, 152_064), (2, 5_000), (4, 512), (65, 2_049)] {
        let mut x = randn(&mut r, rows * v, 8.0);
        for (ri, row) in x.chunks_mut(v).enumerate() {
            match ri % 4 {
                // The largest value twice, far apart (different blocks): the lower index wins.
                0 => {
                    let (a, b) = (r.random_range(0..v / 2), r.random_range(v / 2..v));
                    row[a] = 100.0;
                    row[b] = 100.0;
                }
                // NaNs and -inf around a largest value near the end.
                1 => {
                    for e in row.iter_mut().step_by(7) {
                        *e = f32::NAN;
                    }
                    row[v - 1] = f32::NEG_INFINITY;
                    row[v - 2] = 50.0;
                }
                // Nothing but -inf and NaN: id 0.
                2 => {
                    for (i, e) in row.iter_mut().enumerate() {
                        *e = if i % 3 == 0 { f32::NAN } else { f32::NEG_INFINITY };
                    }
                }
                _ => {}
            }
        }
        let want: Vec<i32> = x.chunks(v).map(argmax_host).collect();
        let mut ids = st.clone_htod(&vec![-7i32; rows]).unwrap();
        m.argmax_rows_into(&st.clone_htod(&x).unwrap(), rows, v, &mut ids, None).unwrap();
        assert_eq!(st.clone_dtoh(&ids).unwrap(), want, "argmax of {rows} rows of {v}");
        eprintln!("argmax of {rows} rows of {v}: as the host");
    }
}

/// The one-token lm_head that folds the argmax (`gemv_mma_bf16_t1_argmax`, then
/// `argmax_unpack`): its logits are gemv_bf16_presplit's bit for bit and its id is argmax_rows'
/// over Flash's lm_head shape and smaller many-wave ones, with the largest logit in two rows
/// (the lower wins), NaN and -inf logits around the largest, and nothing but NaN and -inf (id
/// 0); the keys are zero again after every unpack.
#[test]
fn lm_head_folding_the_argmax_equals_argmax_rows() {
    let Some(mut m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    let bf16 = |v: f32| half::bf16::from_f32(v).to_bits();
    let (one, pinf, ninf) = (bf16(1.0), bf16(f32::INFINITY), bf16(f32::NEG_INFINITY));
    for (n, k, case) in [(152_064usize, 4096usize, 0), (20_000, 256, 0), (20_000, 256, 1), (19_999, 128, 2), (40_000, 512, 3)] {
        assert!(m.kernels.bf16_argmax_takes(1, n, k), "{n}x{k}: the one-tile GEMV");
        let mut w: Vec<u16> = randn(&mut r, n * k, 0.05).iter().map(|&v| bf16(v)).collect();
        // Cases 1-3 against x = 1 + 2^-10 (BF16 hi 1, lo 2^-10: both positive, so a row of -inf
        // gives -inf, not inf x 0), where a row of ones sums far above the random rows.
        let x = if case == 0 { randn(&mut r, k, 1.0) } else { vec![1.0 + 1.0 / 1024.0; k] };
        let row = |w: &mut Vec<u16>, i: usize, f: &dyn Fn(usize) -> u16| (0..k).for_each(|c| w[i * k + c] = f(c));
        match case {
            1 => {
                let (a, b) = (r.random_range(0..n / 2), r.random_range(n / 2..n));
                row(&mut w, a, &|_| one);
                row(&mut w, b, &|_| one);
            }
            2 => {
                for i in (0..n).step_by(7) {
                    row(&mut w, i, &|c| if c == 0 { pinf } else if c == 1 { ninf } else { 0 }); // NaN
                }
                row(&mut w, n - 1, &|_| ninf);
                row(&mut w, n - 2, &|_| one);
            }
            3 => {
                for i in 0..n {
                    row(&mut w, i, &|c| if i % 3 == 0 && c == 1 { pinf } else if c == 0 || i % 3 == 0 { ninf } else { 0 });
                }
            }
            _ => {}
        }
        let wd = st.clone_htod(&crate::tc_tiles::tile(&w, n, k)).unwrap();
        let (xh, xl, _) = m.kernels.split_bf16(&st.clone_htod(&x).unwrap(), k).unwrap();
        let mut y_ref = st.alloc_zeros::<f32>(n).unwrap();
        m.kernels.gemv_bf16_presplit(&wd, &xh, &xl, &mut y_ref, n, k, 1, None).unwrap();
        let mut id_ref = st.clone_htod(&[-7i32]).unwrap();
        m.argmax_rows_into(&y_ref, 1, n, &mut id_ref, None).unwrap();
        let logits = st.clone_dtoh(&y_ref).unwrap();
        let id_ref = st.clone_dtoh(&id_ref).unwrap();
        assert_eq!(id_ref, [argmax_host(&logits)], "{n}x{k} case {case}: argmax_rows against the host");
        // As is, and asking L2 for its first K blocks before its wait (the same bits).
        for prefetch in [false, true] {
            m.kernels.set_lm_head_prefetch(prefetch);
            let mut y = st.clone_htod(&vec![f32::NAN; n]).unwrap();
            m.kernels.gemv_bf16_presplit_argmax(&wd, &xh, &xl, &mut y, n, k, &m.argmax_key).unwrap();
            let mut id = st.clone_htod(&[-7i32]).unwrap();
            m.argmax_unpack_into(&mut id, None).unwrap();
            assert_eq!(st.clone_dtoh(&y).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), logits.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{n}x{k} case {case} (prefetch {prefetch}): logits");
            assert_eq!(st.clone_dtoh(&id).unwrap(), id_ref, "{n}x{k} case {case} (prefetch {prefetch}): id");
            assert!(st.clone_dtoh(&m.argmax_key).unwrap().iter().all(|&k| k == 0), "{n}x{k} case {case} (prefetch {prefetch}): the keys zeroed");
        }
        m.kernels.set_lm_head_prefetch(false);
        eprintln!("lm_head {n}x{k} case {case}: id {} as argmax_rows", id_ref[0]);
    }
}

/// The embedding and the first input norm in one launch (`embed_rms_norm_split`, a plan's
/// `Op::EmbedNorm`) write the bits of `embed_rows` then `rms_norm_split`: x, y and y's F16 split,
/// for 1, 3 and 9 rows of random tokens, some rows chained on another step's ids (tokens read on
/// the device).
#[test]
fn embedding_and_first_norm_in_one_launch_give_the_bits_of_two() {
    use cudarc::driver::DevicePtr;
    let Some(m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    let (v, d) = (m.spec.vocab_size, m.spec.hidden_size);
    let w = st.clone_htod(&randn(&mut r, d, 1.0)).unwrap();
    let prev = st.clone_htod(&(0..9).map(|_| r.random_range(0..v as i32)).collect::<Vec<_>>()).unwrap();
    let chain = st.clone_htod(&[prev.device_ptr(&st).0]).unwrap();
    for n in [1usize, 3, 9] {
        let tok: Vec<i32> = (0..n).map(|i| if i % 3 == 2 { -r.random_range(0..9i32) - 1 } else { r.random_range(0..v as i32) }).collect();
        let tok = st.clone_htod(&tok).unwrap();
        let x0 = m.embed_rows(&tok, Some(&chain), n).unwrap();
        let (y0, (h0, l0, i0)) = m.rms_norm_split(&x0, &w, n, d).unwrap();
        let (x1, y1, (h1, l1, i1)) = m.embed_rms_norm_split(&tok, Some(&chain), &w, n).unwrap();
        let bits = |a: &CudaSlice<f32>| st.clone_dtoh(a).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let x = bits(&x0);
        assert!(st.clone_dtoh(&x0).unwrap().iter().all(|v| v.is_finite()), "{n} rows: the embedding");
        assert_eq!(bits(&x1), x, "{n} rows: x");
        assert_eq!(bits(&y1), bits(&y0), "{n} rows: y");
        assert_eq!(st.clone_dtoh(&h1).unwrap(), st.clone_dtoh(&h0).unwrap(), "{n} rows: F16 hi");
        assert_eq!(st.clone_dtoh(&l1).unwrap(), st.clone_dtoh(&l0).unwrap(), "{n} rows: F16 lo");
        assert_eq!(bits(&i1), bits(&i0), "{n} rows: the split's scale");
        eprintln!("embedding + first norm, {n} rows: the bits of two launches");
    }
}

/// A copy-free graph step's row data (crate::staged): what the host writes into a slot lands in
/// each buffer when `fetch_staged` is pointed at that slot (4- and 8-byte values, lengths that
/// are and are not whole 16-byte chunks, one array over many passes of the grid; the buffers
/// poisoned before each fetch), another slot keeps its own rows, and the argmax kernels and the
/// sampler write the step's ids into the slot fetched last as well as on the device.
#[test]
fn copy_free_rows_land_in_their_buffers_and_ids_in_their_slot() {
    use crate::staged::{array, StagedRows};
    let Some(m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    let (na, nb, nc) = (5usize, 3usize, 40_000usize);
    let (mut da, mut db, mut dc, mut dd) = (st.alloc_zeros::<i32>(na).unwrap(), st.alloc_zeros::<i64>(nb).unwrap(), st.alloc_zeros::<i32>(nc).unwrap(), st.alloc_zeros::<u64>(1).unwrap());
    let mut staged = StagedRows::new(&st, &[array(&da, &st), array(&db, &st), array(&dc, &st), array(&dd, &st)], 3).unwrap();
    let set = |r: &mut rand::rngs::StdRng| -> (Vec<i32>, Vec<i64>, Vec<i32>, u64) { ((0..na).map(|_| r.random()).collect(), (0..nb).map(|_| r.random()).collect(), (0..nc).map(|_| r.random()).collect(), r.random()) };
    let raw = |s: &(Vec<i32>, Vec<i64>, Vec<i32>, u64)| -> Vec<Vec<u8>> {
        // SAFETY: plain integers, read as their bytes.
        let b = |p: *const u8, n: usize| unsafe { std::slice::from_raw_parts(p, n) }.to_vec();
        vec![b(s.0.as_ptr() as _, 4 * na), b(s.1.as_ptr() as _, 8 * nb), b(s.2.as_ptr() as _, 4 * nc), b(&s.3 as *const u64 as _, 8)]
    };
    let (one, two) = (set(&mut r), set(&mut r));
    let write = |staged: &mut StagedRows, s: &(Vec<i32>, Vec<i64>, Vec<i32>, u64)| {
        let a = raw(s);
        let slot = staged.write(&a.iter().map(Vec::as_slice).collect::<Vec<_>>()).unwrap();
        staged.launched(slot, &st).unwrap();
        slot
    };
    let (s1, s2) = (write(&mut staged, &one), write(&mut staged, &two));
    assert_ne!(s1, s2, "two writes, two slots");
    for (slot, want) in [(s2, &two), (s1, &one), (s2, &two)] {
        st.memcpy_htod(&vec![-1i32; na], &mut da).unwrap();
        st.memcpy_htod(&vec![-1i64; nb], &mut db).unwrap();
        st.memcpy_htod(&vec![-1i32; nc], &mut dc).unwrap();
        st.memcpy_htod(&[u64::MAX], &mut dd).unwrap();
        m.fetch_staged(&staged, slot).unwrap();
        assert_eq!(st.clone_dtoh(&da).unwrap(), want.0, "slot {slot}: 4-byte values");
        assert_eq!(st.clone_dtoh(&db).unwrap(), want.1, "slot {slot}: 8-byte values");
        assert_eq!(st.clone_dtoh(&dc).unwrap(), want.2, "slot {slot}: the long array");
        assert_eq!(st.clone_dtoh(&dd).unwrap(), [want.3], "slot {slot}: one word");
    }
    // The ids of the last fetched slot (s2): argmax_rows over 3 rows, and the folded one-row
    // argmax's unpack.
    let v = 5_000usize;
    let x = randn(&mut r, 3 * v, 8.0);
    let want: Vec<i32> = x.chunks(v).map(argmax_host).collect();
    let mut ids = st.clone_htod(&[-7i32; 3]).unwrap();
    m.argmax_rows_into(&st.clone_htod(&x).unwrap(), 3, v, &mut ids, Some(&staged.ids_host)).unwrap();
    assert_eq!(st.clone_dtoh(&ids).unwrap(), want, "argmax on the device");
    assert_eq!(staged.slots.ids(s2, 3).unwrap(), want, "argmax in the slot");
    let (n, k) = (20_000usize, 256usize);
    assert!(m.kernels.bf16_argmax_takes(1, n, k), "{n}x{k}: the one-tile GEMV");
    let w: Vec<u16> = (0..n * k).map(|_| half::bf16::from_f32(r.random::<f32>() * 2.0 - 1.0).to_bits()).collect();
    let (xh, xl, _) = m.kernels.split_bf16(&st.clone_htod(&randn(&mut r, k, 1.0)).unwrap(), k).unwrap();
    let mut y = st.alloc_zeros::<f32>(n).unwrap();
    m.kernels.gemv_bf16_presplit_argmax(&st.clone_htod(&crate::tc_tiles::tile(&w, n, k)).unwrap(), &xh, &xl, &mut y, n, k, &m.argmax_key).unwrap();
    let mut id = st.clone_htod(&[-7i32]).unwrap();
    m.argmax_unpack_into(&mut id, Some(&staged.ids_host)).unwrap();
    let id = st.clone_dtoh(&id).unwrap();
    assert_eq!(id, [argmax_host(&st.clone_dtoh(&y).unwrap())], "the folded argmax");
    assert_eq!(staged.slots.ids(s2, 1).unwrap(), id, "the folded argmax in the slot");
    // A graph's sampler (`Op::Sample`): the ids of the sampler launched alone, on the device
    // and in the slot; a greedy padding row's is its argmax.
    use peregrine_core::backend::RowSampling;
    let rows: Vec<RowSampling> = [(0.8f32, 0, 0.95f32, 0.3f64), (1.0, 40, 1.0, 0.9)].iter().map(|&(temperature, top_k, top_p, u)| RowSampling { temperature, top_k, top_p, min_p: 0.0, u, adj_start: 0, adj_len: 0 }).collect();
    let logits = st.clone_htod(&x).unwrap();
    let alone = st.clone_dtoh(&m.kernels.sample_rows(&logits, v, &rows).unwrap()).unwrap();
    let params = st.clone_htod(&crate::kernels::device_sampling_rows(&rows, 3)).unwrap();
    let mut ids = st.clone_htod(&[-7i32; 3]).unwrap();
    m.kernels.sample_step_rows(&logits, v, 3, &params, &mut ids, Some(&staged.ids_host)).unwrap();
    let want = [alone[0], alone[1], argmax_host(&x[2 * v..])];
    assert_eq!(st.clone_dtoh(&ids).unwrap(), want, "sampled on the device");
    assert_eq!(staged.slots.ids(s2, 3).unwrap(), want, "sampled in the slot");
    // Every slot held: a write is refused, nothing written.
    let held: Vec<_> = (0..crate::staged::SLOTS).map(|s| staged.hold(s, 1).unwrap()).collect();
    assert!(staged.write(&raw(&one).iter().map(Vec::as_slice).collect::<Vec<_>>()).is_err(), "a write with every slot held");
    held[0].release(0);
    assert_eq!(staged.write(&raw(&one).iter().map(Vec::as_slice).collect::<Vec<_>>()).unwrap(), 0, "the released slot");
    // An array longer or shorter than its buffer, or too few arrays: refused.
    held[0].release(1);
    let mut big = raw(&one);
    big[0].extend_from_slice(&[0; 4]);
    assert!(staged.write(&big.iter().map(Vec::as_slice).collect::<Vec<_>>()).is_err());
    let mut short = raw(&one);
    short[2].truncate(16);
    assert!(staged.write(&short.iter().map(Vec::as_slice).collect::<Vec<_>>()).is_err());
    assert!(staged.write(&raw(&one)[..3].iter().map(Vec::as_slice).collect::<Vec<_>>()).is_err());
    eprintln!("copy-free rows: {} slots, every array as written, ids in the slot", crate::staged::SLOTS);
}

#[test]
fn norms_match_the_cpu_reference() {
    let Some(m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    let eps = m.spec.rms_norm_eps;
    for (rows, d) in [(5usize, 4096usize), (64 * 3, 192), (1, 256)] {
        let x = randn(&mut r, rows * d, 3.0);
        let a = randn(&mut r, rows * d, 1.0);
        let w = randn(&mut r, d, 1.0);
        let (xd, wd) = (st.clone_htod(&x).unwrap(), st.clone_htod(&w).unwrap());
        let y = st.clone_dtoh(&m.rms_norm(&xd, &wd, rows, d).unwrap()).unwrap();
        close(&format!("rms_norm {rows}x{d}"), &y, &rms_norm_f64(&x, &w, eps), 1e-6);
        // The residual add fused with the norm: x += a, y = norm(x).
        let mut xd = st.clone_htod(&x).unwrap();
        let y = st.clone_dtoh(&m.add_rms_norm(&mut xd, &st.clone_htod(&a).unwrap(), &wd, rows, d).unwrap()).unwrap();
        let sum: Vec<f32> = x.iter().zip(&a).map(|(p, q)| p + q).collect();
        assert_eq!(st.clone_dtoh(&xd).unwrap(), sum, "add_rms_norm {rows}x{d}: residual");
        close(&format!("add_rms_norm {rows}x{d}"), &y, &rms_norm_f64(&sum, &w, eps), 1e-6);
        // The CPU backend's f32 norm (sequential sum) agrees within its own rounding.
        close(&format!("add_rms_norm {rows}x{d} vs the f32 CPU norm"), &y, &ops::rms_norm(&sum, &w, eps), 1e-5);
        // The norm that also writes the F16 split: the same residual and y, and exactly the
        // split split_f16 makes of that y (the FP8 q/k/v GEMV reads one or the other).
        if d.is_multiple_of(4) && d <= 4 * 4 * 1024 {
            let mut xd = st.clone_htod(&x).unwrap();
            let (ys, (yh, yl, yinv)) = m.add_rms_norm_split(&mut xd, &st.clone_htod(&a).unwrap(), &wd, rows, d).unwrap();
            assert_eq!(st.clone_dtoh(&xd).unwrap(), sum, "add_rms_norm_split {rows}x{d}: residual");
            let ys_host = st.clone_dtoh(&ys).unwrap();
            assert_eq!(ys_host, y, "add_rms_norm_split {rows}x{d}: y");
            let (wh, wl, winv) = m.kernels.split_f16(&ys, rows, d, false).unwrap();
            assert_eq!(st.clone_dtoh(&yh).unwrap(), st.clone_dtoh(&wh).unwrap(), "add_rms_norm_split {rows}x{d}: hi parts");
            assert_eq!(st.clone_dtoh(&yl).unwrap(), st.clone_dtoh(&wl).unwrap(), "add_rms_norm_split {rows}x{d}: lo parts");
            assert_eq!(st.clone_dtoh(&yinv).unwrap(), st.clone_dtoh(&winv).unwrap(), "add_rms_norm_split {rows}x{d}: inverse scales");
            // Without the residual add (the first layer's input norm): rms_norm's y, x untouched,
            // and split_f16's split of that y.
            let y0 = m.rms_norm(&xd, &wd, rows, d).unwrap();
            let x_before = st.clone_dtoh(&xd).unwrap();
            let (ys, (yh, yl, yinv)) = m.rms_norm_split(&xd, &wd, rows, d).unwrap();
            assert_eq!(st.clone_dtoh(&xd).unwrap(), x_before, "rms_norm_split {rows}x{d}: x only read");
            assert_eq!(st.clone_dtoh(&ys).unwrap(), st.clone_dtoh(&y0).unwrap(), "rms_norm_split {rows}x{d}: y");
            let (wh, wl, winv) = m.kernels.split_f16(&y0, rows, d, false).unwrap();
            assert_eq!(st.clone_dtoh(&yh).unwrap(), st.clone_dtoh(&wh).unwrap(), "rms_norm_split {rows}x{d}: hi parts");
            assert_eq!(st.clone_dtoh(&yl).unwrap(), st.clone_dtoh(&wl).unwrap(), "rms_norm_split {rows}x{d}: lo parts");
            assert_eq!(st.clone_dtoh(&yinv).unwrap(), st.clone_dtoh(&winv).unwrap(), "rms_norm_split {rows}x{d}: inverse scales");
            // The norm that writes y split as the MoE kernels read x: the same residual and y,
            // and exactly what the MoE's own split launch makes of that y.
            if d.is_multiple_of(64) {
                let mut xd = st.clone_htod(&x).unwrap();
                let (ym, sp) = m.add_rms_norm_moe_split(&mut xd, &st.clone_htod(&a).unwrap(), &wd, rows, d).unwrap();
                assert_eq!(st.clone_dtoh(&xd).unwrap(), sum, "add_rms_norm_moe_split {rows}x{d}: residual");
                assert_eq!(st.clone_dtoh(&ym).unwrap(), y, "add_rms_norm_moe_split {rows}x{d}: y");
                let want = m.kernels.moe_split_x(&ym, rows, d).unwrap();
                assert_eq!(st.clone_dtoh(&sp.xs).unwrap(), st.clone_dtoh(&want.xs).unwrap(), "add_rms_norm_moe_split {rows}x{d}: split rows");
                assert_eq!(st.clone_dtoh(&sp.inv).unwrap(), st.clone_dtoh(&want.inv).unwrap(), "add_rms_norm_moe_split {rows}x{d}: inverse scales");
            }
        }
    }
}

/// A row whose largest |y| sits at a power of two where its estimate fl(P x inv) (P = max |w_i
/// x_i|, reduced with the sum of squares) lies across it: integer x (so the sum of squares, and
/// with it inv, are the same bits on the host as on the GPU), x_0 and w_0 chosen so that y_0 =
/// fl(w_0 fl(x_0 inv)) and fl(fl(w_0 x_0) inv) have different exponents, every other |y_i| far
/// below. Returns (x, w).
fn norm_row_across_a_power_of_two(d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let exp = |v: f32| (v.to_bits() >> 23) & 0xff;
    for x0 in [3.0f32, 5.0, 7.0, 11.0, 13.0, 17.0, 19.0, 23.0] {
        let s = x0 * x0 + (d - 1) as f32;
        let inv = 1.0f32 / (s / d as f32 + eps).sqrt();
        let target = 1.0f32 / (x0 * inv);
        for step in -64i32..=64 {
            let w0 = f32::from_bits((target.to_bits() as i32 + step) as u32);
            if exp(w0 * (x0 * inv)) != exp((w0 * x0) * inv) {
                let mut x = vec![1.0f32; d];
                x[0] = x0;
                let mut w = vec![0.25f32; d];
                w[0] = w0;
                return (x, w);
            }
        }
    }
    panic!("no row across a power of two for eps {eps}");
}

/// The row search itself (host only, so CI runs it): a row exists for the usual epsilons, and
/// its largest |y| and the estimate lie on either side of a power of two.
#[test]
fn a_norm_row_across_a_power_of_two_is_found() {
    for eps in [1e-5f32, 1e-6, 1e-8] {
        let (x, w) = norm_row_across_a_power_of_two(4096, eps);
        let s: f32 = x.iter().map(|v| v * v).sum();
        let inv = 1.0f32 / (s / 4096.0 + eps).sqrt();
        let y0 = w[0] * (x[0] * inv);
        let est = (w[0] * x[0]) * inv;
        assert_ne!(y0.to_bits() >> 23, est.to_bits() >> 23, "eps {eps}: y_0 {y0:e}, estimate {est:e}");
        assert!(x.iter().zip(&w).skip(1).all(|(a, b)| (a * b * inv).abs() < 0.5 * y0.abs()), "eps {eps}: y_0 is not the row's largest");
    }
}

/// The norms that split y (`add_rms_norm_split`, `rms_norm_split`, and the one-row norm summing
/// the MoE's pairs) take the split's power of two from an estimate of the largest |y| reduced
/// with the sum of squares, and reduce the exact largest only where the estimate is within 16
/// ulps of a power of two (kernels/ops.cu, `split_exponent_certain`): on a row built across a
/// power of two they still give split_f16's split of y, bit for bit.
#[test]
fn norm_splits_across_a_power_of_two_take_split_f16s_scale() {
    let Some(m) = model() else { return };
    let st = m.stream.clone();
    let d = 4096usize;
    let (x, w) = norm_row_across_a_power_of_two(d, m.spec.rms_norm_eps);
    let (xd, wd) = (st.clone_htod(&x).unwrap(), st.clone_htod(&w).unwrap());
    let want = |y: &CudaSlice<f32>| m.kernels.split_f16(y, 1, d, false).unwrap();
    let same = |what: &str, got: &(CudaSlice<u16>, CudaSlice<u16>, CudaSlice<f32>), y: &CudaSlice<f32>| {
        let (wh, wl, winv) = want(y);
        assert_eq!(st.clone_dtoh(&got.2).unwrap(), st.clone_dtoh(&winv).unwrap(), "{what}: inverse scale");
        assert_eq!(st.clone_dtoh(&got.0).unwrap(), st.clone_dtoh(&wh).unwrap(), "{what}: hi parts");
        assert_eq!(st.clone_dtoh(&got.1).unwrap(), st.clone_dtoh(&wl).unwrap(), "{what}: lo parts");
    };
    let (y, sp) = m.rms_norm_split(&xd, &wd, 1, d).unwrap();
    let y0 = st.clone_dtoh(&y).unwrap()[0];
    same("rms_norm_split", &sp, &y);
    let mut xa = st.clone_htod(&x).unwrap();
    let (y, sp) = m.add_rms_norm_split(&mut xa, &st.clone_htod(&vec![0f32; d]).unwrap(), &wd, 1, d).unwrap();
    same("add_rms_norm_split", &sp, &y);
    let pairs = MoePairs { out: st.clone_htod(&vec![0f32; 8 * d]).unwrap(), tok_pairs: st.clone_htod(&(0..8).collect::<Vec<i32>>()).unwrap(), topk: 8, pre: None };
    let mut xp = st.clone_htod(&x).unwrap();
    let (y, sp) = m.add_rms_norm_pairs(&mut xp, &pairs, &wd, 1, d, true).unwrap();
    same("add_rms_norm_split_pairs (one row)", &sp.expect("split"), &y);
    eprintln!("y_0 = {y0:e}, its estimate across the power of two: every norm's split is split_f16's");
}

/// The residual adds that sum the routed MoE's pairs themselves (`MlpOut::Pairs`) give exactly
/// the bits of combining the pairs first (in ascending pair order from 0, as the MoE's combine
/// does) and then adding: residual, y and the F16 split (the last layer's add with the final
/// norm: y's BF16 split, as split_bf16 gives it), for top-1 to top-32, rows of 1 to 8 tokens,
/// pair lists in any order, rows whose width is not a multiple of 4 (element by element).
#[test]
fn norms_summing_moe_pairs_equal_combine_then_norm() {
    let Some(m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    for (rows, d, topk) in [(1usize, 4096usize, 8usize), (2, 4096, 8), (8, 4096, 8), (2, 6144, 8), (1, 16384, 4), (3, 256, 1), (5, 192, 3), (4, 512, 32), (2, 258, 5), (1, 1030, 11)] {
        let pairs = rows * topk;
        let out = randn(&mut r, pairs * d, 2.0);
        // Each row's pairs, distinct and shuffled (the grouping lists them by expert slot).
        let mut ids: Vec<i32> = (0..pairs as i32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, r.random_range(0..=i));
        }
        let x = randn(&mut r, rows * d, 3.0);
        let w = randn(&mut r, d, 1.0);
        let mut combined = vec![0f32; rows * d];
        for t in 0..rows {
            let mut tp = ids[t * topk..(t + 1) * topk].to_vec();
            tp.sort();
            for n in 0..d {
                let mut acc = 0f32;
                for &p in &tp {
                    acc += out[p as usize * d + n];
                }
                combined[t * d + n] = acc;
            }
        }
        let pairs = MoePairs { out: st.clone_htod(&out).unwrap(), tok_pairs: st.clone_htod(&ids).unwrap(), topk, pre: None };
        let (wd, cd) = (st.clone_htod(&w).unwrap(), st.clone_htod(&combined).unwrap());
        let name = format!("{rows}x{d} top-{topk}");
        // Residual add only (the last layer's).
        let mut xd = st.clone_htod(&x).unwrap();
        m.add_pairs_inplace(&mut xd, &pairs, rows, d).unwrap();
        let sum: Vec<f32> = x.iter().zip(&combined).map(|(p, q)| p + q).collect();
        assert_eq!(st.clone_dtoh(&xd).unwrap(), sum, "add_pairs_inplace {name}");
        // The norm.
        let mut xw = st.clone_htod(&x).unwrap();
        let want = st.clone_dtoh(&m.add_rms_norm(&mut xw, &cd, &wd, rows, d).unwrap()).unwrap();
        let mut xd = st.clone_htod(&x).unwrap();
        let (y, sp) = m.add_rms_norm_pairs(&mut xd, &pairs, &wd, rows, d, false).unwrap();
        assert!(sp.is_none());
        assert_eq!(st.clone_dtoh(&xd).unwrap(), sum, "add_rms_norm_pairs {name}: residual");
        assert_eq!(st.clone_dtoh(&y).unwrap(), want, "add_rms_norm_pairs {name}: y");
        assert!(want.iter().all(|v| v.is_finite()), "add_rms_norm {name}: non-finite");
        // The norm writing the F16 split.
        if d.is_multiple_of(4) && d <= 4 * 4 * 1024 {
            let mut xw = st.clone_htod(&x).unwrap();
            let (wy, (wh, wl, winv)) = m.add_rms_norm_split(&mut xw, &cd, &wd, rows, d).unwrap();
            let mut xd = st.clone_htod(&x).unwrap();
            let (y, sp) = m.add_rms_norm_pairs(&mut xd, &pairs, &wd, rows, d, true).unwrap();
            let (yh, yl, yinv) = sp.expect("split");
            assert_eq!(st.clone_dtoh(&xd).unwrap(), sum, "add_rms_norm_split_pairs {name}: residual");
            assert_eq!(st.clone_dtoh(&y).unwrap(), st.clone_dtoh(&wy).unwrap(), "add_rms_norm_split_pairs {name}: y");
            assert_eq!(st.clone_dtoh(&yh).unwrap(), st.clone_dtoh(&wh).unwrap(), "add_rms_norm_split_pairs {name}: hi parts");
            assert_eq!(st.clone_dtoh(&yl).unwrap(), st.clone_dtoh(&wl).unwrap(), "add_rms_norm_split_pairs {name}: lo parts");
            assert_eq!(st.clone_dtoh(&yinv).unwrap(), st.clone_dtoh(&winv).unwrap(), "add_rms_norm_split_pairs {name}: inverse scales");
        }
        // The last layer's add with the final norm split for a BF16 lm_head: the bits of
        // add_pairs_inplace, rms_norm and split_bf16 (the one-row path and the general one).
        let bf16_as_three = |pairs: &MoePairs, what: &str| {
            let mut xw = st.clone_htod(&x).unwrap();
            m.add_pairs_inplace(&mut xw, pairs, rows, d).unwrap();
            let wy = m.rms_norm(&xw, &wd, rows, d).unwrap();
            let (wh, wl, _) = m.kernels.split_bf16(&wy, rows * d).unwrap();
            let mut xd = st.clone_htod(&x).unwrap();
            let (y, (yh, yl)) = m.add_rms_norm_pairs_bf16(&mut xd, pairs, &wd, rows, d).unwrap();
            assert_eq!(st.clone_dtoh(&xd).unwrap(), st.clone_dtoh(&xw).unwrap(), "add_rms_norm_pairs_bf16 {name}{what}: residual");
            assert_eq!(st.clone_dtoh(&y).unwrap(), st.clone_dtoh(&wy).unwrap(), "add_rms_norm_pairs_bf16 {name}{what}: y");
            assert_eq!(st.clone_dtoh(&yh).unwrap(), st.clone_dtoh(&wh).unwrap(), "add_rms_norm_pairs_bf16 {name}{what}: hi parts");
            assert_eq!(st.clone_dtoh(&yl).unwrap(), st.clone_dtoh(&wl).unwrap(), "add_rms_norm_pairs_bf16 {name}{what}: lo parts");
        };
        bf16_as_three(&pairs, "");
        // With the attention output left by the router (`pre`): (x + pre) + pairs, the bits of
        // adding pre to x first.
        let pre = randn(&mut r, rows * d, 2.0);
        let x_pre: Vec<f32> = x.iter().zip(&pre).map(|(p, q)| p + q).collect();
        let sum_pre: Vec<f32> = x_pre.iter().zip(&combined).map(|(p, q)| p + q).collect();
        let pairs = MoePairs { pre: Some(st.clone_htod(&pre).unwrap()), ..pairs };
        let mut xd = st.clone_htod(&x).unwrap();
        m.add_pairs_inplace(&mut xd, &pairs, rows, d).unwrap();
        assert_eq!(st.clone_dtoh(&xd).unwrap(), sum_pre, "add_pairs_inplace {name}, pre");
        bf16_as_three(&pairs, ", pre");
        let mut xw = st.clone_htod(&x_pre).unwrap();
        let want = st.clone_dtoh(&m.add_rms_norm(&mut xw, &cd, &wd, rows, d).unwrap()).unwrap();
        for split in [false, true] {
            if split && !(d.is_multiple_of(4) && d <= 4 * 4 * 1024) {
                continue;
            }
            let mut xd = st.clone_htod(&x).unwrap();
            let (y, _) = m.add_rms_norm_pairs(&mut xd, &pairs, &wd, rows, d, split).unwrap();
            assert_eq!(st.clone_dtoh(&xd).unwrap(), sum_pre, "add_rms_norm_pairs {name}, pre, split {split}: residual");
            assert_eq!(st.clone_dtoh(&y).unwrap(), want, "add_rms_norm_pairs {name}, pre, split {split}: y");
        }
        eprintln!("{name}: pair-summing residual adds identical to combine then add");
    }
    // Bad bounds are an error, not a fault.
    let small = |topk| MoePairs { out: st.clone_htod(&[0f32; 8]).unwrap(), tok_pairs: st.clone_htod(&[0i32; 2]).unwrap(), topk, pre: None };
    let mut xd = st.clone_htod(&[0f32; 4]).unwrap();
    assert!(m.add_pairs_inplace(&mut xd, &small(33), 1, 4).is_err());
    assert!(m.add_pairs_inplace(&mut xd, &small(2), 2, 4).is_err());
    let short_pre = MoePairs { pre: Some(st.clone_htod(&[0f32; 3]).unwrap()), ..small(1) };
    assert!(m.add_pairs_inplace(&mut xd, &short_pre, 1, 4).is_err());
    let wd = st.clone_htod(&[1f32; 4]).unwrap();
    assert!(m.add_rms_norm_pairs_bf16(&mut xd, &small(33), &wd, 1, 4).is_err());
    assert!(m.add_rms_norm_pairs_bf16(&mut xd, &short_pre, &wd, 1, 4).is_err());
    assert!(m.add_rms_norm_pairs_bf16(&mut xd, &small(1), &wd, 2, 4).is_err(), "x holds one row");
}

/// A K/V pool of type `dtype` holding `values` (rounded to it).
fn pool(m: &CudaModel, dtype: KvDtype, values: &[f32]) -> KvPool {
    KvPool::upload(&m.stream, dtype, values).unwrap()
}

/// `values` as a pool of type `dtype` holds them: the reference's inputs for that pool.
fn as_held(dtype: KvDtype, values: Vec<f32>) -> Vec<f32> {
    values.into_iter().map(|v| dtype.round(v)).collect()
}

/// Also for BF16 and FP8 pools: the same rotation, each value stored as the f32 build stores it,
/// rounded to nearest even (bit for bit), and NaN poison overwritten in every written slot.
#[test]
fn rope_with_kv_write_matches_the_cpu_reference() {
    let Some(mut m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    // MiMo-V2-Flash's full layer (partial rotary 64 of 192, K 192 != V 128), a full-rotary head
    // and an odd rotary dim.
    for s in [attn_spec(64, 4, 192, 128, 64, None, false), attn_spec(8, 2, 64, 64, 64, None, false), attn_spec(4, 1, 48, 32, 15, None, false)] {
        let n = 7;
        let slots_total = 64;
        let q = randn(&mut r, n * s.q_dim(), 2.0);
        let k = randn(&mut r, n * s.k_dim(), 2.0);
        let v = randn(&mut r, n * s.v_dim(), 2.0);
        // Positions below 512: one ulp of a RoPE frequency moves the angle by ~pos * 6e-8.
        let pos: Vec<i32> = (0..n).map(|_| r.random_range(0..512)).collect();
        let slots: Vec<i64> = (0..n as i64).map(|i| i * 9 % slots_total).collect();
        let (pd, sd) = (st.clone_htod(&pos).unwrap(), st.clone_htod(&slots).unwrap());
        // Each pool type's q and its pools' contents (widened to f32).
        let mut runs = Vec::new();
        for dtype in [KvDtype::F32, KvDtype::Bf16, KvDtype::Fp8E4m3] {
            m.use_kv_dtype(dtype).unwrap();
            let mut qd = st.clone_htod(&q).unwrap();
            let nan = |dim: usize| pool(&m, dtype, &vec![f32::NAN; slots_total as usize * dim]);
            let (kc, vc) = (nan(s.k_dim()), nan(s.v_dim()));
            m.rope_kv_write(&mut qd, &st.clone_htod(&k).unwrap(), &st.clone_htod(&v).unwrap(), &kc, &vc, &pd, &sd, n, &s).unwrap();
            runs.push((st.clone_dtoh(&qd).unwrap(), kc.download(&st).unwrap(), vc.download(&st).unwrap()));
        }
        m.use_kv_dtype(KvDtype::F32).unwrap();
        let inv = ops::rope_inv_freq(s.rope.theta, s.rope.rotary_dim);
        let (mut qw, mut kw) = (q.clone(), k.clone());
        for row in 0..n {
            for h in 0..s.num_heads {
                ops::apply_rope(&mut qw[(row * s.num_heads + h) * s.head_dim..][..s.head_dim], pos[row] as usize, &inv);
            }
            for h in 0..s.num_kv_heads {
                ops::apply_rope(&mut kw[(row * s.num_kv_heads + h) * s.head_dim..][..s.head_dim], pos[row] as usize, &inv);
            }
        }
        let name = format!("rope_kv_write h{} kv{} d{} rot{}", s.num_heads, s.num_kv_heads, s.head_dim, s.rope.rotary_dim);
        let (kd, vd) = (s.k_dim(), s.v_dim());
        let written = |cache: &[f32], dim: usize| -> Vec<f32> { slots.iter().flat_map(|&sl| cache[sl as usize * dim..][..dim].to_vec()).collect() };
        let (q32, k32, v32) = &runs[0];
        close(&format!("{name} q"), q32, &qw, 1e-4);
        let (got_k, got_v) = (written(k32, kd), written(v32, vd));
        close(&format!("{name} k in the cache"), &got_k, &kw, 1e-4);
        close(&format!("{name} v in the cache"), &got_v, &v.iter().map(|x| x * s.value_scale).collect::<Vec<_>>(), 1e-7);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for (dtype, (qn, kn, vn)) in [KvDtype::Bf16, KvDtype::Fp8E4m3].into_iter().zip(&runs[1..]) {
            assert!(qn == q32, "{name}: q differs between the f32 and {dtype} pools' builds");
            assert_eq!(bits(&written(kn, kd)), bits(&as_held(dtype, got_k.clone())), "{name}: {dtype} K pool is the f32 build's K rounded");
            assert_eq!(bits(&written(vn, vd)), bits(&as_held(dtype, got_v.clone())), "{name}: {dtype} V pool is the f32 build's V rounded");
        }
    }
}

/// FP8 pools round as the CPU reference does (`KvDtype::round`) where rounding is hardest: every
/// value halfway between two e4m3 neighbours (ties to the even code), values either side of
/// each, saturation past 448 (infinities too) and values below the smallest subnormal. The
/// values go in as V with a value scale of 1, which `rope_kv_write` stores unchanged but rounded.
#[test]
fn fp8_pools_round_as_the_cpu_reference_at_ties_and_limits() {
    let Some(mut m) = model() else { return };
    let st = m.stream.clone();
    let mut s = attn_spec(4, 1, 64, 64, 64, None, false);
    s.value_scale = 1.0;
    let e4m3 = |c: u8| peregrine_model::formats::fp8_e4m3_to_f32(c);
    let mut values: Vec<f32> = Vec::new();
    for c in 0..0x7eu8 {
        let (lo, hi) = (e4m3(c), e4m3(c + 1));
        let (mid, step) = ((lo + hi) / 2.0, (hi - lo) / 8.0);
        values.extend([mid, mid - step, mid + step, -mid, -(mid + step)]);
    }
    values.extend([448.0, 449.0, 464.0, 500.0, 1e30, f32::INFINITY, -f32::INFINITY, -1e9, 2f32.powi(-11), -2f32.powi(-11), 2f32.powi(-10), 0.0, -0.0]);
    let n = values.len().div_ceil(s.v_dim());
    values.resize(n * s.v_dim(), 0.25);
    m.use_kv_dtype(KvDtype::Fp8E4m3).unwrap();
    let slots: Vec<i64> = (0..n as i64).collect();
    let mut qd = st.clone_htod(&vec![0f32; n * s.q_dim()]).unwrap();
    let k = st.clone_htod(&vec![0f32; n * s.k_dim()]).unwrap();
    let (kc, vc) = (pool(&m, KvDtype::Fp8E4m3, &vec![f32::NAN; n * s.k_dim()]), pool(&m, KvDtype::Fp8E4m3, &vec![f32::NAN; n * s.v_dim()]));
    m.rope_kv_write(&mut qd, &k, &st.clone_htod(&values).unwrap(), &kc, &vc, &st.clone_htod(&vec![0i32; n]).unwrap(), &st.clone_htod(&slots).unwrap(), n, &s).unwrap();
    let got = vc.download(&st).unwrap();
    for (i, (&x, &g)) in values.iter().zip(&got).enumerate() {
        assert_eq!(g.to_bits(), KvDtype::Fp8E4m3.round(x).to_bits(), "value {i}: {x:e} held as {g:e}");
    }
    assert!(kc.download(&st).unwrap().iter().all(|&v| v == 0.0), "zero K rows held as zeros");
    m.use_kv_dtype(KvDtype::F32).unwrap();
}

/// Block ids 0..n in a random order (sequence si's table is entries si * max_blocks..).
fn shuffled_blocks(r: &mut impl Rng, n: usize) -> Vec<i32> {
    let mut ids: Vec<i32> = (0..n as i32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, r.random_range(0..=i));
    }
    ids
}

/// Reference paged attention in f64: row r attends positions lo..=pos of its sequence (lo from
/// the window), plus a sink logit per head, softmax, weighted V.
#[allow(clippy::too_many_arguments)]
fn attention_reference(s: &AttentionSpec, q: &[f32], kc: &[f32], vc: &[f32], pos: &[i32], seq: &[i32], tables: &[i32], max_blocks: usize, bs: usize, sinks: Option<&[f32]>) -> Vec<f32> {
    let (hd, vd, kvh) = (s.head_dim, s.v_head_dim, s.num_kv_heads);
    let group = s.num_heads / kvh;
    let mut out = vec![0f32; pos.len() * s.o_dim()];
    for (row, &p) in pos.iter().enumerate() {
        let p = p as usize;
        let lo = s.window().map_or(0, |w| (p + 1).saturating_sub(w));
        for h in 0..s.num_heads {
            let g = h / group;
            let qv = &q[(row * s.num_heads + h) * hd..][..hd];
            let slot = |j: usize| tables[seq[row] as usize * max_blocks + j / bs] as usize * bs + j % bs;
            let scores: Vec<f64> = (lo..=p)
                .map(|j| qv.iter().zip(&kc[(slot(j) * kvh + g) * hd..][..hd]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * s.softmax_scale as f64)
                .collect();
            let mut mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if let Some(sk) = sinks {
                mx = mx.max(sk[h] as f64);
            }
            let mut z: f64 = scores.iter().map(|x| (x - mx).exp()).sum();
            if let Some(sk) = sinks {
                z += (sk[h] as f64 - mx).exp();
            }
            let o = &mut out[(row * s.num_heads + h) * vd..][..vd];
            for (jj, j) in (lo..=p).enumerate() {
                let w = (scores[jj] - mx).exp() / z;
                for (oi, vv) in o.iter_mut().zip(&vc[(slot(j) * kvh + g) * vd..][..vd]) {
                    *oi += (w * *vv as f64) as f32;
                }
            }
        }
    }
    out
}

/// `oh`, `ol` are exactly o's BF16 hi + lo parts (hi = bf16(v), lo = bf16(v - hi)), as the
/// attention kernels write them for the o_proj GEMV.
fn assert_bf16_split(name: &str, o: &[f32], oh: &[u16], ol: &[u16]) {
    let bf16 = |v: f32| half::bf16::from_f32(v).to_bits();
    for (i, &v) in o.iter().enumerate() {
        let hi = bf16(v);
        let lo = bf16(v - half::bf16::from_bits(hi).to_f32());
        assert_eq!((oh[i], ol[i]), (hi, lo), "{name}: BF16 split of element {i} ({v})");
    }
}

#[test]
fn attention_matches_the_cpu_reference() {
    let Some(mut m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    let bs = 16;
    // MiMo-V2-Flash's full layer (GQA 16:1, K 192, V 128) and sliding layer (window 128, sinks,
    // 8 KV heads), a tiny layer, one past v2's K limit (the one-warp kernel), a wide window
    // with sinks, and two heads per KV head. Tables of 160 blocks (2560 positions) make v2 split
    // the long ranges over several blocks per head (and leave some splits empty at short
    // positions).
    let cases = [
        attn_spec(64, 4, 192, 128, 64, None, false),
        attn_spec(64, 8, 192, 128, 64, Some(128), true),
        attn_spec(4, 1, 64, 48, 64, Some(5), true),
        attn_spec(4, 2, 320, 64, 64, None, false),
        attn_spec(8, 2, 128, 128, 64, Some(2000), true),
        // Two heads per KV head: a block of attention_v2_heads stages four KV heads' rows.
        attn_spec(12, 6, 48, 32, 32, Some(40), true),
    ];
    // Over f32, BF16 and FP8 pools (the reference reads the values the pool holds).
    let each = [KvDtype::F32, KvDtype::Bf16, KvDtype::Fp8E4m3].into_iter().flat_map(|dt| cases.iter().flat_map(move |&s| [(dt, s, 24usize), (dt, s, 160)]));
    for (dtype, s, max_blocks) in each {
        m.use_kv_dtype(dtype).unwrap();
        let seqs = 3usize;
        let blocks = seqs * max_blocks;
        let kc = as_held(dtype, randn(&mut r, blocks * bs * s.k_dim(), 1.0));
        let vc = as_held(dtype, randn(&mut r, blocks * bs * s.v_dim(), 1.0));
        // Each sequence's table is a shuffled set of blocks.
        let tables = shuffled_blocks(&mut r, blocks);
        // Rows: several positions per sequence, including short (pos 0) and long contexts.
        let mut pos = Vec::new();
        let mut seq = Vec::new();
        for si in 0..seqs {
            for &p in &[0usize, 3, 130, 200, max_blocks * bs - 1] {
                pos.push(p as i32);
                seq.push(si as i32);
            }
        }
        let n = pos.len();
        let q = randn(&mut r, n * s.q_dim(), 1.0);
        let sinks: Option<Vec<f32>> = s.sinks.then(|| randn(&mut r, s.num_heads, 2.0));
        let want = attention_reference(&s, &q, &kc, &vc, &pos, &seq, &tables, max_blocks, bs, sinks.as_deref());
        let (qd, kd, vd) = (st.clone_htod(&q).unwrap(), pool(&m, dtype, &kc), pool(&m, dtype, &vc));
        let (pd, sd, td) = (st.clone_htod(&pos).unwrap(), st.clone_htod(&seq).unwrap(), st.clone_htod(&tables).unwrap());
        let sk = sinks.as_ref().map(|v| st.clone_htod(v).unwrap());
        // attention_v2 (a block per head), attention_v2_heads (a warp per head), the heads of a
        // KV head on the tensor cores (attention_gqa_tc, in blocks of 8 and 4 warps), the
        // one-warp kernel.
        let tc_forms = crate::backend::GQA_TC_WARPS.map(|w| (true, false, Some(w)));
        for (v2, per_head_warps, tc_warps) in [(true, false, None), (true, true, None)].into_iter().chain(tc_forms).chain([(false, false, None)]) {
            if v2 && s.head_dim > 256 {
                continue;
            }
            let tc = tc_warps.is_some();
            m.attn_heads_min_rows = if per_head_warps { 1 } else { usize::MAX };
            (m.attn_tc_min_rows, m.attn_tc_min_span) = if tc { (1, 0) } else { (usize::MAX, usize::MAX) };
            m.attn_tc_warps = tc_warps;
            let (o, split) = m.attend(&qd, &kd, &vd, &pd, &sd, &td, max_blocks, bs, n, &s, sk.as_ref(), v2, v2, None, None).unwrap();
            let takes_tc = m.gqa_tc_for(&s, max_blocks, bs, n).is_some_and(|f| Some(f.warps) == tc_warps);
            assert_eq!(takes_tc, tc && crate::backend::PREFILL_TC_SHAPES.contains(&(s.head_dim, s.v_head_dim)) && s.num_heads / s.num_kv_heads <= 16);
            let kernel = match (v2, per_head_warps, tc) {
                (true, true, _) if crate::backend::attention_heads_smem(&s, dtype).is_some() => "_v2_heads",
                (true, true, _) => "_v2 (no attention_v2_heads for these shapes)",
                (true, _, true) if takes_tc => &format!("_gqa_tc ({} warps)", tc_warps.unwrap_or(0)),
                (true, _, true) => "_v2 (no attention_gqa_tc for these shapes)",
                (true, false, false) => "_v2",
                _ => "",
            };
            let name = format!("attention{kernel} h{} kv{} d{}/{} window {:?} sinks {}, {} positions, {dtype} pools", s.num_heads, s.num_kv_heads, s.head_dim, s.v_head_dim, s.window(), s.sinks, max_blocks * bs);
            let o = st.clone_dtoh(&o).unwrap();
            if v2 {
                // Long ranges are split; their last split merges them inside the kernel. The
                // separate merge launch (attention_combine) gives the same bits, and the
                // arrival counters are zero again.
                let split_hl = |sp: &Option<Bf16Split>| sp.as_ref().map(|(h, l)| (st.clone_dtoh(h).unwrap(), st.clone_dtoh(l).unwrap()));
                m.merge_in_attention = false;
                let (o_sep, split_sep) = m.attend(&qd, &kd, &vd, &pd, &sd, &td, max_blocks, bs, n, &s, sk.as_ref(), v2, v2, None, None).unwrap();
                m.merge_in_attention = true;
                let o_sep = st.clone_dtoh(&o_sep).unwrap();
                assert!(o == o_sep, "{name}: merged in the kernel and by attention_combine differ at {:?}", o.iter().zip(&o_sep).position(|(a, b)| a != b));
                assert!(split_hl(&split) == split_hl(&split_sep), "{name}: BF16 splits differ between the two merges");
                assert!(st.clone_dtoh(&m.attn_counters).unwrap().iter().all(|&c| c == 0), "{name}: attention arrival counters left non-zero");
                if takes_tc {
                    // The tensor-core kernel's merge shared by its last blocks (where the wave
                    // has room: 2 or 4 sharers here, or 1 for 8 KV heads) and by its last
                    // block alone give the same bits.
                    let default_sharers = m.attn_merge_sharers;
                    m.attn_merge_sharers = 1;
                    let (o_one, _) = m.attend(&qd, &kd, &vd, &pd, &sd, &td, max_blocks, bs, n, &s, sk.as_ref(), v2, v2, None, None).unwrap();
                    m.attn_merge_sharers = default_sharers;
                    assert!(o == st.clone_dtoh(&o_one).unwrap(), "{name}: the shared merge and the last block's differ");
                    assert!(st.clone_dtoh(&m.attn_counters).unwrap().iter().all(|&c| c == 0), "{name}: counters left non-zero by the last block's merge");
                }
            }
            close(&name, &o, &want, 2e-5);
            eprintln!("{name}: output bits fingerprint {:016x}", bits_fingerprint(&o));
            // v2 also writes o's BF16 hi + lo parts for the o_proj GEMV: exactly the split of o.
            assert_eq!(split.is_some(), v2, "{name}: BF16 split written only when asked (v2)");
            if let Some(sp) = &split {
                assert_bf16_split(&name, &o, &st.clone_dtoh(&sp.0).unwrap(), &st.clone_dtoh(&sp.1).unwrap());
            }
        }
    }
    m.use_kv_dtype(KvDtype::F32).unwrap();
}

/// A decode step's attention with RoPE and the K/V write inside the kernel (`FreshKv`) gives
/// the same bits as `rope_kv_write` followed by the kernel: o, its BF16 split and both pools,
/// over one row per sequence at short and long positions (long ones split over several blocks),
/// over f32, BF16 and FP8 pools (the fused kernel scores its row's new K/V as the pool holds them).
#[test]
fn attention_writing_the_new_kv_matches_rope_kv_write_then_attention() {
    let Some(mut m) = model() else { return };
    // attention_v2 after rope_kv_write, as the fused kernel computes it (not attention_gqa_tc,
    // which the long tables would otherwise take).
    (m.attn_tc_min_rows, m.attn_tc_min_span) = (usize::MAX, usize::MAX);
    let mut r = rng();
    let st = m.stream.clone();
    let bs = 16;
    let cases = [
        attn_spec(64, 4, 192, 128, 64, None, false),
        attn_spec(64, 8, 192, 128, 64, Some(128), true),
        attn_spec(4, 1, 64, 48, 15, Some(5), true),
        attn_spec(8, 2, 128, 128, 128, Some(2000), true),
    ];
    let each = [KvDtype::F32, KvDtype::Bf16, KvDtype::Fp8E4m3].into_iter().flat_map(|dt| cases.iter().flat_map(move |&s| [(dt, s, 24usize), (dt, s, 160)]));
    for (dtype, s, max_blocks) in each {
        m.use_kv_dtype(dtype).unwrap();
        // One row per sequence (a decode step), at positions 0, 3, 130, 200 and the last.
        let pos: Vec<i32> = [0usize, 3, 130, 200, max_blocks * bs - 1].iter().map(|&p| p as i32).collect();
        let n = pos.len();
        let blocks = n * max_blocks;
        let ids = shuffled_blocks(&mut r, blocks);
        let seq: Vec<i32> = (0..n as i32).collect();
        let slots: Vec<i64> = (0..n).map(|row| {
            let p = pos[row] as usize;
            ids[row * max_blocks + p / bs] as i64 * bs as i64 + (p % bs) as i64
        }).collect();
        let (kc, vc) = (randn(&mut r, blocks * bs * s.k_dim(), 1.0), randn(&mut r, blocks * bs * s.v_dim(), 1.0));
        let (q, k, v) = (randn(&mut r, n * s.q_dim(), 1.0), randn(&mut r, n * s.k_dim(), 1.0), randn(&mut r, n * s.v_dim(), 1.0));
        let sinks: Option<Vec<f32>> = s.sinks.then(|| randn(&mut r, s.num_heads, 2.0));
        let (pd, sd, td, sl) = (st.clone_htod(&pos).unwrap(), st.clone_htod(&seq).unwrap(), st.clone_htod(&ids).unwrap(), st.clone_htod(&slots).unwrap());
        let (kd, vd) = (st.clone_htod(&k).unwrap(), st.clone_htod(&v).unwrap());
        let sk = sinks.as_ref().map(|v| st.clone_htod(v).unwrap());
        let name = format!("attention_v2 with the K/V write, h{} kv{} d{}/{} rot{} window {:?}, {} positions, {dtype} pools", s.num_heads, s.num_kv_heads, s.head_dim, s.v_head_dim, s.rope.rotary_dim, s.window(), max_blocks * bs);
        let kc = as_held(dtype, kc);
        // Two launches: RoPE + pool write, then attention over the pools.
        let (kc1, vc1) = (pool(&m, dtype, &kc), pool(&m, dtype, &vc));
        let mut q1 = st.clone_htod(&q).unwrap();
        m.rope_kv_write(&mut q1, &kd, &vd, &kc1, &vc1, &pd, &sl, n, &s).unwrap();
        let (o1, split1) = m.attend(&q1, &kc1, &vc1, &pd, &sd, &td, max_blocks, bs, n, &s, sk.as_ref(), true, true, None, None).unwrap();
        // One launch: unrotated q, the new K/V handed to the kernel.
        let (kc2, vc2) = (pool(&m, dtype, &kc), pool(&m, dtype, &vc));
        let q2 = st.clone_htod(&q).unwrap();
        let fresh = FreshKv { k: &kd, v: &vd, slots: &sl, ready: None };
        let (o2, split2) = m.attend(&q2, &kc2, &vc2, &pd, &sd, &td, max_blocks, bs, n, &s, sk.as_ref(), true, true, Some(fresh), None).unwrap();
        let (o1, o2) = (st.clone_dtoh(&o1).unwrap(), st.clone_dtoh(&o2).unwrap());
        assert!(o2.iter().all(|x| x.is_finite()), "{name}: non-finite output");
        assert!(o1 == o2, "{name}: o differs at {:?}", o1.iter().zip(&o2).position(|(a, b)| a != b));
        let ((h1, l1), (h2, l2)) = (split1.unwrap(), split2.unwrap());
        assert_eq!(st.clone_dtoh(&h1).unwrap(), st.clone_dtoh(&h2).unwrap(), "{name}: BF16 hi parts");
        assert_eq!(st.clone_dtoh(&l1).unwrap(), st.clone_dtoh(&l2).unwrap(), "{name}: BF16 lo parts");
        let (k1, k2) = (kc1.download(&st).unwrap(), kc2.download(&st).unwrap());
        assert!(k1 == k2, "{name}: K pools differ at {:?}", k1.iter().zip(&k2).position(|(a, b)| a != b));
        assert_ne!(k1, kc, "{name}: the new K reached the pool");
        assert_eq!(vc1.download(&st).unwrap(), vc2.download(&st).unwrap(), "{name}: V pools");
        assert!(st.clone_dtoh(&m.attn_counters).unwrap().iter().all(|&c| c == 0), "{name}: attention arrival counters left non-zero");
        eprintln!("{name}: identical");
    }
    m.use_kv_dtype(KvDtype::F32).unwrap();
}

/// A batch with prompt chunks: its runs of one sequence's rows go through `attention_prefill`
/// in tiles of up to 64 rows (a full tile and a partial one, windows that drop early keys for
/// the tile's later rows, sinks, GQA), the other rows (a decode row, a run too short for a
/// tile) through `attention_v2_rows`, split over several blocks on long tables. Every row
/// matches the f64 reference, and o's BF16 split is exactly the split of o, for the f32 kernel
/// and the tensor-core kernel (shapes it is compiled for), over f32, BF16 and FP8 pools.
#[test]
fn prefill_attention_matches_the_cpu_reference() {
    let Some(mut m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    let bs = 16;
    let cases = [
        attn_spec(64, 4, 192, 128, 64, None, false),
        attn_spec(64, 8, 192, 128, 64, Some(128), true),
        attn_spec(4, 1, 64, 48, 64, Some(5), true),
        attn_spec(8, 2, 128, 128, 128, Some(40), true),
        attn_spec(8, 4, 64, 64, 32, Some(50), false),
    ];
    let each = [KvDtype::F32, KvDtype::Bf16, KvDtype::Fp8E4m3].into_iter().flat_map(|dt| cases.iter().flat_map(move |&s| [(dt, s, 24usize), (dt, s, 160)]));
    for (dtype, s, max_blocks) in each {
        m.use_kv_dtype(dtype).unwrap();
        let seqs = 4usize;
        let blocks = seqs * max_blocks;
        let kc = as_held(dtype, randn(&mut r, blocks * bs * s.k_dim(), 1.0));
        let vc = as_held(dtype, randn(&mut r, blocks * bs * s.v_dim(), 1.0));
        let tables = shuffled_blocks(&mut r, blocks);
        // Sequence 0: a decode row late in its table; 1: a 100-row chunk from position 0;
        // 2: a 70-row chunk from position 150; 3: a run of 5 rows (too short for a tile).
        let runs = [(0usize, max_blocks * bs - 1, 1usize), (1, 0, 100), (2, 150, 70), (3, 40, 5)];
        let (mut pos, mut seq) = (Vec::new(), Vec::new());
        for &(si, p0, len) in &runs {
            for p in p0..p0 + len {
                pos.push(p as i32);
                seq.push(si as i32);
            }
        }
        let n = pos.len();
        let (tiles, rest) = crate::backend::prefill_tiles(&seq, &pos).expect("the chunks make tiles");
        assert_eq!(tiles, vec![1, 64, 65, 36, 101, 64, 165, 6], "tiles of the 100- and 70-row runs");
        assert_eq!(rest, vec![0, 171, 172, 173, 174, 175], "the decode row and the 5-row run");
        let q = randn(&mut r, n * s.q_dim(), 1.0);
        let sinks: Option<Vec<f32>> = s.sinks.then(|| randn(&mut r, s.num_heads, 2.0));
        let want = attention_reference(&s, &q, &kc, &vc, &pos, &seq, &tables, max_blocks, bs, sinks.as_deref());
        let (qd, kd, vd) = (st.clone_htod(&q).unwrap(), pool(&m, dtype, &kc), pool(&m, dtype, &vc));
        let (pd, sd, td) = (st.clone_htod(&pos).unwrap(), st.clone_htod(&seq).unwrap(), st.clone_htod(&tables).unwrap());
        let sk = sinks.as_ref().map(|v| st.clone_htod(v).unwrap());
        let pf = crate::backend::PrefillRows { num_tiles: tiles.len() / 2, tiles: st.clone_htod(&tiles).unwrap(), num_rest: rest.len(), rest: st.clone_htod(&rest).unwrap() };
        // The f32 kernel, then the tensor-core kernel where the shape has one.
        let tc = crate::backend::PREFILL_TC_SHAPES.contains(&(s.head_dim, s.v_head_dim));
        for tensor_cores in [false, true].into_iter().filter(|&t| !t || tc) {
            m.ops.attention_prefill.tensor_cores = tensor_cores;
            let (o, split) = m.attend(&qd, &kd, &vd, &pd, &sd, &td, max_blocks, bs, n, &s, sk.as_ref(), true, true, None, Some(&pf)).unwrap();
            let kernel = if tensor_cores { "tensor cores, 3xTF32" } else { "f32" };
            let name = format!("attention_prefill ({kernel}) h{} kv{} d{}/{} window {:?} sinks {}, {} positions, {dtype} pools", s.num_heads, s.num_kv_heads, s.head_dim, s.v_head_dim, s.window(), s.sinks, max_blocks * bs);
            let o = st.clone_dtoh(&o).unwrap();
            close(&name, &o, &want, 2e-5);
            eprintln!("{name}: output bits fingerprint {:016x}", bits_fingerprint(&o));
            let (oh, ol) = split.expect("BF16 split asked for");
            assert_bf16_split(&name, &o, &st.clone_dtoh(&oh).unwrap(), &st.clone_dtoh(&ol).unwrap());
        }
    }
}

/// The drafter's `head_norm_rope` gives the bits of `rms_norm` then `rope` over q's and k's
/// heads of block rows, and for context rows (k's and v's heads in one buffer) the bits of
/// `rms_norm`, `rope` and `kv_write` in the pools (f32, BF16 and FP8, NaN-poisoned); and it
/// matches the CPU reference (per-head RMSNorm in f64, then `ops::apply_rope`).
#[test]
fn head_norm_and_rope_in_one_launch_give_the_bits_of_separate_launches() {
    use cudarc::driver::DevicePtrMut;
    let Some(mut m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    let eps = m.spec.rms_norm_eps;
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    // A drafter's heads, a wider head with V narrower than K, partial and odd rotary dims.
    for s in [attn_spec(4, 2, 64, 64, 64, None, false), attn_spec(8, 2, 128, 96, 64, None, false), attn_spec(4, 1, 48, 48, 15, None, false)] {
        let (n, hd) = (9, s.head_dim);
        let name = format!("head_norm_rope h{} kv{} d{}/{} rot{}", s.num_heads, s.num_kv_heads, hd, s.v_head_dim, s.rope.rotary_dim);
        let (q, k, v) = (randn(&mut r, n * s.q_dim(), 2.0), randn(&mut r, n * s.k_dim(), 2.0), randn(&mut r, n * s.v_dim(), 2.0));
        let (qw, kw) = (randn(&mut r, hd, 1.5), randn(&mut r, hd, 1.5));
        let pos: Vec<i32> = (0..n).map(|_| r.random_range(0..512)).collect();
        let (qwd, kwd, pd) = (st.clone_htod(&qw).unwrap(), st.clone_htod(&kw).unwrap(), st.clone_htod(&pos).unwrap());
        // Block rows: q and k in place.
        let mut q1 = m.rms_norm(&st.clone_htod(&q).unwrap(), &qwd, n * s.num_heads, hd).unwrap();
        let mut k1 = m.rms_norm(&st.clone_htod(&k).unwrap(), &kwd, n * s.num_kv_heads, hd).unwrap();
        m.rope(&mut q1, &pd, n, s.num_heads, &s).unwrap();
        m.rope(&mut k1, &pd, n, s.num_kv_heads, &s).unwrap();
        let (mut q2, mut k2) = (st.clone_htod(&q).unwrap(), st.clone_htod(&k).unwrap());
        {
            let (qp, _gq) = q2.device_ptr_mut(&st);
            let (kp, _gk) = k2.device_ptr_mut(&st);
            m.head_norm_rope(&crate::draft::HeadRows { q: Some((qp, &qwd, s.q_dim())), k: (kp, &kwd, s.k_dim()), v: None }, &pd, n, &s).unwrap();
        }
        let (q1, k1, q2, k2) = (st.clone_dtoh(&q1).unwrap(), st.clone_dtoh(&k1).unwrap(), st.clone_dtoh(&q2).unwrap(), st.clone_dtoh(&k2).unwrap());
        assert!(bits(&q2) == bits(&q1), "{name}: q differs from rms_norm then rope");
        assert!(bits(&k2) == bits(&k1), "{name}: k differs from rms_norm then rope");
        let inv = ops::rope_inv_freq(s.rope.theta, s.rope.rotary_dim);
        let reference = |x: &[f32], w: &[f32], heads: usize| -> Vec<f32> {
            let mut y = rms_norm_f64(x, w, eps);
            for row in 0..n {
                for h in 0..heads {
                    ops::apply_rope(&mut y[(row * heads + h) * hd..][..hd], pos[row] as usize, &inv);
                }
            }
            y
        };
        close(&format!("{name} q"), &q2, &reference(&q, &qw, s.num_heads), 1e-5);
        close(&format!("{name} k"), &k2, &reference(&k, &kw, s.num_kv_heads), 1e-5);
        // Context rows: each row k's heads then v's, into the pools at the rows' slots.
        let (kd, vd) = (s.k_dim(), s.v_dim());
        let kv: Vec<f32> = (0..n).flat_map(|row| k[row * kd..][..kd].iter().chain(&v[row * vd..][..vd]).copied().collect::<Vec<_>>()).collect();
        let slots_total = 32;
        let slots: Vec<i64> = (0..n as i64).map(|i| (i * 7 + 3) % slots_total).collect();
        let sd = st.clone_htod(&slots).unwrap();
        for dtype in [KvDtype::F32, KvDtype::Bf16, KvDtype::Fp8E4m3] {
            m.use_kv_dtype(dtype).unwrap();
            let nan = |dim: usize| pool(&m, dtype, &vec![f32::NAN; slots_total as usize * dim]);
            let (kc1, vc1, kc2, vc2) = (nan(kd), nan(vd), nan(kd), nan(vd));
            let mut k1 = m.rms_norm(&st.clone_htod(&k).unwrap(), &kwd, n * s.num_kv_heads, hd).unwrap();
            m.rope(&mut k1, &pd, n, s.num_kv_heads, &s).unwrap();
            m.kv_write(&k1, &st.clone_htod(&v).unwrap(), &kc1, &vc1, &sd, n, &s).unwrap();
            let mut kvd = st.clone_htod(&kv).unwrap();
            {
                let (p, _g) = kvd.device_ptr_mut(&st);
                let rows = crate::draft::HeadRows { q: None, k: (p, &kwd, kd + vd), v: Some((p + 4 * kd as u64, kd + vd, &kc2, &vc2, &sd)) };
                m.head_norm_rope(&rows, &pd, n, &s).unwrap();
            }
            let (k1, v1, k2, v2) = (kc1.download(&st).unwrap(), vc1.download(&st).unwrap(), kc2.download(&st).unwrap(), vc2.download(&st).unwrap());
            assert!(bits(&k2) == bits(&k1), "{name}, {dtype} pools: K pool differs from rms_norm, rope and kv_write");
            assert!(bits(&v2) == bits(&v1), "{name}, {dtype} pools: V pool differs from kv_write");
            let written = slots.iter().flat_map(|&sl| k2[sl as usize * kd..][..kd].to_vec()).collect::<Vec<_>>();
            assert!(written.iter().all(|x| x.is_finite()), "{name}, {dtype} pools: a written K slot holds NaN");
        }
        m.use_kv_dtype(KvDtype::F32).unwrap();
    }
}

/// Reference DFlash draft attention in f64: block row r (sequence `row_seq[r]`, block index
/// `row_idx[r]`, at position start + index) attends its sequence's context keys from the pools
/// (positions < start) and its block's own rows (`kb`, `vb`), within the window and up to its
/// own position when causal, plus a sink logit per head.
#[allow(clippy::too_many_arguments)]
fn draft_attention_reference(s: &AttentionSpec, causal: bool, q: &[f32], kb: &[f32], vb: &[f32], kc: &[f32], vc: &[f32], rows: &crate::draft::DraftRows, bs: usize, sinks: Option<&[f32]>) -> Vec<f32> {
    let (hd, vd, kvh) = (s.head_dim, s.v_head_dim, s.num_kv_heads);
    let group = s.num_heads / kvh;
    let mut out = vec![0f32; rows.toks.len() * s.o_dim()];
    for r in 0..rows.toks.len() {
        let si = rows.row_seq[r] as usize;
        let (start, first, nb) = (rows.seq_start[si] as usize, rows.seq_first[si] as usize, rows.seq_nb[si] as usize);
        let qpos = start + rows.row_idx[r] as usize;
        let visible = |j: usize| (!causal || j <= qpos) && s.window().is_none_or(|w| j.abs_diff(qpos) < w);
        let keys: Vec<usize> = (0..start + nb).filter(|&j| visible(j)).collect();
        for h in 0..s.num_heads {
            let g = h / group;
            let qv = &q[(r * s.num_heads + h) * hd..][..hd];
            let key = |j: usize| -> (&[f32], &[f32]) {
                if j < start {
                    let slot = rows.tables[si * rows.max_blocks + j / bs] as usize * bs + j % bs;
                    (&kc[(slot * kvh + g) * hd..][..hd], &vc[(slot * kvh + g) * vd..][..vd])
                } else {
                    let br = first + j - start;
                    (&kb[(br * kvh + g) * hd..][..hd], &vb[(br * kvh + g) * vd..][..vd])
                }
            };
            let scores: Vec<f64> = keys.iter().map(|&j| qv.iter().zip(key(j).0).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * s.softmax_scale as f64).collect();
            let mut mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            if let Some(sk) = sinks {
                mx = mx.max(sk[h] as f64);
            }
            let z: f64 = scores.iter().map(|x| (x - mx).exp()).sum::<f64>() + sinks.map_or(0.0, |sk| (sk[h] as f64 - mx).exp());
            let o = &mut out[(r * s.num_heads + h) * vd..][..vd];
            let mut acc = vec![0f64; vd];
            for (&j, sc) in keys.iter().zip(&scores) {
                let w = (sc - mx).exp() / z;
                for (a, v) in acc.iter_mut().zip(key(j).1) {
                    *a += w * *v as f64;
                }
            }
            for (oi, a) in o.iter_mut().zip(acc) {
                *oi = a as f32;
            }
        }
    }
    out
}

/// The DFlash draft attention against the f64 reference: three sequences with 0, 37 and 300
/// positions of context (one past two of the warps' strides) and blocks of 8, 4 and 8 rows;
/// causal or not, full or windowed (the window cutting into the block), with and without sinks,
/// K head dim != V head dim, over f32, BF16 and FP8 pools. `draft_attention` (a block per row)
/// in one warp (the walk over every key), 3 (keys strided unevenly) and 16 (the default), and
/// `draft_attention_rows` (a block per sequence, where the head dims allow it). The same inputs
/// give the same bits on a second run.
#[test]
fn draft_attention_matches_the_cpu_reference() {
    let Some(mut m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    let bs = 16;
    let (starts, nbs) = ([0usize, 37, 300], [8usize, 4, 8]);
    let max_blocks = (300 + 8usize).div_ceil(bs) + 1;
    let mut rows = crate::draft::DraftRows { max_blocks, ..Default::default() };
    for (si, (&start, &nb)) in starts.iter().zip(&nbs).enumerate() {
        rows.seq_start.push(start as i32);
        rows.seq_first.push(rows.toks.len() as i32);
        rows.seq_nb.push(nb as i32);
        for k in 0..nb {
            rows.toks.push(0);
            rows.row_seq.push(si as i32);
            rows.row_idx.push(k as i32);
            rows.pos.push((start + k) as i32);
        }
    }
    let blocks = starts.len() * max_blocks;
    rows.tables = shuffled_blocks(&mut r, blocks);
    let meta = crate::draft::DraftMeta::upload(&st, &rows).unwrap();
    let n = rows.toks.len();
    let cases = [
        (attn_spec(4, 2, 64, 64, 64, None, false), false),
        (attn_spec(4, 2, 64, 64, 64, None, false), true),
        (attn_spec(8, 2, 128, 128, 64, Some(40), true), false),
        (attn_spec(8, 2, 128, 128, 64, Some(3), true), true),
        (attn_spec(4, 1, 192, 128, 64, Some(100), false), false),
        (attn_spec(8, 2, 128, 64, 64, None, true), true),
    ];
    let (default_warps, default_rows, default_min) = (m.draft_attention_warps, m.draft_attention_rows, m.draft_rows_min_blocks);
    m.draft_rows_min_blocks = 0;
    for dtype in [KvDtype::F32, KvDtype::Bf16, KvDtype::Fp8E4m3] {
        m.use_kv_dtype(dtype).unwrap();
        for &(s, causal) in &cases {
            let kc = as_held(dtype, randn(&mut r, blocks * bs * s.k_dim(), 1.0));
            let vc = as_held(dtype, randn(&mut r, blocks * bs * s.v_dim(), 1.0));
            let (q, kb, vb) = (randn(&mut r, n * s.q_dim(), 1.0), randn(&mut r, n * s.k_dim(), 1.0), randn(&mut r, n * s.v_dim(), 1.0));
            let sinks: Option<Vec<f32>> = s.sinks.then(|| randn(&mut r, s.num_heads, 2.0));
            let want = draft_attention_reference(&s, causal, &q, &kb, &vb, &kc, &vc, &rows, bs, sinks.as_deref());
            let (qd, kbd, vbd) = (st.clone_htod(&q).unwrap(), st.clone_htod(&kb).unwrap(), st.clone_htod(&vb).unwrap());
            let (kd, vd) = (pool(&m, dtype, &kc), pool(&m, dtype, &vc));
            let sk = sinks.as_ref().map(|v| st.clone_htod(v).unwrap());
            let row_kernel = crate::draft::draft_rows_take(&s, meta.max_nb);
            for (rows, warps) in [(false, 1usize), (false, 3), (false, 16), (true, 16)] {
                (m.draft_attention_rows, m.draft_attention_warps) = (rows, warps);
                let run = |m: &CudaModel| st.clone_dtoh(&m.draft_attend(&qd, &kbd, &vbd, &kd, &vd, &meta, bs, n, &s, causal, sk.as_ref()).unwrap()).unwrap();
                let o = run(&m);
                let kernel = match (rows, row_kernel) {
                    (true, true) => "draft_attention_rows".to_string(),
                    (true, false) => "draft_attention (no row kernel for these dims)".to_string(),
                    _ => format!("draft_attention, {warps} warps"),
                };
                let name = format!("{kernel}: h{} kv{} d{}/{} window {:?} sinks {} causal {causal}, {dtype} pools", s.num_heads, s.num_kv_heads, s.head_dim, s.v_head_dim, s.window(), s.sinks);
                close(&name, &o, &want, 2e-5);
                assert!(run(&m) == o, "{name}: a second run gave other bits");
            }
        }
    }
    (m.draft_attention_warps, m.draft_attention_rows, m.draft_rows_min_blocks) = (default_warps, default_rows, default_min);
    m.use_kv_dtype(KvDtype::F32).unwrap();
}

/// f32 weights applied to a few rows (`gemv_f32`) and to a prefill chunk (`gemm_f32_nt`, partial
/// tiles in every dimension; K not a multiple of 4 keeps gemv_f32) match the f64 reference.
#[test]
fn f32_matrices_match_the_cpu_reference() {
    let Some(m) = model() else { return };
    let mut r = rng();
    for (n, k, t) in [(256usize, 4096usize, 1usize), (300, 520, 5), (300, 520, crate::backend::GEMM_F32_MIN_ROWS), (256, 4096, 100), (70, 36, 130), (50, 37, 40)] {
        f32_product_checked(&m, &mut r, n, k, t);
    }
}

/// A random f32 [n, k] matrix applied to t random rows (`CudaModel::matvec`), checked against the
/// f64 reference: the matrix, the rows and the product.
fn f32_product_checked(m: &CudaModel, r: &mut rand::rngs::StdRng, n: usize, k: usize, t: usize) -> (crate::backend::Mat, Vec<f32>, Vec<f32>) {
    let st = m.stream.clone();
    let w = randn(r, n * k, 1.0);
    let x = randn(r, t * k, 1.0);
    let mat = crate::backend::Mat { m: crate::backend::GpuMatrix::F32(st.clone_htod(&w).unwrap()), n, k };
    let y = st.clone_dtoh(&m.matvec(&mat, &st.clone_htod(&x).unwrap(), t).unwrap()).unwrap();
    let want: Vec<f32> = (0..t).flat_map(|ti| (0..n).map(|ni| (0..k).map(|i| w[ni * k + i] as f64 * x[ti * k + i] as f64).sum::<f64>() as f32).collect::<Vec<_>>()).collect();
    close(&format!("f32 matrix {n}x{k}, {t} rows"), &y, &want, 1e-5);
    (mat, x, y)
}

/// f32 weights over 2-127 rows (`gemv_f32_tiles`) give gemv_f32's bits for every row, i.e. each
/// row's logits as at one row (a router's choice does not depend on the batch), and match the
/// f64 reference; partial blocks of rows and tokens, K of one warp to 6144 (MiMo-V2.5-Pro's
/// hidden size: 384 threads), K past the tiles' 512 threads (gemv_f32 or gemm_f32_nt then).
#[test]
fn f32_matrices_over_many_rows_give_each_rows_bits_at_one_row() {
    let Some(mut m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    m.f32_tiles = true;  // (whatever PEREGRINE_F32_TILES says)
    for (n, k, t) in [(256usize, 4096usize, 2usize), (256, 4096, 16), (256, 4096, 17), (256, 4096, 64), (256, 4096, 127), (384, 6144, 33), (70, 36, 40), (5, 128, 3), (3, 8196, 20)] {
        let (mat, x, y) = f32_product_checked(&m, &mut r, n, k, t);
        if k <= 8192 {
            for ti in 0..t {
                let one = st.clone_dtoh(&m.matvec(&mat, &st.clone_htod(&x[ti * k..(ti + 1) * k]).unwrap(), 1).unwrap()).unwrap();
                assert!(one.iter().zip(&y[ti * n..(ti + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits()), "f32 matrix {n}x{k}, {t} rows: row {ti} differs from the same row alone");
            }
        }
    }
}

/// The router computing the post-attention norm itself (`gemv_f32_norm`) gives the bits of
/// `add_rms_norm` then `gemv_f32`: the logits and the normed rows, for K from one warp's worth
/// to 4096 (partial warps of norm_cfg's threads included), 1 and 2 rows; the residual is left
/// as it was; routers it does not take are an error.
#[test]
fn router_computing_the_norm_equals_norm_then_router() {
    let Some(m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    for (n, k, t) in [(256usize, 4096usize, 1usize), (256, 4096, 2), (16, 4092, 1), (64, 2048, 1), (8, 520, 2), (5, 192, 1), (7, 64, 1), (3, 4, 1)] {
        let w = randn(&mut r, n * k, 1.0);
        let (x, a, nw) = (randn(&mut r, t * k, 4.0), randn(&mut r, t * k, 2.0), randn(&mut r, k, 1.0));
        let mat = crate::backend::Mat { m: crate::backend::GpuMatrix::F32(st.clone_htod(&w).unwrap()), n, k };
        let (ad, nwd) = (st.clone_htod(&a).unwrap(), st.clone_htod(&nw).unwrap());
        // Reference: the residual add and norm, then the router.
        let mut xr = st.clone_htod(&x).unwrap();
        let xn_want = m.add_rms_norm(&mut xr, &ad, &nwd, t, k).unwrap();
        let want = st.clone_dtoh(&m.matvec(&mat, &xn_want, t).unwrap()).unwrap();
        let xn_want = st.clone_dtoh(&xn_want).unwrap();
        let xd = st.clone_htod(&x).unwrap();
        let (y, xn) = m.router_normed(&mat, &xd, &ad, &nwd, t).unwrap();
        let name = format!("router {n}x{k}, {t} rows");
        assert!(want.iter().all(|v| v.is_finite()), "{name}: non-finite reference");
        assert_eq!(st.clone_dtoh(&y).unwrap(), want, "{name}: logits");
        assert_eq!(st.clone_dtoh(&xn).unwrap(), xn_want, "{name}: normed rows");
        assert_eq!(st.clone_dtoh(&xd).unwrap(), x, "{name}: the residual was written");
    }
    // K past the kernel's register path, K not a multiple of 4, BF16 weights: refused.
    let xd = st.clone_htod(&vec![0f32; 8192]).unwrap();
    for (k, bf16) in [(8192usize, false), (6, false), (64, true)] {
        let mat = if bf16 {
            crate::backend::Mat { m: crate::backend::GpuMatrix::Bf16(st.clone_htod(&vec![0u16; 4 * k]).unwrap()), n: 4, k }
        } else {
            crate::backend::Mat { m: crate::backend::GpuMatrix::F32(st.clone_htod(&vec![0f32; 4 * k]).unwrap()), n: 4, k }
        };
        assert!(m.router_normed(&mat, &xd, &xd, &xd, 1).is_err(), "K {k} (BF16 {bf16}) taken");
    }
}

/// The decode o_proj of 1-8 tokens that also does its MoE's router (`gemv_bf16_presplit_route`)
/// on fresh random inputs: o is the plain kernel's, bit for bit (y poisoned first); g h = g
/// (res + o) exactly, per token; each block's sum of squares per token and each token's
/// fixed-point logit sums (over the copies, `tok` words apart) against f64 sums on the host (the
/// logits within 1e-5 of the sum of their terms' magnitudes); the same sums again when run with
/// another count of copies (integer sums, whatever the blocks' order); a part that overflows the
/// fixed point sets the flag word instead.
#[test]
fn oproj_doing_the_router_matches_the_host() {
    use cudarc::driver::DevicePtr;
    let Some(m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    assert!(m.kernels.oproj_route_takes(4096, 8192, 256), "Flash's o_proj and router shapes");
    for (n, k, e, t) in [(4096usize, 8192usize, 256usize, 1usize), (4096, 8192, 256, 3), (256, 256, 16, 1), (256, 256, 16, 8), (512, 1024, 40, 2)] {
        assert!(m.kernels.oproj_route_takes(n, k, e), "{n}x{k}, {e} experts");
        let (mat, _) = random_tc_matrix(&st, &mut r, n, k, false);
        let crate::backend::GpuMatrix::Bf16(wd) = &mat.m else { unreachable!() };
        let xv = randn(&mut r, t * k, 1.0);
        let xh: Vec<u16> = xv.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        let xl: Vec<u16> = xv.iter().zip(&xh).map(|(&v, &h)| half::bf16::from_f32(v - half::bf16::from_bits(h).to_f32()).to_bits()).collect();
        let (xhd, xld) = (st.clone_htod(&xh).unwrap(), st.clone_htod(&xl).unwrap());
        let (res, g, wr) = (randn(&mut r, t * n, 2.0), randn(&mut r, n, 1.0), randn(&mut r, e * n, 0.05));
        let (resd, gd, wrd) = (st.clone_htod(&res).unwrap(), st.clone_htod(&g).unwrap(), st.clone_htod(&wr).unwrap());
        let mut want_y = st.alloc_zeros::<f32>(t * n).unwrap();
        m.kernels.gemv_bf16_presplit(wd, &xhd, &xld, &mut want_y, n, k, t, None).unwrap();
        let want_y = st.clone_dtoh(&want_y).unwrap();
        let name = format!("o_proj {n}x{k} of {t} tokens with a router of {e}");
        let blocks = n / 16;
        let mut runs = Vec::new();
        for _ in 0..2 {
            let copies = 1 + runs.len() * 4;
            // Token j's sums a few words past the one before's flag.
            let tok = copies * e + 3;
            let acc = st.alloc_zeros::<u64>(t * tok).unwrap();
            let (ssq, hd) = (st.clone_htod(&vec![f32::NAN; t * blocks]).unwrap(), st.clone_htod(&vec![f32::NAN; t * n]).unwrap());
            let mut y = st.clone_htod(&vec![f32::NAN; t * n]).unwrap();
            let rb = crate::kernels::RouteInOproj { res: &resd, norm: &gd, router: &wrd, experts: e, acc: acc.device_ptr(&st).0, copies, ssq: &ssq, hg: &hd, tok };
            m.kernels.gemv_bf16_presplit_route(wd, &xhd, &xld, &mut y, n, k, t, None, &rb).unwrap();
            let (y, hg, ssq, acc) = (st.clone_dtoh(&y).unwrap(), st.clone_dtoh(&hd).unwrap(), st.clone_dtoh(&ssq).unwrap(), st.clone_dtoh(&acc).unwrap());
            assert!(y.iter().zip(&want_y).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: o differs from the plain kernel's");
            let mut sums = Vec::new();
            for j in 0..t {
                let h: Vec<f32> = res[j * n..(j + 1) * n].iter().zip(&y[j * n..(j + 1) * n]).map(|(x, o)| x + o).collect();
                assert!(hg[j * n..(j + 1) * n].iter().zip(h.iter().zip(&g)).all(|(a, (h, g))| a.to_bits() == (g * h).to_bits()), "{name}: token {j}'s hg is not g (res + o)");
                for b in 0..blocks {
                    let (s, want) = (ssq[j * blocks + b], h[16 * b..16 * b + 16].iter().map(|&v| v as f64 * v as f64).sum::<f64>());
                    assert!((s as f64 - want).abs() <= 1e-5 * want.max(1e-6), "{name}: token {j}, block {b}'s sum of squares {s} against {want}");
                }
                let a = &acc[j * tok..(j + 1) * tok];
                assert_eq!(a[copies * e], 0, "{name}: token {j}'s overflow flag is set");
                assert!(a[copies * e + 1..].iter().all(|&v| v == 0), "{name}: token {j}'s sums spilled past its flag");
                for ei in 0..e {
                    let terms = (0..n).map(|i| wr[ei * n + i] as f64 * (g[i] * h[i]) as f64);
                    let (want, mag) = terms.fold((0f64, 0f64), |(s, a), t| (s + t, a + t.abs()));
                    let sum = (0..copies).fold(0u64, |s, c| s.wrapping_add(a[c * e + ei]));
                    let got = sum as i64 as f64 * (-40f64).exp2();
                    assert!((got - want).abs() <= 1e-5 * mag.max(1e-9), "{name}: token {j}, expert {ei}'s logit sum {got} against {want}");
                    sums.push(sum);
                }
            }
            runs.push(sums);
        }
        assert_eq!(runs[0], runs[1], "{name}: the sums differ between runs (1 and 5 copies)");
    }
    // A part past 2^22 sets the flag.
    let (n, k, e) = (256usize, 256usize, 16usize);
    let wd = st.clone_htod(&vec![0u16; n * k]).unwrap();
    let zeros = st.clone_htod(&vec![0u16; k]).unwrap();
    let (resd, gd) = (st.clone_htod(&vec![1e4f32; n]).unwrap(), st.clone_htod(&vec![1f32; n]).unwrap());
    let wrd = st.clone_htod(&vec![1e3f32; e * n]).unwrap();
    let acc = st.alloc_zeros::<u64>(2 * e + 1).unwrap();
    let (ssq, hd) = (st.alloc_zeros::<f32>(n / 16).unwrap(), st.alloc_zeros::<f32>(n).unwrap());
    let mut y = st.alloc_zeros::<f32>(n).unwrap();
    let rb = crate::kernels::RouteInOproj { res: &resd, norm: &gd, router: &wrd, experts: e, acc: acc.device_ptr(&st).0, copies: 2, ssq: &ssq, hg: &hd, tok: 2 * e + 1 };
    m.kernels.gemv_bf16_presplit_route(&wd, &zeros, &zeros, &mut y, n, k, 1, None, &rb).unwrap();
    assert!(m.kernels.gemv_bf16_presplit_route(&wd, &zeros, &zeros, &mut y, n, k, 9, None, &rb).is_err(), "9 tokens taken");
    assert_ne!(st.clone_dtoh(&acc).unwrap()[2 * e], 0, "a part of 1.6e8 left the flag clear");
    assert!(!m.kernels.oproj_route_takes(4096, 8192, 0) && !m.kernels.oproj_route_takes(4100, 8192, 8), "shapes the kernel does not take");
}

/// A random matrix [n, k] on the GPU (FP8 e4m3 with 128 x 128 block scales, or BF16), laid out
/// as the loader lays it out (`tc_tiles` where K % 128 == 0), and its values as f32.
fn random_tc_matrix(st: &std::sync::Arc<cudarc::driver::CudaStream>, r: &mut rand::rngs::StdRng, n: usize, k: usize, fp8: bool) -> (crate::backend::Mat, Vec<f32>) {
    use crate::backend::{GpuMatrix, Mat};
    if fp8 {
        // Every byte but the two NaNs, scaled so rows of K of them stay near 1.
        let w: Vec<u8> = (0..n * k).map(|_| r.random::<u8>()).map(|b| if b & 0x7f == 0x7f { b ^ 1 } else { b }).collect();
        let s: Vec<f32> = (0..n.div_ceil(128) * k.div_ceil(128)).map(|_| (0.5 + r.random::<f32>()) / (64.0 * (k as f32).sqrt())).collect();
        let wf = peregrine_model::formats::dequant_fp8_block(&w, &s, n, k, 128, 128);
        let w = crate::tc_tiles::laid_out(w, n, k);
        (Mat { m: GpuMatrix::Fp8 { w: st.clone_htod(&w).unwrap(), s: st.clone_htod(&s).unwrap() }, n, k }, wf)
    } else {
        let wf: Vec<f32> = randn(r, n * k, 2.0 / (k as f32).sqrt()).iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        let bits: Vec<u16> = wf.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
        let bits = crate::tc_tiles::laid_out(bits, n, k);
        (Mat { m: GpuMatrix::Bf16(st.clone_htod(&bits).unwrap()), n, k }, wf)
    }
}

/// A copy of a matrix on the GPU.
fn copy_mat(m: &crate::backend::Mat) -> crate::backend::Mat {
    use crate::backend::GpuMatrix;
    let m2 = match &m.m {
        GpuMatrix::F32(w) => GpuMatrix::F32(w.clone()),
        GpuMatrix::Bf16(w) => GpuMatrix::Bf16(w.clone()),
        GpuMatrix::Fp8 { w, s } => GpuMatrix::Fp8 { w: w.clone(), s: s.clone() },
        GpuMatrix::Mxfp4 { w, s } => GpuMatrix::Mxfp4 { w: w.clone(), s: s.clone() },
    };
    crate::backend::Mat { m: m2, n: m.n, k: m.k }
}

/// A dense MLP with gate and up stacked (one GEMV; before an FP8 down, silu x up split by
/// `silu_mul_split_f16`, one launch for silu_mul and the down GEMV's split) gives the bits of
/// separate gate and up GEMVs, `silu_mul` and the down GEMV, and both match the f64 reference:
/// FP8 and BF16, 1-70 rows (the one-tile GEMVs, pipelined where the grid fits one wave, the
/// multi-tile ones and the GEMM), I from 128 to 16384 (Flash's dense MLP: 1024 threads of 2
/// groups of 8 in silu_mul_split_f16).
#[test]
fn dense_mlp_with_gate_and_up_stacked_gives_the_separate_bits() {
    use crate::backend::{Ffn, GateUp};
    let Some(m) = model() else { return };
    let mut r = rng();
    let st = m.stream.clone();
    for (h, i, fp8, rows) in [(256usize, 384usize, true, &[1usize, 3, 9, 70][..]), (128, 128, false, &[1, 5][..]), (512, 16384, true, &[1, 2][..])] {
        let (gate, gf) = random_tc_matrix(&st, &mut r, i, h, fp8);
        let (up, uf) = random_tc_matrix(&st, &mut r, i, h, fp8);
        let (down, df) = random_tc_matrix(&st, &mut r, h, i, fp8);
        let stacked = crate::backend::stack_rows(&st, &[&gate, &up]).unwrap().expect("gate and up stack");
        let down2 = copy_mat(&down);
        let separate = Ffn { gate_up: GateUp::Separate { gate, up }, down };
        let stacked = Ffn { gate_up: GateUp::Stacked { m: stacked, i }, down: down2 };
        for &t in rows {
            let name = format!("dense MLP {h} -> {i} -> {h} ({}), {t} rows", if fp8 { "FP8" } else { "BF16" });
            let x = randn(&mut r, t * h, 1.0);
            let xd = st.clone_htod(&x).unwrap();
            let want_bits = st.clone_dtoh(&m.ffn(&separate, &xd, t).unwrap()).unwrap();
            let got = st.clone_dtoh(&m.ffn(&stacked, &xd, t).unwrap()).unwrap();
            assert!(want_bits.iter().all(|v| v.is_finite()), "{name}: non-finite output");
            assert!(got.iter().zip(&want_bits).all(|(a, b)| a.to_bits() == b.to_bits()), "{name}: stacked gate and up differ from separate ones in some bit");
            let dot = |w: &[f32], row: usize, k: usize, v: &[f32]| (0..k).map(|c| w[row * k + c] as f64 * v[c] as f64).sum::<f64>();
            let want: Vec<f32> = (0..t)
                .flat_map(|ti| {
                    let xr = &x[ti * h..(ti + 1) * h];
                    let a: Vec<f32> = (0..i).map(|j| {
                        let (g, u) = (dot(&gf, j, h, xr), dot(&uf, j, h, xr));
                        (g / (1.0 + (-g).exp()) * u) as f32
                    }).collect();
                    (0..h).map(|n| dot(&df, n, i, &a) as f32).collect::<Vec<_>>()
                })
                .collect();
            close(&name, &got, &want, 2e-5);
        }
    }
    // silu_mul_split_f16 against silu_mul then split_f16 directly, for I the kernel takes up to
    // its limit (8 x 4 x 1024), and refusing I past it or not a multiple of 8.
    for (t, i) in [(1usize, 8usize), (3, 136), (2, 16384), (1, 32768)] {
        let y = randn(&mut r, t * 2 * i, 6.0);
        let yd = st.clone_htod(&y).unwrap();
        let (h, l, inv) = m.kernels.silu_mul_split_f16(&yd, t, i).unwrap();
        let a = m.silu_mul(&yd.slice(..), &yd.slice(i..), t, i, 2 * i).unwrap();
        let (wh, wl, winv) = m.kernels.split_f16(&a, t, i, false).unwrap();
        let name = format!("silu_mul_split_f16, {t} rows of {i}");
        assert_eq!(st.clone_dtoh(&h).unwrap(), st.clone_dtoh(&wh).unwrap(), "{name}: hi");
        assert_eq!(st.clone_dtoh(&l).unwrap(), st.clone_dtoh(&wl).unwrap(), "{name}: lo");
        assert_eq!(st.clone_dtoh(&inv).unwrap(), st.clone_dtoh(&winv).unwrap(), "{name}: scales");
        let a = st.clone_dtoh(&a).unwrap();
        let want: Vec<f32> = (0..t * i).map(|e| { let j = (e / i) * 2 * i + e % i; let (g, u) = (y[j] as f64, y[j + i] as f64); (g / (1.0 + (-g).exp()) * u) as f32 }).collect();
        close(&format!("silu_mul, {t} rows of {i}"), &a, &want, 1e-6);
    }
    let yd = st.clone_htod(&vec![0f32; 2 * 32776]).unwrap();
    for i in [32776usize, 12] {
        assert!(m.kernels.silu_mul_split_f16(&yd, 1, i).is_err(), "silu_mul_split_f16 took rows of {i}");
    }
}

/// A tied BF16 embedding whose hidden size the tensor-core lm_head takes (K % 128 == 0) gets a
/// tiled copy as the lm_head (`tc_tiles`; the embedding lookup keeps reading rows): the logits
/// of random rows through `lm_head_into` are the embedding table's rows times them, within the
/// GEMV's error.
#[test]
fn tied_bf16_embedding_serves_as_a_tiled_lm_head() {
    let Some(gpu) = probe_for_tests(0) else { return };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/golden/default");
    let over = serde_json::json!({"hidden_size": 256, "tie_word_embeddings": true});
    let spec = peregrine_model::config::load_spec_with(&dir, over.as_object()).expect("fixture config");
    let m = CudaModel::synthetic(gpu, &spec, 5).expect("synthetic model");
    let (v, h) = (spec.vocab_size, spec.hidden_size);
    assert!(spec.tie_word_embeddings && h == 256, "the overrides took");
    assert!(m.lm_head.is_some(), "no tiled copy of the tied embedding as the lm_head");
    let crate::weights::Embed::Bf16(table) = &m.embed else { panic!("a synthetic embedding is BF16") };
    let st = m.stream.clone();
    let e: Vec<f32> = st.clone_dtoh(table).unwrap().iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect();
    let mut r = rng();
    let rows = 3usize;
    let x = randn(&mut r, rows * h, 1.0);
    let mut y = st.clone_htod(&vec![f32::NAN; rows * v]).unwrap();
    m.lm_head_into(&st.clone_htod(&x).unwrap(), rows, &mut y).unwrap();
    let want: Vec<f32> = (0..rows).flat_map(|t| (0..v).map(|n| (0..h).map(|k| e[n * h + k] as f64 * x[t * h + k] as f64).sum::<f64>() as f32).collect::<Vec<_>>()).collect();
    close("tied lm_head", &st.clone_dtoh(&y).unwrap(), &want, 1e-5);
}

/// Decode steps of several sequences at once that stage the drafter's context
/// (crate::draft_staging) leave its pools as steps writing it directly do: the same values
/// within f32 rounding (the ring's rows go through GEMVs of more rows), at every position the
/// sequences hold, through block ends, a verify step, a step back over staged positions, a
/// sequence leaving and draft passes; and the same drafts. F32 pools, so nothing rounds them.
#[test]
fn staged_drafter_context_of_several_sequences_fills_the_pools_of_direct_writes() {
    use peregrine_core::backend::{Backend, DraftForward, KvConfig, OutputRows, SeqForward};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let spec = peregrine_model::config::load_spec(&root.join("tests/fixtures/golden/default")).expect("fixture config");
    let dspec = peregrine_model::dflash::open_drafter(&root.join("tests/fixtures/dflash/random")).expect("drafter fixture").spec;
    let (bs, per_seq, seqs) = (16usize, 6usize, 3usize);
    let table = |s: usize| -> Vec<u32> { (0..per_seq).map(|b| (s * per_seq + b) as u32).collect() };
    let prompts: Vec<Vec<u32>> = [13usize, 16, 21].iter().enumerate().map(|(s, &n)| (0..n as u32).map(|i| 5 + (i * 29 + s as u32 * 71) % 300).collect()).collect();
    let fwd = |s: usize, tokens: Vec<u32>, start: usize, output| SeqForward { seq_id: s as u64 + 1, tokens, start_pos: start, full_blocks: table(s), swa_blocks: table(s), output };
    let draft = |s: usize, out: &[u32]| DraftForward { seq_id: s as u64 + 1, last_token: out[out.len() - 1], start_pos: out.len() - 1, num_drafts: 5, full_blocks: table(s) };
    // Tokens, drafts, the drafter's pools and the rows staged.
    type Run = (Vec<Vec<u32>>, Vec<Vec<u32>>, Vec<Vec<f32>>, usize);
    let run = |deferred: bool| -> Option<Run> {
        let mut m = CudaModel::synthetic(probe_for_tests(0)?, &spec, 7).expect("synthetic model");
        m.attach_synthetic_drafter(&dspec, 11).expect("synthetic drafter");
        m.set_draft_context_deferred(deferred);
        m.init_kv(KvConfig { block_size: bs, num_full_blocks: seqs * per_seq, num_swa_blocks: seqs * per_seq }).expect("KV cache");
        // out[s]: the sequence's tokens; its last one is not in the KV cache yet.
        let mut out: Vec<Vec<u32>> = prompts.clone();
        for (s, o) in out.iter_mut().enumerate() {
            let t = m.forward_argmax(&[fwd(s, o.clone(), 0, OutputRows::Last)]).unwrap();
            o.extend(&t[0]);
        }
        let mut drafts = Vec::new();
        for step in 0..44 {
            let live: Vec<usize> = (0..seqs).filter(|&s| s != 2 || step < 27).collect();
            if step == 12 {
                // Sequence 1 verifies a block of 6 (its rows write the context directly) and
                // keeps 3 positions of it.
                let o = &mut out[1];
                let p = o.len() - 1;
                let mut ids = vec![o[p]];
                ids.extend((0..5).map(|i| 7 + i * 13));
                let lg = m.forward(&[fwd(1, ids.clone(), p, OutputRows::All)]).unwrap().remove(0);
                let vocab = lg.data.len() / lg.rows;
                let am = |r: usize| lg.data[r * vocab..(r + 1) * vocab].iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0 as u32;
                o.extend([ids[1], ids[2], am(2)]);
                continue;
            }
            if step == 20 || step == 35 {
                drafts.push(m.draft(&[draft(0, &out[0])]).unwrap().remove(0));
            }
            if step == 30 {
                // Sequence 0 goes back over two positions it staged (their tokens again).
                let n = out[0].len();
                out[0].truncate(n - 2);
            }
            let b: Vec<SeqForward> = live.iter().map(|&s| fwd(s, vec![out[s][out[s].len() - 1]], out[s].len() - 1, OutputRows::Last)).collect();
            let ids = m.forward_argmax(&b).unwrap();
            for (&s, t) in live.iter().zip(ids) {
                out[s].extend(t);
            }
        }
        let all: Vec<DraftForward> = (0..seqs).map(|s| draft(s, &out[s])).collect();
        drafts.extend(m.draft(&all).unwrap());
        let st = m.stream.clone();
        let pools = m.draft_kv.iter().flat_map(|(k, v)| [k.download(&st).unwrap(), v.download(&st).unwrap()]).collect();
        Some((out, drafts, pools, m.staged_draft_rows()))
    };
    let Some((out, drafts, pools, none)) = run(false) else { return };
    let (out2, drafts2, pools2, staged) = run(true).expect("a second model on the GPU");
    assert_eq!(none, 0, "rows staged with deferral off");
    assert!(staged > 80, "only {staged} rows staged");
    assert_eq!(out2, out, "the target's tokens");
    let mut worst = 0f32;
    for (i, (a, b)) in pools.iter().zip(&pools2).enumerate() {
        let width = a.len() / ((seqs * per_seq + 1) * bs);
        for (s, o) in out.iter().enumerate() {
            // Every position the sequence holds in the KV cache (all but its last token).
            for p in 0..o.len() - 1 {
                let slot = table(s)[p / bs] as usize * bs + p % bs;
                let (x, y) = (&a[slot * width..(slot + 1) * width], &b[slot * width..(slot + 1) * width]);
                let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert!(scale > 0.0 && y.iter().all(|v| v.is_finite()), "pool {i}, sequence {s}, position {p}: direct {scale} / staged not finite");
                let d = x.iter().zip(y).fold(0f32, |m, (u, v)| m.max((u - v).abs())) / scale;
                assert!(d <= 1e-5, "pool {i}, sequence {s}, position {p}: staged context {d:.2e} from direct writes");
                worst = worst.max(d);
            }
        }
    }
    assert_eq!(drafts2, drafts, "drafts from staged context");
    eprintln!("staged drafter context of {seqs} sequences ({staged} rows): pools within {worst:.2e} of direct writes, {} draft passes the same", drafts.len());
}
