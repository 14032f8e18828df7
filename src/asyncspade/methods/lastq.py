"""Last-query reuse: AsyncSpade's machinery with no predictor, step t+1 is scored with step t's true query.
The ablation that tells whether the forecaster is worth it."""
from .asyncspade import AsyncSpade


class LastQ(AsyncSpade):
    name = "lastq"

    def __init__(self, cfg):
        super().__init__(cfg.replace(predictor="ridge", ridge_kind="last"))
