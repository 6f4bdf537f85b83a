"""The text passages shipped in data/passages/ (our own notes and public-domain texts), by name."""
from __future__ import annotations

from pathlib import Path

from ..checks import check_int

#: data/passages/ of the repository (the package is used from a source checkout / editable install).
PASSAGES_DIR = Path(__file__).resolve().parents[2] / "data" / "passages"


def passage_names(directory: Path | None = None) -> list[str]:
    """Names (file stems) of the .txt passages, sorted."""
    directory = Path(directory or PASSAGES_DIR)
    if not directory.is_dir():
        raise FileNotFoundError(f"passage directory {directory} does not exist")
    return sorted(p.stem for p in directory.glob("*.txt"))


def read_passage(name: str, directory: Path | None = None) -> str:
    """The text of one passage; ValueError naming the available ones if ``name`` is unknown."""
    names = passage_names(directory)
    if name not in names:
        raise ValueError(f"name must be one of the passages {names}, got {name!r}")
    return (Path(directory or PASSAGES_DIR) / f"{name}.txt").read_text(encoding="utf-8")


def long_text(tokenizer, n_tokens: int, names: list[str] | None = None, directory: Path | None = None) -> str:
    """At least ``n_tokens`` tokens of text: the passages joined by blank lines, repeated if they are too short.

    For long-input demos (4k-8k tokens); repetition is stated here because it makes later copies of a passage
    predictable from the earlier ones, which changes which tokens matter.
    """
    check_int("n_tokens", n_tokens, 1)
    texts = [read_passage(n, directory).strip() for n in (names or passage_names(directory))]
    joined = "\n\n".join(texts)
    parts = [joined]
    while len(tokenizer("\n\n".join(parts), add_special_tokens=False).input_ids) < n_tokens:
        parts.append(joined)
    return "\n\n".join(parts)
