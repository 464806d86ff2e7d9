"""The stages' default prompts: the text before a stage's target (config values; a bundle records its own).

- `IMAGE_PROMPT` = "Caption: " (image stages), e.g. `Caption: a large red circle and a small blue square`;
- `VIDEO_PROMPT` = "Video: " (video stage), e.g. `Video: a red circle moves left`;
- `ASR_PROMPT` = "Repeat after me in English: " (the paper's ASR prompt; speech stage), e.g.
  `Repeat after me in English: there is a small green triangle.`;
- `AST_PROMPT` = "Translate the following sentence into Spanish: " (the paper's speech translation prompt;
  speech stage), after the sentence it translates: `{sentence} Translate the following sentence into Spanish:
  {translation}` in the text corpus, the speech in the sentence's place in the speech stage.
- `DIALOGUE_PROMPT` = " ": spoken dialogue has no instruction (paper §7.6); the answer follows the spoken
  question after a space, as the text corpus's question lines have it: `{scene} {question} {answer}`, e.g.
  `a large red circle. what colour is the circle? red`, the speech in the question's place.

The embedded world's text corpus (`mm.world.corpus`) holds lines in each format, so the frozen LM knows them.
"""

__all__ = ["ASR_PROMPT", "AST_PROMPT", "DIALOGUE_PROMPT", "IMAGE_PROMPT", "VIDEO_PROMPT"]

IMAGE_PROMPT = "Caption: "
VIDEO_PROMPT = "Video: "
ASR_PROMPT = "Repeat after me in English: "
AST_PROMPT = "Translate the following sentence into Spanish: "
DIALOGUE_PROMPT = " "
