"""List pagination (AIP-158) shared by every List method: an opaque page token
that stands for an offset, and a bounded page size."""
from __future__ import annotations

import base64
import binascii

from gradwire_server.errors import FieldViolation, cut, invalid_argument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_MAX_OFFSET = 2**31  # far beyond any list this server holds


def page(token: str, page_size: int) -> tuple[int, int]:
    """(offset, size) of the page a List request asks for; INVALID_ARGUMENT for a
    negative or too large page_size or a token this server did not issue."""
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise invalid_argument([FieldViolation("page_size", f"must be in [0, {MAX_PAGE_SIZE}], got {page_size}")])
    return _offset(token), page_size or DEFAULT_PAGE_SIZE


def next_token(offset: int, size: int, fetched: int) -> str:
    """The next page's token when more than `size` items were fetched; else ""."""
    if fetched <= size:
        return ""
    return base64.urlsafe_b64encode(f"offset:{offset + size}".encode()).decode()


def _offset(token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, offset = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind == "offset" and offset.isascii() and offset.isdigit() and int(offset) <= _MAX_OFFSET:
            return int(offset)
    except (binascii.Error, UnicodeError, ValueError):
        pass
    raise invalid_argument([FieldViolation("page_token", f"{cut(token)!r} is not a page token of this server")])
