"""The store's on-disk format (1.1): file names, row statuses, StoreSpec, the manifest (write, read, check).

A store is a directory:

- ``manifest.json``: format, teacher, teacher_hash, graph_sha256, input_size, map_size [h, w], topk,
  num_classes, value_kind ("logits"), num_samples, num_failed, complete, started_at, finished_at,
  tool_version, plus optional free keys.
- ``values.npy`` float16 [N, k, h, w] and ``indices.npy`` int16 [N, k, h, w]: the k largest logits
  of each label-map cell (descending along k) and their class indices. Rows of failed inputs stay 0.
- ``samples.tsv``: line i is ``relative/path<TAB>class_index`` of row i (-1 without class folders),
  the path escaped (``\\\\``, ``\\t``, ``\\n``, ``\\r``, ``\\xNN``, ...: see :mod:`trt_relabel.sample_table`;
  format 1 stores, still read and resumed, hold raw paths).
- ``errors.jsonl``: one ``{"path": ..., "reason": ...}`` object per input that could not be labelled
  (a torn line a crash or a full disk leaves is skipped by readers and dropped at finish).
- ``status.npy`` uint8 [N]: 0 = pending, 1 = labelled, 2 = failed (the resume state).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from trt_relabel import __version__
from trt_relabel.errors import RelabelError
from trt_relabel.fileio import write_atomic

FORMAT = "trt-relabel-store/1.1"
#: Readable formats -> whether their samples.tsv paths are escaped.
READABLE_FORMATS = {"trt-relabel-store/1": False, FORMAT: True}

MANIFEST = "manifest.json"
VALUES = "values.npy"
INDICES = "indices.npy"
SAMPLES = "samples.tsv"
ERRORS = "errors.jsonl"
STATUS = "status.npy"
STORE_FILES = (MANIFEST, VALUES, INDICES, SAMPLES, ERRORS, STATUS)

PENDING, LABELLED, FAILED = 0, 1, 2
FLOAT16_MAX = float(np.finfo(np.float16).max)

REQUIRED_KEYS = (
    "format",
    "teacher",
    "teacher_hash",
    "graph_sha256",
    "input_size",
    "map_size",
    "topk",
    "num_classes",
    "value_kind",
    "num_samples",
    "num_failed",
    "complete",
    "started_at",
    "finished_at",
    "tool_version",
)


class StoreError(RelabelError):
    """A store that cannot be read, created or resumed; the message names the store path and the cause."""


@dataclass(frozen=True)
class StoreSpec:
    """What labelled a store. A resume must match every field but `graph_sha256` (the graph that started
    it: generate lets only a graph of the same teacher continue it, see
    :func:`trt_relabel.backends.graph_may_continue`)."""

    teacher: str
    teacher_hash: str
    graph_sha256: str
    input_size: int
    map_size: tuple[int, int]
    topk: int
    num_classes: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "map_size", (int(self.map_size[0]), int(self.map_size[1])))

    @classmethod
    def from_manifest(cls, manifest: dict) -> StoreSpec:
        return cls(
            teacher=manifest["teacher"],
            teacher_hash=manifest["teacher_hash"],
            graph_sha256=manifest["graph_sha256"],
            input_size=int(manifest["input_size"]),
            map_size=(int(manifest["map_size"][0]), int(manifest["map_size"][1])),
            topk=int(manifest["topk"]),
            num_classes=int(manifest["num_classes"]),
        )

    @property
    def row_shape(self) -> tuple[int, int, int]:
        """(k, h, w): the shape of one row of values / indices."""
        return (self.topk, *self.map_size)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def load_array(path: Path, mode: str, dtype: type, shape: tuple[int, ...]) -> np.memmap:
    """Memory-map a .npy file and check its dtype and shape against the manifest."""
    try:
        array = np.load(path, mmap_mode=mode)
    except FileNotFoundError:
        raise StoreError(f"{path}: missing") from None
    except OSError as e:
        raise StoreError(f"{path}: cannot open ({e.strerror})") from None
    except ValueError as e:
        raise StoreError(f"{path}: not a readable .npy file ({e})") from None
    if array.dtype != dtype or array.shape != shape:
        raise StoreError(
            f"{path}: holds {array.dtype} {list(array.shape)}, the manifest says {np.dtype(dtype)} {list(shape)}"
        )
    return array


def write_manifest(path: Path, manifest: dict) -> None:
    write_atomic(path / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        problem = f"not a label store (no {MANIFEST})" if path.exists() else "no such store (the path does not exist)"
        raise StoreError(f"{path}: {problem}") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{file}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict):
        raise StoreError(f"{file}: the manifest is not a JSON object")
    if manifest.get("format") not in READABLE_FORMATS:
        expected = " or ".join(repr(f) for f in READABLE_FORMATS)
        raise StoreError(f"{file}: format is {manifest.get('format')!r}, not {expected}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise StoreError(f"{file}: missing keys {', '.join(missing)}")
    problem = _manifest_problem(manifest)
    if problem:
        raise StoreError(f"{file}: {problem}")
    return manifest


def _is_int(value: object, low: int, high: int | None = None) -> bool:
    """Whether `value` is a JSON integer (not a bool) in [low, high]."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= (high if high else value)


def _manifest_problem(manifest: dict) -> str | None:
    """What is wrong with the values of a manifest that has every required key; None if nothing."""
    expected = {
        "teacher": "a string",
        "teacher_hash": "a string",
        "graph_sha256": "a string",
        "started_at": "a string",
        "tool_version": "a string",
        "input_size": "an integer >= 1",
        "topk": "an integer >= 1",
        "num_classes": "an integer in [1, 32768] (int16 class indices)",
        "num_samples": "an integer >= 1",
        "num_failed": "an integer in [0, num_samples]",
        "complete": "true or false",
        "finished_at": "a string or null",
        "value_kind": '"logits"',
        "map_size": "[h, w], two integers >= 1",
    }
    num_samples = manifest["num_samples"]
    valid = {
        "teacher": isinstance(manifest["teacher"], str),
        "teacher_hash": isinstance(manifest["teacher_hash"], str),
        "graph_sha256": isinstance(manifest["graph_sha256"], str),
        "started_at": isinstance(manifest["started_at"], str),
        "tool_version": isinstance(manifest["tool_version"], str),
        "input_size": _is_int(manifest["input_size"], 1),
        "topk": _is_int(manifest["topk"], 1),
        "num_classes": _is_int(manifest["num_classes"], 1, 32768),
        "num_samples": _is_int(num_samples, 1),
        "num_failed": _is_int(manifest["num_failed"], 0, num_samples if _is_int(num_samples, 1) else None),
        "complete": isinstance(manifest["complete"], bool),
        "finished_at": manifest["finished_at"] is None or isinstance(manifest["finished_at"], str),
        "value_kind": manifest["value_kind"] == "logits",
        "map_size": isinstance(manifest["map_size"], list)
        and len(manifest["map_size"]) == 2
        and all(_is_int(side, 1) for side in manifest["map_size"]),
    }
    key = next((key for key, ok in valid.items() if not ok), None)
    if key is not None:
        return f"{key} is {json.dumps(manifest[key])}, expected {expected[key]}"
    if manifest["topk"] > manifest["num_classes"]:
        return f"topk {manifest['topk']} exceeds num_classes {manifest['num_classes']}"
    return None


def new_manifest(spec: StoreSpec, num_samples: int, extra: dict | None) -> dict:
    return {
        "format": FORMAT,
        **asdict(spec),
        "value_kind": "logits",
        "num_samples": num_samples,
        "num_failed": 0,
        "complete": False,
        "started_at": utc_now(),
        "finished_at": None,
        "tool_version": __version__,
        **(extra or {}),
    }
