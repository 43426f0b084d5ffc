"""`alexnet fetch-weights`: published files downloaded once, atomically, checked against the hash
prefix in their names. Served from 127.0.0.1 only: tests never download."""
from __future__ import annotations

import functools
import hashlib
import http.server
import io
import threading
import zipfile
from dataclasses import replace

import pytest

from common import zoo
from common.cli import main
from common.weights import WeightsError
from tests.conftest import get_backend

CONTENT = b"not really AlexNet, but bytes whose digest the name must vouch for" * 1000


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; /short/<name> promises more bytes than it sends (a cut connection)."""

    requests: list[str]

    def do_GET(self):
        self.requests.append(self.path)
        if self.path.startswith("/short/"):
            self.send_response(200)
            self.send_header("Content-Length", str(len(CONTENT) * 2))
            self.end_headers()
            self.wfile.write(CONTENT)
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (base URL, folder, request log)."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []
    handler = functools.partial(type("Handler", (_Handler,), {"requests": requests}), directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", root, requests
    finally:
        httpd.shutdown()
        httpd.server_close()


def _named(algorithm: str, stem: str, suffix: str, content: bytes = CONTENT) -> str:
    return f"{stem}-{hashlib.new(algorithm, content).hexdigest()[:8]}{suffix}"


def _torchvision_like(base: str, content: bytes = CONTENT) -> zoo.Published:
    name = _named("sha256", "alexnet-owt", ".pth", content)
    return replace(zoo.PUBLISHED["torchvision"], url=f"{base}/{name}", file_name=name)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_file_is_fetched_once_and_checked(server, tmp_path):
    base, www, requests = server
    source = _torchvision_like(base)
    (www / source.file_name).write_bytes(CONTENT)
    cache = tmp_path / "cache"
    path = zoo.fetch_weights(source, cache, progress=False)
    assert path == cache / source.file_name and path.read_bytes() == CONTENT
    assert zoo.fetch_weights(source, cache, progress=False) == path
    assert requests == [f"/{source.file_name}"]  # the second call used the cache
    path.write_bytes(CONTENT[:-1] + b"!")  # a damaged cached file fails its hash: fetched again
    assert zoo.fetch_weights(source, cache, progress=False).read_bytes() == CONTENT
    assert len(requests) == 2 and _leftovers(cache) == [source.file_name]


def test_content_that_does_not_match_the_name_is_refused_and_nothing_is_kept(server, tmp_path):
    base, www, _ = server
    source = _torchvision_like(base)
    (www / source.file_name).write_bytes(CONTENT + b"tampered")
    with pytest.raises(WeightsError, match=rf"SHA256 [0-9a-f]{{64}} does not start with {source.hash_prefix}, "
                                           rf"the hash in the name {source.file_name}; refused, nothing was saved"):
        zoo.fetch_weights(source, tmp_path / "cache", progress=False)
    assert _leftovers(tmp_path / "cache") == []


def test_a_cut_connection_and_a_missing_file_are_errors_naming_the_url(server, tmp_path):
    base, _, _ = server
    source = _torchvision_like(base)
    with pytest.raises(WeightsError, match=rf"could not download {base}/short/x: .*after {len(CONTENT)} of"):
        zoo.fetch_weights(source, tmp_path / "cache", url=f"{base}/short/x", progress=False)
    with pytest.raises(WeightsError, match=rf"could not download {source.url}: HTTP 404"):
        zoo.fetch_weights(source, tmp_path / "cache", progress=False)
    assert _leftovers(tmp_path / "cache") == []


def test_gluons_zip_is_unpacked_to_its_params_file_and_checked_by_sha1(server, tmp_path):
    base, www, _ = server
    name = _named("sha1", "alexnet", ".params")
    source = replace(zoo.PUBLISHED["gluon"], url=f"{base}/{name[:-7]}.zip", file_name=name, member=name)
    bundle = io.BytesIO()
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.writestr(name, CONTENT)
        archive.writestr("../../escape.params", b"never unpacked")
    (www / f"{name[:-7]}.zip").write_bytes(bundle.getvalue())
    path = zoo.fetch_weights(source, tmp_path / "cache", progress=False)
    assert path.read_bytes() == CONTENT and _leftovers(tmp_path / "cache") == [name]
    assert not (tmp_path / "escape.params").exists()
    wrong_member = replace(source, member="other.params", file_name=_named("sha1", "other", ".params"))
    with pytest.raises(WeightsError, match=r"the archive holds no other.params"):
        zoo.fetch_weights(wrong_member, tmp_path / "cache2", progress=False)


def test_the_published_records_are_the_peers_own(capsys):
    """torchvision's URL ends in the cached name; Gluon's is what mxnet's model_store builds."""
    torchvision = zoo.PUBLISHED["torchvision"]
    assert torchvision.url.rsplit("/", 1)[1] == torchvision.file_name and torchvision.hash_prefix == "7be5be79"
    assert torchvision.format is zoo.TORCHVISION and torchvision.algorithm == "sha256"
    gluon = zoo.PUBLISHED["gluon"]
    assert gluon.format is zoo.GLUON and gluon.algorithm == "sha1"
    get_backend("mx")  # MXNet through its backend: the numpy shim first
    from mxnet.gluon.model_zoo import model_store

    name = f"alexnet-{model_store.short_hash('alexnet')}"
    assert gluon.url == model_store._url_format.format(repo_url=model_store.apache_repo_url, file_name=name)
    assert gluon.file_name == gluon.member == name + ".params" and gluon.hash_prefix == name[-8:]


def test_cli_fetch_weights_says_where_the_file_is_and_refuses_a_bad_one(server, tmp_path, monkeypatch, capsys):
    base, www, _ = server
    source = _torchvision_like(base)
    (www / source.file_name).write_bytes(CONTENT)
    monkeypatch.setitem(zoo.PUBLISHED, "torchvision", source)
    assert main(["fetch-weights", "torchvision", "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "c" / source.file_name) in out and f"SHA256 starts with {source.hash_prefix}" in out
    monkeypatch.setitem(zoo.PUBLISHED, "torchvision", replace(source, file_name="alexnet-owt-00000000.pth"))
    assert main(["fetch-weights", "torchvision", "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not start with 00000000" in err and "Traceback" not in err
    assert not (tmp_path / "c" / "alexnet-owt-00000000.pth").exists()
