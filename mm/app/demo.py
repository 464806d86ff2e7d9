"""`mm demo`: the embedded end-to-end run on the shapes world, with no downloads.

Stages, declared in `mm.app.demo_steps.STEPS`: synthesise the world, train the tokenizer and the tiny LM
(`lm-pretrain`), pretrain the image encoder contrastively (`clip-pretrain`), then `image-pretrain` ->
`image-anneal` with the LM frozen (held-out captions, the LM fingerprint, captions of robustness variants of the
image world: JPEG, anti-aliased, unusual sizes), `video` (the temporal aggregator and the video cross-attention
on the moving-shapes clips, LM and image path frozen), then `bestrq-pretrain` -> `speech` on the spoken world
(WER on held-out sentences and voices). `--modality lm|image|video|speech|all` picks the sections; the `lm`
section always runs, and so do the sections a picked step needs (video starts from image-anneal).

Every step runs the same way (`run_step`): its config is its preset with the demo's paths filled in; its cache
key hashes that config, the content of the final folders of the steps it needs and its input data;
`cached_stage` reuses a finished stage with the same key (`OUT/<stage>/stage.json`), resumes an unfinished one
from its last checkpoint, and otherwise runs it with `mm.training.runner.run`. Each stage's output lands in
`OUT/<stage>/final`, its record in report.json under `SECTION.stages.<stage>` (with its `cache_key`).

Which sections report.json holds: those of the modalities this run covered, plus an earlier report's section
of another modality only while it is still valid, that is while every stage of it has a finished marker whose
hash equals both the `cache_key` recorded in that section and the key this run computes now (same config, same
final folders it needs, same input data). A kept section counts as reused in this run (0 s). Sections of an
earlier report without keys, with a stage changed since or missing, are left out, and so are their report.md
parts: `mm demo --modality lm` after a retrained LM no longer shows the speech figures of the old one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mm.app.bench_timing import cpu_model
from mm.app.demo_figures import exact_match_curve, windowed_curve
from mm.app.demo_steps import STEPS, Step, StepRun
from mm.app.demo_world import WORLD, content_hash
from mm.app.report import SECTIONS, stage_rows, write_report
from mm.formats.hf_llama import load_hf
from mm.lm.io import write_json
from mm.training.config import config_to_yaml
from mm.training.freeze import fingerprint
from mm.training.runner import run

log = logging.getLogger("mm.app.demo")

MODALITIES = ("lm", "image", "video", "speech", "chat", "all")
# Sections `all` leaves out: the chat stages run on top of the cached main stages (`mm demo --modality chat`),
# as the whole demo with them would take longer than its 25 minutes on a 2-core CPU.
OPTIONAL_SECTIONS = ("chat",)


def cached_stage(
    stage_dir: Path, key: str, run: Callable[[bool], dict[str, Any]]
) -> tuple[dict[str, Any], bool]:
    """Run a stage unless a finished run with the same input hash exists; resume an unfinished one."""
    marker = stage_dir / "stage.json"
    prev = json.loads(marker.read_text()) if marker.is_file() else {}
    if prev.get("hash") == key and prev.get("complete") and (stage_dir / "summary.json").is_file():
        log.info("%s: inputs unchanged, reusing %s", stage_dir.name, stage_dir / "final")
        summary = json.loads((stage_dir / "summary.json").read_text())
        return {**summary, "stage_seconds": prev.get("seconds")}, True
    resume = prev.get("hash") == key
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_json({"hash": key, "complete": False}, marker)
    t0 = time.perf_counter()
    summary = run(resume)
    if summary.get("stopped", "max_steps") != "max_steps":
        raise KeyboardInterrupt(
            f"{stage_dir.name} stopped by {summary['stopped']}; re-run `mm demo` to resume"
        )
    seconds = time.perf_counter() - t0  # the run that finished it (a resumed run: its own part only)
    write_json({"hash": key, "complete": True, "seconds": seconds}, marker)
    return {**summary, "stage_seconds": seconds}, False


def selected_steps(modality: str) -> list[Step]:
    """The steps `--modality` runs, in demo order: the lm section, the modality's, and what they need."""
    if modality not in MODALITIES:
        raise ValueError(f"--modality {modality}: available: {', '.join(MODALITIES)}")
    by_name = {s.name: s for s in STEPS}
    sections = set(SECTIONS) - set(OPTIONAL_SECTIONS) if modality == "all" else {"lm", modality}
    while True:
        needed = {by_name[n].section for s in STEPS if s.section in sections for n in s.needs}
        if needed <= sections:
            return [s for s in STEPS if s.section in sections]
        sections |= needed


def final_hash(out: Path, name: str, finals: dict[str, str]) -> str:
    """Content hash of `OUT/<name>/final`, computed once per run (`finals` keeps it)."""
    if name not in finals:
        final = out / name / "final"
        if not final.is_dir():
            raise FileNotFoundError(f"{final} does not exist")
        finals[name] = content_hash(final)
    return finals[name]


def step_key(step: Step, cfg: Any, out: Path, data_dir: Path, finals: dict[str, str]) -> str:
    """The step's cache key: its config, the final folders of the steps it needs, its input data."""
    return content_hash(
        config_to_yaml(cfg),
        *(final_hash(out, n, finals) for n in step.needs),
        *(data_dir / p for p in step.inputs),
    )


def run_step(
    step: Step, out: Path, data_dir: Path, finals: dict[str, str], budget: ThreadBudget | None = None
) -> StepRun:
    """Run (or reuse) one step through `cached_stage` and `run`; its stage record, curve and frozen check."""
    from mm.formats.bundle import verify_frozen

    cfg = step.config(out, data_dir)
    key = step_key(step, cfg, out, data_dir, finals)
    stage_dir = out / step.name
    t0 = time.perf_counter()
    hook = budget.hook(cfg.train.num_threads) if budget is not None else None
    summary, reused = cached_stage(stage_dir, key, lambda resume: run(cfg, resume=resume, before_step=hook))
    finals.pop(step.name, None)  # rewritten (or confirmed): hash it afresh when a later step needs it
    record = {
        "reused": reused,
        "wall_time_s": time.perf_counter() - t0,  # in this run
        "train_wall_time_s": summary.get("wall_time_s"),  # the training run's own time
        "stage_seconds": summary.get("stage_seconds"),  # when the stage was computed
        "step": summary.get("step"),
        "final_loss": summary.get("final_loss"),
        **{k: summary[k] for k in ("data_skips", *step.keep) if k in summary},
        "cache_key": key,
    }
    if step.loss_curve:
        record[step.loss_curve] = windowed_curve(stage_dir / "metrics.jsonl", "loss", 20)
    result = StepRun(step, out, data_dir, summary, record, None, None)
    if step.verify:
        result.frozen = verify_frozen(result.final)
    if step.curve:
        result.curve = exact_match_curve(result)
    return result


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    """`into.update(new)`, except that dicts under the same key are merged (one level)."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            into[k] = {**into[k], **v}
        else:
            into[k] = v


def run_section(
    steps: list[Step],
    out: Path,
    data_dir: Path,
    finals: dict[str, str],
    budget: ThreadBudget | None = None,
) -> dict[str, Any]:
    """Run one section's steps in order and build its report.json section from what each contributes."""
    t0 = time.perf_counter()
    section: dict[str, Any] = {"stages": {}, "synth_wall_time_s": {}}
    figures: dict[str, Any] = {}
    for step in steps:
        for part in step.world:
            section["synth_wall_time_s"].update(WORLD[part](data_dir))
        r = run_step(step, out, data_dir, finals, budget)
        section["stages"][step.name] = r.record
        if r.frozen is not None:
            section["lm_frozen"], section["lm_frozen_detail"] = r.frozen
            section["checkpoint"] = str(r.final)
        if r.curve is not None:
            _merge(figures, {"exact_match_curves": {step.name: r.curve}})
        if step.figures is not None:
            _merge(figures, step.figures(r))
    section["wall_time_s"] = time.perf_counter() - t0
    _merge(section, figures)
    return section


def earlier_section(
    name: str, section: Any, out: Path, data_dir: Path, finals: dict[str, str]
) -> dict[str, Any] | None:
    """An earlier report's section, marked reused, if all its stages are unchanged (module docstring); else None."""
    recs = section.get("stages") if isinstance(section, dict) else None
    if not isinstance(recs, dict):
        return None
    for step in (s for s in STEPS if s.section == name):
        rec = recs.get(step.name)
        stage_dir = out / step.name
        marker = stage_dir / "stage.json"
        if not (isinstance(rec, dict) and marker.is_file() and (stage_dir / "summary.json").is_file()):
            return None
        try:
            key = step_key(step, step.config(out, data_dir), out, data_dir, finals)
            prev = json.loads(marker.read_text())
        except (OSError, ValueError) as e:
            log.info("report: leaving out the earlier %s section (%s)", name, e)
            return None
        if not (prev.get("complete") and prev.get("hash") == key == rec.get("cache_key")):
            log.info("report: leaving out the earlier %s section (%s changed since)", name, step.name)
            return None
    kept = copy.deepcopy(section)
    for rec in kept["stages"].values():
        rec.update(reused=True, wall_time_s=0.0)
    kept.update(wall_time_s=0.0, synth_wall_time_s={})
    log.info("report: keeping the %s section of the earlier report (its stages are unchanged)", name)
    return kept


class ThreadBudget:
    """The machine's cores between the demo's main process and one background section (`BackgroundSection`).

    The speech section (BEST-RQ, then the speech stage; one thread each, as its presets say) needs only the LM,
    so it runs beside the image and video sections instead of after them. While it runs, the main process's
    stages give up as many threads as it uses; once it has ended, they take their configured threads back,
    checked before every optimizer step (`hook`)."""

    def __init__(self, background: BackgroundSection | None = None) -> None:
        self.background = background

    def threads(self, wanted: int) -> int:
        """Threads for a main-process stage that asks for `wanted` (0 = torch's current setting)."""
        wanted = wanted or torch.get_num_threads()
        bg = self.background
        if bg is None or not bg.running():
            return wanted
        return max(1, min(wanted, (os.cpu_count() or 1) - bg.threads))

    def hook(self, wanted: int) -> Callable[[int], None]:
        """`before_step` for `run`: set torch's threads to `threads(wanted)` when that changed."""

        def before_step(step: int) -> None:
            n = self.threads(wanted)
            if torch.get_num_threads() != n:
                torch.set_num_threads(n)

        return before_step


def _background_main(names: list[str], out: str, data_dir: str, result: str, log_file: str) -> None:
    """Entry point of a background section's process: run the steps named, write the section to `result`."""
    import sys

    with open(log_file, "a", buffering=1) as f:
        sys.stdout = sys.stderr = f
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=f, force=True
        )
        torch.set_num_threads(1)
        steps = [s for s in STEPS if s.name in names]
        section = run_section(steps, Path(out), Path(data_dir), {})
        write_json(json.loads(json.dumps(section, default=str)), Path(result))


class BackgroundSection:
    """One report section run in a separate process (spawned; one thread), its output in `OUT/<name>.log`."""

    threads = 1

    def __init__(self, name: str, steps: list[Step], out: Path, data_dir: Path) -> None:
        import multiprocessing

        self.name = name
        self.log = out / f"{name}.log"
        self.result = out / f".{name}-section.json"
        self.result.unlink(missing_ok=True)
        args = ([s.name for s in steps], str(out), str(data_dir), str(self.result), str(self.log))
        self.proc = multiprocessing.get_context("spawn").Process(target=_background_main, args=args)
        self.proc.start()
        log.info("%s: running beside the other sections (1 thread); its log: %s", name, self.log)

    def running(self) -> bool:
        """Whether the process is still working."""
        return self.proc.is_alive()

    def join(self) -> dict[str, Any]:
        """Wait for the section and return it; a failed process is an error naming its log."""
        self.proc.join()
        if self.proc.exitcode != 0 or not self.result.is_file():
            tail = self.log.read_text().splitlines()[-5:] if self.log.is_file() else []
            raise RuntimeError(
                f"the {self.name} section failed (exit code {self.proc.exitcode}); see {self.log}:\n"
                + "\n".join(tail)
            )
        section = json.loads(self.result.read_text())
        self.result.unlink()
        return section

    def stop(self, timeout: float = 120.0) -> None:
        """After an interruption: give the process time to save its checkpoint (it got the signal too), then end it."""
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()


def runs_beside(steps: list[Step]) -> bool:
    """Whether the speech section runs in a background process: it needs only the LM, so it goes beside the
    image and video sections when some of them run too and the machine has a core for each."""
    sections = {s.section for s in steps}
    return "speech" in sections and bool(sections & {"image", "video"}) and (os.cpu_count() or 1) > 1


def run_demo(out: Path, modality: str = "all") -> dict[str, Any]:
    """Run the demo stages for `modality` and write OUT/report.json and OUT/report.md."""
    steps = selected_steps(modality)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data_dir = out / "data"
    report_file = out / "report.json"
    try:
        earlier = json.loads(report_file.read_text()) if report_file.is_file() else {}
    except ValueError:
        earlier = {}
    if not isinstance(earlier, dict):
        earlier = {}
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": cpu_model(),
        }
    }
    finals: dict[str, str] = {}
    ran = {}
    by_section = {name: [s for s in steps if s.section == name] for name in SECTIONS}
    beside = runs_beside(steps)
    background: BackgroundSection | None = None
    budget = ThreadBudget()
    try:
        for name in SECTIONS:
            if not by_section[name] or (beside and name == "speech"):
                continue
            ran[name] = run_section(by_section[name], out, data_dir, finals, budget)
            if name == "lm" and beside:
                background = budget.background = BackgroundSection(
                    "speech", by_section["speech"], out, data_dir
                )
        if background is not None:
            ran["speech"] = background.join()
            background = None
    finally:
        if background is not None:
            background.stop()
    for name in SECTIONS:  # the report's sections in demo order, whether run now or kept
        section = ran.get(name) or (
            earlier_section(name, earlier.get(name), out, data_dir, finals) if name in earlier else None
        )
        if section is not None:
            report[name] = section
    report["lm_fingerprint"] = {
        "before": report["lm"].get("fingerprint"),  # right after LM pretraining
        "after": fingerprint(load_hf(out / "lm-pretrain" / "final")),  # now, after every multimodal stage
    }
    report["lm_frozen"] = all(
        report[name]["lm_frozen"] for name in SECTIONS if "lm_frozen" in report.get(name, {})
    ) and (report["lm_fingerprint"]["before"] == report["lm_fingerprint"]["after"])
    rows = stage_rows(report)
    # seconds each stage took when it was computed (kept when it is reused), and in this run
    report["wall_seconds"] = {stage: computed for stage, _, computed, _ in rows}
    report["this_run_seconds"] = {stage: this_run for stage, this_run, _, _ in rows}
    report["wall_time_s"] = time.perf_counter() - t0
    write_json(report, report_file)
    write_report(out, report)
    return report
