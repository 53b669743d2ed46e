"""`moedistill.cli` under `accelerate launch --config_file conf/accelerate/fsdp.yaml` on CPU processes.

accelerate turns FSDP on only for GPU-like distributed types: with CPU processes its
``AcceleratorState`` stays ``MULTI_CPU`` and ignores the FSDP plugin (the branch that sets
``DistributedType.FSDP`` lists MULTI_GPU, MULTI_XPU, ... but not MULTI_CPU), so on this machine
the shipped fsdp.yaml would run as plain DDP. This launcher changes that one decision, as a GPU
run makes it: where the launch asked for FSDP (``ACCELERATE_USE_FSDP``, set by accelerate from
fsdp.yaml) the state becomes FSDP with the plugin accelerate builds from the launch's
environment. Everything after it is the real code a GPU run goes through: accelerate's FSDP2
preparation (``fully_shard`` per decoder layer from the TRANSFORMER_BASED_WRAP policy, bf16
``MixedPrecisionPolicy``), the Trainer's FULL_STATE_DICT checkpoints and optimizer state,
``--resume``, moedistill's stages, gloo for the collectives.
"""

import os
import sys

from accelerate import state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = state.AcceleratorState.__init__


def _init_choosing_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        self.distributed_type = DistributedType.FSDP
    if self.distributed_type == DistributedType.FSDP and getattr(self, "fsdp_plugin", None) is None:
        self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()  # from the environment
        if self._mixed_precision != "no":
            self.fsdp_plugin.set_mixed_precision(self._mixed_precision)


state.AcceleratorState.__init__ = _init_choosing_fsdp

from moedistill.cli import main  # noqa: E402

sys.argv[0] = "moedistill"
sys.exit(main())
