"""File naming: examples and Hypothesis properties."""

from __future__ import annotations

import hashlib
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fetchpool.outputs.naming import file_name, url_hash, with_counter

H = "https://example.com"


def digest(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:12]


@pytest.mark.parametrize(
    ("url", "extension", "expected_stem", "expected_ext"),
    [
        (f"{H}/photos/Cat%20Pic.JPG?size=large", None, "Cat_Pic", ".jpg"),
        (f"{H}/photos/Cat%20Pic.JPG", ".webp", "Cat_Pic", ".webp"),
        (f"{H}/a/b/", None, "item", ".bin"),
        (f"{H}/?id=3", ".jpg", "item", ".jpg"),
        (f"{H}", ".jpg", "item", ".jpg"),
        (f"{H}/..", ".png", "item", ".png"),
        (f"{H}/%2e%2e", ".png", "item", ".png"),
        (f"{H}/%2e%2e%2fetc%2fpasswd", ".jpg", "etc_passwd", ".jpg"),
        (f"{H}/.htaccess", None, "htaccess", ".bin"),
        (f"{H}/-rf", ".jpg", "rf", ".jpg"),
        (f"{H}/CON.tar", ".jpg", "CON_", ".jpg"),
        (f"{H}/nul", None, "nul_", ".bin"),
        (f"{H}/lpt1.txt", None, "lpt1_", ".txt"),
        (f"{H}/\uff46\uff55\uff4c\uff4c.png", None, "full", ".png"),  # fullwidth "full"
        (f"{H}/caf%C3%A9.jpeg", None, "caf_", ".jpeg"),
        (f"{H}/archive.tar.gz", None, "archive.tar", ".gz"),
        (f"{H}/image.verylongext", None, "image.verylongext", ".bin"),
        (f"{H}/image", "jpg", "image", ".jpg"),
        (f"{H}/image", ".J/P\\G", "image", ".jpg"),
        (f"{H}/image", "", "image", ".bin"),
        (f"{H}/{'x' * 300}.jpg", None, "x" * 60, ".jpg"),
        ("http://[::1/x", None, "item", ".bin"),
    ],
)
def test_examples(url: str, extension: str | None, expected_stem: str, expected_ext: str) -> None:
    assert file_name(url, extension) == f"{expected_stem}-{digest(url)}{expected_ext}"


def test_url_hash() -> None:
    assert url_hash("http://a/") == digest("http://a/")
    assert url_hash("http://a/\udcff")  # lone surrogates do not crash


def test_with_counter() -> None:
    assert with_counter("cat-0123456789ab.jpg", 2) == "cat-0123456789ab-2.jpg"
    assert with_counter("noext", 3) == "noext-3"


def check_safe(name: str) -> None:
    assert name
    assert len(name) <= 100
    assert "/" not in name
    assert "\\" not in name
    assert "\x00" not in name
    assert all(ord(c) >= 0x20 and ord(c) != 0x7F for c in name)
    assert not name.startswith(".")
    assert not name.startswith("-")
    assert name not in (".", "..")
    assert set(name) <= set(string.ascii_letters + string.digits + "._-")
    base = name.split(".", maxsplit=1)[0].upper()
    assert base not in {"CON", "PRN", "AUX", "NUL", "COM1", "LPT1"}


urls = st.one_of(
    st.text(max_size=300),
    st.builds(
        lambda path, query: f"https://example.com/{path}{query}",
        st.text(max_size=200),
        st.sampled_from(["", "?a=1", "#x", "?"]),
    ),
    st.builds(
        lambda segs: "http://h/" + "/".join(segs),
        st.lists(st.sampled_from(["..", ".", "%2e%2e", "%2F", "CON", "a.b", "%00", "\\"])),
    ),
)
extensions = st.one_of(st.none(), st.text(max_size=20), st.sampled_from([".jpg", ".png"]))


@settings(max_examples=500)
@given(urls, extensions)
def test_names_are_safe_and_deterministic(url: str, extension: str | None) -> None:
    name = file_name(url, extension)
    check_safe(name)
    assert file_name(url, extension) == name


@settings(max_examples=300)
@given(st.lists(urls, min_size=2, max_size=20, unique=True), extensions)
def test_different_urls_get_different_names(batch: list[str], extension: str | None) -> None:
    names = {file_name(url, extension) for url in batch}
    assert len(names) == len(batch)
