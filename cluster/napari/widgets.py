"""napari widgets: segment the open tomogram as `cryoves segment` does, off the GUI thread, and save the
vesicles corrected by hand in a Points layer back into every output (`engine.io.corrections`)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, ProgressBar, PushButton
from napari.layers import Image, Layer, Points
from napari.layers.base import ActionType
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal

from cryoves.cluster.napari.reader import ADDED_FEATURES, LAYER_KEY, TOMOGRAM_SUFFIXES, tomogram_layers, vesicle_points
from cryoves.engine.errors import CryovesError
from cryoves.engine.io.corrections import NEW_VESICLE, apply_corrections
from cryoves.engine.io.mrc import read_volume
from cryoves.engine.io.outputs import tomogram_name
from cryoves.engine.io.tables import ACTIVE_OUTCOMES, read_metadata
from cryoves.engine.job import STEPS, Job, OutputOptions, Settings, prepare, segment_job, segment_params
from cryoves.engine.network.catalog import BUNDLED, CATALOG, resolve_weights
from cryoves.engine.network.model import load_logit_fn, weights_sha256

OTHER_MODEL = "file..."
"""Model choice for weights from a file: CryoVesNet's weights.h5 or the weights.npz of a cryoves model folder."""
OUTPUT_FOLDER = "cryoves"
"""Default output folder, beside the tomogram."""


@dataclass(frozen=True, kw_only=True)
class SegmentRequest:
    """What the segment widget asks for: `cryoves segment PATH --out OUT_DIR` with these options."""

    path: Path
    out_dir: Path
    weights: str = BUNDLED                 # a model name or a path, as --weights takes it
    tta: int = 1
    invert_contrast: bool = False
    prefilter_sigma_vox: float | None = None  # None: the model's own
    device: str = "cpu"


def segment_file(request: SegmentRequest, progress) -> bool:
    """Segment one tomogram with the engine calls of `cryoves segment` (probability map written too);
    `progress(text)` hears each step. True when the outputs were already current and nothing was done."""
    weights = resolve_weights(request.weights, on_fetch=lambda model: progress(
        f"fetching {model.name}; licence {model.licence}"))
    params = segment_params(weights, tta=request.tta, prefilter_sigma_vox=request.prefilter_sigma_vox,
                            invert_contrast=request.invert_contrast)
    settings = Settings(params=params, weights_sha256=weights_sha256(weights),
                        outputs=OutputOptions(probability=True))
    progress("prepare")
    prepared = prepare(Job(path=request.path), settings, request.out_dir)
    if prepared.done:
        return True
    logit_fn = load_logit_fn(weights, request.device, params.inference.precision)
    segment_job(prepared, logit_fn, settings, request.out_dir, progress)
    return False


def tomogram_path(layer: Layer) -> Path | None:
    """The MRC file an image layer shows: as the cryoves reader recorded it, or the file napari opened."""
    recorded = layer.metadata.get(LAYER_KEY, {}).get("path")
    path = Path(recorded) if recorded else (Path(layer.source.path) if layer.source.path else None)
    return path if path is not None and path.suffix.lower() in TOMOGRAM_SUFFIXES else None


def cryoves_layers(viewer, out_dir, name: str, kind: str | None = None) -> list[Layer]:
    """The layers that show tomogram `name` of `out_dir` (only those of `kind`, if given)."""
    found = []
    for layer in viewer.layers:
        about = layer.metadata.get(LAYER_KEY, {})
        if about.get("out_dir") == str(out_dir) and about.get("name") == name and kind in (None, about.get("kind")):
            found.append(layer)
    return found


def prepare_for_editing(viewer, points: Points) -> None:
    """Slice thick enough (the largest radius each side) that every vesicle shows as its cross-section, give a
    vesicle added by hand the median diameter of the kept ones, and mark points added from now on as added."""
    sizes = np.asarray(points.size, dtype=np.float64)
    reach_nm = float(sizes.max(initial=0.0)) / 2.0 * float(np.max(points.scale))
    viewer.dims.margin_left = viewer.dims.margin_right = (reach_nm,) * viewer.dims.ndim
    kept = np.isin(points.features["outcome"].to_numpy(dtype=object), ACTIVE_OUTCOMES)
    if kept.any():
        points.selected_data = set()  # current_size also resizes the selected points
        points.current_size = float(np.median(sizes[kept]))
    points.events.data.connect(mark_added)


def mark_added(event) -> None:
    """On points added to a vesicles layer: make them new vesicles (napari gives a new point the features of
    the point selected last, which would make it a copy of that vesicle)."""
    if event.action != ActionType.ADDED:
        return
    points = event.source
    rows = np.asarray(event.data_indices, dtype=np.int64) % len(points.data)
    for column, value in ADDED_FEATURES.items():
        points.features.loc[rows, column] = value
    points.refresh_colors(update_color_mapping=False)


def correction_ids(points: Points) -> tuple[np.ndarray, np.ndarray]:
    """(rows, vesicle ids) of the points that are to be kept: not removed; a point added by hand, or a copy
    of another (pasted points keep the features they were copied with), has id `NEW_VESICLE`."""
    outcome = points.features["outcome"].to_numpy(dtype=object)
    ids = points.features["vesicle_id"].to_numpy().astype(np.int64)
    copy = np.ones(len(ids), dtype=bool)
    copy[np.unique(ids, return_index=True)[1]] = False  # the first of equal ids is the original: copies come after
    rows = np.flatnonzero(outcome != "removed")
    return rows, np.where((outcome == "added") | copy, NEW_VESICLE, ids)[rows]


class _Relay(QObject):
    """Carries text from a worker thread to the GUI thread (a queued Qt signal)."""

    text = Signal(str)


class SegmentWidget(Container):
    """Run `cryoves segment` on an open tomogram and add its probability, labels and vesicles as layers."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self._viewer = napari_viewer
        self.tomogram = ComboBox(label="tomogram", choices=self._tomograms)
        self.model = ComboBox(label="model", choices=[BUNDLED, *CATALOG, OTHER_MODEL], value=BUNDLED)
        self.weights = FileEdit(label="weights", mode="r", filter="*.h5 *.npz", visible=False)
        self.tta = ComboBox(label="test-time aug.", choices=[1, 4, 8], value=1)
        self.invert_contrast = CheckBox(text="bright membranes (invert contrast)")
        self.model_prefilter = CheckBox(text="the model's own pre-filter", value=True)
        self.prefilter_sigma = FloatSpinBox(label="pre-filter σ (vox)", min=0.0, max=10.0, step=0.25, value=1.0,
                                            enabled=False)
        self.device = ComboBox(label="device", choices=["cpu", "gpu"], value="cpu")
        self.out_dir = FileEdit(label="output folder", mode="d")
        self.run_button = PushButton(text="Segment")
        self.progress = ProgressBar(label="progress", min=0, max=len(STEPS), value=0)
        self.status = Label(value="")
        self.extend([self.tomogram, self.model, self.weights, self.tta, self.invert_contrast, self.model_prefilter,
                     self.prefilter_sigma, self.device, self.out_dir, self.run_button, self.progress, self.status])
        self.model.changed.connect(lambda choice: setattr(self.weights, "visible", choice == OTHER_MODEL))
        self.model_prefilter.changed.connect(lambda own: setattr(self.prefilter_sigma, "enabled", not own))
        self.tomogram.changed.connect(self._default_out_dir)
        self.run_button.clicked.connect(self.run)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self.reset_choices)
        self._relay = _Relay()
        self._relay.text.connect(self._on_progress)
        self.worker = None
        self._default_out_dir(self.tomogram.value)

    def _tomograms(self, _widget=None) -> list[tuple[str, Image]]:
        return [(layer.name, layer) for layer in self._viewer.layers
                if isinstance(layer, Image) and tomogram_path(layer) is not None]

    def _default_out_dir(self, layer) -> None:
        if layer is not None:
            self.out_dir.value = tomogram_path(layer).parent / OUTPUT_FOLDER

    def request(self) -> SegmentRequest:
        """The request the widget's fields make."""
        layer = self.tomogram.value
        if layer is None:
            raise CryovesError("no tomogram: open an MRC file (File > Open) and choose it")
        weights = self.model.value
        if weights == OTHER_MODEL:
            chosen = Path(self.weights.value)
            weights = str(chosen.parent if chosen.suffix == ".npz" else chosen)  # a model folder holds weights.npz
        return SegmentRequest(path=tomogram_path(layer), out_dir=Path(self.out_dir.value), weights=weights,
                              tta=int(self.tta.value), invert_contrast=self.invert_contrast.value,
                              prefilter_sigma_vox=None if self.model_prefilter.value else self.prefilter_sigma.value,
                              device=self.device.value)

    def run(self) -> None:
        """Segment the chosen tomogram in a worker thread; the result layers are added when it returns."""
        try:
            request = self.request()
        except CryovesError as error:
            self._fail(error)
            return
        layer = self.tomogram.value
        self.run_button.enabled = False
        self.progress.value = 0
        self.worker = thread_worker(segment_file)(request, self._relay.text.emit)
        self.worker.returned.connect(lambda done_before: self._add_results(request, layer, done_before))
        self.worker.errored.connect(self._fail)
        self.worker.finished.connect(lambda: setattr(self.run_button, "enabled", True))
        self.worker.start()

    def _on_progress(self, text: str) -> None:
        if text in STEPS:
            self.progress.value = STEPS.index(text)
        self.status.value = text

    def _fail(self, error: Exception) -> None:
        self.status.value = f"failed: {error}"
        if not isinstance(error, CryovesError):
            raise error
        show_error(str(error))

    def _add_results(self, request: SegmentRequest, source: Image, done_before: bool) -> None:
        out_dir, name = request.out_dir.resolve(), tomogram_name(request.path)
        for old in cryoves_layers(self._viewer, out_dir, name):
            self._viewer.layers.remove(old)
        for data, kwargs, kind in tomogram_layers(out_dir, name, tomogram=False):
            kwargs |= {"scale": source.scale, "translate": source.translate, "units": source.units}
            self._viewer.add_layer(Layer.create(data, kwargs, kind))
        prepare_for_editing(self._viewer, cryoves_layers(self._viewer, out_dir, name, "vesicles")[0])
        self.progress.value = self.progress.max
        self.status.value = (f"{name}: outputs already current in {out_dir}; loaded them" if done_before
                             else f"{name}: segmented into {out_dir}")


class CorrectionWidget(Container):
    """Save the vesicles of a cryoves Points layer, as deleted, added and moved by hand, into every output."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self._viewer = napari_viewer
        self.vesicles = ComboBox(label="vesicles", choices=self._vesicle_layers)
        self.save_button = PushButton(text="Save corrections")
        self.status = Label(value="")
        self.extend([self.vesicles, Label(value="delete, add or drag vesicles (points), then save;\n"
                                                "removed ones (red) are shown, not edited"),
                     self.save_button, self.status])
        self.vesicles.changed.connect(self._chosen)
        self.save_button.clicked.connect(self.save)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self.reset_choices)
        napari_viewer.layers.events.inserted.connect(self._watch)
        for _, layer in self._vesicle_layers():
            layer.events.data.connect(mark_added)
        self._chosen(self.vesicles.value)

    def _vesicle_layers(self, _widget=None) -> list[tuple[str, Points]]:
        return [(layer.name, layer) for layer in self._viewer.layers if _is_vesicles(layer)]

    def _watch(self, event) -> None:
        if _is_vesicles(event.value):
            event.value.events.data.connect(mark_added)

    def _chosen(self, layer) -> None:
        if layer is not None:
            prepare_for_editing(self._viewer, layer)

    def save(self) -> None:
        """Save the chosen layer's kept, repaired and added points (centre and size) into the outputs,
        then show the outputs as saved: vesicles renumbered, labels drawn anew."""
        layer = self.vesicles.value
        if layer is None:
            self.status.value = "no cryoves vesicles layer: open an output folder first"
            return
        about = layer.metadata[LAYER_KEY]
        rows, ids = correction_ids(layer)
        try:
            result = apply_corrections(about["out_dir"], about["name"], ids, np.asarray(layer.data)[rows],
                                       np.asarray(layer.size, dtype=np.float64)[rows] / 2.0, tool="napari")
        except CryovesError as error:
            self.status.value = f"not saved: {error}"
            show_error(str(error))
            return
        self._reload(layer, Path(about["out_dir"]), about["name"])
        self.status.value = (f"saved {about['name']}: {result.added} added, {result.deleted} deleted, "
                             f"{result.edited} moved or resized; {result.n_vesicles} vesicles")

    def _reload(self, layer: Points, out_dir: Path, name: str) -> None:
        table_path = out_dir / "vesicles" / f"{name}.parquet"
        voxel_size_a = float(read_metadata(table_path)["voxel_size_a"])
        points, kwargs = vesicle_points(pq.read_table(table_path), voxel_size_a)
        layer.selected_data = set()
        layer.data = points
        layer.features = kwargs["features"]
        layer.size = kwargs["size"]
        layer.refresh_colors(update_color_mapping=False)
        for labels in cryoves_layers(self._viewer, out_dir, name, "labels"):
            labels.data = read_volume(out_dir / f"{name}.labels.mrc", voxel_size_a).data
        prepare_for_editing(self._viewer, layer)


def _is_vesicles(layer) -> bool:
    return isinstance(layer, Points) and layer.metadata.get(LAYER_KEY, {}).get("kind") == "vesicles"
