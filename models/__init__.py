"""Keras 3 Transformer language models (installed as `tfpar.models`)."""

from tfpar import checks
from tfpar import config as config_lib
from tfpar import modeling
from tfpar.models.gpt import GPT
from tfpar.models.seq2seq import Seq2Seq

_MODELS = {"gpt": GPT, "seq2seq": Seq2Seq}


def build(cfg: config_lib.ModelConfig) -> modeling.LanguageModel:
    """Creates the model named by `cfg.name` with its variables built."""
    checks.choice("model", cfg.name, tuple(_MODELS))
    return modeling.build_with(_MODELS[cfg.name](cfg))


__all__ = ["GPT", "Seq2Seq", "build"]
