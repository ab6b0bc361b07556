"""The Responses API (/v1/responses) through the OpenAI Python SDK with strict response validation,
against the scripted server of crates/server/tests/chat_output.rs (whose reply to "ask-plain" is
plain text, to "ask-weather" two calls, to "ask-think" thinking then a call, to "ask-json" an
object).

    python tests/sdk/test_responses_sdk.py http://127.0.0.1:PORT/v1

Exits non-zero on the first failure.
"""
import json
import sys

import openai
from openai import OpenAI
from pydantic import BaseModel

client = OpenAI(base_url=sys.argv[1], api_key="none", _strict_response_validation=True, max_retries=0)
PLAIN = "No tools needed: <tool> is not a call."
THOUGHT = "\nThe user wants the time: call get_time.\n"
tools = [
    {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
    {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}},
]

# Plain text, with instructions; the SDK's output_text joins the message's text.
r = client.responses.create(model="scripted", instructions="Be brief.", input="ask-plain", temperature=0, max_output_tokens=400)
assert r.object == "response" and r.status == "completed", r
assert r.output_text == PLAIN, r.output_text
assert [i.type for i in r.output] == ["message"], r.output
assert r.usage.output_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens, r.usage
assert r.instructions == "Be brief." and r.max_output_tokens == 400, r

# Cut by max_output_tokens: incomplete, with the reason.
r = client.responses.create(model="scripted", input="ask-plain", temperature=0, max_output_tokens=3)
assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens", r
assert r.usage.output_tokens == 3 and PLAIN.startswith(r.output_text), r

# Tool calls as function_call items; their outputs go back in as input items.
r = client.responses.create(model="scripted", input=[{"role": "user", "content": "ask-weather, please"}], tools=tools,
                            temperature=0, max_output_tokens=400)
calls = [i for i in r.output if i.type == "function_call"]
assert [c.name for c in calls] == ["get_weather", "get_time"], r.output
assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "C"}, calls
assert all(c.call_id.startswith("call_") and c.status == "completed" for c in calls), calls
# Streamed, the same items (the blank line between the two calls makes no message of its own).
streamed = list(client.responses.create(model="scripted", input=[{"role": "user", "content": "ask-weather, please"}], tools=tools,
                                        temperature=0, max_output_tokens=400, stream=True))[-1].response
assert [(i.type, getattr(i, "name", None)) for i in streamed.output] == [(i.type, getattr(i, "name", None)) for i in r.output], streamed.output
assert [i.type for i in r.output] == ["message", "function_call", "function_call"], r.output
follow = [{"role": "user", "content": "ask-weather, please"}] + [c.model_dump(exclude_none=True) for c in r.output] + [
    {"type": "function_call_output", "call_id": calls[0].call_id, "output": "18 C"},
    {"type": "function_call_output", "call_id": calls[1].call_id, "output": "noon"},
    {"role": "user", "content": "ask-plain now"},
]
r = client.responses.create(model="scripted", input=follow, tools=tools, temperature=0, max_output_tokens=400)
assert r.output_text == PLAIN and all(i.type == "message" for i in r.output), r.output

# Reasoning as a reasoning item beside the call, streamed as typed events.
r = client.responses.create(model="scripted", input="ask-think", tools=tools, temperature=0, max_output_tokens=400)
assert [i.type for i in r.output] == ["reasoning", "function_call"], r.output
assert r.output[0].content[0].text == THOUGHT and r.output[1].name == "get_time", r.output
events = list(client.responses.create(model="scripted", input="ask-think", tools=tools, temperature=0, max_output_tokens=400, stream=True))
kinds = [e.type for e in events]
assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed", kinds
assert [e.sequence_number for e in events] == list(range(len(events))), kinds
assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == THOUGHT, kinds
done = events[-1].response
assert [i.type for i in done.output] == ["reasoning", "function_call"] and done.usage.output_tokens > 0, done
# The reasoning item goes back in with its call (as the assistant turn's reasoning_content).
follow = [{"role": "user", "content": "ask-think"}] + [i.model_dump(exclude_none=True) for i in done.output] + [
    {"type": "function_call_output", "call_id": done.output[1].call_id, "output": "noon"}, {"role": "user", "content": "ask-plain"}]
assert client.responses.create(model="scripted", input=follow, tools=tools, temperature=0).output_text == PLAIN

# Streamed text with the SDK's stream helper: deltas add up to the final text.
with client.responses.stream(model="scripted", input="ask-plain", temperature=0, max_output_tokens=400) as stream:
    text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
    final = stream.get_final_response()
assert text == PLAIN and final.output_text == PLAIN and final.status == "completed", (text, final)


# Structured outputs: the SDK's parse() sends text.format from a pydantic model and reads it back.
class City(BaseModel):
    city: str


r = client.responses.parse(model="scripted", input="ask-json", text_format=City, temperature=0, max_output_tokens=400)
assert r.output_parsed == City(city="Paris"), r

# What the route cannot honour is a 400 naming the field.
try:
    client.responses.create(model="scripted", input="ask-plain", previous_response_id="resp_123")
    raise AssertionError("previous_response_id was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "previous_response_id", e.body
try:
    client.responses.create(model="scripted", input="ask-plain", tools=[{"type": "web_search"}])
    raise AssertionError("a hosted tool was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "tools", e.body
print("all checks passed")
