"""Reading the text files people write for l2p: prompt lists, captions, metadata.csv.

They are UTF-8. Editors on Windows start such files with a byte-order mark (Excel its CSV
files too), which would otherwise become an invisible first character of the first prompt or
caption, or of the first column's name; a file saved in another encoding is a ValueError that
names it, not a UnicodeDecodeError that names neither the file nor what to do.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def utf8_errors_named(path: str | os.PathLike) -> Iterator[None]:
    """Decoding errors while reading ``path`` in the block come out as a ValueError naming it."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason}: byte 0x{exc.object[exc.start]:02x}); "
                         "save it with the UTF-8 encoding") from None


def read_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file, without the byte-order mark a Windows editor may have put first."""
    with utf8_errors_named(path):
        return Path(path).read_text("utf-8-sig")


def read_csv(path: str | os.PathLike) -> tuple[list[str], list[dict[str, str | None]]]:
    """The column names and the rows (dicts, as ``csv.DictReader`` gives them) of a UTF-8 CSV
    file. Parsed strictly: a field that opens a double quote and never closes it would
    otherwise swallow every row after it into one caption, and text after a closing quote
    would silently lose the quotes; both are a ValueError naming the line."""
    with utf8_errors_named(path), Path(path).open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, strict=True)
        rows = []
        start = 1
        try:
            fields = list(reader.fieldnames or [])  # reads the header, so that line_num counts it
            while True:
                start = reader.line_num + 1  # the line the next row starts on
                try:
                    rows.append(next(reader))
                except StopIteration:
                    break
        except csv.Error as exc:
            raise ValueError(f"{path} line {start}: {exc}; a field that starts with a double quote must end "
                             'with one, and a quote inside it is written twice ("")') from None
        return fields, rows


__all__ = ["read_csv", "read_text", "utf8_errors_named"]
