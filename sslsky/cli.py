"""The ``sslsky`` command: one argparse entry, each subcommand calls one function."""

from __future__ import annotations

import argparse
import sys

from sslsky.config import ConfigError, MockConfig, PackConfig, PretrainConfig, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults come from the schema)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides applied after the file, e.g. shard_size=512")


def cmd_mock(args: argparse.Namespace) -> int:
    cfg = load_config(MockConfig, args.config, args.overrides,
                      survey=args.survey, n=args.n, seed=args.seed, out=args.out)
    from sslsky.data.mock import run_mock

    return run_mock(cfg)


def cmd_pack(args: argparse.Namespace) -> int:
    cfg = load_config(PackConfig, args.config, args.overrides,
                      catalog=args.catalog, out=args.out, shard_size=args.shard_size, dtype=args.dtype)
    from sslsky.data.pack import run_pack

    return run_pack(cfg)


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    from sslsky.train.pretrain import TrainingDivergedError, run_pretrain

    try:
        return run_pretrain(cfg)
    except TrainingDivergedError as err:
        print(f"sslsky pretrain: stopped: {err}", file=sys.stderr, flush=True)
        return 4


def cmd_sweep(args: argparse.Namespace) -> int:
    from sslsky.config import SweepConfig

    cfg = load_config(SweepConfig, args.config, args.overrides)
    from sslsky.eval.sweep import run_sweep

    return run_sweep(cfg, collect_only=args.collect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslsky", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mock", help="simulate a mock survey: FITS cutouts + catalog.fits with known truth")
    p.add_argument("--survey", choices=["sdss", "decals"])
    p.add_argument("--n", type=int, help="number of galaxies")
    p.add_argument("--seed", type=int, help="master seed (output independent of the number of ranks)")
    p.add_argument("--out", help="output folder")
    _add_config_args(p)
    p.set_defaults(func=cmd_mock)

    p = sub.add_parser("pack", help="pack cutouts listed in a catalog into sharded HDF5 (MPI-aware)",
                       epilog="exit status: 0 all rows packed, 3 some rows rejected (listed in OUT/rejected.csv), "
                              "2 config or catalog error")
    p.add_argument("--catalog", help="catalog: FITS, CSV, ECSV, or an ssl-sky-surveys HDF5 file")
    p.add_argument("--out", help="output folder for shards, manifest.json, rejected.csv")
    p.add_argument("--shard-size", type=int, help="rows per shard")
    p.add_argument("--dtype", choices=["float32", "float16"], help="storage dtype of the images")
    _add_config_args(p)
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("pretrain", help="self-supervised pretraining (MoCo v2) on packed shards; DDP under "
                                        "torchrun or srun; restarting resumes from run_dir",
                       epilog="exit status: 0 finished or checkpointed on a stop signal (USR2/SIGTERM), "
                              "2 config error, 4 the loss diverged (NaN/inf)")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sweep", help="label-fraction study: protocol x label fraction x seed as submitit job "
                                     "arrays on SLURM (else locally), then results.csv and label-efficiency plots",
                       epilog="exit status: 0 every cell has its metrics, 1 some failed or are missing "
                              "(listed; re-run to retry only those), 2 config error")
    p.add_argument("--collect", action="store_true", help="only gather the finished cells into CSV and plots")
    _add_config_args(p)
    p.set_defaults(func=cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"sslsky {args.command}: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
