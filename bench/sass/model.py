"""The static model: from one launch's machine code to resources, occupancy and two estimates.

See docs/static-analysis.md for the model in prose, what it was checked against and what it
cannot see. In short, for the main loop of one CTA (one iteration), in SM clock cycles:

    tensor  = MMA multiply-adds / the SM's rate for that instruction
    issue   = warps per sub-partition x max(instructions, busiest pipe's cycles) per warp
    smem    = bytes through shared memory / 128 B per clock
    dram    = useful bytes per CTA-iteration / the SM's share of DRAM bandwidth
    latency = DRAM latency / loads in flight, when the loop waits on its own loads

``useful bytes`` is what the operation must move to or from DRAM: each tensor argument of the
launch once (inputs read, outputs written), spread evenly over the CTAs and their iterations.
Re-reads through L1/L2 (the same activation row read by every N tile, a lookup table gathered per
element) are not DRAM traffic and are not counted. The estimates, each times the SM balance
(:func:`sm_balance`: how evenly the grid spreads over the SMs):

    tensor fraction = (MACs / peak rate) / cycles      (MMA loops; read it at large M)
    DRAM fraction   = dram / cycles                    (read it at small M: decode)

optimistic: cycles = max(all terms) (everything overlaps the bottleneck); pessimistic: the
fraction's own term does not overlap the rest, cycles = own + max(others).
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import Callable, Optional

from . import disasm
from .capture import Launch
from .gpus import DRAM_LATENCY_CLK, SMEM_BYTES_PER_CLK, Gpu, gpu

# ------------------------------------------------------------------------------ declarations
#: kernel name -> iterations of the main loop per CTA, from the launch (args, constexprs, grid)
_LOOP_TRIPS: dict[str, Callable[[Launch], int]] = {}
#: kernel name -> useful DRAM bytes of the launch, when the tensor arguments do not tell it
_TRAFFIC: dict[str, Callable[[Launch], int]] = {}
#: kernel name -> CTAs of the launch that do work, when some exit at once (a grouped kernel's
#: spare tile slots: the grid is sized on the host from a bound, the tiles exist on the device)
_WORKING_CTAS: dict[str, Callable[[Launch], int]] = {}


def declare(kernel: str, iterations: Optional[Callable[[Launch], int]] = None,
            useful_bytes: Optional[Callable[[Launch], int]] = None,
            working_ctas: Optional[Callable[[Launch], int]] = None) -> None:
    """Tell the model what the machine code cannot: how many times one CTA runs the main loop of
    ``kernel`` (a function of the :class:`Launch`), rarely its useful DRAM bytes, and how many of
    its CTAs do work (the rest exit after a load: not counted in the grid's balance, and the useful
    bytes are spread over the working CTAs only)."""
    if iterations is not None:
        _LOOP_TRIPS[kernel] = iterations
    if useful_bytes is not None:
        _TRAFFIC[kernel] = useful_bytes
    if working_ctas is not None:
        _WORKING_CTAS[kernel] = working_ctas


def constexpr(launch: Launch, *names, default=None):
    """The first of ``names`` that is a constexpr of the launch."""
    for n in names:
        if launch.constexprs.get(n) is not None:
            return launch.constexprs[n]
    return default


def reduction_trips(launch: Launch, length: str, block: tuple, split: int = 1) -> int:
    """⌈⌈length / block⌉ / split⌉ for a loop over a dimension in constexpr-sized steps."""
    n = launch.scalars.get(length, launch.constexprs.get(length))  # some kernels make the shape a constexpr
    b = constexpr(launch, *block)
    if n is None or not b:
        raise KeyError(f"{launch.kernel}: no runtime argument {length!r} or constexpr {'/'.join(block)}")
    return max(1, math.ceil(math.ceil(n / b) / max(split, 1)))


def default_iterations(launch: Launch) -> int:
    """The Triton GEMM convention: ``for k in range(0, K, BLOCK_K)`` (or ``BLOCK_SIZE_K``), the K
    range divided by a ``SPLIT_K`` constexpr when there is one."""
    split = int(constexpr(launch, "SPLIT_K", default=1) or 1)
    return reduction_trips(launch, "K", ("BLOCK_K", "BLOCK_SIZE_K"), split)


def useful_bytes(launch: Launch) -> int:
    """Each distinct tensor argument once (the bytes its view spans)."""
    if launch.kernel in _TRAFFIC:
        return int(_TRAFFIC[launch.kernel](launch))
    by_ptr = {}
    for t in launch.tensors.values():
        by_ptr[t.data_ptr] = max(by_ptr.get(t.data_ptr, 0), t.nbytes)
    return sum(by_ptr.values())


# ------------------------------------------------------------------------------------ report
@dataclasses.dataclass
class Report:
    kernel: str
    arch: int
    config: str
    num_warps: int
    num_stages: int
    regs: int
    stack: int
    spill_ops: int
    smem: int
    ctas_per_sm: int
    limiter: str
    ctas: Optional[int]
    wave_eff: Optional[float]
    loop_instrs: int
    mix: dict
    macs_per_iter: int  # per CTA
    iterations: Optional[int]  # main-loop trips per CTA
    useful_bytes: Optional[int]
    cycles: dict  # per CTA-iteration: tensor, issue, smem, dram, latency_floor, exposed_latency
    bound: str
    tensor_opt: Optional[float]  # fractions, times SM balance (see sm_balance)
    tensor_pess: Optional[float]
    dram_opt: Optional[float]
    dram_pess: Optional[float]
    notes: list
    source: str = ""
    serialized_wgmma: int = 0  # main-loop wgmmas that wait for the previous one (disasm.serialized_wgmma)
    drained_wgmma: bool = False  # the main loop waits for all its wgmmas each iteration (disasm.drained_wgmma)

    def line(self) -> str:
        rng = lambda hi, lo: "-" if hi is None else f"{hi:.2f}..{lo:.2f}"  # noqa: E731
        return (f"{self.kernel[:34]:34} sm_{self.arch} {self.config[:40]:40} regs {self.regs:3} stack {self.stack:3} "
                f"smem {self.smem // 1024:3}K {self.ctas_per_sm:2} CTA/SM ({self.limiter}) "
                f"grid {self.ctas if self.ctas is not None else '-'} wave "
                f"{'-' if self.wave_eff is None else format(self.wave_eff, '.2f')} | {self.bound:7} "
                f"tensor {rng(self.tensor_opt, self.tensor_pess)} dram {rng(self.dram_opt, self.dram_pess)}")


def occupancy(g: Gpu, regs: int, smem: int, warps: int) -> tuple[int, str]:
    """Resident CTAs per SM and what limits them (registers are allocated per warp in 256s)."""
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    limits = [
        ((g.regs_per_sm // regs_per_warp) // warps, "regs"),
        (g.smem_per_sm // (smem + g.smem_reserved_per_cta) if smem else 1 << 30, "smem"),
        (g.max_warps_per_sm // warps, "warps"),
        (g.max_ctas_per_sm, "ctas"),
    ]
    return min(limits, key=lambda t: t[0])


def wave_efficiency(g: Gpu, ctas: int, per_sm: int) -> float:
    """Share of the CTA slots of all waves that hold a CTA (a grid smaller than the GPU counts too)."""
    slots = g.sms * max(per_sm, 1)
    return ctas / (math.ceil(ctas / slots) * slots)


def sm_balance(g: Gpu, ctas: int) -> float:
    """Mean over max CTAs per SM, CTAs / (SMs x ⌈CTAs / SMs⌉): the share of the run the busiest SM
    keeps the average SM busy. Throughput (tensor, issue, shared memory, DRAM share) is per SM, so
    the CTAs resident together share it and it is this, not the slot-based wave efficiency, that
    scales a throughput-bound estimate; the two agree at one CTA per SM."""
    return ctas / (g.sms * math.ceil(ctas / g.sms))


def _main_loop(instrs: list[disasm.Instr]) -> tuple[list[disasm.Instr], list[str]]:
    """The loop holding the most MMA work (the innermost of equals), else the most global-load
    bytes; with neither, the whole kernel. Epilogue code inside it that a forward branch skips
    (global stores, no MMA: runs once per tile, or for one tile only) is left out."""
    notes = []

    def weight(span):
        body = [i for i in instrs if span[0] <= i.addr <= span[1]]
        macs = sum(disasm.mma_shape(i)[0] for i in body if i.op in disasm.TENSOR)
        loads = sum(disasm.access_bytes(i) for i in body if i.op in disasm.GLOBAL_LOAD)
        return macs, loads if not macs else 0, span[0] - span[1]

    spans = disasm.backward_branches(instrs)
    best = max(spans, key=weight) if spans else None
    if best is None or weight(best)[:2] == (0, 0):
        return instrs, ["no main loop: the whole kernel counted as one iteration"]
    body = [i for i in instrs if best[0] <= i.addr <= best[1]]
    if weight(best)[0]:
        skipped = set()
        for i in body:
            t = disasm.branch_target(i)
            if t is not None and i.addr < t <= best[1]:
                region = [j for j in body if i.addr < j.addr < t]
                if region and not any(j.op in disasm.TENSOR for j in region) \
                        and any(j.op in disasm.GLOBAL_STORE for j in region):
                    skipped.update(j.addr for j in region)
        if skipped:
            notes.append(f"{len(skipped)} instructions of once-per-tile code in the loop left out")
            body = [i for i in body if i.addr not in skipped]
    return body, notes


def analyze(launch: Launch) -> Report:
    """Report on one captured launch (see the module docstring for the model)."""
    cfg = config_label(launch)
    ctas = launch.ctas
    if ctas and launch.kernel in _WORKING_CTAS:
        ctas = max(1, min(ctas, int(_WORKING_CTAS[launch.kernel](launch))))
    return analyze_cubin(launch.cubin, launch.arch, launch.num_warps, launch.num_stages, ctas,
                         dynamic_smem=launch.dynamic_smem, kernel=launch.kernel, config=cfg, launch=launch,
                         idle_ctas=(launch.ctas or 0) - (ctas or 0))


def analyze_cubin(cubin: bytes, arch: int, num_warps: int, num_stages: int, ctas: Optional[int] = None,
                  dynamic_smem: int = 0, kernel: str = "", config: str = "", function: Optional[str] = None,
                  launch: Optional[Launch] = None, iterations: Optional[int] = None,
                  total_useful_bytes: Optional[int] = None, idle_ctas: int = 0) -> Report:
    """Report on a cubin from any compiler (nvcc too: give ``function``, ``iterations`` and
    ``total_useful_bytes`` yourself, as there is no Triton launch to read them from). ``ctas``: the
    CTAs that do work; ``idle_ctas``: those of the grid that exit at once (noted only)."""
    g = gpu(arch)
    res, instrs = disasm.read_cubin(cubin, function)
    warps = num_warps
    smem = res.static_smem + dynamic_smem
    notes = []
    per_sm, limiter = occupancy(g, res.regs, smem, warps)
    if smem > g.smem_per_cta:
        notes.append(f"shared memory {smem} B > {g.smem_per_cta} B per CTA: will not launch")
    wave = wave_efficiency(g, ctas, per_sm) if ctas and per_sm else None
    if ctas and ctas < g.sms:
        notes.append(f"grid {ctas} CTAs < {g.sms} SMs")
    if idle_ctas > 0:
        notes.append(f"{idle_ctas} more CTAs hold no tile and exit at once: not counted")
    spill_ops = sum(1 for i in instrs if i.op in disasm.LOCAL)
    if res.stack or spill_ops:
        notes.append(f"spills: stack {res.stack} B, {spill_ops} LDL/STL")

    body, loop_notes = _main_loop(instrs)
    notes += loop_notes
    looped = not loop_notes or not loop_notes[0].startswith("no main loop")
    waited, wgmmas = disasm.serialized_wgmma(body) if looped else (0, 0)
    serialized = waited if wgmmas > 1 and 2 * waited > wgmmas else 0
    if serialized:  # not in the estimates below: the wgmma latency it exposes is not calibrated
        notes.append(f"wgmma serialized: {waited} of {wgmmas} wait for the previous one (ptxas C7515); "
                     "the estimates do not charge it")
    drained = bool(looped and not serialized and disasm.drained_wgmma(body))
    if drained:  # round 36: measured, not yet charged (one tile per op measured; bench/gpu_calibrate.py will fit it)
        notes.append("wgmma drained each iteration: the next step's loads and dequantization do not overlap "
                     "this step's MMAs within the CTA; the estimates do not charge it (an H200 ran such a loop "
                     "at 1.7-2.2x its pessimistic time: docs/static-analysis.md)")

    # ---- one iteration of one CTA
    mix = Counter()
    pipe_cycles = Counter()
    cost = {"fp32": g.fp32_cost, "fp16x2": 1, "int": 2, "imad": 2, "cvt": 8, "shfl": 4}
    warpgroups = max(warps // 4, 1)
    if any(i.op in ("SETMAXREG", "USETMAXREG") for i in instrs):  # warp-specialized: one producer group
        warpgroups = max(warpgroups - 1, 1)
        notes.append("warp-specialized (setmaxnreg): one warpgroup counted as producer")
    macs = ideal = tensor = 0.0
    issued = smem_warp_bytes = 0
    has_async = has_sync_load = False
    for i in body:
        p = disasm.pipe_of(i)
        if p == "nop":
            continue
        issued += 1
        if p == "tensor":
            m, kind = disasm.mma_shape(i)
            per_cta = m * (warpgroups if kind == "wgmma" else warps)
            share = g.mma_sync_share if kind == "mma_sync" else 1.0
            macs += per_cta
            ideal += per_cta / g.tensor_macs_per_clk
            tensor += per_cta / (g.tensor_macs_per_clk * share * disasm.mma_rate_factor(i))
            mix[f"tensor:{i.op}"] += 1
        elif p in cost:
            pipe_cycles[p] += cost[p]
            mix[p if p != "cvt" else f"cvt:{i.op}"] += 1
        elif p == "gload":
            mix[f"gload:{i.op}.{8 * disasm.access_bytes(i)}"] += 1
            if i.op == "LDGSTS":
                has_async = True
                smem_warp_bytes += 32 * disasm.access_bytes(i)
            else:
                has_sync_load = True
        elif p == "smem":
            smem_warp_bytes += disasm.shared_bytes(i)
            mix[f"smem:{i.op}"] += 1
        elif p == "tma":
            has_async = True
            mix[f"tma:{i.op}"] += 1
        else:
            mix[p] += 1
    if "tma:UTMALDG" in mix:
        notes.append("TMA loads: their bytes are invisible in SASS (the useful-bytes count does not need them)")
    if any(k.startswith("tensor:HMMA") for k in mix) and arch == 90:
        notes.append("mma.sync on sm_90: about two thirds of wgmma's rate")

    issue = warps / 4 * max(issued, max(pipe_cycles.values(), default=0))
    smem_clk = warps * smem_warp_bytes / SMEM_BYTES_PER_CLK

    # ---- useful bytes per CTA-iteration
    trips = iterations
    why_no_dram = None
    if trips is None:
        if not looped:
            trips = 1
        elif launch is not None:
            try:
                trips = int(_LOOP_TRIPS.get(launch.kernel, default_iterations)(launch))
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
                why_no_dram = f"main-loop trip count unknown ({e}): bench.sass.declare() it"
    total = total_useful_bytes if total_useful_bytes is not None else (useful_bytes(launch) if launch else None)
    dram = None
    if trips and total is not None and ctas:
        dram = total / (ctas * trips) / g.dram_bytes_per_clk_sm
    elif why_no_dram is None:
        why_no_dram = "no grid or useful bytes: DRAM fraction not estimated"
    if why_no_dram:
        notes.append(why_no_dram)

    # ---- latency: a loop that loads synchronously and is not software-pipelined waits for DRAM
    # every iteration (other resident CTAs hide part of it); a pipelined loop needs enough
    # loads in flight (Little's law): stages-1 iterations ahead, per resident CTA
    exposed = floor = 0.0
    reads_global = has_async or has_sync_load
    if reads_global and not has_async and num_stages <= 1:
        exposed = DRAM_LATENCY_CLK / max(per_sm, 1)
        notes.append(f"loads neither async nor pipelined: ~{DRAM_LATENCY_CLK} clk latency per iteration")
    elif reads_global:
        floor = DRAM_LATENCY_CLK / (max(per_sm, 1) * max(num_stages - 1, 1))

    terms = {"tensor": tensor, "issue": issue, "smem": smem_clk, "dram": dram or 0.0, "latency": floor}
    bound = max(terms, key=terms.get) if any(terms.values()) else "?"
    longest = max(terms.values()) + exposed
    w = sm_balance(g, ctas) if ctas else 1.0

    def rest(*leave):
        return max(v for k, v in terms.items() if k not in leave)

    t_opt = t_pess = d_opt = d_pess = None
    if macs and longest:
        t_opt = w * min(1.0, ideal / longest)
        t_pess = w * min(1.0, ideal / (tensor + rest("tensor") + exposed))
    if dram and longest:
        d_opt = w * min(1.0, dram / longest)
        d_pess = w * min(1.0, dram / (dram + rest("dram") + exposed))
    cycles = dict(terms, exposed_latency=exposed)
    return Report(kernel or function or "?", arch, config or f"w{warps} s{num_stages}", warps, num_stages, res.regs,
                  res.stack, spill_ops, smem, per_sm, limiter, ctas, wave, issued, dict(mix), int(macs), trips,
                  total, {k: round(v, 1) for k, v in cycles.items()}, bound, t_opt, t_pess, d_opt, d_pess, notes,
                  launch.source if launch else "", serialized, drained)


def analyze_all(launches) -> list[tuple[Report, Launch]]:
    """One report per distinct (compiled kernel, grid, useful bytes)."""
    seen, out = set(), []
    for L in launches:
        key = (L.kernel, L.arch, L.cache_key, L.grid, useful_bytes(L))
        if key not in seen:
            seen.add(key)
            out.append((analyze(L), L))
    return out


# ------------------------------------------------------------------------------ config label
#: not a config choice: shapes, format constants, and qlk's QN_ALIGN (a property of the weight's row stride)
_HIDDEN = {"M", "N", "K", "BITS", "GROUP_SIZE", "W_NBITS", "A_LOAD_ORDER", "NUM_STAGES", "QN_ALIGN"}


def config_label(launch: Launch) -> str:
    """'128x256x64 w8 s3 GROUP_M=8': the tile (BLOCK_M x BLOCK_N x BLOCK_K), warps, stages, then the
    other integer constexprs in capitals that are not shapes or format constants."""
    import re

    tile, extra = {}, []
    for name, v in launch.constexprs.items():
        if isinstance(v, bool) or not isinstance(v, int):
            continue
        m = re.fullmatch(r"BLOCK(?:_SIZE)?_([MNK])", name.upper())
        if m:
            tile[m.group(1)] = v
        elif name.isupper() and name not in _HIDDEN:
            extra.append(f"{name}={v}")
    t = "x".join(str(tile.get(d, "-")) for d in "MNK") if tile else ""
    return " ".join(p for p in (t, f"w{launch.num_warps} s{launch.num_stages}", *extra) if p)
