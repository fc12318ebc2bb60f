"""Models by name: fetched once from a pinned URL (here a loopback HTTP server, no network), checked
against the pinned SHA-256, then used from the cache; clear one-line failures otherwise."""

import hashlib
import threading
from argparse import Namespace
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cryoves.cluster import cli
from cryoves.engine.errors import CryovesError
from cryoves.engine.io.checksum import file_sha256
from cryoves.engine.network import catalog
from cryoves.engine.network.model import bundled_model_dir

CONTENT = b"not really a model, but it has a checksum\n"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path):
    """A folder served over HTTP on 127.0.0.1; yields (folder, base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def dummy(served, tmp_path, monkeypatch):
    """A published model `dummy` served from the loopback server, cached under tmp_path."""
    folder, url = served
    (folder / "dummy.h5").write_bytes(CONTENT)
    model = catalog.PublishedModel(name="dummy", url=f"{url}/dummy.h5", sha256=hashlib.sha256(CONTENT).hexdigest(),
                                   file_name="dummy.h5", licence="CC0 (test)", description="a test file")
    monkeypatch.setitem(catalog.CATALOG, "dummy", model)
    monkeypatch.setenv(catalog.CACHE_ENV, str(tmp_path / "cache"))
    return model


def test_bundled_and_paths_resolve_without_fetching(tmp_path):
    assert catalog.resolve_weights(None) is None
    assert catalog.resolve_weights("bundled") is None
    weights = tmp_path / "weights.h5"
    weights.write_bytes(b"x")
    assert catalog.resolve_weights(str(weights)) == weights
    with pytest.raises(CryovesError, match="no such file or folder, and not a model name"):
        catalog.resolve_weights(str(tmp_path / "absent.h5"))


def test_fetched_on_first_use_then_from_the_cache(dummy, served, tmp_path):
    fetched = []
    path = catalog.resolve_weights("dummy", on_fetch=fetched.append)
    assert path == tmp_path / "cache" / "models" / "dummy" / "dummy.h5" == catalog.cached_path("dummy")
    assert path.read_bytes() == CONTENT and fetched == [dummy]
    (served[0] / "dummy.h5").unlink()  # the source is gone: the cache must serve
    assert catalog.resolve_weights("dummy", on_fetch=fetched.append) == path
    assert fetched == [dummy] and catalog.is_cached("dummy")


def test_a_changed_upstream_file_is_refused(dummy, served):
    (served[0] / "dummy.h5").write_bytes(b"something else")
    with pytest.raises(CryovesError, match="is not the pinned one"):
        catalog.fetch("dummy")
    assert not catalog.cached_path("dummy").exists()


def test_offline_failure_says_how_to_fetch_and_where_to_put_the_file(dummy, monkeypatch):
    unreachable = catalog.PublishedModel(**{**dummy.__dict__, "url": "http://127.0.0.1:9/dummy.h5"})
    monkeypatch.setitem(catalog.CATALOG, "dummy", unreachable)
    with pytest.raises(CryovesError) as error:
        catalog.resolve_weights("dummy")
    message = str(error.value)
    assert "cryoves models fetch dummy" in message and str(catalog.cached_path("dummy")) in message
    assert "\n" not in message


def test_a_file_put_in_the_cache_by_hand_is_used(dummy, monkeypatch):
    catalog.cached_path("dummy").parent.mkdir(parents=True)
    catalog.cached_path("dummy").write_bytes(CONTENT)
    monkeypatch.setitem(catalog.CATALOG, "dummy", catalog.PublishedModel(**{**dummy.__dict__, "url": "http://127.0.0.1:9/x"}))
    assert catalog.resolve_weights("dummy") == catalog.cached_path("dummy")


def test_pinned_checksum_is_that_of_cryovesnets_weights(cryovesnet_weights):
    assert file_sha256(cryovesnet_weights) == catalog.CATALOG["cryovesnet"].sha256


def test_cli_models_lists_and_fetches(dummy, capsys):
    assert cli.main(["models"]) == 0
    listing = capsys.readouterr().out
    assert "bundled" in listing and "cryovesnet" in listing and "dummy        not cached" in listing
    assert cli.main(["models", "fetch", "dummy"]) == 0
    captured = capsys.readouterr()
    assert "licence CC0 (test)" in captured.err and str(catalog.cached_path("dummy")) in captured.out
    assert cli.main(["models"]) == 0
    assert "dummy        cached" in capsys.readouterr().out
    assert cli.main(["models", "fetch", "nonesuch"]) == 2


def test_cli_weights_by_name_fail_in_one_line_when_offline(dummy, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(catalog.CATALOG, "dummy", catalog.PublishedModel(**{**dummy.__dict__, "url": "http://127.0.0.1:9/x"}))
    assert cli.main(["segment", str(tmp_path / "tomo.mrc"), "--out", str(tmp_path), "--weights", "dummy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cryoves: error: model 'dummy' is not cached") and "cryoves models fetch dummy" in err[-1]


def test_cli_resolves_weights_and_init_weights(dummy):
    args = Namespace(weights="dummy", init_weights="bundled")
    cli._resolve_weights(args)
    assert args.weights == str(catalog.cached_path("dummy"))
    assert Path(args.init_weights) == bundled_model_dir()
    args = Namespace(weights="bundled")
    cli._resolve_weights(args)
    assert args.weights is None
