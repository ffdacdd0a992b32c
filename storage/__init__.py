"""Blob access for nydus images: backends, chunk cache, blob device, prefetch.

Layering: ``storage`` knows blobs, chunks and byte ranges; nothing about inodes,
files or containerd.  ``rafs`` builds on it, ``snapshotter`` on both.
"""
