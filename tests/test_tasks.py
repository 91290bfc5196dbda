"""Task checkers (qbco.eval.tasks) on answers written by hand: what a right answer in another wording passes,
and what a wrong, evasive, verbose or cut-off one fails."""

import pytest

from qbco.common.errors import QbcoError
from qbco.eval.tasks import numbers, passes, row_check


def test_numbers_reads_digits_commas_and_words():
    assert numbers("5 * 12 = 60.") == [5, 12, 60]
    assert numbers("That is 5,000 meters, or 5.5 km.") == [5000, 5.5]
    assert numbers("The word 'sky' has three letters.") == [3]
    assert numbers("forty-seven and twenty one, not someone") == [47, 21]
    assert numbers("no digits here") == []


@pytest.mark.parametrize("answer, ok", [
    ("The answer is 60.", True),
    ("To calculate 5 times 12, we multiply: 5 * 12 = 60.", True),
    ("5 * 12 = 60, so the answer is 60", True),
    ("The answer is 72.", False),
    ("To calculate 5 times 12, we need to multiply 5 times 12. 5 * 12 = 5 * 12 = 5", False),  # cut off
    ("You could use a calculator for that.", False),
])
def test_number(answer, ok):
    assert passes(answer, {"kind": "number", "value": 60}) is ok


@pytest.mark.parametrize("answer, ok", [
    ("The capital of Brazil is Brasília.", True),  # accents ignored
    ("brasilia", True),
    ("The capital of Brazil is Rio de Janeiro.", False),
    ("Brasilian cities are many.", False),  # whole words only
])
def test_mentions(answer, ok):
    assert passes(answer, {"kind": "mentions", "any": ["Brasilia"]}) is ok


@pytest.mark.parametrize("answer, ok", [
    ("The correct spelling is 'receive'.", True),
    ("'Receive' is correct; 'recieve' is a common misspelling.", True),
    ("The correct spelling is 'recieve'.", False),
    ("'recieve' is wrong, write 'receive'", False),  # named the misspelling first
    ("I'm not confident about spelling, sorry.", False),
])
def test_choice(answer, ok):
    assert passes(answer, {"kind": "choice", "right": "receive", "wrong": "recieve"}) is ok


def test_exact():
    spec = {"kind": "exact", "value": "OCEAN"}
    assert passes("OCEAN", spec) and passes(" 'OCEAN'. ", spec) and passes('"OCEAN"', spec)
    assert not passes("Ocean", spec) and not passes("Sure: OCEAN.", spec) and not passes("OCEAN...", spec)
    yes = {"kind": "exact", "value": "yes", "case": False}
    assert passes("Yes.", yes) and passes("yes", yes)
    assert not passes("Yes, 7 is odd.", yes) and not passes("No.", yes)


def test_list():
    spec = {"kind": "list", "count": 3, "separator": ", ", "exclude": ["dog", "cat"]}
    assert passes("apple, kiwi, passion fruit", spec)
    assert passes("apple, banana, cherry.", spec)
    assert not passes("apple, banana", spec)  # two items
    assert not passes("apple; banana; cherry", spec)  # the other separator
    assert not passes("dog, apple, banana", spec)  # an item of another category
    assert not passes("Here are three fruits, apple, banana", spec)  # an item of four words
    assert not passes("apple, , banana", spec)  # an empty item


def test_row_check_reads_check_reference_or_nothing():
    assert row_check({"check": {"kind": "number", "value": 3}}) == {"kind": "number", "value": 3}
    assert row_check({"check": '{"kind": "exact", "value": "a"}'}) == {"kind": "exact", "value": "a"}  # a CSV cell
    assert row_check({"reference": "Paris"}) == {"kind": "mentions", "any": ["Paris"]}
    assert row_check({"task": "x"}) is None and row_check({"reference": " "}) is None
    with pytest.raises(QbcoError, match="row 3: column check needs a kind"):
        row_check({"check": {"value": 1}}, "row 3")
    with pytest.raises(QbcoError, match="a choice check needs wrong"):
        row_check({"check": {"kind": "choice", "right": "a"}})
    with pytest.raises(QbcoError, match="not a JSON object"):
        row_check({"check": "{oops"})
