"""Where the rows come from, and which of them are kept.

A *source* turns a file or a hub data set into rows `{"prompt": str, "response": str, ...}` (any
extra keys travel along as metadata); a built-in task (spinlab.tasks) is a source too.
`validate_rows` keeps the rows with a non-empty prompt and response and an unseen prompt, and
reports a bad one as a DataError naming the file, the row and the field (or skips it).
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from spinlab.errors import ConfigError, DataError, NotFoundError
from spinlab.rundir import read_jsonl

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class _Invalid(str):
    """A record that could not be parsed; validate_rows reports or skips it."""


def _line_problem(n: int, err: ValueError) -> _Invalid:
    if isinstance(err, UnicodeDecodeError):
        return _Invalid(
            f"line {n} is not UTF-8 text (byte {err.object[err.start]:#04x} at column {err.start + 1}); "
            "save the file as UTF-8"
        )
    return _Invalid(f"line {n} is not valid JSON ({err.msg}, column {err.colno})")


def _load_file(path: str, split: str = "train") -> list:
    """Records of a JSON, JSONL, Parquet or CSV file; a JSONL line that cannot be read is kept as
    an _Invalid record naming its line, so that bad_rows=skip can drop it."""
    key = f"data.source.{split}"
    file = Path(path)
    if file.is_dir():
        raise DataError(f"{path}: is a directory, not a file; set {key} to a data file inside it")
    if not file.is_file():
        raise DataError(f"{path}: file not found (set {key} to an existing file)")
    suffix = file.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(FILE_FORMATS)}")
    if file.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty ({key}); it needs one row per example")
    if suffix == ".jsonl":
        records = read_jsonl(file, invalid=_line_problem)
        if not records:
            raise DataError(f"{path}: the file holds only blank lines ({key}); it needs one row per example")
        return records
    import datasets

    try:
        return list(datasets.load_dataset(FILE_FORMATS[suffix], data_files=str(path), split="train"))
    except Exception as err:  # datasets wraps parse errors in several types of its own
        cause = err
        while cause.__cause__ is not None and not isinstance(cause, UnicodeDecodeError):
            cause = cause.__cause__
        detail = "it is not UTF-8 text; save it as UTF-8" if isinstance(cause, UnicodeDecodeError) else ""
        raise DataError(
            f"{path}: cannot be read as {FILE_FORMATS[suffix]} ({type(err).__name__}: {err}) {detail}".rstrip()
        ) from err


def _to_rows(records, origin: str, prompt_field: str, response_field: str | None, messages_field):
    rows = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            problem = rec if isinstance(rec, _Invalid) else f"is a {type(rec).__name__}, not an object"
            rows.append({"_origin": (origin, i + 1), "_problem": problem})
            continue
        row = dict(rec)
        if messages_field is not None:
            prompt, response = _first_exchange(row.get(messages_field))
        else:
            prompt, response = row.get(prompt_field), row.get(response_field)
        row.pop(prompt_field, None)
        row.pop(response_field, None)
        row.pop(messages_field, None)
        rows.append({"prompt": prompt, "response": response, **row, "_origin": (origin, i + 1)})
    return rows


def _first_exchange(messages):
    """First user turn and the assistant turn answering it (UltraChat's layout)."""
    if not isinstance(messages, list):
        return None, None
    for a, b in itertools.pairwise(messages):
        roles = (a.get("role"), b.get("role")) if isinstance(a, dict) and isinstance(b, dict) else ()
        if roles == ("user", "assistant"):
            return a.get("content"), b.get("content")
    return None, None


class LocalFileSource:
    """JSON, JSONL, Parquet or CSV files, one per split, read with `datasets`."""

    def __init__(
        self,
        train: str,
        validation: str | None = None,
        test: str | None = None,
        prompt_field: str = "prompt",
        response_field: str = "response",
        messages_field: str | None = None,
    ):
        self.paths = {"train": train, "validation": validation, "test": test}
        self.fields = (prompt_field, response_field, messages_field)

    def load(self, split: str) -> list[dict]:
        path = self.paths.get(split)
        if path is None:
            return []
        return _to_rows(_load_file(path, split), path, *self.fields)


class HubSource:
    """A Hugging Face hub data set (UltraChat200k by default); needs the network or a cache."""

    def __init__(
        self,
        name: str,
        splits: dict | None = None,
        prompt_field: str = "prompt",
        response_field: str | None = None,
        messages_field: str | None = "messages",
    ):
        self.name = name
        self.splits = dict(splits or {"train": "train"})
        self.fields = (prompt_field, response_field, messages_field)

    def load(self, split: str) -> list[dict]:
        if split not in self.splits:
            return []
        import datasets

        try:
            ds = datasets.load_dataset(self.name, split=self.splits[split])
        except (ConnectionError, OSError) as err:
            raise NotFoundError(
                f"cannot load data set {self.name!r} split {self.splits[split]!r} from the hub: "
                "it is not cached and the hub is unreachable (HF_HUB_OFFLINE=1?). Download it on a "
                "machine with network access or use data=local with a file."
            ) from err
        return _to_rows(ds, f"{self.name}[{self.splits[split]}]", *self.fields)


def validate_rows(
    rows: list[dict], bad_rows: str = "error", check=None, origin: str = "<rows>", limit: int | None = None
) -> tuple[list[dict], int]:
    """Keep rows with a non-empty string prompt and response and an unseen prompt.

    `check(row)` may name a further problem (a string) or return None. With bad_rows="error"
    the first bad row raises a DataError naming file, row (1-based; in JSON Lines files, the
    n-th non-blank line) and field; with "skip" bad rows are dropped and counted. With `limit`,
    reading stops once that many rows are kept.
    """
    if bad_rows not in ("error", "skip"):
        raise ConfigError(f"data.bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    kept, seen, skipped = [], set(), 0
    for position, row in enumerate(rows):
        if limit is not None and len(kept) >= limit:
            break
        where, index = row.pop("_origin", (origin, position + 1))
        problem = row.pop("_problem", None)
        for field in () if problem else ("prompt", "response"):
            value = row.get(field)
            if value is None:
                problem = f"field {field!r} is missing"
            elif not isinstance(value, str):
                problem = f"field {field!r} must be a string, got {type(value).__name__}"
            elif not value.strip():
                problem = f"field {field!r} is empty"
            if problem:
                break
        if problem is None and row["prompt"] in seen:
            problem = "field 'prompt' duplicates an earlier row"
        if problem is None and check is not None:
            problem = check(row)
        if problem:
            if bad_rows == "error":
                raise DataError(
                    f"{where}: row {index}: {problem}. Fix the row, or set data.bad_rows=skip "
                    "to drop such rows (they are counted in the log)."
                )
            skipped += 1
            continue
        seen.add(row["prompt"])
        kept.append(row)
    if skipped:
        log.warning("skipped %d bad rows (data.bad_rows=skip)", skipped)
    return kept, skipped
