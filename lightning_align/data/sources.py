"""Read rows from JSONL / JSON / Parquet files, a saved `datasets` folder or an in-memory `datasets.Dataset`.

Each row keeps where it came from, so every later error can name the file, the row and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

DataSource = str | Path | Any  # a path, or a `datasets.Dataset`


class DataError(ValueError):
    """Bad input data; the message names the file, row and field, and says what to do."""


@dataclass(frozen=True)
class Row:
    source: str
    number: int  # 1-based; the line number for JSONL files
    fields: dict

    def where(self, field: str | None = None) -> str:
        place = f"{self.source} row {self.number}"
        return f"{place}, field '{field}'" if field else place


def read_rows(source: DataSource) -> list[Row]:
    from lightning_align.assets import resolve_data

    source = resolve_data(source)
    if not isinstance(source, (str, Path)):
        return _dataset_rows(source, name=f"<{type(source).__name__}>")
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise DataError(f"{path}: a DatasetDict without a 'train' split; pass one split's folder")
            others = [name for name in loaded if name != "train"]
            rank_zero_info(
                f"{path}: a DatasetDict; its 'train' split is read as this data"
                + (
                    f" (its other splits, {', '.join(others)}, only for validation when no val_data is given)"
                    * bool(others)
                )
            )
            loaded = loaded["train"]
        return _dataset_rows(loaded, name=str(path))
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return _checked_dicts(pq.read_table(path).to_pylist(), str(path))
    raise DataError(f"{path}: unknown data format '{suffix}'; use .jsonl, .json, .parquet or a datasets folder")


def held_out_rows(source: DataSource) -> tuple[str, list[Row]] | None:
    """A saved DatasetDict's held-out split (validation, valid, val or test, the first present): its name and
    rows; None for any other source."""
    from lightning_align.assets import resolve_data

    source = resolve_data(source)
    if not isinstance(source, (str, Path)) or not Path(source).is_dir():
        return None
    import datasets

    loaded = datasets.load_from_disk(str(source))
    if not isinstance(loaded, datasets.DatasetDict):
        return None
    split = next((name for name in HELD_OUT_SPLITS if name in loaded), None)
    return None if split is None else (split, _dataset_rows(loaded[split], name=f"{source} ({split} split)"))


HELD_OUT_SPLITS = ("validation", "valid", "val", "test")


def _jsonl_rows(path: Path) -> list[Row]:
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # a byte-order mark opens some files
            except UnicodeDecodeError as err:
                raise DataError(f"{path} row {number}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} row {number}: malformed JSON ({err.msg} at column {err.colno})") from None
            rows.append(_checked_dict(fields, str(path), number))
    return rows


def _json_rows(path: Path) -> list[Row]:
    try:
        content = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        if err.msg == "Extra data" and err.lineno > 1:  # one object a line: JSON Lines (`Dataset.to_json`'s default)
            return _jsonl_rows(path)
        raise DataError(f"{path}: malformed JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(content, list):
        raise DataError(f"{path}: expected a JSON list of row objects, got {type(content).__name__}")
    return _checked_dicts(content, str(path))


def _dataset_rows(dataset, name: str) -> list[Row]:
    return _checked_dicts(list(dataset), name)


def _checked_dicts(items: list, name: str) -> list[Row]:
    return [_checked_dict(item, name, number) for number, item in enumerate(items, start=1)]


def _checked_dict(item, name: str, number: int) -> Row:
    if not isinstance(item, dict):
        raise DataError(f"{name} row {number}: expected an object with named fields, got {type(item).__name__}")
    return Row(name, number, item)
