"""How long one streamed completion waits between SSE reads while other clients send very long
prompts: a running Peregrine (or any OpenAI-compatible server) at PORT, BIGS processes each
sending a CHARS-character prompt to /v1/completions in a loop (1 token asked; over the model's
context they are refused after tokenizing, which is the work this measures), and one client
streaming three 200-token greedy completions on a kept-alive connection. Prints the gaps' median,
p99 and largest. Standard library only. With --chat the long prompts are one user message each to
/v1/chat/completions (the body parsed, the chat template rendered, then tokenized).

    python tools/bench/stream_stall.py PORT CHARS BIGS [--chat]      # e.g. 8000 2000000 2
"""
import http.client, json, multiprocessing, random, sys, time, urllib.request


def long_prompt(chars):
    """A CHARS-character prompt of numbered words (the same one every run)."""
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "function", "return", "value", "index", "matrix", "tensor", "kernel", "stream"]
    return " ".join(rng.choice(words) + str(rng.randint(0, 999)) for _ in range(chars // 8))


def stream_gaps(conn, tokens):
    """Streams a TOKENS-token greedy completion on conn; (gap, seconds since the request) of each
    SSE read after the first."""
    body = json.dumps({"prompt": "def f(x):\n", "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    r, last, gaps = conn.getresponse(), None, []
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        now = time.perf_counter()
        if last is not None:
            gaps.append((now - last, now - t0))
        last = now
    return gaps


def hammer(port, prompt, chat, stop):
    if chat:
        route, body = "chat/completions", {"messages": [{"role": "user", "content": prompt}], "max_tokens": 1}
    else:
        route, body = "completions", {"prompt": prompt, "max_tokens": 1}
    body = json.dumps(body).encode()
    while not stop.is_set():
        try:
            urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/{route}", body, {"content-type": "application/json"}))
        except Exception:
            pass  # refused for its length: expected


def main():
    port, chars, bigs = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    chat = "--chat" in sys.argv[4:]
    big = long_prompt(chars)
    stop = multiprocessing.Event()
    procs = [multiprocessing.Process(target=hammer, args=(port, big, chat, stop)) for _ in range(bigs)]
    for p in procs:
        p.start()
    time.sleep(0.2)
    conn = http.client.HTTPConnection("127.0.0.1", port)
    gaps = [g for _ in range(3) for g, _ in stream_gaps(conn, 200)]
    stop.set()
    for p in procs:
        p.join()
    gaps.sort()
    print(f"{'chat ' if chat else ''}prompts of {len(big)} chars x{bigs}: stream gaps n={len(gaps)} p50 {gaps[len(gaps) // 2] * 1e3:.2f} ms "
          f"p99 {gaps[int(len(gaps) * 0.99)] * 1e3:.1f} ms max {gaps[-1] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
