"""The stages' default prompts: the text before a stage's target (config values; a bundle records its own).

- `IMAGE_PROMPT` = "Caption: " (image stages), e.g. `Caption: a large red circle and a small blue square`;
- `VIDEO_PROMPT` = "Video: " (video stage), e.g. `Video: a red circle moves left`;
- `ASR_PROMPT` = "Repeat after me in English: " (the paper's ASR prompt; speech stage), e.g.
  `Repeat after me in English: there is a small green triangle.`.

The embedded world's text corpus (`mm.world.corpus`) holds lines in each format, so the frozen LM knows them.
"""

__all__ = ["ASR_PROMPT", "IMAGE_PROMPT", "VIDEO_PROMPT"]

IMAGE_PROMPT = "Caption: "
VIDEO_PROMPT = "Video: "
ASR_PROMPT = "Repeat after me in English: "
