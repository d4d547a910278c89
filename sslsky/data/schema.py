"""Names and types of the catalog, cutout, shard and manifest contracts (DESIGN.md).

The pack writer and the shard reader both import from here; change a name
here and both follow.
"""

from __future__ import annotations

import numpy as np

from sslsky.vocabulary import LABEL_COLUMN, VOTES_PREFIX  # noqa: F401 (the catalog's label and vote columns)

#: Catalog columns every input catalog must have (FITS table, CSV or ECSV).
REQUIRED_COLUMNS = ("object_id", "ra", "dec", "file")
#: Catalog columns that are read when present and filled when absent.
OPTIONAL_COLUMNS = {
    "z": np.nan,  # spectroscopic redshift; NaN if unknown
    "ebv": np.nan,  # Milky-Way E(B-V); NaN if unknown
    "morph_class": -1,  # int, -1 unknown
}
#: Column naming a cutout in the Galaxy Zoo / galaxy-datasets convention.
FILE_LOC_COLUMN = "file_loc"
#: Per-band truth columns the mock writes and pack carries to shards when present
#: (``psf_fwhm_r`` ...): the image's own PSF and noise level, for augmentations.
PER_BAND_COLUMNS = ("psf_fwhm", "sky_sigma")

#: Version of the HDF5 shard layout below.
SCHEMA_VERSION = 1
#: Per-row datasets in every shard, with their dtype (``images`` is float32, float16 or uint8). ``object_id``
#: is int64, or UTF-8 strings for a catalog keyed by text (:mod:`sslsky.data.ids`).
SHARD_COLUMNS = {
    "object_id": np.int64,
    "ra": np.float64,
    "dec": np.float64,
    "z": np.float32,
    "ebv": np.float32,
    "morph_class": np.int16,
    "filled_pixels": np.int32,  # NaN/inf pixels replaced by fill_value (0 when clean)
}
SHARD_PATTERN = "shard-{rank:03d}-{index:05d}.h5"
#: Glob matching every name SHARD_PATTERN can make (``shard-*-*.h5``).
SHARD_GLOB = "shard-*-*.h5"
MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.csv"

#: Names in the layout of the original ssl-sky-surveys HDF5 files (Hayat et al. 2021).
LEGACY_LAYOUT = {
    "images": "images",
    "specz_redshift": "z",
    "e_bv": "ebv",
    "ObjID": "object_id",
    "ra": "ra",
    "dec": "dec",
}

# ---------------------------------------------------------------------------
# Added for `sslsky pack` (sslsky/data/pack.py, catalog.py, fits_io.py).
# ---------------------------------------------------------------------------

#: Row of the input catalog each shard row came from (int64 dataset in every shard).
CATALOG_ROW_COLUMN = "catalog_row"
SHARD_COLUMNS[CATALOG_ROW_COLUMN] = np.int64
#: Image dataset of a shard, (N, C, H, W), one image per chunk.
IMAGES_DATASET = "images"
#: Per-row checksum of the images, (N,) uint32: the wrapping sum of each row's stored bytes read as little-endian
#: uint32 words (the last one zero-padded); readers check it on every read (:func:`sslsky.data.verify.row_sum32`).
IMAGE_SUM_DATASET = "image_sum32"
#: Vote counts of a shard, (N, A) int32, with attribute VOTES_COLUMNS_ATTR naming the A catalog columns.
VOTES_DATASET = "votes"
VOTES_COLUMNS_ATTR = "columns"
#: Shard attributes (besides the pack bookkeeping below) that describe the images.
SHARD_ATTRS = ("survey", "bands", "pixel_scale", "schema_version", "photometric")
#: Shard attribute holding the identity of the work that made it; a re-run skips a shard whose key matches.
PACK_KEY_ATTR = "pack_key"
#: Shard attribute holding the JSON list of catalog rows rejected while the shard was written.
PACK_REJECTED_ATTR = "rejected"

#: Placeholder in a `file` value naming one 2D FITS image per band (SDSS frame-style cutouts).
BAND_PLACEHOLDER = "{band}"
#: "Bands" of 8-bit colour images (PNG/JPEG); such packs are marked ``photometric: false``.
RGB_BANDS = "RGB"
RGB_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Catalog file formats by suffix: astropy.table format names, or "legacy-hdf5" (LEGACY_LAYOUT).
CATALOG_FORMATS = {
    ".fits": "fits",
    ".fit": "fits",
    ".fits.gz": "fits",
    ".csv": "ascii.csv",
    ".ecsv": "ascii.ecsv",
    ".parquet": "parquet",
    ".h5": "legacy-hdf5",
    ".hdf5": "legacy-hdf5",
}
#: Columns of OUT/rejected.csv, one line per rejected catalog row, sorted by row.
REJECTED_FIELDS = ("row", "object_id", "file", "reason")
