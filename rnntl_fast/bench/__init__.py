"""The benchmark behind `rnntl-fast bench`: cases (grids), workloads per provider,
interleaved timing, and the report. The command and its JSON schema: `rnntl_fast.bench.cli`
and docs/benchmarks.md."""
