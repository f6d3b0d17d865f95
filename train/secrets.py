"""Credentials never leave the process: one allow-list of public storage options, one list of
secret environment variables, and the three ways they are applied (a saved config redacted, an
error message scrubbed, a URL shown without its user or signature). A leaf module."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

PUBLIC_OPTIONS = frozenset(
    {"endpoint_url", "region_name", "anon", "use_ssl", "client_kwargs", "project"}
)
"""Storage options that are plainly public settings; every other value under a
`storage_options` key is treated as a credential."""
SECRET_KEY = re.compile(r"secret|password|passwd|token|credential", re.IGNORECASE)
"""Config keys whose values are credentials wherever they appear."""
SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
)
REDACTED = "***"


def redact(value: Any, storage_options: bool = False) -> Any:
    """Replace credentials before anything is saved: every value under a `storage_options` key
    except the public settings, and any secret-looking key elsewhere."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            name = str(key)
            hidden = SECRET_KEY.search(name) or (storage_options and name not in PUBLIC_OPTIONS)
            if hidden and item not in (None, "", {}):
                out[key] = REDACTED
            else:
                out[key] = redact(item, storage_options or name == "storage_options")
        return out
    if isinstance(value, list | tuple):
        return [redact(v, storage_options) for v in value]
    return value


def _secrets(storage_options: Mapping[str, Any] | None) -> list[str]:
    found = [os.environ[k] for k in SECRET_ENV if os.environ.get(k)]

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v, key)
        elif isinstance(value, str) and key not in PUBLIC_OPTIONS and len(value) >= 4:
            found.append(value)

    walk(storage_options or {})
    return sorted(set(found), key=len, reverse=True)


def scrub(message: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Remove credential values (from the options or the environment) from an error message."""
    for secret in _secrets(storage_options):
        message = message.replace(secret, REDACTED)
    return message


def safe_url(url: str) -> str:
    """`url` without credentials: user:password@ and query strings (presigned signatures)."""
    url = re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]*@", r"\1", str(url))
    return strip_query(url) + ("?…" if "?" in url and "://" in url else "")


def strip_query(url: str) -> str:
    return url.split("?", 1)[0] if "://" in url else url
