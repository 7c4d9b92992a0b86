"""Hostile flag values for the fuzz tests of every settings class (tests/test_flags*.py).

For each field the fuzz tries what a tired user or a broken launcher script passes: the wrong
type, NaN, +-inf, 0, negatives, huge numbers, empty strings and junk text. Each value must be
either inside the field's declared range or refused with one line that names the flag.
"""
from dataclasses import fields

from hypothesis import strategies as st

import cli

EDGE_CASES = ["", "nan", "NaN", "inf", "-inf", "0", "-0", "-1", "1", "2", "0.5", "1.5", "-2.5", "1e300", "-1e300",
              "99999999999999999999", "1e-300", "true", "false", "abc", " ", "0x10", "1,2", "=", "--"]


def hostile_values():
    """Flag values as the strings a command line carries."""
    return st.one_of(
        st.sampled_from(EDGE_CASES),
        st.integers(-10**12, 10**12).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.text(alphabet="0123456789.-+eE,:abcxyz_= ", max_size=8),
    )


def field_names(settings):
    return [f.name for f in fields(settings)]


def undeclared(settings):
    """The fields of a settings class that declare no range (must be none)."""
    return [f.name for f in fields(settings) if "accepts" not in f.metadata]


def refusal_problems(message, name):
    """What is wrong with an error message for a refused `--name=...`; empty if it is right:
    one line, starting with 'error: ', naming the flag."""
    problems = []
    if "\n" in message.strip():
        problems.append("more than one line")
    if not message.startswith("error: "):
        problems.append("does not start with 'error: '")
    if f"--{name}" not in message:
        problems.append(f"does not name --{name}")
    return problems


__all__ = ["hostile_values", "field_names", "undeclared", "refusal_problems", "cli"]
