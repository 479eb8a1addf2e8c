"""Content-Encoding: bodies are decoded (gzip, deflate, stacks), bounded, or refused clearly.

Every server listens on 127.0.0.1 (raw-socket FaultServer or the embedded origin).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import sys
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from fetchpool import download
from fetchpool.config import FetchConfig
from fetchpool.fetch import HttpFetcher
from fetchpool.models import ErrorCode, Job, Record, Status
from fetchpool.origin import Origin
from socketserver_faults import FaultServer, response, serve_forever_keepalive

MiB = 1024 * 1024
#: fetch.decoding's ENCODING_ERROR, MAX_CODINGS and MAX_RATIO (spelled out: stable values).
ENCODING_ERROR = ErrorCode.BAD_CONTENT_ENCODING
MAX_CODINGS = 5
MAX_RATIO = 1100
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 400
CONFIG = FetchConfig(
    allow_private_networks=True,
    connect_timeout=1.0,
    read_timeout=1.0,
    total_timeout=10.0,
    min_speed=0,
    max_bytes=8 * MiB,
    user_agent="fetchpool-test/1",
)


@pytest.fixture
def make_fetcher(fetcher_factory: Callable[..., HttpFetcher]) -> Callable[..., HttpFetcher]:
    def make(config: FetchConfig = CONFIG) -> HttpFetcher:
        return fetcher_factory(config)

    return make


def fetch_body(
    make_fetcher: Callable[..., HttpFetcher],
    body: bytes,
    encoding: str,
    content_type: str = "image/jpeg",
    config: FetchConfig = CONFIG,
    *,
    chunked: bool = False,
) -> Record:
    headers = {"Content-Type": content_type, "Content-Encoding": encoding}
    if chunked:  # the body in 1000-byte chunks: decoding across many small reads
        pieces = [body[i : i + 1000] for i in range(0, len(body), 1000)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        payload = f"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n{head}\r\n".encode() + framed
    else:
        payload = response(200, body, headers)
    with FaultServer(serve_forever_keepalive(lambda _: payload)) as server:
        return make_fetcher(config).fetch(Job(0, server.url("/pics/photo")))


def assert_saved(record: Record, expected: bytes, extension: str = ".jpg") -> None:
    assert record.status is Status.OK, (record.error_code, record.error_message)
    assert Path(record.temp_path or "").read_bytes() == expected
    assert record.bytes == len(expected)
    assert record.sha256 == hashlib.sha256(expected).hexdigest()
    assert record.extension == extension


def assert_failed(record: Record, code: ErrorCode, tmp_dir: Path, *words: str) -> None:
    assert record.status is Status.FAILED, record
    assert record.error_code is code, (record.error_code, record.error_message)
    for word in words:
        assert word in (record.error_message or ""), record.error_message
    assert record.temp_path is None and os.listdir(tmp_dir) == []


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


# -- what users meet: decoded -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("GZip", gzip.compress),
        ("deflate", zlib.compress),  # with its zlib wrapper (RFC 9110)
        ("deflate", raw_deflate),  # without it, as many servers send it; curl accepts both
        ("gzip, gzip", lambda data: gzip.compress(gzip.compress(data))),
        ("deflate, identity, gzip", lambda data: gzip.compress(zlib.compress(data))),
        ("gzip", lambda data: gzip.compress(data[:999]) + gzip.compress(data[999:])),  # members
    ],
)
@pytest.mark.parametrize("chunked", [False, True])
def test_encoded_image_is_saved_decoded_and_named_from_its_bytes(
    make_fetcher, encoding: str, encode: Callable[[bytes], bytes], chunked: bool
) -> None:
    record = fetch_body(make_fetcher, encode(JPEG), encoding, "image/jpeg", chunked=chunked)
    assert_saved(record, JPEG)


def test_gzip_body_is_no_longer_named_gz(make_fetcher) -> None:
    png = b"\x89PNG\r\n\x1a\n" + bytes(3000)
    record = fetch_body(make_fetcher, gzip.compress(png), "gzip", "application/octet-stream")
    assert_saved(record, png, ".png")


def test_origin_gzip_endpoint_downloads_the_image(origin: Origin, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = download([origin.url("/gzip?n=3")], out, allow_private_networks=True)
    (record,) = report.records()
    assert record.ok, record.error_message
    assert record.path is not None and record.path.endswith(".jpg")
    assert (out / record.path).read_bytes() == origin.image_bytes(3)
    assert record.sha256 == hashlib.sha256(origin.image_bytes(3)).hexdigest()


def test_a_gzip_file_served_as_application_gzip_is_kept_as_sent(make_fetcher) -> None:
    # wget's rule: Content-Encoding gzip on a gzip media type is the file itself (.tar.gz).
    archive = gzip.compress(b"tar data" * 100)
    record = fetch_body(make_fetcher, archive, "gzip", "application/x-gzip")
    assert_saved(record, archive, ".gz")


def test_empty_encoded_body_is_an_empty_file(make_fetcher) -> None:
    assert_saved(fetch_body(make_fetcher, b"", "gzip", "image/jpeg"), b"")


# -- bounds -----------------------------------------------------------------------------------


def _zeros_gzip(size: int, layers: int) -> bytes:
    compressor = zlib.compressobj(9, wbits=zlib.MAX_WBITS | 16)
    zero = bytes(MiB)
    body = b"".join(compressor.compress(zero) for _ in range(size // MiB)) + compressor.flush()
    for _ in range(layers - 1):
        body = gzip.compress(body, 9)
    return body


def _peak_while(action: Callable[[], Record]) -> tuple[Record, int]:
    """The record and the most memory Python held at once while ``action`` ran (the bound
    that matters: the error code says it stopped, the peak that it never inflated)."""
    tracemalloc.start()
    try:
        record = action()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return record, peak


def test_max_bytes_bounds_the_decoded_size_with_flat_memory(make_fetcher, tmp_dir: Path) -> None:
    bomb = _zeros_gzip(64 * MiB, 1)  # 64 KB that inflate to 64 MiB (1000:1)
    assert len(bomb) < CONFIG.max_bytes
    record, peak = _peak_while(lambda: fetch_body(make_fetcher, bomb, "gzip"))
    assert_failed(record, ErrorCode.TOO_LARGE, tmp_dir, "decoded", f"max_bytes={CONFIG.max_bytes}")
    assert peak < 4 * MiB, f"decoding held {peak} bytes at once"


def test_stacked_bomb_stops_at_the_ratio_bound_long_before_max_bytes(
    make_fetcher, tmp_dir: Path
) -> None:
    # Three gzip layers of 64 MiB of zeros: a few hundred bytes on the wire.
    bomb = _zeros_gzip(64 * MiB, 3)
    assert len(bomb) < 4096
    config = FetchConfig(**{**_fields(CONFIG), "max_bytes": 100 * MiB})
    record, peak = _peak_while(
        lambda: fetch_body(make_fetcher, bomb, "gzip, gzip, gzip", config=config)
    )
    assert_failed(record, ErrorCode.TOO_LARGE, tmp_dir, f"{MAX_RATIO}x", "bomb")
    assert peak < 4 * MiB, f"decoding held {peak} bytes at once"


def _fields(config: FetchConfig) -> dict[str, object]:
    return {name: getattr(config, name) for name in FetchConfig.__slots__}  # type: ignore[attr-defined]


def test_declared_length_above_max_bytes_is_still_refused_before_reading(
    make_fetcher, tmp_dir: Path
) -> None:
    payload = (
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 999999999\r\n\r\n"
        + gzip.compress(JPEG)
    )
    with FaultServer(serve_forever_keepalive(lambda _: payload)) as server:
        record = make_fetcher().fetch(Job(0, server.url("/x")))
    assert_failed(record, ErrorCode.TOO_LARGE, tmp_dir, "Content-Length")


def test_more_stacked_codings_than_curl_decodes_are_refused(make_fetcher, tmp_dir: Path) -> None:
    body = JPEG
    for _ in range(MAX_CODINGS + 1):
        body = gzip.compress(body)
    record = fetch_body(make_fetcher, body, ", ".join(["gzip"] * (MAX_CODINGS + 1)))
    assert_failed(record, ENCODING_ERROR, tmp_dir, str(MAX_CODINGS))


# -- what cannot be decoded: a clear failure --------------------------------------------------


@pytest.mark.parametrize("encoding", ["compress", "zstd", "x-custom"])
def test_unknown_coding_fails_naming_it(make_fetcher, tmp_dir: Path, encoding: str) -> None:
    record = fetch_body(make_fetcher, b"\x28\xb5\x2f\xfd" + JPEG, encoding)
    assert_failed(record, ENCODING_ERROR, tmp_dir, repr(encoding), "cannot decode")


def test_br_without_a_brotli_library_fails_saying_what_to_install(
    make_fetcher, tmp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("brotli", "brotlicffi"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    monkeypatch.setattr("fetchpool.fetch.decoding._BROTLI", [])
    record = fetch_body(make_fetcher, b"\x1b\x00\x00" + JPEG, "br")
    assert_failed(record, ENCODING_ERROR, tmp_dir, "'br'", "pip install brotli")


def test_br_is_decoded_when_brotli_is_installed(make_fetcher) -> None:
    brotli = pytest.importorskip("brotli")
    from fetchpool.fetch.decoding import _brotli

    if _brotli() is None:
        pytest.skip("this brotli cannot bound its output (needs >= 1.2)")
    assert_saved(fetch_body(make_fetcher, brotli.compress(JPEG), "br"), JPEG)


def test_corrupt_compressed_data_fails(make_fetcher, tmp_dir: Path) -> None:
    broken = bytearray(gzip.compress(JPEG))
    broken[20:40] = b"\xff" * 20
    record = fetch_body(make_fetcher, bytes(broken), "gzip")
    assert_failed(record, ENCODING_ERROR, tmp_dir, "gzip", "does not decode")


def test_compressed_stream_cut_short_is_an_incomplete_body(make_fetcher, tmp_dir: Path) -> None:
    cut = gzip.compress(JPEG)[:-100]  # framing complete (Content-Length matches), stream not
    record = fetch_body(make_fetcher, cut, "gzip")
    assert_failed(record, ErrorCode.INCOMPLETE_BODY, tmp_dir, "gzip")
