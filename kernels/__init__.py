"""vLLM-steer kernels: the fused steer+probe op on a layer's attention output.

``steer_probe_reference`` is plain torch. ``steer_probe_triton`` is the fused Triton kernel; it is
loaded lazily on first access so that importing this package does not import Triton (on CPU,
Triton must only be imported after ``TRITON_INTERPRET=1`` is set).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .steer_probe_reference import steer_probe_reference, validate_steer_probe_args

if TYPE_CHECKING:
    from .steer_probe_triton import steer_probe_triton

__all__ = ["steer_probe_reference", "steer_probe_triton", "validate_steer_probe_args"]


def __getattr__(name: str) -> Any:
    if name == "steer_probe_triton":
        from .steer_probe_triton import steer_probe_triton

        return steer_probe_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
