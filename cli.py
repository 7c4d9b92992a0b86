"""The command-line side that toy/ and sd35/ share: flags with declared ranges, and files
written so that a crash never leaves a torn one.

Every settings dataclass (toy/train.py's and sd35/train.py's Config, minflow.Algorithm, ...)
declares what each field accepts next to its default, on one line:

    lr: float = flag(1e-3, "(0, 1]")  # AdamW learning rate

and `read_flags` parses `--key=value` arguments into such an object and checks every field,
plus the class's RELATIONS between fields, before any work starts. A bad value is refused with
one line that names the flag, the value and what is expected:

    --eval_every=0: expected an integer >= 1
"""
import math
import os
import re
from dataclasses import field, fields, replace
from pathlib import Path


def flag(default, accepts):
    """A settings field with its declared range, read by `check_flags`."""
    return field(default=default, metadata={"accepts": accepts})


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


# The --device flag of sd35's scripts: "" picks CUDA when there is one.
DEVICE = text_range("empty, cpu, cuda or cuda:N", lambda v: re.fullmatch(r"|cpu|cuda(:\d+)?", v) is not None)


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



class FlagError(ValueError):
    """A flag outside its declared range; the message is one line: --name=value: expected ..."""


def describe(accepts, kind):
    """A declared range in words: "an integer >= 1", "a number in [0, 1)", "one of a, b"."""
    if callable(accepts):
        return accepts(None)
    if isinstance(accepts, tuple):
        return "one of " + ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in accepts)
    if accepts == "text":
        return "text"
    noun = "an integer" if kind is int else "a number"
    lo, hi = (s.strip() for s in accepts[1:-1].split(","))
    if hi == "inf":
        return f"{noun} {'>=' if accepts[0] == '[' else '>'} {lo}"
    return f"{noun} in {accepts}"


def _accepted(value, accepts, kind):
    if callable(accepts):
        return accepts(value) is None
    if isinstance(accepts, tuple):
        return type(value) is type(accepts[0]) and value in accepts
    if accepts == "text":
        return isinstance(value, str)
    lo, hi = (float(s) for s in accepts[1:-1].split(","))
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)) or not math.isfinite(value):
        return False
    return (lo < value or (accepts[0] == "[" and value == lo)) and (value < hi or (accepts[-1] == "]" and value == hi))


def check_flags(settings):
    """Check every field of a settings dataclass against the range it declares with `flag`,
    then the class's RELATIONS between fields; raise FlagError naming the first bad flag.

    A range is an interval "[lo, hi)" over numbers (inf allowed; an int field needs a whole
    number, a float field a finite one), a tuple of the allowed values, "text" (any string),
    or a function value -> None if accepted, else what is expected (called with None for the
    description). A field with no declared range is a bug in the settings class: TypeError.
    """
    for f in fields(settings):
        if "accepts" not in f.metadata:
            raise TypeError(f"{type(settings).__name__}.{f.name} declares no range; declare it with flag()")
        value, kind = getattr(settings, f.name), _field_type(f)
        if not _accepted(value, f.metadata["accepts"], kind):
            raise FlagError(f"--{f.name}={_show(value)}: expected {describe(f.metadata['accepts'], kind)}")
    for name, holds, expected in getattr(settings, "RELATIONS", ()):
        if not holds(settings):
            raise FlagError(f"--{name}={_show(getattr(settings, name))}: expected "
                            f"{expected.format(**{f.name: _show(getattr(settings, f.name)) for f in fields(settings)})}")


def _field_type(f):
    return f.type if isinstance(f.type, type) else type(f.default)


def _show(value):
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_flags(settings, argv):
    """Read `--key=value` flags (a bare `--key` for a bool means true) as the types of the
    dataclass `settings`' fields -> dict. A value that does not even convert is refused with
    its flag's declared range (`--iters=x: expected an integer >= 0`)."""
    kinds = {f.name: _field_type(f) for f in fields(settings)}
    accepts = {f.name: f.metadata.get("accepts", "text") for f in fields(settings)}
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
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                out[key] = value.lower() in ("true", "1")
            else:
                out[key] = kind(value)
        except (ValueError, OverflowError):
            raise FlagError(f"--{key}={value}: expected {describe(accepts[key], kind)}") from None
    return out


def read_flags(settings, argv, base=None):
    """Flags -> a checked settings object (the class's defaults, or `base`, overridden)."""
    values = parse_flags(settings, argv)
    chosen = replace(base, **values) if base is not None else settings(**values)
    check_flags(chosen)
    return chosen
