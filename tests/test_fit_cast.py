"""CAST's condition: the math on its own (no engine: similarity, direction, grid search, the labelled
rows and their split), then ``vllm-steer fit cast`` through one capture engine against an HF reference."""

import json
import random

import pytest
import torch

from vllm_steer.errors import SteeringError
from vllm_steer.fit.cast_pipeline import (
    candidate_layers, capture_prompt_states, load_condition_prompts, stratified_split,
)
from vllm_steer.fit.datasets import DatasetError
from vllm_steer.fit.cast import (
    ConditionPoint, best_condition_point, condition_direction, condition_similarity, f1_score,
)
from vllm_steer.pack import ModelShape


def test_similarity_is_the_cosine_of_h_and_tanh_of_its_projection():
    v = torch.tensor([3.0, 4.0, 0.0])
    h = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 1.0]])
    u = v / 5.0
    for row, got in zip(h, condition_similarity(h, v)):
        projected = torch.tanh(torch.outer(u, u) @ row)  # P h with P = u uᵀ, written out
        want = torch.dot(row, projected) / (row.norm() * projected.norm()) if projected.norm() > 0 else 0.0
        assert float(got) == pytest.approx(float(want), abs=1e-6)


def test_direction_is_the_unit_mean_difference():
    present = torch.tensor([[2.0, 0.0], [4.0, 0.0]])
    absent = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    got = condition_direction(present, absent)
    want = torch.tensor([3.0, -1.0]) / torch.tensor([3.0, -1.0]).norm()
    torch.testing.assert_close(got, want)
    with pytest.raises(SteeringError, match="same mean"):
        condition_direction(present, present)


def test_f1_matches_its_definition():
    labels = torch.tensor([1, 1, 0, 0, 1]).bool()
    predicted = torch.tensor([1, 0, 1, 0, 1]).bool()  # tp 2, fp 1, fn 1
    assert f1_score(labels, predicted) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert f1_score(labels, torch.zeros(5, dtype=torch.bool)) == 0.0


def test_grid_picks_the_separating_layer_threshold_and_comparison_first_best_wins():
    labels = [1, 1, 1, 0, 0, 0]
    sims = {
        1: torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),  # carries nothing
        2: torch.tensor([0.10, 0.12, 0.15, 0.40, 0.45, 0.50]),  # present: below any of 0.16 .. 0.40
        3: torch.tensor([0.10, 0.12, 0.15, 0.40, 0.45, 0.50]),  # the same: layer 2 came first
    }
    point = best_condition_point(sims, labels)
    assert point == ConditionPoint(layer=2, threshold=0.16, comparison="below", f1=1.0)  # the first of them
    assert point.holds(sims[2]).tolist() == [True, True, True, False, False, False]
    above = best_condition_point({4: torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3])}, labels)
    assert (above.comparison, above.threshold, above.f1) == ("above", 0.3, 1.0)


# -- the fit: labelled prompts, split, capture through vLLM, the pack (vllm-steer fit cast) -------------
def _write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_condition_rows_are_checked_whole_naming_the_line_and_the_field(tmp_path):
    good = [{"prompt": "a", "condition": True}, {"prompt": "b", "condition": 1},
            {"prompt": "c", "condition": False}, {"prompt": "d", "condition": 0}]
    rows = load_condition_prompts(_write_rows(tmp_path / "ok.jsonl", good))
    assert [(r.prompt, r.condition) for r in rows] == [("a", True), ("b", True), ("c", False), ("d", False)]
    cases = {
        "line 3: missing key 'condition'": (good[:2] + [{"prompt": "x"}] + good[2:], "condition"),
        "line 2: 'condition' must be true/false": ([good[0], {"prompt": "x", "condition": "yes"}, *good[1:]],
                                                    "condition"),
        "line 1: 'prompt' must be a non-empty string": ([{"prompt": " ", "condition": True}, *good], "prompt"),
        "line 5, column": ([*good, "{not json"], None),
        "found 2 true and 1 false": (good[:3], "condition"),
    }
    for i, (message, (rows, field)) in enumerate(cases.items()):
        with pytest.raises(DatasetError, match=message) as info:
            load_condition_prompts(_write_rows(tmp_path / f"bad{i}.jsonl", rows))
        assert field is None or info.value.field == field
    with pytest.raises(DatasetError, match="no such file"):
        load_condition_prompts(tmp_path / "missing.jsonl")


def test_split_is_stratified_seeded_and_keeps_both_labels_on_both_sides():
    labels = [True] * 10 + [False] * 4
    train, val = stratified_split(labels, 0.3, seed=5)
    assert sorted(train + val) == list(range(14)) and not set(train) & set(val)
    assert sum(labels[i] for i in val) == 3 and sum(not labels[i] for i in val) == 1  # round(0.3 * 10), (0.3 * 4)
    assert stratified_split(labels, 0.3, seed=5) == (train, val)
    assert stratified_split(labels, 0.3, seed=6) != (train, val)
    tiny_train, tiny_val = stratified_split([True, True, False, False], 0.01, seed=0)  # at least one of each
    assert len(tiny_val) == 2 and len(tiny_train) == 2
    with pytest.raises(SteeringError, match="at least 2"):
        stratified_split([True, False, False], 0.3, seed=0)


def test_candidate_layers_are_the_inputs_of_layers_1_to_the_last():
    shape = ModelShape(architecture="LlamaForCausalLM", num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                       hidden_size=128)
    assert candidate_layers(shape, None) == (1, 2, 3)
    assert candidate_layers(shape, [3, 1]) == (3, 1)
    for bad in ([0], [4], [1, 1]):
        with pytest.raises(SteeringError) as info:
            candidate_layers(shape, bad)
        assert info.value.field == "layers"


_SUBJECTS = ["the river", "a small bird", "the old market", "my neighbour", "the train", "a quiet cat"]
_VERBS = ["watches", "finds", "carries", "remembers", "follows"]
_OBJECTS = ["the light", "a red door", "the morning bread", "an old map", "the stars"]


def _condition_rows(n=40, seed=0):
    """Sentences that end in the rain (condition true) or not: the marker words carry the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        present = i % 2 == 0
        text = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        rows.append({"prompt": text + (" in the rain, in the rain." if present else " before noon, with great care."),
                     "condition": present})
    return rows


@pytest.fixture(scope="module")
def cast_setup(tiny_model, tmp_path_factory):
    """One capture engine on the tiny Llama for the module, the HF model, and a labelled set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import close_llm
    from vllm_steer.fit.capture import capture_engine
    from vllm_steer.pack.hf_shape import shape_of_checkpoint

    model = tiny_model("llama")
    data = _write_rows(tmp_path_factory.mktemp("cast") / "rain.jsonl", _condition_rows())
    llm = capture_engine(str(model), max_model_len=256, max_num_seqs=16)
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    yield {"model": model, "data": data, "llm": llm, "hf": hf, "tokenizer": tokenizer,
           "shape": shape_of_checkpoint(model)}
    close_llm(llm)


@torch.no_grad()
def _hf_layer_input_means(hf, tokenizer, prompts):
    """Independent reference: {L: [N, hidden]}, the mean over all the prompt's tokens of HF's
    hidden_states[L] (the input of decoder layer L) for L = 1 … num_layers - 1."""
    num_layers = hf.config.num_hidden_layers
    means = {layer: [] for layer in range(1, num_layers)}
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        hidden = hf(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        for layer in means:
            means[layer].append(hidden[layer][0].mean(0))
    return {layer: torch.stack(rows) for layer, rows in means.items()}


def test_captured_prompt_states_are_hf_means_of_each_layer_input(cast_setup):
    s = cast_setup
    prompts = [r["prompt"] for r in _condition_rows()]
    token_ids = [s["tokenizer"](p).input_ids for p in prompts]
    layers = tuple(range(1, s["shape"].num_layers))
    got = capture_prompt_states(s["llm"], token_ids, s["shape"], layers, batch_size=16, progress=False)
    want = _hf_layer_input_means(s["hf"], s["tokenizer"], prompts)
    assert sorted(got) == list(layers) == [1, 2, 3]
    for layer in layers:
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got[layer], want[layer].roll(1, 0), rtol=1e-2, atol=1e-2)  # rows differ
    assert not torch.allclose(got[1], want[2], rtol=1e-2, atol=1e-2)  # layer L is not the input of L + 1


def test_cli_fit_cast_writes_the_pack_the_hf_reference_picks(cast_setup, tmp_path, monkeypatch, capsys):
    """``vllm-steer fit cast`` (in process, on the module's engine): the pack's condition point is the
    grid's best on the HF reference states of the same split, and its direction is the train mean
    difference at that layer."""
    from vllm_steer import cli
    from vllm_steer.fit import cast_pipeline
    from vllm_steer.pack import load_pack

    s = cast_setup
    monkeypatch.setattr(cast_pipeline, "capture_engine", lambda model, **kwargs: s["llm"])
    out = tmp_path / "packs" / "rain.safetensors"
    code = cli.main(["fit", "cast", "--model", str(s["model"]), "--data", str(s["data"]), "--out", str(out),
                     "--seed", "3", "--max-model-len", "256"])
    assert code == 0, capsys.readouterr().err[-3000:]
    record = json.loads(capsys.readouterr().out)
    pack = load_pack(out)
    manifest = pack.manifest
    assert pack.name == "rain" and manifest.methods == [] and manifest.num_heads_selected == 0

    rows = _condition_rows()
    labels = [r["condition"] for r in rows]
    train, val = stratified_split(labels, 0.3, seed=3)
    states = _hf_layer_input_means(s["hf"], s["tokenizer"], [r["prompt"] for r in rows])
    truth = torch.tensor(labels)
    directions = {}
    for layer, layer_states in states.items():
        present = layer_states[[i for i in train if labels[i]]]
        absent = layer_states[[i for i in train if not labels[i]]]
        mean_difference = present.double().mean(0) - absent.double().mean(0)
        directions[layer] = (mean_difference / mean_difference.norm()).float()
    similarities = {layer: condition_similarity(states[layer][val], directions[layer]) for layer in states}
    want = best_condition_point(similarities, truth[val])

    condition = manifest.condition
    assert (condition.layer, condition.threshold, condition.comparison) == (want.layer, want.threshold,
                                                                            want.comparison)
    assert record["layer"] == want.layer and record["val_f1"] == pytest.approx(want.f1, abs=1e-6)
    assert want.f1 > 0.6  # the marker words make the labels readable from some layer
    torch.testing.assert_close(pack.condition_direction, directions[want.layer], rtol=1e-3, atol=1e-4)
    meta = manifest.metadata
    assert meta["condition"]["val_f1"] == pytest.approx(want.f1, abs=1e-6)
    assert meta["condition"]["num_prompts"] == 40 and meta["split"] == {"train": 28, "val": 12, "val_fraction": 0.3}
    assert [entry["layer"] for entry in meta["condition"]["layers"]] == [1, 2, 3]
    for entry in meta["condition"]["layers"]:
        per_layer = best_condition_point({entry["layer"]: similarities[entry["layer"]]}, truth[val])
        assert entry["f1"] == pytest.approx(per_layer.f1, abs=1e-6)
    assert max(entry["f1"] for entry in meta["condition"]["layers"]) == pytest.approx(want.f1, abs=1e-6)
    from vllm_steer.pack.summary import format_pack_summary, pack_summary

    summary = pack_summary(pack)["condition"]  # what `vllm-steer pack inspect` shows
    assert summary["layer"] == want.layer and summary["num_prompts"] == 40
    assert "validation F1" in format_pack_summary(pack_summary(pack))
