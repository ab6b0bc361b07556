"""How long one streamed completion stops while a single very long request arrives: a running
Peregrine (or any OpenAI-compatible server) at PORT streams a 1500-token greedy completion; one
second in, one CHARS-character prompt goes to /v1/chat/completions (with --completions, to
/v1/completions) through curl. Prints the stream's four largest gaps and when they came (seconds
after the stream began). Unlike stream_stall.py's loop of long prompts, this lands one body's
parse and chat template inside the stream (a 33 MB body is then tokenized for seconds).

    python tools/bench/body_stall.py PORT CHARS [--completions]    # e.g. 8000 28000000
"""
import http.client, json, os, random, subprocess, sys, tempfile, threading, time


def main():
    port, chars = int(sys.argv[1]), int(sys.argv[2])
    completions = "--completions" in sys.argv[3:]
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "function", "return", "value", "index", "matrix", "tensor", "kernel", "stream"]
    big = " ".join(rng.choice(words) + str(rng.randint(0, 999)) for _ in range(chars // 8))
    body = {"prompt": big} if completions else {"messages": [{"role": "user", "content": big}]}
    route = "completions" if completions else "chat/completions"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({**body, "max_tokens": 1}, f)
    size = os.path.getsize(f.name)

    def fire():
        time.sleep(1.0)
        subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/v1/{route}", "-H", "content-type: application/json", "--data-binary", f"@{f.name}"])

    conn = http.client.HTTPConnection("127.0.0.1", port)
    stream = json.dumps({"prompt": "def f(x):\n", "max_tokens": 1500, "temperature": 0, "stream": True, "ignore_eos": True})
    conn.request("POST", "/v1/completions", stream, {"content-type": "application/json"})
    threading.Thread(target=fire, daemon=True).start()
    r, last, gaps, t0 = conn.getresponse(), None, [], time.perf_counter()
    while True:
        chunk = r.read1(65536)
        if not chunk:
            break
        now = time.perf_counter()
        if last is not None:
            gaps.append((now - last, now - t0))
        last = now
    os.unlink(f.name)
    top = sorted(gaps, reverse=True)[:4]
    print(f"{route} body of {size} bytes at 1.0 s: stream n={len(gaps)} over {last - t0:.1f} s; largest gaps: "
          + ", ".join(f"{g * 1e3:.1f} ms at {t:.2f} s" for g, t in top))


if __name__ == "__main__":
    main()
