//! KV block bookkeeping: which physical blocks hold which positions of each sequence.
//!
//! Full group: ref-counted blocks; a completely filled block gets a hash
//! `hash(parent_hash, its tokens)` and stays findable in the prefix cache after it is freed,
//! until it is reallocated (least recently freed first). Sliding-window group: plain free
//! list; blocks wholly before the window of a sequence's next positions are released.

use std::collections::{BTreeMap, HashMap};

use peregrine_core::backend::NULL_BLOCK;

/// One sequence's block tables.
#[derive(Debug, Default, Clone)]
pub struct SeqBlocks {
    pub full: Vec<u32>,
    pub swa: Vec<u32>,
    /// Hashes of the leading full blocks already registered in the prefix cache.
    pub hashes: Vec<u64>,
}

pub struct KvManager {
    block_size: usize,
    window: Option<usize>,
    prefix_caching: bool,
    refcnt: Vec<u32>,
    block_hash: Vec<Option<u64>>,
    cached: HashMap<u64, u32>,
    /// Free full blocks by free time (oldest evicted first); `stamp[b]` is its key.
    free_full: BTreeMap<u64, u32>,
    stamp: Vec<u64>,
    clock: u64,
    free_swa: Vec<u32>,
    num_swa: usize,
    pub queries: u64,
    pub hits: u64,
}

/// Free-list keys start here so unhashed blocks can be put in front (keys below it).
const BASE: u64 = 1 << 62;

pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = parent ^ 0x9e3779b97f4a7c15;
    for &t in tokens {
        h ^= t as u64;
        h = h.wrapping_mul(0x100000001b3).rotate_left(17) ^ 0x5851f42d4c957f2d;
    }
    h
}

impl KvManager {
    /// `window`: the largest sliding window of the model (None: no sliding-window layers).
    /// Prefix reuse is only enabled for models without sliding-window layers: a hit would also
    /// need the sliding-window blocks before the hit point, which this manager does not cache.
    pub fn new(num_full: usize, num_swa: usize, block_size: usize, window: Option<usize>, prefix_caching: bool) -> Self {
        let mut free_full = BTreeMap::new();
        for b in 0..num_full {
            free_full.insert(BASE + b as u64, b as u32);
        }
        KvManager {
            block_size,
            window,
            prefix_caching: prefix_caching && window.is_none(),
            refcnt: vec![0; num_full],
            block_hash: vec![None; num_full],
            cached: HashMap::new(),
            free_full,
            stamp: (0..num_full as u64).map(|b| BASE + b).collect(),
            clock: BASE + num_full as u64,
            free_swa: (0..num_swa as u32).rev().collect(),
            num_swa,
            queries: 0,
            hits: 0,
        }
    }

    pub fn total_full(&self) -> usize {
        self.refcnt.len()
    }
    pub fn free_full(&self) -> usize {
        self.free_full.len()
    }
    pub fn used_swa(&self) -> usize {
        self.num_swa - self.free_swa.len()
    }
    /// Fraction of blocks (both groups) held by sequences.
    pub fn usage(&self) -> f64 {
        let total = self.total_full() + self.num_swa;
        if total == 0 {
            return 0.0;
        }
        (self.total_full() - self.free_full() + self.used_swa()) as f64 / total as f64
    }

    /// Looks up the longest cached prefix of `tokens` (leaving at least one token to compute),
    /// takes references on those blocks and returns the number of cached tokens.
    pub fn match_prefix(&mut self, seq: &mut SeqBlocks, tokens: &[u32]) -> usize {
        debug_assert!(seq.full.is_empty());
        if !self.prefix_caching {
            return 0;
        }
        let bs = self.block_size;
        let max_blocks = tokens.len().saturating_sub(1) / bs;
        self.queries += tokens.len() as u64;
        let mut parent = 0u64;
        for i in 0..max_blocks {
            let h = block_hash(parent, &tokens[i * bs..(i + 1) * bs]);
            let Some(&b) = self.cached.get(&h) else { break };
            if self.refcnt[b as usize] == 0 {
                self.free_full.remove(&self.stamp[b as usize]);
            }
            self.refcnt[b as usize] += 1;
            seq.full.push(b);
            seq.swa.push(NULL_BLOCK);
            seq.hashes.push(h);
            parent = h;
        }
        let n = seq.full.len() * bs;
        self.hits += n as u64;
        n
    }

    fn swa_releasable(&self, seq: &SeqBlocks, start: usize) -> Vec<usize> {
        let Some(w) = self.window else { return vec![] };
        // Positions >= start attend back to start - (w - 1).
        let first_needed = start.saturating_sub(w.saturating_sub(1));
        let end_block = first_needed / self.block_size;
        (0..end_block.min(seq.swa.len())).filter(|&i| seq.swa[i] != NULL_BLOCK).collect()
    }

    /// Full and sliding-window blocks still to allocate so that the tables cover `0..upto`
    /// when the next computed position is `start`.
    pub fn blocks_needed(&self, seq: &SeqBlocks, start: usize, upto: usize) -> (usize, usize) {
        let n = upto.div_ceil(self.block_size);
        let full = n.saturating_sub(seq.full.len());
        let swa = if self.num_swa > 0 || self.window.is_some() {
            (n.saturating_sub(seq.swa.len())).saturating_sub(self.swa_releasable(seq, start).len())
        } else {
            0
        };
        (full, swa)
    }

    /// Extends the tables to cover `0..upto`, releasing sliding-window blocks that positions
    /// `>= start` no longer see. Returns false (changing nothing) if blocks are short.
    pub fn allocate(&mut self, seq: &mut SeqBlocks, start: usize, upto: usize) -> bool {
        let (nf, ns) = self.blocks_needed(seq, start, upto);
        if nf > self.free_full.len() || (self.window.is_some() && ns > self.free_swa.len()) {
            return false;
        }
        for i in self.swa_releasable(seq, start) {
            self.free_swa.push(seq.swa[i]);
            seq.swa[i] = NULL_BLOCK;
        }
        let n = upto.div_ceil(self.block_size);
        while seq.full.len() < n {
            let (_, b) = self.free_full.pop_first().expect("counted above");
            if let Some(h) = self.block_hash[b as usize].take() {
                if self.cached.get(&h) == Some(&b) {
                    self.cached.remove(&h);
                }
            }
            self.refcnt[b as usize] = 1;
            seq.full.push(b);
        }
        while seq.swa.len() < n {
            if self.window.is_some() {
                seq.swa.push(self.free_swa.pop().expect("counted above"));
            } else {
                seq.swa.push(NULL_BLOCK);
            }
        }
        true
    }

    /// Registers the completely filled full blocks among the first `computed` tokens.
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[u32], computed: usize) {
        if !self.prefix_caching {
            return;
        }
        let bs = self.block_size;
        while seq.hashes.len() < computed / bs && seq.hashes.len() < seq.full.len() {
            let i = seq.hashes.len();
            let parent = if i == 0 { 0 } else { seq.hashes[i - 1] };
            let h = block_hash(parent, &tokens[i * bs..(i + 1) * bs]);
            let b = seq.full[i];
            self.cached.entry(h).or_insert(b);
            if self.block_hash[b as usize].is_none() {
                self.block_hash[b as usize] = Some(h);
            }
            seq.hashes.push(h);
        }
    }

    /// Drops the sequence's references; cached blocks stay findable until reallocated.
    pub fn free(&mut self, seq: &mut SeqBlocks) {
        // Free tail blocks first so a later eviction takes them before the shared prefix.
        for &b in seq.full.iter().rev() {
            let r = &mut self.refcnt[b as usize];
            *r -= 1;
            if *r == 0 {
                let key = if self.block_hash[b as usize].is_some() {
                    self.clock += 1;
                    self.clock
                } else {
                    // Unhashed blocks hold nothing reusable: reallocate them first.
                    self.min_key()
                };
                self.stamp[b as usize] = key;
                self.free_full.insert(key, b);
            }
        }
        for &b in &seq.swa {
            if b != NULL_BLOCK {
                self.free_swa.push(b);
            }
        }
        *seq = SeqBlocks::default();
    }

    fn min_key(&mut self) -> u64 {
        // Keys below every hashed stamp: count down from the smallest key in use.
        let lowest = self.free_full.keys().next().copied().unwrap_or(BASE);
        lowest.min(BASE) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_free_accounting_and_sharing() {
        let mut kv = KvManager::new(8, 0, 4, None, true);
        let toks: Vec<u32> = (0..10).collect();
        let mut a = SeqBlocks::default();
        assert_eq!(kv.match_prefix(&mut a, &toks), 0);
        assert!(kv.allocate(&mut a, 0, 10));
        assert_eq!(kv.free_full(), 5);
        kv.commit(&mut a, &toks, 10);
        let mut b = SeqBlocks::default();
        assert_eq!(kv.match_prefix(&mut b, &toks), 8);
        assert_eq!(&b.full[..2], &a.full[..2]);
        assert!(kv.allocate(&mut b, 8, 10));
        assert_eq!(kv.free_full(), 4);
        kv.free(&mut a);
        kv.free(&mut b);
        assert_eq!(kv.free_full(), 8);
        assert_eq!(kv.usage(), 0.0);
        // Still cached after free.
        let mut c = SeqBlocks::default();
        assert_eq!(kv.match_prefix(&mut c, &toks), 8);
        kv.free(&mut c);
    }

    #[test]
    fn eviction_reuses_cached_blocks_lru() {
        let mut kv = KvManager::new(4, 0, 2, None, true);
        let t1 = [1u32, 2, 3, 4, 5];
        let mut a = SeqBlocks::default();
        assert!(kv.allocate(&mut a, 0, 5));
        kv.commit(&mut a, &t1, 5);
        kv.free(&mut a);
        // A 4-block sequence evicts every cached block.
        let mut b = SeqBlocks::default();
        assert!(kv.allocate(&mut b, 0, 8));
        assert!(!kv.allocate(&mut b, 0, 10), "no blocks left");
        kv.free(&mut b);
        let mut c = SeqBlocks::default();
        assert_eq!(kv.match_prefix(&mut c, &t1), 0);
        kv.free(&mut c);
        assert_eq!(kv.free_full(), 4);
    }

    #[test]
    fn sliding_window_releases_old_blocks_and_disables_reuse() {
        let mut kv = KvManager::new(16, 4, 4, Some(4), true);
        let mut a = SeqBlocks::default();
        assert!(kv.allocate(&mut a, 0, 8));
        assert_eq!(kv.used_swa(), 2);
        // Next position 12 sees 9..=12: blocks 0 and 1 are released, block 2 and 3 allocated.
        assert!(kv.allocate(&mut a, 12, 13));
        assert_eq!(a.swa[0], NULL_BLOCK);
        assert_eq!(a.swa[1], NULL_BLOCK);
        assert_eq!(kv.used_swa(), 2);
        let toks: Vec<u32> = (0..13).collect();
        kv.commit(&mut a, &toks, 13);
        let mut b = SeqBlocks::default();
        assert_eq!(kv.match_prefix(&mut b, &toks), 0);
        kv.free(&mut a);
        kv.free(&mut b);
        assert_eq!(kv.usage(), 0.0);
    }
}
