"""The bundle contract, numpy + stdlib only: the manifest schema, every file name, and the atomic
read (verify) and write (stage, fsync, rename; update under a lock). compile writes it, runtime reads it.
"""
