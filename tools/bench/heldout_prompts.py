"""Writes benches/data/heldout_prompts.json: 32 prompts cut from Python files that the demo model
never trained on (the training split rule of tools/train/train.py: a file is held out when the
first two hex digits of its content's sha1 are below 05; identical content has the same hash, so a
held-out file here was held out on the training machine too). Deterministic for a given Python.

    python tools/bench/heldout_prompts.py
"""
import glob, hashlib, json, os, random, sysconfig

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
files = []
for p in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True)):
    b = open(p, "rb").read()
    if 2000 < len(b) < 200_000 and int(hashlib.sha1(b).hexdigest()[:2], 16) < 5:
        files.append((os.path.relpath(p, sysconfig.get_paths()["stdlib"]), b.decode("utf-8", "replace")))
rng = random.Random(0)
prompts = []
for name, text in rng.sample(files, min(32, len(files))):
    lines = text.splitlines(keepends=True)
    start = rng.randrange(0, max(1, len(lines) - 20))
    prompts.append({"file": name, "prompt": "".join(lines[start:start + 8])})
json.dump({"python": sysconfig.get_python_version(), "rule": "sha1(content)[:2] < 05", "prompts": prompts},
          open(os.path.join(ROOT, "benches", "data", "heldout_prompts.json"), "w"), indent=1)
print(len(files), "held-out files,", len(prompts), "prompts")
