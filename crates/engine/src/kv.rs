//! KV block bookkeeping: which physical blocks hold which positions of each sequence.
//!
//! Full group: ref-counted blocks; a completely filled block gets a hash
//! `hash(parent_hash, its tokens)` and stays findable in the prefix cache after it is freed,
//! until it is reallocated (least recently freed first). Sliding-window group: plain free
//! list; blocks wholly before the window of a sequence's next positions are released.
//!
//! A cache hit is exact: the hash is keyed per process (SipHash with a random key, so nobody
//! can craft a prompt whose blocks collide with another user's, the class of vLLM's
//! CVE-2025-25183), and a hit is taken only where the cached block's parent hash and tokens
//! equal the ones looked up.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::OnceLock;

use peregrine_core::backend::NULL_BLOCK;

/// One sequence's block tables.
#[derive(Debug, Default, Clone)]
pub struct SeqBlocks {
    pub full: Vec<u32>,
    pub swa: Vec<u32>,
    /// Hashes of the leading full blocks already registered in the prefix cache.
    pub hashes: Vec<u64>,
    /// The parent key of the first block: 0, or the request's cache salt's (`salt_root`).
    pub root: u64,
}

impl SeqBlocks {
    /// Empty tables for a request whose prefix-cache entries are keyed by `salt`.
    pub fn salted(salt: Option<&str>) -> Self {
        SeqBlocks { root: salt.map_or(0, salt_root), ..Default::default() }
    }
}

/// One group's blocks: reference counts, the hash of each filled block, and the free list
/// ordered by free time (oldest reallocated first; unhashed blocks before all hashed ones).
struct Pool {
    refcnt: Vec<u32>,
    /// Each filled block's key and what it holds (checked on a hit); None for the others.
    filled: Vec<Option<Filled>>,
    cached: HashMap<u64, u32>,
    free: BTreeMap<u64, u32>,
    stamp: Vec<u64>,
    clock: u64,
}

/// A filled block: its key (`block_hash`), its parent's key and its tokens.
#[derive(Clone)]
struct Filled {
    hash: u64,
    parent: u64,
    tokens: Box<[u32]>,
}

/// Free-list keys start here so unhashed blocks can be put in front (keys below it).
const BASE: u64 = 1 << 62;

impl Pool {
    fn new(n: usize) -> Self {
        Pool {
            refcnt: vec![0; n],
            filled: vec![None; n],
            cached: HashMap::new(),
            free: (0..n).map(|b| (BASE + b as u64, b as u32)).collect(),
            stamp: (0..n as u64).map(|b| BASE + b).collect(),
            clock: BASE + n as u64,
        }
    }
    fn total(&self) -> usize {
        self.refcnt.len()
    }
    fn num_free(&self) -> usize {
        self.free.len()
    }
    fn alloc(&mut self) -> u32 {
        let (_, b) = self.free.pop_first().expect("caller checked the free count");
        if let Some(f) = self.filled[b as usize].take() {
            if self.cached.get(&f.hash) == Some(&b) {
                self.cached.remove(&f.hash);
            }
        }
        self.refcnt[b as usize] = 1;
        b
    }
    /// Whether the block cached under `h` holds `tokens` after the block hashed `parent`.
    fn is_cached(&self, h: u64, parent: u64, tokens: &[u32]) -> bool {
        self.cached.get(&h).is_some_and(|&b| self.filled[b as usize].as_ref().is_some_and(|f| f.parent == parent && *f.tokens == *tokens))
    }
    /// Takes a reference on the cached block with hash `h`.
    fn take_cached(&mut self, h: u64) -> u32 {
        let b = self.cached[&h];
        if self.refcnt[b as usize] == 0 {
            self.free.remove(&self.stamp[b as usize]);
        }
        self.refcnt[b as usize] += 1;
        b
    }
    fn register(&mut self, b: u32, h: u64, parent: u64, tokens: &[u32]) {
        self.cached.entry(h).or_insert(b);
        if self.filled[b as usize].is_none() {
            self.filled[b as usize] = Some(Filled { hash: h, parent, tokens: tokens.into() });
        }
    }
    fn release(&mut self, b: u32) {
        let r = &mut self.refcnt[b as usize];
        *r -= 1;
        if *r > 0 {
            return;
        }
        let key = if self.filled[b as usize].is_some() {
            self.clock += 1;
            self.clock
        } else {
            // Unhashed blocks hold nothing reusable: reallocate them first.
            self.free.keys().next().copied().unwrap_or(BASE).min(BASE) - 1
        };
        self.stamp[b as usize] = key;
        self.free.insert(key, b);
    }
}

pub struct KvManager {
    block_size: usize,
    /// The sliding window (None: no sliding-window group).
    window: Option<usize>,
    prefix_caching: bool,
    full: Pool,
    swa: Pool,
    /// The blocks' hash (`block_hash`; tests give colliding ones).
    hash: fn(u64, &[u32]) -> u64,
    pub queries: u64,
    pub hits: u64,
}

/// A filled block's key: SipHash of its parent's key and its tokens under a key drawn once per
/// process.
fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = block_key().build_hasher();
    h.write_u64(parent);
    for &t in tokens {
        h.write_u32(t);
    }
    h.finish()
}

/// The first block's parent key for requests salted with `salt`: keyed like the blocks and
/// never 0 (the unsalted root), so salted and unsalted chains never meet.
fn salt_root(salt: &str) -> u64 {
    let mut h = block_key().build_hasher();
    h.write_u8(0xff);
    h.write(salt.as_bytes());
    h.finish().max(1)
}

/// The per-process key of the prefix cache's hashes.
fn block_key() -> &'static RandomState {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    KEY.get_or_init(RandomState::new)
}

impl KvManager {
    /// `window`: the largest sliding window of the model, with `num_swa > 0` blocks for it
    /// (None: no sliding-window group). Sliding-window blocks are hashed like full ones, and
    /// a prefix hit at position H is only taken when the full blocks before H AND the
    /// sliding-window blocks covering positions `H - (window - 1)..H` are all still cached.
    pub fn new(num_full: usize, num_swa: usize, block_size: usize, window: Option<usize>, prefix_caching: bool) -> Self {
        KvManager {
            block_size,
            window: window.filter(|_| num_swa > 0),
            prefix_caching,
            full: Pool::new(num_full),
            swa: Pool::new(num_swa),
            hash: block_hash,
            queries: 0,
            hits: 0,
        }
    }

    pub fn total_full(&self) -> usize {
        self.full.total()
    }
    pub fn free_full(&self) -> usize {
        self.full.num_free()
    }
    pub fn used_swa(&self) -> usize {
        self.swa.total() - self.swa.num_free()
    }
    /// Fraction of blocks (both groups) held by sequences.
    pub fn usage(&self) -> f64 {
        let total = self.full.total() + self.swa.total();
        if total == 0 {
            return 0.0;
        }
        (self.full.total() - self.full.num_free() + self.used_swa()) as f64 / total as f64
    }

    /// First block index whose sliding-window block positions `>= pos` still need.
    fn first_swa_block(&self, pos: usize) -> usize {
        match self.window {
            Some(w) => pos.saturating_sub(w.saturating_sub(1)) / self.block_size,
            None => usize::MAX,
        }
    }

    /// Looks up the longest usable cached prefix of `tokens` (leaving at least one token to
    /// compute), takes references on its blocks and returns the number of cached tokens.
    pub fn match_prefix(&mut self, seq: &mut SeqBlocks, tokens: &[u32]) -> usize {
        debug_assert!(seq.full.is_empty());
        if !self.prefix_caching {
            return 0;
        }
        let bs = self.block_size;
        let max_blocks = tokens.len().saturating_sub(1) / bs;
        self.queries += tokens.len() as u64;
        let mut hashes = Vec::new();
        let mut parent = seq.root;
        for i in 0..max_blocks {
            let h = (self.hash)(parent, &tokens[i * bs..(i + 1) * bs]);
            if !self.full.is_cached(h, parent, &tokens[i * bs..(i + 1) * bs]) {
                break;
            }
            hashes.push(h);
            parent = h;
        }
        // The longest hit whose window blocks are cached too.
        let mut k = hashes.len();
        if self.window.is_some() {
            let swa_cached = |j: usize| self.swa.is_cached(hashes[j], if j == 0 { seq.root } else { hashes[j - 1] }, &tokens[j * bs..(j + 1) * bs]);
            while k > 0 && !(self.first_swa_block(k * bs)..k).all(swa_cached) {
                k -= 1;
            }
        }
        let first_swa = self.first_swa_block(k * bs);
        for (j, &h) in hashes[..k].iter().enumerate() {
            seq.full.push(self.full.take_cached(h));
            seq.swa.push(if self.window.is_some() && j >= first_swa { self.swa.take_cached(h) } else { NULL_BLOCK });
            seq.hashes.push(h);
        }
        let n = k * bs;
        self.hits += n as u64;
        n
    }

    /// Sliding-window blocks that releasing the ones before `start`'s window would free: those
    /// this sequence holds alone (a block shared through the prefix cache only loses a
    /// reference).
    fn swa_releasable(&self, seq: &SeqBlocks, start: usize) -> usize {
        let end = self.first_swa_block(start).min(seq.swa.len());
        if self.window.is_none() {
            return 0;
        }
        seq.swa[..end].iter().filter(|&&b| b != NULL_BLOCK && self.swa.refcnt[b as usize] == 1).count()
    }

    /// Full and sliding-window blocks still to allocate so that the tables cover `0..upto`
    /// when the next computed position is `start`.
    pub fn blocks_needed(&self, seq: &SeqBlocks, _start: usize, upto: usize) -> (usize, usize) {
        let n = upto.div_ceil(self.block_size);
        let full = n.saturating_sub(seq.full.len());
        let swa = if self.window.is_some() { n.saturating_sub(seq.swa.len()) } else { 0 };
        (full, swa)
    }

    /// Extends the tables to cover `0..upto`, releasing sliding-window blocks that positions
    /// `>= start` no longer see. Returns false (changing nothing) if blocks are short.
    pub fn allocate(&mut self, seq: &mut SeqBlocks, start: usize, upto: usize) -> bool {
        let (nf, ns) = self.blocks_needed(seq, start, upto);
        if nf > self.full.num_free() || ns > self.swa.num_free() + self.swa_releasable(seq, start) {
            return false;
        }
        if self.window.is_some() {
            let end = self.first_swa_block(start).min(seq.swa.len());
            for i in 0..end {
                if seq.swa[i] != NULL_BLOCK {
                    self.swa.release(seq.swa[i]);
                    seq.swa[i] = NULL_BLOCK;
                }
            }
        }
        let n = upto.div_ceil(self.block_size);
        while seq.full.len() < n {
            seq.full.push(self.full.alloc());
        }
        while seq.swa.len() < n {
            seq.swa.push(if self.window.is_some() { self.swa.alloc() } else { NULL_BLOCK });
        }
        true
    }

    /// Whether `commit` up to `computed` would register a block (so the caller builds the
    /// sequence's tokens only then: a step fills a block once every `block_size` tokens).
    pub fn commit_wants(&self, seq: &SeqBlocks, computed: usize) -> bool {
        self.prefix_caching && seq.hashes.len() < (computed / self.block_size).min(seq.full.len())
    }

    /// Registers the completely filled blocks among the first `computed` tokens.
    pub fn commit(&mut self, seq: &mut SeqBlocks, tokens: &[u32], computed: usize) {
        let bs = self.block_size;
        while self.commit_wants(seq, computed) {
            let i = seq.hashes.len();
            let parent = if i == 0 { seq.root } else { seq.hashes[i - 1] };
            let block = &tokens[i * bs..(i + 1) * bs];
            let h = (self.hash)(parent, block);
            self.full.register(seq.full[i], h, parent, block);
            if self.window.is_some() && seq.swa[i] != NULL_BLOCK {
                self.swa.register(seq.swa[i], h, parent, block);
            }
            seq.hashes.push(h);
        }
    }

    /// Drops the sequence's references; cached blocks stay findable until reallocated.
    pub fn free(&mut self, seq: &mut SeqBlocks) {
        // Tail blocks first, so eviction takes them before the shared prefix.
        for &b in seq.full.iter().rev() {
            self.full.release(b);
        }
        for &b in seq.swa.iter().rev() {
            if b != NULL_BLOCK {
                self.swa.release(b);
            }
        }
        *seq = SeqBlocks { root: seq.root, ..Default::default() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Salted requests share prefix-cache entries only with the same salt, also after their
    /// blocks were freed (a preempted sequence keeps its salt).
    #[test]
    fn a_cache_salt_keeps_prefixes_apart() {
        let mut kv = KvManager::new(16, 0, 4, None, true);
        let toks: Vec<u32> = (0..10).collect();
        let mut a = SeqBlocks::salted(Some("tenant-a"));
        assert_eq!(kv.match_prefix(&mut a, &toks), 0);
        assert!(kv.allocate(&mut a, 0, 10));
        kv.commit(&mut a, &toks, 10);
        for (salt, hit) in [(None, 0), (Some("tenant-b"), 0), (Some("tenant-a"), 8)] {
            let mut b = SeqBlocks::salted(salt);
            assert_eq!(kv.match_prefix(&mut b, &toks), hit, "salt {salt:?}");
            kv.free(&mut b);
        }
        kv.free(&mut a);
        assert_eq!(a.root, SeqBlocks::salted(Some("tenant-a")).root, "freeing keeps the salt");
        assert_eq!(kv.match_prefix(&mut a, &toks), 8);
        kv.free(&mut a);
        // An unsalted chain is not found by a salted request either.
        let mut u = SeqBlocks::default();
        assert!(kv.allocate(&mut u, 0, 10));
        let other: Vec<u32> = (100..110).collect();
        kv.commit(&mut u, &other, 10);
        assert_eq!(kv.match_prefix(&mut SeqBlocks::salted(Some("tenant-a")), &other), 0);
        assert_eq!(kv.match_prefix(&mut SeqBlocks::default(), &other), 8);
    }

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
    fn commit_wants_exactly_when_a_block_fills() {
        for caching in [true, false] {
            let mut kv = KvManager::new(8, 0, 4, None, caching);
            let toks: Vec<u32> = (0..12).collect();
            let mut a = SeqBlocks::default();
            assert!(kv.allocate(&mut a, 0, 12));
            for computed in 1..=12 {
                let before = a.hashes.len();
                let wants = kv.commit_wants(&a, computed);
                kv.commit(&mut a, &toks, computed);
                assert_eq!(wants, a.hashes.len() > before, "computed {computed}, caching {caching}");
                assert_eq!(wants, caching && computed % 4 == 0, "computed {computed}, caching {caching}");
            }
        }
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

    /// A window block shared through the prefix cache frees nothing when one holder moves
    /// past it: with the pool empty, the allocation that needs it is refused (it used to be
    /// counted as free and `Pool::alloc` panicked on the empty list).
    #[test]
    fn shared_window_blocks_are_not_counted_as_free() {
        let mut kv = KvManager::new(16, 3, 4, Some(4), true);
        let toks: Vec<u32> = (0..16).collect();
        let mut a = SeqBlocks::default();
        assert!(kv.allocate(&mut a, 0, 8));
        kv.commit(&mut a, &toks, 8);
        let mut b = SeqBlocks::default();
        assert_eq!(kv.match_prefix(&mut b, &toks[..9]), 8, "b shares a's window block 1");
        assert!(kv.allocate(&mut b, 8, 12), "the last free window block");
        assert_eq!(kv.used_swa(), 3);
        assert!(!kv.allocate(&mut b, 12, 13), "releasing the shared block frees nothing");
        assert_ne!(b.swa[1], NULL_BLOCK, "a refused allocation changes nothing");
        // Once a has gone, b holds block 1 alone: releasing it makes the room.
        kv.free(&mut a);
        assert!(kv.allocate(&mut b, 12, 13));
        kv.free(&mut b);
        assert_eq!(kv.usage(), 0.0);
    }

    /// A hit needs the cached block's tokens and parent, not only its hash: under a hash where
    /// a block's permutations collide, another order of the same tokens is not reused.
    #[test]
    fn prefix_hits_compare_tokens_not_only_hashes() {
        for window in [None, Some(8)] {
            let mut kv = KvManager::new(16, if window.is_some() { 8 } else { 0 }, 4, window, true);
            kv.hash = |parent, tokens| parent.wrapping_mul(31) + tokens.iter().map(|&t| t as u64).sum::<u64>();
            let t1: Vec<u32> = (0..9).collect();
            let mut a = SeqBlocks::default();
            assert!(kv.allocate(&mut a, 0, 9));
            kv.commit(&mut a, &t1, 9);
            kv.free(&mut a);
            let mut t2 = t1.clone();
            t2.swap(1, 2);
            assert_eq!((kv.hash)(0, &t2[..4]), (kv.hash)(0, &t1[..4]), "the test's collision");
            let mut b = SeqBlocks::default();
            assert_eq!(kv.match_prefix(&mut b, &t2), 0, "window {window:?}: other tokens, the same hash");
            kv.free(&mut b);
            // The same first block, then another: one block's hit.
            let mut t3 = t1.clone();
            t3[5] = 100;
            let mut c = SeqBlocks::default();
            assert_eq!(kv.match_prefix(&mut c, &t3), 4, "window {window:?}");
            kv.free(&mut c);
            let mut d = SeqBlocks::default();
            assert_eq!(kv.match_prefix(&mut d, &t1), 8, "window {window:?}: the same tokens");
            kv.free(&mut d);
            assert_eq!(kv.usage(), 0.0);
        }
    }

    #[test]
    fn sliding_window_release_and_prefix_hits_need_window_blocks() {
        let mut kv = KvManager::new(16, 4, 4, Some(4), true);
        let mut a = SeqBlocks::default();
        assert!(kv.allocate(&mut a, 0, 8));
        assert_eq!(kv.used_swa(), 2);
        let toks: Vec<u32> = (0..13).collect();
        kv.commit(&mut a, &toks, 8);
        // Next position 12 sees 9..=12: blocks 0 and 1 are released, blocks 2 and 3 allocated.
        assert!(kv.allocate(&mut a, 12, 13));
        assert_eq!(a.swa[0], NULL_BLOCK);
        assert_eq!(a.swa[1], NULL_BLOCK);
        assert_eq!(kv.used_swa(), 2);
        kv.commit(&mut a, &toks, 13);
        kv.free(&mut a);
        assert_eq!(kv.usage(), 0.0);
        // A hit at 12 needs the window block 2 (positions 9..11), which is cached.
        let mut b = SeqBlocks::default();
        assert_eq!(kv.match_prefix(&mut b, &toks), 12);
        assert_eq!(&b.swa[..2], &[NULL_BLOCK, NULL_BLOCK]);
        assert_ne!(b.swa[2], NULL_BLOCK);
        kv.free(&mut b);
        // Another sequence reallocates every sliding-window block: the full blocks are still
        // cached, but without the window block no hit is valid.
        let mut c = SeqBlocks::default();
        assert!(kv.allocate(&mut c, 0, 16));
        kv.free(&mut c);
        let mut d = SeqBlocks::default();
        assert_eq!(kv.match_prefix(&mut d, &toks), 0);
        kv.free(&mut d);
        assert_eq!(kv.usage(), 0.0);
        assert_eq!(kv.free_full(), 16);
    }
}
