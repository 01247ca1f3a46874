"""StopStringMatcher: stop strings across delta boundaries, never partially emitted."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from router.stop_strings import StopStringMatcher


def run(stop: list[str], deltas: list[str]) -> tuple[str, bool]:
    """Feeds every delta (then flushes if no stop was hit); returns (emitted, hit)."""
    matcher = StopStringMatcher(stop)
    emitted = ""
    for delta in deltas:
        text, hit = matcher.feed(delta)
        emitted += text
        if hit:
            return emitted, True
    return emitted + matcher.flush(), False


def reference(stop: list[str], text: str) -> tuple[str, bool]:
    """Scans ends left to right: the first stop string to complete wins (longest on a tie)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stop if s and text[:end].endswith(s)]
        if done:
            return text[: end - max(len(s) for s in done)], True
    return text, False


def test_stop_string_split_across_deltas() -> None:
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("ab#") == ("ab", False)
    assert matcher.feed("#") == ("", False)
    assert matcher.feed("#cd") == ("", True)
    assert matcher.stopped


def test_overlapping_candidate_abcabcd() -> None:
    assert run(["abcd"], list("abcabcd")) == ("abc", True)
    assert run(["abcd"], ["abcabcd"]) == ("abc", True)
    assert run(["abcd"], ["ab", "cab", "cd"]) == ("abc", True)


def test_held_tail_is_released_when_it_diverges() -> None:
    matcher = StopStringMatcher(["abc"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.feed("x") == ("abx", False)


def test_first_completed_stop_string_wins() -> None:
    # "lo w" completes before "world" does, although "world" is listed first.
    assert run(["world", "lo w"], ["hello world"]) == ("hel", True)
    assert run(["world", "lo w"], list("hello world")) == ("hel", True)
    # "bc" completes before "abcd" although "abcd" starts first; delta cuts do not matter.
    assert run(["abcd", "bc"], ["xabcd"]) == ("xa", True)
    assert run(["abcd", "bc"], list("xabcd")) == ("xa", True)


def test_on_equal_ends_the_longer_stop_string_wins() -> None:
    assert run(["cd", "bcd"], ["abcd"]) == ("a", True)
    assert run(["cd", "bcd"], list("abcd")) == ("a", True)


def test_no_stop_hit_flush_releases_the_held_tail() -> None:
    matcher = StopStringMatcher(["world"])
    assert matcher.feed("hello wor") == ("hello ", False)
    assert matcher.flush() == "wor"
    assert matcher.flush() == ""
    assert not matcher.stopped


def test_feeds_after_a_hit_are_no_ops() -> None:
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("axb") == ("a", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_without_stop_strings_text_passes_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_multibyte_stop_string() -> None:
    assert run(["世界"], ["你好", "世", "界!"]) == ("你好", True)


STOPS = st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3)


def text_around(stop: list[str]) -> st.SearchStrategy[str]:
    """Text glued from random pieces and the stop strings themselves, so hits are common."""
    piece = st.text(alphabet="abc", max_size=3)
    if stop:
        piece = st.one_of(piece, st.sampled_from(stop))
    return st.lists(piece, max_size=10).map("".join)


@settings(max_examples=400, deadline=None, database=None)
@given(data=st.data(), stop=STOPS)
def test_any_split_matches_the_whole_text_reference(data: st.DataObject, stop: list[str]) -> None:
    text = data.draw(text_around(stop))
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=8))
    bounds = sorted({0, len(text), *cuts})
    expected = reference(stop, text)
    assert run(stop, [text[a:b] for a, b in pairwise(bounds)]) == expected
    assert run(stop, list(text)) == expected


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.data(), stop=STOPS)
def test_only_a_possible_stop_string_start_is_held_back(
    data: st.DataObject, stop: list[str]
) -> None:
    text = data.draw(text_around(stop))
    matcher = StopStringMatcher(stop)
    consumed = emitted = ""
    for char in text:
        consumed += char
        delta, hit = matcher.feed(char)
        emitted += delta
        if hit:
            break
        assert consumed.startswith(emitted)
        held = consumed[len(emitted) :]
        assert held == "" or any(s.startswith(held) and s != held for s in stop)
