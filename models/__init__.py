"""Model architectures, addressed by name.

Every model here is plain ``nn.Module`` code with no knowledge of ranks, devices or
meta-learning.  All of them run under ``torch.func.functional_call`` with externally
supplied parameters: normalisation layers are GroupNorm (or none), so there are no
running statistics and no in-place buffer updates on the meta path.
"""

from models.registry import MODEL_NAMES, build_model, count_parameters

__all__ = ["MODEL_NAMES", "build_model", "count_parameters"]
