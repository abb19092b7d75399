"""
The conformance suites, one per provider interface, that every built-in
plugin passes and that plugin authors run on theirs:

- :mod:`.validator` -- ``ValidatorConformance`` (subclass it, provide a ``harness`` fixture);
- :mod:`.store` -- ``StoreConformance`` (subclass it, provide ``store`` and ``clock`` fixtures);
- :mod:`.signer` -- ``assert_signer_conforms(signer)``.

They are pytest suites and check signatures with an independent JOSE library
(PyJWT), so they need the test extra: ``pip install jwtlet[test]``.  The rest
of :mod:`jwtlet.testing` needs only what ``pip install jwtlet`` installs.
"""
