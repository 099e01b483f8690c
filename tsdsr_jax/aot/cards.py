"""GPU cards, from their public specifications, as the GPU compiler's target description.

XLA compiles for a card it does not have when given a ``GpuTargetConfigProto`` (text format):
the SM count, compute capability, memory size and bandwidth, caches and limits. The memory a
program needs, read from that compile, is then the card's own plan.
"""

from __future__ import annotations

import dataclasses

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Card:
    """One GPU model (the figures of its public specification sheet)."""

    description: str
    memory_bytes: int            # device memory as the driver reports it
    bandwidth: float             # bytes/s
    sm_count: int
    compute_capability: tuple[int, int]
    l2_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    clock_ghz: float
    fp32_units_per_sm: int
    threads_per_sm: int

    def target_config(self, cudnn: tuple[int, int] = (9, 8), cuda: tuple[int, int] = (13, 0)
                      ) -> str:
        """The card as a ``GpuTargetConfigProto`` in text format."""
        major, minor = self.compute_capability
        fields = {
            "threads_per_block_limit": 1024, "threads_per_warp": 32,
            "shared_memory_per_block": 48 * 1024,
            "shared_memory_per_core": self.shared_memory_per_sm,
            "threads_per_core_limit": self.threads_per_sm, "core_count": self.sm_count,
            "fpus_per_core": self.fp32_units_per_sm, "block_dim_limit_x": 2 ** 31 - 1,
            "block_dim_limit_y": 65535, "block_dim_limit_z": 65535,
            "memory_bandwidth": int(self.bandwidth), "l2_cache_size": self.l2_bytes,
            "clock_rate_ghz": self.clock_ghz, "device_memory_size": self.memory_bytes,
            "shared_memory_per_block_optin": self.shared_memory_per_block_optin,
            "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
        }
        info = "\n".join(f"  {k}: {v}" for k, v in fields.items())
        return (f"gpu_device_info {{\n{info}\n"
                f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
                f'platform_name: "CUDA"\n'
                f"dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} }}\n"
                f"runtime_version {{ major: {cuda[0]} minor: {cuda[1]} }}\n"
                f'device_description_str: "{self.description}"\n')


MIB = 2 ** 20
CARDS = {
    "rtx4090": Card("NVIDIA GeForce RTX 4090", 24_564 * MIB, 1.008e12, 128, (8, 9), 72 * MIB,
                    100 * 1024, 99 * 1024, 2.52, 128, 1536),
    "a100-40g": Card("NVIDIA A100-SXM4-40GB", 40_960 * MIB, 1.555e12, 108, (8, 0), 40 * MIB,
                     164 * 1024, 163 * 1024, 1.41, 64, 2048),
    "a100-80g": Card("NVIDIA A100-SXM4-80GB", 81_920 * MIB, 2.039e12, 108, (8, 0), 40 * MIB,
                     164 * 1024, 163 * 1024, 1.41, 64, 2048),
    "h100": Card("NVIDIA H100 80GB HBM3", 81_559 * MIB, 3.35e12, 132, (9, 0), 50 * MIB,
                 228 * 1024, 227 * 1024, 1.98, 128, 2048),
    "h200": Card("NVIDIA H200", 143_771 * MIB, 4.8e12, 132, (9, 0), 60 * MIB,
                 228 * 1024, 227 * 1024, 1.98, 128, 2048),
}
