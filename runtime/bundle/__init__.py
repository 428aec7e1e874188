"""The bundle contract, numpy + stdlib only: compile writes a bundle through it, runtime reads it.

schema.py (the manifest's dataclasses and their JSON), agreement.py (its parity and gate sections),
layout.py (every file and folder name a bundle holds), files.py (read and verify: paths inside the
bundle, checksums, the digest), write.py (stage, fsync, rename; update_manifest under a lock),
swap.py (finish or undo a replacement a killed compile left).
"""
