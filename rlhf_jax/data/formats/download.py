"""Downloads of http(s) inputs into a local cache, once per URL; a partial download never looks complete."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import http.client

from rlhf_jax.errors import UserError, os_reason


def default_cache_dir() -> Path:
    return Path(os.environ.get("RLHF_JAX_CACHE") or Path.home() / ".cache" / "rlhf_jax" / "downloads")


def fetch(url: str, cache_dir: str | Path) -> Path:
    """The local copy of `url` in `cache_dir`, downloaded once; a partial download never looks complete."""
    cache_dir = Path(cache_dir)
    url_path = urllib.parse.urlparse(url).path
    # Different URLs share file names (every HH-RLHF subset has a train.jsonl.gz), so the name carries a URL hash.
    target = cache_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{Path(url_path).name or 'download'}"
    if target.is_file():
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=target.name, suffix=".part")
    except OSError as e:
        raise UserError(f"{cache_dir}: cannot write the download cache ({os_reason(e)}); set RLHF_JAX_CACHE to a "
                        "writable directory") from None
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            expected, received = response.headers.get("Content-Length"), 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                received += len(chunk)
        if expected is not None and expected.isdigit() and received != int(expected):  # the server closed early
            raise OSError(0, f"incomplete: {received} of {expected} bytes")
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # IncompleteRead: cut off mid-body
        Path(tmp).unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e.strerror or e
        raise UserError(f"{url}: download failed ({reason})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
