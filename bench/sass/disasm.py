"""Read a cubin: resource usage and SASS, with the tools that ship inside Triton's NVIDIA backend.

``cuobjdump -res-usage`` gives registers, stack and static shared memory per function;
``cuobjdump -sass`` the machine code. Instructions are parsed into :class:`Instr` and sorted into
the pipe that issues them (:func:`pipe_of`); :func:`backward_branches` finds the loops.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
import re
import shutil
import subprocess
import tempfile


def tool(name: str) -> str:
    """Path of ``cuobjdump`` / ``nvdisasm``: Triton's bundled copy first, then $PATH."""
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: it ships with Triton's NVIDIA backend "
                                "(triton/backends/nvidia/bin); install triton, or put the CUDA toolkit on PATH")
    return found


@dataclasses.dataclass(frozen=True)
class Resources:
    regs: int
    stack: int
    static_smem: int


@dataclasses.dataclass(frozen=True)
class Instr:
    addr: int
    op: str  # opcode without modifiers: "LDG"
    mods: str  # ".E.128.CONSTANT"
    args: str  # operands text
    predicated: bool


_RES = re.compile(r"Function ([\w$.]+):\s*\n?\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[\w]+)*)\s*([^;]*);")
_TARGET = re.compile(r"\b0x([0-9a-f]+)\b")


@functools.lru_cache(maxsize=512)
def _dump(digest: str, cubin: bytes) -> tuple:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return res, sass


def read_cubin(cubin: bytes, function: str | None = None) -> tuple[Resources, list[Instr]]:
    """Resources and instructions of ``function`` (default: the cubin's only / first kernel).
    Identical cubins are disassembled once per process."""
    res, sass = _dump(hashlib.sha256(cubin).hexdigest(), cubin)
    found = {m.group(1): Resources(*(int(x) for x in m.groups()[1:])) for m in _RES.finditer(res)}
    if function is None:
        if not found:
            raise ValueError("cuobjdump found no function in the cubin")
        function = next(iter(found))
    if function not in found:
        raise ValueError(f"function {function!r} not in the cubin (it holds {', '.join(found)})")
    return found[function], parse_sass(_function_text(sass, function))


def _function_text(sass: str, function: str) -> str:
    start = sass.find(f"Function : {function}\n")
    if start < 0:
        return sass
    end = sass.find("Function : ", start + 1)
    return sass[start:] if end < 0 else sass[start:end]


def parse_sass(text: str) -> list[Instr]:
    return [Instr(int(m.group(1), 16), m.group(3), m.group(4) or "", m.group(5).strip(), bool(m.group(2)))
            for m in _INSTR.finditer(text)]


def branch_target(i: Instr) -> int | None:
    if i.op not in ("BRA", "BRX", "JMP"):
        return None
    m = _TARGET.search(i.args)
    return int(m.group(1), 16) if m else None


def backward_branches(instrs: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) addresses of every loop body, i.e. every branch to an earlier address."""
    out = []
    for i in instrs:
        t = branch_target(i)
        if t is not None and t <= i.addr:
            out.append((t, i.addr))
    return out


# ------------------------------------------------------------------------------------- pipes
TENSOR = frozenset({"HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BMMA", "DMMA"})
FP32 = frozenset({"FFMA", "FADD", "FMUL", "FSETP", "FSWZADD", "FCHK"})
FP16X2 = frozenset({"HFMA2", "HADD2", "HMUL2", "HSETP2", "HMNMX2"})
INT = frozenset({"IADD3", "IADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "PRMT", "ISETP", "SEL", "FSEL", "IMNMX",
                 "VIMNMX", "FMNMX", "LEA", "LEA.HI", "IABS", "SGXT", "BMSK", "POPC", "FLO", "BREV", "BFE", "BFI",
                 "P2R", "R2P", "PLOP3", "VIADD", "VIADDMNMX", "ISCADD", "MOV", "I2FP", "F2FP"})
IMAD = frozenset({"IMAD", "IMUL", "IDP", "IMADSP"})
XU = frozenset({"I2F", "F2I", "F2F", "I2I", "FRND", "MUFU", "F2IP"})
SHUFFLE = frozenset({"SHFL"})
GLOBAL_LOAD = frozenset({"LDG", "LDGSTS", "LD"})
GLOBAL_STORE = frozenset({"STG", "ST", "ATOMG", "ATOM", "RED", "REDG"})
SHARED = frozenset({"LDS", "STS", "LDSM", "STSM"})
LOCAL = frozenset({"LDL", "STL"})


def pipe_of(i: Instr) -> str:
    """The mix category of one instruction (also the key of its issue cost, see model.py)."""
    op = i.op
    if op in TENSOR:
        return "tensor"
    if op in FP32:
        return "fp32"
    if op in FP16X2:
        return "fp16x2"
    if op in INT:
        return "int"
    if op in IMAD:
        return "imad"
    if op in XU:
        return "cvt"
    if op in SHUFFLE:
        return "shfl"
    if op in GLOBAL_LOAD:
        return "gload"
    if op in GLOBAL_STORE:
        return "gstore"
    if op in SHARED:
        return "smem"
    if op in LOCAL:
        return "spill"
    if op.startswith("UTMA") or op == "UBLKCP":
        return "tma"
    if op == "NOP":
        return "nop"
    return "other"  # branches, barriers, uniform datapath, S2R ...


def access_bytes(i: Instr) -> int:
    """Bytes one thread moves with a load/store: .128 -> 16, .64 -> 8, .U8/.S8 -> 1, .U16/.S16 -> 2, else 4."""
    mods = i.mods.split(".")
    for tag, size in (("128", 16), ("64", 8), ("U8", 1), ("S8", 1), ("U16", 2), ("S16", 2)):
        if tag in mods:
            return size
    return 4


def shared_bytes(i: Instr) -> int:
    """Bytes one warp moves through shared memory: LDSM/STSM .x1/.x2/.x4 move 1/2/4 8x8 16-bit matrices."""
    if i.op in ("LDSM", "STSM"):
        mods = i.mods.split(".")
        return 128 * (4 if "4" in mods else 2 if "2" in mods else 1)
    return 32 * access_bytes(i)


_HGMMA_SHAPE = re.compile(r"^\.(\d+)x(\d+)x(\d+)")
_HMMA_SHAPES = {"1688": (16, 8, 8), "16816": (16, 8, 16), "16832": (16, 8, 32), "884": (8, 8, 4),
                "168": (16, 8, 8), "1684": (16, 8, 4)}


WGMMA = frozenset({"HGMMA", "QGMMA", "IGMMA", "BGMMA"})


def _waits_for_all(i: Instr) -> bool:
    """``WARPGROUP.DEPBAR.LE gsb0, 0x0``: wait until no wgmma is in flight."""
    return i.op == "WARPGROUP" and ".DEPBAR" in i.mods and i.args.replace(" ", "").endswith(",0x0")


def serialized_wgmma(body: list[Instr]) -> tuple[int, int]:
    """(waited, total): of a loop body's wgmma instructions, how many are followed, before the next
    one, by a wait for *no* wgmma in flight (``WARPGROUP.DEPBAR.LE gsb0, 0x0``). ptxas emits that
    after every wgmma when it serializes them (its C7515 advisory, "Potential Performance Loss",
    e.g. when non-wgmma instructions define an accumulator register inside the pipeline stage):
    each wgmma then waits for the previous one to finish. A pipelined loop issues its wgmmas back
    to back and waits once, for all but the newest group (``0x1``) or at the end."""
    waited = total = 0
    pending = False
    for i in body:
        if i.op in WGMMA:
            total += 1
            pending = True
        elif pending and _waits_for_all(i):
            waited += 1
            pending = False
    return waited, total


def drained_wgmma(body: list[Instr]) -> bool:
    """True when a loop body waits for *every* wgmma it issued before it ends: after its last
    wgmma, a ``WARPGROUP.DEPBAR.LE gsb0, 0x0`` (and no wgmma after it). Then no MMA is in flight
    across the iteration boundary, so the next step's loads, dequantization and shared-memory
    stores start only when this step's MMAs are done: the tensor cores idle while they run (within
    the CTA; other CTAs on the SM may fill the gap). Triton emits it when an MMA operand is stored
    to shared memory in the loop (a dequantized tile used as wgmma's B operand: one buffer, reused
    each step). A pipelined loop keeps one group in flight instead (``0x1``)."""
    last_mma = last_wait_all = -1
    for n, i in enumerate(body):
        if i.op in WGMMA:
            last_mma = n
        elif _waits_for_all(i):
            last_wait_all = n
    return last_mma >= 0 and last_wait_all > last_mma


def mma_shape(i: Instr) -> tuple[int, str]:
    """(multiply-adds of one instruction, "wgmma" | "mma_sync"). A wgmma instruction is issued by
    each warpgroup (4 warps) once; an mma.sync by every warp."""
    m = _HGMMA_SHAPE.match(i.mods)
    if m:
        return math.prod(int(x) for x in m.groups()), "wgmma"
    first = i.mods.split(".")[1] if i.mods.count(".") else ""
    return math.prod(_HMMA_SHAPES.get(first, (0,))), "mma_sync"


def mma_rate_factor(i: Instr) -> float:
    """Tensor throughput relative to 16-bit inputs: tf32 half, 8-bit types double."""
    mods = i.mods.split(".")
    if "TF32" in mods:
        return 0.5
    if i.op in ("IMMA", "IGMMA", "QGMMA") or {"E4M3", "E5M2", "S8", "U8"} & set(mods):
        return 2.0
    if i.op == "DMMA":
        return 1 / 16
    return 1.0
