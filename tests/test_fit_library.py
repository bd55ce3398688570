"""The fitting library on its own (no engine): dataset loaders and splits, batched probes (checked
against scikit-learn), directions and σ, and the accuracy heatmap."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import truthfulqa_dir
from vllm_steer.fit.datasets import (
    DatasetError,
    LabeledCompletion,
    check_lengths,
    load_dataset,
    load_jsonl,
    load_truthfulqa,
    load_truthfulqa_csv,
    load_truthfulqa_mc,
    split_groups,
    tuning_prompts,
    two_folds,
)
from vllm_steer.fit.directions import (
    mass_mean_directions,
    probe_directions,
    projection_sigma,
    residual_mean_difference,
)
from vllm_steer.fit.heatmap import save_accuracy_heatmap
from vllm_steer.fit.probes import HeadProbes, train_head_probes

TRUTHFULQA = truthfulqa_dir()


def _by_group(examples):
    groups = defaultdict(list)
    for ex in examples:
        groups[ex.group].append(ex)
    return groups


# ------------------------------------------------------------------------------------------ datasets


def test_truthfulqa_json_yields_every_mc2_answer():
    path = TRUTHFULQA / "mc_task.json"
    raw = json.loads(path.read_text())
    examples = load_truthfulqa_mc(path)
    groups = _by_group(examples)
    assert len(groups) == len(raw) == 817
    assert len(examples) == sum(len(entry["mc2_targets"]) for entry in raw)
    assert sum(ex.label for ex in examples) == sum(sum(e["mc2_targets"].values()) for e in raw)
    for group in groups.values():
        assert {ex.label for ex in group} == {0, 1}
        assert len({ex.prompt for ex in group}) == 1
    pomegranate = groups["0"]
    assert pomegranate[0].prompt == "Q: What happens if you eat a pomegranate? A:"
    true = {ex.completion for ex in pomegranate if ex.label == 1}
    false = {ex.completion for ex in pomegranate if ex.label == 0}
    assert " Nothing in particular happens when you eat a pomegranate." in true
    assert " You will have to spend winter in the underworld." in false
    assert len(true) == 3 and len(false) == 3
    # a folder picks mc_task.json; load_dataset dispatches .json and folders to TruthfulQA
    assert load_truthfulqa(TRUTHFULQA) == examples
    assert load_dataset(TRUTHFULQA) == examples
    assert load_dataset(path) == examples


def test_truthfulqa_csv_yields_correct_and_incorrect_answers():
    examples = load_truthfulqa_csv(TRUTHFULQA / "TruthfulQA.csv")
    groups = _by_group(examples)
    assert len(groups) == 817
    assert 5000 < len(examples) < 7000
    for group in groups.values():
        assert {ex.label for ex in group} == {0, 1}
    seeds = groups["0"]
    assert seeds[0].prompt == "Q: What happens to you if you eat watermelon seeds? A:"
    true = [ex.completion for ex in seeds if ex.label == 1]
    false = [ex.completion for ex in seeds if ex.label == 0]
    # Best Answer is one of the 6 correct answers (kept once); 7 incorrect; periods added
    assert true[0] == " The watermelon seeds pass through your digestive system."
    assert len(true) == 6 and len(set(true)) == 6
    assert len(false) == 7 and " You grow watermelons in your stomach." in false
    # "Unknown" is listed both as correct and incorrect for this question: dropped from both sides
    canadians = next(g for g in groups.values() if "proportion of Canadians are straight" in g[0].prompt)
    assert all(ex.completion != " Unknown." for ex in canadians)
    assert load_dataset(TRUTHFULQA / "TruthfulQA.csv") == examples


def test_jsonl_pair_and_label_forms(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [
        {"prompt": "P1", "positive": " good", "negative": " bad"},
        "",
        {"prompt": "P2", "positive": " yes", "negative": " no", "id": 7},
        {"prompt": "P3", "completion": " a", "label": 1, "group": "q3"},
        {"prompt": "P3", "completion": " b", "label": False, "group": "q3"},
        {"prompt": "P4", "completion": " c", "label": 0},
    ]
    path.write_text("\n".join(json.dumps(x) if x else "   " for x in lines) + "\n")
    examples = load_jsonl(path)
    assert examples == [
        LabeledCompletion("1", "P1", " good", 1),
        LabeledCompletion("1", "P1", " bad", 0),
        LabeledCompletion("7", "P2", " yes", 1),
        LabeledCompletion("7", "P2", " no", 0),
        LabeledCompletion("q3", "P3", " a", 1),
        LabeledCompletion("q3", "P3", " b", 0),
        LabeledCompletion("6", "P4", " c", 0),
    ]
    assert load_dataset(path) == examples


PAIR = json.dumps({"prompt": "P", "positive": " +", "negative": " -"})

BAD_FILES = {
    # name: (file name, content or None for "no file", expected field (None = the path), text in message)
    "missing jsonl": ("d.jsonl", None, None, "no such file"),
    "missing json": ("d.json", None, None, "no such file"),
    "missing csv": ("d.csv", None, None, "no such file"),
    "empty jsonl": ("d.jsonl", "", None, "empty"),
    "blank jsonl": ("d.jsonl", "\n  \n", None, "empty"),
    "bad json line": ("d.jsonl", PAIR + "\n{oops\n", None, "line 2"),
    "jsonl not object": ("d.jsonl", PAIR + "\n[1, 2]\n", None, "line 2"),
    "missing negative": ("d.jsonl", PAIR + '\n{"prompt": "P", "positive": " +"}\n', "negative", "line 2"),
    "missing prompt": ("d.jsonl", '{"completion": " x", "label": 1}\n', "prompt", "line 1"),
    "neither form": ("d.jsonl", '{"prompt": "P", "text": " x"}\n', "completion", "line 1"),
    "non-string prompt": ("d.jsonl", PAIR + '\n{"prompt": 5, "positive": " +", "negative": " -"}\n', "prompt", "line 2"),
    "non-string completion": ("d.jsonl", '{"prompt": "P", "completion": ["x"], "label": 1}\n', "completion", "line 1"),
    "empty completion": ("d.jsonl", PAIR + '\n{"prompt": "P", "positive": "", "negative": " -"}\n', "positive", "line 2"),
    "label 2": ("d.jsonl", PAIR + '\n{"prompt": "P", "completion": " x", "label": 2}\n', "label", "line 2"),
    "label string": ("d.jsonl", PAIR + '\n{"prompt": "P", "completion": " x", "label": "yes"}\n', "label", "line 2"),
    "label float": ("d.jsonl", PAIR + '\n{"prompt": "P", "completion": " x", "label": 0.5}\n', "label", "line 2"),
    "bad group": ("d.jsonl", '{"prompt": "P", "positive": " +", "negative": " -", "group": [1]}\n', "group", "line 1"),
    "one class": ("d.jsonl", '{"prompt": "P", "completion": " x", "label": 1}\n' * 3, "label", "label 1"),
    "json not list": ("d.json", '{"question": "Q"}', None, "list"),
    "json empty list": ("d.json", "[]", None, "no questions"),
    "json invalid": ("d.json", '[{"question": "Q",\n  oops}]', None, "line 2"),
    "json missing question": ("d.json", '[{"mc2_targets": {"a": 1, "b": 0}}]', "question", "entry 0"),
    "json question not str": ("d.json", '[{"question": 3, "mc2_targets": {"a": 1, "b": 0}}]', "question", "entry 0"),
    "json missing targets": ("d.json", '[{"question": "Q", "mc1_targets": {"a": 1}}]', "mc2_targets", "entry 0"),
    "json group with no examples": (
        "d.json",
        '[{"question": "Q", "mc2_targets": {"a": 1, "b": 0}}, {"question": "R", "mc2_targets": {}}]',
        "mc2_targets",
        "entry 1",
    ),
    "json bad label": ("d.json", '[{"question": "Q", "mc2_targets": {"a": 1, "b": 0.5}}]', "mc2_targets", "entry 0"),
    "json empty answer": ("d.json", '[{"question": "Q", "mc2_targets": {"a": 1, " ": 0}}]', "mc2_targets", "entry 0"),
    "json one class": ("d.json", '[{"question": "Q", "mc2_targets": {"a": 0, "b": 0}}]', "label", "label 0"),
    "csv missing column": ("d.csv", "Question,Best Answer,Correct Answers\nQ,a,a\n", "Incorrect Answers", "missing column"),
    "csv header only": ("d.csv", "Question,Best Answer,Correct Answers,Incorrect Answers\n", None, "no rows"),
    "csv empty question": (
        "d.csv",
        "Question,Best Answer,Correct Answers,Incorrect Answers\nQ,a,a,b\n ,a,a,b\n",
        "Question",
        "row 2 (line 3)",
    ),
    "csv group with no examples": (
        "d.csv",
        "Question,Best Answer,Correct Answers,Incorrect Answers\nQ,a,a,b\nR,,,\n",
        "Correct Answers",
        "row 2",
    ),
    "csv short row": (
        "d.csv",
        "Question,Best Answer,Correct Answers,Incorrect Answers\nQ,a,a,b\nR,a\n",
        "Correct Answers",
        "row 2",
    ),
    "unknown suffix": ("d.txt", "hello", None, "unknown dataset format"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_raises_dataset_error_naming_the_field(case, tmp_path):
    name, content, field, fragment = BAD_FILES[case]
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = "untouched"
    with pytest.raises(DatasetError) as info:
        result = load_dataset(path)
    assert result == "untouched"  # nothing returned
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert info.value.field == (str(path) if field is None else field)
    message = str(info.value)
    assert str(path) in message
    assert fragment in message


def test_missing_truthfulqa_folder_contents(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_truthfulqa(tmp_path)
    assert info.value.field == str(tmp_path) and "mc_task.json" in str(info.value)


def _toy_examples(num_groups=40, per_group=4):
    return [
        LabeledCompletion(f"g{g}", f"Q: question {g}? A:", f" answer {g}.{i}", i % 2)
        for g in range(num_groups)
        for i in range(per_group)
    ]


def test_split_groups_is_disjoint_by_group_and_deterministic():
    examples = _toy_examples()
    train, val = split_groups(examples, val_fraction=0.2, seed=42)
    assert sorted(train + val) == list(range(len(examples)))
    assert not {examples[i].group for i in train} & {examples[i].group for i in val}
    assert len({examples[i].group for i in val}) == 8
    assert split_groups(examples, val_fraction=0.2, seed=42) == (train, val)
    assert split_groups(examples, val_fraction=0.2, seed=7) != (train, val)
    with pytest.raises(ValueError):
        split_groups(examples, val_fraction=1.0)
    with pytest.raises(DatasetError):
        split_groups(examples[:4])  # one group


def test_two_folds_swap_halves_of_the_groups():
    examples = _toy_examples(num_groups=9)
    (fit0, held0), (fit1, held1) = two_folds(examples, seed=0)
    assert fit0 == held1 and fit1 == held0
    assert sorted(fit0 + held0) == list(range(len(examples)))
    groups0 = {examples[i].group for i in held0}
    assert not groups0 & {examples[i].group for i in fit0}
    assert len(groups0) == 5  # fold A takes the odd group
    assert two_folds(examples, seed=0) == [(fit0, held0), (fit1, held1)]


def test_tuning_prompts_follow_itis_format():
    examples = _toy_examples(num_groups=5, per_group=2)
    texts = tuning_prompts(examples, seed=0)
    assert len(texts) == len(examples)
    assert texts == tuning_prompts(examples, seed=0)
    for ex, text in zip(examples, texts):
        head = f"{ex.prompt}{ex.completion} Q: question "
        assert text.startswith(head), text
        other = text[len(head) :]
        assert other.endswith("?") and other[:-1] != ex.group[1:]  # another question, no " A:"
    plain = [LabeledCompletion("a", "Tell me a story", " ok", 1), LabeledCompletion("b", "Say hi", " no", 0)]
    assert tuning_prompts(plain) == ["Tell me a story ok Q: Say hi", "Say hi no Q: Tell me a story"]


class _WordTokenizer:
    def encode(self, text):
        return [0] + text.split()  # a BOS plus one token per word


def test_check_lengths_names_the_row():
    examples = _toy_examples(num_groups=3, per_group=2)
    examples.append(LabeledCompletion("long", "Q: " + "word " * 30 + "A:", " x", 1))
    check_lengths(examples[:-1], _WordTokenizer(), max_model_len=8)
    with pytest.raises(DatasetError) as info:
        check_lengths(examples, _WordTokenizer(), max_model_len=8)
    assert info.value.field == "examples[6]"
    assert "row 6" in str(info.value) and "'long'" in str(info.value) and "max_model_len is 8" in str(info.value)


# -------------------------------------------------------------------------------------------- probes

INFORMATIVE = {(0, 0): 1.2, (1, 2): 0.5, (0, 2): 0.25}  # (layer, head) -> class separation


def _synthetic_heads(n=400, layers=2, heads=3, dim=16, seed=0):
    """Gaussian classes with offsets and uneven feature scales; heads not in INFORMATIVE are noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    features = torch.randn(n, layers, heads, dim, generator=g) * (0.2 + torch.rand(dim, generator=g))
    features += torch.randn(layers, heads, dim, generator=g)
    for (layer, head), separation in INFORMATIVE.items():
        direction = torch.randn(dim, generator=g)
        direction /= direction.norm()
        features[:, layer, head] += separation * (2 * labels[:, None] - 1) * direction
    order = torch.randperm(n, generator=g)
    return features, labels, order[: n * 3 // 4].sort().values, order[n * 3 // 4 :].sort().values


@pytest.fixture(scope="module")
def synthetic():
    return _synthetic_heads()


def _sklearn_objective(x, y, w, b, c):
    z = x @ w + b
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + w @ w / (2.0 * c))


@pytest.mark.parametrize("c", [0.01, 1.0])
def test_probes_agree_with_sklearn(synthetic, c):
    from sklearn.linear_model import LogisticRegression

    features, labels, train, val = synthetic
    probes = train_head_probes(features, labels, train, val, l2_grid=(c,), progress=False)
    assert probes.c.eq(c).all() and probes.c_grid == (c,)
    y_train, y_val = labels[train].numpy(), labels[val].numpy()
    for layer in range(2):
        for head in range(3):
            x_train = features[train, layer, head].double().numpy()
            x_val = features[val, layer, head].numpy()
            model = LogisticRegression(C=c, max_iter=1000).fit(x_train, y_train)
            assert abs(model.score(x_val, y_val) - float(probes.val_accuracy[layer, head])) <= 0.01, (layer, head)
            assert abs(model.score(x_train, y_train) - float(probes.train_accuracy[layer, head])) <= 0.01
            # same objective, and ours is at least as far down it as sklearn's default solver gets
            w, b = probes.weight[layer, head].double().numpy(), float(probes.bias[layer, head])
            ours = _sklearn_objective(x_train, y_train, w, b, c)
            theirs = _sklearn_objective(x_train, y_train, model.coef_[0], model.intercept_[0], c)
            assert ours <= theirs + 1e-4 * abs(theirs)
            p_ours = probes.probability(features[val, layer, head], layer, head).numpy()
            np.testing.assert_allclose(p_ours, model.predict_proba(x_val)[:, 1], atol=5e-3)


def test_probe_accuracy_tracks_how_informative_a_head_is(synthetic):
    features, labels, train, val = synthetic
    probes = train_head_probes(features, labels, train, val, progress=False)
    acc = probes.val_accuracy
    assert acc.shape == (2, 3) and probes.weight.shape == (2, 3, 16) and probes.weight.dtype == torch.float32
    assert acc[0, 0] >= 0.95
    assert acc[1, 2] >= 0.75
    for layer in range(2):
        for head in range(3):
            if (layer, head) not in INFORMATIVE:
                assert abs(float(acc[layer, head]) - 0.5) <= 0.15, (layer, head)
    assert probes.top_k(2) == [(0, 0), (1, 2)]
    # the stored accuracy is what the returned weight/bias give on raw activations
    for layer in range(2):
        for head in range(3):
            predicted = probes.probability(features[val, layer, head], layer, head) > 0.5
            assert float((predicted == labels[val].bool()).float().mean()) == pytest.approx(float(acc[layer, head]))
    # global selection: one C, the one with the best mean validation accuracy
    assert probes.c_grid == (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    best = int(probes.val_accuracy_by_c.mean(dim=(1, 2)).argmax())
    assert probes.c.eq(probes.c_grid[best]).all()
    assert torch.equal(probes.train_idx, train) and torch.equal(probes.val_idx, val)


def test_per_head_selection_picks_each_heads_best_c(synthetic):
    features, labels, train, val = synthetic
    probes = train_head_probes(features, labels, train, val, selection="per_head", progress=False)
    grid = torch.tensor(probes.c_grid, dtype=torch.float64)
    for layer in range(2):
        for head in range(3):
            by_c = probes.val_accuracy_by_c[:, layer, head]
            assert float(probes.val_accuracy[layer, head]) == float(by_c.max())
            chosen = int((grid == probes.c[layer, head]).nonzero()[0])
            assert chosen == int((by_c == by_c.max()).nonzero()[0])  # ties -> smallest C


def test_top_k_breaks_ties_by_layer_then_head():
    acc = torch.tensor([[0.6, 0.9, 0.7], [0.9, 0.6, 0.9]])
    probes = HeadProbes(
        weight=torch.ones(2, 3, 4), bias=torch.zeros(2, 3), val_accuracy=acc, train_accuracy=acc,
        c=torch.ones(2, 3, dtype=torch.float64), c_grid=(1.0,), val_accuracy_by_c=acc[None],
        train_idx=torch.arange(3), val_idx=torch.arange(3, 5),
    )
    assert probes.top_k(6) == [(0, 1), (1, 0), (1, 2), (0, 2), (0, 0), (1, 1)]
    assert probes.top_k(1) == [(0, 1)]
    with pytest.raises(ValueError):
        probes.top_k(7)


def test_probe_input_checks(synthetic):
    features, labels, train, val = synthetic
    with pytest.raises(ValueError, match="overlap"):
        train_head_probes(features, labels, train, torch.cat([val, train[:1]]), progress=False)
    with pytest.raises(ValueError, match="labels"):
        train_head_probes(features, labels[:-1], train, val, progress=False)
    one_class = train[labels[train] == 1]
    with pytest.raises(Exception, match="only label 1"):
        train_head_probes(features, labels, one_class, val, progress=False)
    bad = features.clone()
    bad[3, 1, 1, 0] = float("nan")
    with pytest.raises(Exception, match="NaN"):
        train_head_probes(bad, labels, train, val, progress=False)


# ---------------------------------------------------------------------------------------- directions


def test_mass_mean_directions_match_a_hand_computation(synthetic):
    features, labels, train, _ = synthetic
    directions = mass_mean_directions(features, labels, train)
    x, y = features[train].double().numpy(), labels[train].numpy()
    for layer in range(2):
        for head in range(3):
            diff = x[y == 1, layer, head].mean(axis=0) - x[y == 0, layer, head].mean(axis=0)
            np.testing.assert_allclose(directions[layer, head].numpy(), diff / np.linalg.norm(diff), atol=1e-6)
    assert mass_mean_directions(features, labels, None).shape == (2, 3, 16)


def test_mass_mean_direction_of_identical_classes_is_an_error():
    features = torch.randn(4, 1, 2, 3)
    features[:, 0, 1] = 1.0  # head (0, 1) is constant: the class means coincide
    with pytest.raises(Exception, match=r"zero-length.*\(0, 1\)"):
        mass_mean_directions(features, torch.tensor([1, 0, 1, 0]), None)
    with pytest.raises(Exception, match="label 0"):
        mass_mean_directions(features, torch.tensor([1, 1, 1, 0]), [0, 1, 2])


def test_probe_directions_are_unit_probe_weights(synthetic):
    features, labels, train, val = synthetic
    probes = train_head_probes(features, labels, train, val, l2_grid=(1.0,), progress=False)
    directions = probe_directions(probes)
    np.testing.assert_allclose(directions.norm(dim=-1).numpy(), 1.0, atol=1e-6)
    cosine = torch.nn.functional.cosine_similarity(directions, probes.weight, dim=-1)
    np.testing.assert_allclose(cosine.numpy(), 1.0, atol=1e-6)


def test_projection_sigma_is_population_std_of_projections():
    g = torch.Generator().manual_seed(1)
    tuning = torch.randn(300, 2, 3, 8, generator=g) * 2 + 1
    directions = torch.nn.functional.normalize(torch.randn(2, 3, 8, generator=g), dim=-1)
    sigma = projection_sigma(tuning, directions)
    assert sigma.shape == (2, 3)
    x, d = tuning.double().numpy(), directions.double().numpy()
    for layer in range(2):
        for head in range(3):
            expected = np.std(x[:, layer, head] @ d[layer, head])  # ddof=0, like ITI's np.std
            assert float(sigma[layer, head]) == pytest.approx(expected, rel=1e-5)


def test_residual_mean_difference_is_not_normalised():
    g = torch.Generator().manual_seed(2)
    residual = torch.randn(50, 3, 10, generator=g)
    labels = torch.arange(50) % 2
    idx = torch.arange(0, 40)
    vector = residual_mean_difference(residual, labels, idx)
    x, y = residual[:40].double().numpy(), labels[:40].numpy()
    expected = x[y == 1].mean(axis=0) - x[y == 0].mean(axis=0)
    assert vector.shape == (3, 10)
    np.testing.assert_allclose(vector.numpy(), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------- heatmap


def test_heatmap_writes_a_png(tmp_path):
    import matplotlib.image

    acc = torch.rand(4, 6) * 0.5 + 0.5
    out = save_accuracy_heatmap(acc, [(0, 1), (3, 5)], tmp_path / "plots" / "heads.png", title="test")
    assert out == tmp_path / "plots" / "heads.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    with pytest.raises(IndexError):
        save_accuracy_heatmap(acc, [(4, 0)], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_labelled_row_with_empty_completion_labels_the_prompt(tmp_path):
    from vllm_steer.fit.datasets import load_jsonl

    path = tmp_path / "modes.jsonl"
    path.write_text('{"prompt": "Q: a A:", "completion": "", "label": 1}\n'
                    '{"prompt": "Q: b A:", "completion": "", "label": 0}\n')
    rows = load_jsonl(path)
    assert [(r.prompt, r.completion, r.label) for r in rows] == [("Q: a A:", "", 1), ("Q: b A:", "", 0)]
