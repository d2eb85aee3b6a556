"""Protein data: FASTA in, packed Parquet shards plus a manifest out (``protscale data prepare``)."""

from .bundled import EXTRA, MAIN, OOD, bundled_path  # noqa: E402  (the demo/test proteins, CC BY 4.0)

__all__ = ["EXTRA", "MAIN", "OOD", "bundled_path"]
