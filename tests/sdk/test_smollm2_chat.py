"""A streamed multi-turn chat with SmolLM2-135M-Instruct through the official OpenAI SDK (strict
validation). Run by crates/server/tests/smollm2.rs:  python test_smollm2_chat.py BASE_URL"""
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="x", _strict_response_validation=True, max_retries=0)
model = client.models.list().data[0].id
history = [{"role": "user", "content": "What is the capital of France?"}]
for follow_up in ["And what is the capital of Italy?", None]:
    text, finish = "", None
    for chunk in client.chat.completions.create(model=model, messages=history, max_tokens=40, temperature=0, stream=True):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text.strip() and finish in ("stop", "length"), (text, finish)
    print(f"assistant: {text!r}")
    history.append({"role": "assistant", "content": text})
    if follow_up:
        history.append({"role": "user", "content": follow_up})
assert "Rome" in history[-1]["content"], history[-1]["content"]
print("smollm2 multi-turn: ok")
