"""Keeping secrets out of everything we print.

Two layers: URLs are shown with their password replaced (``redact_url``), and
every secret value the config holds is registered here so that ``scrub`` (and
the logging filter installed by ``install_log_filter``) replaces it wherever it
would otherwise appear: an exception message, a library's log line, an alert.
"""

from __future__ import annotations

import base64
import bisect
import json
import logging
import re
import threading
from urllib.parse import quote, quote_plus, unquote, urlsplit

MASK = "****"
_lock = threading.Lock()
_secrets: set[str] = set()
_pattern: re.Pattern[str] | None = None

# Every pattern here runs over text we do not control (a worker's last output, up to 1 MB): each is
# bounded so that scrub() stays linear (a scheme starts a run of scheme characters and is short;
# user names and passwords have a maximum length; quoted strings match one way only).
_SCHEME = r"(?<![a-zA-Z0-9+.\-])[a-zA-Z][a-zA-Z0-9+.\-]{0,31}://"
# user:password@ in any URL-ish text. The password runs to the LAST @ of the word (it may hold an
# unencoded # / ? or @: redis://:S3CRET#tail@host), stopping at whitespace, quotes, angle brackets
# and where a next URL of a ;-separated list begins (sentinel://:pw@h1;sentinel://:pw@h2)
# (found in two steps, see _mask_userinfo: one regex with a backtracking password was quadratic)
_USERINFO_HEAD = re.compile(rf"(?P<scheme>{_SCHEME})(?P<user>[^:/@\s\"'<>]{{0,256}}):")
_WORD_END = re.compile(rf"[\s\"'<>]|;(?={_SCHEME})")
_PASSWORD_MAX = 512
# what urllib says of a URL it cannot parse quotes a piece of its authority, which may be password
# material (redis://:S3CRET#tail@host: "Port could not be cast to integer value as 'S3CRET'")
_URLLIB_QUOTES = re.compile(
    r"(?P<lead>Port could not be cast to integer value as |netloc )"
    r"(?:'(?:\\.|[^'\\]){0,1024}'|\"(?:\\.|[^\"\\]){0,1024}\")"
)
# several URLs in one setting: kombu's sentinel://h1:26379;sentinel://h2:26379
_NEXT_URL = re.compile(rf";(?={_SCHEME})")


def forget_all() -> None:
    """Forget every registered secret (tests: each test starts with its own config's secrets)."""
    global _pattern
    with _lock:
        _secrets.clear()
        _pattern = None


def _forms(value: str) -> set[str]:
    """The ways a secret may be written in text we print: as is, URL-encoded (path and form), URL-
    decoded, escaped in JSON or a Python repr, and base64 (standard and URL-safe, padded or not: an
    ``Authorization: Basic`` header, a config blob)."""
    out = {value, unquote(value), json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1],
           repr(value)[1:-1]}
    raw = value.encode("utf-8", "surrogatepass")  # never raises, even for a lone surrogate
    out |= {quote(raw, safe=""), quote_plus(raw, safe="")}
    out |= _base64(raw)
    return out


def _base64(raw: bytes) -> set[str]:
    out = set()
    for enc in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        text = enc.decode("ascii")
        out |= {text, text.rstrip("=")}
    return out


def register_secret(value: str | None) -> None:
    """Remember a secret (and its encoded forms, see ``_forms``) so that scrub() hides it. Values
    shorter than 4 characters are not registered: masking them would mask every "1" or "on"."""
    if not isinstance(value, str) or len(value) < 4:
        return
    _add(_forms(value))


def register_basic(user: str | None, password: str | None) -> None:
    """Remember the ``user:password`` pair as an HTTP client sends it (``Authorization: Basic``
    holds its base64)."""
    if not isinstance(password, str) or not password:
        return
    _add(_base64(f"{user or ''}:{password}".encode("utf-8", "surrogatepass")))


def _add(values: set[str]) -> None:
    global _pattern
    with _lock:
        before = len(_secrets)
        _secrets.update(v for v in values if len(v) >= 4)
        if len(_secrets) != before:
            ordered = sorted(_secrets, key=len, reverse=True)
            _pattern = re.compile("|".join(re.escape(s) for s in ordered))


def split_urls(text: str) -> list[str]:
    """The URLs of a setting that may list several, joined by ';' (sentinel://h1;sentinel://h2);
    a ';' inside a password stays (only a ';' followed by a scheme:// starts a URL)."""
    return _NEXT_URL.split(text)


def raw_credentials(url: str) -> tuple[str, str | None, str] | None:
    """(user, password, rest) of one URL read the way a person wrote it, whether or not a URL
    parser accepts it: the userinfo runs from the scheme's ``//`` to the LAST ``@``, the password
    from its first ``:``; ``rest`` is what follows that ``@`` (host, port, path). None when the URL
    has no userinfo."""
    head, sep, tail = url.partition("://")
    if not sep:
        return None
    userinfo, at, rest = tail.rpartition("@")
    if not at:
        return None
    user, colon, password = userinfo.partition(":")
    return user, (password if colon else None), rest


def register_url(url: str | None, tokens: bool = False, whole: bool | None = None) -> None:
    """Register a URL's password, found however the URL is written (``raw_credentials``: a password
    with an unencoded # / ? or @ that a URL parser misreads is still found), with the pieces of it a
    parser would quote in an error and the Basic credentials an HTTP client would send. A setting
    may list several URLs (``split_urls``). With ``tokens``, also the URL itself, a token-like user
    name and every token-like segment of its path and query (Apprise URLs carry their tokens anywhere).
    ``whole`` (default: ``tokens``): register the whole URL too."""
    if not isinstance(url, str) or not url:
        return
    if tokens if whole is None else whole:
        register_secret(url)
    for one in split_urls(url):
        _register_one_url(one, tokens)


def _register_one_url(url: str, tokens: bool) -> None:
    raw = raw_credentials(url)
    parsed_ok = True
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on what it cannot read)
        if raw is not None and raw[2].split("/", 1)[0] and not parts.hostname:
            parsed_ok = False  # redis://:1234/abcd@host: the parser saw ":1234" as the authority
    except ValueError:
        parts, parsed_ok = None, False
    if parts is not None and parts.password:
        register_secret(parts.password)
        register_basic(unquote(parts.username or ""), unquote(parts.password))
    if raw is not None:
        user, password, _ = raw
        if password:
            register_secret(password)
            register_basic(unquote(user), unquote(password))
            if not parsed_ok:
                # a parser cut the password at a # / ? and quotes the pieces in its errors
                for piece in re.split(r"[#/?]", password):
                    register_secret(piece)
        if tokens and looks_like_token(user):
            register_secret(user)
    if not tokens or parts is None:
        return
    # tokens in the path or query of an Apprise URL: segments that look like tokens (not plain words
    # such as "services", "markdown" or "starttls", which would then be masked everywhere)
    for seg in re.split(r"[/?&=#]", f"{parts.path}?{parts.query}"):
        if looks_like_token(seg):
            register_secret(seg)


# ---------------------------------------------------------------- restart.env values
# a variable whose name has one of these words (split at "_") holds a secret, whatever its value
# looks like; unless its last word says it only names or locates one (SECRET_KEY_FILE, AUTH_USER)
_SECRET_WORDS = {"PASS", "PASSWD", "PASSWORD", "PASSPHRASE", "PWD", "PW", "TOKEN", "SECRET", "KEY", "APIKEY",
                 "CREDENTIAL", "CREDENTIALS", "CREDS", "AUTH", "DSN", "PRIVATE", "COOKIE", "SALT", "SIGNATURE",
                 "BEARER", "JWT"}
_NAMING_WORDS = {"FILE", "PATH", "DIR", "NAME", "ID", "USER", "USERNAME", "URL", "HOST", "PORT", "PREFIX",
                 "SUFFIX", "LENGTH", "SIZE", "TIMEOUT", "TTL", "AGE", "EXPIRY", "ALGORITHM", "TYPE", "MODE",
                 "BACKEND"}
_PUBLIC_WORDS = {"true", "false", "yes", "no", "on", "off", "none", "null", "nil", "enabled", "disabled"}
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_ONE_PATH = r"(?:~|\.\.?)?/[\w.@%,~/-]*"
_PATHS = re.compile(rf"{_ONE_PATH}(?::{_ONE_PATH})*")  # /srv/app, ~/x, ./y, and PATH-like lists of them
_WORD = r"(?:[a-z]+|[A-Z]+|[A-Z][a-z]+)"
_PLAIN = re.compile(rf"{_WORD}(?:[._/-]{_WORD})*")  # production, INFO, proj.settings.production, Europe/Berlin


def env_name_is_secret(name: str) -> bool:
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name.upper()) if w]
    return bool(words) and words[-1] not in _NAMING_WORDS and any(w in _SECRET_WORDS for w in words)


def env_value_is_secret(name: str, value: str) -> bool:
    """Whether a ``restart.env`` value is a secret (masked everywhere once registered). Secret by
    default. Not a secret: a value shorter than 4 characters; and, unless the variable's name says it
    holds a secret (API_TOKEN, DB_PASSWORD, SECRET_KEY; not SECRET_KEY_FILE or AUTH_USER), a value that
    plainly is none: a number, a boolean word (true, off, ...), a file path or a list of paths
    (/srv/app:/srv/lib), or a plain name of letters without digits (production, INFO,
    proj.settings.production, Europe/Berlin).
    A URL is a secret to show (``describe``); what is registered of it is its password and tokens."""
    if not isinstance(value, str) or len(value) < 4:
        return False
    if "://" in value or env_name_is_secret(name):
        return True
    plainly_public = (value.lower() in _PUBLIC_WORDS or _NUMBER.fullmatch(value) or _PATHS.fullmatch(value)
                      or _PLAIN.fullmatch(value))
    return not plainly_public


def register_env(name: str, value: str) -> None:
    """Register a ``restart.env`` value by the rule of ``env_value_is_secret``. A URL: its password
    (however written), its token-like user name and path/query segments, and the whole URL when the
    variable's name says it is a secret (SENTRY_DSN, WEBHOOK_TOKEN); a URL such as
    CELERY_BROKER_URL=redis://:pw@host:6379/0 is otherwise still shown with its password masked."""
    if not isinstance(name, str) or not env_value_is_secret(name, value):
        return
    if "://" in value:
        register_url(value, tokens=True, whole=env_name_is_secret(name))
    else:
        register_secret(value)


def named_secrets(data: object, depth: int = 0) -> list[str]:
    """The string values of a nested mapping (transport options) whose key names a secret
    (``password``, ``sentinel_kwargs: {password: ...}``, ``ssl_keyfile_password``)."""
    out: list[str] = []
    if depth > 20:
        return out
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, str) and isinstance(k, str) and env_name_is_secret(k):
                out.append(v)
            else:
                out += named_secrets(v, depth + 1)
    elif isinstance(data, (list, tuple)):
        for v in data:
            out += named_secrets(v, depth + 1)
    return out


def looks_like_token(seg: str) -> bool:
    if len(seg) < 8 or "@" in seg:
        return False
    if len(seg) >= 20:
        return True
    has_digit = any(c.isdigit() for c in seg)
    mixed = any(c.islower() for c in seg) and any(c.isupper() for c in seg)
    return has_digit or mixed


def scrub(text: object) -> str:
    """The text with every registered secret and every URL password masked (a password in an
    unregistered URL up to the last @ of the word; what urllib quotes of an unreadable URL)."""
    s = str(text)
    pat = _pattern
    if pat is not None:
        s = pat.sub(MASK, s)
    s = _URLLIB_QUOTES.sub(lambda m: f"{m['lead']}'{MASK}'", s)
    return _mask_userinfo(s) if "://" in s else s


def _mask_userinfo(s: str) -> str:
    """scheme://user:PASSWORD@ -> scheme://user:****@, the password running to the last @ of its
    word (at most _PASSWORD_MAX characters)."""
    if "@" not in s:
        return s
    ends: list[int] | None = None  # where words end (computed once: linear in len(s))
    out: list[str] = []
    done = 0  # s[:done] is in out
    pos = 0
    while (m := _USERINFO_HEAD.search(s, pos)) is not None:
        start = m.end()
        if ends is None:
            ends = [e.start() for e in _WORD_END.finditer(s)]
        i = bisect.bisect_left(ends, start)
        limit = min(ends[i] if i < len(ends) else len(s), start + _PASSWORD_MAX + 1)
        at = s.rfind("@", start + 1, limit)
        if at < 0:  # no password here: look for a URL further on
            pos = m.start() + 1
            continue
        out += [s[done:m.start()], m["scheme"], m["user"], ":", MASK, "@"]
        done = pos = at + 1
    return "".join(out) + s[done:] if out else s


def redact_url(url: str | None) -> str:
    """A broker or API URL fit to print: scheme, user, host, port, path; no password. Several URLs
    joined by ';' (sentinel://h1;sentinel://h2) are shown each so; one a parser cannot read as ****."""
    if not url:
        return ""
    many = split_urls(url)
    if len(many) > 1:
        return ";".join(_redact_one(u) for u in many)
    return _redact_one(url)


def _redact_one(url: str) -> str:
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
