"""The experiment harness: a Hydra job as phases (``job``), its settings, result folders and locks, tracking, the
environment record, evaluation (perplexity, zero-shot, RULER), the console summary and the latency benchmark.
It uses the library (``rap``); the library never imports it."""
