"""What constrained decoding costs a streamed completion per token: a running Peregrine (or any
OpenAI-compatible server) at PORT, one client, several requests of TOKENS tokens in each mode:
plain greedy, plain sampled (T 0.8, top-p 0.95), JSON mode, a JSON schema and a regex, each
greedy. Prints each mode's median and p90 gap between SSE events (the inter-token latency while
the output lasts: a constrained output may end before TOKENS). Standard library only.

    python tools/bench/guided_itl.py PORT [TOKENS] [REQUESTS]      # e.g. 8000 64 3
    python tools/bench/guided_itl.py PORT TOKENS REQUESTS --beside N  # e.g. 8000 64 3 --beside 7
    python tools/bench/guided_itl.py PORT TOKENS REQUESTS --sampling  # penalties, bias, logprobs

With --beside N: N other clients stream plain greedy completions the whole time, and the measured
client is plain greedy, first alone among them, then with one more client streaming a JSON schema
(a constrained sequence sharing the others' steps).
"""
import http.client, json, statistics, sys, threading, time

SCHEMA = {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer"}},
                                           "note": {"type": "string"}}, "required": ["items", "note"]}
MODES = {
    "plain greedy": {"temperature": 0, "ignore_eos": True},
    "plain T0.8 top-p 0.95": {"temperature": 0.8, "top_p": 0.95, "seed": 1, "ignore_eos": True},
    "json_object": {"temperature": 0, "response_format": {"type": "json_object"}},
    "json_schema": {"temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}},
    "guided_regex": {"temperature": 0, "guided_regex": "([a-z]+ [0-9]+, )+"},
}
# With --sampling: unconstrained requests whose sampling needs more than ids and fixed parameters
# (penalties read the output so far, logprobs the logits), against plain greedy.
SAMPLING_MODES = {
    "plain greedy": {"temperature": 0, "ignore_eos": True},
    "greedy logit_bias": {"temperature": 0, "ignore_eos": True, "logit_bias": {"11": 2.0}},
    "T0.8 presence 0.5 frequency 0.3": {"temperature": 0.8, "top_p": 0.95, "seed": 1, "ignore_eos": True,
                                        "presence_penalty": 0.5, "frequency_penalty": 0.3},
    "greedy repetition 1.1": {"temperature": 0, "ignore_eos": True, "repetition_penalty": 1.1},
    "greedy logprobs 5": {"temperature": 0, "ignore_eos": True, "logprobs": 5},
}


def gaps(conn, tokens, extra):
    """Streams one completion; the gaps between its SSE reads (seconds) and its token count."""
    body = dict({"prompt": "Record: ", "max_tokens": tokens, "stream": True,
                 "stream_options": {"include_usage": True}}, **extra)
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise SystemExit(f"{r.status}: {r.read()[:300]!r}")
    last, out, text = None, [], b""
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        text += chunk
        now = time.perf_counter()
        if last is not None:
            out.append(now - last)
        last = now
    used = [json.loads(l[6:])["usage"]["completion_tokens"] for l in text.decode().splitlines()
            if l.startswith("data: {") and '"usage":{' in l]
    return out, (used or [0])[-1]


def stream_until(port, extra, stop):
    """Streams TOKENS-token completions of one kind on its own connection until stop is set."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    while not stop.is_set():
        gaps(conn, 64, extra)


def measure(conn, tokens, requests, extra):
    all_gaps = []
    for _ in range(requests):
        all_gaps += gaps(conn, tokens, extra)[0]
    all_gaps.sort()
    return f"median {statistics.median(all_gaps) * 1e3:.3f} ms, p90 {all_gaps[len(all_gaps) * 9 // 10] * 1e3:.3f} ms over {len(all_gaps)} gaps"


def beside(port, tokens, requests, n):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    gaps(conn, 8, MODES["json_schema"])  # the vocabulary's compiler, built before timing
    stop = threading.Event()
    others = [threading.Thread(target=stream_until, args=(port, MODES["plain greedy"], stop)) for _ in range(n)]
    for t in others:
        t.start()
    time.sleep(1)
    print(f"plain greedy beside {n} plain: {measure(conn, tokens, requests, MODES['plain greedy'])}")
    guided_stop = threading.Event()
    guided = threading.Thread(target=stream_until, args=(port, dict(MODES["json_schema"], max_tokens=64), guided_stop))
    guided.start()
    time.sleep(0.5)
    print(f"plain greedy beside {n} plain and 1 json_schema: {measure(conn, tokens, requests, MODES['plain greedy'])}")
    guided_stop.set()
    stop.set()
    for t in others + [guided]:
        t.join()


def main():
    port = int(sys.argv[1])
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    requests = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    if "--beside" in sys.argv:
        return beside(port, tokens, requests, int(sys.argv[sys.argv.index("--beside") + 1]))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    gaps(conn, 8, MODES["plain greedy"])  # warm up
    for name, extra in (SAMPLING_MODES if "--sampling" in sys.argv else MODES).items():
        gaps(conn, 8, extra)  # the first guided request builds the vocabulary's compiler
        all_gaps, counts = [], []
        for _ in range(requests):
            g, n = gaps(conn, tokens, extra)
            all_gaps += g
            counts.append(n)
        all_gaps.sort()
        print(f"{name:>22}: median {statistics.median(all_gaps) * 1e3:.3f} ms, p90 {all_gaps[len(all_gaps) * 9 // 10] * 1e3:.3f} ms"
              f" over {len(all_gaps)} gaps; tokens per request {counts}")


main()
