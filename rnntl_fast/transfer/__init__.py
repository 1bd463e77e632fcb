"""Transfer learning with rnntl_fast recurrent layers: freezing (by module, layer,
direction, embedding rows), gradual unfreezing, discriminative learning rates, the slanted
triangular schedule, L2-SP, EWC, gradient reversal, ELMo-style scalar mix, encoder / LM /
classifier / multi-task models, and a DDP-ready, exactly resumable training loop. `rnntl-fast finetune` runs the
whole recipe (docs/finetune.md)."""
from .contextual import BiLanguageModelFeatures, ElmoClassifier, ScalarMix
from .freezing import (GradualUnfreezer, PartiallyFrozenEmbedding, freeze, freeze_direction, freeze_layers,
                       mask_embedding_rows, recurrent_parameters, set_trainable, unfreeze, unfreeze_layers)
from .layers import GradientReversal, reverse_gradient
from .models import (ClassificationHead, LanguageModel, LanguageModelHead, MultiTaskModel, RecurrentEncoder,
                     TextClassifier, TextEncoder)
from .regularizers import EWC, L2SP, diagonal_fisher
from .schedules import SlantedTriangularLR, discriminative_param_groups, slanted_triangular

__all__ = [
    "freeze", "unfreeze", "freeze_layers", "unfreeze_layers", "freeze_direction", "recurrent_parameters",
    "set_trainable", "mask_embedding_rows", "PartiallyFrozenEmbedding", "GradualUnfreezer",
    "discriminative_param_groups", "slanted_triangular", "SlantedTriangularLR", "L2SP", "EWC", "diagonal_fisher",
    "reverse_gradient", "GradientReversal",
    "RecurrentEncoder", "TextEncoder", "LanguageModel", "LanguageModelHead", "ClassificationHead", "TextClassifier",
    "MultiTaskModel",
    "ScalarMix", "BiLanguageModelFeatures", "ElmoClassifier",
]
