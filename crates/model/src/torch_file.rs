//! Reads small `torch.save` files (zip archive + pickle) without Python: enough for DFlash's
//! `mask_embedding.pt` (`{"mask_token_id": int, "embedding": tensor}`).
//!
//! The pickle machine below knows the opcodes `torch.save` emits (protocol 2) and rebuilds
//! tensors from `torch._utils._rebuild_tensor_v2` over the archive's `data/<key>` storages.
//! Anything else (arbitrary classes, code execution) is refused, never run.

use std::io::Read;
use std::path::Path;

use peregrine_core::{Error, Result};

/// Largest archive entry read (data.pkl or one storage).
const MAX_ENTRY_BYTES: u64 = 1 << 30;
/// Approximate bytes of values one pickle may build, copies included. Memo reads and writes copy
/// (Python shares), so a few hundred bytes of memo reads can double a list per round; a
/// `torch.save` pickle builds a few KiB.
const VALUE_BUDGET: usize = 64 << 20;
/// Deepest container nesting a pickle may build: dropping, cloning and printing a value recurse
/// once per level, so an unbounded depth overflows the stack.
pub const MAX_DEPTH: usize = 1000;
/// Most elements `TorchFile::tensor` materialises.
const MAX_NUMEL: usize = 1 << 31;
/// A view may hold more elements than its storage only by repeating some (zero or overlapping
/// strides, as `expand` makes); such a view is materialised only up to this many elements.
const MAX_REPEATED_NUMEL: usize = 1 << 24;

/// A decoded pickle value.
#[derive(Debug, Clone, PartialEq)]
pub enum PickleValue {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Tuple(Vec<PickleValue>),
    List(Vec<PickleValue>),
    Dict(Vec<(PickleValue, PickleValue)>),
    /// `module name` of a GLOBAL not otherwise understood.
    Global(String),
    Storage { dtype: String, key: String, numel: usize },
    Tensor { dtype: String, key: String, offset: usize, shape: Vec<usize>, stride: Vec<usize> },
}

/// A tensor read from the archive, as f32.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A loaded `torch.save` file: its top-level object and access to its storages.
pub struct TorchFile {
    path: String,
    root: PickleValue,
    /// `(archive name, bytes)` of every `data/<key>` entry.
    storages: Vec<(String, Vec<u8>)>,
}

fn bad(path: &str, msg: impl std::fmt::Display) -> Error {
    Error::file(Path::new(path), msg.to_string())
}

impl TorchFile {
    pub fn open(path: &Path) -> Result<TorchFile> {
        let p = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
        let mut zip = zip::ZipArchive::new(file).map_err(|e| bad(&p, format!("not a torch zip archive: {e}")))?;
        let mut pkl = None;
        let mut storages = Vec::new();
        for i in 0..zip.len() {
            let mut f = zip.by_index(i).map_err(|e| bad(&p, e))?;
            let name = f.name().to_owned();
            let is_pkl = name.ends_with("/data.pkl") && name.matches('/').count() == 1;
            let is_storage = name.split('/').rev().nth(1) == Some("data");
            if !is_pkl && !is_storage {
                continue;
            }
            if f.size() > MAX_ENTRY_BYTES {
                return Err(bad(&p, format!("{name} is larger than 1 GiB")));
            }
            let mut buf = Vec::with_capacity(f.size() as usize);
            // The declared size is the header's word: bound what is actually read too.
            (&mut f).take(MAX_ENTRY_BYTES + 1).read_to_end(&mut buf).map_err(|e| bad(&p, format!("{name}: {e}")))?;
            if buf.len() as u64 > MAX_ENTRY_BYTES {
                return Err(bad(&p, format!("{name} is larger than 1 GiB")));
            }
            if is_pkl {
                pkl = Some(buf);
            } else {
                storages.push((name, buf));
            }
        }
        let pkl = pkl.ok_or_else(|| bad(&p, "no data.pkl in the archive"))?;
        let root = unpickle(&pkl).map_err(|e| bad(&p, format!("data.pkl: {e}")))?;
        Ok(TorchFile { path: p, root, storages })
    }

    pub fn root(&self) -> &PickleValue {
        &self.root
    }

    /// The value under string key `key` of a top-level dict.
    pub fn get(&self, key: &str) -> Option<&PickleValue> {
        match &self.root {
            PickleValue::Dict(items) => {
                items.iter().find(|(k, _)| matches!(k, PickleValue::Str(s) if s == key)).map(|(_, v)| v)
            }
            _ => None,
        }
    }

    /// Materialises a tensor value (f32/f16/bf16 storages, any strides within the storage).
    pub fn tensor(&self, v: &PickleValue) -> Result<TorchTensor> {
        let PickleValue::Tensor { dtype, key, offset, shape, stride } = v else {
            return Err(bad(&self.path, "expected a tensor"));
        };
        let bytes = self
            .storages
            .iter()
            .find(|(n, _)| n.rsplit('/').next() == Some(key.as_str()))
            .map(|(_, b)| b)
            .ok_or_else(|| bad(&self.path, format!("storage {key} missing from the archive")))?;
        let (width, decode): (usize, fn(&[u8]) -> f32) = match dtype.as_str() {
            "FloatStorage" => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            "HalfStorage" => (2, |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
            "BFloat16Storage" => (2, |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
            o => return Err(bad(&self.path, format!("unsupported tensor storage {o} (float, half, bfloat16)"))),
        };
        if shape.len() != stride.len() {
            return Err(bad(&self.path, "tensor shape and stride differ in rank"));
        }
        // Everything below is checked before allocating: the shape comes from the file.
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(&self.path, format!("tensor shape {shape:?} overflows the element count")))?;
        if numel == 0 {
            return Ok(TorchTensor { shape: shape.clone(), data: Vec::new() });
        }
        if numel > MAX_NUMEL {
            return Err(bad(&self.path, format!("tensor shape {shape:?} has {numel} elements, more than {MAX_NUMEL}")));
        }
        // Strides are non-negative, so the last element is the farthest one from the offset.
        let last = shape
            .iter()
            .zip(stride)
            .try_fold(*offset, |a, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| a.checked_add(x)))
            .ok_or_else(|| {
                bad(&self.path, format!("tensor offset {offset}, shape {shape:?}, stride {stride:?} overflow"))
            })?;
        let elems = bytes.len() / width;
        if last >= elems {
            return Err(bad(
                &self.path,
                format!("tensor reaches element {last} but storage {key} holds {elems} {width}-byte elements"),
            ));
        }
        if numel > elems && numel > MAX_REPEATED_NUMEL {
            return Err(bad(
                &self.path,
                format!(
                    "tensor shape {shape:?} repeats storage {key} ({elems} elements) into {numel} elements, \
                     more than {MAX_REPEATED_NUMEL}"
                ),
            ));
        }
        let mut data = Vec::with_capacity(numel);
        let mut idx = vec![0usize; shape.len()];
        for _ in 0..numel {
            // In bounds: e <= last < elems.
            let e = offset + idx.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
            data.push(decode(&bytes[e * width..(e + 1) * width]));
            // Row-major increment.
            for d in (0..idx.len()).rev() {
                idx[d] += 1;
                if idx[d] < shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Ok(TorchTensor { shape: shape.clone(), data })
    }
}

/// A short description of `v` for error messages (a container's contents could be megabytes).
fn brief(v: &PickleValue) -> String {
    match v {
        PickleValue::Tuple(x) => format!("a tuple of {} items", x.len()),
        PickleValue::List(x) => format!("a list of {} items", x.len()),
        PickleValue::Dict(x) => format!("a dict of {} items", x.len()),
        PickleValue::Str(s) if s.len() > 64 => format!("a string of {} bytes", s.len()),
        o => format!("{o:?}"),
    }
}

fn as_usizes(v: &PickleValue) -> std::result::Result<Vec<usize>, String> {
    match v {
        PickleValue::Tuple(items) | PickleValue::List(items) => items
            .iter()
            .map(|x| match x {
                PickleValue::Int(n) if *n >= 0 => Ok(*n as usize),
                o => Err(format!("expected a non-negative integer, got {}", brief(o))),
            })
            .collect(),
        o => Err(format!("expected a tuple of integers, got {}", brief(o))),
    }
}

/// A value on the pickle stack or in the memo, with its nesting depth and approximate size in bytes
/// kept up to date as it is built, so the limits are checked without walking it.
#[derive(Clone)]
struct Entry {
    v: PickleValue,
    depth: usize,
    cost: usize,
}

impl Entry {
    /// A value holding no other values.
    fn leaf(v: PickleValue) -> Entry {
        let heap = match &v {
            PickleValue::Str(s) | PickleValue::Global(s) => s.len(),
            PickleValue::Storage { dtype, key, .. } => dtype.len() + key.len(),
            PickleValue::Tensor { dtype, key, shape, stride, .. } => {
                dtype.len() + key.len() + 8 * (shape.len() + stride.len())
            }
            _ => 0,
        };
        Entry { v, depth: 1, cost: std::mem::size_of::<PickleValue>() + heap }
    }

    /// Adds `items` (already built and paid for) to this container's depth and size.
    fn absorb(&mut self, items: &[Entry]) -> std::result::Result<(), String> {
        for it in items {
            self.depth = self.depth.max(it.depth + 1);
            self.cost += it.cost;
        }
        if self.depth > MAX_DEPTH {
            return Err(format!("pickle nests containers {} deep, more than {MAX_DEPTH}", self.depth));
        }
        Ok(())
    }

    fn tuple(items: Vec<Entry>) -> std::result::Result<Entry, String> {
        let mut t = Entry::leaf(PickleValue::Tuple(Vec::new()));
        t.absorb(&items)?;
        t.v = PickleValue::Tuple(items.into_iter().map(|e| e.v).collect());
        Ok(t)
    }
}

/// Bytes of values built so far, every copy counted, against `VALUE_BUDGET`.
struct Budget(usize);

impl Budget {
    fn charge(&mut self, cost: usize) -> std::result::Result<(), String> {
        self.0 = self.0.saturating_add(cost);
        if self.0 > VALUE_BUDGET {
            return Err(format!(
                "pickle builds more than {} MiB of values (memo copies included), far beyond a torch.save file",
                VALUE_BUDGET >> 20
            ));
        }
        Ok(())
    }

    /// Pays for a new value and returns it.
    fn leaf(&mut self, v: PickleValue) -> std::result::Result<Entry, String> {
        let e = Entry::leaf(v);
        self.charge(e.cost)?;
        Ok(e)
    }

    /// Pays for a copy of `e` (memo reads and writes copy the whole value).
    fn copy(&mut self, e: &Entry) -> std::result::Result<Entry, String> {
        self.charge(e.cost)?;
        Ok(e.clone())
    }
}

/// Runs the pickle program and returns its result.
///
/// Refuses a program that builds more than `VALUE_BUDGET` bytes of values or nests containers more
/// than `MAX_DEPTH` deep, so a small crafted file can neither exhaust memory nor the stack.
pub fn unpickle(code: &[u8]) -> std::result::Result<PickleValue, String> {
    use PickleValue as V;
    let mut stack: Vec<Entry> = Vec::new();
    let mut marks: Vec<usize> = Vec::new();
    let mut memo: std::collections::HashMap<u32, Entry> = Default::default();
    let mut budget = Budget(0);
    let mut i = 0usize;
    let take = |i: &mut usize, n: usize| -> std::result::Result<&[u8], String> {
        let s = code.get(*i..*i + n).ok_or("truncated pickle")?;
        *i += n;
        Ok(s)
    };
    let pop_mark = |stack: &mut Vec<Entry>, marks: &mut Vec<usize>| -> std::result::Result<Vec<Entry>, String> {
        let m = marks.pop().ok_or("MARK missing")?;
        if m > stack.len() {
            return Err("corrupt MARK".into());
        }
        Ok(stack.split_off(m))
    };
    loop {
        let op = *code.get(i).ok_or("pickle ends without STOP")?;
        i += 1;
        match op {
            0x80 => {
                take(&mut i, 1)?; // PROTO
            }
            0x95 => {
                take(&mut i, 8)?; // FRAME
            }
            b'.' => return stack.pop().map(|e| e.v).ok_or_else(|| "empty stack at STOP".into()),
            b'}' => stack.push(budget.leaf(V::Dict(Vec::new()))?),
            b']' => stack.push(budget.leaf(V::List(Vec::new()))?),
            b')' => stack.push(budget.leaf(V::Tuple(Vec::new()))?),
            b'(' => {
                budget.charge(std::mem::size_of::<usize>())?;
                marks.push(stack.len())
            }
            b'N' => stack.push(budget.leaf(V::None)?),
            0x88 => stack.push(budget.leaf(V::Bool(true))?),
            0x89 => stack.push(budget.leaf(V::Bool(false))?),
            b'K' => stack.push(budget.leaf(V::Int(take(&mut i, 1)?[0] as i64))?),
            b'M' => {
                let b = take(&mut i, 2)?;
                stack.push(budget.leaf(V::Int(u16::from_le_bytes([b[0], b[1]]) as i64))?)
            }
            b'J' => {
                let b = take(&mut i, 4)?;
                stack.push(budget.leaf(V::Int(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64))?)
            }
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = take(&mut i, 1)?[0] as usize;
                let b = take(&mut i, n)?;
                if n > 8 {
                    return Err("integer wider than 64 bits".into());
                }
                let mut v: i64 = 0;
                for (k, &x) in b.iter().enumerate() {
                    v |= (x as i64) << (8 * k);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(budget.leaf(V::Int(v))?);
            }
            b'G' => {
                let b = take(&mut i, 8)?;
                stack.push(budget.leaf(V::Float(f64::from_be_bytes(b.try_into().unwrap())))?);
            }
            b'X' | 0x8c => {
                let n = if op == b'X' {
                    let b = take(&mut i, 4)?;
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
                } else {
                    take(&mut i, 1)?[0] as usize
                };
                let s = std::str::from_utf8(take(&mut i, n)?).map_err(|_| "invalid UTF-8 string")?;
                stack.push(budget.leaf(V::Str(s.to_owned()))?);
            }
            b'c' => {
                // GLOBAL "module\nname\n"
                let mut parts = Vec::new();
                for _ in 0..2 {
                    let end = code[i..].iter().position(|&c| c == b'\n').ok_or("unterminated GLOBAL")?;
                    parts.push(String::from_utf8_lossy(&code[i..i + end]).into_owned());
                    i += end + 1;
                }
                stack.push(budget.leaf(V::Global(format!("{} {}", parts[0], parts[1])))?);
            }
            0x93 => {
                // STACK_GLOBAL
                let name = stack.pop().ok_or("stack underflow")?;
                let module = stack.pop().ok_or("stack underflow")?;
                match (module.v, name.v) {
                    (V::Str(m), V::Str(n)) => stack.push(budget.leaf(V::Global(format!("{m} {n}")))?),
                    _ => return Err("STACK_GLOBAL needs two strings".into()),
                }
            }
            b'q' | b'r' | 0x94 => {
                let k = match op {
                    b'q' => take(&mut i, 1)?[0] as u32,
                    b'r' => {
                        let b = take(&mut i, 4)?;
                        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
                    }
                    _ => memo.len() as u32,
                };
                let e = budget.copy(stack.last().ok_or("stack underflow")?)?;
                memo.insert(k, e);
            }
            b'h' | b'j' => {
                let k = if op == b'h' {
                    take(&mut i, 1)?[0] as u32
                } else {
                    let b = take(&mut i, 4)?;
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
                };
                let e = budget.copy(memo.get(&k).ok_or("unknown memo key")?)?;
                stack.push(e);
            }
            b't' => {
                let items = pop_mark(&mut stack, &mut marks)?;
                budget.charge(std::mem::size_of::<V>())?;
                stack.push(Entry::tuple(items)?);
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    return Err("stack underflow".into());
                }
                let items = stack.split_off(stack.len() - n);
                budget.charge(std::mem::size_of::<V>())?;
                stack.push(Entry::tuple(items)?);
            }
            b'a' | b'e' => {
                let items = if op == b'e' { pop_mark(&mut stack, &mut marks)? } else { vec![stack.pop().ok_or("stack underflow")?] };
                let list = match stack.last_mut() {
                    Some(e) if matches!(e.v, V::List(_)) => e,
                    _ => return Err("APPEND to a non-list".into()),
                };
                list.absorb(&items)?;
                if let V::List(l) = &mut list.v {
                    l.extend(items.into_iter().map(|e| e.v));
                }
            }
            b's' | b'u' => {
                let items = if op == b'u' {
                    pop_mark(&mut stack, &mut marks)?
                } else {
                    let v = stack.pop().ok_or("stack underflow")?;
                    let k = stack.pop().ok_or("stack underflow")?;
                    vec![k, v]
                };
                if items.len() % 2 != 0 {
                    return Err("SETITEMS with an odd number of items".into());
                }
                let dict = match stack.last_mut() {
                    Some(e) if matches!(e.v, V::Dict(_)) => e,
                    _ => return Err("SETITEM on a non-dict".into()),
                };
                dict.absorb(&items)?;
                if let V::Dict(d) = &mut dict.v {
                    let mut it = items.into_iter().map(|e| e.v);
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.push((k, v));
                    }
                }
            }
            b'Q' => {
                // BINPERSID: ('storage', StorageType, key, location, numel)
                let pid = stack.pop().ok_or("stack underflow")?;
                let V::Tuple(t) = pid.v else { return Err("persistent id is not a tuple".into()) };
                match t.as_slice() {
                    [V::Str(kind), V::Global(ty), V::Str(key), _, V::Int(numel)]
                        if kind == "storage" && *numel >= 0 =>
                    {
                        let dtype = ty.rsplit(' ').next().unwrap_or_default().to_owned();
                        stack.push(budget.leaf(V::Storage { dtype, key: key.clone(), numel: *numel as usize })?);
                    }
                    other => {
                        let items: Vec<String> = other.iter().take(5).map(brief).collect();
                        let n = other.len();
                        return Err(format!("unsupported persistent id ({n} items: {}, ...)", items.join(", ")));
                    }
                }
            }
            b'R' => {
                let args = stack.pop().ok_or("stack underflow")?;
                let func = stack.pop().ok_or("stack underflow")?;
                let V::Tuple(args) = args.v else { return Err("REDUCE arguments are not a tuple".into()) };
                let V::Global(name) = func.v else { return Err("REDUCE of a non-global".into()) };
                match name.as_str() {
                    "torch._utils _rebuild_tensor_v2" | "torch._utils _rebuild_tensor" => {
                        let (Some(V::Storage { dtype, key, .. }), Some(V::Int(off)), Some(shape), Some(stride)) =
                            (args.first(), args.get(1), args.get(2), args.get(3))
                        else {
                            return Err("malformed _rebuild_tensor_v2 call".into());
                        };
                        if *off < 0 {
                            return Err(format!("negative tensor storage offset {off}"));
                        }
                        stack.push(budget.leaf(V::Tensor {
                            dtype: dtype.clone(),
                            key: key.clone(),
                            offset: *off as usize,
                            shape: as_usizes(shape)?,
                            stride: as_usizes(stride)?,
                        })?);
                    }
                    "collections OrderedDict" => stack.push(budget.leaf(V::Dict(Vec::new()))?),
                    other => return Err(format!("refusing to call `{other}`")),
                }
            }
            b'b' => {
                // BUILD: state for OrderedDict/tensor metadata; ignored.
                stack.pop().ok_or("stack underflow")?;
            }
            other => return Err(format!("unsupported pickle opcode 0x{other:02x} at byte {}", i - 1)),
        }
    }
}
