"""The data stages: ingest, validate, curate, tokenize, shard, and the token loader training reads."""
