"""Loss functions: TCM, Smooth-AP, the Recall@k surrogate, and a registry that adds TCM to any base loss."""
from tcmlib.losses.tcm import TCMLoss, tcm_loss  # noqa: E402,F401
from tcmlib.losses.combine import WithTCM, add_tcm  # noqa: E402,F401
