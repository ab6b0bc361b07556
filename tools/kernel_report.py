#!/usr/bin/env python3
"""Registers, stack, spills and static shared memory of every kernel, on a machine without a GPU.

Compiles kernels/*.cu exactly as crates/cuda/src/compile.rs does (common.cuh and the file's
headers in front, compile.rs's NVRTC options, the arch, any -D defines) with NVRTC, then runs
ptxas -v on the PTX. With --base REV it compiles the sources of git revision REV too and prints
only the kernels whose numbers differ. Occupancy questions ("does this change cost a block per
SM?") need no device time this way.

Needs libnvrtc and ptxas of CUDA 13: scripts/kernel-report.sh fetches them from PyPI
(nvidia-cuda-nvrtc, nvidia-cuda-nvcc) into target/cuda-tools and runs this script.

    scripts/kernel-report.sh [--arch sm_90a] [--base REV] [-DNAME ...] [FILE.cu ...]
    scripts/kernel-report.sh --check-moe-parts [-DNAME ...]
"""
import argparse
import ctypes
import os
import re
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_show(rev, path):
    return subprocess.run(["git", "-C", ROOT, "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout


def read(rev, path):
    if rev is None:
        with open(os.path.join(ROOT, path)) as f:
            return f.read()
    return git_show(rev, path)


def compile_rs_layout(rev):
    """(file -> headers, NVRTC options) as compile.rs states them."""
    src = read(rev, "crates/cuda/src/compile.rs")
    files = {}
    for m in re.finditer(r'kernel_source!\(\s*"([\w.]+)"((?:\s*,\s*"[\w.]+")*)\s*\)', src):
        files[m.group(1)] = re.findall(r'"([\w.]+)"', m.group(2))
    opts = re.search(r"const OPTIONS: &\[&str\] = &\[([^\]]*)\]", src)
    options = re.findall(r'"([^"]+)"', opts.group(1)) if opts else []
    return files, options


def moe_parts(rev):
    """moe.cu's part defines as compile.rs's MOE_PARTS lists them (each part a build and a cache
    entry of its own; none listed: the file whole)."""
    src = read(rev, "crates/cuda/src/compile.rs")
    m = re.search(r"const MOE_PARTS: [^=]*= \[(.*?)\];", src)
    return re.findall(r'"(-DMOE_PART=\d+)"', m.group(1)) if m else []


def nvrtc_ptx(lib, name, source, options):
    return nvrtc_compile(lib, name, source, options, False)[0]


def nvrtc_compile(lib, name, source, options, want_cubin):
    """(PTX, CUBIN or None): the CUBIN NVRTC assembles for a real architecture (sm_90a), as
    compile.rs keeps it."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None) != 0:
        sys.exit(f"{name}: nvrtcCreateProgram failed")
    opts = [o.encode() for o in options]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc != 0:
        sys.exit(f"{name}: NVRTC failed\n{log.value.decode()}")
    if log.value.strip():
        print(log.value.decode(), file=sys.stderr)
    lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
    ptx = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetPTX(prog, ptx)
    cubin = None
    if want_cubin:
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        if lib.nvrtcGetCUBIN(prog, buf) != 0:
            sys.exit(f"{name}: nvrtcGetCUBIN failed")
        cubin = buf.raw
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ptx.value, cubin


def ptxas_report(ptxas, arch, ptx):
    """kernel -> (registers, stack bytes, spill stores, spill loads, static smem bytes)."""
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "wb") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, f"-arch={arch}", "-v", p, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    if r.returncode:
        sys.exit(r.stderr)
    out, name = {}, None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            out[name] = [0, 0, 0, 0, 0]
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            out[name][1:4] = [int(g) for g in m.groups()]
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            out[name][0] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            out[name][4] = int(s.group(1)) if s else 0
    return out


def kernel_source(rev, f, headers):
    """What compile.rs hands NVRTC for kernel file f: common.cuh, f's headers, then f."""
    return read(rev, "kernels/common.cuh") + "".join(read(rev, f"kernels/{h}") for h in headers) + read(rev, f"kernels/{f}")


def report(lib, ptxas, rev, arch, defines, only):
    files, options = compile_rs_layout(rev)
    unknown = [f for f in only if f not in files]
    if unknown:
        sys.exit(f"not a kernel file compile.rs embeds: {unknown} (it embeds {sorted(files)})")
    result = {}
    for f, headers in files.items():
        if only and f not in only:
            continue
        source = kernel_source(rev, f, headers)
        ptx = nvrtc_ptx(lib, f, source, [f"--gpu-architecture={arch}"] + options + file_defines(f[: -len(".cu")], defines, []))
        for k, v in ptxas_report(ptxas, arch, ptx).items():
            result[(f, k)] = v
    return result


def fnv1a(parts):
    """compile.rs's cache key: FNV-1a 64 over the parts, each followed by 0xff."""
    h = 0xCBF29CE484222325
    for p in parts:
        for b in p + b"\xff":
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def file_defines(stem, defines, defines_in):
    """The defines file `stem` gets, as compile.rs's options_with: `file:-DNAME` words go to that
    file only, the others to the files of defines_in (every file when it is empty)."""
    out = []
    for d in defines:
        if ":" in d:
            f, d = d.split(":", 1)
            if f == stem:
                out.append(d)
        elif not defines_in or stem in defines_in:
            out.append(d)
    return out


def cache_entries(arch, defines, defines_in):
    """(file, source, NVRTC options, cache file name) of every kernel file's builds (moe.cu's once
    per part), as compile.rs compiles and names them for its loads (its cache_file_name)."""
    files, options = compile_rs_layout(None)
    parts = {"moe.cu": [[d] for d in moe_parts(None)]}
    for f, headers in files.items():
        stem = f[: -len(".cu")]
        source = kernel_source(None, f, headers)
        for part in parts.get(f) or [[]]:
            opts = options + file_defines(stem, defines, defines_in) + part
            key = fnv1a([source.encode(), arch.encode(), " ".join(opts).encode()])
            yield f, source, opts, f"{stem}-{arch}-{key:016x}.ptx"


def write_atomically(path, data):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def fill_cache(lib, cache, arch, defines, defines_in):
    """Writes the PTX and, for a real architecture, the CUBIN compile.rs would compile (same
    source, options and key) into cache/kernels, so a fresh GPU machine given
    PEREGRINE_CACHE_DIR=cache skips NVRTC and the driver's compile of the PTX."""
    from concurrent.futures import ThreadPoolExecutor

    os.makedirs(os.path.join(cache, "kernels"), exist_ok=True)
    want_cubin = arch.startswith("sm_")

    def fill(entry):
        f, source, opts, name = entry
        path = os.path.join(cache, "kernels", name)
        cubin_path = path[: -len(".ptx")] + ".cubin"
        if not os.path.exists(path) or (want_cubin and not os.path.exists(cubin_path)):
            ptx, cubin = nvrtc_compile(lib, f, source, [f"--gpu-architecture={arch}"] + opts, want_cubin)
            if cubin is not None:
                write_atomically(cubin_path, cubin)  # first: a PTX found has its CUBIN
            write_atomically(path, ptx)
        return path

    # At once, as compile.rs's prepare (ctypes lets NVRTC run without the GIL).
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for path in pool.map(fill, list(cache_entries(arch, defines, defines_in))):
            print(path)


def elf_sections(b):
    """name -> bytes of each section of an ELF64 image (NOBITS sections empty)."""
    shoff = struct.unpack_from("<Q", b, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", b, 0x3A)
    hdrs = [struct.unpack_from("<IIQQQQIIQQ", b, shoff + i * shentsize) for i in range(shnum)]
    names = hdrs[shstrndx][4]
    name = lambda off: b[names + off : b.index(b"\0", names + off)].decode()
    return {name(h[0]): (b"" if h[1] == 8 else b[h[4] : h[4] + h[5]]) for h in hdrs}


def kernel_attributes(info):
    """A kernel's .nv.info records with the parameter bank's symbol index (EIATTR_PARAM_CBANK,
    0x0a) zeroed: it numbers the module's symbols, which differ from one module to the next."""
    out, i = bytearray(info), 0
    while i + 4 <= len(out):
        fmt, attr = out[i], out[i + 1]
        size = struct.unpack_from("<H", out, i + 2)[0] if fmt == 4 else 0
        if fmt == 4 and attr == 0x0A:
            out[i + 4 : i + 8] = bytes(4)
        i += 4 + size
    return bytes(out)


def check_moe_parts(lib, arch, defines):
    """Compiles moe.cu whole and in compile.rs's parts (at once, a thread each) and checks that
    every kernel is in exactly one part, with the whole file's code (.text), attributes,
    shared and constant sections. A part can differ where it alone uses a device function's
    static __shared__ variable: NVVM then moves it into that kernel. Returns the problems."""
    from concurrent.futures import ThreadPoolExecutor

    files, options = compile_rs_layout(None)
    source = kernel_source(None, "moe.cu", files["moe.cu"])
    opts = [f"--gpu-architecture={arch}"] + options + file_defines("moe", defines, [])
    builds = [[]] + [[d] for d in moe_parts(None)]
    with ThreadPoolExecutor(len(builds)) as pool:  # ctypes lets NVRTC run without the GIL
        cubins = list(pool.map(lambda part: nvrtc_compile(lib, "moe.cu", source, opts + part, True)[1], builds))
    whole, parts = elf_sections(cubins[0]), [elf_sections(c) for c in cubins[1:]]
    kernels = lambda secs: {k[len(".text.") :] for k in secs if k.startswith(".text.")}
    problems, seen = [], {}
    for n, secs in enumerate(parts):
        for k in sorted(kernels(secs)):
            if k in seen:
                problems.append(f"{k}: in parts {seen[k]} and {n}")
            seen[k] = n
            for pre in (".text.", ".nv.info.", ".nv.shared.", ".nv.constant0."):
                a, b = whole.get(pre + k), secs.get(pre + k)
                if pre == ".nv.info." and a is not None and b is not None:
                    a, b = kernel_attributes(a), kernel_attributes(b)
                if a != b:
                    problems.append(f"{k}: its {pre.strip('.')} section differs from the whole file's (part {n})")
    problems += [f"{k}: in no part" for k in sorted(kernels(whole) - set(seen))]
    print(f"moe.cu for {arch}: {len(kernels(whole))} kernels whole, {len(seen)} in {len(parts)} parts, {len(problems)} problems")
    for p in problems:
        print(p)
    return problems


def print_cache_names(arch, defines, defines_in):
    """The cache file names fill_cache writes, one per line (compile.rs's test compares them with
    its own)."""
    for _, _, _, name in cache_entries(arch, defines, defines_in):
        print(name)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--base", help="git revision to compare with (only differing kernels are printed)")
    ap.add_argument("--tools", default=os.path.join(ROOT, "target/cuda-tools/nvidia/cu13"))
    ap.add_argument("--fill-cache", metavar="DIR", help="write every file's PTX into DIR/kernels as compile.rs caches it (the defines as PEREGRINE_KERNEL_DEFINES), and report nothing")
    ap.add_argument("--defines-in", default="", help="with --fill-cache: the files the defines go to, as PEREGRINE_KERNEL_DEFINES_IN")
    ap.add_argument("--print-cache-names", action="store_true", help="print the cache file names --fill-cache would write (needs no NVRTC)")
    ap.add_argument("--check-moe-parts", action="store_true", help="check that moe.cu's parts (compile.rs's MOE_PARTS) hold every kernel once, each compiled as in the whole file")
    ap.add_argument("files", nargs="*", help="kernel files (default: every file compile.rs embeds)")
    args, rest = ap.parse_known_args()
    # Words, as compile.rs splits PEREGRINE_KERNEL_DEFINES: "-DA -DB" given as one argument is two
    # defines (NVRTC took it as one option, and the cache entry it wrote did not load).
    rest = [w for a in rest for w in a.split()]
    args.files = [w for a in args.files for w in a.split()]
    # -DNAME, or file:-DNAME for that file only (compile.rs's options_with)
    defines = [a for a in rest + args.files if a.split(":", 1)[-1].startswith("-D")]
    args.files = [f for f in args.files if f not in defines]
    unknown = [a for a in rest if a not in defines]
    if unknown:
        ap.error(f"unknown arguments: {unknown}")
    defines_in = [f.strip() for f in args.defines_in.split(",") if f.strip()]
    if args.print_cache_names:
        print_cache_names(args.arch, defines, defines_in)
        return
    lib = ctypes.CDLL(os.path.join(args.tools, "lib/libnvrtc.so.13"))
    ptxas = os.path.join(args.tools, "bin/ptxas")
    if args.fill_cache:
        fill_cache(lib, args.fill_cache, args.arch, defines, defines_in)
        return
    if args.check_moe_parts:
        sys.exit(1 if check_moe_parts(lib, args.arch, defines) else 0)
    now = report(lib, ptxas, None, args.arch, defines, args.files)
    base = report(lib, ptxas, args.base, args.arch, defines, args.files) if args.base else None
    fmt = "{:<44} {:>5} {:>6} {:>7} {:>7} {:>6}"
    print(fmt.format("kernel", "regs", "stack", "spill st", "spill ld", "smem"))
    for (f, k), v in sorted(now.items()):
        if base is not None:
            b = base.get((f, k))
            if b == v:
                continue
            print(fmt.format(f"{k} (base)", *b) if b else f"{k}: new")
        print(fmt.format(k, *v))
    if base is not None:
        for (f, k) in sorted(set(base) - set(now)):
            print(f"{k}: gone")


if __name__ == "__main__":
    main()
