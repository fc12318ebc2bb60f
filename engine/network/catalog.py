"""Models by name: `--weights bundled|cryovesnet|PATH`.

`bundled` is the model inside the package. Published models (`CATALOG`) are fetched on first use with
pooch from a pinned URL, checked against a pinned SHA-256 and kept in the user's cache folder
(`cache_dir()`: $CRYOVES_CACHE_DIR, else pooch's per-user cache), so an offline cluster node works
once `cryoves models fetch NAME` has run where the network is, or once the file is put where
`cached_path(NAME)` says. Anything else is taken as a path, as before.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryoves.engine.errors import CryovesError
from cryoves.engine.io.checksum import file_sha256

BUNDLED = "bundled"
CACHE_ENV = "CRYOVES_CACHE_DIR"


@dataclass(frozen=True)
class PublishedModel:
    """A model file published by others, fetched on first use."""

    name: str
    url: str
    sha256: str
    file_name: str
    licence: str
    description: str


CATALOG = {
    "cryovesnet": PublishedModel(
        name="cryovesnet",
        url="https://github.com/Zuber-group/CryoVesNet/raw/main/cryovesnet/weights/weights.h5",
        sha256="495748b7ad5daaa0f8895b49497798a9331a70ce84b3a227c7e387a930f15f37",
        file_name="weights.h5",
        licence="GPL-3.0 (CryoVesNet, Zuber group, University of Bern; https://github.com/Zuber-group/CryoVesNet); "
                "not distributed with cryoves",
        description="CryoVesNet's published U-Net (weights.h5, Keras 2.9, June 2024), trained on real "
                    "synaptosome tomograms",
    ),
}
"""Published models by name; the SHA-256 pins the exact file (a changed upstream file is refused)."""


def cache_dir() -> Path:
    """Where fetched models live: $CRYOVES_CACHE_DIR/models, else the user's cache folder (pooch.os_cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "models"
    import pooch

    return Path(pooch.os_cache("cryoves")) / "models"


def cached_path(name: str) -> Path:
    """Where model `name` is (or would be) cached."""
    model = _published(name)
    return cache_dir() / model.name / model.file_name


def is_cached(name: str) -> bool:
    """True when model `name` is in the cache with its pinned checksum."""
    path = cached_path(name)
    return path.is_file() and file_sha256(path) == CATALOG[name].sha256


def fetch(name: str, *, progressbar: bool = False) -> Path:
    """Download model `name` into the cache (unless it is there), checked against its SHA-256; returns its path."""
    import pooch
    import requests

    model, path = _published(name), cached_path(name)
    try:
        fetched = pooch.retrieve(model.url, known_hash=f"sha256:{model.sha256}", fname=model.file_name,
                                 path=path.parent, progressbar=progressbar)
    except requests.RequestException as error:
        raise CryovesError(
            f"model {name!r} is not cached and could not be downloaded from {model.url} ({type(error).__name__}); "
            f"run `cryoves models fetch {name}` where there is network (with {CACHE_ENV} on a shared folder for "
            f"cluster nodes), or put {model.file_name} at {path}, or pass --weights PATH"
        ) from None
    except ValueError as error:  # pooch: the downloaded file's hash differs from the pinned one
        raise CryovesError(f"model {name!r}: the file at {model.url} is not the pinned one ({error}); "
                           f"download it yourself and pass --weights PATH") from None
    return Path(fetched)


def resolve_weights(name_or_path: str | None, *, on_fetch: Callable[[PublishedModel], None] | None = None,
                    progressbar: bool = False) -> Path | None:
    """The weights a `--weights` value names: None for the bundled model (also when no value is given),
    the cached file of a published model (fetched first if needed; `on_fetch` is told before a download),
    or an existing file or folder. Names win over paths: write ./cryovesnet for a folder of that name."""
    if name_or_path is None or name_or_path == BUNDLED:
        return None
    if name_or_path in CATALOG:
        if is_cached(name_or_path):
            return cached_path(name_or_path)
        if on_fetch is not None:
            on_fetch(CATALOG[name_or_path])
        return fetch(name_or_path, progressbar=progressbar)
    path = Path(name_or_path)
    if not path.exists():
        raise CryovesError(f"{name_or_path}: no such file or folder, and not a model name "
                           f"({', '.join([BUNDLED, *CATALOG])}); see `cryoves models`")
    return path


def _published(name: str) -> PublishedModel:
    if name not in CATALOG:
        raise CryovesError(f"{name!r} is not a published model; known: {', '.join(CATALOG)} (see `cryoves models`)")
    return CATALOG[name]
