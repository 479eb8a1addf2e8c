"""TLS trust as curl and wget offer it: --ca-certificate, --ca-directory, SSL_CERT_FILE.

A test CA and a loopback certificate it signs are made with the openssl CLI for each module;
the embedded origin serves HTTPS with them (``Origin(tls=...)``).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from engines import ENGINES, engine_args
from fetchpool import download
from fetchpool.config import FetchConfig, Options
from fetchpool.errors import ConfigError
from fetchpool.fetch import HttpFetcher
from fetchpool.models import ErrorCode, Job
from fetchpool.origin import Origin


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA's certificate (PEM): what --ca-certificate takes
    cert: Path  # the server's certificate, signed by the CA, for 127.0.0.1 only
    key: Path
    other_ca: Path  # a CA that signed nothing here
    folder: Path


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN=fetchpool test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=folder,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:  # pragma: no cover - openssl is on the CI image
        pytest.skip("openssl CLI not available")
    folder = tmp_path_factory.mktemp("pki")
    ca, ca_key = _make_ca(folder, "ca")
    other_ca, _ = _make_ca(folder, "other-ca")
    key, csr, cert = folder / "server.key", folder / "server.csr", folder / "server.pem"
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1",
        cwd=folder,
    )  # fmt: skip
    extensions = folder / "server.ext"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-extfile", extensions,
        cwd=folder,
    )  # fmt: skip
    return Pki(ca, cert, key, other_ca, folder)


@pytest.fixture
def tls_origin(pki: Pki) -> Iterator[Origin]:
    with Origin(tls=(str(pki.cert), str(pki.key))) as server:
        yield server


def _fetch(config: FetchConfig, url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    fetcher = HttpFetcher(config, tmp_path)
    try:
        return fetcher.fetch(Job(0, url))
    finally:
        fetcher.close()


LOOPBACK = {"allow_private_networks": True, "min_speed": 0}


# --- the fetcher ------------------------------------------------------------------------------


def test_untrusted_ca_fails_with_the_options_that_fix_it(
    tls_origin: Origin, tmp_path: Path
) -> None:
    assert tls_origin.image_url(1).startswith("https://127.0.0.1:")
    record = _fetch(FetchConfig(**LOOPBACK), tls_origin.image_url(1), tmp_path)
    assert record.error_code is ErrorCode.TLS_ERROR
    message = record.error_message or ""
    assert "certificate verify failed" in message
    assert "--ca-certificate FILE" in message and "--insecure" in message


def test_ca_certificate_is_trusted_beside_the_system_store(
    pki: Pki, tls_origin: Origin, tmp_path: Path
) -> None:
    config = FetchConfig(ca_certificate=str(pki.ca), **LOOPBACK)
    record = _fetch(config, tls_origin.image_url(3), tmp_path)
    assert record.ok, record.error_message
    assert record.temp_path is not None
    assert Path(record.temp_path).read_bytes() == tls_origin.image_bytes(3)
    # Added to the defaults, not replacing them: the system store is still loaded.
    from fetchpool.fetch.http11 import tls_context

    added = tls_context(insecure=False, ca_data=config.ca_pem[1] if config.ca_pem else None)
    plain = tls_context(insecure=False)
    assert added.cert_store_stats()["x509_ca"] == plain.cert_store_stats()["x509_ca"] + 1


def test_a_wrong_ca_still_fails(pki: Pki, tls_origin: Origin, tmp_path: Path) -> None:
    config = FetchConfig(ca_certificate=str(pki.other_ca), **LOOPBACK)
    record = _fetch(config, tls_origin.image_url(1), tmp_path)
    assert record.error_code is ErrorCode.TLS_ERROR
    assert "--ca-certificate" in (record.error_message or "")


def test_a_name_mismatch_is_not_blamed_on_the_ca(
    pki: Pki, tls_origin: Origin, tmp_path: Path
) -> None:
    """localhost reaches the origin, but the certificate is for 127.0.0.1 only."""
    config = FetchConfig(ca_certificate=str(pki.ca), **LOOPBACK)
    url = tls_origin.image_url(1).replace("127.0.0.1", "localhost")
    record = _fetch(config, url, tmp_path)
    assert record.error_code is ErrorCode.TLS_ERROR, record.error_message
    message = record.error_message or ""
    assert "another host" in message and "--ca-certificate" not in message


def test_ca_directory(pki: Pki, tls_origin: Origin, tmp_path: Path) -> None:
    folder = tmp_path / "cas"
    folder.mkdir()
    shutil.copy(pki.ca, folder / "ca.pem")
    with pytest.raises(ConfigError, match=r"--ca-directory .*openssl rehash"):
        FetchConfig(ca_directory=str(folder))
    _openssl("rehash", folder, cwd=tmp_path)
    record = _fetch(
        FetchConfig(ca_directory=str(folder), **LOOPBACK), tls_origin.image_url(2), tmp_path
    )
    assert record.ok, record.error_message


def test_insecure_skips_the_check(tls_origin: Origin, tmp_path: Path) -> None:
    record = _fetch(FetchConfig(insecure=True, **LOOPBACK), tls_origin.image_url(1), tmp_path)
    assert record.ok


# --- validation -------------------------------------------------------------------------------


def test_bad_ca_files_are_refused_naming_the_option(pki: Pki, tmp_path: Path) -> None:
    cases = {
        tmp_path / "missing.pem": "no such file",
        tmp_path: "is a folder",
        pki.key: "a private key",
        _write(tmp_path / "empty.pem", b""): "no certificate",
        _write(
            tmp_path / "broken.pem",
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
        ): "not a valid certificate",
    }
    for path, reason in cases.items():
        with pytest.raises(ConfigError, match="--ca-certificate") as caught:
            FetchConfig(ca_certificate=str(path))
        assert reason in str(caught.value), (path, caught.value)
    with pytest.raises(ConfigError, match=r"--ca-directory .*no such folder"):
        FetchConfig(ca_directory=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"--ca-directory .*not a folder"):
        FetchConfig(ca_directory=str(pki.ca))


def test_unreadable_ca_file(pki: Pki, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores permissions")
    path = tmp_path / "ca.pem"
    shutil.copy(pki.ca, path)
    path.chmod(0)
    with pytest.raises(ConfigError, match=r"--ca-certificate .*cannot read it"):
        FetchConfig(ca_certificate=str(path))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_bundle_with_comments_and_several_cas(pki: Pki, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.pem"
    text = "# Ünïcode comment, as in distributions' bundles\n" + pki.other_ca.read_text()
    bundle.write_text(text + "\nIssuer: x\n" + pki.ca.read_text())
    config = FetchConfig(ca_certificate=str(bundle))
    assert config.ca_pem is not None and config.ca_pem[1].count("BEGIN CERTIFICATE") == 2


def test_the_bundle_travels_with_the_config(pki: Pki, tls_origin: Origin, tmp_path: Path) -> None:
    """Fetch processes and cluster workers get the PEM text, not a path they may not have."""
    path = tmp_path / "ca.pem"
    shutil.copy(pki.ca, path)
    config = FetchConfig(ca_certificate=str(path), **LOOPBACK)
    path.unlink()
    copy = replace(pickle.loads(pickle.dumps(config)), threads=2)  # as fetch workers do
    assert copy.ca_pem == config.ca_pem and copy.ca_certificate == str(path)
    assert _fetch(copy, tls_origin.image_url(1), tmp_path).ok
    assert "ca_pem" not in json.dumps(Options(fetch=config).recorded())


# --- the command line -------------------------------------------------------------------------


def _get(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fetchpool", "get", *map(str, args)]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False, env=env
    )


def _manifest(out: Path) -> list[dict[str, object]]:
    result = subprocess.run(
        [sys.executable, "-m", "fetchpool", "manifest", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("engine", ENGINES)
def test_cli_private_ca(pki: Pki, tls_origin: Origin, tmp_path: Path, engine: str) -> None:
    source = tmp_path / "urls.txt"
    source.write_text("".join(f"{tls_origin.image_url(n)}\n" for n in range(6)))
    common = ["--allow-private-networks", *engine_args(engine), "--threads", "4"]

    untrusted = _get(source, "-o", tmp_path / "a", *common)
    assert untrusted.returncode == 1, untrusted.stderr
    assert "tls_error      6" in untrusted.stderr
    assert "hint: tls_error:" in untrusted.stderr and "--ca-certificate FILE" in untrusted.stderr
    rows = _manifest(tmp_path / "a")
    assert all("--ca-certificate FILE" in str(row["error_message"]) for row in rows)
    assert all(row["attempts"] == 1 for row in rows)  # not retried

    trusted = _get(source, "-o", tmp_path / "b", *common, "--ca-certificate", pki.ca)
    assert trusted.returncode == 0, trusted.stderr
    saved = sorted(p for p in (tmp_path / "b").iterdir() if p.name != ".fetchpool")
    assert len(saved) == 6
    assert sorted(p.read_bytes() for p in saved) == sorted(
        tls_origin.image_bytes(n) for n in range(6)
    )

    wrong = _get(source, "-o", tmp_path / "c", *common, "--ca-certificate", pki.other_ca)
    assert wrong.returncode == 1 and "tls_error      6" in wrong.stderr


def test_cli_ssl_cert_file_replaces_the_store(pki: Pki, tls_origin: Origin, tmp_path: Path) -> None:
    source = tmp_path / "urls.txt"
    source.write_text(f"{tls_origin.image_url(1)}\n")
    env = {**os.environ, "SSL_CERT_FILE": str(pki.ca), "SSL_CERT_DIR": str(tmp_path / "none")}
    result = _get(source, "-o", tmp_path / "out", "--allow-private-networks", env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--ca-certificate", "missing.pem", "--ca-certificate missing.pem: no such file"),
        ("--ca-certificate", "server.key", "a private key"),
        ("--ca-certificate", "server.csr", "no certificate"),
        ("--ca-directory", "nowhere", "--ca-directory nowhere: no such folder"),
    ],
)
def test_cli_bad_ca_is_a_usage_error_before_any_download(
    pki: Pki, tmp_path: Path, option: str, value: str, message: str
) -> None:
    source = tmp_path / "urls.txt"
    source.write_text("https://127.0.0.1:9/x\n")
    result = subprocess.run(
        [sys.executable, "-m", "fetchpool", "get", str(source), "-o", str(tmp_path / "out"),
         option, value],
        capture_output=True, text=True, timeout=60, check=False, cwd=pki.folder,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


# --- a cluster part ---------------------------------------------------------------------------


@pytest.mark.slow
def test_cluster_parts_trust_the_ca_without_its_file(
    pki: Pki, tls_origin: Origin, tmp_path: Path
) -> None:
    pytest.importorskip("distributed")
    import distributed

    from cluster_helpers import local_cluster

    path = tmp_path / "ca.pem"
    shutil.copy(pki.ca, path)
    options = Options.from_kwargs(
        ca_certificate=str(path), fetch_processes=2, threads=4, **LOOPBACK
    )
    path.unlink()  # the workers must get by with what the options carry
    source = tmp_path / "urls.txt"
    source.write_text("".join(f"{tls_origin.image_url(n)}\n" for n in range(8)))
    cluster = local_cluster(1)
    try:
        with distributed.Client(cluster) as client:
            report = download(source, tmp_path / "dest", options=options, cluster=client, parts=2)
    finally:
        cluster.close()
    assert report.ok == 8, report.errors


def test_serve_needs_both_tls_files(pki: Pki) -> None:
    from click.testing import CliRunner

    from fetchpool.origin.cli import serve_command

    result = CliRunner().invoke(serve_command, ["--port", "0", "--tls-cert", str(pki.cert)])
    assert result.exit_code == 2 and "--tls-cert and --tls-key go together" in result.output
