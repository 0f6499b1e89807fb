"""Load harness for the socket layer: ``python -m bench.run`` (``make bench``). See docs/benchmarks.md."""
