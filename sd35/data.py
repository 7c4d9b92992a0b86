"""Prompt sets: a train and a test list of (prompt, metadata) pairs.

A prompt set is a folder with one train file and one test file, each either

- ``train.txt`` / ``test.txt``: one prompt per line, blank lines skipped; metadata is ``{}``;
- ``train.jsonl`` / ``test.jsonl``: one JSON object per line with a ``"prompt"``
  string; every other key becomes that prompt's metadata (e.g. ``"text"``, the
  words an OCR reward should find in the image).

Two sets ship in ``sd35/prompts/``: ``ocr`` (text rendering) and ``general``.
"""

import json
from pathlib import Path

PROMPTS_DIR = Path(__file__).parent / "prompts"
SHIPPED_SETS = tuple(sorted(p.name for p in PROMPTS_DIR.iterdir() if p.is_dir()))

PromptList = list[tuple[str, dict]]


def load_prompts(path: str | Path) -> tuple[PromptList, PromptList]:
    """Load ``(train, test)`` from a prompt-set folder, or from a shipped set by name.

    A shipped set's name (``"ocr"``, ``"general"``) wins over a folder of the
    same name in the working directory; write ``./ocr`` to mean the folder.
    Raises ``ValueError`` with a one-line message for a missing folder or file,
    an empty file, a file that is not UTF-8, or a malformed JSON line.
    """
    folder = PROMPTS_DIR / str(path) if str(path) in SHIPPED_SETS else Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"prompt set {str(path)!r} is neither a folder nor a shipped set; shipped sets: {', '.join(SHIPPED_SETS)}"
        )
    return _load_split(folder, "train"), _load_split(folder, "test")


def _load_split(folder: Path, split: str) -> PromptList:
    candidates = [folder / f"{split}.txt", folder / f"{split}.jsonl"]
    found = [file for file in candidates if file.is_file()]
    if len(found) != 1:
        problem = "has both" if found else "has neither"
        raise ValueError(f"prompt folder {str(folder)!r} {problem} {split}.txt and {split}.jsonl; expected exactly one")
    file = found[0]
    try:
        # utf-8-sig also accepts (and drops) the byte-order mark some editors write.
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{file} is not UTF-8 text (bad byte at offset {error.start}); save it as UTF-8") from None
    prompts = _parse_jsonl(text, file) if file.suffix == ".jsonl" else _parse_txt(text)
    if not prompts:
        raise ValueError(f"{file} holds no prompts; expected at least one non-blank line")
    return prompts


def _parse_txt(text: str) -> PromptList:
    return [(line.strip(), {}) for line in text.splitlines() if line.strip()]


def _parse_jsonl(text: str, file: Path) -> PromptList:
    prompts = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}:{line_number}: invalid JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise ValueError(
                f'{file}:{line_number}: expected an object with a non-empty "prompt" string, got {line.strip()[:80]}'
            )
        metadata = {key: value for key, value in record.items() if key != "prompt"}
        prompts.append((record["prompt"].strip(), metadata))
    return prompts
