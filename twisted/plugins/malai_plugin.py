"""Registers ``twistd malai`` (the service maker lives in malai.tap)."""

from twisted.application.service import ServiceMaker

malai = ServiceMaker("malai", "malai.tap", "malai peer-to-peer infrastructure daemon", "malai")
