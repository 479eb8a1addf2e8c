"""The notebook's first loop, as written there: one requests.get after another.

usage: notebook_sequential.py URLS.txt OUT_DIR
"""

import sys
from pathlib import Path

import requests

urls = Path(sys.argv[1]).read_text().split()
out = Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)

for url in urls:
    response = requests.get(url, timeout=30)
    response.raise_for_status()
    (out / url.rsplit("/", 1)[-1]).write_bytes(response.content)
