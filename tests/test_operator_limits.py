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
