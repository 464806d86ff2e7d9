"""`mm serve` with a real (tiny) image-stage checkpoint: plain HTTP requests check each rule (the page, a caption
equal to `mm caption`'s, 413 before the body is read, 415, 400 for a corrupt file, 400 for a question without a
chat checkpoint, the chat hook, a 500 after which the server still answers, loopback only), and headless
Chromium (Selenium) drives the page: a PNG is captioned, a corrupt PNG and an oversized file are refused, and
a good upload is still answered afterwards. The browser test is skipped only when chromium or chromedriver is
not installed (`make test` installs them)."""

from __future__ import annotations

import http.client
import json
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from mm.app.serve import CheckpointAssistant, make_server
from mm.models.caption import caption_images, load_rgb
from mm.training.runner import run
from mm.training.stage import reader_stage
from mm.world import synth_shapes

SPEECH_ENCODER = [
    "speech_encoder.dim=32",
    "speech_encoder.n_layers=1",
    "speech_encoder.n_heads=2",
    "speech_encoder.ffn_dim=64",
]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
LIMIT = 40_000  # bytes per request in these tests


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, corpus, stage_helpers):
    """An image-pretrain final folder (nano LM, tiny encoder, 1 step) and two of its training images."""
    h = stage_helpers
    root = tmp_path_factory.mktemp("serve")
    lm = h["nano_lm"](root, corpus)
    shapes = synth_shapes(root, n=4, seed=0, split="train")
    overrides = [*h["image_overrides"](lm, shapes), "train.max_steps=1", "train.batch_size=2"]
    cfg = h["stage_config"]("image-pretrain", "configs/stages/image_pretrain_tiny.yaml", overrides)
    cfg.out = str(root / "image")
    run(cfg)
    images = sorted((root / "shapes" / "train").glob("*.png"))[:2]
    return {"final": root / "image" / "final", "images": images, "root": root}


@pytest.fixture(scope="module")
def expected(bundle):
    """`mm caption`'s caption of each test image (the stage's own loader and captioner)."""
    model, tok, transform, meta = reader_stage("caption").load_final(bundle["final"])
    images = [load_rgb(p) for p in bundle["images"]]
    caps = caption_images(model, tok, transform, images, prompt=meta["prompt"], max_tiles=meta["max_tiles"])
    return dict(zip(bundle["images"], caps))


def serving(assistant, limit: int = LIMIT):
    """A started server (a daemon thread) on a free port."""
    server = make_server(assistant, port=0, max_upload_bytes=limit)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server(bundle):
    server = serving(CheckpointAssistant([bundle["final"]]))
    yield server
    server.shutdown()
    server.server_close()


def form(fields: dict[str, tuple]) -> tuple[str, bytes]:
    """(content type, body) of a multipart/form-data form: name -> (filename or None, bytes[, part type])."""
    b = uuid.uuid4().hex
    body = b""
    for name, (filename, data, *ctype) in fields.items():
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        head = f"Content-Disposition: {disp}\r\n" + "".join(f"Content-Type: {t}\r\n" for t in ctype)
        body += f"--{b}\r\n{head}\r\n".encode() + data + b"\r\n"
    return f"multipart/form-data; boundary={b}", body + f"--{b}--\r\n".encode()


def post(server, fields=None, *, body=None, headers=None) -> tuple[int, dict]:
    """POST /api/ask; (status, JSON reply)."""
    ctype, data = form(fields or {})
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    conn.request(
        "POST",
        "/api/ask",
        body=data if body is None else body,
        headers={"Content-Type": ctype, **(headers or {})},
    )
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def test_http_caption_equals_mm_caption_and_each_refusal_names_its_cause(server, bundle, expected, tmp_path):
    png = bundle["images"][0]
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    conn.request("GET", "/")
    page = conn.getresponse().read().decode()
    assert 'id="answer"' in page and 'id="error"' in page and "captions images" in page
    assert "<script src" not in page and "<link" not in page  # self-contained

    assert post(server, {"file": ("a.png", png.read_bytes())}) == (200, {"answer": expected[png]})
    jpg = tmp_path / "a.jpg"
    load_rgb(png).save(jpg, quality=100)  # another extension and format: a JPEG of the same image
    status, reply = post(server, {"file": ("a.jpg", jpg.read_bytes())})
    assert status == 200 and isinstance(reply["answer"], str)

    status, reply = post(server, {"file": ("broken.png", png.read_bytes()[:200])})
    assert status == 400 and reply["error"].startswith("broken.png is not a readable image")
    status, reply = post(server, {"file": ("sound.wav", b"RIFF0000WAVEfmt ")})
    assert status == 415 and "sound.wav is an audio file" in reply["error"] and ".png" in reply["error"]
    status, reply = post(server, {"file": ("notes.txt", b"hello")})
    assert status == 415 and "image (.jpg, .jpeg, .png)" in reply["error"]
    status, reply = post(server, {"file": ("a.png", png.read_bytes()), "question": (None, b"what colour?")})
    assert status == 400
    assert reply["error"] == "this checkpoint captions images; questions need a chat (vision-sft) checkpoint"
    status, reply = post(server, {"question": (None, b"hi")})
    assert status == 400 and "no `file`" in reply["error"]
    status, reply = post(server, body=b"x" * 10, headers={"Content-Type": "text/plain"})
    assert status == 400 and "multipart/form-data" in reply["error"]


def test_http_oversized_upload_is_refused_from_its_length_before_the_body_is_read(server, bundle, expected):
    """Content-Length says 10 MB but only the headers are sent: the 413 comes back without waiting for a body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    conn.putrequest("POST", "/api/ask")
    conn.putheader("Content-Type", "multipart/form-data; boundary=x")
    conn.putheader("Content-Length", str(10 * 2**20))
    conn.endheaders()
    r = conn.getresponse()
    reply = json.loads(r.read())
    assert r.status == 413
    assert reply["error"] == (
        "the upload is 10 MB (10485760 bytes); this server accepts at most 0.0381 MB (40000 bytes) "
        "(mm serve --max-upload-mb)"
    )
    conn.close()
    big = {"file": ("big.png", bundle["images"][0].read_bytes() + b"\0" * LIMIT)}
    assert post(server, big)[0] == 413  # a whole oversized body is refused (and drained) too
    png = bundle["images"][1]
    assert post(server, {"file": ("b.png", png.read_bytes())}) == (200, {"answer": expected[png]})


class Flaky:
    """An assistant that fails on its first answer, then says what it was given."""

    def __init__(self) -> None:
        self.calls, self.paths = 0, []

    def kinds(self) -> list[str]:
        return ["image", "video", "audio"]

    def respond(self, kind: str, path: Path, question: str | None) -> str:
        self.calls += 1
        self.paths.append(path)
        if self.calls == 1:
            raise RuntimeError("out of memory")
        size = Image.open(path).size if kind == "image" else sf.info(str(path)).frames
        return f"{kind} {path.suffix} {size} {question}"


def test_a_failure_while_answering_is_a_500_and_the_server_keeps_serving(bundle, tmp_path):
    flaky = Flaky()
    server = serving(flaky)
    try:
        png = bundle["images"][0]
        status, reply = post(server, {"file": ("a.png", png.read_bytes())})
        assert status == 500 and reply == {
            "error": "the server failed while answering: RuntimeError: out of memory"
        }
        status, reply = post(server, {"file": ("a.png", png.read_bytes()), "question": (None, b" which? ")})
        assert (status, reply) == (200, {"answer": f"image .png {Image.open(png).size} which?"})
        sf.write(tmp_path / "tone.wav", np.zeros(1600, dtype=np.float32), 16000)
        wav = (tmp_path / "tone.wav").read_bytes()
        assert post(server, {"file": ("tone.wav", wav)}) == (200, {"answer": "audio .wav 1600 None"})
        assert post(server, {"file": ("blob", wav)}) == (200, {"answer": "audio .wav 1600 None"})  # sniffed
        sf.write(tmp_path / "tone.mp3", 0.1 * np.sin(np.arange(16000) / 5.0).astype(np.float32), 16000)
        mp3 = (tmp_path / "tone.mp3").read_bytes()
        frames = sf.info(str(tmp_path / "tone.mp3")).frames
        for part in (("voice.mp3", mp3), ("blob", mp3, "audio/mpeg"), ("blob", mp3)):  # name, type, bytes
            assert post(server, {"file": part}) == (200, {"answer": f"audio .mp3 {frames} None"}), part[2:]
        status, reply = post(server, {"file": ("voice.wav", b"RIFF\0\0\0\0WAVEjunk")})
        assert status == 400 and reply["error"].startswith("voice.wav is not a readable audio")
        status, reply = post(server, {"file": ("clip.mp4", b"\0\0\0\x18ftypmp42" + b"\0" * 100)})
        assert status == 400 and reply["error"].startswith("clip.mp4 is not a readable video")
        status, reply = post(server, {"file": ("photo.png", wav)})
        assert status == 400 and reply["error"].startswith(
            "photo.png is not a readable image (its bytes look like audio .wav)"
        )
        assert flaky.calls == 7 and not [
            p for p in flaky.paths if p.parent.exists()
        ]  # temporary files removed
    finally:
        server.shutdown()
        server.server_close()


def test_checkpoint_assistant_chat_hook_and_loopback_only(bundle, tmp_path, capsys):
    from mm.app.cli import main

    assert main(["serve", "--checkpoint", str(bundle["final"]), "--host", "0.0.0.0"]) == 2
    assert "mm serve: error: --host 0.0.0.0: mm serve binds 127.0.0.1 only" in capsys.readouterr().err
    asked = []
    assistant = CheckpointAssistant([bundle["final"]], chat=lambda k, p, q: asked.append((k, q)) or "red")
    assert assistant.respond("image", bundle["images"][0], "what colour is it?") == "red"
    assert asked == [("image", "what colour is it?")] and assistant.kinds() == ["image"]
    both = CheckpointAssistant([bundle["final"]], chat=lambda k, p, q: f"{k}: {q}", chat_kinds=["video"])
    assert both.kinds() == ["image", "video"]
    assert both.respond("video", bundle["images"][0], None) == "video: describe the video."
    with pytest.raises(ValueError, match="binds 127.0.0.1 only"):
        make_server(assistant, host="0.0.0.0")
    with pytest.raises(ValueError, match="is not a stage final folder"):
        CheckpointAssistant([tmp_path])
    server = serving(assistant)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        conn.request("GET", "/", headers={"Host": "evil.example:80"})
        assert conn.getresponse().status == 403
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="chromium and chromedriver are not installed (apt-get install chromium chromium-driver; make test does)",
)
def test_browser_uploads_are_answered_refused_and_answered_again(bundle, expected, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = serving(CheckpointAssistant([bundle["final"]]))
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        driver.get(server.url)

        def ask(path: Path) -> tuple[str, str, str]:
            """Upload a file, submit, wait for the reply; (state, #answer, #error)."""
            driver.execute_script("document.body.dataset.state = 'idle'")
            driver.find_element(By.ID, "file").send_keys(str(path))
            driver.find_element(By.ID, "submit").click()
            WebDriverWait(driver, 30).until(
                lambda d: (
                    d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("answered", "failed")
                )
            )
            state = driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")
            text = [driver.find_element(By.ID, i).get_attribute("textContent") for i in ("answer", "error")]
            return state, text[0], text[1]

        good = bundle["images"][0]
        assert ask(good) == ("answered", expected[good], "")
        corrupt = tmp_path / "corrupt.png"
        corrupt.write_bytes(good.read_bytes()[:100])
        state, answer, error = ask(corrupt)
        assert (state, answer) == ("failed", "") and error.startswith("corrupt.png is not a readable image")
        big = tmp_path / "big.png"
        big.write_bytes(good.read_bytes() + b"\0" * LIMIT)
        state, answer, error = ask(big)
        assert (state, answer) == ("failed", "") and "at most 0.0381 MB (40000 bytes)" in error
        other = bundle["images"][1]
        assert ask(other) == ("answered", expected[other], "")
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()


def test_video_and_audio_folders_describe_and_transcribe_as_mm_describe_and_transcribe(
    bundle, corpus, stage_helpers
):
    """One server with an image, a video and a speech folder (1-step stages): each kind goes to its own
    folder and answers what `mm describe` / `mm transcribe` (the same functions) give."""
    from mm.models.speech import transcribe_features
    from mm.models.video import describe_videos
    from mm.world import synth_motion
    from mm.world.speech import synth_speech

    h, root = stage_helpers, bundle["root"]
    clips = synth_motion(root, n=2, seed=0, split="train")
    speech = synth_speech(root, n=2, split="train")
    one = ["train.max_steps=1", "train.batch_size=2", "eval_samples=0", "curve_samples=0"]
    video = [
        f"init_from={bundle['final']}",
        f"data.train=[{clips}]",
        "aggregator.merge=2",
        "aggregator.n_latents=4",
        "aggregator.depth=1",
        "aggregator.n_heads=2",
        "data.n_frames=4",
        *one,
    ]
    lm = root / "lm"
    audio = [f"lm={lm}", f"data.train=[{speech}]", *SPEECH_ENCODER, *one]
    for name, preset, overrides in (
        ("video", "configs/stages/video_tiny.yaml", video),
        ("speech", "configs/stages/speech_tiny.yaml", audio),
    ):
        cfg = h["stage_config"](name, preset, overrides)
        cfg.out = str(root / name)
        run(cfg)
    clip = sorted((root / "motion" / "train").glob("*.mp4"))[0]
    wav = sorted((root / "speech" / "train").glob("*.wav"))[0]
    model, tok, transform, meta = reader_stage("describe").load_final(root / "video" / "final")
    described = describe_videos(model, tok, transform, meta, [clip])[0]
    model, tok, features, meta = reader_stage("transcribe").load_final(root / "speech" / "final")
    transcript = transcribe_features(model, tok, [features.load(wav)], prompt=meta["prompt"])[0]

    finals = [bundle["final"], root / "video" / "final", root / "speech" / "final"]
    server = serving(CheckpointAssistant(finals), limit=1 << 20)
    try:
        assert post(server, {"file": ("c.mp4", clip.read_bytes())}) == (200, {"answer": described})
        assert post(server, {"file": ("s.wav", wav.read_bytes())}) == (200, {"answer": transcript})
        status, reply = post(server, {"file": ("s.wav", wav.read_bytes()), "question": (None, b"who?")})
        assert status == 400 and reply["error"].startswith("this checkpoint transcribes audio;")
    finally:
        server.shutdown()
        server.server_close()
