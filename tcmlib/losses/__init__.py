"""Loss functions: TCM, Smooth-AP, the Recall@k surrogate, and a registry that adds TCM to any base loss."""
from tcmlib.losses.tcm import TCMLoss, tcm_loss  # noqa: E402,F401
from tcmlib.losses.combine import WithTCM, add_tcm  # noqa: E402,F401
from tcmlib.losses.smooth_ap import SmoothAPLoss, smooth_ap_loss  # noqa: E402,F401
from tcmlib.losses.recall_surrogate import RecallAtKSurrogateLoss, recall_surrogate_loss, simix_samples  # noqa: E402,F401
from tcmlib.losses.registry import available_losses, loss_param_groups, make_loss  # noqa: E402,F401
