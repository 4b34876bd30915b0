"""icbs: prune neural networks with the iterative Combinatorial Brain Surgeon.

The public API is filled in as the package grows; see README.md.
"""

from icbs.config import IcbsConfig, config_from_dict, load_config
from icbs.exceptions import ConfigError

__all__ = ["IcbsConfig", "load_config", "config_from_dict", "ConfigError"]
__version__ = "0.1.0"
