"""Every use of a private API of a dependency, fenced: one module per library.

Each use names the version it was verified on, why it is worth the risk (a measured cost of
the public path, or a property users rely on), and has a canary test in
tests/unit/test_compat_torch.py that fails on any other version.
"""
