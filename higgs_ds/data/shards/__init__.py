"""Shard format: WebDataset tars of pre-tokenized samples, plus a per-split manifest (docs/design.md §7).

One split directory holds
  {split}-000000.tar           samples; tar key = the sample's position in the shard ("000000", no dots)
      .input_ids.npy            int32 [L]      text ids, one placeholder per audio segment
      .label_ids.npy            int32 [L]      -100 or equal to input_ids (labels are unshifted)
      .audio_codes.npy          int16 [K, ΣT]  every segment's codes, concatenated in order of appearance
                                               ([0, 0] for a sample without audio)
      .audio_lengths.npy        int32 [n]      T of each segment
      .meta.json                {"key": sample key, "meta": {...}}
  {split}-000000.lengths.npy   int32 [samples] expanded length of each sample in tar order (for batch planning)
  manifest.json                per-shard counts, totals and the data fingerprint
Only .npy (loaded with allow_pickle=False) and JSON: data never executes. Every file is written to a temporary
name and renamed, so a crash never leaves a half-written file under a final name.
"""
from .manifest import COUNTS, FORMAT, MANIFEST, Manifest, ShardInfo, check_fingerprint, data_fingerprint
from .sample_codec import FIELDS, ShardError, decode_sample, encode_sample, sample_counts
from .tar_reader import Stray, read_shard, shard_entries, tar_complete, tar_problem
from .files import atomic_write, file_sha256
from .location import FetchError, is_remote
from .writer import SplitWriter

__all__ = ["COUNTS", "FIELDS", "FORMAT", "FetchError", "MANIFEST", "Manifest", "ShardError", "ShardInfo",
           "SplitWriter", "Stray", "atomic_write", "check_fingerprint", "data_fingerprint", "decode_sample",
           "encode_sample", "file_sha256", "is_remote", "read_shard", "sample_counts", "shard_entries",
           "tar_complete", "tar_problem"]
