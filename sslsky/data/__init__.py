"""Data: the mock survey, FITS I/O, packing into HDF5 shards, reading them back."""
