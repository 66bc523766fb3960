"""The kernel every role shares: wire format, handshake, session tags, the Twisted protocol base,
serialization, errors, configuration, TLS, logging and the call-graph model.

Core modules import only each other (and third-party libraries): never a role
(``achilles.server``, ``.node``, ``.controller``) and never the user-facing facade
(``achilles.api``, ``achilles.local``, ``achilles.cli`` ...). ``tests/test_boundaries.py``
checks this.
"""
