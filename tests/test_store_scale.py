"""What keeps the store cheap at ImageNet scale, checked at a small size (the figures at 1.28 M rows
are measured by the benchmarks): no Python object per sample, loader workers that share the sample
pages, scattered gathers through a MADV_RANDOM mapping, samples.tsv parsed once per process."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_store import SPEC

from trt_relabel.images import ImageEntry
from trt_relabel.sample_table import SampleTable
from trt_relabel.store import LabelStore, create_store

ROWS = 20_000


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> Path:
    """A store of 20000 pending rows (zeros: class index 0 everywhere)."""
    out = tmp_path_factory.mktemp("scale") / "store"
    create_store(out, SPEC, [ImageEntry(f"c{i % 7}/img{i:06d}.jpg", i % 7) for i in range(ROWS)])
    return out


def test_opening_makes_no_object_per_sample(big_store):
    gc.collect()
    before = len(gc.get_objects())
    store = LabelStore(big_store)
    assert len(gc.get_objects()) - before < 100  # not one per row (20000)
    assert store.samples[12345] == ImageEntry("c4/img012345.jpg", 4)
    assert store.samples.classes[:8].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]


def test_samples_tsv_parsed_once_while_its_table_is_alive(big_store, monkeypatch):
    parsed = []
    parse = SampleTable.parse.__func__
    monkeypatch.setattr(SampleTable, "parse", classmethod(lambda cls, *a, **k: parsed.append(1) or parse(cls, *a, **k)))
    first = LabelStore(big_store)
    second = create_store(big_store, SPEC, first.samples)  # a resume, as generate does after its check
    assert len(parsed) == 1 and second.num_samples == ROWS
    (big_store / "samples.tsv").write_bytes((big_store / "samples.tsv").read_bytes())  # changed: read again
    assert LabelStore(big_store).samples == first.samples and len(parsed) == 2


def _vm_flags(path: Path) -> list[set[str]]:
    """The VmFlags of this process's mappings of `path` (Linux /proc/self/smaps)."""
    flags, current = [], None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isdigit() or line[:1] in "abcdef":
            current = line.endswith(str(path))
        elif line.startswith("VmFlags:") and current:
            flags.append(set(line.split()[1:]))
    return flags


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux /proc/self/smaps")
def test_scattered_gathers_read_through_a_random_access_mapping(big_store):
    """Scattered rows go through a mapping advised MADV_RANDOM (VmFlags 'rr': no read-ahead, a
    few pages per row when cold); the default mapping keeps the read-ahead for long runs."""
    store = LabelStore(big_store)
    store.gather(np.arange(0, 2048))  # a dense run
    values = big_store.resolve() / "values.npy"
    assert _vm_flags(values) and not any("rr" in f for f in _vm_flags(values))
    got = store.gather([19_999, 3, 10_000, 3])
    assert got[0].shape == (4, 5, 7, 7) and not got[0].any()
    for name in ("values.npy", "indices.npy"):
        assert sum("rr" in f for f in _vm_flags(big_store.resolve() / name)) == 1, name


WORKER_MEMORY = """
import sys
from pathlib import Path
import numpy as np, torch
import trt_relabel.data as data
import trt_relabel.shards as shards
from trt_relabel.images import ImageEntry

def private_dirty_mb(pid):
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1]) / 1024

rows = 200_000
entries = [ImageEntry(f"class{i % 1000:04d}/image{i:08d}.JPEG", i % 1000) for i in range(rows)]
shards.load_rgb = lambda path: path  # decoding stubbed: the worker only touches the entries

class StubTransform:
    size = [4, 4]

    def __call__(self, picture):
        return torch.zeros(3, 4, 4), np.zeros(4, np.float32), False


dataset = data.TrainBatches(shards.FolderInputs(Path(".")), entries, StubTransform(), None)
del entries
sampler = data.ShardedBatchSampler(np.arange(rows), 2000, shuffle=True, drop_last=True)
batches = iter(data.batch_loader(dataset, sampler, workers=1))
next(batches)
start = private_dirty_mb(batches._workers[0].pid)
for _ in range(len(sampler) - 2):  # the worker stays up until the last batch is taken
    assert next(batches).labels.shape == (2000,)
print(private_dirty_mb(batches._workers[0].pid) - start)
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="reads Linux /proc/PID/smaps_rollup")
def test_loader_workers_share_the_sample_pages():
    """A forked worker that reads every row of 200000 once copies almost none of the parent's
    pages (Python objects per row, and the parent objects a garbage collection in the worker
    traverses, would be copied on access: ~100 MB)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WORKER_MEMORY)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 20
