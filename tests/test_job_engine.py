"""Engines started for a job: the model-derived defaults (length, K) and the KV-cache sizing rule.
No engine: the rule is arithmetic, and the machine probes are replaced where a case needs a machine
other than this one."""

from __future__ import annotations

import json

import pytest

from vllm_steer.errors import ConfigError
from vllm_steer.integration import job_engine
from vllm_steer.integration.job_engine import (
    DEFAULT_JOB_MAX_MODEL_LEN,
    GiB,
    KV_FLOOR_BYTES,
    MiB,
    checkpoint_facts,
    cpu_kv_cache_bytes,
    gpu_memory_settings,
    job_engine_kwargs,
    job_max_model_len,
    kv_cache_need,
)
from vllm_steer.models.tiny_checkpoint import cached_tiny_checkpoint
from vllm_steer.pack import ModelShape

# a Llama-2-7B-like shape: 32 layers, 32 KV heads of 128 dims; 13.5 GB of 16-bit weights
SEVEN_B = ModelShape(architecture="LlamaForCausalLM", num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                     hidden_size=4096)
SEVEN_B_WEIGHTS = int(13.5 * GiB)


@pytest.fixture(scope="module")
def short_model(model_cache):
    """A tiny Llama whose context is 64 positions (4 layers, 2 KV heads of 32 dims, float32)."""
    return cached_tiny_checkpoint("llama", cache_root=model_cache, max_position_embeddings=64)


def test_kv_need_is_sequences_times_blocks_times_bytes_per_token():
    need = kv_cache_need(SEVEN_B, max_model_len=1024, max_num_seqs=64, kv_dtype_bytes=2)
    assert need.bytes_per_token == 32 * 32 * 128 * 2 * 2  # layers * KV heads * head_dim * (K, V) * bytes
    assert need.one_sequence == 1024 * need.bytes_per_token  # 512 MiB
    assert need.job == int(64 * need.one_sequence * 1.25)  # 40 GiB with the headroom
    # tensor parallelism splits the KV heads; a length is counted in whole 256-token blocks
    split = kv_cache_need(SEVEN_B, max_model_len=1000, max_num_seqs=64, kv_dtype_bytes=2, tensor_parallel_size=4)
    assert split.bytes_per_token == need.bytes_per_token // 4 and split.one_sequence == need.one_sequence // 4
    # a tiny job still gets the floor
    tiny = ModelShape(architecture="LlamaForCausalLM", num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                      hidden_size=128)
    small = kv_cache_need(tiny, max_model_len=64, max_num_seqs=64, kv_dtype_bytes=4)
    assert small.one_sequence == 256 * 4 * 2 * 32 * 2 * 4 and small.job == KV_FLOOR_BYTES


def test_cpu_size_fits_the_memory_left_beside_the_weights():
    need = kv_cache_need(SEVEN_B, max_model_len=1024, max_num_seqs=64, kv_dtype_bytes=2)
    # the machine: 17.64 of 19.21 GiB free, where vLLM's default asks for 92 % of the node
    available = int(17.64 * GiB)
    size = cpu_kv_cache_bytes(need, available_bytes=available, weights_bytes=SEVEN_B_WEIGHTS)
    assert need.one_sequence <= size <= (available - SEVEN_B_WEIGHTS) / 2 and size % MiB == 0
    assert size < need.job  # capped: the job's 40 GiB do not fit
    # a job that fits is given what it needs, nothing more
    short = kv_cache_need(SEVEN_B, max_model_len=128, max_num_seqs=8, kv_dtype_bytes=2)
    assert cpu_kv_cache_bytes(short, available_bytes=available, weights_bytes=SEVEN_B_WEIGHTS) == \
        short.job // MiB * MiB
    # engines side by side each hold their weights and share what is left
    two = cpu_kv_cache_bytes(short, available_bytes=64 * GiB, weights_bytes=SEVEN_B_WEIGHTS, engines=2)
    assert two == short.job // MiB * MiB
    with pytest.raises(ConfigError) as info:
        cpu_kv_cache_bytes(need, available_bytes=available, weights_bytes=SEVEN_B_WEIGHTS, engines=2)
    assert info.value.field == "max_model_len" and "VLLM_CPU_KVCACHE_SPACE" in str(info.value)


def test_gpu_settings_are_a_modest_share_sized_for_the_job():
    need = kv_cache_need(SEVEN_B, max_model_len=1024, max_num_seqs=64, kv_dtype_bytes=2)
    h200 = gpu_memory_settings(need, device_bytes=141 * GiB, weights_bytes=SEVEN_B_WEIGHTS)
    assert h200["kv_cache_memory_bytes"] == need.job // MiB * MiB
    assert 0.35 < h200["gpu_memory_utilization"] < 0.5  # weights + 40 GiB KV + reserve, not 0.92
    small = gpu_memory_settings(need, device_bytes=24 * GiB, weights_bytes=SEVEN_B_WEIGHTS)
    assert need.one_sequence <= small["kv_cache_memory_bytes"] < need.job
    assert small["gpu_memory_utilization"] <= 0.92
    with pytest.raises(ConfigError, match="no room") as info:
        gpu_memory_settings(need, device_bytes=16 * GiB, weights_bytes=SEVEN_B_WEIGHTS)
    assert info.value.field == "max_model_len"


def test_defaults_come_from_the_model(short_model, model_cache, tmp_path):
    facts = checkpoint_facts(short_model)
    assert (facts.max_len, facts.max_len_source) == (64, "max_position_embeddings")
    assert facts.config_dtype == "float32" and facts.weights_bytes > 0
    assert job_max_model_len(facts) == 64 and job_max_model_len(facts, 32) == 32
    with pytest.raises(ConfigError, match="max_position_embeddings = 64") as info:
        job_max_model_len(facts, 65)
    assert info.value.field == "max_model_len"
    long_model = cached_tiny_checkpoint("llama", cache_root=model_cache, max_position_embeddings=4096)
    assert job_max_model_len(long_model) == DEFAULT_JOB_MAX_MODEL_LEN and job_max_model_len(long_model, 2048) == 2048
    # the tokenizer's own limit counts too
    copy = tmp_path / "model"
    copy.mkdir()
    for f in short_model.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 48}))
    assert job_max_model_len(copy) == 48


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_facts_read_from_config_json_match_transformers(family, tiny_model):
    """checkpoint_facts reads a plain config.json itself (fast); the shape is the one AutoConfig gives."""
    from vllm_steer.pack.hf_shape import shape_of_checkpoint

    path = tiny_model(family)
    facts = checkpoint_facts(path)
    assert facts.shape == shape_of_checkpoint(path)
    assert (facts.max_len, facts.config_dtype, facts.rope_scaled) == (512, "float32", False)


def test_a_folder_that_is_no_checkpoint_is_named(tmp_path, short_model):
    cases = [(tmp_path / "missing", "no such folder"), (tmp_path, "no config.json")]
    (tmp_path / "weightless").mkdir()
    (tmp_path / "weightless" / "config.json").write_text("{}")
    cases.append((tmp_path / "weightless", "no weight files"))
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "config.json").write_text("{not json")
    (tmp_path / "garbled" / "model.safetensors").write_bytes(b"x")
    cases.append((tmp_path / "garbled", "cannot load its config"))
    unknown = tmp_path / "unknown"  # the shape keys, but a model type transformers does not know
    unknown.mkdir()
    config = json.loads((short_model / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "no-such-type"}))
    (unknown / "model.safetensors").write_bytes(b"x")
    cases.append((unknown, "cannot load its config"))
    for folder, words in cases:
        with pytest.raises(ConfigError, match=words) as info:
            checkpoint_facts(folder)
        assert info.value.field == "model"


@pytest.fixture
def cpu_machine(monkeypatch):
    """This process as a CPU host with 17.64 GiB free and no KV-cache setting in the environment."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(job_engine, "_device_kind", lambda: "cpu")
    monkeypatch.setattr(job_engine, "_cpu_available_bytes", lambda: int(17.64 * GiB))
    return monkeypatch


def test_job_kwargs_size_the_kv_cache_unless_the_user_did(short_model, cpu_machine):
    kwargs = job_engine_kwargs(short_model, max_model_len=None, max_num_seqs=64, dtype="auto")
    assert kwargs == {"max_model_len": 64, "max_num_seqs": 64, "dtype": "auto", "kv_cache_memory_bytes": KV_FLOOR_BYTES}
    # explicit arguments win, and a memory setting of the user's turns the sizing off
    kwargs = job_engine_kwargs(short_model, max_model_len=None, max_num_seqs=64, dtype="auto",
                               user_kwargs={"max_model_len": 32, "dtype": "float32", "seed": 1})
    assert (kwargs["max_model_len"], kwargs["dtype"], kwargs["seed"]) == (32, "float32", 1)
    for user in ({"kv_cache_memory_bytes": 1 << 30}, {"gpu_memory_utilization": 0.5}):
        kwargs = job_engine_kwargs(short_model, max_model_len=None, max_num_seqs=64, dtype="auto", user_kwargs=user)
        assert {k: kwargs.get(k) for k in job_engine.MEMORY_KWARGS} == {k: user.get(k) for k in job_engine.MEMORY_KWARGS}
    cpu_machine.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM reads it (and it wins over the argument)
    kwargs = job_engine_kwargs(short_model, max_model_len=None, max_num_seqs=64, dtype="auto")
    assert not any(k in kwargs for k in job_engine.MEMORY_KWARGS)
    with pytest.raises(ConfigError, match="longer than the model allows"):
        job_engine_kwargs(short_model, max_model_len=None, max_num_seqs=64, dtype="auto",
                          user_kwargs={"max_model_len": 128})


def test_job_kwargs_on_a_gpu(short_model, monkeypatch):
    monkeypatch.setattr(job_engine, "_device_kind", lambda: "cuda")
    monkeypatch.setattr(job_engine, "_gpu_total_bytes", lambda: 80 * GiB)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # a CPU setting: no effect on a GPU engine
    kwargs = job_engine_kwargs(short_model, max_model_len=None, max_num_seqs=64, dtype="auto")
    assert kwargs["kv_cache_memory_bytes"] == KV_FLOOR_BYTES
    assert kwargs["gpu_memory_utilization"] == 0.05  # a tiny model: the smallest share


def test_the_engine_takes_the_job_sizing_on_both_vllm_versions():
    """The names this module gives vLLM exist on the installed vLLM: ``kv_cache_memory_bytes`` and
    ``gpu_memory_utilization`` are engine arguments, and the CPU platform turns
    ``VLLM_CPU_KVCACHE_SPACE`` into the former (so an explicit environment setting wins)."""
    import inspect

    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import cpu

    fields = EngineArgs.__dataclass_fields__
    assert all(name in fields for name in job_engine.MEMORY_KWARGS)
    source = inspect.getsource(cpu)
    assert job_engine.KV_CPU_ENV in source and "kv_cache_memory_bytes" in source
