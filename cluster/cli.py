"""The `cryoves` command line: one subcommand per job, heavy imports inside the command bodies.

Exit codes: 0 done; 2 for what the user can fix (usage errors and every CryovesError, one line);
1 for anything else (a bug; the traceback is shown with --verbose); 130 interrupted; 141 (128 + SIGPIPE)
quietly, when the output pipe closes early (`cryoves info *.mrc | head`).
"""

import argparse
import atexit
import json
import logging
import os
import sys
from pathlib import Path

from cryoves.engine.errors import CryovesError

log = logging.getLogger("cryoves")
EXIT_CLOSED_PIPE = 128 + 13  # as a tool killed by SIGPIPE


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive_float(text: str) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _add_voxel_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--voxel-size", type=_positive_float, metavar="Å",
                        help="voxel size in Å; overrides the MRC header (use when the header is wrong or unset)")


def cmd_info(args: argparse.Namespace) -> int:
    from cryoves.engine.io.mrc import inspect_volume

    refused = 0
    for path in args.files:
        facts = inspect_volume(path, args.voxel_size)
        print(facts["file"])
        for key in ("shape", "dtype", "voxel_size_a", "origin_a", "value_range"):
            if key in facts:
                print(f"  {key:13s} {_format(facts[key])}")
        print(f"  {'verdict':13s} {facts['verdict']}")
        refused += facts["verdict"] != "ok"
    if refused:
        raise CryovesError(f"{refused} of {len(args.files)} files refused (see the verdicts above)")
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cryoves.engine.synthetic.phantom import PRESETS, make_phantom, write_phantom
    from cryoves.engine.synthetic.tiltseries import TiltSeriesImaging

    if args.preset not in PRESETS:
        raise CryovesError(f"--preset {args.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    if any(n < 16 for n in args.shape):
        raise CryovesError(f"--shape {' '.join(map(str, args.shape))}: each axis needs at least 16 voxels")
    acquisition = {"tilt_step_deg": args.tilt_step, "dose_e_per_a2": args.dose, "denoised": args.denoised or None}
    acquisition = {key: value for key, value in acquisition.items() if value is not None}
    if acquisition and args.imaging != "tilt-series":
        raise CryovesError("--tilt-step, --dose and --denoised need --imaging tilt-series")
    preset = args.preset if args.tilt_max is None else replace(PRESETS[args.preset], tilt_max_deg=args.tilt_max)
    imaging = TiltSeriesImaging(**acquisition) if args.imaging == "tilt-series" else args.imaging
    phantom = make_phantom(tuple(args.shape), args.voxel_size, seed=args.seed, preset=preset, imaging=imaging)
    paths = write_phantom(args.out_dir, phantom, name=args.name)
    print(f"{phantom.vesicles.num_rows} vesicles, shape {tuple(args.shape)}, voxel size {args.voxel_size:g} Å, "
          f"{args.imaging} imaging")
    for kind, path in paths.items():
        print(f"  {kind:9s} {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cryoves.engine.io.atomic import atomic_output
    from cryoves.engine.io.mrc import read_volume
    from cryoves.engine.scoring.evaluate import METRICS_LEGEND, evaluate, format_metrics, load_spheres

    if len(args.files) < 2:
        raise CryovesError("evaluate needs at least one prediction and the ground truth: cryoves evaluate PRED... GT")
    *predictions, truth_path = args.files
    truth = load_spheres(truth_path, args.voxel_size)
    probability = None
    if args.probability:
        probability = read_volume(args.probability, args.voxel_size).data
    rows = []
    for path in predictions:
        row = {"prediction": str(path), "ground_truth": str(truth_path)}
        row |= evaluate(load_spheres(path, args.voxel_size), truth, probability)
        rows.append(row)
    if args.json:  # NaN (e.g. precision without predictions) is not JSON: null
        print(json.dumps([{k: None if v != v else v for k, v in row.items()} for row in rows], indent=1))
    else:
        print(format_metrics(rows))
        print(METRICS_LEGEND)
    table = pa.Table.from_pylist(rows)
    out = Path(args.out)
    if out.exists():
        table = pa.concat_tables([pq.read_table(out), table], promote_options="permissive")
    with atomic_output(out) as tmp:
        pq.write_table(table, tmp)
    print(f"metrics appended to {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    import numpy as np
    from tqdm import tqdm

    from cryoves.engine.io.mrc import read_volume
    from cryoves.engine.network.train import (
        SYNTHETIC_FIELD_NM,
        Randomisation,
        TrainParams,
        paired_files,
        prepare_pair,
        synthetic_pairs,
        train,
    )

    params = TrainParams(epochs=args.epochs, seed=args.seed, patches_per_tomogram=args.patches_per_tomogram)
    pairs, sources = [], []
    for folder in args.data or []:
        for image_path, label_path in paired_files(folder):
            image, labels = read_volume(image_path), read_volume(label_path)
            if abs(image.voxel_size_a - labels.voxel_size_a) > 1e-3 * image.voxel_size_a:
                raise CryovesError(f"{label_path}: voxel size {labels.voxel_size_a:g} Å differs from "
                                   f"{image_path} ({image.voxel_size_a:g} Å)")
            pairs.append(prepare_pair(np.asarray(image.data, np.float32), np.asarray(labels.data),
                                      image.voxel_size_a, str(image_path)))
            sources.append(str(image_path))
    if args.synthetic:
        with tqdm(total=args.synthetic, desc="synthetic tomograms", disable=None) as bar:
            pairs += synthetic_pairs(args.synthetic, args.seed, progress=lambda i, n: bar.update(1))
    if not pairs:
        raise CryovesError("no training data: pass --data DIR (TOMO.mrc beside TOMO.labels.mrc) or --synthetic N")
    description = {"folders": [str(d) for d in args.data or []], "files": sources, "synthetic": args.synthetic,
                   "command": "cryoves " + " ".join(args.argv), "init_weights": str(args.init_weights or "")}
    if args.synthetic:
        description["synthetic_recipe"] = {
            "family": "fft imaging (engine/synthetic/imaging.py); the tilt-series family is validation only",
            "presets": "cycled in sorted order", "field_nm": SYNTHETIC_FIELD_NM,
            "seeds": f"{(args.seed + 1) * 10_000}-{(args.seed + 1) * 10_000 + args.synthetic - 1}",
            "randomisation": asdict(Randomisation())}
    with tqdm(total=params.epochs, desc="epochs", disable=None) as bar:
        def progress(epoch: int, row: dict) -> None:
            bar.n = epoch
            bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch"})
            bar.refresh()
        config = train(pairs, params, args.out, init_weights=args.init_weights, description=description,
                       progress=progress)
    print(f"best epoch {config['best_epoch']} of {params.epochs}, loss {config['best_loss']:.4f}; model in {args.out}")
    return 0


def _segment_params(args: argparse.Namespace):
    from cryoves.engine.job import segment_params
    from cryoves.engine.network.model import check_device_precision

    check_device_precision(args.device, args.precision)
    return segment_params(args.weights, tta=args.tta, prefilter_sigma_vox=args.prefilter_sigma,
                          memory_gb=args.memory_gb, precision=None if args.precision == "auto" else args.precision,
                          invert_contrast=args.invert_contrast)


def _settings(args: argparse.Namespace):
    """What `segment`, `run` and `demo` share: parameters, weights checksum, voxel size and outputs."""
    from cryoves.engine.job import OutputOptions, Settings
    from cryoves.engine.network.model import weights_sha256

    outputs = OutputOptions(probability=args.probability, stages=args.stages, pyto=args.pyto,
                            active_zone=args.active_zone and Path(args.active_zone), report=not args.no_report)
    return Settings(params=_segment_params(args), weights_sha256=weights_sha256(args.weights),
                    voxel_size_a=args.voxel_size, outputs=outputs, force=args.force)


def _summary(name: str, finished) -> str:
    """One line per segmented tomogram: vesicles, threshold and seconds per step."""
    return (f"{name}: {finished.n_vesicles} vesicles, threshold {finished.threshold:.3f}; "
            + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in finished.seconds.items()))


def _stage_bar(name: str, stages):
    """A progress bar over the stages of one tomogram, and the callback that advances it."""
    from tqdm import tqdm

    bar = tqdm(total=len(stages), desc=name, unit="stage", disable=None)

    def progress(stage: str) -> None:
        bar.n = stages.index(stage)
        bar.set_postfix_str(stage)
        bar.refresh()

    return bar, progress


def cmd_segment(args: argparse.Namespace) -> int:
    from cryoves.engine.warmup import import_in_background, start_kernel_warmup

    start_kernel_warmup()  # on a first run, compiles beside the imports, TensorFlow's start and the network

    from cryoves.engine.job import STEPS, make_jobs, prepare, segment_job
    from cryoves.engine.network.model import load_logit_fn

    settings = _settings(args)
    prepared = [prepare(job, settings, args.out) for job in make_jobs(args.tomograms, args.region, args.truth)]
    for item in (p for p in prepared if p.done):
        print(f"{item.name}: outputs complete for this input and these parameters; skipped (--force redoes it)")
    todo = [p for p in prepared if not p.done]
    if not todo:
        return 0
    logit_fn = load_logit_fn(args.weights, args.device, settings.params.inference.precision)
    import_in_background()
    for item in todo:
        bar, progress = _stage_bar(item.name, STEPS[1:])
        with bar:
            finished = segment_job(item, logit_fn, settings, args.out, progress)
            bar.n = bar.total
        print(_summary(item.name, finished))
        for kind, path in finished.paths.items():
            print(f"  {kind:11s} {path}")
    _write_index(args)
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    import time

    from cryoves import kernels
    from cryoves.engine.warmup import PARTS, start_kernel_warmup, warm_kernels, warm_marker

    start = time.perf_counter()
    if any(warm_marker(part) is None for part in PARTS):  # Numba's cache folder is not ours to know
        warm_kernels()
        print(f"kernels compiled in this process in {time.perf_counter() - start:.1f} s (Numba's cache folder "
              "is set by your Numba configuration)")
        return 0
    warmup = start_kernel_warmup()
    if not warmup.processes:
        print(f"kernels already compiled for this machine in {kernels.cache_dir()}")
        return 0
    failed = warmup.join()
    if failed:
        raise CryovesError(f"compiling the kernels failed ({', '.join(failed)}); run "
                           f"'python -m cryoves.engine.warmup {failed[0]}' to see why")
    print(f"kernels compiled in {time.perf_counter() - start:.1f} s into {kernels.cache_dir()}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from cryoves.engine.io.mrc import read_volume, write_volume
    from cryoves.engine.io.outputs import tomogram_name
    from cryoves.engine.network.inference import predict_probability, probability_on_input_grid
    from cryoves.engine.network.model import load_logit_fn
    from cryoves.engine.pipeline import oriented

    segment_params = _segment_params(args)
    params = segment_params.inference
    volume = read_volume(args.tomogram, args.voxel_size)
    start = time.perf_counter()
    logit_fn = load_logit_fn(args.weights, args.device, params.precision)
    loaded = time.perf_counter()
    from tqdm import tqdm

    with tqdm(desc="tiles", unit="tile", disable=None) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
        prob_net = predict_probability(oriented(volume.data, segment_params), volume.voxel_size_a, logit_fn,
                                       params, progress)
    predicted = time.perf_counter()
    probability = probability_on_input_grid(prob_net, volume.data.shape)
    path = write_volume(Path(args.out) / f"{tomogram_name(args.tomogram)}.prob.mrc", probability,
                        volume.voxel_size_a, volume.origin_a)
    done = time.perf_counter()
    n_vox = int(np.prod(prob_net.shape))
    print(f"model {loaded - start:.1f} s; network {predicted - loaded:.1f} s "
          f"({n_vox / 1e6 / (predicted - loaded):.2f} Mvoxel/s at {params.network_voxel_size_a:g} Å); "
          f"resample and write {done - predicted:.1f} s")
    print(f"  probability {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from cryoves.engine.io.mrc import read_volume
    from cryoves.engine.io.tables import write_table
    from cryoves.engine.job import STEPS, Job, OutputOptions, Settings, prepare, segment_job
    from cryoves.engine.network.model import load_logit_fn, weights_sha256
    from cryoves.engine.scoring.evaluate import evaluate, load_spheres
    from cryoves.engine.synthetic.phantom import make_phantom, write_phantom
    from cryoves.engine.warmup import start_kernel_warmup

    start_kernel_warmup()
    out = Path(args.out)
    print(f"making a synthetic presynaptic tomogram {tuple(args.shape)} at 22 Å (seed {args.seed}) ...")
    truth = write_phantom(out / "phantom", make_phantom(tuple(args.shape), 22.0, seed=args.seed), name="demo")
    settings = Settings(params=_segment_params(args), weights_sha256=weights_sha256(args.weights),
                        outputs=OutputOptions(probability=True), force=True)
    job = prepare(Job(path=truth["tomogram"]), settings, out)
    bar, progress = _stage_bar("segmenting", STEPS[1:])
    with bar:
        logit_fn = load_logit_fn(args.weights, args.device, settings.params.inference.precision)
        finished = segment_job(job, logit_fn, settings, out, progress)
        bar.n = bar.total
    paths = finished.paths
    row = evaluate(load_spheres(paths["labels"]), load_spheres(truth["labels"]),
                   read_volume(paths["probability"]).data)
    write_table(out / "metrics.parquet", pa.Table.from_pylist([{"tomogram": job.name} | row]))
    print(f"found {finished.n_vesicles} vesicles; ground truth has {row['n_true_positive'] + row['n_false_negative']}")
    print(f"  F1 {row['f1']:.3f}  precision {row['precision']:.3f}  recall {row['recall']:.3f}")
    print(f"  Dice {row['dice']:.3f}  probability-map Dice {row['probability_dice']:.3f}")
    print(f"  diameter error {row['diameter_error']:.3f}  centre residual {row['center_residual_nm']:.2f} nm")
    print("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in finished.seconds.items()))
    print(f"outputs in {out}/: demo.labels.mrc, demo.prob.mrc, demo.mod, vesicles/, runs/, metrics.parquet, "
          f"report/demo.png (QC report); ground truth in {out}/phantom/")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from cryoves.cluster.run import expand_inputs, run_batch

    paths = expand_inputs(args.inputs)
    rows = run_batch(paths, args.out, _settings(args), weights=args.weights, device=args.device,
                     regions=args.regions, truth=args.truth, address=args.address,
                     num_gpu_actors=args.num_gpu_actors, max_in_flight=args.max_in_flight).to_pylist()
    counts = {status: sum(row["status"] == status for row in rows) for status in ("ok", "skipped", "error")}
    for row in rows:
        if row["status"] == "error":
            print(f"{row['name']}: error: {row['error']}")
    print(f"{len(rows)} tomograms: {counts['ok']} segmented, {counts['skipped']} already complete (skipped), "
          f"{counts['error']} failed; outputs and run records in {args.out}")
    _write_index(args)
    if counts["error"]:
        raise CryovesError(f"{counts['error']} of {len(rows)} tomograms failed (listed above, and in {args.out}/runs/)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from cryoves.cluster.bench import format_bench, run_bench

    record = run_bench(args.size, args.device, weights=args.weights, precision=args.precision,
                       progress=lambda message: print(f"... {message}", file=sys.stderr))
    print(json.dumps(record, indent=1) if args.json else format_bench(record))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cryoves.engine.report.index import read_rows, write_index
    from cryoves.engine.report.tomogram import write_report

    rows = read_rows(args.out_dir)
    if not rows:
        raise CryovesError(f"{args.out_dir}: no run records (runs/NAME.parquet); pass a folder written by "
                           "cryoves segment or cryoves run")
    failed = 0
    for row in tqdm([r for r in rows if r.status == "ok"], desc="reports", unit="tomogram", disable=None):
        try:
            write_report(args.out_dir, row.name)
        except CryovesError as error:  # one unreadable tomogram does not stop the others' reports
            print(f"{row.name}: error: {error}", file=sys.stderr)
            failed += 1
    index = write_index(args.out_dir)
    print(f"{len(rows)} tomograms; open {index}")
    if failed:
        raise CryovesError(f"{failed} of {len(rows)} reports could not be drawn (listed above)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cryoves.engine.io.export import write_copick, write_star

    dest = Path(args.out or Path(args.out_dir) / "export")
    if args.format == "copick":
        config = write_copick(args.out_dir, args.copick_config or dest / "copick" / "copick.json",
                              include_removed=args.include_removed)
        print(f"copick project {config} (picks of user cryoves, session 0, object synaptic-vesicle)")
        return 0
    for path in write_star(args.out_dir, dest, f"relion{args.relion}", per_tomogram=args.per_tomogram,
                           include_removed=args.include_removed):
        print(f"  {path}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cryoves.engine.network.catalog import CACHE_ENV, CATALOG, cache_dir, cached_path, fetch, is_cached
    from cryoves.engine.network.model import bundled_model_dir

    if args.models_command == "fetch":
        if is_cached(args.name):
            print(f"{args.name}: already cached at {cached_path(args.name)}")
            return 0
        model = CATALOG.get(args.name)
        if model is not None:
            print(f"fetching {model.name}: {model.description}; licence {model.licence}", file=sys.stderr)
        print(f"{args.name}: cached at {fetch(args.name, progressbar=True)}")
        return 0
    print(f"{'bundled':12s} {'in the package':15s} {bundled_model_dir()}")
    print(f"{'':12s} cryoves's own U-Net, trained on synthetic tomograms only; BSD-3-Clause, as cryoves")
    for name, model in CATALOG.items():
        print(f"{name:12s} {'cached' if is_cached(name) else 'not cached':15s} {cached_path(name)}")
        print(f"{'':12s} {model.description}; licence {model.licence}")
    print(f"cache folder {cache_dir()} (set {CACHE_ENV} to move it); a model not cached is fetched on first use, "
          "or beforehand with: cryoves models fetch NAME")
    return 0


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    """The outputs, scoring and resume options of `segment` and `run`."""
    parser.add_argument("--probability", action="store_true", help="also write NAME.prob.mrc")
    parser.add_argument("--stages", action="store_true",
                        help="also write the labels of the earlier stages (NAME.global/local/sphere.mrc)")
    parser.add_argument("--pyto", action="store_true",
                        help="also write NAME.pyto.mrc (region 1, active zone 2, vesicles from 10) and NAME.pyto.mod "
                             "(vesicles merged with the region and active-zone models); needs a region")
    parser.add_argument("--active-zone", metavar="AZ.mod", help="IMOD model of the active-zone membrane, for --pyto")
    parser.add_argument("--truth", metavar="PATH",
                        help="ground truth (label MRC or vesicle table), or a folder of NAME.labels.mrc or "
                             "NAME.vesicles.parquet per tomogram NAME: scores each tomogram into "
                             "OUT/metrics/NAME.parquet")
    parser.add_argument("--force", action="store_true", help="recompute even when outputs are complete")
    parser.add_argument("--no-report", action="store_true",
                        help="skip the QC report (OUT/report/NAME.png per tomogram and OUT/report/index.html)")


def _write_index(args: argparse.Namespace) -> None:
    """The run's QC index over every tomogram in --out, after segment and run."""
    if not args.no_report:
        from cryoves.engine.report.index import write_index

        try:
            print(f"QC report: {write_index(args.out)}")
        except Exception as error:  # noqa: BLE001 - a view that fails to draw never fails the finished work
            log.warning(f"the QC index could not be drawn ({error}); `cryoves report {args.out}` draws it again")


_WEIGHTS_HELP = ("bundled, cryovesnet (CryoVesNet's published weights, fetched on first use; see `cryoves models`) "
                 "or a path: a cryoves model folder or a weights.h5 (default: bundled)")


def _resolve_weights(args: argparse.Namespace) -> None:
    """Turn `--weights` / `--init-weights` NAME|PATH into the path the engine loads (None: the bundled
    model), fetching a published model on first use; once, before any command runs."""
    if getattr(args, "weights", None) is None and getattr(args, "init_weights", None) is None:
        return
    from cryoves.engine.network.catalog import resolve_weights
    from cryoves.engine.network.model import bundled_model_dir

    def announce(model) -> None:
        print(f"fetching {model.name}: {model.description}; licence {model.licence}", file=sys.stderr)

    if getattr(args, "weights", None) is not None:
        path = resolve_weights(args.weights, on_fetch=announce, progressbar=True)
        args.weights = None if path is None else str(path)
    if getattr(args, "init_weights", None) is not None:  # training needs a folder to start from, bundled too
        args.init_weights = str(resolve_weights(args.init_weights, on_fetch=announce, progressbar=True)
                                or bundled_model_dir())


def _add_precision_option(parser: argparse.ArgumentParser) -> None:
    from cryoves.engine.network.model import PRECISIONS

    parser.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                        help="the network's arithmetic on the CPU: float32, or bfloat16 (nearly twice as fast, the "
                             "same vesicles: benchmarks/PRECISION.md), which needs a CPU with bfloat16 instructions "
                             "(AVX512-BF16 or AMX); default auto: bfloat16 where the CPU has them, else float32")


def _add_network_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", metavar="NAME|PATH", help=_WEIGHTS_HELP)
    parser.add_argument("--tta", type=int, choices=(1, 4, 8), default=1,
                        help="test-time augmentation: 1 (off), 4 (flips) or 8 (flips and rotations)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="cpu (TensorFlow) or gpu (PyTorch, float16; needs the gpu extra)")
    _add_precision_option(parser)
    parser.add_argument("--memory-gb", type=_positive_float, metavar="GB",
                        help="memory for the network's windows, in GB; a smaller budget cuts the tomogram into "
                             "more windows, which costs time, not accuracy (default: a quarter of this machine's "
                             "memory, or of its container's limit)")
    parser.add_argument("--prefilter-sigma", type=_non_negative_float, metavar="VOX",
                        help="Gaussian pre-filter of the network input, in network voxels (2.2 nm); 0 for input that "
                             "is already denoised (default: the model's own, 1 for CryoVesNet's weights)")
    parser.add_argument("--invert-contrast", action="store_true",
                        help="the tomogram has bright membranes (contrast-inverted): negate it first")


def _format(value) -> str:
    if isinstance(value, tuple):
        return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryoves",
        description="Find and measure synaptic vesicles in cryo-electron tomograms.",
        epilog="example: cryoves info tomo.mrc",
    )
    parser.add_argument("--verbose", action="store_true", help="show details and tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = commands.add_parser(
        "info", help="show shape, voxel size, origin and validation verdict of MRC files",
        description="Print what cryoves reads from each MRC file and whether it accepts it.",
        epilog="example: cryoves info tomo.mrc other.mrc --voxel-size 14.69",
    )
    info.add_argument("files", nargs="+", metavar="FILE.mrc")
    _add_voxel_size(info)
    info.set_defaults(run=cmd_info)

    phantom = commands.add_parser(
        "phantom", help="generate a synthetic presynaptic tomogram with exact vesicle ground truth",
        description="Render a synthetic synapse as a cryo-ET tomogram, with a label MRC and a Parquet "
                    "table of the true vesicles beside it.",
        epilog="example: cryoves phantom out/ --shape 128 256 256 --voxel-size 22 --seed 1 --preset crowded "
               "--imaging tilt-series --tilt-max 50",
    )
    phantom.add_argument("out_dir", metavar="OUT_DIR")
    phantom.add_argument("--shape", type=int, nargs=3, default=[128, 256, 256], metavar=("Z", "Y", "X"),
                         help="volume size in voxels (default: 128 256 256)")
    phantom.add_argument("--voxel-size", type=_positive_float, default=22.0, metavar="Å",
                         help="voxel size in Å (default: 22)")
    phantom.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    phantom.add_argument("--preset", default="default", help="scene preset (default: default)")
    phantom.add_argument("--name", default="phantom", help="file name stem (default: phantom)")
    phantom.add_argument("--imaging", choices=("fft", "tilt-series"), default="fft",
                         help="fft: CTF, missing wedge and noise in one FFT; tilt-series: a simulated tilt series "
                              "(CTF and shot noise per projection) reconstructed by weighted back-projection "
                              "(default: fft)")
    phantom.add_argument("--tilt-max", type=_positive_float, metavar="DEG",
                         help="tilt range ±DEG, either imaging (default: the preset's, 60)")
    phantom.add_argument("--tilt-step", type=_positive_float, metavar="DEG", help="tilt-series: step (default: 3)")
    phantom.add_argument("--dose", type=_positive_float, metavar="E/Å²",
                         help="tilt-series: total dose of the series, scaled by the preset's SNR (default: 100)")
    phantom.add_argument("--denoised", action="store_true",
                         help="tilt-series: smooth the reconstruction by nonlinear diffusion (as denoised tomograms)")
    phantom.set_defaults(run=cmd_phantom)

    evaluate = commands.add_parser(
        "evaluate", help="score predicted vesicles against ground truth (F1, Dice, diameter and centre errors)",
        description="Match predictions to ground truth one-to-one (a prediction is a true positive when its "
                    "centre lies inside a true vesicle) and report precision, recall, F1, Dice, the diameter "
                    "error and the centre residual in nm. PRED and GT are label MRCs or vesicle tables "
                    "(.parquet); give several PREDs (e.g. one per stage) to compare them.",
        epilog="example: cryoves evaluate out/tomo.labels.mrc phantom.labels.mrc --probability out/tomo.prob.mrc",
    )
    evaluate.add_argument("files", nargs="+", metavar="PRED... GT")
    evaluate.add_argument("--probability", metavar="PROB.mrc", help="probability map on the GT grid: adds its Dice")
    evaluate.add_argument("--out", default="metrics.parquet",
                          help="metrics table to append to (default: metrics.parquet)")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON (one object per PRED)")
    _add_voxel_size(evaluate)
    evaluate.set_defaults(run=cmd_evaluate)

    predict = commands.add_parser(
        "predict", help="vesicle probability map of a tomogram (the U-Net stage alone)",
        description="Run the U-Net over a tomogram (rescaled to 22 Å voxels, tiled within the memory budget) and "
                    "write NAME.prob.mrc on the tomogram's grid, with its voxel size and origin.",
        epilog="example: cryoves predict tomo.mrc --out out/ --weights weights.h5 --tta 4",
    )
    predict.add_argument("tomogram", metavar="TOMO.mrc")
    predict.add_argument("--out", required=True, metavar="DIR")
    _add_voxel_size(predict)
    _add_network_options(predict)
    predict.set_defaults(run=cmd_predict)

    segment = commands.add_parser(
        "segment", help="find and measure the vesicles of tomograms, one after the other, in this process",
        description="The whole method per tomogram: U-Net probability map, global threshold, adaptive local "
                    "thresholding, sphere refinement, outlier repair. Writes NAME.labels.mrc, NAME.mod, "
                    "vesicles/NAME.parquet and runs/NAME.parquet into DIR; tomograms whose outputs are complete "
                    "for the same input and parameters are skipped.",
        epilog="example: cryoves segment tomo1.mrc tomo2.mrc --out results/ --region cell_outline.mod",
    )
    segment.add_argument("tomograms", nargs="+", metavar="TOMO.mrc")
    segment.add_argument("--out", required=True, metavar="DIR")
    segment.add_argument("--region", metavar="FILE",
                         help="segmentation region: a binary MRC mask on the tomogram grid or an IMOD model of "
                              "closed contours; or a folder of NAME.region.mrc or NAME.mod per tomogram NAME")
    _add_output_options(segment)
    _add_voxel_size(segment)
    _add_network_options(segment)
    segment.set_defaults(run=cmd_segment)

    run = commands.add_parser(
        "run", help="segment many tomograms on Ray: GPU actors for the network, CPU tasks for the rest",
        description="Screen tomograms (files, folders, glob patterns or text files listing paths) with the "
                    "method of `cryoves segment`, on a local Ray instance or a cluster (--address). Inference "
                    "runs in one actor per GPU, post-processing in CPU tasks, pipelined, with at most "
                    "--max-in-flight tomograms in memory. Reruns skip complete outputs; a bad tomogram becomes "
                    "an error row and the batch goes on. Every node needs cryoves and a shared filesystem.",
        epilog="example: cryoves run 'screen/*.mrc' --out results/ --address auto",
    )
    run.add_argument("inputs", nargs="+", metavar="INPUT")
    run.add_argument("--out", required=True, metavar="DIR")
    run.add_argument("--address", help="Ray cluster address, or 'auto' (default: start Ray on this machine)")
    run.add_argument("--num-gpu-actors", type=int, metavar="N",
                     help="inference actors (default: one per GPU, or 1 on a CPU-only machine)")
    run.add_argument("--max-in-flight", type=int, metavar="N",
                     help="tomograms in memory at once (default: the cluster's CPUs, at least 4; Ray also "
                          "limits post-processing per node to what its memory holds)")
    _add_output_options(run)
    run.add_argument("--regions", metavar="DIR",
                     help="folder of segmentation regions, NAME.region.mrc or NAME.mod per tomogram NAME "
                          "(as --region of segment); tomograms without one are segmented whole")
    _add_voxel_size(run)
    _add_network_options(run)
    run.set_defaults(run=cmd_run)

    demo = commands.add_parser(
        "demo", help="the main job on a built-in synthetic tomogram, scored against its exact ground truth",
        description="Make a synthetic presynaptic tomogram, segment it with the bundled model and print F1, Dice "
                    "and size and position errors against the exact ground truth. Needs nothing downloaded.",
        epilog="example: cryoves demo --out demo/",
    )
    demo.add_argument("--out", default="cryoves-demo", metavar="DIR", help="output folder (default: cryoves-demo)")
    demo.add_argument("--shape", type=int, nargs=3, default=[96, 256, 256], metavar=("Z", "Y", "X"),
                      help="phantom size in 22 Å voxels (default: 96 256 256)")
    demo.add_argument("--seed", type=int, default=1, help="phantom seed (default: 1)")
    _add_network_options(demo)
    demo.set_defaults(run=cmd_demo)

    warmup = commands.add_parser(
        "warmup", help="compile the kernels into Numba's cache once per machine (part of the install)",
        description="Compile the Numba kernels of the post-processing into Numba's cache, two shares on two "
                    "processes. Part of the install: without it, the first segment, run or demo on a machine "
                    "compiles them in the background while the network runs, and waits for what is left.",
        epilog="example: cryoves warmup (after pip install .)",
    )
    warmup.set_defaults(run=cmd_warmup)

    bench = commands.add_parser(
        "bench", help="time every stage on standard phantoms and project tomograms per hour on this machine",
        description="Generate a phantom of a standard size at 22 Å (small 64x128x128, medium 128x256x256, "
                    "large 200x512x512), run the pipeline, print seconds and Mvoxel/s per stage and the projected "
                    "throughput for a 1024x1024x261 tomogram at 14.69 Å.",
        epilog="example: cryoves bench --size medium --json > bench.json",
    )
    bench.add_argument("--size", choices=("small", "medium", "large"), default="small",
                       help="phantom size (default: small)")
    bench.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                       help="cpu (TensorFlow) or gpu (PyTorch, float16)")
    _add_precision_option(bench)
    bench.add_argument("--weights", metavar="NAME|PATH", help="model to time: " + _WEIGHTS_HELP)
    bench.add_argument("--json", action="store_true", help="print one machine-readable record")
    bench.set_defaults(run=cmd_bench)

    train = commands.add_parser(
        "train", help="train the U-Net on labelled tomograms and/or synthetic ones",
        description="Train (or fine-tune with --init-weights) the U-Net on pairs TOMO.mrc + TOMO.labels.mrc "
                    "from folders and/or N synthetic tomograms, with the same input preparation as inference. "
                    "The best checkpoint by validation loss is kept; rerunning into the same folder resumes.",
        epilog="example: cryoves train --out mymodel --data labelled/ --init-weights weights.h5 --epochs 20",
    )
    train.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write (and resume)")
    train.add_argument("--data", nargs="+", metavar="DIR", help="folders of TOMO.mrc + TOMO.labels.mrc pairs")
    train.add_argument("--synthetic", type=int, default=0, metavar="N", help="add N synthetic tomograms")
    train.add_argument("--init-weights", metavar="NAME|PATH",
                       help="start from bundled, cryovesnet (fetched on first use), a cryoves model folder or a .h5")
    train.add_argument("--epochs", type=int, default=30, help="epochs (default: 30)")
    train.add_argument("--patches-per-tomogram", type=int, default=48,
                       help="32³ patches drawn per tomogram and epoch (default: 48)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.set_defaults(run=cmd_train)

    report = commands.add_parser(
        "report", help="draw the quality-control report of an output folder (one PNG per tomogram, index.html)",
        description="Draw OUT_DIR/report/NAME.png per segmented tomogram (orthogonal slices through the densest "
                    "vesicle region with kept, repaired and removed vesicles outlined, the probability map when "
                    "written, histograms of radius, membrane thickness and profile correlation, vesicles left "
                    "after each stage) and OUT_DIR/report/index.html over all of them (sortable, works offline).",
        epilog="example: cryoves report results/",
    )
    report.add_argument("out_dir", metavar="OUT_DIR", help="a folder written by cryoves segment or cryoves run")
    report.set_defaults(run=cmd_report)

    export = commands.add_parser(
        "export", help="write vesicle centres as RELION STAR files or copick picks",
        description="Export the vesicles of an output folder (kept and repaired ones unless --include-removed) "
                    "for subtomogram averaging or annotation tools: RELION 5 STAR with centred coordinates in Å "
                    "(--relion 5), RELION 3/4 and Warp STAR with pixel coordinates (--relion 4), or picks in a "
                    "copick project (needs the copick extra: pip install 'cryoves[copick]').",
        epilog="example: cryoves export results/ --format star --relion 5 --per-tomogram",
    )
    export.add_argument("out_dir", metavar="OUT_DIR", help="a folder written by cryoves segment or cryoves run")
    export.add_argument("--format", choices=("star", "copick"), default="star", help="star (default) or copick")
    export.add_argument("--relion", type=int, choices=(5, 4), default=5,
                        help="STAR style: 5, rlnCenteredCoordinateX/Y/ZAngst (Å from the tomogram centre); "
                             "4, rlnCoordinateX/Y/Z in pixels (RELION 3/4, Warp) (default: 5)")
    export.add_argument("--per-tomogram", action="store_true",
                        help="one STAR file per tomogram (NAME.relion5.star) instead of one for the run")
    export.add_argument("--include-removed", action="store_true", help="also export vesicles marked removed")
    export.add_argument("--out", metavar="DIR", help="where STAR files go (default: OUT_DIR/export)")
    export.add_argument("--copick-config", metavar="FILE",
                        help="copick project config to add the picks to, created if missing "
                             "(default: OUT_DIR/export/copick/copick.json)")
    export.set_defaults(run=cmd_export)

    models = commands.add_parser(
        "models", help="list the models --weights can name, and fetch them ahead of time",
        description="List the models that --weights accepts by name (bundled, and published models fetched on "
                    "first use into the cache folder), whether each is cached, and its licence. "
                    "`cryoves models fetch NAME` downloads one ahead of time, e.g. for cluster nodes without network.",
        epilog="example: cryoves models fetch cryovesnet",
    )
    models_commands = models.add_subparsers(dest="models_command", metavar="ACTION")
    fetch = models_commands.add_parser("fetch", help="download a published model into the cache",
                                       description="Download a published model into the cache folder, checked "
                                                   "against its pinned SHA-256.",
                                       epilog="example: cryoves models fetch cryovesnet")
    fetch.add_argument("name", metavar="NAME", help="a published model (see cryoves models)")
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up chatter is not for users
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        _resolve_weights(args)
        try:
            return args.run(args)
        finally:
            sys.stdout.flush()  # output into a pipe closed early (`| head`) fails here, not at exit
    except BrokenPipeError:  # the reader has all it wanted: end quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the flush at exit writes nowhere
        return EXIT_CLOSED_PIPE
    except CryovesError as error:
        if args.verbose:
            log.exception("details")
        print(f"cryoves: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cryoves: interrupted; completed outputs are kept, rerun to finish", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - last resort: a bug, reported without a traceback unless asked
        if args.verbose:
            raise
        print(f"cryoves: internal error: {type(error).__name__}: {error} (rerun with --verbose for details)",
              file=sys.stderr)
        return 1


def command_line() -> None:
    """The `cryoves` command: `main`, then the exit of a finished program (exit handlers run, output flushed)
    without the interpreter's teardown of TensorFlow's and Numba's modules, which takes about a second after
    every run. Every output is written by `main` itself; what threads remain are idle pools."""
    code = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a pipe whose reader has gone
            pass
    os._exit(code)


if __name__ == "__main__":
    command_line()
