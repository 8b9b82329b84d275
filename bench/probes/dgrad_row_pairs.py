"""Probe (round 18, not used by qlk): the input gradient's Ŵᵀ decoded straight into the MMA's A
fragment, no shared-memory round trip. Static numbers and conclusions: docs/kernels.md "Round 18",
part 1. What qlk built instead (part 2): Ŵ as wgmma's B operand, stored once to shared memory in
16-byte rows (``qlk.kernels.decode_tile._decode_int_tile_rows``).

    env -u TRITON_INTERPRET python -m bench.sass bench/probes/dgrad_row_pairs.py --arch 90 --mix
    env -u TRITON_INTERPRET python -m bench.sass bench/probes/dgrad_row_pairs.py --arch 90 --mix -- --const-strides
    env -u TRITON_INTERPRET python -m bench.sass bench/probes/dgrad_row_pairs.py --arch 90 --mix -- --scales-t

dXᵀ = Ŵᵀ·dYᵀ with Ŵᵀ [BLOCK_K, BLOCK_N] as wgmma's register A operand. Its fragment pairs
neighbouring *rows* n (the reduction) in a 32-bit register, while a packed word holds neighbouring
columns k, so a pair is built from two rows' words: c = w[n] | w[n+1] << 16 (INT4: a 16-bit half of
each row's word), then per code position one LOP3 (magic) and two HFMA2 give (ŵ[n, k], ŵ[n+1, k]).
The columns of the tile are permuted so that each thread's codes of a row are one 16-bit half
(thread (w, g) of 4 warps owns rows kk = 16·(w + 4r) + 8h + g, stored at column 2R·(8w + g) + 2r + h);
dX is stored through the same permutation. INT4 g32, fp16; asm only (no interpreter twin): this file
measures code generation, not values. The analyzer's DRAM term for it is meaningless (no trip
count is declared for this kernel: its default counts K tiles, this loop runs over N tiles); read
the issue and smem terms.

What the compiler needs (Triton 3.9, sm_90): the decoded chain from the loads to ``tl.dot`` made of
element-wise ops, ``tl.join``, ``tl.permute`` and ``tl.reshape`` only (a ``tl.broadcast`` or an
expand on it stops the layout rematerialization and the tile goes through STS + LDSM again), and the
loads by inline PTX (``tl.load`` is pipelined into shared memory and its ``local_load`` keeps a
blocked layout, converted after the decode)."""
from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from qlk.kernels.quant_tile_t import _ld_nc  # noqa: E402

ASM_PAIR_F16 = tl.constexpr("{\n.reg .b32 v, one, neg;\n"
                            "lop3.b32 v, $1, 0x000f000f, 0x64006400, 0xea;\n"
                            "mov.b32 one, 0x3c003c00;\nmov.b32 neg, 0xe408e408;\n"
                            "fma.rn.f16x2 v, v, one, neg;\n"
                            "fma.rn.f16x2 $0, v, $3, $4;\n}")
#: the same with 32-bit (s[n], s[n+1]) / (c[n], c[n+1]) operands: pack=2 passes two registers each
ASM_PAIR_F16_WORDS = tl.constexpr(ASM_PAIR_F16.value.replace("$3, $4;", "$3, $5;"))


@triton.jit
def _pairs(x, s, b):
    """pack=2: $1 = c (the two rows' codes at bits 0-3 and 16-19; $2 the same register), $3 / $4 =
    (s[n], s[n+1]) / (c[n], c[n+1]) in fp16 -> (ŵ[n, k], ŵ[n+1, k])."""
    if s.dtype == tl.int32:
        return tl.inline_asm_elementwise(ASM_PAIR_F16_WORDS, "=r,r,r,r,r,r,r", [x, s, b], dtype=tl.float16,
                                         is_pure=True, pack=2)
    return tl.inline_asm_elementwise(ASM_PAIR_F16, "=r,r,r,r,r", [x, s, b], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _ld(ptrs):
    return _ld_nc(ptrs, True)  # ld.global.nc by inline PTX: not staged through shared memory


@triton.jit
def _four(x):
    """[..] -> [.., 2, 2], every element x: a broadcast made of joins (a tl.broadcast here would stop
    the layout rematerialization)."""
    return tl.join(tl.join(x, x), tl.join(x, x))


@triton.jit
def _probe_kernel(dx_ptr, dy_ptr, qw_ptr, s_ptr, b_ptr, M, N, K, stride_qn, stride_sn, stride_dym, stride_dxm,
                  BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                  W: tl.constexpr, CONST_QN: tl.constexpr = 0, CONST_SN: tl.constexpr = 0,
                  SCALES_T: tl.constexpr = False):
    """SCALES_T: scales and biases stored transposed, [K / GROUP, N] (not qlk's format): a row pair's
    (s[n], s[n+1]) is one 32-bit load."""
    if CONST_QN:  # the row strides as compile-time constants: their multiples become load immediates
        stride_qn = CONST_QN
        stride_sn = CONST_SN
    k0 = tl.program_id(1) * BLOCK_K
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dy_rows = dy_ptr + tl.minimum(offs_m, M - 1).to(tl.int64) * stride_dym
    acc = tl.zeros((BLOCK_K, BLOCK_M), tl.float32)
    R: tl.constexpr = BLOCK_K // (16 * W)
    P: tl.constexpr = BLOCK_N // 2
    qh = qw_ptr.to(tl.pointer_type(tl.int16))
    stride_qh = stride_qn * 2
    p3 = tl.arange(0, P)[:, None, None]
    w3 = tl.arange(0, W)[None, :, None]
    g3 = tl.arange(0, 8)[None, None, :]
    offs_q = (2 * p3) * stride_qh + k0 // 4 + 8 * w3 + g3  # [P, W, 8]: row 2p's 16-bit half of thread (w, g)
    if SCALES_T:
        offs_s = ((k0 + 32 * w3) // GROUP) * (N // 2) + p3 + 0 * g3  # int32 units: row pairs
    else:
        offs_s = (2 * p3 + 0 * g3) * stride_sn + (k0 + 32 * w3) // GROUP
    for n0 in range(0, N, BLOCK_N):
        qrow = qh + n0.to(tl.int64) * stride_qh
        if SCALES_T:
            srow = s_ptr.to(tl.pointer_type(tl.int32)) + n0 // 2
            brow = b_ptr.to(tl.pointer_type(tl.int32)) + n0 // 2
        else:
            srow = s_ptr + n0.to(tl.int64) * stride_sn
            brow = b_ptr + n0.to(tl.int64) * stride_sn
        a = _ld(qrow + offs_q).to(tl.int32) & 0xFFFF
        b = _ld(qrow + stride_qh + offs_q).to(tl.int32)
        c = a | (b << 16)
        x = tl.join(tl.join(c, c >> 4), tl.join(c >> 8, c >> 12))  # [P, W, 8, 2 (r), 2 (h)]
        x = tl.join(x, x)  # pack=2 takes two 32-bit operands; the asm reads the first
        if SCALES_T:
            s2 = _four(_ld(srow + offs_s))
            b2 = _four(_ld(brow + offs_s))
            s2 = tl.join(s2, s2)
            b2 = tl.join(b2, b2)
        else:
            s2 = tl.join(_four(_ld(srow + offs_s)), _four(_ld(srow + stride_sn + offs_s)))
            b2 = tl.join(_four(_ld(brow + offs_s)), _four(_ld(brow + stride_sn + offs_s)))
        w = _pairs(x, s2, b2)  # [P, W, 8, R, 2 (h), 2 (row parity)]
        wt = tl.reshape(tl.permute(w, (3, 1, 4, 2, 0, 5)), (BLOCK_K, BLOCK_N))
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dyt = tl.load(dy_rows[None, :] + offs_n[:, None], mask=offs_n[:, None] < N, other=0.0)
        acc = tl.dot(wt, dyt, acc)
    kk = tl.arange(0, BLOCK_K)
    col = k0 + 2 * R * (8 * ((kk // 16) % W) + kk % 8) + 2 * (kk // (16 * W)) + (kk // 8) % 2
    tl.store(dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + col[None, :], tl.trans(acc).to(tl.float16),
             mask=offs_m[:, None] < M)


def launch(M=400, N=9216, K=2304, group=32, const_strides=False, scales_t=False, BN=64, BM=64, BK=128, warps=4,
           stages=4):
    """The oos3 case dgrad/int4g32/2304->9216/M400 at qlk's chosen tile there (64x64x128 w4)."""
    dy = torch.empty(M, N, dtype=torch.float16)
    qw = torch.empty(N, K // 8, dtype=torch.int32)
    s = torch.empty(N, K // group, dtype=torch.float16)
    b = torch.empty(N, K // group, dtype=torch.float16)
    dx = torch.empty(M, K, dtype=torch.float16)
    grid = (triton.cdiv(M, BM), triton.cdiv(K, BK))
    _probe_kernel[grid](dx, dy, qw, s, b, M, N, K, qw.stride(0), s.stride(0), dy.stride(0), dx.stride(0),
                        BLOCK_N=BN, BLOCK_M=BM, BLOCK_K=BK, GROUP=group, W=warps, num_warps=warps, num_stages=stages,
                        CONST_QN=qw.stride(0) if const_strides else 0, CONST_SN=s.stride(0) if const_strides else 0, SCALES_T=scales_t)


if __name__ == "__main__":
    launch(const_strides="--const-strides" in sys.argv[1:], scales_t="--scales-t" in sys.argv[1:])
