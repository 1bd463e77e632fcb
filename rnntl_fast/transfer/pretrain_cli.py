"""`rnntl-fast pretrain`: train a word-level LSTM language model on unlabelled text and
write its encoder (encoder.pt: config, weights, vocabulary; the encoder file of
docs/pretrained.md) for `rnntl-fast finetune --encoder` and
rnntl_fast.pretrained.load_encoder. With no arguments: the embedded default text (Rotten
Tomatoes plot synopses, gensim's lee_background news and the default training split's
review texts without labels). With --lm-text: text files of any size, streamed (docs/finetune.md). Under
torchrun it trains with DistributedDataParallel, each rank on its own streams."""
import json
import os

from ..cli_types import seed
from . import cli_common
from ..pretrained.encoder import save_encoder
from .pipeline import pretrain_language_model
from .training import StopRequested, teardown_distributed


def add_arguments(parser) -> None:
    parser.description = __doc__
    parser.add_argument("--split-seed", type=seed, default=0,
                        help="seed of the default data's split (its training texts join the LM text)")
    parser.add_argument("--no-lm-train-text", action="store_true",
                        help="do not add the default training split's review texts to the LM's text")
    cli_common.add_model_arguments(parser, lm_epochs_minimum=1)
    cli_common.add_run_arguments(parser, default_output="rnntl_fast_pretrain")


def run(args) -> int:
    place = cli_common.start(args)
    try:
        recipe = cli_common.recipe_from_args(args)
        control = cli_common.control_from_args(args, place)
        prepared = cli_common.prepare_data(args)
        lm_corpus = cli_common.build_language_model_corpus(prepared, recipe, args, place)
        vocab = lm_corpus.vocab
        cli_common.log(place, f"language-model text: {prepared.description['language_model_documents']}, "
                              f"{len(lm_corpus.tokens)} tokens ({lm_corpus.valid_count} held out), "
                              f"vocabulary {len(vocab)} words")
        try:
            model, summary = pretrain_language_model(lm_corpus, recipe, control)
        except StopRequested as stop:
            cli_common.log(place, f"{stop}; continue with --resume --output-dir {args.output_dir}")
            return 0
        if place.is_main:
            path = os.path.join(args.output_dir, "encoder.pt")
            save_encoder(model.encoder, path, vocab=vocab.itos)
            with open(os.path.join(args.output_dir, "metrics.json"), "w") as handle:
                json.dump({"recipe": recipe.__dict__, "data": prepared.description, "language_model": summary},
                          handle, indent=1, default=str)
            print(f"valid perplexity {summary['valid_perplexity']:.1f}; encoder written to {path}", flush=True)
        place.barrier()
        return 0
    finally:
        teardown_distributed(place)
