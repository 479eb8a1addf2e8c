"""The benchmark harness behind ``python benchmarks/run.py``.

Data flow (one module per step, each importing only the ones above it)::

    env       apt tools + the peers' venv under benchmarks/.work/
    corpus    ~100 KB JPEGs (and small files for W4) + their sha256 manifest
    origin    nginx + lua ngx.sleep on 127.0.0.1 (fallback: a Python origin process)
    tools     one command line per (tool, workload)
    measure   whole-process wall time, CPU, peak RSS of one command
    verify    did the tool really download every file
    workloads W1..W4 + startup, round-robin runner
    report    JSON, table, SVG bars, docs/benchmarks.md
"""
