"""The `cryoves` command line: one subcommand per job, heavy imports inside the command bodies.

Exit codes: 0 done; 2 for what the user can fix (usage errors and every CryovesError, one line);
1 for anything else (a bug; the traceback is shown with --verbose).
"""

import argparse
import logging
import sys
from pathlib import Path

from cryoves.engine.errors import CryovesError

log = logging.getLogger("cryoves")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _add_voxel_size(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--voxel-size", type=_positive_float, metavar="Å",
                        help="voxel size in Å; overrides the MRC header (use when the header is wrong or unset)")


def cmd_info(args: argparse.Namespace) -> int:
    from cryoves.engine.mrc import inspect_volume

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
    from cryoves.engine.phantom import PRESETS, make_phantom, write_phantom

    if args.preset not in PRESETS:
        raise CryovesError(f"--preset {args.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    if any(n < 16 for n in args.shape):
        raise CryovesError(f"--shape {' '.join(map(str, args.shape))}: each axis needs at least 16 voxels")
    phantom = make_phantom(tuple(args.shape), args.voxel_size, seed=args.seed, preset=args.preset)
    paths = write_phantom(args.out_dir, phantom, name=args.name)
    print(f"{phantom.vesicles.num_rows} vesicles, shape {tuple(args.shape)}, voxel size {args.voxel_size:g} Å")
    for kind, path in paths.items():
        print(f"  {kind:9s} {path}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cryoves.engine.atomic import atomic_output
    from cryoves.engine.evaluation import evaluate, load_spheres
    from cryoves.engine.mrc import read_volume

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
    columns = ["n_true_positive", "n_false_positive", "n_false_negative", "precision", "recall", "f1",
               "diameter_error", "center_residual_nm", "dice", "probability_dice"]
    shown = [c for c in columns if any(c in row for row in rows)]
    print("prediction".ljust(32) + "".join(f"{c.replace('n_', '').replace('_', ' '):>14s}" for c in shown))
    for row in rows:
        print(Path(row["prediction"]).name[:31].ljust(32)
              + "".join(f"{row.get(c, float('nan')):>14.4g}" for c in shown))
    table = pa.Table.from_pylist(rows)
    out = Path(args.out)
    if out.exists():
        table = pa.concat_tables([pq.read_table(out), table], promote_options="permissive")
    with atomic_output(out) as tmp:
        pq.write_table(table, tmp)
    print(f"metrics appended to {out}")
    return 0


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
        epilog="example: cryoves phantom out/ --shape 128 256 256 --voxel-size 22 --seed 1 --preset crowded",
    )
    phantom.add_argument("out_dir", metavar="OUT_DIR")
    phantom.add_argument("--shape", type=int, nargs=3, default=[128, 256, 256], metavar=("Z", "Y", "X"),
                         help="volume size in voxels (default: 128 256 256)")
    phantom.add_argument("--voxel-size", type=_positive_float, default=22.0, metavar="Å",
                         help="voxel size in Å (default: 22)")
    phantom.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    phantom.add_argument("--preset", default="default", help="scene preset (default: default)")
    phantom.add_argument("--name", default="phantom", help="file name stem (default: phantom)")
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
    evaluate.add_argument("--out", default="metrics.parquet", help="metrics table to append to (default: metrics.parquet)")
    _add_voxel_size(evaluate)
    evaluate.set_defaults(run=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
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


if __name__ == "__main__":
    sys.exit(main())
