# -*- test-case-name: tests.test_crash, tests.test_delivery_process -*-
"""twistd plugin: `twistd -n mailrelay --config tap.conf`.

A config error is one line on stderr naming the file and key, and twistd exits with status 2; nothing starts
half-configured.

twistd's own log is written by mailrelay's renderer (mailrelay.logger: the same lines as Twisted's,
cheaper), to where twistd's options say (`--logfile`, `-n`): makeService wraps the relay in
mailrelay.logger.TwistdLog, which gives twistd's application that observer as its ILogObserver, the
component twistd logs to when no `--logger` is given. `--syslog` and `--logger` are left to twistd.
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
        from mailrelay.logger import TwistdLog, twistd_observer
        from mailrelay.service import make_service

        try:
            config = load(options["config"])
            relay = make_service(config, handle_sighup=True)
            return TwistdLog(relay, twistd_observer(options.parent))
        except ConfigError as e:
            sys.stderr.write(f"mailrelay: {e}\n")
            raise SystemExit(2) from None
        except ValueError as e:   # certificate/key problems found while building
            sys.stderr.write(f"mailrelay: {options['config']}: {e}\n")
            raise SystemExit(2) from None


serviceMaker = MailRelayServiceMaker()
