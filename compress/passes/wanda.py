"""Wanda: "A Simple and Effective Pruning Approach for Large Language Models" (Sun, Liu, Bair,
Kolter, 2023). Prunes by ``|W_ij| * ||X_j||``: weight magnitude times the L2 norm of its input
channel over the calibration tokens, compared within each output row. No weight update."""

from typing import Literal

from .base import Requirements, current_weight
from .pruning import PruneOptions, PruningPass, check_shape, select_mask
from .registry import register


class WandaConfig(PruneOptions):
    type: Literal["wanda"] = "wanda"


def wanda_score(w, input_norm):
    return w.abs() * input_norm.unsqueeze(0)


@register
class Wanda(PruningPass):
    name = "wanda"
    Config = WandaConfig

    def requirements(self):
        return Requirements(stats=frozenset({"sq_sum"}), model_plan=self.owl_plan(), layer_parallel=True)

    def compress_layer(self, name, module, stats, cfg):
        w = current_weight(module)
        check_shape(name, w.shape[1], cfg.pattern)
        mask = select_mask(wanda_score(w, stats.input_norm().cpu()), self.layer_sparsity(name, cfg),
                           cfg.pattern)
        return self.sparse_result(w, mask, cfg)
