"""What answers the uploads of `mm serve`: the `Assistant` protocol, `CheckpointAssistant` (stage final folders
loaded through the stage registry: an image folder captions images, a video folder describes videos, a speech
folder transcribes audio), and how an upload's kind is found (its extension, else its declared content type,
else its first bytes) and checked (the project's own decoders: PIL for images, decord for video, soundfile for
audio)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from mm.datasets.audio import AUDIO_EXTENSIONS
from mm.datasets.images import IMAGE_EXTENSIONS
from mm.datasets.video import VIDEO_EXTENSIONS

KINDS: tuple[str, ...] = ("image", "video", "audio")
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image": IMAGE_EXTENSIONS,
    "video": VIDEO_EXTENSIONS,
    "audio": AUDIO_EXTENSIONS,
}
# The inference command that reads a stage's final folder (`Stage.reader`) -> the upload kind it answers.
COMMAND_KIND = {"caption": "image", "describe": "video", "transcribe": "audio"}
VERB = {"image": "captions images", "video": "describes videos", "audio": "transcribes audio"}
CONTENT_TYPES = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "video/mp4": "mp4",
    "video/webm": "webm",
    "video/x-matroska": "mkv",
    "video/quicktime": "mov",
    "video/x-msvideo": "avi",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/wave": "wav",
    "audio/flac": "flac",
    "audio/x-flac": "flac",
    "audio/ogg": "ogg",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
}
ChatFn = Callable[[str, Path, str], str]


class UploadError(Exception):
    """A refused request: the HTTP status (4xx) and a message for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Assistant(Protocol):
    """What `mm serve` asks: which upload kinds it serves, and the answer for one upload (and question)."""

    def kinds(self) -> list[str]:
        """The upload kinds it serves: "image", "video", "audio"."""
        ...

    def respond(self, kind: str, path: Path, question: str | None) -> str:
        """The answer for the file at `path` of `kind` (and the user's question, or None)."""
        ...


def accepted(kinds: Sequence[str]) -> str:
    """The accepted types in words, e.g. `image (.jpg, .jpeg, .png), audio (.wav, .flac, .ogg)`."""
    return ", ".join(f"{k} ({', '.join('.' + e for e in EXTENSIONS[k])})" for k in kinds)


def sniff(head: bytes) -> tuple[str, str] | None:
    """(kind, extension) that a file's first bytes announce (PNG, JPEG, WAV, FLAC, Ogg, MP3, MP4/MOV,
    Matroska/WebM, AVI), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio", "wav"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video", "avi"
    if head.startswith(b"fLaC"):
        return "audio", "flac"
    if head.startswith(b"OggS"):
        return "audio", "ogg"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "audio", "mp3"  # an ID3 tag or an MPEG audio frame sync
    if head[4:8] == b"ftyp":
        return "video", "mp4"
    if head.startswith(b"\x1aE\xdf\xa3"):
        return "video", "mkv"
    return None


def upload_kind(filename: str, content_type: str, head: bytes, kinds: Sequence[str]) -> tuple[str, str]:
    """(kind, extension) of an upload: its file extension, else its part's content type, else its first bytes;
    UploadError 415 naming the accepted types when none is one of `kinds`."""
    ext = Path(filename).suffix.lower().lstrip(".")
    found = [(k, ext) for k in KINDS if ext in EXTENSIONS[k]]
    if not found and not ext and content_type in CONTENT_TYPES:
        e = CONTENT_TYPES[content_type]
        found = [(k, e) for k in KINDS if e in EXTENSIONS[k]]
    if not found and not ext and sniff(head):
        found = [sniff(head)]  # type: ignore[list-item]
    if not found or found[0][0] not in kinds:
        article = {"image": "an image", "video": "a video", "audio": "an audio"}
        what = f"{article[found[0][0]]} file" if found else f"of type {ext or content_type or 'unknown'}"
        raise UploadError(415, f"{filename or 'the upload'} is {what}; this server accepts {accepted(kinds)}")
    return found[0]


def check_readable(kind: str, path: Path, name: str) -> None:
    """UploadError 400 naming the file when it is not a readable file of `kind` (decoded by the project's own
    readers; the message says what its first bytes look like when they announce another kind)."""
    from PIL import Image

    from mm.datasets.skips import BadSample

    try:
        if kind == "image":
            from mm.models.caption import load_rgb

            load_rgb(path)
        elif kind == "video":
            from mm.datasets.video import decode_clip

            first_video_frame(path)  # PyAV refuses a broken file quietly (decord's FFmpeg writes to stderr)
            decode_clip(path, 1)
        else:
            from mm.datasets.audio import decode_audio

            decode_audio(path)
    except (OSError, ValueError, BadSample, Image.DecompressionBombError) as e:
        detail = str(e).replace(str(path), name)
        with path.open("rb") as f:
            other = sniff(f.read(16))
        hint = f" (its bytes look like {other[0]} .{other[1]})" if other and other[0] != kind else ""
        raise UploadError(400, f"{name} is not a readable {kind}{hint}: {detail}") from None


def first_video_frame(path: Path) -> None:
    """ValueError unless PyAV opens `path` and decodes one frame of a video stream (PyAV logs nothing)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("it has no video stream")
            next(container.decode(video=0))
    except av.FFmpegError as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    except StopIteration:
        raise ValueError("its video stream has no frame") from None


class CheckpointAssistant:
    """Answers uploads with stage final folders: image -> caption, video -> description, audio -> transcript.
    Each folder loads through the stage registry (its stage's `load_final`); at most one folder per kind. A
    question goes to `chat(kind, path, question)` when given (a chat-capable model), else it is refused; an
    upload of a kind no folder answers but `chat_kinds` names goes to the chat with "describe the image.",
    "describe the video." or "transcribe it."."""

    def __init__(
        self, dirs: Sequence[str | Path], chat: ChatFn | None = None, chat_kinds: Sequence[str] = ()
    ) -> None:
        from mm.app.infer_commands import stage_of_checkpoint
        from mm.training.stage import stage_class, stage_readers

        if not dirs and chat is None:
            raise ValueError(
                "mm serve: give at least one --checkpoint (an image, video or speech stage folder)"
            )
        readers = stage_readers()
        self.folders: dict[str, Path] = {}
        self.loaded: dict[str, Any] = {}
        for d in map(Path, dirs):
            if not d.is_dir():
                raise FileNotFoundError(f"--checkpoint {d}: no such folder")
            stage = stage_of_checkpoint(d)
            kind = COMMAND_KIND.get(readers.get(stage or "", ""))
            if kind is None:
                served = [s for s, c in readers.items() if c in COMMAND_KIND]
                what = f"holds a {stage!r} checkpoint" if stage else "is not a stage final folder"
                raise ValueError(
                    f"--checkpoint {d} {what}; mm serve answers with the final folders of {', '.join(served)}"
                )
            if kind in self.folders:
                raise ValueError(
                    f"--checkpoint {d} and {self.folders[kind]} both answer {kind} uploads; give one"
                )
            self.folders[kind], self.loaded[kind] = d, stage_class(stage).load_final(d)
        self.chat, self.chat_kinds = chat, tuple(chat_kinds) if chat is not None else ()
        self.lock = threading.Lock()  # one model call at a time (the server answers requests in threads)

    def kinds(self) -> list[str]:
        """The kinds a loaded folder (or the chat hook) answers, in the order image, video, audio."""
        return [k for k in KINDS if k in self.folders or k in self.chat_kinds]

    def respond(self, kind: str, path: Path, question: str | None) -> str:
        """A caption, description or transcript; with a question, the chat hook's answer."""
        if question or kind not in self.folders:
            if self.chat is None or (kind not in self.chat_kinds and kind not in self.folders):
                raise UploadError(
                    400,
                    f"this checkpoint {VERB[kind]}; questions need a chat (vision-sft) checkpoint",
                )
            default = {"image": "describe the image.", "video": "describe the video."}.get(
                kind, "transcribe it."
            )
            with self.lock:
                return self.chat(kind, path, question or default)
        with self.lock:
            return {"image": self._caption, "video": self._describe, "audio": self._transcribe}[kind](path)

    def _caption(self, path: Path) -> str:
        """`mm caption`'s caption of one image."""
        from mm.models.caption import caption_images, load_rgb

        model, tok, transform, meta = self.loaded["image"]
        images = [load_rgb(path)]
        return caption_images(
            model, tok, transform, images, prompt=meta["prompt"], max_tiles=meta["max_tiles"]
        )[0]

    def _describe(self, path: Path) -> str:
        """`mm describe`'s description of one video."""
        from mm.models.video import describe_videos

        model, tok, transform, meta = self.loaded["video"]
        return describe_videos(model, tok, transform, meta, [path])[0]

    def _transcribe(self, path: Path) -> str:
        """`mm transcribe`'s transcript of one audio file (the stage's own prompt)."""
        from mm.models.speech import transcribe_features

        model, tok, features, meta = self.loaded["audio"]
        return transcribe_features(model, tok, [features.load(path)], prompt=meta["prompt"])[0]
