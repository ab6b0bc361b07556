"""Tool calls and reasoning through the OpenAI Python SDK with strict response validation,
against the scripted server of crates/server/tests/chat_output.rs (whose reply to "ask-weather"
calls get_weather and get_time, and to "ask-think" thinks, then calls get_time).

    python tests/sdk/test_chat_output_sdk.py http://127.0.0.1:PORT/v1

Exits non-zero on the first failure.
"""
import json
import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1], api_key="none", _strict_response_validation=True, max_retries=0)
tools = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
msgs = [{"role": "user", "content": "ask-weather, please"}]

r = client.chat.completions.create(model="scripted", messages=msgs, tools=tools, temperature=0, max_tokens=400)
choice = r.choices[0]
assert choice.finish_reason == "tool_calls", choice
calls = choice.message.tool_calls
assert [c.function.name for c in calls] == ["get_weather", "get_time"], calls
assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "C"}, calls
assert all(c.type == "function" and c.id.startswith("call_") for c in calls), calls

# Streamed, accumulated the way clients do: by each delta's tool call index.
stream = client.chat.completions.create(model="scripted", messages=msgs, tools=tools, temperature=0, max_tokens=400, stream=True)
acc, content, finish = {}, "", None
for chunk in stream:
    for c in chunk.choices:
        content += c.delta.content or ""
        for tc in c.delta.tool_calls or []:
            slot = acc.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += tc.id or ""
            slot["name"] += tc.function.name or ""
            slot["arguments"] += tc.function.arguments or ""
        finish = c.finish_reason or finish
assert finish == "tool_calls", finish
assert [acc[i]["name"] for i in sorted(acc)] == ["get_weather", "get_time"], acc
assert json.loads(acc[0]["arguments"]) == {"city": "Paris", "unit": "C"}, acc
assert "<tool_call>" not in content, content

# The assistant turn with its calls and the tool results go back in as history.
follow = msgs + [
    {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
    {"role": "tool", "tool_call_id": calls[0].id, "content": "18 C"},
    {"role": "tool", "tool_call_id": calls[1].id, "content": "noon"},
    {"role": "user", "content": "ask-plain now"},
]
r = client.chat.completions.create(model="scripted", messages=follow, tools=tools, temperature=0, max_tokens=400)
assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None, r
# Reasoning beside a call: an extra field the SDK keeps, streamed as its own deltas.
r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "ask-think"}], tools=tools,
                                   temperature=0, max_tokens=400)
m = r.choices[0].message
assert m.model_extra["reasoning_content"] == "\nThe user wants the time: call get_time.\n", m
assert m.content is None and m.tool_calls[0].function.name == "get_time", m
stream = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "ask-think"}], tools=tools,
                                        temperature=0, max_tokens=400, stream=True)
reasoning = "".join((c.delta.model_extra or {}).get("reasoning_content", "") for chunk in stream for c in chunk.choices)
assert reasoning == "\nThe user wants the time: call get_time.\n", reasoning

# Structured outputs: the SDK's parse() sends a strict json_schema made from a pydantic model
# and reads the reply back into it (the script for "ask-json" is {"city": "Paris"}).
from pydantic import BaseModel


class City(BaseModel):
    city: str


r = client.chat.completions.parse(model="scripted", messages=[{"role": "user", "content": "ask-json"}], response_format=City,
                                  temperature=0, max_tokens=400)
assert r.choices[0].message.parsed == City(city="Paris"), r
assert r.choices[0].finish_reason == "stop", r

# A forced call (tool_choice naming a function): its arguments as the call, even with the SDK's
# strict validation ("ask-forced" replies {"city": "Paris", "unit": "C"}).
r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "ask-forced"}], tools=tools,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, max_tokens=400)
calls = r.choices[0].message.tool_calls
assert [c.function.name for c in calls] == ["get_weather"] and json.loads(calls[0].function.arguments)["city"] == "Paris", r
print("all checks passed")
