"""Steer-pack format: round trip, and every malformed-file case gets an error naming the problem."""

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from vllm_steer.errors import PackError
from vllm_steer.pack import ModelShape, load_pack, save_pack
from vllm_steer.pack.manifest import MANIFEST_METADATA_KEY
from vllm_steer.pack.synthetic import random_pack

SHAPE = ModelShape(
    architecture="LlamaForCausalLM", num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32, hidden_size=128
)


@pytest.fixture
def pack():
    return random_pack(SHAPE, "p", num_heads_selected=5, residual_layers=[0, 2], with_probes=True, seed=3)


def _write_raw(path, pack, **overrides):
    tensors = dict(pack.tensors())
    manifest = pack.manifest.model_dump(mode="json")
    for key, value in overrides.items():
        if key.startswith("manifest."):
            manifest[key.split(".", 1)[1]] = value
        elif value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    save_file(tensors, str(path), metadata={MANIFEST_METADATA_KEY: json.dumps(manifest)})
    return path


def test_round_trip(tmp_path, pack):
    path = save_pack(tmp_path / "p.safetensors", pack)
    loaded = load_pack(path, model=SHAPE)
    assert loaded.manifest == pack.manifest
    for name, tensor in pack.tensors().items():
        assert torch.equal(loaded.tensors()[name], tensor), name
    assert loaded.source == path


def test_refuses_pickle_and_other_suffixes(tmp_path, pack):
    bad = tmp_path / "p.pt"
    with open(bad, "wb") as f:
        pickle.dump({"x": 1}, f)
    with pytest.raises(PackError, match="safetensors") as e:
        load_pack(bad)
    assert e.value.field == "path"


def test_corrupt_file(tmp_path):
    bad = tmp_path / "p.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(PackError, match="not a readable safetensors file"):
        load_pack(bad)


def test_missing_file(tmp_path):
    with pytest.raises(PackError, match="not found"):
        load_pack(tmp_path / "nope.safetensors")


def test_no_manifest(tmp_path, pack):
    path = tmp_path / "p.safetensors"
    save_file(dict(pack.tensors()), str(path))
    with pytest.raises(PackError, match="vllm_steer.manifest") as e:
        load_pack(path)
    assert e.value.field == "manifest"


@pytest.mark.parametrize(
    "override, message",
    [
        ({"manifest.num_heads_selected": 6}, "heads.layer.*shape"),
        ({"manifest.format_version": 99}, "format_version"),
        ({"manifest.methods": ["iti", "bogus"]}, "manifest.methods"),
        ({"manifest.name": "../escape"}, "manifest.name"),
        ({"heads.direction": torch.full((5, 32), float("nan"))}, "heads.direction.*non-finite"),
        ({"heads.direction": torch.ones(5, 32)}, "unit vectors"),
        ({"heads.direction": torch.ones(5, 31) / 31**0.5}, r"heads.direction.*shape"),
        ({"heads.layer": torch.tensor([0, 1, 2, 3, 4])}, r"heads.layer values must lie in \[0, 4\)"),
        ({"heads.head": torch.tensor([0, 1, 2, 3, -1])}, r"heads.head values must lie"),
        ({"heads.layer": torch.tensor([0, 0, 0, 0, 0]), "heads.head": torch.tensor([1, 1, 2, 3, 0])}, "twice"),
        ({"heads.sigma": -torch.ones(5)}, "heads.sigma must be >= 0"),
        ({"heads.sigma": None}, "missing tensor 'heads.sigma'"),
        ({"heads.layer": torch.zeros(5)}, "heads.layer.*integer"),
        ({"residual.vector": torch.full((2, 128), float("inf"))}, "residual.vector.*non-finite"),
        ({"residual.layer": torch.tensor([0, 3])}, "residual.layer does not match"),
        ({"probes.bias": None}, "missing tensor 'probes.bias'"),
        ({"extra.tensor": torch.zeros(1)}, "unknown tensors"),
    ],
)
def test_malformed_packs_refused(tmp_path, pack, override, message):
    path = _write_raw(tmp_path / "p.safetensors", pack, **override)
    with pytest.raises(PackError, match=message):
        load_pack(path)


@pytest.mark.parametrize(
    "field, value",
    [("architecture", "Qwen2ForCausalLM"), ("num_layers", 5), ("num_heads", 8), ("num_kv_heads", 4),
     ("head_dim", 16), ("hidden_size", 256)],
)
def test_pack_for_another_model_refused(tmp_path, pack, field, value):
    path = save_pack(tmp_path / "p.safetensors", pack)
    other = SHAPE.model_copy(update={field: value})
    with pytest.raises(PackError, match=f"does not fit the loaded model: .*{field}: pack has") as e:
        load_pack(path, model=other)
    assert e.value.field == "model"


def test_manifest_records_the_family_and_a_pack_is_refused_on_another_family_of_the_same_shape(tmp_path, pack):
    path = save_pack(tmp_path / "p.safetensors", pack)
    assert load_pack(path).manifest.model.family == "llama"
    mistral = ModelShape(**{**SHAPE.model_dump(exclude={"family"}), "architecture": "MistralForCausalLM"})
    assert mistral.family == "mistral"
    with pytest.raises(PackError, match="does not fit the loaded model: .*family: pack has 'llama', model has "
                                        "'mistral'") as e:
        load_pack(path, model=mistral)
    assert e.value.field == "model"
    # a pack written before the field: the family is read off its architecture
    model = {k: v for k, v in pack.manifest.model.model_dump(mode="json").items() if k != "family"}
    old = _write_raw(tmp_path / "old.safetensors", pack, **{"manifest.model": model})
    assert load_pack(old, model=SHAPE).manifest.model.family == "llama"
    # ... as does one written before its architecture's family was supported (family null then)
    unknown_then = _write_raw(tmp_path / "then.safetensors", pack, **{"manifest.model": {**model, "family": None}})
    assert load_pack(unknown_then, model=SHAPE).manifest.model.family == "llama"
    # a family contradicting the architecture is a malformed manifest
    forged = _write_raw(tmp_path / "forged.safetensors", pack, **{"manifest.model": {**model, "family": "qwen2"}})
    with pytest.raises(PackError, match=r"invalid manifest: .*family 'qwen2' does not match architecture "
                                        r"'LlamaForCausalLM'"):
        load_pack(forged)


def test_fp16_tensors_load_as_float32(tmp_path, pack):
    path = _write_raw(
        tmp_path / "p.safetensors", pack, **{"heads.direction": pack.head_directions.half()}
    )
    loaded = load_pack(path)
    assert loaded.head_directions.dtype == torch.float32
