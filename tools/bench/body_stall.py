"""How long one streamed completion stops while a single very long request arrives: a running
Peregrine (or any OpenAI-compatible server) at PORT streams a 1500-token greedy completion; one
second in, one CHARS-character prompt goes to /v1/chat/completions (with --completions, to
/v1/completions) through curl. Prints the stream's four largest gaps and when they came (seconds
after the stream began). Unlike stream_stall.py's loop of long prompts, this lands one body's
parse and chat template inside the stream (a 33 MB body is then tokenized for seconds).

    python tools/bench/body_stall.py PORT CHARS [--completions]    # e.g. 8000 28000000
"""
import http.client, json, os, subprocess, sys, tempfile, threading, time

from stream_stall import long_prompt, stream_gaps


def main():
    port, chars = int(sys.argv[1]), int(sys.argv[2])
    completions = "--completions" in sys.argv[3:]
    big = long_prompt(chars)
    body = {"prompt": big} if completions else {"messages": [{"role": "user", "content": big}]}
    route = "completions" if completions else "chat/completions"
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({**body, "max_tokens": 1}, f)
    size = os.path.getsize(f.name)

    def fire():
        time.sleep(1.0)
        subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://127.0.0.1:{port}/v1/{route}", "-H", "content-type: application/json", "--data-binary", f"@{f.name}"])

    threading.Thread(target=fire, daemon=True).start()
    gaps = stream_gaps(http.client.HTTPConnection("127.0.0.1", port), 1500)
    os.unlink(f.name)
    top = sorted(gaps, reverse=True)[:4]
    print(f"{route} body of {size} bytes at 1.0 s: stream n={len(gaps)} over {gaps[-1][1]:.1f} s; largest gaps: "
          + ", ".join(f"{g * 1e3:.1f} ms at {t:.2f} s" for g, t in top))


if __name__ == "__main__":
    main()
