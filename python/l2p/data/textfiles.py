"""Reading the text files people write for l2p: prompt lists, captions, metadata.csv.

They are UTF-8. Editors on Windows start such files with a byte-order mark, which would
otherwise become an invisible first character of the first prompt or caption; a file saved in
another encoding is a ValueError that names it, not a UnicodeDecodeError that names neither
the file nor what to do.
"""

from __future__ import annotations

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


__all__ = ["read_text", "utf8_errors_named"]
