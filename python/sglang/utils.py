"""Small helpers SGLang programs import from `sglang.utils` (no torch, no server)."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, List, Optional

import requests

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "sglang")


def download_and_cache_file(url: str, filename: Optional[str] = None, timeout: float = 60.0) -> str:
    """Download `url` to `filename` (default: ~/.cache/sglang/<last part of the url>) unless it is already
    there; returns the path. A partial download never replaces a complete file."""
    if filename is None:
        os.makedirs(CACHE_DIR, exist_ok=True)
        filename = os.path.join(CACHE_DIR, url.rstrip("/").split("/")[-1] or "download")
    if os.path.isfile(filename) and os.path.getsize(filename) > 0:
        return filename
    tmp = filename + ".part"
    with requests.get(url, stream=True, timeout=timeout) as r:
        r.raise_for_status()
        total = int(r.headers.get("content-length", 0)) or None
        from tqdm import tqdm

        with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(filename)) as bar:
            for chunk in r.iter_content(chunk_size=1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    os.replace(tmp, filename)
    return filename


def read_jsonl(filename: str) -> Iterator[Any]:
    """The JSON values of a JSON-lines file, one per non-empty line."""
    with open(filename, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def is_file_valid_json(path: Optional[str]) -> bool:
    if not path or not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False
