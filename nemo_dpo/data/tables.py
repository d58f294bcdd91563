"""Preference rows from Parquet files and local Hugging Face ``datasets`` folders (optional extra ``datasets``).

Rows become NeMo Aligner records through a :class:`~nemo_dpo.data.formats.RecordFormat`
and are checked like JSONL lines; errors name the file or folder and the row,
counted from 0 as ``dataset[i]`` counts them. Nothing is downloaded: a folder
is read with ``datasets.load_from_disk`` (what ``save_to_disk`` wrote), which
memory-maps its Arrow files in place and writes no cache.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Iterable, Iterator

from nemo_dpo.data.formats import RecordFormat
from nemo_dpo.data.records import LocatedRecords, PreferenceDataError

__all__ = ["DATASET_MARKERS", "TableRecords", "is_datasets_folder", "load_datasets_folder", "load_parquet"]

# Rows converted to Python at a time: memory follows the kept records, not the file.
_BATCH_ROWS = 1024
# What datasets' save_to_disk writes: one split, or a DatasetDict of splits.
DATASET_MARKERS = ("state.json", "dataset_dict.json")
_EXTRA = "pip install 'nemo-dpo[datasets]'"


class TableRecords(LocatedRecords):
    """Records of one Parquet file or ``datasets`` folder: record ``i`` is row ``i``."""

    def where(self, index: int) -> str:
        return f"{self.source}, row {index}"


def _records(rows: Iterable[dict], source: str, record_format: RecordFormat) -> TableRecords:
    records = [record_format.to_record(row, f"{source}, row {number}") for number, row in enumerate(rows)]
    if not records:
        raise PreferenceDataError(f"{source}: no records")
    return TableRecords(records, source)


def _import(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"reading {what} needs the optional dependency {module.split('.')[0]}: {_EXTRA}") from None


def load_parquet(path: str | Path, record_format: RecordFormat | None = None) -> TableRecords:
    """The preference records of a Parquet file, each row checked (errors name the file and row)."""
    parquet = _import("pyarrow.parquet", "Parquet files")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference data file not found: {path}")
    try:
        table = parquet.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own error types for a damaged or foreign file
        raise PreferenceDataError(f"{path}: not a readable Parquet file ({err})") from None

    def rows() -> Iterator[dict]:
        for batch in table.iter_batches(batch_size=_BATCH_ROWS):
            yield from batch.to_pylist()

    return _records(rows(), str(path), record_format or RecordFormat())


def is_datasets_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``datasets``' ``save_to_disk`` (a split or a ``DatasetDict``)."""
    return Path(path).is_dir() and any((Path(path) / marker).is_file() for marker in DATASET_MARKERS)


def load_datasets_folder(path: str | Path, split: str, record_format: RecordFormat | None = None) -> TableRecords:
    """The preference records of a ``save_to_disk`` folder; of a ``DatasetDict``, its ``split`` (or only) split."""
    datasets = _import("datasets", "a datasets folder")
    path = Path(path)
    loaded = datasets.load_from_disk(str(path))
    source = str(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded and len(loaded) != 1:
            raise PreferenceDataError(
                f"{path}: a DatasetDict without a {split!r} split (it has {', '.join(loaded)}); "
                f"name the split's folder instead, e.g. {path / next(iter(loaded))}"
            )
        split = split if split in loaded else next(iter(loaded))
        loaded, source = loaded[split], f"{path}[{split}]"
    return _records(iter(loaded), source, record_format or RecordFormat())
