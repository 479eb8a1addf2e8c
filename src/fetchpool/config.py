"""Configuration: frozen dataclasses, validated when built. Bottom layer.

Each stage reads its own config (:class:`FetchConfig`, :class:`ImageConfig`,
:class:`OutputConfig`); :class:`Options` bundles them with run-level settings. Shorthand from
the CLI or ``download(**options)`` is converted once, in :func:`Options.from_kwargs`.
Defaults follow ``RELIABILITY.md``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from fetchpool._version import __version__
from fetchpool.errors import ConfigError
from fetchpool.proxies import ProxyPolicy, environment_proxies
from fetchpool.redact import redact_text

MiB = 1024 * 1024

ResizeMode = Literal["no", "keep-ratio", "keep-ratio-largest", "center-crop", "border"]
RESIZE_MODES: tuple[str, ...] = ("no", "keep-ratio", "keep-ratio-largest", "center-crop", "border")
#: Resampling filters: Pillow's, plus ``area`` (img2dataset's name; Pillow's ``box``) and
#: ``auto`` (downscale: JPEG draft + LANCZOS with a reducing gap; upscale: LANCZOS).
ResampleFilter = Literal[
    "auto", "nearest", "box", "area", "bilinear", "hamming", "bicubic", "lanczos"
]
RESAMPLE_FILTERS: tuple[str, ...] = (
    "auto",
    "nearest",
    "box",
    "area",
    "bilinear",
    "hamming",
    "bicubic",
    "lanczos",
)
Encode = Literal["keep", "jpeg", "webp", "png"]
OutputFormat = Literal["files", "webdataset", "parquet"]
HashName = Literal["md5", "sha256", "sha512"]
#: Digests ``--hash`` and ``--verify-hash-type`` offer (img2dataset's ``compute_hash`` set).
HASHES: tuple[HashName, ...] = ("md5", "sha256", "sha512")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


#: Longest accepted timeout (a year): sockets and the kernel's timeval need finite values.
MAX_TIMEOUT = 365 * 86400.0
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 field names
_MEDIA_TOKEN = r"[!#$%&'+\-.^_`|~0-9A-Za-z]+"  # noqa: S105 - RFC 9110 token, without "*"
_MEDIA_RANGE = re.compile(rf"\*/\*|{_MEDIA_TOKEN}/(\*|{_MEDIA_TOKEN})")  # image/*, image/png
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # HTAB, visible ASCII, obs-text (Latin-1)


#: Opt-out directives honoured unless told otherwise (``--disallowed-header-directives``):
#: X-Robots-Tag rules, plus ``tdm-reservation`` for the TDMRep header ``tdm-reservation: 1``.
#: A superset of img2dataset's default (noai, noimageai, noindex, noimageindex), so a list
#: moved over from img2dataset never saves a file that img2dataset would have refused.
DEFAULT_DISALLOWED_HEADER_DIRECTIVES = (
    "noai",
    "noimageai",
    "noml",
    "noindex",
    "noimageindex",
    "tdm-reservation",
)
_DIRECTIVE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_AGENT_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def parse_directives(value: str | Iterable[str]) -> tuple[str, ...]:
    """``"noai, NoImageAI"`` or ``["noai"]`` as ``("noai", "noimageai")``; ``""`` is none.

    Each must look like an X-Robots-Tag rule (letters, digits, ``-``, ``_``); empty items
    are skipped, repeats dropped.
    """
    items = value.split(",") if isinstance(value, str) else list(value)
    result: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError(f"--disallowed-header-directives: {item!r} is not a directive name")
        name = item.strip().lower()
        if not name:
            continue
        _check(
            bool(_DIRECTIVE.fullmatch(name)),
            f"--disallowed-header-directives: {item.strip()[:40]!r} is not a directive name "
            "(like noai; letters, digits, '-' and '_'; comma-separated, '' for none)",
        )
        if name not in result:
            result.append(name)
    return tuple(result)


#: A CA bundle larger than this is not a CA bundle (Mozilla's whole store is ~220 KB).
_MAX_CA_BYTES = 16 * MiB
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL
)
#: OpenSSL's hashed names in a CA folder: ``5ed36f99.0`` (``.r0`` for CRLs).
_HASHED_NAME = re.compile(r"[0-9a-f]{8}\.r?[0-9]+")


def load_ca_certificate(path: str) -> str:
    """The PEM certificates of the bundle at ``path``, checked by OpenSSL, as one string.

    Raises :class:`ConfigError` naming ``--ca-certificate`` when the file is missing,
    unreadable, not PEM or holds a certificate OpenSSL refuses. Text around the blocks
    (comments, an ``Issuer:`` line in another script) is dropped.
    """
    option = f"--ca-certificate {path}"
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_CA_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{option}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(
            f"{option}: is a folder; a folder of hashed certificates goes with --ca-directory"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{option}: cannot read it: {exc.strerror or exc}") from None
    _check(len(data) <= _MAX_CA_BYTES, f"{option}: larger than 16 MiB, not a CA bundle")
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        what = "a private key" if b"PRIVATE KEY-----" in data else "no certificate"
        raise ConfigError(
            f"{option}: {what}, not a PEM bundle of CA certificates "
            "('-----BEGIN CERTIFICATE-----' blocks; convert DER with "
            "'openssl x509 -inform der -in FILE -out FILE.pem')"
        )
    pem = b"\n".join(blocks).decode("ascii", "replace") + "\n"
    import ssl  # only when the option is used: it costs start-up time

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{option}: not a valid certificate: {exc}") from None
    return pem


def check_ca_directory(path: str) -> None:
    """Raise :class:`ConfigError` naming ``--ca-directory`` unless ``path`` is a readable
    folder with OpenSSL's hashed certificate names in it (``openssl rehash`` makes them)."""
    option = f"--ca-directory {path}"
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        raise ConfigError(f"{option}: no such folder") from None
    except NotADirectoryError:
        raise ConfigError(
            f"{option}: not a folder (a PEM bundle goes with --ca-certificate)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{option}: cannot read it: {exc.strerror or exc}") from None
    _check(
        any(_HASHED_NAME.fullmatch(name) for name in names),
        f"{option}: no hashed certificate names (like 5ed36f99.0) in it: OpenSSL looks "
        f"certificates up by them; run 'openssl rehash {path}' (or c_rehash), or give a PEM "
        "bundle with --ca-certificate",
    )


def _check_header(name: str, value: str) -> None:
    """Request header fields are sent as given: a CR or LF in them would split the request."""
    _check(bool(_TOKEN.fullmatch(name)), f"header name {name[:40]!r} is not an HTTP token")
    _check(
        bool(_FIELD_VALUE.fullmatch(value)),
        f"header {name[:40]}: the value has control characters (CR, LF, NUL...) or characters"
        " outside Latin-1",
    )


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """How one URL is fetched: timeouts, limits, retries, politeness, address guard."""

    threads: int = 32
    #: ``--engine``: the fetch backend (``fetchpool.engine.backends``); "" picks ``processes``
    #: when ``fetch_processes`` > 1, else ``threads``, so every older command keeps its meaning.
    engine: str = ""
    #: Processes sharing the threads (each with its own GIL); 0: the engine's default
    #: (1 for ``threads``; 2, at most ``threads``, for ``processes``).
    fetch_processes: int = 0
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # idle time between two reads
    total_timeout: float = 300.0  # per attempt
    min_speed: int = 1024  # bytes/s averaged over min_speed_window; 0 disables
    min_speed_window: float = 30.0
    max_bytes: int = 100 * MiB
    max_header_bytes: int = 64 * 1024
    max_redirects: int = 10
    attempts: int = 3  # total tries per URL, including the first
    backoff_base: float = 0.5  # seconds; full jitter over base * 2**retry
    backoff_max: float = 30.0
    retry_after_max: float = 120.0
    per_host: int = 8  # concurrent connections per host
    rate_per_host: float | None = None  # requests per second per host
    user_agent: str = ""
    insecure: bool = False
    allow_private_networks: bool = False
    allow_cidrs: tuple[str, ...] = ()
    accept_encoding: str = "identity"
    headers: tuple[tuple[str, str], ...] = ()
    #: ``--accept``: media ranges (``image/*``, ``application/pdf``); a response whose
    #: Content-Type matches none fails ``unwanted_content_type``. Empty: everything.
    accept: tuple[str, ...] = ()
    #: Added to the User-Agent as img2dataset does (``fetchpool/V (compatible; TOKEN)``); an
    #: ``X-Robots-Tag`` scoped to it (``TOKEN: noai``) applies to this run.
    user_agent_token: str | None = None
    #: Responses carrying one of these opt-out directives are not saved (``opted_out``);
    #: a comma-separated string is accepted too, ``""`` honours none.
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DISALLOWED_HEADER_DIRECTIVES
    #: --proxy URL for http and https targets; "env": the environment's (fetchpool.proxies);
    #: None or "": no proxy (the default: proxies from the environment are off unless asked,
    #: RELIABILITY.md). The variables are captured when the config is built, so fetch
    #: processes and cluster parts use the same proxies as the run that built it.
    proxy: str | None = None
    proxy_environment: tuple[tuple[str, str], ...] | None = None
    #: A PEM bundle of CA certificates trusted in addition to the system store (wget's
    #: ``--ca-certificate``); ``SSL_CERT_FILE`` replaces the system store instead.
    ca_certificate: str | None = None
    #: An OpenSSL hashed folder of CA certificates trusted in addition (wget's
    #: ``--ca-directory``); it must exist wherever the fetches run.
    ca_directory: str | None = None
    #: (path, PEM text) of ``ca_certificate``, read when the config is built: the text
    #: travels with the config to fetch processes and cluster workers, which may not have
    #: the file. Set by the config itself.
    ca_pem: tuple[str, str] | None = field(default=None, repr=False)
    #: A digest of the downloaded bytes to keep beside ``fetched_sha256`` (always computed):
    #: ``md5`` or ``sha512`` fill the record's column of that name; ``sha256`` adds nothing.
    hash: HashName | None = None
    #: The input column holding each row's expected digest: a body whose digest differs
    #: fails ``hash_mismatch`` and is not saved.
    verify_hash_column: str | None = None
    #: The algorithm of that column; default: ``hash``, else sha256.
    verify_hash_type: HashName | None = None

    def __post_init__(self) -> None:
        _check(1 <= self.threads <= 4096, "--threads must be between 1 and 4096")
        self._resolve_engine()
        _check(
            1 <= self.fetch_processes <= min(64, self.threads),
            "--fetch-processes must be between 1 and 64, and at most --threads",
        )
        for name, option in (
            ("connect_timeout", "--connect-timeout"),
            ("read_timeout", "--read-timeout"),
            ("total_timeout", "--timeout"),
        ):
            _check(
                0 < getattr(self, name) <= MAX_TIMEOUT, f"{option} must be > 0 and at most a year"
            )
        _check(self.min_speed >= 0, "min_speed must be >= 0")
        _check(self.min_speed_window > 0, "min_speed_window must be > 0")
        _check(self.max_bytes > 0, "--max-bytes must be > 0")
        _check(0 <= self.max_redirects <= 100, "--max-redirects must be between 0 and 100")
        _check(1 <= self.attempts <= 100, "--attempts must be between 1 and 100")
        _check(self.backoff_base >= 0 and self.backoff_max >= 0, "backoff must be >= 0")
        _check(self.retry_after_max >= 0, "retry_after_max must be >= 0")
        _check(1 <= self.per_host <= 4096, "--per-host must be between 1 and 4096")
        _check(self.rate_per_host is None or self.rate_per_host > 0, "--rate-per-host must be > 0")
        for media_range in self.accept:
            _check(
                bool(_MEDIA_RANGE.fullmatch(media_range)),
                f"--accept {media_range[:40]!r} is not a media type or range like image/*",
            )
        for cidr in self.allow_cidrs:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ConfigError(f"--allow-cidr {cidr!r} is not a CIDR network") from exc
        if not self.user_agent:
            object.__setattr__(self, "user_agent", f"fetchpool/{__version__}")
        token = self.user_agent_token
        if token is not None:
            token = token.strip() or None
            _check(
                token is None or bool(_AGENT_TOKEN.fullmatch(token)),
                f"--user-agent-token {str(self.user_agent_token)[:40]!r}: one word of letters, "
                "digits, '.', '_' or '-' (at most 64), like img2dataset's user_agent_token",
            )
            object.__setattr__(self, "user_agent_token", token)
        object.__setattr__(
            self,
            "disallowed_header_directives",
            parse_directives(self.disallowed_header_directives),
        )
        self._check_trust()
        self._check_hashes()
        for name, value in (
            ("User-Agent", self.request_user_agent),
            ("Accept-Encoding", self.accept_encoding),
            *self.headers,
        ):
            _check_header(name, value)
        if self.proxy_environment is None:
            captured = environment_proxies(os.environ) if self.proxy else ()
            object.__setattr__(self, "proxy_environment", captured)
        ProxyPolicy.build(self.proxy, self.proxy_environment or ())  # raises for a bad URL

    def _resolve_engine(self) -> None:
        """Fill in ``engine`` and ``fetch_processes`` left to their defaults; refuse worker
        processes for the engine that runs in this process. (Whether the engine exists is the
        registry's to say: :func:`fetchpool.engine.backends.check_engine`.)"""
        engine = (self.engine or "").strip().lower()
        if not engine:
            engine = "processes" if self.fetch_processes > 1 else "threads"
        object.__setattr__(self, "engine", engine)
        if self.fetch_processes == 0:
            default = min(2, self.threads) if engine == "processes" else 1
            object.__setattr__(self, "fetch_processes", default)
        _check(
            engine != "threads" or self.fetch_processes == 1,
            f"--fetch-processes {self.fetch_processes} runs fetches in worker processes: it "
            "goes with --engine processes (or without --engine), not --engine threads",
        )
        _check(
            engine != "multiplexed" or self.fetch_processes == 1,
            f"--fetch-processes {self.fetch_processes} runs fetches in worker processes, "
            "each with fetch threads: --engine multiplexed runs one loop in this process "
            "and takes no --fetch-processes (yet)",
        )

    def _check_trust(self) -> None:
        """Read and check ``ca_certificate`` (kept in ``ca_pem``) and ``ca_directory``."""
        if self.ca_certificate is not None:
            path = os.fspath(self.ca_certificate)
            object.__setattr__(self, "ca_certificate", path)
            if self.ca_pem is None or self.ca_pem[0] != path:  # a copy keeps what was read
                object.__setattr__(self, "ca_pem", (path, load_ca_certificate(path)))
        else:
            object.__setattr__(self, "ca_pem", None)
        if self.ca_directory is not None:
            object.__setattr__(self, "ca_directory", os.fspath(self.ca_directory))
            check_ca_directory(self.ca_directory)

    def _check_hashes(self) -> None:
        """Check ``hash`` and the ``verify_hash_*`` pair; default the verify type."""
        for name in ("hash", "verify_hash_type"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = value.strip().lower()
                object.__setattr__(self, name, value)
            _check(
                value is None or value in HASHES,
                f"--{name.replace('_', '-')} {value!r}: choose md5, sha256 or sha512",
            )
        column = self.verify_hash_column
        if column is not None:
            _check(
                isinstance(column, str) and bool(column.strip()),
                "--verify-hash-column needs a column name",
            )
            if self.verify_hash_type is None:
                object.__setattr__(self, "verify_hash_type", self.hash or "sha256")
        else:
            _check(
                self.verify_hash_type is None,
                "--verify-hash-type goes with --verify-hash-column (the input column that "
                "holds the expected digests)",
            )

    @property
    def digests(self) -> tuple[HashName, ...]:
        """The digests computed while a body streams, besides sha256 (always computed)."""
        wanted = {self.hash, self.verify_hash_type}
        return tuple(name for name in HASHES if name in wanted and name != "sha256")

    def accepts(self, content_type: str | None) -> bool:
        """Whether ``--accept`` lets a response with this Content-Type through. A missing
        one counts as ``application/octet-stream`` (RFC 9110 8.3); parameters are ignored."""
        if not self.accept:
            return True
        kind = (content_type or "").split(";", 1)[0].strip().lower()
        kind = kind or "application/octet-stream"
        major = kind.partition("/")[0]
        for media_range in self.accept:
            wanted = media_range.lower()
            if wanted in ("*/*", kind) or wanted == f"{major}/*":
                return True
        return False

    @property
    def request_user_agent(self) -> str:
        """The User-Agent sent: ``user_agent``, then ``(compatible; TOKEN)`` when a
        ``user_agent_token`` is set (img2dataset appends ``(compatible; TOKEN; +URL)``)."""
        if not self.user_agent_token:
            return self.user_agent
        return f"{self.user_agent} (compatible; {self.user_agent_token})"


@dataclass(frozen=True, slots=True)
class ImageConfig:
    """The CPU stage: what to do with each fetched image. Inactive when nothing is asked.

    Each option takes effect on its own (see :attr:`active`), and once the stage is on, an
    image is ``ok`` only if it fully decoded.
    """

    # Not fields (no annotation): the defaults that ``active`` compares against.
    DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own MAX_IMAGE_PIXELS: the default and ceiling
    DEFAULT_MAX_FRAMES = 100

    resize: int | None = None
    resize_mode: ResizeMode = "keep-ratio-largest"
    resize_only_down: bool = False
    encode: Encode = "keep"
    quality: int = 90
    min_size: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS  # lower it, never raise it
    max_frames: int = DEFAULT_MAX_FRAMES
    verify: bool = False
    downsample_filter: ResampleFilter = "auto"
    upsample_filter: ResampleFilter = "auto"
    max_aspect_ratio: float | None = None  # max(w, h) / min(w, h) above it fails
    min_area: int | None = None  # pixels (w * h)
    max_area: int | None = None
    save_exif: bool = False  # the original's EXIF as JSON in the record
    processes: int | None = None  # None: os.cpu_count()
    item_timeout: float = 60.0
    memory_limit: int | None = 2048 * MiB  # per worker address space; None disables
    #: Check that every body is an image, from its header only (Pillow identifies it, its
    #: size and frames are within bounds), without decoding pixels; the other options decode
    #: in full. On for WebDataset and Parquet output (:class:`Options`).
    identify: bool = False

    def __post_init__(self) -> None:
        _check(
            self.resize is None or 1 <= self.resize <= 65535, "--resize must be between 1 and 65535"
        )
        _check(
            self.resize_mode in RESIZE_MODES,
            f"--resize-mode must be one of {'|'.join(RESIZE_MODES)}",
        )
        for name in ("downsample_filter", "upsample_filter"):
            _check(
                getattr(self, name) in RESAMPLE_FILTERS,
                f"--{name.replace('_', '-')} must be one of {'|'.join(RESAMPLE_FILTERS)}",
            )
        _check(
            self.encode in ("keep", "jpeg", "webp", "png"),
            "--encode must be one of keep|jpeg|webp|png",
        )
        _check(1 <= self.quality <= 100, "--quality must be between 1 and 100")
        _check(self.min_size is None or self.min_size >= 1, "--min-size must be >= 1")
        _check(self.max_pixels >= 1, "--max-pixels must be >= 1")
        _check(self.max_frames >= 1, "max_frames must be >= 1")
        _check(
            self.max_aspect_ratio is None or self.max_aspect_ratio >= 1,
            "--max-aspect-ratio must be >= 1 (the longer side over the shorter)",
        )
        _check(self.min_area is None or self.min_area >= 1, "--min-area must be >= 1")
        _check(self.max_area is None or self.max_area >= 1, "--max-area must be >= 1")
        _check(
            self.min_area is None or self.max_area is None or self.min_area <= self.max_area,
            "--min-area must not be above --max-area",
        )
        _check(self.processes is None or self.processes >= 1, "--processes must be >= 1")
        _check(self.item_timeout > 0, "item_timeout must be > 0")

    @property
    def active(self) -> bool:
        """True when any image work was asked for (otherwise bytes pass through untouched).

        A lowered ``max_pixels`` or ``max_frames`` is asked-for work too: limits that only
        applied when some other option was given would let every image through unmeasured.
        (Modifiers of other options, ``resize_only_down``, ``quality``, ``resize_mode``,
        ``downsample_filter``, ``upsample_filter``, do nothing on their own: there is nothing
        to resize or re-encode.)
        """
        return (
            (self.resize is not None and self.resize_mode != "no")
            or self.encode != "keep"
            or self.min_size is not None
            or self.verify
            or self.max_pixels < self.DEFAULT_MAX_PIXELS
            or self.max_frames < self.DEFAULT_MAX_FRAMES
            or self.identify
            or self.max_aspect_ratio is not None
            or self.min_area is not None
            or self.max_area is not None
            or self.save_exif
        )

    @property
    def header_only(self) -> bool:
        """The stage is on only to identify images (``identify``): headers, no decoding."""
        return self.identify and not replace(self, identify=False).active

    @property
    def worker_count(self) -> int:
        return self.processes or os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class OutputConfig:
    """Where and how results are written."""

    format: OutputFormat = "files"
    #: Samples per shard (default 1000); with ``files``, items per numbered subfolder
    #: (``OUT/00000/``...; default None: one flat folder).
    shard_size: int | None = None
    sidecar: bool = False
    #: Input column written as the sample's caption: ``KEY.txt`` in a shard, ``NAME.txt``
    #: beside a file, the ``caption`` column in Parquet (img2dataset's ``caption_col``).
    caption_column: str | None = None

    def __post_init__(self) -> None:
        _check(
            self.format in ("files", "webdataset", "parquet"),
            "--format must be one of files|webdataset|parquet",
        )
        _check(self.shard_size is None or self.shard_size >= 1, "--shard-size must be >= 1")
        _check(
            self.caption_column is None or bool(self.caption_column.strip()),
            "--caption-column must name a column",
        )

    @property
    def samples_per_shard(self) -> int:
        """``shard_size`` for the sharded formats: 1000 unless given."""
        return self.shard_size or 1000

    @property
    def folder_size(self) -> int | None:
        """Items per numbered subfolder of the files output; None: flat."""
        return self.shard_size if self.format == "files" else None


@dataclass(frozen=True, slots=True)
class Options:
    """Everything one run needs, validated."""

    fetch: FetchConfig = field(default_factory=FetchConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    input_format: str | None = None  # None: from the file name
    url_column: str = "url"
    retry_failed: bool = False
    shard: tuple[int, int] | None = None  # (k, n): only input positions with position % n == k
    window: int | None = None  # items open at once; None: 4 * threads + 64
    #: fsspec options for a destination or input given as a URL (``s3://…``):
    #: ``--storage-option KEY=VALUE``, e.g. ``endpoint_url``, ``key``, ``anon``.
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.output.format != "files" and not self.image.identify:
            # A dataset sample must be an image: a body Pillow cannot identify (an HTML error
            # page served with 200) fails not_an_image, as with img2dataset.
            object.__setattr__(self, "image", replace(self.image, identify=True))
        _check(self.window is None or self.window >= 1, "window must be >= 1")
        _check(
            self.fetch.verify_hash_column != self.url_column,
            f"--verify-hash-column {self.url_column!r} is the URL column (--url-column)",
        )
        if self.shard is not None:
            k, n = self.shard
            _check(n >= 1 and 0 <= k < n, "--shard must be K/N with 0 <= K < N")

    @property
    def required_columns(self) -> dict[str, str]:
        """Input columns that options name besides the URL's and caption's, by role
        (``verify-hash`` for ``--verify-hash-column``): the input is refused before any
        download without them."""
        column = self.fetch.verify_hash_column
        if column is None:
            return {}
        return {"verify-hash": column}

    def recorded(self) -> dict[str, Any]:
        """The run's settings as the journal keeps them (``runs.settings``, JSON): every stage
        option, the User-Agent as sent, request header names without their values and no
        storage options (either may hold credentials). For library runs, whose ``argv`` is
        the host program's, this is what says which options were in force."""
        stages: dict[str, Any] = {}
        for name, config in (("fetch", self.fetch), ("image", self.image), ("output", self.output)):
            stages[name] = {f.name: getattr(config, f.name) for f in fields(config)}
        stages["fetch"]["user_agent"] = self.fetch.request_user_agent
        stages["fetch"]["headers"] = [name for name, _ in self.fetch.headers]
        # Proxies may carry credentials (http://user:password@host): masked, and only the
        # names of the environment's proxy variables.
        stages["fetch"]["proxy"] = redact_text(self.fetch.proxy) if self.fetch.proxy else None
        stages["fetch"]["proxy_environment"] = [
            name for name, _ in self.fetch.proxy_environment or ()
        ]
        del stages["fetch"]["ca_pem"]  # the bundle's text: its path is there
        for name in ("input_format", "url_column", "retry_failed", "shard", "window"):
            stages[name] = getattr(self, name)
        return stages

    @property
    def in_flight(self) -> int:
        # Four times the threads keeps every thread busy while finished items wait to be
        # journaled and lets admission work in batches; the +64 absorbs bursts of instant
        # failures (bad lines, duplicates) without stalling the reader. An open item costs
        # well under a kilobyte, so this stays small beside the threads' own buffers.
        return self.window or 4 * self.fetch.threads + 64

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> Options:
        """Build from flat keyword options (``threads=64, resize=256, format="webdataset"``)."""
        groups: dict[type[Any], dict[str, Any]] = {
            FetchConfig: {},
            ImageConfig: {},
            OutputConfig: {},
            cls: {},
        }
        names = {c: {f.name for f in fields(c)} for c in groups}
        for key, given in kwargs.items():
            value = (given,) if key == "allow_cidrs" and isinstance(given, str) else given
            if key in ("allow_cidrs", "headers", "accept", "disallowed_header_directives") and (
                isinstance(value, list)
            ):
                value = tuple(value)
            if key == "accept" and isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            if key == "encode" and value is None:
                continue  # the default: see _default_encode
            if key == "proxy_environment" and isinstance(value, Mapping):
                value = environment_proxies(value)
            owner = next((c for c in groups if key in names[c] and c is not cls), None)
            if owner is None and key in names[cls] and key not in ("fetch", "image", "output"):
                owner = cls
            if owner is None:
                raise ConfigError(f"unknown option {key!r}")
            groups[owner][key] = value
        _default_encode(groups[ImageConfig])
        try:
            return cls(
                fetch=FetchConfig(**groups[FetchConfig]),
                image=ImageConfig(**groups[ImageConfig]),
                output=OutputConfig(**groups[OutputConfig]),
                **groups[cls],
            )
        except TypeError as exc:
            raise ConfigError(str(exc)) from exc


def _default_encode(image: dict[str, Any]) -> None:
    """``--encode`` unless given: ``jpeg`` when images are resized, so every sample of a run
    has one extension (``datasets`` refuses WebDataset shards that mix ``.jpg`` and ``.png``);
    ``keep`` otherwise. An explicit ``keep`` still keeps each image's format."""
    if "encode" not in image:
        resized = image.get("resize") is not None and image.get("resize_mode") != "no"
        image["encode"] = "jpeg" if resized else "keep"
