"""tfpar-generate: sample text from a GPT trained by tfpar-train.

    tfpar-generate --model_dir=runs/gpt --prompt="The for statement" --temperature=0.8 --top_k=20
"""

import json
import math
import os

from absl import app
from absl import flags

from tfpar import checks
from tfpar import config as config_lib
from tfpar import train as train_cli

FLAGS = flags.FLAGS

flags.DEFINE_string("prompt", "", "Text to continue.")
flags.DEFINE_integer("max_new_tokens", 200, "Bytes to generate.")
flags.DEFINE_float("temperature", 0.0, "0: greedy; otherwise sample from softmax(logits / T).")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely bytes (0: all).")


def load_model(model_dir: str):
    """Rebuilds the model of `model_dir/config.json` with its final weights (single device)."""
    from tfpar import models  # pylint: disable=import-outside-toplevel
    with open(os.path.join(model_dir, "config.json")) as f:
        model_cfg = config_lib.ModelConfig(**json.load(f)["model"])
    model = models.build(model_cfg)
    model.load_weights(os.path.join(model_dir, "final.weights.h5"))
    return model


def _model_dir_error(model_dir) -> str:
    """Why `model_dir` holds no model tfpar-generate can load, or ''."""
    for name in ("final.weights.h5", "config.json"):
        if not model_dir or not os.path.isfile(os.path.join(model_dir, name)):
            return (f"--model_dir has no trained model (no {name}). Received: model_dir={model_dir!r}; "
                    "accepted: a --model_dir that tfpar-train finished writing.")
    return ""


def main(argv):
    train_cli.refuse_positional(argv)
    training_flags = [f"--{flag.name}" for flag in FLAGS.flags_by_module_dict().get(train_cli.__name__, [])
                      if flag.present and flag.name not in ("model_dir", "seed")]
    if training_flags:  # the model comes from --model_dir/config.json; they would do nothing
        train_cli.fail(f"tfpar-generate takes no training flags. Received: {', '.join(training_flags)}; "
                       "accepted: --model_dir, --seed, --prompt, --max_new_tokens, --temperature, --top_k.")
    vocab = config_lib.VOCAB_SIZES["gpt"]
    if (not 0 <= FLAGS.temperature < math.inf or FLAGS.max_new_tokens <= 0
            or not 0 <= FLAGS.top_k <= vocab):
        train_cli.fail(f"bad sampling options. Received: temperature={FLAGS.temperature}, "
                       f"top_k={FLAGS.top_k}, max_new_tokens={FLAGS.max_new_tokens}; accepted: "
                       f"a finite temperature >= 0, 0 <= top_k <= {vocab} (the vocabulary), max_new_tokens > 0.")
    if FLAGS.top_k and not FLAGS.temperature:  # greedy takes the top byte: top_k would do nothing
        train_cli.fail(f"--top_k samples, and temperature 0 is greedy (no sampling). Received: "
                       f"top_k={FLAGS.top_k}, temperature=0.0; accepted: --top_k with a --temperature "
                       f"above 0, or no --top_k.")
    model_dir = train_cli.expand_path(FLAGS.model_dir)
    problem = _model_dir_error(model_dir)
    if problem:
        train_cli.fail(problem)
    try:
        checks.valid_seed("seed", FLAGS.seed)
    except ValueError as e:
        train_cli.fail(str(e))
    train_cli.quiet_tensorflow()
    try:
        model = load_model(model_dir)
    except (OSError, ValueError, TypeError, KeyError) as e:
        train_cli.fail(f"--model_dir: could not load the model. Received: model_dir={model_dir!r} "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); accepted: "
                       "a --model_dir that tfpar-train finished writing.")
    if model.model_config.name != "gpt":
        train_cli.fail(f"tfpar-generate samples from gpt models. Received: model={model.model_config.name!r}; "
                       "accepted: a --model_dir trained with --model=gpt.")
    from tfpar.models import gpt  # pylint: disable=import-outside-toplevel
    text = gpt.generate(model, FLAGS.prompt.encode("utf-8"), max_new_tokens=FLAGS.max_new_tokens,
                        temperature=FLAGS.temperature, top_k=FLAGS.top_k, seed=FLAGS.seed)
    print(FLAGS.prompt + text.decode("utf-8", errors="replace"))


def run_main():
    app.run(main, flags_parser=train_cli.parse_flags_one_line)


if __name__ == "__main__":
    run_main()
