"""Per-request spec parsing and its check against an engine's packs."""

import json

import pytest

from vllm_steer.errors import SpecError
from vllm_steer.pack import ModelShape
from vllm_steer.pack.synthetic import random_pack
from vllm_steer.pack_registry import PackRegistry
from vllm_steer.spec import SteeringSpec, parse_spec

SHAPE = ModelShape(
    architecture="LlamaForCausalLM", num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=128
)


@pytest.fixture(scope="module")
def registry():
    reg = PackRegistry(model=SHAPE)
    reg.add(random_pack(SHAPE, "heads", num_heads_selected=4, seed=1))
    reg.add(random_pack(SHAPE, "both", num_heads_selected=3, residual_layers=[1, 3], seed=2))
    return reg


def test_absent_spec_is_none():
    assert parse_spec(None) is None
    assert parse_spec({}) is None
    assert parse_spec({"other": 1}) is None


def test_nested_and_flat_forms_agree():
    nested = parse_spec({"steering": {"pack": "p", "method": "iti", "alpha": 2.5, "heads": [[1, 2], [0, 3]]}})
    flat = parse_spec({"steering_pack": "p", "steering_method": "iti", "steering_alpha": 2.5,
                       "steering_heads": [1, 2, 0, 3]})
    assert nested == flat
    assert nested.heads == ((0, 3), (1, 2))


@pytest.mark.parametrize(
    "extra_args, field",
    [
        ({"steering": {"pack": "p", "alpha": "high"}}, "steering.alpha"),
        ({"steering": {"pack": "p", "alpha": float("nan")}}, "steering.alpha"),
        ({"steering": {"pack": "p", "alpha": 1e9}}, "steering.alpha"),
        ({"steering": {"pack": "p", "method": "magic"}}, "steering.method"),
        ({"steering": {"method": "iti"}}, "steering.pack"),  # cross-field rules name their field
        ({"steering_method": "iti"}, "steering_pack"),
        ({"steering": {"pack": "p", "alpah": 1.0}}, "steering.alpah"),
        ({"steering": {"pack": "p", "layers": [1, 1]}}, "steering.layers"),
        ({"steering": {"pack": "p", "layers": []}}, "steering.layers"),
        ({"steering": {"pack": "p", "heads": [[1]]}}, "steering.heads"),
        ({"steering": {"pack": "p", "method": "residual", "heads": [[1, 1]]}}, "steering.heads"),
        ({"steering": {"pack": "p", "steer_from": 3, "prompt_positions": "all"}}, "steering.steer_from"),
        ({"steering": {"pack": "p", "method": "iti", "backtrack": 3}}, "steering.backtrack"),
        ({"steering": {"pack": "p", "method": "l2s", "layers": [1]}}, "steering.layers"),
        # strict JSON types: no string or boolean numbers, no coerced integers
        ({"steering": {"pack": "p", "alpha": "8"}}, "steering.alpha"),
        ({"steering": {"pack": "p", "alpha": True}}, "steering.alpha"),
        ({"steering": {"pack": "p", "layers": ["2"]}}, "steering.layers"),
        ({"steering": {"pack": "p", "layers": [True]}}, "steering.layers"),
        ({"steering": {"pack": "p", "heads": [[1.0, 2]]}}, "steering.heads"),
        ({"steering": {"pack": "p", "method": "fasb", "backtrack": "4"}}, "steering.backtrack"),
        ({"steering_pack": "p", "steering_method": "fasb", "steering_threshold": "0.5"}, "steering_threshold"),
        ({"steering": {"pack": "p", "prompt_positions": "first"}}, "steering.prompt_positions"),
        ({"steering": "iti"}, "steering"),
        ({"steering_pack": "p", "steering_heads": [1, 2, 3]}, "steering_heads"),
        ({"steering_pack": "p", "steering_alpha": "x"}, "steering_alpha"),
        ({"steering_pack": "p", "steering_bogus": 1}, "steering_bogus"),
        ({"steering": {"pack": "p"}, "steering_alpha": 1.0}, "steering"),
    ],
)
def test_malformed_specs_name_the_field(extra_args, field):
    with pytest.raises(SpecError) as e:
        parse_spec(extra_args)
    assert e.value.field == field
    assert field in str(e.value)


def test_integers_are_numbers_and_lists_are_fine():
    spec = parse_spec({"steering": {"pack": "p", "alpha": 8, "layers": [2, 1]}})
    assert spec.alpha == 8.0 and isinstance(spec.alpha, float) and spec.layers == (1, 2)


def test_error_messages_cap_echoed_values():
    huge = "x" * 1_000_000
    for extra_args in ({"steering": {"pack": "p", "alpha": huge}}, {"steering": {"pack": "p", huge: 1}},
                       {"steering_pack": "p", "steering_alpha": huge}):
        with pytest.raises(SpecError) as e:
            parse_spec(extra_args)
        assert len(str(e.value)) < 600 and len(e.value.field) < 100


def test_flat_specs_checked_against_packs_name_the_flat_key(registry):
    from vllm_steer.spec import respell_flat

    with pytest.raises(SpecError) as e:
        registry.resolve(parse_spec({"steering_pack": "missing"}))
    flat = respell_flat(e.value)
    assert flat.field == "steering_pack" and "steering_pack" in str(flat) and "steering.pack" not in str(flat)
    with pytest.raises(SpecError) as e:
        registry.resolve(SteeringSpec(pack="x" * 128))
    assert len(str(e.value)) < 600


@pytest.mark.parametrize(
    "spec, field",
    [
        (SteeringSpec(pack="missing"), "steering.pack"),
        (SteeringSpec(pack="heads", method="residual"), "steering.method"),
        (SteeringSpec(pack="both", method="residual", layers=(0,)), "steering.layers"),
        (SteeringSpec(pack="heads", heads=((3, 3), (3, 2), (0, 0), (1, 1), (2, 2))), "steering.heads"),
    ],
)
def test_spec_checked_against_packs(registry, spec, field):
    with pytest.raises(SpecError) as e:
        registry.resolve(spec)
    assert e.value.field == field


def test_good_specs_resolve(registry):
    pack = registry.packs["both"]
    assert registry.resolve(SteeringSpec(pack="both", method="residual", layers=(3,))) is pack
    assert registry.resolve(SteeringSpec(pack="both", heads=tuple(pack.selected_heads[:1]))) is pack
    assert registry.resolve(SteeringSpec(method="off")) is None


def test_steer_start_per_prompt_mode():
    assert SteeringSpec(pack="p").steer_start(10) == 9
    assert SteeringSpec(pack="p", prompt_positions="all").steer_start(10) == 0
    assert SteeringSpec(pack="p", prompt_positions="none").steer_start(10) == 10


def test_cache_key_separates_configs():
    a = SteeringSpec(pack="p", alpha=1.0)
    assert a.cache_key() == SteeringSpec(pack="p", alpha=1.0).cache_key()
    assert a.cache_key() != SteeringSpec(pack="p", alpha=1.5).cache_key()


def test_a_list_is_a_composition_and_a_list_of_one_is_that_spec():
    from vllm_steer.spec import ComposedSpec

    one = parse_spec({"steering": [{"pack": "p", "alpha": 2.0}]})
    assert one == SteeringSpec(pack="p", alpha=2.0)
    both = parse_spec({"steering": [{"pack": "p", "alpha": 2.0}, {"pack": "q", "method": "residual"}]})
    assert isinstance(both, ComposedSpec) and [m.pack for m in both.members] == ["p", "q"]
    assert both.steer_start(7) == 6 and both.fasb is None and not both.monitored
    with_fasb = parse_spec({"steering": [{"pack": "p", "method": "fasb"}, {"pack": "q", "prompt_positions": "all"}]})
    assert with_fasb.fasb.method == "fasb" and with_fasb.monitored and with_fasb.steer_start(7) == 0
    # the flat form's one key carries the same list as JSON text
    flat = parse_spec({"steering_json": json.dumps([{"pack": "p", "alpha": 2.0}, {"pack": "q", "method": "residual"}])})
    assert flat == both and flat.cache_key() == both.cache_key()
    assert parse_spec({"steering_json": json.dumps({"pack": "p", "alpha": 2.0})}) == one


@pytest.mark.parametrize("extra,field", [
    ({"steering": []}, "steering"),
    ({"steering": [{"pack": "p"}] * 17}, "steering"),
    ({"steering": [{"pack": "p"}, "p"]}, "steering[1]"),
    ({"steering": [{"pack": "p"}, {"pack": "q", "alpha": "x"}]}, "steering[1].alpha"),
    ({"steering": [{"pack": "p", "method": "l2s"}, {"pack": "q", "method": "l2s"}]}, "steering[1].method"),
    ({"steering": [{"pack": "p", "steer_from": 3}, {"pack": "q", "steer_from": 4}]}, "steering[1].steer_from"),
    ({"steering": [{"pack": "p", "method": "fasb", "max_backtracks": 2}, {"pack": "q"}]}, "steering[0].max_backtracks"),
    ({"steering": [{"pack": "p", "method": "fasb"}, {"pack": "q", "steer_from": 0}]}, "steering[1].steer_from"),
    ({"steering_json": 3}, "steering_json"),
    ({"steering_json": "[]"}, "steering_json"),
    ({"steering_json": json.dumps([{"pack": "p"}, {"pack": "q", "alpha": "x"}])}, "steering_json[1].alpha"),
    ({"steering_json": "[]", "steering_pack": "p"}, "steering_json"),
])
def test_composition_errors_name_the_member_and_field(extra, field):
    with pytest.raises(SpecError) as e:
        parse_spec(extra)
    assert e.value.field == field and field in str(e.value)


def test_member_errors_from_pack_checks_name_the_member():
    from vllm_steer.spec import for_each_member, respell

    spec = parse_spec({"steering": [{"pack": "p"}, {"pack": "q"}]})

    def check(member):
        if member.pack == "q":
            raise SpecError("steering.pack 'q' is not loaded", field="steering.pack")

    with pytest.raises(SpecError) as e:
        for_each_member(spec, check)
    assert e.value.field == "steering[1].pack" and str(e.value) == "steering[1].pack 'q' is not loaded"
    flat = respell(e.value, {"steering_json": "[]"})
    assert flat.field == "steering_json[1].pack" and str(flat).startswith("steering_json[1].pack")
