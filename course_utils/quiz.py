"""Self-checked quizzes: the learner answers in the notebook, and the notebook grades the answers.

A lesson's quiz is a markdown cell with the questions, a cell where the learner writes one letter
per question, and a self-check cell that calls :func:`grade`. The key in the self-check is a short
hash of each right letter (see :func:`answer_key`), so reading that cell does not give the answers
away; the reference answers sit in a collapsed cell, like every exercise's solution.

>>> key = answer_key("demo", {1: "b", 2: "a"})
>>> grade("demo", {1: "B", 2: "a"}, key)
quiz demo: 2/2 right
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping


def _digest(lesson: str, number: int, letter: str) -> str:
    return hashlib.sha256(f"{lesson}|{number}|{letter.strip().lower()}".encode()).hexdigest()[:10]


def answer_key(lesson: str, answers: Mapping[int, str]) -> dict[int, str]:
    """The hashed key for ``answers`` (question number -> letter) of the quiz named ``lesson``.

    >>> answer_key("demo", {1: "b"}) == answer_key("demo", {1: " B "})
    True
    """
    return {number: _digest(lesson, number, letter) for number, letter in answers.items()}


def grade(lesson: str, answers: Mapping[int, str], key: Mapping[int, str],
          hints: Mapping[int, str] | None = None) -> None:
    """Print the score; raise ``AssertionError`` naming each unanswered or wrong question (and its hint).

    ``answers`` maps question numbers to letters (case and spaces do not matter).

    >>> grade("demo", {1: "c"}, answer_key("demo", {1: "b"}), hints={1: "section 2"})
    Traceback (most recent call last):
    ...
    AssertionError: quiz demo: 0/1 right. Question 1: not this one - see section 2
    """
    if not isinstance(answers, Mapping):
        raise AssertionError(f"answers must be a dict of question number -> letter, got {type(answers).__name__}")
    problems, right = [], 0
    for number in sorted(key):
        given = answers.get(number, "")
        hint = f" - see {hints[number]}" if hints and number in hints else ""
        if not isinstance(given, str) or not given.strip():
            problems.append(f"Question {number}: no answer yet (one letter)")
        elif _digest(lesson, number, given) != key[number]:
            problems.append(f"Question {number}: not this one{hint}")
        else:
            right += 1
    extra = sorted(set(answers) - set(key))
    if extra:
        problems.append(f"no such question: {extra}")
    score = f"quiz {lesson}: {right}/{len(key)} right"
    if problems:
        raise AssertionError(score + ". " + "; ".join(problems))
    print(score)
