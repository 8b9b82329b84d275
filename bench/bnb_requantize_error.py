"""What ``qlk.patch_model(bnb_model, requantize=True)`` costs in weight error (CPU, seconds).

A random weight W (N(0, 0.02²), [1024, 1024]) is quantized by bitsandbytes to NF4 (block 64, double
quant), as ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` does; then to qlk's INT
formats twice: from W directly (what loading the dense checkpoint with qlk gives) and from bitsandbytes'
Ŵ (what ``requantize=True`` gives, the original W being gone). Errors are relative RMS, ‖Ŵ − W‖/‖W‖.

    python bench/bnb_requantize_error.py
"""
from __future__ import annotations

import torch

import qlk


def main() -> None:
    import bitsandbytes as bnb

    torch.manual_seed(0)
    w = torch.randn(1024, 1024) * 0.02

    def rel(a: torch.Tensor, ref: torch.Tensor = w) -> float:
        return ((a - ref).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()

    packed = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True).to("cpu")
    w_nf4 = bnb.functional.dequantize_4bit(packed.data, packed.quant_state).float()
    print(f"bitsandbytes NF4 g64 (double quant): {rel(w_nf4):.4f}")
    print("| qlk format | from W (dense checkpoint) | from NF4 Ŵ (requantize=True) | requantized vs NF4 Ŵ |")
    print("|---|---|---|---|")
    for bits, g in [(4, 32), (4, 128), (3, 32), (2, 32)]:
        direct = qlk.quantize(w, bits=bits, group_size=g).dequantize(torch.float32)
        again = qlk.quantize(w_nf4, bits=bits, group_size=g).dequantize(torch.float32)
        print(f"| INT{bits} g{g} | {rel(direct):.4f} | {rel(again):.4f} | {rel(again, w_nf4):.4f} |")


if __name__ == "__main__":
    main()
