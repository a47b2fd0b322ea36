"""End-to-end tuning that alternates continuous and discrete updates: PV-Tuning.

"PV-Tuning: Beyond Straight-Through Estimation for Extreme LLM Compression" (Malinovskii et al., 2024): the
continuous step trains what a format stores as values (a code book's entries and row scales, an integer grid's
group scales) with the codes fixed, exactly as :class:`~compress.passes.peqa.Peqa` does; the discrete step holds
those values and moves the codes. Each discrete step takes the gradient of the loss in the decoded float weights
and its mean square (the empirical Fisher diagonal) over ``code_samples`` training sequences, one at a time, and
moves at most a ``code_share`` of each layer's codes to the minimum of the quadratic model they give
(:meth:`~compress.passes.trainable_grid.TrainableWeight.move_codes`), those the model favours most: the paper's
linearized V-step with its bound on how many codes change. A discrete step opens each epoch, and is kept only when
it lowers the KL on the held-out sequences; a refused one halves the share for the next. Integer grids and vector
code books move their codes; other grids (NF4, FP4) train their scales only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field

from .peqa import Peqa, PeqaConfig, held_out_kl_with, sequence_kl
from .registry import register
from .trainable_grid import discrete_step


class PvTuningConfig(PeqaConfig):
    type: Literal["pv_tuning"] = "pv_tuning"  # type: ignore[assignment]
    epochs: int = Field(4, ge=1, le=50, description="rounds of one discrete step then continuous steps (one pass "
                        "over the training share of the calibration)")
    code_share: float = Field(0.003, gt=0, le=1, description="the most a discrete step moves of each layer's "
                              "codes, as a share of them (halved after a step the held-out KL refuses)")
    code_samples: int = Field(16, ge=1, le=10_000, description="training sequences whose gradient a discrete "
                              "step follows")


@register
class PvTuning(Peqa):
    name = "pv_tuning"
    Config = PvTuningConfig

    def tune_model(self, model, teacher, device) -> dict | None:
        self.share, self.discrete = self.cfg.code_share, list[dict]()
        return super().tune_model(model, teacher, device)

    def before_epoch(self, model, grids, teacher, train, held, device, kl: float) -> None:
        def loss(i: int) -> Callable[[], torch.Tensor]:
            return lambda: sequence_kl(model, teacher, [i], device)

        def held_out() -> float:
            return held_out_kl_with(model, grids, {n: g.result() for n, g in grids.items()}, teacher, held, device)

        rows = train[:self.cfg.code_samples].tolist()
        step = discrete_step(grids, [loss(i) for i in rows], self.share, held_out, kl)
        self.discrete.append(step)
        if not step["kept"]:
            self.share /= 2

    def epoch_report(self) -> dict:
        return {"discrete_steps": self.discrete}
