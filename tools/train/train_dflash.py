"""Trains the DFlash drafter of models/peregrine-mimo-tiny by self-distillation, in one GPU command.

1. Loads the committed target (MXFP4 experts dequantised into HF's MiMoV2FlashForCausalLM) and
   checks it reproduces the greedy samples of its train_report.json.
2. Data: random windows of TRAINING-split files (train.py's `collect`, so held-out stays held out)
   are continued greedily by the target; those continuations are what the drafter learns.
3. Each step: the frozen target gives the context features (outputs of target layers 1 and 3, and
   layer 5 after the final norm); K anchors per sequence open blocks [x_a, MASK x 7]; the drafter
   (the PyPI `dflash` reference's DFlashDraftModel, so the checkpoint is its format) runs all
   blocks at once under a mask where block j sees context positions < a_j and its own 8 rows;
   cross-entropy through the target's frozen lm_head against x_{a+1..a+7}, weighted by position.
4. Exports `dflash/` (config.json + bf16 model.safetensors) and measures the mean acceptance length
   with the reference's `dflash_generate` on held-out prompts, greedy and at temperature 0.7.

    python tools/train/train_dflash.py --model models/peregrine-mimo-tiny --out OUT --minutes 4

Needs torch, transformers 5.17, tokenizers, safetensors and `dflash` 0.1.0 (PyPI, --no-deps).
CPU smoke run: --minutes 0.2 --gen-seqs 8 --gen-tokens 24 --eval-prompts 2 --max-bytes 2000000
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM, Qwen3Config

import dflash.model as dm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "golden"))
from train import collect, log  # noqa: E402
from make_fixtures import load_hub_into_model  # noqa: E402

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
BLOCK = 8
MASK = 2
LAYER_IDS = [1, 3, 5]


def dequant_mxfp4(packed, scales):
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1).long()
    vals = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    scale = torch.pow(2.0, scales.float() - 127).repeat_interleave(32, dim=1)
    return vals * scale


def load_target(path, dev):
    c = json.load(open(os.path.join(path, "config.json")))
    for k in ("quantization_config", "architectures", "model_type", "torch_dtype"):
        c.pop(k, None)
    cfg = MiMoV2FlashConfig(**c)
    cfg._attn_implementation = "eager"
    model = MiMoV2FlashForCausalLM(cfg).float()
    sd = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            sd.update(load_file(os.path.join(path, f)))
    hub = {}
    for k, v in sd.items():
        if k.endswith(".weight_scale"):
            continue
        if v.dtype == torch.uint8:
            hub[k] = dequant_mxfp4(v, sd[k[: -len(".weight")] + ".weight_scale"])
        else:
            hub[k] = v.float()
    load_hub_into_model(model, hub, cfg)
    return model.to(dev).eval(), cfg


def drafter_config(target_cfg):
    cfg = Qwen3Config(hidden_size=target_cfg.hidden_size, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, intermediate_size=768, vocab_size=target_cfg.vocab_size,
                      rms_norm_eps=1e-6, max_position_embeddings=4096, attention_bias=False,
                      tie_word_embeddings=False, layer_types=["full_attention", "full_attention"],
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      bos_token_id=0, eos_token_id=[1, 4], pad_token_id=5)
    cfg.dflash_config = {"target_layer_ids": LAYER_IDS, "mask_token_id": MASK, "block_size": BLOCK}
    cfg.num_target_layers = target_cfg.num_hidden_layers
    cfg.architectures = ["DFlashDraftModel"]
    cfg._attn_implementation = "sdpa"
    return cfg


@torch.no_grad()
def greedy_continuations(target, ids, n_seqs, prompt_len, gen, batch, dev):
    """Random training windows of `prompt_len` tokens, each continued greedily by `gen` tokens."""
    out = []
    n = ids.numel() - prompt_len - 1
    for b in range(0, n_seqs, batch):
        starts = torch.randint(0, n, (min(batch, n_seqs - b),)).tolist()
        x = torch.stack([ids[s:s + prompt_len] for s in starts]).long().to(dev)
        y = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=gen, min_new_tokens=gen,
                            do_sample=False, eos_token_id=None, pad_token_id=5)
        out.append(y.cpu())
    return torch.cat(out)


def block_mask(T, anchors, dev):
    """[1, 1, K*B, T + K*B] bool: block j sees context positions < a_j and its own B rows."""
    K = anchors.numel()
    q = torch.arange(K * BLOCK, device=dev)
    blk = q // BLOCK
    ctx = torch.arange(T, device=dev)[None, :] < anchors[blk][:, None]
    own = (torch.arange(K * BLOCK, device=dev)[None, :] // BLOCK) == blk[:, None]
    return torch.cat([ctx, own], dim=1)[None, None]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/peregrine-mimo-tiny")
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=4.0)
    ap.add_argument("--max-bytes", type=int, default=80_000_000)
    ap.add_argument("--gen-seqs", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--anchors", type=int, default=32)
    ap.add_argument("--eval-prompts", type=int, default=32)
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
        dm._cuda_time = time.perf_counter
    torch.manual_seed(0)
    random.seed(0)
    t0 = time.time()

    target, tcfg = load_target(a.model, dev)
    for p in target.parameters():
        p.requires_grad_(False)
    tok = Tokenizer.from_file(os.path.join(a.model, "tokenizer.json"))
    report0 = json.load(open(os.path.join(a.model, "train_report.json")))
    s0 = report0["samples"][0]
    with torch.no_grad():
        ids = torch.tensor([tok.encode(s0["prefix"]).ids], device=dev)
        g = target.generate(ids, max_new_tokens=48, do_sample=False)[0][ids.shape[1]:].tolist()
    reproduced = tok.decode(g) == s0["greedy"]
    log(f"target loaded; reproduces its recorded greedy sample: {reproduced}")

    train_txt, held_txt = collect(a.max_bytes)
    eos = tok.token_to_id("<|eos|>")
    ids = []
    for enc in tok.encode_batch(train_txt):
        ids.extend(enc.ids + [eos])
    train_ids = torch.tensor(ids, dtype=torch.int32)
    log(f"data: {len(train_txt)} train files ({train_ids.numel()/1e6:.1f}M tokens), {len(held_txt)} held-out files")

    tg = time.time()
    data = greedy_continuations(target, train_ids, a.gen_seqs, a.prompt_len, a.gen_tokens, 1024 if dev == "cuda" else 4, dev)
    gen_secs = time.time() - tg
    log(f"self-distillation data: {data.shape[0]} sequences x {data.shape[1]} tokens in {gen_secs:.0f}s")

    cfg = drafter_config(tcfg)
    drafter = dm.DFlashDraftModel(cfg).to(dev).float()
    nparams = sum(p.numel() for p in drafter.parameters())
    log(f"drafter: {nparams/1e6:.2f}M parameters")
    embed = target.get_input_embeddings().weight
    head = target.lm_head
    opt = torch.optim.AdamW(drafter.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    weights = torch.exp(-torch.arange(BLOCK - 1, dtype=torch.float32, device=dev) / 4.0)
    T = data.shape[1]
    lo, hi = a.prompt_len, T - BLOCK  # anchors inside the continuation
    budget = a.minutes * 60
    step, tt, curve = 0, time.time(), []
    drafter.train()
    while time.time() - tt < budget:
        frac = (time.time() - tt) / budget
        lr = 1e-3 * min(1.0, step / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for gr in opt.param_groups:
            gr["lr"] = lr
        x = data[torch.randint(0, data.shape[0], (a.batch,))].to(dev)
        with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            hs = target.model(x, output_hidden_states=True).hidden_states
            feats = dm.extract_context_feature(list(hs), LAYER_IDS).float()
        B, K = a.batch, a.anchors
        anchors = torch.argsort(torch.rand(B, hi - lo, device=dev), dim=1)[:, :K] + lo
        blk_ids = torch.full((B, K, BLOCK), MASK, device=dev, dtype=torch.long)
        blk_ids[:, :, 0] = torch.gather(x, 1, anchors)
        noise = F.embedding(blk_ids.reshape(B, -1), embed)
        offs = torch.arange(BLOCK, device=dev)
        pos = torch.cat([torch.arange(T, device=dev).expand(B, T), (anchors[:, :, None] + offs).reshape(B, -1)], dim=1)
        mask = torch.cat([block_mask(T, anchors[b], dev) for b in range(B)])
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            h = drafter(position_ids=pos, attention_mask=mask, noise_embedding=noise, target_hidden=feats)
            logits = head(h.reshape(B, K, BLOCK, -1)[:, :, 1:]).float()
        labels = torch.gather(x, 1, (anchors[:, :, None] + offs[1:]).reshape(B, -1)).reshape(B, K, BLOCK - 1)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        loss = (ce.reshape(B, K, BLOCK - 1) * weights).sum() / (weights.sum() * B * K)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            curve.append((step, round(time.time() - tt), round(loss.item(), 4)))
            log(f"step {step} loss {loss.item():.4f} lr {lr:.2e}")
        step += 1
    train_secs = time.time() - tt
    log(f"trained {step} steps in {train_secs:.0f}s")

    # Export in the reference's format (bf16), then evaluate the exported weights.
    os.makedirs(a.out, exist_ok=True)
    drafter = drafter.to(torch.bfloat16).float().eval()
    drafter.config.dtype = "bfloat16"
    drafter.to(torch.bfloat16).save_pretrained(a.out, safe_serialization=True)
    cpath = os.path.join(a.out, "config.json")
    c = json.load(open(cpath))
    c.pop("transformers_version", None)
    json.dump(c, open(cpath, "w"), indent=2, sort_keys=True)
    drafter = dm.DFlashDraftModel.from_pretrained(a.out, dtype=torch.float32).to(dev).eval()

    held_ids = []
    for enc in tok.encode_batch(held_txt):
        held_ids.append(enc.ids)
    rng = random.Random(1)
    prompts = []
    for ids_ in rng.sample([h for h in held_ids if len(h) > 200], min(a.eval_prompts, len(held_ids))):
        s = rng.randrange(0, len(ids_) - 100)
        prompts.append(ids_[s:s + 64])
    result = {}
    for name, temp in [("greedy", 0.0), ("t0.7", 0.7)]:
        acc, outs = [], []
        torch.manual_seed(0)
        for p in prompts:
            r = dm.dflash_generate(drafter, target, torch.tensor([p], device=dev), max_new_tokens=128,
                                   stop_token_ids=None, temperature=temp, block_size=BLOCK, return_stats=True)
            acc.extend(r.acceptance_lengths)
            outs.append(r.output_ids[0, len(p):].tolist())
        result[name] = round(sum(acc) / len(acc), 3)
        if name == "greedy":
            # Lossless check: greedy speculative output equals the target's own greedy output.
            same = 0
            for p, o in zip(prompts[:8], outs[:8]):
                with torch.no_grad():
                    ref = target.generate(torch.tensor([p], device=dev), max_new_tokens=len(o), min_new_tokens=len(o),
                                          do_sample=False, eos_token_id=None, pad_token_id=5)[0][len(p):].tolist()
                same += ref == o
            result["greedy_equals_target_of_8"] = same
        log(f"reference acceptance ({name}): {result[name]} tokens per round over {len(acc)} rounds")
    report = {"drafter_params": nparams, "layers": 2, "block_size": BLOCK, "target_layer_ids": LAYER_IDS,
              "target_reproduces_recorded_sample": reproduced, "train_files": len(train_txt), "held_files": len(held_txt),
              "distill_sequences": int(data.shape[0]), "distill_tokens_per_sequence": int(T),
              "distill_prompt_tokens": a.prompt_len, "distill_generation_seconds": round(gen_secs),
              "steps": step, "batch_sequences": a.batch, "anchors_per_sequence": a.anchors, "train_seconds": round(train_secs),
              "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "loss_curve": curve,
              "reference_acceptance_128_tokens_held_out": result, "eval_prompts": len(prompts),
              "total_seconds": round(time.time() - t0)}
    json.dump(report, open(os.path.join(a.out, "train_report.json"), "w"), indent=1)
    log(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
