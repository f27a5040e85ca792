"""Data: sources, validation, partitioned Parquet data sets, transforms and the loader."""
