"""Prompt sets: a folder with a train and a test file of (prompt, metadata) pairs, each either
`train.txt` (one prompt a line, metadata {}) or `train.jsonl` (one JSON object a line with a "prompt"
string; every other key is metadata, e.g. "text", the words an OCR reward should find). Two sets
ship in sd35/prompts/: ocr (text rendering) and general.
"""
import json
from pathlib import Path

PROMPTS_DIR = Path(__file__).parent / "prompts"
SHIPPED_SETS = tuple(sorted(p.name for p in PROMPTS_DIR.iterdir() if p.is_dir()))


def load_prompts(path):
    """(train, test) from a prompt-set folder or a shipped set's name (which wins over a folder of
    that name here; write ./ocr for the folder), or a ValueError of one line naming what is wrong."""
    folder = PROMPTS_DIR / str(path) if str(path) in SHIPPED_SETS else Path(path)
    if not folder.is_dir():
        raise ValueError(f"prompt set {str(path)!r} is neither a folder nor a shipped set; "
                         f"shipped sets: {', '.join(SHIPPED_SETS)}")
    return _load_split(folder, "train"), _load_split(folder, "test")


def _load_split(folder, split):
    found = [f for f in (folder / f"{split}.txt", folder / f"{split}.jsonl") if f.is_file()]
    if len(found) != 1:
        raise ValueError(f"prompt folder {str(folder)!r} {'has both' if found else 'has neither'} {split}.txt and "
                         f"{split}.jsonl; expected exactly one")
    file = found[0]
    try:
        text = file.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark some editors write is dropped
    except UnicodeDecodeError as error:
        raise ValueError(f"{file} is not UTF-8 text (bad byte at offset {error.start}); save it as UTF-8") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    prompts = [_parse_json(line, file, number) for number, line in lines] if file.suffix == ".jsonl" \
        else [(line, {}) for _, line in lines]
    if not prompts:
        raise ValueError(f"{file} holds no prompts; expected at least one non-blank line")
    return prompts


def _parse_json(line, file, number):
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}:{number}: invalid JSON ({error.msg}, column {error.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
        raise ValueError(f'{file}:{number}: expected an object with a non-empty "prompt" string, got {line[:80]}')
    return record["prompt"].strip(), {key: value for key, value in record.items() if key != "prompt"}
