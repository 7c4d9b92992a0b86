"""The command-line side that toy/ and sd35/ share: --key=value flags with declared ranges,
--help, and files written so that a crash never leaves a torn one.

Every settings dataclass declares what each field accepts next to its default, on one line,
    lr: float = flag(1e-3, "(0, 1]")  # AdamW learning rate
and `read_flags` checks every field and the class's RELATIONS before any work starts; a bad
value is refused in one line that names the flag, the value and what is expected:
    --eval_every=0: expected an integer in [1, 100000]
minflow.Algorithm declares its axes the same way but, the core being torch only, does not check
itself: `make_algorithm` and `read_flags` check it here, `check_flags` one changed in code.
"""
import inspect
import math
import os
import re
import sys
from dataclasses import fields, replace
from pathlib import Path

import minflow


class FlagError(ValueError):
    """A setting outside its declared range; the message is one line: --name=value: expected ..."""


def flag(default, accepts):
    """A settings field with its declared range (minflow.declared), "text" meaning any string."""
    return minflow.declared(default, TEXT if accepts == "text" else accepts)


def show(value):
    return str(value).lower() if isinstance(value, bool) else str(value)


def describe(accepts, kind):
    """A declared range in words: "an integer >= 1", "a number in [0, 1)", "one of a, b"."""
    if callable(accepts):
        return accepts(None)
    if isinstance(accepts, tuple):
        return "one of " + ", ".join(map(show, accepts))
    noun, (lo, hi) = "an integer" if kind is int else "a number", (s.strip() for s in accepts[1:-1].split(","))
    return f"{noun} {'>=' if accepts[0] == '[' else '>'} {lo}" if hi == "inf" else f"{noun} in {accepts}"


def accepted(value, accepts, kind):
    if callable(accepts):
        return accepts(value) is None
    if isinstance(accepts, tuple):
        return type(value) is type(accepts[0]) and value in accepts
    lo, hi = (float(s) for s in accepts[1:-1].split(","))
    numeric = int if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, numeric) or not math.isfinite(value):
        return False
    return (lo < value or (accepts[0] == "[" and value == lo)) and (value < hi or (accepts[-1] == "]" and value == hi))


def field_type(f):  # the declared type, or the default's where annotations are strings
    return f.type if isinstance(f.type, type) else type(f.default)


def check_flags(settings):
    """Check every field against its declared range, then the class's RELATIONS (name,
    holds(settings), expected); raise FlagError on the first bad one, TypeError if undeclared."""
    for f in fields(settings):
        if "accepts" not in f.metadata:
            raise TypeError(f"{type(settings).__name__}.{f.name} declares no range; declare it with flag()")
        value, kind = getattr(settings, f.name), field_type(f)
        if not accepted(value, f.metadata["accepts"], kind):
            raise FlagError(f"--{f.name}={show(value)}: expected {describe(f.metadata['accepts'], kind)}")
    for name, holds, expected in getattr(settings, "RELATIONS", ()):
        if not holds(settings):
            values = {f.name: show(getattr(settings, f.name)) for f in fields(settings)}
            raise FlagError(f"--{name}={values[name]}: expected {expected.format(**values)}")


def text_range(description, check=bool):
    """A declared range for a text flag: accepted when `check(value)` holds (by default: when
    it is not empty); `description` says what is expected."""
    return lambda value: None if value is not None and check(value) else description


def parses(parse):
    """A check that `parse(value)` raises no ValueError."""
    def check(value):
        try:
            parse(value)
        except ValueError:
            return False
        return True
    return check


TEXT = text_range("text", lambda v: isinstance(v, str))

# The --device flag of sd35's scripts: "" picks CUDA when there is one.
DEVICE = text_range("empty, cpu, cuda or cuda:N", lambda v: re.fullmatch(r"|cpu|cuda(:\d+)?", v) is not None)
BOOLS = {"true": True, "1": True, "false": False, "0": False}  # the values a bool flag accepts, any case
FIELD_LINE = re.compile(r"\s*([A-Za-z_]\w*):[^#]*#(.*)")  # a settings field with its comment: `name: type = ...  # ...`


def atomic_write(path, data):
    """Write bytes so that a crash at any moment leaves either the old file or the new one,
    never a torn one: a temporary file in the same folder, flushed and fsynced, renamed over
    `path`, then the folder fsynced so the rename itself survives a power cut."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_flags(settings, argv):
    """Read `--key=value` flags (a bare `--key` for a bool means true) as the types of the
    dataclass `settings`' fields -> dict. A value that does not even convert is refused with
    its flag's declared range (`--iters=x: expected an integer >= 0`)."""
    kinds = {f.name: field_type(f) for f in fields(settings)}
    accepts = {f.name: f.metadata.get("accepts", TEXT) for f in fields(settings)}
    out = {}
    for arg in argv:
        key, sep, value = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and not sep and kinds.get(key) is bool:
            sep, value = "=", "true"
        if not arg.startswith("--") or not sep:
            raise FlagError(f"bad argument {arg!r}; expected --key=value")
        if key not in kinds:
            raise FlagError(f"unknown flag --{key}; expected one of: {', '.join('--' + k for k in kinds)}")
        kind = kinds[key]
        try:
            out[key] = BOOLS[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError, OverflowError):
            raise FlagError(f"--{key}={value}: expected {describe(accepts[key], kind)}") from None
    return out


def field_comments(settings):
    """{field: the comment after it on its line} from the class's source, for --help."""
    lines, _ = inspect.getsourcelines(settings)
    return {match[1]: match[2].strip() for match in map(FIELD_LINE.match, lines) if match}


def help_text(settings, base=None):
    """Every flag of a settings class with its default, its accepted range and its comment."""
    comments, rows = field_comments(settings), []
    for f in fields(settings):
        default = getattr(base, f.name) if base is not None else f.default
        rows.append(f"  --{f.name}={show(default)}\n      {describe(f.metadata['accepts'], field_type(f))}"
                    f"{'; ' + comments[f.name] if f.name in comments else ''}")
    doc = (sys.modules[settings.__module__].__doc__ or "").strip().split("\n\n")[0]
    return f"{doc}\n\nFlags (--key=value; a bare --key sets a bool to true):\n" + "\n".join(rows)


def read_flags(settings, argv, base=None):
    """Flags -> a checked settings object (the class's defaults, or `base`, overridden).
    `--help` or `-h` prints every flag and exits."""
    if "--help" in argv or "-h" in argv:
        print(help_text(settings, base))
        raise SystemExit(0)
    values = parse_flags(settings, argv)
    chosen = replace(base, **values) if base is not None else settings(**values)
    check_flags(chosen)
    return chosen


def make_algorithm(spec):
    """'superflow' or a preset with axis overrides, 'stepwise:group_sizing=bins' -> Algorithm."""
    name, *overrides = spec.split(":")
    if name not in minflow.PRESETS:
        raise FlagError(f"unknown algorithm {name!r}; expected one of {', '.join(minflow.PRESETS)}")
    return read_flags(minflow.Algorithm, ["--" + o for o in overrides], base=minflow.PRESETS[name])
