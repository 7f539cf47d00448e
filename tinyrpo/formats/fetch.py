"""One file over HTTP(S), the way a large download should go: resumed, never spliced, verified.

    fetch(url, path, sha256=...)   -> True if bytes were fetched, False if `path` was already the right file

- Bytes go to `path.part`, renamed to `path` only once complete and verified, so `path` is never half a file.
- An interrupted transfer resumes with `Range: bytes=N-` and `If-Range: <validator>`, the ETag (or
  Last-Modified) the server gave the first time, kept beside the .part in `path.part.json` with the URL.
  If the file changed in between (a new commit on a mutable ref such as `main`), the server answers 200
  with the whole new file instead of splicing new bytes onto old ones; a .part whose URL or validator is
  unknown, or a 206 whose ETag differs (a server that ignores If-Range), starts over.
- Every file is checked against a sha256: the one pinned by the caller, else the one the Hugging Face hub
  publishes for it: `X-Linked-Etag` (the LFS object's sha256, sent with the redirect to its CDN) or, for a
  small file kept in git, the `ETag` (its git blob sha1). A mismatch deletes the file and says so.
- Redirects (the hub's 302 to its CDN, 307 for renamed repositories) are followed; `Authorization` (from
  $HF_TOKEN) is sent to the hub's host only, never to the CDN a redirect points at.
"""
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from tinyrpo.errors import UserError

USER_AGENT = "tinyrpo-download/0.2 (+urllib)"
CHUNK = 1 << 20
RETRY_WAIT = 1.0  # seconds before the first retry; doubles after each failure
MAX_RETRY_AFTER = 60.0  # longest Retry-After (HTTP 429/503) honoured before retrying

_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")


class NotFound(UserError):
    """HTTP 404: the file is not at that address."""


class _Retry(Exception):
    """A transient network failure: try again, resuming from the .part file."""

    def __init__(self, message, code=None, wait=None):
        super().__init__(message)
        self.code = code  # the HTTP status, if the server answered
        self.wait = wait  # seconds the server asked for (Retry-After), if any


def hf_token() -> str | None:
    """The Hugging Face access token of $HF_TOKEN (huggingface_hub's variable; its older name too)."""
    return (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip() or None


# ---------------------------------------------------------------------------------------------------
# Requests: redirects that remember the hub's headers and keep the token on the hub


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib, and (1) keeps the headers of every redirect response in `seen` (the hub
    puts X-Linked-Etag on its 302 to the CDN, not on the CDN's answer) and (2) re-adds the token only when the
    redirect stays on the token's host."""

    def __init__(self, seen: list, token: str | None, token_host: str | None):
        self.seen, self.token, self.token_host = seen, token, token_host

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.seen.append(headers)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and self.token and host_of(newurl) == self.token_host:
            new.add_unredirected_header("Authorization", f"Bearer {self.token}")
        return new


def host_of(url):
    return urllib.parse.urlsplit(url).netloc or url


def _open(url, headers, timeout, token=None, token_host=None):
    """-> (response, [headers of the redirects followed])."""
    seen = []
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **headers})
    if token and host_of(url) == token_host:
        req.add_unredirected_header("Authorization", f"Bearer {token}")  # not forwarded by urllib's redirects
    opener = urllib.request.build_opener(_Redirects(seen, token, token_host))
    try:
        return opener.open(req, timeout=timeout), seen
    except urllib.error.HTTPError as e:
        e.redirect_headers = seen
        raise


def _unquote_etag(value):
    """'"abc"' -> 'abc'; weak validators (W/"...") -> None: they may not be used with If-Range."""
    if not value or value.startswith("W/"):
        return None
    return value.strip().strip('"')


def published_hash(headers_chain) -> tuple[str, str] | None:
    """(algorithm, hex digest) the hub publishes for a file, from the redirect and final response headers:
    X-Linked-Etag is the sha256 of an LFS file; a 40-hex ETag without it is a git blob sha1."""
    for h in headers_chain:
        linked = _unquote_etag(h.get("X-Linked-Etag"))
        if linked and _SHA256.fullmatch(linked):
            return "sha256", linked
    for h in reversed(headers_chain):
        etag = _unquote_etag(h.get("ETag"))
        if etag and _SHA256.fullmatch(etag):
            return "sha256", etag
        if etag and _SHA1.fullmatch(etag) and h.get("X-Repo-Commit"):  # the hub's own answer for a git file
            return "git-sha1", etag
    return None


def file_hash(path, algorithm: str) -> str:
    """sha256 of a file, or its git blob sha1 (sha1 of b"blob <size>\\0" + content)."""
    path = Path(path)
    h = hashlib.sha256() if algorithm == "sha256" else hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK * 8):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Messages


def _or(hint):
    return f", or {hint}" if hint else ""


def _reason(e):
    """'Connection refused' rather than '<urlopen error [Errno 111] Connection refused>'."""
    r = getattr(e, "reason", None) or e
    return getattr(r, "strerror", None) or str(r)


def _gb(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _refused(url, code, token, hint):
    if code == 429:
        auth = "your HF_TOKEN's limit too" if token else "set HF_TOKEN to a Hugging Face access token for a higher limit"
        return UserError(f"{host_of(url)} keeps answering HTTP 429 (too many requests): wait a few minutes and run the "
                         f"same command again ({auth}), or set HF_ENDPOINT to a mirror{_or(hint)}")
    if token:
        what = ("the token in HF_TOKEN was not accepted (check it at huggingface.co/settings/tokens)" if code == 401
                else "the account of HF_TOKEN has no access: accept the model's license on its page while logged in")
    else:
        what = ("the file is gated or private: set HF_TOKEN to a Hugging Face access token "
                "(huggingface.co/settings/tokens) of an account that accepted the model's license")
    return UserError(f"access to {url} was refused (HTTP {code}): {what}, or set HF_ENDPOINT to a mirror that "
                     f"serves it{_or(hint)}")


def make_folder(folder):
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create folder {folder}: {_reason(e)}; use a folder you can write to") from None


def download_write_error(e, part):
    if e.errno == errno.ENOSPC:
        return UserError(f"disk full while writing {part}: free some space and run the same command again "
                         f"(it resumes from {part.name})")
    return UserError(f"could not write {part}: {_reason(e)}; check the folder's permissions and free space")


# ---------------------------------------------------------------------------------------------------
# The .part file and what it was started from


def _sidecar(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_sidecar(part: Path) -> dict:
    try:
        d = json.loads(_sidecar(part).read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_sidecar(part: Path, url: str, validator: str | None) -> None:
    try:
        _sidecar(part).write_text(json.dumps({"url": url, "validator": validator}))
    except OSError as e:
        raise download_write_error(e, _sidecar(part)) from None


def _discard(part: Path) -> None:
    for p in (part, _sidecar(part)):
        p.unlink(missing_ok=True)


def _validator(headers) -> str | None:
    """What If-Range may name: a strong ETag (quoted, as sent), else Last-Modified."""
    etag = headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("Last-Modified")


def _total_from_content_range(value):
    """'bytes 100-199/200' or 'bytes */200' -> 200 (None when absent or unknown)."""
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None


def _content_range_start(value):
    """'bytes 100-199/200' -> 100."""
    try:
        return int(value.split()[1].split("-")[0])
    except (AttributeError, IndexError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------
# One transfer attempt


def _transfer(url, part, progress, timeout, hint, desc, token, token_host) -> list:
    """Append the rest of `url` to `part` (or start it over). Returns the response headers chain (redirects,
    then the final answer). Raises _Retry on a transient failure, UserError otherwise."""
    meta = _read_sidecar(part) if part.exists() else {}
    start = part.stat().st_size if part.exists() else 0
    if start and (meta.get("url") != url or not meta.get("validator")):
        _discard(part)  # started from another address (another revision), or nothing to check it against
        start, meta = 0, {}
    headers = {"Range": f"bytes={start}-", "If-Range": meta["validator"]} if start else {}
    try:
        resp, chain = _open(url, headers, timeout, token, token_host)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # the .part already holds every byte (or more than the file has)
            if _total_from_content_range(e.headers.get("Content-Range")) == start:
                return [*getattr(e, "redirect_headers", []), e.headers]
            _discard(part)
            return _transfer(url, part, progress, timeout, hint, desc, token, token_host)
        if e.code in (408, 429) or e.code >= 500:
            after = e.headers.get("Retry-After", "")
            raise _Retry(f"HTTP {e.code} {e.reason}", e.code, float(after) if after.isdigit() else None) from None
        if e.code == 404:
            raise NotFound(f"{url} was not found (HTTP 404): check the address{_or(hint)}") from None
        if e.code in (401, 403):
            raise _refused(url, e.code, token, hint) from None
        raise UserError(f"downloading {url} failed: HTTP {e.code} {e.reason}{_or(hint)}") from None
    except _NETWORK_ERRORS as e:
        raise _Retry(_reason(e)) from None

    with resp:
        chain = [*chain, resp.headers]
        length = resp.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        if resp.status == 206:
            if (_content_range_start(resp.headers.get("Content-Range")) != start
                    or _validator(resp.headers) != meta.get("validator")):
                _discard(part)  # other bytes than asked for, or another version of the file: start over
                return _transfer(url, part, progress, timeout, hint, desc, token, token_host)
            mode, total = "ab", (start + length if length is not None else None)
        else:  # 200: a fresh start, a server that ignores Range, or (If-Range) the file changed
            start, mode, total = 0, "wb", length
            _write_sidecar(part, url, _validator(resp.headers))
        if total is not None:
            free = shutil.disk_usage(part.parent).free
            if total - start > free:
                raise UserError(f"not enough disk space for {part.name[:-5]}: it needs "
                                f"{_gb(total - start)} and {part.parent} has {_gb(free)} free")
        got = 0
        bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=desc, disable=not progress, leave=True, file=sys.stderr)
        try:
            f = open(part, mode)
        except OSError as e:
            bar.close()
            raise download_write_error(e, part) from None
        with f, bar:
            while True:
                try:
                    chunk = resp.read(CHUNK)
                except _NETWORK_ERRORS as e:
                    raise _Retry(f"connection lost after {start + got} bytes ({_reason(e)})") from None
                if not chunk:
                    break
                try:
                    f.write(chunk)
                except OSError as e:
                    raise download_write_error(e, part) from None
                got += len(chunk)
                bar.update(len(chunk))
    # http.client returns b"" rather than raising when the server hangs up early: check the count.
    if total is not None and start + got != total:
        raise _Retry(f"connection closed after {start + got} of {total} bytes")
    return chain


def probe_url(url, timeout=30.0, token=None, token_host=None) -> tuple[int | None, tuple[str, str] | None]:
    """(size, published hash) of the file at `url` without downloading it; (None, None) when unreachable.

    A one-byte Range GET rather than HEAD: urllib turns HEAD into GET on a redirect, and CDN links
    signed for GET may refuse HEAD. A server that ignores Range answers 200 with the full length.
    """
    try:
        resp, chain = _open(url, {"Range": "bytes=0-0"}, timeout, token, token_host)
        with resp:
            chain = [*chain, resp.headers]
            if resp.status == 206:
                size = _total_from_content_range(resp.headers.get("Content-Range"))
            else:
                n = resp.headers.get("Content-Length")
                size = int(n) if n and n.isdigit() else None
            return size, published_hash(chain)
    except (OSError, *_NETWORK_ERRORS):
        return None, None


def _expected(sha256, chain):
    """(algorithm, digest, where it comes from) to check a download against, or None."""
    if sha256:
        return "sha256", sha256, "pinned"
    found = published_hash(chain)
    return (*found, "published by the server") if found else None


def fetch(url, path, *, sha256=None, retries=3, progress=True, timeout=60.0, hint="", desc=None,
          token=None, token_host=None) -> bool:
    """Download `url` to `path` and check it; returns True if bytes were fetched, False if `path` was
    already the right file.

    `sha256`: the digest the file must have (else the one the server publishes, see the module docstring).
    An existing `path` is kept when it has that digest (no request at all when pinned) or, when nothing is
    published, the server's size (or the server cannot be asked). Network failures are retried `retries`
    times. Every failure ends in one UserError; `hint` is the way around it offered last. `token` is sent
    as `Authorization: Bearer` to `token_host` only.
    """
    path = Path(path)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise UserError(f"cannot download {url}: not an http(s) address (a --base-url needs https://)")
    if path.is_file():
        if sha256:
            if file_hash(path, "sha256") == sha256:
                return False
        else:
            size, published = probe_url(url, timeout, token, token_host)
            if size is None or (size == path.stat().st_size
                                and (published is None or file_hash(path, published[0]) == published[1])):
                return False
    make_folder(path.parent)
    part = path.with_name(path.name + ".part")
    chain = []
    for attempt in range(retries + 1):
        try:
            chain = _transfer(url, part, progress, timeout, hint, desc or path.name, token, token_host)
            break
        except _Retry as e:
            if attempt == retries:
                if e.code == 429:
                    raise _refused(url, 429, token, hint) from None
                if part.exists() and part.stat().st_size:
                    raise UserError(f"the download of {path.name} from {host_of(url)} broke off: {e}; run the same "
                                    f"command again to resume from {part.name}{_or(hint)}") from None
                raise UserError(f"could not reach {host_of(url)} for {path.name}: {e}; "
                                f"check your connection{_or(hint)}") from None
            time.sleep(min(e.wait, MAX_RETRY_AFTER) if e.wait is not None else RETRY_WAIT * 2 ** attempt)
    expected = _expected(sha256, chain)
    if expected is not None:
        algorithm, want, source = expected
        got = file_hash(part, algorithm)
        if got != want:
            _discard(part)
            raise UserError(f"{path.name} from {host_of(url)} is not the file it should be: its {algorithm} is "
                            f"{got}, {source} {want}; deleted it. Run the same command again; if this repeats, "
                            f"the server (--base-url / HF_ENDPOINT) serves other bytes{_or(hint)}")
    try:
        os.replace(part, path)
    except OSError as e:
        raise download_write_error(e, path) from None
    _sidecar(part).unlink(missing_ok=True)
    return True
