"""Image retrieval: build an index of a folder with a bundle, search it (sharded, memory-mapped), and
build it on Ray. A leaf: nothing else in runtime imports it.
"""
