"""`mm serve`: a local web server (standard library `http.server`, bound to 127.0.0.1 only) in front of an
`Assistant`. GET / is one self-contained HTML page (`serve_page`); POST /api/ask takes multipart/form-data
(`file`, optional `question`) and answers JSON {"answer": ...}, or {"error": ...} with a 4xx for a refused
request (411 no length, 413 over the size limit, checked from Content-Length before the body is read; 415 a
type the server does not answer; 400 a corrupt file or a malformed form) and a 500 for a failure while
answering, after which the server goes on serving. Each request is one `logging` line; the upload lives in a
temporary folder removed after the answer."""

from __future__ import annotations

import argparse
import email.parser
import email.policy
import json
import logging
import sys
import tempfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mm.app.serve_assistant import (
    Assistant,
    CheckpointAssistant,
    UploadError,
    accepted,
    check_readable,
    upload_kind,
)
from mm.app.serve_page import megabytes, page

__all__ = ["Assistant", "AskServer", "CheckpointAssistant", "UploadError", "cmd_serve", "make_server"]

log = logging.getLogger("mm.app.serve")
LOOPBACK = ("127.0.0.1", "localhost")
DEFAULT_MAX_UPLOAD_MB = 64.0
DRAIN_LIMIT = 1 << 30  # unread request bytes discarded before closing (so the client reads the reply)


def read_form(content_type: str, body: bytes) -> dict[str, tuple[str | None, str, bytes]]:
    """The fields of a multipart/form-data body: name -> (filename or None, part content type, bytes);
    UploadError 400 when the body is not such a form."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1", "replace")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise UploadError(400, "POST /api/ask takes multipart/form-data with a `file` field")
    fields: dict[str, tuple[str | None, str, bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str) and name not in fields:
            fields[name] = (
                part.get_filename(),
                part.get_content_type(),
                part.get_payload(decode=True) or b"",
            )
    return fields


def mb(n: int) -> str:
    """A byte count in MB, e.g. `0.0977 MB (102400 bytes)`."""
    return f"{megabytes(n)} ({n} bytes)"


class AskHandler(BaseHTTPRequestHandler):
    """GET / (the page) and POST /api/ask (an answer as JSON) for an `AskServer`."""

    server: AskServer
    server_version = "mm-serve"
    timeout = 60  # seconds a stalled client may hold a request thread

    def log_message(self, format: str, *args: Any) -> None:
        """One `logging` line per request (not the base class's stderr write)."""
        log.info("%s %s", self.address_string(), format % args)

    def send_json(self, status: int, obj: dict[str, str]) -> None:
        """Answer `obj` as JSON with `status`."""
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def allowed(self) -> bool:
        """False (after a 403) for a request whose Host or Origin is not this loopback server (a page of
        another site, or a DNS-rebound name)."""
        port = self.server.server_address[1]
        hosts = {h for name in LOOPBACK for h in (name, f"{name}:{port}")}
        host = self.headers.get("Host")
        origin = self.headers.get("Origin")
        if (host is None or host in hosts) and (origin is None or origin in {f"http://{h}" for h in hosts}):
            return True
        self.send_json(403, {"error": f"mm serve answers http://127.0.0.1:{port}/ only (Host {host!r})"})
        return False

    def do_GET(self) -> None:
        """The page at /; JSON 404 elsewhere."""
        if not self.allowed():
            return
        path = self.path.split("?", 1)[0]
        if path == "/":
            data = page(self.server.assistant.kinds(), self.server.max_upload_bytes).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif path == "/api/ask":
            self.send_json(405, {"error": "POST a multipart/form-data form with a `file` field to /api/ask"})
        else:
            self.send_json(404, {"error": f"no page {path}; the page is at /"})

    def do_POST(self) -> None:
        """POST /api/ask: the answer, or the refusal, as JSON."""
        length = self.headers.get("Content-Length", "0")
        self.unread = int(length) if length.isdigit() else 0  # drained after a refusal
        try:
            if not self.allowed():
                return
            if self.path.split("?", 1)[0] != "/api/ask":
                raise UploadError(404, f"no endpoint {self.path}; POST uploads to /api/ask")
            self.send_json(200, {"answer": self.answer()})
        except UploadError as e:
            self.send_json(e.status, {"error": e.message})
        except Exception as e:  # any failure while answering: a 500, and the server keeps serving
            log.error("POST %s failed: %s: %s", self.path, type(e).__name__, e)
            log.debug("traceback", exc_info=True)
            self.send_json(500, {"error": f"the server failed while answering: {type(e).__name__}: {e}"})
        finally:
            self.drain()

    def drain(self) -> None:
        """Discard a refused request's unread body (up to DRAIN_LIMIT bytes): closing a socket with unread
        data resets the connection, and the client would lose the reply."""
        left = min(self.unread, DRAIN_LIMIT)
        self.close_connection = True
        try:
            self.connection.settimeout(5)
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def answer(self) -> str:
        """Check the request's size and form, store the upload in a temporary folder, check it is a readable
        file of its kind, and ask the assistant."""
        limit = self.server.max_upload_bytes
        length = self.headers.get("Content-Length")
        if length is None:
            raise UploadError(411, "the request has no Content-Length; send the form with its length")
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n < 0:
            raise UploadError(400, f"Content-Length {length!r} is not a number of bytes")
        if n > limit:
            raise UploadError(
                413,
                f"the upload is {mb(n)}; this server accepts at most {mb(limit)} (mm serve --max-upload-mb)",
            )
        content_type = self.headers.get("Content-Type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise UploadError(400, "POST /api/ask takes multipart/form-data with a `file` field")
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            raise UploadError(408, f"the request body did not arrive within {self.timeout} s") from None
        self.unread = 0
        if len(body) < n:
            raise UploadError(400, f"the request body ended after {len(body)} of {n} bytes")
        fields = read_form(content_type, body)
        if "file" not in fields or not fields["file"][2]:
            raise UploadError(400, f"the form has no `file` (or an empty one); send one of {self.accepts()}")
        filename, part_type, data = fields["file"]
        name = Path(filename or "the upload").name[:200]
        question = fields.get("question", (None, "", b""))[2].decode("utf-8", "replace").strip() or None
        kind, ext = upload_kind(name, part_type, data[:16], self.server.assistant.kinds())
        with tempfile.TemporaryDirectory(prefix="mm-serve-") as tmp:
            path = Path(tmp) / f"upload.{ext}"
            path.write_bytes(data)
            check_readable(kind, path, name)
            return self.server.assistant.respond(kind, path, question)

    def accepts(self) -> str:
        """The types this server accepts, in words."""
        return accepted(self.server.assistant.kinds())


class AskServer(ThreadingHTTPServer):
    """The `mm serve` HTTP server: an `Assistant`, the upload size limit, one thread per request."""

    daemon_threads = True

    def __init__(self, assistant: Assistant, port: int, max_upload_bytes: int) -> None:
        self.assistant, self.max_upload_bytes = assistant, max_upload_bytes
        super().__init__(("127.0.0.1", port), AskHandler)

    def handle_error(self, request: Any, client_address: tuple[str, int]) -> None:
        """A request that failed outside the answer (e.g. the client left): one log line, not a traceback."""
        e = sys.exc_info()[1]
        log.warning("request from %s failed: %s: %s", client_address[0], type(e).__name__, e)

    @property
    def url(self) -> str:
        """The page's address, e.g. http://127.0.0.1:8000/."""
        return f"http://127.0.0.1:{self.server_address[1]}/"


def make_server(
    assistant: Assistant,
    *,
    port: int = 0,
    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 2**20),
    host: str = "127.0.0.1",
) -> AskServer:
    """An `AskServer` on 127.0.0.1:`port` (0: a free port); any host other than the loopback is refused."""
    check_options(host, port, max_upload_bytes)
    try:
        return AskServer(assistant, port, max_upload_bytes)
    except OSError as e:
        raise ValueError(f"--port {port}: cannot listen on 127.0.0.1:{port}: {e.strerror or e}") from None


def check_options(host: str, port: int, max_upload_bytes: int) -> None:
    """ValueError naming the option for a host other than the loopback, a port out of range or a limit <= 0."""
    if host not in LOOPBACK:
        raise ValueError(
            f"--host {host}: mm serve binds 127.0.0.1 only (it has no authentication); "
            "reach it from another machine through an SSH tunnel (ssh -L PORT:127.0.0.1:PORT)"
        )
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: a TCP port is 0 (any free one) to 65535")
    if max_upload_bytes <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {max_upload_bytes / 2**20:g}")


def chat_folders(dirs: list[str]) -> tuple[list[str], Any, tuple[str, ...]]:
    """Split the --checkpoint folders: a chat (vision-sft) folder answers questions (and images and videos no
    other folder captions); the others load as they are. Returns (other folders, chat hook, its kinds)."""
    from mm.app.infer_commands import stage_of_checkpoint

    chats = [d for d in dirs if stage_of_checkpoint(Path(d)) == "vision-sft"]
    if len(chats) > 1:
        raise ValueError(f"--checkpoint {chats[0]} and {chats[1]} are both chat folders; give one")
    if not chats:
        return list(dirs), None, ()
    from mm.models.chat import Chat

    session = Chat.load(Path(chats[0]))

    def ask(kind: str, path: Path, question: str) -> str:
        session.reset()  # each upload is a conversation of its own
        if kind == "video":
            return session.ask(question, video=path)
        return session.ask(question, images=[path])

    kinds = ("image", "video") if session.model.video_xattn is not None else ("image",)
    return [d for d in dirs if d not in chats], ask, kinds


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the page and /api/ask for the given stage folders until Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    limit_mb = DEFAULT_MAX_UPLOAD_MB if args.max_upload_mb is None else args.max_upload_mb
    limit = int(limit_mb * 2**20)
    check_options(args.host, args.port, limit)  # before the folders load
    dirs, chat, chat_kinds = chat_folders(args.checkpoint)
    assistant = CheckpointAssistant(dirs, chat=chat, chat_kinds=chat_kinds)
    server = make_server(assistant, port=args.port, max_upload_bytes=limit, host=args.host)
    folders = ", ".join(f"{k} -> {d}" for k, d in assistant.folders.items())
    print(f"mm serve: {server.url} ({folders}); Ctrl-C stops it", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
