"""Magnitude pruning: drop the weights of smallest absolute value in each row (the data-free
baseline of "Learning both Weights and Connections for Efficient Neural Networks", Han et al., 2015)."""

from typing import Literal

from .base import Requirements, current_weight
from .pruning import PruneOptions, PruningPass, check_shape, select_mask
from .registry import register


class MagnitudeConfig(PruneOptions):
    type: Literal["magnitude"] = "magnitude"


@register
class Magnitude(PruningPass):
    name = "magnitude"
    Config = MagnitudeConfig

    def requirements(self):
        return Requirements(model_plan=self.owl_plan(), layer_parallel=True)

    def compress_layer(self, name, module, stats, cfg):
        w = current_weight(module)
        check_shape(name, w.shape[1], cfg.pattern)
        return self.sparse_result(w, select_mask(w.abs(), self.layer_sparsity(name, cfg), cfg.pattern), cfg)
