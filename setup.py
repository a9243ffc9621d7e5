from setuptools import find_packages, setup

setup(
    name="malai",
    version="0.1.0",
    description="Peer-to-peer infrastructure daemon: commands and services by ed25519 identity",
    python_requires=">=3.11",
    packages=[*find_packages(include=["malai", "malai.*"]), "twisted.plugins"],
    install_requires=[
        "twisted[tls]>=24.7",
        "pynacl>=1.5",
        "cryptography>=42",
        "pyopenssl>=24",
        "service-identity>=24",
        "attrs>=23",
        "automat>=24",
        "tomlkit>=0.12",
        "h11>=0.14",
        "h2>=4.1",
        "txtorcon>=23",
        "prometheus-client>=0.17",
        "zeroconf>=0.130",
    ],
    extras_require={
        "test": ["hypothesis>=6", "ruff", "mypy", "mypy-zope", "websockets>=12"],
    },
    entry_points={"console_scripts": ["malai = malai.cli:run", "malai-ssh = malai.cli.ssh:run"]},
)
