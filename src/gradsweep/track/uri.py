"""Tracking URI checks and masking (no MLflow import: cheap to use in config validation)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from gradsweep.errors import ConfigError

SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "databricks")


#: where each kind of store takes its credentials from instead of the URI
CREDENTIALS_FROM = ("MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD for a tracking server, "
                    "PGPASSWORD or ~/.pgpass for PostgreSQL, in the environment or .env")


#: query-string keys that carry a credential (``?access_token=...``, ``?sig=...``): a secret like a password
SECRET_QUERY_KEYS = frozenset({"token", "access_token", "auth_token", "id_token", "refresh_token", "key", "api_key",
                               "apikey", "secret", "client_secret", "password", "passwd", "pwd", "auth", "sig",
                               "signature", "credential", "credentials", "x-amz-signature", "x-amz-credential",
                               "x-amz-security-token"})


def _secret_query_keys(query: str) -> list[str]:
    return [k for k, _ in parse_qsl(query, keep_blank_values=True) if k.lower() in SECRET_QUERY_KEYS]


def refuse_password(key: str, value: object) -> None:
    """A URI that carries a password would be written to the run's files (Hydra's .hydra/*.yaml and
    multirun.yaml, the run journal's header) and shown in process lists: refused, with where the
    credentials belong instead."""
    if not isinstance(value, str) or "://" not in value:
        return
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return
    secrets = _secret_query_keys(parts.query)
    if password or secrets:
        what = "a password" if password else f"a credential in its query string ({', '.join(secrets)})"
        raise ConfigError(f"{key}={mask(value)!r} holds {what}, which would be written to the run's files; "
                          f"allowed: the URI without it, with the credentials in {CREDENTIALS_FROM}")


def check_tracking_uri(uri: str) -> None:
    refuse_password("tracking.uri", uri)
    parts = urlsplit(uri or "")
    scheme = parts.scheme.split("+")[0]
    if scheme == "file":
        raise ConfigError(f"tracking.uri={mask(uri)!r}: MLflow's file store is retired (maintenance mode, refused "
                          "by default); allowed: sqlite:///path.db (the embedded default) | http(s)://host:port")
    if scheme not in SCHEMES or (scheme in ("http", "https") and not parts.hostname):
        raise ConfigError(f"tracking.uri={mask(uri)!r} is not a tracking URI; allowed: "
                          "sqlite:///path.db | http(s)://host:port | postgresql://...")
    if scheme in ("http", "https"):
        try:
            _ = parts.port  # urllib parses the port lazily: reading it raises on "host:99999"
        except ValueError:
            raise ConfigError(f"tracking.uri={mask(uri)!r} has an invalid port; allowed: 1-65535") from None


def mask(uri: str) -> str:
    """Replace the password of a URI, and any credential in its query string, with ***."""
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return uri
    if _secret_query_keys(parts.query):  # by string: urlunsplit would drop the empty netloc of sqlite:///path
        head, _, tail = uri.partition("?")
        query, hash_, fragment = tail.partition("#")
        masked = urlencode([(k, "***" if k.lower() in SECRET_QUERY_KEYS else v)
                            for k, v in parse_qsl(query, keep_blank_values=True)], safe="*")
        uri = f"{head}?{masked}{hash_}{fragment}"
    if password is not None:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        uri = urlunsplit(urlsplit(uri)._replace(netloc=netloc))
    return uri


def mask_overrides(overrides: list[str]) -> list[str]:
    """Command-line overrides with the password of any URI value masked (for tags and run names)."""
    out = []
    for ov in overrides:
        key, sep, value = ov.partition("=")
        out.append(f"{key}{sep}{mask(value.replace(chr(92), ''))}" if sep and "://" in value else ov)
    return out


def store_kind(uri: str) -> Optional[str]:
    """Which MLflow store module serves ``uri``: ``sql`` (SQLAlchemy: sqlite, postgresql, mysql),
    ``rest`` (a tracking server), or None."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0]
    return "sql" if scheme in ("sqlite", "postgresql", "mysql", "mssql") else \
        "rest" if scheme in ("http", "https") else None


def is_local_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def sqlite_path(uri: str) -> Path:
    return Path(uri[len("sqlite:///"):])


def absolute_sqlite(uri: str, create: bool = False) -> str:
    """A ``sqlite:///`` URI with a relative path made absolute against the working directory (its
    folder created when ``create``); any other URI unchanged. One rule for MLflow and Optuna stores."""
    if not is_local_sqlite(uri):
        return uri
    path = sqlite_path(uri)
    path = path if path.is_absolute() else Path.cwd() / path
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def check_writable(key: str, value: str, folder: Path, file: Optional[Path] = None,
                   allowed: str = "a writable path (or tracking=server)") -> None:
    """``folder`` (or the nearest part of it that exists) takes new files, and ``file``, if it
    exists, can be written: else one line naming the key (a read-only store otherwise failed in a
    240-line traceback from inside MLflow)."""
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        tempfile.TemporaryFile(dir=probe).close()
        if file is not None and file.exists():
            open(file, "r+b").close()
    except OSError as e:
        what = file if file is not None and file.exists() and probe == folder else probe
        raise ConfigError(f"{key}={mask(value)!r}: {what} is not writable ({e.strerror or e}); "
                          f"allowed: {allowed}") from None


def check_local_store(uri: str, spool_dir: Optional[str]) -> None:
    """The embedded store's folder and database, and the spool, can be written."""
    if is_local_sqlite(uri):
        db = sqlite_path(absolute_sqlite(uri))
        check_writable("tracking.uri", uri, db.parent, db)
    if spool_dir:
        check_writable("tracking.spool_dir", spool_dir, Path(spool_dir).absolute())
