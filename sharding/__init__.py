"""ssfer-shard: every dataset format -> verified WebDataset face shards + manifest.parquet (see cli.py)."""
