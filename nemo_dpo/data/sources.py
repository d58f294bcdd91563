"""Which reader a preference data path needs: JSONL, Parquet or a ``datasets`` folder."""

from __future__ import annotations

import logging
from pathlib import Path

from nemo_dpo.data.formats import NEMO_FIELD_NAMES, FieldNames, RecordFormat
from nemo_dpo.data.jsonl import load_jsonl
from nemo_dpo.data.records import LocatedRecords
from nemo_dpo.data.tables import DATASET_MARKERS, is_datasets_folder, load_datasets_folder, load_parquet

__all__ = ["PARQUET_SUFFIXES", "load_preference_records"]

logger = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")


def load_preference_records(
    path: str | Path, split: str, max_record_chars: int | None = None, field_names: FieldNames = NEMO_FIELD_NAMES
) -> LocatedRecords:
    """The checked NeMo Aligner records of ``path``: a folder written by ``datasets``' ``save_to_disk``
    (``split`` picks a ``DatasetDict``'s split), a ``.parquet`` file, or else a JSONL file.

    ``field_names`` map the source's fields (see :mod:`nemo_dpo.data.formats`);
    ``max_record_chars`` bounds JSONL lines (tables are bounded by the dataset, record by record).
    """
    path = Path(path)
    record_format = RecordFormat(field_names)
    if path.is_dir() and not is_datasets_folder(path):
        raise IsADirectoryError(
            f"{path}: is a directory, not a preference JSONL file, Parquet file or datasets folder "
            f"(save_to_disk writes {' or '.join(DATASET_MARKERS)})"
        )
    if path.is_dir():
        records = load_datasets_folder(path, split, record_format)
    elif path.suffix.lower() in PARQUET_SUFFIXES:
        records = load_parquet(path, record_format)
    else:
        records = load_jsonl(path, max_record_chars, record_format)
    if record_format.detected != field_names:
        logger.info("%s: read with TRL's field names (%s)", path, record_format.describe())
    return records
