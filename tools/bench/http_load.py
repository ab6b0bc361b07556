"""Load test of a running `peregrine serve` over HTTP: at each concurrency, that many clients
stream completions back to back (distinct random prompts, greedy, `ignore_eos`), and the script
reports output tokens/s over the level's wall time, the median gap between a stream's tokens and
the median time to the first token. Python's standard library only (the GPU machine has no
network to install anything).

Made for `--load-format dummy`, whose stand-in tokenizer reads the words t0 .. t{V-1} as tokens,
so a prompt of N random words is N tokens:

    peregrine serve configs/mimo-v2-flash.json --load-format dummy \\
        --hf-overrides '{"num_hidden_layers": 18}' --device cuda --kv-cache-memory 4GiB &
    python tools/bench/http_load.py --url http://127.0.0.1:8000 --concurrency 1,8,32,64

Against a model with a real tokenizer, `--words` picks the prompt words instead.
"""

import argparse
import http.client
import json
import random
import statistics
import threading
import time
import urllib.parse


def stream_one(url, prompt, max_tokens):
    """One streamed completion: (arrival times of the chunks with text, completion tokens, start)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                       "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    times, tokens = [], None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        d = json.loads(line[6:])
        if d.get("usage"):
            tokens = d["usage"]["completion_tokens"]
        if d.get("choices") and d["choices"][0].get("text"):
            times.append(time.perf_counter())
    conn.close()
    return times, tokens, t0


def level(url, clients, requests_each, prompt_tokens, max_tokens, words, rng):
    results, lock, errors = [], threading.Lock(), []

    def client(seed):
        r = random.Random(seed)
        for _ in range(requests_each):
            prompt = " ".join(r.choice(words) for _ in range(prompt_tokens))
            try:
                out = stream_one(url, prompt, max_tokens)
            except Exception as e:  # noqa: BLE001 (reported below)
                errors.append(repr(e))
                return
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(rng.random(),)) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    tokens = sum(n for _, n, _ in results)
    gaps = [b - a for times, _, _ in results for a, b in zip(times, times[1:])]
    ttft = [times[0] - start for times, _, start in results if times]
    return {"clients": clients, "requests": len(results), "output_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "median_gap_ms": 1e3 * statistics.median(gaps),
            "p90_gap_ms": 1e3 * statistics.quantiles(gaps, n=10)[-1], "median_ttft_ms": 1e3 * statistics.median(ttft)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--requests-each", type=int, default=2, help="requests per client, back to back")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=152576, help="stand-in tokenizer: words t0 .. t{vocab-1}")
    ap.add_argument("--words", help="a file of prompt words instead (a real tokenizer's model)")
    ap.add_argument("--warmup", type=int, default=1, help="requests before timing (graph capture)")
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args()
    words = open(a.words).read().split() if a.words else [f"t{i}" for i in range(a.vocab)]
    rng = random.Random(0)
    for _ in range(a.warmup):
        stream_one(a.url, " ".join(rng.choice(words) for _ in range(a.prompt_tokens)), 16)
    rows = []
    print("| clients | requests | output tokens | wall s | output tokens/s | median gap ms | p90 gap ms | median TTFT ms |")
    print("|---|---|---|---|---|---|---|---|")
    for c in [int(x) for x in a.concurrency.split(",")]:
        r = level(a.url, c, a.requests_each, a.prompt_tokens, a.max_tokens, words, rng)
        rows.append(r)
        print(f"| {r['clients']} | {r['requests']} | {r['output_tokens']} | {r['wall_s']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['median_gap_ms']:.3f} | {r['p90_gap_ms']:.3f} | {r['median_ttft_ms']:.1f} |", flush=True)
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
