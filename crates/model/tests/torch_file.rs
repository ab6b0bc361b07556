//! `torch_file`: the real fixture still reads, and crafted `torch.save` files (a memo bomb, deep
//! nesting, tensor shapes beyond their storage) come back as errors, fast, without a crash.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use peregrine_model::torch_file::{unpickle, PickleValue, TorchFile, MAX_DEPTH};

/// A stored (uncompressed) zip laid out like `torch.save`: `archive/data.pkl` plus `archive/data/<key>`.
fn torch_zip(pkl: &[u8], storages: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
    let tmp = tempfile::Builder::new().suffix(".pt").tempfile().unwrap();
    let mut z = zip::ZipWriter::new(tmp.reopen().unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pkl).unwrap();
    for (key, bytes) in storages {
        z.start_file(format!("archive/data/{key}"), opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
    tmp
}

fn open_err(pkl: &[u8]) -> String {
    let f = torch_zip(pkl, &[]);
    let t0 = Instant::now();
    let err = TorchFile::open(f.path()).err().expect("a crafted pickle must be refused").to_string();
    assert!(t0.elapsed() < Duration::from_secs(2), "took {:?}: {err}", t0.elapsed());
    err
}

fn bin_str(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((s.len() as u32).to_le_bytes());
    v.extend(s.as_bytes());
    v
}

/// LONG1 of 8 bytes: any i64.
fn long(n: i64) -> Vec<u8> {
    let mut v = vec![0x8a, 8];
    v.extend(n.to_le_bytes());
    v
}

fn int_tuple(xs: &[i64]) -> Vec<u8> {
    let mut v = vec![b'('];
    for &x in xs {
        v.extend(long(x));
    }
    v.push(b't');
    v
}

/// `{"embedding": _rebuild_tensor_v2(<storage dtype '0' of numel>, offset, shape, stride, False,
/// OrderedDict())}` in the opcodes `torch.save` emits.
fn tensor_pickle(dtype: &str, numel: i64, offset: i64, shape: &[i64], stride: &[i64]) -> Vec<u8> {
    let mut p = b"\x80\x02}(".to_vec();
    p.extend(bin_str("embedding"));
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
    p.extend(bin_str("storage"));
    p.extend(format!("ctorch\n{dtype}\n").as_bytes());
    p.extend(bin_str("0"));
    p.extend(bin_str("cpu"));
    p.extend(long(numel));
    p.extend(b"tQ");
    p.extend(long(offset));
    p.extend(int_tuple(shape));
    p.extend(int_tuple(stride));
    p.extend(b"\x89ccollections\nOrderedDict\n)Rt");
    p.extend(b"Ru.");
    p
}

fn f32_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The tensor under `embedding`, or the error either `open` or `tensor` gives.
fn read_tensor(pkl: &[u8], storage: &[u8]) -> Result<Vec<f32>, String> {
    let f = torch_zip(pkl, &[("0", storage)]);
    let t = TorchFile::open(f.path()).map_err(|e| e.to_string())?;
    let v = t.get("embedding").expect("embedding entry");
    t.tensor(v).map(|t| t.data).map_err(|e| e.to_string())
}

#[test]
fn real_mask_embedding_fixture_reads() {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dflash/random/mask_embedding.pt");
    let f = TorchFile::open(Path::new(&p)).unwrap();
    assert_eq!(f.get("mask_token_id"), Some(&PickleValue::Int(2)));
    let t = f.tensor(f.get("embedding").unwrap()).unwrap();
    assert_eq!(t.shape, vec![64]);
    assert_eq!(t.data.len(), 64);
    assert!(t.data.iter().all(|x| x.is_finite()) && t.data.iter().any(|&x| x != 0.0));
}

#[test]
fn tensor_views_read_within_the_storage() {
    let s = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0]);
    // A transposed 2x2 view at offset 1.
    let got = read_tensor(&tensor_pickle("FloatStorage", 5, 1, &[2, 2], &[1, 2]), &s).unwrap();
    assert_eq!(got, vec![2.0, 4.0, 3.0, 5.0]);
    // An expanded (stride 0) view may hold more elements than its storage.
    let got = read_tensor(&tensor_pickle("FloatStorage", 5, 4, &[3], &[0]), &s).unwrap();
    assert_eq!(got, vec![5.0; 3]);
    // An empty tensor needs no storage element.
    assert_eq!(read_tensor(&tensor_pickle("FloatStorage", 5, 9, &[0, 7], &[7, 1]), &s).unwrap(), Vec::<f32>::new());
    // The last element of the storage is reachable, one past it is not.
    assert_eq!(read_tensor(&tensor_pickle("FloatStorage", 5, 0, &[5], &[1]), &s).unwrap().len(), 5);
    assert_eq!(read_tensor(&tensor_pickle("FloatStorage", 5, 0, &[3], &[2]), &s).unwrap(), vec![1.0, 3.0, 5.0]);
    let err = read_tensor(&tensor_pickle("FloatStorage", 5, 1, &[5], &[1]), &s).unwrap_err();
    assert!(err.contains("reaches element 5") && err.contains("holds 5"), "{err}");
}

/// About 400 bytes whose memo reads double a list 40 times (2^40 nodes if copied).
#[test]
fn memo_bomb_is_refused_fast() {
    let mut p = b"\x80\x02]q\x00".to_vec();
    for _ in 0..40 {
        p.extend(b"](h\x00h\x00eq\x00");
    }
    p.push(b'.');
    assert!(p.len() < 450);
    let t0 = Instant::now();
    let err = unpickle(&p).unwrap_err();
    assert!(err.contains("MiB of values"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(2), "took {:?}", t0.elapsed());
    let err = open_err(&p);
    assert!(err.contains("data.pkl") && err.contains("MiB of values"), "{err}");
}

/// A million `None`s (a 1 MB pickle) cost ~100 MB as values: refused by the same budget.
#[test]
fn many_small_values_are_refused() {
    let mut p = b"\x80\x02".to_vec();
    p.extend(std::iter::repeat_n(b'N', 1_000_000));
    p.push(b'.');
    let err = unpickle(&p).unwrap_err();
    assert!(err.contains("MiB of values"), "{err}");
}

fn nested_lists(depth: usize) -> Vec<u8> {
    let mut p = b"\x80\x02".to_vec();
    p.extend(std::iter::repeat_n(b']', depth));
    p.extend(std::iter::repeat_n(b'a', depth - 1));
    p.push(b'.');
    p
}

/// 100k nested lists: an error, not a stack overflow when the value is dropped.
#[test]
fn deep_nesting_is_refused() {
    let err = unpickle(&nested_lists(100_000)).unwrap_err();
    assert!(err.contains(&format!("{} deep, more than {MAX_DEPTH}", MAX_DEPTH + 1)), "{err}");
    let err = open_err(&nested_lists(100_000));
    assert!(err.contains("deep"), "{err}");
    // Tuples and dicts count too.
    let mut p = b"\x80\x02N".to_vec();
    p.extend(std::iter::repeat_n(0x85u8, 5000));
    p.push(b'.');
    assert!(unpickle(&p).unwrap_err().contains("deep"));
    // {1: {1: ... {1: None}}}: each SETITEM stores the dict above it under key 1.
    let mut p = b"\x80\x02}".to_vec();
    for _ in 1..5000 {
        p.extend(b"K\x01}");
    }
    p.extend(b"K\x01N");
    p.extend(std::iter::repeat_n(b's', 5000));
    p.push(b'.');
    assert!(unpickle(&p).unwrap_err().contains("deep"));
}

/// Exactly `MAX_DEPTH` levels still parse, and the value clones, compares and drops on a test
/// thread's stack.
#[test]
fn nesting_up_to_the_limit_is_accepted() {
    let v = unpickle(&nested_lists(MAX_DEPTH)).unwrap();
    let w = v.clone();
    assert_eq!(v, w);
    assert!(format!("{w:?}").len() > MAX_DEPTH);
    assert!(unpickle(&nested_lists(MAX_DEPTH + 1)).is_err());
}

/// `_rebuild_tensor_v2(storage of 1 float, 0, (1<<40,), (0,))`: every index is in bounds, but
/// materialising it would take 4 TiB.
#[test]
fn stride_zero_huge_tensor_is_refused_before_allocating() {
    let s = f32_bytes(&[1.0]);
    let err = read_tensor(&tensor_pickle("FloatStorage", 1, 0, &[1 << 40], &[0]), &s).unwrap_err();
    assert!(err.contains("1099511627776 elements"), "{err}");
    // Below the absolute cap, a repeating view is still bounded.
    let err = read_tensor(&tensor_pickle("FloatStorage", 1, 0, &[1 << 25], &[0]), &s).unwrap_err();
    assert!(err.contains("repeats storage 0 (1 elements) into 33554432 elements"), "{err}");
    // A shape whose element count overflows usize.
    let err = read_tensor(&tensor_pickle("FloatStorage", 1, 0, &[1 << 40, 1 << 40], &[0, 0]), &s).unwrap_err();
    assert!(err.contains("overflows"), "{err}");
}

#[test]
fn negative_or_overflowing_tensor_geometry_is_refused() {
    let s = f32_bytes(&[1.0, 2.0]);
    let err = read_tensor(&tensor_pickle("FloatStorage", 2, -(1 << 62), &[1], &[1]), &s).unwrap_err();
    assert!(err.contains("negative tensor storage offset"), "{err}");
    let err = read_tensor(&tensor_pickle("FloatStorage", 2, 0, &[2], &[-1]), &s).unwrap_err();
    assert!(err.contains("non-negative"), "{err}");
    let err = read_tensor(&tensor_pickle("FloatStorage", 2, 0, &[-2], &[1]), &s).unwrap_err();
    assert!(err.contains("non-negative"), "{err}");
    let err = read_tensor(&tensor_pickle("FloatStorage", -1, 0, &[2], &[1]), &s).unwrap_err();
    assert!(err.contains("persistent id"), "{err}");
    // Offset and stride that wrap usize when multiplied by the element width or summed.
    let err = read_tensor(&tensor_pickle("FloatStorage", 2, 1 << 62, &[1], &[1]), &s).unwrap_err();
    assert!(err.contains("reaches element 4611686018427387904"), "{err}");
    let err = read_tensor(&tensor_pickle("FloatStorage", 2, i64::MAX, &[3], &[i64::MAX]), &s).unwrap_err();
    assert!(err.contains("overflow"), "{err}");
}
