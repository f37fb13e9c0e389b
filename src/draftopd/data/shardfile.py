"""The compact trajectory shard, ``shard_NNNNN.u16.xz``: a byte-deterministic layout of token ids, meant to be
committed (a trajectory pool that outlives a machine) and read back as it was written.

Payload (little-endian), then xz (LZMA2, preset 9, ``lc=0 lp=1 pb=1`` for 2-byte symbols; no timestamps, no file
names, single-threaded: the same rows give the same bytes with the same liblzma):

* ``DOPDTRJ1`` (8 bytes), the header length (uint32) and the header, JSON with sorted keys and no spaces:
  ``{"rows": n, "sources": [names], "width": 2}``;
* per row, ``n`` each: the source's index into ``sources`` (uint16), the prompt length, the response length
  (uint32 each);
* the token ids, uint16: row 0's prompt, row 0's response, row 1's prompt, ...

Reading executes nothing and checks every length, so a damaged or crafted file is a one-line error. Token ids must
fit 16 bits (SmolLM2's vocabulary is 49,152); a target with a larger vocabulary keeps the ``pt`` format.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import struct

import numpy as np

from draftopd import DraftopdError

SUFFIX = ".u16.xz"
MAGIC = b"DOPDTRJ1"
FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9, "lc": 0, "lp": 1, "pb": 1}]
MAX_ID = 0xFFFF


def encode(rows: list[dict]) -> bytes:
    """The uncompressed payload of ``rows`` (dicts with ``source``, ``prompt`` and ``response``)."""
    sources = sorted({str(r.get("source", "")) for r in rows})
    index = {s: i for i, s in enumerate(sources)}
    header = json.dumps({"rows": len(rows), "sources": sources, "width": 2}, sort_keys=True, separators=(",", ":"))
    src = np.array([index[str(r.get("source", ""))] for r in rows], dtype="<u2")
    plen = np.array([len(r["prompt"]) for r in rows], dtype="<u4")
    rlen = np.array([len(r["response"]) for r in rows], dtype="<u4")
    ids = np.array([t for r in rows for t in (*r["prompt"], *r["response"])], dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_ID):
        raise DraftopdError(
            f"token id {int(ids.max() if ids.max() > MAX_ID else ids.min())} does not fit the u16.xz shard format "
            "(ids 0..65535): use shard_format pt for this target"
        )
    head = header.encode()
    parts = [MAGIC, struct.pack("<I", len(head)), head, src.tobytes(), plen.tobytes(), rlen.tobytes()]
    return b"".join(parts) + ids.astype("<u2").tobytes()


def compress(payload: bytes) -> bytes:
    return lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=FILTERS)


def dumps(rows: list[dict]) -> bytes:
    """The bytes of a ``.u16.xz`` shard holding ``rows``."""
    return compress(encode(rows))


def decode(payload: bytes, where: str = "shard") -> list[dict]:
    """Rows from an uncompressed payload; every length is checked (a one-line error names ``where``)."""

    def bad(why: str) -> DraftopdError:
        return DraftopdError(f"{where}: not a trajectory shard ({why})")

    if payload[:8] != MAGIC or len(payload) < 12:
        raise bad("no DOPDTRJ1 header")
    (hlen,) = struct.unpack("<I", payload[8:12])
    try:
        header = json.loads(payload[12 : 12 + hlen])
        n, sources, width = int(header["rows"]), list(header["sources"]), int(header["width"])
    except (ValueError, KeyError, TypeError) as e:
        raise bad(f"header: {e}") from None
    if width != 2 or n < 0 or not all(isinstance(s, str) for s in sources):
        raise bad("header fields")
    pos = 12 + hlen
    if len(payload) < pos + 10 * n:
        raise bad("truncated row table")
    src = np.frombuffer(payload, "<u2", n, pos)
    plen = np.frombuffer(payload, "<u4", n, pos + 2 * n).astype(np.int64)
    rlen = np.frombuffer(payload, "<u4", n, pos + 6 * n).astype(np.int64)
    pos += 10 * n
    total = int(plen.sum() + rlen.sum())
    if len(payload) != pos + 2 * total or (n and int(src.max()) >= len(sources)):
        raise bad("lengths do not match the ids")
    ids = np.frombuffer(payload, "<u2", total, pos).tolist()
    rows, at = [], 0
    for s, p, r in zip(src.tolist(), plen.tolist(), rlen.tolist(), strict=True):
        rows.append({"source": sources[s], "prompt": ids[at : at + p], "response": ids[at + p : at + p + r]})
        at += p + r
    return rows


def loads(data: bytes, where: str = "shard") -> list[dict]:
    """Rows of a ``.u16.xz`` shard's bytes."""
    try:
        payload = lzma.decompress(data, format=lzma.FORMAT_XZ)
    except lzma.LZMAError as e:
        raise DraftopdError(f"{where}: not a trajectory shard (xz: {e})") from None
    return decode(payload, where)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record(data: bytes) -> dict:
    """What a manifest says of a shard: sha256 of its bytes and of its payload (the same rows written by another
    liblzma could compress differently; the payload's hash would not change), sizes, rows and tokens."""
    payload = lzma.decompress(data, format=lzma.FORMAT_XZ)
    rows = decode(payload)
    return {
        "sha256": sha256(data),
        "payload_sha256": sha256(payload),
        "bytes": len(data),
        "rows": len(rows),
        "prompt_tokens": sum(len(r["prompt"]) for r in rows),
        "response_tokens": sum(len(r["response"]) for r in rows),
    }
