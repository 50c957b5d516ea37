"""Benchmarks: speed and memory targets, measured in the real host (docs/BENCHMARKS.md has the figures).

Run from the repository's root as modules, e.g. `python -m bench.sampling --out DIR`, so that
`tests.support` (the host harness the tests use) and the pack's `guidance`/`training` import as they
do under pytest."""
