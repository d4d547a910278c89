"""The ``sslsky`` command: one argparse entry, each subcommand calls one function."""

from __future__ import annotations

import argparse
import signal
import sys

from sslsky.config import MockConfig, PackConfig, PretrainConfig, load_config
from sslsky.errors import ConfigError, DataError, DiskFullError, is_no_space, user_message


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (defaults come from the schema)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides applied after the file, e.g. shard_size=512")


def cmd_mock(args: argparse.Namespace) -> int:
    cfg = load_config(MockConfig, args.config, args.overrides,
                      survey=args.survey, n=args.n, seed=args.seed, out=args.out, format=args.format,
                      image_size=args.image_size)
    from sslsky.data.mock import run_mock

    return run_mock(cfg)


def cmd_pack(args: argparse.Namespace) -> int:
    cfg = load_config(PackConfig, args.config, args.overrides,
                      catalog=args.catalog, out=args.out, shard_size=args.shard_size, dtype=args.dtype,
                      image_size=args.image_size, id_column=args.id_column, label_column=args.label_column)
    from sslsky.data.pack import run_pack

    return run_pack(cfg)


def cmd_verify(args: argparse.Namespace) -> int:
    from sslsky.data.verify import run_verify

    return run_verify(args.data)


def cmd_symbols(args: argparse.Namespace) -> int:
    """The schematic symbols of image–symbol–text alignment, for a person to look at: ``OUT/symbols.png``
    (every kind, its variants in a row) and ``OUT/symbols.json`` (which kinds stand for each class and answer)."""
    import json

    from sslsky.data.symbols import ANSWER_SYMBOLS, CLASS_SYMBOLS, write_sheet
    from sslsky.outputs import output_dir, write_text_atomic

    if args.size < 8 or args.variants < 1:
        raise ConfigError(f"--size {args.size} --variants {args.variants}: give a size of at least 8 pixels and "
                          f"at least 1 variant")
    out = output_dir(args.out, "--out")
    sheet = write_sheet(out / "symbols.png", size=args.size, n_variants=args.variants)
    table = {"classes": {name: list(kinds) for name, kinds in CLASS_SYMBOLS.items()},
             "answers": {f"{q}/{a}": kind for (q, a), kind in ANSWER_SYMBOLS.items()}}
    write_text_atomic(out / "symbols.json", json.dumps(table, indent=1) + "\n", "symbol table")
    print(f"symbols: {sheet} ({args.variants} variants of each kind at {args.size} px) and {out / 'symbols.json'}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    from sslsky.train.pretrain import TrainingDivergedError, run_pretrain

    try:
        return run_pretrain(cfg, command=["sslsky", *args.argv])
    except TrainingDivergedError as err:
        print(f"sslsky pretrain: stopped: {err}", file=sys.stderr, flush=True)
        return 4


def cmd_sweep(args: argparse.Namespace) -> int:
    from sslsky.config import SweepConfig

    cfg = load_config(SweepConfig, args.config, args.overrides)
    from sslsky.eval.sweep import run_sweep

    return run_sweep(cfg, collect_only=args.collect)


def cmd_embed(args: argparse.Namespace) -> int:
    from sslsky.config import EmbedConfig

    cfg = load_config(EmbedConfig, args.config, args.overrides, ckpt=args.ckpt, data=args.data, out=args.out,
                      space=args.space)
    from sslsky.eval.embed import run_embed
    from sslsky.models.loading import CheckpointError

    try:
        return run_embed(cfg)
    except (CheckpointError, FileNotFoundError, KeyError) as err:
        print(f"sslsky embed: error: {err}", file=sys.stderr, flush=True)
        return 2
    except RuntimeError as err:  # a rank failed; every rank reports it
        print(f"sslsky embed: {err}", file=sys.stderr, flush=True)
        return 1


def cmd_search(args: argparse.Namespace) -> int:
    from sslsky.config import SearchConfig

    cfg = load_config(SearchConfig, args.config, args.overrides, embeddings=args.embeddings, query=args.query,
                      text=args.text, symbol=args.symbol, k=args.k, data=args.data, png=args.png,
                      chunk_size=args.chunk_size, index=args.index, evaluate=args.evaluate or None)
    from sslsky.eval.embeddings import EmbeddingsError
    from sslsky.eval.search import run_search

    try:
        return run_search(cfg)
    except EmbeddingsError as err:
        print(f"sslsky search: error: {err}", file=sys.stderr, flush=True)
        return 2


def cmd_eval_specz(args: argparse.Namespace) -> int:
    from sslsky.config import EvalSpeczConfig

    cfg = load_config(EvalSpeczConfig, args.config, args.overrides)
    from sslsky.eval.photoz import run_specz

    return _run_eval("eval-specz", run_specz, cfg)


def cmd_eval_morph(args: argparse.Namespace) -> int:
    from sslsky.config import EvalMorphConfig

    cfg = load_config(EvalMorphConfig, args.config, args.overrides)
    from sslsky.eval.morphology import run_morph

    return _run_eval("eval-morph", run_morph, cfg)


def _run_eval(name: str, function, cfg) -> int:
    """Run an evaluation; a diverged training (non-finite loss) or one that kept only the prior (no epoch beat the
    untrained head on val) is a message and exit status 4, as in pretrain."""
    from sslsky.eval.results import PriorOnlyError

    try:
        function(cfg)
    except FloatingPointError as err:
        print(f"sslsky {name}: stopped: {err} (no metrics.json written in {cfg.out})", file=sys.stderr, flush=True)
        return 4
    except PriorOnlyError as err:
        bar = "!" * 100
        print(f"{bar}\nsslsky {err}\n{bar}", file=sys.stderr, flush=True)
        return 4
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslsky", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("mock", help="simulate a mock survey: FITS cutouts (or Galaxy-Zoo-style PNG/JPEG) + "
                                     "catalog.fits with known truth")
    p.add_argument("--survey", choices=["sdss", "decals"])
    p.add_argument("--n", type=int, help="number of galaxies")
    p.add_argument("--seed", type=int, help="master seed (output independent of the number of ranks)")
    p.add_argument("--out", help="output folder")
    p.add_argument("--format", choices=["fits", "png", "jpeg"],
                   help="fits: nanomaggy cubes (default) | png, jpeg: Galaxy-Zoo-style 8-bit RGB composites")
    p.add_argument("--image-size", type=int, help="png/jpeg: H = W of the images (default 424, Galaxy Zoo DECaLS)")
    _add_config_args(p)
    p.set_defaults(func=cmd_mock)

    p = sub.add_parser("pack", help="pack cutouts listed in a catalog into sharded HDF5 (MPI-aware)",
                       epilog="exit status: 0 all rows packed, 3 some rows rejected (listed in OUT/rejected.csv), "
                              "2 config or catalog error")
    p.add_argument("--catalog", help="catalog: FITS, CSV, ECSV, Parquet, or an ssl-sky-surveys HDF5 file")
    p.add_argument("--out", help="output folder for shards, manifest.json, rejected.csv")
    p.add_argument("--shard-size", type=int, help="rows per shard")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "uint8"],
                   help="storage dtype of the images (auto: uint8 for PNG/JPEG, float32 for FITS)")
    p.add_argument("--image-size", type=int, help="resample every cutout to N x N (Lanczos for PNG/JPEG, "
                   "flux-conserving for FITS)")
    p.add_argument("--id-column", help="catalog column of the galaxy id (default: object_id, id_str, iauname, "
                   "objid or dr8_id)")
    p.add_argument("--label-column", help="integer class column packed as morph_class (default: morph_class)")
    _add_config_args(p)
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("verify", help="check a packed folder fully: manifest, every shard's size and sha256, every "
                                      "chunk and image checksum, row counts, statistics",
                       epilog="exit status: 0 all whole, 2 something is damaged (one line per damaged file; re-run "
                              "`sslsky pack` with the same --catalog and --out to rewrite exactly those shards)")
    p.add_argument("data", metavar="DATA", help="packed folder (with manifest.json) or one shard file")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("symbols", help="draw the schematic symbols of image-symbol-text alignment (method=align) "
                                       "as a PNG sheet, with the table of which symbols stand for each class and "
                                       "answer")
    p.add_argument("--out", required=True, help="output folder: symbols.png, symbols.json")
    p.add_argument("--size", type=int, default=96, help="pixels per symbol (default 96)")
    p.add_argument("--variants", type=int, default=4, help="variants per kind: orientation, size, line width")
    p.set_defaults(func=cmd_symbols)

    p = sub.add_parser("pretrain", help="self-supervised pretraining (MoCo v2, BYOL, hybrid, votes, SimCLR, "
                                        "align) on packed shards; DDP under torchrun or srun; restarting resumes "
                                        "from run_dir",
                       epilog="exit status: 0 finished or checkpointed on a stop signal (USR2/SIGTERM), "
                              "2 config, data or disk-full error, or run_dir in use by another run (a resume that "
                              "changes a setting that alters the result needs resume.allow_changes=[key,...]), "
                              "4 the loss diverged (NaN/inf), 130 Ctrl-C (the first one checkpoints at the step "
                              "reached, the same command resumes; a second one stops at once)")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sweep", help="label-fraction study: protocol x label fraction x seed as submitit job "
                                     "arrays on SLURM (else locally), then results.csv and label-efficiency plots",
                       epilog="exit status: 0 every cell has its metrics, 1 some failed or are missing "
                              "(listed; re-run to retry only those), 2 config error")
    p.add_argument("--collect", action="store_true", help="only gather the finished cells into CSV and plots")
    _add_config_args(p)
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("embed", help="L2-normalised encoder features of packed shards -> HDF5 (batched; one rank "
                                     "per GPU under torchrun or srun, rank 0 merges the parts)",
                       epilog="exit status: 0 written, 1 a rank failed, 2 config, checkpoint or data error")
    p.add_argument("--ckpt", help="encoder: sslsky encoder.pt / checkpoint, MoCo or ssl-sky-surveys checkpoint")
    p.add_argument("--data", help="packed shards (folder with manifest.json) or one HDF5 file")
    p.add_argument("--out", help="output HDF5: embeddings (N, F), object_id, z, ebv, morph_class, index")
    p.add_argument("--space", choices=["features", "aligned"], help="features: the encoder's features (default) | "
                   "aligned: an align run's image-text-symbol space, normalize(embed_image(x)), for search --text / "
                   "--symbol (same as space=aligned)")
    _add_config_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("search", help="nearest neighbours by cosine similarity in an embeddings file: printed, "
                                      "optionally a PNG grid of colour composites; --evaluate for retrieval quality",
                       epilog="Search is exact by default: the database is read in chunks of chunk_size rows with a "
                              "running top-k, so memory stays bounded for any N. index=faiss uses an approximate "
                              "HNSW index instead, only if the optional faiss package is installed (pip install "
                              "faiss-cpu); it is not a dependency. exit status: 0 done, 2 config error or unknown "
                              "object_id")
    p.add_argument("--embeddings", help="file written by sslsky embed")
    p.add_argument("--query", metavar="OBJECT_ID", help="object_id whose neighbours to find: an integer, or a name "
                   "such as J000411.19+020924.0 for a catalog keyed by text")
    p.add_argument("--text", help="find the galaxies nearest to this caption (text tower of the align run; "
                   "embeddings of space=aligned), e.g. \"edge-on disk with a dust lane\"")
    p.add_argument("--symbol", metavar="CLASS", help="find the galaxies nearest to this class's symbol prototype "
                   "(space=aligned), e.g. \"edge-on disk\"")
    p.add_argument("--k", type=int, help="number of neighbours (default 10)")
    p.add_argument("--data", help="shards to read the images for --png (default: those that were embedded)")
    p.add_argument("--png", help="write a grid of the query and its neighbours (Lupton et al. 2004 RGB) here")
    p.add_argument("--chunk-size", type=int, help="database rows per similarity block (bounds memory)")
    p.add_argument("--index", choices=["exact", "faiss"], help="exact chunked search (default) or FAISS HNSW "
                                                                  "(approximate; optional package)")
    p.add_argument("--evaluate", action="store_true", help="fraction of neighbours sharing the query's class and "
                                                           "median |dz|/(1+z), vs random neighbours, over all "
                                                           "labelled rows; precision@k and mAP@k (relevant: same "
                                                           "class) image -> image, and text / symbol -> image for "
                                                           "aligned embeddings")
    _add_config_args(p)
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("eval-specz", help="photo-z from images: redshift bins (linear / finetune / scratch), "
                                          "metrics.json, predictions.h5 with PDFs, plots (= python eval_specz.py)",
                       epilog="exit status: 0 done (or already done for this config), 2 config, checkpoint or data "
                              "error, 4 training diverged (non-finite loss: lower optim.lr) or kept only the "
                              "prior (no metrics.json; see OUT/metrics.prior_only.json)")
    _add_config_args(p)
    p.set_defaults(func=cmd_eval_specz)

    p = sub.add_parser("eval-morph", help="morphology from images (linear / finetune / scratch / knn / cluster / "
                                          "zeroshot): classes "
                                          "(target=class, confusion-matrix plot) or Galaxy Zoo vote fractions "
                                          "(target=votes, Dirichlet-multinomial); metrics.json, predictions.h5",
                       epilog="exit status: 0 done (or already done for this config), 2 config, checkpoint or data "
                              "error, 4 training diverged (non-finite loss: lower optim.lr) or kept only the "
                              "prior (no metrics.json; see OUT/metrics.prior_only.json)")
    _add_config_args(p)
    p.set_defaults(func=cmd_eval_morph)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_order_hint(unknown)}")
    args.argv = argv  # what was asked for, recorded next to outputs (e.g. the run's command.txt)
    previous = signal.signal(signal.SIGTERM, _terminate)  # pretrain puts its own (checkpointing) handler over it
    try:
        return int(args.func(args) or 0)
    except Terminated:
        print(f"sslsky {args.command}: stopped by SIGTERM (scancel, a time limit, kill); its lock and temporary "
              f"files are removed: run the same command again to redo or continue it", file=sys.stderr)
        return 143
    except ConfigError as err:
        print(f"sslsky {args.command}: config error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"sslsky {args.command}: data error: {user_message(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside pretraining's own handling (which checkpoints first)
        print(f"sslsky {args.command}: interrupted (Ctrl-C); run the same command again to redo or continue it",
              file=sys.stderr)
        return 130
    except OSError as err:
        if not is_no_space(err):
            raise
        print(f"sslsky {args.command}: {err if isinstance(err, DiskFullError) else err.strerror or err}",
              file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM outside pretraining: unwinds like Ctrl-C, so that locks are released and temporary files removed
    (``finally`` blocks and :func:`sslsky.outputs.atomic_output` run)."""


def _terminate(signum, frame) -> None:
    raise Terminated


def _order_hint(unknown: list[str]) -> str:
    """argparse reads key=value overrides only after the options: say so when that is what went wrong."""
    if any("=" in item and not item.startswith("-") for item in unknown):
        return ("\nhint: put all key=value overrides together at the end, after --config and the other options, "
                "e.g. `sslsky pretrain --config FILE optim.base_lr=0.01 seed=3`")
    return ""


if __name__ == "__main__":
    sys.exit(main())
