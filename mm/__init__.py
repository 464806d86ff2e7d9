"""mm: extend a frozen Llama 3-style language model with image, video and speech.

The rooms install as `mm.lm`, `mm.encoders`, `mm.adapters`, `mm.datasets`; this package holds the
composition layer, training, and the `mm` command line.
"""

__version__ = "0.1.0"
