"""List pagination (AIP-158) shared by every List method: an opaque page token that
holds the sort key of the last item returned (so items deleted between pages skip
nothing, and items added appear once), tied to the list it came from, and a
bounded page size; a page of large items ends early (PAGE_BYTES)."""
from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence

from google.protobuf.message import Message

from gradwire_server.errors import FieldViolation, cut, invalid_argument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
PAGE_BYTES = 2 * 2**20  # a page ends early rather than outgrow gRPC's 4 MiB message limit


def page(token: str, page_size: int, listing: str) -> tuple[list | None, int]:
    """(the sort key the page starts after, None for the first page; its size) of a List
    request of `listing` (the list and what narrows it, e.g. "checkpoints of run-1");
    INVALID_ARGUMENT for a negative or too large page_size, or a token this server did
    not issue for that listing."""
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise invalid_argument([FieldViolation("page_size", f"must be in [0, {MAX_PAGE_SIZE}], got {page_size}")])
    return _after(token, listing), page_size or DEFAULT_PAGE_SIZE


def fitting(items: Sequence[Message], budget: int = PAGE_BYTES) -> int:
    """How many of `items`, from the first, one page holds within `budget` bytes (at least one)."""
    total = 0
    for count, item in enumerate(items):
        total += item.ByteSize()
        if total > budget and count:
            return count
    return len(items)


def next_token(listing: str, last_key: list | None, more: bool) -> str:
    """The next page's token, after the page's last item, when `more` items follow; else ""."""
    if not more or last_key is None:
        return ""
    return base64.urlsafe_b64encode(json.dumps({"list": listing, "after": last_key}).encode()).decode()


def _after(token: str, listing: str) -> list | None:
    if not token:
        return None
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()).decode())
        if isinstance(decoded, dict) and decoded.get("list") == listing and isinstance(decoded.get("after"), list):
            return decoded["after"]
    except (binascii.Error, UnicodeError, ValueError):
        pass
    raise invalid_argument([FieldViolation("page_token", f"{cut(token)!r} is not a page token of this server "
                                                         f"for {cut(listing)}")])
