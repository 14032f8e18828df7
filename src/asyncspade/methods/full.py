"""Dense attention: the reference every sparse method is measured against."""
import torch

from ..kvcache import Batch
from .base import SelectionContext, SelectionMethod


class Full(SelectionMethod):
    name = "full"

    def select(self, ctx: SelectionContext, layer: int, q: torch.Tensor, batch: Batch) -> None:
        return None
