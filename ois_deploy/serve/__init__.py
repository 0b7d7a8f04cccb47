"""HTTP serving (API v1): `ois-deploy serve`. Needs the serve extra: pip install 'ois-deploy[serve]'."""
