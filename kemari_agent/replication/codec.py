"""Records of the replication stream, their encoding, and an incremental decoder.

Sans-I/O: nothing here touches a socket, a clock or a thread, so every byte
path can be property-tested and fuzzed. The byte layouts are specified in
docs/stream-format.md; change the two together.

Decoding hands back memoryviews into the received chunk (or, for a record
split across chunks, into one joined copy), so a page batch reaches the
guest image with one copy on the receive side.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar

import lz4.block as lz4_block
from zlib_ng import zlib_ng

from .errors import (
    MalformedRecord,
    NotAKemariStream,
    RecordTooLarge,
    StreamError,
    TruncatedStream,
    UnknownRecordType,
    UnsupportedVersion,
)

VERSION = 2          # what this node sends (a primary answers in its peer's version)
MIN_VERSION = 1      # the oldest version it still speaks
MAGIC = b"KEMARIRS"
PAGE_SIZE = 4096
SECTOR_SIZE = 512
HEADER = struct.Struct("<HHI")
HEADER_SIZE = HEADER.size
ALIGN = 8
MAX_BODY = 64 << 20
MAX_PAGES_PER_RECORD = 4096
MAX_NAME = 255
MAX_ERROR_MESSAGE = 4096
PFN_MASK = (1 << 52) - 1
ENTRY_ZERO = 1 << 63
ENTRY_RESERVED = ((1 << 64) - 1) & ~(PFN_MASK | ENTRY_ZERO)
ZERO_PAGE = bytes(PAGE_SIZE)

Buffer = bytes | bytearray | memoryview


class RecordType(IntEnum):
    HELLO = 1
    PAGES = 2
    VCPU = 3
    DEVICE = 4
    DISK_WRITE = 5
    CHECKPOINT_END = 6
    ACK = 7
    HEARTBEAT = 8
    SYNC_PROGRESS = 9
    ERROR = 10
    GOODBYE = 11
    PAGES_LZ4 = 12
    SYNC_ACK = 13
    PAGES_XOR = 14
    BLOB_XOR = 15
    PAGES_PATCH = 16


class RecordFlag(IntFlag):
    # A receiver that does not know the record's type skips it instead of failing.
    SKIPPABLE = 0x0001


class Role(IntEnum):
    PRIMARY = 1
    SECONDARY = 2


class HelloFlag(IntFlag):
    # Primary: this session starts with a full copy of the guest (pre-copy).
    FULL_SYNC = 0x01
    # Secondary: it holds a complete checkpoint (generation, checkpoint_seq).
    HAVE_CHECKPOINT = 0x02
    # Primary (version 2): the first checkpoint holds only what changed since the
    # secondary's checkpoint (a resync), staged and applied whole like any other.
    RESYNC = 0x04
    # Primary (version 2): it let output go that the secondary's checkpoint does not
    # cover (it ran unprotected): the secondary is outdated until its next commit.
    UNPROTECTED = 0x08


class Capability(IntFlag):
    ZERO_PAGES = 0x01
    DISK_WRITES = 0x02
    # The receiver decodes PAGES_LZ4; the primary may send it once both HELLOs had it.
    LZ4_PAGES = 0x04
    # The secondary answers each SYNC_PROGRESS with a SYNC_ACK once the round is applied.
    SYNC_ACKS = 0x08
    # The secondary decodes PAGES_XOR and BLOB_XOR (deltas against its own copy).
    DELTAS = 0x10
    # The secondary decodes PAGES_PATCH (a page's changed bytes against its own copy).
    PATCHES = 0x20


DEFAULT_CAPABILITIES = (Capability.ZERO_PAGES | Capability.DISK_WRITES | Capability.LZ4_PAGES
                        | Capability.SYNC_ACKS | Capability.DELTAS | Capability.PATCHES)
# A compressed batch is sent only if it is at most this fraction of its pages:
# less saves too few bytes to pay for the receiver's decompression.
LZ4_WORTH = 0.9


class GoodbyeReason(IntEnum):
    SHUTDOWN = 1
    # Primary: the checkpoint named in the GOODBYE is final; the guest is stopped
    # and the secondary may be promoted with zero loss (switchover).
    HANDOVER = 2


# Plain ints: inverting a one-member IntFlag gives 0 on Python 3.11.
_RECORD_FLAGS = int(RecordFlag.SKIPPABLE)
_HELLO_FLAGS = {1: int(HelloFlag.FULL_SYNC | HelloFlag.HAVE_CHECKPOINT),
                2: int(HelloFlag.FULL_SYNC | HelloFlag.HAVE_CHECKPOINT | HelloFlag.RESYNC
                       | HelloFlag.UNPROTECTED)}
MAX_HELLO_CONFIG = 4096


def _pad(length: int) -> int:
    return -length % ALIGN


_PADDING = bytes(ALIGN)
_II = struct.Struct("<II")
_IIQ = struct.Struct("<IIQ")
_QQ = struct.Struct("<QQ")
_HELLO = struct.Struct("<8sHBBIQQQQ")
_HELLO_V2 = struct.Struct("<HHI")      # name length, config length, reserved
_END = struct.Struct("<QQIIQII")
_SYNC = struct.Struct("<IIQQ")


def _require(cond: bool, what: str) -> None:
    # A message with values in it is built where it is raised, not here: an
    # f-string argument would be formatted for every record that is fine.
    if not cond:
        raise MalformedRecord(what)


def _u64(value: int, what: str) -> None:
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{what} out of range: {value}")


def _u32(value: int, what: str) -> None:
    if not 0 <= value < 1 << 32:
        raise ValueError(f"{what} out of range: {value}")


@dataclass(frozen=True)
class Hello:
    """First record each way: who speaks, which VM, and how far its state goes.

    `config` (version 2) is the sender's replicated-VM settings that must match
    the peer's (e.g. {"image": ..., "disk_mode": ...}), as text key -> text value."""

    TYPE: ClassVar[RecordType] = RecordType.HELLO
    name: str
    role: Role
    generation: int
    checkpoint_seq: int
    memory_size: int
    flags: HelloFlag = HelloFlag(0)
    capabilities: int = int(DEFAULT_CAPABILITIES)
    version: int = VERSION
    page_size: int = PAGE_SIZE
    config: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        raw = self.name.encode()
        if not 1 <= len(raw) <= MAX_NAME:
            raise ValueError(f"VM name must be 1..{MAX_NAME} bytes of UTF-8")
        for what in ("generation", "checkpoint_seq", "memory_size", "capabilities"):
            _u64(getattr(self, what), what)
        if not 0 <= self.version < 1 << 16:
            raise ValueError("version out of range")
        if self.version < 2 and self.config:
            raise ValueError("a version-1 HELLO carries no config")
        if len(self._config_bytes()) > MAX_HELLO_CONFIG:
            raise ValueError(f"HELLO config longer than {MAX_HELLO_CONFIG} bytes")

    def _config_bytes(self) -> bytes:
        if not self.config:
            return b""
        return json.dumps(dict(self.config), sort_keys=True, separators=(",", ":")).encode()

    def body_parts(self) -> list[Buffer]:
        fixed = _HELLO.pack(
            MAGIC, self.version, int(self.role), int(self.flags), self.page_size,
            self.generation, self.checkpoint_seq, self.memory_size, self.capabilities,
        )
        name = self.name.encode()
        if self.version < 2:
            return [fixed, name]
        config = self._config_bytes()
        return [fixed, _HELLO_V2.pack(len(name), len(config), 0), name, config]

    @classmethod
    def from_body(cls, body: memoryview) -> Hello:
        if len(body) < 10 or bytes(body[:8]) != MAGIC:
            raise NotAKemariStream("HELLO without the Kemari magic: not a Kemari stream")
        (version,) = struct.unpack_from("<H", body, 8)
        if not MIN_VERSION <= version <= VERSION:
            raise UnsupportedVersion(
                f"peer speaks replication stream version {version}, this node speaks "
                f"{MIN_VERSION} to {VERSION}"
            )
        _require(len(body) > _HELLO.size, "HELLO too short")
        _, _, role, flags, page_size, gen, seq, mem, caps = _HELLO.unpack_from(body)
        if role not in (Role.PRIMARY, Role.SECONDARY):
            raise MalformedRecord(f"HELLO with unknown role {role}")
        if flags & ~_HELLO_FLAGS[version]:
            raise MalformedRecord(f"HELLO with unknown flags {flags:#x}")
        if page_size != PAGE_SIZE:
            raise MalformedRecord(f"HELLO with page size {page_size}, expected 4096")
        config: tuple[tuple[str, str], ...] = ()
        if version < 2:
            name_raw = bytes(body[_HELLO.size:])
        else:
            _require(len(body) >= _HELLO.size + _HELLO_V2.size, "HELLO too short")
            name_len, config_len, reserved = _HELLO_V2.unpack_from(body, _HELLO.size)
            _require(reserved == 0, "HELLO reserved field not zero")
            start = _HELLO.size + _HELLO_V2.size
            _require(len(body) == start + name_len + config_len,
                     "HELLO name and config lengths do not match its size")
            _require(config_len <= MAX_HELLO_CONFIG, "HELLO config too long")
            name_raw = bytes(body[start:start + name_len])
            config = _parse_hello_config(bytes(body[start + name_len:]))
        _require(0 < len(name_raw) <= MAX_NAME, "HELLO name empty or too long")
        try:
            name = name_raw.decode()
        except UnicodeDecodeError:
            raise MalformedRecord("HELLO name is not UTF-8") from None
        return cls(name, Role(role), gen, seq, mem, HelloFlag(flags), caps, version, page_size,
                   config)


def _parse_hello_config(raw: bytes) -> tuple[tuple[str, str], ...]:
    if not raw:
        return ()
    try:
        doc = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        raise MalformedRecord("HELLO config is not UTF-8 JSON") from None
    _require(isinstance(doc, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in doc.items()),
             "HELLO config is not an object of strings")
    return tuple(sorted(doc.items()))


@dataclass(frozen=True)
class Pages:
    """A batch of guest pages: `data` holds the pages of `pfns` in order;
    `zero_pfns` are all-zero pages sent without payload."""

    TYPE: ClassVar[RecordType] = RecordType.PAGES
    pfns: Sequence[int]
    data: Buffer
    zero_pfns: Sequence[int] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "pfns", tuple(self.pfns))
        object.__setattr__(self, "zero_pfns", tuple(self.zero_pfns))
        if len(self.data) != PAGE_SIZE * len(self.pfns):
            raise ValueError("PAGES data must hold exactly 4096 bytes per pfn")
        count = len(self.pfns) + len(self.zero_pfns)
        if count > MAX_PAGES_PER_RECORD:
            raise ValueError(f"at most {MAX_PAGES_PER_RECORD} pages per PAGES record")
        for seq in (self.pfns, self.zero_pfns):
            if seq and (min(seq) < 0 or max(seq) > PFN_MASK):
                raise ValueError("pfn out of range")

    @property
    def page_count(self) -> int:
        return len(self.pfns) + len(self.zero_pfns)

    def body_parts(self) -> list[Buffer]:
        entries = (*self.pfns, *(pfn | ENTRY_ZERO for pfn in self.zero_pfns))
        head = _II.pack(len(entries), 0) + struct.pack(f"<{len(entries)}Q", *entries)
        return [head, self.data]

    @classmethod
    def from_body(cls, body: memoryview) -> Pages:
        data_pfns, zero_pfns, start = _page_entries(body, "PAGES")
        _require(len(body) == start + PAGE_SIZE * len(data_pfns),
                 "PAGES payload length does not match its page list")
        return cls(data_pfns, body[start:], zero_pfns)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Pages):
            return NotImplemented
        return (self.pfns == other.pfns and self.zero_pfns == other.zero_pfns
                and bytes(self.data) == bytes(other.data))


def _page_entries(body: memoryview, what: str) -> tuple[Sequence[int], Sequence[int], int]:
    """The entry list of a PAGES or PAGES_LZ4 body: (data pfns, zero pfns, payload offset)."""
    if len(body) < 8:
        raise MalformedRecord(f"{what} too short")
    count, reserved = _II.unpack_from(body)
    if reserved:
        raise MalformedRecord(f"{what} reserved field not zero")
    if count > MAX_PAGES_PER_RECORD:
        raise MalformedRecord(f"{what} with {count} pages (max 4096)")
    if len(body) < 8 + 8 * count:
        raise MalformedRecord(f"{what} shorter than its page list")
    entries = struct.unpack_from(f"<{count}Q", body, 8)
    if entries and max(entries) > PFN_MASK:
        pfns: list[int] = []
        zeros: list[int] = []
        for entry in entries:
            if entry & ENTRY_RESERVED:
                raise MalformedRecord(f"{what} entry {entry:#x} uses reserved bits")
            if entry & ENTRY_ZERO:
                zeros.append(entry & PFN_MASK)
            else:
                pfns.append(entry)
        return pfns, zeros, 8 + 8 * count
    return entries, (), 8 + 8 * count


class CompressedPages(Pages):
    """PAGES_LZ4: the same entries as PAGES, the data pages as one LZ4 block.

    Decoded, it is a Pages (the secondary applies it the same way); the
    decompressed size is fixed by the entry list, so a forged block can
    neither grow past it nor come up short."""

    TYPE: ClassVar[RecordType] = RecordType.PAGES_LZ4

    def body_parts(self) -> list[Buffer]:
        head, data = super().body_parts()
        return [head, lz4_block.compress(data, store_size=False)]

    @classmethod
    def from_body(cls, body: memoryview) -> Pages:
        data_pfns, zero_pfns, start = _page_entries(body, "PAGES_LZ4")
        size = PAGE_SIZE * len(data_pfns)
        _require(size > 0 and len(body) > start, "PAGES_LZ4 without compressed pages")
        data = _decompress_exactly(body[start:], size, "PAGES_LZ4")
        return cls(data_pfns, data, zero_pfns)


def _check_delta_pages(record: XorPages | PatchPages, what: str) -> None:
    """A delta record's page list and check, as it is built."""
    if not 0 < len(record.pfns) <= MAX_PAGES_PER_RECORD:
        raise ValueError(f"{what} holds 1 to {MAX_PAGES_PER_RECORD} pages")
    if min(record.pfns) < 0 or max(record.pfns) > PFN_MASK:
        raise ValueError("pfn out of range")
    _u32(record.check, "check")


@dataclass(frozen=True, eq=False)
class XorPages:
    """PAGES_XOR: pages sent as the XOR of their new content with the content
    the secondary holds (its last committed checkpoint), as one LZ4 block.

    `check` is the CRC-32 of the pages' new content, in order: the secondary
    rebuilds the pages from its own copy and refuses them if the result
    differs, so a delta against the wrong base cannot reach its image. As for
    PAGES_LZ4, the decompressed size is fixed by the page list. The secondary
    rebuilds the pages in place: after staging, `delta` holds their content."""

    TYPE: ClassVar[RecordType] = RecordType.PAGES_XOR
    pfns: Sequence[int]
    delta: Buffer
    check: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "pfns", tuple(self.pfns))
        if len(self.delta) != PAGE_SIZE * len(self.pfns):
            raise ValueError("PAGES_XOR delta must hold exactly 4096 bytes per pfn")
        _check_delta_pages(self, "PAGES_XOR")

    @property
    def page_count(self) -> int:
        return len(self.pfns)

    def body_parts(self) -> list[Buffer]:
        return xor_pages_parts(self.pfns, lz4_block.compress(self.delta, store_size=False),
                               self.check)[1:-1]

    @classmethod
    def from_body(cls, body: memoryview) -> XorPages:
        _require(len(body) >= 8, "PAGES_XOR too short")
        count, check = _II.unpack_from(body)
        if not 0 < count <= MAX_PAGES_PER_RECORD:
            raise MalformedRecord(f"PAGES_XOR with {count} pages (1 to 4096)")
        start = 8 + 8 * count
        _require(len(body) > start, "PAGES_XOR shorter than its page list and delta")
        pfns = struct.unpack_from(f"<{count}Q", body, 8)
        _require(max(pfns) <= PFN_MASK, "PAGES_XOR entry uses flag bits")
        return cls(pfns, _decompress_exactly(body[start:], PAGE_SIZE * count, "PAGES_XOR"), check)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, XorPages):
            return NotImplemented
        return (self.pfns, self.check, bytes(self.delta)) == (
            other.pfns, other.check, bytes(other.delta))


def xor_pages_parts(pfns: Sequence[int], packed: Buffer, check: int) -> list[Buffer]:
    """A PAGES_XOR record around an already compressed delta block."""
    head = _II.pack(len(pfns), check) + struct.pack(f"<{len(pfns)}Q", *pfns)
    length = len(head) + len(packed)
    return [HEADER.pack(RecordType.PAGES_XOR, 0, length), head, packed,
            _PADDING[:_pad(length)]]


# PAGES_PATCH: a page's patch is its run count, then per run its offset and
# length, then its bytes.
_H = struct.Struct("<H")
_HH = struct.Struct("<HH")
_WORD = 8
_BLOCK = 64


def page_patch(page: Buffer, base: Buffer) -> bytes:
    """The patch that turns `base` into `page` (4096 bytes each), as PAGES_PATCH
    carries it: one run per maximal span of 8-byte words that differ, trimmed
    to its first and last differing byte, with the page's bytes there. The C
    writer (native/codec.c) makes the same runs."""
    page, base = memoryview(page), memoryview(base)

    def differs(word: int) -> bool:
        return page[word * _WORD:(word + 1) * _WORD] != base[word * _WORD:(word + 1) * _WORD]

    runs: list[bytes] = []
    words = PAGE_SIZE // _WORD
    word = 0
    while word < words:
        at = word * _WORD
        if at % _BLOCK == 0 and page[at:at + _BLOCK] == base[at:at + _BLOCK]:
            word += _BLOCK // _WORD     # a whole equal block: the common case
        elif not differs(word):
            word += 1
        else:
            end_word = word + 1
            while end_word < words and differs(end_word):
                end_word += 1
            start, end = at, end_word * _WORD
            while page[start] == base[start]:
                start += 1
            while page[end - 1] == base[end - 1]:
                end -= 1
            runs.append(_HH.pack(start, end - start) + bytes(page[start:end]))
            word = end_word
    return _H.pack(len(runs)) + b"".join(runs)


def apply_patch(patch: Buffer, page: memoryview) -> None:
    """Write one page's runs (PatchPages.patches) into `page`."""
    for offset, data in _runs(memoryview(patch), 0, len(patch), "PAGES_PATCH")[0]:
        page[offset:offset + len(data)] = data


def _runs(body: memoryview, pos: int, end: int, what: str
          ) -> tuple[list[tuple[int, memoryview]], int]:
    """One page's runs at body[pos:end]: ([(offset, bytes)], where they end).
    Runs are ascending, do not overlap, hold at least a byte and stay in the page."""
    _require(end - pos >= 2, f"{what} shorter than its run counts")
    (count,) = _H.unpack_from(body, pos)
    pos += 2
    runs = []
    previous_end = 0
    for _ in range(count):
        _require(end - pos >= 4, f"{what} run cut short")
        offset, length = _HH.unpack_from(body, pos)
        pos += 4
        if length == 0 or offset < previous_end or offset + length > PAGE_SIZE:
            raise MalformedRecord(f"{what} run of {length} bytes at offset {offset} "
                                  f"(runs ascend, hold a byte or more, end in the page)")
        _require(end - pos >= length, f"{what} run cut short")
        runs.append((offset, body[pos:pos + length]))
        pos += length
        previous_end = offset + length
    return runs, pos


@dataclass(frozen=True, eq=False)
class PatchPages:
    """PAGES_PATCH: pages sent as the bytes that changed against the content
    the secondary holds (its last committed checkpoint), one patch per page
    (page_patch). `check` is the CRC-32 of the pages' new content, as for
    PAGES_XOR: the secondary rebuilds them from its own copy and refuses them
    if the result differs. Unlike PAGES_XOR no compressor runs on either
    side: a guest that changes a few bytes of a page costs a scan of it."""

    TYPE: ClassVar[RecordType] = RecordType.PAGES_PATCH
    pfns: Sequence[int]
    patches: Sequence[Buffer]
    check: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "pfns", tuple(self.pfns))
        object.__setattr__(self, "patches", tuple(self.patches))
        if len(self.patches) != len(self.pfns):
            raise ValueError("PAGES_PATCH needs one patch per pfn")
        _check_delta_pages(self, "PAGES_PATCH")

    @property
    def page_count(self) -> int:
        return len(self.pfns)

    def body_parts(self) -> list[Buffer]:
        return patch_pages_parts(self.pfns, self.patches, self.check)[1:-1]

    @classmethod
    def from_body(cls, body: memoryview) -> PatchPages:
        _require(len(body) >= 8, "PAGES_PATCH too short")
        count, check = _II.unpack_from(body)
        if not 0 < count <= MAX_PAGES_PER_RECORD:
            raise MalformedRecord(f"PAGES_PATCH with {count} pages (1 to 4096)")
        pos = 8 + 8 * count
        _require(len(body) >= pos, "PAGES_PATCH shorter than its page list")
        pfns = struct.unpack_from(f"<{count}Q", body, 8)
        _require(max(pfns) <= PFN_MASK, "PAGES_PATCH entry uses flag bits")
        patches = []
        for _ in range(count):
            start = pos
            pos = _runs(body, pos, len(body), "PAGES_PATCH")[1]
            patches.append(body[start:pos])
        _require(pos == len(body), "PAGES_PATCH holds bytes after its last patch")
        return cls(pfns, patches, check)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PatchPages):
            return NotImplemented
        return (self.pfns, self.check, [bytes(p) for p in self.patches]) == (
            other.pfns, other.check, [bytes(p) for p in other.patches])


def patch_pages_parts(pfns: Sequence[int], patches: Sequence[Buffer],
                      check: int) -> list[Buffer]:
    """A PAGES_PATCH record around the pages' patches (page_patch)."""
    head = _II.pack(len(pfns), check) + struct.pack(f"<{len(pfns)}Q", *pfns)
    length = len(head) + sum(len(p) for p in patches)
    return [HEADER.pack(RecordType.PAGES_PATCH, 0, length), head, *patches,
            _PADDING[:_pad(length)]]


def _decompress_exactly(block: Buffer, size: int, what: str) -> bytearray:
    """An LZ4 block that must decode to exactly `size` bytes (the record's own
    counts fix it, so a forged block can neither grow past it nor come up short)."""
    try:
        data = lz4_block.decompress(block, uncompressed_size=size, return_bytearray=True)
    except lz4_block.LZ4BlockError:
        raise MalformedRecord(f"{what} block does not decompress to {size} bytes") from None
    if len(data) != size:
        raise MalformedRecord(f"{what} block holds {len(data)} bytes, not {size}")
    return data


@dataclass(frozen=True)
class _Blob:
    """An opaque, versioned state blob owned by the hypervisor driver."""

    ident: int
    version: int
    blob: Buffer

    def __post_init__(self) -> None:
        _u32(self.ident, "id")
        _u32(self.version, "blob version")
        if len(self.blob) > MAX_BODY - 8:
            raise ValueError("blob too large")

    def body_parts(self) -> list[Buffer]:
        return [_II.pack(self.ident, self.version), self.blob]

    @classmethod
    def from_body(cls, body: memoryview) -> _Blob:
        if len(body) < 8:
            raise MalformedRecord(f"{cls.TYPE.name} too short")  # type: ignore[attr-defined]
        ident, version = _II.unpack_from(body)
        return cls(ident, version, body[8:])

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Blob)
        return (self.ident, self.version, bytes(self.blob)) == (
            other.ident, other.version, bytes(other.blob))


@dataclass(frozen=True, eq=False)
class Vcpu(_Blob):
    """One vCPU's full register state, as the driver serialises it (`ident` = vCPU id)."""

    TYPE: ClassVar[RecordType] = RecordType.VCPU


@dataclass(frozen=True, eq=False)
class Device(_Blob):
    """One device's state (ring indexes, in-flight requests), `ident` = device id."""

    TYPE: ClassVar[RecordType] = RecordType.DEVICE


# A BLOB_XOR's blob is at most this large (vCPU and device blobs are a few KiB).
MAX_XOR_BLOB = 1 << 20
_XOR_BLOB = struct.Struct("<IIIIII")
# The record types a BLOB_XOR may stand for, looked up by their number (an int
# from the wire, or the member itself) without a slow enum call.
_BLOB_KINDS = {RecordType.VCPU: RecordType.VCPU, RecordType.DEVICE: RecordType.DEVICE}


@dataclass(frozen=True, eq=False)
class XorBlob:
    """BLOB_XOR: a VCPU or DEVICE blob sent as the XOR of its new content with
    the last blob of the same kind, id and version in this session (sent whole
    or as a delta), as one LZ4 block; `check` is the new blob's CRC-32.
    Decoded, the secondary turns it back into the record of `kind`."""

    TYPE: ClassVar[RecordType] = RecordType.BLOB_XOR
    kind: RecordType            # VCPU or DEVICE
    ident: int
    version: int
    delta: Buffer
    check: int

    def __post_init__(self) -> None:
        kind = _BLOB_KINDS.get(self.kind)
        if kind is None:
            raise ValueError(f"BLOB_XOR of record type {self.kind}")
        object.__setattr__(self, "kind", kind)
        _u32(self.ident, "id")
        _u32(self.version, "blob version")
        _u32(self.check, "check")
        if not 0 < len(self.delta) <= MAX_XOR_BLOB:
            raise ValueError(f"BLOB_XOR blob of {len(self.delta)} bytes (1 to {MAX_XOR_BLOB})")

    def body_parts(self) -> list[Buffer]:
        return xor_blob_parts(self.kind, self.ident, self.version, len(self.delta),
                              lz4_block.compress(self.delta, store_size=False),
                              self.check)[1:-1]

    @classmethod
    def from_body(cls, body: memoryview) -> XorBlob:
        _require(len(body) > _XOR_BLOB.size, "BLOB_XOR too short")
        kind, ident, version, check, size, reserved = _XOR_BLOB.unpack_from(body)
        _require(reserved == 0, "BLOB_XOR reserved field not zero")
        if not 0 < size <= MAX_XOR_BLOB:
            raise MalformedRecord(f"BLOB_XOR blob of {size} bytes (1 to {MAX_XOR_BLOB})")
        if kind not in _BLOB_KINDS:
            raise MalformedRecord(f"BLOB_XOR of record type {kind}")
        delta = _decompress_exactly(body[_XOR_BLOB.size:], size, "BLOB_XOR")
        return cls(_BLOB_KINDS[kind], ident, version, delta, check)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, XorBlob):
            return NotImplemented
        return (self.kind, self.ident, self.version, self.check, bytes(self.delta)) == (
            other.kind, other.ident, other.version, other.check, bytes(other.delta))


def xor_blob_parts(kind: int, ident: int, version: int, size: int, packed: Buffer,
                   check: int) -> list[Buffer]:
    """A BLOB_XOR record around an already compressed delta block."""
    head = _XOR_BLOB.pack(kind, ident, version, check, size, 0)
    length = len(head) + len(packed)
    return [HEADER.pack(RecordType.BLOB_XOR, 0, length), head, packed, _PADDING[:_pad(length)]]


@dataclass(frozen=True)
class DiskWrite:
    """A guest write to a replicated disk, applied with the checkpoint that issued it."""

    TYPE: ClassVar[RecordType] = RecordType.DISK_WRITE
    disk_id: int
    sector: int
    data: Buffer

    def __post_init__(self) -> None:
        _u32(self.disk_id, "disk_id")
        _u64(self.sector, "sector")
        if not len(self.data) or len(self.data) % SECTOR_SIZE:
            raise ValueError("DISK_WRITE payload must be a non-empty multiple of 512 bytes")
        if len(self.data) > MAX_BODY - 16:
            raise ValueError("DISK_WRITE payload too large")

    def body_parts(self) -> list[Buffer]:
        return [_IIQ.pack(self.disk_id, 0, self.sector), self.data]

    @classmethod
    def from_body(cls, body: memoryview) -> DiskWrite:
        _require(len(body) >= 16, "DISK_WRITE too short")
        disk_id, reserved, sector = _IIQ.unpack_from(body)
        _require(reserved == 0, "DISK_WRITE reserved field not zero")
        data = body[16:]
        _require(len(data) > 0 and len(data) % SECTOR_SIZE == 0,
                 "DISK_WRITE payload is not a non-empty multiple of 512 bytes")
        return cls(disk_id, sector, data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DiskWrite):
            return NotImplemented
        return (self.disk_id, self.sector, bytes(self.data)) == (
            other.disk_id, other.sector, bytes(other.data))


def _fixed(struct_: struct.Struct, name: str, body: memoryview) -> tuple[int, ...]:
    if len(body) != struct_.size:
        raise MalformedRecord(f"{name} body is {len(body)} bytes, expected {struct_.size}")
    return struct_.unpack(body)


@dataclass(frozen=True)
class CheckpointEnd:
    """Closes a checkpoint: the secondary applies it only if everything here matches."""

    TYPE: ClassVar[RecordType] = RecordType.CHECKPOINT_END
    seq: int
    generation: int
    record_count: int
    page_count: int
    byte_count: int
    checksum: int

    def __post_init__(self) -> None:
        _u64(self.seq, "seq")
        _u64(self.generation, "generation")
        _u32(self.record_count, "record_count")
        _u32(self.page_count, "page_count")
        _u64(self.byte_count, "byte_count")
        _u32(self.checksum, "checksum")

    def body_parts(self) -> list[Buffer]:
        return [_END.pack(self.seq, self.generation, self.record_count, self.page_count,
                          self.byte_count, self.checksum, 0)]

    @classmethod
    def from_body(cls, body: memoryview) -> CheckpointEnd:
        seq, gen, records, pages, nbytes, crc, reserved = _fixed(_END, "CHECKPOINT_END", body)
        _require(reserved == 0, "CHECKPOINT_END reserved field not zero")
        return cls(seq, gen, records, pages, nbytes, crc)


@dataclass(frozen=True)
class Ack:
    """The secondary has applied checkpoint `seq` of `generation`."""

    TYPE: ClassVar[RecordType] = RecordType.ACK
    seq: int
    generation: int

    def __post_init__(self) -> None:
        _u64(self.seq, "seq")
        _u64(self.generation, "generation")

    def body_parts(self) -> list[Buffer]:
        return [_QQ.pack(self.seq, self.generation)]

    @classmethod
    def from_body(cls, body: memoryview) -> Ack:
        return cls(*_fixed(_QQ, "ACK", body))


@dataclass(frozen=True)
class Heartbeat:
    """Sent when a side has been silent for the heartbeat interval."""

    TYPE: ClassVar[RecordType] = RecordType.HEARTBEAT
    counter: int
    checkpoint_seq: int

    def __post_init__(self) -> None:
        _u64(self.counter, "counter")
        _u64(self.checkpoint_seq, "checkpoint_seq")

    def body_parts(self) -> list[Buffer]:
        return [_QQ.pack(self.counter, self.checkpoint_seq)]

    @classmethod
    def from_body(cls, body: memoryview) -> Heartbeat:
        return cls(*_fixed(_QQ, "HEARTBEAT", body))


@dataclass(frozen=True)
class SyncProgress:
    """End of one pre-copy round of a full sync."""

    TYPE: ClassVar[RecordType] = RecordType.SYNC_PROGRESS
    round: int
    pages_sent: int
    pages_remaining: int

    def __post_init__(self) -> None:
        _u32(self.round, "round")
        _u64(self.pages_sent, "pages_sent")
        _u64(self.pages_remaining, "pages_remaining")

    def body_parts(self) -> list[Buffer]:
        return [_SYNC.pack(self.round, 0, self.pages_sent, self.pages_remaining)]

    @classmethod
    def from_body(cls, body: memoryview) -> SyncProgress:
        rnd, reserved, sent, remaining = _fixed(_SYNC, "SYNC_PROGRESS", body)
        _require(reserved == 0, "SYNC_PROGRESS reserved field not zero")
        return cls(rnd, sent, remaining)


@dataclass(frozen=True)
class SyncAck:
    """Secondary: every record up to SYNC_PROGRESS(round) is applied. Lets the
    primary keep at most one round in flight, so the guest's closing pause does
    not wait behind a backlog (a socket buffer holds a whole round of LZ4 pages)."""

    TYPE: ClassVar[RecordType] = RecordType.SYNC_ACK
    round: int

    def __post_init__(self) -> None:
        _u32(self.round, "round")

    def body_parts(self) -> list[Buffer]:
        return [_II.pack(self.round, 0)]

    @classmethod
    def from_body(cls, body: memoryview) -> SyncAck:
        rnd, reserved = _fixed(_II, "SYNC_ACK", body)
        _require(reserved == 0, "SYNC_ACK reserved field not zero")
        return cls(rnd)


@dataclass(frozen=True)
class Error:
    """The sender is about to close because of `code` (an errors.StreamError code)."""

    TYPE: ClassVar[RecordType] = RecordType.ERROR
    code: int
    message: str

    def __post_init__(self) -> None:
        _u32(self.code, "code")
        if len(self.message.encode()) > MAX_ERROR_MESSAGE:
            raise ValueError("ERROR message too long")

    def body_parts(self) -> list[Buffer]:
        return [_II.pack(self.code, 0), self.message.encode()]

    @classmethod
    def from_body(cls, body: memoryview) -> Error:
        _require(8 <= len(body) <= 8 + MAX_ERROR_MESSAGE, "ERROR length out of range")
        code, reserved = _II.unpack_from(body)
        _require(reserved == 0, "ERROR reserved field not zero")
        return cls(code, bytes(body[8:]).decode(errors="replace"))


@dataclass(frozen=True)
class Goodbye:
    """Orderly end of the session; HANDOVER names the final checkpoint."""

    TYPE: ClassVar[RecordType] = RecordType.GOODBYE
    reason: int
    checkpoint_seq: int

    def __post_init__(self) -> None:
        _u32(self.reason, "reason")
        _u64(self.checkpoint_seq, "checkpoint_seq")

    def body_parts(self) -> list[Buffer]:
        return [_IIQ.pack(self.reason, 0, self.checkpoint_seq)]

    @classmethod
    def from_body(cls, body: memoryview) -> Goodbye:
        reason, reserved, seq = _fixed(_IIQ, "GOODBYE", body)
        _require(reserved == 0, "GOODBYE reserved field not zero")
        return cls(reason, seq)


@dataclass(frozen=True)
class Unknown:
    """A skippable record of a type this version does not know (kept for counting)."""

    type: int
    flags: int
    body: Buffer

    def body_parts(self) -> list[Buffer]:
        return [self.body]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Unknown):
            return NotImplemented
        return (self.type, self.flags, bytes(self.body)) == (
            other.type, other.flags, bytes(other.body))


Record = (
    Hello | Pages | XorPages | PatchPages | Vcpu | Device | XorBlob | DiskWrite | CheckpointEnd
    | Ack | Heartbeat | SyncProgress | SyncAck | Error | Goodbye | Unknown
)

_CLASSES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (Hello, Pages, CompressedPages, XorPages, PatchPages, Vcpu, Device, XorBlob,
                DiskWrite, CheckpointEnd, Ack, Heartbeat, SyncProgress, SyncAck, Error, Goodbye)
}


def encode_parts(record: Record) -> list[Buffer]:
    """Header, body pieces and padding of one record, ready for b"".join."""
    body = record.body_parts()
    length = sum(len(part) for part in body)
    if length > MAX_BODY:
        raise ValueError(f"record body of {length} bytes exceeds {MAX_BODY}")
    if isinstance(record, Unknown):
        header = HEADER.pack(record.type, record.flags, length)
    else:
        header = HEADER.pack(record.TYPE, 0, length)
    pad = _pad(length)
    return [header, *body, _PADDING[:pad]] if pad else [header, *body]


def encode(record: Record) -> bytes:
    """The wire bytes of one record."""
    return b"".join(encode_parts(record))


_ACK_RECORD = struct.Struct("<HHIQQ")


def encode_ack(seq: int, generation: int) -> bytes:
    """encode(Ack(seq, generation)), without building the record: the secondary
    sends one per checkpoint, right before the primary may go on."""
    return _ACK_RECORD.pack(RecordType.ACK, 0, _QQ.size, seq, generation)


def encode_error(exc: BaseException) -> bytes:
    """An ERROR record telling the peer why this side is closing."""
    code = exc.code if isinstance(exc, StreamError) else StreamError.code
    message = f"{type(exc).__name__}: {exc}".encode()[:MAX_ERROR_MESSAGE]
    return encode(Error(code, message.decode(errors="ignore")))


def pages_parts(memory: Buffer, pfns: Sequence[int], *, detect_zero: bool = False,
                compress: bool = False, stats: dict[str, int] | None = None,
                ) -> tuple[list[Buffer], int, int]:
    """Encode guest pages `pfns` of `memory` as PAGES records without building records.

    Returns (parts, record_count, page_count). The parts reference `memory`
    (unless zero detection copied them): join them before the guest resumes.
    Consecutive pfns become one slice, so a full-memory round costs one
    memcpy per run instead of one per page. `compress`: a batch whose pages
    LZ4 shrinks to at most LZ4_WORTH of their size goes as PAGES_LZ4, and
    `stats["lz4_pages"]` (if given) counts its data pages.
    """
    view = memory if isinstance(memory, memoryview) else memoryview(memory)
    limit = len(view) // PAGE_SIZE
    parts: list[Buffer] = []
    records = 0
    for start in range(0, len(pfns), MAX_PAGES_PER_RECORD):
        batch = pfns[start:start + MAX_PAGES_PER_RECORD]
        if batch and (min(batch) < 0 or max(batch) >= limit):
            raise ValueError("pfn outside guest memory")
        data: list[Buffer] = []
        if detect_zero:
            data_pfns: list[int] = []
            zeros: list[int] = []
            for pfn in batch:
                page = view[pfn * PAGE_SIZE:(pfn + 1) * PAGE_SIZE].tobytes()
                if page == ZERO_PAGE:
                    zeros.append(pfn | ENTRY_ZERO)
                else:
                    data_pfns.append(pfn)
                    data.append(page)
            entries: Sequence[int] = data_pfns + zeros
            ndata = len(data_pfns)
        else:
            entries = batch
            ndata = len(batch)
            run_start = run_end = -1
            for pfn in batch:
                if pfn == run_end:
                    run_end += 1
                    continue
                if run_start >= 0:
                    data.append(view[run_start * PAGE_SIZE:run_end * PAGE_SIZE])
                run_start, run_end = pfn, pfn + 1
            if run_start >= 0:
                data.append(view[run_start * PAGE_SIZE:run_end * PAGE_SIZE])
        count = len(entries)
        head = _II.pack(count, 0) + struct.pack(f"<{count}Q", *entries)
        packed = _compressed(b"".join(data), ndata) if compress and ndata else None
        if packed is not None:
            parts += _lz4_record_parts(head, packed, ndata, stats)
        else:
            parts.append(HEADER.pack(RecordType.PAGES, 0, len(head) + PAGE_SIZE * ndata) + head)
            parts.extend(data)
        records += 1
    return parts, records, len(pfns)


def compress_pages_records(records: Buffer, stats: dict[str, int] | None = None) -> list[Buffer]:
    """PAGES records (as the native encoder writes them, one after the other),
    each turned into PAGES_LZ4 where that pays, as pages_parts(compress=True)."""
    view = memoryview(records)
    parts: list[Buffer] = []
    offset = 0
    while offset < len(view):
        _rtype, _flags, length = HEADER.unpack_from(view, offset)
        count, _reserved = _II.unpack_from(view, offset + HEADER_SIZE)
        start = offset + HEADER_SIZE + 8 + 8 * count
        end = offset + HEADER_SIZE + length
        ndata = (end - start) // PAGE_SIZE
        packed = _compressed(view[start:end], ndata) if ndata else None
        if packed is None:
            parts.append(view[offset:end])
        else:
            parts += _lz4_record_parts(view[offset + HEADER_SIZE:start], packed, ndata, stats)
        offset = end
    return parts


def _compressed(pages: Buffer, ndata: int) -> bytes | None:
    """The LZ4 block of `ndata` pages, or None where it does not pay."""
    packed = lz4_block.compress(pages, store_size=False)
    return packed if len(packed) <= LZ4_WORTH * PAGE_SIZE * ndata else None


def _lz4_record_parts(head: Buffer, packed: bytes, ndata: int,
                      stats: dict[str, int] | None) -> list[Buffer]:
    """A PAGES_LZ4 record: `head` (count, reserved, entries), the block, padding."""
    length = len(head) + len(packed)
    if stats is not None:
        stats["lz4_pages"] = stats.get("lz4_pages", 0) + ndata
    return [HEADER.pack(RecordType.PAGES_LZ4, 0, length), head, packed, _PADDING[:_pad(length)]]


class Decoder:
    """Incremental decoder: feed it whatever bytes arrived, get whole records back.

    After any StreamError the decoder stays failed: the stream position is
    unknown, so the only safe move is to close the connection.
    """

    def __init__(self, max_body: int = MAX_BODY) -> None:
        self._chunks: deque[memoryview] = deque()
        self._avail = 0
        self._max_body = max_body
        self._first = True
        self._need = HEADER_SIZE  # bytes needed before parsing is worth trying again
        self._error: StreamError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned record."""
        return self._avail

    def takes_lone_ack(self) -> bool:
        """Whether the next bytes may be a lone ACK: nothing buffered before them
        (and the stream's HELLO already read)."""
        return not (self._avail or self._first or self._error is not None)

    def lone_ack(self, data: Buffer) -> Ack | None:
        """`data` as the one ACK record it is, with nothing buffered before it:
        what the primary reads after each checkpoint, decoded without the
        general path. None for anything else (then feed() it)."""
        if not self.takes_lone_ack() or len(data) != _ACK_RECORD.size:
            return None
        rtype, flags, length, seq, generation = _ACK_RECORD.unpack(data)
        if rtype != RecordType.ACK or flags or length != _QQ.size:
            return None
        return Ack(seq, generation)

    def feed(self, data: Buffer) -> list[Record]:
        """Records completed by `data` (may be empty)."""
        return [record for record, _ in self.feed_raw(data)]

    def feed_raw(self, data: Buffer) -> list[tuple[Record, memoryview]]:
        """Like feed(), with each record's wire bytes (for checksums)."""
        if self._error is not None:
            raise self._error
        if data:
            # bytes are immutable, so views into them stay valid; copy anything else.
            chunk = data if isinstance(data, bytes) else bytes(data)
            self._chunks.append(memoryview(chunk))
            self._avail += len(chunk)
        if self._avail < self._need:  # the record in progress is still incomplete
            return []
        try:
            return self._drain()
        except StreamError as exc:
            self._error = exc
            self._chunks.clear()
            self._avail = 0
            raise

    def eof(self) -> None:
        """The peer closed: fail if it stopped in the middle of a record."""
        if self._error is None and self._avail:
            self._error = TruncatedStream(
                f"stream ended inside a record ({self._avail} bytes of it received)")
        if self._error is not None:
            raise self._error

    def _drain(self) -> list[tuple[Record, memoryview]]:
        out: list[tuple[Record, memoryview]] = []
        while self._avail >= HEADER_SIZE:
            first = self._chunks[0]
            if len(first) >= HEADER_SIZE:
                rtype, flags, length = HEADER.unpack_from(first)
            else:
                rtype, flags, length = HEADER.unpack(self._peek(HEADER_SIZE))
            if self._first and rtype not in (RecordType.HELLO, RecordType.ERROR):
                raise NotAKemariStream(
                    f"first record has type {rtype}, not HELLO: not a Kemari stream")
            if flags & ~_RECORD_FLAGS:
                raise MalformedRecord(f"record type {rtype} has unknown flags {flags:#x}")
            if length > self._max_body:
                raise RecordTooLarge(f"record type {rtype} announces {length} bytes "
                                     f"(limit {self._max_body})")
            total = HEADER_SIZE + length + (-length & 7)
            if self._avail < total:
                self._need = total
                break
            self._need = HEADER_SIZE
            raw = self._take(total)
            out.append((self._decode(rtype, flags, length, raw), raw))
            self._first = False
        return out

    @staticmethod
    def _decode(rtype: int, flags: int, length: int, raw: memoryview) -> Record:
        end = HEADER_SIZE + length
        if end != len(raw) and raw[end:] != _PADDING[:len(raw) - end]:
            raise MalformedRecord(f"record type {rtype} has non-zero padding")
        body = raw[HEADER_SIZE:end]
        cls = _CLASSES.get(rtype)
        if cls is None:
            if flags & RecordFlag.SKIPPABLE:
                return Unknown(rtype, flags, body)
            raise UnknownRecordType(f"unknown record type {rtype} (not skippable)")
        try:
            return cls.from_body(body)  # type: ignore[no-any-return]
        except ValueError as exc:  # a decoded field out of range for its record
            raise MalformedRecord(f"{RecordType(rtype).name}: {exc}") from None

    def _peek(self, size: int) -> bytes:
        pieces = []
        need = size
        for chunk in self._chunks:
            pieces.append(chunk[:need])
            need -= len(pieces[-1])
            if not need:
                break
        return b"".join(pieces)

    def _take(self, size: int) -> memoryview:
        self._avail -= size
        first = self._chunks[0]
        if len(first) >= size:
            if len(first) == size:
                self._chunks.popleft()
            else:
                self._chunks[0] = first[size:]
            return first[:size]
        pieces = []
        need = size
        while need:
            chunk = self._chunks.popleft()
            if len(chunk) > need:
                self._chunks.appendleft(chunk[need:])
                chunk = chunk[:need]
            pieces.append(chunk)
            need -= len(chunk)
        return memoryview(b"".join(pieces))


# The checksum CHECKPOINT_END carries: CRC-32/ISO-HDLC, zlib's crc32(data, value).
# zlib-ng computes the same value 4x faster here (carry-less multiply), and every
# byte of the stream passes through it on both nodes (docs/libraries.md).
crc32 = zlib_ng.crc32
