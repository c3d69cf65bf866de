"""Push OCI image archives to a registry with the OCI distribution API.

:func:`push_archive` takes an archive written by :func:`layotto.images.builder.build_image`
or :func:`~layotto.images.builder.build_wasm_artifact` (any OCI image layout tar works)
and uploads it the way ``docker push`` does:

1. for every blob (config and layers): ``HEAD /v2/<repo>/blobs/<digest>``; when the
   registry lacks it, ``POST /v2/<repo>/blobs/uploads/`` and a monolithic
   ``PUT <location>?digest=<digest>``;
2. ``PUT /v2/<repo>/manifests/<tag>`` with the manifest's media type as Content-Type.

An image index in the archive is pushed too: its manifests by digest, then the index
under the tag. Pushing the same archive again uploads nothing but the manifest.

Registries on loopback (``localhost``, ``127.0.0.1``, ``[::1]``) are spoken to over
plain HTTP, like containerd and Docker do; others over HTTPS unless ``insecure``.
Credentials (``username``/``password``, or ``LAYOTTO_REGISTRY_USERNAME`` and
``LAYOTTO_REGISTRY_PASSWORD``) are sent as HTTP basic auth, or exchanged for a bearer
token when the registry asks for one (Docker Hub and most hosted registries do).

Only the standard library is used.
"""

from __future__ import annotations

import base64
import hashlib
import http
import http.client
import json
import os
import re
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from layotto.images.builder import (
    MEDIA_TYPE_IMAGE_INDEX,
    MEDIA_TYPE_IMAGE_MANIFEST,
    ImageBuildError,
    normalize_reference,
)

__all__ = [
    "DOCKER_HUB_ENDPOINT",
    "ENV_PASSWORD",
    "ENV_USERNAME",
    "ImageReference",
    "RegistryError",
    "RegistryClient",
    "parse_reference",
    "push_archive",
]

#: Where ``docker.io`` references are pushed.
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"
ENV_USERNAME = "LAYOTTO_REGISTRY_USERNAME"
ENV_PASSWORD = "LAYOTTO_REGISTRY_PASSWORD"

MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_INDEX_TYPES = (MEDIA_TYPE_IMAGE_INDEX, MEDIA_TYPE_DOCKER_MANIFEST_LIST)
_MANIFEST_TYPES = (MEDIA_TYPE_IMAGE_MANIFEST, MEDIA_TYPE_DOCKER_MANIFEST)

_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TIMEOUT = 60.0


class RegistryError(Exception):
    """A push failed: bad archive, registry unreachable, or the registry said no."""


@dataclass(frozen=True)
class ImageReference:
    """A tagged reference split for the distribution API."""

    domain: str  # as written: docker.io, ghcr.io, 127.0.0.1:5000
    repository: str  # library/hello
    tag: str

    @property
    def endpoint(self) -> str:
        """The host[:port] the API is served on (Docker Hub's differs from its name)."""
        return DOCKER_HUB_ENDPOINT if self.domain == "docker.io" else self.domain

    @property
    def hostname(self) -> str:
        """The endpoint without its port (and without brackets around an IPv6 address)."""
        host = self.endpoint
        if host.startswith("["):
            return host[1 : host.index("]")]
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

    @property
    def is_loopback(self) -> bool:
        return self.hostname in _LOOPBACK_HOSTS

    def __str__(self) -> str:
        return f"{self.domain}/{self.repository}:{self.tag}"


def parse_reference(reference: str) -> ImageReference:
    """Split ``reference`` (normalised as CRI does: ``hello`` → ``docker.io/library/hello:latest``)."""
    try:
        full = normalize_reference(reference)
    except ImageBuildError as exc:
        raise RegistryError(str(exc)) from None
    domain, _, rest = full.partition("/")
    repository, _, tag = rest.rpartition(":")
    return ImageReference(domain, repository, tag)


# --------------------------------------------------------------------------- archive


class _Archive:
    """The blobs and the top-level descriptor of an OCI image layout tar."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._tar = tarfile.open(self.path)
        except FileNotFoundError:
            raise RegistryError(f"{self.path}: no such file") from None
        except (tarfile.TarError, OSError) as exc:
            raise RegistryError(f"{self.path}: not a tar archive ({exc})") from None
        self._members = {
            m.name.removeprefix("./").rstrip("/"): m for m in self._tar.getmembers() if m.isfile()
        }
        if "index.json" not in self._members:
            hint = " (a `docker save` archive?)" if "manifest.json" in self._members else ""
            raise RegistryError(f"{self.path}: not an OCI image layout: no index.json{hint}")
        index = self._json_member("index.json")
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list) or not manifests:
            raise RegistryError(f"{self.path}: index.json lists no image")
        if len(manifests) > 1:
            raise RegistryError(
                f"{self.path}: index.json lists {len(manifests)} images; push archives holding one"
            )
        self.top: dict[str, Any] = manifests[0]

    def close(self) -> None:
        self._tar.close()

    def _json_member(self, name: str) -> Any:
        data = self._read(name)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise RegistryError(f"{self.path}: {name} is not JSON ({exc})") from None

    def _read(self, name: str) -> bytes:
        member = self._members.get(name)
        f = self._tar.extractfile(member) if member is not None else None
        if f is None:
            raise RegistryError(f"{self.path}: {name} is missing")
        with f:
            return f.read()

    def blob(self, descriptor: Mapping[str, Any]) -> bytes:
        """A blob's bytes, checked against the descriptor's digest and size."""
        digest = str(descriptor.get("digest", ""))
        if not _DIGEST.match(digest):
            raise RegistryError(f"{self.path}: unsupported or malformed digest {digest!r}")
        data = self._read("blobs/sha256/" + digest.split(":", 1)[1])
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise RegistryError(f"{self.path}: blob {digest} does not match its digest")
        if descriptor.get("size") is not None and descriptor["size"] != len(data):
            raise RegistryError(
                f"{self.path}: blob {digest} has {len(data)} bytes, its descriptor says {descriptor['size']}"
            )
        return data


# --------------------------------------------------------------------------- HTTP


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` → ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in re.finditer(r'(\w+)=(?:"([^"]*)"|([^\s,]*))', rest)
    }
    return scheme.lower(), params


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _error_detail(body: bytes) -> str:
    """The registry's error JSON as text: ``CODE: message (detail)``; else the raw body."""
    try:
        errors = json.loads(body).get("errors")
    except (ValueError, AttributeError):
        errors = None
    if isinstance(errors, list) and errors:
        parts = []
        for e in errors:
            if not isinstance(e, dict):
                continue
            text = ": ".join(str(x) for x in (e.get("code"), e.get("message")) if x)
            if e.get("detail"):
                text += f" ({json.dumps(e['detail'], separators=(',', ':'))})"
            parts.append(text)
        if parts:
            return "; ".join(parts)
    text = body.decode(errors="replace").strip()
    return text[:500] if text else "(no body)"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects of HEAD and GET are followed; anything else is handled by the caller."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001
        if req.get_method() in ("GET", "HEAD"):
            return super().redirect_request(req, fp, code, msg, headers, newurl)
        return None


@dataclass
class _Response:
    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str


class RegistryClient:
    """The few distribution API calls a push needs, for one repository of one registry."""

    def __init__(
        self,
        ref: ImageReference,
        *,
        insecure: bool = False,
        username: str | None = None,
        password: str | None = None,
        timeout: float = _TIMEOUT,
    ) -> None:
        self.ref = ref
        scheme = "http" if insecure or ref.is_loopback else "https"
        self.base_url = f"{scheme}://{ref.endpoint}"
        self.username = username
        self.password = password
        self.timeout = timeout
        self._authorization: str | None = None
        self._opener = urllib.request.build_opener(_NoRedirect)

    # ------------------------------------------------------------------ plumbing

    def _url(self, path: str) -> str:
        return path if "://" in path else self.base_url + path

    def _send(
        self, method: str, url: str, body: bytes | None, headers: Mapping[str, str], auth: str | None
    ) -> _Response:
        request = urllib.request.Request(url, data=body, method=method, headers=dict(headers))
        if auth:
            request.add_unredirected_header("Authorization", auth)
        try:
            with self._opener.open(request, timeout=self.timeout) as r:
                return _Response(r.status, r.headers, r.read(), r.url)
        except urllib.error.HTTPError as exc:
            with exc:
                data = b"" if method == "HEAD" else exc.read()
            return _Response(exc.code, exc.headers, data, url)
        except urllib.error.URLError as exc:
            reason = exc.reason
            hint = ""
            if isinstance(reason, OSError) and "SSL" in type(reason).__name__.upper():
                hint = " (a plain-HTTP registry? use --insecure)"
            raise RegistryError(f"registry {self.base_url} unreachable: {reason}{hint}") from None
        except (OSError, http.client.HTTPException) as exc:  # reset, timeout, garbled answer
            raise RegistryError(f"registry {self.base_url} unreachable: {exc!r}") from None

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
        allow: tuple[int, ...] = (),
        what: str = "",
    ) -> _Response:
        """Send one request (authenticating on a 401 challenge, once); a status outside
        ``ok`` and ``allow`` raises :class:`RegistryError` with the registry's message."""
        url = self._url(path)
        headers = dict(headers or {})
        if body is not None:
            headers.setdefault("Content-Length", str(len(body)))
        response = self._send(method, url, body, headers, self._authorization)
        if response.status == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            if self._authenticate(challenge):
                response = self._send(method, url, body, headers, self._authorization)
        if response.status in ok or response.status in allow:
            return response
        action = what or f"{method} {urllib.parse.urlsplit(url).path}"
        message = f"{self.ref.endpoint}: {action}: HTTP {response.status} {_phrase(response.status)}"
        if response.body:
            message += f": {_error_detail(response.body)}"
        if response.status == 401:
            if self.username:
                message += f"; the registry refused the credentials of {self.username!r}"
            else:
                message += (
                    f"; no credentials given (--username/--password, or ${ENV_USERNAME}/${ENV_PASSWORD})"
                )
        raise RegistryError(message)

    def _authenticate(self, challenge: str) -> bool:
        """Set the Authorization header for a 401 ``challenge``; False when we cannot."""
        scheme, params = _parse_challenge(challenge)
        basic = None
        if self.username is not None:
            token = base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode()
            basic = f"Basic {token}"
        if scheme == "basic":
            if basic is None or self._authorization == basic:
                return False
            self._authorization = basic
            return True
        if scheme != "bearer" or not params.get("realm"):
            return False
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        # Ask for push rights on our repository even when challenged for pull only.
        query["scope"] = f"repository:{self.ref.repository}:pull,push"
        realm = params["realm"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        response = self._send("GET", url, None, {}, basic)
        if response.status != 200:
            raise RegistryError(
                f"{self.ref.endpoint}: token request to {realm} failed: HTTP {response.status}: "
                f"{_error_detail(response.body)}"
            )
        try:
            answer = json.loads(response.body)
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not token:
            raise RegistryError(f"{self.ref.endpoint}: token request to {realm} gave no token")
        bearer = f"Bearer {token}"
        if self._authorization == bearer:
            return False
        self._authorization = bearer
        return True

    # ------------------------------------------------------------------ API

    def ping(self) -> None:
        """``GET /v2/``: the registry speaks the API and accepts us (authenticating now
        when it asks to)."""
        self.request("GET", "/v2/", what="API check (GET /v2/)")

    def has_blob(self, digest: str) -> bool:
        r = self.request(
            "HEAD", f"/v2/{self.ref.repository}/blobs/{digest}", ok=(200,), allow=(404,), what="blob check"
        )
        return r.status == 200

    def upload_blob(self, digest: str, data: bytes) -> None:
        """A monolithic upload: POST for an upload location, then PUT the bytes there."""
        started = self.request(
            "POST",
            f"/v2/{self.ref.repository}/blobs/uploads/",
            body=b"",
            ok=(202,),
            what=f"starting the upload of {digest}",
        )
        location = started.headers.get("Location")
        if not location:
            raise RegistryError(f"{self.ref.endpoint}: upload of {digest}: no Location in the answer")
        location = urllib.parse.urljoin(started.url, location)
        separator = "&" if urllib.parse.urlsplit(location).query else "?"
        self.request(
            "PUT",
            location + separator + urllib.parse.urlencode({"digest": digest}),
            body=data,
            headers={"Content-Type": "application/octet-stream"},
            ok=(201, 204),
            what=f"uploading blob {digest}",
        )

    def put_manifest(self, reference: str, media_type: str, data: bytes) -> str:
        """PUT a manifest under a tag or digest; returns the digest the registry reports."""
        r = self.request(
            "PUT",
            f"/v2/{self.ref.repository}/manifests/{reference}",
            body=data,
            headers={"Content-Type": media_type},
            ok=(201, 200),
            what=f"pushing manifest {reference}",
        )
        return r.headers.get("Docker-Content-Digest", "")


# --------------------------------------------------------------------------- push


def _media_type(document: Any, descriptor: Mapping[str, Any]) -> str:
    media_type = document.get("mediaType") if isinstance(document, dict) else None
    return str(media_type or descriptor.get("mediaType") or "")


def _push_manifest(
    client: RegistryClient, archive: _Archive, descriptor: Mapping[str, Any], tag: str | None
) -> str:
    """Push the blobs a manifest (or index) needs, then the manifest itself; returns its digest."""
    data = archive.blob(descriptor)
    digest = str(descriptor["digest"])
    try:
        document = json.loads(data)
    except ValueError as exc:
        raise RegistryError(f"{archive.path}: manifest {digest} is not JSON ({exc})") from None
    media_type = _media_type(document, descriptor)
    if media_type in _INDEX_TYPES:
        for child in document.get("manifests") or []:
            _push_manifest(client, archive, child, None)
    elif media_type in _MANIFEST_TYPES:
        blobs = [document.get("config"), *(document.get("layers") or [])]
        for blob in blobs:
            if not isinstance(blob, dict):
                raise RegistryError(f"{archive.path}: manifest {digest} has a malformed descriptor")
            blob_digest = str(blob.get("digest"))
            if blob.get("urls"):
                continue  # a foreign layer: it lives elsewhere
            if not client.has_blob(blob_digest):
                client.upload_blob(blob_digest, archive.blob(blob))
    else:
        raise RegistryError(f"{archive.path}: manifest {digest} has unsupported media type {media_type!r}")
    reported = client.put_manifest(tag or digest, media_type, data)
    if reported and reported != digest:
        raise RegistryError(
            f"{client.ref.endpoint}: stored manifest {digest} under the digest {reported}: "
            "the registry rewrote it"
        )
    return digest


def push_archive(
    archive: Path | str,
    reference: str,
    *,
    insecure: bool = False,
    username: str | None = None,
    password: str | None = None,
    timeout: float = _TIMEOUT,
) -> str:
    """Push the image in OCI layout archive ``archive`` as ``reference``; returns the
    manifest digest (``sha256:...``), the same the builder printed.

    ``reference`` is ``host[:port]/repository[:tag]`` (a bare name means Docker Hub;
    the tag defaults to ``latest``). Loopback registries, and any when ``insecure``, are
    spoken to over plain HTTP. ``username``/``password`` default to the
    ``LAYOTTO_REGISTRY_USERNAME``/``LAYOTTO_REGISTRY_PASSWORD`` environment variables.
    Raises :class:`RegistryError` with what went wrong.
    """
    ref = parse_reference(reference)
    if username is None:
        username = os.environ.get(ENV_USERNAME) or None
    if password is None:
        password = os.environ.get(ENV_PASSWORD)
    image = _Archive(Path(archive))
    try:
        client = RegistryClient(ref, insecure=insecure, username=username, password=password, timeout=timeout)
        client.ping()
        return _push_manifest(client, image, image.top, ref.tag)
    finally:
        image.close()
