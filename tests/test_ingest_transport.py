"""The ingest layer over a real network: HTTPS servers on 127.0.0.1 with a test CA, and a pip
package index served the same way. Nothing here leaves the machine: every proxy variable points
at a closed port, with 127.0.0.1 exempt, and pip reads no configuration file."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from lmforge.data.sources import ByteCap, SourceError, TransientSourceError, fetch
from lmforge.errors import UserError
from tests.conftest import make_tar, run, sha256, write_params

DATA = b"text,label\n" + b"".join(b"a fine line of text number %d,1\n" % i for i in range(200))

Route = Callable[[BaseHTTPRequestHandler], None]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- a test CA and servers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> dict[str, Path]:
    """A CA (ca.pem) and a certificate for 127.0.0.1 it signed (server.pem, key included)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = tmp_path_factory.mktemp("tls")
    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key, issuer: str, signer, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
                   .add_extension(x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca,
                                                content_commitment=False, key_encipherment=False, data_encipherment=False,
                                                key_agreement=False, encipher_only=False, decipher_only=False), critical=True))
        if not ca:
            builder = (builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                             critical=False)
                       .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("lmforge test CA", ca_key, "lmforge test CA", ca_key, ca=True)
    leaf = certificate("127.0.0.1", key, "lmforge test CA", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(leaf.public_bytes(pem) + key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return {"ca": folder / "ca.pem", "server": folder / "server.pem"}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        self.server.seen.append(path)
        route = self.server.routes.get(path)
        if route is None:
            self.send_error(404)
        else:
            route(self)

    def log_message(self, *args) -> None:  # keep the test output to the test's own
        pass


class Server:
    """A real HTTP(S) server on 127.0.0.1 in a thread: `routes` maps a path to what it answers,
    `seen` lists the paths asked for."""

    def __init__(self, context: ssl.SSLContext | None):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.routes, self.httpd.seen = {}, []
        if context is not None:
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.scheme = "https" if context else "http"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def routes(self) -> dict[str, Route]:
        return self.httpd.routes

    @property
    def seen(self) -> list[str]:
        return self.httpd.seen

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def offline(monkeypatch, tls) -> None:
    """Trust the test CA only, and send anything not for 127.0.0.1 to a closed port."""
    monkeypatch.setenv("SSL_CERT_FILE", str(tls["ca"]))
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
        monkeypatch.setenv(name.lower(), "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


@pytest.fixture
def https(tls, offline) -> Iterator[Server]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls["server"])
    server = Server(context)
    yield server
    server.close()


@pytest.fixture
def plain_http(offline) -> Iterator[Server]:
    server = Server(None)
    yield server
    server.close()


def body(data: bytes, length: int | None = -1, cut_at: int | None = None,
         content_type: str = "application/octet-stream") -> Route:
    """Answer 200 with `data`: Content-Length is len(data) (-1), `length`, or absent (None, the
    body then ends when the connection closes); `cut_at` drops the connection after that many bytes."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", content_type)
        if length is not None:
            handler.send_header("Content-Length", str(len(data) if length == -1 else length))
        handler.end_headers()
        handler.wfile.write(data if cut_at is None else data[:cut_at])
        handler.wfile.flush()
        if cut_at is not None:
            handler.connection.shutdown(socket.SHUT_RDWR)  # no TLS close_notify: a cut, as on a real network
        handler.close_connection = True
    return answer


def chunked_cut(data: bytes) -> Route:
    """A chunked body whose connection drops in the middle of a chunk."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.protocol_version = "HTTP/1.1"
        handler.send_response(200)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.wfile.write(b"%x\r\n" % len(data) + data[: len(data) // 2])
        handler.wfile.flush()
        handler.connection.shutdown(socket.SHUT_RDWR)
        handler.close_connection = True
    return answer


def redirect(location: str) -> Route:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return answer


def status(code: int) -> Route:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_error(code)
    return answer


# --- https: sources -----------------------------------------------------------------------------


def test_a_whole_body_arrives_and_https_redirects_are_followed(https, tmp_path):
    https.routes["/data.csv"] = body(DATA)
    https.routes["/moved"] = redirect(https.url("/data.csv"))
    manifest = fetch(https.url("/data.csv"), sha256_bytes(DATA), tmp_path / "a")
    assert (tmp_path / "a/data.csv").read_bytes() == DATA and manifest["bytes"] == len(DATA)
    fetch(https.url("/moved"), sha256_bytes(DATA), tmp_path / "b")
    assert https.seen == ["/data.csv", "/moved", "/data.csv"]


def test_a_body_cut_short_is_transient_and_leaves_nothing(https, tmp_path):
    https.routes["/cut.csv"] = body(DATA, cut_at=len(DATA) // 2)
    with pytest.raises(TransientSourceError, match=rf"broke off after {len(DATA) // 2:,} of {len(DATA):,} bytes") as err:
        fetch(https.url("/cut.csv"), sha256_bytes(DATA), tmp_path / "raw")
    assert not isinstance(err.value, UserError)  # a UserError exits 2, which the flow never retries
    assert "sha256" not in str(err.value)
    assert not (tmp_path / "raw").exists()


def test_a_connection_cut_mid_chunk_is_transient(https, tmp_path):
    https.routes["/chunked.csv"] = chunked_cut(DATA)
    with pytest.raises(TransientSourceError, match="broke off .*IncompleteRead"):
        fetch(https.url("/chunked.csv"), sha256_bytes(DATA), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_a_server_error_is_transient_and_a_missing_file_is_not(https, tmp_path):
    https.routes["/busy.csv"] = status(503)
    with pytest.raises(TransientSourceError, match="503"):
        fetch(https.url("/busy.csv"), sha256_bytes(DATA), tmp_path / "a")
    with pytest.raises(SourceError, match="unreachable .*404"):
        fetch(https.url("/gone.csv"), sha256_bytes(DATA), tmp_path / "b")


def test_an_https_to_http_redirect_is_refused(https, plain_http, tmp_path):
    plain_http.routes["/data.csv"] = body(DATA)
    https.routes["/leak"] = redirect(plain_http.url("/data.csv?token=s3cr3t"))
    with pytest.raises(SourceError, match="redirects to http://127.0.0.1:.*/data.csv.*not https; refused") as err:
        fetch(https.url("/leak"), sha256_bytes(DATA), tmp_path / "raw")
    assert "s3cr3t" not in str(err.value)  # a query string may carry a token: never quoted
    assert plain_http.seen == []  # not one request went out in the clear
    assert not (tmp_path / "raw").exists()


def test_a_url_that_names_no_file_is_refused_before_any_request(https, tmp_path):
    with pytest.raises(SourceError, match=r"ends in '\.\.', which is no file name"):
        fetch(https.url("/data/.."), "0" * 64, tmp_path / "raw")
    assert https.seen == [] and not (tmp_path / "raw").exists()


@pytest.mark.parametrize("length", [-1, None], ids=["content-length", "until-close"])
def test_a_download_stops_at_the_cap(https, tmp_path, length):
    https.routes["/big.csv"] = body(DATA, length=length)
    cap = ByteCap(1000, knob="sources.big.max_bytes")
    with pytest.raises(SourceError, match=r"downloading it would pass 1,000 bytes.*raise sources\.big\.max_bytes"):
        fetch(https.url("/big.csv"), sha256_bytes(DATA), tmp_path / "raw", cap=cap)
    assert not (tmp_path / "raw").exists()
    fetch(https.url("/big.csv"), sha256_bytes(DATA), tmp_path / "raw", cap=ByteCap(len(DATA)))  # exactly at the cap


def test_the_ingest_stage_retries_a_cut_body_and_refuses_a_source_past_its_cap(https, dvc_repo, sources):
    https.routes["/reviews.csv"] = body(DATA, cut_at=100)
    write_params(dvc_repo, sources, **{"sources.task.uri": https.url("/reviews.csv"), "sources.task.sha256": sha256_bytes(DATA)})
    result = run(["python", "-m", "tasks.ingest", "task"], dvc_repo, check=False)
    assert result.returncode == 1 and "broke off after 100 of" in result.stderr  # not 2: the flow retries it
    assert "Traceback" not in result.stderr
    assert not (dvc_repo / "data/raw/task").exists()

    https.routes["/reviews.csv"] = body(DATA)
    write_params(dvc_repo, sources, **{"sources.task.uri": https.url("/reviews.csv"), "sources.task.sha256": sha256_bytes(DATA),
                                       "sources.task.max_bytes": 1000})
    result = run(["python", "-m", "tasks.ingest", "task"], dvc_repo, check=False)
    assert result.returncode == 2 and "raise sources.task.max_bytes" in result.stderr
    assert not (dvc_repo / "data/raw/task").exists()


# --- pypi: sources --------------------------------------------------------------------------------

BACKEND = '''\
import pathlib
pathlib.Path({marker!r}).write_text("the package's build code ran")  # what a hostile package would do


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = pathlib.Path(metadata_directory) / "lmforge_probe-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\\nName: lmforge-probe\\nVersion: 1.0\\n")
    return info.name
'''


def probe_sdist(folder: Path, marker: Path) -> Path:
    """A real sdist whose in-tree build backend writes `marker` as soon as pip runs it."""
    top = "lmforge_probe-1.0"
    return make_tar(folder / f"{top}.tar.gz", {
        f"{top}/PKG-INFO": b"Metadata-Version: 2.1\nName: lmforge-probe\nVersion: 1.0\n",
        f"{top}/pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        f"{top}/backend.py": BACKEND.format(marker=str(marker)).encode(),
        f"{top}/data/lines.txt": b"some corpus text\n",
    })


@pytest.fixture
def index(https, tls, tmp_path, monkeypatch) -> dict:
    """A PEP 503 package index holding the probe sdist, served over HTTPS, and pip configured to
    use it and only it (no pip.conf, no find-links, no extra index, a cache of its own)."""
    marker = tmp_path / "build-code-ran"
    sdist = probe_sdist(tmp_path, marker)
    digest = sha256(sdist)
    https.routes["/simple/lmforge-probe/"] = body(
        f'<!DOCTYPE html><html><body><a href="../../files/{sdist.name}#sha256={digest}">{sdist.name}</a></body></html>'.encode(),
        content_type="text/html")
    https.routes[f"/files/{sdist.name}"] = body(sdist.read_bytes())
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", https.url("/simple/"))
    monkeypatch.setenv("PIP_CERT", str(tls["ca"]))
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    # requests, under pip, would let these override PIP_CERT
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    return {"sdist": sdist, "sha256": digest, "marker": marker, "server": https}


def test_a_pypi_file_with_a_wrong_pin_is_refused_before_any_of_its_code_runs(index, tmp_path):
    with pytest.raises(SourceError, match=re.escape(f"pypi:lmforge-probe==1.0#*/data/*.txt: sha256 mismatch: "
                                                    f"expected {'0' * 64}, got {index['sha256']}")):
        fetch("pypi:lmforge-probe==1.0#*/data/*.txt", "0" * 64, tmp_path / "raw")
    assert not index["marker"].exists()
    assert not (tmp_path / "raw").exists()


def test_a_pinned_pypi_file_is_placed_without_building_it(index, tmp_path):
    manifest = fetch("pypi:lmforge-probe==1.0#*/data/*.txt", index["sha256"], tmp_path / "raw")
    assert (tmp_path / "raw/lines.txt").read_text() == "some corpus text\n"
    assert manifest["bytes"] == index["sdist"].stat().st_size
    assert not index["marker"].exists()  # downloaded and unpacked, never built
    assert index["server"].seen == ["/simple/lmforge-probe/", f"/files/{index['sdist'].name}"]


def test_a_pypi_file_missing_from_the_index_fails_clearly(index, tmp_path):
    with pytest.raises(SourceError, match=r"could not download \(no file of lmforge-probe==2\.0 on the package indexes"):
        fetch("pypi:lmforge-probe==2.0#*", "0" * 64, tmp_path / "raw")

