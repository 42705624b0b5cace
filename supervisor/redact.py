"""Keeping secrets out of everything we print.

Two layers: URLs are shown with their password replaced (``redact_url``), and
every secret value the config holds is registered here so that ``scrub`` (and
the logging filter installed by ``install_log_filter``) replaces it wherever it
would otherwise appear: an exception message, a library's log line, an alert.
"""

from __future__ import annotations

import logging
import re
import threading
from urllib.parse import quote, unquote, urlsplit

MASK = "****"
_lock = threading.Lock()
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None

# user:password@ in any URL-ish text
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^@/\s]+)@")


def forget_all() -> None:
    """Forget every registered secret (tests: each test starts with its own config's secrets)."""
    global _pattern
    with _lock:
        _secrets.clear()
        _pattern = None


def register_secret(value: str | None) -> None:
    """Remember a secret (and its URL-encoded forms) so that scrub() hides it."""
    if not value or len(value) < 4:
        return
    global _pattern
    with _lock:
        before = len(_secrets)
        for v in {value, quote(value, safe=""), unquote(value)}:
            if len(v) >= 4:
                _secrets.add(v)
        if len(_secrets) != before:
            ordered = sorted(_secrets, key=len, reverse=True)
            _pattern = re.compile("|".join(re.escape(s) for s in ordered))


def register_url(url: str | None, tokens: bool = False) -> None:
    """Register a URL's password; with ``tokens``, also the URL itself and every long segment of its
    path and query (Apprise URLs carry their tokens anywhere)."""
    if not url:
        return
    if tokens:
        register_secret(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return
    if parts.password:
        register_secret(parts.password)
    if not tokens:
        return
    # tokens in the path or query of an Apprise URL: segments that look like tokens (not plain words
    # such as "services", "markdown" or "starttls", which would then be masked everywhere)
    for seg in re.split(r"[/?&=#]", f"{parts.path}?{parts.query}"):
        if looks_like_token(seg):
            register_secret(seg)


def looks_like_token(seg: str) -> bool:
    if len(seg) < 8 or "@" in seg:
        return False
    if len(seg) >= 20:
        return True
    has_digit = any(c.isdigit() for c in seg)
    mixed = any(c.islower() for c in seg) and any(c.isupper() for c in seg)
    return has_digit or mixed


def scrub(text: object) -> str:
    """The text with every registered secret and every URL password masked."""
    s = str(text)
    pat = _pattern
    if pat is not None:
        s = pat.sub(MASK, s)
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", s)


def redact_url(url: str | None) -> str:
    """A broker or API URL fit to print: scheme, user, host, port, path; no password."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return MASK
    user = parts.username or ""
    auth = ""
    if parts.password:
        auth = f"{user}:{MASK}@"
    elif user:
        auth = f"{user}@"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{auth}{host}{port}{parts.path}"


def redact_apprise_url(url: str) -> str:
    """Only the service of an Apprise URL (mmosts://****): its tokens may sit anywhere in it."""
    scheme = url.split("://", 1)[0] if "://" in url else "?"
    return f"{scheme}://{MASK}"


class ScrubFilter(logging.Filter):
    """Masks secrets in every record that passes through a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string: leave it to logging
            return True
        clean = scrub(msg)
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if clean != msg or record.args:
            record.msg, record.args = clean, None
        return True


def install_log_filter(handler: logging.Handler) -> None:
    if not any(isinstance(f, ScrubFilter) for f in handler.filters):
        handler.addFilter(ScrubFilter())
