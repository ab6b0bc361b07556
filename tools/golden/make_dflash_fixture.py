"""DFlash reference fixtures: small random drafters over the golden `default` target, run through
the PyPI `dflash` 0.1.0 reference (`dflash_generate`, greedy), recording every round's draft tokens
and acceptance length. Peregrine must reproduce them exactly (crates/cpu/tests/dflash.rs).

Two drafters:
- `random`: non-causal full attention, full rotary, with a `mask_embedding.pt` (the reference
  package does not read that file, so the run below patches its block embedding the same way);
- `swa`: layer 0 causal sliding-window (window 6), layer 1 non-causal full,
  rope base 5e4, `input_embedding_scale` and `output_multiplier` set, no mask embedding file.
  (Qwen3RotaryEmbedding in transformers 5.17 ignores `partial_rotary_factor`, so the reference
  cannot check a partial-rotary drafter; the target fixtures check that code path.)

Run from the repository root (CPU is enough):

    PYTHONPATH=path/to/unzipped/dflash-0.1.0 python tools/golden/make_dflash_fixture.py

Needs torch, transformers==5.17.0, safetensors and the `dflash` wheel (pip download dflash==0.1.0).
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM, Qwen3Config

import dflash.model as dm
import time

# The reference times with torch.cuda.synchronize(); this runs on the CPU.
dm._cuda_time = time.perf_counter

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))
from make_fixtures import load_hub_into_model  # noqa: E402

TARGET = os.path.join(ROOT, "tests", "fixtures", "golden", "default")
OUT = os.path.join(ROOT, "tests", "fixtures", "dflash")


def load_target():
    cfg_dict = json.load(open(os.path.join(TARGET, "config.json")))
    cfg = MiMoV2FlashConfig(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "eager"
    model = MiMoV2FlashForCausalLM(cfg).float().eval()
    sd = {k: v.float() for k, v in load_file(os.path.join(TARGET, "model.safetensors")).items()}
    load_hub_into_model(model, sd, cfg)
    return model


def drafter_config(**extra):
    base = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=128, vocab_size=512, rms_norm_eps=1e-6,
                max_position_embeddings=4096, attention_bias=False, tie_word_embeddings=False)
    base.update(extra)
    cfg = Qwen3Config(**base)
    cfg.dflash_config = {"target_layer_ids": [1, 4, 6], "mask_token_id": 2, "block_size": 8}
    cfg.num_target_layers = 7
    cfg.architectures = ["DFlashDraftModel"]
    return cfg


def randomize(model, seed):
    """Weights large enough that drafts depend on the context (the default init is ~0.02)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def run(name, cfg, seed, target, prompts, mask_embedding=None, trained=None):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    if trained is None:
        torch.manual_seed(seed)
        cfg._attn_implementation = "sdpa"
        model = dm.DFlashDraftModel(cfg).float().eval()
        randomize(model, seed)
        model.config.torch_dtype = "float32"
        model.save_pretrained(d, safe_serialization=True)
        cfg_path = os.path.join(d, "config.json")
        c = json.load(open(cfg_path))
        c.pop("transformers_version", None)
        json.dump(c, open(cfg_path, "w"), indent=2, sort_keys=True)
    else:
        # A committed drafter: only the reference run is stored here.
        model = dm.DFlashDraftModel.from_pretrained(trained, dtype=torch.float32).eval()
    if mask_embedding is not None:
        torch.save({"mask_token_id": 2, "embedding": mask_embedding.to(torch.bfloat16)}, os.path.join(d, "mask_embedding.pt"))
        mask_row = mask_embedding.to(torch.bfloat16).float()
        plain = dm._raw_input_embeddings

        def patched(target, ids, scale=1.0):
            e = plain(target, ids, 1.0)
            e[ids == 2] = mask_row
            return e * scale

        dm._raw_input_embeddings = patched
    drafts = []
    plain_logits = dm.DFlashDraftModel.compute_logits

    def recording(self, hidden, head):
        logits = plain_logits(self, hidden, head)
        drafts.append(torch.argmax(logits, dim=-1)[0].tolist())
        return logits

    dm.DFlashDraftModel.compute_logits = recording
    cases = []
    for p in prompts:
        drafts.clear()
        with torch.no_grad():
            r = dm.dflash_generate(model, target, torch.tensor([p]), max_new_tokens=40, stop_token_ids=None,
                                   temperature=0.0, block_size=8, return_stats=True)
        cases.append({"prompt": p, "output": r.output_ids[0, len(p):].tolist(),
                      "acceptance_lengths": list(r.acceptance_lengths), "drafts": [list(x) for x in drafts]})
    dm.DFlashDraftModel.compute_logits = plain_logits
    if mask_embedding is not None:
        dm._raw_input_embeddings = plain
    meta = {"max_new_tokens": 40, "block_size": 8, "cases": cases}
    if trained is not None:
        meta["target"] = "models/peregrine-mimo-tiny"
        meta["drafter"] = "models/peregrine-mimo-tiny/dflash"
    json.dump(meta, open(os.path.join(d, "reference.json"), "w"))
    acc = [a for c in cases for a in c["acceptance_lengths"]]
    print(name, "rounds", len(acc), "mean acceptance", sum(acc) / len(acc))


def main():
    torch.set_num_threads(2)
    target = load_target()
    gold = load_file(os.path.join(TARGET, "golden.safetensors"))
    prompts = [gold["tokens_0"].tolist()[:20], gold["tokens_1"].tolist(), [0, 7, 300, 41, 41, 9]]
    g = torch.Generator().manual_seed(5)
    run("random", drafter_config(layer_types=["full_attention", "full_attention"]), 11, target, prompts,
        mask_embedding=torch.randn(64, generator=g))
    run("swa", drafter_config(layer_types=["sliding_attention", "full_attention"], sliding_window=6, use_sliding_window=True, max_window_layers=0,
                              rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                              input_embedding_scale=1.5, output_multiplier=0.8),
        12, target, prompts)
    # The trained demo pair: real acceptance (multi-token accepts) through the reference.
    sys.path.insert(0, os.path.join(ROOT, "tools", "train"))
    from train_dflash import load_target as load_demo
    from tokenizers import Tokenizer
    demo = os.path.join(ROOT, "models", "peregrine-mimo-tiny")
    demo_target, _ = load_demo(demo, "cpu")
    tok = Tokenizer.from_file(os.path.join(demo, "tokenizer.json"))
    code = ["import os\n\ndef list_python_files(path):\n", "class Stack:\n    def __init__(self):\n",
            "def fibonacci(n):\n", "    def __repr__(self):\n        return "]
    run("trained", None, 0, demo_target, [tok.encode(c).ids for c in code], trained=os.path.join(demo, "dflash"))


if __name__ == "__main__":
    main()
