"""A loopback stand-in for the Hugging Face hub's file endpoint (`HF_ENDPOINT`): HEAD and GET of
`/{repo}/resolve/{revision}/{filename}` answered from `folder/{repo}/{filename}` with the headers
huggingface_hub reads (X-Repo-Commit, ETag, Content-Length); 404 with X-Error-Code EntryNotFound else."""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "1" * 40


class _HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _file(self) -> Path | None:
        repo_and_rest = self.path.split("?")[0].lstrip("/")
        if "/resolve/" not in repo_and_rest:
            return None
        repo, _, rest = repo_and_rest.partition("/resolve/")
        filename = rest.partition("/")[2]
        file = self.server.folder / repo / filename
        return file if file.is_file() else None

    def _answer(self, body: bool) -> None:
        self.server.hits[(self.command, self.path)] += 1
        file = self._file()
        if file is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Error-Message", "Entry not found")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)


class LoopbackHub:
    """`with LoopbackHub(folder) as hub:` then HF_ENDPOINT (huggingface_hub.constants.ENDPOINT) = hub.base."""

    def __init__(self, folder: Path):
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
        self._server.daemon_threads = True
        self._server.folder = Path(folder)
        self._server.hits = Counter()
        self.hits = self._server.hits
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
