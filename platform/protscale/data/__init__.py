"""Protein data: FASTA in, packed Parquet shards plus a manifest out (``protscale data prepare``)."""
