# -*- test-case-name: tests.test_passwords, tests.test_cli_passwd, tests.test_ldap -*-
