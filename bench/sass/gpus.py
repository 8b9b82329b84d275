"""The GPU facts the static model uses: one record per target architecture.

Every number is a datasheet figure or derived from one (they are not measurements of ours):

* tensor rate: dense 16-bit multiply-adds per clock per SM. The A100 datasheet's 312 TFLOP/s
  bf16 is 108 SMs x 1.41 GHz x 2 x 1024; the H100 SXM's 989 TFLOP/s is 132 x 1.83 GHz x 2 x 2048.
  The clock is the one at which that peak is stated, and the same clock turns DRAM bytes per
  second into bytes per clock.
* ``mma_sync_share``: on sm_90 the Ampere-style ``mma.sync`` (SASS ``HMMA``) does not reach the
  wgmma peak; public microbenchmarks of H100 put it near two thirds.
* DRAM: 90 % of the datasheet bandwidth (H100 SXM 3.35 TB/s, A100 SXM 80 GB 2.04 TB/s), what a
  well-written streaming kernel sustains.
* shared memory per SM and per CTA, 64 warps and 32 CTAs per SM, 64 K registers per SM.
* issue costs (cycles one SM sub-partition's pipe is busy per warp instruction) follow the
  throughput table of the CUDA C programming guide: 32 fp32 lanes per sub-partition on sm_90
  (16 on sm_80, so an fp32 FMA costs 2 there), 16 integer lanes (2 cycles), 4 lanes for
  conversions and special functions (8 cycles), shuffles 4 cycles.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Gpu:
    arch: int
    name: str
    sms: int
    ghz: float
    tensor_macs_per_clk: int  # per SM, 16-bit inputs, the fastest MMA instruction of the arch
    mma_sync_share: float  # mma.sync's rate as a share of tensor_macs_per_clk
    dram_bytes_per_s: float
    smem_per_sm: int
    smem_per_cta: int
    fp32_cost: int  # issue cycles of one fp32 FMA warp instruction
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    smem_reserved_per_cta: int = 1024  # the driver keeps 1 KB of each CTA's shared memory

    @property
    def dram_bytes_per_clk_sm(self) -> float:
        """One SM's fair share of DRAM bandwidth, in bytes per clock."""
        return self.dram_bytes_per_s / (self.sms * self.ghz * 1e9)


GPUS = {
    90: Gpu(90, "H100 SXM", sms=132, ghz=1.83, tensor_macs_per_clk=2048, mma_sync_share=0.66,
            dram_bytes_per_s=0.9 * 3.35e12, smem_per_sm=233472, smem_per_cta=232448, fp32_cost=1),
    80: Gpu(80, "A100 SXM", sms=108, ghz=1.41, tensor_macs_per_clk=1024, mma_sync_share=1.0,
            dram_bytes_per_s=0.9 * 2.04e12, smem_per_sm=167936, smem_per_cta=166912, fp32_cost=2),
}

#: cycles a DRAM load takes to come back, for loops that wait on their own loads
DRAM_LATENCY_CLK = 700
#: shared-memory bandwidth per SM, bytes per clock (both archs)
SMEM_BYTES_PER_CLK = 128


def gpu(arch: int) -> Gpu:
    try:
        return GPUS[int(arch)]
    except (KeyError, ValueError):
        raise ValueError(f"arch: expected one of {sorted(GPUS)} (sm_90 = H100, sm_80 = A100), got {arch!r}") from None
