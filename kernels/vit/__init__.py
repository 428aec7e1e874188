"""The native ViT image tower: the packer of an open_clip ViT's weights and the runner of its C kernel.
"""
