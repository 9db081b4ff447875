"""tfpar-generate: sample text from a GPT trained by tfpar-train.

    tfpar-generate --model_dir=runs/gpt --prompt="The for statement" --temperature=0.8 --top_k=20
"""

import json
import os

from absl import app
from absl import flags

from tfpar import train as train_cli

FLAGS = flags.FLAGS

flags.DEFINE_string("prompt", "", "Text to continue.")
flags.DEFINE_integer("max_new_tokens", 200, "Bytes to generate.")
flags.DEFINE_float("temperature", 0.0, "0: greedy; otherwise sample from softmax(logits / T).")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely bytes (0: all).")


def load_model(model_dir: str):
    """Rebuilds the model of `model_dir/config.json` with its final weights (single device)."""
    from tfpar import config as config_lib  # pylint: disable=import-outside-toplevel
    from tfpar import models  # pylint: disable=import-outside-toplevel
    with open(os.path.join(model_dir, "config.json")) as f:
        model_cfg = config_lib.ModelConfig(**json.load(f)["model"])
    model = models.build(model_cfg)
    model.load_weights(os.path.join(model_dir, "final.weights.h5"))
    return model


def main(argv):
    del argv
    train_cli.quiet_tensorflow()
    model_dir = FLAGS.model_dir
    if not model_dir or not os.path.isfile(os.path.join(model_dir, "final.weights.h5")):
        train_cli.fail(f"--model_dir has no trained model. Received: model_dir={model_dir!r}; "
                       "accepted: a --model_dir that tfpar-train finished writing.")
    if FLAGS.temperature < 0 or FLAGS.top_k < 0 or FLAGS.max_new_tokens <= 0:
        train_cli.fail(f"bad sampling options. Received: temperature={FLAGS.temperature}, "
                       f"top_k={FLAGS.top_k}, max_new_tokens={FLAGS.max_new_tokens}; accepted: "
                       "temperature >= 0, top_k >= 0, max_new_tokens > 0.")
    model = load_model(model_dir)
    if model.model_config.name != "gpt":
        train_cli.fail(f"tfpar-generate samples from gpt models. Received: model={model.model_config.name!r}.")
    from tfpar.models import gpt  # pylint: disable=import-outside-toplevel
    text = gpt.generate(model, FLAGS.prompt.encode("utf-8"), max_new_tokens=FLAGS.max_new_tokens,
                        temperature=FLAGS.temperature, top_k=FLAGS.top_k, seed=FLAGS.seed)
    print(FLAGS.prompt + text.decode("utf-8", errors="replace"))


def run_main():
    app.run(main, flags_parser=train_cli.parse_flags_one_line)


if __name__ == "__main__":
    run_main()
