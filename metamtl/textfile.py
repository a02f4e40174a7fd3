"""Text files users hand to metamtl (YAML configs, CSV lists): decoded strictly, refused clearly.

A file that is not valid text in a known encoding gets the caller's error type naming the file,
the line and the offending bytes, and how to fix it, instead of a ``UnicodeDecodeError`` traceback.
UTF-8 (with or without a byte-order mark) is the format; UTF-16/32 files are read when they start
with their byte-order mark (what Windows editors write as "Unicode"), since that is unambiguous.
"""
from __future__ import annotations

import codecs

#: byte-order marks that name their encoding unambiguously (longest first: UTF-32-LE starts like UTF-16-LE)
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))


def decode_text(data: bytes, where: str, error: type[Exception]) -> str:
    """``data`` as text: UTF-8, or UTF-8/16/32 announced by a byte-order mark.

    Raises ``error`` (e.g. :class:`~metamtl.errors.ConfigError`) naming ``where``, the line and the
    bytes that are not UTF-8, and how to re-save the file.
    """
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), "utf-8")
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start:min(exc.end, exc.start + 8)]
        hint = " (it looks like Latin-1/Windows-1252 text)" if encoding == "utf-8" and _looks_single_byte(data) else ""
        raise error(
            f"{where} is not {encoding.upper().replace('-SIG', '')} text: line {line}, byte offset {exc.start} "
            f"holds {bad!r}, which is not valid {exc.encoding}{hint}; save the file as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8 FILE > NEW`) and try again"
        ) from None


def _looks_single_byte(data: bytes) -> bool:
    """Whether the non-ASCII bytes look like a single-byte encoding (no UTF-8 lead/continuation pattern)."""
    high = [b for b in data[:65536] if b >= 0x80]
    return bool(high) and sum(0x80 <= b < 0xC0 for b in high) < len(high) / 2
