"""parfive through its Python API: max_conn=C, one connection per file (no splitting).

usage: parfive_get.py URLS.txt OUT_DIR CONCURRENCY
"""

import sys
from pathlib import Path

from parfive import Downloader

urls = Path(sys.argv[1]).read_text().split()
out = Path(sys.argv[2])
concurrency = int(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)

downloader = Downloader(max_conn=concurrency, max_splits=1, progress=False)
for url in urls:
    downloader.enqueue_file(url, path=out)
results = downloader.download()
if results.errors:
    print(f"{len(results.errors)} errors; first: {results.errors[0]}", file=sys.stderr)
    sys.exit(1)
