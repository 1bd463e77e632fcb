"""Held-out perplexity of a pretrained language model evaluated both ways: state carried
across windows and every window from zeros (docs/finetune.md, "Carried state or zero-state
windows").

    python benchmarks/lm_state_eval.py RUN_DIR [RUN_DIR ...]

RUN_DIR is the --output-dir of `rnntl-fast pretrain` or `finetune` (language_model.pt and
lm_tokens.bin/json). Prints one JSON line per run.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rnntl_fast.transfer.corpus import TokenCorpus, TokenStreams, stream_perplexity  # noqa: E402
from rnntl_fast.transfer.models import LanguageModel, RecurrentEncoder  # noqa: E402
from rnntl_fast.transfer.pipeline import Recipe  # noqa: E402
from rnntl_fast.transfer.training import load_checkpoint  # noqa: E402


def evaluate(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "lm_tokens.json")) as handle:
        corpus = TokenCorpus(os.path.join(run_dir, "lm_tokens.bin"), json.load(handle))
    checkpoint = load_checkpoint(os.path.join(run_dir, "language_model.pt"))
    recipe = Recipe(**checkpoint["recipe"])
    model = LanguageModel(RecurrentEncoder.stacked(**recipe.encoder_config(len(corpus.vocab))),
                          dropout=recipe.dropout)
    model.load_state_dict(checkpoint["model"])
    result = {"run": run_dir, "trained_with": recipe.lm_state, "valid_tokens": corpus.valid_count}
    for carry in (True, False):
        streams = TokenStreams(corpus.valid_tokens(), recipe.lm_batch_size, recipe.lm_chunk_length, carry_state=carry)
        result["valid_perplexity_" + ("carried" if carry else "zero_state")] = stream_perplexity(model, streams)
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)
    for run in sys.argv[1:]:
        print(json.dumps(evaluate(run)), flush=True)
