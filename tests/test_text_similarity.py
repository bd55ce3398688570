"""BLEU, ROUGE-L and the -acc rule against values worked out by hand."""

import math

import pytest

from vllm_steer.eval.text_similarity import acc, bleu, is_no_comment, rouge_l, tokens


def test_tokens_are_lower_cased_words_and_punctuation():
    assert tokens("Hello, World!") == ["hello", ",", "world", "!"]


def test_bleu_by_hand():
    assert bleu("the cat sat", "The cat sat") == pytest.approx(1.0)
    # every precision is 1 (n >= 2 smoothed, n = 3, 4 have no n-grams: (0+1)/(0+1)); brevity exp(1 - 6/2)
    assert bleu("the cat", "the cat sat on the mat") == pytest.approx(math.exp(-2))
    # p1 = 3/4, p2 = (1+1)/(3+1), p3 = (0+1)/(2+1), p4 = (0+1)/(1+1): product 1/16, 4th root 1/2
    assert bleu("a b c d", "a b x d") == pytest.approx(0.5)
    assert bleu("x y", "a b") == 0.0 and bleu("", "a") == 0.0


def test_rouge_l_by_hand():
    # LCS "the cat on mat" = 4 of 6 tokens each way: P = R = F = 2/3
    assert rouge_l("the cat sat on the mat", "the cat lay on a mat") == pytest.approx(2 / 3)
    # LCS 2 ("a c"); P = 2/2, R = 2/4: F = 2 * 1 * 0.5 / 1.5
    assert rouge_l("a c", "a b c d") == pytest.approx(2 / 3)
    assert rouge_l("x", "a b") == 0.0


def test_acc_rule_and_no_comment():
    assert acc(rouge_l, "the cat sat", ["a dog ran"], ["the cat sat down"]) == 0.0
    assert acc(rouge_l, "the cat sat", ["the cat sat down"], ["a dog ran"]) == 1.0
    assert acc(bleu, "same", ["same"], ["same"]) == 0.0  # a tie is not a win
    with pytest.raises(ValueError):
        acc(bleu, "a", [], ["b"])
    assert is_no_comment("I have No Comment.") and not is_no_comment("The answer is 4.")
