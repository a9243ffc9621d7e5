"""Registers the ``malai:`` client endpoint string (see malai.p2p.endpoint)."""

from malai.p2p.endpoint import MalaiEndpointParser

malaiEndpointParser = MalaiEndpointParser()
