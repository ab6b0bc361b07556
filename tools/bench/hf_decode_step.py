"""HF transformers' decode step on MiMo-V2-Flash shapes with random weights, to compare with
Peregrine's CUDA engine on the same GPU and shapes (crates/cuda/examples/step_bench.rs).

The model is transformers' native MiMoV2FlashForCausalLM built from configs/mimo-v2-flash.json
with its first N layers, random BF16 weights created on the GPU (HF keeps experts in BF16: 12.9 GB
per MoE layer, so fewer layers fit than Peregrine's MXFP4 18). Each batch size prefills
`--context` random tokens, then times single-token decode steps that feed back the argmax (CUDA
events, warm-up, median). Peregrine's per-layer cost is compared at the same layer count.

    python tools/bench/hf_decode_step.py --layers 4 --batch 1,8 --out hf.json
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import transformers
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM


def build_config(path: Path, layers: int) -> MiMoV2FlashConfig:
    raw = json.loads(path.read_text())
    raw.pop("quantization_config", None)  # plain BF16 weights
    raw["num_hidden_layers"] = layers
    for key in ("layer_types", "mlp_layer_types"):
        if key in raw:
            raw[key] = raw[key][:layers]
    raw.pop("architectures", None)
    raw.pop("model_type", None)
    return MiMoV2FlashConfig(**raw)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/mimo-v2-flash.json")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    torch.manual_seed(0)
    config = build_config(Path(args.config), args.layers)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = MiMoV2FlashForCausalLM(config)
    model.eval()
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "layers": args.layers,
        "attn_impl": model.config._attn_implementation,
        "context": args.context,
        "results": [],
    }
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for b in [int(x) for x in args.batch.split(",")]:
        try:
            with torch.inference_mode():
                ids = torch.randint(8, config.vocab_size, (b, args.context), device="cuda")
                out = model(input_ids=ids, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                times = []
                for i in range(args.warmup + args.steps):
                    start.record()
                    out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
                    end.record()
                    torch.cuda.synchronize()
                    if i >= args.warmup:
                        times.append(start.elapsed_time(end))
            med = statistics.median(times)
            result["results"].append({"batch": b, "median_ms": med, "mean_ms": statistics.mean(times), "tokens_per_s": b / (med / 1e3)})
        except torch.cuda.OutOfMemoryError:
            result["results"].append({"batch": b, "error": "OOM"})
        torch.cuda.empty_cache()
    result["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
