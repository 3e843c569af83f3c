"""Fetch manifest URLs for a build: timeouts, retries with backoff for transient failures, and a size cap.

Dead links are expected (many LAION URLs are gone); they raise `DownloadError`, which the builder records as a
skip. Only http(s) URLs are fetched.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.request

from .errors import GuardrailError

USER_AGENT = "guardrail-blocklist-builder/0.1 (+https://github.com/guardrail)"
MAX_BYTES = 64 * 1024 * 1024


class DownloadError(GuardrailError):
    """A URL could not be fetched (HTTP error, timeout, too large, or not http/https)."""


def fetch(url: str, timeout: float = 10.0, retries: int = 2, backoff: float = 0.5, max_bytes: int = MAX_BYTES) -> bytes:
    """GET `url` and return the body.

    Retries timeouts, connection errors, HTTP 429 and 5xx up to `retries` times (waiting `backoff * 2**attempt`
    seconds); other HTTP errors fail at once. Raises `DownloadError` with the reason.
    """
    if not url.lower().startswith(("http://", "https://")):
        raise DownloadError(f"not an http(s) URL: {url!r}")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    except ValueError as error:  # a malformed URL (e.g. "http://[::1")
        raise DownloadError(f"{url}: invalid URL ({error})") from error
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read(max_bytes + 1)
            if len(body) > max_bytes:
                raise DownloadError(f"{url}: body larger than {max_bytes} bytes")
            return body
        except urllib.error.HTTPError as error:
            reason = f"HTTP {error.code}"
            transient = error.code == 429 or error.code >= 500
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, http.client.HTTPException) as error:
            reason = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            transient = True
        except ValueError as error:  # a malformed host or port, found only when connecting
            raise DownloadError(f"{url}: invalid URL ({error})") from error
        if not transient or attempt == retries:
            raise DownloadError(f"{url}: {reason}" + (f" after {attempt + 1} attempts" if transient else ""))
        time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")
