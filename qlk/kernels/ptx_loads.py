"""Global loads by inline PTX (``ld.global.nc``), with ``tl.load`` twins for the interpreter.

Why a kernel loads by PTX: Triton's pipeliner cannot see such a load, so nothing is staged
through shared memory (cp.async + LDS), and the compiler gives the value the layout of its
users (no layout conversion after it). And on sm_80 a ``tl.load`` of 8-bit data that feeds an
MMA operand makes Triton size the operand for 8-bit elements (``kWidth`` 4: AccelerateMatmul's
``computeOrigBitWidth`` takes the narrowest load behind the operand), which cost double-quantized
NF4's tiles LDS.64 and a register move a fragment word instead of LDSM (docs/kernels.md
"Round 22"). ASM False (the interpreter, which cannot run asm): ``tl.load``, the same values from
the same pointers, so the tests check the index math the GPU runs.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _ld_nc(ptrs, ASM: tl.constexpr):
    """The values at ``ptrs`` (16- or 32-bit elements), no mask (the caller clamps the pointers).
    ASM: by ``ld.global.nc`` in inline PTX (module docstring); else ``tl.load``."""
    if not ASM:
        return tl.load(ptrs)
    elif ptrs.dtype.element_ty.primitive_bitwidth == 16:
        return tl.inline_asm_elementwise("ld.global.nc.b16 $0, [$1];", "=h,l", [ptrs],
                                         dtype=ptrs.dtype.element_ty, is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs],
                                         dtype=ptrs.dtype.element_ty, is_pure=True, pack=1)


@triton.jit
def _ld_nc_code(ptrs, ASM: tl.constexpr):
    """The uint8 values at ``ptrs`` as int32, no mask (the caller clamps the pointers). ASM: by
    ``ld.global.nc.u8`` in inline PTX (zero-extended into a 32-bit register); else ``tl.load``."""
    if not ASM:
        return tl.load(ptrs).to(tl.int32)
    return tl.inline_asm_elementwise("ld.global.nc.u8 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=True,
                                     pack=1)
