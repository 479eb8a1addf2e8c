"""The notebook's second loop: ThreadPoolExecutor().map with the default worker count
(min(32, cpu_count + 4): 6 on a 2-core machine), requests.get without a session.

usage: notebook_threadpool.py URLS.txt OUT_DIR
"""

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

urls = Path(sys.argv[1]).read_text().split()
out = Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)


def download(url: str) -> None:
    response = requests.get(url, timeout=30)
    response.raise_for_status()
    (out / url.rsplit("/", 1)[-1]).write_bytes(response.content)


with ThreadPoolExecutor() as executor:
    list(executor.map(download, urls))
