"""Instruments for checking higgs-ds, used by the tests and benchmarks (never by training): the same batch fed to
transformers' HiggsAudioV2ForConditionalGeneration (port.py), and a count of the data-dependent ops of a step
(host_syncs.py)."""
