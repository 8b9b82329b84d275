"""Quantization formats, pure torch, one module per format (see each module's docstring)."""
from .bnb import from_bnb, from_bnb_state_dict, to_bnb_state_dict
from .gptq import from_gptq
from .int_group import dequantize_int, quantize_int
from .nf4 import dequantize_nf4, quantize_nf4
from .packing import pack_codes, unpack_codes, words_per_row
from .quantized_weight import LAYOUT_VERSION, QuantizedWeight

__all__ = [
    "QuantizedWeight", "LAYOUT_VERSION", "quantize_int", "dequantize_int", "quantize_nf4", "dequantize_nf4",
    "from_bnb", "from_bnb_state_dict", "to_bnb_state_dict", "from_gptq", "pack_codes", "unpack_codes",
    "words_per_row",
]  # fmt: skip
