"""A device's two ceilings (copy bandwidth and bf16 matmul rate) and their JSON file.

Light on purpose (no jax): the serving benchmark reads a ceilings file that
`python -m jaxsgl.roofline --out FILE` measured on the GPU, and prices its run against it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float  # device-to-device copy, read + write
    matmul_flops_per_s: float  # bf16 matrix product
    device: str

    def __post_init__(self):
        for name in ("copy_bytes_per_s", "matmul_flops_per_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"ceiling {name} must be a positive number, got {value!r}")

    def floor(self, bytes_moved: float, flops: float) -> float:
        """The fewest seconds work of this size can take: the slower of its two terms."""
        return max(bytes_moved / self.copy_bytes_per_s, flops / self.matmul_flops_per_s)

    def times(self, devices: int) -> Ceilings:
        """The ceilings of `devices` such devices working on one split problem."""
        return Ceilings(
            self.copy_bytes_per_s * devices,
            self.matmul_flops_per_s * devices,
            f"{devices} x {self.device}" if devices > 1 else self.device,
        )

    def bound(self, bytes_moved: float, flops: float) -> str:
        memory = bytes_moved / self.copy_bytes_per_s >= flops / self.matmul_flops_per_s
        return "memory" if memory else "compute"

    @classmethod
    def of(cls, copy_tb_s: float, matmul_tflop_s: float, device: str = "given") -> Ceilings:
        """Ceilings stated in TB/s and TFLOP/s, the units the flags and the file use."""
        return cls(copy_tb_s * 1e12, matmul_tflop_s * 1e12, device)

    def to_json(self) -> dict:
        return {
            "device": self.device,
            "copy_tb_s": self.copy_bytes_per_s / 1e12,
            "matmul_tflop_s": self.matmul_flops_per_s / 1e12,
        }


def read_ceilings(path: str | Path) -> Ceilings:
    """A ceilings file: JSON with `copy_tb_s` and `matmul_tflop_s` (and `device`, optional)."""
    path = Path(path)
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"ceilings file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"ceilings file {str(path)!r} is not JSON: {e}") from None
    if not isinstance(body, dict) or not {"copy_tb_s", "matmul_tflop_s"} <= body.keys():
        raise ValueError(f"ceilings file {str(path)!r} needs copy_tb_s and matmul_tflop_s")
    return Ceilings.of(body["copy_tb_s"], body["matmul_tflop_s"], str(body.get("device", path)))


def write_ceilings(path: str | Path, ceilings: Ceilings) -> None:
    Path(path).write_text(json.dumps(ceilings.to_json(), indent=2) + "\n")
