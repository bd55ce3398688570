"""Vectors from other tools: llama.cpp / repeng GGUF control vectors, IBM activation-steering
``.svec`` JSON (that library is not on the package registries), per-layer safetensors / numpy files,
sae-lens SAE folders; pickles refused; export back to GGUF and ``.svec``.

``tests/fixtures/interop`` holds files written by the tools' own libraries (``make_fixtures.py``:
repeng 0.4.0's ``ControlVector.export_gguf``, sae-lens 6.54.12's ``SAE.save_model``); the edge cases
are written here with the ``gguf`` package the way repeng and llama.cpp's generator call it.

Layer mapping, from the formats' sources (``vllm_steer/interop``): GGUF ``direction.k`` and tensor
files' layer k are added to the output of decoder layer k; ``.svec`` direction L to the input of
layer L (the output of layer L - 1); SAE ``blocks.l.hook_resid_post`` is the output of layer l and
``hook_resid_pre`` its input. The engine test checks each imported pack steers exactly as the HF
reference adding the file's vector at the mapped layer's output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import close_llm, greedy, make_llm, random_prompts, token_ids
from vllm_steer.errors import PackError
from vllm_steer.interop.formats import read_vectors, write_vectors
from vllm_steer.interop.layer_vectors import residual_pack
from vllm_steer.pack import ModelShape, load_pack, save_pack
from vllm_steer.pack.hf_shape import shape_of_checkpoint
from vllm_steer.pack.synthetic import random_pack

FIXTURES = Path(__file__).parent / "fixtures" / "interop"
sys.path.insert(0, str(FIXTURES))
from make_fixtures import fixture_vector  # noqa: E402  (the seeded vectors the fixtures hold)

SHAPE = ModelShape(architecture="LlamaForCausalLM", num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                   hidden_size=128)


def _vec(seed: int, n: int = 128, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def write_gguf(path, directions: dict[int, np.ndarray], *, layer_count_type="uint32", model_hint="llama",
               architecture="controlvector", dtype=np.float32):
    """A control vector as repeng's ``export_gguf`` (uint32 layer_count) or llama.cpp's generator
    (int32) writes it, through the ``gguf`` package."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_string(f"{architecture}.model_hint", model_hint)
    getattr(writer, f"add_{layer_count_type}")(f"{architecture}.layer_count", len(directions))
    for layer, vector in directions.items():
        writer.add_tensor(f"direction.{layer}", vector.astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_svec(path, directions: dict[int, np.ndarray]):
    """IBM activation-steering's ``SteeringVector.save``: JSON, layer keys as strings."""
    path.write_text(json.dumps({"model_type": "llama",
                                "directions": {str(k): v.tolist() for k, v in directions.items()},
                                "explained_variances": {str(k): 0.5 for k in directions}}))
    return path


def write_sae(folder, hook_name: str, w_dec: torch.Tensor, *, nested: bool = True):
    """An sae-lens SAE folder: v6 cfg (hook_name under metadata) or the pre-6 flat cfg."""
    folder.mkdir(parents=True)
    d_sae, d_in = w_dec.shape
    save_file({"W_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(d_sae), "W_dec": w_dec.contiguous(),
               "b_dec": torch.zeros(d_in)}, str(folder / "sae_weights.safetensors"))
    meta = {"model_name": "tiny-llama", "hook_name": hook_name, "sae_lens_version": "6.54.12"}
    cfg = {"d_in": d_in, "d_sae": d_sae, "architecture": "standard", "dtype": "float32",
           **({"metadata": meta} if nested else {**meta, "hook_layer": 0, "sae_lens_version": "5.9.0"})}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


# -- reading ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer_count_type", ["uint32", "int32"])  # repeng / llama.cpp's generator
def test_gguf_direction_k_is_the_output_of_layer_k(tmp_path, layer_count_type):
    directions = {1: _vec(1), 3: _vec(3)}
    vectors = read_vectors(write_gguf(tmp_path / "cv.gguf", directions, layer_count_type=layer_count_type))
    assert sorted(vectors.vectors) == [1, 3]
    for k, v in directions.items():
        assert torch.equal(vectors.vectors[k], torch.from_numpy(v))
    assert vectors.metadata == {"model_hint": "llama", "layer_count": 2}
    pack = residual_pack(vectors, SHAPE, "calm", "cv.gguf")
    assert pack.residual_layers.tolist() == [1, 3] and pack.manifest.methods == ["residual"]
    assert pack.manifest.metadata["imported_from"]["format"] == "gguf-control-vector"


def test_repeng_and_sae_lens_files_as_their_libraries_wrote_them():
    repeng = read_vectors(FIXTURES / "repeng_control_vector.gguf")
    assert sorted(repeng.vectors) == [1, 2] and repeng.metadata == {"model_hint": "llama", "layer_count": 2}
    assert np.array_equal(repeng.vectors[2].numpy(), fixture_vector(102, 0.3))
    pre = read_vectors(FIXTURES / "sae_lens_hook_resid_pre", feature=3)  # blocks.1.hook_resid_pre
    assert list(pre.vectors) == [0] and np.array_equal(pre.vectors[0].numpy(), fixture_vector(203, 2.0))
    post = read_vectors(FIXTURES / "sae_lens_hook_resid_post", feature=1)  # blocks.2.hook_resid_post
    assert list(post.vectors) == [2] and np.array_equal(post.vectors[2].numpy(), fixture_vector(201, 2.0))
    assert post.metadata["model_name"] == "tiny-llama" and post.metadata["d_sae"] == 4


def test_gguf_files_that_are_not_control_vectors_are_refused(tmp_path):
    with pytest.raises(PackError, match="general.architecture is 'llama'"):
        read_vectors(write_gguf(tmp_path / "model.gguf", {1: _vec(1)}, architecture="llama"))
    with pytest.raises(PackError, match="must be 1-D float32"):
        read_vectors(write_gguf(tmp_path / "f16.gguf", {1: _vec(1)}, dtype=np.float16))
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(PackError, match="not a readable GGUF"):
        read_vectors(tmp_path / "cut.gguf")


def test_svec_direction_L_is_added_to_the_input_of_layer_L(tmp_path):
    directions = {1: _vec(1), 3: _vec(3)}
    vectors = read_vectors(write_svec(tmp_path / "v.svec", directions))
    assert sorted(vectors.vectors) == [0, 2]  # input of layer L = output of layer L - 1
    assert torch.allclose(vectors.vectors[0], torch.from_numpy(directions[1]))
    with pytest.raises(PackError, match="embeddings"):
        read_vectors(write_svec(tmp_path / "zero.svec", {0: _vec(0)}))


def test_per_layer_tensor_files(tmp_path):
    matrix = np.stack([np.zeros(128, np.float32), _vec(1), np.zeros(128, np.float32), _vec(3)])
    save_file({"vectors": torch.from_numpy(matrix)}, str(tmp_path / "m.safetensors"))
    assert sorted(read_vectors(tmp_path / "m.safetensors").vectors) == [1, 3]  # zero rows: not steered
    save_file({"model.layers.2": torch.from_numpy(_vec(2)), "layers.3": torch.from_numpy(_vec(3))},
              str(tmp_path / "keyed.safetensors"))
    assert sorted(read_vectors(tmp_path / "keyed.safetensors").vectors) == [2, 3]
    np.save(tmp_path / "one.npy", _vec(5))
    assert sorted(read_vectors(tmp_path / "one.npy", layer=2).vectors) == [2]
    with pytest.raises(PackError, match="--layer"):
        read_vectors(tmp_path / "one.npy")
    np.savez(tmp_path / "several.npz", **{"layer_1": _vec(1), "2": _vec(2)})
    assert sorted(read_vectors(tmp_path / "several.npz").vectors) == [1, 2]
    np.savez(tmp_path / "badkey.npz", steer=_vec(1), other=_vec(2))
    with pytest.raises(PackError, match="not keyed by a layer"):
        read_vectors(tmp_path / "badkey.npz")


def test_sae_decoder_rows_by_hook(tmp_path):
    w_dec = torch.randn(16, 128)
    for name, hook, nested, layer in (("post", "blocks.2.hook_resid_post", True, 2),
                                      ("pre", "blocks.2.hook_resid_pre", True, 1),
                                      ("flat", "blocks.3.hook_resid_post", False, 3)):
        vectors = read_vectors(write_sae(tmp_path / name, hook, w_dec, nested=nested), feature=5)
        assert list(vectors.vectors) == [layer] and torch.equal(vectors.vectors[layer], w_dec[5])
    with pytest.raises(PackError, match="--feature"):
        read_vectors(tmp_path / "post")
    with pytest.raises(PackError, match="outside the SAE's 16 features"):
        read_vectors(tmp_path / "post", feature=16)
    with pytest.raises(PackError, match="embeddings"):
        read_vectors(write_sae(tmp_path / "emb", "blocks.0.hook_resid_pre", w_dec), feature=0)
    with pytest.raises(PackError, match="not a residual-stream hook"):
        read_vectors(write_sae(tmp_path / "mid", "blocks.1.hook_resid_mid", w_dec), feature=0)


def test_pickles_are_refused_with_how_to_convert(tmp_path):
    marker = tmp_path / "unpickled"

    class Trap:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    for name in ("v.pt", "v.pkl", "v.bin"):
        (tmp_path / name).write_bytes(pickle.dumps(Trap()))
        with pytest.raises(PackError, match=r"pickles.*never loads.*safetensors"):
            read_vectors(tmp_path / name)
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(PackError, match="without pickled objects"):
        read_vectors(tmp_path / "objects.npy")
    assert not marker.exists()


def test_vectors_that_do_not_fit_the_model_are_named(tmp_path):
    with pytest.raises(PackError, match="layer 7 .* model has layers 0..3"):
        residual_pack(read_vectors(write_gguf(tmp_path / "deep.gguf", {7: _vec(7)})), SHAPE, "x", "deep.gguf")
    with pytest.raises(PackError, match=r"layer 2 has shape \(64,\), the model's hidden size is 128"):
        residual_pack(read_vectors(write_gguf(tmp_path / "narrow.gguf", {2: _vec(2, 64)})), SHAPE, "x", "narrow.gguf")


# -- writing ---------------------------------------------------------------------------------------
def test_export_gguf_reads_back_with_the_gguf_library_and_reimports_equal(tmp_path):
    import gguf

    pack = random_pack(SHAPE, "calm", num_heads_selected=2, residual_layers=[1, 3], seed=4)
    out = write_vectors(pack, tmp_path / "calm.gguf", "gguf")
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert reader.fields["controlvector.model_hint"].contents() == "llama"
    assert reader.fields["controlvector.layer_count"].contents() == 2
    assert [(t.name, t.tensor_type.name, list(t.shape)) for t in reader.tensors] == [
        ("direction.1", "F32", [128]), ("direction.3", "F32", [128])]
    assert np.array_equal(reader.tensors[1].data, pack.residual_vectors[1].numpy())
    again = residual_pack(read_vectors(out), SHAPE, "calm", "calm.gguf")
    assert torch.equal(again.residual_vectors, pack.residual_vectors)
    svec = write_vectors(pack, tmp_path / "calm.svec", "svec")
    assert sorted(json.loads(svec.read_text())["directions"]) == ["2", "4"]
    assert torch.equal(residual_pack(read_vectors(svec), SHAPE, "c", "c.svec").residual_vectors, pack.residual_vectors)
    with pytest.raises(PackError, match="block 0"):
        write_vectors(random_pack(SHAPE, "zero", residual_layers=[0]), tmp_path / "zero.gguf", "gguf")
    with pytest.raises(PackError, match="no residual vectors"):
        write_vectors(random_pack(SHAPE, "heads", num_heads_selected=2), tmp_path / "h.gguf", "gguf")


# -- in the engine ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imported(tiny_model, tmp_path_factory):
    """One engine with a pack imported from each format; the HF model and each pack's vectors by
    the layer of the HF decoder layer whose output gets them."""
    from transformers import AutoModelForCausalLM

    path = tiny_model("llama")
    shape = shape_of_checkpoint(path)
    folder = tmp_path_factory.mktemp("interop")
    np.save(folder / "one.npy", _vec(14, scale=0.5))
    # name -> (source, import options, {HF decoder layer whose output gets it: the vector})
    sources = {
        "from_gguf": (FIXTURES / "repeng_control_vector.gguf", {},
                      {1: fixture_vector(101, 0.3), 2: fixture_vector(102, 0.3)}),
        "from_svec": (write_svec(folder / "v.svec", {3: _vec(13, scale=0.5)}), {}, {2: _vec(13, scale=0.5)}),
        "from_sae": (FIXTURES / "sae_lens_hook_resid_pre", {"feature": 2}, {0: fixture_vector(202, 2.0)}),
        "from_npy": (folder / "one.npy", {"layer": 3}, {3: _vec(14, scale=0.5)}),
    }
    packs, expected = [], {}
    for name, (source, options, layers) in sources.items():
        pack = residual_pack(read_vectors(source, **options), shape, name, source.name)
        packs.append(save_pack(folder / f"{name}.safetensors", pack))
        expected[name] = {layer: torch.from_numpy(v) for layer, v in layers.items()}
    llm = make_llm(path, packs=packs, enforce_eager=True)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    yield llm, hf, expected
    close_llm(llm)


@pytest.mark.parametrize("name", ["from_gguf", "from_svec", "from_sae", "from_npy"])
def test_imported_vectors_steer_at_the_mapped_layer_like_hf(imported, name):
    from reference.hf_steering import greedy_generate

    llm, hf, expected = imported
    prompts = random_prompts(3, 512, seed=40)
    spec = {"pack": name, "method": "residual", "alpha": 4.0}
    got = token_ids(llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(10, spec), use_tqdm=False))
    assert got == [greedy_generate(hf, p, 10, residual=expected[name], alpha=4.0) for p in prompts]
    assert got != [greedy_generate(hf, p, 10) for p in prompts]  # the vectors change the tokens


# -- the command line ------------------------------------------------------------------------------
def test_cli_import_inspect_export(tiny_model, tmp_path):
    import subprocess

    import gguf

    steer = str(Path(sys.executable).parent / "vllm-steer")
    model, other = str(tiny_model("llama")), str(tiny_model("qwen2"))

    def run(*argv):
        return subprocess.run([steer, *argv], capture_output=True, text=True, timeout=300)

    source = write_gguf(tmp_path / "calm.gguf", {1: _vec(1), 2: _vec(2)})
    done = run("pack", "import", str(source), "--model", model, "--out", str(tmp_path / "packs" / "calm.safetensors"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "residual vectors at layers [1, 2]" in done.stdout and '"pack": "calm"' in done.stdout
    pack = load_pack(tmp_path / "packs" / "calm.safetensors", model=shape_of_checkpoint(model))
    assert pack.residual_layers.tolist() == [1, 2]

    fits = run("pack", "inspect", str(tmp_path / "packs" / "calm.safetensors"), "--model", model)
    text = " ".join(fits.stdout.split())  # the labels are padded to one width
    assert fits.returncode == 0 and f"fits model: {model}: yes" in text, fits.stdout
    assert "imported: gguf-control-vector calm.gguf: direction.k -> output of decoder layer k" in text
    wrong = run("pack", "inspect", str(tmp_path / "packs" / "calm.safetensors"), "--model", other, "--json")
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert json.loads(wrong.stdout)["fits_model"]["mismatches"] and "architecture: pack has 'LlamaForCausalLM'" in wrong.stderr

    other_family = write_gguf(tmp_path / "mistral.gguf", {1: _vec(1)}, model_hint="mistral")
    noted = run("pack", "import", str(other_family), "--model", model, "--out", str(tmp_path / "m.safetensors"))
    assert noted.returncode == 0 and "mistral.gguf says it was made for a 'mistral' model" in noted.stderr
    assert "note:" not in done.stderr  # the repeng-style hint "llama" matches LlamaForCausalLM

    exported = run("pack", "export", str(tmp_path / "packs" / "calm.safetensors"), "--format", "gguf",
                   "--out", str(tmp_path / "back.gguf"))
    assert exported.returncode == 0, exported.stderr[-2000:]
    names = [t.name for t in gguf.GGUFReader(str(tmp_path / "back.gguf")).tensors]
    assert names == ["direction.1", "direction.2"]
