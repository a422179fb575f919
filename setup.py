from setuptools import find_packages, setup

setup(
    name="mailrelay",
    version="0.1.0",
    description="A hardened SMTP relay on Twisted: AUTH, policy, DKIM, durable spool, MX and smarthost delivery",
    python_requires=">=3.11",
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    package_data={"twisted": ["plugins/mailrelay_plugin.py"]},
    install_requires=[
        "twisted[tls]>=24.3",
        "pyopenssl",
        "service-identity",
        "cryptography",
        "dkimpy",
        "pynacl",          # dkimpy needs it to verify Ed25519 signatures (RFC 8463)
        "dnspython>=2.4",
        "argon2-cffi",
        "bcrypt",
        "ldaptor",
        "prometheus_client",
    ],
    extras_require={"test": ["aiosmtpd"]},
    entry_points={
        "console_scripts": [
            "mailrelay = mailrelay.cli.main:main",
            "mailrelay-sendmail = mailrelay.cli.sendmail:main",
        ],
    },
)
