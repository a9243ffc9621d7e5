"""Config files: models, parsers that report every problem, renderers."""

from malai.config.cluster import parse_cluster, render_cluster
from malai.config.cluster_info import parse_cluster_info, render_cluster_info
from malai.config.device import parse_device
from malai.config.errors import ConfigError, ConfigProblem
from malai.config.machine import parse_machine_config, personalize, render_machine_config

__all__ = [
    "ConfigError", "ConfigProblem", "parse_cluster", "parse_cluster_info", "parse_device",
    "parse_machine_config", "personalize", "render_cluster", "render_cluster_info",
    "render_machine_config",
]
