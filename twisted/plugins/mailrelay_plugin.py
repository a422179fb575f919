# -*- test-case-name: tests.test_crash, tests.test_delivery_process -*-
"""twistd plugin: `twistd -n mailrelay --config tap.conf`.

A config error is one line on stderr naming the file and key, and twistd exits with status 2; nothing starts
half-configured.
"""
import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [["config", "c", "tap.conf", "the relay's TOML configuration file"]]


@implementer(IServiceMaker, IPlugin)
class MailRelayServiceMaker:
    tapname = "mailrelay"
    description = "mailrelay: a hardened SMTP relay (submission, policy, DKIM, durable queue, delivery)"
    options = Options

    def makeService(self, options):
        from mailrelay.config import ConfigError, load
        from mailrelay.service import make_service

        try:
            config = load(options["config"])
            return make_service(config, handle_sighup=True)
        except ConfigError as e:
            sys.stderr.write(f"mailrelay: {e}\n")
            raise SystemExit(2) from None
        except ValueError as e:   # certificate/key problems found while building
            sys.stderr.write(f"mailrelay: {options['config']}: {e}\n")
            raise SystemExit(2) from None


serviceMaker = MailRelayServiceMaker()
