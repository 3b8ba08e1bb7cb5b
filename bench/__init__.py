"""Benchmarks (not tests). Run as modules from the repo root, e.g. `python -m bench.tokenize`:
as plain scripts, bench/ would sit first on sys.path and bench/tokenize.py would shadow the stdlib
`tokenize` module that torch and linecache import."""
