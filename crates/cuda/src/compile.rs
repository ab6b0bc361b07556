//! NVRTC compilation of the embedded kernel sources, cached on disk by content hash (source,
//! architecture, options), so a server start compiles each kernel file once per GPU type, and
//! the files a start lacks all at once (`prepare`). For a real architecture (`sm_90a`) the cache
//! holds the CUBIN NVRTC assembled as well as the PTX, and modules load from the CUBIN: the
//! driver then has nothing to compile (from PTX it took 58.8 s on a fresh H200 machine).

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::Ptx;
use peregrine_core::{Error, Result};

/// The kernel sources compiled into the binary, each behind `kernels/common.cuh` and the headers
/// named (NVRTC gets no include paths; line numbers in its messages count the headers' lines
/// too).
macro_rules! kernel_source {
    ($file:literal $(, $header:literal)*) => {
        concat!(include_str!("../../../kernels/common.cuh"), $(include_str!(concat!("../../../kernels/", $header)),)* include_str!(concat!("../../../kernels/", $file)))
    };
}
/// moe.cu's and gemv.cu's wgmma GEMMs share the warpgroup MMA helpers (`wgmma.cuh`).
pub const GEMV_CU: &str = kernel_source!("gemv.cu", "wgmma.cuh");
/// ops.cu's moe_route and moe.cu's routed fused kernel share the router (`route.cuh`).
pub const OPS_CU: &str = kernel_source!("ops.cu", "route.cuh");
pub const SAMPLE_CU: &str = kernel_source!("sample.cu");
pub const MOE_CU: &str = kernel_source!("moe.cu", "route.cuh", "wgmma.cuh");

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(&[0xffu8]) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// The compiled kernels' directory: `kernels` under the cache's root (`peregrine_core::cache`).
pub fn cache_dir() -> PathBuf {
    peregrine_core::cache::root().join("kernels")
}

const OPTIONS: &[&str] = &["--std=c++17", "-lineinfo"];

/// The NVRTC options for kernel file `name`: `OPTIONS`, then each word of
/// `PEREGRINE_KERNEL_DEFINES` (for measurement builds only, e.g. `-DMOE_TRACE`; they are part of
/// the cache key). `PEREGRINE_KERNEL_DEFINES_IN=gemv,ops` gives them to those files only, so a
/// measurement of one file's variants does not recompile the others (NVRTC takes ~a minute per
/// file on the GPU machine). A word `file:-DNAME` goes to that file only, whatever the list says
/// (`-DSTEP_TRACE ops:-DATT_MARK=2`: a trace of every kernel, a variant of one file).
fn options(name: &str) -> Vec<String> {
    let defines = DEFINES_OVERRIDE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let defines = defines.unwrap_or_else(|| std::env::var("PEREGRINE_KERNEL_DEFINES").unwrap_or_default());
    options_with(name, &defines, std::env::var("PEREGRINE_KERNEL_DEFINES_IN").ok().as_deref())
}

/// `PEREGRINE_KERNEL_DEFINES`' value while `with_defines` runs (benchmarks loading a second set
/// of kernels: `CudaModel::load_kernel_set`).
static DEFINES_OVERRIDE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Runs `f` with the kernels compiled under `defines` (as if `PEREGRINE_KERNEL_DEFINES` held
/// them), for benchmarks comparing two builds of the kernels in one process.
pub fn with_defines<T>(defines: &str, f: impl FnOnce() -> T) -> T {
    let before = DEFINES_OVERRIDE.lock().unwrap_or_else(|e| e.into_inner()).replace(defines.to_string());
    let out = f();
    *DEFINES_OVERRIDE.lock().unwrap_or_else(|e| e.into_inner()) = before;
    out
}

/// `options`, then a production variant's defines (after the measurement ones).
fn variant_options(name: &str, variant: &[&str]) -> Vec<String> {
    let mut o = options(name);
    o.extend(variant.iter().map(|d| d.to_string()));
    o
}

/// `options` given the two variables' values.
fn options_with(name: &str, defines: &str, only_in: Option<&str>) -> Vec<String> {
    let applies = match only_in.map(str::trim) {
        None | Some("") => true,
        Some(files) => files.split(',').any(|f| f.trim() == name),
    };
    let words = defines.split_whitespace().filter_map(|w| match w.split_once(':') {
        Some((file, define)) => (file == name).then_some(define),
        None => applies.then_some(w),
    });
    OPTIONS.iter().map(|s| s.to_string()).chain(words.map(str::to_string)).collect()
}

/// The cache file of kernel file `name`'s PTX: `{name}-{arch}-{key}.ptx`, the key FNV-1a 64 over
/// the source, the arch and the options; its CUBIN (`cubin_path`) is beside it, `.cubin`.
/// tools/kernel_report.py (`--fill-cache`) names its files the same way, so kernels compiled
/// without a GPU are found on the GPU machine.
fn cache_file_name(name: &str, src: &str, arch: &str, options: &[String]) -> String {
    let key = fnv1a(&[src.as_bytes(), arch.as_bytes(), options.join(" ").as_bytes()]);
    format!("{name}-{arch}-{key:016x}.ptx")
}

/// Every kernel file, by the name its cache files and loads use.
const FILES: [(&str, &str); 4] = [("gemv", GEMV_CU), ("sample", SAMPLE_CU), ("moe", MOE_CU), ("ops", OPS_CU)];

/// moe.cu's parts (its `MOE_PART`), each a build and a module of its own holding disjoint
/// kernels: NVRTC compiles a program on one core, and moe.cu whole took 46.3 s on a 2-core
/// machine (gemv.cu 13.0, ops.cu 11.5), so a first start on a new GPU type waited on it alone.
/// The parts took 9.5-13.4 s; each kernel's SASS is the whole file's
/// (benches/results/2026-11-30-moe-in-parts.md). tools/kernel_report.py reads this list.
pub const MOE_PARTS: [&[&str]; 4] = [&["-DMOE_PART=0"], &["-DMOE_PART=1"], &["-DMOE_PART=2"], &["-DMOE_PART=3"]];

/// The builds of kernel file `name` a server loads: moe.cu's parts, else the file as it is.
fn file_builds(name: &str) -> &'static [&'static [&'static str]] {
    if name == "moe" {
        &MOE_PARTS
    } else {
        &[&[]]
    }
}

/// Every file's builds (name, source, variant defines), in `FILES`' order.
fn production_builds() -> impl Iterator<Item = (&'static str, &'static str, &'static [&'static str])> {
    FILES.iter().flat_map(|&(name, src)| file_builds(name).iter().map(move |&v| (name, src, v)))
}

/// Whether libnvrtc can be loaded (without it the first NVRTC call would panic).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen libnvrtc.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// ops.cu's production variant for BF16 K/V pools (its `kv_t`).
pub const OPS_KV_BF16: &[&str] = &["-DKV_BF16"];
/// ops.cu's production variant for FP8 e4m3 K/V pools.
pub const OPS_KV_FP8: &[&str] = &["-DKV_FP8"];

/// Compiles every build a server may load for `arch` (each kernel file, and ops.cu's for BF16
/// and FP8 K/V pools) into the kernel cache, each on a thread of its own, without a GPU: what
/// `peregrine compile-kernels` runs so that a later start (a container image's) finds them all.
/// Returns each build's PTX cache file and whether it was compiled now (false: it was cached).
pub fn fill(arch: &str) -> Result<Vec<(PathBuf, bool)>> {
    let files: Vec<(&str, &str, &[&str])> = production_builds().chain([("ops", OPS_CU, OPS_KV_BF16), ("ops", OPS_CU, OPS_KV_FP8)]).collect();
    fill_in(&cache_dir(), &files, arch)
}

/// `fill` for `files` (name, source, variant defines) and the cache directory `dir`: unlike
/// `prepare`, every failure is an error (NVRTC's, or a cache that cannot be written), each
/// build's in the one returned.
fn fill_in(dir: &std::path::Path, files: &[(&str, &str, &[&str])], arch: &str) -> Result<Vec<(PathBuf, bool)>> {
    if !nvrtc_present() {
        return Err(Error::Backend("libnvrtc (CUDA 13's NVRTC) was not found: install the CUDA runtime libraries, or point LD_LIBRARY_PATH at the directory holding libnvrtc.so.13".into()));
    }
    std::thread::scope(|s| {
        let builds: Vec<_> = files
            .iter()
            .map(|&(name, src, variant)| {
                s.spawn(move || -> Result<(PathBuf, bool)> {
                    let options = variant_options(name, variant);
                    let file = cache_file_name(name, src, arch, &options);
                    let path = dir.join(&file);
                    if is_cached(dir, &file, arch) {
                        return Ok((path, false));
                    }
                    let compiled = compile(name, src, arch, options)?;
                    if !store(&path, &compiled) {
                        return Err(Error::Backend(format!("could not write the kernel cache file {}", path.display())));
                    }
                    Ok((path, true))
                })
            })
            .collect();
        let results: Vec<Result<(PathBuf, bool)>> = builds.into_iter().map(|b| b.join().unwrap_or_else(|_| Err(Error::Backend("a kernel compile thread panicked".into())))).collect();
        let errors: Vec<String> = results.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
        if errors.is_empty() {
            Ok(results.into_iter().flatten().collect())
        } else {
            Err(Error::Backend(format!("{} of {} kernel builds failed:\n{}", errors.len(), results.len(), errors.join("\n"))))
        }
    })
}

/// The CUBIN beside the PTX cache file `ptx`.
fn cubin_path(ptx: &std::path::Path) -> PathBuf {
    ptx.with_extension("cubin")
}

/// Whether NVRTC assembles a CUBIN for `arch`: a real architecture (`sm_90a`), not a virtual one
/// (`compute_90a`).
fn makes_cubin(arch: &str) -> bool {
    arch.starts_with("sm_")
}

/// Whether the cache holds everything a load of `file` (a PTX cache file name) for `arch` reads,
/// whole: the PTX and, for a real architecture, the CUBIN (a cache filled before CUBINs were kept
/// is compiled again once, rather than leaving every fresh GPU machine to compile its PTX; a file
/// a crash left empty or truncated is compiled again, rather than the PTX being JIT-compiled at
/// every start).
fn is_cached(dir: &std::path::Path, file: &str, arch: &str) -> bool {
    read_cached(dir, file, arch).is_some()
}

/// The cache's entry for `file` and `arch`, where it is there, whole and may be read
/// (`peregrine_core::cache::trusted`). (A PTX cut short is found only by the driver: `load_variant`
/// compiles it again then.)
fn read_cached(dir: &std::path::Path, file: &str, arch: &str) -> Option<Compiled> {
    if !peregrine_core::cache::trusted(dir) {
        return None;
    }
    let path = dir.join(file);
    let ptx = std::fs::read_to_string(&path).ok().filter(|p| !p.is_empty())?;
    let cubin = match makes_cubin(arch) {
        true => Some(std::fs::read(cubin_path(&path)).ok().filter(|b| whole_elf(b))?),
        false => None,
    };
    Some(Compiled { ptx, cubin })
}

/// A kernel file compiled: its PTX and, for a real architecture, the CUBIN NVRTC assembled from
/// it (the driver loads that as it is; the PTX it would compile first).
#[derive(Clone, Debug)]
pub struct Compiled {
    pub ptx: String,
    pub cubin: Option<Vec<u8>>,
}

/// Kernels that `prepare` compiled and could not write to the cache, by cache file name, until a
/// load takes them.
static PREPARED: std::sync::Mutex<Vec<(String, Compiled)>> = std::sync::Mutex::new(Vec::new());

/// Compiles every kernel build whose PTX for `arch` is not in the cache yet, each on a thread of
/// its own, so that the loads after it find them: NVRTC compiles a program on one core, so a
/// first start on a new GPU type waits for the slowest build instead of all in turn (2 cores:
/// 98 s against 139 when moe.cu was one build of 88 s,
/// benches/results/2026-11-30-kernel-compile-at-once.md; hence `MOE_PARTS`). Best effort: a build that fails here
/// fails again, with its error, in a load. (Loading PTX modules on threads as well, where the
/// driver compiles the PTX for the GPU, measured no faster: 48-53 against 44-55 s on an H200;
/// modules now load from the CUBIN, which the driver does not compile.)
/// Production variants asked for with `prepare_variant` are compiled with them.
pub fn prepare(arch: &'static str) {
    prepare_in(&cache_dir(), &prepare_files(), arch);
}

/// What `prepare` compiles: every kernel file's builds, then the variants asked for.
fn prepare_files() -> Vec<(&'static str, &'static str, &'static [&'static str])> {
    let variants = VARIANTS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let variants = variants.into_iter().filter_map(|(name, defines)| FILES.iter().find(|f| f.0 == name).map(|&(_, src)| (name, src, defines)));
    production_builds().chain(variants).collect()
}

/// Production variants (`load_variant`'s defines) that `prepare` compiles too, by file name.
static VARIANTS: std::sync::Mutex<Vec<(&'static str, &'static [&'static str])>> = std::sync::Mutex::new(Vec::new());

/// Asks the next `prepare` calls to compile kernel file `name` under `defines` as well (ops.cu's
/// BF16-pool build when the server is told `--kv-cache-dtype bfloat16`: otherwise a first start on
/// a new GPU type compiles it alone after the others: ops.cu took 25.6 s on a 2-core machine;
/// on an H200 host an empty cache's files took 67.5 s at once, moe.cu's time).
pub fn prepare_variant(name: &'static str, defines: &'static [&'static str]) {
    let mut v = VARIANTS.lock().unwrap_or_else(|e| e.into_inner());
    if !v.contains(&(name, defines)) {
        v.push((name, defines));
    }
}

/// `prepare` for `files` (name, source, variant defines) and the cache directory `dir`.
fn prepare_in(dir: &std::path::Path, files: &[(&str, &str, &[&str])], arch: &'static str) {
    let missing: Vec<(&str, &str, Vec<String>, String)> = files
        .iter()
        .filter_map(|&(name, src, variant)| {
            let options = variant_options(name, variant);
            let file = cache_file_name(name, src, arch, &options);
            let held = PREPARED.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|(f, _)| *f == file);
            (!held && !is_cached(dir, &file, arch)).then_some((name, src, options, file))
        })
        .collect();
    if missing.len() < 2 {
        return;
    }
    // Said before the wait, which is otherwise a silent minute between "listening" and "ready".
    let builds: Vec<String> = missing.iter().map(|(name, _, options, _)| build_name(name, options)).collect();
    tracing::info!(
        "compiling {} for {arch} with NVRTC, at once (a first start on this GPU type or version: ~25 s on a many-core host; `peregrine compile-kernels` does it ahead); cached in {}",
        builds.join(", "),
        dir.display()
    );
    let t0 = std::time::Instant::now();
    // Each build's time, so that the log names the one a first start waited for.
    let times: Vec<(String, f64)> = std::thread::scope(|s| {
        let builds: Vec<_> = missing
            .into_iter()
            .map(|(name, src, options, file)| {
                let build = build_name(name, &options);
                s.spawn(move || {
                    let t = std::time::Instant::now();
                    if let Ok(compiled) = compile(name, src, arch, options) {
                        if !store(&dir.join(&file), &compiled) {
                            PREPARED.lock().unwrap_or_else(|e| e.into_inner()).push((file, compiled));
                        }
                    }
                    (build, t.elapsed().as_secs_f64())
                })
            })
            .collect();
        builds.into_iter().filter_map(|b| b.join().ok()).collect()
    });
    let slowest = times.iter().max_by(|a, b| a.1.total_cmp(&b.1)).map(|(b, t)| format!(" (the slowest {b}, {t:.1} s)")).unwrap_or_default();
    tracing::info!("kernels compiled in {:.1} s{slowest}", t0.elapsed().as_secs_f64());
}

/// A build's name in messages: the file, and the defines that are not every build's.
fn build_name(name: &str, opts: &[String]) -> String {
    let every = options(name);
    let defines: Vec<&str> = opts.iter().map(String::as_str).filter(|o| !every.iter().any(|c| c == o)).collect();
    if defines.is_empty() {
        format!("{name}.cu")
    } else {
        format!("{name}.cu ({})", defines.join(" "))
    }
}

/// Compiles `src` for `arch` with NVRTC: the PTX, and the CUBIN NVRTC assembled from it for a
/// real architecture (the same `--gpu-architecture` option cudarc's `compile_ptx_with_opts`
/// gives, so the PTX is what it would be).
fn compile(name: &str, src: &str, arch: &str, options: Vec<String>) -> Result<Compiled> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::{CStr, CString};
    let fail = |what: String| Error::Backend(format!("NVRTC failed on {name}.cu for {arch}: {what}"));
    let c_src = CString::new(src).map_err(|e| fail(e.to_string()))?;
    let c_name = CString::new(format!("{name}.cu")).map_err(|e| fail(e.to_string()))?;
    /// Destroys the program however `compile` returns.
    struct Program(sys::nvrtcProgram);
    impl Drop for Program {
        fn drop(&mut self) {
            // SAFETY: created by create_program, destroyed once, here.
            let _ = unsafe { result::destroy_program(self.0) };
        }
    }
    let prog = Program(result::create_program(&c_src, Some(&c_name)).map_err(|e| fail(format!("{e:?}")))?);
    let options: Vec<String> = std::iter::once(format!("--gpu-architecture={arch}")).chain(options).collect();
    // SAFETY (each call below): `prog` is a live program, compiled before anything is read back.
    if let Err(e) = unsafe { result::compile_program(prog.0, &options) } {
        let log = unsafe { result::get_program_log(prog.0) }.ok();
        let log = log.map(|l| unsafe { CStr::from_ptr(l.as_ptr()) }.to_string_lossy().into_owned()).unwrap_or_default();
        return Err(fail(format!("{e:?} (options {options:?})\n{log}")));
    }
    let ptx = unsafe { result::get_ptx(prog.0) }.map_err(|e| fail(format!("{e:?}")))?;
    let ptx = unsafe { CStr::from_ptr(ptx.as_ptr()) }.to_string_lossy().into_owned();
    let cubin = if makes_cubin(arch) {
        let mut size = 0usize;
        unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) }.result().map_err(|e| fail(format!("CUBIN size: {e:?}")))?;
        let mut bin = vec![0u8; size];
        unsafe { sys::nvrtcGetCUBIN(prog.0, bin.as_mut_ptr().cast()) }.result().map_err(|e| fail(format!("CUBIN: {e:?}")))?;
        Some(bin)
    } else {
        None
    };
    Ok(Compiled { ptx, cubin })
}

/// Writes `c` to the cache, its PTX to `path` and its CUBIN beside it (each through a temporary
/// file, so a reader never sees a partial one; the CUBIN first, so a PTX found has its CUBIN);
/// whether both are there.
fn store(path: &std::path::Path, c: &Compiled) -> bool {
    // Best effort: a read-only cache only costs a recompile next time.
    if std::fs::create_dir_all(path.parent().unwrap()).is_err() {
        return false;
    }
    if !peregrine_core::cache::trusted(path.parent().unwrap()) {
        return false;
    }
    // Synced before the rename, so a crash leaves the old entry or the whole new one (is_cached
    // still checks), and no temporary file behind on failure.
    let write = |path: &std::path::Path, bytes: &[u8]| {
        let tmp = path.with_extension(format!("tmp{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""));
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            use std::io::Write;
            f.write_all(bytes)?;
            f.sync_all()
        });
        let ok = written.is_ok() && std::fs::rename(&tmp, path).is_ok();
        if !ok {
            let _ = std::fs::remove_file(&tmp);
        }
        ok
    };
    c.cubin.as_ref().is_none_or(|bin| write(&cubin_path(path), bin)) && write(path, c.ptx.as_bytes())
}

/// Kernel file `name` (source `src`) for `arch` (e.g. "sm_90a") loaded into `ctx`: compiled, or
/// from the cache (or `prepare`). Returns the module and whether it was compiled before this
/// call.
pub fn load(ctx: &Arc<CudaContext>, name: &str, src: &str, arch: &'static str) -> Result<(Arc<CudaModule>, bool)> {
    load_variant(ctx, name, src, arch, &[])
}

/// `load` with `variant` defines after the measurement ones: a production build of another
/// form of the file (ops.cu's `-DKV_BF16` for BF16 KV pools), cached under its own key as
/// `scripts/kernel-report.sh --fill-cache DIR -DKV_BF16 --defines-in ops` names it.
pub fn load_variant(ctx: &Arc<CudaContext>, name: &str, src: &str, arch: &'static str, variant: &[&str]) -> Result<(Arc<CudaModule>, bool)> {
    load_variant_in(ctx, &cache_dir(), name, src, arch, variant)
}

/// `load_variant` with the cache directory `dir`.
fn load_variant_in(ctx: &Arc<CudaContext>, dir: &std::path::Path, name: &str, src: &str, arch: &'static str, variant: &[&str]) -> Result<(Arc<CudaModule>, bool)> {
    let (compiled, cached) = compiled_in(dir, name, src, arch, variant)?;
    let ptx_only = std::env::var("PEREGRINE_LOAD_PTX").is_ok_and(|v| v == "1");
    match load_compiled(ctx, name, compiled, ptx_only) {
        Ok((m, _)) => Ok((m, cached)),
        // A cached entry the driver cannot load (its PTX damaged past what `read_cached` sees):
        // compiled again, stored over it and loaded, once, rather than failing every start.
        Err(e) if cached => {
            tracing::warn!("{name}.cu from the kernel cache does not load ({e}); compiling it again");
            let options = variant_options(name, variant);
            let compiled = compile(name, src, arch, options.clone())?;
            store(&dir.join(cache_file_name(name, src, arch, &options)), &compiled);
            Ok((load_compiled(ctx, name, compiled, ptx_only)?.0, false))
        }
        Err(e) => Err(e),
    }
}

/// Kernel file `name` loaded as the modules of its parts (`parts`' defines, each a build of its
/// own: `MOE_PARTS`).
pub fn load_parts(ctx: &Arc<CudaContext>, name: &str, src: &str, arch: &'static str, parts: &[&[&str]]) -> Result<Vec<Arc<CudaModule>>> {
    parts.iter().map(|part| Ok(load_variant(ctx, name, src, arch, part)?.0)).collect()
}

/// What `load_compiled` loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loaded {
    Cubin,
    Ptx,
}

/// Loads `c` into `ctx`: its CUBIN where it has one that the driver takes, else its PTX (which
/// the driver compiles: a CUBIN from a newer NVRTC than the driver, or for another GPU, is
/// refused and the PTX still loads). `ptx_only` (`PEREGRINE_LOAD_PTX=1`) loads the PTX always
/// (to compare the driver's code with NVRTC's).
fn load_compiled(ctx: &Arc<CudaContext>, name: &str, c: Compiled, ptx_only: bool) -> Result<(Arc<CudaModule>, Loaded)> {
    if let Some(bin) = c.cubin.filter(|b| !ptx_only && whole_elf(b)) {
        match ctx.load_module(Ptx::from_binary(bin)) {
            Ok(m) => return Ok((m, Loaded::Cubin)),
            Err(e) => tracing::warn!("{name}.cu: the driver refused its CUBIN ({e}); loading the PTX"),
        }
    }
    let m = ctx.load_module(Ptx::from_src(c.ptx)).map_err(|e| Error::Backend(format!("loading {name}.cu: {e}")))?;
    Ok((m, Loaded::Ptx))
}

/// Whether `b` is a whole 64-bit ELF image: the driver reads an image without its length, so a
/// truncated cache file must not reach it (its section and program header tables, which come
/// last, must lie inside).
fn whole_elf(b: &[u8]) -> bool {
    let u16_at = |i: usize| b.get(i..i + 2).map_or(0, |s| u16::from_le_bytes([s[0], s[1]]) as u64);
    let u64_at = |i: usize| b.get(i..i + 8).map_or(u64::MAX, |s| u64::from_le_bytes(s.try_into().unwrap()));
    let inside = |off: u64, size: u64, count: u64| off.checked_add(size * count).is_some_and(|end| end <= b.len() as u64);
    b.len() >= 64 && b.starts_with(b"\x7fELF\x02\x01") && inside(u64_at(0x20), u16_at(0x36), u16_at(0x38)) && inside(u64_at(0x28), u16_at(0x3a), u16_at(0x3c)) && u16_at(0x3c) > 0
}

/// `load_variant`'s compiled kernels, from the cache directory `dir`, or `prepare`, or NVRTC;
/// whether they were compiled before this call.
fn compiled_in(dir: &std::path::Path, name: &str, src: &str, arch: &'static str, variant: &[&str]) -> Result<(Compiled, bool)> {
    let options = variant_options(name, variant);
    let file = cache_file_name(name, src, arch, &options);
    {
        let mut prepared = PREPARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = prepared.iter().position(|(f, _)| *f == file) {
            return Ok((prepared.swap_remove(i).1, true));
        }
    }
    let path = dir.join(&file);
    if let Some(c) = read_cached(dir, &file, arch) {
        return Ok((c, true));
    }
    if path.exists() {
        tracing::warn!("the kernel cache entry {} is damaged or incomplete (a crash while writing it?); compiling it again", path.display());
    }
    tracing::info!("compiling {} for {arch} with NVRTC (not in the cache at {})", build_name(name, &options), dir.display());
    let t0 = std::time::Instant::now();
    let compiled = compile(name, src, arch, options)?;
    tracing::info!("{name}.cu compiled in {:.1} s", t0.elapsed().as_secs_f64());
    store(&path, &compiled);
    Ok((compiled, false))
}

#[cfg(test)]
mod tests {
    use super::{cache_file_name, options, options_with, with_defines, GEMV_CU, MOE_CU, OPS_CU};

    /// Whether the tests that compile with NVRTC run here: libnvrtc is present, and no
    /// measurement defines (which every compile would take) are set.
    fn nvrtc_tests_run() -> bool {
        if !super::nvrtc_present() {
            eprintln!("skipped: libnvrtc not found");
            return false;
        }
        std::env::var_os("PEREGRINE_KERNEL_DEFINES").is_none()
    }

    /// `prepare` compiles the files the cache lacks, on a thread each, into the cache (PTX and
    /// CUBIN), where a load then finds them; where the cache cannot be written, a load takes what
    /// `prepare` compiled once, and compiles again after that. A PTX without its CUBIN is not a
    /// cache entry for a real architecture; a virtual one has PTX only. Needs libnvrtc (skipped
    /// without it).
    #[test]
    fn files_compiled_ahead_at_once_are_what_loads_find() {
        if !nvrtc_tests_run() {
            return;
        }
        let files = [("prep_a", "extern \"C\" __global__ void a(float* x) { x[threadIdx.x] += 1.f; }"), ("prep_b", "extern \"C\" __global__ void b(float* x) { x[threadIdx.x] *= 2.f; }")];
        // prep_b once more as a production variant (ops.cu's -DKV_BF16 build), whose define
        // changes the kernel's name.
        let (vname, vsrc, vdef) = ("prep_b", "extern \"C\" __global__ void ENTRY(float* x) { x[threadIdx.x] *= 3.f; }", &["-DENTRY=b_variant"][..]);
        let plain = files.map(|(n, s)| (n, s, &[][..]));
        let root = std::env::temp_dir().join(format!("peregrine-prepare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let is_elf = |c: &super::Compiled| c.cubin.as_ref().is_some_and(|b| b.starts_with(b"\x7fELF"));
        // A writable cache: both files and the variant land in it, and loads read them from there.
        let dir = root.join("kernels");
        super::prepare_in(&dir, &[plain[0], plain[1], (vname, vsrc, vdef)], "sm_90a");
        for (name, src) in files {
            let ptx = dir.join(cache_file_name(name, src, "sm_90a", &options(name)));
            assert!(ptx.exists() && super::cubin_path(&ptx).exists(), "{name}: compiled ahead into the cache, PTX and CUBIN");
            let (c, cached) = super::compiled_in(&dir, name, src, "sm_90a", &[]).unwrap();
            assert!(cached && c.ptx.contains(".entry") && !c.ptx.contains('\0') && is_elf(&c), "{name}: read from the cache");
            assert_eq!(c.cubin.as_deref(), Some(&std::fs::read(super::cubin_path(&ptx)).unwrap()[..]));
            // What the driver would be handed only whole: cut anywhere, it is not.
            let bin = c.cubin.unwrap();
            assert!(super::whole_elf(&bin), "{name}: NVRTC's CUBIN is a whole image");
            for cut in [0, 16, 63, 64, bin.len() / 2, bin.len() - 1] {
                assert!(!super::whole_elf(&bin[..cut]), "{name}: {cut} of {} bytes taken as whole", bin.len());
            }
        }
        let (c, cached) = super::compiled_in(&dir, vname, vsrc, "sm_90a", vdef).unwrap();
        assert!(cached && c.ptx.contains(".entry b_variant") && is_elf(&c), "the variant: compiled ahead with its define, read from the cache");
        // A PTX whose CUBIN is gone (a cache filled before CUBINs were kept): compiled again,
        // once, and both kept.
        let (name, src) = files[0];
        let ptx = dir.join(cache_file_name(name, src, "sm_90a", &options(name)));
        std::fs::remove_file(super::cubin_path(&ptx)).unwrap();
        let (c, cached) = super::compiled_in(&dir, name, src, "sm_90a", &[]).unwrap();
        assert!(!cached && is_elf(&c) && super::cubin_path(&ptx).exists(), "{name}: compiled again for its CUBIN");
        assert!(super::compiled_in(&dir, name, src, "sm_90a", &[]).unwrap().1, "{name}: then from the cache");
        // A virtual architecture: PTX alone, and that is a cache entry.
        let (c, cached) = super::compiled_in(&dir, name, src, "compute_90a", &[]).unwrap();
        assert!(!cached && c.cubin.is_none() && c.ptx.contains(".entry a"), "compute_90a: PTX only");
        let (c, cached) = super::compiled_in(&dir, name, src, "compute_90a", &[]).unwrap();
        assert!(cached && c.cubin.is_none(), "compute_90a: from the cache");
        let files = plain;
        // A cache that cannot be made (its parent is a file): held for one load each (and
        // not compiled again by a second prepare while held).
        std::fs::write(root.join("file"), b"").unwrap();
        let dir = root.join("file").join("kernels");
        super::prepare_in(&dir, &files, "sm_90a");
        let held = || super::PREPARED.lock().unwrap().iter().filter(|(f, _)| f.starts_with("prep_")).count();
        assert_eq!(held(), 2, "both held");
        super::prepare_in(&dir, &files, "sm_90a");
        assert_eq!(held(), 2, "a second prepare compiles nothing held already");
        for (name, src, _) in files {
            let (c, cached) = super::compiled_in(&dir, name, src, "sm_90a", &[]).unwrap();
            assert!(cached && c.ptx.contains(&format!(".entry {}", &name[5..])) && is_elf(&c), "{name}: the kernels compiled ahead");
            let (_, cached) = super::compiled_in(&dir, name, src, "sm_90a", &[]).unwrap();
            assert!(!cached, "{name}: compiled again once taken");
        }
        let _ = std::fs::remove_dir_all(&root);
    }

    /// `fill` (`peregrine compile-kernels`) compiles what the cache lacks, PTX and CUBIN, says
    /// what it compiled and what it found, and fails, naming the file, where the cache cannot be
    /// written. Needs libnvrtc (skipped without it).
    #[test]
    fn filling_the_cache_compiles_what_it_lacks_and_fails_loudly() {
        if !nvrtc_tests_run() {
            return;
        }
        let files = [("fill_a", "extern \"C\" __global__ void a(float* x) { x[threadIdx.x] += 1.f; }", &[][..]), ("fill_a", "extern \"C\" __global__ void ENTRY(float* x) { x[threadIdx.x] += 2.f; }", &["-DENTRY=a2"][..])];
        let root = std::env::temp_dir().join(format!("peregrine-fill-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("kernels");
        let first = super::fill_in(&dir, &files, "sm_90a").unwrap();
        assert_eq!(first.len(), 2);
        for (path, compiled) in &first {
            assert!(*compiled && path.exists() && std::fs::read(super::cubin_path(path)).unwrap().starts_with(b"\x7fELF"), "{}", path.display());
        }
        assert_ne!(first[0].0, first[1].0, "the variant has its own cache file");
        let again = super::fill_in(&dir, &files, "sm_90a").unwrap();
        assert_eq!(again.iter().map(|(p, c)| (p.clone(), *c)).collect::<Vec<_>>(), first.iter().map(|(p, _)| (p.clone(), false)).collect::<Vec<_>>(), "found in the cache");
        let (c, cached) = super::compiled_in(&dir, "fill_a", files[1].1, "sm_90a", files[1].2).unwrap();
        assert!(cached && c.ptx.contains(".entry a2"), "a load finds what fill wrote");
        // A damaged entry (a crash left its CUBIN empty, or cut its PTX) is not a cache entry:
        // fill and a load compile it again, over the damage.
        let name = |p: &std::path::Path| p.file_name().unwrap().to_str().unwrap().to_owned();
        std::fs::write(super::cubin_path(&first[0].0), b"").unwrap();
        assert!(!super::is_cached(&dir, &name(&first[0].0), "sm_90a"));
        assert!(super::fill_in(&dir, &files[..1], "sm_90a").unwrap()[0].1, "compiled again");
        assert!(super::whole_elf(&std::fs::read(super::cubin_path(&first[0].0)).unwrap()));
        std::fs::write(&first[1].0, b"").unwrap();
        let (c, cached) = super::compiled_in(&dir, "fill_a", files[1].1, "sm_90a", files[1].2).unwrap();
        assert!(!cached && c.ptx.contains(".entry a2"), "an empty PTX is compiled again");
        assert!(super::is_cached(&dir, &name(&first[1].0), "sm_90a"), "and stored over the damage");
        std::fs::write(root.join("file"), b"").unwrap();
        let err = super::fill_in(&root.join("file").join("kernels"), &files[..1], "sm_90a").unwrap_err().to_string();
        assert!(err.contains("could not write the kernel cache file") && err.contains("fill_a-sm_90a-"), "{err}");
        // Every failing build is reported, not only the first.
        let bad = [("fill_bad", "this is not CUDA", &[][..]), files[0], ("fill_worse", "neither is this", &[][..])];
        let err = super::fill_in(&dir, &bad, "sm_90a").unwrap_err().to_string();
        assert!(err.contains("2 of 3 kernel builds failed") && err.contains("NVRTC failed on fill_bad.cu for sm_90a") && err.contains("NVRTC failed on fill_worse.cu for sm_90a"), "{err}");
        let _ = std::fs::remove_dir_all(&root);
    }

    /// On the GPU: a module loads from its CUBIN; a CUBIN the driver refuses (one for another
    /// architecture: sm_80 code does not run on Hopper) falls back to the PTX, and `ptx_only`
    /// loads the PTX; a truncated CUBIN is not handed to the driver (`whole_elf`) and the PTX
    /// loads; each module runs. Needs a GPU (and libnvrtc).
    #[test]
    fn a_cubin_the_driver_refuses_falls_back_to_the_ptx() {
        let Some(gpu) = crate::device::probe_for_tests(0) else { return };
        let arch = crate::device::nvrtc_arch(gpu.capability);
        let src = "extern \"C\" __global__ void fallback(float* x) { x[threadIdx.x] = 7.f + threadIdx.x; }";
        let good = super::compile("fallback", src, arch, options("fallback")).unwrap();
        let other_arch = if arch == "sm_80" { "sm_90a" } else { "sm_80" };
        let foreign = super::compile("fallback", src, other_arch, options("fallback")).unwrap().cubin;
        let with = |cubin: Option<Vec<u8>>| super::Compiled { ptx: good.ptx.clone(), cubin };
        let own = good.cubin.clone().unwrap();
        for (what, c, ptx_only, want) in [
            ("its own CUBIN", good.clone(), false, super::Loaded::Cubin),
            ("a CUBIN for another architecture", with(foreign), false, super::Loaded::Ptx),
            ("a truncated CUBIN", with(Some(own[..own.len() - 1].to_vec())), false, super::Loaded::Ptx),
            ("PTX asked for", good.clone(), true, super::Loaded::Ptx),
        ] {
            let (m, loaded) = super::load_compiled(&gpu.ctx, "fallback", c, ptx_only).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(loaded, want, "{what}");
            let f = m.load_function("fallback").unwrap();
            let mut x = gpu.stream.clone_htod(&[f32::NAN; 32]).unwrap();
            let cfg = cudarc::driver::LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
            use cudarc::driver::PushKernelArg;
            // SAFETY: one float per thread of the 32-thread block, all in bounds.
            unsafe { gpu.stream.launch_builder(&f).arg(&mut x).launch(cfg) }.unwrap();
            let got = gpu.stream.clone_dtoh(&x).unwrap();
            assert!(got.iter().enumerate().all(|(i, &v)| v == 7.0 + i as f32), "{what}: {got:?}");
        }
    }

    /// On the GPU: a cache entry that looks whole but that the driver cannot load (a CUBIN for
    /// another architecture, a PTX cut short) is compiled again, stored over and loaded, once,
    /// rather than failing every start; the entry is then whole. Needs a GPU (and libnvrtc).
    #[test]
    fn a_cached_module_the_driver_refuses_is_compiled_again() {
        let Some(gpu) = crate::device::probe_for_tests(0) else { return };
        let arch = crate::device::nvrtc_arch(gpu.capability);
        let other_arch = if arch == "sm_80" { "sm_90a" } else { "sm_80" };
        let src = "extern \"C\" __global__ void again(float* x) { x[threadIdx.x] = 3.f; }";
        let dir = std::env::temp_dir().join(format!("peregrine-again-{}", std::process::id())).join("kernels");
        let _ = std::fs::remove_dir_all(&dir);
        let (_, cached) = super::load_variant_in(&gpu.ctx, &dir, "again", src, arch, &[]).unwrap();
        assert!(!cached, "compiled the first time");
        let file = super::cache_file_name("again", src, arch, &options("again"));
        let ptx = dir.join(&file);
        let good = std::fs::read_to_string(&ptx).unwrap();
        std::fs::write(&ptx, &good[..good.len() / 2]).unwrap();
        let foreign = super::compile("again", src, other_arch, options("again")).unwrap().cubin.unwrap();
        std::fs::write(super::cubin_path(&ptx), &foreign).unwrap();
        assert!(super::is_cached(&dir, &file, arch), "the damage is past what the cache check sees");
        let (m, cached) = super::load_variant_in(&gpu.ctx, &dir, "again", src, arch, &[]).unwrap();
        assert!(!cached, "compiled again");
        assert!(m.load_function("again").is_ok());
        assert_eq!(std::fs::read_to_string(&ptx).unwrap(), good, "stored over the damage");
        let (_, cached) = super::load_variant_in(&gpu.ctx, &dir, "again", src, arch, &[]).unwrap();
        assert!(cached, "and found whole next time");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }

    /// NVRTC's errors reach the caller with the file, the arch and the log.
    #[test]
    fn a_file_that_does_not_compile_says_where() {
        if !nvrtc_tests_run() {
            return;
        }
        let err = super::compile("broken", "extern \"C\" __global__ void k() { undeclared_name = 1; }", "sm_90a", vec![]).unwrap_err().to_string();
        assert!(err.contains("NVRTC failed on broken.cu for sm_90a") && err.contains("undeclared_name"), "{err}");
    }

    /// A variant asked for (the server's `--kv-cache-dtype bfloat16`) joins `prepare`'s files
    /// once, with its file's source; a name no kernel file has is left out.
    #[test]
    fn prepare_compiles_the_variants_asked_for() {
        super::prepare_variant("ops", &["-DKV_BF16"]);
        super::prepare_variant("ops", &["-DKV_BF16"]);
        super::prepare_variant("no_such_file", &["-DX"]);
        let files = super::prepare_files();
        let builds: Vec<_> = super::production_builds().collect();
        assert_eq!(files.len(), builds.len() + 1, "{:?}", files.iter().map(|f| (f.0, f.2)).collect::<Vec<_>>());
        assert_eq!(files.iter().filter(|f| f.0 == "ops" && f.2 == ["-DKV_BF16"] && f.1 == OPS_CU).count(), 1);
        assert_eq!(files[..builds.len()], builds[..]);
    }

    #[test]
    fn measurement_defines_go_to_the_files_named() {
        let base = options_with("gemv", "", None);
        assert_eq!(base, ["--std=c++17", "-lineinfo"]);
        // Every file without PEREGRINE_KERNEL_DEFINES_IN (or with it empty).
        for only in [None, Some(""), Some("  ")] {
            assert_eq!(options_with("moe", "-DA  -DB", only), ["--std=c++17", "-lineinfo", "-DA", "-DB"]);
        }
        // Only the files listed.
        assert_eq!(options_with("gemv", "-DA", Some("ops, gemv")), ["--std=c++17", "-lineinfo", "-DA"]);
        assert_eq!(options_with("moe", "-DA", Some("ops, gemv")), base);
        assert_eq!(options_with("gemv", "-DA", Some("gemv2")), base);
        // `file:` words go to their file only, list or not.
        assert_eq!(options_with("ops", "-DA ops:-DB=2", None), ["--std=c++17", "-lineinfo", "-DA", "-DB=2"]);
        assert_eq!(options_with("gemv", "-DA ops:-DB=2", None), ["--std=c++17", "-lineinfo", "-DA"]);
        assert_eq!(options_with("ops", "-DA ops:-DB", Some("gemv")), ["--std=c++17", "-lineinfo", "-DB"]);
    }

    /// `with_defines` (a second build of the kernels in one process, for A/Bs) replaces the
    /// environment's defines while it runs, `file:` words included, and nothing after.
    #[test]
    fn a_second_build_takes_its_defines_only_while_it_runs() {
        if std::env::var_os("PEREGRINE_KERNEL_DEFINES_IN").is_some() {
            return;  // (a measurement environment: the list would filter the words)
        }
        let before = options("moe");
        let inside = with_defines("moe:-DX gemv:-DY -DZ", || (options("moe"), options("gemv"), options("ops")));
        assert_eq!(inside.0, ["--std=c++17", "-lineinfo", "-DX", "-DZ"]);
        assert_eq!(inside.1, ["--std=c++17", "-lineinfo", "-DY", "-DZ"]);
        assert_eq!(inside.2, ["--std=c++17", "-lineinfo", "-DZ"]);
        assert_eq!(with_defines("", || options("moe")), ["--std=c++17", "-lineinfo"]);
        assert_eq!(options("moe"), before);
    }

    /// The kernels whose dynamic shared memory bulk copies or cp.async fill (moe.cu's rings,
    /// gemv.cu's GEMMs and router columns) declare it on 128-byte lines: undeclared, it starts
    /// where the static shared memory ends, rounded to 16 bytes, and one static variable more
    /// moved the one-token MoE's rings off their place and cost the batch-1 step 2%
    /// (benches/results/2026-11-27-moe-smem-lines.md).
    #[test]
    fn dynamic_shared_memory_that_copies_fill_is_declared_on_lines() {
        for (name, src) in [("moe.cu", MOE_CU), ("gemv.cu", GEMV_CU)] {
            let decls: Vec<&str> = src.lines().map(str::trim).filter(|l| l.starts_with("extern __shared__")).collect();
            assert!(!decls.is_empty(), "{name}: no dynamic shared memory found");
            for d in decls {
                assert!(d.contains("__align__(128)") || d.contains("__align__(MOE_DSM_ALIGN)"), "{name}: {d}");
            }
        }
        assert!(MOE_CU.contains("#define MOE_DSM_ALIGN 128"), "moe.cu: MOE_DSM_ALIGN is not 128");
    }

    /// gemv_mma's weight loads carry their cache hints (the batch-1 Flash step 2.4% faster, Pro's
    /// 4.5%: benches/results/2026-11-27-gemv-load-hints.md): every load of fp8_rows and bf16_rows
    /// goes through ld_weights<LDH>, L1::no_allocate + L2::256B in the one-wave (PIPE) kernels and
    /// L2::256B in the others (the lm_head read 92% of copy bandwidth with both, 101% with L2::256B
    /// alone). A plain __ldg there would lose that without failing any other test.
    #[test]
    fn gemv_weight_loads_carry_their_cache_hints() {
        assert!(GEMV_CU.contains("#define GEMV_LD_PIPE 3"), "gemv.cu: GEMV_LD_PIPE is not 3");
        assert!(GEMV_CU.contains("#define GEMV_LD_WAVES 2"), "gemv.cu: GEMV_LD_WAVES is not 2");
        assert!(GEMV_CU.contains("constexpr int LDH = PIPE ? GEMV_LD_PIPE : GEMV_LD_WAVES;"), "gemv.cu: LDH is not chosen by PIPE");
        for op in ["ld.global.nc.L1::no_allocate.v4.u32", "ld.global.nc.L2::256B.v4.u32", "ld.global.nc.L1::no_allocate.L2::256B.v4.u32"] {
            assert!(GEMV_CU.contains(op), "gemv.cu: ld_weights lost {op}");
        }
        let start = GEMV_CU.find("auto bf16_rows = [&]").expect("gemv.cu: bf16_rows");
        let end = start + GEMV_CU[start..].find("auto tile_rows = [&]").expect("gemv.cu: tile_rows");
        let loads = &GEMV_CU[start..end];
        assert!(!loads.contains("#if"), "gemv.cu: bf16_rows / fp8_rows under a define");
        assert!(!loads.contains("__ldg("), "gemv.cu: a weight load of bf16_rows / fp8_rows without its hint");
        assert_eq!(loads.matches("ld_weights<LDH>(").count(), 6, "gemv.cu: bf16_rows loads 4 pieces, fp8_rows 2");
    }

    /// The tiled MoE kernels refill a ring slot before the stage's math and the fused ones after
    /// it (kernels/moe.cu, `tile_stream_bulk`'s EARLY; benches/results/2026-11-27-moe-early-refill.md).
    /// The FP8 digit passes of either have their own loop, which refills after the stage.
    #[test]
    fn tiled_moe_kernels_refill_before_their_math_and_fused_ones_after() {
        assert!(MOE_CU.contains("#define MOE_TILED_EARLY true"), "moe.cu: MOE_TILED_EARLY is not on");
        assert!(MOE_CU.contains("template <int NS, int CS, bool EARLY = false, bool DG = false, bool CSC = false, int NPD = 1>\n__device__ __forceinline__ int tile_stream_bulk("), "moe.cu: tile_stream_bulk's EARLY is not off by default");
        let calls: Vec<&str> = MOE_CU.match_indices("tile_stream_bulk<").map(|(i, _)| &MOE_CU[i..i + MOE_CU[i..].find('>').unwrap() + 1]).collect();
        assert_eq!(
            calls,
            [
                "tile_stream_bulk<NS, CS, false, DG, !GATE_UP, NPD>",
                "tile_stream_bulk<NS, CS, false, DG, !GATE_UP, 1>",
                "tile_stream_bulk<NS, CS, MOE_TILED_EARLY>",
                "tile_stream_bulk<NS, CS, false, DG, true>",
                "tile_stream_bulk<NS, CS, false, DG>"
            ],
            "moe.cu: moe_tiled's calls (its digit passes of two pairs and of one, then the others), then moe_fused's (the digit form's down passes with their chunk scales, then every other pass)"
        );
        let tiled = MOE_CU.find("void moe_tiled(").expect("moe.cu: moe_tiled");
        let fused = MOE_CU.find("void moe_fused(").expect("moe.cu: moe_fused");
        let early = MOE_CU.find(calls[2]).unwrap();
        assert!(tiled < early && early < fused, "moe.cu: the early refill is moe_tiled's");
        for digits in &calls[..2] {
            let at = MOE_CU.find(digits).unwrap();
            assert!(tiled < at && at < fused, "moe.cu: moe_tiled's digit passes");
        }
        for late in &calls[3..] {
            assert!(fused < MOE_CU.find(late).unwrap(), "moe.cu: the late refill is moe_fused's");
        }
    }

    /// ops.cu's BF16-pool build (`load_variant`, `-DKV_BF16` after the measurement defines) has
    /// the options, so the cache name, that `kernel-report.sh --fill-cache DIR -DKV_BF16
    /// --defines-in ops` gives it (scripts/gpu-check.sh fills it that way).
    #[test]
    fn the_bf16_kv_build_of_ops_is_named_as_kernel_report_fills_it() {
        // (Without measurement defines; `options` would also read another test's `with_defines`.)
        let plain = options_with("ops", "", None);
        let mut variant = plain.clone();
        variant.push("-DKV_BF16".into());
        assert_eq!(variant, options_with("ops", "-DKV_BF16", Some("ops")));
        assert_ne!(cache_file_name("ops", OPS_CU, "sm_90a", &variant), cache_file_name("ops", OPS_CU, "sm_90a", &plain));
    }

    /// Every kernel moe.cu defines (a column-0 `extern "C"` kernel or ring instantiation) lies in
    /// exactly one of `MOE_PARTS`' parts, and every part has kernels: one outside the parts would
    /// be compiled into every part, one in a part not listed into none (a start would then fail
    /// to find it). That each part's kernels compile to the whole file's SASS is
    /// `scripts/kernel-report.sh --check-moe-parts`'s to check (NVRTC, ~a minute).
    #[test]
    fn every_moe_kernel_is_in_one_part() {
        let src = include_str!("../../../kernels/moe.cu");
        let mut open: Vec<Option<usize>> = Vec::new();
        let mut per_part = vec![0usize; super::MOE_PARTS.len()];
        for (i, line) in src.lines().enumerate() {
            let t = line.trim_start();
            if t.starts_with("#if") {
                open.push(t.strip_prefix("#if MOE_IN_PART(").and_then(|r| r.split(')').next()).map(|k| k.parse().expect("a part number")));
            } else if t.starts_with("#endif") {
                open.pop().expect("an #endif without its #if");
            }
            let defines_kernel = line.starts_with("extern \"C\"") || ["MOE_BULK(", "MOE_TILED_DG(", "MOE_TILED_DG_PASS("].iter().any(|m| line.starts_with(m));
            if defines_kernel {
                let parts: Vec<usize> = open.iter().flatten().copied().collect();
                assert_eq!(parts.len(), 1, "moe.cu:{}: in parts {parts:?}: {line}", i + 1);
                assert!(parts[0] < per_part.len(), "moe.cu:{}: part {} is not in MOE_PARTS", i + 1, parts[0]);
                per_part[parts[0]] += 1;
            }
        }
        assert!(open.is_empty(), "moe.cu: an #if without its #endif");
        assert!(per_part.iter().all(|&n| n > 0), "moe.cu: a part without kernels: {per_part:?}");
        for (k, part) in super::MOE_PARTS.iter().enumerate() {
            assert_eq!(*part, [format!("-DMOE_PART={k}").as_str()]);
        }
    }

    /// tools/kernel_report.py's `--print-cache-names` gives the file names `ptx` looks up, for
    /// every kernel file and several define sets: what `--fill-cache` writes is what a GPU
    /// machine finds (a mismatch would only cost a compile there, silently).
    #[test]
    fn kernel_report_names_cache_files_as_compile_rs_does() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
        if std::process::Command::new("python3").arg("--version").output().is_err() {
            eprintln!("skipped: no python3");
            return;
        }
        for (defines, only_in) in [("", None), ("-DA -DB=2", None), ("-DSTEP_TRACE gemv:-DX", Some("ops")), ("ops:-DNORM_MARK=2", None), ("-DA", Some("gemv,moe"))] {
            let mut cmd = std::process::Command::new("python3");
            cmd.arg(format!("{root}/tools/kernel_report.py")).args(["--print-cache-names", "--arch", "sm_90a"]);
            if let Some(f) = only_in {
                cmd.args(["--defines-in", f]);
            }
            cmd.args(defines.split_whitespace());
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "kernel_report.py {defines:?}: {}", String::from_utf8_lossy(&out.stderr));
            let mut got: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect();
            let mut want: Vec<String> = super::production_builds()
                .map(|(name, src, part)| {
                    let mut o = options_with(name, defines, only_in);
                    o.extend(part.iter().map(|d| d.to_string()));
                    cache_file_name(name, src, "sm_90a", &o)
                })
                .collect();
            got.sort();
            want.sort();
            assert_eq!(got, want, "defines {defines:?}, only in {only_in:?}");
        }
    }
}
