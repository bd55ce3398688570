"""vllm-steer: per-request activation steering inside vLLM."""

from vllm_steer.config import SteeringConfig
from vllm_steer.errors import ConfigError, PackError, SpecError, SteeringError
from vllm_steer.spec import SteeringSpec

__version__ = "0.1.0"
__all__ = ["ConfigError", "PackError", "SpecError", "SteeringConfig", "SteeringError", "SteeringSpec"]
