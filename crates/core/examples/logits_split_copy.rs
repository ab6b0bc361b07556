// Run: cargo run --release -p peregrine-core --example logits_split_copy
// (record: benches/results/2026-11-25-logits-split-copy.md)
//
// The host side of "logits to the host" (Flash vocabulary, one row per sequence): the old path
// copied the pinned buffer into a Vec, then split that Vec into per-sequence Vecs; the new path
// splits straight from the buffer (both through peregrine_core::backend::split_logits).
// Each path runs as the backend does (allocate, use, free every step), in alternating blocks of
// rounds so both see the allocator in the same state; medians of the rounds after a warm-up.
use peregrine_core::backend::{split_logits, Logits};
use std::time::Instant;

fn old_path(host: &[f32], counts: &[usize], vocab: usize) -> Vec<Logits> {
    let v = host.to_vec();
    split_logits(&v, counts, vocab)
}

fn new_path(host: &[f32], counts: &[usize], vocab: usize) -> Vec<Logits> {
    split_logits(host, counts, vocab)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time(f: fn(&[f32], &[usize], usize) -> Vec<Logits>, host: &[f32], counts: &[usize], vocab: usize, rounds: usize) -> Vec<f64> {
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            let out = f(host, counts, vocab);
            std::hint::black_box(&out);
            drop(out);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

fn main() {
    let vocab = 152576;
    for rows in [1usize, 8, 32, 64] {
        let host: Vec<f32> = (0..rows * vocab).map(|i| i as f32).collect(); // stands in for the pinned buffer
        let counts = vec![1; rows];
        let (a, b) = (old_path(&host, &counts, vocab), new_path(&host, &counts, vocab));
        assert!(a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x.rows == 1 && y.rows == 1 && x.data == y.data));
        let (mut old, mut new) = (vec![], vec![]);
        for block in 0..8 {
            let o = time(old_path, &host, &counts, vocab, 6);
            let n = time(new_path, &host, &counts, vocab, 6);
            if block > 0 {
                old.extend_from_slice(&o[1..]);
                new.extend_from_slice(&n[1..]);
            }
        }
        println!(
            "rows {rows:2} ({:4.1} MB): old (copy + split) median {:7.3} ms, new (split from the buffer) median {:7.3} ms",
            (rows * vocab * 4) as f64 / 1e6,
            median(old),
            median(new)
        );
    }
}
