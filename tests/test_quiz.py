import re

import pytest

from course_utils import quiz


def test_a_right_quiz_scores_every_question(capsys):
    key = quiz.answer_key("t", {1: "a", 2: "c", 3: "d"})
    quiz.grade("t", {1: "A", 2: " c", 3: "d"}, key)
    assert capsys.readouterr().out == "quiz t: 3/3 right\n"


def test_the_key_does_not_show_the_letters_and_depends_on_the_lesson():
    key = quiz.answer_key("t", {1: "a"})
    assert "a" != key[1] and key != quiz.answer_key("u", {1: "a"})
    assert len({quiz.answer_key("t", {1: letter})[1] for letter in "abcd"}) == 4


@pytest.mark.parametrize(("answers", "message"), [
    ({1: "a", 2: ""}, "Question 2: no answer yet"),
    ({1: "a"}, "Question 2: no answer yet"),
    ({1: "b", 2: "c"}, "Question 1: not this one - see part 1"),
    ({1: "a", 2: "c", 7: "a"}, "no such question: [7]"),
    ({1: "a", 2: 3}, "Question 2: no answer yet"),
    ("ac", "answers must be a dict"),
])
def test_a_wrong_or_missing_answer_fails_with_the_question_named(answers, message):
    key = quiz.answer_key("t", {1: "a", 2: "c"})
    with pytest.raises(AssertionError, match=re.escape(message)):
        quiz.grade("t", answers, key, hints={1: "part 1"})
