#!/usr/bin/env python3
"""Writes the bit-exactness fixtures for crates/model/src/formats.rs.

Reference decoders are torch's own casts (bfloat16, float16, float8_e4m3fn -> float32) and HF
transformers' MXFP4 dequantisation (`transformers.integrations.mxfp4.convert_moe_packed_tensors`),
run on seeded random data plus every code and extreme scales. Each output file holds the inputs and
the expected float32 outputs; the Rust tests compare bit for bit.

    /work/pyenv/bin/python tools/formats_reference.py  # -> crates/model/tests/fixtures/formats/
"""
import os

import torch
from safetensors.torch import save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "model", "tests", "fixtures", "formats")
g = torch.Generator().manual_seed(1234)


def rand_u8(*shape):
    return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)


def floats():
    # Every bf16 / f16 bit pattern is 65536 values; take all of them (128 KiB each as input).
    bits16 = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16)
    bf = bits16.view(torch.bfloat16)
    hf = bits16.view(torch.float16)
    save_file({
        "bf16_bits": bits16.view(torch.uint8).reshape(65536, 2).clone(),
        "bf16_expected": bf.float(),
        "f16_expected": hf.float(),
    }, os.path.join(OUT, "float16.safetensors"))


def fp8():
    codes = torch.arange(0, 256, dtype=torch.int32).to(torch.uint8)
    all_codes = codes.view(torch.float8_e4m3fn).float()
    # Block dequant with partial edge blocks: N=200, K=300, 128x128 blocks -> scales [2, 3].
    n, k, bn, bk = 200, 300, 128, 128
    w = rand_u8(n, k)
    w[w == 0x7F] = 0x7E  # keep NaN codes out of the matmul-style check (covered above)
    w[w == 0xFF] = 0xFE
    scale = torch.exp2(torch.randn((n + bn - 1) // bn, (k + bk - 1) // bk, generator=g) * 8).float()
    scale[0, 0] = 2.0 ** -126  # tiny and huge scales
    scale[1, 2] = 2.0 ** 100
    expand = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    expected = w.view(torch.float8_e4m3fn).float() * expand
    save_file({
        "codes": codes, "codes_expected": all_codes,
        "block_weight": w, "block_scale_inv": scale, "block_expected": expected,
    }, os.path.join(OUT, "fp8.safetensors"))


def mxfp4():
    # gpt-oss layout [E, N, G, 16] with scales [E, N, G]; covers all 16 E2M1 codes per nibble and
    # the extreme scales 0, 1, 127, 254, 255.
    e, n, gk = 2, 48, 4
    blocks = rand_u8(e, n, gk, 16)
    blocks[0, 0, 0, :] = torch.arange(16, dtype=torch.uint8) | (torch.arange(16, dtype=torch.uint8).flip(0) << 4)
    scales = torch.randint(110, 140, (e, n, gk), generator=g, dtype=torch.uint8)
    scales[0, 0, :] = torch.tensor([0, 1, 127, 254], dtype=torch.uint8)
    scales[1, 0, :] = torch.tensor([255, 253, 2, 128], dtype=torch.uint8)
    hf = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, K, N]
    save_file({
        "gpt_oss_blocks": blocks, "gpt_oss_scales": scales, "gpt_oss_expected_ekn": hf.contiguous(),
    }, os.path.join(OUT, "mxfp4_gpt_oss.safetensors"))
    # MiMo layout: the same bytes as [N, K/2] + [N, K/32] per expert. HF's function is the
    # reference except at scale 0xFF, where the OCP MX spec (and our MiMo decoder) gives NaN.
    mimo_expected = hf.transpose(1, 2).contiguous()  # [E, N, K]
    nan_rows = (scales == 255).repeat_interleave(32, dim=2)
    mimo_expected[nan_rows] = float("nan")
    save_file({
        "mimo_blocks": blocks.reshape(e * n, gk * 16).contiguous(),
        "mimo_scales": scales.reshape(e * n, gk).contiguous(),
        "mimo_expected": mimo_expected.reshape(e * n, gk * 32).contiguous(),
    }, os.path.join(OUT, "mxfp4_mimo.safetensors"))


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    floats()
    fp8()
    mxfp4()
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)))
