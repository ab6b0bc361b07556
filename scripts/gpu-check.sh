#!/usr/bin/env bash
# The GPU checks (CI has no GPU). Two halves:
#   scripts/gpu-check.sh --build   here: builds the GPU test binary and the bench into .bin/
#   scripts/gpu-check.sh           on the GPU machine: runs them, logs under $OUT (or target/gpu-check)
# With the device tool: build here, then run `scripts/gpu-check.sh` with carry [".bin"] (or, when the
# tree and .bin together pass the tool's 64 MiB, carry a `tar czf` of .bin and unpack it first).
# GPU_CHECK_BENCH=0 runs the tests and the HTTP comparisons only.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--build" ]]; then
    mkdir -p .bin
    exe=$(cargo test --release -p peregrine-cuda --test kernels --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
    cp "$exe" .bin/cuda-kernels
    exe=$(cargo test --release -p peregrine-cuda --test model --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
    cp "$exe" .bin/cuda-model
    exe=$(cargo test --release -p peregrine-cuda --test ops --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
    cp "$exe" .bin/cuda-ops
    exe=$(cargo test --release -p peregrine-cuda --lib --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
    cp "$exe" .bin/cuda-lib
    # Its own binary: the kernel fault it injects poisons the process's GPU context for good.
    exe=$(cargo test --release -p peregrine-engine --test lost_gpu --no-run --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable")][-1])')
    cp "$exe" .bin/engine-lost-gpu
    # Without the embedded model (the tree carries models/ already; the carry limit is 64 MiB).
    cargo build --release -p peregrine-server --no-default-features --target-dir target/gpu-check
    strip -o .bin/peregrine target/gpu-check/release/peregrine
    strip .bin/cuda-kernels .bin/cuda-model .bin/cuda-ops .bin/cuda-lib .bin/engine-lost-gpu
    cargo build --release -p peregrine-cuda --example bench --example step_bench --example graph_memory
    strip -o .bin/cuda-bench target/release/examples/bench
    strip -o .bin/step-bench target/release/examples/step_bench
    strip -o .bin/graph-memory target/release/examples/graph_memory
    cargo build --release -p peregrine-engine --example spec_bench --example engine_bench
    strip -o .bin/spec-bench target/release/examples/spec_bench
    strip -o .bin/engine-bench target/release/examples/engine_bench
    # The device machine's copy of .git can be stale: the build records what it built.
    { git rev-parse --short HEAD; git diff --quiet HEAD -- crates kernels || echo "(plus uncommitted changes)"; } | paste -sd' ' > .bin/commit
    ls -la .bin
    exit 0
fi
LOG=${OUT:-target/gpu-check}
mkdir -p "$LOG"
export NCCL_NVLS_ENABLE=0
export PEREGRINE_REQUIRE_GPU=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$LOG/device.txt"
echo "commit: $(cat .bin/commit 2>/dev/null || echo "unknown (no .bin/commit; run --build)")" | tee -a "$LOG/device.txt"
status=0
.bin/cuda-kernels --nocapture --test-threads 1 2>&1 | tee "$LOG/kernels.log" || status=1
# The one-block sampler and logprobs (what GPUs before Hopper run) against the host as well.
PEREGRINE_SAMPLE_CLUSTER=0 .bin/cuda-kernels --nocapture --test-threads 1 sampl logprob logit 2>&1 | tee "$LOG/kernels-one-block-sampler.log" || status=1
# (On a machine with two GPUs, `nvidia-h200-x2`, they also run a model on each, in turn and at once.)
.bin/cuda-model --nocapture --test-threads 1 2>&1 | tee "$LOG/model.log" || status=1
.bin/cuda-ops --nocapture --test-threads 1 2>&1 | tee "$LOG/ops.log" || status=1
.bin/cuda-lib --nocapture --test-threads 1 2>&1 | tee "$LOG/lib.log" || status=1
.bin/engine-lost-gpu --nocapture 2>&1 | tee "$LOG/lost-gpu.log" || status=1
# End to end over HTTP: the same greedy completions from --device cuda and --device cpu.
e2e() {  # $1 device, $2 port, $3 speculative model (none: off; default: the model's own), $4.. model args
    local dev=$1 port=$2 spec=$3; shift 3
    local sflag=(--speculative-model "$spec"); [ "$spec" = default ] && sflag=()
    PEREGRINE_CACHE_DIR=/tmp/pcache .bin/peregrine serve "$@" --device "$dev" --port "$port" "${sflag[@]}" \
        > "$LOG/serve-$dev-$port.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 120); do curl -sf "localhost:$port/health" >/dev/null && break; sleep 0.5; done
    for prompt in 'def fibonacci(n):\n' 'import os\n\ndef list_python_files(path):\n' 'class Stack:\n'; do
        curl -s "localhost:$port/v1/completions" -H 'content-type: application/json' \
            -d "{\"prompt\":\"$prompt\",\"max_tokens\":64,\"temperature\":0}" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["choices"][0]["text"]))'
    done
    # JSON mode (its masks built on the host, applied to the GPU's logits on the GPU): greedy, as on the CPU.
    curl -s "localhost:$port/v1/completions" -H 'content-type: application/json' \
        -d '{"prompt":"config = ","max_tokens":48,"temperature":0,"response_format":{"type":"json_object"}}' | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["choices"][0]["text"]))'
    # A JSON schema (llguidance's masks, applied on the GPU): greedy, as on the CPU.
    curl -s "localhost:$port/v1/completions" -H 'content-type: application/json' \
        -d '{"prompt":"user = ","max_tokens":48,"temperature":0,"response_format":{"type":"json_schema","json_schema":{"name":"user","schema":{"type":"object","properties":{"name":{"type":"string","maxLength":12},"age":{"type":"integer"},"pet":{"enum":["cat","dog"]}},"required":["name","age","pet"],"additionalProperties":false}}}}' \
        | python3 -c 'import json,sys; r=json.load(sys.stdin)["choices"][0]; print(json.dumps([r["text"], r["finish_reason"]]))'
    # A GBNF grammar (rewritten into llguidance's Lark, masks over the GPU's logits): greedy, as on the CPU.
    curl -s "localhost:$port/v1/completions" -H 'content-type: application/json' \
        -d '{"prompt":"def f(x):\n    return ","max_tokens":24,"temperature":0,"guided_grammar":"root ::= expr\nexpr ::= term ((\" + \" | \" * \") term)*\nterm ::= \"x\" | [0-9]{1,3} | \"(\" expr \")\"\n"}' \
        | python3 -c 'import json,sys; r=json.load(sys.stdin)["choices"][0]; print(json.dumps([r["text"], r["finish_reason"]]))'
    # A regex and allowed token ids (masks applied on the GPU): greedy, as on the CPU.
    curl -s "localhost:$port/v1/completions" -H 'content-type: application/json' \
        -d '{"prompt":"x = ","max_tokens":16,"temperature":0,"guided_regex":"[a-z_]{1,8}\\([0-9]{1,3}\\)"}' \
        | python3 -c 'import json,sys; r=json.load(sys.stdin)["choices"][0]; print(json.dumps([r["text"], r["finish_reason"]]))'
    curl -s "localhost:$port/v1/completions" -H 'content-type: application/json' \
        -d '{"prompt":"def f(x):\n","max_tokens":12,"temperature":0,"allowed_token_ids":[220,262,284,320,340,345,353,366,400,482]}' \
        | python3 -c 'import json,sys; r=json.load(sys.stdin)["choices"][0]; print(json.dumps([r["text"], r["finish_reason"]]))'
    # Greedy with repetition, presence and frequency penalties (overlapped steps sampled once the
    # step ahead is committed, on the GPU): as on the CPU.
    curl -s "localhost:$port/v1/completions" -H 'content-type: application/json' \
        -d '{"prompt":"class Node:\n","max_tokens":32,"temperature":0,"repetition_penalty":1.2,"presence_penalty":0.5,"frequency_penalty":0.3}' \
        | python3 -c 'import json,sys; r=json.load(sys.stdin)["choices"][0]; print(json.dumps([r["text"], r["finish_reason"]]))'
    # min_tokens: the greedy text's first token and its indented newline as stop ids, banned
    # until 16 tokens (-inf logit adjustments on the GPU, verify rows included): as on the CPU.
    curl -s "localhost:$port/v1/completions" -H 'content-type: application/json' \
        -d '{"prompt":"def fibonacci(n):\n","max_tokens":32,"temperature":0,"min_tokens":16,"stop_token_ids":[204,271]}' \
        | python3 -c 'import json,sys; r=json.load(sys.stdin)["choices"][0]; print(json.dumps([r["text"], r["finish_reason"]]))'
    # bad_words (a word's last token at -inf after the ones before it: history-dependent
    # adjustments on the GPU, deferred chained steps and verify rows): greedy, as on the CPU.
    curl -s "localhost:$port/v1/completions" -H 'content-type: application/json' \
        -d '{"prompt":"def fibonacci(n):\n","max_tokens":32,"temperature":0,"bad_words":["Return","one-dimensional"," the"]}' \
        | python3 -c 'import json,sys; r=json.load(sys.stdin)["choices"][0]; print(json.dumps([r["text"], r["finish_reason"]]))'
    # prompt_logprobs (every prompt row's logits; the prefix cache passed by): the likeliest
    # token at each prompt position, as on the CPU.
    curl -s "localhost:$port/v1/completions" -H 'content-type: application/json' \
        -d '{"prompt":"def fibonacci(n):\n    if n < 2:\n","max_tokens":1,"temperature":0,"prompt_logprobs":1}' \
        | python3 -c 'import json,sys; p=json.load(sys.stdin)["choices"][0]["prompt_logprobs"]; print(json.dumps([e and [k for k, v in e.items() if v["rank"] == 1] for e in p]))'
    # /v1/responses, streamed (a chat through the template, reshaped into typed events): greedy,
    # as on the CPU: the output text, the last event, and its output token count.
    curl -sN "localhost:$port/v1/responses" -H 'content-type: application/json' \
        -d '{"instructions":"Write Python.","input":"def fibonacci(n):","max_output_tokens":32,"temperature":0,"stream":true}' \
        | python3 -c 'import json,sys; ev=[json.loads(l[6:]) for l in sys.stdin.read().splitlines() if l.startswith("data: ")]; print(json.dumps(["".join(e["delta"] for e in ev if e["type"] == "response.output_text.delta"), ev[-1]["type"], ev[-1]["response"]["usage"]["output_tokens"]]))'
    # /v1/messages (Anthropic's API over the chat route), streamed: greedy, as on the CPU: the
    # text, the stop reason and the output tokens.
    curl -sN "localhost:$port/v1/messages" -H 'content-type: application/json' \
        -d '{"system":"Write Python.","messages":[{"role":"user","content":"class Stack:"}],"max_tokens":24,"temperature":0,"stream":true}' \
        | python3 -c 'import json,sys; ev=[json.loads(l[6:]) for l in sys.stdin.read().splitlines() if l.startswith("data: ")]; d=[e for e in ev if e["type"] == "message_delta"][0]; print(json.dumps(["".join(e["delta"].get("text", "") for e in ev if e["type"] == "content_block_delta"), d["delta"]["stop_reason"], d["usage"]["output_tokens"]]))'
    # Seeded sampling (on the GPU for --device cuda): the same seed gives the same text, four
    # times. Under the adaptive default the GPU's verify rows round apart from its decode rows
    # and which steps draft follows their timing, so a seeded sampling request decodes plainly
    # there (the engine's `seeded_decodes_plainly`): its requests must add no draft round.
    local texts n r0 r1 adaptive=""
    [ "$spec" != none ] && [[ " $* " != *" always "* ]] && [ -d "$1/dflash" ] && adaptive=" (adaptive speculation)"
    rounds() { curl -s "localhost:$port/metrics" | grep -E "^vllm:spec_decode_num_drafts_total" | awk '{print $NF}'; }
    r0=$(rounds)
    texts=$(for _ in 1 2 3 4; do
        curl -s "localhost:$port/v1/completions" -H 'content-type: application/json' -d '{"prompt":"def main():\n","max_tokens":48,"temperature":0.8,"top_p":0.95,"seed":7}' \
            | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["choices"][0]["text"]))'
    done)
    r1=$(rounds)
    n=$(echo "$texts" | sort -u | wc -l)
    if [ "$(echo "$texts" | grep -c .)" -ne 4 ] || [ "$n" -ne 1 ]; then
        echo "seeded sampling on $dev$adaptive: DIFFERS between identical requests: $(echo "$texts" | sort -u | tr '\n' ' ')" >> "$LOG/seeded.txt"
    elif [ -n "$adaptive" ] && [ "$r0" != "$r1" ]; then
        echo "seeded sampling on $dev$adaptive: reproducible, but it drafted ($r0 -> $r1 rounds): DIFFERS" >> "$LOG/seeded.txt"
    else
        echo "seeded sampling on $dev$adaptive: one text over 4 requests (draft rounds ${r0:-none} -> ${r1:-none})" >> "$LOG/seeded.txt"
    fi
    curl -s "localhost:$port/metrics" | grep -E "^(vllm:spec_decode_num_(drafts|accepted_tokens)_total|peregrine:spec_decode_plain_steps_total)" > "$LOG/metrics-$dev-$port.txt" || true
    kill $pid; wait $pid 2>/dev/null || true
}
# `--kv-cache-dtype auto` keeps BF16 pools on the GPU and f32 on the CPU. float32 on both is
# compared on every model; BF16 and FP8 (the CPU rounding its f32 pools the same way) on the
# trained demo model only: on the golden fixtures' random models a value within ~1e-6 of a rounding boundary
# rounds to neighbours one ulp apart and grows (docs/design-notes.md, "How BF16 is tested").
# Each e2e run prints one line a request (3 prompts, JSON mode, a schema, a grammar, a regex,
# allowed ids, penalties, min_tokens, bad words, prompt logprobs, a streamed response, a streamed
# Anthropic message); a request that failed prints none, so two failed runs cannot compare as
# identical.
E2E_LINES=14
same() {  # $1 what, $2 GPU's file, $3 CPU's file
    if cmp -s "$LOG/$2" "$LOG/$3" && [ "$(wc -l < "$LOG/$3")" -eq "$E2E_LINES" ]; then echo "e2e $1: identical to --device cpu"; else echo "e2e $1: DIFFERS from --device cpu:"; cat "$LOG/$2"; status=1; fi
}
for m in models/peregrine-mimo-tiny tests/fixtures/golden/default; do
    e2e cuda 8201 none $m --kv-cache-dtype float32 > "$LOG/e2e-cuda.txt"; e2e cpu 8202 none $m > "$LOG/e2e-cpu.txt"
    echo "e2e $m: cuda"; cat "$LOG/e2e-cuda.txt"
    same "$m (float32 pools on both)" e2e-cuda.txt e2e-cpu.txt
done > "$LOG/e2e.log"
e2e cpu 8204 none models/peregrine-mimo-tiny > "$LOG/e2e-demo-cpu.txt"
e2e cpu 8209 none models/peregrine-mimo-tiny --kv-cache-dtype bfloat16 > "$LOG/e2e-demo-cpu-bf16.txt"
e2e cuda 8208 none models/peregrine-mimo-tiny > "$LOG/e2e-cuda-auto.txt"
{
    same "demo with the default --kv-cache-dtype auto on cuda (BF16 pools), against the CPU's BF16 pools" e2e-cuda-auto.txt e2e-demo-cpu-bf16.txt
    grep -q "KV cache allocated.*bfloat16" "$LOG/serve-cuda-8208.log" || echo "e2e: auto did not keep BF16 pools on cuda: DIFFERS"
    grep -q "KV cache allocated.*float32" "$LOG/serve-cpu-8204.log" || echo "e2e: auto did not keep float32 pools on the CPU: DIFFERS"
} >> "$LOG/e2e.log"
# FP8 e4m3 pools (--kv-cache-dtype fp8) on both backends, and under DFlash on the GPU (the
# drafter's context pools FP8 too).
e2e cpu 8211 none models/peregrine-mimo-tiny --kv-cache-dtype fp8 > "$LOG/e2e-demo-cpu-fp8.txt"
e2e cuda 8212 none models/peregrine-mimo-tiny --kv-cache-dtype fp8 > "$LOG/e2e-cuda-fp8.txt"
e2e cuda 8213 default models/peregrine-mimo-tiny --kv-cache-dtype fp8 --speculative-mode always > "$LOG/e2e-cuda-fp8-spec.txt"
{
    same "demo with FP8 pools on cuda, against the CPU's FP8 pools" e2e-cuda-fp8.txt e2e-demo-cpu-fp8.txt
    same "demo with DFlash and FP8 pools on cuda, against no speculation" e2e-cuda-fp8-spec.txt e2e-demo-cpu-fp8.txt
    grep -q "KV cache allocated.*fp8_e4m3" "$LOG/serve-cuda-8212.log" || echo "e2e: --kv-cache-dtype fp8 did not make FP8 pools on cuda: DIFFERS"
    grep -q "KV cache allocated.*fp8_e4m3" "$LOG/serve-cpu-8211.log" || echo "e2e: --kv-cache-dtype fp8 did not make FP8 pools on the CPU: DIFFERS"
    grep -q 'accepted_tokens_total{[^}]*} [1-9]' "$LOG/metrics-cuda-8213.txt" || echo "e2e: no draft accepted on cuda with FP8 pools: DIFFERS"
} >> "$LOG/e2e.log"
cat "$LOG/e2e.log"
# Speculation on the GPU (the demo model's own drafter) must not change greedy output either.
# Drafting on every step (the mechanics), then the adaptive default (plain and speculative steps
# mixed); with float32 pools, then with the default BF16 (the drafter's context pools BF16 too).
e2e cuda 8203 default models/peregrine-mimo-tiny --speculative-mode always --kv-cache-dtype float32 > "$LOG/e2e-cuda-spec.txt"
e2e cuda 8206 default models/peregrine-mimo-tiny --kv-cache-dtype float32 > "$LOG/e2e-cuda-adaptive.txt"
e2e cuda 8210 default models/peregrine-mimo-tiny --speculative-mode always > "$LOG/e2e-cuda-bf16-spec.txt"
{
    same "demo with DFlash on cuda (float32 pools), against no speculation" e2e-cuda-spec.txt e2e-demo-cpu.txt
    cat "$LOG/metrics-cuda-8203.txt"
    grep -q 'accepted_tokens_total{[^}]*} [1-9]' "$LOG/metrics-cuda-8203.txt" || echo "e2e: no draft accepted on cuda: DIFFERS"
    same "demo with adaptive DFlash on cuda (float32 pools), against no speculation" e2e-cuda-adaptive.txt e2e-demo-cpu.txt
    same "demo with DFlash on cuda (auto: BF16 pools), against no speculation" e2e-cuda-bf16-spec.txt e2e-demo-cpu-bf16.txt
    grep -q 'accepted_tokens_total{[^}]*} [1-9]' "$LOG/metrics-cuda-8210.txt" || echo "e2e: no draft accepted on cuda with BF16 pools: DIFFERS"
} >> "$LOG/e2e.log"
# The KV cache sized to a fraction of the GPU after a profiling step (--gpu-memory-utilization).
e2e cuda 8207 default models/peregrine-mimo-tiny --gpu-memory-utilization 0.3 > "$LOG/e2e-cuda-util.txt"
same "demo with --gpu-memory-utilization 0.3 on cuda" e2e-cuda-util.txt e2e-demo-cpu-bf16.txt >> "$LOG/e2e.log"
grep -hoE "KV cache (sized|allocated).*" "$LOG/serve-cuda-8207.log" >> "$LOG/e2e.log" || echo "e2e: no KV sizing line in the log: DIFFERS" >> "$LOG/e2e.log"
cat "$LOG/metrics-cuda-8206.txt" >> "$LOG/e2e.log"
cat "$LOG/seeded.txt" >> "$LOG/e2e.log"
# --enforce-eager (vLLM's): decode steps launched one by one, no CUDA graphs; the same text.
e2e cuda 8214 none models/peregrine-mimo-tiny --kv-cache-dtype float32 --enforce-eager > "$LOG/e2e-cuda-eager.txt"
{
    same "demo with --enforce-eager on cuda (float32 pools)" e2e-cuda-eager.txt e2e-demo-cpu.txt
    grep -q "decode steps run without CUDA graphs" "$LOG/serve-cuda-8214.log" || echo "e2e: --enforce-eager was not taken: DIFFERS"
} >> "$LOG/e2e.log"
# --seed: two unseeded sampled requests (sampled on the GPU), on a server started twice with one
# seed: the same two texts each time, and not the same as each other. (At 30dbc01 this fails on
# the first request alone: a fresh GPU server's first sampled request is not reproducible, with
# or without --seed; benches/results/2026-12-02-h200-first-sampled-request.md. Not fixed.)
seed_run() {
    PEREGRINE_CACHE_DIR=/tmp/pcache .bin/peregrine serve models/peregrine-mimo-tiny --device cuda --seed 5 --port 8215 > "$LOG/serve-seed-$1.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 120); do curl -sf localhost:8215/health >/dev/null && break; sleep 0.5; done
    for _ in 1 2; do
        curl -s localhost:8215/v1/completions -H 'content-type: application/json' -d '{"prompt":"def main():\n","max_tokens":32,"temperature":0.8,"ignore_eos":true}' \
            | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["choices"][0]["text"]))'
    done
    kill $pid; wait $pid 2>/dev/null || true
}
s1=$(seed_run 1); s2=$(seed_run 2)
if [ "$(echo "$s1" | grep -c .)" -eq 2 ] && [ "$s1" = "$s2" ] && [ "$(echo "$s1" | sort -u | wc -l)" -eq 2 ]; then
    echo "--seed on cuda: a restarted server sampled the same two texts" >> "$LOG/e2e.log"
else
    echo "--seed on cuda: DIFFERS between restarts ($s1 / $s2)" >> "$LOG/e2e.log"
fi
# Random weights made on the GPU for a config alone (--load-format dummy): served, greedy twice the same.
PEREGRINE_CACHE_DIR=/tmp/pcache .bin/peregrine serve configs/mimo-v2-flash.json --load-format dummy \
    --hf-overrides '{"num_hidden_layers": 4}' --device cuda --gpu-memory-utilization 0.6 --port 8205 > "$LOG/serve-dummy.log" 2>&1 &
dpid=$!
for _ in $(seq 1 240); do curl -sf localhost:8205/health >/dev/null && break; sleep 0.5; done
dummy() { curl -s localhost:8205/v1/completions -H 'content-type: application/json' \
    -d '{"model":"mimo-v2-flash","prompt":"t1 t2 t3 t4","max_tokens":16,"temperature":0,"ignore_eos":true}' \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["usage"]["completion_tokens"], r["choices"][0]["text"])'; }
d1=$(dummy); d2=$(dummy)
if [ -n "$d1" ] && [ "$d1" = "$d2" ] && [ "${d1%% *}" = 16 ]; then echo "dummy weights on cuda: 16 tokens, greedy reproducible" >> "$LOG/e2e.log"; else echo "dummy weights on cuda: DIFFERS ($d1 / $d2)" >> "$LOG/e2e.log"; fi
# A 3000-token prompt (the stand-in tokenizer's words are tokens): chunked prefill on the
# tensor-core prefill attention, decode on attention_gqa_tc (tables past 2048 positions).
long_dummy() { python3 -c 'import json; print(json.dumps({"model":"mimo-v2-flash","prompt":" ".join("t%d" % (7 + i * 37 % 500) for i in range(3000)),"max_tokens":16,"temperature":0,"ignore_eos":True}))' \
    | curl -s localhost:8205/v1/completions -H 'content-type: application/json' -d @- \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"], r["choices"][0]["text"])'; }
l1=$(long_dummy); l2=$(long_dummy)
if [ -n "$l1" ] && [ "$l1" = "$l2" ] && [ "$(echo "$l1" | cut -d' ' -f1-2)" = "3000 16" ]; then echo "dummy weights on cuda, 3000-token prompt: 16 tokens, greedy reproducible" >> "$LOG/e2e.log"; else echo "dummy weights on cuda, 3000-token prompt: DIFFERS ($l1 / $l2)" >> "$LOG/e2e.log"; fi
kill $dpid; wait $dpid 2>/dev/null || true
grep -hoE "KV cache (sized|allocated).*" "$LOG/serve-dummy.log" >> "$LOG/e2e.log"
echo "== e2e.log, every comparison:"; cat "$LOG/e2e.log"
grep -q DIFFERS "$LOG/e2e.log" && status=1
# GPU_CHECK_BENCH=0: the correctness half only (the benchmarks take several minutes more).
[ "${GPU_CHECK_BENCH:-1}" = 0 ] && exit $status
.bin/cuda-bench 2>&1 | tee "$LOG/bench.log" || status=1
.bin/step-bench --config configs/mimo-v2-flash.json 2>&1 | tee "$LOG/step-bench.log" || status=1
# Device memory the decode graphs hold (their logits share one buffer).
.bin/graph-memory --config configs/mimo-v2-flash.json --widths 8,64 2>&1 | tee "$LOG/graph-memory.log" || status=1
# Speculation with the demo model's trained drafter on the GPU: acceptance and tokens/s.
.bin/spec-bench models/peregrine-mimo-tiny benches/data/heldout_prompts.json 128 1 cuda 2>&1 | tee "$LOG/spec-bench.log" || status=1
exit $status
