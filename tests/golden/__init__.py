"""Golden tests (a package, so that ``tests/golden/test_sotr.py`` and ``tests/test_sotr.py``
etc. can share a basename: pytest imports these as ``golden.test_<model>``)."""
