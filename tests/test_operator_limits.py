"""Per-request limits an operator sets (FASB's backtracks multiply a request's cost), the serve flags
that set them, and what a server tells clients and its log about its packs. No engine needed."""

from __future__ import annotations

import argparse

import pytest

from vllm_steer.config import steering_config_from
from vllm_steer.errors import ConfigError, SpecError
from vllm_steer.integration.serve_flags import add_steering_flags, steering_config_from_flags
from vllm_steer.limits import OperatorLimits
from vllm_steer.pack import ModelShape, save_pack
from vllm_steer.pack.synthetic import random_pack
from vllm_steer.pack_registry import PackRegistry, without_paths
from vllm_steer.spec import SteeringSpec

SHAPE = ModelShape(architecture="LlamaForCausalLM", num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
                   hidden_size=32)


def _fasb(**kw):
    return SteeringSpec(pack="p", method="fasb", alpha=4.0, **kw)


def test_defaults_admit_the_papers_settings_and_refuse_the_costly_ones():
    limits = OperatorLimits()
    limits.check(_fasb(backtrack=10, max_backtracks=1))  # FASB's own setting
    limits.check(_fasb(backtrack=32, max_backtracks=8))  # exactly the default budget of 256
    limits.check(SteeringSpec(pack="p", method="iti", alpha=4.0))  # not FASB: no cost to cap
    cases = [
        (_fasb(backtrack=1, max_backtracks=64), "steering.max_backtracks", "limit of 8"),
        (_fasb(backtrack=1024, max_backtracks=1), "steering.backtrack", "limit of 64"),
        (_fasb(backtrack=64, max_backtracks=8), "steering.max_backtracks", "512 tokens, over this server's limit of 256"),
    ]
    for spec, field, words in cases:
        with pytest.raises(SpecError) as info:
            limits.check(spec)
        assert info.value.field == field and words in str(info.value)


def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_steering_flags(parser)
    return parser.parse_args(list(argv))


def test_serve_flags_set_the_limits(tmp_path):
    save_pack(tmp_path / "p.safetensors", random_pack(SHAPE, "p", num_heads_selected=2, with_probes=True))
    args = _parse("--steering-plugin", "--steering-packs", str(tmp_path), "--steering-max-backtracks", "2",
                  "--steering-max-recomputed-tokens", "40")
    config = steering_config_from(steering_config_from_flags(args, None))
    assert config.limits == OperatorLimits(max_backtracks=2, max_recomputed_tokens=40)
    with pytest.raises(SpecError, match="limit of 40"):
        config.limits.check(_fasb(backtrack=30, max_backtracks=2))
    # the same limits through additional_config
    same = steering_config_from({"steering": {"packs_dir": str(tmp_path), "limits": {"max_backtracks": 2,
                                                                                     "max_recomputed_tokens": 40}}})
    assert same.limits == config.limits


@pytest.mark.parametrize("argv, flag", [
    (["--steering-max-backtracks", "2"], "--steering-max-backtracks"),  # needs --steering-plugin
    (["--steering-packs", "x"], "--steering-packs"),
    (["--steering-plugin"], "--steering-packs"),  # nothing to serve
    (["--steering-plugin", "--steering-packs", "x", "--steering-max-backtracks", "-1"], "--steering-max-backtracks"),
])
def test_bad_serve_flags_name_the_flag(argv, flag):
    with pytest.raises(ConfigError) as info:
        steering_config_from_flags(_parse(*argv), None)
    assert info.value.field == flag and flag in str(info.value)


def test_a_packs_folder_without_packs_stops_start_up(tmp_path):
    config = steering_config_from({"steering": {"packs_dir": str(tmp_path)}})
    with pytest.raises(ConfigError, match="holds no") as info:
        PackRegistry.from_config(config, SHAPE)
    assert info.value.field == "steering.packs_dir"


def test_clients_see_no_server_paths_and_the_log_names_each_pack(tmp_path):
    pack = random_pack(SHAPE, "p", num_heads_selected=2, residual_layers=[1], with_probes=True)
    registry = PackRegistry(model=SHAPE)
    registry.add(pack)
    assert registry.summary_lines() == ["'p': methods ['iti', 'residual', 'fasb'], head layers "
                                        f"{sorted(set(pack.head_layers.tolist()))}, residual layers [1]"]
    metadata = {"dataset": "/home/me/data/tqa.jsonl", "nested": [{"model": "C:\\models\\llama"}],
                "home": "~/x.csv", "name": "fine/relative.jsonl", "k": 3}
    assert without_paths(metadata) == {"dataset": "tqa.jsonl", "nested": [{"model": "llama"}], "home": "x.csv",
                                       "name": "fine/relative.jsonl", "k": 3}


def test_configurations_steering_cannot_honour_are_named():
    from types import SimpleNamespace

    from vllm_steer.integration.frontend import unsupported_features

    def config(speculative=None, **parallel):
        base = dict(pipeline_parallel_size=1, enable_dbo=False, ubatch_size=0, decode_context_parallel_size=1,
                    prefill_context_parallel_size=1)
        return SimpleNamespace(speculative_config=speculative, parallel_config=SimpleNamespace(**{**base, **parallel}))

    assert unsupported_features(config()) == []
    assert unsupported_features(config(tensor_parallel_size=2)) == []
    assert unsupported_features(config(pipeline_parallel_size=2)) == []  # each stage steers its layers
    for cfg, words in [(config(speculative=object()), "speculative decoding"),
                       (config(enable_dbo=True), "dual-batch overlap"),
                       (config(ubatch_size=2), "micro-batching"),
                       (config(decode_context_parallel_size=2), "context parallelism")]:
        (reason,) = unsupported_features(cfg)
        assert words in reason


@pytest.mark.parametrize("overrides, words", [
    ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}},
     "speculative decoding"),
])
def test_a_steering_engine_with_such_a_configuration_does_not_start(tiny_model, tmp_path, overrides, words):
    from conftest import make_llm
    from vllm_steer.pack.hf_shape import shape_of_checkpoint

    path = tiny_model("llama")
    pack = save_pack(tmp_path / "p.safetensors", random_pack(shape_of_checkpoint(path), "p", num_heads_selected=2))
    with pytest.raises(ConfigError, match=words):
        make_llm(path, packs=[pack], **overrides)
