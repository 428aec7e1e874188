"""TensorRT: the graphs TensorRT accepts and the engine builds for the GPU at hand.
"""
