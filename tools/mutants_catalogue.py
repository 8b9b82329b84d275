"""The catalogue of ``make mutants``: realistic one-line bugs, each with the tests that must catch it.

Each entry: ``id``, ``cls`` (the class of bug), ``file``, ``old`` (text that must occur exactly
once in the file), ``new`` (its replacement), ``tests`` (pytest arguments, run in this order with
``-x``: put the test most likely to fail first). tools/mutants.py applies one at a time to a copy
of the tree and fails if the tests still pass.

Keep ``old`` a whole expression or line, so a refactor that moves it makes the mutant fail to
apply (reported as an error) instead of silently testing nothing.
"""

KP = "tests/test_kernel_paths.py"

MUTANTS = [
    # ---- multi-tile split reductions ------------------------------------------------------------
    dict(id="splitk-one-tile-per-slice", cls="multi-tile reduction", file="qlk/kernels/fused_matmul.py",
         old="k_end = tl.minimum(K, k_start + tiles * BLOCK_K)", new="k_end = tl.minimum(K, k_start + BLOCK_K)",
         tests=[KP, "-k", "test_int_paths and split"]),
    dict(id="splitk-slice-start", cls="multi-tile reduction", file="qlk/kernels/fused_matmul.py",
         old="k_start = pid_s * tiles * BLOCK_K", new="k_start = pid_s * BLOCK_K",
         tests=[KP, "-k", "test_int_paths and split"]),
    dict(id="splitk-floor-tiles", cls="multi-tile reduction", file="qlk/kernels/fused_matmul.py",
         old="tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(1))",
         new="tiles = tl.cdiv(K, BLOCK_K) // tl.num_programs(1)",
         tests=[KP, "-k", "test_int_paths and split"]),
    dict(id="splitn-one-tile-per-slice", cls="multi-tile reduction", file="qlk/kernels/fused_matmul.py",
         old="n_end = tl.minimum(N, n_start + tiles * BLOCK_N)", new="n_end = tl.minimum(N, n_start + BLOCK_N)",
         tests=[KP, "-k", "test_int_paths and split"]),
    dict(id="splitk-workspace-slice-stride", cls="workspace", file="qlk/kernels/fused_matmul.py",
         old="tl.store(ws_ptr + pid_s.to(tl.int64) * M * N + offs, acc, mask=mask)",
         new="tl.store(ws_ptr + pid_s.to(tl.int64) * N + offs, acc, mask=mask)",
         tests=[KP, "-k", "test_int_paths and split-det"]),
    dict(id="splitn-workspace-last-slice-only", cls="workspace", file="qlk/kernels/fused_matmul.py",
         old="out.copy_(ws.sum(0) if deterministic else ws)", new="out.copy_(ws[-1] if deterministic else ws)",
         tests=[KP, "-k", "test_int_paths and split-det"]),
    # ---- NF4 double quant ------------------------------------------------------------------------
    dict(id="nf4-nested-index-ignores-row", cls="nested index", file="qlk/kernels/quant_tile.py",
         old="nested = tl.load(am_scale_ptr + idx // 256)",
         new="nested = tl.load(am_scale_ptr + (offs_g * stride_sg) // 256)",
         tests=[KP, "-k", "test_nf4_paths or test_nf4_dequant"]),
    dict(id="nf4-nested-index-masked-path", cls="nested index", file="qlk/kernels/quant_tile.py",
         old="nested = tl.load(am_scale_ptr + idx // 256, mask=mask_g, other=0.0)",
         new="nested = tl.load(am_scale_ptr + idx // 64, mask=mask_g, other=0.0)",
         tests=[KP, "-k", "test_nf4_paths or test_nf4_dequant"]),
    # ---- partial packed words --------------------------------------------------------------------
    dict(id="int3-partial-chunk-dropped", cls="partial words", file="qlk/kernels/quant_tile.py",
         old="mask = offs_c[None, :] < tl.cdiv(K, 32)", new="mask = offs_c[None, :] < K // 32",
         tests=[KP, "-k", "test_int_dequant or test_int_paths"]),
    dict(id="int2-partial-word-dropped", cls="partial words", file="qlk/kernels/quant_tile.py",
         old="words = tl.load(ptrs, mask=offs_w[None, :] < tl.cdiv(K, PER), other=0)",
         new="words = tl.load(ptrs, mask=offs_w[None, :] < K // PER, other=0)",
         tests=[KP, "-k", "test_int_dequant or test_int_paths"]),
    # ---- QA-LoRA pooling over several K tiles ----------------------------------------------------
    dict(id="pool-store-at-group-start", cls="multi-tile pooling", file="qlk/kernels/fused_matmul.py",
         old="done = (k0 + BLOCK_K) % GROUP_SIZE == 0", new="done = k0 % GROUP_SIZE == 0",
         tests=[KP, "-k", "test_qalora_paths"]),
    dict(id="pool-mean-over-tile", cls="multi-tile pooling", file="qlk/kernels/fused_matmul.py",
         old="k0 // GROUP_SIZE, p_run * (1.0 / GROUP_SIZE),", new="k0 // GROUP_SIZE, p_run * (1.0 / BLOCK_K),",
         tests=[KP, "-k", "test_qalora_paths"]),
    dict(id="pool-segment-wrong-group", cls="wrong group", file="qlk/kernels/fused_matmul.py",
         old="offs_g = k0 // GROUP_SIZE + tl.arange(0, NSEG)", new="offs_g = k0 // BLOCK_K + tl.arange(0, NSEG)",
         tests=[KP, "-k", "test_qalora_paths"]),
    # ---- group indexing, scale/bias, signs -------------------------------------------------------
    dict(id="tile-group-index-per-tile", cls="wrong group", file="qlk/kernels/quant_tile.py",
         old="offs_g = k0 // GROUP_SIZE + tl.arange(0, NG)", new="offs_g = k0 // BLOCK_K + tl.arange(0, NG)",
         tests=[KP, "-k", "test_int_dequant or test_int_paths"]),
    dict(id="odd-group-index-tile-relative", cls="wrong group", file="qlk/kernels/quant_tile.py",
         old="j = (offs_k // GROUP_SIZE)[None, :]",
         new="j = (k0 // GROUP_SIZE + tl.arange(0, BLOCK_K) // GROUP_SIZE)[None, :]",
         tests=[KP, "-k", "test_int_dequant or test_int_paths"]),
    dict(id="scale-bias-swapped", cls="scale/bias swap", file="qlk/kernels/quant_tile.py",
         old="w = q3 * s[:, :, None] + b[:, :, None]", new="w = q3 * b[:, :, None] + s[:, :, None]",
         tests=[KP, "-k", "test_int_dequant"]),
    dict(id="mid-code-sign", cls="sign", file="qlk/kernels/quant_tile.py",
         old="- (8388608.0 + MID)", new="- (8388608.0 - MID)",
         tests=[KP, "-k", "test_int_dequant"]),
    # ---- the input gradient's transposed tile (qlk/kernels/quant_tile_t.py) ----------------------
    dict(id="dgrad-tile-pair-swapped", cls="partial words", file="qlk/kernels/quant_tile_t.py",
         old="        return qf, qs", new="        return qs, qf",
         tests=["tests/test_quant_tile_t.py", KP, "-k", "test_int_tile_t or test_int_paths"]),
    dict(id="dgrad-tile-group-index-per-tile", cls="wrong group", file="qlk/kernels/quant_tile_t.py",
         old="offs_g = k0 // GROUP_SIZE + tl.arange(0, NG)", new="offs_g = k0 // BLOCK_K + tl.arange(0, NG)",
         tests=["tests/test_quant_tile_t.py", KP, "-k", "test_int_tile_t or test_int_paths"]),
    dict(id="dgrad-tile-even-bias-dropped", cls="scale/bias swap", file="qlk/kernels/quant_tile_t.py",
         old="ev = ev * s4 + b4", new="ev = ev * s4",
         tests=["tests/test_quant_tile_t.py", KP, "-k", "test_int_tile_t or test_int_paths"]),
    dict(id="fold-bias-sign", cls="sign", file="qlk/kernels/qalora.py",
         old="tl.store(out_ptr + idx, base + coef * acc, mask=mask)",
         new="tl.store(out_ptr + idx, base - coef * acc, mask=mask)",
         tests=[KP, "-k", "test_qalora_paths"]),
    dict(id="fold-bias-missing-1/g", cls="scale", file="qlk/kernels/qalora.py",
         old="r, float(scaling) / qw.group_size,", new="r, float(scaling),",
         tests=[KP, "-k", "test_qalora_paths"]),
    # ---- autograd, reference, merge, formats -----------------------------------------------------
    dict(id="autograd-dA-scale", cls="scale", file="qlk/autograd/qalora.py",
         old="da = (v.t() @ pooled).mul_(s).to(a.dtype)", new="da = (v.t() @ pooled).mul_(s / g).to(a.dtype)",
         tests=[KP, "-k", "test_qalora_autograd_grads or test_reference_qalora"]),
    dict(id="reference-pool-sum", cls="scale", file="qlk/reference.py",
         old="x.shape[-1] // group_size, group_size).mean(-1)", new="x.shape[-1] // group_size, group_size).sum(-1)",
         tests=[KP, "-k", "test_reference_qalora"]),
    dict(id="merge-missing-1/g", cls="scale", file="qlk/reference.py",
         old="delta = (scaling / qw.group_size) * (lora_b.double() @ lora_a.double())",
         new="delta = scaling * (lora_b.double() @ lora_a.double())",
         tests=[KP, "-k", "test_qalora_merge"]),
    dict(id="int3-unpack-high-bit", cls="partial words", file="qlk/formats/packing.py",
         old="codes = low.reshape(n, -1, 32) | (high << 2)", new="codes = low.reshape(n, -1, 32) | (high << 1)",
         tests=[KP, "-k", "test_int_oracle"]),
    dict(id="int-bias-sign", cls="sign", file="qlk/formats/int_group.py",
         old="b = torch.where(live, s * (mid - z), (lo + hi) / 2)", new="b = torch.where(live, s * (z - mid), (lo + hi) / 2)",
         tests=["tests/test_formats.py", "-k", "test_int_error_within_half_a_step"]),
    dict(id="nf4-offset-sign", cls="sign", file="qlk/formats/nf4.py",
         old="return nested + qw.absmax_offset", new="return nested - qw.absmax_offset",
         tests=[KP, "-k", "test_nf4_oracle"]),
]
