"""Reading preference JSONL files line by line, in memory bounded by the longest allowed record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO, Iterator

from nemo_dpo.data.formats import RecordFormat
from nemo_dpo.data.records import LocatedRecords, PreferenceDataError

__all__ = ["JsonlRecords", "load_jsonl"]

# Bytes read at a time while skipping the rest of an over-long line.
_SKIP_CHUNK = 1 << 16
_BOM = b"\xef\xbb\xbf"
# The first bytes of a NumPy .npy file, such as NeMo Aligner's packed DPO data.
_NPY_MAGIC = b"\x93NUMPY"


class JsonlRecords(LocatedRecords):
    """Records of one JSONL file that remember the line each came from, for error messages.

    ``too_long_lines`` are the 1-based numbers of lines skipped for exceeding ``max_record_chars``.
    """

    def __init__(
        self, records: list[dict], path: str | Path, line_numbers: list[int], too_long_lines: list[int] | None = None
    ):
        super().__init__(records, str(path))
        self.path = str(path)
        self.line_numbers = line_numbers
        self.too_long_lines = too_long_lines or []

    def where(self, index: int) -> str:
        return f"{self.path}:{self.line_numbers[index]}"


def _open(path: Path) -> BinaryIO:
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a preference JSONL file")
    if not path.exists():
        raise FileNotFoundError(f"preference data file not found: {path}")
    if not path.is_file():
        # A device or pipe may never end (/dev/zero): only regular files have a known size.
        raise PreferenceDataError(f"{path}: not a regular file (a device, pipe or socket); give a JSONL file")
    return path.open("rb")


def _lines(stream: BinaryIO, byte_limit: int | None) -> Iterator[tuple[int, int, bytes | None]]:
    """(line number, byte offset, bytes) per line; bytes is None for a line over ``byte_limit``.

    An over-long line is read past in fixed chunks and never held whole.
    """
    line_number = offset = 0
    while True:
        line = stream.readline(-1 if byte_limit is None else byte_limit + 1)
        if not line:
            return
        line_number, start = line_number + 1, offset
        offset += len(line)
        if byte_limit is not None and len(line) > byte_limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = stream.readline(_SKIP_CHUNK)
                offset += len(line)
            yield line_number, start, None
        else:
            yield line_number, start, line


def _decode(line: bytes, where: str, offset: int) -> str:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PreferenceDataError(
            f"{where}: invalid UTF-8 (byte 0x{line[err.start]:02x} at offset {err.start} of the line, "
            f"{offset + err.start} of the file); JSONL data must be UTF-8 text, is this a binary file?"
        ) from None
    if "\x00" in text:
        raise PreferenceDataError(
            f"{where}: a NUL byte at offset {text.index(chr(0))} of the line; JSONL data is text, "
            "is this a binary file?"
        )
    return text


def _parse(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PreferenceDataError(f"{where}: malformed JSON ({err.msg}, column {err.colno})") from None
    except RecursionError:
        raise PreferenceDataError(f"{where}: malformed JSON (nested too deeply)") from None
    except ValueError as err:  # e.g. an integer over Python's digit limit
        raise PreferenceDataError(f"{where}: malformed JSON ({err})") from None


def load_jsonl(
    path: str | Path, max_record_chars: int | None = None, record_format: RecordFormat | None = None
) -> JsonlRecords:
    """Read and validate a preference JSONL file; blank lines are skipped.

    Errors name the file and the 1-based line: malformed JSON, invalid UTF-8, missing keys,
    bad values. Lines longer than ``max_record_chars`` characters (None: no limit) are
    skipped unparsed and listed in ``too_long_lines``; memory stays bounded by that limit.
    ``record_format`` maps each line to a NeMo Aligner record (default: NeMo Aligner's
    names, TRL's detected; see :mod:`nemo_dpo.data.formats`).
    """
    path = Path(path)
    record_format = RecordFormat() if record_format is None else record_format
    # A UTF-8 character takes at most 4 bytes, so a line within the character limit
    # always fits the byte limit; lines between the two are decoded and then measured.
    byte_limit = None if max_record_chars is None else 4 * max_record_chars
    records, line_numbers, too_long = [], [], []
    with _open(path) as stream:
        for line_number, offset, line in _lines(stream, byte_limit):
            where = f"{path}:{line_number}"
            if line is None:
                too_long.append(line_number)
                continue
            if line_number == 1 and line.startswith(_NPY_MAGIC):
                raise PreferenceDataError(
                    f"{path}: a NumPy .npy file, not JSONL text (packed .npy data needs model.data.data_impl="
                    "packed_jsonl)"
                )
            if line_number == 1 and line.startswith(_BOM):  # editors on Windows write one
                line, offset = line[len(_BOM) :], offset + len(_BOM)
            text = _decode(line, where, offset)
            if not text.strip():
                continue
            if max_record_chars is not None and len(text.rstrip("\r\n")) > max_record_chars:
                too_long.append(line_number)
                continue
            records.append(record_format.to_record(_parse(text, where), where))
            line_numbers.append(line_number)
    if not records:
        skipped = (
            f" ({len(too_long)} line(s) longer than max_record_chars={max_record_chars} skipped, "
            f"first at {path}:{too_long[0]})"
            if too_long
            else ""
        )
        raise PreferenceDataError(f"{path}: no records{skipped}")
    return JsonlRecords(records, path, line_numbers, too_long)
