"""What this CPU offers int8 kernels, read from the flags of ``/proc/cpuinfo`` (``None`` where
there is none: not Linux):

1. AMX (``amx_int8``) and VNNI (``avx512_vnni``, ``avx_vnni``) on x86, and the dot-product
   instructions (``asimddp``) on ARM, multiply int8 values into 32-bit sums in one step: the
   fast int8 kernels.
2. Without them an x86 CPU's int8 kernels run on AVX-512 (``avx512bw``) or AVX2, whose u8 x s8
   products pass through 16 bits and can saturate (``onnxq.tune.saturation``).
"""

from __future__ import annotations

from pathlib import Path

INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "asimddp", "avx512bw", "avx2")  # best first
DOT_PRODUCT_FLAGS = frozenset(INT8_FLAGS[:4])  # rule 1


def read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> str | None:
    """The text of ``/proc/cpuinfo``, or ``None`` where it cannot be read."""
    try:
        return path.read_text()
    except OSError:
        return None


def int8_features(cpuinfo: str | None) -> tuple[str, ...]:
    """The int8-relevant flags (``INT8_FLAGS``) that ``cpuinfo`` lists, best first."""
    flags = set((cpuinfo or "").split())
    return tuple(flag for flag in INT8_FLAGS if flag in flags)


def int8_summary(cpuinfo: str | None) -> str:
    """One line on this CPU's int8 kernels, for benchmark headers: the flags and whether int8
    products have a one-step 32-bit dot product (rule 1)."""
    if cpuinfo is None:
        return "CPU int8 features unknown (no /proc/cpuinfo)"
    features = int8_features(cpuinfo)
    fast = "with" if DOT_PRODUCT_FLAGS.intersection(features) else "without"
    return f"CPU int8 features: {', '.join(features) or 'none'} ({fast} VNNI/AMX/dot-product int8 instructions)"
