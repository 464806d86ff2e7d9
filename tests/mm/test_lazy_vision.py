"""A Mllama checkpoint's vision tensors are read lazily, like its LM: every image-encoder parameter has a
`lazy_source`, and a process of a 2-way FSDP2 run (dim-0 shards, as `mm.training.materialize` reads them) reads
about half of the vision bytes from the files; the two halves put together equal the eager load."""

import importlib.util
from pathlib import Path

import pytest
import torch

from mm.formats.hf_mllama import load_hf_mllama
from mm.training.materialize import materialize, record_init


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("mllama_tests", Path(__file__).with_name("test_mllama.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    path = tmp_path_factory.mktemp("lazy-vision") / "mllama"
    helpers.save_tiny_mllama(path)
    return path


class CountingOpen:
    """`safe_open` that counts the bytes of every slice read through `get_slice(key)[...]`."""

    def __init__(self, real):
        self.real, self.bytes = real, 0

    def __call__(self, *args, **kwargs):
        counter = self

        class Handle:
            def __init__(self):
                self.h = counter.real(*args, **kwargs)

            def __enter__(self):
                self.f = self.h.__enter__()
                return self

            def __exit__(self, *exc):
                return self.h.__exit__(*exc)

            def get_slice(self, key):
                part = self.f.get_slice(key)

                class Slice:
                    def __getitem__(self, idx):
                        t = part[idx]
                        counter.bytes += t.numel() * t.element_size()
                        return t

                    def get_shape(self):
                        return part.get_shape()

                return Slice()

        return Handle()


def shard_rows(n: int, rank: int, world: int = 2) -> tuple[int, int]:
    """FSDP2's dim-0 shard of n rows on `rank` (ceil-sized chunks, the last ones possibly short or empty)."""
    size = -(-n // world)
    return min(n, rank * size), min(n, (rank + 1) * size)


def test_each_process_reads_half_of_the_vision_tensors_and_the_halves_equal_the_eager_load(
    mllama, monkeypatch
):
    import mm.formats.hf_llama.load as hf_load

    whole = load_hf_mllama(mllama)
    with record_init() as rec:
        lazy = load_hf_mllama(mllama, device="meta")
    rec.bind(lazy)
    vision = [n for n, _ in lazy.named_parameters() if n.startswith("image_encoder.")]
    assert vision and set(vision) <= set(rec.sources)  # nothing of the vision side read at build time
    want = dict(whole.named_parameters())
    total = sum(want[n].numel() * want[n].element_size() for n in vision)
    counting = CountingOpen(hf_load.safe_open)
    monkeypatch.setattr(hf_load, "safe_open", counting)
    read = []
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in vision}
    for rank in range(2):
        counting.bytes = 0
        for n in vision:
            src, shape = rec.sources[n], tuple(want[n].shape)
            if not shape:
                parts[n].append(src.read())
                continue
            start, stop = shard_rows(shape[0], rank)
            if start < stop:
                parts[n].append(src.read(start, stop))
        read.append(counting.bytes)
    for n in vision:  # the two processes' rows together: the eager load's tensor
        got = torch.cat(parts[n]) if want[n].dim() else parts[n][0]
        assert torch.equal(got, want[n].detach()), n
    # each process about half (the position embedding and class token are read whole by both: small)
    assert all(0.4 * total < b < 0.6 * total for b in read), (read, total)
    materialize(lazy, rec, torch.device("cpu"))  # one process: every tensor whole, equal to the eager load
    got_sd, want_sd = lazy.state_dict(), whole.state_dict()
    assert all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd)


@pytest.mark.slow
def test_the_image_stage_from_a_mllama_checkpoint_in_two_processes_equals_one(corpus, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from mm.lm import Tokenizer
    from mm.training.config import config_to_yaml, load_config
    from mm.training.runner import run
    from mm.training.stage import stage_class
    from mm.world import synth_shapes

    spec = importlib.util.spec_from_file_location("mllama_tests", Path(__file__).with_name("test_mllama.py"))
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    tok = Tokenizer.from_file(corpus["tokenizer"])
    ckpt = tmp_path / "mllama"
    ids = (tok.bos_id, tok.eos_id, tok.pad_id)
    helpers.save_tiny_mllama(ckpt, vocab=tok.vocab_size - 8, image_token=tok.image_id, token_ids=ids)
    tok.save(ckpt)
    train = synth_shapes(tmp_path, n=8, seed=0, split="train")
    yaml = tmp_path / "image.yaml"
    yaml.write_text(
        "stage: image-pretrain\n"
        f"init_from_hf_mllama: {ckpt}\n"
        f"data: {{tile_size: 32, max_tiles: 2, train: [{train}]}}\n"
        "optim: {lr: 1.0e-2, warmup_steps: 1}\n"
        "train: {batch_size: 4, max_steps: 2, save_every: 2, peak_flops: 1.0e9, num_threads: 1, seed: 3}\n"
        "eval_samples: 0\ncurve_samples: 0\n"
    )
    cfg = load_config(stage_class("image-pretrain").config_class, yaml)
    cfg.out = str(tmp_path / "two")
    (tmp_path / "two.yaml").write_text(config_to_yaml(cfg))
    (tmp_path / "jobs.json").write_text(json.dumps([{"config": str(tmp_path / "two.yaml")}]))
    root = Path(__file__).resolve().parents[2]
    cmd = [Path(sys.executable).parent / "torchrun", "--standalone", "--nproc-per-node", "2"]
    cmd += [root / "tests/mm/stage_worker.py", tmp_path / "jobs.json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MM_TEST_TRAINABLE": str(tmp_path / "trainable.jsonl")}
    r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    for line in (tmp_path / "trainable.jsonl").read_text().splitlines():  # the encoder sharded, read lazily
        kinds = {k for n, k in json.loads(line)["params"].items() if n.startswith("image_encoder.")}
        assert kinds == {"DTensor"}, kinds
    cfg.out = str(tmp_path / "one")
    run(cfg)

    def losses(out: str) -> list[float]:
        return [json.loads(x)["loss"] for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]

    one, two = losses(str(tmp_path / "one")), losses(str(tmp_path / "two"))
    assert len(one) == len(two) == 2
    torch.testing.assert_close(torch.tensor(two), torch.tensor(one), rtol=2e-5, atol=2e-5)
