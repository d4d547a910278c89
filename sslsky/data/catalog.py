"""Input catalogs for ``sslsky pack``: FITS, CSV, ECSV tables and ssl-sky-surveys HDF5 files.

    cat = read_catalog("mock_sdss/catalog.fits")
    cat.valid_rows          # (M,) rows that can be packed, in catalog order
    cat.rejected            # [(row, object_id, file, reason)] rows refused before any cutout is read

A table must have the columns of ``REQUIRED_COLUMNS`` (``file`` may be the
Galaxy Zoo ``file_loc``; the id may be any column named by ``id_column``, else
the first of ``ID_COLUMN_ALIASES`` present: ``object_id``, ``id_str``,
``iauname``, ``objid``, ``dr8_id``); a missing one is a :class:`CatalogError`
raised before any work. Ids are integers or text, kept exactly
(:mod:`sslsky.data.ids`). Rows with an empty required value and repeated ids
(second and later occurrences) are not packed; they are listed. Tables are
FITS, CSV, ECSV or Parquet (astropy; Parquet through pyarrow).

Paths in ``file`` are relative to the catalog's folder (absolute paths are
kept). A ``file`` holding ``{band}`` names one 2D image per band.

Values out of their physical range are rejected per row and listed with the
value (:func:`_range_problems`, the one place rows are checked for range): ra
outside [0, 360) degrees, dec outside [-90, 90], a redshift z < 0 or infinite
(NaN means unknown), E(B-V) < 0 or infinite, and a class outside the declared
classes: 0 .. K-1 where K is the larger of the package's morphology
vocabulary (:data:`sslsky.data.votes.MORPH_CLASSES`, 7 classes) and the number
of distinct names in the ``<label>_name`` column (``morph_name``); -1 is
unlabelled. A class past 6 thus needs its name declared in that column.

The original ssl-sky-surveys HDF5 files (Hayat et al. 2021) hold the images
themselves: ``images`` (N, C, H, W) -- the layout of the original data
loader, which swaps axes 0 and 2 of each (C, H, W) row -- or (N, H, W, C),
told apart by which axis has the band count, with ``specz_redshift``,
``e_bv``, ``ObjID``, ``ra``, ``dec`` (see ``LEGACY_LAYOUT``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sslsky.config import ConfigError
from sslsky.data.ids import ID_COLUMN_ALIASES, as_id_array
from sslsky.data.schema import (
    CATALOG_FORMATS,
    FILE_LOC_COLUMN,
    LABEL_COLUMN,
    LEGACY_LAYOUT,
    OPTIONAL_COLUMNS,
    PER_BAND_COLUMNS,
    REQUIRED_COLUMNS,
    SHARD_COLUMNS,
    VOTES_PREFIX,
)

#: Largest float32: z and ebv beyond it (stored as float32) would become inf in the shards.
FLOAT32_MAX = float(np.finfo(np.float32).max)


class CatalogError(ConfigError):
    """A catalog that cannot be packed at all (missing file or column); ``sslsky pack`` exits with 2."""


@dataclass
class LegacySource:
    """Where the images of an ssl-sky-surveys HDF5 catalog live."""

    path: Path
    channels_last: bool  # (N, H, W, C) rather than (N, C, H, W)
    n_bands: int
    shape: tuple[int, int]  # (H, W)


@dataclass
class Catalog:
    """Normalised catalog columns, one entry per input row (N rows)."""

    path: Path
    columns: dict[str, np.ndarray]  # object_id int64 or str, ra/dec float64, z/ebv float32, morph_class int16, file str
    votes: np.ndarray | None = None  # (N, A) int32
    votes_columns: list[str] = field(default_factory=list)
    per_band: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. "psf_fwhm_r" -> (N,) float32
    legacy: LegacySource | None = None
    valid_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (M,)
    rejected: list[tuple[int, int | str, str, str]] = field(default_factory=list)
    id_column: str = "object_id"  # the catalog column the ids came from
    label_column: str = LABEL_COLUMN  # the catalog column morph_class came from
    label_names: dict[int, str] = field(default_factory=dict)  # class -> name, from <label>_name / morph_name

    @property
    def n_rows(self) -> int:
        return len(self.columns["object_id"])

    @property
    def folder(self) -> Path:
        return self.path.parent

    def cutout_path(self, row: int) -> str:
        """The cutout of ``row``: absolute, or relative to the catalog's folder."""
        value = str(self.columns["file"][row])
        if self.legacy is not None:
            return value
        return value if os.path.isabs(value) else str(self.folder / value)

    def per_band_matrix(self, name: str, bands: str) -> np.ndarray | None:
        """(N, C) float32 from ``<name>_<band>`` columns; None when none is present (NaN for missing bands)."""
        keys = [f"{name}_{band}" for band in bands]
        if not any(key in self.per_band for key in keys):
            return None
        n = self.n_rows
        return np.stack([self.per_band.get(key, np.full(n, np.nan, np.float32)) for key in keys], axis=1)

    def row_digest(self, rows: np.ndarray) -> str:
        """sha256 over everything the catalog puts into the shard rows ``rows``."""
        digest = hashlib.sha256()
        rows = np.asarray(rows, dtype=np.int64)
        digest.update(rows.tobytes())
        for name in sorted(self.columns):
            values = self.columns[name][rows]
            digest.update(name.encode())
            digest.update("\0".join(map(str, values)).encode() if values.dtype.kind in "UO" else values.tobytes())
        if self.votes is not None:
            digest.update(",".join(self.votes_columns).encode())
            digest.update(self.votes[rows].tobytes())
        for name in sorted(self.per_band):
            digest.update(name.encode())
            digest.update(self.per_band[name][rows].tobytes())
        return digest.hexdigest()


def catalog_format(path: Path) -> str:
    """Format name from the file's suffix (see ``CATALOG_FORMATS``)."""
    name = path.name.lower()
    for suffix in sorted(CATALOG_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return CATALOG_FORMATS[suffix]
    raise CatalogError(f"catalog {path}: unknown format; use one of {', '.join(CATALOG_FORMATS)}")


def _missing_mask(column) -> np.ndarray:
    """(N,) True where a value is masked, NaN/inf, or an empty string."""
    mask = np.array(np.ma.getmaskarray(column), dtype=bool)
    values = np.ma.getdata(column)
    if values.dtype.kind == "f":
        mask |= ~np.isfinite(values)
    elif values.dtype.kind in "USO":
        mask |= np.char.strip(np.asarray(values, dtype=str)) == ""
    return mask


def _as_float(column, fill: float, dtype) -> np.ndarray:
    values = np.ma.getdata(column)
    if values.dtype.kind in "USO":  # numbers stored as text
        out = np.full(len(values), fill, dtype=np.float64)
        for i, text in enumerate(np.asarray(values, dtype=str)):
            try:
                out[i] = float(text)
            except ValueError:
                pass
        values = out
    out = np.asarray(values, dtype=np.float64).copy()
    out[np.ma.getmaskarray(column)] = fill
    return out.astype(dtype)


def _as_object_ids(column) -> tuple[np.ndarray, np.ndarray]:
    """(ids, bad mask): int64 for an integer column (or floats that are whole numbers), else text, kept exactly."""
    values = np.ma.getdata(column)
    missing = _missing_mask(column)
    if values.dtype.kind in "iu":
        return values.astype(np.int64), missing
    if values.dtype.kind == "f":
        whole = np.isfinite(values) & (np.mod(values, 1) == 0) & (np.abs(values) < 2.0**63)
        ids = np.where(whole, values, 0).astype(np.int64)
        return ids, missing | ~whole
    ids = as_id_array(np.where(missing, "", np.asarray(values, dtype=object)))
    return ids, missing


def _read_parquet(path: Path):
    """A Parquet file as an astropy Table, through pyarrow (nulls masked); astropy's reader needs pandas."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from astropy.table import MaskedColumn, Table

    arrow = pq.read_table(path)
    columns = {}
    for name in arrow.column_names:
        chunked = arrow.column(name)
        nulls = chunked.is_null().to_numpy(zero_copy_only=False)
        if nulls.any() and pa.types.is_integer(chunked.type):  # to_numpy would make floats: 64-bit ids lose digits
            chunked = chunked.fill_null(0)
        values = chunked.to_numpy(zero_copy_only=False)
        if values.dtype == object:  # text (None for nulls) -> str
            values = np.array(["" if v is None else v.decode() if isinstance(v, bytes) else str(v) for v in values])
        columns[name] = MaskedColumn(values, mask=nulls) if nulls.any() else values
    return Table(columns)


def _read_table(path: Path, fmt: str):
    from astropy.table import Table

    try:
        if fmt == "parquet":
            return _read_parquet(path)
        return Table.read(path, format=fmt)
    except Exception as err:  # astropy raises many types for a file it cannot parse
        raise CatalogError(f"catalog {path}: cannot be read as {fmt} ({type(err).__name__}: {err})") from None


def _read_legacy(path: Path, n_bands: int) -> tuple[dict, LegacySource]:
    """Columns (in catalog names) and the image source of an ssl-sky-surveys HDF5 file."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise CatalogError(f"catalog {path}: not a readable HDF5 file ({err})") from None
    with handle:
        needed = [stored for stored, name in LEGACY_LAYOUT.items() if name not in OPTIONAL_COLUMNS]
        missing = [name for name in needed if name not in handle]
        if missing:
            raise CatalogError(
                f"catalog {path}: missing dataset(s) {', '.join(missing)} of the ssl-sky-surveys layout; "
                f"it has {', '.join(sorted(handle))}. Expected {', '.join(LEGACY_LAYOUT)} "
                f"({', '.join(needed)} required), or pack a FITS/CSV catalog with columns {', '.join(REQUIRED_COLUMNS)}"
            )
        shape = handle["images"].shape
        if len(shape) != 4:
            raise CatalogError(f"catalog {path}: `images` has shape {shape}; expected (N, C, H, W) or (N, H, W, C)")
        if shape[1] == n_bands:
            channels_last, hw = False, (shape[2], shape[3])
        elif shape[3] == n_bands:
            channels_last, hw = True, (shape[1], shape[2])
        else:
            raise CatalogError(f"catalog {path}: `images` of shape {shape} has no axis of {n_bands} bands "
                               "after N; set survey= to the survey of these images")
        columns = {}
        for stored, name in LEGACY_LAYOUT.items():
            if stored != "images" and stored in handle:
                columns[name] = handle[stored][()]
    n = shape[0]
    for name, values in columns.items():
        if len(values) != n:
            raise CatalogError(f"catalog {path}: dataset for {name!r} has {len(values)} rows, `images` has {n}")
    columns["file"] = np.array([f"{path.name}[{i}]" for i in range(n)])
    return columns, LegacySource(path, channels_last, n_bands, hw)


def _label_names(raw: dict, label_name: str, classes: np.ndarray) -> dict[int, str]:
    """Class -> name from the ``<label>_name`` column (``morph_name`` for ``morph_class``), first row of each."""
    name_column = next((c for c in (f"{label_name}_name", "morph_name" if label_name == LABEL_COLUMN else None)
                        if c and c in raw), None)
    if name_column is None:
        return {}
    names = np.asarray(np.ma.getdata(raw[name_column]), dtype=str)
    out: dict[int, str] = {}
    for k, name in zip(classes.tolist(), names):
        if k >= 0 and name.strip():
            out.setdefault(int(k), name.strip())
    return dict(sorted(out.items()))


def _check_labels(column, name: str, path: Path) -> None:
    """CatalogError unless every given value of the label column is a whole number that fits morph_class (int16).

    Text classes ("smooth"), fractions (0.7) or huge numbers would otherwise become -1 or wrong classes silently.
    """
    values = _as_float(column, np.nan, np.float64)
    limit = np.iinfo(SHARD_COLUMNS[LABEL_COLUMN])
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(values) & (np.mod(values, 1) == 0) & (values >= limit.min) & (values <= limit.max)
    bad = np.flatnonzero(~_missing_mask(column) & ~ok)
    if not bad.size:
        return
    data = np.ma.getdata(column)
    what = "holds text, not integer classes" if data.dtype.kind in "USO" else "holds values that are not classes"
    examples = ", ".join(f"row {int(r)}: {data[r].item()!r}" for r in bad[:3])
    raise CatalogError(f"catalog {path}: label column {name!r} {what} ({bad.size} value(s); {examples}); give an "
                       f"integer column (0, 1, ...; -1 unknown) with label_column=")


def declared_classes(raw: dict, label_name: str | None) -> tuple[int, str]:
    """(K, where K comes from): classes 0..K-1 are declared (see the module docstring)."""
    from sslsky.vocabulary import MORPH_CLASSES

    k, where = len(MORPH_CLASSES), f"the {len(MORPH_CLASSES)} classes of the package's morphology vocabulary"
    name_column = next((c for c in (f"{label_name}_name", "morph_name" if label_name == LABEL_COLUMN else None)
                        if label_name and c and c in raw), None)
    if name_column is not None:
        names = {str(v).strip() for v in np.asarray(np.ma.getdata(raw[name_column]), dtype=str)} - {""}
        if len(names) > k:
            k, where = len(names), f"the {len(names)} names in column {name_column!r}"
    return k, where


def _range_problems(columns: dict, n_classes: int, classes_from: str, label_name: str) -> dict[int, list[str]]:
    """Row -> what is out of physical range (empty values are reported elsewhere; NaN z/ebv means unknown).

    z and ebv are the catalog's values (float64), so a value past float32's range is reported as it is written,
    not as the inf it would become in a shard."""
    out: dict[int, list[str]] = {}

    def flag(mask, text):
        for row in np.flatnonzero(mask):
            out.setdefault(int(row), []).append(text(int(row)))

    ra, dec = columns["ra"], columns["dec"]
    z, ebv, label = columns["z"], columns["ebv"], columns[LABEL_COLUMN]
    with np.errstate(invalid="ignore"):
        bad_ra = np.isfinite(ra) & ((ra < 0.0) | (ra >= 360.0))
        bad_dec = np.isfinite(dec) & (np.abs(dec) > 90.0)
        flag(bad_ra | bad_dec, lambda r: (
            f"ra, dec = {ra[r]:.6g}, {dec[r]:.6g} is not a sky position in degrees (ra in [0, 360), dec in "
            f"[-90, 90]" + ("; ra and dec swapped?" if abs(dec[r]) > 90.0 and 0 <= dec[r] < 360 else "")
            + ("; a catalog in [-180, 180) needs 360 added to negative ra" if -180 <= ra[r] < 0 else "") + ")"))
        flag((z < 0) | ~(np.abs(z) <= FLOAT32_MAX) & ~np.isnan(z),
             lambda r: f"z = {z[r]:.6g} is not a redshift (z >= 0; NaN if unknown)")
        flag((ebv < 0) | ~(np.abs(ebv) <= FLOAT32_MAX) & ~np.isnan(ebv),
             lambda r: f"ebv = {ebv[r]:.6g} is not an E(B-V) (>= 0; NaN if unknown)")
    flag((label < -1) | (label >= n_classes), lambda r: (
        f"{label_name} {int(label[r])} is not a declared class (0..{n_classes - 1}: {classes_from}; -1 unlabelled); "
        f"declare more classes by their names in a {label_name}_name column"))
    return out


def _pick_column(raw: dict, names: list, wanted: str, aliases: tuple[str, ...], what: str, path: Path) -> str | None:
    """The catalog column for ``what``: ``wanted`` (which must exist), else the first alias present, else None."""
    if wanted:
        if wanted not in raw:
            raise CatalogError(f"catalog {path}: {what}={wanted!r} is not a column; it has {', '.join(names)}")
        return wanted
    return next((name for name in aliases if name in raw), None)


def read_catalog(path: str | os.PathLike, n_bands_hint: int = 5, id_column: str = "",
                 label_column: str = "") -> Catalog:
    """Read and validate a catalog; see the module docstring.

    ``n_bands_hint`` tells the axis of the bands in a legacy HDF5 ``images``
    dataset (5 for SDSS ugriz, the survey of the original files). ``id_column``
    names the id column (default: the first of ``ID_COLUMN_ALIASES``), and
    ``label_column`` the integer class column read as ``morph_class`` (default
    ``morph_class``; -1 or empty: unknown).
    """
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalog {path} does not exist; give the catalog written by `sslsky mock` "
                           "or your own FITS/CSV/ECSV table")
    fmt = catalog_format(path)
    legacy = None
    id_name, label_name = "object_id", LABEL_COLUMN
    if fmt == "legacy-hdf5":
        if id_column or label_column:
            raise CatalogError(f"catalog {path}: id_column= and label_column= are for tables; an ssl-sky-surveys "
                               "HDF5 file keys galaxies by ObjID")
        raw, legacy = _read_legacy(path, n_bands_hint)
        names = list(raw)
        label_name = LABEL_COLUMN if LABEL_COLUMN in raw else None
    else:
        table = _read_table(path, fmt)
        names = list(table.colnames)
        raw = {name: table[name] for name in names}
        if "file" not in raw and FILE_LOC_COLUMN in raw:  # Galaxy Zoo convention
            raw["file"] = raw[FILE_LOC_COLUMN]
        id_name = _pick_column(raw, names, id_column, ID_COLUMN_ALIASES, "id_column", path)
        if id_name is not None:
            raw["object_id"] = raw[id_name]
        label_name = _pick_column(raw, names, label_column, (LABEL_COLUMN,), "label_column", path)
        if label_name is not None:
            raw[LABEL_COLUMN] = raw[label_name]
        missing = [name for name in REQUIRED_COLUMNS if name not in raw]
        if missing:
            also = f" (or {FILE_LOC_COLUMN!r})" if "file" in missing else ""
            if "object_id" in missing:
                also += f" (an id column: one of {', '.join(ID_COLUMN_ALIASES)}, or name yours with id_column=)"
            raise CatalogError(
                f"catalog {path} is missing required column(s) {', '.join(map(repr, missing))}{also}; "
                f"it has {', '.join(names) or 'no columns'}. Add the column(s) (rename yours if they hold "
                f"the same thing); every catalog needs {', '.join(REQUIRED_COLUMNS)}"
            )

    n = len(raw["object_id"])
    if n == 0:
        raise CatalogError(f"catalog {path} has no rows; nothing to pack")
    object_id, bad_id = _as_object_ids(raw["object_id"])
    columns = {
        "object_id": object_id,
        "ra": _as_float(raw["ra"], np.nan, np.float64),
        "dec": _as_float(raw["dec"], np.nan, np.float64),
        "file": np.asarray(np.ma.filled(raw["file"], "") if np.ma.isMaskedArray(raw["file"])
                           else np.ma.getdata(raw["file"]), dtype=str),
    }
    exact: dict[str, np.ndarray] = {}  # float64 values of the float columns stored as float32
    for name, fill in OPTIONAL_COLUMNS.items():
        dtype = SHARD_COLUMNS[name]
        if name not in raw:
            columns[name] = np.full(n, fill, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            values = _as_float(raw[name], fill, np.float64)
            values[~np.isfinite(values)] = fill
            columns[name] = values.astype(dtype)
        else:
            exact[name] = _as_float(raw[name], fill, np.float64)  # as in the catalog, for the range checks
            with np.errstate(over="ignore"):  # z = 1e308 becomes inf in float32: rejected below, by its value
                columns[name] = exact[name].astype(dtype)
    cat = Catalog(path, columns, legacy=legacy, id_column=id_name, label_column=label_name or LABEL_COLUMN)
    n_classes, classes_from = declared_classes(raw, label_name)
    if label_name is not None:
        _check_labels(raw[label_name], label_name, path)
        labels = columns[LABEL_COLUMN]
        cat.label_names = _label_names(raw, label_name, np.where(labels < n_classes, labels, -1))

    vote_names = [name for name in names if name.startswith(VOTES_PREFIX)]
    if vote_names:  # masked or NaN counts (no volunteer saw it) become 0
        votes = np.stack([_as_float(raw[name], 0.0, np.float64) for name in vote_names], axis=1)
        votes[~np.isfinite(votes)] = 0
        cat.votes, cat.votes_columns = np.rint(votes).astype(np.int32), vote_names
    for name in names:
        if any(name.startswith(f"{prefix}_") for prefix in PER_BAND_COLUMNS):
            cat.per_band[name] = _as_float(raw[name], np.nan, np.float32)

    # Rows that cannot be packed, whatever their cutout holds.
    reasons: dict[int, str] = {}
    empty = {name: _missing_mask(raw[name]) for name in ("ra", "dec", "file")}
    empty["ra"] |= ~np.isfinite(columns["ra"])
    empty["dec"] |= ~np.isfinite(columns["dec"])
    out_of_range = _range_problems({**columns, **exact}, n_classes, classes_from, label_name or LABEL_COLUMN)
    flagged = np.zeros(n, dtype=bool)
    flagged[list(out_of_range)] = True
    for row in np.flatnonzero(bad_id | empty["ra"] | empty["dec"] | empty["file"] | flagged):
        row = int(row)
        problems = [f"missing {name}" for name in ("ra", "dec", "file") if empty[name][row]]
        problems += out_of_range.get(row, [])
        if bad_id[row]:
            value = np.ma.getdata(raw["object_id"])[row].item()  # a Python number: 0.5, not np.float64(0.5)
            problems.insert(0, f"missing {id_name}" if _missing_mask(raw["object_id"][row:row + 1])[0]
                            else f"{id_name} {value!r} is not a whole number")
        reasons[row] = "; ".join(problems)
    id_rows = np.flatnonzero(~bad_id)
    _, first, inverse = np.unique(object_id[id_rows], return_index=True, return_inverse=True)
    first_row = id_rows[first][inverse.reshape(-1)]  # (len(id_rows),) first row holding the same id
    for row, original in zip(id_rows[first_row != id_rows], first_row[first_row != id_rows]):
        reasons.setdefault(int(row), f"duplicate {id_name} {object_id[row].item()!r} (first at row {int(original)})")
    for row in sorted(reasons):
        oid = "" if bad_id[row] else object_id[row].item()
        cat.rejected.append((row, oid, str(columns["file"][row]), reasons[row]))
    keep = np.ones(n, dtype=bool)
    keep[list(reasons)] = False
    cat.valid_rows = np.flatnonzero(keep).astype(np.int64)
    return cat
