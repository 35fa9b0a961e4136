"""higgs-ds: training stack for Higgs Audio v2 (shards → stream → collate → model+loss → engine → hooks)."""
