"""fm: a foundation-model factory. Raw corpora in, a pretrained, tuned, distilled, exported model out."""

__version__ = "0.1.0"
