"""The benchmark harness behind ``python benchmarks/run.py``.

Data flow (one module per step, each importing only the ones above it)::

    env       apt tools + the peers' venv under benchmarks/.work/
    corpus    ~100 KB JPEGs (and small files for W4) + their sha256 manifest
    corpus    W6's camera-sized photos, 0.3-12 MP (make_photos.py)
    web       W5's site: 300 hosts on 127.10.x.y, CA + certificates, server blocks, hosts file
    origin    nginx + lua ngx.sleep on 127.0.0.1 (fallback: a Python origin process)
    tools     one command line per (tool, workload)
    measure   whole-process wall time, CPU, peak RSS of one command
    verify    did the tool really download every file
    workloads W1..W6 + startup, round-robin runner
    report    JSON, table, SVG bars, docs/benchmarks.md
"""
