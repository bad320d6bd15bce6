"""mongoveil's benchmark suite.

`make bench` runs `python -m bench.suite`, which prints the results and writes
bench/RESULTS.md.

Modules:

- `suite`: the run and its options
- `stack`: SecantusDB, the relay and the proxy as processes
- `workloads`: the pymongo workloads, and how one run is measured
- `peer`: pymongo with libmongocrypt
- `bulk_decrypt`, `idle_memory` (with `stub_upstream`): the other benchmarks
- `relay`: the plain TCP relay
- `procfs`: CPU time and memory from /proc
- `profiling`: py-spy profiles
- `report`, `targets`, `results`: figures, target checks and the page
"""
