"""The short-answer benchmark's first-word rule (digits included), its scoring, and the raw generated
text kept in each row (without an engine: a stand-in for ``LLM.generate``)."""

from types import SimpleNamespace

import pytest

from vllm_steer.eval.short_answer import ShortAnswerItem, evaluate_short_answers, first_word, score_item


@pytest.mark.parametrize("text, word", [
    ("c4", "c4"),
    ("1945", "1945"),
    (" c4.", "c4"),
    ("c4. Then c5", "c4"),
    ("\n  c4", "c4"),
    ("\t\n(1945), then more", "1945"),
    ("\u201cc7\u201d", "c7"),  # curly quotes are punctuation too
    ("don't.", "don't"),  # inner punctuation stays
    (" . zint", "zint"),  # a punctuation-only token is skipped
    ("zint. Q", "zint"),
    ("C4", "C4"),  # case is kept
])
def test_first_word(text, word):
    assert first_word(text) == word


@pytest.mark.parametrize("text", ["", "   \n\t", " . ?", "...", None])
def test_no_first_word(text):
    assert first_word(text) is None


def test_score_item_matches_answers_with_digits_exactly():
    item = ShortAnswerItem("Q", "c4", "c2", "lying", ("c0", "c1", "c2", "c3", "c4"))
    assert score_item(first_word(" c4."), item) == {"answer": "c4", "truthful": 1.0, "expected_false": 0.0,
                                                    "well_formed": 1.0, "truthful[lying]": 1.0}
    lie = score_item(first_word("c2 is it"), item)
    assert lie["truthful"] == 0.0 and lie["expected_false"] == 1.0 and lie["well_formed"] == 1.0
    upper = score_item(first_word("C4"), item)  # exact match: case counts
    assert upper["truthful"] == 0.0 and upper["well_formed"] == 0.0
    year = ShortAnswerItem("When did the war end?", "1945", "1944")
    assert score_item(first_word("1945, in Europe"), year)["truthful"] == 1.0
    assert score_item(first_word(""), year) == {"answer": None, "truthful": 0.0, "expected_false": 0.0,
                                                "well_formed": 0.0}


class _FakeLLM:
    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, params, use_tqdm=False):
        assert len(prompts) == len(self.texts)
        return [SimpleNamespace(outputs=[SimpleNamespace(text=t)]) for t in self.texts]


def test_rows_keep_the_raw_text_and_the_summary_ignores_it():
    from vllm_steer.eval.job import EvalJob, summarize

    items = [ShortAnswerItem(f"p{i}", f"c{i}", None, "g") for i in range(3)]
    texts = [" c0.\nQ:", "\n(c1) maybe", " . ?"]
    rows = evaluate_short_answers(_FakeLLM(texts), items, None)
    assert [r["text"] for r in rows] == texts
    assert [r["answer"] for r in rows] == ["c0", "c1", None]
    assert [r["truthful"] for r in rows] == [1.0, 1.0, 0.0]
    job = EvalJob(model="m", data="d", benchmark="short_answer")
    (summary,) = summarize(job, [rows])
    assert summary["n"] == 3 and summary["truthful"] == pytest.approx(2 / 3)
    assert summary["truthful[g]"] == pytest.approx(2 / 3) and "text" not in summary and "answer" not in summary


@pytest.mark.parametrize("content, words", [
    ('[1, 2]\n', "line 1: expected a JSON object"),  # was an AttributeError traceback
    ('{"prompt": "a", "true_answer": "b"}\n{oops\n', "line 2, column 2: invalid JSON"),
    ('{"prompt": "a"}\n', "line 1: 'true_answer' must be a non-empty string"),
    ("\n\n", "file is empty"),
])
def test_bad_item_files_name_the_file_and_line(tmp_path, content, words):
    from vllm_steer.eval.short_answer import load_short_answer_items
    from vllm_steer.fit.datasets import DatasetError

    path = tmp_path / "items.jsonl"
    path.write_text(content)
    with pytest.raises(DatasetError) as info:
        load_short_answer_items(path)
    assert str(path) in str(info.value) and words in str(info.value)
