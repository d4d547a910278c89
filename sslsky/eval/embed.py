"""``sslsky embed``: a pretrained encoder over packed shards, into one embeddings file (:mod:`sslsky.eval.embeddings`).

The encoder sees the deterministic eval view (centred crop + the training normalisation). ``space=features``
(default) stores its L2-normalised features; ``space=aligned`` (an ``encoder.pt`` of ``method: align``, else a
CheckpointError) stores ``normalize(embed_image(x))``, the image tower's projection into the space the text and
symbol towers share, which ``sslsky search --text / --symbol`` query; the file's attributes ``space``, ``ckpt``
and ``ckpt_sha256`` say which model made it. Under torchrun or srun
each rank embeds a contiguous block of the rows (:func:`rank_block`) into a part file; after all ranks report,
rank 0 concatenates the parts in rank order into the final file (:func:`merge_parts`: written to a temporary
name, then renamed), so the result is the same file as one process gives. One process writes its part and
renames it. What must hold for the file:

- ``--out`` is checked (not a folder, its folder writable) before anything is computed, and the free
  space against the size of the embeddings once the encoder is loaded;
- one run at a time per ``--out``: rank 0 holds the lock ``.OUT.lock`` beside it (:mod:`sslsky.locks`), and a
  second run is refused naming the holder;
- nothing at ``--out`` until the whole file is written: an interrupted run leaves only dot-named part
  or temporary files (``.OUT.part-HOST-PID-*``, ``.OUT.tmp-HOST-PID``: each run's own names), which the next run
  to the same ``--out`` removes (holding the lock, and only those of runs that no longer go);
- a full disk removes the partial file and ends in :class:`~sslsky.errors.DiskFullError`;
- non-finite features (NaN/inf pixels, an overflowing encoder) are refused: no file, a
  :class:`~sslsky.errors.DataError` on every rank listing the object ids and the likely cause.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from sslsky import dist
from sslsky.augment import survey_of_images
from sslsky.config import ConfigError, EmbedConfig, config_to_dict
from sslsky.data.ids import id_text, read_ids
from sslsky.devices import autocast_dtype, resolve_device
from sslsky.errors import DataError, DiskFullError, is_no_space
from sslsky.eval.embeddings import COLUMNS, EMBEDDINGS_FORMAT, create_datasets
from sslsky.eval.results import checkpoint_sha256
from sslsky.locks import OutputLock, lock_next_to, pid_alive
from sslsky.outputs import new_hdf5, output_file, temp_path


def rank_block(n: int, rank: int, world: int) -> range:
    """The contiguous rows ``[n r / W, n (r + 1) / W)`` of rank ``r`` of ``W``; the blocks tile ``range(n)``."""
    return range(n * rank // world, n * (rank + 1) // world)


def run_tag() -> str:
    """``HOST-PID`` of this process (rank 0): in the names of a run's temp files, unique to the run, and telling
    :func:`_remove_stale` whether their run still goes."""
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', socket.gethostname())}-{os.getpid()}"


def part_path(out: Path, rank: int, world: int, tag: str = "") -> Path:
    """The part file of ``rank`` of the run tagged ``tag`` (:func:`run_tag`)."""
    run = f"{tag}-" if tag else ""
    return out.with_name(f".{out.name}.part-{run}{rank:05d}-of-{world:05d}.h5")


def merge_parts(parts: list[Path], out: Path, attrs: dict, chunk_rows: int = 65536, tag: str = "") -> Path:
    """Concatenate part files in order into ``out`` (temporary name, then rename); the parts are removed.
    ``tag``: the run's (:func:`run_tag`), in the temporary name."""
    tmp = out.with_name(f".{out.name}.tmp-{tag}") if tag else temp_path(out)
    handles = [h5py.File(p, "r") for p in parts]
    try:
        n = sum(h["embeddings"].shape[0] for h in handles)
        dim = handles[0]["embeddings"].shape[1]
        columns = {name: np.concatenate([read_ids(h[name]) if name == "object_id" else h[name][()]
                                         for h in handles]) for name in COLUMNS}
        with new_hdf5(tmp, out, "embeddings") as (dst, sink):
            create_datasets(dst, n, dim, columns)
            at = 0
            for h in handles:
                src = h["embeddings"]
                for start in range(0, src.shape[0], chunk_rows):
                    block = src[start:start + chunk_rows]
                    dst["embeddings"][at:at + len(block)] = block
                    at += len(block)
                    sink.check()
            dst.attrs.update(attrs)
    finally:
        for h in handles:
            h.close()
    os.replace(tmp, out)
    for p in parts:
        p.unlink(missing_ok=True)
    return out


#: ``HOST-PID`` in a temp file name (:func:`part_path`, :func:`merge_parts`); older names have none.
_TAGGED = re.compile(r"\.(?:part-(.+)-(\d+)-\d{5}-of-\d{5}\.h5|tmp-(.+)-(\d+))$")


def _owner_running(path: Path) -> int | None:
    """The pid of the run that owns temp file ``path`` when it still runs on this host (else None)."""
    match = _TAGGED.search(path.name)
    if match is None:
        return None
    host, pid = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    here = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())
    if host == here and int(pid) != os.getpid() and pid_alive(int(pid)):
        return int(pid)
    return None


def stale_files(out: Path) -> list[Path]:
    """Part and temporary files that an interrupted ``sslsky embed --out out`` left next to ``out``."""
    name = glob.escape(out.name)
    return sorted({*out.parent.glob(f".{name}.part-*-of-*.h5"), *out.parent.glob(f".{name}.tmp*")})


def _remove_stale(out: Path) -> None:
    """Remove :func:`stale_files` of ``out`` (rank 0, holding the lock of ``out``, before any rank writes), saying
    how many; a file whose run still goes on this host (its ``HOST-PID`` tag) is kept."""
    removed, kept = [], []
    for path in stale_files(out):
        pid = _owner_running(path)
        if pid is not None:  # its run still goes (an older sslsky without the lock): not ours to remove
            print(f"sslsky embed: kept {path.name} (its embed, pid {pid}, still runs)", file=sys.stderr, flush=True)
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except OSError as err:
            kept.append(f"{path.name} ({err.strerror})")
    if removed:
        print(f"sslsky embed: removed {len(removed)} stale temporary file(s) of an interrupted embed to {out}: "
              f"{', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}", file=sys.stderr, flush=True)
    if kept:
        print(f"sslsky embed: warning: could not remove {', '.join(kept)}", file=sys.stderr, flush=True)


class _NoRoomError(DiskFullError):
    """The output cannot fit in the free space of its disk, found before anything is computed."""

    def __init__(self, out: Path, needed: int, free: int):
        OSError.__init__(self, errno.ENOSPC, (
            f"the embeddings need at least {_size(needed)} and the disk holding {out.absolute().parent} has "
            f"{_size(free)} free; nothing was computed or written. Free space there (or point --out elsewhere) "
            f"and run the command again"))
        self.path = out


def _size(n_bytes: float) -> str:
    """``n_bytes`` in KiB, MiB or GiB, whichever reads best."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes / 2**10:.0f} KiB"


def _check_room(out: Path, needed: int) -> None:
    """:class:`_NoRoomError` when ``needed`` bytes (a lower bound of what this rank writes) are not free."""
    try:
        free = shutil.disk_usage(out.parent).free
    except OSError:  # a file system that does not say: the write itself will tell
        return
    with contextlib.suppress(OSError):  # the run's own lock beside out (removed at the end) is not counted as used
        free += os.stat(lock_next_to(out)).st_blocks * 512
    if free < needed:
        raise _NoRoomError(out, needed, free)


def run_embed(cfg: EmbedConfig) -> int:
    """``sslsky embed``: one process, or every rank of a torchrun/srun job."""
    if not cfg.ckpt or not cfg.data:
        raise ConfigError("sslsky embed needs --ckpt ENCODER and --data SHARDS")
    if cfg.batch_size < 1 or cfg.num_workers < 0:
        raise ConfigError(f"batch_size={cfg.batch_size} must be >= 1 and num_workers={cfg.num_workers} >= 0")
    if cfg.split not in ("", "train", "val", "test"):
        raise ConfigError(f"split={cfg.split!r}: choose '', train, val or test")
    autocast_dtype(cfg.amp, resolve_device(cfg.device), fp16=True)  # a device or amp not to be had: refused here
    # a folder, or a folder we cannot write, is refused before any work
    out = output_file(cfg.out, "out", example="embeddings.h5")
    # One embed at a time per --out: rank 0 holds .OUT.lock next to it from before the stale temp files are
    # looked at to the end.
    lock = OutputLock(lock_next_to(out), "embed", key="out", target=str(out),
                      harm="Two embeds to one --out would write over each other's files")
    dist.init_distributed()
    try:
        return _embed(cfg, out, lock)
    finally:
        lock.release()
        dist.cleanup()


#: Errors a rank may meet that the user fixes (re-raised as they are when every failed rank met the same kind).
_USER_ERRORS = ("ConfigError", "DataError", "CheckpointError", "FileNotFoundError")


def _embed(cfg: EmbedConfig, out: Path, lock: OutputLock) -> int:
    from torch.utils.data import DataLoader, Subset

    from sslsky.data.shards import ShardDataset
    from sslsky.devices import rank_device
    from sslsky.eval.features import usable_cpus
    from sslsky.models.loading import CheckpointError

    rank, world = dist.rank(), dist.world_size()
    start = {"refused": None, "tag": ""}
    if rank == 0:
        try:
            lock.acquire()
        except ConfigError as err:  # another embed to this --out: every rank stops with the message
            start["refused"] = str(err)
        else:
            _remove_stale(out)  # only while holding the lock
            start["tag"] = run_tag()
    start = dist.all_gather_object(start)[0]  # no rank writes its part before the stale ones are gone
    if start["refused"]:
        raise ConfigError(start["refused"])
    tag = start["tag"]  # in every temp file name of this run: its own, never another run's
    part = part_path(out, rank, world, tag)
    error, loop_started = None, time.perf_counter()
    zero_rows, bad_rows, bad_pixels, bad_ids = 0, 0, 0, []  # bad: non-finite features; ids: the first few
    try:
        device = rank_device(cfg.device, dist.local_rank())
        amp_dtype = autocast_dtype(cfg.amp, device, fp16=True)
        ckpt = Path(cfg.ckpt)
        if ckpt.is_dir():
            raise CheckpointError(f"checkpoint {ckpt} is a folder: give the file, e.g. {ckpt / 'encoder.pt'}")
        if not ckpt.is_file():  # named before the data are looked at
            raise CheckpointError(f"checkpoint {ckpt} does not exist")
        dataset = ShardDataset(cfg.data, split=cfg.split or None)
        try:
            survey = survey_of_images(dataset.attrs, cfg.survey)
        except ValueError as err:
            raise ConfigError(f"survey: {err}") from None
        encode, loaded, dim = _load_model(cfg, device, survey)
        _check_inputs(dataset, loaded, cfg)
        block = rank_block(len(dataset), rank, world)
        _check_room(out, 4 * dim * (len(block) + (len(dataset) if rank == 0 and world > 1 else 0)))
        rows = dataset.indices[block.start:block.stop]  # (n,) global shard rows of this rank
        columns = {name: dataset.index.columns[name][rows] for name in COLUMNS if name != "index"}
        columns["index"] = rows.astype(np.int64)
        meta = {"format": EMBEDDINGS_FORMAT, "ckpt": str(ckpt.resolve()), "arch": loaded.arch,
                "stem": loaded.stem or "", "source": loaded.source, "feature_dim": dim, "space": cfg.space,
                "ckpt_sha256": checkpoint_sha256(ckpt) if cfg.space == "aligned" else "",
                "data": str(Path(cfg.data).resolve()), "split": cfg.split or "all",
                "survey": str(dataset.attrs.get("survey") or loaded.info.get("survey") or cfg.survey or ""),
                "bands": str(dataset.attrs.get("bands") or ""), "normalized": True, "ranks": world,
                "label_column": str(dataset.attrs.get("label_column") or "morph_class"),
                "label_names": json.dumps(dataset.attrs.get("label_names") or {}),
                "device": device.type, "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
                "config": json.dumps(config_to_dict(cfg))}
        channels_last = cfg.channels_last and device.type == "cuda"
        if channels_last:
            loaded.encoder.to(memory_format=torch.channels_last)
        loader = DataLoader(Subset(dataset, block), batch_size=cfg.batch_size, shuffle=False,
                            num_workers=min(cfg.num_workers, usable_cpus()), pin_memory=device.type == "cuda")
        batches = loader
        if cfg.progress and rank == 0:
            from sslsky.progress import track

            batches = track(loader, f"embed (rank 0/{world})", "batch")
        loop_started = time.perf_counter()
        with new_hdf5(part, out, "embeddings") as (handle, sink), torch.inference_mode():
            create_datasets(handle, len(block), dim, columns)
            at = 0
            for batch in batches:
                expected = rows[at:at + len(batch["index"])]
                if not np.array_equal(batch["index"].numpy(), expected):
                    raise RuntimeError(f"rank {rank}: the loader returned rows out of order at {at}")
                x = loaded.transform(batch["image"].to(device, non_blocking=True))  # (B, C, n, n)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    features = encode(x)  # (B, F): encoder features, or (B, D) aligned embeddings
                features = features.float()
                finite = torch.isfinite(features).all(1)
                if not bool(finite.all()):  # counted to the end, so that one message lists them all
                    bad = (~finite).cpu().numpy()
                    bad_rows += int(bad.sum())
                    bad_pixels += int((~torch.isfinite(batch["image"]).flatten(1).all(1)).numpy()[bad].sum())
                    bad_ids += [id_text(i) for i in columns["object_id"][at:at + len(x)][bad][:5 - len(bad_ids)]]
                zero_rows += int((features.norm(dim=1) == 0).sum())
                handle["embeddings"][at:at + len(x)] = F.normalize(features, dim=1).cpu().numpy()
                at += len(x)
                sink.check()
            if world == 1:
                handle.attrs.update(meta)
        if batches is not loader:
            batches.close()
        if bad_rows:  # nothing of a refused run stays on disk
            part.unlink(missing_ok=True)
    except Exception as err:  # noqa: BLE001 (reported to every rank below, then raised)
        kind = "disk" if isinstance(err, OSError) and is_no_space(err) else type(err).__name__
        error = (kind, f"rank {rank}: {type(err).__name__}: {err}")
        if world == 1:
            part.unlink(missing_ok=True)
            raise
    reports = dist.all_gather_object({"error": error, "zeros": zero_rows, "bad": bad_rows, "pixels": bad_pixels,
                                      "ids": bad_ids})
    errors = [r["error"] for r in reports if r["error"]]
    if errors:
        part.unlink(missing_ok=True)
        _raise_rank_errors(errors, out)
    if any(r["bad"] for r in reports):  # the same message on every rank
        part.unlink(missing_ok=True)
        raise DataError(_nonfinite_message(reports, len(dataset), cfg, out, meta["amp"]))
    merge_error = None
    if rank == 0:
        try:
            if world == 1:
                os.replace(part, out)
            else:
                merge_parts([part_path(out, r, world, tag) for r in range(world)], out, meta, tag=tag)
        except Exception as err:  # noqa: BLE001 (every rank learns of it below)
            if world == 1:
                raise
            kind = "disk" if isinstance(err, OSError) and is_no_space(err) else type(err).__name__
            merge_error = (kind, f"rank 0 merging the parts into {out}: {type(err).__name__}: {err}")
    merge_error = dist.all_gather_object(merge_error)[0]  # the file exists when any rank returns
    if merge_error:
        part.unlink(missing_ok=True)  # a full disk is not left full of parts
        _raise_rank_errors([merge_error], out)
    if rank == 0:
        zeros = sum(r["zeros"] for r in reports)
        seconds = time.perf_counter() - loop_started
        n = len(dataset)
        if zeros:
            print(f"sslsky embed: warning: {zeros} rows have all-zero features (cosine similarity 0 to "
                  f"everything)", file=sys.stderr)
        what = "aligned embeddings (image tower of the align run)" if cfg.space == "aligned" else "features"
        print(f"sslsky embed: {n} galaxies x {dim} {what} ({loaded.arch}, {loaded.source}) on "
              f"{world} rank(s), {device.type}, amp {meta['amp']}: {seconds:.1f} s, {n / seconds:.1f} images/s "
              f"-> {out}", flush=True)
    return 0


def _load_model(cfg: EmbedConfig, device: torch.device, survey):
    """``(encode, loaded, dim)``: the function of the eval-view crops ``(B, C, n, n) -> (B, dim)`` that is stored
    (the encoder, or for ``space=aligned`` the align run's ``embed_image``), its :class:`LoadedEncoder` (input
    transform, bands) and the stored dimension."""
    from sslsky.models.loading import CheckpointError, load_encoder

    if cfg.space == "features":
        loaded = load_encoder(cfg.ckpt, stem=cfg.stem or None, device=device, survey=survey)
        return loaded.encoder, loaded, loaded.feature_dim
    if cfg.space != "aligned":
        raise ConfigError(f"space={cfg.space!r}: choose features (the encoder's features) or aligned (an align "
                          f"run's image-text-symbol space)")
    from sslsky.methods.align import load_aligned

    try:
        model, loaded = load_aligned(cfg.ckpt, device)  # CheckpointError for another method's file
    except CheckpointError as err:
        raise CheckpointError(f"space=aligned: {err}; or embed this checkpoint with space=features") from None
    loaded.transform = loaded.transform.to(device)
    return model.embed_image, loaded, int(model.image_projection.out_features)


def _raise_rank_errors(errors: list[tuple[str, str]], out: Path) -> None:
    """Raise, on every rank, what the ranks that failed met: ``(kind, message)`` each.

    A full disk anywhere is a :class:`DiskFullError`; when every failed rank met the same user error (a config,
    checkpoint or data error) that error, with every rank's message; else a RuntimeError (exit status 1).
    """
    from sslsky.models.loading import CheckpointError

    kinds = {kind for kind, _ in errors}
    if "disk" in kinds:
        raise DiskFullError(out.absolute(), "embeddings")
    text = "failed on " + "; ".join(message for _, message in errors)
    user = {"ConfigError": ConfigError, "DataError": DataError, "CheckpointError": CheckpointError,
            "FileNotFoundError": FileNotFoundError}
    if len(kinds) == 1 and (kind := kinds.pop()) in user:
        raise user[kind](text)
    raise RuntimeError(text)


def _nonfinite_message(reports: list[dict], n: int, cfg: EmbedConfig, out: Path, amp: str) -> str:
    """Which rows gave non-finite features, and the likely cause: NaN/inf pixels, or the encoder itself."""
    count, pixels = sum(r["bad"] for r in reports), sum(r["pixels"] for r in reports)
    ids = [i for r in reports for i in r["ids"]][:5]
    listed = ", ".join(ids) + (f" and {count - len(ids)} more" if count > len(ids) else "")
    text = (f"the encoder gave non-finite features (NaN/inf) for {count} of {n} rows, object_id {listed}; "
            f"nothing was written to {out}. ")
    if pixels == count:
        return text + (f"Likely cause: their cutouts in {cfg.data} hold NaN/inf pixels, which sslsky pack fills, "
                       f"so the shards were changed after packing: pack them again from the catalog, or leave these "
                       f"galaxies out")
    encoder = (f"every row failed, so the checkpoint {cfg.ckpt} probably holds NaN weights (a diverged run: take an "
               f"earlier checkpoint)" if count == n else
               f"try amp=none (amp was {amp}), or check the checkpoint {cfg.ckpt}")
    if pixels == 0:
        return text + f"Their pixels are finite, so the encoder itself overflowed: {encoder}"
    return text + (f"{pixels} of them have NaN/inf pixels in {cfg.data} (pack the shards again from the catalog); "
                   f"the other {count - pixels} have finite pixels: {encoder}")


def _check_inputs(dataset, loaded, cfg: EmbedConfig) -> None:
    """Band count and cutout size of the shards against what the encoder expects, with the fix."""
    if len(dataset) == 0:
        raise ConfigError(f"{cfg.data}: no rows{' in split ' + cfg.split if cfg.split else ''}")
    shape = dataset.read_image(int(dataset.indices[0])).shape  # (C, H, W)
    if shape[0] != loaded.in_channels:
        raise ConfigError(f"{cfg.data} has {shape[0]} bands, the encoder {cfg.ckpt} takes {loaded.in_channels}")
    size = loaded.transform.cutout_size
    if shape[1:] != (size, size):
        raise ConfigError(f"{cfg.data} has {shape[1]}x{shape[2]} cutouts, the encoder's eval transform expects "
                          f"{size}x{size}; pass survey= to match the data")
