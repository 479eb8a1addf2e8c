"""requests + ThreadPoolExecutor(C), done well: one Session (keep-alive pool) per thread.

usage: requests_threads.py URLS.txt OUT_DIR CONCURRENCY
"""

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

urls = Path(sys.argv[1]).read_text().split()
out = Path(sys.argv[2])
concurrency = int(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
local = threading.local()


def session() -> requests.Session:
    if not hasattr(local, "session"):
        local.session = requests.Session()
    return local.session


def download(url: str) -> None:
    response = session().get(url, timeout=30)
    response.raise_for_status()
    (out / url.rsplit("/", 1)[-1]).write_bytes(response.content)


with ThreadPoolExecutor(max_workers=concurrency) as executor:
    list(executor.map(download, urls))
