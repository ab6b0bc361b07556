//! The embedded default model: its files are compiled into the binary and unpacked once into a
//! content-addressed cache directory, so `peregrine serve` works from anywhere with no download.

use std::path::PathBuf;

#[cfg(feature = "embedded-model")]
macro_rules! model_file {
    ($name:literal) => {
        ($name, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/peregrine-mimo-tiny/", $name)).as_slice())
    };
}

/// The small MiMo-V2 model trained on Python sources (`models/peregrine-mimo-tiny`, 21.5M
/// parameters, MXFP4 experts, with a 1.8M-parameter DFlash drafter; see its model card).
pub const NAME: &str = "peregrine-mimo-tiny";

#[cfg(feature = "embedded-model")]
const FILES: &[(&str, &[u8])] = &[
    model_file!("config.json"),
    model_file!("generation_config.json"),
    model_file!("model.safetensors.index.json"),
    model_file!("model-00001-of-00002.safetensors"),
    model_file!("model-00002-of-00002.safetensors"),
    model_file!("tokenizer.json"),
    model_file!("tokenizer_config.json"),
    // Its DFlash drafter: `serve` with no model speculates by default.
    model_file!("dflash/config.json"),
    model_file!("dflash/model.safetensors"),
];
/// A build without the `embedded-model` feature (e.g. a small binary for a GPU machine).
#[cfg(not(feature = "embedded-model"))]
const FILES: &[(&str, &[u8])] = &[];

fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Unpacks the embedded files (once per content) and returns the directory.
pub fn unpack() -> anyhow::Result<PathBuf> {
    anyhow::ensure!(!FILES.is_empty(), "this build has no embedded model (built without the `embedded-model` feature): give a MODEL");
    let hash = FILES.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, (n, b)| fnv1a(b, fnv1a(n.as_bytes(), h)));
    let base = peregrine_core::cache::root();
    // Files others may have written there would be served as the model.
    anyhow::ensure!(peregrine_core::cache::trusted(&base), "{} is writable by other users: set PEREGRINE_CACHE_DIR (or HOME) to a directory of your own", base.display());
    let dir = base.join(format!("{NAME}-{hash:016x}"));
    if FILES.iter().all(|(n, b)| std::fs::metadata(dir.join(n)).is_ok_and(|m| m.len() == b.len() as u64)) {
        return Ok(dir);
    }
    // Write into a private temp dir, then rename into place (safe against concurrent starts).
    std::fs::create_dir_all(&base)?;
    let tmp = base.join(format!(".tmp-{}-{:x}", std::process::id(), rand::random::<u64>()));
    std::fs::create_dir_all(tmp.join("dflash"))?;
    for (n, b) in FILES {
        std::fs::write(tmp.join(n), b)?;
    }
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        anyhow::ensure!(dir.is_dir(), "could not unpack the default model into {}", dir.display());
    }
    Ok(dir)
}
