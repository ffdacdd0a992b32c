"""The RAFS format (v5 read, v6 read+write), its metadata API, builder and filesystems.

Depends only on :mod:`storage`; knows nothing of containerd.
"""
