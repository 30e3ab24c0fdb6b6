"""Answer parsing for stacking on VisualQuality-R1 / Q-Insight (paper Table 4): <answer>...</answer> blocks beside
boxed{}, the last of either winning; malformed tags never crash and never give a value out of range."""
import numpy as np
import pytest

import common

VQR1 = "<think>\nThe image is sharp, well exposed, with slight noise in the shadows.\n</think>\n<answer>3.85</answer>"


@pytest.mark.parametrize("text,expected", [
    (VQR1, 3.85),  # VisualQuality-R1's layout
    ("<answer> 4 </answer>", 4.0),
    ("<think>a</think><answer>\n2.50\n</answer>", 2.5),
    ("\\boxed{2} on second thought <answer>4.5</answer>", 4.5),  # mixed: the last one wins
    ("<answer>4.5</answer> on second thought \\boxed{2}", 2.0),
    ("<answer>1</answer><answer>5</answer>", 5.0),
    ("<answer>\\boxed{3}</answer>", 3.0),  # a box inside the block
    ("<answer><answer>3</answer></answer>", 3.0),  # nested: the innermost block
    ("<answer>3", None),  # unclosed
    ("3</answer>", None),
    ("<answer>3</answer", None),
    ("<answer>6</answer>", None),
    ("<answer>three</answer>", None),
    ("<answer></answer>", None),
    ("<answer>3.5</answer> \\boxed{}", None),  # the last one is an empty box
    ("<ANSWER>3</ANSWER>", None),  # tags are case-sensitive, as the models write them
])
def test_parse_score_reads_answer_blocks(text, expected):
    assert common.parse_score(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("<think>the first is sharper</think><answer>0</answer>", 0),
    ("<answer> 1 </answer>", 1),
    ("<answer>0</answer> \\boxed{1}", 1),
    ("\\boxed{1} <answer>0</answer>", 0),
    ("<answer>2</answer>", None),
    ("<answer>0", None),
])
def test_parse_compare_reads_answer_blocks(text, expected):
    assert common.parse_compare(text) == expected


FRAGMENTS = ["<answer>", "</answer>", "<answer", "answer>", "\\boxed{", "boxed{", "{", "}", "<think>", "</think>",
             "0", "1", "2", "3", "5", "6", ".", "-", "+", "e", "nan", "inf", " ", "\n", "A", "B", "x", "<", ">", "/"]


def test_fuzzed_answers_never_crash_and_stay_in_range():
    """4,000 random strings of tag and number fragments: a score in [1, 5] or None, a label index or None; and
    whatever comes before it, a final well-formed box or block is what counts (the last one wins)."""
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(4000):
        text = "".join(rng.choice(FRAGMENTS, size=int(rng.integers(0, 30))))
        score = common.parse_score(text)
        assert score is None or (isinstance(score, float) and 1.0 <= score <= 5.0), (text, score)
        assert common.parse_compare(text) in (0, 1, None), text
        assert common.parse_compare(text, ("A", "B")) in (0, 1, None), text
        hits += score is not None
        closing = "<answer>2.25</answer>" if rng.random() < 0.5 else "\\boxed{2.25}"
        assert common.parse_score(text + closing) == 2.25, text
        assert common.parse_compare(text + closing.replace("2.25", "1")) == 1, text
    assert hits > 20  # the fuzz reaches valid answers too, not only garbage (39 of 4,000 here)
