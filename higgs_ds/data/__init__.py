"""Data path: ChatML → tokens + labels → shards → stream → collated batches. Knows no model or engine."""
