"""distbn: synchronized batch normalization for MXNet Gluon over Horovod."""
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning, module="mxnet")

from .comm import broadcast_parameters, get_comm  # noqa: E402
from .convert import convert_sync_batchnorm, revert_sync_batchnorm  # noqa: E402
from .freeze import freeze_batchnorm, unfreeze_batchnorm  # noqa: E402
from .functional import batch_norm  # noqa: E402
from .layers import BatchNorm, SyncBatchNorm  # noqa: E402
from .precise_bn import update_bn_stats  # noqa: E402

__version__ = "0.1.0"
__all__ = ["batch_norm", "BatchNorm", "SyncBatchNorm", "convert_sync_batchnorm",
           "revert_sync_batchnorm", "broadcast_parameters", "get_comm", "update_bn_stats",
           "freeze_batchnorm", "unfreeze_batchnorm"]
