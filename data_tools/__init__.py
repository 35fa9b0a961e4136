"""Offline data tools: build shards from ChatML JSONL (`build_shards`), inspect and validate them (`shard_tools`)."""
