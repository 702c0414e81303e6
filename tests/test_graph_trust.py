"""A cached graph is trusted by its bytes, not its name: graphs carry their sha256 in their file name,
a changed graph (one bias, or its metadata) is refused in one line before it labels, a graph of an
older export format is exported again, and a store is continued only by a graph of its teacher."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

import trt_relabel
from trt_relabel.backends import OnnxRuntimeBackend, graph_may_continue
from trt_relabel.cli import main
from trt_relabel.export import (
    METADATA_KEY,
    NAME_DIGEST_CHARS,
    ExportError,
    find_graph,
    graph_sha256,
    read_graph_metadata,
)
from trt_relabel.store import LabelStore
from trt_relabel.tensorrt_engine import EngineError, EngineSidecar, check_plan


@pytest.fixture
def engines(bundled_graphs, tmp_path) -> Path:
    """A private copy of the bundled teacher's graphs (tests here change them)."""
    folder = tmp_path / "engines"
    folder.mkdir()
    for path in (bundled_graphs.fp32, bundled_graphs.fp16):
        shutil.copy(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def two_photos(tmp_path_factory, photos) -> Path:
    folder = tmp_path_factory.mktemp("two")
    for name in ("chelsea", "coffee"):
        Image.fromarray(photos[name]).resize((96, 64)).save(folder / f"{name}.jpg")
    return folder


def generate_cli(monkeypatch, capfd, data: Path, out: Path, engines: Path) -> tuple[int, str]:
    args = ["generate", str(data), "--out", str(out), "--backend", "onnxruntime", "--engines-dir", str(engines),
            "--batch-size", "2", "--workers", "0"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["trt-relabel", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code or 0, capfd.readouterr().err


def rewrite(path: Path, change, target: Path | None = None) -> None:
    """Load the graph at `path`, apply `change(model)` and save it to `target` (default: under its name)."""
    model = onnx.load(str(path))
    change(model)
    onnx.save(model, str(target or path))


def add_one_to_a_bias(model: onnx.ModelProto) -> None:
    tensor = next(t for t in model.graph.initializer if t.name.endswith("bias") and t.dims[0] == 1000)
    array = numpy_helper.to_array(tensor).copy()
    array[0] += 1
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


def set_metadata(text: str):
    def change(model: onnx.ModelProto) -> None:
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                prop.value = text

    return change


def test_graph_names_carry_their_sha256(bundled_graphs):
    for precision in ("fp32", "fp16"):
        path = getattr(bundled_graphs, precision)
        assert path.name.endswith(f".{precision}.{bundled_graphs.sha256[precision][:NAME_DIGEST_CHARS]}.onnx")
        assert graph_sha256(path) == bundled_graphs.sha256[precision]


def test_graph_bytes_do_not_depend_on_where_the_code_is_installed(bundled_graphs):
    """Exports leave out the exporter's stack traces (source file paths), so two machines exporting the
    same teacher with the same versions write the same graph, and may continue each other's stores."""
    source_folder = str(Path(trt_relabel.__file__).parent).encode()
    for path in (bundled_graphs.fp32, bundled_graphs.fp16):
        assert source_folder not in path.read_bytes()
        model = onnx.load(str(path), load_external_data=False)
        assert not any(p.key == "pkg.torch.onnx.stack_trace" for n in model.graph.node for p in n.metadata_props)


def test_a_graph_with_one_bias_changed_is_refused_before_it_labels(two_photos, engines, tmp_path, monkeypatch, capfd):
    out = tmp_path / "store"
    code, err = generate_cli(monkeypatch, capfd, two_photos, out, engines)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    fp32 = next(engines.glob("*.fp32.*.onnx"))
    assert manifest["graph_sha256"] == graph_sha256(fp32)
    status = np.load(out / "status.npy", mmap_mode="r+")
    status[1] = 0  # an interrupted run: row 1 still pending
    status.flush()
    del status
    values = (out / "values.npy").read_bytes()
    rewrite(fp32, add_one_to_a_bias)  # same name, same metadata, another teacher
    code, err = generate_cli(monkeypatch, capfd, two_photos, out, engines)
    assert code == 1
    assert err.strip().splitlines() == [
        f"error: {fp32}: its bytes (sha256 {graph_sha256(fp32)[:16]}) do not match the digest in its name: "
        "the graph was changed after export; delete it and run `trt-relabel build-engine` to export it again"
    ]
    assert np.load(out / "status.npy")[1] == 0 and (out / "values.npy").read_bytes() == values
    assert json.loads((out / "manifest.json").read_text())["graph_sha256"] == manifest["graph_sha256"]


def test_malformed_metadata_is_one_line_naming_the_graph(engines, bundled_graphs, tmp_path):
    fp16 = next(engines.glob("*.fp16.*.onnx"))
    rewrite(fp16, set_metadata('{"teacher": "efficientnet_lite0", '))
    with pytest.raises(ExportError) as error:
        read_graph_metadata(fp16)
    assert str(error.value).startswith(f"{fp16}: malformed trt-relabel metadata (JSONDecodeError")
    assert "\n" not in str(error.value)
    metadata = dataclasses.replace(bundled_graphs.metadata, precision="fp16")
    with pytest.raises(ExportError, match="do not match the digest in its name"):  # changed after export
        find_graph(engines, metadata)
    # a graph whose name matches its bytes but whose metadata cannot be read is not reused (exported again)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    renamed = fresh / fp16.name
    shutil.copy(fp16, renamed)
    stem = fp16.name.removesuffix(".onnx").rsplit(".", 1)[0]
    renamed.rename(fresh / f"{stem}.{graph_sha256(renamed)[:NAME_DIGEST_CHARS]}.onnx")
    assert find_graph(fresh, metadata) is None


def test_a_graph_of_an_older_export_format_is_not_reused(bundled_graphs, tmp_path):
    metadata = dataclasses.replace(bundled_graphs.metadata, precision="fp32")
    old = json.loads(metadata.to_json())
    del old["export_format"]  # graphs of the first exporter have no such field
    staged = tmp_path / "staged.onnx"
    rewrite(bundled_graphs.fp32, set_metadata(json.dumps(old)), staged)
    stem = bundled_graphs.fp32.name.removesuffix(".onnx").rsplit(".", 1)[0]
    staged.rename(tmp_path / f"{stem}.{graph_sha256(staged)[:NAME_DIGEST_CHARS]}.onnx")
    assert read_graph_metadata(next(tmp_path.glob("*.onnx"))).export_format == 1
    assert find_graph(tmp_path, metadata) is None
    assert find_graph(bundled_graphs.fp32.parent, metadata) == (bundled_graphs.fp32, bundled_graphs.sha256["fp32"])


def test_a_store_continues_only_with_a_graph_of_its_teacher(bundled_graphs):
    backend = OnnxRuntimeBackend(bundled_graphs.fp32, bundled_graphs.metadata, ["CPUExecutionProvider"])
    backend.teacher_graphs = frozenset(bundled_graphs.sha256.values())
    fp32, fp16 = bundled_graphs.sha256["fp32"], bundled_graphs.sha256["fp16"]
    assert graph_may_continue(fp32, backend)
    assert graph_may_continue(fp16, backend)  # the other precision of the same checked export
    assert graph_may_continue("", backend)  # started by eager torch: labels from the same weights
    assert not graph_may_continue("ab" * 32, backend)
    backend.graph_sha256 = ""  # eager torch runs no graph
    assert graph_may_continue("ab" * 32, backend)


def test_generate_refuses_a_store_labelled_by_an_unknown_graph(two_photos, engines, tmp_path, monkeypatch, capfd):
    out = tmp_path / "store"
    assert generate_cli(monkeypatch, capfd, two_photos, out, engines)[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["graph_sha256"] = "ab" * 32
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, err = generate_cli(monkeypatch, capfd, two_photos, out, engines)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {out}: labelled with graph sha256 {'ab' * 8}, which is not a graph of this teacher here"
    )
    assert LabelStore(out).labelled().all()


def test_a_plan_is_checked_against_its_sidecar(tmp_path, bundled_graphs):
    plan = tmp_path / "t.fp16.plan"
    plan.write_bytes(b"serialized engine")
    sidecar = EngineSidecar(
        tensorrt_version="10.13.0",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        graph="t.fp16.onnx",
        graph_sha256="ab" * 32,
        io={},
        profile=(1, 64, 64),
        metadata=dataclasses.replace(bundled_graphs.metadata, precision="fp16"),
        built_at="2026-12-01T00:00:00+00:00",
        plan_sha256="",
    )
    sidecar = dataclasses.replace(sidecar, plan_sha256=hashlib.sha256(b"serialized engine").hexdigest())
    check_plan(plan, sidecar)
    plan.write_bytes(b"serialized engine, changed")
    with pytest.raises(EngineError, match=r"its bytes \(sha256 [0-9a-f]{16}\) are not those its sidecar records"):
        check_plan(plan, sidecar)
