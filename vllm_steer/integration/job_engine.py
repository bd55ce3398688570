"""Engines the project starts for its own jobs (the fit's capture engine, the eval job's engines):
their length, batch and memory, set for the job instead of vLLM's take-the-whole-device defaults.

**Length.** A job engine's ``max_model_len`` defaults to the model's own context limit (the smallest
of the config's length keys, e.g. ``max_position_embeddings``, and the tokenizer's
``model_max_length``), capped at ``DEFAULT_JOB_MAX_MODEL_LEN`` (1024): fit and eval items are short,
and the KV cache is sized from this length. Asking for more than the model's limit is an error
naming the field, before any engine starts (for a config with RoPE scaling, vLLM decides).

**Memory.** By default vLLM reserves ``gpu_memory_utilization`` (0.92) of the device; on the CPU
backend that share of the NUMA node's memory, and it refuses to start when less is free (page cache
alone can trip it), unless ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB) or ``kv_cache_memory_bytes`` sets
the KV cache explicitly, which also skips that check (vLLM 0.26 and 0.32 alike; the environment
variable wins over the argument). A job engine asks for what the job needs::

    need = max_num_seqs * max_model_len (rounded up to 256-token blocks) * layers * KV heads per device
           * head_dim * 2 (K and V) * bytes of the KV dtype * 1.25 (headroom), at least 256 MiB

* CPU: ``kv_cache_memory_bytes = min(need, half the node's free memory once the weights are loaded,
  split over the engines and tensor-parallel workers started side by side)``;
* GPU (CUDA/ROCm): ``kv_cache_memory_bytes = min(need, what fits in 90 % of the device beside the
  weights)`` and ``gpu_memory_utilization`` = weights + KV + a reserve for activations, as a share
  of the device (0.05 … 0.92): with the KV cache given, vLLM uses that share only for its start-up
  check of free device memory, so a job engine also starts on a device others already use;
* other platforms: vLLM's defaults.

Either way the KV cache must hold one sequence of ``max_model_len`` tokens, or the job stops with an
error naming ``max_model_len``. Nothing is sized when the caller gives ``kv_cache_memory_bytes`` or
``gpu_memory_utilization``, or, on CPU, when ``VLLM_CPU_KVCACHE_SPACE`` is set: explicit settings win.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Mapping

from vllm_steer.errors import ConfigError
from vllm_steer.pack.manifest import ModelShape

GiB = 1 << 30
MiB = 1 << 20
DEFAULT_JOB_MAX_MODEL_LEN = 1024
KV_BLOCK_TOKENS = 256  # sequences are counted in blocks this long (vLLM's CPU blocks are 128 or 256)
KV_HEADROOM = 1.25
KV_FLOOR_BYTES = 256 * MiB
CPU_FREE_SHARE = 0.5  # of the memory left free beside the weights
GPU_USABLE_SHARE = 0.9
GPU_RESERVE_BYTES = 2 * GiB  # activations, sampler, CUDA graphs (plus a tenth of the weights)
GPU_UTILIZATION_RANGE = (0.05, 0.92)
KV_CPU_ENV = "VLLM_CPU_KVCACHE_SPACE"
MEMORY_KWARGS = ("kv_cache_memory_bytes", "gpu_memory_utilization")
# config keys that bound a model's context (the smallest one found applies)
_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length",
                "max_seq_length", "seq_len", "model_max_length")
_SHAPE_KEYS = ("num_hidden_layers", "num_attention_heads", "hidden_size")
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class CheckpointFacts:
    """What job engines need to know about a model, read from its HF config (no engine)."""

    model: str
    shape: ModelShape
    max_len: int | None  # the model's context limit; None when its config names none
    max_len_source: str  # where max_len comes from, e.g. "max_position_embeddings"
    rope_scaled: bool  # vLLM may allow more than max_len (RoPE scaling factor)
    config_dtype: str | None  # e.g. "bfloat16"
    weights_bytes: int  # size of the weight files (0 when not a local folder)


def checkpoint_facts(model: str | os.PathLike) -> CheckpointFacts:
    """Check that ``model`` is a loadable checkpoint (a local folder with a config and weights, or a
    hub id that loads) and read its facts. Raises ConfigError(field="model")."""
    from vllm_steer.pack.hf_shape import shape_from_hf_config

    name = str(model)
    folder = Path(name).expanduser()
    weights_bytes = 0
    if folder.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not folder.is_dir():
            raise ConfigError(f"model {name}: no such folder" if not folder.exists()
                              else f"model {name}: not a folder (a checkpoint is a folder with config.json)",
                              field="model")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model {name}: not a checkpoint folder (it has no config.json)", field="model")
        weight_files = [p for pattern in _WEIGHT_GLOBS for p in folder.glob(pattern)]
        if not weight_files:
            raise ConfigError(f"model {name}: the folder has no weight files ({', '.join(_WEIGHT_GLOBS)})",
                              field="model")
        weights_bytes = sum(p.stat().st_size for p in weight_files)
    config, text_config = _read_config(name, folder if folder.is_dir() else None)
    try:
        shape = shape_from_hf_config(text_config, getattr(config, "architectures", None))
    except (AttributeError, TypeError, ValueError) as exc:
        raise ConfigError(f"model {name}: not a decoder-only language model this project can steer: "
                          f"{_first_line(exc)}", field="model") from None
    max_len, source = _context_limit(text_config, folder if folder.is_dir() else None)
    return CheckpointFacts(
        model=name, shape=shape, max_len=max_len, max_len_source=source,
        rope_scaled=_rope_scaled(text_config), config_dtype=_dtype_name(
            getattr(text_config, "dtype", None) or getattr(text_config, "torch_dtype", None)
            or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)),
        weights_bytes=weights_bytes,
    )


def checkpoint_tokenizer(model: str | os.PathLike):
    """The checkpoint's tokenizer; raises ConfigError(field="model") when it has none that loads."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"model {model}: cannot load its tokenizer: {_first_line(exc)}", field="model") from None


def job_max_model_len(model: str | os.PathLike | CheckpointFacts, requested: int | None = None) -> int:
    """``requested`` checked against the model's limit, or (None) the default: the model's limit,
    at most DEFAULT_JOB_MAX_MODEL_LEN. Raises ConfigError(field="max_model_len")."""
    facts = model if isinstance(model, CheckpointFacts) else checkpoint_facts(model)
    if requested is None:
        return min(facts.max_len or DEFAULT_JOB_MAX_MODEL_LEN, DEFAULT_JOB_MAX_MODEL_LEN)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ConfigError(f"max_model_len must be a positive integer, got {requested!r}", field="max_model_len")
    if facts.max_len is not None and requested > facts.max_len and not facts.rope_scaled:
        raise ConfigError(
            f"max_model_len {requested} is longer than the model allows ({facts.max_len_source} = {facts.max_len})",
            field="max_model_len",
        )
    return requested


# -- the sizing rule ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class KVCacheNeed:
    """KV-cache bytes per device: one sequence of max_model_len tokens, and the whole job."""

    bytes_per_token: int
    one_sequence: int
    job: int  # max_num_seqs sequences, with headroom, at least KV_FLOOR_BYTES


def kv_cache_need(shape: ModelShape, *, max_model_len: int, max_num_seqs: int, kv_dtype_bytes: int,
                  tensor_parallel_size: int = 1) -> KVCacheNeed:
    kv_heads = max(1, math.ceil(shape.num_kv_heads / tensor_parallel_size))  # replicated below one per rank
    per_token = shape.num_layers * kv_heads * shape.head_dim * 2 * kv_dtype_bytes
    tokens = math.ceil(max_model_len / KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
    one = tokens * per_token
    job = max(math.ceil(max_num_seqs * one * KV_HEADROOM), KV_FLOOR_BYTES)
    return KVCacheNeed(bytes_per_token=per_token, one_sequence=one, job=job)


def cpu_kv_cache_bytes(need: KVCacheNeed, *, available_bytes: int, weights_bytes: int, engines: int = 1,
                       workers_per_engine: int = 1) -> int:
    """The job's need, at most half the memory free beside the weights, shared by ``engines`` engines
    of ``workers_per_engine`` workers each (every worker allocates its own KV cache)."""
    spare = available_bytes - engines * weights_bytes
    budget = int(CPU_FREE_SHARE * spare / (engines * workers_per_engine))
    size = min(need.job, budget)
    if size < need.one_sequence:
        raise ConfigError(
            f"not enough free memory for the KV cache of one max_model_len sequence: it needs "
            f"{need.one_sequence / GiB:.2f} GiB per worker, {max(budget, 0) / GiB:.2f} GiB can be spared "
            f"({available_bytes / GiB:.2f} GiB free, {weights_bytes / GiB:.2f} GiB of weights per engine); "
            f"lower max_model_len, free memory, or set {KV_CPU_ENV} (GiB) yourself",
            field="max_model_len",
        )
    return size // MiB * MiB


def gpu_memory_settings(need: KVCacheNeed, *, device_bytes: int, weights_bytes: int,
                        tensor_parallel_size: int = 1) -> dict[str, Any]:
    """``kv_cache_memory_bytes`` and ``gpu_memory_utilization`` for one device of the engine."""
    weights = weights_bytes / tensor_parallel_size
    reserve = GPU_RESERVE_BYTES + 0.1 * weights
    room = int(GPU_USABLE_SHARE * device_bytes - weights - reserve)
    size = min(need.job, room)
    if size < need.one_sequence:
        raise ConfigError(
            f"the device ({device_bytes / GiB:.1f} GiB) has no room for the KV cache of one max_model_len "
            f"sequence ({need.one_sequence / GiB:.2f} GiB) beside {weights / GiB:.1f} GiB of weights; "
            "lower max_model_len or use more tensor-parallel devices",
            field="max_model_len",
        )
    size = size // MiB * MiB
    low, high = GPU_UTILIZATION_RANGE
    share = math.ceil(100 * (weights + size + reserve) / device_bytes) / 100
    return {"kv_cache_memory_bytes": size, "gpu_memory_utilization": min(high, max(low, share))}


def kv_dtype_bytes(dtype: str | None, facts: CheckpointFacts, kv_cache_dtype: str | None = None) -> int:
    """Bytes per KV element: an fp8 KV cache is 1; otherwise the model dtype's (for "auto", the
    config's, an upper bound: vLLM may run a float32 checkpoint in 16 bits). Unknown: 4."""
    if kv_cache_dtype and str(kv_cache_dtype).startswith("fp8"):
        return 1
    name = _dtype_name(dtype)
    if name in (None, "auto"):
        name = facts.config_dtype
    return _DTYPE_BYTES.get(name or "", 4)


# -- engine kwargs -------------------------------------------------------------------------------------
def job_engine_kwargs(
    model: str | os.PathLike,
    *,
    max_model_len: int | None,
    max_num_seqs: int,
    dtype: str,
    user_kwargs: Mapping[str, Any] | None = None,
    engines_sharing_memory: int = 1,
    facts: CheckpointFacts | None = None,
) -> dict[str, Any]:
    """``LLM(model=..., **kwargs)`` arguments for an engine started for one job.

    ``max_model_len`` (None: the model's default, ``job_max_model_len``), ``max_num_seqs`` and
    ``dtype`` are the job's choices; ``user_kwargs`` (explicit LLM arguments) win over them, and when
    they name ``kv_cache_memory_bytes`` or ``gpu_memory_utilization`` (or, on CPU, when
    ``VLLM_CPU_KVCACHE_SPACE`` is set) nothing is sized. ``engines_sharing_memory``: engines started
    side by side on this machine's CPU memory (e.g. local Ray actors without GPUs)."""
    facts = facts or checkpoint_facts(model)
    user = dict(user_kwargs or {})
    kwargs: dict[str, Any] = {"max_model_len": job_max_model_len(facts, max_model_len),
                              "max_num_seqs": max_num_seqs, "dtype": dtype}
    kwargs.update(user)
    if "max_model_len" in user:
        kwargs["max_model_len"] = job_max_model_len(facts, user["max_model_len"])
    kwargs.update(_memory_kwargs(facts, kwargs, user, engines_sharing_memory))
    return kwargs


def _memory_kwargs(facts: CheckpointFacts, kwargs: dict, user: dict, engines: int) -> dict[str, Any]:
    if any(k in user for k in MEMORY_KWARGS):
        return {}
    device = _device_kind()
    if device == "cpu" and os.environ.get(KV_CPU_ENV, "") != "":
        return {}
    if device not in ("cpu", "cuda"):
        return {}
    tp = int(kwargs.get("tensor_parallel_size") or 1)
    need = kv_cache_need(
        facts.shape, max_model_len=kwargs["max_model_len"], max_num_seqs=int(kwargs["max_num_seqs"]),
        kv_dtype_bytes=kv_dtype_bytes(kwargs.get("dtype"), facts, kwargs.get("kv_cache_dtype")),
        tensor_parallel_size=tp,
    )
    if device == "cpu":
        size = cpu_kv_cache_bytes(need, available_bytes=_cpu_available_bytes(), weights_bytes=facts.weights_bytes,
                                  engines=max(1, engines), workers_per_engine=tp)
        return {"kv_cache_memory_bytes": size}  # vLLM logs it ("Explicitly set ... GiB for KV cache")
    device_bytes = _gpu_total_bytes()
    if device_bytes is None:
        return {}
    return gpu_memory_settings(need, device_bytes=device_bytes, weights_bytes=facts.weights_bytes,
                               tensor_parallel_size=tp)


@contextmanager
def engine_settings_errors(**flags: str) -> Iterator[None]:
    """Around ``LLM(...)`` of a job engine: vLLM's config validation errors (pydantic) become one
    ConfigError naming the engine argument (``flags`` maps an argument to the name to report)."""
    from pydantic import ValidationError

    try:
        yield
    except ValidationError as exc:
        err = exc.errors()[0]
        message = err.get("msg", str(exc)).removeprefix("Value error, ")
        field = next((str(p) for p in err.get("loc", ()) if isinstance(p, str)), None)
        if field is None:
            field = next((name for name in ("max_model_len", "dtype", "tensor_parallel_size", "max_num_seqs",
                                            "kv_cache_memory_bytes", "gpu_memory_utilization") if name in message),
                         "engine")
        raise ConfigError(f"{flags.get(field, field)}: the engine refused this setting: {_first_line(message)}",
                          field=field) from None


# -- probes --------------------------------------------------------------------------------------------
def _device_kind() -> str:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_cuda_alike():
        return "cuda"
    return str(getattr(current_platform, "device_type", "") or "other")


def _cpu_available_bytes() -> int:
    """Free memory as vLLM's CPU worker measures it (the NUMA node of the first allowed CPU)."""
    try:
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

        return int(get_memory_node_info(get_allowed_cpu_list()[0].numa_node).available_memory)
    except (ImportError, AttributeError, IndexError, OSError):
        import psutil

        return int(psutil.virtual_memory().available)


def _gpu_total_bytes() -> int | None:
    from vllm.platforms import current_platform

    try:
        return int(current_platform.get_device_total_memory(0))
    except (NotImplementedError, RuntimeError, OSError):
        return None


# -- config reading ------------------------------------------------------------------------------------
def _read_config(name: str, folder: Path | None) -> tuple[Any, Any]:
    """(config, the language model's config). A local config.json that names its architecture, a
    model type transformers knows and the shape keys is read as it is (transformers' config classes
    take seconds to import); any other goes through AutoConfig."""
    if folder is not None:
        try:
            raw = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model {name}: cannot load its config: {_first_line(exc)}", field="model") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"model {name}: cannot load its config: config.json is not a JSON object",
                              field="model")
        text = raw["text_config"] if isinstance(raw.get("text_config"), dict) else raw
        plain = all(isinstance(text.get(k), int) and not isinstance(text.get(k), bool) for k in _SHAPE_KEYS)
        if plain and raw.get("architectures") and _known_model_type(raw.get("model_type")):
            return SimpleNamespace(**raw), SimpleNamespace(**text)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:  # missing/garbled config.json, unknown model_type
        raise ConfigError(f"model {name}: cannot load its config: {_first_line(exc)}", field="model") from None
    return config, config.get_text_config() if hasattr(config, "get_text_config") else config


def _known_model_type(model_type: Any) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES


def _context_limit(text_config: Any, folder: Path | None) -> tuple[int | None, str]:
    found = [(int(value), key) for key in _LENGTH_KEYS
             if isinstance(value := getattr(text_config, key, None), (int, float)) and not isinstance(value, bool)
             and 0 < value < 1e12]
    if folder is not None and (folder / "tokenizer_config.json").is_file():
        try:
            tokenizer_limit = json.loads((folder / "tokenizer_config.json").read_text()).get("model_max_length")
        except (OSError, ValueError, AttributeError):
            tokenizer_limit = None
        if isinstance(tokenizer_limit, (int, float)) and 0 < tokenizer_limit < 1e12:
            found.append((int(tokenizer_limit), "the tokenizer's model_max_length"))
    if not found:
        return None, "none"
    return min(found)


def _rope_scaled(text_config: Any) -> bool:
    for key in ("rope_scaling", "rope_parameters"):
        value = getattr(text_config, key, None)
        params = value.values() if isinstance(value, dict) and all(isinstance(v, dict) for v in value.values()) \
            else [value]
        for p in params:
            if isinstance(p, dict) and p.get("rope_type", p.get("type", "default")) not in (None, "default"):
                return True
    return False


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def _first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
