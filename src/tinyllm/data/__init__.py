"""Data: sources (hub, local, builtin) -> documents -> token shards -> batches."""
