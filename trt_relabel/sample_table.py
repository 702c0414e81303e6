"""The store's sample list (samples.tsv), held compactly: one bytes buffer and NumPy offsets.

samples.tsv, store format 1.1: line i is ``ESCAPED_PATH<TAB>class_index<LF>`` for row i, UTF-8.
A path is escaped so that any name a filesystem can hold round-trips and the file stays readable
by plain TSV readers (``csv.reader(f, delimiter="\\t", quoting=csv.QUOTE_NONE)``, ``np.loadtxt``,
``str.splitlines``):

- ``\\\\`` for a backslash, ``\\t`` for TAB, ``\\n`` for LF, ``\\r`` for CR;
- ``\\xNN`` (two lowercase hex digits) for the byte NN of the file name: the other ASCII control
  characters (0x01-0x1f, 0x7f) and bytes that are not UTF-8 (Python's surrogate escapes
  U+DC80-U+DCFF);
- ``\\uNNNN`` for U+0085, U+2028 and U+2029 (line breaks for ``str.splitlines``).

Format 1 (read only): the path raw (non-UTF-8 bytes as they are) up to the last TAB of the line.

A :class:`SampleTable` is a read-only sequence of :class:`~trt_relabel.images.ImageEntry` that
decodes a row when it is indexed: at 1.28 M rows it holds ~60 MB in a few objects (no Python
object per row), so forked loader workers share its pages instead of copying them on access.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import overload

import numpy as np

from trt_relabel.errors import RelabelError
from trt_relabel.images import ImageEntry

_TO_ESCAPE = re.compile("[\\\\\x00-\x1f\x7f\x85\u2028\u2029\udc80-\udcff]")
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_ESCAPE_SEQUENCE = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|[\\tnr])?")
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


#: (path, device, inode, size, mtime) of a samples.tsv -> its table while one is alive: a process
#: that opens one store twice (a resumed `generate` checks the store, then reopens it) parses it once.
_READ: weakref.WeakValueDictionary[tuple, SampleTable] = weakref.WeakValueDictionary()


class SamplesError(RelabelError):
    """A samples.tsv that cannot be read, or a name that cannot be stored; one line naming the file."""


def _escape_char(match: re.Match) -> str:
    char = match.group()
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    if code < 0x80 or 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code & 0xFF:02x}"
    return f"\\u{code:04x}"


def escape_path(path: str) -> str:
    """A file name (str, undecodable bytes as surrogate escapes) as written in samples.tsv 1.1."""
    return _TO_ESCAPE.sub(_escape_char, path)


def _unescape_sequence(match: re.Match) -> str:
    code = match.group(1)
    if code is None:
        raise ValueError(f"a backslash without a valid escape at {match.string[match.start() :][:12]!r}")
    if code in _UNESCAPES:
        return _UNESCAPES[code]
    value = int(code[1:], 16)
    return chr(0xDC00 + value) if code[0] == "x" and value >= 0x80 else chr(value)


def unescape_path(text: str) -> str:
    """Inverse of :func:`escape_path`; ValueError on a malformed escape."""
    return _ESCAPE_SEQUENCE.sub(_unescape_sequence, text) if "\\" in text else text


def _line_ends_and_tabs(buf: np.ndarray, chunk: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the LFs, positions of the TABs) in `buf` (uint8), int32 where they fit;
    scanned a chunk at a time to keep temporaries small."""
    dtype = np.int32 if len(buf) < 2**31 else np.int64
    found = []
    for start in range(0, len(buf), chunk):
        part = buf[start : start + chunk]
        positions = np.flatnonzero(part <= 10)
        found.append((positions + start).astype(dtype))
        found.append(part[positions])
    positions = np.concatenate([np.empty(0, dtype), *found[::2]])
    kinds = np.concatenate([np.empty(0, np.uint8), *found[1::2]])
    return positions[kinds == 10], positions[kinds == 9]


def _stored_paths(paths: list[str], escaped: bool) -> list[str]:
    """`paths` as samples.tsv holds them: escaped (format 1.1), or raw (format 1, which cannot
    hold a LF: :class:`SamplesError`)."""
    if escaped:
        return [escape_path(path) for path in paths] if _TO_ESCAPE.search("".join(paths)) else paths
    odd = next((path for path in paths if "\n" in path), None)
    if odd is not None:
        raise SamplesError(f"a format 1 store cannot hold the file name {odd!r} (it holds a LF)")
    return paths


def _encode(text: str, escaped: bool) -> bytes:
    """samples.tsv text -> bytes (format 1 keeps undecodable bytes as they were)."""
    try:
        return text.encode("utf-8", "strict" if escaped else "surrogateescape")
    except UnicodeEncodeError as e:
        raise SamplesError(f"cannot store a file name with {text[e.start : e.end]!r} (not a file name)") from None


def _columns(entries: Sequence[ImageEntry], escaped: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the stored paths of `entries` concatenated, uint8; their byte lengths, int64 [N]; their
    class indices, int64 [N]): what :meth:`SampleTable.first_difference` compares."""
    paths = _stored_paths([entry.path for entry in entries], escaped)
    classes = np.fromiter((entry.class_index for entry in entries), np.int64, len(paths))
    buf = np.frombuffer(_encode("\n".join(paths), escaped), dtype=np.uint8)  # stored paths hold no LF
    separators = np.flatnonzero(buf == 10)
    lengths = np.diff(np.concatenate(([-1], separators, [len(buf)]))) - 1 if paths else np.zeros(0, np.int64)
    return buf[buf != 10], lengths, classes


class SampleTable(Sequence[ImageEntry]):
    """Row i's sample (relative path, class index), decoded from the samples.tsv bytes on access.

    `classes` is int64 [N] (read-only). ``table[i]`` is an ImageEntry; slices give lists. Equality
    with another table compares the buffers (vectorised); with any other sequence, row by row.
    `escaped`: the buffer is in format 1.1 (paths escaped), else format 1 (raw).
    """

    def __init__(self, data: bytes, starts: np.ndarray, stops: np.ndarray, classes: np.ndarray, escaped: bool):
        self._data = data
        self._starts = starts
        self._stops = stops
        self.classes = classes
        self.escaped = escaped
        for array in (starts, stops, classes):
            array.flags.writeable = False

    @classmethod
    def parse(cls, data: bytes, *, escaped: bool, name: str = "samples.tsv") -> SampleTable:
        """Parse samples.tsv bytes (format 1.1 when `escaped`, else 1); :class:`SamplesError` naming
        `name` and the line on anything malformed. Vectorised: ~0.2 s for 1.28 M lines."""
        if data and not data.endswith(b"\n"):
            data += b"\n"
        buf = np.frombuffer(data, dtype=np.uint8)
        ends, tabs = _line_ends_and_tabs(buf)
        starts = np.concatenate((ends[:1] * 0, ends[:-1] + 1))
        if tabs.size == ends.size and (tabs < ends).all() and (tabs[1:] > ends[:-1]).all():
            last_tab = tabs  # one TAB per line
        else:  # format 1 (a path may hold TABs: the class follows the last one), or a malformed file
            count = np.searchsorted(tabs, ends) - np.searchsorted(tabs, starts)
            if (count == 0).any():
                line = int(np.argmax(count == 0))
                cls._fail(data, starts[line], line, name, "not 'path<TAB>class_index'")
            if escaped and (count > 1).any():
                line = int(np.argmax(count > 1))
                cls._fail(data, starts[line], line, name, "more than one TAB")
            last_tab = tabs[np.searchsorted(tabs, ends) - 1]
        classes = cls._parse_classes(data, buf, starts, last_tab, ends, name)
        table = cls(data, starts, last_tab, classes, escaped)
        if escaped:
            table._check_text(name)
        return table

    @classmethod
    def _parse_classes(
        cls, data: bytes, buf: np.ndarray, starts: np.ndarray, tabs: np.ndarray, ends: np.ndarray, name: str
    ) -> np.ndarray:
        """int64 [N]: the decimal (optionally negative) integers between each TAB and line end."""
        negative = buf[np.minimum(tabs + 1, len(buf) - 1)] == ord("-")
        lengths = ends - tabs - 1 - negative
        bad = (lengths < 1) | (lengths > 9)
        classes = np.zeros(len(ends), dtype=np.int64)
        for place in range(int(lengths.max(initial=0)) - 1, -1, -1) if not bad.any() else ():
            has = lengths > place  # the digit `place` places left of the line end
            digit = buf[np.maximum(ends - 1 - place, 0)].astype(np.int16) - ord("0")
            bad |= has & ((digit < 0) | (digit > 9))
            classes = classes * 10 + np.where(has, digit, 0)
        if bad.any():
            line = int(np.argmax(bad))
            cls._fail(data, starts[line], line, name, "the class index is not an integer")
        return np.where(negative, -classes, classes)

    def _check_text(self, name: str) -> None:
        """Every path of a format 1.1 buffer is UTF-8 with valid escapes."""
        try:
            text = self._data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = int(np.searchsorted(self._starts, e.start, side="right")) - 1
            self._fail(self._data, self._starts[line], line, name, "not UTF-8")
        for match in _ESCAPE_SEQUENCE.finditer(text) if "\\" in text else ():
            if match.group(1) is None:
                line = text.count("\n", 0, match.start())
                self._fail(self._data, self._starts[line], line, name, "a backslash without a valid escape")

    @staticmethod
    def _fail(data: bytes, start: int, line: int, name: str, what: str):
        """Raise SamplesError naming `name`, the 1-based line, `what` is wrong and the line's start."""
        start = int(start)
        text = data[start : start + 80].split(b"\n")[0].decode("utf-8", "surrogateescape")
        raise SamplesError(f"{name}:{line + 1}: {what}: {text!r}")

    @classmethod
    def from_entries(cls, entries: Sequence[ImageEntry], *, escaped: bool = True) -> SampleTable:
        """The table of `entries` (returned as is when already a table in that format). Format 1
        (`escaped=False`) cannot hold a path with a LF: :class:`SamplesError`."""
        if isinstance(entries, SampleTable) and entries.escaped == escaped:
            return entries
        paths = _stored_paths([entry.path for entry in entries], escaped)
        lines = "".join(f"{path}\t{entry.class_index}\n" for path, entry in zip(paths, entries, strict=True))
        return cls.parse(_encode(lines, escaped), escaped=escaped)

    @classmethod
    def read(cls, path: Path, *, escaped: bool) -> SampleTable:
        """samples.tsv at `path` (format 1.1 when `escaped`); :class:`SamplesError` when unreadable.
        The file is parsed again only when it changed (or no table read from it is alive)."""
        try:
            with open(path, "rb") as f:
                info = os.fstat(f.fileno())
                key = (str(path.absolute()), escaped, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
                table = _READ.get(key)
                if table is None:
                    table = _READ[key] = cls.parse(f.read(), escaped=escaped, name=str(path))
        except OSError as e:
            raise SamplesError(f"{path}: unreadable ({e.strerror})") from None
        return table

    def write(self, path: Path) -> None:
        """Write the table as samples.tsv (in its own format)."""
        path.write_bytes(self._data)

    def __len__(self) -> int:
        return len(self._starts)

    @overload
    def __getitem__(self, row: int) -> ImageEntry: ...
    @overload
    def __getitem__(self, row: slice) -> list[ImageEntry]: ...
    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        return ImageEntry(self.path(row), int(self.classes[row]))

    def path(self, row: int) -> str:
        """The relative path of row `row` (negative counts from the end; IndexError outside)."""
        raw = self._data[self._starts[row] : self._stops[row]].decode("utf-8", "surrogateescape")
        return unescape_path(raw) if self.escaped else raw

    def __iter__(self) -> Iterator[ImageEntry]:
        for row in range(len(self)):
            yield self[row]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        try:
            return self.first_difference(other) is None
        except (SamplesError, AttributeError):  # not entries, or names a format 1 table cannot hold
            return False

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"SampleTable({len(self)} rows, format {'1.1' if self.escaped else '1'})"

    def first_difference(self, other: Sequence[ImageEntry], *, classes: bool = True) -> int | None:
        """The first row whose path (and class index, with `classes`) differs from `other`'s (the
        shorter length when one is a prefix of the other); None when they agree. Vectorised."""
        if other is self:
            return None
        table = other if isinstance(other, SampleTable) and other.escaped == self.escaped else None
        if table is not None:
            their_lengths, their_classes = table._stops - table._starts, table.classes
        else:
            their_bytes, their_lengths, their_classes = _columns(other, self.escaped)
        n = min(len(self), len(other))
        lengths = self._stops - self._starts
        differs = lengths[:n] != their_lengths[:n]
        if classes:
            differs |= self.classes[:n] != their_classes[:n]
        first = int(np.argmax(differs)) if differs.any() else n
        # Rows before `first` have equal lengths: compare their concatenated path bytes.
        size = int(lengths[:first].sum())
        mine = self._path_bytes(first)
        theirs = table._path_bytes(first) if table is not None else their_bytes[:size]
        unequal = np.flatnonzero(mine != theirs)
        if unequal.size:
            first = int(np.searchsorted(np.cumsum(lengths[:first]), unequal[0], side="right"))
        return None if first == n == len(self) == len(other) else first

    def _path_bytes(self, rows: int) -> np.ndarray:
        """uint8: the (escaped) paths of the first `rows` rows, concatenated."""
        buf = np.frombuffer(self._data, dtype=np.uint8)
        next_starts = np.append(self._starts[1 : rows + 1], len(buf))[:rows]  # row i spans [start, next start)
        spans = np.stack((self._stops[:rows] - self._starts[:rows], next_starts - self._stops[:rows]), axis=1)
        is_path = np.repeat(np.tile([True, False], rows), spans.reshape(-1))  # path, then TAB class LF
        return buf[: len(is_path)][is_path]
