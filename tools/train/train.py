"""Trains Peregrine's small MiMo-V2 demo model (transformers' MiMoV2FlashForCausalLM) on the Python
sources found on the machine, with MXFP4 fake-quantised experts, and exports it in the hub layout
of MiMo-V2.5-Pro-FP4 (experts U8 [N, K/2] + UE8M0 scales [N, K/32], the rest BF16).

    python tools/train/train.py --out DIR [--minutes 6.5] [--steps N]

One run fits one GPU command (about 9 minutes on an H100). See tools/train/README.md.
"""
import argparse, glob, hashlib, json, math, os, random, sys, sysconfig, time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM
from transformers.models.mimo_v2_flash import modeling_mimo_v2_flash as mm

SPECIALS = ["<|bos|>", "<|eos|>", "<|mask|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


def collect(max_bytes):
    """Python files of the stdlib and site-packages, deduplicated by content; held-out = files whose
    content hash starts with 0 or 1 (1/8 of files... reduced below to ~2%: first two hex digits < 05)."""
    roots = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    seen, train, held = set(), [], []
    total = 0
    for root in roots:
        for p in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
            try:
                b = open(p, "rb").read()
            except OSError:
                continue
            if not (200 < len(b) < 200_000):
                continue
            h = hashlib.sha1(b).hexdigest()
            if h in seen:
                continue
            seen.add(h)
            try:
                t = b.decode("utf-8")
            except UnicodeDecodeError:
                continue
            (held if int(h[:2], 16) < 5 else train).append(t)
            total += len(b)
            if total > max_bytes:
                return train, held
    return train, held


def fake_mxfp4(w):
    """Straight-through MXFP4 fake quantisation along the last dim (blocks of 32)."""
    shp = w.shape
    b = w.float().reshape(*shp[:-1], shp[-1] // 32, 32)
    amax = b.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    scale = torch.pow(2.0, (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127))
    v = (b / scale).clamp(-6, 6)
    grid = E2M1.to(w.device)
    q = grid[(v.abs()[..., None] - grid).abs().argmin(-1)] * torch.sign(v)
    q = (q * scale).reshape(shp).to(w.dtype)
    return w + (q - w).detach()


def experts_forward(self, hidden_states, top_k_index, top_k_weights):
    gu = fake_mxfp4(self.gate_up_proj)
    dn = fake_mxfp4(self.down_proj)
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        tok, slot = torch.where(top_k_index == e)
        if tok.numel() == 0:
            continue
        g, u = F.linear(hidden_states[tok], gu[e]).chunk(2, dim=-1)
        y = F.linear(self.act_fn(g) * u, dn[e]) * top_k_weights[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def mxfp4_export(w):
    n, k = w.shape
    b = w.float().reshape(n, k // 32, 32)
    amax = b.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    e = (torch.floor(torch.log2(amax)) - 2).clamp(-127, 127)
    v = (b / torch.pow(2.0, e)).clamp(-6, 6)
    code = (v.abs()[..., None] - E2M1).abs().argmin(-1)
    code = torch.where((v < 0) & (code > 0), code + 8, code).reshape(n, k)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).to(torch.uint8)
    return packed.contiguous(), (e + 127).to(torch.uint8).reshape(n, k // 32).contiguous()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=6.5)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--max-bytes", type=int, default=80_000_000)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    random.seed(0)
    t0 = time.time()
    train_txt, held_txt = collect(a.max_bytes)
    log(f"data: {len(train_txt)} train files, {len(held_txt)} held-out files, {sum(map(len, train_txt))/1e6:.1f} MB train text")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    sample = random.sample(train_txt, min(len(train_txt), 6000))
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=8192, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eos = tok.token_to_id("<|eos|>")
    def encode(texts):
        ids = []
        for enc in tok.encode_batch(texts):
            ids.extend(enc.ids)
            ids.append(eos)
        return torch.tensor(ids, dtype=torch.int32)
    train_ids, held_ids = encode(train_txt), encode(held_txt)
    log(f"tokenizer: vocab {tok.get_vocab_size()}, {train_ids.numel()/1e6:.1f}M train tokens, {held_ids.numel()/1e6:.2f}M held-out tokens ({time.time()-t0:.0f}s)")

    cfg = MiMoV2FlashConfig(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=64, v_head_dim=48,
                            sliding_window=128, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                            max_position_embeddings=4096, bos_token_id=0, eos_token_id=[1, 4], pad_token_id=5,
                            tie_word_embeddings=False, attention_value_scale=0.707)
    cfg._attn_implementation = "eager"
    mm.MiMoV2FlashExperts.forward = experts_forward
    model = MiMoV2FlashForCausalLM(cfg).to(dev)
    nparams = sum(p.numel() for p in model.parameters())
    log(f"model: {nparams/1e6:.2f}M parameters, layer types {cfg.layer_types}")

    # Aux-loss-free balancing (DeepSeek-V3): nudge each router's correction bias toward equal load.
    loads = {}
    def hook(mod, inp, out):
        loads[mod] = torch.bincount(out[2].flatten(), minlength=mod.num_experts).float()
    for m in model.modules():
        if isinstance(m, mm.MiMoV2FlashTopkRouter):
            m.register_forward_hook(hook)

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    budget = a.minutes * 60
    step, t_train, curve = 0, time.time(), []
    n = train_ids.numel() - a.seq - 1
    model.train()
    while True:
        elapsed = time.time() - t_train
        if (a.steps and step >= a.steps) or (not a.steps and elapsed > budget):
            break
        frac = (step / a.steps) if a.steps else elapsed / budget
        lr = 2e-3 * min(1.0, step / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (a.batch,))
        x = torch.stack([train_ids[i:i + a.seq + 1] for i in idx.tolist()]).long().to(dev)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            logits = model(x[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for mod, load in loads.items():
                mod.e_score_correction_bias += 1e-3 * torch.sign(load.mean() - load)
        if step % 100 == 0:
            curve.append((step, round(time.time() - t_train), round(loss.item(), 4)))
            log(f"step {step} loss {loss.item():.4f} lr {lr:.2e}")
        step += 1
    train_secs = time.time() - t_train
    log(f"trained {step} steps in {train_secs:.0f}s ({step*a.batch*a.seq/train_secs/1e3:.0f}k tokens/s)")

    # Export (hub layout) and re-load the dequantised weights for evaluation.
    os.makedirs(a.out, exist_ok=True)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items() if "inv_freq" not in k}
    store, deq = {}, {}
    I = cfg.moe_intermediate_size
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            pre = k.rsplit(".", 1)[0]
            for e in range(v.shape[0]):
                parts = {"gate_proj": v[e, :I], "up_proj": v[e, I:]} if k.endswith("gate_up_proj") else {"down_proj": v[e]}
                for name, w in parts.items():
                    packed, scales = mxfp4_export(w)
                    store[f"{pre}.{e}.{name}.weight"] = packed
                    store[f"{pre}.{e}.{name}.weight_scale"] = scales
        elif k.endswith("self_attn.sinks"):
            store[k.replace("self_attn.sinks", "self_attn.attention_sink_bias")] = v.to(torch.bfloat16)
        elif k.endswith("e_score_correction_bias"):
            store[k] = v.contiguous()
        else:
            store[k] = v.to(torch.bfloat16).contiguous()
    # Two shards so each stays under 16 MiB.
    names = sorted(store)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    wmap = {}
    for f, ks in shards.items():
        save_file({k: store[k] for k in ks}, os.path.join(a.out, f), metadata={"format": "pt"})
        wmap.update({k: f for k in ks})
    json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in store.values())}, "weight_map": wmap},
              open(os.path.join(a.out, "model.safetensors.index.json"), "w"), indent=1)
    c = cfg.to_dict()
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        c.pop(key, None)
    c.update({"architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash", "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128], "store_dtype": "mxfp4", "mxfp4_block_size": 32,
                                      "ignored_layers": sorted({k.rsplit(".", 1)[0] for k in store if k.endswith("_proj.weight") and ".experts." not in k}
                                                               | {"lm_head"})}})
    json.dump(c, open(os.path.join(a.out, "config.json"), "w"), indent=1, sort_keys=True)
    json.dump({"bos_token_id": 0, "eos_token_id": [1, 4], "pad_token_id": 5}, open(os.path.join(a.out, "generation_config.json"), "w"))
    tok.save(os.path.join(a.out, "tokenizer.json"))
    json.dump({"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "add_bos_token": False,
               "chat_template": CHATML, "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"},
              open(os.path.join(a.out, "tokenizer_config.json"), "w"), indent=1)

    # Held-out loss with the exported (MXFP4) experts: the fake-quant forward computes exactly the
    # dequantised weights, so evaluate the trained model as is, in float32.
    model.eval()
    with torch.no_grad():
        losses = []
        for i in range(0, min(held_ids.numel() - a.seq - 1, 200 * a.seq), a.seq):
            x = held_ids[i:i + a.seq + 1].long().to(dev)[None]
            lg = model(x[:, :-1]).logits.float()
            losses.append(F.cross_entropy(lg[0], x[0, 1:]).item())
        held_loss = sum(losses) / len(losses)
        samples = []
        for prefix in ["import os\n\ndef list_python_files(path):\n", "class Stack:\n    def __init__(self):\n", "def fibonacci(n):\n"]:
            ids = torch.tensor([tok.encode(prefix).ids], device=dev)
            out = model.generate(ids, max_new_tokens=48, do_sample=False)[0][ids.shape[1]:].tolist()
            samples.append({"prefix": prefix, "greedy": tok.decode(out)})
    report = {"params": nparams, "train_files": len(train_txt), "held_files": len(held_txt),
              "train_tokens": train_ids.numel(), "held_tokens": held_ids.numel(), "steps": step,
              "batch_tokens": a.batch * a.seq, "train_seconds": round(train_secs), "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              "held_out_loss": round(held_loss, 4), "loss_curve": curve, "samples": samples}
    json.dump(report, open(os.path.join(a.out, "train_report.json"), "w"), indent=1)
    log(f"held-out loss {held_loss:.4f}; total {time.time()-t0:.0f}s")
    for s in samples:
        log(repr(s["prefix"] + s["greedy"]))


if __name__ == "__main__":
    sys.exit(main())
