//! safetensors checkpoints through mmap: one `model.safetensors`, any single `.safetensors` file,
//! or shards listed by `model.safetensors.index.json`. Tensors are looked up by name and borrowed
//! straight from the mapping, so the checkpoint is never held in memory twice.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use peregrine_core::{DType, Error, Result};

/// A borrowed tensor: element type, shape and raw little-endian bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

impl TensorView<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

pub struct Checkpoint {
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, Entry>,
}

impl Checkpoint {
    /// Opens a model directory (sharded index or `model.safetensors`, else the only
    /// `.safetensors` file in it) or a single `.safetensors` file.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        if path.is_file() {
            return Checkpoint::open_files(&[path.to_path_buf()]);
        }
        let index = path.join("model.safetensors.index.json");
        if index.is_file() {
            let v = crate::config::read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::file(&index, "no `weight_map` object"))?;
            let mut shards: Vec<String> = Vec::new();
            for (name, f) in map {
                let f = f.as_str().ok_or_else(|| Error::file(&index, format!("weight_map[{name}] is not a file name")))?;
                // A shard lies in the model's directory: an absolute path or `..` would read
                // whatever file the index names.
                if Path::new(f).components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                    return Err(Error::file(&index, format!("weight_map[{name}]: `{f}` is not a file in the model's directory")));
                }
                if !shards.iter().any(|s| s == f) {
                    shards.push(f.to_owned());
                }
            }
            let paths: Vec<PathBuf> = shards.iter().map(|s| path.join(s)).collect();
            for p in &paths {
                if !p.is_file() {
                    return Err(Error::file(p, "shard listed in model.safetensors.index.json is missing"));
                }
            }
            let ck = Checkpoint::open_files(&paths)?;
            for (name, f) in map {
                // In the shard the index names (a tensor in another one is a stale index).
                if ck.file_of(name) != Some(path.join(f.as_str().unwrap_or_default()).as_path()) {
                    return Err(Error::tensor(name, format!("listed in {} but absent from its shard", index.display())));
                }
            }
            return Ok(ck);
        }
        let single = path.join("model.safetensors");
        if single.is_file() {
            return Checkpoint::open_files(&[single]);
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::file(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        found.sort();
        if found.is_empty() {
            return Err(Error::file(path, "no .safetensors weights found"));
        }
        Checkpoint::open_files(&found)
    }

    pub fn open_files(paths: &[PathBuf]) -> Result<Checkpoint> {
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        for (fi, p) in paths.iter().enumerate() {
            let f = File::open(p).map_err(|e| Error::file(p, e))?;
            // SAFETY: the mapping is read-only; a checkpoint modified while served is a user error
            // that can at worst produce wrong numbers, never memory unsafety in safe code reading
            // plain bytes.
            let mmap = unsafe { Mmap::map(&f) }.map_err(|e| Error::file(p, e))?;
            let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::file(p, format!("not a valid safetensors file: {e}")))?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = map_dtype(info.dtype).ok_or_else(|| {
                    Error::tensor(&name, format!("unsupported dtype {:?} in {}", info.dtype, p.display()))
                })?;
                let (s, e) = info.data_offsets;
                if base + e > mmap.len() {
                    return Err(Error::tensor(&name, format!("data past the end of {} (truncated file?)", p.display())));
                }
                // Two shards holding one name: which to serve would be a guess.
                if let Some(first) = tensors.get(&name).map(|t: &Entry| t.file) {
                    return Err(Error::tensor(&name, format!("in both {} and {}", paths[first].display(), p.display())));
                }
                tensors.insert(name, Entry { file: fi, dtype, shape: info.shape.clone(), start: base + s, end: base + e });
            }
            files.push((p.clone(), mmap));
        }
        Ok(Checkpoint { files, tensors })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn get(&self, name: &str) -> Result<TensorView<'_>> {
        let e = self.tensors.get(name).ok_or_else(|| Error::tensor(name, "missing from the checkpoint"))?;
        let data = &self.files[e.file].1[e.start..e.end];
        let want = e.shape.iter().product::<usize>() * e.dtype.size();
        if data.len() != want {
            return Err(Error::tensor(name, format!("{} bytes for shape {:?} of {:?} (expected {want})", data.len(), e.shape, e.dtype)));
        }
        Ok(TensorView { dtype: e.dtype, shape: &e.shape, data })
    }

    /// The file a tensor lives in (for error messages).
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.tensors.get(name).map(|e| self.files[e.file].0.as_path())
    }
}

fn map_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::F8_E4M3 => DType::F8E4M3,
        S::U8 => DType::U8,
        S::I8 => DType::I8,
        S::I32 => DType::I32,
        S::I64 => DType::I64,
        _ => return None,
    })
}
