"""Golden fixtures for Peregrine's CPU reference: small random MiMo-V2 models built with HF
transformers' native MiMoV2FlashForCausalLM, saved in the hub checkpoint layout, with HF's float32
eager logits. Deterministic (fixed seeds). Run from the repository root:

    python tools/golden/make_fixtures.py

Needs torch, transformers==5.17.0, tokenizers, safetensors (see tools/golden/README.md).
"""
import glob
import json
import math
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures")
VOCAB = 512
SPECIALS = ["<|bos|>", "<|eos|>", "<|mask|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer():
    """A byte-level BPE on a few fixed stdlib modules (deterministic input)."""
    import argparse, collections, dataclasses, functools, json as js, textwrap
    files = [m.__file__ for m in (argparse, collections, dataclasses, functools, js, textwrap)]
    text = [open(f, encoding="utf-8").read() for f in sorted(files)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    d = os.path.join(OUT, "tokenizer")
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    cfg = {"bos_token": "<|bos|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
           "add_bos_token": False, "chat_template": CHATML, "model_max_length": 4096,
           "tokenizer_class": "PreTrainedTokenizerFast"}
    json.dump(cfg, open(os.path.join(d, "tokenizer_config.json"), "w"), indent=2)
    return tok


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("sinks"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(fan_in)))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
        # Weights are stored in BF16: round them so HF computes with exactly what is saved.
        for name, p in model.named_parameters():
            p.copy_(p.to(torch.bfloat16).float())


def hub_state_dict(model, cfg):
    """HF's in-memory names -> the hub checkpoint layout (per-expert tensors, attention_sink_bias)."""
    out = {}
    sd = model.state_dict()
    inter = cfg.moe_intermediate_size
    for k, v in sd.items():
        if k.endswith("rotary_emb.full_attention_inv_freq") or "inv_freq" in k:
            continue
        if k.endswith("mlp.experts.gate_up_proj"):
            pre = k[: -len("gate_up_proj")]
            for e in range(v.shape[0]):
                out[f"{pre}{e}.gate_proj.weight"] = v[e, :inter].clone()
                out[f"{pre}{e}.up_proj.weight"] = v[e, inter:].clone()
        elif k.endswith("mlp.experts.down_proj"):
            pre = k[: -len("down_proj")]
            for e in range(v.shape[0]):
                out[f"{pre}{e}.down_proj.weight"] = v[e].clone()
        elif k.endswith("self_attn.sinks"):
            out[k.replace("self_attn.sinks", "self_attn.attention_sink_bias")] = v.clone()
        else:
            out[k] = v.clone()
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def to_storage(sd):
    """BF16 for weights; F32 for the router correction bias (as on the hub)."""
    return {k: (v.float() if "e_score_correction_bias" in k else v.to(torch.bfloat16)).contiguous()
            for k, v in sd.items()}


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def mxfp4_quantize(w):
    """[N, K] f32 -> (U8 [N, K/2] low nibble = even element, U8 [N, K/32] E8M0, dequantised f32)."""
    n, k = w.shape
    blocks = w.reshape(n, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    e = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)
    scale = torch.pow(2.0, e)
    v = blocks / scale
    code = (v.abs()[..., None] - E2M1).abs().argmin(-1)
    code = torch.where((v < 0) & (code > 0), code + 8, code).long()
    deq = torch.where(code >= 8, -E2M1[(code - 8).clamp_min(0)], E2M1[code.clamp_max(7)]) * scale
    code = code.to(torch.uint8)
    code = code.reshape(n, k)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8)
    scales = (e + 127).to(torch.uint8).reshape(n, k // 32)
    return packed.contiguous(), scales.contiguous(), deq.reshape(n, k)


def fp8_quantize(w, block=128):
    """[N, K] f32 -> (F8_E4M3 [N, K], F32 scale_inv [ceil(N/128), ceil(K/128)], dequantised f32)."""
    n, k = w.shape
    sn, sk = math.ceil(n / block), math.ceil(k / block)
    scale = torch.zeros(sn, sk)
    q = torch.zeros(n, k, dtype=torch.float8_e4m3fn)
    deq = torch.zeros(n, k)
    for i in range(sn):
        for j in range(sk):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = blk.abs().max().clamp_min(1e-12) / 448.0
            qb = (blk / s).to(torch.float8_e4m3fn)
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = qb
            deq[i * block:(i + 1) * block, j * block:(j + 1) * block] = qb.float() * s
    return q, scale, deq


def load_hub_into_model(model, sd, cfg):
    """Loads (dequantised) hub-layout tensors back into the HF model."""
    inter = cfg.moe_intermediate_size
    msd = model.state_dict()
    with torch.no_grad():
        for k in list(msd.keys()):
            if k.endswith("mlp.experts.gate_up_proj"):
                pre = k[: -len("gate_up_proj")]
                for e in range(msd[k].shape[0]):
                    msd[k][e, :inter] = sd[f"{pre}{e}.gate_proj.weight"]
                    msd[k][e, inter:] = sd[f"{pre}{e}.up_proj.weight"]
            elif k.endswith("mlp.experts.down_proj"):
                pre = k[: -len("down_proj")]
                for e in range(msd[k].shape[0]):
                    msd[k][e] = sd[f"{pre}{e}.down_proj.weight"]
            elif k.endswith("self_attn.sinks"):
                msd[k].copy_(sd[k.replace("self_attn.sinks", "self_attn.attention_sink_bias")])
            elif k in sd:
                msd[k].copy_(sd[k])


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def write_fixture(name, cfg_dict, storage, prompts, model, extra_cfg=None):
    d = os.path.join(OUT, "golden", name)
    os.makedirs(d, exist_ok=True)
    cfg = dict(cfg_dict)
    if extra_cfg:
        cfg.update(extra_cfg)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=2, sort_keys=True)
    save_file(storage, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(OUT, "tokenizer", f), os.path.join(d, f))
    gold = {}
    for i, p in enumerate(prompts):
        gold[f"tokens_{i}"] = torch.tensor(p, dtype=torch.int64)
        gold[f"logits_{i}"] = logits_of(model, p).contiguous()
    save_file(gold, os.path.join(d, "golden.safetensors"))
    print(name, "->", d, sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)), "bytes")


def config_dict(cfg):
    d = cfg.to_dict()
    for k in ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"):
        d.pop(k, None)
    d["architectures"] = ["MiMoV2FlashForCausalLM"]
    d["model_type"] = "mimo_v2_flash"
    d["torch_dtype"] = "bfloat16"
    return d


def build(cfg_kwargs, seed):
    torch.manual_seed(seed)
    cfg = MiMoV2FlashConfig(**cfg_kwargs)
    cfg._attn_implementation = "eager"
    model = MiMoV2FlashForCausalLM(cfg).float().eval()
    randomize(model, seed)
    return cfg, model


def prompts_from(tok, n, lengths):
    import inspect, string
    text = inspect.getsource(string)
    ids = tok.encode(text).ids
    out, off = [], 0
    for L in lengths[:n]:
        out.append(ids[off:off + L])
        off += L
    return out


def main():
    torch.set_num_threads(2)
    tok = train_tokenizer()
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=7,
                num_attention_heads=4, num_key_value_heads=1, head_dim=24, v_head_dim=16,
                sliding_window=16, n_routed_experts=8, num_experts_per_tok=2,
                moe_intermediate_size=32, max_position_embeddings=4096, bos_token_id=0,
                eos_token_id=4, pad_token_id=5, tie_word_embeddings=False)
    prompts = prompts_from(tok, 2, [48, 37])

    # a) default layer pattern (layers 0 and 5 full, the rest sliding window), prompts > window.
    cfg, model = build(base, 1)
    sd = hub_state_dict(model, cfg)
    write_fixture("default", config_dict(cfg), to_storage(sd), prompts, model)

    # e) the same model as MiMo-V2.5-Pro's `mimo_v2` remote-code config with a fused qkv_proj.
    pro = {
        "model_type": "mimo_v2", "architectures": ["MiMoV2ForCausalLM"], "vocab_size": VOCAB,
        "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 7,
        "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 24, "v_head_dim": 16,
        "swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 24,
        "swa_v_head_dim": 16, "layernorm_epsilon": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_parameters["full_attention"]["rope_theta"],
        "swa_rope_theta": cfg.rope_parameters["sliding_attention"]["rope_theta"],
        "partial_rotary_factor": 0.334, "sliding_window_size": 16,
        "hybrid_layer_pattern": [0 if t == "full_attention" else 1 for t in cfg.layer_types],
        "moe_layer_freq": [0 if t == "dense" else 1 for t in cfg.mlp_layer_types],
        "attention_projection_layout": "fused_qkv", "attention_value_scale": cfg.attention_value_scale,
        "add_full_attention_sink_bias": False, "add_swa_attention_sink_bias": True,
        "n_routed_experts": 8, "moe_intermediate_size": 32, "num_experts_per_tok": 2,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
        "norm_topk_prob": True, "routed_scaling_factor": None, "max_position_embeddings": 4096,
        "bos_token_id": 0, "eos_token_id": 4, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    fused = {}
    for k, v in sd.items():
        if ".self_attn.q_proj." in k:
            pre = k.split(".self_attn.")[0]
            q, kk, vv = sd[f"{pre}.self_attn.q_proj.weight"], sd[f"{pre}.self_attn.k_proj.weight"], sd[f"{pre}.self_attn.v_proj.weight"]
            kvh = kk.shape[0] // 24
            qpg = q.shape[0] // kvh
            parts = []
            for g in range(kvh):
                parts += [q[g * qpg:(g + 1) * qpg], kk[g * 24:(g + 1) * 24], vv[g * 16:(g + 1) * 16]]
            fused[f"{pre}.self_attn.qkv_proj.weight"] = torch.cat(parts)
        elif ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue
        else:
            fused[k] = v
    write_fixture("mimo_v2_fused", pro, to_storage(fused), prompts, model)

    # b) group-limited routing, no normalisation, scaling != 1.
    gk = dict(base, num_hidden_layers=3, n_routed_experts=8, n_group=4, topk_group=2,
              num_experts_per_tok=3, norm_topk_prob=False, routed_scaling_factor=2.5)
    cfg, model = build(gk, 2)
    write_fixture("groups", config_dict(cfg), to_storage(hub_state_dict(model, cfg)), prompts, model)

    # c) MXFP4 experts in the MiMo-V2.5-Pro FP4 layout; every other linear stays BF16 (ignored).
    mk = dict(base, num_hidden_layers=4)
    cfg, model = build(mk, 3)
    sd = hub_state_dict(model, cfg)
    storage = to_storage(sd)
    deq = dict(sd)
    for k in list(sd.keys()):
        if ".mlp.experts." in k:
            packed, scales, d = mxfp4_quantize(sd[k].float())
            storage[k] = packed
            storage[k.replace(".weight", ".weight_scale")] = scales
            deq[k] = d
    load_hub_into_model(model, deq, cfg)
    ignored = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight") and ".mlp.experts." not in k
                      and sd[k].dim() == 2})
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "weight_block_size": [128, 128], "store_dtype": "mxfp4", "mxfp4_block_size": 32,
          "ignored_layers": ignored}
    write_fixture("mxfp4", config_dict(cfg), storage, prompts, model, {"quantization_config": qc})

    # d) FP8 e4m3 128x128 blocks with dimensions that are not multiples of 128 (partial edge blocks);
    #    o_proj, router, embeddings and lm_head stay BF16.
    fk = dict(base, hidden_size=160, intermediate_size=200, num_hidden_layers=2, head_dim=48,
              v_head_dim=32, moe_intermediate_size=96, n_routed_experts=4, num_experts_per_tok=2,
              sliding_window=8)
    cfg, model = build(fk, 4)
    sd = hub_state_dict(model, cfg)
    storage = to_storage(sd)
    deq = dict(sd)
    ignored = []
    for k in list(sd.keys()):
        if not k.endswith(".weight") or sd[k].dim() != 2:
            continue
        if "embed_tokens" in k or k == "lm_head.weight" or k.endswith("mlp.gate.weight") or "o_proj" in k:
            if "o_proj" in k:
                ignored.append(k.rsplit(".", 1)[0])
            continue
        q, s, d = fp8_quantize(sd[k].float())
        storage[k] = q
        storage[k.replace(".weight", ".weight_scale_inv")] = s
        deq[k] = d
    load_hub_into_model(model, deq, cfg)
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
          "weight_block_size": [128, 128], "ignored_layers": sorted(ignored)}
    long_prompts = prompts_from(tok, 2, [30, 21])
    write_fixture("fp8", config_dict(cfg), storage, long_prompts, model, {"quantization_config": qc})


if __name__ == "__main__":
    sys.exit(main())
