"""Tutorial: similarity search over your own photos, from the command line and the service.

The shipped photos stand in for a folder of your own: embed them once, index them, ask for the
neighbours of one, then start `embedder serve` (a web page at / and an HTTP API described at
/openapi.json) and ask it the same question. Both answer from the same index in the same order.

Run:  python docs/tutorials/photo_search.py [DATA_DIR]      (DATA_DIR default: data)
"""

import contextlib
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from embedder.cli.main import main
from embedder.data.samples import make_samples

data = Path(sys.argv[1] if len(sys.argv) > 1 else "data")
photos = make_samples(data, only=["photos"])["photos"]
cache, index = data / "tutorials" / "out" / "photos.h5", data / "tutorials" / "out" / "photos.index"


def run(*argv: str) -> str:
    print("$ embedder " + " ".join(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(argv)) == 0
    return out.getvalue()


run("embed", str(photos), "--model", "efficientnet_lite0", "--out", str(cache), "--quiet")
run("index", str(cache), "--out", str(index), "--quiet")
query = min(photos.rglob("chelsea*"))
cli = json.loads(run("search", str(index), "--image", str(query), "-k", "3", "--json"))
print(f"\nneighbours of {query.name} (command line):")
for hit in cli["hits"]:
    print(f"  {hit['rank']}  {hit['score']:.4f}  {hit['path']}")

with socket.socket() as s:  # a free port for the service
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
print(f"\n$ embedder serve {index} --port {port}")
server = subprocess.Popen([sys.executable, "-m", "embedder", "serve", str(index), "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
try:
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):  # until it answers (it loads the index first)
        try:
            health = json.load(urllib.request.urlopen(f"{base}/health", timeout=5))
            break
        except OSError:
            time.sleep(0.1)
    print(f"GET /health -> {health['status']}, {health['ntotal']} rows")
    row = next(h["id"] for h in cli["hits"] if h["path"] == query.name)
    answer = json.load(urllib.request.urlopen(f"{base}/search/id/{row}?k=3", timeout=60))
    print(f"GET /search/id/{row}?k=3 (the service):")
    for hit in answer["hits"]:
        print(f"  {hit['rank']}  {hit['score']:.4f}  {hit['path']}")
finally:
    server.terminate()
    server.wait(30)
same = [h["path"] for h in answer["hits"]] == [h["path"] for h in cli["hits"]]
print(f"\nthe service and the command line give the same neighbours: {same}")
print(f"RESULT same_neighbours={same}")
print(f"RESULT nearest_other={cli['hits'][1]['path']}")
