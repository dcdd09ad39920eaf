"""Argument validation (_validation): the user's frame named, output paths that cannot be written,
messages cut at the kept length."""

from __future__ import annotations

from pathlib import Path


def _outer() -> None:
    _inner()


def _inner() -> None:
    raise ValueError("bad shape")


def test_raised_at_names_the_innermost_frame_of_the_users_code() -> None:
    """' at FILE:LINE in FUNC' is where the exception was raised (the innermost frame outside torch
    and stabilitycheck), not the outermost caller."""
    from stabilitycheck._validation import raised_at

    try:
        _outer()
    except ValueError as exc:
        where = raised_at(exc)
    assert where.endswith(" in _inner") and __file__ in where


def test_a_directory_is_not_a_writable_output_file(tmp_path: Path) -> None:
    """An existing directory given as the log or heatmap path cannot be written as a file."""
    from stabilitycheck._validation import writable

    assert writable(tmp_path / "log.jsonl")
    assert not writable(tmp_path)


def test_a_message_of_exactly_the_kept_length_is_not_cut() -> None:
    """one_line keeps MAX_MESSAGE (300) characters whole; one more is cut to 297 and '...'."""
    from stabilitycheck._validation import MAX_MESSAGE, one_line

    assert one_line("x" * MAX_MESSAGE) == "x" * MAX_MESSAGE
    assert one_line("x" * (MAX_MESSAGE + 1)) == "x" * (MAX_MESSAGE - 3) + "..."
