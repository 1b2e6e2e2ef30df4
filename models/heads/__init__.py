"""Few-shot heads on backbone features. Each module below registers its head (and its state's stored
form) by being imported here: adding a head is one new module and one line in this list."""

from fewshot.models.heads import centroid, laplacian_shot, logreg  # noqa: F401  (the registration line)
from fewshot.models.heads.base import HEADS, STATE_KINDS, FewShotHead, HeadState

__all__ = ["HEADS", "STATE_KINDS", "FewShotHead", "HeadState"]
