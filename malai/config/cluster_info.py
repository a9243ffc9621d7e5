"""``cluster-info.toml``: written by ``machine init``; how to find the cluster manager."""

import tomlkit

from malai.config.cluster import check_id52
from malai.config.models import ClusterInfo
from malai.config.reader import Source, check_addr, check_name
from malai.identity import parse_id52

__all__ = ["parse_cluster_info", "render_cluster_info"]


def parse_cluster_info(text: str, file: str = "cluster-info.toml") -> ClusterInfo:
    source = Source(file, text)
    root = source.root()
    alias = root.string("cluster_alias", required=True, check=check_name)
    manager = root.string("cluster_manager", required=True, check=check_id52)
    addrs = root.strings("addrs", check=check_addr)
    machine_name = root.string("machine_name", check=check_name)
    root.done()
    source.raise_problems()
    return ClusterInfo(alias, parse_id52(manager), addrs, machine_name)


def render_cluster_info(info: ClusterInfo) -> str:
    doc = tomlkit.document()
    doc.add(tomlkit.comment("Written by `malai machine init`: how this machine finds its cluster manager."))
    doc["cluster_alias"] = info.cluster_alias
    doc["cluster_manager"] = info.manager_id52
    doc["addrs"] = list(info.addrs)
    if info.machine_name:
        doc["machine_name"] = info.machine_name
    return tomlkit.dumps(doc)
