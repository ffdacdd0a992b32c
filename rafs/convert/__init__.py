"""``nydusify``: convert OCI images into nydus (RAFS v6) images and check them.

Modules:

* :mod:`.reference` — image references (``host/repo:tag@digest``, ``oci:``, ``docker-archive:``).
* :mod:`.distribution` — the OCI distribution-API calls the converter needs (pull, HEAD, push).
* :mod:`.source` — image sources: registry, OCI layout directory, ``docker save`` archive.
* :mod:`.manifest` — media types, annotations, and the pure manifest/config/index rewrite.
* :mod:`.layer` — per-layer conversion (decompress, build blob + bootstrap), resumable work dir.
* :mod:`.bootstrap_layer` — the gzip tar holding ``image/image.boot``.
* :mod:`.converter` — the whole conversion of one reference (per platform) and the push.
* :mod:`.check` — validate a nydus image and compare it file by file with its source.
* :mod:`.cli` — the ``nydusify`` command.
"""
