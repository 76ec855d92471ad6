"""Redaction of secrets in URLs before they reach a log line, a JSON report or a metric.

A scrape target may carry credentials (`http://user:pass@host/metrics?token=…`), and a pod's
annotations are written by whoever may create pods: the agent must never repeat them. A URL is
shown as `scheme://user:***@host:port/path`: the user stays (it helps find the target), the
password is masked, the query string and fragment are dropped (tokens live there). Anything that
does not parse as a URL is masked whole rather than shown.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# A URL with userinfo or a query anywhere in free text (an exception message, a library's error).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """`http://u:p@h:8000/m?token=x#f` → `http://u:***@h:8000/m`; never raises."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return MASK
    if not parts.scheme or not parts.netloc:
        # not an absolute URL: keep the path only if nothing looks like a secret
        return url.split("?", 1)[0].split("#", 1)[0] if "@" not in url else MASK
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    userinfo = ""
    if parts.username is not None or parts.password is not None:
        userinfo = f"{parts.username or ''}:{MASK}@" if parts.password is not None else f"{parts.username}@"
    netloc = f"{userinfo}{host}{f':{port}' if port is not None else ''}"
    path = parts.path if "@" not in parts.path else "/" + MASK  # `host/a:b@c`: a mistyped credential
    return urlunsplit((parts.scheme, netloc, path, "", ""))


def redact_text(text: str, urls: Iterable[str] = ()) -> str:
    """Free text with every known URL (and anything URL-shaped) redacted: an error message
    from a library may quote the URL it was given, credentials and all."""
    if not text:
        return text
    for url in sorted({u for u in urls if u}, key=len, reverse=True):
        text = text.replace(url, redact_url(url))
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
