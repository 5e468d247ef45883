"""Where data and checkpoints live: a local folder or an object-store URI, as a pyarrow file
system and a path in it (the file systems Ray Train itself uses). The one place that turns a
config's ``data.dir`` or ``launch.storage_path`` into something to read and write.

    /data/tokens, tokens, file:///data/tokens   the local file system
    s3://bucket/prefix                          S3, or any S3-compatible server (SeaweedFS, MinIO)
    s3://bucket/prefix?endpoint_override=http://127.0.0.1:8333
                                                the same, at that endpoint (``scheme`` and
                                                ``region`` may follow, as in pyarrow's URIs)
    gs://bucket/prefix                          Google Cloud Storage (Google's default credentials)
    gs://bucket/prefix?anonymous=true           a public bucket, read without credentials
    gs://bucket/prefix?endpoint_override=127.0.0.1:9023&scheme=http
                                                the same API at that endpoint (an emulator)

A URI may carry a query, so paths are added with ``join`` (before the query), never by
appending to the string. The S3 endpoint of a URI without one in its query is, in this order,
the config's ``storage.endpoint`` (``configure``), ``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, else AWS itself. Credentials are never part of a config or a URI: the AWS
SDK finds them as it always does (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, the credentials file, an instance role), and no message
written here ever holds a secret.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote, urlsplit

from mot_core.errors import MotError

if TYPE_CHECKING:  # pyarrow is imported when a file system is made, not with the config
    import pyarrow.fs as pafs

QUERY_KEYS = ("endpoint_override", "scheme", "region")
ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_SECRET_QUERY_KEYS = {"access_key", "secret_key", "session_token"}  # pyarrow's URIs accept them; we do not
_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                         "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_REGION", "AWS_DEFAULT_REGION")
# the reachability probe: a refused connection or an unknown host is told in about a second
PROBE_CONNECT_TIMEOUT_S = 2.0
PROBE_REQUEST_TIMEOUT_S = 5.0
PROBE_ATTEMPTS = 2

_settings: dict[str, str | None] = {"endpoint": None, "region": None}
_cache: dict[tuple, pafs.S3FileSystem] = {}
_regions: dict[str, str | None] = {}
_lock = threading.Lock()


def configure(endpoint: str | None, region: str | None) -> None:
    """The process-wide storage settings: the config's ``storage.endpoint`` and
    ``storage.region`` (set by ``mot_core.experiment.resolve.resolve_config`` for every command,
    every launch worker, sweep trial and Ray Data tokenize task)."""
    if endpoint is not None:
        problem = endpoint_problem(endpoint)
        if problem:
            raise MotError(f"storage.endpoint {problem}")
    _settings["endpoint"] = endpoint.rstrip("/") if endpoint else None
    _settings["region"] = region or None


def endpoint_problem(endpoint: str) -> str | None:
    """What is wrong with an S3 endpoint URL (``http://127.0.0.1:8333``), or None."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "is not an http:// or https:// URL with a host (e.g. http://127.0.0.1:8333)"
    if parts.username is not None or parts.password is not None:
        return ("holds credentials; give them through AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or the AWS "
                "credentials file, never in the config")
    if parts.query or parts.fragment:
        return "has a query or fragment; give the scheme, host and port alone"
    return None


def uri_problem(uri: str) -> str | None:
    """What the config may not hold in a storage URI (credentials), or None; the URI itself is
    not repeated (it may hold a secret)."""
    if "://" not in uri:
        return None
    parts = urlsplit(uri)
    keys = {name.lower() for name, _ in parse_qsl(parts.query, keep_blank_values=True)}
    if parts.username is not None or keys & _SECRET_QUERY_KEYS:
        return ("holds credentials (user:secret@ or a key in its query); give them through AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY or the AWS credentials file: a config, and so every run's saved config.yaml, "
                "holds no secret")
    return None


def is_uri(path: str) -> bool:
    return "://" in path


RUN_CACHE_VARIABLE = "MOT_RUN_CACHE"


def local_folder(path: str) -> Path:
    """Where this process keeps the files of the folder ``path`` names: the folder itself, or
    for an object-store URI its working copy, ``$MOT_RUN_CACHE/<scheme>/<bucket>/<prefix>``
    (default ``~/.cache/mot/runs``; see ``mot_core.training.run_mirror``)."""
    if not is_uri(path):
        return Path(path)
    parts = urlsplit(path)
    if parts.scheme.lower() == "file":
        return Path(unquote(parts.path))
    base = Path(os.environ.get(RUN_CACHE_VARIABLE) or Path.home() / ".cache" / "mot" / "runs")
    return base / parts.scheme.lower() / parts.netloc / unquote(parts.path).strip("/")


def join(uri: str, *parts: str) -> str:
    """``uri`` with ``parts`` added to its path, before its query if it has one:
    ``join("s3://b/p?endpoint_override=...", "wiki", "train")`` is
    ``s3://b/p/wiki/train?endpoint_override=...``."""
    base, query = uri, ""
    if is_uri(uri) and "?" in uri:
        base, _, query = uri.partition("?")
    joined = "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return f"{joined}?{query}" if query else joined


@dataclass(frozen=True)
class _S3Target:
    bucket: str
    key: str
    endpoint: str | None  # a URL with its scheme; None: AWS
    endpoint_from: str  # where the endpoint came from, for messages
    region: str | None

    @property
    def path(self) -> str:
        return f"{self.bucket}/{self.key}".rstrip("/")

    @property
    def server(self) -> str:
        return self.endpoint or "AWS S3"


def resolve(uri: str, what: str) -> tuple[pafs.FileSystem, str]:
    """``uri`` (a local path, ``file://``, ``s3://``, ``gs://`` URI) -> (pyarrow file system,
    path in it). ``what`` names the config key in errors (``data.dir``, ``launch.storage_path``).
    S3 file systems are made once per endpoint, region and credentials, and shared."""
    import pyarrow.fs as pafs

    if not is_uri(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    problem = uri_problem(uri)
    if problem:
        raise MotError(f"{what} {problem}")
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "file":
        parts = urlsplit(uri)
        if parts.query:
            raise MotError(f"{what} {uri}: a file:// URI takes no query")
        return pafs.LocalFileSystem(), os.path.abspath(unquote(parts.path))
    if scheme == "s3":
        target = _s3_target(uri, what)
        return _s3_filesystem(target), target.path
    if scheme in ("gs", "gcs"):
        return _gcs_filesystem(uri, what)
    return _other_filesystem(uri, what)


def _s3_target(uri: str, what: str) -> _S3Target:
    problem = uri_problem(uri)
    if problem:
        raise MotError(f"{what} {problem}")
    parts = urlsplit(uri)
    bucket, key = parts.netloc, unquote(parts.path).strip("/")
    if not bucket:
        raise MotError(f"{what} {uri}: no bucket; give s3://BUCKET/PREFIX")
    options = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in QUERY_KEYS:
            raise MotError(f"{what} {uri}: unknown option '{name}' in the URI's query (known: {', '.join(QUERY_KEYS)})")
        options[name] = value
    endpoint, endpoint_from = None, ""
    if options.get("endpoint_override"):
        endpoint = options["endpoint_override"]
        if "://" not in endpoint:
            endpoint = f"{options.get('scheme') or 'https'}://{endpoint}"
        endpoint_from = "the URI"
        problem = endpoint_problem(endpoint)
        if problem:
            raise MotError(f"{what} {uri}: endpoint_override {problem}")
    elif _settings["endpoint"]:
        endpoint, endpoint_from = _settings["endpoint"], "storage.endpoint"
    else:
        for variable in ENDPOINT_VARIABLES:
            if os.environ.get(variable):
                endpoint, endpoint_from = os.environ[variable].rstrip("/"), variable
                problem = endpoint_problem(endpoint)
                if problem:
                    raise MotError(f"{what} {uri}: {variable} {problem}")
                break
    region = options.get("region") or _settings["region"]
    if region is None and endpoint is None and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
        region = _bucket_region(bucket)  # AWS itself: the bucket's own region, as pyarrow's from_uri finds it
    return _S3Target(bucket, key, endpoint.rstrip("/") if endpoint else None, endpoint_from, region)


def _bucket_region(bucket: str) -> str | None:
    import pyarrow.fs as pafs

    with _lock:
        if bucket not in _regions:
            try:
                _regions[bucket] = pafs.resolve_s3_region(bucket)
            except (OSError, ValueError):
                _regions[bucket] = None  # the probe or the first request says why
        return _regions[bucket]


def _credentials_fingerprint() -> str:
    """Which credentials the AWS SDK would pick up now (a hash, held in memory only): a file
    system is not reused after they change."""
    text = "\0".join(os.environ.get(v, "") for v in _CREDENTIAL_VARIABLES)
    return hashlib.sha256(text.encode()).hexdigest()


def _s3_filesystem(target: _S3Target, probe: bool = False) -> pafs.S3FileSystem:
    import pyarrow.fs as pafs

    key = (target.endpoint, target.region, probe, _credentials_fingerprint())
    with _lock:
        found = _cache.get(key)
        if found is None:
            options: dict = {}
            if target.endpoint:
                parts = urlsplit(target.endpoint)
                options.update(endpoint_override=f"{parts.netloc}{parts.path}".rstrip("/"), scheme=parts.scheme)
            if target.region:
                options["region"] = target.region
            if probe:
                options.update(connect_timeout=PROBE_CONNECT_TIMEOUT_S, request_timeout=PROBE_REQUEST_TIMEOUT_S,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=PROBE_ATTEMPTS))
            found = _cache[key] = pafs.S3FileSystem(**options)
        return found


GCS_QUERY_KEYS = ("endpoint_override", "scheme", "anonymous")


def _gcs_filesystem(uri: str, what: str) -> tuple[pafs.FileSystem, str]:
    """A ``gs://`` URI: Google's default credentials, or none with ``anonymous=true`` (a public
    bucket), at ``endpoint_override`` with ``scheme`` where given (pyarrow's own GCS URIs take
    no ``anonymous``)."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    bucket, key = parts.netloc, unquote(parts.path).strip("/")
    if not bucket:
        raise MotError(f"{what} {uri}: no bucket; give gs://BUCKET/PREFIX")
    options: dict = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in GCS_QUERY_KEYS:
            raise MotError(f"{what} {uri}: unknown option '{name}' in the URI's query (known: {', '.join(GCS_QUERY_KEYS)})")
        if name == "anonymous":
            if value.lower() not in ("true", "false", "1", "0"):
                raise MotError(f"{what} {uri}: anonymous takes true or false, not '{value}'")
            options["anonymous"] = value.lower() in ("true", "1")
        else:
            options[name] = value
    try:
        return pafs.GcsFileSystem(**options), f"{bucket}/{key}".rstrip("/")
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise MotError(f"{what} {uri}: {_first_line(exc)}") from None


def _other_filesystem(uri: str, what: str) -> tuple[pafs.FileSystem, str]:
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, ValueError) as exc:
        raise MotError(f"{what} {uri}: {_first_line(exc)}") from None


def check_local_folder(path: str, what: str) -> None:
    """A local folder the config names (``data.dir``): not a file, nor under one."""
    here = Path(path)
    for folder in (here, *here.parents):
        if folder.exists():
            if not folder.is_dir():
                raise MotError(f"{what} {path}: {folder} is a file; give a folder (it is created if missing)")
            return


def write_failure(exc: OSError, root: str, what: str, doing: str) -> MotError:
    """One line for a failed write into the folder of ``what`` (``data.dir``), naming that key,
    not the run folder: no permission, a read-only file system, no space, or the cause."""
    import errno as codes

    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in (codes.EACCES, codes.EPERM) or "ermission denied" in text:
        cause = "no permission to write there"
    elif code == codes.EROFS or "ead-only file system" in text:
        cause = "its file system is read-only"
    elif code == codes.ENOSPC or "o space left" in text:
        cause = "no space left on its device"
    else:
        cause = (getattr(exc, "strerror", None) or text.splitlines()[0] if text else type(exc).__name__)
    return MotError(f"{doing} into {what} {root} failed: {cause}; {what} must be a writable folder (or name one "
                    "that already holds these shards)")


def check_reachable(uri: str, what: str) -> None:
    """A quick probe of an object-store URI (nothing for a local path): its server answers,
    accepts the credentials and holds the bucket. Each failure is one line naming the URI, the
    config key, the cause and the fix; a refused connection or unknown host is told in about a
    second."""
    import pyarrow.fs as pafs

    if not is_uri(uri) or urlsplit(uri).scheme.lower() == "file":
        _, path = resolve(uri, what)
        check_local_folder(path, what)
        return
    scheme = urlsplit(uri).scheme.lower()
    if scheme != "s3":
        fs, path = resolve(uri, what)
        if scheme in ("gs", "gcs") and not urlsplit(uri).query:  # the bucket, with a bounded retry (GCS's is 15 min)
            from datetime import timedelta

            try:
                pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=PROBE_REQUEST_TIMEOUT_S)).get_file_info(
                    path.split("/", 1)[0])
            except OSError as exc:
                raise describe_error(exc, uri, what) from None
        return
    target = _s3_target(uri, what)
    fs = _s3_filesystem(target, probe=True)
    try:
        info = fs.get_file_info(target.bucket)  # HeadBucket
    except OSError as exc:
        if _kind(str(exc)) != "denied":
            raise describe_error(exc, uri, what) from None
        # a HEAD's answer has no body: AccessDenied stands for any refusal; a listing says which
        try:
            fs.get_file_info(pafs.FileSelector(f"{target.bucket}/.mot-probe-{os.getpid()}", allow_not_found=True))
        except OSError as listed:
            raise describe_error(listed, uri, what) from None
        return
    if info.type == pafs.FileType.NotFound:
        raise _error("no_bucket", uri, what, target)


def describe_error(exc: BaseException, uri: str, what: str, missing_hint: str | None = None) -> MotError:
    """An error of a storage request (a pyarrow ``OSError`` from S3, or any other) as one
    line: the URI, the config key, the cause and the fix. ``missing_hint`` replaces the advice
    for an object that is not found (e.g. "run `mot data tokenize CONFIG` again")."""
    message = _first_line(exc)
    kind = failure_kind(exc)
    target = None
    if is_uri(uri) and urlsplit(uri).scheme.lower() == "s3":
        try:
            target = _s3_target(uri, what)
        except MotError:
            target = None
    if kind is None:
        return MotError(f"{what} {uri}: {message}")
    return _error(kind, uri, what, target, missing_hint, message)


def failure_kind(exc: BaseException) -> str | None:
    """Which storage failure ``exc`` is (``unreachable``, ``no_host``, ``bad_key``,
    ``bad_secret``, ``denied``, ``no_bucket``, ``missing``, ``gcs_credentials``), or None for
    any other."""
    return "missing" if isinstance(exc, FileNotFoundError) else _kind(str(exc))


def _kind(message: str) -> str | None:
    text = message.lower()
    if "oauth2 access token" in text:
        return "gcs_credentials"
    if "network_connection" in text or "curlcode" in text or "could not connect" in text:
        return "no_host" if ("could not resolve" in text or "curlcode: 6," in text) else "unreachable"
    if "invalid_access_key_id" in text or "invalidaccesskeyid" in text:
        return "bad_key"
    if "signature_does_not_match" in text or "signaturedoesnotmatch" in text:
        return "bad_secret"
    if "no_such_bucket" in text or "nosuchbucket" in text or re.search(r"bucket '[^']*' not found", text):
        return "no_bucket"
    if "access_denied" in text or "accessdenied" in text or "http status 403" in text:
        return "denied"
    if "unable to locate credentials" in text or "no credentials" in text:
        return "denied"
    if any(sign in text for sign in ("no_such_key", "nosuchkey", "path does not exist", "no such file", "not found")):
        return "missing"
    return None


def _error(kind: str, uri: str, what: str, target: _S3Target | None, missing_hint: str | None = None,
           detail: str = "") -> MotError:
    server = target.server if target else "the object store"
    source = target.endpoint_from if target else ""
    endpoint_fix = {"the URI": "fix endpoint_override in the URI", "storage.endpoint": "fix storage.endpoint",
                    "": "set AWS_ENDPOINT_URL or storage.endpoint to the address of a server other than AWS "
                        "(e.g. http://127.0.0.1:8333)"}.get(source, f"fix {source} (or set storage.endpoint)")
    credentials = ("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE and the AWS credentials file); "
                   "credentials are never read from the config")
    bucket = target.bucket if target else urlsplit(uri).netloc
    if kind == "unreachable":
        text = (f"{what} {uri}: cannot reach the S3 endpoint {server} (connection refused or timed out); "
                f"start the server, or {endpoint_fix}")
    elif kind == "no_host":
        text = (f"{what} {uri}: the host of the S3 endpoint {server} cannot be resolved (unknown host, or no "
                f"network); {endpoint_fix}")
    elif kind == "bad_key":
        text = f"{what} {uri}: {server} does not know the access key (InvalidAccessKeyId); {credentials}"
    elif kind == "bad_secret":
        text = (f"{what} {uri}: {server} rejected the request signature (SignatureDoesNotMatch): the secret key does "
                f"not belong to the access key; {credentials}")
    elif kind == "denied":
        text = (f"{what} {uri}: {server} refused access to bucket '{bucket}' (AccessDenied): the credentials are "
                f"missing, wrong or not allowed to use it; {credentials}")
    elif kind == "gcs_credentials":
        text = (f"{what} {uri}: no Google Cloud credentials could be found or used; set "
                "GOOGLE_APPLICATION_CREDENTIALS or run `gcloud auth application-default login`")
    elif kind == "no_bucket":
        text = (f"{what} {uri}: bucket '{bucket}' does not exist at {server} (NoSuchBucket); create it, or fix the "
                f"bucket name in {what}")
    else:  # missing
        where = f" ({detail})" if detail else ""
        text = (f"{what} {uri}: not found{where}; "
                + (missing_hint or "it was deleted or moved; restore it, or write it again"))
    return MotError(_scrub(text))


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return _scrub(lines[0].strip()) if lines else type(exc).__name__


def _scrub(text: str) -> str:
    """``text`` without the value of any secret the AWS SDK may have read from the environment."""
    for variable in _SECRET_VARIABLES:
        secret = os.environ.get(variable)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
