"""The chat section of `mm demo --modality chat`: the instruct LM (`lm-sft`) and the chat model (`vision-sft`),
their figures for report.json and their part of report.md.

Figures: the instruct LM's held-out perplexity of the plain corpus beside the pretrained LM's and its text
question answering; the hot swap (captions of new images with the pretrained LM, with the instruct LM swapped in
before any training, and after `vision-sft`); question-answering accuracy per family of the design table on new
images and clips with the canonical phrasings, with held-out phrasings and on held-out colour-shape pairs; and
example conversations (several turns, two images, a video) through `mm.models.chat.Chat`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mm.app.demo_steps import StepRun
from mm.world.questions import FAMILIES as QUESTION_FAMILIES

# The world's question families, then the questions about clips reported apart (`chat_eval.family_key`).
FAMILIES = (*QUESTION_FAMILIES, "colour (video)", "shape (video)", "describe (video)")
SPLITS = {
    "heldout": "canonical phrasings",
    "heldout_phrasings": "held-out phrasings",
    "heldout_pairs": "held-out pairs",
}


def lm_sft_figures(run: StepRun) -> dict[str, Any]:
    """The instruct LM: plain-corpus perplexity beside the pretrained LM's, text question answering."""
    s = run.summary
    qa = next(iter((s.get("eval") or {}).values()), {})
    return {
        "instruct_lm": {
            "ppl_pretrained": s.get("pretrained_heldout_ppl"),
            "ppl_instruct": s.get("heldout_ppl"),
            "ppl_ratio": s.get("ppl_ratio"),
            "text_qa_accuracy": s.get("text_qa_accuracy"),
            "text_qa_by_family": qa.get("per_family"),
            "examples": (qa.get("examples") or [])[:6],
        }
    }


def example_conversations(final: Path, data_dir: Path) -> list[dict[str, Any]]:
    """Four conversations with the chat model: one image over three turns, two images, one video, and a scene
    described in text (no media: the instruct LM alone)."""
    from mm.models.chat import Chat

    chat = Chat.load(final)
    rows = [json.loads(x) for x in (data_dir / "chat" / "heldout.jsonl").read_text().splitlines()]
    base = data_dir / "chat"
    plans = []
    one = next(r for r in rows if r.get("media") == "image" and r.get("family") == "left")
    plans.append((one, ["describe the image.", "how many shapes are there?"]))
    two = next(r for r in rows if r.get("family") == "more")
    plans.append((two, ["describe the image."]))
    clip = next(r for r in rows if r.get("media") == "video" and r.get("family") == "motion")
    plans.append((clip, ["describe the video."]))
    text = json.loads((data_dir / "chat" / "text_heldout.jsonl").read_text().splitlines()[0])
    plans.append((text, []))
    out = []
    for row, follow_ups in plans:
        chat.reset()
        items = row["messages"][0]["content"]
        items = [{"type": "text", "text": items}] if isinstance(items, str) else items
        images = [base / x["path"] for x in items if x.get("type") == "image"]
        video = next((base / x["path"] for x in items if x.get("type") == "video"), None)
        question = next(x["text"] for x in items if x.get("type") == "text")
        turns = [{"user": question, "assistant": chat.ask(question, images=images, video=video)}]
        turns += [{"user": q, "assistant": chat.ask(q)} for q in follow_ups]
        out.append(
            {
                "media": [str(p.relative_to(data_dir)) for p in [*images, *([video] if video else [])]],
                "captions": row.get("captions"),
                "reference": row["messages"][1]["content"],
                "turns": turns,
            }
        )
    return out


def chat_figures(run: StepRun) -> dict[str, Any]:
    """VQA accuracy per family and split, the hot-swap captioning figures and example conversations."""
    ev = run.summary.get("eval", {})
    ok = bool(run.frozen and run.frozen[0])
    vqa = {k: {f: v for f, v in ev[k].items() if f != "skipped"} for k in SPLITS if k in ev}
    return {
        "vqa_accuracy": (ev.get("heldout") or {}).get("accuracy"),
        "vqa_heldout_phrasings_accuracy": (ev.get("heldout_phrasings") or {}).get("accuracy"),
        "vqa_heldout_pairs_accuracy": (ev.get("heldout_pairs") or {}).get("accuracy"),
        "vqa": vqa,
        "hot_swap": run.summary.get("hot_swap", {}),
        # The chat bundle refuses a changed instruct LM: conversations only while it is untouched.
        "conversations": example_conversations(run.final, run.data_dir) if ok else [],
    }


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def chat_report_section(report: dict[str, Any]) -> list[str]:
    """report.md's chat part: the instruct LM, the hot swap, VQA per family, conversations (none without)."""
    chat = report.get("chat") or {}
    if not chat:
        return []
    md = ["", "## Chat: the instruct LM and questions about images and videos", ""]
    lm = chat.get("instruct_lm") or {}
    if lm:
        md += [
            f"Instruct LM (`lm-sft`): plain-corpus held-out perplexity {_fmt(lm.get('ppl_instruct'))} against "
            f"{_fmt(lm.get('ppl_pretrained'))} for the pretrained LM (ratio {_fmt(lm.get('ppl_ratio'))}); text "
            f"question answering (a scene described in text, then a question) {_fmt(lm.get('text_qa_accuracy'))}.",
            "",
        ]
    swap = chat.get("hot_swap") or {}
    if swap:
        names = {
            "pretrained_lm": "adapters on the pretrained LM (as trained)",
            "instruct_lm_no_training": "instruct LM swapped in, no training",
            "instruct_lm_after_vision_sft": "instruct LM, after vision-sft",
        }
        md += ["Hot swap: captions of new images (the caption prompt), exact match.", ""]
        md += ["| model | exact match |", "| --- | --- |"]
        md += [f"| {names.get(k, k)} | {_fmt(v.get('exact_match'))} |" for k, v in swap.items()]
        md.append("")
    vqa = chat.get("vqa") or {}
    if vqa:
        cols = [k for k in SPLITS if k in vqa]
        md += ["Question answering on new images and clips (exact match per question family).", ""]
        md += ["| family | " + " | ".join(SPLITS[k] for k in cols) + " |", "| --- |" + " --- |" * len(cols)]
        for f in FAMILIES:
            cells = [_fmt((vqa[k].get("by_family") or {}).get(f)) for k in cols]
            md.append(f"| {f} | " + " | ".join(cells) + " |")
        md.append("| **all** | " + " | ".join(_fmt(vqa[k].get("accuracy")) for k in cols) + " |")
        md.append("")
    for c in chat.get("conversations") or []:
        md.append(
            f"Conversation about {', '.join(f'`{m}`' for m in c['media'])} (captions: {c.get('captions')}):"
        )
        md += [
            f"- user: {' / '.join(t['user'].splitlines())}  \n  assistant: **{t['assistant']}**"
            for t in c["turns"]
        ]
        md.append("")
    return md
