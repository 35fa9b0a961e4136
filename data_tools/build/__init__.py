"""The shard builder's parts (the command line is data_tools/build_shards.py): `samples` turns one JSONL line into a
sample in a worker process, `pool` orders the lines and runs them, `codec` encodes audio files, `staging` holds
the build until it succeeded, `writing` writes the splits and counts what was skipped."""
