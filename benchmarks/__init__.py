"""Speed, memory and accuracy measurements against peers: run each as `python -m benchmarks.NAME` from the
repository root (benchmarks/README.md lists them). Nothing here is a test.

Being a package, no benchmark file can shadow an installed package or a standard module (a script run as
`python benchmarks/NAME.py` puts this folder first on `sys.path`). Pieces several benchmarks share live once
each: `timing` (interleaved rounds, device-synced wall time), `serve_process` (`gpt2chat serve` as a child
process, ready at /health), `peers` (transformers, TRL and llama.cpp set up the same way everywhere),
`gpu_table` (the GPU check's rows and state, shared by `gpu_check` and `gpu_speed`).
"""
