"""Anthropic's Messages API (/v1/messages) through the official anthropic Python SDK with strict
response validation, against the scripted server of crates/server/tests/chat_output.rs (whose
reply to "ask-plain" is plain text, to "ask-weather" two calls, to "ask-think" thinking then a
call).

    python tests/sdk/test_anthropic_sdk.py http://127.0.0.1:PORT

Exits non-zero on the first failure.
"""
import sys

import anthropic

client = anthropic.Anthropic(base_url=sys.argv[1], api_key="none", _strict_response_validation=True, max_retries=0)
PLAIN = "No tools needed: <tool> is not a call."
THOUGHT = "\nThe user wants the time: call get_time.\n"
tools = [
    {"name": "get_weather", "description": "The weather in a city.", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
    {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
]
kw = dict(model="scripted", max_tokens=400, temperature=0)

m = client.messages.create(system="Be brief.", messages=[{"role": "user", "content": "ask-plain"}], **kw)
assert m.type == "message" and m.stop_reason == "end_turn", m
assert [b.type for b in m.content] == ["text"] and m.content[0].text == PLAIN, m.content
assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0, m.usage
counted = client.messages.count_tokens(model="scripted", system="Be brief.", messages=[{"role": "user", "content": "ask-plain"}])
assert counted.input_tokens == m.usage.input_tokens, (counted, m.usage)

# A stop sequence and the length limit.
m = client.messages.create(messages=[{"role": "user", "content": "ask-plain"}], stop_sequences=["<tool>"], **kw)
assert (m.stop_reason, m.stop_sequence, m.content[0].text) == ("stop_sequence", "<tool>", "No tools needed: "), m
m = client.messages.create(messages=[{"role": "user", "content": "ask-plain"}], model="scripted", max_tokens=3)
assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 3, m

# Tool use, and the results sent back.
ask = [{"role": "user", "content": "ask-weather, please"}]
m = client.messages.create(messages=ask, tools=tools, **kw)
uses = [b for b in m.content if b.type == "tool_use"]
assert m.stop_reason == "tool_use" and [u.name for u in uses] == ["get_weather", "get_time"], m.content
assert uses[0].input == {"city": "Paris", "unit": "C"}, uses
follow = ask + [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18 C"},
                                             {"type": "tool_result", "tool_use_id": uses[1].id, "content": [{"type": "text", "text": "noon"}]},
                                             {"type": "text", "text": "ask-plain now"}]}]
m = client.messages.create(messages=follow, tools=tools, **kw)
assert m.content[0].text == PLAIN and m.stop_reason == "end_turn", m

# A forced call (tool_choice naming a tool) is tool use too.
m = client.messages.create(messages=[{"role": "user", "content": "ask-forced"}], tools=tools, tool_choice={"type": "tool", "name": "get_weather"}, **kw)
assert m.stop_reason == "tool_use" and [b.name for b in m.content if b.type == "tool_use"] == ["get_weather"], m

# Streamed: the SDK's helper gathers the same blocks.
with client.messages.stream(messages=ask, tools=tools, **kw) as s:
    final = s.get_final_message()
assert [(b.type, getattr(b, "name", None)) for b in final.content] == [("text", None), ("tool_use", "get_weather"), ("tool_use", "get_time")], final.content
assert final.content[1].input == {"city": "Paris", "unit": "C"} and final.stop_reason == "tool_use", final
with client.messages.stream(messages=[{"role": "user", "content": "ask-plain"}], **kw) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
assert text == PLAIN and final.content[0].text == PLAIN and final.usage.output_tokens > 0, (text, final)

# Thinking as a thinking block beside the call, streamed too.
m = client.messages.create(messages=[{"role": "user", "content": "ask-think"}], tools=tools, **kw)
assert [b.type for b in m.content] == ["thinking", "tool_use"] and m.content[0].thinking == THOUGHT, m.content
with client.messages.stream(messages=[{"role": "user", "content": "ask-think"}], tools=tools, **kw) as s:
    thinking = "".join(e.delta.thinking for e in s if e.type == "content_block_delta" and e.delta.type == "thinking_delta")
assert thinking == THOUGHT, thinking

# What the server cannot honour is a 400 in Anthropic's shape.
try:
    client.messages.create(messages=[{"role": "user", "content": "ask-plain"}], tools=[{"type": "web_search_20250305", "name": "web_search"}], **kw)
    raise AssertionError("a server tool was accepted")
except anthropic.BadRequestError as e:
    assert e.body["type"] == "error" and e.body["error"]["type"] == "invalid_request_error", e.body
print("all checks passed")
