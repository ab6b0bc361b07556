"""OpenAI Python SDK conformance against a running Peregrine server, with strict response
validation (every body and every stream chunk is checked against the SDK's models).

    python tests/sdk/test_openai_sdk.py http://127.0.0.1:PORT/v1

Run by crates/server/tests/sdk.rs; exits non-zero on the first failure.
"""
import re
import sys

import openai
from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=base, api_key="sk-test", _strict_response_validation=True, max_retries=0)
bad_client = OpenAI(base_url=base, api_key="wrong", _strict_response_validation=True, max_retries=0)

models = client.models.list()
model = models.data[0].id
assert model, models
assert client.models.retrieve(model).id == model
try:
    client.models.retrieve("no-such-model")
    raise AssertionError("an unknown model was retrieved")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body

msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def add(a, b):"}]

# Non-streaming chat with logprobs.
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0,
                                   logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
assert r.object == "chat.completion"
assert r.choices[0].finish_reason == "length"
assert r.usage.completion_tokens == 8
assert len(r.choices[0].logprobs.content) == 8
assert all(len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)
greedy = r.choices[0].message.content

# Streaming chat with usage.
stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0, stream=True,
                                        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
text, usage, finish = "", None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        text += c.delta.content or ""
        finish = c.finish_reason or finish
assert text == greedy, (text, greedy)
assert usage is not None and usage.completion_tokens == 8 and usage.prompt_tokens == r.usage.prompt_tokens
assert finish == "length"

# Multi-turn streamed chat.
turns = msgs + [{"role": "assistant", "content": greedy}, {"role": "user", "content": "Now subtract."}]
parts = list(client.chat.completions.create(model=model, messages=turns, max_tokens=5, stream=True, seed=1))
assert parts[0].choices[0].delta.role == "assistant"

# Legacy completions, streaming and not.
# (echo together with logprobs returns null for the first prompt token, as OpenAI's legacy API and
# vLLM do; the SDK's strict model does not allow that null, so the two are checked separately here
# and together in crates/server/tests/http.rs.)
c = client.completions.create(model=model, prompt="import os\n", max_tokens=6, echo=True, temperature=0)
assert c.choices[0].text.startswith("import os\n")
c = client.completions.create(model=model, prompt="import os\n", max_tokens=6, logprobs=2, temperature=0,
                              extra_body={"ignore_eos": True})
assert len(c.choices[0].logprobs.token_logprobs) == 6
assert all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)
# Legacy completion stream chunks carry `finish_reason: null` until the last one (as OpenAI's API
# does), which the SDK's strict Completion model rejects; this one check runs without strictness.
lax = OpenAI(base_url=base, api_key="sk-test", max_retries=0)
chunks = list(lax.completions.create(model=model, prompt=["a", "b"], max_tokens=3, stream=True,
                                     extra_body={"ignore_eos": True}))
assert sorted(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason) == ["length", "length"]

# vLLM's structured-output fields through extra_body: a GBNF grammar holds the output, on both routes.
grammar = 'root ::= ("yes" | "no") "-" [0-9]{1,3}\n'
g = client.completions.create(model=model, prompt="x = ", max_tokens=20, temperature=1.0, seed=3,
                              extra_body={"guided_grammar": grammar})
assert re.fullmatch(r"(yes|no)-[0-9]{1,3}", g.choices[0].text) and g.choices[0].finish_reason == "stop", g
g = client.chat.completions.create(model=model, messages=msgs, max_tokens=20, temperature=1.0, seed=4,
                                   extra_body={"structured_outputs": {"grammar": grammar}})
assert re.fullmatch(r"(yes|no)-[0-9]{1,3}", g.choices[0].message.content), g

# Errors surface as the right exception classes.
for call, exc in [
    (lambda: client.chat.completions.create(model="no-such-model", messages=msgs), openai.NotFoundError),
    (lambda: client.chat.completions.create(model=model, messages=[]), openai.BadRequestError),
    (lambda: client.chat.completions.create(model=model, messages=msgs, temperature=9), openai.BadRequestError),
    (lambda: bad_client.models.list(), openai.AuthenticationError),
    (lambda: client.completions.create(model=model, prompt="x", extra_body={"guided_grammar": "root ::= nope\n"}), openai.BadRequestError),
]:
    try:
        call()
    except exc as e:
        assert e.body and "message" in e.body, e.body
    else:
        raise AssertionError(f"expected {exc.__name__}")

print("openai SDK conformance: all checks passed")
