"""Outputs training loaders read unchanged (issue 13): the CLI over loopback, then the real
readers: ``webdataset``, ``pyarrow`` and ``datasets.load_dataset`` for WebDataset and Parquet.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fetchpool.origin import Origin

CLI = [sys.executable, "-m", "fetchpool"]


def fetchpool(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def get(src: Path, out: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return fetchpool("get", src, "-o", out, "--allow-private-networks", "-q", *args)


def jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def hf_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``datasets``, offline, with its caches under tmp_path."""
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    try:
        import datasets
    except ImportError:
        pytest.skip("datasets is not installed (pip install 'fetchpool[test]')")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    yield datasets


def load(datasets: Any, kind: str, files: list[Path], tmp_path: Path) -> Any:
    return datasets.load_dataset(
        kind,
        data_files=[str(f) for f in files],
        split="train",
        cache_dir=str(tmp_path / "hf-cache"),
    )


def rows_input(origin: Origin, tmp_path: Path) -> Path:
    """Six images of three formats, an HTML page served with 200, typed columns, captions."""
    rows: list[dict[str, Any]] = []
    for n, ext in enumerate(["jpg", "png", "webp", "jpg", "png", "webp"]):
        row: dict[str, Any] = {
            "url": origin.image_url(n, ext, small=True),
            "caption": f"picture {n}",
            "n": n,
            "score": n / 4,
            "tags": [n, n + 1],
        }
        if n == 3:
            del row["caption"]  # a row without a caption gets an empty one
        rows.append(row)
    rows.insert(2, {"url": origin.url("html"), "caption": "a page", "n": 99, "score": 0.5})
    return jsonl(tmp_path / "in.jsonl", rows)


# -- captions, types and one extension: WebDataset -------------------------------------------


# webdataset 1.0 leaves its shard files for the garbage collector to close.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_webdataset_resized_loads_in_webdataset_and_datasets(
    origin: Origin, tmp_path: Path, hf_datasets: Any
) -> None:
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "out"
    result = get(
        rows_input(origin, tmp_path),
        out,
        "--format",
        "webdataset",
        "--resize",
        "32",
        "--caption-column",
        "caption",
        "--shard-size",
        "2",
    )
    assert result.returncode == 1, result.stderr  # the HTML page failed
    tars = sorted(out.glob("*.tar"))
    extensions = set()
    for tar in tars:
        with tarfile.open(tar) as archive:
            extensions |= {m.name.partition(".")[2] for m in archive.getmembers()}
    assert extensions == {"jpg", "txt", "json"}, "one image extension per run when resized"

    dataset = wds.WebDataset([str(t) for t in tars], shardshuffle=False, empty_check=False)
    samples = list(dataset.decode("pil").to_tuple("__key__", "jpg", "txt", "json"))
    assert sorted(int(key) for key, *_ in samples) == [0, 1, 3, 4, 5, 6]  # completion order
    by_n = {meta["n"]: (image, caption, meta) for _, image, caption, meta in samples}
    assert by_n[0][1] == "picture 0" and by_n[3][1] == "", "missing caption: empty .txt"
    image, _, meta = by_n[4]
    assert max(image.size) == 32 and meta["image_format"] == "JPEG"
    assert meta["score"] == 1.0 and meta["tags"] == [4, 5] and isinstance(meta["n"], int)

    loaded = load(hf_datasets, "webdataset", tars, tmp_path)
    assert len(loaded) == 6
    for sample in loaded:  # PIL images, captions, typed metadata
        assert max(sample["jpg"].size) == 32
        n = sample["json"]["n"]
        assert sample["txt"] == ("" if n == 3 else f"picture {n}")


def test_encode_keep_with_resize_keeps_each_format(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "out"
    src = jsonl(
        tmp_path / "in.jsonl",
        [{"url": origin.image_url(n, ext, small=True)} for n, ext in enumerate(["jpg", "png"])],
    )
    result = get(src, out, "--format", "webdataset", "--resize", "16", "--encode", "keep")
    assert result.returncode == 0, result.stderr
    with tarfile.open(out / "00000.tar") as archive:
        names = sorted(m.name for m in archive.getmembers())
    assert names == ["000000000.jpg", "000000000.json", "000000001.json", "000000001.png"]


# -- Parquet: types, Image feature, failures as rows, resume --------------------------------


def test_parquet_loads_in_pyarrow_and_datasets_with_types(
    origin: Origin, tmp_path: Path, hf_datasets: Any
) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow.dataset as pads

    out = tmp_path / "out"
    src = rows_input(origin, tmp_path)
    args = ("--format", "parquet", "--caption-column", "caption", "--shard-size", "2")
    result = get(src, out, *args)
    assert result.returncode == 1, result.stderr
    shards = sorted(out.glob("[0-9]*.parquet"))
    # 3 shards of 2 samples; the failure is in one of them, or alone in a 4th (completion order)
    assert len(shards) in (3, 4)
    assert all((out / f"{s.stem}_stats.json").is_file() for s in shards)
    table = pads.dataset([str(s) for s in shards], format="parquet").to_table()
    schema = table.schema
    assert schema.field("n").type == pa.int64() and schema.field("score").type == pa.float64()
    assert schema.field("tags").type == pa.list_(pa.int64())
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = sorted(table.to_pylist(), key=lambda r: r["position"])
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok", "ok", "ok", "ok"]
    page = rows[2]
    assert page["image"] is None and page["error_code"] == "not_an_image" and page["n"] == 99
    assert rows[4]["caption"] == "" and rows[0]["caption"] == "picture 0"  # n == 3: none
    assert pq.read_schema(shards[0]).metadata[b"huggingface"]

    loaded = load(hf_datasets, "parquet", shards, tmp_path)
    assert type(loaded.features["image"]).__name__ == "Image"
    ok = loaded.filter(lambda row: row["status"] == "ok")
    assert len(ok) == 6
    for sample in ok:  # shards are in completion order: check every row, not the first one
        assert sample["image"].__class__.__module__.startswith("PIL.")
        assert sample["image"].size == (sample["width"], sample["height"])
        n = sample["n"]
        assert sample["tags"] == [n, n + 1] and sample["score"] == n / 4
        assert isinstance(sample["score"], float)

    # Resumed with more rows: later shards keep the run's schema.
    more = src.read_text() + json.dumps(
        {"url": origin.image_url(20, "jpg", small=True), "n": 20, "score": 2, "tags": [1]}
    )
    src.write_text(more + "\n")
    assert get(src, out, *args).returncode == 1
    later = sorted(out.glob("[0-9]*.parquet"))
    assert len(later) == len(shards) + 1
    shards = later
    assert pq.read_schema(shards[-1]).remove_metadata() == schema.remove_metadata()
    assert len(load(hf_datasets, "parquet", shards, tmp_path / "again")) == 8


# -- every row in exactly one shard's metadata; stats -----------------------------------------


def test_webdataset_metadata_and_stats_list_every_row(origin: Origin, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "out"
    urls = [
        origin.image_url(0),
        origin.url("html"),
        origin.url("not-image"),
        origin.url("status/404"),
        origin.image_url(1),
        origin.image_url(0),  # a duplicate: skipped
    ]
    src = jsonl(tmp_path / "in.jsonl", [{"url": u, "id": i} for i, u in enumerate(urls)])
    result = get(src, out, "--format", "webdataset", "--shard-size", "1")
    assert result.returncode == 1, result.stderr
    tars = sorted(out.glob("*.tar"))
    # Each tar's metadata beside it; a shard whose rows all failed is its metadata alone.
    metas = sorted(out.glob("[0-9]*.parquet"))
    assert {t.stem for t in tars} <= {m.stem for m in metas}
    metadata = [pq.read_table(m).to_pylist() for m in metas]
    listed = sorted(
        (row["position"], row["status"], row["error_code"]) for m in metadata for row in m
    )
    assert listed == [
        (0, "ok", None),
        (1, "failed", "not_an_image"),
        (2, "failed", "not_an_image"),
        (3, "failed", "http_error"),
        (4, "ok", None),
        (5, "skipped", "duplicate"),
    ]
    stats = [json.loads((out / f"{m.stem}_stats.json").read_text()) for m in metas]
    assert sum(s["count"] for s in stats) == 6 and sum(s["successes"] for s in stats) == 2
    assert sum(s["errors"].get("not_an_image", 0) for s in stats) == 2
    assert all(s["end_time"] >= s["start_time"] for s in stats)
    for tar in tars:  # no HTML ever became a sample
        with tarfile.open(tar) as archive:
            images = [m.name for m in archive.getmembers() if not m.name.endswith(".json")]
        assert all(name.endswith(".jpg") for name in images)


# -- files: captions beside files, numbered subfolders, --accept -----------------------------


def test_files_captions_in_numbered_folders_resume_and_manifest(
    origin: Origin, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    rows = [{"url": origin.image_url(n), "caption": f"c{n}"} for n in range(5)]
    rows.append({"url": origin.image_url(1)})  # a duplicate of row 1
    src = jsonl(tmp_path / "in.jsonl", rows)
    args = ("--caption-column", "caption", "--shard-size", "2", "--sidecar")
    assert get(src, out, *args).returncode == 0
    folders = sorted(p.name for p in out.iterdir() if p.name != ".fetchpool")
    assert folders == ["00000", "00001", "00002"]
    images = sorted(out.glob("0*/*.jpg"))
    assert [p.parent.name for p in images] == ["00000", "00000", "00001", "00001", "00002"]
    for image in images:
        assert image.with_suffix(".txt").read_text().startswith("c")
        assert json.loads(image.with_suffix(".json").read_text())["path"].endswith(image.name)
    manifest = fetchpool("manifest", out, "--format", "jsonl")
    assert manifest.returncode == 0, manifest.stderr
    records = [json.loads(line) for line in manifest.stdout.splitlines()]
    assert records[1]["path"].startswith("00000/") and records[4]["path"].startswith("00002/")
    assert records[5]["error_code"] == "duplicate" and records[5]["path"] == records[1]["path"]
    before = sorted(p.relative_to(out) for p in out.rglob("*") if ".fetchpool" not in p.parts)
    again = get(src, out, *args)
    assert again.returncode == 0, again.stderr
    after = sorted(p.relative_to(out) for p in out.rglob("*") if ".fetchpool" not in p.parts)
    assert after == before, "a resumed run adds nothing"


def test_accept_refuses_other_content_types(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "out"
    src = jsonl(tmp_path / "in.jsonl", [{"url": origin.image_url(0)}, {"url": origin.url("html")}])
    result = get(src, out, "--accept", "image/*")
    assert result.returncode == 1
    manifest = fetchpool("manifest", out, "--format", "jsonl")
    records = [json.loads(line) for line in manifest.stdout.splitlines()]
    assert records[0]["status"] == "ok"
    assert records[1]["error_code"] == "unwanted_content_type"
    assert (
        "text/html" in records[1]["error_message"]
        and "--accept image/*" in (records[1]["error_message"])
    )
    assert [p.suffix for p in out.iterdir() if p.name != ".fetchpool"] == [".jpg"]
    # The default accepts everything: the page is mirrored.
    assert get(src, tmp_path / "all").returncode == 0


# -- a missing caption column is a usage error before any download ---------------------------


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet", "txt"])
def test_missing_caption_column_is_refused_before_any_download(
    origin: Origin, tmp_path: Path, kind: str
) -> None:
    url = origin.image_url(0)
    src = tmp_path / f"in.{kind}"
    if kind == "csv":
        src.write_text(f"url,text\n{url},hello\n")
    elif kind == "jsonl":
        jsonl(src, [{"url": url, "text": "hello"}])
    elif kind == "txt":
        src.write_text(url + "\n")
    else:
        pa = pytest.importorskip("pyarrow")
        pq = pytest.importorskip("pyarrow.parquet")
        pq.write_table(pa.table({"url": [url], "text": ["hello"]}), src)
    out = tmp_path / "out"
    result = get(src, out, "--caption-column", "caption")
    assert result.returncode == 2
    assert "--caption-column" in result.stderr and "caption" in result.stderr
    assert not out.exists()
    assert origin.requests("/img/") == []
